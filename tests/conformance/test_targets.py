"""The target and CDC-target conformance suites over every table target, against
the real services (embedded ones on local files)."""

from __future__ import annotations

import pytest

from sluice.testing import (
    APPEND_TARGET_CHECKS,
    CDC_CHECKS,
    POSITIONS_CHECKS,
    TARGET_CHECKS,
    CdcTargetHarness,
    Check,
    TargetHarness,
)
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

KINDS = ["postgres", "mysql", "sqlite", "duckdb", "delta_local", "delta_s3"]
#: Targets without merge (files), and every target recording positions in its commits.
FILE_KINDS = [
    "object_store_local",
    "object_store_local_csv",
    "object_store_local_csv_dialect",
    "object_store_s3",
]
POSITION_KINDS = ["delta_local", "delta_s3", *FILE_KINDS]


@pytest.mark.parametrize(
    ("check", "kind"),
    [
        pytest.param(*case.values, kind, id=f"{case.id}-{kind}")
        for kind in KINDS
        for case in cases(TARGET_CHECKS)
    ],
)
def test_target(check: Check[TargetHarness], kind: str, request: pytest.FixtureRequest) -> None:
    check(request.getfixturevalue(f"{kind}_harness"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("check", cases(CDC_CHECKS))
def test_cdc_target(
    check: Check[CdcTargetHarness], kind: str, request: pytest.FixtureRequest
) -> None:
    check(request.getfixturevalue(f"{kind}_harness"))


@pytest.mark.parametrize("check", cases(APPEND_TARGET_CHECKS))
def test_rabbitmq_target(
    check: Check[TargetHarness], rabbitmq_target_harness: TargetHarness
) -> None:
    check(rabbitmq_target_harness)


@pytest.mark.parametrize(
    ("check", "kind"),
    [
        pytest.param(*case.values, kind, id=f"{case.id}-{kind}")
        for kind in FILE_KINDS
        for case in cases(APPEND_TARGET_CHECKS)
    ],
)
def test_file_target(
    check: Check[TargetHarness], kind: str, request: pytest.FixtureRequest
) -> None:
    check(request.getfixturevalue(f"{kind}_harness"))


@pytest.mark.parametrize("kind", POSITION_KINDS)
@pytest.mark.parametrize("check", cases(POSITIONS_CHECKS))
def test_positions_target(
    check: Check[TargetHarness], kind: str, request: pytest.FixtureRequest
) -> None:
    check(request.getfixturevalue(f"{kind}_harness"))
