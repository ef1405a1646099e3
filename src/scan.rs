//! The local tree: what is on this replica's disk, kept as a cache of entries with inodes so a
//! rescan hashes only what moved (size, mtime or inode changed).
//!
//! Watcher hints say where to look; `Tree` looks and reports what changed. Names that cannot
//! travel (not UTF-8, CR/LF, too long) and symlinks or special files are reported once, then
//! skipped.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::core::entry::{Entry, Kind};
use crate::core::path::{RelPath, STATE_DIR};
use crate::core::renames::{Changed, Seen};
use crate::core::tracked::Tracked;

/// The cached state of a replica's tree.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    entries: Tracked<Seen>,
    /// Paths already reported as impossible to sync, so each is logged once.
    reported: HashSet<PathBuf>,
    /// Device and inode of `<root>/.ferry` when the tree was opened: if the root is unmounted,
    /// replaced or moved away, this no longer matches (see `check_root`).
    marker: Option<(u64, u64)>,
    /// While `scan_all` runs: its progress report and the bytes hashed so far.
    progress: Option<(crate::progress::Progress, u64)>,
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

/// Modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
}

/// The `Seen` for a directory's metadata.
pub fn dir_seen(meta: &Metadata) -> Seen {
    Seen {
        entry: Entry::dir(meta.mode() & 0o7777),
        ino: meta.ino(),
    }
}

/// Hashes a file, retrying while it is being written; `None` if it kept changing.
/// Never follows a symlink. Returns the entry with the metadata the hash belongs to.
pub fn hash_file(path: &Path) -> io::Result<Option<Seen>> {
    for _ in 0..3 {
        let file = File::options()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)?;
        let before = file.metadata()?;
        if !before.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(&file)?;
        let after = file.metadata()?;
        if before.len() == after.len() && mtime_ns(&before) == mtime_ns(&after) {
            return Ok(Some(Seen {
                entry: Entry {
                    kind: Kind::File,
                    size: after.len(),
                    mtime_ns: mtime_ns(&after),
                    mode: after.mode() & 0o7777,
                    hash: *hasher.finalize().as_bytes(),
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
            reported: HashSet::new(),
            marker,
            progress: None,
        }
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
    pub fn entries(&self) -> &BTreeMap<RelPath, Seen> {
        &self.entries
    }

    /// Cache entries changed since the last call (for the journal).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<Seen>)> {
        self.entries.take_changes()
    }

    /// The cached entry of `path`.
    pub fn get(&self, path: &RelPath) -> Option<&Seen> {
        self.entries.get(path)
    }

    /// Absolute path of `rel`.
    pub fn abs(&self, rel: &RelPath) -> PathBuf {
        self.root.join(rel.as_str())
    }

    /// Records what ferry itself just put at `path` (so the watcher's echo is no change).
    pub fn set(&mut self, path: &RelPath, seen: Option<Seen>) {
        match seen {
            Some(s) => {
                self.entries.insert(path.clone(), s);
            }
            None => {
                self.remove_subtree(path);
            }
        }
    }

    /// Moves the cache of `from` and everything beneath it to `to`.
    pub fn rename_subtree(&mut self, from: &RelPath, to: &RelPath) {
        let moved: Vec<(RelPath, Seen)> = self.take_subtree(from);
        for (p, s) in moved {
            self.entries.insert(p.rebase(from, to), s);
        }
    }

    fn take_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, Seen)> {
        let keys: Vec<RelPath> = self.subtree_keys(path);
        keys.into_iter()
            .filter_map(|k| self.entries.remove(&k).map(|s| (k, s)))
            .collect()
    }

    fn remove_subtree(&mut self, path: &RelPath) -> Vec<(RelPath, Seen)> {
        self.take_subtree(path)
    }

    /// `path` and every cached path beneath it.
    fn subtree_keys(&self, path: &RelPath) -> Vec<RelPath> {
        crate::agent::keys_under(&self.entries, path)
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
        let mut changes = Vec::new();
        let mut seen = HashSet::new();
        self.progress = Some((crate::progress::Progress::new("scanning", "entries"), 0));
        self.walk_children(None, &mut seen, &mut changes);
        self.progress = None;
        let gone: Vec<RelPath> = self
            .entries
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for path in gone {
            let old = self.entries.remove(&path);
            changes.push(Changed {
                path,
                old,
                new: None,
            });
        }
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
        let Some(path) = self.rel_path(rel) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        self.scan_one(&path, true, &mut changes);
        changes
    }

    /// Re-stats `path` now (not its subtree) and returns its current state, updating the cache.
    pub fn refresh(&mut self, path: &RelPath) -> (Option<Seen>, Vec<Changed>) {
        let mut changes = Vec::new();
        self.scan_one(path, false, &mut changes);
        (self.entries.get(path).cloned(), changes)
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
        let abs = self.abs(path);
        let meta = match std::fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                for (p, old) in self.remove_subtree(path) {
                    changes.push(Changed {
                        path: p,
                        old: Some(old),
                        new: None,
                    });
                }
                return;
            }
            Err(e) => {
                log::warn!("cannot stat {path}: {e}");
                return;
            }
        };
        let new = if meta.is_dir() {
            Some(dir_seen(&meta))
        } else if meta.is_file() {
            match self.entries.get(path) {
                Some(old)
                    if old.entry.kind == Kind::File
                        && old.ino == meta.ino()
                        && old.entry.size == meta.len()
                        && old.entry.mtime_ns == mtime_ns(&meta)
                        && old.entry.mode == meta.mode() & 0o7777 =>
                {
                    Some(old.clone())
                }
                _ => match hash_file(&abs) {
                    Ok(Some(s)) => {
                        if let Some((_, hashed)) = &mut self.progress {
                            *hashed += s.entry.size;
                        }
                        Some(s)
                    }
                    // Still being written: its close will bring another hint.
                    Ok(None) => return,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => {
                        log::warn!("cannot read {path}: {e}");
                        return;
                    }
                },
            }
        } else {
            if self.reported.insert(abs.clone()) {
                log::warn!("skipped {path}: symlinks and special files are not synced");
            }
            None
        };
        let was_dir = self.entries.get(path).is_some_and(|s| s.entry.is_dir());
        let is_dir = new.as_ref().is_some_and(|s| s.entry.is_dir());
        if was_dir && !is_dir {
            // A directory replaced by a file: everything that was beneath it is gone.
            for (p, old) in self.remove_subtree(path) {
                if &p != path {
                    changes.push(Changed {
                        path: p,
                        old: Some(old),
                        new: None,
                    });
                }
            }
        }
        let old = match &new {
            Some(s) => self.entries.insert(path.clone(), s.clone()),
            None => self.entries.remove(path),
        };
        if old != new {
            changes.push(Changed {
                path: path.clone(),
                old,
                new,
            });
        }
        if deep && is_dir {
            let mut seen = HashSet::new();
            self.walk_children(Some(path), &mut seen, changes);
            let gone: Vec<RelPath> = self
                .subtree_keys(path)
                .into_iter()
                .filter(|k| k != path && !seen.contains(k))
                .collect();
            for p in gone {
                let old = self.entries.remove(&p);
                changes.push(Changed {
                    path: p,
                    old,
                    new: None,
                });
            }
        }
    }

    /// Scans every entry beneath `dir` (the root if `None`), recording each path seen.
    fn walk_children(
        &mut self,
        dir: Option<&RelPath>,
        seen: &mut HashSet<RelPath>,
        changes: &mut Vec<Changed>,
    ) {
        let abs = match dir {
            Some(d) => self.abs(d),
            None => self.root.clone(),
        };
        let rd = match std::fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) => {
                log::warn!("cannot list {}: {e}", abs.display());
                // Keep what we knew beneath it rather than reporting it all deleted.
                if let Some(d) = dir {
                    seen.extend(self.subtree_keys(d));
                }
                return;
            }
        };
        let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
        names.sort();
        for name in names {
            let rel: PathBuf = match dir {
                Some(d) => Path::new(d.as_str()).join(&name),
                None => {
                    if name == STATE_DIR {
                        continue;
                    }
                    PathBuf::from(&name)
                }
            };
            let Some(path) = self.rel_path(&rel) else {
                continue;
            };
            let mut sub = Vec::new();
            self.scan_one(&path, false, &mut sub);
            changes.append(&mut sub);
            if self.entries.contains_key(&path) {
                seen.insert(path.clone());
            }
            if let Some((progress, hashed)) = &mut self.progress {
                progress.tick(seen.len() as u64, *hashed);
            }
            if self.entries.get(&path).is_some_and(|s| s.entry.is_dir()) {
                self.walk_children(Some(&path), seen, changes);
            }
        }
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

    #[test]
    fn names_that_cannot_travel_are_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let root = tmp("names");
        std::fs::write(root.join(std::ffi::OsStr::from_bytes(b"bad\xff")), "x").unwrap();
        std::fs::write(root.join("line\nbreak"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        std::fs::write(root.join("good"), "x").unwrap();
        let mut t = Tree::new(root.clone(), BTreeMap::new());
        let c = t.scan_all().unwrap();
        assert_eq!(paths(&c), ["good"]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
