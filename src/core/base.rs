//! A client's base (what it and the server last agreed each path is), kept as its difference
//! from the cache (what the client last saw on disk). The server keeps its index's entries
//! the same way (see `core::index::Entries`).
//!
//! The two agree on nearly every path nearly all the time: a base stored whole would hold
//! every entry twice, about 75 bytes a path. Here a path costs nothing unless its base and
//! its cached entry differ (a change not yet sent or not yet applied).

use std::collections::{BTreeMap, BTreeSet};

use serde::ser::SerializeMap;
use serde::Serialize;

use super::entry::Entry;
use super::layered::Layered;
use super::path::{keys_under, RelPath};
use super::renames::Seen;
use super::tracked::Written;

/// The cache a base is kept against.
pub type Cache = Layered<Seen>;

/// The base, as the paths where it differs from the cache. Every method that reads it takes
/// the cache it is kept against; the cache's owner calls `cache_changed` on every write.
#[derive(Debug, Default)]
pub struct Base {
    /// Paths whose base is an entry other than their cached one (or which are not cached).
    apart: BTreeMap<RelPath, Entry>,
    /// Cached paths that have no base. A set, not a `None` in `apart`: every path a first
    /// scan finds is here until it is synced (16 bytes each, not 72).
    unbased: BTreeSet<RelPath>,
    /// Paths whose base was set since `take_changes`, for the journal.
    written: Written,
}

impl Base {
    /// The base `full`, kept against `cache`.
    pub fn new(full: BTreeMap<RelPath, Entry>, cache: &Cache) -> Base {
        let unbased = cache
            .iter()
            .map(|(p, _)| p)
            .filter(|p| !full.contains_key(p))
            .collect();
        let apart = full
            .into_iter()
            .filter(|(p, e)| cache.get(p.as_str()).map(|s| s.entry).as_ref() != Some(e))
            .collect();
        Base {
            apart,
            unbased,
            written: Written::default(),
        }
    }

    /// What `path`'s base is when it is not its cached entry: `Some(None)`, no base.
    fn pinned(&self, path: &RelPath) -> Option<Option<&Entry>> {
        match self.apart.get(path) {
            Some(e) => Some(Some(e)),
            None => self.unbased.contains(path).then_some(None),
        }
    }

    /// Stores `base` as `path`'s, apart from the cache.
    fn pin(&mut self, path: &RelPath, base: Option<Entry>) {
        match base {
            Some(e) => {
                self.unbased.remove(path);
                self.apart.insert(path.clone(), e);
            }
            None => {
                self.apart.remove(path);
                self.unbased.insert(path.clone());
            }
        }
    }

    /// `path`'s base is its cached entry again.
    fn unpin(&mut self, path: &RelPath) {
        if self.apart.remove(path).is_none() {
            self.unbased.remove(path);
        }
    }

    /// The base of `path`.
    pub fn get(&self, cache: &Cache, path: &RelPath) -> Option<Entry> {
        match self.pinned(path) {
            Some(b) => b.cloned(),
            None => cache.get(path.as_str()).map(|s| s.entry),
        }
    }

    /// The cache at `path` went from `old` to `new`; the base stays what it was.
    pub fn cache_changed(&mut self, path: &RelPath, old: Option<&Entry>, new: Option<&Entry>) {
        match self.pinned(path) {
            Some(base) if base == new => self.unpin(path),
            Some(_) => {}
            None if old != new => self.pin(path, old.cloned()),
            None => {}
        }
    }

    /// Sets the base of `path` (`None`: none).
    pub fn set(&mut self, cache: &Cache, path: &RelPath, base: Option<Entry>) {
        self.written.mark(path, cache.len());
        if cache.get(path.as_str()).map(|s| s.entry) == base {
            self.unpin(path);
        } else {
            self.pin(path, base);
        }
    }

    /// Removes the base of every path `keep` refuses.
    pub fn retain(&mut self, cache: &Cache, mut keep: impl FnMut(&RelPath) -> bool) {
        let gone: Vec<RelPath> = self
            .iter(cache)
            .filter(|(p, _)| !keep(p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in gone {
            self.set(cache, &p, None);
        }
    }

    /// How many paths have a base.
    pub fn len(&self, cache: &Cache) -> usize {
        let uncached = self
            .apart
            .keys()
            .filter(|p| !cache.contains_key(p.as_str()));
        cache.len() + uncached.count() - self.unbased.len()
    }

    /// Forgets which bases were set: for one kept whose changes are journaled otherwise (the
    /// server's index entries, journaled with their seqs), or about to be saved whole.
    pub fn forget_changes(&mut self) {
        self.written.forget();
    }

    /// The paths whose base is not their cached entry: what changed here, or was not yet
    /// applied here, since the two last agreed.
    pub fn differing(&self) -> impl Iterator<Item = &RelPath> {
        self.apart.keys().chain(&self.unbased)
    }

    /// `path` and every path beneath it that has a base, in order.
    pub fn keys_under(&self, cache: &Cache, path: &RelPath) -> Vec<RelPath> {
        let mut keys = cache.keys_under(path);
        keys.retain(|k| !self.unbased.contains(k));
        keys.extend(
            keys_under(&self.apart, path)
                .into_iter()
                .filter(|k| !cache.contains_key(k.as_str())),
        );
        keys.sort_unstable();
        keys
    }

    /// Every path with a base, in order.
    pub fn iter<'a>(&'a self, cache: &'a Cache) -> impl Iterator<Item = (RelPath, Entry)> + 'a {
        let mut cached = cache.iter().map(|(p, s)| (p, s.entry)).peekable();
        let mut apart = self
            .apart
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .peekable();
        std::iter::from_fn(move || loop {
            let first_apart = match (cached.peek(), apart.peek()) {
                (None, None) => return None,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((c, _)), Some((a, _))) => a <= c,
            };
            if first_apart {
                let pair = apart.next();
                cached.next_if(|(c, _)| Some(c) == pair.as_ref().map(|(a, _)| a));
                return pair;
            }
            let (p, e) = cached.next()?;
            if !self.unbased.contains(&p) {
                return Some((p, e));
            }
        })
    }

    /// Every base set since the last call, with its value now (`None`: none), for the journal.
    pub fn take_changes(&mut self, cache: &Cache) -> Vec<(RelPath, Option<Entry>)> {
        self.written
            .take()
            .into_iter()
            .map(|p| {
                let b = self.get(cache, &p);
                (p, b)
            })
            .collect()
    }

    /// The whole base, to save: it encodes as a `BTreeMap<RelPath, Entry>` would.
    pub fn whole<'a>(&'a self, cache: &'a Cache) -> Whole<'a> {
        Whole { base: self, cache }
    }
}

/// See `Base::whole`.
#[derive(Debug)]
pub struct Whole<'a> {
    base: &'a Base,
    cache: &'a Cache,
}

impl Serialize for Whole<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The length goes first (postcard needs it), so the pairs are walked twice.
        let len = self.base.iter(self.cache).count();
        let mut map = s.serialize_map(Some(len))?;
        for (p, e) in self.base.iter(self.cache) {
            map.serialize_entry(&p, &e)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::entry::Kind;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(size: u64) -> Entry {
        Entry {
            kind: Kind::File,
            size,
            mtime_ns: 1,
            mode: 0o644,
            hash: [size as u8; 32],
        }
    }

    /// A cache and a base kept against it, beside the same base kept whole.
    struct Model {
        cache: Cache,
        base: Base,
        whole: BTreeMap<RelPath, Entry>,
    }

    impl Model {
        fn cache(&mut self, path: &RelPath, new: Option<Entry>) {
            let old = match new.clone() {
                Some(e) => self.cache.insert(path.clone(), Seen { entry: e, ino: 1 }),
                None => self.cache.remove(path),
            };
            let cached = self.cache.get(path).map(|s| s.entry);
            self.base
                .cache_changed(path, old.as_ref().map(|s| &s.entry), cached.as_ref());
        }

        fn set(&mut self, path: &RelPath, base: Option<Entry>) {
            match base.clone() {
                Some(e) => self.whole.insert(path.clone(), e),
                None => self.whole.remove(path),
            };
            self.base.set(&self.cache, path, base);
        }

        fn check(&self) {
            let listed: BTreeMap<RelPath, Entry> = self
                .base
                .iter(&self.cache)
                .map(|(p, e)| (p.clone(), e.clone()))
                .collect();
            assert_eq!(listed, self.whole);
            assert_eq!(self.base.iter(&self.cache).count(), self.whole.len());
            assert_eq!(self.base.len(&self.cache), self.whole.len());
            let cached: Vec<RelPath> = self.cache.iter().map(|(k, _)| k).collect();
            for k in self.whole.keys().chain(&cached) {
                assert_eq!(
                    self.base.get(&self.cache, k).as_ref(),
                    self.whole.get(k),
                    "{k}"
                );
            }
            // Only what differs is stored, once.
            let differing: Vec<&RelPath> = self.base.differing().collect();
            let once: BTreeSet<&RelPath> = differing.iter().copied().collect();
            assert_eq!(once.len(), differing.len());
            for k in differing {
                assert_ne!(
                    self.base.get(&self.cache, k),
                    self.cache.get(k).map(|s| s.entry)
                );
            }
            let encoded = postcard::to_allocvec(&self.base.whole(&self.cache)).unwrap();
            assert_eq!(encoded, postcard::to_allocvec(&self.whole).unwrap());
            let rebuilt = Base::new(self.whole.clone(), &self.cache);
            assert_eq!(rebuilt.apart, self.base.apart);
            assert_eq!(rebuilt.unbased, self.base.unbased);
        }
    }

    #[test]
    fn kept_apart_it_reads_as_the_whole_base_would() {
        let paths: Vec<RelPath> = ["a", "a/b", "a/b/c", "a0", "b", "b/x", "c"]
            .iter()
            .map(|s| p(s))
            .collect();
        let mut m = Model {
            cache: Cache::default(),
            base: Base::default(),
            whole: BTreeMap::new(),
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..5000 {
            let path = paths[next(paths.len() as u64) as usize].clone();
            let value = match next(4) {
                0 => None,
                v => Some(file(v)),
            };
            match next(3) {
                0 => m.cache(&path, value),
                1 => m.set(&path, value),
                // The common pair: applied here and agreed.
                _ => {
                    m.cache(&path, value.clone());
                    m.set(&path, value);
                }
            }
            m.check();
            let under = m.base.keys_under(&m.cache, &p("a"));
            let expected = keys_under(&m.whole, &p("a"));
            assert_eq!(under, expected);
        }
        // In sync, nothing is stored apart.
        for path in &paths {
            let cached = m.cache.get(path).map(|s| s.entry.clone());
            m.set(path, cached);
        }
        assert_eq!(m.base.differing().count(), 0);
        m.check();
    }

    #[test]
    fn changes_are_journaled_with_their_values_now() {
        let mut cache = Cache::default();
        let mut base = Base::default();
        let (x, y) = (p("x"), p("y"));
        cache.insert(
            x.clone(),
            Seen {
                entry: file(1),
                ino: 1,
            },
        );
        base.cache_changed(&x, None, Some(&file(1)));
        // A local change alone is not a change of the base.
        assert!(base.take_changes(&cache).is_empty());
        base.set(&cache, &x, Some(file(1)));
        base.set(&cache, &y, Some(file(2)));
        base.set(&cache, &y, None);
        assert_eq!(
            base.take_changes(&cache),
            vec![(x.clone(), Some(file(1))), (y, None)]
        );
        base.retain(&cache, |_| false);
        assert_eq!(base.take_changes(&cache), vec![(x.clone(), None)]);
        assert_eq!(base.get(&cache, &x), None);
    }
}
