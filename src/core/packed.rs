//! `Packed`: a sorted table of paths and values, encoded into one block of bytes. What an
//! agent keeps of each path it tracks, at a fraction of a map's cost.
//!
//! A `BTreeMap<RelPath, Seen>` costs about 113 bytes a path at 100,000 paths: a 72-byte slot
//! in full nodes (81 with the tree's inner nodes), and the path's own 32-byte allocation. Here
//! a path is stored as what it shares with the path before it and the rest of its text (a
//! path in a directory of 100 files is 3 or 4 bytes), and a value as its own compact bytes
//! (`Pack`: a file's scan state is about 40 bytes, 32 of them its hash).
//!
//! The table is immutable: it is built in one pass from pairs in key order, and read by
//! binary search over groups of `GROUP` records (the first of each holds its path whole;
//! the group of the last lookup is tried first), then a walk within the group. Changes are
//! kept beside it and folded in by rebuilding it (see `core::layered`).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::entry::{Entry, Kind, EMPTY_HASH};
use super::path::RelPath;
use super::renames::Seen;

/// A value that packs into bytes and back.
pub trait Pack: Sized {
    /// What a value is coded against: what the values before it in its group left (a fresh
    /// one at the start of each group).
    type Context: Default + std::fmt::Debug;
    /// Appends the value's bytes to `out`.
    fn pack(&self, cx: &mut Self::Context, out: &mut Vec<u8>);
    /// Reads a value `pack` wrote from the front of `bytes`, advancing it.
    fn unpack(cx: &mut Self::Context, bytes: &mut &[u8]) -> Self;
}

/// Records in a group; the first of each holds its path whole. Lookups walk up to this many
/// records after the binary search: 16 keeps that walk short, and the index of groups at
/// half a byte a path.
const GROUP: usize = 16;

/// A sorted, immutable table of paths and values packed into bytes.
pub struct Packed<V> {
    /// The records, in path order: the length of the prefix shared with the previous path
    /// (0 at the start of a group), the length of the rest, the rest, then the value.
    bytes: Box<[u8]>,
    /// Where each group starts in `bytes`.
    groups: Box<[usize]>,
    len: usize,
    /// The group the last lookup went to: lookups often come in path order (a batch of
    /// changes, a listing), so it or the next one is tried before a binary search.
    hint: AtomicUsize,
    _values: PhantomData<fn() -> V>,
}

impl<V> Default for Packed<V> {
    fn default() -> Self {
        Packed {
            bytes: Box::default(),
            groups: Box::default(),
            len: 0,
            hint: AtomicUsize::new(0),
            _values: PhantomData,
        }
    }
}

impl<V> Clone for Packed<V> {
    fn clone(&self) -> Self {
        Packed {
            bytes: self.bytes.clone(),
            groups: self.groups.clone(),
            len: self.len,
            hint: AtomicUsize::new(self.hint.load(Relaxed)),
            _values: PhantomData,
        }
    }
}

impl<V> std::fmt::Debug for Packed<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Packed({} paths in {} bytes)",
            self.len,
            self.bytes.len()
        )
    }
}

impl<V: Pack> Packed<V> {
    /// The table of `pairs`, whose keys must be strictly ascending.
    pub fn from_sorted<K: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Packed<V> {
        let mut b = Builder::with_capacity(0);
        for (key, value) in pairs {
            b.push(key.as_ref(), &value);
        }
        b.finish()
    }

    /// How many paths the table holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the table takes on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.len() + self.groups.len() * size_of::<usize>()
    }

    /// The path of the group that starts at `start` in `bytes`, as stored (whole).
    fn group_key(&self, start: usize) -> &[u8] {
        let mut at = &self.bytes[start..];
        let shared = take_varint(&mut at);
        debug_assert_eq!(shared, 0);
        let rest = take_varint(&mut at) as usize;
        &at[..rest]
    }

    /// The last group whose first path is not above `key`: it holds the first record not
    /// below `key`, if any does; failing that, the first record of the next group is it.
    fn group_of(&self, key: &[u8]) -> usize {
        let holds = |g: usize| {
            self.groups
                .get(g)
                .is_some_and(|&at| self.group_key(at) <= key)
                && self
                    .groups
                    .get(g + 1)
                    .is_none_or(|&at| key < self.group_key(at))
        };
        let hint = self.hint.load(Relaxed);
        if holds(hint) {
            return hint;
        }
        let g = if holds(hint + 1) {
            hint + 1
        } else {
            let after = self.groups.partition_point(|&at| self.group_key(at) <= key);
            after.saturating_sub(1)
        };
        self.hint.store(g, Relaxed);
        g
    }

    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<V> {
        let mut c = self.cursor_at(key);
        (c.pending && c.key == key.as_bytes()).then(|| c.take_value())
    }

    pub fn contains_key(&self, key: &str) -> bool {
        let c = self.cursor_at(key);
        c.pending && c.key == key.as_bytes()
    }

    /// A cursor over every record, in order.
    pub fn cursor(&self) -> Cursor<'_, V> {
        Cursor {
            table: self,
            at: 0,
            index: 0,
            key: Vec::new(),
            pending: false,
            cx: V::Context::default(),
        }
    }

    /// A cursor at the first record whose path is not below `key`.
    pub fn cursor_at(&self, key: &str) -> Cursor<'_, V> {
        let g = self.group_of(key.as_bytes());
        let mut c = Cursor {
            table: self,
            at: self.groups.get(g).copied().unwrap_or(0),
            index: g * GROUP,
            key: Vec::new(),
            pending: false,
            cx: V::Context::default(),
        };
        // A record below `key` is passed. Each is compared with `key` only from where it can
        // differ from the one before, which matched `lcp` bytes of `key` and was below it:
        // sharing more than `lcp` with that one, it is below too; sharing less, it is above
        // (so is the next group's first record, shared 0, by the search above). The walk
        // starts at a group's first record, shared 0 with `lcp` 0: compared whole.
        let key = key.as_bytes();
        let mut lcp = 0;
        while let Some(shared) = c.read_key() {
            let below = if shared == lcp {
                lcp += common_prefix(&c.key[lcp..], &key[lcp..]);
                c.key[lcp..] < key[lcp..]
            } else {
                shared > lcp
            };
            if !below {
                c.pending = true;
                break;
            }
            c.skip_value();
        }
        c
    }

    /// Every pair, in order (each path a new `RelPath`).
    pub fn iter(&self) -> impl Iterator<Item = (RelPath, V)> + '_ {
        let mut c = self.cursor();
        std::iter::from_fn(move || c.next().map(|(k, v)| (RelPath::trusted(k), v)))
    }

    /// The pairs whose paths are `key` or below it, in order.
    pub fn iter_from(&self, key: &str) -> impl Iterator<Item = (RelPath, V)> + '_ {
        let mut c = self.cursor_at(key);
        std::iter::from_fn(move || c.next().map(|(k, v)| (RelPath::trusted(k), v)))
    }
}

/// A position in a `Packed` table. Not an `Iterator`: the path it yields lives in the
/// cursor, rebuilt record by record, so reading the table makes no allocation.
pub struct Cursor<'a, V: Pack> {
    table: &'a Packed<V>,
    /// Where the next unread part of a record starts.
    at: usize,
    /// Records whose keys were read.
    index: usize,
    /// The path of the record last read.
    key: Vec<u8>,
    /// Whether the record in `key` has been read up to its value, which the next `next`
    /// yields.
    pending: bool,
    /// What the values read so far in the group left.
    cx: V::Context,
}

impl<V: Pack> std::fmt::Debug for Cursor<'_, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cursor({} of {})", self.index, self.table.len)
    }
}

impl<V: Pack> Cursor<'_, V> {
    /// Reads the next record's path into `key`, leaving `at` at its value; returns how much of
    /// it the path before shares (0 at a group's start), `None` at the end.
    fn read_key(&mut self) -> Option<usize> {
        if self.index == self.table.len {
            return None;
        }
        if self.index.is_multiple_of(GROUP) {
            self.cx = V::Context::default();
        }
        let mut at = &self.table.bytes[self.at..];
        let shared = take_varint(&mut at) as usize;
        let rest = take_varint(&mut at) as usize;
        self.key.truncate(shared);
        self.key.extend_from_slice(&at[..rest]);
        self.at = self.table.bytes.len() - at.len() + rest;
        self.index += 1;
        Some(shared)
    }

    fn take_value(&mut self) -> V {
        let mut at = &self.table.bytes[self.at..];
        let v = V::unpack(&mut self.cx, &mut at);
        self.at = self.table.bytes.len() - at.len();
        v
    }

    fn skip_value(&mut self) {
        let _ = self.take_value();
    }

    /// The next record: its path and value.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<(&str, V)> {
        if !std::mem::take(&mut self.pending) && self.read_key().is_none() {
            return None;
        }
        let v = self.take_value();
        let key =
            std::str::from_utf8(&self.key).expect("packed paths are the text they were given");
        Some((key, v))
    }
}

/// Builds a `Packed` table from pairs given in key order.
#[derive(Debug)]
pub struct Builder<V: Pack> {
    bytes: Vec<u8>,
    groups: Vec<usize>,
    /// The last path pushed.
    prev: String,
    len: usize,
    cx: V::Context,
}

impl<V: Pack> Builder<V> {
    /// A builder with room for `bytes` bytes of records (a table being rebuilt: about its
    /// size, so the block is not copied as it grows).
    pub fn with_capacity(bytes: usize) -> Self {
        Builder {
            bytes: Vec::with_capacity(bytes),
            groups: Vec::new(),
            prev: String::new(),
            len: 0,
            cx: V::Context::default(),
        }
    }

    /// Adds `key`, which must come after every key pushed before it, with `value`.
    pub fn push(&mut self, key: &str, value: &V) {
        let prev = &self.prev;
        assert!(
            self.len == 0 || **prev < *key,
            "packed keys ascend: {prev:?} then {key:?}"
        );
        let shared = if self.len.is_multiple_of(GROUP) {
            self.groups.push(self.bytes.len());
            self.cx = V::Context::default();
            0
        } else {
            common_prefix(prev.as_bytes(), key.as_bytes())
        };
        put_varint(&mut self.bytes, shared as u64);
        put_varint(&mut self.bytes, (key.len() - shared) as u64);
        self.bytes.extend_from_slice(&key.as_bytes()[shared..]);
        value.pack(&mut self.cx, &mut self.bytes);
        self.prev.clear();
        self.prev.push_str(key);
        self.len += 1;
    }

    pub fn finish(self) -> Packed<V> {
        Packed {
            bytes: self.bytes.into_boxed_slice(),
            groups: self.groups.into_boxed_slice(),
            len: self.len,
            hint: AtomicUsize::new(0),
            _values: PhantomData,
        }
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Appends `n` in LEB128: seven bits a byte, low first.
pub fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads what `put_varint` wrote.
pub fn take_varint(bytes: &mut &[u8]) -> u64 {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first().expect("a packed varint is whole");
        *bytes = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
    }
    n
}

fn take_array<const N: usize>(bytes: &mut &[u8]) -> [u8; N] {
    let (head, rest) = bytes
        .split_first_chunk::<N>()
        .expect("a packed value is whole");
    *bytes = rest;
    *head
}

impl Pack for u64 {
    type Context = ();

    fn pack(&self, _: &mut (), out: &mut Vec<u8>) {
        put_varint(out, *self);
    }

    fn unpack(_: &mut (), bytes: &mut &[u8]) -> u64 {
        take_varint(bytes)
    }
}

/// `n` with its sign in the low bit, so small negative numbers are small varints too.
fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    (n >> 1) as i64 ^ -((n & 1) as i64)
}

/// The last inode and mtime (not 0) coded in a group: files made together have close ones.
#[derive(Debug, Default)]
pub struct SeenContext {
    ino: u64,
    mtime_ns: i64,
}

/// A scan state: the kind, the mode and two flags in one varint (the mode is 12 bits on
/// disk), the size as a varint, the inode and the mtime as varints of their difference from
/// the group's last (the mtime not at all if 0: a directory's, a link's), the hash unless it
/// is that of no bytes (a directory's, an empty file's).
impl Pack for Seen {
    type Context = SeenContext;

    fn pack(&self, cx: &mut SeenContext, out: &mut Vec<u8>) {
        let e = &self.entry;
        let kind = match e.kind {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
        };
        let no_mtime = e.mtime_ns == 0;
        let no_hash = e.hash == EMPTY_HASH;
        let head =
            u64::from(e.mode) << 4 | u64::from(no_mtime) << 3 | u64::from(no_hash) << 2 | kind;
        put_varint(out, head);
        put_varint(out, e.size);
        put_varint(out, zigzag(self.ino.wrapping_sub(cx.ino) as i64));
        cx.ino = self.ino;
        if !no_mtime {
            put_varint(out, zigzag(e.mtime_ns.wrapping_sub(cx.mtime_ns)));
            cx.mtime_ns = e.mtime_ns;
        }
        if !no_hash {
            out.extend_from_slice(&e.hash);
        }
    }

    fn unpack(cx: &mut SeenContext, bytes: &mut &[u8]) -> Seen {
        let head = take_varint(bytes);
        let kind = match head & 3 {
            0 => Kind::File,
            1 => Kind::Dir,
            _ => Kind::Symlink,
        };
        let size = take_varint(bytes);
        let ino = cx.ino.wrapping_add(unzigzag(take_varint(bytes)) as u64);
        cx.ino = ino;
        let mtime_ns = if head & 8 != 0 {
            0
        } else {
            cx.mtime_ns = cx.mtime_ns.wrapping_add(unzigzag(take_varint(bytes)));
            cx.mtime_ns
        };
        let hash = if head & 4 != 0 {
            EMPTY_HASH
        } else {
            take_array(bytes)
        };
        Seen {
            entry: Entry {
                kind,
                size,
                mtime_ns,
                mode: (head >> 4) as u32,
                hash,
            },
            ino,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn seen(i: u64) -> Seen {
        Seen {
            entry: Entry {
                kind: Kind::File,
                size: i * 1000,
                mtime_ns: 1_700_000_000_000_000_000 + i as i64 * 20_000,
                mode: 0o644,
                hash: [i as u8; 32],
            },
            ino: 1_000_000 + i,
        }
    }

    /// Paths that share prefixes in every way: a path and those beneath it, siblings that
    /// differ in their last byte, multi-byte characters split by a shared prefix.
    fn keys() -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        let mut i = 0;
        for d in ["a", "a b", "a.b", "a0", "aé", "aê", "ü", "z/y/x"] {
            for f in ["", "/1", "/10", "/2", "/é", "/ê/deep", "/é/d"] {
                m.insert(format!("{d}{f}"), i * 37 % 1000);
                i += 1;
            }
        }
        m
    }

    #[test]
    fn every_key_is_found_in_order_and_no_other() {
        for n in [0, 1, GROUP - 1, GROUP, GROUP + 1, keys().len()] {
            let model: BTreeMap<String, u64> = keys().into_iter().take(n).collect();
            let t = Packed::from_sorted(model.iter().map(|(k, v)| (k.as_str(), *v)));
            assert_eq!(t.len(), n);
            let back: Vec<(String, u64)> =
                t.iter().map(|(k, v)| (k.as_str().to_string(), v)).collect();
            assert_eq!(back, model.clone().into_iter().collect::<Vec<_>>());
            // Every key, and what falls between keys: each one's prefixes, and each one with
            // a byte added that sorts below, between or above its neighbours' next bytes.
            let mut probes: Vec<String> = ["", "0", "zz", "a/"].map(String::from).to_vec();
            for k in keys().keys() {
                let cuts = k.char_indices().map(|(i, _)| i);
                probes.extend(cuts.map(|i| k[..i].to_string()));
                probes.extend([" ", "!", "/", "0", "1/", "~"].map(|t| format!("{k}{t}")));
                probes.push(k.clone());
            }
            for probe in &probes {
                assert_eq!(t.get(probe), model.get(probe).copied(), "{probe:?} of {n}");
                assert_eq!(t.contains_key(probe), model.contains_key(probe));
                let from: Vec<String> = t
                    .iter_from(probe)
                    .map(|(k, _)| k.as_str().to_string())
                    .collect();
                let want: Vec<String> = model
                    .range(probe.to_string()..)
                    .map(|(k, _)| k.clone())
                    .collect();
                assert_eq!(from, want, "from {probe:?} of {n}");
            }
        }
    }

    #[test]
    fn scan_states_round_trip() {
        let mut states: Vec<Seen> = (0..5).map(seen).collect();
        states.push(Seen {
            entry: Entry::dir(0o755),
            ino: 2,
        });
        states.push(Seen {
            entry: Entry::link("../target"),
            ino: u64::MAX,
        });
        let mut odd = seen(7);
        odd.entry.mtime_ns = -5;
        odd.entry.mode = u32::MAX;
        odd.entry.size = u64::MAX;
        states.push(odd);
        let mut empty = seen(8);
        empty.entry.hash = EMPTY_HASH;
        empty.entry.size = 0;
        states.push(empty);
        let t = Packed::from_sorted(
            states
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("p{i}"), s.clone())),
        );
        let back: Vec<Seen> = t.iter().map(|(_, s)| s).collect();
        assert_eq!(back, states);
    }

    #[test]
    fn a_tracked_file_takes_a_fraction_of_a_map_slot() {
        // The benchmark's tree: 1,000 directories of 100 files.
        let paths = (0..100_000u64).map(|i| (format!("d{:05}/f{:03}", i / 100, i % 100), seen(i)));
        let t = Packed::from_sorted(paths);
        let per = t.heap_bytes() as f64 / t.len() as f64;
        // A path of 3 or 4 bytes, 4 of head and size, 1 of inode and 3 of mtime (written 20 µs
        // apart, their differences are short), 32 of hash.
        assert!(per < 48.0, "{per} bytes a path");
        assert_eq!(t.get("d00999/f099"), Some(seen(99_999)));
    }

    #[test]
    #[should_panic(expected = "ascend")]
    fn keys_out_of_order_are_refused() {
        Packed::from_sorted([("b", 1u64), ("a", 2)]);
    }
}
