//! A map that remembers which keys changed since it was last asked, so an agent can journal
//! just those (see `store::Journal`) instead of rewriting its whole state.

use std::collections::BTreeMap;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::path::RelPath;

/// A `BTreeMap` keyed by path whose writes are tracked. Reads go through `Deref`.
///
/// The map is kept dense: a `BTreeMap` filled in key order (a scan, a listing, a snapshot
/// being loaded) leaves its nodes about half full, nearly doubling what a large map takes
/// (an agent's scan cache and the server's seqs are packed tables instead: `core::layered`). So a map that has had many keys added or removed since it was last built is
/// rebuilt in one pass (full nodes) when its changes are taken, and when it is loaded.
#[derive(Clone, Debug, Serialize)]
#[serde(transparent)]
pub struct Tracked<V> {
    map: BTreeMap<RelPath, V>,
    /// Keys written since the last `take_changes`.
    #[serde(skip)]
    dirty: Written,
    /// Keys added or removed since the map was last rebuilt.
    #[serde(skip)]
    churn: usize,
}

/// Fewer added or removed keys than this never make a map worth rebuilding.
const REBUILD_MIN: usize = 1024;

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            dirty: Written::default(),
            churn: 0,
        }
    }
}

/// The keys of a map written since they were last taken, in write order, possibly repeated
/// (sorted and deduplicated when taken, or when repeats make the list outgrow the map). A
/// list, not a set: after a scan it holds every path, and a set's many small nodes, freed
/// between the map's own, would leave the heap full of holes.
#[derive(Clone, Debug)]
pub struct Written {
    keys: Vec<RelPath>,
    /// `keys` is deduplicated when it reaches this length.
    dedup_at: usize,
}

impl Default for Written {
    fn default() -> Self {
        Written {
            keys: Vec::new(),
            dedup_at: REBUILD_MIN,
        }
    }
}

impl Written {
    /// Notes that `key`, of a map of `map_len` keys, was written.
    pub fn mark(&mut self, key: &RelPath, map_len: usize) {
        self.keys.push(key.clone());
        self.dedup_if_long(map_len);
    }

    /// Bounds the list when the same keys are written over and over (the bound doubles with
    /// what remains, so the sorting is amortized over the writes).
    fn dedup_if_long(&mut self, map_len: usize) {
        if self.keys.len() >= self.dedup_at {
            self.keys.sort_unstable();
            self.keys.dedup();
            self.dedup_at = (2 * self.keys.len()).max(REBUILD_MIN + 2 * map_len);
        }
    }

    /// Every key written since the last call, sorted, once each.
    pub fn take(&mut self) -> Vec<RelPath> {
        let mut keys = std::mem::take(&mut self.keys);
        self.dedup_at = REBUILD_MIN;
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// Forgets every key written (a state about to be saved whole).
    pub fn forget(&mut self) {
        *self = Written::default();
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Tracked<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Tracked::from)
    }
}

impl<V> Tracked<V> {
    /// Rebuilds the map with full nodes if enough keys came or went since the last rebuild
    /// (a quarter of its size, amortizing the rebuild over the changes that called for it).
    fn rebuild_if_sparse(&mut self) {
        if self.churn >= REBUILD_MIN && self.churn >= self.map.len() / 4 {
            self.map = std::mem::take(&mut self.map).into_iter().collect();
            self.churn = 0;
        }
    }
}

impl<V> Deref for Tracked<V> {
    type Target = BTreeMap<RelPath, V>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<V: Clone> Tracked<V> {
    /// Notes that `key` was written.
    fn mark(&mut self, key: &RelPath) {
        self.dirty.mark(key, self.map.len());
    }

    /// Sets `key`; returns the old value.
    pub fn insert(&mut self, key: RelPath, value: V) -> Option<V> {
        self.mark(&key);
        let old = self.map.insert(key, value);
        self.churn += usize::from(old.is_none());
        old
    }

    /// Removes `key`; returns the old value.
    pub fn remove(&mut self, key: &RelPath) -> Option<V> {
        let old = self.map.remove(key);
        if old.is_some() {
            self.mark(key);
            self.churn += 1;
        }
        old
    }

    /// Keeps only the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&RelPath, &V) -> bool) {
        let (dirty, churn) = (&mut self.dirty, &mut self.churn);
        let len = self.map.len();
        self.map.retain(|k, v| {
            let kept = keep(k, v);
            if !kept {
                dirty.mark(k, len);
                *churn += 1;
            }
            kept
        });
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.retain(|_, _| false);
    }

    /// Sets or removes `key` without marking it changed: for replaying a journal.
    pub fn restore(&mut self, key: RelPath, value: Option<V>) {
        let changed = match value {
            Some(v) => self.map.insert(key, v).is_none(),
            None => self.map.remove(&key).is_some(),
        };
        self.churn += usize::from(changed);
    }

    /// Forgets which keys were written, for a state about to be saved whole (a snapshot):
    /// listing them for a journal record would only be thrown away. The map is left as it is
    /// (a repack or the next `take_changes` rebuilds it).
    pub fn forget_changes(&mut self) {
        self.dirty.forget();
    }

    /// Every key written since the last call, with its current value (`None`: removed).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<V>)> {
        let changes = self
            .dirty
            .take()
            .into_iter()
            .map(|k| {
                let v = self.map.get(&k).cloned();
                (k, v)
            })
            .collect();
        self.rebuild_if_sparse();
        changes
    }
}

/// Whether maps of `now` paths, `then` when they were last repacked, are worth repacking: a
/// quarter of them, and at least 10,000 paths, came or went (a first sync, a large copy; never
/// small steps, and O(log n) repacks while a map grows to n).
pub fn worth_repacking(then: usize, now: usize) -> bool {
    now.abs_diff(then) >= (then / 4).max(10_000)
}

impl<V> From<BTreeMap<RelPath, V>> for Tracked<V> {
    /// Takes `map` (rebuilt with full nodes: it was most likely filled in key order).
    fn from(map: BTreeMap<RelPath, V>) -> Self {
        Tracked {
            map: map.into_iter().collect(),
            dirty: Written::default(),
            churn: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn changes_are_reported_once_with_current_values() {
        let mut t: Tracked<u32> = Tracked::default();
        t.insert(p("a"), 1);
        t.insert(p("b"), 2);
        t.insert(p("a"), 3);
        t.remove(&p("missing"));
        assert_eq!(t.take_changes(), vec![(p("a"), Some(3)), (p("b"), Some(2))]);
        assert!(t.take_changes().is_empty());
        t.remove(&p("b"));
        t.restore(p("c"), Some(9));
        assert_eq!(t.take_changes(), vec![(p("b"), None)]);
        t.clear();
        assert_eq!(t.take_changes(), vec![(p("a"), None), (p("c"), None)]);
        assert!(t.is_empty());
    }

    #[test]
    fn rebuilding_keeps_contents_and_changes() {
        let mut t: Tracked<usize> = Tracked::default();
        let n = 3 * REBUILD_MIN;
        for i in 0..n {
            t.insert(p(&format!("d/{i:05}")), i);
        }
        assert_eq!(t.churn, n);
        assert_eq!(t.take_changes().len(), n);
        assert_eq!(t.churn, 0, "rebuilt");
        assert!(t
            .iter()
            .enumerate()
            .all(|(i, (k, v))| *v == i && k.as_str() == format!("d/{i:05}")));
        t.remove(&p("d/00007"));
        t.insert(p("d/00007"), 8);
        assert_eq!(t.take_changes(), vec![(p("d/00007"), Some(8))]);
        assert_eq!(t.len(), n);
        let back: Tracked<usize> =
            postcard::from_bytes(&postcard::to_allocvec(&t).unwrap()).unwrap();
        assert_eq!(*back, *t);
        assert!(back.dirty.is_empty());
    }

    #[test]
    fn rewriting_one_key_keeps_the_list_of_changes_short() {
        let mut t: Tracked<usize> = Tracked::default();
        for i in 0..10 * REBUILD_MIN {
            t.insert(p("a"), i);
            t.remove(&p("b"));
            assert!(t.dirty.len() <= REBUILD_MIN + 2);
        }
        t.insert(p("b"), 1);
        assert_eq!(
            t.take_changes(),
            vec![(p("a"), Some(10 * REBUILD_MIN - 1)), (p("b"), Some(1))]
        );
    }
}
