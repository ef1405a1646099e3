//! Hashing a file's contents, on several threads when it is large.
//!
//! BLAKE3 is a tree: a large input splits into subtrees whose chaining values are hashed
//! separately and merged (`blake3::hazmat`). One thread hashes about 4 GB/s here, so a 1 GiB
//! file kept one core busy for a quarter of a second while the others idled, and a change to
//! it waited that long before its upload began.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use blake3::hazmat::{ChainingValue, HasherExt, Mode};

use crate::core::entry::Hash;

/// Files smaller than this are hashed on one thread: splitting costs more than it saves.
const PARALLEL_MIN: u64 = 8 << 20;

/// No piece of work is smaller than this (subtrees only split in halves down to here).
const PIECE_MIN: u64 = 1 << 20;

/// At most this many threads hash one file.
const THREADS_MAX: usize = 4;

/// How much is read at a time.
const BUF: usize = 256 * 1024;

/// The hash of the first `len` bytes of `file` (read with `pread`: its offset is left alone).
/// A file shorter than `len` is an `UnexpectedEof` error (it shrank: the caller looks again).
pub fn contents(file: &File, len: u64) -> io::Result<Hash> {
    let threads = if len < PARALLEL_MIN { 1 } else { threads() };
    if threads < 2 {
        let mut hasher = blake3::Hasher::new();
        read_into(file, 0, len, &mut hasher)?;
        return Ok(*hasher.finalize().as_bytes());
    }
    // Pieces of about an eighth of each thread's share keep the threads evenly busy, though
    // the tree's split points are powers of two.
    let piece = (len / (threads as u64 * 8)).max(PIECE_MIN);
    let mut pieces = Vec::new();
    let tree = plan(0, len, piece, &mut pieces);
    let cvs = hash_pieces(file, &pieces, threads)?;
    let Tree::Parent(left, right) = tree else {
        unreachable!("a file of PARALLEL_MIN bytes or more splits");
    };
    Ok(*merge_subtrees_root(&value(&left, &cvs), &value(&right, &cvs), Mode::Hash).as_bytes())
}

/// How many threads hash a large file: asked once (std reads the cgroup's CPU quota from
/// `/sys` to answer, several system calls).
fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(THREADS_MAX)
    })
}

/// The shape of BLAKE3's tree over a file, down to the pieces hashed whole.
enum Tree {
    /// Index into the list of pieces.
    Piece(usize),
    Parent(Box<Tree>, Box<Tree>),
}

/// Splits `len` bytes at `offset` the way BLAKE3's tree does, until the subtrees are at most
/// `piece` bytes; appends each piece's `(offset, len)` to `pieces`, in order.
fn plan(offset: u64, len: u64, piece: u64, pieces: &mut Vec<(u64, u64)>) -> Tree {
    if len <= piece {
        pieces.push((offset, len));
        return Tree::Piece(pieces.len() - 1);
    }
    let left = left_subtree_len(len);
    Tree::Parent(
        Box::new(plan(offset, left, piece, pieces)),
        Box::new(plan(offset + left, len - left, piece, pieces)),
    )
}

/// The chaining value of each piece, hashed by `threads` threads taking the next piece in turn.
fn hash_pieces(
    file: &File,
    pieces: &[(u64, u64)],
    threads: usize,
) -> io::Result<Vec<ChainingValue>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let work = || -> io::Result<Vec<(usize, ChainingValue)>> {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(offset, len)) = pieces.get(i) else {
                return Ok(done);
            };
            let mut hasher = blake3::Hasher::new();
            hasher.set_input_offset(offset);
            read_into(file, offset, len, &mut hasher)?;
            done.push((i, hasher.finalize_non_root()));
        }
    };
    let mut cvs = vec![[0; 32]; pieces.len()];
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mine = work();
        for done in helpers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .chain([mine])
        {
            for (i, cv) in done? {
                cvs[i] = cv;
            }
        }
        Ok(cvs)
    })
}

/// The chaining value of a subtree whose pieces are hashed.
fn value(tree: &Tree, cvs: &[ChainingValue]) -> ChainingValue {
    match tree {
        Tree::Piece(i) => cvs[*i],
        Tree::Parent(l, r) => merge_subtrees_non_root(&value(l, cvs), &value(r, cvs), Mode::Hash),
    }
}

/// Feeds `len` bytes of `file` from `offset` to `hasher`.
fn read_into(file: &File, offset: u64, len: u64, hasher: &mut blake3::Hasher) -> io::Result<()> {
    // (On a 32-bit target a length need not fit a `usize`: capped, never truncated.)
    let mut buf = vec![0u8; usize::try_from(len).map_or(BUF, |l| l.min(BUF))];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let want = usize::try_from(end - at).map_or(buf.len(), |r| r.min(buf.len()));
        let n = file.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch file holding `bytes`, removed when the returned guard drops.
    fn scratch(name: &str, bytes: &[u8]) -> (File, Removed) {
        let path = std::env::temp_dir().join(format!("ferry-hash-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        (File::open(&path).unwrap(), Removed(path))
    }

    struct Removed(std::path::PathBuf);

    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn matches_blake3_at_every_size_and_split() {
        // Pseudo-random bytes, so a piece hashed at the wrong offset or place changes the hash.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let bytes: Vec<u8> = (0..(PARALLEL_MIN * 3 + 12_345))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (file, _removed) = scratch("sizes", &bytes);
        for len in [
            0,
            1,
            1024,
            1025,
            PARALLEL_MIN - 1,
            PARALLEL_MIN,
            PARALLEL_MIN + 1,
            PARALLEL_MIN + PIECE_MIN * 3 + 7,
            PARALLEL_MIN * 2,
            bytes.len() as u64,
        ] {
            let want = *blake3::hash(&bytes[..len as usize]).as_bytes();
            assert_eq!(contents(&file, len).unwrap(), want, "{len} bytes");
        }
        // Every piece size the planner might pick, with up to THREADS_MAX threads.
        for piece in [PIECE_MIN, 3 * PIECE_MIN, 5 * PIECE_MIN + 1] {
            for threads in 1..=THREADS_MAX {
                let len = bytes.len() as u64;
                let mut pieces = Vec::new();
                let Tree::Parent(l, r) = plan(0, len, piece, &mut pieces) else {
                    panic!("no split")
                };
                let cvs = hash_pieces(&file, &pieces, threads).unwrap();
                let got = merge_subtrees_root(&value(&l, &cvs), &value(&r, &cvs), Mode::Hash);
                assert_eq!(*got.as_bytes(), *blake3::hash(&bytes).as_bytes());
            }
        }
    }

    #[test]
    fn a_file_shorter_than_asked_is_an_error() {
        let (file, _removed) = scratch("short", &vec![7u8; (PARALLEL_MIN + 10) as usize]);
        for len in [100, PARALLEL_MIN * 2] {
            let err = contents(&file, PARALLEL_MIN + 10 + len).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }
}
