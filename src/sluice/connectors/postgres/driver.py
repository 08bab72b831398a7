"""The ADBC Postgres driver, imported without polars.

``adbc_driver_manager``'s DB-API module imports polars whenever it is
installed (to accept polars frames, which sluice never passes), and polars
is installed with the ``registry`` extra (the Avro fast path). That import
cost 0.1-0.2 CPU-s at every process start and a thread pool, for nothing:
so polars is hidden while the driver loads, and imported later only by the
code that uses it.
"""

from __future__ import annotations

import sys
from types import ModuleType


def _load() -> tuple[ModuleType, ModuleType]:
    hide = "polars" not in sys.modules
    if hide:
        sys.modules["polars"] = None  # type: ignore[assignment]  # makes `import polars` fail
    try:
        import adbc_driver_manager
        from adbc_driver_postgresql import dbapi
    except ModuleNotFoundError as exc:  # pragma: no cover
        raise ModuleNotFoundError("adbc_driver_postgresql", name="adbc_driver_postgresql") from exc
    finally:
        if hide and sys.modules.get("polars", False) is None:
            del sys.modules["polars"]
    return adbc_driver_manager, dbapi


adbc_driver_manager, adbc = _load()

__all__ = ["adbc", "adbc_driver_manager"]
