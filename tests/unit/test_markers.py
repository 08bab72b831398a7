"""Every module that needs the real services says so with the ``integration`` marker.

``pytest -m "not integration"`` must leave out everything that talks to a
service, so a module under ``tests/integration`` that forgets its
``pytestmark`` would silently run (and fail, or hang) without them. Read
statically: importing the modules would need their service clients.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
#: The folders whose test modules run against the real services.
SERVICE_DIRS = [TESTS / "integration", TESTS / "conformance"]


def _marks(module: Path) -> set[str]:
    """The ``pytest.mark.<name>`` names of the module-level ``pytestmark``."""
    tree = ast.parse(module.read_text(), str(module))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in targets):
                continue
            assert node.value is not None
            items = (
                node.value.elts if isinstance(node.value, ast.List | ast.Tuple) else [node.value]
            )
            for item in items:
                # pytest.mark.<name>, possibly called: pytest.mark.<name>(...)
                attr = item.func if isinstance(item, ast.Call) else item
                if (
                    isinstance(attr, ast.Attribute)
                    and isinstance(attr.value, ast.Attribute)
                    and attr.value.attr == "mark"
                ):
                    found.add(attr.attr)
    return found


def _service_modules() -> list[Path]:
    return sorted(p for d in SERVICE_DIRS for p in d.rglob("test_*.py"))


def test_there_are_service_modules_to_check() -> None:
    assert len(_service_modules()) >= 5


@pytest.mark.parametrize("module", _service_modules(), ids=lambda p: str(p.relative_to(TESTS)))
def test_a_service_module_carries_the_integration_marker(module: Path) -> None:
    assert "integration" in _marks(module), (
        f"{module.relative_to(TESTS)} needs `pytestmark = pytest.mark.integration`"
    )


def test_the_reader_sees_the_forms_pytest_accepts(tmp_path: Path) -> None:
    forms = {
        "pytestmark = pytest.mark.integration": {"integration"},
        "pytestmark = [pytest.mark.integration, pytest.mark.slow]": {"integration", "slow"},
        "pytestmark: Any = (pytest.mark.integration,)": {"integration"},
        "pytestmark = pytest.mark.timeout(5)": {"timeout"},
        "marks = pytest.mark.integration": set(),
        "def f():\n    pytestmark = pytest.mark.integration": set(),
    }
    for source, want in forms.items():
        module = tmp_path / "test_m.py"
        module.write_text(f"import pytest\n{source}\n")
        assert _marks(module) == want, source
