//! The local tree: what is on this replica's disk, kept as a cache of entries with inodes so a
//! rescan hashes only what moved (size, mtime or inode changed).
//!
//! Watcher hints say where to look; `Tree` looks and reports what changed. Names that cannot
//! travel (not UTF-8, CR/LF, too long), symlinks whose target cannot (not UTF-8, too long) and
//! special files are reported once, then skipped.
//!
//! A symlink is an entry of its own (its target text, see `Kind::Symlink`), never followed:
//! everything is looked at through descriptors of the directories on the way (`beneath`), so a
//! walk does not enter a symlinked directory and a hint for a path through one finds nothing.
//!
//! Ignored paths (`crate::ignore`) are never looked at or reported: a walk does not enter an
//! ignored directory, a hint for an ignored path finds nothing. The rules are loaded as walks
//! meet `.ferryignore` files (a directory's own file before the rest of it), and reloaded when
//! one changes. What the cache knew of a path before it became ignored stays as it was
//! (*frozen*): ignoring reports no delete, and when the path is un-ignored, the next look
//! compares the disk with that entry, so an edit or delete made meanwhile is reported then.
//!
//! A walk of an unchanged tree (the poll watcher's, every interval) costs one `fstatat` per
//! entry and nothing else: no listing, no allocation, no rule matching, nothing written to the
//! cache (so nothing journaled). It lists a directory only if its ctime moved since its last
//! listing, as creating, removing or renaming an entry in it does; otherwise the cache's children
//! stand in for the listing (`Listing` says when that is sound). Files are still stat-ed in
//! every directory: an in-place rewrite changes the file, not its directory. Whatever looks
//! different from the cache (a child, or the directory) makes the walk list that directory and
//! look at it the way a first scan does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::beneath::{self, Dir, Stat};
use crate::core::base::{Base, Whole};
use crate::core::entry::{check_target, Entry, Kind, MAX_LINK_TARGET};
use crate::core::index::Entries;
use crate::core::layered::Layered;
use crate::core::path::{RelPath, STATE_DIR};
use crate::core::renames::{Changed, Seen};
use crate::ignore::{Rules, IGNORE_FILE};

/// A tree keeps a base once given one (`keep_base`); asking before is a bug.
const NO_BASE: &str = "the tree was given no base to keep";

/// The cached state of a replica's tree.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    entries: Layered<Seen>,
    /// The base, kept as its difference from `entries` (see `core::base`), so every write of
    /// the cache goes through `put`: a client's base, or the server's index entries.
    base: Option<Base>,
    /// Paths already reported as impossible to sync, so each is logged once.
    reported: HashSet<PathBuf>,
    /// Device and inode of `<root>/.ferry` when the tree was opened: if the root is unmounted,
    /// replaced or moved away, this no longer matches (see `check_root`).
    marker: Option<(u64, u64)>,
    /// While `scan_all` runs: its progress report and the bytes hashed so far.
    progress: Option<(crate::progress::Progress, u64)>,
    /// What is ignored: the built-ins and the `.ferryignore` files scans have met.
    rules: Rules,
    /// Directories whose rules changed since `scan_rule_changes` last ran, and whether they
    /// still need a rescan (false: a walk of them was under way, with the new rules already).
    rules_changed: BTreeMap<PathBuf, bool>,
    /// The rules before those changes, to tell which cached paths they un-ignored.
    rules_before: Option<Rules>,
    /// Directory listings the cache can stand in for, by directory (`""`: the root); see
    /// `Listing`. Anything that changes the cache or the rules other than a walk drops them all.
    listings: HashMap<String, Listing>,
    /// How many `scan_all`s have run.
    pass: u64,
    /// `SETTLED_NS`; tests that wait out a clock tick instead set it to zero.
    settle_ns: i64,
    /// Directories listed so far, for tests to tell the cache stood in for listings.
    #[cfg(test)]
    lists: u64,
    /// Entries looked at by the running `scan_all`, for its progress report.
    looked: u64,
}

/// The server's index keeps its entries in its tree's base: they differ from the cache only
/// while a change is under way.
impl Entries for Tree {
    fn entry(&self, path: &RelPath) -> Option<Entry> {
        self.base(path)
    }

    fn put_entry(&mut self, path: &RelPath, entry: Option<Entry>) {
        self.set_base(path, entry);
    }

    fn live_count(&self) -> usize {
        self.kept().len(&self.entries)
    }
}

/// The root is not the tree ferry was syncing any more (unmounted, removed, replaced, or
/// unreadable): what looks deleted may only be out of reach, so nothing may be deleted.
#[derive(Debug)]
pub struct RootLost(pub String);

impl std::fmt::Display for RootLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RootLost {}

/// A path as the rules take it.
fn p(path: &RelPath) -> &Path {
    Path::new(path.as_str())
}

/// `rel` as a `RelPath`, if it is one (nothing is reported if not).
fn quiet_rel(rel: &Path) -> Option<RelPath> {
    rel.to_str().and_then(|s| RelPath::new(s).ok())
}

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// The `Seen` for a directory's metadata.
pub fn dir_seen(meta: &Stat) -> Seen {
    Seen {
        entry: Entry::dir(meta.perm()),
        ino: meta.ino,
    }
}

/// Hashes the file `rel` beneath `root`, retrying while it is being written; `None` if it kept
/// changing. Follows no symlink, on the way or at the end. Returns the entry with the metadata
/// the hash belongs to.
pub fn hash_file(root: &Path, rel: &RelPath) -> io::Result<Option<Seen>> {
    let (dir, name) = beneath::parent(root, rel, None)?;
    hash_at(&dir, name)
}

/// Hashes the file `name` in `dir` (see `hash_file`).
fn hash_at(dir: &Dir, name: &str) -> io::Result<Option<Seen>> {
    for _ in 0..3 {
        let (file, before) = dir.open_file(name)?;
        let hash = match crate::hash::contents(&file, before.len()) {
            // Shrunk while read: look again.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
            hashed => hashed?,
        };
        let after = file.metadata()?;
        if before.len() == after.len() && mtime_ns(&before) == mtime_ns(&after) {
            return Ok(Some(Seen {
                entry: Entry {
                    kind: Kind::File,
                    size: after.len(),
                    mtime_ns: mtime_ns(&after),
                    mode: after.mode() & 0o7777,
                    hash,
                },
                ino: after.ino(),
            }));
        }
    }
    Ok(None)
}

impl Tree {
    /// A tree with a cache from an earlier run (or empty).
    pub fn new(root: PathBuf, cached: BTreeMap<RelPath, Seen>) -> Tree {
        let marker = std::fs::symlink_metadata(root.join(STATE_DIR))
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Tree {
            root,
            entries: cached.into(),
            base: None,
            reported: HashSet::new(),
            marker,
            progress: None,
            rules: Rules::new(),
            rules_changed: BTreeMap::new(),
            rules_before: None,
            listings: HashMap::new(),
            pass: 0,
            settle_ns: SETTLED_NS,
            #[cfg(test)]
            lists: 0,
            looked: 0,
        }
    }

    /// Whether `path` is ignored here. `is_dir` says what it is if the caller knows (an entry
    /// from elsewhere); otherwise the disk, then the cache, tell.
    pub fn ignores(&self, path: &RelPath, is_dir: Option<bool>) -> bool {
        match is_dir {
            Some(is_dir) => self.rules.is_ignored(p(path), is_dir),
            None => self.ignored_here(p(path)),
        }
    }

    /// Whether the rules hide `rel`, as whatever it is on disk. That matters only where a
    /// rule matches one kind (`dir/`): the disk is looked at only then, not for every path of
    /// a first sync.
    fn ignored_here(&self, rel: &Path) -> bool {
        let as_file = self.rules.is_ignored(rel, false);
        if as_file == self.rules.is_ignored(rel, true) {
            return as_file;
        }
        self.rules.is_ignored(rel, self.is_dir_here(rel))
    }

    /// Whether `rel` is a directory on disk (if it is gone: whether the cache had one there).
    fn is_dir_here(&self, rel: &Path) -> bool {
        let Some(r) = quiet_rel(rel) else {
            return false; // a name that cannot travel: skipped whatever it is
        };
        match beneath::parent(&self.root, &r, None).and_then(|(dir, name)| dir.stat(name)) {
            Ok(m) => m.is_dir(),
            Err(_) => self.entries.get(&r).is_some_and(|s| s.entry.is_dir()),
        }
    }

    /// A cached entry the rules hide now: it stays as it was, neither looked at nor reported.
    fn is_frozen(&self, path: &RelPath) -> bool {
        let is_dir = self.entries.get(path).is_some_and(|s| s.entry.is_dir());
        self.rules.is_ignored(p(path), is_dir)
    }

    /// Rebuilds the rules of `dir` if its `.ferryignore` is not what they were built from (the
    /// cache says what it is now), and notes the change for `scan_rule_changes`, with a rescan
    /// of `dir` if `rescan`.
    fn reload_rules(&mut self, dir: &Path, rescan: bool) {
        let now = quiet_rel(&dir.join(IGNORE_FILE))
            .and_then(|f| self.entries.get(&f))
            .filter(|s| s.entry.kind == Kind::File)
            .map(|s| s.entry.hash);
        if now.as_ref() == self.rules.hash(dir) {
            return;
        }
        let before = self.rules_before.is_none().then(|| self.rules.clone());
        let changed = match now {
            None => self.rules.remove(dir),
            Some(_) => self.rules.load(&self.root, dir),
        };
        if changed {
            // What is ignored, and so cached, may differ anywhere beneath `dir`.
            self.listings.clear();
            log::info!(
                "ignore rules changed in {}",
                dir.join(IGNORE_FILE).display()
            );
            self.rules_before = self.rules_before.take().or(before);
            *self.rules_changed.entry(dir.to_path_buf()).or_default() |= rescan;
        }
    }

    /// After `path` was looked at or written: if it is a `.ferryignore`, brings its directory's
    /// rules up to date (`scan_rule_changes` then rescans the directory).
    fn rules_file_seen(&mut self, path: &RelPath) {
        if path.file_name() == IGNORE_FILE {
            let dir = path
                .parent()
                .map_or_else(PathBuf::new, |d| PathBuf::from(d.as_str()));
            self.reload_rules(&dir, true);
        }
    }

    /// Catches up with rules that changed: rescans each directory whose `.ferryignore` changed
    /// outside a walk of it, and reports every cached path they un-ignored that the rescan did
    /// not report as *touched* (`old == new`), for the agent to look at again (the server
    /// announces it anew for replicas that skipped it; a client sends what it had not sent).
    pub fn scan_rule_changes(&mut self) -> Vec<Changed> {
        let dirs = std::mem::take(&mut self.rules_changed);
        let Some(before) = self.rules_before.take() else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        if dirs.get(Path::new("")) == Some(&true) {
            changes = self.scan_all().unwrap_or_else(|e| {
                log::error!("cannot scan {}: {e}", self.root.display());
                Vec::new()
            });
        } else {
            for (dir, rescan) in &dirs {
                match quiet_rel(dir) {
                    Some(d) if *rescan && !self.ignores(&d, Some(true)) => {
                        self.scan_one(&d, true, &mut changes)
                    }
                    _ => {}
                }
            }
        }
        let reported: HashSet<RelPath> = changes.iter().map(|c| c.path.clone()).collect();
        for dir in dirs.keys() {
            let keys: Vec<RelPath> = match quiet_rel(dir) {
                Some(d) => self.subtree_keys(&d),
                None => self.entries.iter().map(|(k, _)| k).collect(),
            };
            for k in keys {
                let Some(seen) = self.entries.get(&k) else {
                    continue;
                };
                let is_dir = seen.entry.is_dir();
                if !reported.contains(&k)
                    && before.is_ignored(p(&k), is_dir)
                    && !self.rules.is_ignored(p(&k), is_dir)
                {
                    changes.push(Changed {
                        path: k,
                        old: Some(seen.clone()),
                        new: Some(seen),
                    });
                }
            }
        }
        changes
    }

    /// Checks that the root is still the tree this `Tree` was opened on: a readable directory
    /// whose state directory is the same one. Called before anything found missing is
    /// treated as deleted, so an unmounted SD card or a stale NAS mount stops the agent
    /// instead of turning into a mass delete.
    pub fn check_root(&self) -> Result<(), RootLost> {
        let root = self.root.display();
        let lost = |why: String| {
            Err(RootLost(format!(
                "{root} {why}: stopping rather than passing on deletes (unmounted disk or stale \
                 mount?). Nothing was deleted; fix the mount and start ferry again"
            )))
        };
        if let Err(e) = std::fs::read_dir(&self.root) {
            return lost(format!("cannot be read ({e})"));
        }
        let marker = std::fs::symlink_metadata(self.root.join(STATE_DIR))
            .ok()
            .map(|m| (m.dev(), m.ino()));
        match (self.marker, marker) {
            (Some(_), None) => lost(format!("no longer holds ferry's {STATE_DIR} directory")),
            (Some(a), Some(b)) if a != b => {
                lost("has been replaced by another directory".to_string())
            }
            _ => Ok(()),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cached entries, for saving and for comparing with the base.
    pub fn entries(&self) -> &Layered<Seen> {
        &self.entries
    }

    /// Folds the cache's changes into its packed table (see `core::layered`).
    pub fn repack(&mut self) {
        self.entries.fold();
    }

    /// Keeps `full` as the base from now on (see `core::base`): a client's, or the server's
    /// index entries (see `Entries` below).
    pub fn keep_base(&mut self, full: BTreeMap<RelPath, Entry>) {
        self.base = Some(Base::new(full, &self.entries));
    }

    fn kept(&self) -> &Base {
        self.base.as_ref().expect(NO_BASE)
    }

    /// The base to write, and the cache it is kept against.
    fn kept_mut(&mut self) -> (&mut Base, &Layered<Seen>) {
        (self.base.as_mut().expect(NO_BASE), &self.entries)
    }

    /// The base of `path`: what the client and the server last agreed it is.
    pub fn base(&self, path: &RelPath) -> Option<Entry> {
        self.kept().get(&self.entries, path)
    }

    /// Sets the base of `path` (`None`: none).
    pub fn set_base(&mut self, path: &RelPath, base: Option<Entry>) {
        let (kept, cache) = self.kept_mut();
        kept.set(cache, path, base);
    }

    /// Removes the base of every path `keep` refuses.
    pub fn retain_base(&mut self, keep: impl FnMut(&RelPath) -> bool) {
        let (kept, cache) = self.kept_mut();
        kept.retain(cache, keep);
    }

    /// `path` and every path beneath it that has a base, in order.
    pub fn base_keys_under(&self, path: &RelPath) -> Vec<RelPath> {
        self.kept().keys_under(&self.entries, path)
    }

    /// Paths whose base is not their cached entry.
    pub fn base_differing(&self) -> impl Iterator<Item = &RelPath> {
        self.kept().differing()
    }

    /// Forgets which bases were set (see `Base::forget_changes`).
    pub fn forget_base_changes(&mut self) {
        if let Some(base) = &mut self.base {
            base.forget_changes();
        }
    }

    /// Bases set since the last call (for the journal).
    pub fn take_base_changes(&mut self) -> Vec<(RelPath, Option<Entry>)> {
        let (kept, cache) = self.kept_mut();
        kept.take_changes(cache)
    }

    /// The whole base, to save.
    pub fn whole_base(&self) -> Whole<'_> {
        self.kept().whole(&self.entries)
    }

    /// Writes the cache at `path`, the one way it is written: a base kept beside it stays
    /// what it was.
    fn put(&mut self, path: RelPath, new: Option<Seen>) -> Option<Seen> {
        let new_entry = self
            .base
            .is_some()
            .then(|| new.as_ref().map(|s| s.entry.clone()));
        let old = match new {
            Some(s) => self.entries.insert(path.clone(), s),
            None => self.entries.remove(&path),
        };
        if let (Some(base), Some(new)) = (&mut self.base, new_entry) {
            base.cache_changed(&path, old.as_ref().map(|s| &s.entry), new.as_ref());
        }
        old
    }

    /// Cache entries changed since the last call (for the journal).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<Seen>)> {
        self.entries.take_changes()
    }

    /// Forgets what changed, for a cache about to be saved whole (`Layered::forget_changes`).
    pub fn forget_changes(&mut self) {
        self.entries.forget_changes()
    }

    /// The cached entry of `path`.
    pub fn get(&self, path: &RelPath) -> Option<Seen> {
        self.entries.get(path)
    }

    /// Whether a file new to `path` (nothing agreed there) can be installed without a look at
    /// the disk first: the cache has nothing there, so the install refuses whatever it finds
    /// (`fsops::Install::ChangedHere`: something made since the cache last heard), and it is
    /// not a rules file (whose look reloads the rules). A first sync, or a burst of new files,
    /// is file after file of these, and the look was a `fstatat` each.
    pub fn installs_unseen(&self, path: &RelPath) -> bool {
        self.get(path).is_none() && path.file_name() != IGNORE_FILE
    }

    /// Absolute path of `rel`.
    pub fn abs(&self, rel: &RelPath) -> PathBuf {
        self.root.join(rel.as_str())
    }

    /// Records what ferry itself just put at `path` (so the watcher's echo is no change). A
    /// `.ferryignore` written here takes effect at once.
    pub fn set(&mut self, path: &RelPath, seen: Option<Seen>) {
        // The cache may no longer hold what the recorded listings saw.
        self.listings.clear();
        match seen {
            Some(s) => {
                self.put(path.clone(), Some(s));
            }
            None => {
                self.remove_subtree(path);
                self.rules.remove_under(p(path));
            }
        }
        self.rules_file_seen(path);
    }

    /// Moves the cache of `from` and everything beneath it to `to`.
    pub fn rename_subtree(&mut self, from: &RelPath, to: &RelPath) {
        self.listings.clear();
        let moved: Vec<(RelPath, Seen)> = self.take_subtree(from);
        for (p, s) in moved {
            // A name too long to travel is not cached, as a scan would skip it.
            if let Ok(new) = p.rebase(from, to) {
                self.put(new, Some(s));
            }
        }
        self.rules.rename_under(p(from), p(to));
        self.rules_file_seen(from);
        self.rules_file_seen(to);
    }

    fn take_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, Seen)> {
        let keys: Vec<RelPath> = self.subtree_keys(path);
        keys.into_iter()
            .filter_map(|k| self.put(k.clone(), None).map(|s| (k, s)))
            .collect()
    }

    fn remove_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, Seen)> {
        self.take_subtree(path)
    }

    /// Takes what the cache has at and beneath `path`, which is gone from disk, to report it
    /// gone. The rules of directories in it went with them; an entry that rules from above
    /// still hide stays frozen.
    fn take_gone(&mut self, path: &RelPath) -> Vec<(RelPath, Seen)> {
        self.rules.remove_under(p(path));
        let keys: Vec<RelPath> = self
            .subtree_keys(path)
            .into_iter()
            .filter(|k| !self.is_frozen(k))
            .collect();
        keys.into_iter()
            .filter_map(|k| self.put(k.clone(), None).map(|s| (k, s)))
            .collect()
    }

    /// `path` and every cached path beneath it.
    fn subtree_keys(&self, path: &RelPath) -> Vec<RelPath> {
        self.entries.keys_under(path)
    }

    /// Walks the whole tree; returns what changed since the cache.
    pub fn scan_all(&mut self) -> io::Result<Vec<Changed>> {
        let meta = std::fs::symlink_metadata(&self.root)?;
        if !meta.is_dir() {
            return Err(io::Error::other(format!(
                "{} is not a directory",
                self.root.display()
            )));
        }
        if let Err(e) = std::fs::read_dir(&self.root) {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot list {}: {e}", self.root.display()),
            ));
        }
        self.pass += 1;
        self.looked = 0;
        let mut changes = Vec::new();
        self.progress = Some((crate::progress::Progress::new("scanning", "entries"), 0));
        let fd = Dir::root(&self.root)?;
        let known = fd.meta().ok();
        self.walk_children(None, &fd, known, &mut changes);
        self.progress = None;
        // Listings of directories this walk did not pass through are of no further use.
        let pass = self.pass;
        self.listings.retain(|_, l| l.pass == pass);
        Ok(changes)
    }

    /// Looks at one hinted path (relative, as a watcher reports it), and at its subtree if it
    /// is a directory. The empty path means the whole tree.
    pub fn scan_path(&mut self, rel: &Path) -> Vec<Changed> {
        if rel.as_os_str().is_empty() {
            return self.scan_all().unwrap_or_else(|e| {
                log::error!("cannot scan {}: {e}", self.root.display());
                Vec::new()
            });
        }
        if self.ignored_here(rel) {
            return Vec::new();
        }
        let Some(path) = self.rel_path(rel) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        self.scan_one(&path, true, &mut changes);
        self.rules_file_seen(&path);
        changes
    }

    /// Re-stats `path` now (not its subtree) and returns its current state, updating the cache.
    /// An ignored path is not looked at: what the cache knew of it is returned.
    pub fn refresh(&mut self, path: &RelPath) -> (Option<Seen>, Vec<Changed>) {
        let mut changes = Vec::new();
        if !self.ignores(path, None) {
            self.scan_one(path, false, &mut changes);
            self.rules_file_seen(path);
        }
        (self.entries.get(path), changes)
    }

    fn rel_path(&mut self, rel: &Path) -> Option<RelPath> {
        let problem = match rel.to_str() {
            None => "the name is not UTF-8".to_string(),
            Some(s) => match RelPath::new(s) {
                Ok(p) => return Some(p),
                Err(e) => e.reason.to_string(),
            },
        };
        if rel.components().next().map(|c| c.as_os_str()) == Some(STATE_DIR.as_ref()) {
            return None;
        }
        if self.reported.insert(rel.to_path_buf()) {
            log::warn!("skipped {:?}: {problem}; it cannot be synced", rel);
        }
        None
    }

    /// Stats `path`; on a directory with `deep`, walks it. Pushes what changed.
    fn scan_one(&mut self, path: &RelPath, deep: bool, changes: &mut Vec<Changed>) {
        match beneath::parent(&self.root, path, None) {
            Ok((dir, _)) => {
                self.scan_at(&dir, path, deep, changes);
            }
            // Not in the tree: a directory on the way is missing, or is a symlink or a file.
            Err(e) if beneath::is_absent(&e) => self.gone(path, changes),
            Err(e) => log::warn!("cannot stat {path}: {e}"),
        }
    }

    /// Reports `path` and what the cache had beneath it as gone.
    fn gone(&mut self, path: &RelPath, changes: &mut Vec<Changed>) {
        for (p, old) in self.take_gone(path) {
            changes.push(Changed {
                path: p,
                old: Some(old),
                new: None,
            });
        }
    }

    /// `scan_one` for `path`, whose parent directory is `dir`: everything is looked at through
    /// it, so a symlink swapped in on the way is never followed.
    fn scan_at(
        &mut self,
        dir: &Dir,
        path: &RelPath,
        deep: bool,
        changes: &mut Vec<Changed>,
    ) -> Found {
        let name = path.file_name();
        let meta = match dir.stat(name) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.gone(path, changes);
                return Found::Updated;
            }
            Err(e) => {
                log::warn!("cannot stat {path}: {e}");
                return Found::Unsure;
            }
        };
        // Looked up once: a lookup in the packed cache is a binary search and a walk.
        let cached = self.entries.get(path);
        let Some(new) = self.look(dir, path, &meta, cached.as_ref()) else {
            return Found::Unsure;
        };
        if cached == new {
            // Nothing written: an unchanged entry must not reach the journal.
            if deep && meta.is_dir() {
                self.walk_into(dir, path, Some(meta), changes);
            }
            return Found::Same(meta);
        }
        let was_dir = cached.is_some_and(|s| s.entry.is_dir());
        let is_dir = new.as_ref().is_some_and(|s| s.entry.is_dir());
        if was_dir && !is_dir {
            // A directory replaced by a file: everything that was beneath it is gone.
            for (p, old) in self.take_gone(path) {
                if &p != path {
                    changes.push(Changed {
                        path: p,
                        old: Some(old),
                        new: None,
                    });
                }
            }
        }
        let old = self.put(path.clone(), new.clone());
        if old != new {
            changes.push(Changed {
                path: path.clone(),
                old,
                new,
            });
        }
        if deep && is_dir {
            self.walk_into(dir, path, None, changes);
        }
        Found::Updated
    }

    /// What `path` (in `dir`, with metadata `meta`) is now: `None` if that cannot be told yet
    /// (being written, unreadable), `Some(None)` if it is nothing ferry syncs. Hashes a file
    /// only if it moved since `cached`, what the cache holds for it.
    fn look(
        &mut self,
        dir: &Dir,
        path: &RelPath,
        meta: &Stat,
        cached: Option<&Seen>,
    ) -> Option<Option<Seen>> {
        let name = path.file_name();
        let new = if meta.is_dir() {
            Some(dir_seen(meta))
        } else if meta.is_file() {
            match cached {
                Some(old) if same_file(old, meta) => Some(old.clone()),
                _ => match hash_at(dir, name) {
                    Ok(Some(s)) => {
                        if let Some((_, hashed)) = &mut self.progress {
                            *hashed += s.entry.size;
                        }
                        Some(s)
                    }
                    // Still being written: its close will bring another hint.
                    Ok(None) => return None,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => {
                        log::warn!("cannot read {path}: {e}");
                        return None;
                    }
                },
            }
        } else if meta.is_symlink() {
            match dir.read_link(name).map(OsString::into_string) {
                Ok(Ok(target)) if check_target(&target).is_ok() => Some(Seen {
                    entry: Entry::link(&target),
                    ino: meta.ino,
                }),
                Ok(_) => {
                    if self.reported.insert(self.abs(path)) {
                        log::warn!(
                            "skipped {path}: its symlink target cannot be synced (not UTF-8, or \
                             longer than {MAX_LINK_TARGET} bytes)"
                        );
                    }
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                // Replaced by something else since the stat: the next look sees what.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => return None,
                Err(e) => {
                    log::warn!("cannot read the symlink {path}: {e}");
                    return None;
                }
            }
        } else {
            if self.reported.insert(self.abs(path)) {
                log::warn!(
                    "skipped {path}: special files (FIFOs, sockets, devices) are not synced"
                );
            }
            None
        };
        Some(new)
    }

    /// Opens the directory `path` in `parent` and walks it (see `walk_children`); if it cannot
    /// be opened, keeps what was known beneath it rather than reporting it all deleted. Returns
    /// whether it was walked.
    fn walk_into(
        &mut self,
        parent: &Dir,
        path: &RelPath,
        known: Option<Stat>,
        changes: &mut Vec<Changed>,
    ) -> bool {
        match parent.open_dir(path.file_name()) {
            Ok(fd) => {
                self.walk_children(Some(path), &fd, known, changes);
                true
            }
            Err(e) => {
                log::warn!("cannot list {path}: {e}");
                false
            }
        }
    }

    /// Scans every entry beneath `dir` (the root if `None`), whose directory `fd` holds, and
    /// reports what the cache had beneath it that is gone. `known` is the directory's metadata
    /// if its cached entry was unchanged: then, if its last listing still holds, the cache
    /// stands in for a new one.
    fn walk_children(
        &mut self,
        dir: Option<&RelPath>,
        fd: &Dir,
        known: Option<Stat>,
        changes: &mut Vec<Changed>,
    ) {
        if let Some(meta) = known {
            if self.listing_holds(dir, &meta) && self.walk_known(dir, fd, changes) {
                return;
            }
        }
        self.walk_listed(dir, fd, changes);
    }

    /// Whether `dir`, now with metadata `meta`, still has the names of its recorded listing.
    fn listing_holds(&mut self, dir: Option<&RelPath>, meta: &Stat) -> bool {
        let key = dir.map_or("", RelPath::as_str);
        match self.listings.get_mut(key) {
            Some(l) if l.ino == meta.ino && l.ctime_ns == meta.ctime_ns => {
                l.pass = self.pass;
                true
            }
            _ => false,
        }
    }

    /// Walks a directory whose names are those of its last listing (`listing_holds`): each
    /// cached child is stat-ed and compared, and nothing is listed, allocated or matched against
    /// the rules. If a child is not as cached, returns false having changed nothing: the caller
    /// lists the directory instead.
    fn walk_known(&mut self, dir: Option<&RelPath>, fd: &Dir, changes: &mut Vec<Changed>) -> bool {
        let prefix = dir.map_or_else(String::new, |d| format!("{d}/"));
        let mut subdirs = Vec::new();
        let mut looked = 0;
        let mut children = self.entries.iter_from(&prefix);
        while let Some((path, seen)) = children.next() {
            let Some(name) = path.as_str().strip_prefix(prefix.as_str()) else {
                break;
            };
            if let Some(i) = name.find('/') {
                // Beneath a child: that child's own walk sees to it (nobody, if it is frozen).
                let past = format!("{prefix}{}0", &name[..i]);
                children = self.entries.iter_from(&past);
                continue;
            }
            match fd.stat(name) {
                Ok(meta) if unchanged(&seen, &meta) => {
                    if meta.is_dir() {
                        subdirs.push((path.clone(), meta));
                    }
                }
                _ => return false,
            }
            looked += 1;
        }
        drop(children);
        self.looked += looked;
        self.tick();
        for (path, meta) in subdirs {
            self.walk_into(fd, &path, Some(meta), changes);
        }
        true
    }

    /// Lists the directory `dir` (the root if `None`), whose directory `fd` holds, scans every
    /// entry in it, walks its subdirectories, and reports what the cache had in it that is
    /// gone. Records the listing if the next walks may stand on it (`walk_known`).
    fn walk_listed(&mut self, dir: Option<&RelPath>, fd: &Dir, changes: &mut Vec<Changed>) {
        #[cfg(test)]
        {
            self.lists += 1;
        }
        // Before the listing: a change made during it moves the ctime past what is recorded.
        let now = now_ns();
        let before = fd.meta().ok();
        let mut list = match fd.list() {
            Ok(list) => list,
            Err(e) => {
                let shown = dir.map_or_else(|| self.root.display().to_string(), |d| d.to_string());
                log::warn!("cannot list {shown}: {e}");
                // Keep what we knew beneath it rather than reporting it all deleted.
                self.forget_listing(dir);
                return;
            }
        };
        // Anything not settled (an unreadable entry, a file being written) leaves the listing
        // unrecorded, so the next walk lists the directory again.
        let mut unsure = false;
        // The entry's type mostly costs no stat, and never follows a symlink.
        let mut names: Vec<(OsString, bool)> = list
            .iter()
            .filter_map(|e| e.map_err(|_| unsure = true).ok())
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
            .map(|e| {
                let name = OsString::from_vec(e.file_name().to_bytes().to_vec());
                let is_dir = match e.file_type() {
                    Some(t) => t == nix::dir::Type::Directory,
                    None => name
                        .to_str()
                        .is_some_and(|n| fd.stat(n).is_ok_and(|m| m.is_dir())),
                };
                (name, is_dir)
            })
            .collect();
        drop(list);
        names.sort();
        let dir_rel = dir.map_or_else(PathBuf::new, |d| PathBuf::from(d.as_str()));
        // The directory's own rules first: they decide about the rest of it.
        let rules_file = quiet_rel(&dir_rel.join(IGNORE_FILE)).filter(|f| {
            names.iter().any(|(n, d)| n == IGNORE_FILE && !d) || self.entries.contains_key(f)
        });
        if let Some(f) = &rules_file {
            unsure |= matches!(self.scan_at(fd, f, false, changes), Found::Unsure);
        }
        self.reload_rules(&dir_rel, false);
        // What became of each name, for telling what the cache has here that is gone.
        let mut fate = vec![Fate::Unseen; names.len()];
        // Cached paths the rules hide: the cache cannot stand in for this listing.
        let mut frozen = false;
        for (i, (name, is_dir)) in names.iter().enumerate() {
            if dir.is_none() && name == STATE_DIR {
                continue;
            }
            if rules_file.is_some() && name == IGNORE_FILE && !is_dir {
                fate[i] = Fate::Scanned;
                continue;
            }
            let rel = dir_rel.join(name);
            if self.rules.matches(&rel, *is_dir) {
                // Not looked at; what the cache knew of it stays (frozen).
                fate[i] = Fate::Kept;
                frozen |= quiet_rel(&rel).is_some_and(|path| self.has_subtree(&path));
                continue;
            }
            let Some(path) = self.rel_path(&rel) else {
                continue;
            };
            let found = self.scan_at(fd, &path, false, changes);
            unsure |= matches!(found, Found::Unsure);
            fate[i] = Fate::Scanned;
            self.looked += 1;
            self.tick();
            if self.entries.get(&path).is_some_and(|s| s.entry.is_dir()) {
                let known = match found {
                    Found::Same(meta) => Some(meta),
                    _ => None,
                };
                fate[i] = if self.walk_into(fd, &path, known, changes) {
                    Fate::Walked
                } else {
                    Fate::Kept
                };
            }
        }
        // The cache's paths here that the walk did not account for are gone, unless the rules
        // hide them (frozen).
        let prefix = dir.map_or_else(String::new, |d| format!("{d}/"));
        let mut gone = Vec::new();
        let mut cached = self.entries.iter_from(&prefix);
        while let Some((path, _)) = cached.next() {
            let Some(rest) = path.as_str().strip_prefix(prefix.as_str()) else {
                break;
            };
            let (name, beneath) = rest
                .split_once('/')
                .map_or((rest, false), |(n, _)| (n, true));
            let fate = names
                .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
                .map_or(Fate::Unseen, |i| fate[i]);
            match fate {
                // Its own walk saw to what is beneath it, or it is kept as it was.
                Fate::Walked | Fate::Kept if beneath => {
                    let past = format!("{prefix}{name}0");
                    cached = self.entries.iter_from(&past);
                }
                Fate::Walked | Fate::Kept => {}
                Fate::Scanned if !beneath => {}
                _ if self.is_frozen(&path) => frozen = true,
                _ => gone.push(path.clone()),
            }
        }
        drop(cached);
        for path in gone {
            let old = self.put(path.clone(), None);
            changes.push(Changed {
                path,
                old,
                new: None,
            });
        }
        match before {
            Some(meta) if !unsure && !frozen && settled(&meta, now - self.settle_ns) => {
                let listing = Listing {
                    ino: meta.ino,
                    ctime_ns: meta.ctime_ns,
                    pass: self.pass,
                };
                let key = dir.map_or("", RelPath::as_str);
                match self.listings.get_mut(key) {
                    Some(l) => *l = listing,
                    None => {
                        self.listings.insert(key.to_string(), listing);
                    }
                }
            }
            _ => self.forget_listing(dir),
        }
    }

    /// Drops the recorded listing of `dir`, if any.
    fn forget_listing(&mut self, dir: Option<&RelPath>) {
        self.listings.remove(dir.map_or("", RelPath::as_str));
    }

    /// Whether the cache has `path` or anything beneath it.
    fn has_subtree(&self, path: &RelPath) -> bool {
        let lo = format!("{path}/");
        self.entries.contains_key(path)
            || self
                .entries
                .iter_from(&lo)
                .next()
                .is_some_and(|(k, _)| k.as_str().starts_with(&lo))
    }

    /// Reports the progress of a `scan_all`, if it is time to.
    fn tick(&mut self) {
        if let Some((progress, hashed)) = &mut self.progress {
            progress.tick(self.looked, *hashed);
        }
    }
}

/// What `Tree::scan_at` found.
#[derive(Clone, Copy, Debug)]
enum Found {
    /// Nothing could be told (unreadable, being written): the cache keeps what it had.
    Unsure,
    /// As cached, with this metadata now (for a directory: its listing may still hold).
    Same(Stat),
    /// Changed, gone, or nothing ferry syncs: the cache has what is there now.
    Updated,
}

/// What became of a listed name in `Tree::walk_listed`.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// Skipped (the state directory, a name that cannot travel).
    Unseen,
    /// Looked at; not a directory that was walked.
    Scanned,
    /// A directory that was walked: it accounted for what is beneath it.
    Walked,
    /// Ignored, or a directory that could not be opened: it and what is beneath it stay.
    Kept,
}

/// A directory's listing that later walks may stand on: while its inode and ctime are the ones
/// it had before the listing, it has the same names (creating, removing or renaming an entry
/// sets a directory's ctime, and nothing else can set it back), and the cache knew each of
/// them. Timestamps are coarse, so a listing counts only once they are `SETTLED` (`settled`).
#[derive(Clone, Copy, Debug)]
struct Listing {
    ino: u64,
    ctime_ns: i64,
    /// The `scan_all` that last relied on it or made it: the others' listings are dropped.
    pass: u64,
}

/// How old a directory's last change must be before its listing is recorded. A change in the
/// same clock tick as an earlier one leaves the ctime as it was, so a listing taken in between
/// would seem to hold after the second; ticks are a few milliseconds (2 s on FAT), and the
/// margin covers them with room to spare.
const SETTLED_NS: i64 = 3_000_000_000;

/// Whether a directory with metadata `meta` last changed before `past` (`SETTLED_NS` before
/// its listing). A filesystem that reports no ctime at all never settles.
fn settled(meta: &Stat, past: i64) -> bool {
    meta.ctime_ns > 0 && meta.ctime_ns < past && meta.mtime_ns < past
}

/// Wall-clock time in nanoseconds since the epoch (0 if the clock is before it: then nothing
/// settles, which is only slower).
fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Whether the file `meta` describes is `old` unchanged: same inode, size, mtime and mode.
fn same_file(old: &Seen, meta: &Stat) -> bool {
    old.entry.kind == Kind::File
        && meta.is_file()
        && old.ino == meta.ino
        && old.entry.size == meta.len
        && old.entry.mtime_ns == meta.mtime_ns
        && old.entry.mode == meta.perm()
}

/// Whether `meta` shows `seen` unchanged, in a directory whose names have not changed since it
/// was cached. A symlink with the same inode is the same link: its target cannot be rewritten
/// in place, only replaced, which changes the directory.
fn unchanged(seen: &Seen, meta: &Stat) -> bool {
    match seen.entry.kind {
        Kind::File => same_file(seen, meta),
        Kind::Dir => meta.is_dir() && *seen == dir_seen(meta),
        Kind::Symlink => meta.is_symlink() && seen.ino == meta.ino && seen.entry.size == meta.len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::renames::detect_renames;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-scan-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn paths(c: &[Changed]) -> Vec<&str> {
        let mut v: Vec<&str> = c.iter().map(|c| c.path.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn scan_finds_changes_and_hashes_only_what_moved() {
        let root = tmp("changes");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f.txt"), "one").unwrap();
        std::fs::create_dir_all(root.join(".ferry")).unwrap();
        std::fs::write(root.join(".ferry/x"), "state").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        let c = t.scan_all().unwrap();
        assert_eq!(paths(&c), ["a", "a/b", "a/b/f.txt"]);
        assert!(
            t.scan_all().unwrap().is_empty(),
            "unchanged tree: no changes"
        );

        std::fs::write(root.join("a/b/f.txt"), "two!").unwrap();
        let c = t.scan_path(Path::new("a/b/f.txt"));
        assert_eq!(paths(&c), ["a/b/f.txt"]);
        assert_eq!(c[0].new.as_ref().unwrap().entry.size, 4);

        std::fs::rename(root.join("a"), root.join("z")).unwrap();
        let mut c = t.scan_path(Path::new("a"));
        c.extend(t.scan_path(Path::new("z")));
        assert_eq!(detect_renames(&c).len(), 1, "{c:?}");

        std::fs::remove_dir_all(root.join("z")).unwrap();
        let c = t.scan_path(Path::new("z"));
        assert_eq!(paths(&c), ["z", "z/b", "z/b/f.txt"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Cached paths, sorted.
    fn cached(t: &Tree) -> Vec<String> {
        t.entries()
            .iter()
            .map(|(k, _)| k.as_str().to_string())
            .collect()
    }

    #[test]
    fn ignored_paths_are_not_reported_or_entered() {
        let root = tmp("ignored");
        std::fs::write(root.join(IGNORE_FILE), "*.log\nbuild/\n").unwrap();
        std::fs::create_dir_all(root.join("build/deep")).unwrap();
        std::fs::write(root.join("build/deep/out.o"), "x").unwrap();
        std::fs::write(root.join("a.log"), "x").unwrap();
        std::fs::write(root.join("a.txt"), "x").unwrap();
        std::fs::write(root.join(".a.txt.swp"), "x").unwrap();
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub").join(IGNORE_FILE), "!keep.log\n").unwrap();
        std::fs::write(root.join("sub/keep.log"), "x").unwrap();
        std::fs::write(root.join("sub/other.log"), "x").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        let c = t.scan_all().unwrap();
        let want = [
            ".ferryignore",
            "a.txt",
            "sub",
            "sub/.ferryignore",
            "sub/keep.log",
        ];
        assert_eq!(paths(&c), want);
        assert_eq!(cached(&t), want, "nothing beneath build/ was looked at");
        // Hints for ignored paths find nothing.
        std::fs::write(root.join("a.log"), "changed").unwrap();
        std::fs::write(root.join("build/new"), "x").unwrap();
        for hint in [
            "a.log",
            "build",
            "build/new",
            "build/deep/out.o",
            ".a.txt.swp",
        ] {
            assert!(t.scan_path(Path::new(hint)).is_empty(), "{hint}");
        }
        assert!(t.ignores(&"build/x".parse().unwrap(), None));
        assert!(!t.ignores(&"sub/keep.log".parse().unwrap(), Some(false)));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ignoring_freezes_and_un_ignoring_reports_what_changed_meanwhile() {
        let root = tmp("freeze");
        for f in ["edited.log", "deleted.log", "same.log", "plain.txt"] {
            std::fs::write(root.join(f), "v1").unwrap();
        }
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        assert_eq!(t.scan_all().unwrap().len(), 4);

        // A rule appears (seen by a hint, as inotify reports it): no deletes, nothing else.
        std::fs::write(root.join(IGNORE_FILE), "*.log\n").unwrap();
        let mut c = t.scan_path(Path::new(IGNORE_FILE));
        c.extend(t.scan_rule_changes());
        assert_eq!(paths(&c), [IGNORE_FILE]);
        assert_eq!(
            t.entries().len(),
            5,
            "the ignored files stay cached (frozen)"
        );

        // Changes to ignored files go unseen, by hints and by full scans alike.
        std::fs::write(root.join("edited.log"), "v2, longer").unwrap();
        std::fs::remove_file(root.join("deleted.log")).unwrap();
        std::fs::write(root.join("new.log"), "v1").unwrap();
        for f in ["edited.log", "deleted.log", "new.log"] {
            assert!(t.scan_path(Path::new(f)).is_empty(), "{f}");
        }
        assert!(t.scan_all().unwrap().is_empty());
        assert!(t.scan_rule_changes().is_empty());

        // The rule goes (ferry itself deletes the file, as when the delete comes from
        // elsewhere): what changed meanwhile is reported, the rest is touched.
        std::fs::remove_file(root.join(IGNORE_FILE)).unwrap();
        t.set(&IGNORE_FILE.parse().unwrap(), None);
        let c = t.scan_rule_changes();
        let got: Vec<(&str, bool, bool)> = {
            let mut v: Vec<_> = c
                .iter()
                .map(|c| (c.path.as_str(), c.old.is_some(), c.new.is_some()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            got,
            [
                ("deleted.log", true, false),
                ("edited.log", true, true),
                ("new.log", false, true),
                ("same.log", true, true),
            ]
        );
        let same = c.iter().find(|c| c.path.as_str() == "same.log").unwrap();
        assert_eq!(
            same.old, same.new,
            "touched: unchanged, to be looked at again"
        );
        let edited = c.iter().find(|c| c.path.as_str() == "edited.log").unwrap();
        assert_ne!(edited.old, edited.new);
        assert!(t.scan_rule_changes().is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rules_file_written_by_ferry_takes_effect_at_once() {
        let root = tmp("rules-set");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/x.tmp"), "x").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        t.scan_all().unwrap();
        let file: RelPath = format!("d/{IGNORE_FILE}").parse().unwrap();
        std::fs::write(t.abs(&file), "*.tmp\n").unwrap();
        let seen = hash_file(&root, &file).unwrap().unwrap();
        t.set(&file, Some(seen));
        assert!(t.ignores(&"d/x.tmp".parse().unwrap(), Some(false)));
        assert!(t.ignores(&"d/y.tmp".parse().unwrap(), Some(false)));
        assert!(!t.ignores(&"y.tmp".parse().unwrap(), Some(false)));
        assert!(t.scan_rule_changes().is_empty(), "ignoring reports nothing");
        // Dropping the rule: the new file there is found by the rescan that follows.
        std::fs::write(root.join("d/y.tmp"), "y").unwrap();
        std::fs::remove_file(t.abs(&file)).unwrap();
        t.set(&file, None);
        let c = t.scan_rule_changes();
        assert_eq!(paths(&c), ["d/x.tmp", "d/y.tmp"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_gone_takes_its_rules_and_what_they_hid() {
        let root = tmp("rules-gone");
        std::fs::write(root.join(IGNORE_FILE), "*.o\n").unwrap();
        std::fs::create_dir_all(root.join("proj")).unwrap();
        std::fs::write(root.join("proj/a.o"), "x").unwrap();
        std::fs::write(root.join("proj/b.tmp"), "x").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        t.scan_all().unwrap();
        std::fs::write(root.join("proj").join(IGNORE_FILE), "*.tmp\n").unwrap();
        let mut c = t.scan_path(Path::new("proj/.ferryignore"));
        c.extend(t.scan_rule_changes());
        assert_eq!(paths(&c), ["proj/.ferryignore"]);
        assert_eq!(
            t.entries().len(),
            4,
            "a.o (never cached) and b.tmp (frozen)"
        );
        std::fs::remove_dir_all(root.join("proj")).unwrap();
        let c = t.scan_path(Path::new("proj"));
        // b.tmp was hidden by proj's own rules, which went with it; a.o is not reported.
        assert_eq!(paths(&c), ["proj", "proj/.ferryignore", "proj/b.tmp"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nothing_is_looked_at_through_a_symlink() {
        let root = tmp("through-link");
        let outside = tmp("through-link-outside");
        std::fs::write(outside.join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d/link")).unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        // The links are entries of their own; nothing beneath them is.
        assert_eq!(paths(&t.scan_all().unwrap()), ["d", "d/link", "link"]);
        // Hints and refreshes for paths through the links find nothing there.
        for hint in ["link/secret", "d/link/secret"] {
            assert!(t.scan_path(Path::new(hint)).is_empty(), "{hint}");
            let (seen, changes) = t.refresh(&hint.parse().unwrap());
            assert!(seen.is_none() && changes.is_empty(), "{hint}");
            assert!(hash_file(&root, &hint.parse().unwrap()).is_err(), "{hint}");
        }
        // A cached directory swapped for a symlink: what it held is gone, nothing of the
        // link's target is reported.
        std::fs::write(root.join("d/f"), "x").unwrap();
        assert_eq!(paths(&t.scan_path(Path::new("d/f"))), ["d/f"]);
        std::fs::rename(root.join("d"), root.join("d.away")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        let c = t.scan_path(Path::new("d/f"));
        assert_eq!(paths(&c), ["d/f"]);
        assert!(c[0].new.is_none());
        assert!(t.scan_path(Path::new("d/secret")).is_empty());
        let c = t.scan_path(Path::new("d"));
        assert_eq!(
            paths(&c),
            ["d", "d/link"],
            "d is a link now; what it held is gone"
        );
        assert_eq!(
            t.get(&"d".parse().unwrap()).unwrap().entry.kind,
            Kind::Symlink
        );
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn names_that_cannot_travel_are_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let root = tmp("names");
        let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
        std::fs::write(root.join(bad), "x").unwrap();
        std::fs::write(root.join("line\nbreak"), "x").unwrap();
        std::os::unix::fs::symlink(bad, root.join("bad-target")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(root.join("good"), "x").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        let c = t.scan_all().unwrap();
        assert_eq!(paths(&c), ["good"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinks_are_entries_of_their_target_text() {
        let root = tmp("links");
        std::fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../nowhere", root.join("d/dangling")).unwrap();
        std::os::unix::fs::symlink("d", root.join("to-d")).unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        let c = t.scan_all().unwrap();
        assert_eq!(paths(&c), ["abs", "d", "d/dangling", "to-d"]);
        let entry = |t: &Tree, p: &str| t.get(&p.parse().unwrap()).unwrap().entry.clone();
        assert_eq!(entry(&t, "abs"), Entry::link("/etc"));
        assert_eq!(entry(&t, "d/dangling"), Entry::link("../nowhere"));
        assert!(t.scan_all().unwrap().is_empty(), "unchanged");
        // A new target is a change; so is a link replaced by a file.
        std::fs::remove_file(root.join("abs")).unwrap();
        std::os::unix::fs::symlink("/usr", root.join("abs")).unwrap();
        let c = t.scan_path(Path::new("abs"));
        assert_eq!(paths(&c), ["abs"]);
        assert_eq!(c[0].new.as_ref().unwrap().entry, Entry::link("/usr"));
        std::fs::remove_file(root.join("to-d")).unwrap();
        std::fs::write(root.join("to-d"), "now a file").unwrap();
        let c = t.scan_path(Path::new("to-d"));
        assert_eq!(c[0].new.as_ref().unwrap().entry.kind, Kind::File);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A tree whose listings are recorded as soon as they are made: `SETTLED_NS` is there for
    /// changes in the same clock tick as a listing, which `idle_scan` waits out instead.
    fn trusting(root: &Path) -> Tree {
        let mut t = Tree::new(root.to_path_buf(), BTreeMap::new());
        t.settle_ns = 0;
        t
    }

    /// `scan_all`, then a wait past the clock tick it ran in, so the next change moves a
    /// ctime. Returns the changes and how many directories were listed.
    fn idle_scan(t: &mut Tree) -> (Vec<Changed>, u64) {
        let lists = t.lists;
        let c = t.scan_all().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        (c, t.lists - lists)
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn an_idle_rescan_lists_nothing_and_writes_nothing() {
        let root = tmp("idle");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("a/b/f"), "f").unwrap();
        std::fs::write(root.join("a/g"), "g").unwrap();
        std::fs::write(root.join("a/x.log"), "ignored, never cached").unwrap();
        std::fs::write(root.join(IGNORE_FILE), "*.log\n").unwrap();
        std::os::unix::fs::symlink("a/g", root.join("link")).unwrap();
        let mut t = trusting(&root);
        let (c, lists) = idle_scan(&mut t);
        assert_eq!(
            paths(&c),
            [IGNORE_FILE, "a", "a/b", "a/b/f", "a/g", "empty", "link"]
        );
        assert_eq!(lists, 4);
        t.take_changes();
        for _ in 0..2 {
            let (c, lists) = idle_scan(&mut t);
            assert!(c.is_empty(), "{c:?}");
            assert_eq!(lists, 0, "every listing still holds");
            assert!(
                t.take_changes().is_empty(),
                "nothing rewritten in the cache"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn every_change_is_seen_where_listings_hold() {
        let root = tmp("held");
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/deep"), "deep").unwrap();
        std::fs::write(root.join("a/b/f"), "one").unwrap();
        std::fs::write(root.join("a/g"), "g").unwrap();
        std::fs::write(root.join("top"), "top").unwrap();
        std::os::unix::fs::symlink("one", root.join("a/link")).unwrap();
        let mut t = trusting(&root);
        idle_scan(&mut t);
        assert_eq!(idle_scan(&mut t).1, 0);
        // Each step: what it changes is reported, and only the directories it touched (or
        // whose entries it touched) are listed again.
        // What is done, how, and the paths it should report.
        type Step<'a> = (&'a str, Box<dyn Fn() + 'a>, Vec<&'a str>);
        let steps: Vec<Step<'_>> = vec![
            (
                "rewritten in place, same size",
                Box::new(|| std::fs::write(root.join("a/b/f"), "two").unwrap()),
                vec!["a/b/f"],
            ),
            (
                "rewritten deep down",
                Box::new(|| std::fs::write(root.join("a/b/c/deep"), "deeper").unwrap()),
                vec!["a/b/c/deep"],
            ),
            (
                "file mode",
                Box::new(|| set_mode(&root.join("a/g"), 0o600)),
                vec!["a/g"],
            ),
            (
                "directory mode",
                Box::new(|| set_mode(&root.join("a/b/c"), 0o700)),
                vec!["a/b/c"],
            ),
            (
                "created",
                Box::new(|| std::fs::write(root.join("a/b/c/new"), "new").unwrap()),
                vec!["a/b/c/new"],
            ),
            (
                "renamed",
                Box::new(|| std::fs::rename(root.join("a/g"), root.join("a/b/g2")).unwrap()),
                vec!["a/b/g2", "a/g"],
            ),
            (
                "symlink retargeted",
                Box::new(|| {
                    std::fs::remove_file(root.join("a/link")).unwrap();
                    std::os::unix::fs::symlink("two", root.join("a/link")).unwrap();
                }),
                vec!["a/link"],
            ),
            (
                "deleted",
                Box::new(|| std::fs::remove_file(root.join("top")).unwrap()),
                vec!["top"],
            ),
            (
                "directory made with contents",
                Box::new(|| {
                    std::fs::create_dir_all(root.join("a/n/m")).unwrap();
                    std::fs::write(root.join("a/n/m/x"), "x").unwrap();
                }),
                vec!["a/n", "a/n/m", "a/n/m/x"],
            ),
            (
                "directory removed",
                Box::new(|| std::fs::remove_dir_all(root.join("a/b/c")).unwrap()),
                vec!["a/b/c", "a/b/c/deep", "a/b/c/new"],
            ),
        ];
        for (what, op, want) in steps {
            op();
            let (c, lists) = idle_scan(&mut t);
            assert_eq!(paths(&c), want, "{what}");
            assert!(lists <= 3, "{what}: {lists} directories listed");
            let (c, _) = idle_scan(&mut t);
            assert!(c.is_empty(), "{what}: then nothing: {c:?}");
            assert_eq!(idle_scan(&mut t).1, 0, "{what}: then no listing");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_moved_away_and_back_is_listed_again() {
        let root = tmp("away-back");
        std::fs::create_dir_all(root.join("a/x/s")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::fs::write(root.join("a/x/s/f"), "f").unwrap();
        let mut t = trusting(&root);
        idle_scan(&mut t);
        idle_scan(&mut t);
        std::fs::rename(root.join("a/x"), root.join("b/x")).unwrap();
        let (c, _) = idle_scan(&mut t);
        assert_eq!(detect_renames(&c).len(), 1, "{c:?}");
        // Back where it was: `s` and its inode and ctime are what the first listing saw, but
        // the cache forgot what it held when it moved away.
        std::fs::rename(root.join("b/x"), root.join("a/x")).unwrap();
        let (c, _) = idle_scan(&mut t);
        let added: Vec<&str> = c
            .iter()
            .filter(|c| c.new.is_some())
            .map(|c| c.path.as_str())
            .collect();
        assert_eq!(added, ["a/x", "a/x/s", "a/x/s/f"]);
        assert!(idle_scan(&mut t).0.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn frozen_paths_stay_frozen_where_listings_hold() {
        let root = tmp("held-frozen");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/a.log"), "v1").unwrap();
        std::fs::write(root.join("d/a.txt"), "v1").unwrap();
        let mut t = trusting(&root);
        idle_scan(&mut t);
        std::fs::write(root.join(IGNORE_FILE), "*.log\n").unwrap();
        let (mut c, _) = idle_scan(&mut t);
        c.extend(t.scan_rule_changes());
        assert_eq!(paths(&c), [IGNORE_FILE]);
        idle_scan(&mut t);
        for _ in 0..2 {
            std::fs::write(root.join("d/a.log"), "v2, longer").unwrap();
            std::fs::write(root.join("d/b.log"), "new").unwrap();
            assert!(idle_scan(&mut t).0.is_empty());
        }
        std::fs::write(root.join("d/a.txt"), "v2, longer").unwrap();
        assert_eq!(paths(&idle_scan(&mut t).0), ["d/a.txt"]);
        // A changed rules file is seen where listings hold, and un-ignoring reports what
        // changed meanwhile.
        std::fs::write(root.join(IGNORE_FILE), "*.tmp\n").unwrap();
        let (mut c, _) = idle_scan(&mut t);
        c.extend(t.scan_rule_changes());
        // The walk that met the new rules reports them, and the rules' catch-up again.
        let mut seen = paths(&c);
        seen.dedup();
        assert_eq!(seen, [IGNORE_FILE, "d/a.log", "d/b.log"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ferry_s_own_writes_make_the_next_walk_list() {
        let root = tmp("held-set");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), "f").unwrap();
        let mut t = trusting(&root);
        idle_scan(&mut t);
        // The cache forgets a file that is still there (as a delete that failed might leave
        // it): the next walk lists and finds it.
        t.set(&"d/f".parse().unwrap(), None);
        let (c, lists) = idle_scan(&mut t);
        assert_eq!(paths(&c), ["d/f"]);
        assert_eq!(lists, 2);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
