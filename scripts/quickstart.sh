#!/usr/bin/env bash
# Quickstart: installs what it needs, builds blockd, starts the daemon on the embedded
# local store, builds a demo database image (pgbench data, a customers table masked by a
# post-script), creates two clones attached to running PostgreSQL instances, shows that
# they are isolated, and prints how to connect. Everything keeps running;
# `scripts/quickstart.sh stop` stops the clones and the daemon.
#
# Environment: QUICKSTART_DIR (default /tmp/blockd-quickstart), NBD_PORT (default 10809),
# API_PORT (default 7480); ports in use are replaced by free ones.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${QUICKSTART_DIR:-/tmp/blockd-quickstart}
BIN=$PWD/target/release/blockd

stop() {
  if [ -f "$DIR/ready.json" ]; then
    pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$DIR/ready.json")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"   # the daemon stops its clones cleanly before exiting
      for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped blockd (pid $pid) and its clones"
    fi
    rm -f "$DIR/ready.json"
  fi
}
if [ "${1:-}" = "stop" ]; then stop; exit 0; fi

free_port() {  # free_port PREFERRED -> PREFERRED if free, else a free one
  python3 - "$1" <<'PY'
import socket, sys
want = int(sys.argv[1])
for port in (want, 0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); print(s.getsockname()[1]); break
    except OSError:
        pass
    finally:
        s.close()
PY
}

echo "== installing dependencies"
scripts/deps.sh
echo "== building blockd (release)"
cargo build --release -q -p blockd

stop
mkdir -p "$DIR"
NBD_PORT=$(free_port "${NBD_PORT:-10809}")
API_PORT=$(free_port "${API_PORT:-7480}")
echo "== starting blockd serve (data in $DIR/data, log in $DIR/blockd.log)"
nohup "$BIN" serve --data-dir "$DIR/data" --listen "127.0.0.1:$NBD_PORT" \
  --api "127.0.0.1:$API_PORT" --ready-file "$DIR/ready.json" >>"$DIR/blockd.log" 2>&1 &
for _ in $(seq 1 100); do [ -s "$DIR/ready.json" ] && break; sleep 0.1; done
[ -s "$DIR/ready.json" ] || { echo "blockd did not start:"; cat "$DIR/blockd.log"; exit 1; }
export BLOCKD_API=127.0.0.1:$API_PORT

if ! "$BIN" image show demo >/dev/null 2>&1; then
  echo "== building the demo image (pgbench data + masked customers)"
  "$BIN" image create -f examples/demo/image.yaml
fi
"$BIN" image list

for c in alice bob; do
  if ! "$BIN" clone show "$c" >/dev/null 2>&1; then
    echo "== creating clone $c"
    start=$(date +%s%N)
    "$BIN" clone create demo "$c"
    echo "   ready in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  fi
done
conn() { "$BIN" --output json clone show "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connection"])'; }
A=$(conn alice); B=$(conn bob)

echo "== the customers table is masked in every clone"
psql "$A" -c "SELECT id, name, email, phone FROM customers ORDER BY id LIMIT 3"
echo "== a change in alice's clone ..."
psql "$A" -c "UPDATE pgbench_accounts SET abalance = abalance + 1000 WHERE aid <= 10"
psql "$A" -tAc "SELECT 'alice: sum(abalance) of the first 10 accounts = ' || sum(abalance) FROM pgbench_accounts WHERE aid <= 10"
echo "== ... is invisible in bob's"
psql "$B" -tAc "SELECT 'bob:   sum(abalance) of the first 10 accounts = ' || sum(abalance) FROM pgbench_accounts WHERE aid <= 10"

echo "== space: each clone holds only what it changed"
"$BIN" clone list
"$BIN" df

cat <<EOT

blockd is running (API 127.0.0.1:$API_PORT, NBD 127.0.0.1:$NBD_PORT). Connect with:
  psql "$A"
  psql "$B"
More:
  export BLOCKD_API=127.0.0.1:$API_PORT
  $BIN clone create demo carol          # another clone in about a second
  $BIN clone reset alice                # back to the image
  $BIN clone save alice demo-v2         # alice's state as a new image
  $BIN clone delete bob
Stop everything with: scripts/quickstart.sh stop
EOT
