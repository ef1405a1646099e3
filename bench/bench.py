#!/usr/bin/env python3
"""ferry's benchmark: ferry and the tools people would use instead, in one run on one machine.

Machines are noisy, so every figure is min / median / max over its trials and each table has a
ratio against rsync to (or from) an `rsync --daemon` module measured in the same run. Everything
runs on 127.0.0.1 in temporary directories; nothing is installed: a missing baseline is
reported with the package that provides it. Standard library only.

Workloads: 1 propagation latency, 2 one large file, 3 many small files, 4 first sync of a big
tree and the agents' idle footprint (RSS, CPU over an idle window; inotify and poll clients),
5 scale of cost (first sync and RSS by tree size, RAM and index bytes per file), 6 binary size.

Quick mode (CI, a few minutes): ferry, rsync --daemon and cp, small sizes. Full mode (a
developer machine, well under an hour): the sizes of the benchmark issue, and Syncthing,
Unison and lsyncd (bench/baselines.py) for workloads 1, 3 and 4.
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import (DEADLINE, PROCS, RECENTLY_DELETED_S, TRASH, Arrival, cpu_seconds, digest,
                    free_port, identical, idle_footprint, latency_trials, listening, make_tree,
                    same_file, small_files_trials, summary, wait_for)
import baselines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Ferry:
    """A ferry server and clients in a temporary directory. The server's tree may be filled
    before it starts (`server_root`); `start_s` is how long it took to index it and listen.
    `binary` is a pair: the full build, run as the server, and the build run as the clients
    (the client-only one, as phones and boards run)."""

    def __init__(self, binary, work, clients, server_root=None):
        (self.server_binary, self.client_binary), self.work = binary, work
        os.makedirs(work, exist_ok=True)
        self.procs = []
        self.secret = os.path.join(work, "secret")
        # Owner-only, as ferry requires of a secret file.
        with open(os.open(self.secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("benchmark-secret-0123456789\n")
        os.chmod(self.secret, 0o600)  # a file left by an earlier run keeps its mode otherwise
        self.server_root = server_root or os.path.join(work, "server")
        os.makedirs(self.server_root, exist_ok=True)
        ready = os.path.join(work, "ready")
        t0 = time.monotonic()
        self.server = self.spawn(self.server_binary,
                                 ["server", "--root", self.server_root, "--listen", "127.0.0.1:0",
                                  "--ftp-listen", "127.0.0.1:0", "--secret-file", self.secret,
                                  "--ready-file", ready, "-q"])
        if wait_for(lambda: os.path.exists(ready), max(30, DEADLINE * 10), 0.01) is None:
            raise RuntimeError("ferry server did not start")
        self.start_s = time.monotonic() - t0
        self.control = [l.split("=", 1)[1] for l in open(ready).read().split() if l.startswith("control=")][0]
        self.roots = {}
        for name, watcher in clients:
            self.add_client(name, watcher)
        if clients:
            self.probe()

    def add_client(self, name, watcher, poll_ms=None):
        root = os.path.join(self.work, name)
        self.roots[name] = root
        extra = ["--poll-interval-ms", str(poll_ms)] if poll_ms else []
        return self.spawn(self.client_binary,
                          ["client", "--server", self.control, "--root", root, "--secret-file", self.secret,
                           "--name", name, "--watcher", watcher, "-q"] + extra)

    def probe(self, names=None, deadline=30):
        """Connected and caught up: a probe file reaches every client (and its delete too)."""
        roots = [self.roots[n] for n in (names or self.roots)]
        probe = os.path.join(self.server_root, ".probe-ready")
        with open(probe, "w") as f:
            f.write("x")
        if wait_for(lambda: all(os.path.exists(os.path.join(r, ".probe-ready")) for r in roots), deadline, 0.01) is None:
            raise RuntimeError("ferry clients did not connect")
        os.remove(probe)
        wait_for(lambda: not any(os.path.exists(os.path.join(r, ".probe-ready")) for r in roots), deadline, 0.01)

    def spawn(self, binary, args):
        p = PROCS.spawn([binary] + args, log=os.path.join(self.work, "agents.log"))
        self.procs.append(p)
        return p

    def pids(self):
        return [p.pid for p in self.procs]

    def stop_one(self, p, graceful=False):
        """Stops one agent: SIGTERM (it flushes its state) and a bounded wait, then SIGKILL."""
        if graceful and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                pass
        PROCS.kill(p)
        if p in self.procs:
            self.procs.remove(p)

    def stop(self, graceful=False):
        for p in list(self.procs):
            self.stop_one(p, graceful)


class RsyncDaemon:
    """rsync --daemon serving module `bench` (a destination to push to) and module `tree`
    (whatever directory `serve_tree` names: a tree to pull from), the one-shot floor."""

    def __init__(self, work):
        self.work = work
        self.dest = os.path.join(work, "rsync-dest")
        os.makedirs(self.dest)
        self.port = free_port()
        self.conf = os.path.join(work, "rsyncd.conf")
        self.serve_tree(self.dest)
        self.proc = PROCS.spawn(["rsync", "--daemon", "--no-detach", f"--config={self.conf}",
                                 f"--port={self.port}", "--address=127.0.0.1"])
        wait_for(lambda: listening(self.port), 10, 0.01)

    def serve_tree(self, path):
        # The daemon reads its configuration again for every connection.
        with open(self.conf, "w") as f:
            # As the current user: a daemon started as root would otherwise write as `nobody`.
            f.write(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                    f"[bench]\npath = {self.dest}\nread only = no\n"
                    f"[tree]\npath = {path}\nread only = yes\n")

    def push(self, src, into=""):
        """`rsync -a --delete` of src's contents into the module (or its directory `into`)."""
        dest = f"rsync://127.0.0.1:{self.port}/bench/" + (into.strip("/") + "/" if into else "")
        subprocess.run(["rsync", "-a", "--delete", src.rstrip("/") + "/", dest],
                       check=True, stdout=subprocess.DEVNULL)

    def pull_tree(self, dest):
        """One `rsync -a --delete` of module `tree` into dest (the tools' own state left out)."""
        subprocess.run(["rsync", "-a", "--delete", "--exclude=/.ferry", "--exclude=/.stfolder",
                        f"rsync://127.0.0.1:{self.port}/tree/", dest.rstrip("/") + "/"],
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        PROCS.kill(self.proc)


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
    """One large random file moved into a client's tree until identical on the server; MiB/s.
    The page cache is written back before each tool's trial (untimed), so no tool pays for the
    writeback of the data the harness or another tool left dirty; what a tool makes durable
    itself (ferry fsyncs each file) it pays for. A file is put in place with a rename, so the
    clock stops when it is there at its full size; its bytes are compared after (untimed), as
    rsync's and cp's runs end when their copy is written, not after a read of it."""
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
            os.sync()
            t0 = time.monotonic()
            os.rename(tmp, os.path.join(fe.roots["a"], name))
            t = wait_for(Arrival(fe.server_root, [name], size), step=0.005)
            out["ferry"].append(checked(t and mib / (t - t0), same_file(srv, size, want), srv))
            src = os.path.join(work, f"large-src-{i}")
            os.makedirs(src)
            shutil.copy(os.path.join(fe.roots["a"], name), src)
            if rsyncd:
                os.sync()
                t0 = time.monotonic()
                rsyncd.push(src)
                out["rsync"].append(mib / (time.monotonic() - t0))
            os.sync()
            t0 = time.monotonic()
            subprocess.run(["cp", "-a", os.path.join(src, name), os.path.join(work, f"large-cp-{i}.bin")], check=True)
            out["cp"].append(mib / (time.monotonic() - t0))
            shutil.rmtree(src)
            os.remove(os.path.join(fe.roots["a"], name))
    finally:
        fe.stop()
    return {k: summary(v) for k, v in out.items() if v}


def checked(value, same, where):
    """A trial's figure, or None (a failed trial) if what arrived differs from what was sent."""
    if value and not same:
        print(f"ferry: {where} differs from what was sent; trial recorded as failed", file=sys.stderr)
        return None
    return value or None


def bench_small(binary, work, trials, dirs, per_dir, rsyncd):
    """dirs × per_dir × 4 KiB files moved into a client's tree until all are on the server
    (the page cache written back before each tool's trial, as in `bench_large`)."""
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
            paths = [f"small-{i}/d{d}/f{n}" for d in range(dirs) for n in range(per_dir)]
            os.sync()
            t0 = time.monotonic()
            os.rename(tree, os.path.join(fe.roots["a"], f"small-{i}"))
            t = wait_for(Arrival(fe.server_root, paths, 4096), step=0.01)
            src = os.path.join(fe.roots["a"], f"small-{i}")
            dst = os.path.join(fe.server_root, f"small-{i}")
            out["ferry"].append(checked(t and total / (t - t0), identical(src, dst), dst))
            # Each trial's files stay where they are until the end (see `Trash`): each tool
            # writes new files into new directories, as ferry did.
            if rsyncd:
                os.sync()
                t0 = time.monotonic()
                rsyncd.push(src, f"small-{i}")
                out["rsync"].append(total / (time.monotonic() - t0))
            os.sync()
            t0 = time.monotonic()
            subprocess.run(["cp", "-a", src, os.path.join(work, f"small-cp-{i}")], check=True)
            out["cp"].append(total / (time.monotonic() - t0))
    finally:
        fe.stop()
    return {k: summary(v) for k, v in out.items() if v}


def state_files(root):
    """The files under `<root>/.ferry/` with their sizes (key and certificate aside), and the
    bytes of the index proper: snapshots and journals."""
    files = {}
    top = os.path.join(root, ".ferry")
    for dirpath, _, names in os.walk(top):
        for n in names:
            p = os.path.join(dirpath, n)
            files[os.path.relpath(p, top)] = os.lstat(p).st_size
    index = sum(v for k, v in files.items() if k.endswith(".snap") or k.endswith(".journal"))
    return {"files": files, "index_bytes": index}


def ferry_first_sync(binary, work, n_files, trials, poll, quiet, window, rsyncd, rsync_trials):
    """n_files (n/100 dirs × 100 × 1 KiB) in the server's tree before it starts; then `trials`
    fresh inotify clients one after the other (and, if `poll`, one with the poll watcher at
    1 s), each timed from its start until it holds every file. After `quiet` seconds: RSS of
    each agent and CPU seconds over `window` idle seconds; after a clean stop, the size of
    the index each keeps in `.ferry/`. rsync's floor: `rsync_trials` pulls of the same tree
    from the daemon into an empty directory. Returns the figures and the tree (for the
    baselines; the caller removes it)."""
    d = os.path.join(work, f"first-{n_files}")
    tree = os.path.join(d, "server")
    t0 = time.monotonic()
    paths = make_tree(tree, n_files // 100, 100, 1024)
    res = {"files": len(paths), "make_tree_s": time.monotonic() - t0}
    os.sync()  # the tree's writeback is not part of anything timed
    deadline = DEADLINE + len(paths) / 50  # generous: at least 50 files/s
    fe = Ferry(binary, d, [], server_root=tree)
    res["server_start_s"] = fe.start_s
    pids, sync = {"server": fe.server.pid}, {"inotify": [], "poll": []}
    try:
        runs = [("inotify", f"c{i}", None) for i in range(trials)] + ([("poll", "p", 1000)] if poll else [])
        last = {}
        for watcher, name, poll_ms in runs:
            if watcher in last:  # the previous client of this kind: gone, replica and all
                fe.stop_one(last[watcher][1])
                TRASH.put(fe.roots[last[watcher][0]])
            t0 = time.monotonic()
            p = fe.add_client(name, "poll" if poll_ms else "inotify", poll_ms)
            if paths:
                t = wait_for(Arrival(fe.roots[name], paths, 1024), deadline, 0.02)
            else:
                fe.probe([name], deadline)
                t = time.monotonic()
            sync[watcher].append(None if t is None else t - t0)
            res.setdefault("sync_cpu_s", {})[watcher] = cpu_seconds(p.pid)
            last[watcher] = (name, p)
            pids[f"client ({watcher})"] = p.pid
        res["first_sync_s"] = {k: summary(v) for k, v in sync.items() if v}
        res["identical"] = all(identical(tree, fe.roots[n]) for n, _ in last.values())
        res["footprint"] = idle_footprint(pids, quiet, window)
        fe.stop(graceful=True)
        res["state"] = {"server": state_files(tree)}
        for watcher, (name, _) in last.items():
            res["state"][f"client ({watcher})"] = state_files(fe.roots[name])
    finally:
        fe.stop()
    if rsyncd:
        rsyncd.serve_tree(tree)
        os.sync()
        times = []
        for i in range(rsync_trials):
            dest = os.path.join(d, f"rsync-{i}")
            t0 = time.monotonic()
            rsyncd.pull_tree(dest)
            times.append(time.monotonic() - t0)
            TRASH.put(dest)
            os.sync()  # the next trial does not pay for this one's writeback
        res["rsync_s"] = summary(times)
        rsyncd.serve_tree(rsyncd.dest)
    for name in fe.roots:
        TRASH.put(fe.roots[name])
    TRASH.put(os.path.join(tree, ".ferry"))
    return res, tree, paths


def baseline_live(label, cls, delay, work, lat_trials, dirs, per, small_trials):
    """Workloads 1 and 3 for one baseline: a 4 KiB file created in `a` until identical in
    `b`, then dirs × per × 4 KiB files moved into `a` until all are in `b`."""
    d = os.path.join(work, "live-" + "".join(c if c.isalnum() else "-" for c in label))
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    tool = cls(os.path.join(d, "state"), a, b, delay)
    print(f"  {label}: latency and small files", file=sys.stderr, flush=True)
    try:
        tool.start_a()
        tool.start_b()
        if not tool.wait_ready():
            return {"error": "did not become ready"}
        lat = latency_trials(a, b, lat_trials)
        small = small_files_trials(a, b, small_trials, dirs, per, os.path.join(d, "stage"), DEADLINE * 3)
    finally:
        tool.stop()
        TRASH.put(d)
    return {"latency_ms": summary(lat), "small_files_per_s": summary(small)}


def baseline_first(label, cls, delay, work, tree, paths, quiet, window):
    """Workload 4 for one baseline: `a` is the filled tree, `b` empty; time from the start of
    b's side until b holds every file, then idle RSS and CPU of every process it runs."""
    d = os.path.join(work, "first-" + "".join(c if c.isalnum() else "-" for c in label))
    b = os.path.join(d, "b")
    tool = cls(os.path.join(d, "state"), tree, b, delay)
    print(f"  {label}: first sync of {len(paths)} files", file=sys.stderr, flush=True)
    res = {}
    try:
        t0 = time.monotonic()
        tool.start_a()
        res["start_a_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        tool.start_b()
        t = wait_for(Arrival(b, paths, 1024), DEADLINE + len(paths) / 50, 0.02)
        res["first_sync_s"] = summary([None if t is None else t - t0])
        res["identical"] = t is not None and identical(tree, b)
        res["footprint"] = idle_footprint(tool.pids(), quiet, window)
    finally:
        tool.stop()
        TRASH.put(d)
        shutil.rmtree(os.path.join(tree, ".stfolder"), ignore_errors=True)
    return res


def fmt(v, unit, digits=1):
    if v is None:
        return "—"
    return f"{v['min']:.{digits}f} / {v['median']:.{digits}f} / {v['max']:.{digits}f} {unit}"


def ratio(v, base, higher_is_better):
    if not v or not base or not base["median"] or not v["median"]:
        return "—"
    r = v["median"] / base["median"] if higher_is_better else base["median"] / v["median"]
    return f"{r:.2f}×"


def table(title, rows, unit, higher_is_better, base_key="rsync"):
    """One markdown table; ratio column against rsync's median (>1 means the tool did better)."""
    base = rows.get(base_key)
    lines = [f"### {title}", "", f"| tool | min / median / max | vs rsync daemon |", "| --- | --- | --- |"]
    for name, v in rows.items():
        lines.append(f"| {name} | {fmt(v, unit)} | {ratio(v, base, higher_is_better)} |")
    return "\n".join(lines) + "\n"


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def rss(f):
    """Idle RSS, and its anonymous part where measured (results from before had none)."""
    if "anon_kib" not in f:
        return mib(f["rss_kib"])
    return f"{mib(f['rss_kib'])} ({f['anon_kib'] / 1024:.1f})"


def cpu(f):
    return f"{f['idle_cpu_s']:.2f} s ({100 * f['idle_cpu_s'] / f['idle_window_s']:.2f} %)"


def table_first(title, ferry, base_rows, window):
    """Workload 4: one row per process; first sync time where the process is the one filled."""
    base = ferry.get("rsync_s")
    lines = [f"### {title}", "",
             f"| process | first sync, min / median / max | vs rsync daemon | idle RSS (anonymous) | peak RSS | CPU over {window} s idle |",
             "| --- | --- | --- | --- | --- | --- |"]
    fp = ferry["footprint"]
    lines.append(f"| ferry server (indexing its tree at start: {ferry['server_start_s']:.2f} s) | — | — | "
                 f"{rss(fp['server'])} | {mib(fp['server']['peak_kib'])} | {cpu(fp['server'])} |")
    for watcher, label in [("inotify", "ferry client, inotify"), ("poll", "ferry client, poll watcher (1 s)")]:
        if watcher in ferry["first_sync_s"]:
            f = fp[f"client ({watcher})"]
            v = ferry["first_sync_s"][watcher]
            lines.append(f"| {label} | {fmt(v, 's', 2)} | {ratio(v, base, False)} | {rss(f)} | "
                         f"{mib(f['peak_kib'])} | {cpu(f)} |")
    for label, r in base_rows.items():
        if "footprint" not in r:
            lines.append(f"| {label} | — ({r.get('error', 'failed')}) | — | — | — | — |")
            continue
        for i, (proc, f) in enumerate(r["footprint"].items()):
            v = r["first_sync_s"] if i == len(r["footprint"]) - 1 else None
            note = "" if r.get("identical") else " (NOT identical)"
            lines.append(f"| {label}: {proc} | {fmt(v, 's', 2)}{note if v else ''} | {ratio(v, base, False)} | "
                         f"{rss(f)} | {mib(f['peak_kib'])} | {cpu(f)} |")
    lines.append(f"| rsync -a --delete from the daemon (one shot, exits) | {fmt(base, 's', 2)} | 1.00× | — | — | — |")
    return "\n".join(lines) + "\n"


def table_scale(title, points):
    """Workload 5: first sync and idle RSS by tree size, RAM and index bytes per file."""
    empty = next((p for p in points if p.get("files") == 0), None)
    lines = [f"### {title}", "",
             "| files | first sync (inotify client) | vs rsync daemon | server RSS (anonymous) | client RSS (anonymous) "
             "| RAM per file, server / client | index on disk per file, server / client |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        if "skipped" in p:
            lines.append(f"| {p['files']:,} | skipped: {p['skipped']} | — | — | — | — | — |")
            continue
        n, fp, st = p["files"], p["footprint"], p["state"]
        srv, cli = fp["server"]["rss_kib"], fp["client (inotify)"]["rss_kib"]
        per_ram = per_disk = "—"
        if n and empty:
            per_ram = (f"{(srv - empty['footprint']['server']['rss_kib']) * 1024 / n:.0f} B / "
                       f"{(cli - empty['footprint']['client (inotify)']['rss_kib']) * 1024 / n:.0f} B")
        if n:
            per_disk = (f"{st['server']['index_bytes'] / n:.0f} B / "
                        f"{st['client (inotify)']['index_bytes'] / n:.0f} B")
        v = p["first_sync_s"]["inotify"]
        lines.append(f"| {n:,} | {fmt(v, 's', 2)} | {ratio(v, p.get('rsync_s'), False) if n else '—'} | "
                     f"{rss(fp['server'])} | {rss(fp['client (inotify)'])} | {per_ram} | {per_disk} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, ferry/rsync/cp only (default)")
    mode.add_argument("--full", action="store_true", help="the sizes from the benchmark issue, and the baselines")
    ap.add_argument("--out", help="where RESULTS.md and results.json go "
                    "(default: bench/ with --full, target/bench otherwise)")
    args = ap.parse_args()
    full = args.full
    out_dir = args.out or os.path.join(ROOT, "bench" if full else os.path.join("target", "bench"))
    os.makedirs(out_dir, exist_ok=True)
    started = time.monotonic()

    print("building ferry (release, and the client-only build)...", file=sys.stderr, flush=True)
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--profile", "client", "--no-default-features", "--quiet"],
                   cwd=ROOT, check=True)
    target_dir = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
    binary = (os.path.join(target_dir, "release", "ferry"), os.path.join(target_dir, "client", "ferry"))

    missing = []
    if not shutil.which("rsync"):
        missing.append("rsync not found: its rows are empty (install it with `apt install rsync`)")
    tools = []
    if full:
        unison_label = ("Unison -repeat watch" if shutil.which("unison-fsmonitor")
                        else "Unison -repeat 1 (no unison-fsmonitor installed)")
        for tool, label, cls, delay in [
                ("syncthing", "Syncthing, watcher delay 10 s (default)", baselines.Syncthing, 10),
                ("syncthing", "Syncthing, watcher delay 1 s", baselines.Syncthing, 1),
                ("unison", unison_label, baselines.Unison, None),
                ("lsyncd", "lsyncd → local dir, delay 15 s (default)", baselines.Lsyncd, None),
                ("lsyncd", "lsyncd → local dir, delay=0", baselines.Lsyncd, 0)]:
            why = baselines.missing(tool)
            if why:
                if why not in missing:
                    missing.append(why)
            else:
                tools.append((label, cls, delay))
    for m in missing:
        print(m, file=sys.stderr)

    # Sizes: quick is for CI (a few minutes on 2 cores), full for a developer machine.
    trials = 20 if not full else 50
    size = (64 << 20) if not full else (1 << 30)
    dirs, per = (10, 100) if not full else (100, 100)
    first_n = 2000 if not full else 100_000      # workload 4
    scale_n = [0, 1000, 4000] if not full else [0, 10_000, 100_000, 1_000_000]  # workload 5
    quiet, window = (2, 5) if not full else (10, 60)
    scale_budget = 20 * 60  # a workload-5 point projected to take longer is skipped

    work = tempfile.mkdtemp(prefix="ferry-bench-")
    TRASH.init(work)
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                           "load_avg_at_start": os.getloadavg(),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
               "mode": "full" if full else "quick", "missing": missing}
    rsyncd = None
    try:
        rsyncd = RsyncDaemon(work) if shutil.which("rsync") else None
        print("1. latency", file=sys.stderr, flush=True)
        lat = bench_latency(binary, work, trials, "inotify")
        lat_poll = bench_latency(binary, work, 5 if not full else 20, "poll")
        base = bench_baseline_latency(work, trials, rsyncd)
        print("2. one large file", file=sys.stderr, flush=True)
        large = bench_large(binary, work, 3, size, rsyncd)
        print("3. many small files", file=sys.stderr, flush=True)
        small = bench_small(binary, work, 3 if not full else 5, dirs, per, rsyncd)
        live = {}
        if tools:
            print("1 and 3 for the baselines", file=sys.stderr, flush=True)
        for label, cls, delay in tools:
            slow = cls is baselines.Lsyncd and delay is None or cls is baselines.Syncthing and delay >= 10
            live[label] = baseline_live(label, cls, delay, work, 5 if slow else 10, dirs, per, 1)

        print(f"4. first sync of {first_n} files and idle footprint", file=sys.stderr, flush=True)
        first, tree, paths = ferry_first_sync(binary, work, first_n, 2 if not full else 1, True,
                                              quiet, window, rsyncd, 3)
        first_base = {}
        seen = set()
        for label, cls, delay in tools:
            if cls in seen:  # the watcher delay does not change a first sync: default settings only
                continue
            seen.add(cls)
            first_base[label] = baseline_first(label, cls, delay, work, tree, paths, quiet, window)
        TRASH.put(os.path.dirname(tree))

        print("5. scale of cost", file=sys.stderr, flush=True)
        points = []
        rate = None
        for n in sorted(set(scale_n) | {first_n}):
            if n == first_n:
                p = first
            elif rate and n / rate > scale_budget:
                p = {"files": n, "skipped": f"at {rate:.0f} files/s it would take ~{n / rate / 60:.0f} min"}
            else:
                print(f"   {n} files", file=sys.stderr, flush=True)
                if n >= 1_000_000:
                    # What the run left would not fit beside a million more files on a small
                    # disk: removed now. Then the point waits out ext4's `recently_deleted`
                    # window (60 s once the inode tables are written back, see `Trash`):
                    # started at once, it made the tree and ferry's first sync, which come
                    # first, about twice as slow as rsync's later pull.
                    TRASH.empty()
                    os.sync()
                    print(f"   (waiting {RECENTLY_DELETED_S} s after removing the trash)",
                          file=sys.stderr, flush=True)
                    time.sleep(RECENTLY_DELETED_S)
                p, tree, _ = ferry_first_sync(binary, work, n, 1, False, quiet, 1, rsyncd, 1 if full else 3)
                TRASH.put(os.path.dirname(tree))
            if n and "first_sync_s" in p and p["first_sync_s"]["inotify"]:
                rate = n / p["first_sync_s"]["inotify"]["median"]
            points.append(p)
    finally:
        PROCS.kill_all()
        subprocess.run(["rm", "-rf", "--", work], check=False)

    sizes = {}
    for path, label in [(binary[0], "x86_64 release (this machine)"),
                        (binary[1], "x86_64 client-only (`--profile client --no-default-features`)")]:
        sizes[label] = os.path.getsize(path)
    # The cross builds `scripts/build-targets.sh` left (none: only this machine's is listed).
    for f in sorted(os.listdir(target_dir)):
        if f.startswith("ferry-") and os.path.isfile(os.path.join(target_dir, f)):
            sizes[f[len("ferry-"):]] = os.path.getsize(os.path.join(target_dir, f))

    elapsed = time.monotonic() - started
    results.update({"latency_ms": {"inotify": lat, "poll": lat_poll, "baselines": base},
                    "large_file_mib_s": large, "small_files_per_s": small, "binary_bytes": sizes,
                    "baselines_live": live, "first_sync": {"ferry": first, "baselines": first_base},
                    "scale": points, "elapsed_s": elapsed,
                    "sizes": {"large_file_mib": size >> 20, "small_files": dirs * per,
                              "first_sync_files": first_n, "quiet_s": quiet, "idle_window_s": window}})

    rows_lat = {f"ferry inotify, {k}": v for k, v in lat.items()}
    rows_lat.update({f"ferry poll (1 s), {k}": v for k, v in lat_poll.items() if "2 hops" in k})
    rows_lat.update({f"{k} (a → b)": v.get("latency_ms") for k, v in live.items()})
    if "cp" in base:
        rows_lat["cp (one-shot copy, no watching)"] = base["cp"]
    if "rsync" in base:
        rows_lat["rsync"] = base["rsync"]  # one-shot push to the daemon: the baseline row
    rows_small = dict(small)
    rows_small.update({f"{k} (a → b)": v.get("small_files_per_s") for k, v in live.items()})
    md = [f"# ferry benchmark ({results['mode']})", "",
          f"Machine: {os.cpu_count()} CPUs, Linux {os.uname().release}, {results['machine']['date']}, "
          f"load average {results['machine']['load_avg_at_start'][0]:.1f} at the start; the run took "
          f"{elapsed / 60:.1f} min. Figures are min / median / max over the trials; ratios compare medians "
          "with rsync to or from an `rsync --daemon` module in the same run (>1× means the tool did better). "
          "Idle RSS is followed by its anonymous part in parentheses: the rest is mapped files, mostly the "
          "program's own code, shared with the page cache. The server runs the full build; the clients run the "
          "client-only build (`--profile client --no-default-features`), as phones and boards do.", ""]
    if missing:
        md += ["Missing baselines: " + "; ".join(missing), ""]
    md.append(table("1. Propagation latency (4 KiB file)", rows_lat, "ms", higher_is_better=False))
    md.append(table(f"2. One large file ({size >> 20} MiB, fresh random data per trial)", large, "MiB/s", True))
    md.append(table(f"3. Many small files ({dirs} dirs × {per} × 4 KiB)", rows_small, "files/s", True))
    md.append(table_first(f"4. First sync of {first_n:,} files ({first_n // 100} dirs × 100 × 1 KiB) "
                          f"and footprint after {quiet} s of quiet", first, first_base, window))
    md.append(table_scale("5. Scale of cost (RAM per file: (RSS at N − RSS of an empty tree) / N; "
                          "index: .ferry/*.snap and *.journal after a clean stop)", points))
    md += ["### 6. Binary size", "", "| binary | bytes |", "| --- | --- |"]
    md += [f"| {k} | {v} ({v / (1 << 20):.1f} MiB) |" for k, v in sizes.items()]
    if not full:
        md += ["", "Syncthing, Unison and lsyncd are measured by `--full` only."]
    text = "\n".join(md) + "\n"
    print(text)
    with open(os.path.join(out_dir, "RESULTS.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"written: {out_dir}/RESULTS.md and results.json ({elapsed / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        main()
    except KeyboardInterrupt:
        PROCS.kill_all()
        sys.exit(130)
