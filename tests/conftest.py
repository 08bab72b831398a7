"""What every test shares: none writes into the home directory of whoever runs it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A file source keeps its own position files under ``$SLUICE_STATE_DIR``,
    else ``$XDG_STATE_HOME/sluice``, else ``~/.local/state/sluice``: point
    ``XDG_STATE_HOME`` at a folder of this test session, for the tests and
    the ``flow`` processes they start, so a test run neither fills the home
    directory nor leaves positions that a later run of the same folder
    (a quickstart in a clone at the same path) would resume from."""
    home = tmp_path_factory.mktemp("xdg-state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before
