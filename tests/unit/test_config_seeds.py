"""Valid pipeline files load: the user guide's seed fixtures and configs/*.toml.

The seeds are the reference engine's own TOML (tests/fixtures/seeds), so they
prove format compatibility; configs/ holds one example pipeline per shape of
the user guide (CI also runs ``flow validate configs/*.toml``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sluice.cli import main
from sluice.config import PipelineSpec, load_file

ROOT = Path(__file__).resolve().parents[2]
SEEDS = sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "tests/fixtures/seeds").glob("*.toml")
)
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.toml"))

EXPECTED_CONFIGS = {
    "events_to_pg",
    "fan_in",
    "fan_out",
    "sql_lookup",
    "tumbling",
    "hopping",
    "session",
    "join",
    "cdc_postgres",
    "cdc_delta",
    "object_store_target",
    "rabbitmq_to_pg",
    "pubsub_to_pg",
    "kinesis_to_pg",
}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_seed_fixtures_exist() -> None:
    assert len(SEEDS) >= 10


@pytest.mark.parametrize("path", SEEDS)
def test_seed_loads(path: str) -> None:
    spec = load_file(path)
    assert isinstance(spec, PipelineSpec)
    assert spec.all_sources
    assert spec.all_targets


@pytest.mark.parametrize("path", SEEDS)
def test_flow_validate_accepts_seed(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", path]) == 0
    out, err = capsys.readouterr()
    assert out == f"{path}: ok\n"
    assert err == ""


def test_python_m_sluice_validate_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sluice", "validate", *SEEDS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{p}: ok" for p in SEEDS]
    assert proc.stderr == ""


def test_every_example_config_is_present() -> None:
    assert {Path(p).stem for p in CONFIGS} >= EXPECTED_CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_example_config_validates(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_file(path)
    assert isinstance(spec, PipelineSpec)
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


@pytest.mark.parametrize("path", CONFIGS)
def test_example_config_has_comment_header(path: str) -> None:
    first = (ROOT / path).read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# "), "each example starts with a comment saying what it shows"


@pytest.mark.parametrize("path", CONFIGS)
def test_example_config_plans(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", path]) == 0
    assert capsys.readouterr().out.startswith("pipeline ")
