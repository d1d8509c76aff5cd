#!/usr/bin/env python3
"""Database benchmarks of blockd's control plane (release build, real PostgreSQL 15).

    python3 bench/db.py clone-ready [--scales 5,100] [--clones 10]
        time from `blockd clone create` to the first successful `SELECT 1` over TCP, for
        clones of the demo image (examples/demo) built at each pgbench scale.
    python3 bench/db.py refresh [--scales 10,100] [--refreshes 7]
        how long a source refresh keeps the standby's file system frozen (fsfreeze, read
        the WAL position, snapshot, thaw) and how long the whole refresh takes, for two
        database sizes (pgbench scale factors), while pgbench writes on the primary.

Each writes its table to docs/BENCHMARKS.md between <!-- bench:db-NAME:begin/end -->
markers (--no-docs: print only) and keeps the raw samples under bench/results/. Everything
it starts (daemon, primary, pgbench) is stopped by pid on every path; the daemon stops its
clones and standbys itself on SIGTERM. Needs root (mounts, loop devices), as the tests do.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs", "BENCHMARKS.md")
RESULTS = os.path.join(REPO, "bench", "results")
BLOCKD = os.environ.get("BLOCKD_BIN", os.path.join(REPO, "target", "release", "blockd"))
PG_BIN = "/usr/lib/postgresql/15/bin"


def log(msg):
    print(f"[db-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def as_postgres(tool, *args, **kw):
    return run(["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, tool), *args], **kw)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_rev():
    try:
        rev = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
        dirty = run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"]).strip()
        return rev + ("-dirty" if dirty else "")
    except subprocess.CalledProcessError:
        return "unknown"


class Daemon:
    """`blockd serve` on a fresh data dir with free ports; stopped with SIGTERM."""

    def __init__(self, root):
        self.data = os.path.join(root, "data")
        ready = os.path.join(root, "ready.json")
        lo = free_port()
        self.log_path = os.path.join(root, "blockd.log")
        self.proc = subprocess.Popen(
            [BLOCKD, "serve", "--data-dir", self.data, "--listen", "127.0.0.1:0",
             "--api", "127.0.0.1:0", "--socket", os.path.join(root, "nbd.sock"),
             "--ready-file", ready, "--clone-ports", f"{lo}-{lo + 40}"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"blockd did not start; see {self.log_path}")
            time.sleep(0.05)
        self.api = json.load(open(ready))["api"]

    def cli(self, *args):
        out = subprocess.run([BLOCKD, "--api", self.api, "--output", "json", *args],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"blockd {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Primary:
    """A PostgreSQL 15 primary of our own, TCP on a free loopback port, password-less."""

    def __init__(self, root):
        self.dir = os.path.join(root, "primary")
        os.makedirs(self.dir)
        shutil.chown(self.dir, "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        as_postgres("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-instructions")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 "
                f"-c unix_socket_directories='{self.dir}' -c max_wal_size=4GB")
        as_postgres("pg_ctl", "-D", self.data, "-o", opts, "-l",
                    os.path.join(self.dir, "log"), "-w", "start")

    def pgbench(self, *args):
        return subprocess.Popen(["pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                 "postgres", *args, "postgres"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        subprocess.run(["runuser", "-u", "postgres", "--", os.path.join(PG_BIN, "pg_ctl"),
                        "-D", self.data, "-m", "immediate", "-w", "stop"],
                       capture_output=True)


def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def update_docs(key, title, body):
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    doc = open(DOCS).read()
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {title} (`{key}`)\n\n{block}\n"
    open(DOCS, "w").write(doc)
    log(f"updated docs/BENCHMARKS.md section {key}")


def save(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{name}.json")
    json.dump(data, open(path, "w"), indent=2)
    return os.path.relpath(path, REPO)


def machine():
    load = open("/proc/loadavg").read().split()[:3]
    return f"{os.cpu_count()} vCPUs, load average {' '.join(load)} at the end"


# ------------------------------------------------------------------ clone-ready

def try_select(conn):
    r = subprocess.run(["psql", "-X", "-tA", "-c", "SELECT 1", conn], capture_output=True,
                       text=True)
    return r.returncode == 0 and r.stdout.strip() == "1"


def demo_image(root, scale):
    """The demo image's definition with pgbench at `scale` and a volume to fit it."""
    demo = os.path.join(REPO, "examples", "demo")
    d = os.path.join(root, f"demo{scale}")
    os.makedirs(d)
    load = open(os.path.join(demo, "load.sh")).read().replace("${DEMO_SCALE:-5}", str(scale))
    open(os.path.join(d, "load.sh"), "w").write(load)
    os.chmod(os.path.join(d, "load.sh"), 0o755)
    shutil.copy(os.path.join(demo, "mask.sql"), d)
    size_g = max(2, scale * 50 // 1000 + 2)
    yaml = os.path.join(d, "image.yaml")
    open(yaml, "w").write(
        f"name: demo{scale}\nsourceType: empty\nengine: postgres\nversion: 15\n"
        f"size: {size_g}G\npreScript: load.sh\npostScript: mask.sql\n")
    return yaml


def cmd_clone_ready(a):
    root = tempfile.mkdtemp(prefix="blockd-dbbench-", dir="/tmp")
    os.chmod(root, 0o755)
    d = None
    rows, raw = [], {}
    try:
        d = Daemon(root)
        for scale in [int(x) for x in a.scales.split(",")]:
            t0 = time.time()
            d.cli("image", "create", "-f", demo_image(root, scale))
            img = d.cli("image", "show", f"demo{scale}")
            built = time.time() - t0
            log(f"demo{scale}: {img['data_bytes'] / 1e6:.0f} MB image built in {built:.1f} s")
            samples, api_ms = [], []
            for i in range(a.clones):
                t = time.perf_counter()
                v = d.cli("clone", "create", f"demo{scale}", f"s{scale}c{i}")
                api_ms.append((time.perf_counter() - t) * 1000)
                while not try_select(v["connection"]):
                    time.sleep(0.002)
                samples.append((time.perf_counter() - t) * 1000)
                log(f"demo{scale} clone {i}: create returned in {api_ms[-1]:.0f} ms, "
                    f"SELECT 1 at {samples[-1]:.0f} ms")
            for i in range(a.clones):
                d.cli("clone", "delete", f"s{scale}c{i}")
            s, c = stats(samples), stats(api_ms)
            raw[scale] = {"image_bytes": img["data_bytes"], "ready_ms": samples,
                          "create_ms": api_ms}
            rows.append(f"| demo, pgbench scale {scale} | {img['data_bytes'] / 1e6:.0f} MB | "
                        f"{c['median']:.0f} ms [{c['min']:.0f}–{c['max']:.0f}] | "
                        f"{s['median']:.0f} ms [{s['min']:.0f}–{s['max']:.0f}] | {s['n']} |")
        path = save("db-clone-ready", {"rev": git_rev(), "scales": raw})
        body = (
            f"Command: `python3 bench/db.py clone-ready --scales {a.scales} --clones {a.clones}` "
            f"(release build of `{git_rev()}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} "
            f"UTC, {machine()}; raw samples `{path}`).\n\n"
            "Clones of the demo image (examples/demo: pgbench tables at the given scale plus a "
            "masked customers table), one after another, each attached through nbdfuse + "
            "loop, mounted, and started as its own PostgreSQL 15 on a TCP port. *Returns*: "
            "`blockd clone create` done (server accepting connections, password set). "
            "*Ready*: the first `SELECT 1` over TCP with the clone's password answered. "
            "Medians [min–max].\n\n"
            "| image | data | `clone create` returns | `clone create` → `SELECT 1` | n |\n"
            "|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
        print(body)
        if not a.no_docs:
            update_docs("db-clone-ready", "Database clone to ready", body)
    finally:
        if d:
            d.stop()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ refresh

def cmd_refresh(a):
    rows = []
    raw = {}
    for scale in [int(x) for x in a.scales.split(",")]:
        root = tempfile.mkdtemp(prefix="blockd-dbbench-", dir="/tmp")
        os.chmod(root, 0o755)
        d = p = load = None
        try:
            p = Primary(root)
            t = time.time()
            subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
                            str(p.port), "-U", "postgres", "postgres"], check=True,
                           capture_output=True)
            size = run(["psql", "-X", "-tA", "-h", "127.0.0.1", "-p", str(p.port), "-U",
                        "postgres", "-c", "SELECT pg_database_size('postgres')", "postgres"])
            size_mb = int(size) / 1e6
            log(f"scale {scale}: {size_mb:.0f} MB loaded in {time.time() - t:.0f} s")
            d = Daemon(root)
            yaml = os.path.join(root, "source.yaml")
            pw = os.path.join(root, "pw")
            open(pw, "w").write("unused\n")
            vol = max(4, int(size_mb * 3 / 1000) + 2)
            open(yaml, "w").write(
                f"name: prod\nengine: postgres\nversion: 15\nsize: {vol}G\n"
                f"primary:\n  host: 127.0.0.1\n  port: {p.port}\n  user: postgres\n"
                f"  passwordFile: {pw}\nrefresh: manual\nretain: 3\n")
            t = time.time()
            d.cli("source", "create", "-f", yaml)
            made = time.time() - t
            log(f"scale {scale}: source created (base backup + standby + first refresh) in {made:.0f} s")
            load = p.pgbench("-n", "-c", "2", "-T", "3600")
            time.sleep(3)
            frozen, total = [], []
            for i in range(a.refreshes):
                t = time.perf_counter()
                r = d.cli("source", "refresh", "prod")
                total.append((time.perf_counter() - t) * 1000)
                frozen.append(r["frozen_ms"])
                log(f"scale {scale}: refresh {r['name']}: frozen {r['frozen_ms']:.1f} ms, "
                    f"whole refresh {total[-1]:.0f} ms")
                time.sleep(1)
            f, w = stats(frozen), stats(total)
            raw[scale] = {"db_mb": size_mb, "frozen_ms": frozen, "refresh_ms": total,
                          "create_s": made}
            rows.append(f"| {scale} | {size_mb:.0f} MB | {made:.0f} s | {f['median']:.1f} ms "
                        f"[{f['min']:.1f}–{f['max']:.1f}] | {w['median']:.0f} ms "
                        f"[{w['min']:.0f}–{w['max']:.0f}] | {f['n']} |")
        finally:
            if load and load.poll() is None:
                load.terminate()
                load.wait()
            if d:
                d.stop()
            if p:
                p.stop()
            shutil.rmtree(root, ignore_errors=True)
    path = save("db-refresh", {"rev": git_rev(), "scales": raw})
    body = (
        f"Command: `python3 bench/db.py refresh --scales {a.scales} --refreshes {a.refreshes}` "
        f"(release build of `{git_rev()}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"{machine()}; raw samples `{path}`).\n\n"
        "A primary loaded with `pgbench -i -s SCALE`; a source following it; then refreshes "
        "one after another while `pgbench -c 2` writes on the primary. *Frozen* is the time "
        "the standby's file system is frozen: `fsfreeze -f`, reading where the received WAL "
        "ends, the volume snapshot, `fsfreeze -u`. *Whole refresh* is the `blockd source "
        "refresh` command end to end (plus the state file, retention). Medians "
        "[min–max].\n\n"
        "| pgbench scale | database | source create | frozen | whole refresh | n |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not a.no_docs:
        update_docs("db-refresh", "Source refresh cost by database size", body)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clone-ready")
    c.add_argument("--clones", type=int, default=10)
    c.add_argument("--scales", default="5,100")
    c.add_argument("--no-docs", action="store_true")
    r = sub.add_parser("refresh")
    r.add_argument("--scales", default="10,100")
    r.add_argument("--refreshes", type=int, default=7)
    r.add_argument("--no-docs", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark mounts file systems and attaches loop devices")
    if not os.path.exists(BLOCKD):
        sys.exit(f"{BLOCKD} is missing; build it with `cargo build --release -p blockd`")
    {"clone-ready": cmd_clone_ready, "refresh": cmd_refresh}[a.cmd](a)


if __name__ == "__main__":
    main()
