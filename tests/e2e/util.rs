//! The harness: temporary trees, agent processes that die with the test, whole-tree
//! comparison, and bounded waits (never a bare sleep as synchronisation).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any wait may take before the test fails. Generous: tests check behaviour, not
/// speed, and a slow machine must not fail them.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Poll interval given to poll-watcher clients.
pub const POLL_MS: &str = "200";

/// The `ferry` binary under test.
pub fn ferry() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Writes a secret file as a user should: readable by its owner only (ferry refuses others).
pub fn write_secret(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A per-test directory, removed when the test passes (kept for inspection when it fails).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("ferry-e2e-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() && std::env::var_os("FERRY_KEEP_TMP").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (SIGKILL) and reaped when dropped, so none outlives its test.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Runs the `ferry` under test, behind `FERRY_TEST_RUNNER` if set (e.g.
    /// `qemu-arm -L /usr/arm-linux-gnueabihf` when the suite is cross-built for armv7 and there
    /// is no binfmt_misc to run ARM binaries directly).
    pub fn spawn(args: &[&str], log: &Path) -> Proc {
        let mut program: Vec<String> = std::env::var("FERRY_TEST_RUNNER")
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        program.push(ferry().to_string());
        Proc::spawn_with(&program, args, log)
    }

    /// Runs `program` (a binary, maybe behind a runner such as `qemu-arm -L ...`) with `args`.
    pub fn spawn_with(program: &[String], args: &[&str], log: &Path) -> Proc {
        let err = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(&program[0])
            .args(&program[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("ferry starts");
        Proc { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Exit status if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node of a tree snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File {
        size: u64,
        hash: String,
        mtime_ns: i64,
    },
    /// A symlink, by its target text (never followed).
    Link(PathBuf),
}

/// Every entry under `root` except `.ferry`, by relative path (symlinks as their target).
pub fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Node>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if rel == ".ferry" {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                out.insert(rel, Node::Dir);
                walk(root, &path, out);
            } else if meta.is_symlink() {
                let Ok(target) = fs::read_link(&path) else {
                    continue;
                };
                out.insert(rel, Node::Link(target));
            } else if meta.is_file() {
                let Ok(bytes) = fs::read(&path) else { continue };
                out.insert(
                    rel,
                    Node::File {
                        size: meta.len(),
                        hash: blake3::hash(&bytes).to_hex()[..16].to_string(),
                        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A readable difference between two snapshots, empty if equal.
pub fn diff(a: &BTreeMap<String, Node>, b: &BTreeMap<String, Node>) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out += &format!("  only in first:  {k} {v:?}\n"),
            Some(w) if w != v => out += &format!("  differs: {k}\n    {v:?}\n    {w:?}\n"),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out += &format!("  only in second: {k} {v:?}\n");
        }
    }
    out
}

/// Polls `f` every 20 ms until it holds; panics with `what` (and `explain()`) at the deadline.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool, explain: impl Fn() -> String) {
    let end = Instant::now() + DEADLINE;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting until {what}\n{}", explain());
}

/// Writes a file, creating its parents.
pub fn write(root: &Path, rel: &str, bytes: impl AsRef<[u8]>) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

/// Reads a file, `None` if it is missing.
pub fn read(root: &Path, rel: &str) -> Option<Vec<u8>> {
    fs::read(root.join(rel)).ok()
}

/// Deterministic pseudo-random bytes (xorshift), so big files need no RNG crate.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Waits (bounded by `DEADLINE`) until `f` returns something, and returns it.
pub fn wait_for<T>(
    what: &str,
    cl: &mut Cluster,
    mut f: impl FnMut(&mut Cluster) -> Option<T>,
) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f(cl) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting until {what}\n{}",
            cl.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The seq in `ferry status` of the agent for `root`: the server's latest, or the last one a
/// client has applied. `None` if no agent answers.
pub fn status_seq(root: &Path) -> Option<u64> {
    let out = Command::new(ferry())
        .args(["status", "--json", "--root"])
        .arg(root)
        .output()
        .ok()?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    report["seq"].as_u64()
}

/// Writes `len` random bytes to `path` (from the kernel's generator: fast for big files).
pub fn random_file(path: &Path, len: u64) {
    use std::io::Read;
    let mut src = fs::File::open("/dev/urandom").unwrap().take(len);
    let mut dst = fs::File::create(path).unwrap();
    assert_eq!(std::io::copy(&mut src, &mut dst).unwrap(), len);
}

/// Makes `len` random bytes outside the trees and moves them into `root` as `name`, so a
/// watcher sees the file whole. Returns the bytes.
pub fn move_in_random(cl: &Cluster, root: &Path, name: &str, len: u64) -> Vec<u8> {
    let outside = cl.dir.0.join(format!("{name}.outside"));
    random_file(&outside, len);
    let bytes = fs::read(&outside).unwrap();
    fs::rename(&outside, root.join(name)).unwrap();
    bytes
}

/// The first file beneath `dir` (recursively) of at least `len` bytes.
pub fn file_at_least(dir: &Path, len: u64) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        // Gone since the listing (a temporary file put in place): not the one looked for.
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            if let Some(p) = file_at_least(&e.path(), len) {
                return Some(p);
            }
        } else if meta.len() >= len {
            return Some(e.path());
        }
    }
    None
}

/// A client's watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// The compile-time default: inotify, or poll when built with `poll-default` (so that
    /// suite run is all-poll while the plain run mixes both).
    Auto,
    /// The poll watcher, always.
    Poll,
}

struct ClientProc {
    name: String,
    watch: Watch,
    root: PathBuf,
    /// The command that runs this client's ferry (the native binary when empty).
    program: Vec<String>,
    /// Extra command-line arguments (see `set_client_args`).
    extra: Vec<String>,
    proc: Option<Proc>,
}

/// A server and its clients, each with its own tree in the test's directory.
pub struct Cluster {
    secret: PathBuf,
    server: Option<Proc>,
    control: String,
    ftp: String,
    /// The server certificate's fingerprint, from its ready file ("none" in plaintext).
    fingerprint: String,
    /// Arguments naming an external FTP server, used instead of `--ftp-listen`.
    ftp_args: Option<Vec<String>>,
    /// Extra server arguments (see `set_server_args`).
    server_extra: Vec<String>,
    clients: Vec<ClientProc>,
    /// Last: fields drop in order, so the agents are killed before their trees are removed
    /// (removed first, under running agents, a tree could be written to as it went, and be
    /// left behind).
    pub dir: TempDir,
}

impl Cluster {
    /// Starts a server (empty tree unless `seed` fills it first) and the named clients.
    pub fn start(test: &str, clients: &[(&str, Watch)]) -> Cluster {
        Cluster::start_with(test, clients, |_| {})
    }

    /// Like `start`, with `seed` run on the server's tree before anything starts.
    pub fn start_with(test: &str, clients: &[(&str, Watch)], seed: impl FnOnce(&Path)) -> Cluster {
        Cluster::start_custom(test, clients, None, |dir| seed(&dir.join("server")))
    }

    /// The general form: `ftp_args` replace `--ftp-listen ...` (for an external FTP server),
    /// and `setup` runs with the test's directory once the server's tree exists, before the
    /// server starts.
    pub fn start_custom(
        test: &str,
        clients: &[(&str, Watch)],
        ftp_args: Option<Vec<String>>,
        setup: impl FnOnce(&Path),
    ) -> Cluster {
        let dir = TempDir::new(test);
        let secret = dir.0.join("secret");
        write_secret(&secret, "0123456789abcdef-test-secret\n");
        fs::create_dir_all(dir.0.join("server")).unwrap();
        setup(&dir.0);
        let mut c = Cluster {
            dir,
            secret,
            server: None,
            control: "127.0.0.1:0".into(),
            ftp: "127.0.0.1:0".into(),
            fingerprint: String::new(),
            ftp_args,
            server_extra: Vec::new(),
            clients: Vec::new(),
        };
        c.start_server();
        for (name, watch) in clients {
            c.add_client(name, *watch, Vec::new());
        }
        c
    }

    /// Adds and starts a client run by `program` (the native binary when empty).
    pub fn add_client(&mut self, name: &str, watch: Watch, program: Vec<String>) {
        self.add_client_with(name, watch, program, &[]);
    }

    /// A server and one inotify client whose transfers are paced to `rate` (`--max-rate`),
    /// started and connected: big transfers then last long enough to be interrupted.
    pub fn start_paced(test: &str, client: &str, rate: &str) -> Cluster {
        let mut cl = Cluster::start(test, &[]);
        cl.add_client_with(client, Watch::Auto, Vec::new(), &["--max-rate", rate]);
        wait_until(
            &format!("{client} is connected"),
            || cl.log(client).contains("caught up"),
            || cl.logs(),
        );
        cl
    }

    /// Arguments added to the server's command line from its next start on.
    pub fn set_server_args(&mut self, args: &[&str]) {
        self.server_extra = args.iter().map(|a| a.to_string()).collect();
    }

    /// `add_client` with `args` added to the client's command line (at every start).
    pub fn add_client_with(
        &mut self,
        name: &str,
        watch: Watch,
        program: Vec<String>,
        args: &[&str],
    ) {
        self.clients.push(ClientProc {
            name: name.to_string(),
            watch,
            root: self.dir.0.join(name),
            program,
            extra: args.iter().map(|a| a.to_string()).collect(),
            proc: None,
        });
        self.start_client(name);
    }

    /// The server's exit status, if it has exited.
    pub fn server_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.server.as_mut().and_then(Proc::exited)
    }

    /// A client's exit status, if it has exited.
    pub fn client_exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        self.client_mut(name).proc.as_mut().and_then(Proc::exited)
    }

    /// The whole log of `agent` ("server" or a client's name).
    pub fn log(&self, agent: &str) -> String {
        fs::read_to_string(self.dir.0.join(format!("{agent}.log"))).unwrap_or_default()
    }

    /// The running server's process id.
    pub fn server_pid(&self) -> i32 {
        self.server.as_ref().expect("the server is running").pid()
    }

    pub fn secret(&self) -> &Path {
        &self.secret
    }

    pub fn server_root(&self) -> PathBuf {
        self.dir.0.join("server")
    }

    pub fn root(&self, client: &str) -> PathBuf {
        self.client(client).root.clone()
    }

    /// The control address clients connect to.
    pub fn control(&self) -> &str {
        &self.control
    }

    /// The embedded FTP server's address.
    pub fn ftp_addr(&self) -> &str {
        &self.ftp
    }

    /// Sets the extra arguments `name` gets at its next start.
    pub fn set_client_args(&mut self, name: &str, args: &[&str]) {
        self.client_mut(name).extra = args.iter().map(|a| a.to_string()).collect();
    }

    /// The server certificate's fingerprint as it printed it (`sha256:...`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    fn client(&self, name: &str) -> &ClientProc {
        self.clients
            .iter()
            .find(|c| c.name == name)
            .expect("known client")
    }

    fn client_mut(&mut self, name: &str) -> &mut ClientProc {
        self.clients
            .iter_mut()
            .find(|c| c.name == name)
            .expect("known client")
    }

    /// Starts (or restarts, on the same ports) the server.
    pub fn start_server(&mut self) {
        let ready = self.dir.0.join("server.ready");
        let _ = fs::remove_file(&ready);
        let root = self.server_root();
        let mut args = vec![
            "server",
            "--root",
            root.to_str().unwrap(),
            "--listen",
            &self.control,
            "--secret-file",
            self.secret.to_str().unwrap(),
            "--ready-file",
            ready.to_str().unwrap(),
            "-v",
        ];
        match &self.ftp_args {
            None => args.extend(["--ftp-listen", &self.ftp]),
            Some(extra) => args.extend(extra.iter().map(String::as_str)),
        }
        args.extend(self.server_extra.iter().map(String::as_str));
        let log = self.dir.0.join("server.log");
        let mut server = Proc::spawn(&args, &log);
        let end = Instant::now() + DEADLINE;
        while !ready.exists() && server.exited().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(server);
        let text =
            fs::read_to_string(&ready).unwrap_or_else(|_| panic!("server died\n{}", self.logs()));
        for line in text.lines() {
            if let Some(a) = line.strip_prefix("control=") {
                self.control = a.to_string();
            }
            if let Some(a) = line.strip_prefix("ftp=") {
                self.ftp = a.to_string();
            }
            if let Some(a) = line.strip_prefix("fingerprint=") {
                self.fingerprint = a.to_string();
            }
        }
    }

    /// SIGKILLs the server.
    pub fn kill_server(&mut self) {
        self.server = None;
    }

    /// Starts (or restarts) a client.
    pub fn start_client(&mut self, name: &str) {
        let control = self.control.clone();
        let secret = self.secret.clone();
        let log = self.dir.0.join(format!("{name}.log"));
        let c = self.client_mut(name);
        let root = c.root.to_str().unwrap().to_string();
        let mut args = vec![
            "client",
            "--server",
            &control,
            "--root",
            &root,
            "--secret-file",
            secret.to_str().unwrap(),
            "--name",
            name,
            "-v",
        ];
        if c.watch == Watch::Poll {
            args.extend(["--watcher", "poll", "--poll-interval-ms", POLL_MS]);
        } else {
            args.extend(["--watcher", "auto"]);
        }
        let extra = c.extra.clone();
        args.extend(extra.iter().map(String::as_str));
        if self.fingerprint == "none" {
            // The server runs without TLS (`--insecure-plaintext`): so must its clients.
            args.push("--insecure-plaintext");
        }
        let c = self.client_mut(name);
        c.proc = Some(if c.program.is_empty() {
            Proc::spawn(&args, &log)
        } else {
            Proc::spawn_with(&c.program.clone(), &args, &log)
        });
    }

    /// SIGKILLs a client.
    pub fn kill_client(&mut self, name: &str) {
        self.client_mut(name).proc = None;
    }

    /// Sends `sig` to the server.
    pub fn signal_server(&self, sig: nix::sys::signal::Signal) {
        self.server.as_ref().unwrap().signal(sig);
    }

    /// Freezes or thaws a client (SIGSTOP / SIGCONT).
    pub fn signal_client(&self, name: &str, sig: nix::sys::signal::Signal) {
        self.client(name).proc.as_ref().unwrap().signal(sig);
    }

    /// All roots: the server's first, then each client's.
    pub fn roots(&self) -> Vec<PathBuf> {
        let mut r = vec![self.server_root()];
        r.extend(self.clients.iter().map(|c| c.root.clone()));
        r
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut names = vec!["server".to_string()];
        names.extend(self.clients.iter().map(|c| c.name.clone()));
        for n in names {
            let log = fs::read_to_string(self.dir.0.join(format!("{n}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            out += &format!("---- {n}.log (last {} lines)\n", tail.len());
            for l in tail.iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// True if all trees are identical (names, kinds, sizes, hashes, file mtimes, link
    /// targets).
    pub fn converged(&self) -> bool {
        let roots = self.roots();
        let first = snapshot(&roots[0]);
        roots[1..].iter().all(|r| snapshot(r) == first)
    }

    /// Explains how the trees differ.
    pub fn tree_diff(&self) -> String {
        let roots = self.roots();
        let first = snapshot(&roots[0]);
        let mut out = String::new();
        for r in &roots[1..] {
            let d = diff(&first, &snapshot(r));
            if !d.is_empty() {
                out += &format!("server vs {}:\n{d}", r.display());
            }
        }
        out
    }

    /// Waits until every tree is identical and `check` holds.
    pub fn wait_converged(&self, what: &str, check: impl Fn(&Cluster) -> bool) {
        wait_until(
            what,
            || self.converged() && check(self),
            || format!("{}\n{}", self.tree_diff(), self.logs()),
        );
    }

    /// Waits until `client` has journaled everything the server has committed so far (its
    /// status seq reaches the server's), so that a kill after this loses none of its base.
    /// Call it once what the client should have has arrived. A kill right after a file shows
    /// up can land between its rename and its journal record: the start then has to guess
    /// (see the client's `applying`), which is the crash tests' subject, not the others'.
    pub fn wait_recorded(&self, client: &str) {
        let seq = status_seq(&self.server_root()).expect("the server answers");
        wait_until(
            &format!("{client} has recorded the server's seq {seq}"),
            || status_seq(&self.root(client)).is_some_and(|n| n >= seq),
            || self.logs(),
        );
    }

    /// Lines in all logs that record a change sent, applied or committed.
    pub fn change_events(&self) -> usize {
        let mut n = 0;
        for e in fs::read_dir(&self.dir.0).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                n += text
                    .lines()
                    .filter(|l| {
                        l.split(|c: char| !c.is_alphanumeric())
                            .any(|w| w == "sent" || w == "applied" || w == "committed")
                    })
                    .count();
            }
        }
        n
    }
}

/// True if `root/rel` holds exactly `bytes`.
pub fn has(root: &Path, rel: &str, bytes: &[u8]) -> bool {
    read(root, rel).as_deref() == Some(bytes)
}
