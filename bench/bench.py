#!/usr/bin/env python3
"""ferry's benchmark: ferry and the tools people would use instead, in one run on one machine.

Machines are noisy, so every figure is min / median / max over its trials and each table has a
ratio against rsync to an `rsync --daemon` module measured in the same run. Everything runs on
127.0.0.1 in temporary directories; nothing is installed: a missing baseline is reported with
the package that provides it. Standard library only.

Quick mode (CI): ferry, rsync --daemon and cp, small sizes, a few minutes. Full mode is for a
developer machine (bigger sizes; Syncthing, Unison and lsyncd are not wired in yet).
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = 120.0  # seconds any single wait may take before the trial is recorded as failed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


class Ferry:
    """A ferry server and clients in a temporary directory."""

    def __init__(self, binary, work, clients):
        self.binary, self.work = binary, work
        os.makedirs(work, exist_ok=True)
        self.procs = []
        secret = os.path.join(work, "secret")
        # Owner-only, as ferry requires of a secret file.
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("benchmark-secret-0123456789\n")
        os.chmod(secret, 0o600)  # a file left by an earlier run keeps its mode otherwise
        self.server_root = os.path.join(work, "server")
        os.makedirs(self.server_root, exist_ok=True)
        ready = os.path.join(work, "ready")
        self.spawn(["server", "--root", self.server_root, "--listen", "127.0.0.1:0",
                    "--ftp-listen", "127.0.0.1:0", "--secret-file", secret, "--ready-file", ready, "-q"])
        if wait_for(lambda: os.path.exists(ready), 30, 0.01) is None:
            raise RuntimeError("ferry server did not start")
        control = [l.split("=", 1)[1] for l in open(ready).read().split() if l.startswith("control=")][0]
        self.roots = {}
        for name, watcher in clients:
            root = os.path.join(work, name)
            self.roots[name] = root
            self.spawn(["client", "--server", control, "--root", root, "--secret-file", secret,
                        "--name", name, "--watcher", watcher, "-q"])
        # Connected and caught up: a probe file reaches every client.
        probe = os.path.join(self.server_root, ".probe-ready")
        with open(probe, "w") as f:
            f.write("x")
        if wait_for(lambda: all(os.path.exists(os.path.join(r, ".probe-ready")) for r in self.roots.values()), 30, 0.01) is None:
            raise RuntimeError("ferry clients did not connect")
        os.remove(probe)
        wait_for(lambda: not any(os.path.exists(os.path.join(r, ".probe-ready")) for r in self.roots.values()), 30, 0.01)

    def spawn(self, args):
        log = open(os.path.join(self.work, "agents.log"), "a")
        self.procs.append(subprocess.Popen([self.binary] + args, stdout=log, stderr=log))

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class RsyncDaemon:
    """rsync --daemon serving one module, the one-shot floor."""

    def __init__(self, work):
        self.dest = os.path.join(work, "rsync-dest")
        os.makedirs(self.dest)
        self.port = free_port()
        conf = os.path.join(work, "rsyncd.conf")
        with open(conf, "w") as f:
            # As the current user: a daemon started as root would otherwise write as `nobody`.
            f.write(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                    f"[bench]\npath = {self.dest}\nread only = no\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.listening, 10, 0.01)

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def push(self, src):
        subprocess.run(["rsync", "-a", "--delete", src.rstrip("/") + "/", f"rsync://127.0.0.1:{self.port}/bench/"],
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def random_file(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n


def bench_latency(binary, work, trials, watcher):
    """A 4 KiB file created on client a until identical on the server and on client b."""
    fe = Ferry(binary, os.path.join(work, f"latency-{watcher}"), [("a", watcher), ("b", watcher)])
    one, two, delete, rename = [], [], [], []
    try:
        for i in range(trials):
            data = os.urandom(4096)
            want = hashlib.blake2b(data).hexdigest()
            tmp = os.path.join(fe.work, f"staging-{i}")
            with open(tmp, "wb") as f:
                f.write(data)
            name = f"lat-{i}.bin"
            srv, b = os.path.join(fe.server_root, name), os.path.join(fe.roots["b"], name)
            t0 = time.monotonic()
            os.rename(tmp, os.path.join(fe.roots["a"], name))
            t_srv = wait_for(lambda: same_file(srv, 4096, want))
            t_b = wait_for(lambda: same_file(b, 4096, want))
            one.append(None if t_srv is None else (t_srv - t0) * 1000)
            two.append(None if t_b is None else (t_b - t0) * 1000)
            t0 = time.monotonic()
            os.rename(os.path.join(fe.roots["a"], name), os.path.join(fe.roots["a"], "r-" + name))
            t = wait_for(lambda: os.path.exists(os.path.join(fe.roots["b"], "r-" + name)) and not os.path.exists(b))
            rename.append(None if t is None else (t - t0) * 1000)
            t0 = time.monotonic()
            os.remove(os.path.join(fe.roots["a"], "r-" + name))
            t = wait_for(lambda: not os.path.exists(os.path.join(fe.roots["b"], "r-" + name)))
            delete.append(None if t is None else (t - t0) * 1000)
    finally:
        fe.stop()
    return {"client→server (1 hop)": summary(one), "client→client (2 hops)": summary(two),
            "rename client→client": summary(rename), "delete client→client": summary(delete)}


def bench_baseline_latency(work, trials, rsyncd):
    """The same 4 KiB file copied once by cp and pushed once by rsync (no watching: the floor)."""
    src = os.path.join(work, "lat-src")
    os.makedirs(src)
    out = {"cp": [], "rsync": []}
    dst = os.path.join(work, "lat-cp")
    os.makedirs(dst)
    for i in range(trials):
        path = os.path.join(src, f"lat-{i}.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
        t0 = time.monotonic()
        subprocess.run(["cp", "-a", path, dst], check=True)
        out["cp"].append((time.monotonic() - t0) * 1000)
        if rsyncd:
            t0 = time.monotonic()
            rsyncd.push(src)
            out["rsync"].append((time.monotonic() - t0) * 1000)
    return {k: summary(v) for k, v in out.items() if v}


def bench_large(binary, work, trials, size, rsyncd):
    """One large random file moved into a client's tree until identical on the server; MiB/s."""
    out = {"ferry": [], "rsync": [], "cp": []}
    fe = Ferry(binary, os.path.join(work, "large"), [("a", "inotify")])
    mib = size / (1 << 20)
    try:
        for i in range(trials):
            tmp = os.path.join(work, f"large-{i}.bin")
            random_file(tmp, size)
            want = digest(tmp)
            name = f"large-{i}.bin"
            srv = os.path.join(fe.server_root, name)
            t0 = time.monotonic()
            os.rename(tmp, os.path.join(fe.roots["a"], name))
            t = wait_for(lambda: os.path.exists(srv) and same_file(srv, size, want), step=0.005)
            out["ferry"].append(None if t is None else mib / (t - t0))
            src = os.path.join(work, f"large-src-{i}")
            os.makedirs(src)
            shutil.copy(os.path.join(fe.roots["a"], name), src)
            if rsyncd:
                t0 = time.monotonic()
                rsyncd.push(src)
                out["rsync"].append(mib / (time.monotonic() - t0))
            t0 = time.monotonic()
            subprocess.run(["cp", "-a", os.path.join(src, name), os.path.join(work, f"large-cp-{i}.bin")], check=True)
            out["cp"].append(mib / (time.monotonic() - t0))
            shutil.rmtree(src)
            os.remove(os.path.join(fe.roots["a"], name))
    finally:
        fe.stop()
    return {k: summary(v) for k, v in out.items() if v}


def bench_small(binary, work, trials, dirs, per_dir, rsyncd):
    """dirs × per_dir × 4 KiB files moved into a client's tree until all are on the server."""
    out = {"ferry": [], "rsync": [], "cp": []}
    fe = Ferry(binary, os.path.join(work, "small"), [("a", "inotify")])
    total = dirs * per_dir
    try:
        for i in range(trials):
            tree = os.path.join(work, f"small-{i}")
            for d in range(dirs):
                os.makedirs(os.path.join(tree, f"d{d}"))
                for n in range(per_dir):
                    with open(os.path.join(tree, f"d{d}", f"f{n}"), "wb") as f:
                        f.write(os.urandom(4096))
            last = os.path.join(fe.server_root, f"small-{i}", f"d{dirs - 1}", f"f{per_dir - 1}")
            t0 = time.monotonic()
            os.rename(tree, os.path.join(fe.roots["a"], f"small-{i}"))

            def all_there():
                if not os.path.exists(last):
                    return False
                return sum(len(fs) for _, _, fs in os.walk(os.path.join(fe.server_root, f"small-{i}"))) == total

            t = wait_for(all_there, step=0.01)
            out["ferry"].append(None if t is None else total / (t - t0))
            src = os.path.join(fe.roots["a"], f"small-{i}")
            if rsyncd:
                t0 = time.monotonic()
                rsyncd.push(src)
                out["rsync"].append(total / (time.monotonic() - t0))
            t0 = time.monotonic()
            subprocess.run(["cp", "-a", src, os.path.join(work, f"small-cp-{i}")], check=True)
            out["cp"].append(total / (time.monotonic() - t0))
            shutil.rmtree(src)
    finally:
        fe.stop()
    return {k: summary(v) for k, v in out.items() if v}


def fmt(v, unit):
    return "—" if v is None else f"{v['min']:.1f} / {v['median']:.1f} / {v['max']:.1f} {unit}"


def table(title, rows, unit, higher_is_better, base_key="rsync"):
    """One markdown table; ratio column against rsync's median (>1 means ferry did better)."""
    base = rows.get(base_key)
    lines = [f"### {title}", "", f"| tool | min / median / max | vs rsync daemon |", "| --- | --- | --- |"]
    for name, v in rows.items():
        ratio = "—"
        if v and base and base["median"]:
            r = v["median"] / base["median"] if higher_is_better else base["median"] / v["median"]
            ratio = f"{r:.2f}×"
        lines.append(f"| {name} | {fmt(v, unit)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, ferry/rsync/cp only (default)")
    mode.add_argument("--full", action="store_true", help="the sizes from the benchmark issue")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "bench"), help="where RESULTS.md and results.json go")
    args = ap.parse_args()
    full = args.full
    os.makedirs(args.out, exist_ok=True)

    print("building ferry (release)...", file=sys.stderr, flush=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target", "release", "ferry")

    missing = []
    if not shutil.which("rsync"):
        missing.append("rsync (apt install rsync)")
    if full:
        for tool, pkg in [("syncthing", "syncthing"), ("unison", "unison"), ("lsyncd", "lsyncd")]:
            missing.append(f"{tool}: not wired into this benchmark yet (apt install {pkg})")
    for m in missing:
        print(f"baseline missing: {m}", file=sys.stderr)

    work = tempfile.mkdtemp(prefix="ferry-bench-")
    rsyncd = RsyncDaemon(work) if shutil.which("rsync") else None
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
               "mode": "full" if full else "quick", "missing": missing}
    try:
        trials = 20 if not full else 50
        lat = bench_latency(binary, work, trials, "inotify")
        lat_poll = bench_latency(binary, work, 5 if not full else 20, "poll")
        base = bench_baseline_latency(work, trials, rsyncd)
        size = (64 << 20) if not full else (1 << 30)
        large = bench_large(binary, work, 3, size, rsyncd)
        dirs, per = (10, 100) if not full else (100, 100)
        small = bench_small(binary, work, 3 if not full else 5, dirs, per, rsyncd)
    finally:
        if rsyncd:
            rsyncd.stop()
        shutil.rmtree(work, ignore_errors=True)

    sizes = {}
    for path, label in [(binary, "x86_64 release (this machine)")]:
        sizes[label] = os.path.getsize(path)
    for f in sorted(os.listdir(os.path.join(ROOT, "target"))):
        if f.startswith("ferry-") and os.path.isfile(os.path.join(ROOT, "target", f)):
            sizes[f[len("ferry-"):]] = os.path.getsize(os.path.join(ROOT, "target", f))

    results.update({"latency_ms": {"inotify": lat, "poll": lat_poll, "baselines": base},
                    "large_file_mib_s": large, "small_files_per_s": small, "binary_bytes": sizes,
                    "sizes": {"large_file_mib": size >> 20, "small_files": dirs * per}})

    rows_lat = {f"ferry inotify, {k}": v for k, v in lat.items()}
    rows_lat.update({f"ferry poll (1 s), {k}": v for k, v in lat_poll.items() if "2 hops" in k})
    if "cp" in base:
        rows_lat["cp (one-shot copy, no watching)"] = base["cp"]
    if "rsync" in base:
        rows_lat["rsync"] = base["rsync"]  # one-shot push to the daemon: the baseline row
    md = [f"# ferry benchmark ({results['mode']})", "",
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}, {results['machine']['date']}. "
          "Figures are min / median / max over the trials; ratios compare medians with rsync to an "
          "`rsync --daemon` module in the same run (>1× means ferry did better).", ""]
    if missing:
        md += ["Missing baselines: " + "; ".join(missing), ""]
    md.append(table("1. Propagation latency (4 KiB file)", rows_lat, "ms", higher_is_better=False))
    md.append(table(f"2. One large file ({size >> 20} MiB, fresh random data per trial)", large, "MiB/s", True))
    md.append(table(f"3. Many small files ({dirs} dirs × {per} × 4 KiB)", small, "files/s", True))
    md += ["### 6. Binary size", "", "| binary | bytes |", "| --- | --- |"]
    md += [f"| {k} | {v} ({v / (1 << 20):.1f} MiB) |" for k, v in sizes.items()]
    md += ["", "Not measured yet: first sync of a big tree with idle RSS/CPU (4), scale of cost (5), "
           "and the Syncthing, Unison and lsyncd baselines."]
    text = "\n".join(md) + "\n"
    print(text)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"written: {args.out}/RESULTS.md and results.json", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
