//! The polling watcher: walk the tree every `poll_interval`, diff `lstat` results against the
//! previous walk, hint what differs.
//!
//! Android's default (see the parent module for why), `--watcher poll` on Linux, and the engine
//! behind inotify's fallback for directories the kernel's watch limit left unwatched. It never
//! reads file contents: the scanner hashes what is hinted.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, AtomicBool};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Hint, WatchConfig};
use crate::core::path::STATE_DIR;

/// Shortest interval honoured: zero would be a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;

/// What one walk remembers of an entry: enough to notice any change the scanner cares about.
///
/// 40 bytes, plus the boxed path (no spare capacity, unlike a `PathBuf`). `mode` carries the
/// file type bits, so a kind change shows without a separate field. `ctime` is kept too: it
/// moves on every content or metadata change even when a tool restores the old mtime
/// (`cp -p`, `rsync -t`, `touch -d`), at the price of 8 bytes.
///
/// Ideas if phones with huge trees make this too big: store names per directory (a tree of
/// `Box<OsStr>` instead of full paths, most of a path's bytes are its parents); or keep only a
/// 64-bit hash of the metadata per entry; or, since walks come out sorted, a front-coded path
/// list (shared-prefix length + suffix) in one arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
}

impl Meta {
    fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            mode: m.mode(),
        }
    }

    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    /// Whether the scanner should look again. A directory's size, mtime and ctime move whenever a
    /// child is added or removed; that child is hinted itself, and a directory hint makes the
    /// scanner walk the whole subtree, so for directories only identity and mode count.
    fn changed(&self, new: &Meta) -> bool {
        if self.is_dir() && new.is_dir() {
            self.ino != new.ino || self.mode != new.mode
        } else {
            self != new
        }
    }
}

/// The state of a tree (or subtree) at one walk: entries sorted by path, component-wise, so a
/// directory's subtree is contiguous and two snapshots diff in one merge pass.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    entries: Vec<(Box<Path>, Meta)>,
}

impl Snapshot {
    #[cfg(test)]
    fn paths(&self) -> Vec<&Path> {
        self.entries.iter().map(|(p, _)| &**p).collect()
    }
}

/// Walks a root, remembering which unreadable entries it already complained about.
#[derive(Debug)]
pub(crate) struct Walker {
    root: PathBuf,
    /// Paths already logged as unreadable, so a walk every few seconds logs each once.
    reported: HashSet<PathBuf>,
}

impl Walker {
    pub(crate) fn new(root: PathBuf) -> Walker {
        Walker {
            root,
            reported: HashSet::new(),
        }
    }

    /// Snapshots `sub` (relative to the root; empty for the whole tree) and everything under it,
    /// without following symlinks and skipping `<root>/.ferry`. Fails only when `sub` itself
    /// cannot be stat'ed; an unreadable entry further down is logged once and left out.
    pub(crate) fn snapshot(&mut self, sub: &Path) -> io::Result<Snapshot> {
        let mut entries = Vec::new();
        let mut stack = Vec::new();
        if sub.as_os_str().is_empty() {
            // The root itself may be a symlink to the real tree: that one is followed.
            if std::fs::metadata(&self.root)?.is_dir() {
                stack.push(PathBuf::new());
            }
        } else {
            let top = std::fs::symlink_metadata(self.root.join(sub))?;
            if top.is_dir() {
                stack.push(sub.to_path_buf());
            }
            entries.push((sub.into(), Meta::of(&top)));
        }
        while let Some(dir) = stack.pop() {
            let read = match std::fs::read_dir(self.root.join(&dir)) {
                Ok(r) => r,
                Err(e) => {
                    self.report(&dir, &e);
                    continue;
                }
            };
            for ent in read {
                let ent = match ent {
                    Ok(e) => e,
                    Err(e) => {
                        self.report(&dir, &e);
                        break;
                    }
                };
                let name = ent.file_name();
                if dir.as_os_str().is_empty() && name == STATE_DIR {
                    continue;
                }
                let rel = dir.join(&name);
                // On Unix `DirEntry::metadata` does not follow symlinks.
                let meta = match ent.metadata() {
                    Ok(m) => m,
                    Err(e) => {
                        self.report(&rel, &e);
                        continue;
                    }
                };
                if meta.is_dir() {
                    stack.push(rel.clone());
                }
                entries.push((rel.into_boxed_path(), Meta::of(&meta)));
            }
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        entries.shrink_to_fit();
        Ok(Snapshot { entries })
    }

    fn report(&mut self, rel: &Path, e: &io::Error) {
        // Vanished between listing and stat: the next walk reports it as removed.
        if e.kind() == io::ErrorKind::NotFound {
            return;
        }
        if self.reported.insert(rel.to_path_buf()) {
            log::warn!(
                "cannot read {}: {e}; changes there are not noticed",
                self.root.join(rel).display()
            );
        }
    }
}

/// Calls `hint` for every path that appeared, vanished or changed between `old` and `new`.
///
/// A directory that appeared, vanished or was replaced is hinted alone: the scanner walks (or
/// forgets) its whole subtree, so hints for each descendant would only repeat that work.
pub(crate) fn diff(old: &Snapshot, new: &Snapshot, mut hint: impl FnMut(&Path)) {
    let (old, new) = (&old.entries, &new.entries);
    let (mut i, mut j) = (0, 0);
    let mut covered: Option<&Path> = None;
    loop {
        let ord = match (old.get(i), new.get(j)) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.0.cmp(&b.0),
        };
        let (path, whole) = match ord {
            Ordering::Less => {
                let (p, m) = &old[i];
                i += 1;
                (&**p, m.is_dir())
            }
            Ordering::Greater => {
                let (p, m) = &new[j];
                j += 1;
                (&**p, m.is_dir())
            }
            Ordering::Equal => {
                let (p, a) = &old[i];
                let b = &new[j].1;
                i += 1;
                j += 1;
                if !a.changed(b) {
                    continue;
                }
                (&**p, a.is_dir() || b.is_dir())
            }
        };
        if covered.is_some_and(|c| path.starts_with(c)) {
            continue;
        }
        hint(path);
        if whole {
            covered = Some(path);
        }
    }
}

/// Sleeps for `d` unless `stop` is raised (the owner unparks the thread when it raises it).
/// Returns false once stopped.
pub(crate) fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(atomic::Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        // May wake early (unpark, spuriously): the loop re-checks both conditions.
        thread::park_timeout(end - now);
    }
}

/// A running poll loop; dropping it stops the thread at its next wake-up, which the drop
/// triggers at once.
#[derive(Debug)]
pub(crate) struct PollWatcher {
    stop: Arc<AtomicBool>,
    thread: thread::Thread,
}

impl Drop for PollWatcher {
    fn drop(&mut self) {
        self.stop.store(true, atomic::Ordering::Release);
        self.thread.unpark();
    }
}

/// Takes the first snapshot now (so changes after this returns are reported), then diffs a new
/// one every `cfg.poll_interval` on its own thread.
pub(crate) fn spawn(cfg: &WatchConfig, tx: async_channel::Sender<Hint>) -> io::Result<PollWatcher> {
    let mut walker = Walker::new(cfg.root.clone());
    let mut snap = walker.snapshot(Path::new(""))?;
    let interval = cfg.poll_interval.max(MIN_INTERVAL);
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let handle = thread::Builder::new()
        .name("ferry-poll".into())
        .spawn(move || {
            let mut failing = false;
            while nap(&thread_stop, interval) && !tx.is_closed() {
                let new = match walker.snapshot(Path::new("")) {
                    Ok(s) => s,
                    Err(e) => {
                        // Root gone or unmounted: keep the last snapshot, so whatever differs
                        // when it is back gets hinted.
                        if !failing {
                            log::warn!("cannot read {}: {e}", walker.root.display());
                            failing = true;
                        }
                        continue;
                    }
                };
                failing = false;
                let mut hints = Vec::new();
                diff(&snap, &new, |p| hints.push(p.to_path_buf()));
                snap = new;
                for p in hints {
                    if tx.send_blocking(Hint::Path(p)).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(PollWatcher {
        stop,
        thread: handle.thread().clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::time::SystemTime;

    use super::*;
    use crate::watch::testutil::{
        assert_closes, assert_hinted, assert_none_under, Hints, TempTree,
    };
    use crate::watch::Backend;

    fn start(t: &TempTree) -> (PollWatcher, Hints) {
        let (tx, rx) = async_channel::unbounded();
        let cfg = WatchConfig {
            root: t.root.clone(),
            backend: Backend::Poll,
            poll_interval: Duration::from_millis(50),
        };
        let w = spawn(&cfg, tx).unwrap();
        (w, Hints::new(rx, &t.root))
    }

    fn diffed(old: &Snapshot, new: &Snapshot) -> Vec<PathBuf> {
        let mut v = Vec::new();
        diff(old, new, |p| v.push(p.to_path_buf()));
        v
    }

    #[test]
    fn create_rewrite_delete_rename() {
        let t = TempTree::new("poll-files");
        let (_w, mut h) = start(&t);

        let seen = h.step(|| fs::write(t.path("f"), b"aaaa").unwrap());
        assert_hinted(&seen, &["f"]);

        // Same size, same inode: only the mtime tells.
        let seen = h.step(|| {
            let before = fs::metadata(t.path("f")).unwrap().modified().unwrap();
            fs::write(t.path("f"), b"bbbb").unwrap();
            let f = fs::File::options().write(true).open(t.path("f")).unwrap();
            f.set_modified(before + Duration::from_secs(7)).unwrap();
        });
        assert_hinted(&seen, &["f"]);

        let seen = h.step(|| fs::rename(t.path("f"), t.path("g")).unwrap());
        assert_hinted(&seen, &["f", "g"]);

        let seen = h.step(|| fs::remove_file(t.path("g")).unwrap());
        assert_hinted(&seen, &["g"]);
    }

    #[test]
    fn new_nested_dir_is_hinted_and_then_walked() {
        let t = TempTree::new("poll-nested");
        let (_w, mut h) = start(&t);

        let seen = h.step(|| {
            fs::create_dir_all(t.path("n/m")).unwrap();
            fs::write(t.path("n/m/f"), b"1").unwrap();
            fs::write(t.path("n/top"), b"2").unwrap();
        });
        // The scanner walks a new directory, so "n" stands for its subtree.
        assert_hinted(&seen, &["n"]);

        // Later changes deep inside are seen: the walk recurses into what it found.
        let seen = h.step(|| fs::write(t.path("n/m/g"), b"3").unwrap());
        assert_hinted(&seen, &["n/m/g"]);
        assert!(!seen.contains(Path::new("n")), "{seen:?}");

        let seen = h.step(|| fs::remove_dir_all(t.path("n")).unwrap());
        assert_hinted(&seen, &["n"]);
    }

    #[test]
    fn skips_state_dir_and_does_not_follow_symlinks() {
        let t = TempTree::new("poll-skip");
        fs::create_dir(t.path(".ferry")).unwrap();
        fs::write(t.outside.join("x"), b"x").unwrap();
        let (_w, mut h) = start(&t);

        let seen = h.step(|| {
            fs::write(t.path(".ferry/state"), b"s").unwrap();
            std::os::unix::fs::symlink(&t.outside, t.path("link")).unwrap();
        });
        assert_none_under(&seen, ".ferry");
        assert_hinted(&seen, &["link"]);

        let seen = h.step(|| fs::write(t.outside.join("y"), b"y").unwrap());
        assert_none_under(&seen, "link");
        assert_none_under(&seen, ".ferry");
    }

    #[test]
    fn drop_stops_the_thread() {
        let t = TempTree::new("poll-drop");
        let (w, h) = start(&t);
        drop(w);
        assert_closes(&h.rx);
    }

    #[test]
    fn diff_hints_changes_not_directory_churn() {
        let t = TempTree::new("poll-diff");
        fs::create_dir_all(t.path("d/e")).unwrap();
        fs::write(t.path("d/keep"), b"k").unwrap();
        let mut walker = Walker::new(t.root.clone());
        let a = walker.snapshot(Path::new("")).unwrap();
        assert_eq!(
            a.paths(),
            [Path::new("d"), Path::new("d/e"), Path::new("d/keep")]
        );
        assert!(diffed(&a, &a).is_empty());

        // A new file changes its directory's mtime; only the file is hinted.
        fs::write(t.path("d/new"), b"n").unwrap();
        let dir = fs::File::open(t.path("d")).unwrap();
        dir.set_modified(SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        let b = walker.snapshot(Path::new("")).unwrap();
        assert_eq!(diffed(&a, &b), [PathBuf::from("d/new")]);

        // A vanished directory is hinted once, not once per descendant.
        fs::remove_dir_all(t.path("d")).unwrap();
        let c = walker.snapshot(Path::new("")).unwrap();
        assert_eq!(diffed(&b, &c), [PathBuf::from("d")]);

        // A subtree snapshot includes its top.
        fs::create_dir_all(t.path("s/t")).unwrap();
        let s = walker.snapshot(Path::new("s")).unwrap();
        assert_eq!(s.paths(), [Path::new("s"), Path::new("s/t")]);
        assert!(walker.snapshot(Path::new("gone")).is_err());
    }
}
