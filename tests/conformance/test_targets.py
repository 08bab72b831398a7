"""The target and CDC-target conformance suites over every table target, against
the real services (embedded ones on local files)."""

from __future__ import annotations

import pytest

from sluice.testing import (
    CDC_CHECKS,
    MESSAGE_TARGET_CHECKS,
    TARGET_CHECKS,
    CdcTargetHarness,
    Check,
    TargetHarness,
)
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

KINDS = ["postgres", "mysql", "sqlite", "duckdb", "delta_local"]


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


@pytest.mark.parametrize("check", cases(MESSAGE_TARGET_CHECKS))
def test_rabbitmq_target(
    check: Check[TargetHarness], rabbitmq_target_harness: TargetHarness
) -> None:
    check(rabbitmq_target_harness)
