//! The inotify watcher (Linux default): one watch per directory, events turned into hints on a
//! dedicated thread doing blocking reads.
//!
//! inotify is not recursive, names events by (watch descriptor, name) rather than by path, and
//! keeps a watch on a directory's inode when the directory is renamed; so this module keeps a
//! two-way map between watch descriptors and relative paths, adds watches for directories as
//! they appear, rewrites the map when a watched directory moves inside the tree, and drops the
//! watches of one that moves out. Where the kernel's watch limit runs out, the directories left
//! unwatched are polled instead (see [`Fallback`]).
//!
//! Ignored directories (`crate::ignore`) are not watched: the watcher keeps its own copy of the
//! rules, read from the `.ferryignore` files as it lists directories, and when one of those
//! files changes it drops the watches its rules now exclude and watches what they let back in.
//! (Ignored *files* are still hinted; the scanner drops those hints.)
//!
//! Files the agent itself puts in place are renamed in from `.ferry/tmp`, and the agent records
//! each in its scan cache as it does; so an arrival whose departure was from there (the cookie
//! of a MOVED_FROM seen by a watch on `.ferry/tmp` that asks for nothing else) is not hinted:
//! looking again would only find what the cache has. Anything done to the file after that has
//! events of its own.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{self, AtomicBool};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use inotify::{Event, EventMask, Inotify, WatchDescriptor, WatchMask, Watches};

use super::poll::{hint_every, PollWatcher};
use super::{Hint, WatchConfig};
use crate::core::path::STATE_DIR;
use crate::ignore::{Rules, IGNORE_FILE};

/// How long a MOVED_FROM waits for the MOVED_TO with its cookie. The kernel queues
/// the two back to back within one rename, but a read can fall between them.
const PAIR_GRACE: Duration = Duration::from_millis(20);

/// How many cookies of renames out of `.ferry/tmp` wait for their MOVED_TO. The two events are
/// queued back to back, so only a rename whose arrival is not watched (a directory left to the
/// fallback poller) leaves one unmatched: the oldest goes.
const OWN_MOVES: usize = 64;

/// Room for a few hundred events per read.
const BUF_LEN: usize = 64 * 1024;

/// In a storm (a first sync, a large copy: reads that bring events less than `STORM` apart),
/// the thread pauses this long after each read before reading again, so the storm's events
/// gather in the kernel's queue and come in one read. A reader blocked in `read` is woken by
/// every event, and on a virtual machine each wake-up costs the writer more than its rename: a
/// tenth of a first sync's time went there. Outside a storm nothing waits, so the close that
/// follows a file's creation is read as soon as it happens.
const PACE: Duration = Duration::from_millis(1);
const STORM: Duration = Duration::from_millis(5);

/// What every directory watch asks for. No IN_MODIFY: a file is hinted when the writer closes
/// it, so half-written files are not uploaded. IN_ONLYDIR makes a watch on something that
/// turned out not to be a directory fail instead of watching a file.
fn watch_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ATTRIB
        | WatchMask::ONLYDIR
}

/// A running inotify watcher. Dropping it raises the stop flag and removes the root's watch,
/// whose IN_IGNORED event wakes the thread out of its blocking read.
#[derive(Debug)]
pub(crate) struct InotifyWatcher {
    stop: Arc<AtomicBool>,
    watches: Watches,
    root_wd: WatchDescriptor,
    fallback: Arc<Fallback>,
    /// The inotify descriptor, for tests to count its watches in /proc/self/fdinfo.
    #[cfg(test)]
    fd: std::os::fd::RawFd,
}

impl Drop for InotifyWatcher {
    fn drop(&mut self) {
        self.stop.store(true, atomic::Ordering::Release);
        // Fails if the root is gone (its watch went with it); the thread then lingers until its
        // next event, as documented on `Watcher`.
        let _ = self.watches.remove(self.root_wd.clone());
        self.fallback.halt();
    }
}

/// Starts watching `cfg.root`; returns once every directory is watched (or, past the watch
/// limit, handed to the fallback poller).
pub(crate) fn spawn(
    cfg: &WatchConfig,
    tx: async_channel::Sender<Vec<Hint>>,
) -> io::Result<InotifyWatcher> {
    spawn_limited(cfg, tx, None)
}

/// `spawn`, with `fake_limit` pretending the kernel allows only that many watches (tests).
fn spawn_limited(
    cfg: &WatchConfig,
    tx: async_channel::Sender<Vec<Hint>>,
    fake_limit: Option<usize>,
) -> io::Result<InotifyWatcher> {
    let inotify = Inotify::init()?;
    let mut state = State::new(cfg, &inotify, tx.clone(), fake_limit);
    let (stop, fallback) = (Arc::new(AtomicBool::new(false)), state.fallback.clone());
    // The root's own watch must work; failures below it are logged and survived.
    let root_wd = state.add_watch(Path::new(""))?;
    state.watch_own_moves();
    state.add_tree(Path::new(""));
    let watches = inotify.watches();
    #[cfg(test)]
    let inotify_fd = std::os::fd::AsRawFd::as_raw_fd(&inotify);
    let thread_stop = stop.clone();
    if let Err(e) = thread::Builder::new()
        .name("ferry-inotify".into())
        .spawn(move || state.run(inotify, &thread_stop, &tx))
    {
        // The fallback poller may be running already.
        fallback.halt();
        return Err(e);
    }
    Ok(InotifyWatcher {
        stop,
        #[cfg(test)]
        fd: inotify_fd,
        watches,
        root_wd,
        fallback,
    })
}

/// A path that left (MOVED_FROM): its path, when, and for a directory the watches that went
/// with it (`None` for a file).
type Pending = (PathBuf, Instant, Option<Vec<(PathBuf, WatchDescriptor)>>);

/// The watcher thread's state.
struct State {
    root: PathBuf,
    watches: Watches,
    /// Each watch and the directory (relative to the root) it is on now.
    by_wd: HashMap<WatchDescriptor, PathBuf>,
    /// The same, by path; ordered so a directory's subtree is one contiguous range.
    by_path: BTreeMap<PathBuf, WatchDescriptor>,
    /// Paths seen leaving (MOVED_FROM) whose arrival (MOVED_TO) is not yet seen, by cookie.
    /// Hints wait while any is pending, so both halves of a rename reach the scanner together
    /// (apart, it sees a delete and a create).
    pending: HashMap<u32, Pending>,
    fallback: Arc<Fallback>,
    warned_limit: bool,
    fake_limit: Option<usize>,
    /// Hints held back while a directory's MOVED_FROM waits for its pair, so that by the time a
    /// later hint is sent the watches of a directory moved out are gone.
    out: Vec<Hint>,
    /// Which directories not to watch (the scanner holds the rules that decide what syncs).
    rules: Rules,
    /// The watch on `.ferry/tmp` (MOVED_FROM only), if it could be made.
    tmp_wd: Option<WatchDescriptor>,
    /// Cookies of renames out of `.ferry/tmp` whose MOVED_TO is still to come (at most
    /// `OWN_MOVES`).
    own_moves: VecDeque<u32>,
}

impl State {
    fn new(
        cfg: &WatchConfig,
        inotify: &Inotify,
        tx: async_channel::Sender<Vec<Hint>>,
        fake_limit: Option<usize>,
    ) -> State {
        let fallback = Arc::new(Fallback {
            interval: cfg.poll_interval,
            tx,
            subtrees: Arc::new(Mutex::new(BTreeSet::new())),
            poller: Mutex::new(None),
        });
        State {
            root: cfg.root.clone(),
            watches: inotify.watches(),
            by_wd: HashMap::new(),
            by_path: BTreeMap::new(),
            pending: HashMap::new(),
            fallback,
            warned_limit: false,
            fake_limit,
            out: Vec::new(),
            rules: Rules::new().quiet(),
            tmp_wd: None,
            own_moves: VecDeque::new(),
        }
    }

    /// Watches `.ferry/tmp` for the agent's own renames out of it (see the module's comment).
    /// Without that watch (no such directory, no watch left) every arrival is hinted.
    fn watch_own_moves(&mut self) {
        let tmp = crate::fsops::tmp_dir(&self.root);
        let mask = WatchMask::MOVED_FROM | WatchMask::ONLYDIR | WatchMask::DONT_FOLLOW;
        self.tmp_wd = self.watches.add(tmp, mask).ok();
    }

    fn run(
        mut self,
        mut inotify: Inotify,
        stop: &AtomicBool,
        tx: &async_channel::Sender<Vec<Hint>>,
    ) {
        let mut buf = vec![0; BUF_LEN];
        let mut last_read: Option<Instant> = None;
        loop {
            // While a MOVED_FROM waits for its pair, read without blocking so it can time out.
            let read = if self.pending.is_empty() {
                inotify.read_events_blocking(&mut buf)
            } else {
                inotify.read_events(&mut buf)
            };
            if stop.load(atomic::Ordering::Acquire) {
                return;
            }
            let mut got_events = false;
            match read {
                Ok(events) => {
                    for ev in events {
                        got_events = true;
                        self.handle(ev);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!("reading inotify events failed: {e}; the watcher stops");
                    let _ = tx.send_blocking(vec![Hint::Rescan]);
                    return;
                }
            }
            self.expire_pending();
            // One batch per read: the hints of one rename (MOVED_FROM, MOVED_TO) must reach the
            // scanner together, or it sees a delete and a create instead of a rename.
            if self.pending.is_empty()
                && !self.out.is_empty()
                && tx.send_blocking(std::mem::take(&mut self.out)).is_err()
            {
                return;
            }
            // Paced by reads, not by hints sent: the agent's own installs bring events but no
            // hints, and each read of them is a wake-up all the same.
            if got_events {
                let now = Instant::now();
                if last_read.is_some_and(|at| now.duration_since(at) < STORM) {
                    thread::sleep(PACE);
                }
                last_read = Some(now);
            }
        }
    }

    fn handle(&mut self, ev: Event<&OsStr>) {
        let mask = ev.mask;
        if mask.contains(EventMask::Q_OVERFLOW) {
            log::warn!("inotify queue overflowed; rescanning everything");
            self.out.push(Hint::Rescan);
            self.rebuild();
            return;
        }
        if self.tmp_wd.as_ref() == Some(&ev.wd) {
            if mask.contains(EventMask::IGNORED) {
                self.tmp_wd = None;
            } else if mask.contains(EventMask::MOVED_FROM) && !mask.contains(EventMask::ISDIR) {
                if self.own_moves.len() == OWN_MOVES {
                    self.own_moves.pop_front();
                }
                self.own_moves.push_back(ev.cookie);
            }
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.forget_wd(&ev.wd);
            return;
        }
        // Unknown: a watch already dropped (moved out, rebuilt) whose events were queued.
        let Some(dir) = self.by_wd.get(&ev.wd).cloned() else {
            return;
        };
        let Some(name) = ev.name else {
            // About the watched directory itself. Its parent reports it by name, except for the
            // root, which has no parent watch.
            if dir.as_os_str().is_empty()
                && mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::UNMOUNT)
            {
                log::warn!(
                    "the synced root {} was moved, deleted or unmounted",
                    self.root.display()
                );
                self.out.push(Hint::Rescan);
            }
            return;
        };
        if dir.as_os_str().is_empty() && name == STATE_DIR {
            return;
        }
        let rel = dir.join(name);
        let is_dir = mask.contains(EventMask::ISDIR);
        if !is_dir && name == IGNORE_FILE {
            // Created, written, moved or deleted: the rules of `dir` may have changed.
            self.rules_changed(&dir);
        }
        if mask.contains(EventMask::MOVED_FROM) {
            let left = is_dir.then(|| self.watches_under(&rel));
            self.pending
                .insert(ev.cookie, (rel.clone(), Instant::now(), left));
            self.out.push(Hint::Path(rel));
        } else if mask.contains(EventMask::MOVED_TO) {
            if !is_dir && self.own_move(ev.cookie) {
                return;
            }
            let from = self.pending.remove(&ev.cookie);
            if is_dir {
                match from {
                    Some((old, _, _)) => self.moved_within(&old, &rel),
                    None => self.add_tree(&rel),
                }
            }
            self.out.push(Hint::Path(rel));
        } else if mask.contains(EventMask::CREATE) {
            // Watch first, hint second: the scanner's walk then finds whatever landed in the
            // directory before its watch existed, and the watch reports everything after.
            if is_dir {
                self.add_tree(&rel);
                self.out.push(Hint::Path(rel));
            } else if self.created_without_close(&rel) {
                self.out.push(Hint::Path(rel));
            }
        } else if mask.intersects(EventMask::CLOSE_WRITE | EventMask::DELETE | EventMask::ATTRIB) {
            self.out.push(Hint::Path(rel));
        }
    }

    /// Whether `cookie` is a rename out of `.ferry/tmp` (then it is forgotten: one arrival each).
    fn own_move(&mut self, cookie: u32) -> bool {
        match self.own_moves.iter().rposition(|&c| c == cookie) {
            Some(i) => {
                self.own_moves.remove(i);
                true
            }
            None => false,
        }
    }

    /// Whether a new non-directory gets no IN_CLOSE_WRITE to hint it later: symlinks, fifos,
    /// sockets, devices, and hard links to existing files (`ln a b`: nothing is opened). A new
    /// regular file waits for its writer's close instead.
    fn created_without_close(&self, rel: &Path) -> bool {
        match std::fs::symlink_metadata(self.root.join(rel)) {
            Ok(m) => !m.is_file() || m.nlink() > 1,
            // Gone already: its IN_DELETE follows.
            Err(_) => false,
        }
    }

    /// Adds a watch on `rel` (a directory relative to the root) and records it.
    fn add_watch(&mut self, rel: &Path) -> io::Result<WatchDescriptor> {
        if let Some(limit) = self.fake_limit {
            if self.by_wd.len() >= limit && !self.by_path.contains_key(rel) {
                return Err(io::Error::from(io::ErrorKind::StorageFull));
            }
        }
        let mut mask = watch_mask();
        // The root may be a symlink to the real tree; below it, symlinks are entries, not
        // directories to enter.
        if !rel.as_os_str().is_empty() {
            mask |= WatchMask::DONT_FOLLOW;
        }
        let wd = self.watches.add(self.root.join(rel), mask)?;
        // The same inode watched again returns the same descriptor: keep one path for it.
        if let Some(prev) = self.by_wd.insert(wd.clone(), rel.to_path_buf()) {
            if prev != rel && self.by_path.get(&prev) == Some(&wd) {
                self.by_path.remove(&prev);
            }
        }
        self.by_path.insert(rel.to_path_buf(), wd.clone());
        Ok(wd)
    }

    /// Watches `top` and every directory under it, each before listing it so nothing created
    /// meanwhile slips between. Directories past the watch limit go to the fallback poller;
    /// ignored ones are left alone.
    fn add_tree(&mut self, top: &Path) {
        if !top.as_os_str().is_empty() && self.rules.is_ignored(top, true) {
            return;
        }
        let mut stack = vec![top.to_path_buf()];
        while let Some(dir) = stack.pop() {
            match self.add_watch(&dir) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                    self.warn_limit();
                    self.fallback.cover(&dir);
                    continue;
                }
                // Gone again, or replaced by a non-directory: its own event tells.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log::warn!(
                        "cannot watch {}: {e}; changes in it are seen only on a rescan",
                        self.root.join(&dir).display()
                    );
                    continue;
                }
            }
            let Ok(read) = std::fs::read_dir(self.root.join(&dir)) else {
                continue;
            };
            // `DirEntry::file_type` does not follow symlinks.
            let entries: Vec<(OsString, bool)> = read
                .flatten()
                .map(|e| (e.file_name(), e.file_type().is_ok_and(|t| t.is_dir())))
                .collect();
            // This directory's rules first: they decide which of its directories to enter.
            if entries.iter().any(|(n, d)| n == IGNORE_FILE && !d) {
                self.rules.load(&self.root, &dir);
            } else {
                self.rules.remove(&dir);
            }
            for (name, is_dir) in entries {
                if dir.as_os_str().is_empty() && name == STATE_DIR {
                    continue;
                }
                let child = dir.join(name);
                if is_dir && !self.rules.matches(&child, true) {
                    stack.push(child);
                }
            }
        }
    }

    /// The `.ferryignore` in `dir` was written, moved or deleted: reload its rules, and if they
    /// changed, bring the watches beneath `dir` in line with them.
    fn rules_changed(&mut self, dir: &Path) {
        if self.rules.load(&self.root, dir) {
            self.follow_rules(dir);
        }
    }

    /// Drops the watches (and polled subtrees) beneath `dir` that the rules exclude now, and
    /// watches what they no longer exclude.
    fn follow_rules(&mut self, dir: &Path) {
        let excluded: Vec<(PathBuf, WatchDescriptor)> = self
            .watches_under(dir)
            .into_iter()
            .filter(|(p, _)| !p.as_os_str().is_empty() && self.rules.is_ignored(p, true))
            .collect();
        for (p, wd) in excluded {
            self.by_wd.remove(&wd);
            self.by_path.remove(&p);
            let _ = self.watches.remove(wd);
        }
        let rules = &self.rules;
        self.fallback
            .lock()
            .retain(|p| p.as_os_str().is_empty() || !rules.is_ignored(p, true));
        self.add_tree(dir);
    }

    /// A directory moved from `old` to `new` inside the tree. Its watches went with it, so only
    /// their paths change, for it and every descendant.
    fn moved_within(&mut self, old: &Path, new: &Path) {
        let moved: Vec<(PathBuf, WatchDescriptor)> = self
            .by_path
            .range(old.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(old))
            .map(|(p, wd)| (p.clone(), wd.clone()))
            .collect();
        // Whatever was watched at `new` was replaced (rename over an empty directory); its
        // IN_IGNORED will clean `by_wd`.
        let replaced: Vec<PathBuf> = self
            .by_path
            .range(new.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(new))
            .map(|(p, _)| p.clone())
            .collect();
        for p in replaced {
            self.by_path.remove(&p);
        }
        for (p, _) in &moved {
            self.by_path.remove(p);
        }
        for (p, wd) in &moved {
            let np = new.join(p.strip_prefix(old).unwrap_or(Path::new("")));
            self.by_wd.insert(wd.clone(), np.clone());
            self.by_path.insert(np, wd.clone());
        }
        self.fallback.moved(old, new);
        self.rules.rename_under(old, new);
        if self.rules.has_files() || self.rules.is_ignored(new, true) {
            // Rules from above may see the directories in it differently at the new place
            // (this also watches what is not watched yet, as below).
            self.follow_rules(new);
        } else {
            // Watch whatever in it is not watched yet: the directory itself if it never was
            // (limit, permissions), and a directory made in it just before the move, whose
            // IN_CREATE was handled after it and looked for it at the old path, in vain.
            // Watched directories keep their descriptors.
            self.add_tree(new);
        }
    }

    /// A directory left the tree: stop watching it and everything under it.
    fn moved_out(&mut self, old: &Path, left: Vec<(PathBuf, WatchDescriptor)>) {
        // Only the watches that left, and only where nothing took them back (a rescan that
        // found the directory elsewhere): a directory made at the old path since has its own.
        for (p, wd) in left {
            if self.by_wd.get(&wd) != Some(&p) {
                continue;
            }
            self.by_wd.remove(&wd);
            if self.by_path.get(&p) == Some(&wd) {
                self.by_path.remove(&p);
            }
            // May already be gone (deleted out there): nothing to undo then.
            let _ = self.watches.remove(wd);
        }
        if !self.by_path.contains_key(old) {
            self.fallback.forget(old);
            self.rules.remove_under(old);
        }
    }

    /// The watches on `dir` and every directory beneath it.
    fn watches_under(&self, dir: &Path) -> Vec<(PathBuf, WatchDescriptor)> {
        self.by_path
            .range(dir.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(dir))
            .map(|(p, wd)| (p.clone(), wd.clone()))
            .collect()
    }

    /// Treats directories whose MOVED_TO did not follow within the grace as moved out. If the
    /// MOVED_TO does come later it is handled as a directory moved in: watched afresh.
    fn expire_pending(&mut self) {
        let now = Instant::now();
        let expired: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, (_, t, _))| now.duration_since(*t) >= PAIR_GRACE)
            .map(|(c, _)| *c)
            .collect();
        for cookie in expired {
            if let Some((old, _, Some(left))) = self.pending.remove(&cookie) {
                self.moved_out(&old, left);
            }
        }
    }

    fn forget_wd(&mut self, wd: &WatchDescriptor) {
        if let Some(p) = self.by_wd.remove(wd) {
            if self.by_path.get(&p) == Some(wd) {
                self.by_path.remove(&p);
            }
        }
    }

    /// After lost events the map may be wrong anywhere: re-watch the whole tree from scratch
    /// (re-adding a watched inode returns its existing descriptor) and drop watches on
    /// directories no longer found in it.
    fn rebuild(&mut self) {
        let old = std::mem::take(&mut self.by_wd);
        self.by_path.clear();
        self.pending.clear();
        self.fallback.clear();
        self.rules = Rules::new().quiet();
        self.add_tree(Path::new(""));
        for wd in old.into_keys() {
            if !self.by_wd.contains_key(&wd) {
                let _ = self.watches.remove(wd);
            }
        }
    }

    fn warn_limit(&mut self) {
        if self.warned_limit {
            return;
        }
        self.warned_limit = true;
        let now = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        log::warn!(
            "inotify watch limit reached (fs.inotify.max_user_watches = {now}): directories \
             past it under {} are polled every {:?} instead, which is slower to notice \
             changes. Raise it with `sysctl fs.inotify.max_user_watches=524288` (and put \
             `fs.inotify.max_user_watches=524288` in /etc/sysctl.d/ to keep it) and restart.",
            self.root.display(),
            self.fallback.interval
        );
    }
}

/// Subtrees inotify could not watch (watch limit): each is handed to the scanner every
/// interval, which walks it against its cache (see `poll` for why the scanner, not a snapshot
/// kept here, decides what changed).
#[derive(Debug)]
struct Fallback {
    interval: Duration,
    tx: async_channel::Sender<Vec<Hint>>,
    /// Tops of the unwatched subtrees, relative to the root.
    subtrees: Arc<Mutex<BTreeSet<PathBuf>>>,
    /// The polling thread, started by the first subtree; dropping it stops it.
    poller: Mutex<Option<PollWatcher>>,
}

impl Fallback {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<PathBuf>> {
        // A panic elsewhere leaves the set usable: it holds only paths.
        self.subtrees.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts polling `rel` (the caller hints it once now, so nothing before is missed).
    fn cover(&self, rel: &Path) {
        {
            let mut subtrees = self.lock();
            // A subtree already polled inside `rel` is now part of it.
            subtrees.retain(|p| !p.starts_with(rel));
            subtrees.insert(rel.to_path_buf());
        }
        let mut poller = self.poller.lock().unwrap_or_else(|e| e.into_inner());
        if poller.is_none() {
            let subtrees = self.subtrees.clone();
            let tops = move || {
                let subtrees = subtrees.lock().unwrap_or_else(|e| e.into_inner());
                subtrees.iter().cloned().map(Hint::Path).collect()
            };
            match hint_every(self.interval, self.tx.clone(), tops, "ferry-inotify-poll") {
                Ok(p) => *poller = Some(p),
                Err(e) => log::error!("cannot start polling unwatched directories: {e}"),
            }
        }
    }

    /// Stops the polling thread for good.
    fn halt(&self) {
        self.poller.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Stops polling `rel` and what is under it.
    fn forget(&self, rel: &Path) {
        self.lock().retain(|p| !p.starts_with(rel));
    }

    /// Polled subtrees under `old` are now under `new`.
    fn moved(&self, old: &Path, new: &Path) {
        let mut subtrees = self.lock();
        let under: Vec<PathBuf> = subtrees
            .iter()
            .filter(|p| p.starts_with(old))
            .cloned()
            .collect();
        for p in under {
            subtrees.remove(&p);
            subtrees.insert(new.join(p.strip_prefix(old).unwrap_or(Path::new(""))));
        }
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::watch::testutil::{
        assert_closes, assert_hinted, assert_none_under, Hints, TempTree,
    };
    use crate::watch::Backend;

    /// An inotify watcher's settings for `t` (a short poll interval for its fallback).
    fn config(t: &TempTree) -> WatchConfig {
        WatchConfig {
            root: t.root.clone(),
            backend: Backend::Inotify,
            poll_interval: Duration::from_millis(50),
        }
    }

    /// A watcher's state with every directory of `t` watched, driven by hand (no thread: the
    /// test reads and handles the events itself).
    fn by_hand(t: &TempTree) -> (Inotify, State) {
        let (tx, _) = async_channel::unbounded();
        let inotify = Inotify::init().unwrap();
        let mut state = State::new(&config(t), &inotify, tx, None);
        state.add_tree(Path::new(""));
        (inotify, state)
    }

    fn start_limited(t: &TempTree, limit: Option<usize>) -> (InotifyWatcher, Hints) {
        let (tx, rx) = async_channel::unbounded();
        let cfg = config(t);
        let w = spawn_limited(&cfg, tx, limit).unwrap();
        (w, Hints::new(rx, &t.root))
    }

    fn start(t: &TempTree) -> (InotifyWatcher, Hints) {
        start_limited(t, None)
    }

    #[test]
    fn files_create_overwrite_link_rename_delete() {
        let t = TempTree::new("ino-files");
        let (_w, mut h) = start(&t);

        let seen = h.step(|| fs::write(t.path("f"), b"one").unwrap());
        assert_hinted(&seen, &["f"]);

        let seen = h.step(|| fs::write(t.path("f"), b"two!").unwrap());
        assert_hinted(&seen, &["f"]);

        // No open, so no close: the IN_CREATE of a hard link is all there is.
        let seen = h.step(|| fs::hard_link(t.path("f"), t.path("hard")).unwrap());
        assert_hinted(&seen, &["hard"]);

        let seen = h.step(|| fs::rename(t.path("f"), t.path("g")).unwrap());
        assert_hinted(&seen, &["f", "g"]);

        let seen = h.step(|| fs::remove_file(t.path("g")).unwrap());
        assert_hinted(&seen, &["g"]);
    }

    #[test]
    fn both_halves_of_a_rename_come_in_one_batch() {
        let t = TempTree::new("ino-rename-batch");
        let outside = t.root.parent().unwrap().join("moved-out-of-the-tree");
        fs::write(t.path("f0"), b"x").unwrap();
        fs::create_dir(t.path("d")).unwrap();
        let (_w, mut h) = start(&t);
        let mut batch_with = |name: &str| -> Vec<Hint> {
            let want = Hint::Path(PathBuf::from(name));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let batch = h
                    .next_batch(left)
                    .unwrap_or_else(|| panic!("no hint for {name} in time"));
                if batch.contains(&want) {
                    return batch;
                }
            }
        };
        // Each rename, into a directory and back out, must arrive whole (bounded: 200).
        for i in 0..200 {
            let (from, to) = if i % 2 == 0 {
                (format!("f{i}"), format!("d/f{}", i + 1))
            } else {
                (format!("d/f{i}"), format!("f{}", i + 1))
            };
            fs::rename(t.path(&from), t.path(&to)).unwrap();
            let batch = batch_with(&to);
            assert!(
                batch.contains(&Hint::Path(PathBuf::from(&from))),
                "rename {from} -> {to} split across batches: {batch:?}"
            );
        }
        // A file moved out of the tree has no MOVED_TO: its hint still comes, after the grace.
        fs::rename(t.path("f200"), &outside).unwrap();
        batch_with("f200");
        let _ = fs::remove_file(outside);
    }

    #[test]
    fn new_nested_dirs_are_watched_before_hinted() {
        let t = TempTree::new("ino-mkdirp");
        let (_w, mut h) = start(&t);

        // Created faster than the watcher can add watches: whatever is hinted must cover the
        // file, itself or through an ancestor the scanner walks.
        let seen = h.step(|| {
            fs::create_dir_all(t.path("a/b/c")).unwrap();
            fs::write(t.path("a/b/c/f"), b"x").unwrap();
        });
        let covered = ["a/b/c/f", "a/b/c", "a/b", "a"]
            .iter()
            .any(|p| seen.contains(Path::new(p)));
        assert!(covered, "nothing covers a/b/c/f: {seen:?}");

        // And the deepest directory is watched now.
        let seen = h.step(|| fs::write(t.path("a/b/c/g"), b"y").unwrap());
        assert_hinted(&seen, &["a/b/c/g"]);
    }

    #[test]
    fn renamed_dir_reports_new_paths() {
        let t = TempTree::new("ino-mvdir");
        fs::create_dir_all(t.path("a/x/y")).unwrap();
        let (_w, mut h) = start(&t);

        // The write right after the rename arrives on the watch of `y`, whose path must be
        // rewritten by then.
        let seen = h.step(|| {
            fs::rename(t.path("a"), t.path("b")).unwrap();
            fs::write(t.path("b/x/y/f"), b"z").unwrap();
        });
        assert_hinted(&seen, &["a", "b", "b/x/y/f"]);
        assert_none_under(&seen, "a/x");

        let seen = h.step(|| fs::write(t.path("b/x/g"), b"z").unwrap());
        assert_hinted(&seen, &["b/x/g"]);
        assert_none_under(&seen, "a");
    }

    #[test]
    fn a_dir_made_just_before_its_parent_moved_is_watched_where_it_went() {
        let t = TempTree::new("ino-mkdir-then-mv");
        fs::create_dir(t.path("a")).unwrap();
        // Driven by hand rather than by the thread, so the events are surely handled late:
        // by the time the IN_CREATE of a/b is, a/b is c/b.
        let (mut inotify, mut state) = by_hand(&t);
        let mut buf = vec![0; BUF_LEN];
        let mut handle_queued = |state: &mut State| {
            for ev in inotify.read_events(&mut buf).unwrap() {
                state.handle(ev);
            }
            std::mem::take(&mut state.out)
        };
        fs::create_dir(t.path("a/b")).unwrap();
        fs::rename(t.path("a"), t.path("c")).unwrap();
        handle_queued(&mut state);
        assert!(
            state.by_path.contains_key(Path::new("c/b")),
            "c/b is not watched: {:?}",
            state.by_path.keys().collect::<Vec<_>>()
        );
        // And what is written in it is hinted.
        fs::write(t.path("c/b/f"), b"x").unwrap();
        let hints = handle_queued(&mut state);
        assert!(
            hints.contains(&Hint::Path(PathBuf::from("c/b/f"))),
            "no hint for c/b/f: {hints:?}"
        );
    }

    #[test]
    fn dir_made_where_one_moved_out_stays_watched() {
        let t = TempTree::new("ino-mvout-remade");
        fs::create_dir_all(t.path("d/sub")).unwrap();
        let (_w, mut h) = start(&t);

        // Gone and made again before the watcher gives up waiting for the MOVED_TO: giving up
        // must drop the watches that left, not the new directory's.
        let seen = h.step(|| {
            fs::rename(t.path("d"), t.outside.join("d")).unwrap();
            fs::create_dir_all(t.path("d/sub")).unwrap();
        });
        assert_hinted(&seen, &["d"]);
        std::thread::sleep(PAIR_GRACE * 3); // let the grace run out (not synchronisation)

        let seen = h.step(|| fs::write(t.path("d/sub/f"), b"x").unwrap());
        assert_hinted(&seen, &["d/sub/f"]);
    }

    #[test]
    fn dir_moved_out_stops_hints() {
        let t = TempTree::new("ino-mvout");
        fs::create_dir_all(t.path("d/sub")).unwrap();
        let (w, mut h) = start(&t);
        let watched = || w_count(&w);
        let before = watched();

        let seen = h.step(|| fs::rename(t.path("d"), t.outside.join("d")).unwrap());
        assert_hinted(&seen, &["d"]);

        let seen = h.step(|| {
            fs::write(t.outside.join("d/late"), b"1").unwrap();
            fs::write(t.outside.join("d/sub/late"), b"2").unwrap();
        });
        assert_none_under(&seen, "d");
        // And the kernel watches are released, not just ignored.
        assert_eq!(watched(), before - 2);
    }

    #[test]
    fn ignored_directories_are_not_watched() {
        let t = TempTree::new("ino-ignore");
        fs::create_dir_all(t.path("build/a/b")).unwrap();
        fs::create_dir_all(t.path("src/x")).unwrap();
        fs::write(t.path(IGNORE_FILE), "build/\n").unwrap();
        let (w, mut h) = start(&t);
        assert_eq!(w_count(&w), 3, "the root, src and src/x");
        let seen = h.step(|| fs::write(t.path("build/a/b/f"), b"x").unwrap());
        assert_none_under(&seen, "build");
        // One made later is not watched either.
        h.step(|| fs::create_dir_all(t.path("src/build/deep")).unwrap());
        let seen = h.step(|| fs::write(t.path("src/build/deep/f"), b"x").unwrap());
        assert_none_under(&seen, "src/build");
        assert_eq!(w_count(&w), 3);

        // The rule goes: they are watched, and report.
        let seen = h.step(|| fs::write(t.path(IGNORE_FILE), "# nothing\n").unwrap());
        assert_hinted(&seen, &[IGNORE_FILE]);
        assert_eq!(
            w_count(&w),
            8,
            "and build, build/a, build/a/b, src/build, src/build/deep"
        );
        let seen = h.step(|| fs::write(t.path("build/a/b/g"), b"y").unwrap());
        assert_hinted(&seen, &["build/a/b/g"]);

        // It comes back in a deeper file: those under src/ are dropped again.
        h.step(|| fs::write(t.path("src").join(IGNORE_FILE), "build*/\n").unwrap());
        assert_eq!(w_count(&w), 6);
        let seen = h.step(|| fs::write(t.path("src/build/deep/g"), b"y").unwrap());
        assert_none_under(&seen, "src/build");
        // A directory moved to where the rules exclude it is dropped too.
        h.step(|| fs::rename(t.path("build/a"), t.path("src/build-moved")).unwrap());
        assert_eq!(w_count(&w), 4, "the root, src, src/x and build");
        let seen = h.step(|| fs::write(t.path("src/build-moved/b/h"), b"z").unwrap());
        assert_none_under(&seen, "src/build-moved");
    }

    /// How many watches the kernel holds for this watcher's inotify instance.
    fn w_count(w: &InotifyWatcher) -> usize {
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", w.fd)).unwrap();
        info.lines()
            .filter(|l| l.starts_with("inotify wd:"))
            .count()
    }

    #[test]
    fn state_dir_is_never_watched() {
        let t = TempTree::new("ino-state");
        fs::create_dir_all(t.path(".ferry/old")).unwrap();
        let (_w, mut h) = start(&t);

        let seen = h.step(|| {
            fs::write(t.path(".ferry/index"), b"i").unwrap();
            fs::write(t.path(".ferry/old/x"), b"x").unwrap();
            fs::create_dir(t.path(".ferry/new")).unwrap();
        });
        let seen2 = h.step(|| fs::write(t.path(".ferry/new/y"), b"y").unwrap());
        assert_none_under(&seen, ".ferry");
        assert_none_under(&seen2, ".ferry");

        // Created after the watcher started, it is skipped too.
        let t = TempTree::new("ino-state-late");
        let (_w, mut h) = start(&t);
        let seen = h.step(|| {
            fs::create_dir(t.path(".ferry")).unwrap();
            fs::write(t.path(".ferry/x"), b"x").unwrap();
        });
        let seen2 = h.step(|| fs::write(t.path(".ferry/y"), b"y").unwrap());
        assert_none_under(&seen, ".ferry");
        assert_none_under(&seen2, ".ferry");
    }

    #[test]
    fn the_agents_own_renames_out_of_its_tmp_are_not_hinted() {
        let t = TempTree::new("ino-own");
        fs::create_dir_all(t.path(".ferry/tmp")).unwrap();
        fs::create_dir(t.path("d")).unwrap();
        let (_w, mut h) = start(&t);

        let seen = h.step(|| {
            fs::write(t.path(".ferry/tmp/a.part"), b"a").unwrap();
            fs::rename(t.path(".ferry/tmp/a.part"), t.path("d/a")).unwrap();
            // The same arrival from anywhere else is hinted.
            fs::write(t.outside.join("b"), b"b").unwrap();
            fs::rename(t.outside.join("b"), t.path("d/b")).unwrap();
        });
        assert_hinted(&seen, &["d/b"]);
        assert!(!seen.contains(Path::new("d/a")), "{seen:?}");

        // What is done to the file afterwards is hinted as ever.
        let seen = h.step(|| fs::write(t.path("d/a"), b"edited").unwrap());
        assert_hinted(&seen, &["d/a"]);
        let seen = h.step(|| fs::rename(t.path("d/a"), t.path("d/c")).unwrap());
        assert_hinted(&seen, &["d/a", "d/c"]);
        // A directory moved out of the tmp area is still watched and hinted.
        let seen = h.step(|| {
            fs::create_dir(t.path(".ferry/tmp/sub")).unwrap();
            fs::rename(t.path(".ferry/tmp/sub"), t.path("sub")).unwrap();
        });
        assert_hinted(&seen, &["sub"]);
        let seen = h.step(|| fs::write(t.path("sub/x"), b"x").unwrap());
        assert_hinted(&seen, &["sub/x"]);
    }

    #[test]
    fn symlinks_are_hinted_not_followed() {
        let t = TempTree::new("ino-symlink");
        let (_w, mut h) = start(&t);
        let seen = h.step(|| std::os::unix::fs::symlink(&t.outside, t.path("link")).unwrap());
        assert_hinted(&seen, &["link"]);
        let seen = h.step(|| fs::write(t.outside.join("x"), b"x").unwrap());
        assert_none_under(&seen, "link");
    }

    // A sentinel proves only that the watcher reporting it caught up, so these tests put them
    // where the fallback poller walks when a step waits for it (last in order: subtrees are
    // polled sorted), and at the root when a step waits for inotify events.

    /// True once `rel` has been hinted twice: the fallback hands it over every interval.
    fn polled(h: &mut Hints, rel: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut times = 0;
        while let Some(hint) = h.next(deadline.saturating_duration_since(Instant::now())) {
            if hint == Hint::Path(PathBuf::from(rel)) {
                times += 1;
                if times == 2 {
                    return true;
                }
            }
        }
        false
    }

    /// Hints seen over a few polling intervals, after what was already queued is dropped.
    fn quiet_window(h: &mut Hints) -> BTreeSet<PathBuf> {
        h.drain();
        let mut seen = BTreeSet::new();
        let end = Instant::now() + Duration::from_millis(300);
        while let Some(Hint::Path(p)) = h.next(end.saturating_duration_since(Instant::now())) {
            seen.insert(p);
        }
        seen
    }

    #[test]
    fn watch_limit_falls_back_to_polling() {
        let t = TempTree::new("ino-limit");
        fs::create_dir_all(t.path("deep/er")).unwrap();
        // Room for the root's watch only: `deep` goes to the poller, whole.
        let (_w, mut h) = start_limited(&t, Some(1));
        assert!(
            polled(&mut h, "deep"),
            "the unwatched subtree is handed to the scanner"
        );

        // A directory created past the limit: polled too.
        fs::create_dir(t.path("fresh")).unwrap();
        assert!(polled(&mut h, "fresh"));

        // A polled directory renamed: polled under its new name only.
        fs::rename(t.path("deep"), t.path("moved")).unwrap();
        assert!(polled(&mut h, "moved"));
        assert_none_under(&quiet_window(&mut h), "deep");
    }

    #[test]
    fn polled_subtree_follows_its_renamed_watched_parent() {
        let t = TempTree::new("ino-limit-parent");
        fs::create_dir_all(t.path("w/deep")).unwrap();
        // The root and `w` are watched, `w/deep` is polled.
        let (_w, mut h) = start_limited(&t, Some(2));
        assert!(polled(&mut h, "w/deep"));

        fs::rename(t.path("w"), t.path("v")).unwrap();
        assert!(polled(&mut h, "v/deep"));
        assert_none_under(&quiet_window(&mut h), "w");
    }

    #[test]
    fn overflow_rebuild_finds_moved_dirs() {
        let t = TempTree::new("ino-rebuild");
        fs::create_dir_all(t.path("a/b")).unwrap();
        let (_inotify, mut state) = by_hand(&t);
        fs::rename(t.path("a"), t.path("z")).unwrap();
        fs::create_dir(t.path("n")).unwrap();
        // What lost events leave behind: a map that knows nothing of the rename or the new dir.
        state.rebuild();
        let paths: Vec<&Path> = state.by_path.keys().map(|p| p.as_path()).collect();
        assert_eq!(
            paths,
            [
                Path::new(""),
                Path::new("n"),
                Path::new("z"),
                Path::new("z/b")
            ]
        );
    }

    #[test]
    fn drop_stops_the_thread() {
        let t = TempTree::new("ino-drop");
        let (w, h) = start(&t);
        drop(w);
        assert_closes(&h.rx);
    }
}
