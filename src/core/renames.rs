//! Rename detection: a path that vanished and a path that appeared with the same inode and the
//! same content are one rename, not a delete and an upload. Pure: it reads scan results only.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::path::RelPath;

/// One side of a scan change: the entry and the inode it had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The synced state.
    pub entry: Entry,
    /// Inode number, the identity that survives a rename.
    pub ino: u64,
}

/// A path whose state changed between two scans.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    /// The path.
    pub path: RelPath,
    /// What the previous scan saw (`None`: absent).
    pub old: Option<Seen>,
    /// What this scan saw (`None`: gone).
    pub new: Option<Seen>,
}

/// Top-level renames `(from, to)` explained by `changes`: a directory rename is reported once,
/// not once per file beneath it. Ordered parents first.
pub fn detect_renames(changes: &[Changed]) -> Vec<(RelPath, RelPath)> {
    let mut gone: HashMap<u64, (&RelPath, &Seen)> = HashMap::new();
    for c in changes {
        if let (Some(old), None) = (&c.old, &c.new) {
            gone.insert(old.ino, (&c.path, old));
        }
    }
    let mut added: Vec<(&RelPath, &Seen)> = changes
        .iter()
        .filter_map(|c| match (&c.old, &c.new) {
            (None, Some(new)) => Some((&c.path, new)),
            _ => None,
        })
        .collect();
    added.sort_by_key(|(p, _)| (p.depth(), (*p).clone()));
    let mut renames: Vec<(RelPath, RelPath)> = Vec::new();
    for (to, new) in added {
        let Some((from, old)) = gone.get(&new.ino) else {
            continue;
        };
        if !old.entry.same_content(&new.entry) || old.entry.mode != new.entry.mode {
            continue;
        }
        // Implied by a directory rename already found above it.
        let implied = renames.iter().any(|(f, t)| {
            to.starts_with(t) && from.starts_with(f) && to.rebase(t, f).as_ref() == Ok(*from)
        });
        if !implied && !to.starts_with(from) && !from.starts_with(to) {
            renames.push(((*from).clone(), to.clone()));
        }
    }
    renames
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::entry::{Kind, EMPTY_HASH};

    fn file(ino: u64, content: &str) -> Option<Seen> {
        Some(Seen {
            entry: Entry {
                kind: Kind::File,
                size: content.len() as u64,
                mtime_ns: 5,
                mode: 0o644,
                hash: *blake3::hash(content.as_bytes()).as_bytes(),
            },
            ino,
        })
    }

    fn dir(ino: u64) -> Option<Seen> {
        Some(Seen {
            entry: Entry::dir(0o755),
            ino,
        })
    }

    fn ch(path: &str, old: Option<Seen>, new: Option<Seen>) -> Changed {
        Changed {
            path: path.parse().unwrap(),
            old,
            new,
        }
    }

    fn names(r: Vec<(RelPath, RelPath)>) -> Vec<(String, String)> {
        r.into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn file_rename() {
        let c = [
            ch("a.txt", file(1, "x"), None),
            ch("b.txt", None, file(1, "x")),
        ];
        assert_eq!(
            names(detect_renames(&c)),
            [("a.txt".into(), "b.txt".into())]
        );
    }

    #[test]
    fn directory_rename_is_reported_once() {
        let c = [
            ch("d", dir(1), None),
            ch("d/x", file(2, "x"), None),
            ch("d/y", file(3, "y"), None),
            ch("e", None, dir(1)),
            ch("e/x", None, file(2, "x")),
            ch("e/y", None, file(3, "y")),
        ];
        assert_eq!(names(detect_renames(&c)), [("d".into(), "e".into())]);
    }

    #[test]
    fn not_renames() {
        // Same inode reused for different bytes (delete, then a new file got the inode).
        let c = [ch("a", file(1, "x"), None), ch("b", None, file(1, "y"))];
        assert!(detect_renames(&c).is_empty());
        // Different inodes, same bytes: a copy then a delete is not a rename.
        let c = [ch("a", file(1, "x"), None), ch("b", None, file(2, "x"))];
        assert!(detect_renames(&c).is_empty());
        // A file and a dir never match.
        let c = [
            ch("a", file(1, ""), None),
            ch(
                "b",
                None,
                Some(Seen {
                    entry: Entry {
                        kind: Kind::Dir,
                        size: 0,
                        mtime_ns: 0,
                        mode: 0o644,
                        hash: EMPTY_HASH,
                    },
                    ino: 1,
                }),
            ),
        ];
        assert!(detect_renames(&c).is_empty());
    }

    #[test]
    fn file_moved_out_of_renamed_dir_is_its_own_rename() {
        let c = [
            ch("d", dir(1), None),
            ch("d/x", file(2, "x"), None),
            ch("e", None, dir(1)),
            ch("top.txt", None, file(2, "x")),
        ];
        assert_eq!(
            names(detect_renames(&c)),
            [("d".into(), "e".into()), ("d/x".into(), "top.txt".into())]
        );
    }
}
