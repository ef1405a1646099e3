"""The tools people would run instead of ferry, each set up the way its users would set it up,
on 127.0.0.1 and in temporary directories only (used by `bench.py --full`).

Every baseline syncs directory `a` to directory `b` continuously and exposes the same small
interface: `start_a()` (a's side only, so a first sync can be timed from `start_b()`),
`start_b()`, `wait_ready()`, `pids()` (name → process id, for RSS and CPU) and `stop()`.

* Syncthing: two instances with their own homes, generated keys and a config.xml written from
  the generated one: listening on 127.0.0.1 ports, each other's address given, no global or
  local discovery, relays, NAT traversal, usage reporting or upgrades; one shared folder with
  the filesystem watcher on and its delay (default 10 s) as given.
* Unison: `-repeat watch` between the two local directories when `unison-fsmonitor` is
  installed, otherwise `-repeat 1` (a rescan every second, what its users do without it).
* lsyncd: inotify on `a`, rsync to the local directory `b` (default.rsync), with lsyncd's
  default delay (15 s) or the delay given.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET

from common import PROCS, free_port, listening, wait_for

INSTALL = {"syncthing": "syncthing", "unison": "unison", "lsyncd": "lsyncd"}


def missing(tool):
    """None if the tool is installed, else one line saying how to install it."""
    if shutil.which(tool):
        return None
    return f"{tool} not found: skipped (install it with `apt install {INSTALL[tool]}`)"


class Syncthing:
    FOLDER = "bench"

    def __init__(self, work, a, b, delay_s=10):
        self.work, self.roots, self.delay = work, {"a": a, "b": b}, delay_s
        os.makedirs(work, exist_ok=True)
        self.homes, self.ids, self.gui, self.port, self.key, self.procs = {}, {}, {}, {}, {}, {}
        for side in ("a", "b"):
            home = os.path.join(work, f"st-{side}")
            out = subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder",
                                  "--skip-port-probing"], capture_output=True, text=True,
                                 env=self.env(home), check=True, timeout=60)
            self.ids[side] = [l.split(":", 1)[1].strip() for l in (out.stdout + out.stderr).splitlines()
                              if "Device ID:" in l][0]
            self.homes[side] = home
            self.gui[side], self.port[side] = free_port(), free_port()
        for side, peer in (("a", "b"), ("b", "a")):
            self.configure(side, peer)

    def env(self, home):
        e = dict(os.environ, HOME=home, STNOUPGRADE="1", STNORESTART="1", STNODEFAULTFOLDER="1")
        e.pop("STGUIADDRESS", None)
        return e

    def configure(self, side, peer):
        path = os.path.join(self.homes[side], "config.xml")
        tree = ET.parse(path)
        root = tree.getroot()
        me = root.find("device")
        other = ET.fromstring(ET.tostring(me))
        other.set("id", self.ids[peer])
        other.set("name", peer)
        other.find("address").text = f"tcp://127.0.0.1:{self.port[peer]}"
        me.set("name", side)
        root.insert(list(root).index(me) + 1, other)
        gui = root.find("gui")
        gui.find("address").text = f"127.0.0.1:{self.gui[side]}"
        self.key[side] = gui.find("apikey").text
        opts = root.find("options")
        for tag, value in [("listenAddress", f"tcp://127.0.0.1:{self.port[side]}"),
                           ("globalAnnounceEnabled", "false"), ("localAnnounceEnabled", "false"),
                           ("relaysEnabled", "false"), ("natEnabled", "false"), ("urAccepted", "-1"),
                           ("autoUpgradeIntervalH", "0"), ("startBrowser", "false"),
                           ("crashReportingEnabled", "false")]:
            opts.find(tag).text = value
        folder = ET.fromstring(ET.tostring(root.find("defaults/folder")))
        folder.set("id", self.FOLDER)
        folder.set("label", self.FOLDER)
        folder.set("path", self.roots[side])
        folder.set("fsWatcherEnabled", "true")
        folder.set("fsWatcherDelayS", str(self.delay))
        peer_dev = ET.fromstring(ET.tostring(folder.find("device")))
        peer_dev.set("id", self.ids[peer])
        folder.append(peer_dev)
        root.insert(0, folder)
        tree.write(path)

    def start(self, side):
        os.makedirs(self.roots[side], exist_ok=True)
        home = self.homes[side]
        self.procs[side] = PROCS.spawn(["syncthing", "serve", f"--home={home}", "--no-browser",
                                        "--no-restart", f"--logfile={home}/syncthing.log"],
                                       env=self.env(home))
        if wait_for(lambda: self.rest(side, "system/ping") is not None, 60, 0.1) is None:
            raise RuntimeError(f"syncthing {side} did not start (see {home}/syncthing.log)")

    def start_a(self):
        self.start("a")
        # Its tree scanned before the other side appears: the first sync starts from an index.
        wait_for(lambda: self.state("a") == "idle", 900, 0.2)

    def start_b(self):
        self.start("b")

    def rest(self, side, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui[side]}/rest/{path}",
                                     headers={"X-API-Key": self.key[side]})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.load(r)
        except (OSError, ValueError):
            return None

    def state(self, side):
        s = self.rest(side, f"db/status?folder={self.FOLDER}")
        return s and s.get("state")

    def wait_ready(self, deadline=120):
        """Both sides connected and idle."""
        def ready():
            c = self.rest("a", "system/connections")
            up = c and c.get("connections", {}).get(self.ids["b"], {}).get("connected")
            return bool(up) and self.state("a") == "idle" and self.state("b") == "idle"
        return wait_for(ready, deadline, 0.2) is not None

    def pids(self):
        return {f"syncthing {s}": p.pid for s, p in self.procs.items()}

    def stop(self):
        for p in self.procs.values():
            PROCS.kill(p)


class Unison:
    def __init__(self, work, a, b, delay_s=None):
        self.work, self.a, self.b = work, a, b
        os.makedirs(work, exist_ok=True)
        self.watch = shutil.which("unison-fsmonitor") is not None
        self.home = os.path.join(work, "unison-home")
        os.makedirs(self.home, exist_ok=True)
        self.proc = None

    @property
    def label(self):
        return "Unison -repeat watch" if self.watch else "Unison -repeat 1 (no unison-fsmonitor)"

    def start_a(self):
        os.makedirs(self.a, exist_ok=True)

    def start_b(self):
        os.makedirs(self.b, exist_ok=True)
        env = dict(os.environ, UNISON=self.home, HOME=self.home)
        self.proc = PROCS.spawn(["unison", self.a, self.b, "-batch", "-auto", "-times", "-ui", "text",
                                 "-repeat", "watch" if self.watch else "1", "-confirmbigdel=false",
                                 "-logfile", os.path.join(self.work, "unison.log")],
                                log=os.path.join(self.work, "unison.out"), env=env)

    def wait_ready(self, deadline=120):
        # Ready once it has finished a first pass (its archive files exist) and still runs.
        return wait_for(lambda: self.proc.poll() is None and any(
            f.startswith("ar") for f in os.listdir(self.home)), deadline, 0.1) is not None

    def pids(self):
        return {"unison": self.proc.pid}

    def stop(self):
        if self.proc:
            PROCS.kill(self.proc)


class Lsyncd:
    def __init__(self, work, a, b, delay_s=None):
        self.work, self.a, self.b, self.delay = work, a, b, delay_s
        os.makedirs(work, exist_ok=True)
        self.proc = None

    def start_a(self):
        os.makedirs(self.a, exist_ok=True)

    def start_b(self):
        os.makedirs(self.b, exist_ok=True)
        conf = os.path.join(self.work, "lsyncd.conf.lua")
        delay = "" if self.delay is None else f"    delay = {self.delay},\n"
        with open(conf, "w") as f:
            f.write("settings {\n    nodaemon = true,\n"
                    f"    logfile = \"{self.work}/lsyncd.log\",\n"
                    f"    statusFile = \"{self.work}/lsyncd.status\",\n}}\n"
                    "sync {\n    default.rsync,\n"
                    f"    source = \"{self.a}\",\n    target = \"{self.b}\",\n{delay}"
                    "    rsync = { archive = true },\n}\n")
        self.proc = PROCS.spawn(["lsyncd", conf], log=os.path.join(self.work, "lsyncd.out"))

    def wait_ready(self, deadline=120):
        # Its start-up rsync done: lsyncd logs "Startup of ... finished".
        log = os.path.join(self.work, "lsyncd.log")

        def done():
            try:
                return "finished" in open(log).read()
            except OSError:
                return False
        return wait_for(done, deadline, 0.1) is not None

    def pids(self):
        return {"lsyncd": self.proc.pid}

    def stop(self):
        if self.proc:
            PROCS.kill(self.proc)
