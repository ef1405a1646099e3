//! What ferry knows of one path: its kind, size, mtime, mode and content hash.

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest of a file's contents.
pub type Hash = [u8; 32];

/// The hash of zero bytes, shared by every empty file and by directories.
pub const EMPTY_HASH: Hash = [
    0xaf, 0x13, 0x49, 0xb9, 0xf5, 0xf9, 0xa1, 0xa6, 0xa0, 0x40, 0x4d, 0xea, 0x36, 0xdc, 0xc9, 0x49,
    0x9b, 0xcb, 0x25, 0xc9, 0xad, 0xc1, 0x12, 0xb7, 0xcc, 0x9a, 0x93, 0xca, 0xe4, 0x1f, 0x32, 0x62,
];

/// The two kinds of entry ferry syncs. Symlinks and special files are reported and skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory (its mtime and size are not synced: they change with its contents).
    Dir,
}

/// The synced state of one path. Two replicas agree on a path when their entries are equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File or directory.
    pub kind: Kind,
    /// Length in bytes (0 for directories).
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (0 for directories).
    pub mtime_ns: i64,
    /// Permission bits (`0o7777` part of `st_mode`).
    pub mode: u32,
    /// BLAKE3 of the contents (`EMPTY_HASH` for directories).
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

    /// True if both hold the same bytes (or are both directories): metadata may differ.
    pub fn same_content(&self, other: &Entry) -> bool {
        self.kind == other.kind && self.size == other.size && self.hash == other.hash
    }

    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
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
}
