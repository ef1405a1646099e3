//! What ferry knows of one path: its kind, size, mtime, mode and content hash.

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest of a file's contents.
pub type Hash = [u8; 32];

/// The hash of zero bytes, shared by every empty file and by directories.
pub const EMPTY_HASH: Hash = [
    0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9, 0x49,
    0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
];

/// Longest symlink target ferry syncs (Linux's PATH_MAX).
pub const MAX_LINK_TARGET: usize = 4096;

/// The kinds of entry ferry syncs. Special files (FIFOs, sockets, devices) are reported and
/// skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory (its mtime and size are not synced: they change with its contents).
    Dir,
    /// A symbolic link, synced as its target text and never followed. The target is not kept
    /// in the entry (memory per path matters on a phone): it travels in the protocol messages
    /// and is read from disk when it has to be sent, checked against `hash`.
    Symlink,
}

/// The synced state of one path. Two replicas agree on a path when their entries are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File or directory.
    pub kind: Kind,
    /// Length in bytes (0 for directories, the target's length for symlinks).
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (0 for directories and
    /// symlinks).
    pub mtime_ns: i64,
    /// Permission bits (`0o7777` part of `st_mode`; 0 for symlinks, which have none).
    pub mode: u32,
    /// BLAKE3 of the contents (`EMPTY_HASH` for directories, of the target for symlinks).
    pub hash: Hash,
}

impl Entry {
    /// A directory entry; only its mode travels.
    pub fn dir(mode: u32) -> Entry {
        Entry {
            kind: Kind::Dir,
            size: 0,
            mtime_ns: 0,
            mode,
            hash: EMPTY_HASH,
        }
    }

    /// A symlink entry for `target` (only its text is synced: no mode, no mtime).
    pub fn link(target: &str) -> Entry {
        Entry {
            kind: Kind::Symlink,
            size: target.len() as u64,
            mtime_ns: 0,
            mode: 0,
            hash: *blake3::hash(target.as_bytes()).as_bytes(),
        }
    }

    /// Checks a symlink target received from a peer against this entry: a valid target
    /// (`check_target`) whose length and hash are the entry's, and a symlink entry as
    /// `Entry::link` makes it.
    pub fn check_link(&self, target: &str) -> Result<(), &'static str> {
        check_target(target)?;
        if *self != Entry::link(target) {
            return Err("the target does not match its entry (kind, length or hash)");
        }
        Ok(())
    }

    /// True if both hold the same bytes (or are both directories): metadata may differ.
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind && self.size == other.size && self.hash == other.hash
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}

/// Checks a symlink target as ferry syncs it: any text (absolute or with `..`: it is created
/// as it is and never followed), but not empty, at most `MAX_LINK_TARGET` bytes, no NUL.
pub fn check_target(target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("empty symlink target");
    }
    if target.len() > MAX_LINK_TARGET {
        return Err("symlink target longer than 4096 bytes");
    }
    if target.contains('\0') {
        return Err("symlink target contains a NUL byte");
    }
    Ok(())
}

/// Short hex of a hash for logs.
pub fn short_hash(h: &Hash) -> String {
    h[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_hash_is_blake3_of_nothing() {
        assert_eq!(*blake3::hash(b"").as_bytes(), EMPTY_HASH);
    }

    #[test]
    fn link_targets_are_checked_against_their_entry() {
        let long = "x".repeat(MAX_LINK_TARGET + 1);
        let max = "x".repeat(MAX_LINK_TARGET);
        let e = Entry::link("../a b/c");
        assert_eq!(
            (e.kind, e.size, e.mtime_ns, e.mode),
            (Kind::Symlink, 8, 0, 0)
        );
        assert_eq!(e.hash, *blake3::hash(b"../a b/c").as_bytes());
        let mut wrong_kind = e.clone();
        wrong_kind.kind = Kind::File;
        let mut with_mode = e.clone();
        with_mode.mode = 0o777;
        for (name, entry, target, ok) in [
            ("relative with ..", &e, "../a b/c", true),
            ("absolute", &Entry::link("/etc/passwd"), "/etc/passwd", true),
            ("longest", &Entry::link(&max), max.as_str(), true),
            ("other target", &e, "../a b/d", false),
            ("file entry", &wrong_kind, "../a b/c", false),
            ("mode set", &with_mode, "../a b/c", false),
            ("empty", &Entry::link(""), "", false),
            ("too long", &Entry::link(&long), long.as_str(), false),
            ("NUL", &Entry::link("a\0b"), "a\0b", false),
        ] {
            assert_eq!(entry.check_link(target).is_ok(), ok, "{name}");
        }
    }
}
