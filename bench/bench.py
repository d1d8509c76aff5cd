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
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS_ROOT = os.path.join(HERE, "results")
DOCS = os.path.join(REPO, "docs", "BENCHMARKS.md")
DEFAULT_WORK = os.environ.get("BENCH_WORK", "/tmp/blockd-bench")
BLOCKD_BIN = os.environ.get("BLOCKD_BIN", os.path.join(REPO, "target", "release", "blockd"))
VOLUME = "bench"           # blockd volume name (= NBD export name)
QEMU_EXPORT = "x"          # qemu-nbd export name (as in peers.sh)
CHUNK = 4096               # every data-preparation write is 4 KiB (kernel 6.18 large-folio trap)
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
        s.stop()

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


def start_blockd(work, name):
    """Start `blockd serve` on the bench data dir; TCP port 0, Unix socket in the work dir."""
    ready = os.path.join(work.root, "blockd-ready.json")
    sockp = os.path.join(work.sock, "blockd.sock")
    for p in (ready, sockp):
        if os.path.exists(p):
            os.unlink(p)
    cmd = [BLOCKD_BIN, "serve", "--data-dir", work.blockd_dir, "--listen", "127.0.0.1:0",
           "--api", "127.0.0.1:0", "--socket", sockp, "--ready-file", ready,
           "--shutdown-grace", "2s"]
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
    """An NBD server configuration. start() returns a ready Server whose .uri fio uses."""
    name = ""
    title = ""
    requires = ()      # artifacts (Work._prep_<name>) prepared once per run

    def start(self, work):
        raise NotImplementedError

    def describe(self, work):
        return self.title


class BlockdTarget(Target):
    requires = ("blockd_volume",)

    def __init__(self, name, transport):
        self.name, self.transport = name, transport
        self.title = f"blockd, {'TCP loopback' if transport == 'tcp' else 'Unix socket'}"

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
    name = "qemu_tcp"
    title = "qemu-nbd raw, aio=threads, TCP loopback"
    requires = ("raw",)
    OPTS = ["-f", "raw", "--cache=writeback", "-t", "-e", "4", "-x", QEMU_EXPORT, "--aio=threads"]

    def start(self, work):
        port = free_port()
        cmd = ["qemu-nbd", *self.OPTS, "-b", "127.0.0.1", "-p", str(port), work.raw]
        return work.start(self.name, cmd, f"nbd://127.0.0.1:{port}/{QEMU_EXPORT}")


class NbdkitFileTarget(Target):
    name = "nbdkit_tcp"
    title = "nbdkit file plugin, TCP loopback"
    requires = ("raw",)

    def start(self, work):
        port = free_port()
        cmd = ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
               "file", f"file={work.raw}"]
        return work.start(self.name, cmd, f"nbd://127.0.0.1:{port}/")


TARGETS = {t.name: t for t in [
    BlockdTarget("blockd_tcp", "tcp"),
    BlockdTarget("blockd_unix", "unix"),
    QemuRawTarget(),
    NbdkitFileTarget(),
]}
BLOCKD_TARGETS = {"blockd_tcp", "blockd_unix"}
REFERENCES = [("qemu_tcp", "qemu-nbd"), ("nbdkit_tcp", "nbdkit")]   # ratio columns in the report


# --------------------------------------------------------------------------- jobs

class Job:
    def __init__(self, name, title, args, note=""):
        self.name, self.title, self.args, self.note = name, title, args, note


JOBS = {j.name: j for j in [
    Job("rr4k_qd1", "4k randread QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"]),
    Job("rr4k_qd32", "4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
    Job("rw4k_qd32", "4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
    Job("rw4k_qd32_fsync32", "4k randwrite QD32, fsync=32",
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"],
        note="fio sends NBD_CMD_FLUSH when 32 writes have been issued since the last flush; at "
             "QD>1 fio (3.33) then issues a burst of flushes while the queue drains, so there "
             "are far more than 1/32 flushes per write: see the flushes/write column."),
]}
COMMON_FIO = ["--ioengine=nbd", "--time_based", "--norandommap", "--randrepeat=0",
              "--output-format=json"]


# --------------------------------------------------------------------------- suites

class Suite:
    def __init__(self, name, title, targets, jobs, about):
        self.name, self.title, self.targets, self.jobs, self.about = name, title, targets, jobs, about


SUITES = {s.name: s for s in [
    Suite("nbd-basic", "NBD basics: 4k random I/O, one connection",
          ["blockd_tcp", "blockd_unix", "qemu_tcp", "nbdkit_tcp"],
          ["rr4k_qd1", "rr4k_qd32", "rw4k_qd32", "rw4k_qd32_fsync32"],
          "fio ioengine=nbd (libnbd, one connection) against each server on loopback; "
          "every server exports the same random bytes, fully in page cache."),
]}


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
              "srv_cpu_s", "cpu_us_per_io", "srv_cores", "fio_cores", "steal_pct", "busy_pct",
              "others_cores", "load1", "srv_disk_read_mb", "host_disk_read_mb", "drop_caches", "wall_s"]


def parse_fio(path):
    with open(path) as f:
        txt = f.read()
    d = json.loads(txt[txt.index("{"):])          # fio may print warnings before the JSON
    j = d["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > j["read"]["io_bytes"] else j["read"]
    clat = side.get("clat_ns", {})
    pct = clat.get("percentile", {})
    sync = j.get("sync", {})
    spct = sync.get("lat_ns", {}).get("percentile", {})
    return {
        "iops": side["iops"],
        "mbps": side["bw_bytes"] / 1e6,
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
    srv = target.start(work)
    try:
        cmd = ["fio", f"--name={job.name}", *COMMON_FIO, f"--runtime={a.runtime}", *job.args,
               f"--uri={srv.uri}", f"--output={out}"]
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
        c1, rb1 = srv.cpu_seconds(), proc_read_bytes(srv.pid)
        alive = pid_alive(srv.pid)
    finally:
        work.stop(srv)
    syncfs(work.root)                   # write back what a write job dirtied before the next run
    steal, busy = cpu_delta(s0, s1)
    host_mb, drops = cache_delta(v0, v1)
    srv_mb = (rb1 - rb0) / 1e6 if rb0 is not None and rb1 is not None else 0.0
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
        elif drops:
            status = "cache_dropped"       # someone ran drop_caches during the run
        elif srv_mb > 0.01 * m["ios"] * 4096 / 1e6 + 1:
            status = "disk_reads"          # the server missed page cache: not what we measure
        row.update({k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()})
        if c0 is not None and c1 is not None:
            srv_cpu = c1 - c0
            row["srv_cpu_s"] = round(srv_cpu, 2)
            row["srv_cores"] = round(srv_cpu / (t1 - t0), 2)
            row["cpu_us_per_io"] = round(srv_cpu * 1e6 / m["ios"], 1) if m["ios"] else ""
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
    suite = SUITES[a.suite]
    targets = a.targets or suite.targets
    jobs = a.jobs or suite.jobs
    for t in targets:
        if t not in TARGETS:
            raise BenchError(f"unknown target {t}; see `bench.py list`")
    for j in jobs:
        if j not in JOBS:
            raise BenchError(f"unknown job {j}; see `bench.py list`")
    missing = [b for b in ("fio", "nbdinfo", "nbdcopy", "qemu-nbd", "nbdkit") if not shutil.which(b)]
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
    leftover = [p for p in work._pids() if pid_alive(int(p))]
    if leftover:
        raise BenchError(f"servers from an earlier run are still alive ({', '.join(leftover)}); "
                         f"run `python3 bench/bench.py clean` first")
    meta = {
        "suite": suite.name,
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
    try:
        # ---- data, once per run
        needed = []
        for t in targets:
            for r in TARGETS[t].requires:
                if r not in needed:
                    needed.append(r)
        work.need(needed)
        syncfs(work.root)
        save_meta()
        log(f"data ready in {time.time() - t_start:.0f} s: {work.facts}")
        # ---- the matrix: reps outermost (interleaved), target order rotated every rep
        with open(csv_path, "w", newline="") as csvf, open(os.path.join(res, "commands.log"), "w") as cmdlog:
            w = csv.DictWriter(csvf, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            seq = 0
            for rep in range(1, a.reps + 1):
                if rep > 1:
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


def render(res, keep_flagged=False):
    with open(os.path.join(res, "meta.json")) as f:
        meta = json.load(f)
    rows = load_rows(res, keep_flagged)
    with open(os.path.join(res, "results.csv")) as f:
        allrows = list(csv.DictReader(f))
    kept = ("ok",) + (FLAGGED if keep_flagged else ())
    failed = [r for r in allrows if r["status"] not in kept]
    flagged = [r for r in allrows if keep_flagged and r["status"] in FLAGGED]
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

    # conditions
    allok = [r for rs in rows.values() for r in rs]
    if allok:
        def rng(k, nd=1):
            v = sorted(float(r[k]) for r in allok if r.get(k) not in ("", None))
            return f"{statistics.median(v):.{nd}f} [{v[0]:.{nd}f}–{v[-1]:.{nd}f}]" if v else "–"
        w(f"Conditions during the fio runs, median [min–max] over {len(allok)} runs: steal "
          f"{rng('steal_pct')} %, CPU busy (without steal) {rng('busy_pct')} % of {os.cpu_count()} vCPUs, "
          f"CPU used by other tenants (busy − server − fio) {rng('others_cores', 2)} cores, "
          f"load1 {rng('load1', 2)}.\n")

    summary = []
    for job in meta["jobs"]:
        title = meta["job_titles"].get(job, job)
        w(f"#### {title} (`{job}`)\n")
        if meta.get("job_notes", {}).get(job):
            w(f"{meta['job_notes'][job]}\n")
        refs = [(t, lbl) for t, lbl in REFERENCES if t in meta["targets"]]
        fs = job.endswith("fsync32") or any(float(r.get("flushes") or 0) > 0 for t in meta["targets"] for r in rows.get((t, job), []))
        hdr = ["target", "n", "IOPS median [min–max]", "clat p50 µs", "clat p99 µs",
               "server CPU µs/IO", "server cores"]
        if fs:
            hdr += ["flushes/write", "flush p50 µs"]
        hdr += [f"vs {lbl}" for _, lbl in refs]
        w("| " + " | ".join(hdr) + " |")
        w("|" + "---|" * len(hdr))
        M = {}
        for t in meta["targets"]:
            rs = rows.get((t, job), [])
            if not rs:
                w(f"| {t} | 0 |" + " – |" * (len(hdr) - 2))
                continue
            M[t] = {k: med(rs, k) for k in ("iops", "clat_p50_us", "clat_p99_us", "cpu_us_per_io",
                                            "srv_cores", "flushes", "ios", "flush_p50_us")}
            iops = [float(r["iops"]) for r in rs]
            cells = [t, str(len(rs)), f"{fmt_iops(M[t]['iops'])} [{fmt_iops(min(iops))}–{fmt_iops(max(iops))}]",
                     fmt(M[t]["clat_p50_us"], 1), fmt(M[t]["clat_p99_us"], 1),
                     fmt(M[t]["cpu_us_per_io"], 1), fmt(M[t]["srv_cores"], 2)]
            if fs:
                fw = [float(r["flushes"]) / max(1.0, float(r["ios"])) for r in rs if r.get("flushes")]
                cells += [f"{statistics.median(fw):.2f}" if fw else "–", fmt(M[t]["flush_p50_us"], 0)]
            for rt, _ in refs:
                rr = rows.get((rt, job), [])
                if t == rt or not rr or not M[t]["iops"]:
                    cells.append("–" if t != rt else "1")
                    continue
                ratio = M[t]["iops"] / med(rr, "iops")
                # per-rep pairs (same rep = measured minutes apart, in the same pass)
                by_rep = {r["rep"]: float(r["iops"]) for r in rr}
                pr = sorted(float(r["iops"]) / by_rep[r["rep"]] for r in rs if r["rep"] in by_rep)
                cells.append(f"**{ratio:.2f}**" + (f" ({pr[0]:.2f}–{pr[-1]:.2f})" if len(pr) > 1 else ""))
            w("| " + " | ".join(cells) + " |")
        w("")
        if "blockd_tcp" in M and "qemu_tcp" in M and M["qemu_tcp"]["iops"]:
            summary.append((title, M["blockd_tcp"]["iops"] / M["qemu_tcp"]["iops"],
                            M.get("blockd_unix", {}).get("iops")))
    w("Ratios are median IOPS of the row's target over median IOPS of the reference; in brackets "
      "the range of the per-rep ratios (same rep = same interleaved pass). Server CPU = "
      "utime+stime of the server process from /proc/PID/stat before/after fio, divided by the I/Os "
      "fio completed (flushes not counted).\n")
    if p.get("rewarm"):
        w("Page cache found cold at the start of a rep and re-warmed: " + ", ".join(
            f"rep {e['rep']} ({e['disk_read_mb']} MB read back, {e['drop_caches']} drop_caches)"
            for e in p["rewarm"]) + ".\n")
    if flagged:
        w(f"Kept in the medians although flagged (`--keep-flagged`): {len(flagged)} runs (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in flagged) + ").\n")
    if failed:
        w(f"Runs left out of the medians: {len(failed)} (" + ", ".join(
            f"{r['target']}/{r['job']}/r{r['rep']}: {r['status']}" for r in failed) + ")\n")
    return "\n".join(L), summary, meta


def update_docs(section, suite, path=DOCS):
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
        suite_title = SUITES[suite].title if suite in SUITES else suite
        doc = doc.rstrip() + f"\n\n## {suite_title} (`{suite}`)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)
    log(f"updated {os.path.relpath(path, REPO)} between {begin} / {end}")


def cmd_report(a):
    res = a.results_dir
    if not res:
        dirs = sorted(d for d in os.listdir(RESULTS_ROOT)
                      if os.path.exists(os.path.join(RESULTS_ROOT, d, "results.csv")))
        if not dirs:
            raise BenchError("no results yet; run `python3 bench/bench.py run` first")
        res = os.path.join(RESULTS_ROOT, dirs[-1])
    section, summary, meta = render(res, a.keep_flagged)
    print(section)
    if summary:
        print("blockd_tcp / qemu_tcp (median IOPS):", "; ".join(f"{t}: {r:.2f}" for t, r, _ in summary),
              file=sys.stderr)
    if not a.no_docs:
        update_docs(section, a.section or meta["suite"])


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
  run. On the benchmark VM, cached pages of idle files disappear after a few minutes even
  with 18 GiB free. There is no kswapd reclaim and no `drop_caches` by us; it is probably the
  hypervisor's memory management. So the harness records what the *server process* read
  from disk during each run (`/proc/PID/io` `read_bytes` → `srv_disk_read_mb`). Runs that
  read more than 1 % of their data from disk are flagged `disk_reads` and left out of the
  medians; `report --keep-flagged` keeps them. Before every rep the raw file is re-read
  with 4 KiB reads, and if that had to go to disk, the blockd volume is re-warmed through
  NBD in random order.
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


# --------------------------------------------------------------------------- setup / clean / list

APT = {"fio": "fio", "qemu-nbd": "qemu-utils", "qemu-img": "qemu-utils", "nbdkit": "nbdkit",
       "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin"}


def cmd_setup(a):
    need = sorted({pkg for b, pkg in APT.items() if not shutil.which(b)})
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
    if os.path.isdir(root):
        shutil.rmtree(root)
        log(f"removed {root}")


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
    p = sub.add_parser("report", help="median tables; updates docs/BENCHMARKS.md")
    p.add_argument("results_dir", nargs="?", help="default: newest dir under bench/results")
    p.add_argument("--no-docs", action="store_true", help="only print, leave docs/BENCHMARKS.md alone")
    p.add_argument("--section", help="marker key in docs/BENCHMARKS.md (default: the run's suite)")
    p.add_argument("--keep-flagged", action="store_true",
                   help="count runs flagged disk_reads/cache_dropped in the medians (listed below the tables)")
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
            {"setup": cmd_setup, "report": cmd_report, "clean": cmd_clean, "list": cmd_list}[a.cmd](a)
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
