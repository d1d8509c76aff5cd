#!/usr/bin/env bash
# Quickstart: installs what it needs, builds blockd, starts the daemon on the embedded
# local store, creates a volume and shows it with nbdinfo. The daemon keeps running so you
# can use it; `scripts/quickstart.sh stop` stops it.
#
# Environment: QUICKSTART_DIR (default /tmp/blockd-quickstart), NBD_PORT (default 10809),
# API_PORT (default 7480). Ports already in use are replaced by free ones.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${QUICKSTART_DIR:-/tmp/blockd-quickstart}
BIN=$PWD/target/release/blockd

stop() {
  if [ -f "$DIR/ready.json" ]; then
    pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$DIR/ready.json")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped blockd (pid $pid)"
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
  --api "127.0.0.1:$API_PORT" --ready-file "$DIR/ready.json" >"$DIR/blockd.log" 2>&1 &
for _ in $(seq 1 100); do [ -s "$DIR/ready.json" ] && break; sleep 0.1; done
[ -s "$DIR/ready.json" ] || { echo "blockd did not start:"; cat "$DIR/blockd.log"; exit 1; }
export BLOCKD_API=127.0.0.1:$API_PORT

echo "== creating volume demo (10 GiB, sparse)"
"$BIN" volume show demo >/dev/null 2>&1 || "$BIN" volume create demo --size 10G
"$BIN" volume list
echo "== nbdinfo nbd://127.0.0.1:$NBD_PORT/demo"
nbdinfo "nbd://127.0.0.1:$NBD_PORT/demo"

cat <<EOT

blockd is running (API 127.0.0.1:$API_PORT, NBD 127.0.0.1:$NBD_PORT, socket $DIR/data/nbd.sock).
  export BLOCKD_API=127.0.0.1:$API_PORT
  $BIN volume list
  nbdfuse /tmp/demo.img nbd://127.0.0.1:$NBD_PORT/demo &      # attach without a kernel nbd module
  nbd-client 127.0.0.1 $NBD_PORT /dev/nbd0 -N demo -b 512      # attach with the kernel module
Stop it with: scripts/quickstart.sh stop
EOT
