//! Seeded randomized convergence: one server and three clients (two inotify, one poll) while
//! random file and directory operations land on random replicas, with kill -9 restarts and
//! edits made while an agent is down mixed in. At the end every tree must be identical and no
//! write the test made may be lost: its bytes are at its path or in a conflict copy somewhere,
//! unless a later operation may legitimately have superseded it (see `check_no_lost_write`).
//!
//! `FERRY_SEED=<seed>[,<seed>...]` replays seeds (decimal or 0x-hex), `FERRY_RANDOM_OPS=<n>`
//! sets the operation count per seed (default 2000). A seed fixes every random choice, but the
//! agents run concurrently, so what a choice finds on disk (and so the exact run) can differ
//! between replays. Each run writes its operations to `ops.log` in its temporary directory
//! (kept when the test fails, or always with `FERRY_KEEP_TMP=1`), beside the agents' logs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};

use super::util::*;

/// Seeds run when `FERRY_SEED` is not set.
const DEFAULT_SEEDS: &[u64] = &[0x5eed_0001, 0x5eed_0002];
/// Operations per seed when `FERRY_RANDOM_OPS` is not set.
const DEFAULT_OPS: usize = 2000;

const CLIENTS: &[(&str, Watch)] = &[("a", Watch::Auto), ("b", Watch::Poll), ("c", Watch::Auto)];
/// Replica names, in the order of `Cluster::roots()`.
const REPLICAS: &[&str] = &["server", "a", "b", "c"];

/// Directory and file names come from two small, disjoint alphabets, so operations on
/// different replicas collide (and conflict) often, but a file and a directory never claim
/// the same name. Some file names have extensions, to exercise conflict-copy naming.
const DIRS: &[&str] = &["d0", "d1", "d2", "d3"];
const FILES: &[&str] = &[
    "f0",
    "f1",
    "f2",
    "f3.txt",
    "f4.txt",
    "f5.md",
    "f6.tar.gz",
    "f7",
];
/// Directories are nested at most this deep (by the test; concurrent directory renames on
/// different replicas may nest deeper, which is fine).
const MAX_DEPTH: usize = 3;

/// splitmix64: small, good enough, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A random element, `None` if there is none.
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Create,
    Overwrite,
    Append,
    Truncate,
    Delete,
    RenameFile,
    Mkdir,
    Rmdir,
    RenameDir,
    /// Not an operation on a tree: an agent was killed (paths empty).
    Kill,
}

impl Kind {
    fn is_write(self) -> bool {
        matches!(
            self,
            Kind::Create | Kind::Overwrite | Kind::Append | Kind::Truncate
        )
    }

    fn is_rename(self) -> bool {
        matches!(self, Kind::RenameFile | Kind::RenameDir)
    }
}

/// How often each operation is tried, relative to the others.
const WEIGHTS: &[(Kind, u64)] = &[
    (Kind::Create, 20),
    (Kind::Overwrite, 10),
    (Kind::Append, 8),
    (Kind::Truncate, 6),
    (Kind::Delete, 9),
    (Kind::RenameFile, 10),
    (Kind::Mkdir, 10),
    (Kind::Rmdir, 6),
    (Kind::RenameDir, 5),
];

/// Size and (snapshot-style) hash of the bytes a write left in a file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Content {
    size: u64,
    hash: String,
}

impl Content {
    fn of(bytes: &[u8]) -> Content {
        Content {
            size: bytes.len() as u64,
            hash: blake3::hash(bytes).to_hex()[..16].to_string(),
        }
    }
}

/// What an operation did, as far as the test knows.
#[derive(Debug)]
struct Done {
    kind: Kind,
    /// The path it acted on; for renames, source then target.
    paths: Vec<String>,
    /// For a write: what the file held right after it. `None` if an agent replaced the file
    /// while the test was writing it (the test's bytes went to the replaced inode, so they
    /// are legitimately gone); the write still counts as touching the path.
    content: Option<Content>,
}

/// One operation in the run's global order.
#[derive(Debug)]
struct Record {
    idx: usize,
    /// Incremented each time the test saw every tree identical: operations in different
    /// epochs cannot race with each other.
    epoch: usize,
    replica: usize,
    done: Done,
}

/// The state of one run, and the context every failure message carries.
struct Run {
    seed: u64,
    ops: usize,
    cl: Cluster,
    roots: Vec<PathBuf>,
    rng: Rng,
    records: Vec<Record>,
    epoch: usize,
    ops_log: fs::File,
    started: Instant,
}

#[test]
fn random_operations_converge_without_lost_writes() {
    let ops = match std::env::var("FERRY_RANDOM_OPS") {
        Ok(s) => s.trim().parse().expect("FERRY_RANDOM_OPS is a number"),
        Err(_) => DEFAULT_OPS,
    };
    let seeds: Vec<u64> = match std::env::var("FERRY_SEED") {
        Ok(s) => s.split(',').map(parse_seed).collect(),
        Err(_) => DEFAULT_SEEDS.to_vec(),
    };
    for seed in seeds {
        Run::new(seed, ops).run();
    }
}

fn parse_seed(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .unwrap_or_else(|_| panic!("FERRY_SEED {s:?} is not a number"))
}

impl Run {
    fn new(seed: u64, ops: usize) -> Run {
        eprintln!("random: FERRY_SEED={seed} FERRY_RANDOM_OPS={ops}");
        let cl = Cluster::start(&format!("random-{seed}"), CLIENTS);
        let roots = cl.roots();
        assert_eq!(roots.len(), REPLICAS.len());
        let ops_log = fs::File::create(cl.dir.0.join("ops.log")).unwrap();
        Run {
            seed,
            ops,
            cl,
            roots,
            rng: Rng(seed),
            records: Vec::new(),
            epoch: 0,
            ops_log,
            started: Instant::now(),
        }
    }

    /// What every failure message starts with: how to replay this run, and where its files are.
    fn ctx(&self) -> String {
        format!(
            "FERRY_SEED={} FERRY_RANDOM_OPS={} (temp dir {}, op log ops.log there)",
            self.seed,
            self.ops,
            self.cl.dir.0.display()
        )
    }

    fn run(mut self) {
        let mut done = 0;
        let mut kills = 0;
        let mut waits = 0;
        while done < self.ops {
            // About one kill -9 and restart per 100 operations.
            if self.rng.one_in(100) {
                done += self.kill_and_restart();
                kills += 1;
            }
            let replica = self.rng.below(REPLICAS.len() as u64) as usize;
            if self.random_op(replica) {
                done += 1;
            }
            // Sometimes let everything settle (quiet interleavings), mostly not (racy ones).
            if self.rng.one_in(25) {
                self.settle("the trees converge between operations");
                waits += 1;
            }
            // A tiny random pause, only so that where the agents are when the next operation
            // lands varies between operations; nothing relies on it for synchronisation.
            std::thread::sleep(Duration::from_micros(self.rng.below(5_001)));
        }
        self.settle("the trees converge after the last operation");
        self.check_alive();
        assert!(
            self.cl.converged(),
            "{}: the trees differ at the end\n{}",
            self.ctx(),
            self.cl.tree_diff()
        );
        let (checked, superseded, raced) = self.check_no_lost_write();
        eprintln!(
            "random: FERRY_SEED={} done: {} operations ({} kill/restarts, {} waits) in {:.1?}; \
             no lost write among {checked} surviving writes ({superseded} superseded, {raced} \
             raced with an agent, not checked)",
            self.seed,
            self.records.len(),
            kills,
            waits,
            self.started.elapsed(),
        );
    }

    /// SIGKILLs the server or a client, makes a few operations while it is down (most on its
    /// own tree: offline edits), and starts it again. Returns the number of operations made.
    fn kill_and_restart(&mut self) -> usize {
        let victim = self.rng.below(REPLICAS.len() as u64) as usize;
        if victim == 0 {
            self.cl.kill_server();
        } else {
            self.cl.kill_client(REPLICAS[victim]);
        }
        self.record(
            victim,
            Done {
                kind: Kind::Kill,
                paths: Vec::new(),
                content: None,
            },
        );
        let mut n = 0;
        for _ in 0..self.rng.below(5) {
            let replica = if self.rng.one_in(3) {
                self.rng.below(REPLICAS.len() as u64) as usize
            } else {
                victim
            };
            if self.random_op(replica) {
                n += 1;
            }
        }
        if victim == 0 {
            self.cl.start_server();
        } else {
            self.cl.start_client(REPLICAS[victim]);
        }
        n
    }

    /// Tries random operations on `replica` until one's precondition holds and it succeeds;
    /// gives up (false) after a few tries.
    fn random_op(&mut self, replica: usize) -> bool {
        let total: u64 = WEIGHTS.iter().map(|(_, w)| w).sum();
        for _ in 0..50 {
            let mut x = self.rng.below(total);
            let kind = WEIGHTS
                .iter()
                .find(|(_, w)| {
                    if x < *w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .unwrap()
                .0;
            let root = self.roots[replica].clone();
            if let Some(done) = try_op(&mut self.rng, &root, kind) {
                self.record(replica, done);
                return true;
            }
        }
        false
    }

    fn record(&mut self, replica: usize, done: Done) {
        let idx = self.records.len();
        let content = match (&done.content, done.kind.is_write()) {
            (Some(c), _) => format!(" -> {} bytes {}", c.size, c.hash),
            (None, true) => " -> raced with an agent replacing the file".to_string(),
            (None, false) => String::new(),
        };
        writeln!(
            self.ops_log,
            "{idx:5} e{:<3} {:>6} {:?} {}{content}",
            self.epoch,
            REPLICAS[replica],
            done.kind,
            done.paths.join(" -> "),
        )
        .unwrap();
        self.records.push(Record {
            idx,
            epoch: self.epoch,
            replica,
            done,
        });
    }

    /// Fails if an agent has exited (none should, even with all this going on).
    fn check_alive(&mut self) {
        let mut dead = Vec::new();
        if let Some(st) = self.cl.server_exited() {
            dead.push(format!("server ({st})"));
        }
        for (name, _) in CLIENTS {
            if let Some(st) = self.cl.client_exited(name) {
                dead.push(format!("{name} ({st})"));
            }
        }
        assert!(
            dead.is_empty(),
            "{}: agents exited: {}\n{}",
            self.ctx(),
            dead.join(", "),
            self.cl.logs()
        );
    }

    /// Waits (bounded by `DEADLINE`) until every tree is identical; starts a new epoch.
    fn settle(&mut self, what: &str) {
        let end = Instant::now() + DEADLINE;
        loop {
            self.check_alive();
            if self.cl.converged() {
                break;
            }
            if Instant::now() >= end {
                panic!(
                    "{}: timed out after {} operations waiting until {what}\n{}\n{}",
                    self.ctx(),
                    self.records.len(),
                    self.cl.tree_diff(),
                    self.cl.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        writeln!(
            self.ops_log,
            "      -- converged: epoch {} ends",
            self.epoch
        )
        .unwrap();
        self.epoch += 1;
    }

    /// Every write that no later operation may have superseded must have left its bytes
    /// somewhere in the (converged) final tree: at its path, in a conflict copy, or wherever a
    /// racing rename took it. Returns (checked, superseded, raced) counts.
    ///
    /// For each path, only the last write the test made to it (on any replica) is a candidate.
    /// It is excluded (not checked) when any later operation, on any replica, acted on a place
    /// where its bytes may be: the path itself or one of its parent directories, and the places
    /// renames made earlier in the same epoch may move it to (a rename made on one replica
    /// before the write on another can still be applied after it). A later delete, rename,
    /// rmdir, overwrite, append or truncate there may have been made by a replica that had
    /// already received the write, which supersedes it legitimately; the test cannot tell, so
    /// it does not check. Later mkdirs are not counted: creating a directory cannot remove a
    /// file. Earlier deletes, writes and rmdirs on other replicas are not counted either: they
    /// were made without having seen this write, and losing it to them would be a bug (modify
    /// beats delete; both sides of a conflict are kept).
    fn check_no_lost_write(&self) -> (usize, usize, usize) {
        let snap = snapshot(&self.roots[0]);
        let present: BTreeSet<Content> = snap
            .values()
            .filter_map(|n| match n {
                Node::File { size, hash, .. } => Some(Content {
                    size: *size,
                    hash: hash.clone(),
                }),
                Node::Dir | Node::Link(_) => None,
            })
            .collect();
        let mut last: BTreeMap<&str, &Record> = BTreeMap::new();
        for r in &self.records {
            if r.done.kind.is_write() {
                last.insert(&r.done.paths[0], r);
            }
        }
        let (mut checked, mut superseded, mut raced) = (0, 0, 0);
        let mut lost = String::new();
        for (path, w) in last {
            let Some(content) = &w.done.content else {
                raced += 1;
                continue;
            };
            let places = self.places(path, w);
            let later = self.records[w.idx + 1..].iter().find(|r| {
                r.done.kind != Kind::Mkdir
                    && r.done
                        .paths
                        .iter()
                        .any(|p| places.iter().any(|l| covers(p, l)))
            });
            if later.is_some() {
                superseded += 1;
                continue;
            }
            checked += 1;
            if !present.contains(content) {
                let _ = writeln!(
                    lost,
                    "  op {} ({:?} on {}): {path} = {} bytes {} is nowhere in the final tree \
                     (places it may have been moved to: {places:?})",
                    w.idx, w.done.kind, REPLICAS[w.replica], content.size, content.hash
                );
                for r in self.records.iter().filter(|r| {
                    r.done
                        .paths
                        .iter()
                        .any(|p| places.iter().any(|l| covers(p, l) || covers(l, p)))
                }) {
                    let _ = writeln!(
                        lost,
                        "      op {} e{} {} {:?} {}{}",
                        r.idx,
                        r.epoch,
                        REPLICAS[r.replica],
                        r.done.kind,
                        r.done.paths.join(" -> "),
                        match &r.done.content {
                            Some(c) => format!(" -> {} bytes {}", c.size, c.hash),
                            None => String::new(),
                        }
                    );
                }
            }
        }
        assert!(
            lost.is_empty(),
            "{}: lost writes:\n{lost}final tree:\n{}\n{}",
            self.ctx(),
            snap.iter()
                .map(|(k, v)| format!("  {k} {v:?}\n"))
                .collect::<String>(),
            self.cl.logs()
        );
        (checked, superseded, raced)
    }

    /// Where the bytes of write `w` to `path` may be once every rename is applied: the path,
    /// and where renames made in the same epoch before it (on any replica, so possibly applied
    /// after it) may have moved it, transitively.
    fn places(&self, path: &str, w: &Record) -> Vec<String> {
        let renames: Vec<&Record> = self.records[..w.idx]
            .iter()
            .filter(|r| r.epoch == w.epoch && r.done.kind.is_rename())
            .collect();
        let mut places = vec![path.to_string()];
        loop {
            let mut grew = false;
            for r in &renames {
                let (from, to) = (&r.done.paths[0], &r.done.paths[1]);
                for l in places.clone() {
                    if covers(from, &l) {
                        let moved = format!("{to}{}", &l[from.len()..]);
                        // Crossed directory renames can nest without end; that deep, the
                        // rest adds nothing.
                        if moved.split('/').count() <= 12 && !places.contains(&moved) {
                            places.push(moved);
                            grew = true;
                        }
                    }
                }
            }
            if !grew {
                return places;
            }
        }
    }
}

/// True if `p` is `l` or one of its parent directories.
fn covers(p: &str, l: &str) -> bool {
    l == p || (l.len() > p.len() && l.starts_with(p) && l.as_bytes()[p.len()] == b'/')
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn depth(dir: &str) -> usize {
    if dir.is_empty() {
        0
    } else {
        dir.split('/').count()
    }
}

/// The test's view of one tree: its directories ("" is the root) and files with names from
/// the alphabets (so never `.ferry`, and never a conflict copy: those are the agents').
struct View {
    dirs: Vec<String>,
    files: Vec<String>,
}

fn view(root: &Path) -> View {
    fn walk(root: &Path, rel: &str, v: &mut View) {
        let Ok(rd) = fs::read_dir(root.join(rel)) else {
            return;
        };
        let mut entries: Vec<(String, fs::FileType)> = rd
            .flatten()
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.file_type().ok()?)))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, ty) in entries {
            let path = join(rel, &name);
            if ty.is_dir() && DIRS.contains(&name.as_str()) && depth(rel) < 12 {
                v.dirs.push(path.clone());
                walk(root, &path, v);
            } else if ty.is_file() && FILES.contains(&name.as_str()) {
                v.files.push(path);
            }
        }
    }
    let mut v = View {
        dirs: vec![String::new()],
        files: Vec::new(),
    };
    walk(root, "", &mut v);
    v
}

/// Random bytes for a write: mostly small, sometimes empty, sometimes up to 64 KiB.
fn content(rng: &mut Rng) -> Vec<u8> {
    let len = match rng.below(10) {
        0 => 0,
        1 => rng.below(64 * 1024 + 1),
        _ => rng.below(512) + 1,
    };
    noise(len as usize, rng.next())
}

/// Makes one operation of `kind` on `root` if its precondition holds there; `None` (nothing
/// done) if it does not, or if the tree changed under the test so that it failed.
fn try_op(rng: &mut Rng, root: &Path, kind: Kind) -> Option<Done> {
    let v = view(root);
    let at = |rel: &str| root.join(rel);
    let (paths, content) = match kind {
        Kind::Create => {
            let dir = rng.pick(&v.dirs)?;
            let path = join(dir, rng.pick(FILES)?);
            if v.files.contains(&path) {
                return None;
            }
            let c = write_file(&at(&path), &Mode::Create(content(rng))).ok()?;
            (vec![path], c)
        }
        Kind::Overwrite | Kind::Append | Kind::Truncate => {
            let path = rng.pick(&v.files)?.clone();
            let mode = match kind {
                Kind::Overwrite => Mode::Overwrite(content(rng)),
                Kind::Append => {
                    let len = rng.below(256) + 1;
                    Mode::Append(noise(len as usize, rng.next()))
                }
                _ => Mode::Truncate(rng.next()),
            };
            let c = write_file(&at(&path), &mode).ok()?;
            (vec![path], c)
        }
        Kind::Delete => {
            let path = rng.pick(&v.files)?.clone();
            fs::remove_file(at(&path)).ok()?;
            (vec![path], None)
        }
        Kind::RenameFile => {
            let from = rng.pick(&v.files)?.clone();
            let to = join(rng.pick(&v.dirs)?, rng.pick(FILES)?);
            if from == to || v.files.contains(&to) {
                return None;
            }
            rename_noreplace(&at(&from), &at(&to))?;
            (vec![from, to], None)
        }
        Kind::Mkdir => {
            let parents: Vec<&String> = v.dirs.iter().filter(|d| depth(d) < MAX_DEPTH).collect();
            let path = join(rng.pick(&parents)?, rng.pick(DIRS)?);
            if v.dirs.contains(&path) {
                return None;
            }
            fs::create_dir(at(&path)).ok()?;
            (vec![path], None)
        }
        Kind::Rmdir => {
            let dir = rng.pick(&v.dirs[1..])?.clone();
            // Only an empty directory: remove_dir refuses anything else, atomically.
            fs::remove_dir(at(&dir)).ok()?;
            (vec![dir], None)
        }
        Kind::RenameDir => {
            let from = rng.pick(&v.dirs[1..])?.clone();
            // How deep the moved subtree is, counting `from` itself.
            let height = v
                .dirs
                .iter()
                .filter(|d| covers(&from, d))
                .map(|d| depth(d) - depth(&from) + 1)
                .max()
                .unwrap_or(1);
            let parents: Vec<&String> = v
                .dirs
                .iter()
                .filter(|d| !covers(&from, d) && depth(d) + height <= MAX_DEPTH)
                .collect();
            let to = join(rng.pick(&parents)?, rng.pick(DIRS)?);
            if v.dirs.contains(&to) {
                return None;
            }
            rename_noreplace(&at(&from), &at(&to))?;
            (vec![from, to], None)
        }
        Kind::Kill => unreachable!("not an operation on a tree"),
    };
    Some(Done {
        kind,
        paths,
        content,
    })
}

/// A rename that never replaces anything (an agent may have created the target since the
/// test looked).
fn rename_noreplace(from: &Path, to: &Path) -> Option<()> {
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).ok()
}

enum Mode {
    /// A new file (never replacing one an agent may have created since the test looked).
    Create(Vec<u8>),
    Overwrite(Vec<u8>),
    Append(Vec<u8>),
    /// Shorter, or (one time in three) to zero; the number picks the new length.
    Truncate(u64),
}

/// Writes through one file descriptor and reads back what that inode holds, so the content
/// recorded is exactly what the test left, whatever it held before. `Ok(None)` if the inode
/// is no longer the one at `path` afterwards: an agent renamed another file over it while the
/// test was writing, so the test's bytes are legitimately gone.
fn write_file(path: &Path, mode: &Mode) -> std::io::Result<Option<Content>> {
    let mut opts = fs::OpenOptions::new();
    opts.read(true).write(true);
    match mode {
        Mode::Create(_) => opts.create_new(true),
        Mode::Overwrite(_) => opts.truncate(true),
        Mode::Append(_) => opts.append(true),
        Mode::Truncate(_) => &mut opts,
    };
    let mut f = opts.open(path)?;
    match mode {
        Mode::Create(bytes) | Mode::Overwrite(bytes) | Mode::Append(bytes) => f.write_all(bytes)?,
        Mode::Truncate(pick) => {
            let len = f.metadata()?.len();
            if len == 0 {
                return Err(std::io::Error::other("nothing to truncate"));
            }
            let new = if pick % 3 == 0 { 0 } else { pick % len };
            f.set_len(new)?;
        }
    }
    f.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let same = fs::symlink_metadata(path).is_ok_and(|m| m.ino() == f.metadata().unwrap().ino());
    Ok(same.then(|| Content::of(&bytes)))
}
