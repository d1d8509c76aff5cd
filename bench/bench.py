#!/usr/bin/env python3
"""blockd benchmark harness (Python 3 standard library only).

    python3 bench/bench.py setup                  install fio/qemu-utils/nbdkit/libnbd-bin, build blockd
    python3 bench/bench.py list                   suites, targets and jobs
    python3 bench/bench.py run [options]          prepare data once, run the matrix -> bench/results/<ts>/
    python3 bench/bench.py report [RESULTS_DIR]   median tables; updates docs/BENCHMARKS.md
    python3 bench/bench.py clean                  stop leftover servers, remove the work dir

See bench/README.md. Extending it: a new server is a Target subclass registered in
TARGETS, a new fio workload is a Job in JOBS, data a target needs is a named artifact
(Work.need) prepared once per run, and a new group of measurements is a Suite (its
section in docs/BENCHMARKS.md is keyed by the suite name).
"""

import argparse
import csv
import ctypes
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_ROOT = os.path.join(HERE, "results")
DOCS = os.path.join(REPO, "docs", "BENCHMARKS.md")
DEFAULT_WORK = os.environ.get("BENCH_WORK", "/tmp/blockd-bench")
BLOCKD_BIN = os.environ.get("BLOCKD_BIN", os.path.join(REPO, "target", "release", "blockd"))
# A second blockd binary (e.g. a copy of the previous build) for same-run A/B comparisons:
# target `blockd_clone_alt` serves with it.
BLOCKD_BIN_ALT = os.environ.get("BLOCKD_BIN_ALT", "")
# Extra `blockd serve` arguments for target `blockd_clone_alt` (split like a shell would),
# e.g. BLOCKD_ALT_ARGS="--direct-writes-from off" with BLOCKD_BIN_ALT=$BLOCKD_BIN to A/B
# one setting within one build.
BLOCKD_ALT_ARGS = shlex.split(os.environ.get("BLOCKD_ALT_ARGS", ""))
VOLUME = "bench"           # blockd volume name (= NBD export name)
QEMU_EXPORT = "x"          # qemu-nbd export name (as in peers.sh)
CHUNK = 4096               # every data-preparation write is 4 KiB (kernel 6.18 large-folio trap)
CHAIN_WRITES = 32          # random 4 KiB writes per snapshot-chain layer (as in peers.sh)
FIO_CLONE = "fio"          # the blockd clone a clone/chain target creates for one fio run
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- size helpers

def parse_size(s):
    s = str(s).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def hsize(n):
    """1073741824 -> '1 GiB' (for prose)."""
    h = human(n)
    return f"{h[:-1]} {h[-1]}iB" if h[-1] in "KMGT" else f"{h} B"


def human(n):
    for unit, m in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


# --------------------------------------------------------------------------- /proc sampling

def proc_cpu_seconds(pid):
    """utime+stime+cutime+cstime of a process (all its threads, plus reaped children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17 -> index 11..14
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def proc_start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return int(s[s.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return False
    return s[s.rindex(")") + 2:].split()[0] not in ("Z", "X")


def proc_status_kb(pid, *keys):
    """Selected kB fields of /proc/PID/status (VmRSS, VmHWM, ...)."""
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    got[k] = int(v.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return got


def cpu_snapshot():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest* are inside user)
    total = sum(v[:8])
    return {"total": total, "idle": v[3] + v[4], "steal": v[7]}


def cpu_delta(a, b):
    dt_ = b["total"] - a["total"]
    if dt_ <= 0:
        return 0.0, 0.0
    steal = 100.0 * (b["steal"] - a["steal"]) / dt_
    # CPU time really used inside this VM (not idle, not stolen by the hypervisor)
    busy = 100.0 * (dt_ - (b["idle"] - a["idle"]) - (b["steal"] - a["steal"])) / dt_
    return steal, busy


def vmstat(*keys):
    """Selected /proc/vmstat counters: pgpgin (KiB read from block devices, whole machine)
    and drop_pagecache (times someone wrote to /proc/sys/vm/drop_caches)."""
    want, got = set(keys), {}
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k in want:
                got[k] = int(v)
    return got


def proc_read_bytes(pid="self"):
    """Bytes this process (all its threads) caused to be read from block devices, i.e.
    page-cache misses (/proc/PID/io read_bytes)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cache_probe():
    return vmstat("pgpgin", "drop_pagecache")


def cache_delta(a, b):
    """(MB read from disk, drop_caches events) between two cache_probe() samples."""
    return ((b.get("pgpgin", 0) - a.get("pgpgin", 0)) / 1024.0,
            b.get("drop_pagecache", 0) - a.get("drop_pagecache", 0))


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# --------------------------------------------------------------------------- processes

def free_port():
    """A free loopback TCP port (bind to port 0, read it back, release it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cmd(cmd, **kw):
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def out_of(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def syncfs(path):
    """Write back dirty pages of the file system holding `path` (like `sync -f`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "syncfs"):
            os.syncfs(fd)
        else:
            subprocess.run(["sync", "-f", path], check=False)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- blockd REST API, qemu-io

def api_call(api, method, path, body=None, timeout=60):
    """One request to blockd's REST API with urllib (a new TCP connection per call, as a
    CLI client makes). Returns (HTTP status, decoded JSON body or None, seconds taken by
    the call: connect, request, server work, response)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    req = urllib.request.Request(f"http://{api}{path}", data=data, method=method, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    secs = time.perf_counter() - t0
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = raw.decode(errors="replace")
    return status, doc, secs


def api_ok(api, method, path, body=None):
    status, doc, secs = api_call(api, method, path, body)
    if status not in (200, 201, 204):
        raise BenchError(f"blockd API {method} {path} {json.dumps(body) if body else ''}: "
                         f"HTTP {status} {doc}")
    return doc, secs


def api_delete_volume(api, name, wait=10.0):
    """DELETE a volume, retrying while the server still counts a just-closed NBD
    connection (409 in_use). A volume that does not exist is fine."""
    deadline = time.time() + wait
    while True:
        status, doc, _ = api_call(api, "DELETE", f"/v1/volumes/{name}")
        if status in (204, 200, 404):
            return
        if status != 409 or time.time() > deadline:
            raise BenchError(f"deleting volume {name}: HTTP {status} {doc}")
        time.sleep(0.05)


def qemu_io(target, fmt, cmds, read_only=False):
    """Run qemu-io commands (e.g. "write -q -P 5 4096 4k") in one process against a file or
    an nbd:// URI. `-t writeback`: qemu-io's default cache mode is writethrough, a flush
    after every write (32 fdatasyncs for a chain layer instead of one); with writeback it
    flushes once, when it closes the image. Returns stdout."""
    cmd = ["qemu-io", "-f", fmt, "-t", "writeback"] + (["-r"] if read_only else [])
    for c in cmds:
        cmd += ["-c", c]
    cmd.append(target)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or "failed" in p.stdout.lower() or "error" in p.stderr.lower():
        raise BenchError(f"qemu-io on {target} failed ({p.returncode}): "
                         f"{(p.stdout + p.stderr).strip()[:500]}")
    return p.stdout


def layer_writes(seed, layer, size, n):
    """The n random 4 KiB writes of chain layer `layer` (deterministic for a seed): offsets
    in [0, size), pattern byte layer % 256. The blockd and qcow2 chains get the same ones."""
    rng = random.Random(f"{seed}/{layer}")
    return [(rng.randrange(size // CHUNK) * CHUNK, layer % 256) for _ in range(n)]


def chain_check_cmds(seed, depth, size, n):
    """qemu-io read commands that check, at the top of a chain of `depth` layers, the last
    pattern written at every offset any layer wrote."""
    last = {}
    for i in range(1, depth + 1):
        for off, pat in layer_writes(seed, i, size, n):
            last[off] = pat
    return [f"read -q -P {pat} {off} 4k" for off, pat in sorted(last.items())]


def dir_allocated_bytes(path):
    """Disk blocks allocated under `path` (st_blocks * 512 of every file, like `du -sB1`);
    only stats, never opens a file."""
    total = 0
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            try:
                total += os.lstat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


class Server:
    """A server process started by the harness; always stopped by its pid."""

    def __init__(self, work, name, cmd, log_path, uri, env=None, pid_from=None):
        self.work, self.name, self.cmd, self.uri = work, name, cmd, uri
        self.log_path = log_path
        self.logf = open(log_path, "a")
        self.logf.write(f"\n==== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        self.logf.flush()
        # own session: a Ctrl-C on the terminal does not reach it; we stop it ourselves
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.pid = self.proc.pid
        self.before_stop = []     # callables run by Work.stop while the server still runs
        self.after_stop = []      # callables run by Work.stop once it has exited
        work.register_pid(self.pid, cmd)

    def wait_ready(self, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} (log: {self.log_path})")
            if self.uri:
                p = subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True)
                if p.returncode == 0:
                    return
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout}s: {self.uri} (log: {self.log_path})")

    def cpu_seconds(self):
        return proc_cpu_seconds(self.pid)

    def alive(self):
        return self.proc.poll() is None

    def settle(self):
        """Called after fio and before the last CPU sample (a forking server waits for its
        children here)."""

    def fio_args(self, job):
        return ["--ioengine=nbd", f"--uri={self.uri}"]

    def stop(self, grace=15.0):
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {grace}s, killing it")
                self.proc.kill()
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.work.unregister_pid(self.pid)
        self.logf.close()


def fresh_socket(work, name):
    """A Unix socket path under the work dir for one server start (stale file removed)."""
    p = os.path.join(work.sock, f"{name}.sock")
    if os.path.exists(p):
        os.unlink(p)
    return p


def child_pids(pid):
    """Direct children of a process (scan of /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            if int(st[st.rindex(")") + 2:].split()[1]) == pid:
                out.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return out


class DaemonServer(Server):
    """A server that daemonizes (nbd-server): started with its command, which exits once
    the daemon wrote its pid file; tracked and stopped by that pid (not our child, so it is
    polled, never waited for)."""

    def __init__(self, work, name, cmd, log_path, uri, pidfile):
        self.work, self.name, self.cmd, self.uri = work, name, cmd, uri
        self.log_path = log_path
        self.logf = open(log_path, "a")
        self.logf.write(f"\n==== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        self.logf.flush()
        self.before_stop, self.after_stop = [], []
        self.pid = None
        work.live.append(self)
        rc = subprocess.run(cmd, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, timeout=20).returncode
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with open(pidfile) as f:
                    self.pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        if self.pid is None:
            work.live.remove(self)
            self.logf.close()
            raise BenchError(f"{name}: no pid file {pidfile} (exit {rc}; log: {log_path})")
        work.register_pid(self.pid, cmd)

    def alive(self):
        return pid_alive(self.pid)

    def cpu_seconds(self):
        """The daemon plus its live per-connection children (reaped ones are in cutime)."""
        own = proc_cpu_seconds(self.pid)
        if own is None:
            return None
        return own + sum(proc_cpu_seconds(p) or 0.0 for p in child_pids(self.pid))

    def wait_ready(self, timeout=20.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not pid_alive(self.pid):
                raise BenchError(f"{self.name} (pid {self.pid}) exited (log: {self.log_path})")
            if subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout}s: {self.uri} (log: {self.log_path})")

    def settle(self):
        """Wait (up to 5 s) until the per-connection children are gone and reaped, so their
        CPU time is in the parent's cutime/cstime."""
        deadline = time.time() + 5
        while child_pids(self.pid) and time.time() < deadline:
            time.sleep(0.05)

    def stop(self, grace=15.0):
        if self.pid and pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.time() + grace
            while pid_alive(self.pid) and time.time() < deadline:
                time.sleep(0.05)
            if pid_alive(self.pid):
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {grace}s, killing it")
                os.kill(self.pid, signal.SIGKILL)
        if self.pid:
            self.work.unregister_pid(self.pid)
        self.logf.close()


class LocalRun:
    """Stands in for a server when fio works on the file itself (the storage ceiling)."""

    def __init__(self, name, work):
        self.name, self.work, self.uri, self.pid, self.cmd = name, work, None, None, ["(none: fio on the file)"]
        self.before_stop, self.after_stop = [], []

    def fio_args(self, job):
        engine = "psync" if job.iodepth == 1 and job.numjobs == 1 else "io_uring"
        return [f"--ioengine={engine}", "--direct=0", "--invalidate=0", f"--filename={self.work.raw}",
                f"--size={self.work.size}"]

    def cpu_seconds(self):
        return None

    def alive(self):
        return True

    def settle(self):
        pass

    def stop(self, grace=0):
        pass


# --------------------------------------------------------------------------- work dir + artifacts

class Work:
    """The scratch directory (reused across runs) and the data artifacts prepared in it.

    Artifacts are named; a target lists the ones it needs in `requires` and each is
    prepared once per run by the matching `_prep_<name>` method (see ARTIFACTS).
    """

    def __init__(self, root, size, log_dir):
        self.root = root
        self.size = size
        self.log_dir = log_dir
        self.data = os.path.join(root, "data")
        self.sock = os.path.join(root, "sock")
        self.blockd_dir = os.path.join(root, "blockd-data")
        self.pids_file = os.path.join(root, "servers.json")
        self.facts = {}           # what preparation measured (times, checks), stored in meta.json
        self.live = []            # Server objects not yet stopped
        for d in (root, self.data, self.sock):
            os.makedirs(d, exist_ok=True)
        self.src = os.path.join(self.data, "source.raw")
        self.raw = os.path.join(self.data, "raw.raw")
        self.qcow_dir = os.path.join(self.data, "qcow2-chain")
        # snapshot chains (suite `cow`): set by cmd_run from the selected targets
        self.chain_depth = 0            # layers to build
        self.chain_depths = []          # depths served by a target (content checked there)
        self.chain_seed = 1             # offsets of the random writes of each layer
        # suites that warm per fio run (Suite.warm_per_run): None = no; else True/False =
        # whether the job about to run reads (set by run_one before target.start)
        self.warm_job_reads = None
        self.pinned = False             # CachePin holds the data every target reads
        self.blockd_engine = "sync"     # `blockd serve --io-engine` unless a target says otherwise

    # -- pid bookkeeping so `bench.py clean` can stop servers left by a killed harness
    def _pids(self):
        try:
            with open(self.pids_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def register_pid(self, pid, cmd):
        d = self._pids()
        d[str(pid)] = {"start": proc_start_time(pid), "cmd": cmd}
        with open(self.pids_file, "w") as f:
            json.dump(d, f)

    def unregister_pid(self, pid):
        d = self._pids()
        d.pop(str(pid), None)
        with open(self.pids_file, "w") as f:
            json.dump(d, f)

    def start(self, name, cmd, uri, env=None):
        s = Server(self, name, cmd, os.path.join(self.log_dir, f"{name}.log"), uri, env=env)
        self.live.append(s)
        try:
            s.wait_ready()
        except BaseException:
            self.stop(s)
            raise
        return s

    def stop(self, s):
        if s in self.live:
            self.live.remove(s)
        try:
            for f in s.before_stop:
                if s.alive():
                    try:
                        f()
                    except Exception as e:   # clean-up must not hide the stop
                        log(f"{s.name}: clean-up before stop failed: {e}")
        finally:
            s.stop()
            for f in s.after_stop:
                try:
                    f()
                except Exception as e:
                    log(f"{s.name}: clean-up after stop failed: {e}")

    def stop_all(self):
        for s in list(self.live):
            try:
                self.stop(s)
            except Exception as e:  # keep stopping the others
                log(f"stopping {s.name} pid {s.pid}: {e}")

    # -- artifacts
    def need(self, names):
        for n in names:
            if n in self.facts.get("prepared", []):
                continue
            t0 = time.time()
            getattr(self, "_prep_" + n)()
            self.facts.setdefault("prepared", []).append(n)
            self.facts[f"prep_{n}_s"] = round(time.time() - t0, 1)

    def rewarm(self, rep):
        """Before each rep after the first: re-read the raw file with 4 KiB reads (cheap when
        cached) and look at disk reads. On this shared machine someone may drop the page
        cache (echo 3 >/proc/sys/vm/drop_caches); then also re-warm the blockd volume through
        NBD in random order (sequential reads would bring it back in large folios)."""
        prepared = self.facts.get("prepared", [])
        c0, r0 = cache_probe(), proc_read_bytes()
        if "raw" in prepared:
            warm4k(self.raw)
        _, drops = cache_delta(c0, cache_probe())
        mb = (proc_read_bytes() - r0) / 1e6     # what *we* had to read back from disk
        cold = drops > 0 or mb > max(16.0, 0.01 * self.size / 1e6)
        if cold:
            log(f"rep {rep}: page cache went cold ({mb:.0f} MB of the raw file read back from "
                f"disk, {drops} drop_caches); re-warming")
            self.facts.setdefault("rewarm", []).append({"rep": rep, "disk_read_mb": round(mb),
                                                        "drop_caches": drops})
            if "blockd_volume" in prepared:
                warm_blockd_random(self)

    def _prep_source(self):
        """Random bytes, written with 4 KiB writes. Reused across runs (it is never written
        by a benchmark); its sha256 is kept next to it."""
        meta = self.src + ".json"
        try:
            with open(meta) as f:
                m = json.load(f)
            if m["size"] == self.size and os.path.getsize(self.src) == self.size:
                self.facts["source_sha256"] = m["sha256"]
                log(f"source: reusing {self.src} ({human(self.size)})")
                return
        except (OSError, ValueError, KeyError):
            pass
        log(f"source: writing {human(self.size)} of random data to {self.src} with 4 KiB writes")
        for p in (self.src, meta):
            if os.path.exists(p):
                os.unlink(p)
        h = hashlib.sha256()
        fd = os.open(self.src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = self.size
            while left:
                buf = os.urandom(min(1 << 20, left))
                h.update(buf)
                mv = memoryview(buf)
                for off in range(0, len(buf), CHUNK):
                    os.write(fd, mv[off:off + CHUNK])
                left -= len(buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(meta, "w") as f:
            json.dump({"size": self.size, "sha256": h.hexdigest()}, f)
        self.facts["source_sha256"] = h.hexdigest()

    def _prep_raw(self):
        """Raw file served by qemu-nbd and nbdkit: a fresh inode holding the source bytes,
        written with 4 KiB writes so its page cache is made of 4 KiB folios, then synced
        and warmed with 4 KiB reads (like peers.sh + pcache.py warm4k)."""
        self.need(["source"])
        log(f"raw: copying source to {self.raw} with 4 KiB writes")
        if os.path.exists(self.raw):
            os.unlink(self.raw)      # new inode: nothing of the old one stays in page cache
        h = hashlib.sha256()
        with open(self.src, "rb", buffering=0) as src:
            fd = os.open(self.raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                while True:
                    buf = src.read(1 << 20)
                    if not buf:
                        break
                    h.update(buf)
                    mv = memoryview(buf)
                    for off in range(0, len(buf), CHUNK):
                        os.write(fd, mv[off:off + CHUNK])
                os.fsync(fd)
            finally:
                os.close(fd)
        if h.hexdigest() != self.facts["source_sha256"]:
            raise BenchError("source file changed under us (sha256 mismatch)")
        warm4k(self.raw)
        self.facts["raw_verified"] = True

    def _prep_blockd_volume(self):
        """A blockd volume filled ONLY through NBD: fresh data dir, `volume create`, then
        nbdcopy with 4 KiB requests over one connection (sequential 4 KiB writes), a 4 KiB
        read pass through NBD (warm), and a sha256 of the whole export read back via NBD."""
        self.need(["source"])
        if os.path.exists(self.blockd_dir):
            shutil.rmtree(self.blockd_dir)   # the harness owns this directory as a whole
        srv = start_blockd(self, "prep-blockd")
        try:
            run_cmd([BLOCKD_BIN, "--api", srv.api, "volume", "create", VOLUME, "--size", str(self.size)],
                    stdout=subprocess.DEVNULL)
            uri = f"nbd://{srv.nbd}/{VOLUME}"
            t0 = time.time()
            run_cmd(["nbdcopy", "--connections=1", f"--request-size={CHUNK}", "--flush",
                     self.src, uri])
            self.facts["blockd_fill_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            run_cmd(["nbdcopy", "--connections=1", f"--request-size={CHUNK}", uri, "null:"])
            self.facts["blockd_warm_s"] = round(time.time() - t0, 1)
            t0 = time.time()
            got = nbd_sha256(uri)
            self.facts["blockd_verify_s"] = round(time.time() - t0, 1)
            if got != self.facts["source_sha256"]:
                raise BenchError(f"blockd volume content differs from the source after the fill "
                                 f"({got} != {self.facts['source_sha256']})")
            self.facts["blockd_verified"] = True
            log("blockd volume: filled, warmed and verified through NBD")
        finally:
            self.stop(srv)
        syncfs(self.root)


    def _prep_blockd_base_snapshot(self):
        """`bench@base`: a snapshot of the filled volume, origin of every blockd clone and
        chain (REST API)."""
        self.need(["blockd_volume"])
        srv = start_blockd(self, "prep-base-snapshot")
        try:
            _, secs = api_ok(srv.api, "POST", "/v1/snapshots", {"name": f"{VOLUME}@base"})
            self.facts["base_snapshot_ms"] = round(secs * 1e3, 2)
        finally:
            self.stop(srv)
        syncfs(self.root)

    def _prep_blockd_chain(self):
        """A blockd snapshot chain built like the qcow2 chain of the peers: layer i is a
        clone of the previous snapshot (`bench@base` for i = 1) named `l<i>`, written with
        CHAIN_WRITES random 4 KiB writes through NBD (qemu-io), then snapshotted as
        `l<i>@s`. Targets serve a fresh clone of `l<N>@s`. The content at each served depth
        is checked through NBD (the last pattern written at every offset any layer wrote)."""
        self.need(["blockd_base_snapshot"])
        n = self.chain_depth
        srv = start_blockd(self, "prep-blockd-chain")
        ops = []
        try:
            prev = f"{VOLUME}@base"
            t0 = time.time()
            for i in range(1, n + 1):
                _, tc = api_ok(srv.api, "POST", "/v1/volumes", {"name": f"l{i}", "from": prev})
                qemu_io(f"nbd://{srv.nbd}/l{i}", "raw",
                        [f"write -q -P {pat} {off} 4k"
                         for off, pat in layer_writes(self.chain_seed, i, self.size, CHAIN_WRITES)])
                _, ts = api_ok(srv.api, "POST", "/v1/snapshots", {"name": f"l{i}@s"})
                ops.append([i, round(tc * 1e3, 2), round(ts * 1e3, 2)])
                prev = f"l{i}@s"
            self.facts["blockd_chain_build_s"] = round(time.time() - t0, 1)
            for d in self.chain_depths:
                qemu_io(f"nbd://{srv.nbd}/l{d}@s", "raw",
                        chain_check_cmds(self.chain_seed, d, self.size, CHAIN_WRITES), read_only=True)
            self.facts["blockd_chain_checked"] = list(self.chain_depths)
            self.facts["blockd_chain_df"], _ = api_ok(srv.api, "GET", "/v1/df")
        finally:
            self.facts["blockd_chain_ops_ms"] = ops     # [depth, clone ms, snapshot ms]
            self.stop(srv)
        log(f"blockd chain: {n} layers in {self.facts['blockd_chain_build_s']} s, content checked "
            f"at depths {self.chain_depths}")
        syncfs(self.root)

    def _prep_qcow2_chain(self):
        """The qcow2 chain of peers.sh: source.raw <- l1.qcow2 <- ... <- lN.qcow2, each made with
        `qemu-img create -f qcow2 -b PREV -F FMT` and given the same CHAIN_WRITES random
        4 KiB writes (qemu-io) as the blockd layer of the same depth. Targets serve a fresh
        copy of lN.qcow2. The base is the source file, which no benchmark writes (the raw
        file of the raw-file servers is written by their write jobs)."""
        self.need(["source"])
        n = self.chain_depth
        if os.path.exists(self.qcow_dir):
            shutil.rmtree(self.qcow_dir)
        os.makedirs(self.qcow_dir)
        prev, fmt = self.src, "raw"
        t0 = time.time()
        for i in range(1, n + 1):
            layer = os.path.join(self.qcow_dir, f"l{i}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", prev, "-F", fmt, layer],
                           check=True)
            qemu_io(layer, "qcow2", [f"write -q -P {pat} {off} 4k"
                                     for off, pat in layer_writes(self.chain_seed, i, self.size, CHAIN_WRITES)])
            prev, fmt = layer, "qcow2"
        self.facts["qcow2_chain_build_s"] = round(time.time() - t0, 1)
        for d in self.chain_depths:
            qemu_io(os.path.join(self.qcow_dir, f"l{d}.qcow2"), "qcow2",
                    chain_check_cmds(self.chain_seed, d, self.size, CHAIN_WRITES), read_only=True)
        self.facts["qcow2_chain_checked"] = list(self.chain_depths)
        log(f"qcow2 chain: {n} layers in {self.facts['qcow2_chain_build_s']} s, content checked "
            f"at depths {self.chain_depths}")
        syncfs(self.root)


class CachePin:
    """Keeps files resident in the page cache by mapping them read-only and mlock()ing the
    mappings (ctypes: libc mmap/mlock/munmap) for as long as this process holds them.

    Why: the benchmark VM runs DAMON proactive reclaim (kdamond, `paddr` operations, a
    `pageout` scheme for regions idle for >= 6 aggregation intervals of 5 s; see
    /sys/kernel/mm/damon/admin). Random 4 KiB reads over a 2 GiB file look idle to its
    sampling, so pages are paged out even *during* a fio run and every run reads from disk.
    Locked pages are unevictable, so DAMON skips them; nothing else about the page cache
    changes (the servers still read and write through it as before)."""

    PROT_READ, MAP_SHARED = 1, 1

    def __init__(self):
        self.maps = []
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def pin(self, path):
        """Map and lock one file; returns its size (0 for an empty file)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            n = os.fstat(fd).st_size
            if n == 0:
                return 0
            addr = self.libc.mmap(None, n, self.PROT_READ, self.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise BenchError(f"mmap {path}: {os.strerror(ctypes.get_errno())}")
        if self.libc.mlock(addr, n) != 0:
            err = ctypes.get_errno()
            self.libc.munmap(addr, n)
            raise BenchError(f"mlock {path} ({human(n)}): {os.strerror(err)} (run as root or raise "
                             f"RLIMIT_MEMLOCK)")
        self.maps.append((addr, n))
        return n

    def pin_tree(self, path):
        total = 0
        for root, _, files in os.walk(path):
            for f in files:
                total += self.pin(os.path.join(root, f))
        return total

    def release(self):
        while self.maps:
            addr, n = self.maps.pop()
            self.libc.munmap(addr, n)


def warm4k(path):
    """FADV_RANDOM + read every 4 KiB page: cached pages stay, missing ones come in as
    order-0 folios (no readahead into large folios)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        n = os.fstat(fd).st_size
        for off in range(0, n, CHUNK):
            os.pread(fd, CHUNK, off)
    finally:
        os.close(fd)


def warm_through_server(s):
    """Read the whole export once through the server about to be measured (nbdcopy to
    null:, its default request size and connections), right before the fio run: the
    benchmark VM drops cached pages within minutes, and this also makes blockd verify the
    checksums of payloads it found at start-up (done once per payload per process), so the
    run sees a warm server in steady state. Only the base data's segments are read-only in
    a log-structured store, so large folios there do not slow anyone's writes."""
    r0, t0 = proc_read_bytes(s.pid), time.time()
    subprocess.run(["nbdcopy", s.uri, "null:"], check=True)
    s.warm = {"warm_s": round(time.time() - t0, 2),
              "warm_disk_read_mb": round((proc_read_bytes(s.pid) - r0) / 1e6, 1)}


def warm_blockd_random(work):
    """Read every 4 KiB block of the blockd volume once, in random order, through NBD."""
    srv = start_blockd(work, "warm-blockd")
    try:
        run_cmd(["fio", "--name=warm", "--ioengine=nbd", f"--uri=nbd://{srv.nbd}/{VOLUME}",
                 "--rw=randread", "--bs=4k", "--iodepth=32", "--output-format=terse"],
                stdout=subprocess.DEVNULL)
    finally:
        work.stop(srv)


def nbd_sha256(uri):
    h = hashlib.sha256()
    p = subprocess.Popen(["nbdcopy", uri, "-"], stdout=subprocess.PIPE)
    try:
        while True:
            b = p.stdout.read(1 << 20)
            if not b:
                break
            h.update(b)
    finally:
        p.stdout.close()
        if p.wait() != 0:
            raise BenchError(f"nbdcopy {uri} - failed with {p.returncode}")
    return h.hexdigest()


def start_blockd(work, name, data_dir=None, engine=None, binary=None, extra_args=()):
    """Start `blockd serve` on the bench data dir (or `data_dir`); TCP port 0, Unix socket in
    the work dir; `--io-engine` = `engine`, or the run's `--blockd-engine`."""
    ready = os.path.join(work.root, "blockd-ready.json")
    sockp = os.path.join(work.sock, "blockd.sock")
    for p in (ready, sockp):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [binary or BLOCKD_BIN, "serve", "--data-dir", data_dir or work.blockd_dir, "--listen", "127.0.0.1:0",
           "--api", "127.0.0.1:0", "--socket", sockp, "--ready-file", ready,
           "--shutdown-grace", "2s", "--io-engine", engine or work.blockd_engine, *extra_args]
    s = Server(work, name, cmd, os.path.join(work.log_dir, f"{name}.log"), uri=None)
    work.live.append(s)
    try:
        deadline = time.time() + 20
        while not os.path.exists(ready):
            if s.proc.poll() is not None:
                raise BenchError(f"blockd exited with {s.proc.returncode} (log: {s.log_path})")
            if time.time() > deadline:
                raise BenchError(f"blockd wrote no ready file in 20 s (log: {s.log_path})")
            time.sleep(0.02)
        with open(ready) as f:
            info = json.load(f)
        if info.get("pid") != s.pid:
            raise BenchError(f"ready file pid {info.get('pid')} is not the started pid {s.pid}")
        s.nbd, s.api, s.socket = info["nbd"], info["api"], info["socket"]
    except BaseException:
        work.stop(s)
        raise
    return s


# --------------------------------------------------------------------------- targets

class Target:
    """An NBD server configuration. start() returns a ready Server whose .uri fio uses.
    `role`: "blockd", "peer" (a server users would pick instead) or "ceiling";
    `family`: the server and configuration, whatever the transport; `transport`: "tcp",
    "unix" or "local" (fio on the file itself)."""
    name = ""
    title = ""
    requires = ()      # artifacts (Work._prep_<name>) prepared once per run
    role, family, transport, depth = "peer", "", "tcp", 0

    def start(self, work):
        raise NotImplementedError

    def describe(self, work):
        return self.title


def _transport_title(transport):
    return {"tcp": "TCP loopback", "unix": "Unix socket", "local": "local file"}[transport]


def _uri_for(transport, port=None, sockp=None, export=""):
    if transport == "tcp":
        return f"nbd://127.0.0.1:{port}/{export}"
    return f"nbd+unix:///{export}?socket={sockp}"


class BlockdTarget(Target):
    """blockd serving the filled volume itself (`nbd-basic`; writes accumulate in its log)."""
    requires = ("blockd_volume",)
    role, family = "blockd", "blockd"

    def __init__(self, name, transport):
        self.name, self.transport = name, transport
        self.title = f"blockd, {_transport_title(transport)}"

    def start(self, work):
        s = start_blockd(work, self.name)
        if self.transport == "tcp":
            s.uri = f"nbd://{s.nbd}/{VOLUME}"
        else:
            s.uri = f"nbd+unix:///{VOLUME}?socket={s.socket}"
        try:
            s.wait_ready()
        except BaseException:
            work.stop(s)
            raise
        return s


class QemuRawTarget(Target):
    title = "qemu-nbd raw, aio=threads"
    requires = ("raw",)
    role, family = "peer", "qemu-nbd raw"
    OPTS = ["-f", "raw", "--cache=writeback", "-t", "-e", "4", "-x", QEMU_EXPORT, "--aio=threads"]

    def __init__(self, name="qemu_tcp", transport="tcp"):
        self.name, self.transport = name, transport
        self.title = f"qemu-nbd raw file, aio=threads, {_transport_title(transport)}"

    def start(self, work):
        if self.transport == "tcp":
            port = free_port()
            where, sockp = ["-b", "127.0.0.1", "-p", str(port)], None
        else:
            port, sockp = None, fresh_socket(work, self.name)
            where = ["-k", sockp]
        cmd = ["qemu-nbd", *self.OPTS, *where, work.raw]
        return work.start(self.name, cmd, _uri_for(self.transport, port, sockp, QEMU_EXPORT))


class NbdkitFileTarget(Target):
    requires = ("raw",)
    role, family = "peer", "nbdkit file"
    plugin = ("file",)

    def __init__(self, name="nbdkit_tcp", transport="tcp"):
        self.name, self.transport = name, transport
        self.title = f"nbdkit file plugin, {_transport_title(transport)}"

    def plugin_args(self, work):
        return ["file", f"file={work.raw}"]

    def start(self, work):
        if self.transport == "tcp":
            port, sockp = free_port(), None
            where = ["-i", "127.0.0.1", "-p", str(port)]
        else:
            port, sockp = None, fresh_socket(work, self.name)
            where = ["-U", sockp]
        cmd = ["nbdkit", "-f", "--exit-with-parent", *where, *self.plugin_args(work)]
        env = None
        if getattr(self, "tmpdir", False):
            tmp = os.path.join(work.root, "nbdkit-tmp")
            os.makedirs(tmp, exist_ok=True)
            env = dict(os.environ, TMPDIR=tmp)
        s = Server(work, self.name, cmd, os.path.join(work.log_dir, f"{self.name}.log"),
                   _uri_for(self.transport, port, sockp), env=env)
        work.live.append(s)
        try:
            s.wait_ready()
        except BaseException:
            work.stop(s)
            raise
        return s


class NbdkitNullTarget(NbdkitFileTarget):
    """The transport ceiling: an NBD server that does no storage work (reads return zeroes,
    writes are dropped)."""
    requires = ()
    role, family = "ceiling", "ceiling: nbdkit null"

    def __init__(self, name, transport):
        super().__init__(name, transport)
        self.title = f"CEILING nbdkit null plugin (no storage work), {_transport_title(transport)}"

    def plugin_args(self, work):
        return ["null", f"size={work.size}"]


class NbdkitCowTarget(NbdkitFileTarget):
    """nbdkit's cow filter over the file plugin on the (read-only) source file; its overlay is
    a temporary file nbdkit deletes at exit, so every run starts from an empty overlay."""
    requires = ("source",)
    role, family = "peer", "nbdkit cow"
    tmpdir = True

    def __init__(self, name, transport):
        super().__init__(name, transport)
        self.title = f"nbdkit --filter=cow file (fresh overlay per run), {_transport_title(transport)}"

    def plugin_args(self, work):
        return ["--filter=cow", "file", f"file={work.src}"]


class NbdServerTarget(Target):
    """nbd-server (3.24): daemonizes, so it is tracked by its pid file and stopped by that
    pid; one forked child per connection (its CPU time lands in the parent's cutime once the
    child is reaped, which the harness waits for before sampling). `cow`: copyonwrite=true
    on the source file (the diff file is private to one connection and deleted at
    disconnect). flush/fua are enabled (off by default in nbd-server) so fsync jobs work."""
    role = "peer"

    def __init__(self, name, transport, cow=False):
        self.name, self.transport, self.cow = name, transport, cow
        self.requires = ("source",) if cow else ("raw",)
        self.family = "nbd-server cow" if cow else "nbd-server"
        self.title = (f"nbd-server {'copyonwrite=true on the source file' if cow else 'raw file'}, "
                      f"{_transport_title(transport)}")

    def start(self, work):
        d = os.path.join(work.root, "nbdsrv")
        os.makedirs(os.path.join(d, "cow"), exist_ok=True)
        port = free_port()
        sockp = fresh_socket(work, self.name)
        pidf = os.path.join(d, "nbdsrv.pid")
        if os.path.exists(pidf):
            os.unlink(pidf)
        conf = os.path.join(d, "nbdsrv.conf")
        export = ("[x]\n    exportname = " + work.raw + "\n" if not self.cow else
                  "[x]\n    exportname = " + work.src + "\n    copyonwrite = true\n"
                  f"    cowdir = {os.path.join(d, 'cow')}\n")
        with open(conf, "w") as f:
            f.write("[generic]\n"
                    f"    port = {port}\n    listenaddr = 127.0.0.1\n"
                    f"    unixsock = {sockp}\n    duallisten = true\n    allowlist = true\n"
                    + export + "    flush = true\n    fua = true\n")
        cmd = ["nbd-server", "-C", conf, "-p", pidf]
        s = DaemonServer(work, self.name, cmd, os.path.join(work.log_dir, f"{self.name}.log"),
                         _uri_for(self.transport, port, sockp, "x"), pidf)
        try:
            s.wait_ready()
        except BaseException:
            work.stop(s)
            raise
        return s


class LocalFileTarget(Target):
    """The storage ceiling: fio on the raw file directly (page cache, `--invalidate=0`),
    psync for QD1 jobs (its latency is the reference; io_uring completes cached reads at
    submit) and io_uring for the others."""
    name = "ceil_file"
    requires = ("raw",)
    role, family, transport = "ceiling", "ceiling: local file", "local"
    title = "CEILING fio on the raw file itself (psync at QD1, io_uring otherwise), page cache"

    def start(self, work):
        return LocalRun(self.name, work)


class BlockdCloneTarget(Target):
    """A fresh blockd clone per fio run (POST /v1/volumes {"from": SNAP} on a freshly started
    server, deleted again before the server stops), so every run starts from the same
    state. depth 0: a clone of `bench@base`; depth N: a clone of `l<N>@s`, the top of the
    snapshot chain (N layers of CHAIN_WRITES 4 KiB writes on top of `bench@base`)."""
    role, family = "blockd", "blockd"

    def __init__(self, name, depth, transport="tcp", engine=None, binary=None):
        self.name, self.depth, self.transport, self.engine = name, depth, transport, engine
        self.binary = binary
        self.requires = ("blockd_chain",) if depth else ("blockd_base_snapshot",)
        src = f"l{depth}@s" if depth else f"{VOLUME}@base"
        self.source = src
        eng = f", --io-engine {engine}" if engine else ""
        self.title = (f"blockd, fresh clone of `{src}` (end of a snapshot chain of depth {depth}), "
                      f"{_transport_title(transport)}{eng}"
                      if depth else f"blockd, fresh clone of `{src}` (snapshot of the filled volume), "
                                    f"{_transport_title(transport)}{eng}")
        if engine:
            self.family = f"blockd {engine}"
        if binary:
            self.title += f", binary `{binary}` ($BLOCKD_BIN_ALT)"
            if BLOCKD_ALT_ARGS:
                self.title += f", `{' '.join(BLOCKD_ALT_ARGS)}` ($BLOCKD_ALT_ARGS)"

    def start(self, work):
        if self.binary == "":
            raise BenchError(f"{self.name} needs $BLOCKD_BIN_ALT (a second blockd binary)")
        s = start_blockd(work, self.name, engine=self.engine, binary=self.binary,
                         extra_args=BLOCKD_ALT_ARGS if self.binary else ())
        try:
            api_delete_volume(s.api, FIO_CLONE)
            api_ok(s.api, "POST", "/v1/volumes", {"name": FIO_CLONE, "from": self.source})
            s.before_stop.append(lambda: api_delete_volume(s.api, FIO_CLONE))
            s.uri = (f"nbd://{s.nbd}/{FIO_CLONE}" if self.transport == "tcp"
                     else f"nbd+unix:///{FIO_CLONE}?socket={s.socket}")
            s.wait_ready()
            if work.warm_job_reads:
                warm_through_server(s)
        except BaseException:
            work.stop(s)
            raise
        return s


class QcowChainTarget(Target):
    """qemu-nbd serving a fresh copy of the top layer of the qcow2 chain (as peers.sh):
    `cp --sparse=always lN.qcow2 top.qcow2`, served read-write, deleted after the run."""
    requires = ("qcow2_chain",)
    role, family = "peer", "qemu-nbd qcow2"
    OPTS = ["-f", "qcow2", "--cache=writeback", "-t", "-e", "4", "-x", QEMU_EXPORT, "--aio=threads"]

    def __init__(self, name, depth, transport="tcp"):
        self.name, self.depth, self.transport = name, depth, transport
        chain = "source <- l1" if depth == 1 else f"source <- l1 <- ... <- l{depth}"
        self.title = (f"qemu-nbd qcow2, fresh copy of the top of a chain of depth {depth} "
                      f"({chain}), aio=threads, {_transport_title(transport)}")

    def start(self, work):
        warm = None
        if work.warm_job_reads is not None and not work.pinned:   # copy-up on writes reads the base too
            r0, t0 = proc_read_bytes(), time.time()
            warm4k(work.src)
            warm = {"warm_s": round(time.time() - t0, 2),
                    "warm_disk_read_mb": round((proc_read_bytes() - r0) / 1e6, 1)}
        top = os.path.join(work.root, "qcow2-top.qcow2")
        if os.path.exists(top):
            os.unlink(top)
        subprocess.run(["cp", "--sparse=always", os.path.join(work.qcow_dir, f"l{self.depth}.qcow2"), top],
                       check=True)
        if self.transport == "tcp":
            port, sockp = free_port(), None
            where = ["-b", "127.0.0.1", "-p", str(port)]
        else:
            port, sockp = None, fresh_socket(work, self.name)
            where = ["-k", sockp]
        cmd = ["qemu-nbd", *self.OPTS, *where, top]
        try:
            s = work.start(self.name, cmd, _uri_for(self.transport, port, sockp, QEMU_EXPORT))
        except BaseException:
            os.unlink(top)
            raise
        s.after_stop.append(lambda: os.path.exists(top) and os.unlink(top))
        if warm:
            s.warm = warm
        return s


CHAIN_DEPTHS = (1, 10, 100)
TARGETS = {t.name: t for t in [
    BlockdTarget("blockd_tcp", "tcp"),
    BlockdTarget("blockd_unix", "unix"),
    QemuRawTarget("qemu_tcp", "tcp"),
    QemuRawTarget("qemu_unix", "unix"),
    NbdkitFileTarget("nbdkit_tcp", "tcp"),
    NbdkitFileTarget("nbdkit_unix", "unix"),
    NbdServerTarget("nbdsrv_tcp", "tcp"),
    NbdServerTarget("nbdsrv_unix", "unix"),
    LocalFileTarget(),
    NbdkitNullTarget("ceil_null_tcp", "tcp"),
    NbdkitNullTarget("ceil_null_unix", "unix"),
    *[BlockdCloneTarget(f"blockd_chain_d{d}", d) for d in CHAIN_DEPTHS],
    *[QcowChainTarget(f"qcow2_d{d}", d) for d in CHAIN_DEPTHS],
    QcowChainTarget("qcow2_d1_unix", 1, "unix"),
    BlockdCloneTarget("blockd_clone", 0),
    BlockdCloneTarget("blockd_clone_unix", 0, "unix"),
    BlockdCloneTarget("blockd_clone_uring", 0, "tcp", engine="uring"),
    BlockdCloneTarget("blockd_clone_uring_unix", 0, "unix", engine="uring"),
    BlockdCloneTarget("blockd_clone_sync", 0, "tcp", engine="sync"),
    BlockdCloneTarget("blockd_clone_sync_unix", 0, "unix", engine="sync"),
    NbdkitCowTarget("nbdkit_cow_tcp", "tcp"),
    NbdkitCowTarget("nbdkit_cow_unix", "unix"),
    NbdServerTarget("nbdsrv_cow_tcp", "tcp", cow=True),
    NbdServerTarget("nbdsrv_cow_unix", "unix", cow=True),
    BlockdCloneTarget("blockd_clone_alt", 0, "tcp", binary=BLOCKD_BIN_ALT),
]}
BLOCKD_TARGETS = {n for n, t in TARGETS.items() if t.role == "blockd"}
REFERENCES = [("qemu_tcp", "qemu-nbd"), ("nbdkit_tcp", "nbdkit")]   # ratio columns in the report


# --------------------------------------------------------------------------- jobs

class Job:
    def __init__(self, name, title, args, note=""):
        self.name, self.title, self.args, self.note = name, title, args, note
        self.reads = any(a in ("--rw=read", "--rw=randread", "--rw=rw", "--rw=randrw") for a in args)
        opt = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        self.iodepth = int(opt.get("iodepth", 1))
        self.numjobs = int(opt.get("numjobs", 1))
        self.bs = parse_size(opt.get("bs", "4k"))


JOBS = {j.name: j for j in [
    Job("rr4k_qd1", "4k randread QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    Job("rr4k_qd32", "4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    Job("rw4k_qd32", "4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    Job("rw4k_qd32_fsync32", "4k randwrite QD32, fsync=32",
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"],
        note="fio sends NBD_CMD_FLUSH when 32 writes have been issued since the last flush; at "
             "QD>1 fio (3.33) then issues a burst of flushes while the queue drains, so there "
             "are far more than 1/32 flushes per write: see the flushes/write column."),
    Job("mix64k_qd16", "64k random 70/30 read/write QD16",
        ["--rw=randrw", "--rwmixread=70", "--bs=64k", "--iodepth=16"],
        note="IOPS and MB/s are reads + writes; latencies are those of the reads (70 %)."),
    Job("sr1m_qd8", "1M sequential read QD8", ["--rw=read", "--bs=1M", "--iodepth=8"]),
    Job("sw1m_qd8", "1M sequential write QD8", ["--rw=write", "--bs=1M", "--iodepth=8"]),
    Job("rr4k_4x8", "4k randread, 4 connections x QD8",
        ["--rw=randread", "--bs=4k", "--iodepth=8", "--numjobs=4", "--group_reporting"],
        note="4 fio jobs, each with its own NBD connection (multi-conn); figures are the sum / "
             "the group's percentiles. nbd-server copyonwrite gives every connection its own "
             "private overlay (it does not advertise multi-conn); qemu-nbd serves up to 4 "
             "connections (`-e 4`)."),
]}
COMMON_FIO = ["--time_based", "--norandommap", "--randrepeat=0", "--output-format=json"]


# --------------------------------------------------------------------------- suites

PEERS_TARGETS = ["ceil_file", "ceil_null_tcp", "ceil_null_unix", "blockd_clone", "blockd_clone_unix",
                 "blockd_clone_uring", "blockd_clone_uring_unix", "qemu_tcp", "qemu_unix", "nbdkit_tcp",
                 "nbdkit_unix", "nbdsrv_tcp", "nbdsrv_unix", "qcow2_d1", "qcow2_d1_unix", "nbdkit_cow_tcp",
                 "nbdkit_cow_unix", "nbdsrv_cow_tcp", "nbdsrv_cow_unix", "blockd_chain_d10", "qcow2_d10",
                 "blockd_chain_d100", "qcow2_d100"]
PEERS_JOBS = ["rr4k_qd1", "rr4k_qd32", "rw4k_qd32", "rw4k_qd32_fsync32", "mix64k_qd16", "sr1m_qd8",
              "sw1m_qd8", "rr4k_4x8"]


class Suite:
    """Targets × jobs run together (interleaved). `sections`: how `report` splits the run
    into marked sections of docs/BENCHMARKS.md (default: one, keyed by the suite name)."""

    def __init__(self, name, title, targets, jobs, about, sections=None, warm_per_run=False,
                 pin_cache=False):
        self.name, self.title, self.targets, self.jobs, self.about = name, title, targets, jobs, about
        self.sections = sections or []
        self.warm_per_run = warm_per_run   # warm the data each target reads right before every fio run
        self.pin_cache = pin_cache         # default of `run --pin-cache`


class Section:
    """A marked section of docs/BENCHMARKS.md rendered from (part of) a run: the targets
    and jobs it shows (None: all of the run's), ratio columns `refs` as (label, function
    from a target to its reference target or None), `tails` adds p99.9/max columns, and
    `extra(meta, rows, targets, jobs)` returns more markdown lines (summary tables)."""

    def __init__(self, key, title, targets=None, jobs=None, refs=(), tails=False, extra=None,
                 peers=False, target_ratio=None, match_depth=False):
        self.key, self.title, self.targets, self.jobs = key, title, targets, jobs
        self.refs, self.tails, self.extra = list(refs), tails, extra
        # peers=True: the `peers` table (MB/s, CPU s/GiB, ratio to the best peer and to
        # each ceiling) and, with target_ratio, a met/missed table for the blockd rows
        self.peers, self.target_ratio, self.match_depth = peers, target_ratio, match_depth
        self.targets_in_run = []


BASIC_REFS = [(lbl, (lambda t, rt=rt: rt)) for rt, lbl in REFERENCES]


def _depth(t):
    return int(t.rsplit("_d", 1)[1]) if "_d" in t and t.rsplit("_d", 1)[1].isdigit() else None


def _verdict(x, threshold, what):
    """'met'/'not met' on the median ratio, and whether every rep agreed."""
    if x is None:
        return f"{what}: no data"
    m, pr = x
    ok = m >= threshold
    every = pr and all(v >= threshold for v in pr)
    none = pr and all(v < threshold for v in pr)
    agree = " in every rep" if (ok and every) or (not ok and none) else " on the median, not in every rep"
    return f"{what}: {fmt_ratio(x)} → **{'met' if ok else 'not met'}**{agree}"


def chains_extra(meta, rows, targets, jobs):
    L = []
    w = L.append
    depths = sorted({_depth(t) for t in targets if _depth(t)})
    fams = [f for f in ("blockd_chain", "qcow2") if any(t.startswith(f + "_d") for t in targets)]
    names = {"blockd_chain": "blockd", "qcow2": "qcow2"}
    specs = []
    for f in fams:
        for d in depths[1:]:
            specs.append((f"{names[f]} d{d} / d{depths[0]}", f"{f}_d{d}", f"{f}_d{depths[0]}"))
    if len(fams) == 2:
        for d in depths:
            specs.append((f"blockd / qcow2 at depth {d}", f"blockd_chain_d{d}", f"qcow2_d{d}"))
    if not specs:
        return L
    for key, what in (("iops", "median IOPS"), ("cpu_us_per_io", "server CPU µs per I/O"),
                      ("clat_p50_us", "clat p50")):
        w(f"**Ratios of {what}** (row target / reference; per-rep range in brackets):\n")
        w("| ratio | " + " | ".join(f"`{j}`" for j in jobs) + " |")
        w("|---|" + "---|" * len(jobs))
        for lbl, a, b in specs:
            w(f"| {lbl} | " + " | ".join(fmt_ratio(pair_ratio(rows, a, b, j, key), bold=(key == "iops"))
                                        for j in jobs) + " |")
        w("")
    hi, lo = max(depths), min(depths)
    goals = []
    for j in [j for j in jobs if j.startswith("rr")]:
        x = pair_ratio(rows, f"blockd_chain_d{hi}", f"blockd_chain_d{lo}", j)
        c = pair_ratio(rows, f"blockd_chain_d{hi}", f"blockd_chain_d{lo}", j, "cpu_us_per_io")
        goals.append(f"- {_verdict(x, 0.95, f'`{j}` blockd d{hi}/d{lo} IOPS ≥ 0.95')}"
                     + (f"; server CPU per I/O d{hi}/d{lo} {fmt_ratio(c, bold=False)}" if c else ""))
    if goals:
        w(f"**Target: 4k random read at chain depth {hi} within 5 % of depth {lo} (blockd).**\n")
        L += goals
        w("")
    return L


def clone_io_extra(meta, rows, targets, jobs):
    L = []
    w = L.append
    if not {"blockd_clone", "qcow2_d1"} <= set(targets):
        return L
    w("**Target: 4k random read and write on a clone at least as fast as qemu-nbd on a qcow2 "
      "overlay** (`blockd_clone` / `qcow2_d1` median IOPS, per-rep range in brackets; server CPU "
      "per I/O ratio after the semicolon):\n")
    for j in jobs:
        x = pair_ratio(rows, "blockd_clone", "qcow2_d1", j)
        c = pair_ratio(rows, "blockd_clone", "qcow2_d1", j, "cpu_us_per_io")
        w(f"- {_verdict(x, 1.0, f'`{j}`')}" + (f"; CPU/IO {fmt_ratio(c, bold=False)}" if c else ""))
    w("")
    return L


SUITES = {s.name: s for s in [
    Suite("nbd-basic", "NBD basics: 4k random I/O, one connection",
          ["blockd_tcp", "blockd_unix", "qemu_tcp", "nbdkit_tcp"],
          ["rr4k_qd1", "rr4k_qd32", "rw4k_qd32", "rw4k_qd32_fsync32"],
          "fio ioengine=nbd (libnbd, one connection) against each server on loopback; "
          "every server exports the same random bytes, fully in page cache."),
    Suite("cow", "Copy-on-write: snapshot chains and clones",
          ["blockd_chain_d1", "qcow2_d1", "blockd_chain_d10", "qcow2_d10", "blockd_chain_d100",
           "qcow2_d100", "blockd_clone"],
          ["rr4k_qd1", "rr4k_qd32", "rw4k_qd32"],
          "blockd clones at the end of snapshot chains of depth 1/10/100 against qemu-nbd on qcow2 "
          "chains of the same depths, and a fresh blockd clone against a qcow2 overlay; fresh "
          "clone/overlay per fio run; TCP loopback, one connection.",
          sections=[
              Section("chains", "Snapshot chains: blockd clone vs qcow2 overlay chain, by depth",
                      targets=["blockd_chain_d1", "blockd_chain_d10", "blockd_chain_d100",
                               "qcow2_d1", "qcow2_d10", "qcow2_d100"],
                      refs=[("same-depth qcow2", lambda t: f"qcow2_d{_depth(t)}"
                             if t.startswith("blockd_chain_d") else None),
                            ("depth 1, same server", lambda t: t.rsplit("_d", 1)[0] + "_d1"
                             if _depth(t) else None)],
                      tails=True, extra=chains_extra),
              Section("clone-io", "Clone I/O: fresh blockd clone vs fresh qcow2 overlay",
                      targets=["blockd_clone", "qcow2_d1"],
                      refs=[("qcow2 overlay (qcow2_d1)", lambda t: "qcow2_d1")],
                      tails=True, extra=clone_io_extra),
          ], warm_per_run=True, pin_cache=True),
    Suite("peers", "blockd against qemu-nbd, nbdkit and nbd-server, side by side",
          PEERS_TARGETS, PEERS_JOBS,
          "Every workload on blockd and on the servers users would pick instead, on the same "
          "data, in one run, with two ceilings: fio on the raw file itself, and an NBD server "
          "that does no storage work (nbdkit null). blockd serves a fresh clone of the filled "
          "volume's snapshot per fio run (so every run starts from the same state); raw-file "
          "peers serve the raw file; copy-on-write peers start from an empty overlay over the "
          "same bytes per run.",
          sections=[
              Section("peers-raw", "Raw volume: blockd against raw-file servers",
                      targets=["ceil_file", "ceil_null_tcp", "ceil_null_unix", "blockd_clone",
                               "blockd_clone_unix", "qemu_tcp", "qemu_unix", "nbdkit_tcp", "nbdkit_unix",
                               "nbdsrv_tcp", "nbdsrv_unix"],
                      peers=True, target_ratio=1.0),
              Section("peers-clone", "Clones: blockd clone against qcow2 overlay, nbdkit cow, nbd-server copyonwrite",
                      targets=["ceil_file", "ceil_null_tcp", "ceil_null_unix", "blockd_clone",
                               "blockd_clone_unix", "qcow2_d1", "qcow2_d1_unix", "nbdkit_cow_tcp",
                               "nbdkit_cow_unix", "nbdsrv_cow_tcp", "nbdsrv_cow_unix"],
                      peers=True, target_ratio=1.5),
              Section("peers-chains", "Snapshot chains of depth 10 and 100: blockd against qcow2 backing chains",
                      targets=["ceil_file", "ceil_null_tcp", "blockd_chain_d10", "qcow2_d10",
                               "blockd_chain_d100", "qcow2_d100"],
                      peers=True, target_ratio=1.5, match_depth=True),
              Section("ab", "blockd against another blockd binary ($BLOCKD_BIN_ALT), with peers",
                      targets=["ceil_null_tcp", "blockd_clone", "blockd_clone_alt", "qemu_tcp", "nbdkit_tcp",
                               "nbdsrv_tcp", "nbdkit_cow_tcp", "nbdsrv_cow_tcp"],
                      peers=True, target_ratio=1.0, extra=lambda *x: ab_extra(*x)),
              Section("engines", "blockd I/O engines: io_uring against plain system calls",
                      targets=["blockd_clone", "blockd_clone_unix", "blockd_clone_sync",
                               "blockd_clone_sync_unix", "blockd_clone_uring", "blockd_clone_uring_unix"],
                      peers=True, extra=lambda *x: engines_extra(*x)),
          ], warm_per_run=True, pin_cache=True),
]}


# --------------------------------------------------------------------------- suite `peers`: report

def _tinfo(meta, t):
    ti = meta.get("target_info", {}).get(t)
    if ti:
        return ti
    tt = TARGETS.get(t)
    return {"role": tt.role, "family": tt.family, "transport": tt.transport, "depth": tt.depth} if tt else \
        {"role": "peer", "family": t, "transport": "tcp", "depth": 0}


def best_peer(meta, rows, sec, t, job, key="iops", lowest=False):
    """The peer of the section with the best median `key` for `job`, among those on the
    same transport as `t` (and the same chain depth when the section matches depths)."""
    ti = _tinfo(meta, t)
    peers = [p for p in sec.targets_in_run if _tinfo(meta, p)["role"] == "peer"]
    same = [p for p in peers if _tinfo(meta, p)["transport"] == ti["transport"]]
    cand = same or peers
    if sec.match_depth:
        cand = [p for p in cand if max(1, _tinfo(meta, p)["depth"]) == max(1, ti["depth"])]
    best, bv = None, None
    for p in cand:
        v = med(rows.get((p, job), []), key)
        if v is None:
            continue
        if bv is None or (v < bv if lowest else v > bv):
            best, bv = p, v
    return best


def ceiling_for(meta, sec, t, kind):
    """The ceiling target a row is compared with: `file` (fio on the raw file) or `null`
    (nbdkit null on the same transport)."""
    ti = _tinfo(meta, t)
    for c in sec.targets_in_run:
        ci = _tinfo(meta, c)
        if ci["role"] != "ceiling":
            continue
        if kind == "file" and ci["transport"] == "local":
            return c
        if kind == "null" and ci["transport"] == (ti["transport"] if ti["transport"] != "local" else "tcp"):
            return c
    return None


def _fmt_mbps(v):
    return "–" if v is None else (f"{v:.0f}" if v >= 10 else f"{v:.1f}")


def render_peer_section(res, meta, rows, failed, flagged, sec, targets, jobs):
    sec.targets_in_run = targets
    L = render_header(res, meta, rows, targets, jobs)
    w = L.append
    verdicts = []
    for job in jobs:
        title = meta["job_titles"].get(job, job)
        w(f"#### {title} (`{job}`)\n")
        if meta.get("job_notes", {}).get(job):
            w(f"{meta['job_notes'][job]}\n")
        fs = job.endswith("fsync32")
        hdr = ["target", "n", "IOPS median [min–max]", "MB/s", "p50 µs", "p99 µs", "server CPU s/GiB"]
        if fs:
            hdr += ["flushes/write"]
        hdr += ["vs best peer (same transport)", "vs ceiling: file", "vs ceiling: null server"]
        w("| " + " | ".join(hdr) + " |")
        w("|" + "---|" * len(hdr))
        for t in targets:
            rs = rows.get((t, job), [])
            if not rs:
                w(f"| `{t}` | 0 |" + " – |" * (len(hdr) - 2))
                continue
            iops = [float(r["iops"]) for r in rs]
            mi = med(rs, "iops")
            role = _tinfo(meta, t)["role"]
            name = f"**`{t}`**" if role == "blockd" else f"`{t}`"
            cells = [name, str(len(rs)), f"{fmt_iops(mi)} [{fmt_iops(min(iops))}–{fmt_iops(max(iops))}]",
                     _fmt_mbps(med(rs, "mbps")), fmt(med(rs, "clat_p50_us"), 1), fmt(med(rs, "clat_p99_us"), 1),
                     fmt(med(rs, "cpu_s_per_gib"), 2)]
            if fs:
                fw = [float(r["flushes"]) / max(1.0, float(r["ios"])) for r in rs if r.get("flushes")]
                cells.append(f"{statistics.median(fw):.2f}" if fw else "–")
            if role == "ceiling":
                cells += ["–", "–", "–"]
            else:
                bp = best_peer(meta, rows, sec, t, job)
                if bp == t:
                    cells.append("best peer")
                elif bp:
                    cells.append(f"{fmt_ratio(pair_ratio(rows, t, bp, job))} `{bp}`")
                else:
                    cells.append("–")
                for kind in ("file", "null"):
                    c = ceiling_for(meta, sec, t, kind)
                    cells.append(fmt_ratio(pair_ratio(rows, t, c, job), bold=False) if c else "–")
            w("| " + " | ".join(cells) + " |")
        w("")
        for t in targets:
            if _tinfo(meta, t)["role"] != "blockd" or not rows.get((t, job)):
                continue
            bp = best_peer(meta, rows, sec, t, job)
            x = pair_ratio(rows, t, bp, job) if bp else None
            v = {"job": job, "target": t, "peer": bp, "x": x}
            if job == "rr4k_qd1":
                lp = best_peer(meta, rows, sec, t, job, key="clat_p99_us", lowest=True)
                v["p99"] = (med(rows[(t, job)], "clat_p99_us"), lp,
                            med(rows.get((lp, job), []), "clat_p99_us") if lp else None)
            verdicts.append(v)
    w("Ratios: median IOPS of the row over median IOPS of the reference, with the range of the "
      "per-rep ratios in brackets (same rep = same interleaved pass). *Best peer* = the peer of "
      "this table with the highest median IOPS for that job on the same transport"
      + (" and at the same chain depth" if sec.match_depth else "") + ". Server CPU = utime+stime "
      "(+ reaped children) of the server process over the fio run from /proc/PID/stat, per GiB "
      "moved. The file ceiling uses psync at QD1 and io_uring otherwise; the null-server ceiling "
      "is `nbdkit null` (no storage work: reads return zeroes) on the same transport.\n")
    if verdicts and sec.target_ratio:
        w(f"**Targets** (blockd / best peer median IOPS ≥ {sec.target_ratio:g}"
          + (", and QD1 p99 at or below the lowest peer p99" if any("p99" in v for v in verdicts) else "")
          + "):\n")
        w("| job | blockd target | best peer | ratio (per-rep range) | met? |")
        w("|---|---|---|---|---|")
        for v in verdicts:
            if v["x"] is None:
                w(f"| `{v['job']}` | `{v['target']}` | – | – | no data |")
                continue
            m, pr = v["x"]
            ok = m >= sec.target_ratio
            every = pr and all(r >= sec.target_ratio for r in pr)
            w(f"| `{v['job']}` | `{v['target']}` | `{v['peer']}` | {fmt_ratio(v['x'])} | "
              f"{'✓' if ok else '✗'}{' (every rep)' if ok and every and len(pr) > 1 else ''} |")
            if "p99" in v:
                mine, lp, theirs = v["p99"]
                if mine is not None and theirs is not None:
                    w(f"| `{v['job']}` p99 | `{v['target']}` {mine:.0f} µs | `{lp}` {theirs:.0f} µs | "
                      f"{mine / theirs:.2f} | {'✓' if mine <= theirs else '✗'} |")
        w("")
    if sec.extra:
        L += sec.extra(meta, rows, targets, jobs)
    mine = set(targets)
    fl = [r for r in flagged if r["target"] in mine and r["job"] in jobs]
    fa = [r for r in failed if r["target"] in mine and r["job"] in jobs]
    if fl:
        w(f"Kept in the medians although flagged (`--keep-flagged`): {len(fl)} runs (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in fl) + ").\n")
    if fa:
        w(f"Runs left out of the medians: {len(fa)} (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in fa) + ")\n")
    return "\n".join(L), []


def ab_extra(meta, rows, targets, jobs):
    if not {"blockd_clone", "blockd_clone_alt"} <= set(targets):
        return []
    L = [f"**This build / the other binary** (`blockd_clone` / `blockd_clone_alt`, median IOPS ratio, "
         f"per-rep range; server CPU per GiB ratio after the semicolon; other binary: "
         f"{meta['target_titles'].get('blockd_clone_alt', '?')}):\n",
         "| job | IOPS ratio | CPU/GiB ratio |", "|---|---|---|"]
    for j in jobs:
        x = pair_ratio(rows, "blockd_clone", "blockd_clone_alt", j)
        c = pair_ratio(rows, "blockd_clone", "blockd_clone_alt", j, "cpu_s_per_gib")
        L.append(f"| `{j}` | {fmt_ratio(x)} | {fmt_ratio(c, bold=False)} |")
    L.append("")
    return L


def engines_extra(meta, rows, targets, jobs):
    L = []
    pairs = []
    for tr, sfx in (("tcp", ""), ("unix", "_unix")):
        u = f"blockd_clone_uring{sfx}"
        sy = f"blockd_clone_sync{sfx}" if f"blockd_clone_sync{sfx}" in targets else (
            f"blockd_clone{sfx}" if meta.get("blockd_engine", "sync") == "sync" else None)
        if u in targets and sy in targets:
            pairs.append((tr, u, sy))
    if not pairs:
        return L
    L.append("**io_uring engine / syscall engine** (median IOPS ratio, per-rep range; server CPU "
             "per GiB ratio after the semicolon):\n")
    L.append("| job | " + " | ".join(f"{tr}: `{u}` / `{sy}`" for tr, u, sy in pairs) + " |")
    L.append("|---|" + "---|" * len(pairs))
    for j in jobs:
        cells = []
        for _, u, sy in pairs:
            x = pair_ratio(rows, u, sy, j)
            c = pair_ratio(rows, u, sy, j, "cpu_s_per_gib")
            cells.append(fmt_ratio(x) + (f"; CPU {fmt_ratio(c, bold=False)}" if c else ""))
        L.append(f"| `{j}` | " + " | ".join(cells) + " |")
    L.append("")
    return L


# --------------------------------------------------------------------------- machine facts

def machine_facts(work_root):
    def lscpu(key):
        for line in out_of(["lscpu"]).splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
        return "?"
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB"
    except OSError:
        pass
    git = out_of(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = out_of(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    head_time = out_of(["git", "-C", REPO, "log", "-1", "--format=%ct"])
    binfo = "not built"
    if os.path.exists(BLOCKD_BIN):
        st = os.stat(BLOCKD_BIN)
        with open(BLOCKD_BIN, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        built = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
        stale = head_time.isdigit() and int(head_time) > st.st_mtime
        binfo = (f"{out_of([BLOCKD_BIN, '--version'])}, binary built {built}, sha256 {digest}"
                 f"{' (OLDER than the HEAD commit: rebuild with `bench.py setup`)' if stale else ''}")
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpu": f"{lscpu('Model name')}, {os.cpu_count()} vCPU ({lscpu('Hypervisor vendor')} guest)",
        "mem": mem,
        "fs": out_of(["findmnt", "-no", "FSTYPE,SOURCE", "-T", work_root]),
        "fio": out_of(["fio", "--version"]),
        "qemu-nbd": out_of(["qemu-nbd", "--version"]).splitlines()[0] if shutil.which("qemu-nbd") else "-",
        "nbdkit": out_of(["nbdkit", "--version"]),
        "libnbd": out_of(["nbdinfo", "--version"]).splitlines()[-1] if shutil.which("nbdinfo") else "-",
        "blockd": binfo,
        "tree": f"git {git}{' + local changes' if dirty else ''} (the source tree at run time; "
                f"the binary may be older)",
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- run

CSV_FIELDS = ["suite", "target", "job", "rep", "seq", "start_utc", "status",
              "iops", "mbps", "clat_p50_us", "clat_p99_us", "clat_p999_us", "clat_max_us",
              "clat_mean_us", "ios", "flushes", "flush_p50_us", "flush_p99_us",
              "io_bytes", "srv_cpu_s", "cpu_us_per_io", "cpu_s_per_gib", "srv_cores", "fio_cores", "steal_pct", "busy_pct",
              "others_cores", "load1", "srv_disk_read_mb", "host_disk_read_mb", "drop_caches", "wall_s",
              "warm_s", "warm_disk_read_mb", "srv_rss_kb", "srv_hwm_kb"]


def parse_fio(path):
    with open(path) as f:
        txt = f.read()
    d = json.loads(txt[txt.index("{"):])          # fio may print warnings before the JSON
    j = d["jobs"][0]
    # latencies: the direction with more requests (the reads of a 70/30 mix)
    side = j["write"] if j["write"]["total_ios"] > j["read"]["total_ios"] else j["read"]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    sync = j.get("sync", {})
    spct = sync.get("lat_ns", {}).get("percentile", {})
    return {
        "iops": j["read"]["iops"] + j["write"]["iops"],
        "mbps": (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6,
        "io_bytes": j["read"]["io_bytes"] + j["write"]["io_bytes"],
        "clat_p50_us": pct.get("50.000000", 0) / 1e3,
        "clat_p99_us": pct.get("99.000000", 0) / 1e3,
        "clat_p999_us": pct.get("99.900000", 0) / 1e3,
        "clat_max_us": clat.get("max", 0) / 1e3,
        "clat_mean_us": clat.get("mean", 0) / 1e3,
        "ios": j["read"]["total_ios"] + j["write"]["total_ios"],
        "flushes": sync.get("total_ios", 0),
        "flush_p50_us": spct.get("50.000000", 0) / 1e3,
        "flush_p99_us": spct.get("99.000000", 0) / 1e3,
        "fio_cores": (j.get("usr_cpu", 0) + j.get("sys_cpu", 0)) / 100.0,
        "error": j.get("error", 0),
    }


def run_one(work, res, target, job, rep, seq, a, cmdlog, writer, csvf):
    out = os.path.join(res, "fio", target.name, f"{job.name}.r{rep}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    row = {"suite": a.suite, "target": target.name, "job": job.name, "rep": rep, "seq": seq,
           "start_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if SUITES[a.suite].warm_per_run:
        work.warm_job_reads = job.reads
    srv = target.start(work)
    row.update(getattr(srv, "warm", {}))
    try:
        cmd = ["fio", f"--name={job.name}", *COMMON_FIO, f"--runtime={a.runtime}", *job.args,
               *srv.fio_args(job), f"--output={out}"]
        if rep == 1:
            cmdlog.write(f"## {target.name} / {job.name}\nserver: {' '.join(srv.cmd)}\nfio:    {' '.join(cmd)}\n")
            cmdlog.flush()
        c0, s0, v0, t0 = srv.cpu_seconds(), cpu_snapshot(), cache_probe(), time.time()
        rb0 = proc_read_bytes(srv.pid)
        with open(os.path.join(res, "fio.stderr"), "a") as err:
            err.write(f"== {target.name} {job.name} r{rep}\n")
            err.flush()
            try:
                rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                    timeout=a.runtime * 3 + 60).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        t1, s1, v1 = time.time(), cpu_snapshot(), cache_probe()
        time.sleep(0.1)                 # let the connection thread finish before sampling
        srv.settle()
        c1, rb1 = srv.cpu_seconds(), proc_read_bytes(srv.pid)
        alive = srv.alive()
        if srv.pid:
            mem = proc_status_kb(srv.pid, "VmRSS", "VmHWM")
            row.update(srv_rss_kb=mem.get("VmRSS", ""), srv_hwm_kb=mem.get("VmHWM", ""))
    finally:
        work.stop(srv)
    syncfs(work.root)                   # write back what a write job dirtied before the next run
    steal, busy = cpu_delta(s0, s1)
    host_mb, drops = cache_delta(v0, v1)
    srv_mb = (rb1 - rb0) / 1e6 if rb0 is not None and rb1 is not None else 0.0
    if srv.pid is None:                 # fio on the file: its own page-cache misses
        srv_mb = 0.0
    row.update(steal_pct=round(steal, 1), busy_pct=round(busy, 1), load1=loadavg(),
               srv_disk_read_mb=round(srv_mb, 1), host_disk_read_mb=round(host_mb, 1),
               drop_caches=drops, wall_s=round(t1 - t0, 2))
    status = "ok"
    if rc != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
        status = f"fio_rc={rc}"
    elif not alive:
        status = "server_died"
    if status == "ok":
        m = parse_fio(out)
        if m.pop("error"):
            status = "fio_error"
        elif drops and srv.pid:
            status = "cache_dropped"       # someone ran drop_caches during the run
        elif srv_mb > 0.01 * m["io_bytes"] / 1e6 + 1:
            status = "disk_reads"          # the server missed page cache: not what we measure
        row.update({k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()})
        if c0 is not None and c1 is not None:
            srv_cpu = c1 - c0
            row["srv_cpu_s"] = round(srv_cpu, 2)
            row["srv_cores"] = round(srv_cpu / (t1 - t0), 2)
            row["cpu_us_per_io"] = round(srv_cpu * 1e6 / m["ios"], 1) if m["ios"] else ""
            row["cpu_s_per_gib"] = round(srv_cpu / (m["io_bytes"] / (1 << 30)), 3) if m["io_bytes"] else ""
            row["others_cores"] = round(busy / 100 * os.cpu_count() - srv_cpu / (t1 - t0)
                                        - m["fio_cores"], 2)
    row["status"] = status
    writer.writerow(row)
    csvf.flush()
    log(f"{target.name:12s} {job.name:18s} r{rep}: {status} iops={row.get('iops', '-')} "
        f"p50={row.get('clat_p50_us', '-')} p99={row.get('clat_p99_us', '-')} "
        f"cpu/io={row.get('cpu_us_per_io', '-')}us steal={row['steal_pct']}% busy={row['busy_pct']}% "
        f"others={row.get('others_cores', '-')} load={row['load1']} srv_disk_read={row['srv_disk_read_mb']}MB")


def cmd_run(a):
    apply_quick(a)
    suite = SUITES[a.suite]
    targets = a.targets or suite.targets
    jobs = a.jobs or suite.jobs
    for t in targets:
        if t not in TARGETS:
            raise BenchError(f"unknown target {t}; see `bench.py list`")
    for j in jobs:
        if j not in JOBS:
            raise BenchError(f"unknown job {j}; see `bench.py list`")
    missing = [b for b in ("fio", "nbdinfo", "nbdcopy", "qemu-nbd", "qemu-img", "qemu-io", "nbdkit")
               if not shutil.which(b)]
    if any(t.startswith("nbdsrv") for t in targets) and not shutil.which("nbd-server"):
        missing.append("nbd-server")
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}; run `python3 bench/bench.py setup`")
    if any(t in BLOCKD_TARGETS for t in targets) and not os.access(BLOCKD_BIN, os.X_OK):
        raise BenchError(f"{BLOCKD_BIN} not built; run `python3 bench/bench.py setup`")
    size = parse_size(a.size)
    if size % CHUNK:
        raise BenchError("--size must be a multiple of 4 KiB")

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = os.path.abspath(a.out or os.path.join(RESULTS_ROOT, stamp))
    os.makedirs(os.path.join(res, "logs"), exist_ok=True)
    work = Work(a.work_dir, size, os.path.join(res, "logs"))
    work.blockd_engine = a.blockd_engine
    leftover = [p for p in work._pids() if pid_alive(int(p))]
    if leftover:
        raise BenchError(f"servers from an earlier run are still alive ({', '.join(leftover)}); "
                         f"run `python3 bench/bench.py clean` first")
    meta = {
        "suite": suite.name,
        "blockd_engine": a.blockd_engine,
        "target_info": {t: {"role": TARGETS[t].role, "family": TARGETS[t].family,
                            "transport": TARGETS[t].transport, "depth": TARGETS[t].depth}
                        for t in targets},
        "command": "python3 " + " ".join(shlex.quote(x) for x in
                                         [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "reps": a.reps, "runtime_s": a.runtime, "size": human(size), "pause_s": a.pause,
        "targets": targets, "jobs": jobs, "work_dir": work.root,
        "machine": machine_facts(work.root),
        "target_titles": {t: TARGETS[t].title for t in targets},
        "job_titles": {j: JOBS[j].title for j in jobs},
        "job_notes": {j: JOBS[j].note for j in jobs if JOBS[j].note},
        "load_at_start": open("/proc/loadavg").read().split()[:3],
        "chain_seed": a.chain_seed,
    }
    if "OLDER than the HEAD commit" in meta["machine"]["blockd"]:
        log("WARNING: target/release/blockd is older than the HEAD commit; run `bench.py setup` "
            "to measure the current code")
    meta_path = os.path.join(res, "meta.json")

    def save_meta():
        meta["prep"] = work.facts
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1)

    save_meta()
    log(f"results -> {res}")
    csv_path = os.path.join(res, "results.csv")
    t_start = time.time()
    pinner = None
    try:
        # ---- data, once per run
        needed = []
        for t in targets:
            for r in TARGETS[t].requires:
                if r not in needed:
                    needed.append(r)
        chain_targets = [TARGETS[t] for t in targets if getattr(TARGETS[t], "depth", 0)]
        if chain_targets:
            work.chain_depths = sorted({t.depth for t in chain_targets})
            work.chain_depth = max(work.chain_depths)
            work.chain_seed = a.chain_seed
        work.need(needed)
        syncfs(work.root)
        pin = a.pin_cache if a.pin_cache is not None else suite.pin_cache
        if pin:
            t0, r0 = time.time(), proc_read_bytes()
            pinner = CachePin()
            n = 0
            if "raw" in work.facts.get("prepared", []):
                n += pinner.pin(work.raw)
            if any(r in ("source", "qcow2_chain") for r in needed):   # base of the clone peers
                n += pinner.pin(work.src)
            if os.path.isdir(work.qcow_dir):
                n += pinner.pin_tree(work.qcow_dir)
            if os.path.isdir(work.blockd_dir) and any(r.startswith("blockd") for r in needed):
                n += pinner.pin_tree(work.blockd_dir)
            work.pinned = True
            work.facts.update(pinned_bytes=n, pin_s=round(time.time() - t0, 1),
                              pin_disk_read_mb=round((proc_read_bytes() - r0) / 1e6, 1))
            log(f"pinned {human(n)} of data in the page cache (mlock) in {time.time() - t0:.1f} s")
        save_meta()
        log(f"data ready in {time.time() - t_start:.0f} s: {work.facts}")
        # ---- the matrix: reps outermost (interleaved), target order rotated every rep
        with open(csv_path, "w", newline="") as csvf, open(os.path.join(res, "commands.log"), "w") as cmdlog:
            w = csv.DictWriter(csvf, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            seq = 0
            for rep in range(1, a.reps + 1):
                if rep > 1 and not suite.warm_per_run:
                    work.rewarm(rep)
                    save_meta()
                k = (rep - 1) % len(targets)
                order = targets[k:] + targets[:k]
                for jn in jobs:
                    for tn in order:
                        seq += 1
                        try:
                            run_one(work, res, TARGETS[tn], JOBS[jn], rep, seq, a, cmdlog, w, csvf)
                        except BenchError as e:
                            log(f"{tn} {jn} r{rep}: FAILED: {e}")
                            w.writerow({"suite": a.suite, "target": tn, "job": jn, "rep": rep,
                                        "seq": seq, "status": "failed"})
                            csvf.flush()
                        time.sleep(a.pause)
    finally:
        work.stop_all()
        if pinner:
            pinner.release()
        meta["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        meta["wall_s"] = round(time.time() - t_start)
        save_meta()
    shown = os.path.relpath(res, REPO) if res.startswith(REPO + os.sep) else res
    log(f"done in {time.time() - t_start:.0f} s; next: python3 bench/bench.py report {shown}")
    return res


# --------------------------------------------------------------------------- report

FLAGGED = ("disk_reads", "cache_dropped")   # measured fine, but not (only) from page cache


def load_rows(res, keep_flagged=False):
    rows = {}
    with open(os.path.join(res, "results.csv")) as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok" or (keep_flagged and r["status"] in FLAGGED):
                rows.setdefault((r["target"], r["job"]), []).append(r)
    return rows


def med(rs, k):
    v = [float(r[k]) for r in rs if r.get(k) not in ("", None)]
    return statistics.median(v) if v else None


def fmt_iops(v):
    if v is None:
        return "–"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt(v, nd=0):
    return "–" if v is None else f"{v:.{nd}f}"


def load_run(res, keep_flagged=False):
    with open(os.path.join(res, "meta.json")) as f:
        meta = json.load(f)
    rows = load_rows(res, keep_flagged)
    with open(os.path.join(res, "results.csv")) as f:
        allrows = list(csv.DictReader(f))
    kept = ("ok",) + (FLAGGED if keep_flagged else ())
    failed = [r for r in allrows if r["status"] not in kept]
    flagged = [r for r in allrows if keep_flagged and r["status"] in FLAGGED]
    return meta, rows, failed, flagged


def pair_ratio(rows, num, den, job, key="iops"):
    """(ratio of the medians, sorted per-rep ratios) of `key` between two targets, or None."""
    a, b = rows.get((num, job), []), rows.get((den, job), [])
    ma, mb = med(a, key), med(b, key)
    if not ma or not mb:
        return None
    by_rep = {r["rep"]: float(r[key]) for r in b if r.get(key) not in ("", None) and float(r[key])}
    pr = sorted(float(r[key]) / by_rep[r["rep"]] for r in a
                if r["rep"] in by_rep and r.get(key) not in ("", None))
    return ma / mb, pr


def fmt_ratio(x, bold=True):
    if x is None:
        return "–"
    m, pr = x
    s = f"**{m:.2f}**" if bold else f"{m:.2f}"
    return s + (f" ({pr[0]:.2f}–{pr[-1]:.2f})" if len(pr) > 1 else "")


def render_header(res, meta, rows, targets, jobs):
    L = []
    w = L.append
    m = meta["machine"]
    w(f"Run `{os.path.basename(res)}`: {meta['started_utc']} – {meta.get('finished_utc', '?')} "
      f"({meta.get('wall_s', '?')} s), {meta['reps']} reps × {len(meta['targets'])} targets × "
      f"{len(meta['jobs'])} jobs, {meta['runtime_s']} s per fio run, {meta['size']} volume.\n")
    w("```")
    w(meta["command"])
    w("```\n")
    w("Machine and versions:\n")
    w("```")
    for k in ("kernel", "cpu", "mem", "fs", "fio", "qemu-nbd", "nbdkit", "libnbd", "blockd", "tree"):
        w(f"{k}: {m.get(k, '?')}")
    w("```\n")
    p = meta.get("prep", {})
    w(f"Data: {meta['size']} of random bytes; raw file for qemu-nbd/nbdkit written with 4 KiB writes "
      f"({'sha256 checked' if p.get('raw_verified') else 'unchecked'}); blockd volume filled through NBD "
      f"with `nbdcopy --connections=1 --request-size=4096` in {p.get('blockd_fill_s', '?')} s, warmed "
      f"with 4 KiB NBD reads in {p.get('blockd_warm_s', '?')} s, "
      f"{'sha256 read back through NBD and checked' if p.get('blockd_verified') else 'NOT verified'}.\n")
    chain = []
    if "blockd_chain_build_s" in p:
        ops = p.get("blockd_chain_ops_ms", [])
        chain.append(f"blockd chain of {len(ops)} layers built through the REST API and NBD (qemu-io) in "
                     f"{p['blockd_chain_build_s']} s, content checked through NBD at depths "
                     f"{', '.join(map(str, p.get('blockd_chain_checked', [])))}")
    if "qcow2_chain_build_s" in p:
        chain.append(f"qcow2 chain built with qemu-img/qemu-io in {p['qcow2_chain_build_s']} s, content checked "
                     f"at depths {', '.join(map(str, p.get('qcow2_chain_checked', [])))}")
    if p.get("pinned_bytes"):
        w(f"Page cache: the prepared data ({_bytes(p['pinned_bytes'])}: "
          f"the raw base file, the qcow2 layers and every file of the blockd data dir as it was after "
          f"preparation) was mapped read-only and mlock()ed by the harness for the whole run "
          f"({p.get('pin_s')} s, {p.get('pin_disk_read_mb')} MB read from disk to do it), because the "
          f"VM's DAMON proactive reclaim pages out data that random reads touch too rarely; see "
          f"bench/README.md.\n")
    if chain:
        w(f"Chains: {CHAIN_WRITES} random 4 KiB writes per layer, the same offsets and pattern bytes in "
          f"both chains (seed {meta.get('chain_seed', '?')}); " + "; ".join(chain) + ".\n")
    if any(t in meta.get("target_titles", {}) for t in targets) and meta.get("suite") != "nbd-basic":
        w("Targets:\n")
        for t in targets:
            w(f"- `{t}`: {meta['target_titles'].get(t, t)}")
        w("")
    allok = [r for t in targets for j in jobs for r in rows.get((t, j), [])]
    if allok:
        def rng(k, nd=1):
            v = sorted(float(r[k]) for r in allok if r.get(k) not in ("", None))
            return f"{statistics.median(v):.{nd}f} [{v[0]:.{nd}f}–{v[-1]:.{nd}f}]" if v else "–"
        w(f"Conditions during the fio runs, median [min–max] over {len(allok)} runs: steal "
          f"{rng('steal_pct')} %, CPU busy (without steal) {rng('busy_pct')} % of {os.cpu_count()} vCPUs, "
          f"CPU used by other tenants (busy − server − fio) {rng('others_cores', 2)} cores, "
          f"load1 {rng('load1', 2)}.\n")
        if any(r.get("warm_s") not in ("", None) for r in allok):
            w(f"Warm pass right before each fio run (blockd: `nbdcopy` of the whole export to `null:` "
              f"through the server about to be measured, read jobs only, so blockd has verified the "
              f"payload checksums it checks once per process; qemu-nbd: "
              + ("none, its data is pinned" if p.get("pinned_bytes") else
                 "the raw base file re-read with 4 KiB reads before the server starts")
              + f"), median [min–max]: "
              f"{rng('warm_s', 1)} s, of which read from disk (pages the VM had dropped since the last "
              f"run) {rng('warm_disk_read_mb', 0)} MB.\n")
    return L


def render_section(res, meta, rows, failed, flagged, sec, targets, jobs):
    L = render_header(res, meta, rows, targets, jobs)
    w = L.append
    p = meta.get("prep", {})
    summary = []
    present = set(meta["targets"])
    refs = [(lbl, fn) for lbl, fn in sec.refs if any(fn(t) in present for t in targets)]
    for job in jobs:
        title = meta["job_titles"].get(job, job)
        w(f"#### {title} (`{job}`)\n")
        if meta.get("job_notes", {}).get(job):
            w(f"{meta['job_notes'][job]}\n")
        fs = job.endswith("fsync32") or any(float(r.get("flushes") or 0) > 0 for t in targets for r in rows.get((t, job), []))
        hdr = ["target", "n", "IOPS median [min–max]", "clat p50 µs", "clat p99 µs"]
        if sec.tails:
            hdr += ["clat p99.9 µs", "clat max ms (worst rep)"]
        hdr += ["server CPU µs/IO", "server cores"]
        if fs:
            hdr += ["flushes/write", "flush p50 µs"]
        hdr += [f"vs {lbl}" for lbl, _ in refs]
        w("| " + " | ".join(hdr) + " |")
        w("|" + "---|" * len(hdr))
        M = {}
        for t in targets:
            rs = rows.get((t, job), [])
            if not rs:
                w(f"| {t} | 0 |" + " – |" * (len(hdr) - 2))
                continue
            M[t] = {k: med(rs, k) for k in ("iops", "clat_p50_us", "clat_p99_us", "clat_p999_us", "cpu_us_per_io",
                                            "srv_cores", "flushes", "ios", "flush_p50_us")}
            iops = [float(r["iops"]) for r in rs]
            cells = [t, str(len(rs)), f"{fmt_iops(M[t]['iops'])} [{fmt_iops(min(iops))}–{fmt_iops(max(iops))}]",
                     fmt(M[t]["clat_p50_us"], 1), fmt(M[t]["clat_p99_us"], 1)]
            if sec.tails:
                mx = max(float(r["clat_max_us"] or 0) for r in rs)
                cells += [fmt(M[t]["clat_p999_us"], 0), f"{mx / 1e3:.1f}"]
            cells += [fmt(M[t]["cpu_us_per_io"], 1), fmt(M[t]["srv_cores"], 2)]
            if fs:
                fw = [float(r["flushes"]) / max(1.0, float(r["ios"])) for r in rs if r.get("flushes")]
                cells += [f"{statistics.median(fw):.2f}" if fw else "–", fmt(M[t]["flush_p50_us"], 0)]
            for _, fn in refs:
                rt = fn(t)
                if rt == t:
                    cells.append("1")
                    continue
                x = pair_ratio(rows, t, rt, job) if rt else None
                cells.append(fmt_ratio(x))
            w("| " + " | ".join(cells) + " |")
        w("")
        if "blockd_tcp" in M and "qemu_tcp" in M and M["qemu_tcp"]["iops"]:
            summary.append((title, M["blockd_tcp"]["iops"] / M["qemu_tcp"]["iops"],
                            M.get("blockd_unix", {}).get("iops")))
    if refs:
        w("Ratios are median IOPS of the row's target over median IOPS of the reference; in brackets "
          "the range of the per-rep ratios (same rep = same interleaved pass). Server CPU = "
          "utime+stime of the server process from /proc/PID/stat before/after fio, divided by the I/Os "
          "fio completed (flushes not counted).\n")
    if sec.extra:
        L += sec.extra(meta, rows, targets, jobs)
    if p.get("rewarm"):
        w("Page cache found cold at the start of a rep and re-warmed: " + ", ".join(
            f"rep {e['rep']} ({e['disk_read_mb']} MB read back, {e['drop_caches']} drop_caches)"
            for e in p["rewarm"]) + ".\n")
    mine = set(targets)
    fl = [r for r in flagged if r["target"] in mine and r["job"] in jobs]
    fa = [r for r in failed if r["target"] in mine and r["job"] in jobs]
    if fl:
        w(f"Kept in the medians although flagged (`--keep-flagged`): {len(fl)} runs (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in fl) + ").\n")
    if fa:
        w(f"Runs left out of the medians: {len(fa)} (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in fa) + ")\n")
    return "\n".join(L), summary


def render(res, keep_flagged=False):
    """Every section of a fio run: ([(marker key, title, markdown)], summary, meta)."""
    meta, rows, failed, flagged = load_run(res, keep_flagged)
    suite = SUITES.get(meta["suite"])
    secs = (suite.sections if suite and suite.sections else
            [Section(None, suite.title if suite else meta["suite"], refs=BASIC_REFS)])
    out, summary = [], []
    for sec in secs:
        targets = [t for t in meta["targets"] if sec.targets is None or t in sec.targets]
        jobs = [j for j in meta["jobs"] if sec.jobs is None or j in sec.jobs]
        if not targets or not jobs:
            continue
        fn = render_peer_section if sec.peers else render_section
        text, s = fn(res, meta, rows, failed, flagged, sec, targets, jobs)
        out.append((sec.key or meta["suite"], sec.title, text))
        summary += s
    return out, summary, meta


def update_docs(section, suite, path=DOCS, title=None):
    begin, end = f"<!-- bench:{suite}:begin -->", f"<!-- bench:{suite}:end -->"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
    else:
        doc = DOCS_INTRO
    if begin in doc and end in doc:
        pre = doc[:doc.index(begin)]
        post = doc[doc.index(end) + len(end):]
        doc = pre + block + post
    else:
        suite_title = title or (SUITES[suite].title if suite in SUITES else suite)
        doc = doc.rstrip() + f"\n\n## {suite_title} (`{suite}`)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)
    log(f"updated {os.path.relpath(path, REPO)} between {begin} / {end}")


def cmd_report(a):
    res = a.results_dir
    if not res:
        dirs = sorted((d for d in os.listdir(RESULTS_ROOT)
                       if os.path.exists(os.path.join(RESULTS_ROOT, d, "meta.json"))),
                      key=lambda d: os.path.getmtime(os.path.join(RESULTS_ROOT, d, "meta.json")))
        if not dirs:
            raise BenchError("no results yet; run `python3 bench/bench.py run` first")
        res = os.path.join(RESULTS_ROOT, dirs[-1])
    with open(os.path.join(res, "meta.json")) as f:
        kind = json.load(f).get("kind", "fio")
    other = {"clone-time": (render_clone_time, CLONE_TIME_TITLE), "rss": (render_rss, RSS_TITLE),
             "pgbench": (render_pgbench, PG_TITLE)}
    if kind in other:
        fn, title = other[kind]
        text = fn(res)
        print(text)
        if not a.no_docs:
            update_docs(text, a.section or kind, title=title)
        return
    sections, summary, meta = render(res, a.keep_flagged)
    for key, title, text in sections:
        if len(sections) > 1:
            print(f"\n===== {key}: {title}\n")
        print(text)
    if summary:
        print("blockd_tcp / qemu_tcp (median IOPS):", "; ".join(f"{t}: {r:.2f}" for t, r, _ in summary),
              file=sys.stderr)
    if not a.no_docs:
        for key, title, text in sections:
            if getattr(a, "only", None) and key not in a.only:
                continue
            k = key if not a.section else (a.section if len(sections) == 1 else f"{a.section}-{key}")
            update_docs(text, k, title=title)


DOCS_INTRO = """# Benchmarks

Measured figures and the exact commands that produced them. Everything here is produced by
[`bench/bench.py`](../bench/README.md); each section between `<!-- bench:NAME:begin -->` and
`<!-- bench:NAME:end -->` is rewritten by `python3 bench/bench.py report`, the text outside
the markers is written by hand.

## How to read these numbers

- **Medians of interleaved repetitions.** A run prepares its data once, then repeats the
  whole matrix `--reps` times: rep 1 runs every job on every target, then rep 2, and so on,
  with the target order rotated every rep. A slow minute on the machine therefore hits every
  target instead of one. Cells are the median over the reps; the `[min–max]` range and the
  per-rep ratio ranges show how noisy the run was.
- **Compare only within one run.** The benchmark machine is a small shared VM (2 vCPUs)
  where other tenants (compilers, VMs) take CPU. Each fio run records steal time, the
  CPU used by others (total busy − server − fio), and the load average; absolute numbers
  from different runs are not comparable, ratios measured in the same run are.
- **Everything in page cache, nothing dirty at start, and checked.** These measurements
  are about the server's CPU cost per request, not the disk. Every server exports the same
  random bytes, cached after preparation. After each fio run the server is stopped and the
  file system is synced (`syncfs`) so dirty pages of a write job do not slow down the next
  run. On the benchmark VM, cached pages disappear within minutes even with 18 GiB free:
  the guest kernel runs DAMON proactive reclaim (`kdamond.0`, a `pageout` scheme for
  memory whose sampled accesses stay at most 1 per 5 s for 30 s; see `bench/README.md`),
  and random 4 KiB reads spread over 2 GiB look idle to it, so pages go even while a
  benchmark reads them. So the harness records what the *server process* read from disk
  during each run (`/proc/PID/io` `read_bytes` → `srv_disk_read_mb`). Runs that read more
  than 1 % of their data from disk are flagged `disk_reads` and left out of the medians;
  `report --keep-flagged` keeps them. In `nbd-basic`, before every rep the raw file is
  re-read with 4 KiB reads, and if that had to go to disk, the blockd volume is re-warmed
  through NBD in random order. The `cow` suite instead `mlock()`s all prepared data for
  the whole run (`--pin-cache`), which DAMON cannot page out.
- **Kernel 6.18 large-folio trap.** A file written with large writes (or read sequentially,
  via readahead) sits in the page cache in large folios, and every 4 KiB buffered random
  write then dirties a whole folio (measured 5–10× fewer IOPS). So every file is filled with
  4 KiB writes: the raw file of qemu-nbd/nbdkit by the harness, the blockd volume through
  NBD by `nbdcopy --request-size=4096`, and warmed with 4 KiB reads.
- **fio's `invalidate=1`** (the default) would evict a local file's page cache before each
  job; it does not apply to `ioengine=nbd`, which all jobs here use.
- **One fresh server per fio run**, stopped by PID afterwards; the server's CPU time comes
  from `/proc/PID/stat` (utime+stime) before and after the run, so "CPU µs/IO" is what the
  server process spent per completed request (fio and libnbd run on the same 2 vCPUs and
  take roughly one of them).
"""


# --------------------------------------------------------------------------- clone-time

CLONE_TIME_TITLE = "Snapshot and clone creation time"
CT_FIELDS = ["system", "config", "op", "rep", "ms", "stored_delta", "physical_delta", "datadir_delta",
             "file_bytes", "file_apparent", "load1"]


def ct_configs(a):
    small, big = parse_size(a.small), parse_size(a.big)
    cfgs = [("size_small", f"{hsize(small)} volume, all {hsize(small)} written"),
            ("size_big", f"{hsize(big)} volume, {hsize(parse_size(a.big_data))} written, scattered")]
    cfgs += [(f"depth_{d}", f"end of a snapshot chain of depth {d}") for d in a.depths]
    return cfgs


def cmd_clone_time(a):
    """Times snapshot and clone creation through the REST API (urllib, one HTTP call each),
    a clone through the CLI (process start included), and `qemu-img create -b` for a qcow2
    overlay, for a small and a huge volume holding data and at several chain depths;
    records the disk space each operation adds. Ops are interleaved rep by rep."""
    for b in ("qemu-img", "qemu-io"):
        if not shutil.which(b):
            raise BenchError(f"{b} missing; run `python3 bench/bench.py setup`")
    if not os.access(BLOCKD_BIN, os.X_OK):
        raise BenchError(f"{BLOCKD_BIN} not built; run `python3 bench/bench.py setup`")
    small, big, big_data = parse_size(a.small), parse_size(a.big), parse_size(a.big_data)
    depths = sorted(set(a.depths))
    a.depths = depths
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = os.path.abspath(a.out or os.path.join(RESULTS_ROOT, stamp + "-clone-time"))
    os.makedirs(os.path.join(res, "logs"), exist_ok=True)
    work = Work(a.work_dir, 0, os.path.join(res, "logs"))
    leftover = [p for p in work._pids() if pid_alive(int(p))]
    if leftover:
        raise BenchError(f"servers from an earlier run are still alive ({', '.join(leftover)}); "
                         f"run `python3 bench/bench.py clean` first")
    root = os.path.join(work.root, "clone-time")
    if os.path.exists(root):
        shutil.rmtree(root)
    ddir, qdir = os.path.join(root, "blockd-data"), os.path.join(root, "qcow2")
    os.makedirs(qdir)
    meta = {
        "kind": "clone-time",
        "command": "python3 " + " ".join(shlex.quote(x) for x in
                                         [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
        "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "ops": a.ops, "small": hsize(small), "big": hsize(big), "big_data": hsize(big_data),
        "depths": depths, "writes_per_layer": a.layer_writes,
        "configs": dict(ct_configs(a)),
        "machine": machine_facts(work.root),
        "load_at_start": open("/proc/loadavg").read().split()[:3],
        "prep": {},
    }
    prep = meta["prep"]
    rows, build = [], []
    t_start = time.time()
    rng = random.Random(a.seed)

    def small_writes(vol_size, pat):
        return [f"write -q -P {pat} {rng.randrange(vol_size // CHUNK) * CHUNK} 4k" for _ in range(a.layer_writes)]

    try:
        srv = start_blockd(work, "clone-time", data_dir=ddir)
        api, nbd = srv.api, srv.nbd
        meta["server"] = " ".join(srv.cmd)

        def df():
            d, _ = api_ok(api, "GET", "/v1/df")
            return d

        def timed_api(cfg, op, rep, method, path, body):
            d0, u0 = df(), dir_allocated_bytes(ddir)
            _, secs = api_ok(api, method, path, body)
            d1, u1 = df(), dir_allocated_bytes(ddir)
            rows.append({"system": "blockd", "config": cfg, "op": op, "rep": rep, "ms": round(secs * 1e3, 3),
                         "stored_delta": d1["stored_bytes"] - d0["stored_bytes"],
                         "physical_delta": d1["physical_bytes"] - d0["physical_bytes"],
                         "datadir_delta": u1 - u0, "load1": loadavg()})

        def timed_cli(cfg, rep, snap, name):
            u0 = dir_allocated_bytes(ddir)
            t0 = time.perf_counter()
            subprocess.run([BLOCKD_BIN, "--api", api, "volume", "clone", snap, name], check=True,
                           stdout=subprocess.DEVNULL)
            secs = time.perf_counter() - t0
            rows.append({"system": "blockd", "config": cfg, "op": "clone_cli", "rep": rep,
                         "ms": round(secs * 1e3, 3), "datadir_delta": dir_allocated_bytes(ddir) - u0,
                         "load1": loadavg()})

        probe_dir = os.path.join(root, "fs-probe")
        os.makedirs(probe_dir)

        def timed_fs_probe(cfg, rep):
            """What one catalog update costs on this file system, without blockd: write a
            file as big as the catalog to a temporary name, fsync it, rename it over the old
            one, fsync the directory (the sequence of fsutil::write_atomic)."""
            cat = os.path.join(ddir, "catalog")
            n = os.stat(cat).st_size if os.path.exists(cat) else 4096
            data, tmp = os.urandom(n), os.path.join(probe_dir, ".catalog.tmp")
            t0 = time.perf_counter()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(probe_dir, "catalog"))
            dfd = os.open(probe_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            rows.append({"system": "fs", "config": cfg, "op": "atomic_replace", "rep": rep,
                         "ms": round((time.perf_counter() - t0) * 1e3, 3), "file_bytes": n, "load1": loadavg()})

        def timed_qemu_img(cfg, rep, backing, fmt):
            ov = os.path.join(qdir, f"ov-{cfg}-{rep}.qcow2")
            t0 = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, ov], check=True)
            secs = time.perf_counter() - t0
            st = os.stat(ov)
            rows.append({"system": "qcow2", "config": cfg, "op": "qemu_img_create", "rep": rep,
                         "ms": round(secs * 1e3, 3), "file_bytes": st.st_blocks * 512,
                         "file_apparent": st.st_size, "load1": loadavg()})
            os.unlink(ov)
            return secs

        # ---- volumes holding data (written through NBD), and raw bases for qemu-img
        api_ok(api, "POST", "/v1/volumes", {"name": "small", "size": small})
        api_ok(api, "POST", "/v1/volumes", {"name": "big", "size": big})
        t0 = time.time()
        mib = 1 << 20
        qemu_io(f"nbd://{nbd}/small", "raw", [f"write -q -P 97 {o} {mib}" for o in range(0, small, mib)])
        prep["fill_small_s"] = round(time.time() - t0, 1)
        chunk = 64 << 10
        n = big_data // chunk
        stride = (big // n) // CHUNK * CHUNK
        big_offs = [i * stride for i in range(n)]
        t0 = time.time()
        for k in range(0, n, 2048):     # keep each qemu-io command line well under ARG_MAX
            qemu_io(f"nbd://{nbd}/big", "raw", [f"write -q -P 98 {o} {chunk}" for o in big_offs[k:k + 2048]])
        prep["fill_big_s"] = round(time.time() - t0, 1)
        prep["big_layout"] = f"{n} writes of {chunk // 1024} KiB, one every {hsize(stride)}"
        prep["df_after_fill"] = df()
        base_small, base_big = os.path.join(qdir, "base-small.raw"), os.path.join(qdir, "base-big.raw")
        with open(base_small, "wb") as f:
            for _ in range(small // mib):
                f.write(b"a" * mib)
        with open(base_big, "wb") as f:
            f.truncate(big)
            for o in big_offs:
                f.seek(o)
                f.write(b"b" * chunk)
        syncfs(root)

        # ---- chains of the largest depth, on top of the small volume
        maxd = max(depths) if depths else 0
        t0 = time.time()
        api_ok(api, "POST", "/v1/snapshots", {"name": "small@c0"})
        prev, qprev, qfmt = "small@c0", base_small, "raw"
        for i in range(1, maxd + 1):
            _, tc = api_ok(api, "POST", "/v1/volumes", {"name": f"l{i}", "from": prev})
            qemu_io(f"nbd://{nbd}/l{i}", "raw", small_writes(small, i % 256))
            _, ts = api_ok(api, "POST", "/v1/snapshots", {"name": f"l{i}@s"})
            layer = os.path.join(qdir, f"l{i}.qcow2")
            q0 = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", qprev, "-F", qfmt, layer], check=True)
            tq = time.perf_counter() - q0
            qemu_io(layer, "qcow2", small_writes(small, i % 256))
            build.append([i, round(tc * 1e3, 3), round(ts * 1e3, 3), round(tq * 1e3, 3)])
            prev, qprev, qfmt = f"l{i}@s", layer, "qcow2"
        prep["chain_build_s"] = round(time.time() - t0, 1)
        prep["chain_build_ms"] = build      # [depth, blockd clone, blockd snapshot, qemu-img create]
        prep["df_after_chain"] = df()
        syncfs(root)
        log(f"clone-time: volumes filled, chains of depth {maxd} built; measuring {a.ops} ops per case")

        # ---- the measurement, interleaved: every rep does every case once
        s0 = cpu_snapshot()
        for rep in range(1, a.ops + 1):
            for vol, cfg, back in (("small", "size_small", base_small), ("big", "size_big", base_big)):
                qemu_io(f"nbd://{nbd}/{vol}", "raw", small_writes(small, rep % 256))
                timed_api(cfg, "snapshot", rep, "POST", "/v1/snapshots", {"name": f"{vol}@s{rep}"})
                timed_api(cfg, "clone", rep, "POST", "/v1/volumes", {"name": f"{vol}-c{rep}", "from": f"{vol}@s{rep}"})
                timed_cli(cfg, rep, f"{vol}@s{rep}", f"{vol}-cli{rep}")
                timed_qemu_img(cfg, rep, back, "raw")
                timed_fs_probe(cfg, rep)
            for d in depths:
                cfg, name = f"depth_{d}", f"d{d}c{rep}"
                timed_api(cfg, "clone", rep, "POST", "/v1/volumes", {"name": name, "from": f"l{d}@s"})
                timed_cli(cfg, rep, f"l{d}@s", f"d{d}cli{rep}")
                qemu_io(f"nbd://{nbd}/{name}", "raw", small_writes(small, rep % 256))
                timed_api(cfg, "snapshot", rep, "POST", "/v1/snapshots", {"name": f"{name}@s"})
                timed_qemu_img(cfg, rep, os.path.join(qdir, f"l{d}.qcow2"), "qcow2")
                timed_fs_probe(cfg, rep)
        s1 = cpu_snapshot()
        steal, busy = cpu_delta(s0, s1)
        meta["conditions"] = {"steal_pct": round(steal, 1), "busy_pct": round(busy, 1)}
        prep["df_end"] = df()
        prep["datadir_bytes_end"] = dir_allocated_bytes(ddir)
        cat = os.path.join(ddir, "catalog")
        prep["catalog_bytes_end"] = os.stat(cat).st_size if os.path.exists(cat) else None
    finally:
        work.stop_all()
        meta["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        meta["wall_s"] = round(time.time() - t_start)
        with open(os.path.join(res, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(res, "clone_time.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CT_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        if os.path.exists(root):
            shutil.rmtree(root)
    text = render_clone_time(res)
    print(text)
    if a.report:
        update_docs(text, "clone-time", title=CLONE_TIME_TITLE)
    shown = os.path.relpath(res, REPO) if res.startswith(REPO + os.sep) else res
    log(f"clone-time done in {time.time() - t_start:.0f} s -> {shown}")
    return res


def _ms_cell(v, limit=None):
    if not v:
        return "–"
    v = sorted(v)
    m = statistics.median(v)
    mark = "" if limit is None else (" ✓" if m < limit else " ✗")
    return f"{m:.1f} [{v[0]:.1f}–{v[-1]:.1f}]{mark}"


def _bytes(v):
    if v is None:
        return "–"
    v = int(v)
    a = abs(v)
    if a >= 1 << 20:
        return f"{v / (1 << 20):.1f} MiB"
    if a >= 1 << 10:
        return f"{v / (1 << 10):.1f} KiB"
    return f"{v} B"


def render_clone_time(res, limit_ms=10.0):
    with open(os.path.join(res, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(res, "clone_time.csv")) as f:
        rows = list(csv.DictReader(f))
    p, m = meta.get("prep", {}), meta["machine"]
    L = []
    w = L.append

    def sel(cfg, op, key="ms"):
        return [float(r[key]) for r in rows if r["config"] == cfg and r["op"] == op and r.get(key) not in ("", None)]

    w(f"Run `{os.path.basename(res)}`: {meta['started_utc']} – {meta.get('finished_utc', '?')} "
      f"({meta.get('wall_s', '?')} s), {meta['ops']} operations per case, interleaved (every rep does "
      f"every case once).\n")
    w("```")
    w(meta["command"])
    w(meta.get("server", ""))
    w("```\n")
    w("Machine and versions:\n")
    w("```")
    for k in ("kernel", "cpu", "mem", "fs", "qemu-nbd", "blockd", "tree"):
        w(f"{k}: {m.get(k, '?')}")
    w("```\n")
    loads = sorted(float(r["load1"]) for r in rows if r.get("load1"))
    c = meta.get("conditions", {})
    if loads:
        w(f"Conditions during the measurement: load1 {statistics.median(loads):.2f} "
          f"[{loads[0]:.2f}–{loads[-1]:.2f}], steal {c.get('steal_pct', '?')} %, CPU busy (without steal) "
          f"{c.get('busy_pct', '?')} % of {os.cpu_count()} vCPUs.\n")
    w(f"How: one blockd daemon on a fresh data dir (same file system as the benchmark work dir). "
      f"`small` is a {meta['small']} volume written in full through NBD (qemu-io, 1 MiB writes, "
      f"{p.get('fill_small_s', '?')} s); `big` is a {meta['big']} volume holding {meta['big_data']} "
      f"({p.get('big_layout', '?')}; {p.get('fill_big_s', '?')} s). The chain is built on `small`: "
      f"`small@c0` ← clone `l1` + {meta['writes_per_layer']} random 4 KiB writes ← snapshot `l1@s` ← "
      f"clone `l2` ... up to depth {max(meta['depths']) if meta['depths'] else 0} "
      f"({p.get('chain_build_s', '?')} s); the qcow2 chain alongside it: base-small.raw ← l1.qcow2 "
      f"(the same number of writes, qemu-io) ← .... Every rep then, per case: "
      f"**size cases**: {meta['writes_per_layer']} 4 KiB writes to the volume through NBD (qemu-io, "
      f"which flushes), `POST /v1/snapshots {{\"name\": \"VOL@sN\"}}` (timed), `POST /v1/volumes "
      f"{{\"name\": ..., \"from\": \"VOL@sN\"}}` (timed), `blockd volume clone VOL@sN NAME` (timed, "
      f"process start included), `qemu-img create -q -f qcow2 -b BASE.raw -F raw OV` (timed); "
      f"**depth d**: clone `l<d>@s` via the API and via the CLI (timed), "
      f"{meta['writes_per_layer']} writes to the API clone, snapshot it (timed), "
      f"`qemu-img create -q -f qcow2 -b l<d>.qcow2 -F qcow2 OV` (timed). API times are the whole "
      f"urllib call (new TCP connection, request, server work, response) measured in Python.\n")
    w(f"Median [min–max] in ms over {meta['ops']} operations; ✓ = median under {limit_ms:.0f} ms "
      f"(the target for blockd snapshot and clone creation). Every blockd snapshot or clone is one "
      f"catalog change: since store format 2, one record written into the preallocated "
      f"`catalog.log` and one fdatasync (a snapshot first seals the volume's active segment: "
      f"fdatasync of .dat if it holds unflushed writes, write and fdatasync of .idx). The fs probe "
      f"(Python, no blockd) does what a catalog change cost in format 1, for comparison on the same "
      f"disk at the same moment: write a file as big as the catalog file under a temporary name, "
      f"fsync, rename, fsync the directory.\n")
    probe = any(r["op"] == "atomic_replace" for r in rows)
    w("| case | blockd snapshot (REST) | blockd clone (REST) | blockd clone (CLI, incl. process start) "
      "| qemu-img create -b (qcow2 overlay) |" + (" fs probe: one catalog-sized atomic replace |" if probe else "")
      + " target < 10 ms |")
    w("|---|---|---|---|---|" + ("---|" if probe else "") + "---|")
    for cfg, title in meta["configs"].items():
        sn, cl = sel(cfg, "snapshot"), sel(cfg, "clone")
        ok = sn and cl and statistics.median(sn) < limit_ms and statistics.median(cl) < limit_ms
        w(f"| {title} | {_ms_cell(sn, limit_ms)} | {_ms_cell(cl, limit_ms)} | {_ms_cell(sel(cfg, 'clone_cli'))} "
          f"| {_ms_cell(sel(cfg, 'qemu_img_create'))} |" + (f" {_ms_cell(sel(cfg, 'atomic_replace'))} |" if probe else "")
          + f" {'**met**' if ok else '**not met**'} |")
    w("")
    w("Space each operation added, median over the operations (blockd: `GET /v1/df` "
      "`stored_bytes` / `physical_bytes` and the allocated size of the whole data dir, i.e. "
      "segment files and the catalog, before and after the call; the data dir grows in 4 KiB "
      "file-system blocks, so the mean is shown too; qcow2: the new overlay file, allocated / "
      "apparent size):\n")
    w("| case | blockd snapshot: stored / physical / data dir median (mean) | blockd clone: stored / "
      "physical / data dir median (mean) | qcow2 overlay: allocated / apparent |")
    w("|---|---|---|---|")

    def space(cfg, op):
        st, ph, dd = sel(cfg, op, "stored_delta"), sel(cfg, op, "physical_delta"), sel(cfg, op, "datadir_delta")
        if not dd:
            return "–"
        return (f"{_bytes(statistics.median(st))} / {_bytes(statistics.median(ph))} / "
                f"{_bytes(statistics.median(dd))} ({_bytes(statistics.mean(dd))})")
    for cfg, title in meta["configs"].items():
        fb, fa = sel(cfg, "qemu_img_create", "file_bytes"), sel(cfg, "qemu_img_create", "file_apparent")
        w(f"| {title} | {space(cfg, 'snapshot')} | {space(cfg, 'clone')} | "
          f"{_bytes(statistics.median(fb)) if fb else '–'} / {_bytes(statistics.median(fa)) if fa else '–'} |")
    w("")
    b = p.get("chain_build_ms") or []
    if b:
        buckets = [(1, 1), (2, 10), (11, 50), (51, 100), (101, 10 ** 9)]
        w("While building the chain (one operation per depth; median [min–max] ms per range of depths):\n")
        w("| depths | blockd clone (REST) | blockd snapshot (REST) | qemu-img create -b |")
        w("|---|---|---|---|")
        for lo, hi in buckets:
            part = [x for x in b if lo <= x[0] <= hi]
            if part:
                w(f"| {lo}–{min(hi, b[-1][0])} | {_ms_cell([x[1] for x in part])} | "
                  f"{_ms_cell([x[2] for x in part])} | {_ms_cell([x[3] for x in part])} |")
        w("")
    de = p.get("df_end") or {}
    if de:
        w(f"Store at the end: {de.get('volumes')} volumes, {de.get('snapshots')} snapshots, "
          f"{de.get('segments')} segments, stored {_bytes(de.get('stored_bytes'))}, physical "
          f"{_bytes(de.get('physical_bytes'))}, data dir {_bytes(p.get('datadir_bytes_end'))}, catalog "
          f"{_bytes(p.get('catalog_bytes_end'))} (rewritten in full at start-up and when the 1 MiB "
          f"catalog log is full; in between, each change is a log record).\n")
    return "\n".join(L)


# --------------------------------------------------------------------------- rss: memory per idle clone

def nbd_connect_idle(addr, export, timeout=10.0):
    """Open an NBD connection to `export` (fixed newstyle, NBD_OPT_EXPORT_NAME) and return
    the socket, left idle in transmission phase."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)

    def recv(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise BenchError(f"NBD server closed the connection during the handshake ({export})")
            b += c
        return b
    try:
        hello = recv(18)
        if hello[:16] != b"NBDMAGICIHAVEOPT":
            raise BenchError(f"not a newstyle NBD server at {addr}")
        sflags = int.from_bytes(hello[16:18], "big")
        no_zeroes = bool(sflags & 2)
        s.sendall((1 | (2 if no_zeroes else 0)).to_bytes(4, "big"))
        name = export.encode()
        s.sendall(b"IHAVEOPT" + (1).to_bytes(4, "big") + len(name).to_bytes(4, "big") + name)
        recv(10 + (0 if no_zeroes else 124))
    except BaseException:
        s.close()
        raise
    return s


def sample_rss(pid, secs, every=0.1):
    """Highest VmRSS (kB) seen over `secs` while something else runs."""
    hi, t_end = 0, time.time() + secs
    while time.time() < t_end:
        hi = max(hi, proc_status_kb(pid, "VmRSS").get("VmRSS", 0))
        time.sleep(every)
    return hi


def start_results(a, kind, size):
    """Results dir, work dir and the common meta.json fields of a non-fio measurement."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = os.path.abspath(a.out or os.path.join(RESULTS_ROOT, f"{stamp}-{kind}"))
    os.makedirs(os.path.join(res, "logs"), exist_ok=True)
    work = Work(a.work_dir, size, os.path.join(res, "logs"))
    work.blockd_engine = a.blockd_engine
    meta = {"kind": kind, "command": "python3 " + " ".join(shlex.quote(x) for x in
            [os.path.relpath(os.path.abspath(sys.argv[0]), REPO), *sys.argv[1:]]),
            "started_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "size": human(size), "blockd_engine": a.blockd_engine, "machine": machine_facts(work.root)}
    return res, work, meta


def finish_results(res, work, meta, render, title, a):
    work.stop_all()
    meta["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    meta["prep"] = work.facts
    with open(os.path.join(res, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"{meta['kind']} results -> {res}")
    if a.report and os.path.exists(os.path.join(res, "meta.json")):
        update_docs(render(res), a.section or meta["kind"], title=title)


def cmd_rss(a):
    """blockd's memory with N idle clones exported, each with one open NBD connection, and
    while one more clone is under fio load; peers' memory for one clone (one process each)."""
    apply_quick(a)
    if not os.access(BLOCKD_BIN, os.X_OK):
        raise BenchError(f"{BLOCKD_BIN} not built; run `python3 bench/bench.py setup`")
    res, work, meta = start_results(a, "rss", parse_size(a.size))
    meta.update(clones=a.clones, load_runtime_s=a.runtime, samples={})
    smp = meta["samples"]
    conns = []
    try:
        work.need(["blockd_base_snapshot", "raw"])
        srv = start_blockd(work, "rss-blockd")
        try:
            def rss(label):
                st = proc_status_kb(srv.pid, "VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads")
                smp[label] = st
                log(f"rss {label}: {st}")
                return st.get("VmRSS", 0)
            time.sleep(0.5)
            base = rss("started")
            t0 = time.time()
            for i in range(a.clones):
                api_ok(srv.api, "POST", "/v1/volumes", {"name": f"idle{i}", "from": f"{VOLUME}@base"})
            meta["create_clones_s"] = round(time.time() - t0, 2)
            time.sleep(0.5)
            made = rss("clones_no_connections")
            for i in range(a.clones):
                conns.append(nbd_connect_idle(srv.nbd, f"idle{i}"))
            time.sleep(1.0)
            idle = rss("clones_each_one_idle_connection")
            meta["per_clone_kib"] = round((idle - base) / a.clones, 1)
            meta["per_clone_no_conn_kib"] = round((made - base) / a.clones, 1)
            meta["per_connection_kib"] = round((idle - made) / a.clones, 1)
            api_ok(srv.api, "POST", "/v1/volumes", {"name": "busy", "from": f"{VOLUME}@base"})
            for job in ("rr4k_qd32", "rw4k_qd32"):
                fio = subprocess.Popen(["fio", f"--name={job}", *COMMON_FIO, f"--runtime={a.runtime}",
                                        *JOBS[job].args, "--ioengine=nbd", f"--uri=nbd://{srv.nbd}/busy",
                                        "--output", os.path.join(res, f"{job}.json")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    hi = sample_rss(srv.pid, a.runtime)
                finally:
                    fio.wait()
                smp[f"load_{job}_max_rss"] = {"VmRSS": hi}
                rss(f"after_{job}")
                log(f"rss during {job}: max {hi} kB")
        finally:
            for c in conns:
                c.close()
            work.stop(srv)
        # peers: one process per clone; its memory with one idle connection
        work.warm_job_reads = None
        peers = {}
        depths = sorted({TARGETS[t].depth for t in a.peer_targets if TARGETS[t].depth})
        if depths:
            work.chain_depths, work.chain_depth = depths, max(depths)
        for tn in a.peer_targets:
            t = TARGETS[tn]
            work.need(list(t.requires))
            s = t.start(work)
            c = None
            try:
                c = nbd_connect_idle(s.uri.split("//", 1)[1].split("/", 1)[0], QEMU_EXPORT
                                     if "qemu" in tn or "qcow2" in tn else ("x" if "nbdsrv" in tn else ""))
                time.sleep(1.0)
                kb = proc_status_kb(s.pid, "VmRSS").get("VmRSS", 0)
                kids = sum(proc_status_kb(p, "VmRSS").get("VmRSS", 0) for p in child_pids(s.pid))
                peers[tn] = {"title": t.title, "rss_kib": kb, "children_rss_kib": kids}
                log(f"rss {tn}: {kb} kB (+ children {kids} kB)")
            finally:
                if c:
                    c.close()
                work.stop(s)
        meta["peers"] = peers
    finally:
        finish_results(res, work, meta, render_rss, RSS_TITLE, a)
    return res


RSS_TITLE = "Memory: idle clones and load"


def render_rss(res):
    with open(os.path.join(res, "meta.json")) as f:
        m = json.load(f)
    s = m["samples"]
    L = [f"Run `{os.path.basename(res)}` ({m['started_utc']}), blockd `--io-engine {m.get('blockd_engine')}`, "
         f"{m['size']} volume:\n", "```", m["command"], "```\n",
         f"What \"exported\" means here: {m['clones']} clones of `bench@base` created through the REST "
         f"API (`POST /v1/volumes`, {m.get('create_clones_s')} s for all), each with **one open NBD "
         f"connection** (fixed newstyle handshake, `NBD_OPT_EXPORT_NAME`, then idle in transmission), "
         f"so every clone has its live volume object, its connection thread and its buffers, the "
         f"way a host that attached it would hold it. VmRSS of the blockd process from "
         f"/proc/PID/status:\n",
         "| state | VmRSS | RssAnon | RssFile | threads |", "|---|---|---|---|---|"]
    for k, lbl in (("started", "started, no clones"), ("clones_no_connections", f"{m['clones']} clones, no connection"),
                   ("clones_each_one_idle_connection", f"{m['clones']} clones, one idle connection each"),
                   ("after_rr4k_qd32", "after 4k randread QD32 on one more clone"),
                   ("after_rw4k_qd32", "after 4k randwrite QD32 on it")):
        v = s.get(k, {})
        L.append(f"| {lbl} | {v.get('VmRSS', '–')} KiB | {v.get('RssAnon', '–')} KiB | {v.get('RssFile', '–')} KiB | "
                 f"{v.get('Threads', '–')} |")
    for job in ("rr4k_qd32", "rw4k_qd32"):
        v = s.get(f"load_{job}_max_rss", {})
        L.append(f"| highest during `{job}` ({m['load_runtime_s']} s, {m['clones']} idle connections still open) | "
                 f"{v.get('VmRSS', '–')} KiB | | | |")
    ok = m.get("per_clone_kib") is not None and m["per_clone_kib"] < 1024
    L += ["", f"**Per idle exported clone: {m.get('per_clone_kib')} KiB** ((VmRSS with {m['clones']} connected "
          f"clones − VmRSS at start) / {m['clones']}; of which {m.get('per_clone_no_conn_kib')} KiB for the "
          f"clone itself and {m.get('per_connection_kib')} KiB for its connection). Target under 1 MiB per "
          f"idle clone: {'✓ met' if ok else '✗ missed'}.\n"]
    if m.get("peers"):
        L += ["Peers serve one clone per process; memory of one such process with one idle "
              "connection (what each further clone costs with that peer):\n",
              "| peer | VmRSS | + children |", "|---|---|---|"]
        for tn, v in m["peers"].items():
            L.append(f"| `{tn}`: {v['title']} | {v['rss_kib']} KiB | {v['children_rss_kib']} KiB |")
        L.append("")
    return "\n".join(L)


# --------------------------------------------------------------------------- pgbench on each server's export

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")


class Cleanup:
    """A stack of clean-up steps run in reverse order, every one of them even if an earlier
    one fails (umount, losetup -d, fusermount3 -u, stopping PostgreSQL and servers)."""

    def __init__(self):
        self.steps = []

    def push(self, what, fn):
        self.steps.append((what, fn))

    def run(self):
        while self.steps:
            what, fn = self.steps.pop()
            try:
                fn()
            except Exception as e:
                log(f"clean-up step failed ({what}): {e}")


def run_quiet(cmd, timeout=120, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if p.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({p.returncode}): {(p.stdout + p.stderr).strip()[-800:]}")
    return p.stdout


def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--", *cmd]


def stop_pid(pid, sig=signal.SIGINT, grace=30.0):
    """Stop a process we started (by pid) with `sig`, SIGKILL after `grace`."""
    if not pid or not pid_alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.time() + grace
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def pgbench_one(work, res, target, rep, a, cmdlog):
    """One pgbench measurement on a fresh export of `target`: nbdfuse file -> loop device ->
    ext4 -> PostgreSQL 15 data dir -> pgbench -i, then pgbench for a.runtime seconds."""
    row = {"target": target.name, "rep": rep,
           "start_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    base = os.path.join(work.root, "pg")
    if os.path.ismount(os.path.join(base, "mnt")):
        raise BenchError(f"{base}/mnt is still mounted (run `bench.py clean`)")
    if os.path.exists(base):
        shutil.rmtree(base)
    os.makedirs(base)
    disk, mnt, sockdir = os.path.join(base, "disk"), os.path.join(base, "mnt"), os.path.join(base, "sock")
    os.makedirs(mnt)
    os.makedirs(sockdir)
    shutil.chown(sockdir, "postgres", "postgres")
    open(disk, "w").close()
    cl = Cleanup()
    srv = None
    try:
        srv = target.start(work)
        cl.push("stop server", lambda: work.stop(srv))
        fuse = subprocess.Popen(["nbdfuse", disk, srv.uri], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(res, "nbdfuse.log"), "a"),
                                start_new_session=True)
        work.register_pid(fuse.pid, ["nbdfuse", disk, srv.uri])

        def stop_fuse():
            if os.path.ismount(disk):
                subprocess.run(["fusermount3", "-u", disk], capture_output=True)
            try:
                fuse.wait(timeout=15)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
            work.unregister_pid(fuse.pid)
        cl.push("fusermount3 -u", stop_fuse)
        deadline = time.time() + 20
        while os.path.getsize(disk) != work.size:
            if fuse.poll() is not None or time.time() > deadline:
                raise BenchError(f"nbdfuse did not expose {srv.uri} as {disk}")
            time.sleep(0.02)
        loopdev = run_quiet(["losetup", "-f", "--show", disk]).strip()
        cl.push("losetup -d", lambda: run_quiet(["losetup", "-d", loopdev]))
        run_quiet(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", loopdev],
                  timeout=300)
        run_quiet(["mount", loopdev, mnt])
        cl.push("umount", lambda: run_quiet(["umount", mnt], timeout=120))
        pgdata = os.path.join(mnt, "pgdata")
        os.makedirs(pgdata)
        shutil.chown(pgdata, "postgres", "postgres")
        os.chmod(pgdata, 0o700)
        run_quiet(as_postgres([f"{PG_BIN}/initdb", "-D", pgdata, "-U", "postgres", "-A", "trust", "--no-sync"]),
                  timeout=300)
        port = free_port()
        opts = (f"-k {sockdir} -p {port} -c listen_addresses='' -c shared_buffers=128MB "
                f"-c max_wal_size=1GB -c checkpoint_timeout=30min")
        logf = os.path.join(base, "postgres.log")
        open(logf, "w").close()
        shutil.chown(logf, "postgres", "postgres")
        run_quiet(as_postgres([f"{PG_BIN}/pg_ctl", "start", "-D", pgdata, "-w", "-t", "60", "-l", logf,
                               "-o", opts]), timeout=90)
        with open(os.path.join(pgdata, "postmaster.pid")) as f:
            pg_pid = int(f.readline().strip())
        cl.push("stop postgres", lambda: stop_pid(pg_pid, signal.SIGINT))   # SIGINT = fast shutdown
        conn = ["-h", sockdir, "-p", str(port), "-U", "postgres"]
        t0 = time.time()
        run_quiet(as_postgres(["pgbench", "-i", "-q", "-s", str(a.scale), *conn, "postgres"]), timeout=900)
        row["init_s"] = round(time.time() - t0, 1)
        run_quiet(as_postgres(["psql", "-q", *conn, "-c", "CHECKPOINT", "postgres"]), timeout=300)
        cmd = ["pgbench", "-c", str(a.clients), "-j", str(a.threads), "-T", str(a.runtime), "-n", *conn, "postgres"]
        if rep == 1:
            cmdlog.write(f"## {target.name}\nserver: {' '.join(srv.cmd)}\nnbdfuse {disk} {srv.uri}; losetup; "
                         f"mkfs.ext4; mount; initdb; pg_ctl start -o \"{opts}\"\n"
                         f"pgbench -i -q -s {a.scale}\n{' '.join(cmd)}\n")
            cmdlog.flush()
        c0, s0, t0 = srv.cpu_seconds(), cpu_snapshot(), time.time()
        out = run_quiet(as_postgres(cmd), timeout=a.runtime * 3 + 60)
        t1, s1 = time.time(), cpu_snapshot()
        c1 = srv.cpu_seconds()
        with open(os.path.join(res, f"pgbench-{target.name}.r{rep}.txt"), "w") as f:
            f.write(out)
        for line in out.splitlines():
            if line.startswith("tps = "):
                row["tps"] = round(float(line.split()[2]), 1)
            elif line.startswith("latency average = "):
                row["lat_avg_ms"] = float(line.split()[3])
            elif line.startswith("number of transactions actually processed"):
                row["xacts"] = int(line.split(":")[1].split("/")[0])
        steal, busy = cpu_delta(s0, s1)
        row.update(steal_pct=round(steal, 1), busy_pct=round(busy, 1), load1=loadavg())
        if c0 is not None and c1 is not None:
            row["srv_cpu_s"] = round(c1 - c0, 2)
            if row.get("xacts"):
                row["cpu_ms_per_xact"] = round((c1 - c0) * 1e3 / row["xacts"], 3)
        row["status"] = "ok" if "tps" in row else "no_tps"
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        row["status"] = "failed"
        log(f"pgbench {target.name} r{rep}: FAILED: {e}")
    finally:
        cl.run()
        if os.path.ismount(mnt) or os.path.ismount(disk):
            log(f"WARNING: {mnt} or {disk} still mounted after clean-up")
        syncfs(work.root)
    log(f"pgbench {target.name:14s} r{rep}: {row.get('status')} tps={row.get('tps', '-')} "
        f"lat={row.get('lat_avg_ms', '-')}ms cpu/xact={row.get('cpu_ms_per_xact', '-')}ms load={row.get('load1', '-')}")
    return row


PG_FIELDS = ["target", "rep", "start_utc", "status", "tps", "lat_avg_ms", "xacts", "init_s", "srv_cpu_s",
             "cpu_ms_per_xact", "steal_pct", "busy_pct", "load1"]
PG_TARGETS = ["blockd_clone", "qemu_tcp", "nbdkit_tcp", "nbdsrv_tcp", "qcow2_d1", "nbdkit_cow_tcp"]


def cmd_pgbench(a):
    apply_quick(a)
    if a.quick:
        a.scale = min(a.scale, 5)
    for b in ("nbdfuse", "losetup", "mkfs.ext4", "fusermount3", "pgbench", "psql", "runuser"):
        if not shutil.which(b):
            raise BenchError(f"{b} missing; run `python3 bench/bench.py setup`")
    if not os.path.exists(f"{PG_BIN}/initdb"):
        raise BenchError(f"PostgreSQL 15 not found in {PG_BIN}; run `python3 bench/bench.py setup`")
    res, work, meta = start_results(a, "pgbench", parse_size(a.size))
    work.warm_job_reads = None
    targets = a.targets or PG_TARGETS
    meta.update(reps=a.reps, runtime_s=a.runtime, scale=a.scale, clients=a.clients, threads=a.threads,
                targets=targets, target_titles={t: TARGETS[t].title for t in targets})
    rows = []
    try:
        needed = []
        for t in targets:
            needed += [r for r in TARGETS[t].requires if r not in needed]
        if any(getattr(TARGETS[t], "depth", 0) for t in targets):
            work.chain_depths = sorted({TARGETS[t].depth for t in targets if TARGETS[t].depth})
            work.chain_depth = max(work.chain_depths)
        work.need(needed)
        syncfs(work.root)
        with open(os.path.join(res, "pgbench.csv"), "w", newline="") as f, \
                open(os.path.join(res, "commands.log"), "w") as cmdlog:
            wr = csv.DictWriter(f, fieldnames=PG_FIELDS, extrasaction="ignore")
            wr.writeheader()
            for rep in range(1, a.reps + 1):
                k = (rep - 1) % len(targets)
                for tn in targets[k:] + targets[:k]:
                    r = pgbench_one(work, res, TARGETS[tn], rep, a, cmdlog)
                    rows.append(r)
                    wr.writerow(r)
                    f.flush()
    finally:
        finish_results(res, work, meta, render_pgbench, PG_TITLE, a)
    return res


PG_TITLE = "PostgreSQL pgbench on each server's export"


def render_pgbench(res):
    with open(os.path.join(res, "meta.json")) as f:
        m = json.load(f)
    with open(os.path.join(res, "pgbench.csv")) as f:
        allrows = list(csv.DictReader(f))
    ok = {}
    for r in allrows:
        if r["status"] == "ok":
            ok.setdefault(r["target"], []).append(r)
    L = [f"Run `{os.path.basename(res)}`: {m['started_utc']} – {m.get('finished_utc', '?')}, {m['reps']} reps "
         f"(interleaved, order rotated), {m['size']} export, blockd `--io-engine {m.get('blockd_engine')}`.\n",
         "```", m["command"], "```\n",
         f"Per run: a fresh export (blockd: fresh clone of `bench@base`; qcow2: fresh overlay; nbdkit cow: "
         f"empty overlay; raw-file servers: the raw file) → `nbdfuse` file → loop device → `mkfs.ext4` → "
         f"PostgreSQL 15 data directory (`initdb`, shared_buffers=128MB, fsync on, Unix socket only) → "
         f"`pgbench -i -s {m['scale']}`, `CHECKPOINT`, then `pgbench -c {m['clients']} -j {m['threads']} "
         f"-T {m['runtime_s']} -n` (TPC-B-like). Every fsync of PostgreSQL reaches the server as an NBD "
         f"FLUSH through nbdfuse. Server CPU per transaction is utime+stime of the server process over the "
         f"timed pgbench run. Everything is unmounted, detached and stopped after each run.\n",
         "| target | n | TPS median [min–max] | latency avg ms | server CPU ms/xact | vs best peer |",
         "|---|---|---|---|---|---|"]
    meds = {t: med(rs, "tps") for t, rs in ok.items()}
    peers = [t for t in meds if TARGETS.get(t) and TARGETS[t].role == "peer"]
    best = max(peers, key=lambda t: meds[t]) if peers else None
    for t in m["targets"]:
        rs = ok.get(t, [])
        if not rs:
            L.append(f"| `{t}` | 0 | – | – | – | – |")
            continue
        tps = [float(r["tps"]) for r in rs]
        ratio = "best peer" if t == best else (f"**{meds[t] / meds[best]:.2f}** `{best}`" if best else "–")
        L.append(f"| `{t}` | {len(rs)} | {meds[t]:.0f} [{min(tps):.0f}–{max(tps):.0f}] | "
                 f"{fmt(med(rs, 'lat_avg_ms'), 2)} | {fmt(med(rs, 'cpu_ms_per_xact'), 3)} | {ratio} |")
    L.append("")
    bad = [r for r in allrows if r["status"] != "ok"]
    if bad:
        L.append("Runs left out: " + ", ".join(f"{r['target']}/r{r['rep']}: {r['status']}" for r in bad) + "\n")
    return "\n".join(L)


# --------------------------------------------------------------------------- setup / clean / list

APT = {"fio": "fio", "qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "nbdkit": "nbdkit",
       "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdfuse": "libnbd-bin", "nbd-server": "nbd-server",
       "fusermount3": "fuse3", "mkfs.ext4": "e2fsprogs", "losetup": "mount", "pgbench": "postgresql-client-15",
       "psql": "postgresql-client-15", f"{PG_BIN}/initdb": "postgresql-15", "perf": "linux-perf"}


def cmd_setup(a):
    need = sorted({pkg for b, pkg in APT.items()
                   if not (os.access(b, os.X_OK) if b.startswith("/") else shutil.which(b))})
    if need:
        if os.geteuid() != 0:
            raise BenchError(f"missing packages {need}; run setup as root")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run_cmd(["apt-get", "update"], env=env)
        run_cmd(["apt-get", "install", "-y", *need], env=env)
    else:
        log("tools present: " + ", ".join(sorted(APT)))
    if not shutil.which("cargo"):
        raise BenchError("cargo not found (install Rust with rustup)")
    run_cmd(["cargo", "build", "--release", "-p", "blockd"], cwd=REPO)
    log(f"blockd: {out_of([BLOCKD_BIN, '--version'])}")


def cmd_clean(a):
    root = a.work_dir
    pf = os.path.join(root, "servers.json")
    try:
        with open(pf) as f:
            pids = json.load(f)
    except (OSError, ValueError):
        pids = {}
    for p, info in pids.items():
        pid = int(p)
        if pid_alive(pid) and proc_start_time(pid) == info.get("start"):
            log(f"stopping leftover server pid {pid}: {' '.join(info['cmd'][:3])} ...")
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not pid_alive(pid):
                    break
                time.sleep(0.1)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    clean_mounts(root)
    if os.path.isdir(root):
        shutil.rmtree(root)
        log(f"removed {root}")


def clean_mounts(root):
    """Undo what a killed pgbench run may have left under `root`: PostgreSQL (stopped by the
    pid in its postmaster.pid), the ext4 mount, loop devices over files under `root`, and
    nbdfuse mounts (fusermount3 -u)."""
    root = os.path.abspath(root)
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            dev, mp, fstype = line.split()[:3]
            mp = mp.replace("\\040", " ")
            if mp == root or mp.startswith(root + os.sep):
                mounts.append((dev, mp, fstype))
    for dev, mp, fstype in sorted(mounts, key=lambda m: -len(m[1])):
        if not fstype.startswith("fuse"):
            pidf = os.path.join(mp, "pgdata", "postmaster.pid")
            try:
                with open(pidf) as f:
                    pid = int(f.readline())
                log(f"stopping leftover PostgreSQL pid {pid}")
                stop_pid(pid, signal.SIGINT)
            except (OSError, ValueError):
                pass
            log(f"umount {mp}")
            subprocess.run(["umount", mp], check=False)
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[1].strip().startswith(root + os.sep):
            log(f"losetup -d {parts[0]} ({parts[1].strip()})")
            subprocess.run(["losetup", "-d", parts[0]], check=False)
    for dev, mp, fstype in mounts:
        if fstype.startswith("fuse"):
            log(f"fusermount3 -u {mp}")
            subprocess.run(["fusermount3", "-u", mp], check=False)


def cmd_list(a):
    for s in SUITES.values():
        print(f"suite {s.name}: {s.title}\n  targets: {' '.join(s.targets)}\n  jobs: {' '.join(s.jobs)}")
    print("\ntargets:")
    for t in TARGETS.values():
        print(f"  {t.name:14s} {t.title}  (needs: {', '.join(t.requires)})")
    print("\njobs (fio " + " ".join(COMMON_FIO) + " --runtime=N):")
    for j in JOBS.values():
        print(f"  {j.name:18s} {j.title:28s} {' '.join(j.args)}")


# --------------------------------------------------------------------------- main

def cmd_all(a):
    """One command on a clean machine: install the peers and tools, build blockd, run the
    peers suite, pgbench and the memory measurement, and write their sections of
    docs/BENCHMARKS.md."""
    if "setup" not in a.skip:
        cmd_setup(a)
    ns = argparse.Namespace
    common = dict(work_dir=a.work_dir, quick=a.quick, blockd_engine=a.blockd_engine, out=None, section=None)
    if "peers" not in a.skip:
        res = cmd_run(ns(suite="peers", reps=a.reps, runtime=a.runtime, size=a.size, targets=a.targets,
                         jobs=a.jobs, pause=2.0, report=False, chain_seed=1, pin_cache=None,
                         **{k: v for k, v in common.items() if k != "section"}))
        cmd_report(ns(results_dir=res, no_docs=a.no_docs, section=None, keep_flagged=False))
    if "pgbench" not in a.skip:
        cmd_pgbench(ns(targets=None, reps=a.reps, runtime=30, size=a.size, scale=20, clients=4, threads=2,
                       pause=1.0, report=not a.no_docs, **common))
    if "rss" not in a.skip:
        cmd_rss(ns(clones=100, size=a.size, runtime=10, peer_targets=["qcow2_d1", "nbdkit_cow_tcp", "nbdsrv_cow_tcp"],
                   report=not a.no_docs, **common))


def apply_quick(a):
    if getattr(a, "quick", False):
        a.reps, a.runtime, a.size, a.pause = 1, 3, "256M", 0.5


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=DEFAULT_WORK, help="scratch dir, reused across runs (default %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install fio, qemu-utils, nbdkit, libnbd-bin if missing; build blockd")
    r = sub.add_parser("run", help="prepare data, run the matrix, save fio JSON + results.csv")
    r.add_argument("--suite", default="nbd-basic", choices=sorted(SUITES))
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    r.add_argument("--size", default="4G", help="size of every exported image (e.g. 2G)")
    r.add_argument("--targets", nargs="+", help="subset/order of targets (default: the suite's)")
    r.add_argument("--jobs", nargs="+", help="subset/order of jobs (default: the suite's)")
    r.add_argument("--pause", type=float, default=2.0, help="seconds between fio runs after sync")
    r.add_argument("--out", help="results dir (default bench/results/<UTC timestamp>)")
    r.add_argument("--report", action="store_true", help="run `report` (and update the docs) at the end")
    r.add_argument("--chain-seed", type=int, default=1, help="seed of the chain layers' write offsets")
    r.add_argument("--blockd-engine", default="sync", choices=["sync", "uring"],
                   help="`blockd serve --io-engine` for blockd targets that do not name one")
    r.add_argument("--quick", action="store_true",
                   help="smoke test: 1 rep, 3 s per fio run, 256M volume, 0.5 s pause (overrides "
                        "--reps/--runtime/--size/--pause)")
    r.add_argument("--pin-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="mlock the prepared data in the page cache for the whole run (default: the "
                        "suite's; on for cow)")
    p = sub.add_parser("report", help="median tables; updates docs/BENCHMARKS.md")
    p.add_argument("results_dir", nargs="?", help="default: newest dir under bench/results")
    p.add_argument("--no-docs", action="store_true", help="only print, leave docs/BENCHMARKS.md alone")
    p.add_argument("--section", help="marker key in docs/BENCHMARKS.md (default: the run's suite)")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="write only these sections of a multi-section run (e.g. peers-chains engines)")
    p.add_argument("--keep-flagged", action="store_true",
                   help="count runs flagged disk_reads/cache_dropped in the medians (listed below the tables)")
    c = sub.add_parser("clone-time", help="time snapshot/clone creation (REST, CLI) and qemu-img create -b")
    c.add_argument("--ops", type=int, default=15, help="operations per case (default %(default)s)")
    c.add_argument("--small", default="1G", help="size of the small volume, written in full")
    c.add_argument("--big", default="1T", help="size of the big volume")
    c.add_argument("--big-data", default="256M", help="data written to the big volume, 64 KiB pieces spread evenly")
    c.add_argument("--depths", type=int, nargs="+", default=list(CHAIN_DEPTHS), help="chain depths measured")
    c.add_argument("--layer-writes", type=int, default=4, help="4 KiB writes per chain layer and before each snapshot")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--out", help="results dir (default bench/results/<UTC timestamp>-clone-time)")
    c.add_argument("--report", action="store_true", help="update the clone-time section of docs/BENCHMARKS.md")
    m = sub.add_parser("rss", help="blockd memory with N idle clones exported (one NBD connection each) "
                                   "and under load; peers' memory per clone")
    m.add_argument("--clones", type=int, default=100)
    m.add_argument("--size", default="2G")
    m.add_argument("--runtime", type=int, default=10, help="seconds of each load phase")
    m.add_argument("--blockd-engine", default="sync", choices=["sync", "uring"])
    m.add_argument("--peer-targets", nargs="*", default=["qcow2_d1", "nbdkit_cow_tcp", "nbdsrv_cow_tcp"])
    m.add_argument("--quick", action="store_true", help="3 s load phases, 256M volume")
    m.add_argument("--out")
    m.add_argument("--report", action="store_true", help="write the rss section of docs/BENCHMARKS.md")
    m.add_argument("--section")
    g = sub.add_parser("pgbench", help="pgbench on PostgreSQL 15 whose data dir is on each server's export "
                                       "(nbdfuse + loop + ext4)")
    g.add_argument("--targets", nargs="+", help=f"default: {' '.join(PG_TARGETS)}")
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--runtime", type=int, default=30, help="seconds of the timed pgbench run")
    g.add_argument("--size", default="2G")
    g.add_argument("--scale", type=int, default=20, help="pgbench -i -s")
    g.add_argument("--clients", type=int, default=4)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--pause", type=float, default=1.0)
    g.add_argument("--blockd-engine", default="sync", choices=["sync", "uring"])
    g.add_argument("--quick", action="store_true", help="1 rep, 3 s, 256M export, scale <= 5")
    g.add_argument("--out")
    g.add_argument("--report", action="store_true", help="write the pgbench section of docs/BENCHMARKS.md")
    g.add_argument("--section")
    al = sub.add_parser("all", help="setup (installs the peers), then the peers suite, pgbench and rss, "
                                    "and writes every section of docs/BENCHMARKS.md")
    al.add_argument("--reps", type=int, default=3)
    al.add_argument("--runtime", type=int, default=10)
    al.add_argument("--size", default="2G")
    al.add_argument("--quick", action="store_true", help="smoke test of the whole pipeline")
    al.add_argument("--blockd-engine", default="sync", choices=["sync", "uring"])
    al.add_argument("--targets", nargs="+", help="subset of the peers suite's targets")
    al.add_argument("--jobs", nargs="+", help="subset of the peers suite's jobs")
    al.add_argument("--skip", nargs="*", default=[], choices=["setup", "peers", "pgbench", "rss"])
    al.add_argument("--no-docs", action="store_true")
    sub.add_parser("clean", help="stop servers left by a killed run, remove the work dir")
    sub.add_parser("list", help="suites, targets, jobs")
    a = ap.parse_args()
    a.work_dir = os.path.abspath(a.work_dir)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        if a.cmd == "run":
            res = cmd_run(a)
            if a.report:
                cmd_report(argparse.Namespace(results_dir=res, no_docs=False, section=None,
                                             keep_flagged=False))
        else:
            {"setup": cmd_setup, "report": cmd_report, "clean": cmd_clean, "list": cmd_list,
             "clone-time": cmd_clone_time, "rss": cmd_rss, "pgbench": cmd_pgbench,
             "all": cmd_all}[a.cmd](a)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"bench: error: command failed ({e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({str(e) or 'Ctrl-C'}); servers stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
