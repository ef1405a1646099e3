"""Helpers shared by the benchmark and its baselines: waiting with deadlines, trees of files,
process footprints from /proc, and the processes to kill at the end. Standard library only."""

import hashlib
import os
import signal
import socket
import statistics
import subprocess
import time

DEADLINE = 120.0  # seconds any single wait may take before the trial is recorded as failed
TICK = os.sysconf("SC_CLK_TCK")
# Directories the tools keep beside the files; never compared, never counted.
META = {".ferry", ".stfolder", ".stversions", ".unison"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def digest(path):
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def wait_for(pred, deadline=DEADLINE, step=0.001):
    """Polls pred until true; returns the time it became true, or None at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(step)
    return None


def same_file(path, size, want):
    try:
        if os.path.getsize(path) != size:
            return False
    except OSError:
        return False
    return digest(path) == want


class Trash:
    """Where the trees a trial is done with go, by a rename, rather than being deleted between
    trials. On ext4 without a journal, a file created within a minute of a mass delete costs a
    scan past every recently freed inode of its block group (the kernel's `recently_deleted`):
    10,000 files deleted just before a trial made the next tool's file creation several times
    slower here, charging whichever tool came next. So nothing is deleted while tools are
    timed; `empty` removes it all when no trial follows, or `RECENTLY_DELETED_S` before the
    next one."""

    def __init__(self):
        self.dir, self.n = None, 0

    def init(self, work):
        self.dir = os.path.join(work, "trash")
        os.makedirs(self.dir, exist_ok=True)

    def put(self, path):
        if os.path.lexists(path):
            self.n += 1
            os.rename(path, os.path.join(self.dir, str(self.n)))

    def empty(self):
        subprocess.run(["rm", "-rf", "--", self.dir], check=False)
        os.makedirs(self.dir, exist_ok=True)


TRASH = Trash()

# How long ext4 passes over a freed inode when it allocates one: 60 s after its delete, 300 s
# more while its inode table block is not yet written back (an `os.sync()` writes it).
RECENTLY_DELETED_S = 65


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


# ---------------------------------------------------------------- processes

class Procs:
    """Every process the benchmark starts, each in its own process group, so that the end of
    the run (normal, exception or Ctrl-C) kills it and whatever it started (rsync children of
    lsyncd, Syncthing's helpers), by id."""

    def __init__(self):
        self.live = []

    def spawn(self, args, log=None, env=None, cwd=None):
        out = open(log, "a") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, stdout=out, stderr=out if log else subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        if log:
            out.close()
        self.live.append(p)
        return p

    def kill(self, p):
        # Its descendants by id too: some move to a process group of their own (Syncthing's
        # monitor process starts the real one that way).
        below = descendants(p.pid) if p.poll() is None else []
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in below[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if p in self.live:
            self.live.remove(p)

    def kill_all(self):
        for p in list(self.live):
            self.kill(p)


PROCS = Procs()


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2:].split()


def descendants(pid):
    """pid and every live process below it."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat_fields(d)[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_kib(pid, field="VmRSS"):
    """Resident set of pid and its descendants in KiB (VmRSS, or VmHWM for the peak)."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid):
    """CPU seconds (user + system) used by pid, its reaped children and its live descendants."""
    total = 0
    for p in descendants(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # Fields after the name: state=0 ... utime=11 stime=12 cutime=13 cstime=14.
        total += int(f[11]) + int(f[12])
        if p == pid:
            total += int(f[13]) + int(f[14])
    return total / TICK


def idle_footprint(pids, quiet, window):
    """After `quiet` seconds of nothing happening: RSS of each process (KiB), the anonymous
    part of it (the rest is mapped files, mostly the program's own code, which the kernel can
    drop and read again), its peak (VmHWM) and the CPU seconds each used over an idle window
    of `window` seconds."""
    time.sleep(quiet)
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    rss = {name: rss_kib(pid) for name, pid in pids.items()}
    anon = {name: rss_kib(pid, "RssAnon") for name, pid in pids.items()}
    time.sleep(window)
    out = {}
    for name, pid in pids.items():
        out[name] = {"rss_kib": rss[name], "anon_kib": anon[name], "peak_kib": rss_kib(pid, "VmHWM"),
                     "idle_cpu_s": cpu_seconds(pid) - before[name], "idle_window_s": window}
    return out


# ---------------------------------------------------------------- trees

def make_tree(root, dirs, per=100, size=1024, prefix="d"):
    """dirs × per files of `size` random bytes under root; returns their relative paths."""
    paths = []
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"{prefix}{d:05d}"), exist_ok=True)
        for n in range(per):
            rel = f"{prefix}{d:05d}/f{n:03d}"
            with open(os.path.join(root, rel), "wb") as f:
                f.write(os.urandom(size))
            paths.append(rel)
    return paths


def disk_bytes(root):
    """Bytes of regular files under root (by length, not blocks)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


class Arrival:
    """Waits for a known list of files (size `size` each) to appear under a root. Tools put a
    file in place with a rename, so a path of the right size is complete; files of a first
    sync only ever appear, so one cursor over the list costs one stat per file in all."""

    def __init__(self, root, paths, size):
        self.root, self.paths, self.size, self.next = root, paths, size, 0

    def __call__(self):
        while self.next < len(self.paths):
            try:
                if os.stat(os.path.join(self.root, self.paths[self.next])).st_size != self.size:
                    return False
            except OSError:
                return False
            self.next += 1
        return True


def identical(a, b):
    """True if the trees hold the same files with the same bytes (tool metadata aside)."""
    def listing(root):
        out = {}
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in META]
            for f in files:
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = p
        return out
    la, lb = listing(a), listing(b)
    if la.keys() != lb.keys():
        return False
    return all(os.path.getsize(la[k]) == os.path.getsize(lb[k]) and digest(la[k]) == digest(lb[k]) for k in la)


# ---------------------------------------------------------------- latency and small files, any tool

def latency_trials(src, dst, trials, deadline=DEADLINE, settle=0.0):
    """A 4 KiB file renamed into src until identical in dst, `trials` times; milliseconds."""
    out = []
    stage = os.path.join(os.path.dirname(src.rstrip("/")), "lat-staging")
    os.makedirs(stage, exist_ok=True)
    for i in range(trials):
        data = os.urandom(4096)
        want = hashlib.blake2b(data).hexdigest()
        tmp = os.path.join(stage, f"lat-{i}.bin")
        with open(tmp, "wb") as f:
            f.write(data)
        name = f"lat-{i}.bin"
        t0 = time.monotonic()
        os.rename(tmp, os.path.join(src, name))
        t = wait_for(lambda: same_file(os.path.join(dst, name), 4096, want), deadline, 0.002)
        out.append(None if t is None else (t - t0) * 1000)
        if t is None:
            break  # a tool that missed one deadline would likely miss them all: stop here
        time.sleep(settle)
    return out


def small_files_trials(src, dst, trials, dirs, per, stage, deadline=DEADLINE):
    """dirs × per × 4 KiB files moved (one rename) into src until all are in dst; files/s."""
    out = []
    total = dirs * per
    for i in range(trials):
        tree = os.path.join(stage, f"small-{i}")
        paths = [f"small-{i}/{p}" for p in make_tree(tree, dirs, per, 4096)]
        arrived = Arrival(dst, paths, 4096)
        os.sync()  # nobody pays for the writeback of what was written before (see bench_large)
        t0 = time.monotonic()
        os.rename(tree, os.path.join(src, f"small-{i}"))
        t = wait_for(arrived, deadline, 0.01)
        out.append(None if t is None else total / (t - t0))
        if t is None:
            break
    return out
