#!/usr/bin/env bash
# Install the reference engine (ematix-flow 1.0.0) into its own venv.
#
#   bash benchmarks/setup_reference.sh        # idempotent; EMATIX_VENV overrides /opt/ematix
#
# Never install ematix-flow into the project's environment: its wheel also
# installs a `flow` console script that would shadow sluice's `flow`.
set -euo pipefail

VENV=${EMATIX_VENV:-/opt/ematix}
VERSION=1.0.0
PY=${PYTHON:-python3}

installed() {
  [[ -x $VENV/bin/python ]] &&
    "$VENV/bin/python" - "$VERSION" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
import ematix_flow._core  # the Rust extension loads
import pyarrow  # noqa: F401
sys.exit(metadata.version("ematix-flow") != sys.argv[1])
EOF
}

if installed; then
  echo "ematix-flow $VERSION already installed in $VENV"
  exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "creating venv $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi
# The venv's own pip, so nothing lands in the project's environment.
"$VENV/bin/python" -m pip install --quiet "ematix-flow==$VERSION" pyarrow

installed || { echo "setup_reference.sh: ematix-flow $VERSION did not install in $VENV" >&2; exit 1; }
echo "ematix-flow $VERSION installed in $VENV ($("$VENV/bin/python" -c 'import ematix_flow._core as c; print("core", c.core_version())'))"
