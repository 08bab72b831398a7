"""The target and CDC-target conformance suites over every table target, against
the real services (embedded ones on local files)."""

from __future__ import annotations

import pytest

from sluice.testing import CDC_CHECKS, TARGET_CHECKS, CdcTargetHarness, Check, TargetHarness
from tests.conformance.conftest import cases

pytestmark = pytest.mark.integration

KINDS = ["postgres", "mysql", "sqlite", "duckdb", "delta_local"]

#: Connector bugs the suite found, per kind: check name -> why it fails today.
KNOWN_BUGS: dict[str, dict[str, str]] = {
    "delta_local": {
        check: "delta merge: the flush that creates the table appends the batch as it is, "
        "without keeping the last row of each key (DeltaTarget.flush)"
        for check in ("merge_last_row_wins", "merge_replay_changes_nothing")
    },
}


@pytest.mark.parametrize(
    ("check", "kind"),
    [
        pytest.param(*case.values, kind, id=f"{case.id}-{kind}", marks=case.marks)
        for kind in KINDS
        for case in cases(TARGET_CHECKS, KNOWN_BUGS.get(kind))
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
