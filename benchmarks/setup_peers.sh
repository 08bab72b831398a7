#!/usr/bin/env bash
# Install the peer engines the window and join benchmarks compare with, each
# into its own venv under $PEERS_DIR (default /opt/peers).
#
#   bash benchmarks/setup_peers.sh        # idempotent
#
# * quixstreams: Quix Streams 3.28.1 with psycopg2-binary for its community
#   PostgreSQLSink, in $PEERS_DIR/quixstreams.
# * bytewax: Bytewax 0.21.1 with psycopg 3 (benchmarks/latency's COPY sink), in
#   $PEERS_DIR/bytewax.
#
# Never install a peer into the project's environment: each brings its own
# confluent-kafka pin and state-store wheels (rocksdict).
set -euo pipefail

PEERS_DIR=${PEERS_DIR:-/opt/peers}
PY=${PYTHON:-python3}
QUIX_VERSION=3.28.1
PSYCOPG2_VERSION=2.9.13
BYTEWAX_VERSION=0.21.1
PSYCOPG_VERSION=3.3.9

quix_installed() {
  local venv=$PEERS_DIR/quixstreams
  [[ -x $venv/bin/python ]] &&
    "$venv/bin/python" - "$QUIX_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
import psycopg2  # noqa: F401
import quixstreams.sinks.community.postgresql  # noqa: F401
sys.exit(metadata.version("quixstreams") != sys.argv[1])
EOF
}

venv=$PEERS_DIR/quixstreams
if quix_installed; then
  echo "quixstreams $QUIX_VERSION already installed in $venv"
else
  if [[ ! -x $venv/bin/python ]]; then
    echo "creating venv $venv with $($PY --version)"
    mkdir -p "$PEERS_DIR"
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet \
    "quixstreams==$QUIX_VERSION" "psycopg2-binary==$PSYCOPG2_VERSION"
  quix_installed || { echo "setup_peers.sh: quixstreams $QUIX_VERSION did not install in $venv" >&2; exit 1; }
  echo "quixstreams $QUIX_VERSION installed in $venv"
fi

bytewax_installed() {
  local venv=$PEERS_DIR/bytewax
  [[ -x $venv/bin/python ]] &&
    "$venv/bin/python" - "$BYTEWAX_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib import metadata
import psycopg  # noqa: F401
import bytewax.connectors.kafka  # noqa: F401
sys.exit(metadata.version("bytewax") != sys.argv[1])
EOF
}

venv=$PEERS_DIR/bytewax
if bytewax_installed; then
  echo "bytewax $BYTEWAX_VERSION already installed in $venv"
else
  if [[ ! -x $venv/bin/python ]]; then
    echo "creating venv $venv with $($PY --version)"
    mkdir -p "$PEERS_DIR"
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet \
    "bytewax[kafka]==$BYTEWAX_VERSION" "psycopg[binary]==$PSYCOPG_VERSION"
  bytewax_installed || { echo "setup_peers.sh: bytewax $BYTEWAX_VERSION did not install in $venv" >&2; exit 1; }
  echo "bytewax $BYTEWAX_VERSION installed in $venv"
fi
