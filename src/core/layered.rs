//! `Layered`: a map of paths kept as a `Packed` table plus the changes made since it was
//! built, whose writes are tracked for the journal as `Tracked`'s are.
//!
//! Reads look at the changes first, then the table. Writes go to the changes; when they grow
//! past an eighth of the map, the table is rebuilt with them folded in (an O(n) pass, so each
//! write pays a constant share of it). An idle agent's map is then nearly all table: its scan
//! cache at about 43 bytes a path instead of a B-tree's 113.

use std::collections::BTreeMap;
use std::ops::Bound;

use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use super::packed::{Builder, Pack, Packed};
use super::path::RelPath;
use super::tracked::Written;

/// Changes are folded into the table once there are this many, or an eighth of the map if
/// that is more.
const FOLD_MIN: usize = 1024;

/// A map of paths: a packed table and the changes made since it was built.
#[derive(Clone, Debug)]
pub struct Layered<V> {
    packed: Packed<V>,
    /// Paths written since the table was built: their value, or `None` where the table has
    /// one that was removed.
    over: BTreeMap<RelPath, Option<V>>,
    len: usize,
    /// Paths written since the last `take_changes`.
    dirty: Written,
}

impl<V> Default for Layered<V> {
    fn default() -> Self {
        Layered {
            packed: Packed::default(),
            over: BTreeMap::new(),
            len: 0,
            dirty: Written::default(),
        }
    }
}

impl<V: Pack + Clone> Layered<V> {
    /// The map of `pairs`, whose keys must be strictly ascending.
    pub fn from_sorted<K: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        let packed = Packed::from_sorted(pairs);
        Layered {
            len: packed.len(),
            packed,
            ..Layered::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value at `key`.
    pub fn get(&self, key: impl AsRef<str>) -> Option<V> {
        let key = key.as_ref();
        match self.over.get(key) {
            Some(v) => v.clone(),
            None => self.packed.get(key),
        }
    }

    pub fn contains_key(&self, key: impl AsRef<str>) -> bool {
        let key = key.as_ref();
        match self.over.get(key) {
            Some(v) => v.is_some(),
            None => self.packed.contains_key(key),
        }
    }

    /// Sets `key`; returns the old value.
    pub fn insert(&mut self, key: RelPath, value: V) -> Option<V> {
        use std::collections::btree_map::Entry as Slot;
        self.dirty.mark(&key, self.len);
        let old = match self.over.entry(key) {
            Slot::Occupied(mut o) => o.insert(Some(value)),
            Slot::Vacant(v) => {
                let old = self.packed.get(v.key().as_str());
                v.insert(Some(value));
                old
            }
        };
        self.len += usize::from(old.is_none());
        self.fold_if_many();
        old
    }

    /// Removes `key`; returns the old value.
    pub fn remove(&mut self, key: &RelPath) -> Option<V> {
        let old = self.get(key.as_str())?;
        self.dirty.mark(key, self.len);
        self.len -= 1;
        self.unset(key);
        self.fold_if_many();
        Some(old)
    }

    /// Removes `key`, which is set, from the layers.
    fn unset(&mut self, key: &RelPath) {
        if self.packed.contains_key(key.as_str()) {
            self.over.insert(key.clone(), None);
        } else {
            self.over.remove(key);
        }
    }

    /// Keeps only the pairs `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&RelPath, &V) -> bool) {
        let gone: Vec<RelPath> = self
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k)
            .collect();
        for k in &gone {
            self.dirty.mark(k, self.len);
            self.len -= 1;
            self.unset(k);
        }
        self.fold_if_many();
    }

    /// Sets or removes `key` without marking it changed: for replaying a journal.
    pub fn restore(&mut self, key: RelPath, value: Option<V>) {
        let was = self.contains_key(key.as_str());
        match value {
            Some(v) => {
                self.len += usize::from(!was);
                self.over.insert(key, Some(v));
            }
            None if was => {
                self.len -= 1;
                self.unset(&key);
            }
            None => {}
        }
        self.fold_if_many();
    }

    /// Forgets which keys were written, for a state about to be saved whole.
    pub fn forget_changes(&mut self) {
        self.dirty.forget();
    }

    /// Every key written since the last call, with its current value (`None`: removed).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<V>)> {
        let keys = self.dirty.take();
        keys.into_iter()
            .map(|k| {
                let v = self.get(k.as_str());
                (k, v)
            })
            .collect()
    }

    /// Rebuilds the table with the changes in it, if they are many.
    fn fold_if_many(&mut self) {
        if self.over.len() >= FOLD_MIN.max(self.len / 8) {
            self.fold();
        }
    }

    /// Rebuilds the table with every change in it: what an idle agent keeps.
    pub fn fold(&mut self) {
        if self.over.is_empty() {
            return;
        }
        // Room for the old table and the changes, at about a hash's size each.
        let mut b = Builder::with_capacity(self.packed_bytes() + self.over.len() * 48);
        self.for_each(|k, v| b.push(k, &v));
        self.packed = b.finish();
        self.over = BTreeMap::new();
        debug_assert_eq!(self.packed.len(), self.len);
    }

    /// Every pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (RelPath, V)> + '_ {
        merge(self.packed.iter(), self.over.iter())
    }

    /// The pairs from `key` on, in order.
    pub fn iter_from<'a>(&'a self, key: &str) -> impl Iterator<Item = (RelPath, V)> + 'a {
        let over = self
            .over
            .range::<str, _>((Bound::Included(key), Bound::Unbounded));
        merge(self.packed.iter_from(key), over)
    }

    /// Calls `f` with every pair, in order, making no path (what `iter` allocates).
    pub fn for_each(&self, mut f: impl FnMut(&str, V)) {
        let mut packed = self.packed.cursor();
        let mut over = self.over.iter().peekable();
        while let Some((k, v)) = packed.next() {
            // The changes up to `k`; the last may be `k`'s own (a new value, or its removal).
            let mut changed = false;
            while let Some((o, ov)) = over.next_if(|(o, _)| o.as_str() <= k) {
                if let Some(ov) = ov {
                    f(o.as_str(), ov.clone());
                }
                changed = o.as_str() == k;
            }
            if !changed {
                f(k, v);
            }
        }
        for (o, ov) in over {
            if let Some(ov) = ov {
                f(o.as_str(), ov.clone());
            }
        }
    }

    /// `path` and every key beneath it, in order.
    pub fn keys_under(&self, path: &RelPath) -> Vec<RelPath> {
        let mut keys: Vec<RelPath> = self
            .contains_key(path.as_str())
            .then(|| path.clone())
            .into_iter()
            .collect();
        // Children sort from "path/" on, before "path0" ('0' follows '/').
        let lo = format!("{path}/");
        keys.extend(
            self.iter_from(&lo)
                .map(|(k, _)| k)
                .take_while(|k| k.as_str().starts_with(&lo)),
        );
        keys
    }

    /// Bytes the table takes on the heap (the changes beside it not counted).
    pub fn packed_bytes(&self) -> usize {
        self.packed.heap_bytes()
    }
}

/// The pairs of `packed` with `over`'s changes applied, in order.
fn merge<'a, V: Clone + 'a>(
    packed: impl Iterator<Item = (RelPath, V)> + 'a,
    over: impl Iterator<Item = (&'a RelPath, &'a Option<V>)> + 'a,
) -> impl Iterator<Item = (RelPath, V)> + 'a {
    let mut packed = packed.peekable();
    let mut over = over.peekable();
    std::iter::from_fn(move || loop {
        let from_over = match (packed.peek(), over.peek()) {
            (None, None) => return None,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((p, _)), Some((o, _))) => *o <= p,
        };
        if !from_over {
            return packed.next();
        }
        let (k, v) = over.next()?;
        packed.next_if(|(p, _)| p == k);
        if let Some(v) = v {
            return Some((k.clone(), v.clone()));
        }
    })
}

impl<V: Pack + Clone + Serialize> Serialize for Layered<V> {
    /// As the `BTreeMap` of its pairs.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len))?;
        for (k, v) in self.iter() {
            map.serialize_entry(&k, &v)?;
        }
        map.end()
    }
}

impl<'de, V: Pack + Clone + DeserializeOwned> Deserialize<'de> for Layered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::<RelPath, V>::deserialize(d).map(Layered::from)
    }
}

impl<V: Pack + Clone> From<BTreeMap<RelPath, V>> for Layered<V> {
    fn from(map: BTreeMap<RelPath, V>) -> Self {
        Layered::from_sorted(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// A small deterministic generator (the tests must not depend on a seed from outside).
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn it_behaves_as_a_map_through_writes_and_folds() {
        let mut model: BTreeMap<RelPath, u64> = BTreeMap::new();
        let mut m: Layered<u64> = Layered::default();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..20_000u64 {
            let r = next(&mut rng);
            let key = p(&format!("d{}/f{}", r % 13, (r >> 8) % 400));
            match (r >> 20) % 4 {
                0 | 1 => assert_eq!(m.insert(key.clone(), step), model.insert(key, step)),
                2 => assert_eq!(m.remove(&key), model.remove(&key)),
                _ => {
                    let v = if r >> 30 & 1 == 0 { Some(step) } else { None };
                    m.restore(key.clone(), v);
                    match v {
                        Some(v) => model.insert(key, v),
                        None => model.remove(&key),
                    };
                }
            }
            assert_eq!(m.len(), model.len());
            if step % 997 == 0 {
                let got: Vec<(RelPath, u64)> = m.iter().collect();
                let mut walked = Vec::new();
                m.for_each(|k, v| walked.push((p(k), v)));
                assert_eq!(walked, got);
                let want: Vec<(RelPath, u64)> =
                    model.iter().map(|(k, v)| (k.clone(), *v)).collect();
                assert_eq!(got, want, "at step {step}");
                let under = p(&format!("d{}", r % 13));
                assert_eq!(
                    m.keys_under(&under),
                    crate::core::path::keys_under(&model, &under)
                );
                if step % 2 == 0 {
                    m.fold();
                }
            }
            let probe = format!("d{}/f{}", r % 11, (r >> 12) % 400);
            assert_eq!(m.get(&probe), model.get(probe.as_str()).copied());
        }
        let back: Layered<u64> = postcard::from_bytes(&postcard::to_allocvec(&m).unwrap()).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            m.iter().collect::<Vec<_>>()
        );
    }

    #[test]
    fn changes_are_reported_once_with_current_values() {
        let mut m: Layered<u64> = Layered::from_sorted([("a", 1u64), ("b", 2)]);
        m.insert(p("c"), 3);
        m.insert(p("a"), 4);
        m.remove(&p("b"));
        m.remove(&p("missing"));
        m.restore(p("d"), Some(5));
        assert_eq!(
            m.take_changes(),
            vec![(p("a"), Some(4)), (p("b"), None), (p("c"), Some(3))]
        );
        assert!(m.take_changes().is_empty());
        m.fold();
        m.retain(|k, _| k.as_str() != "c");
        assert_eq!(m.take_changes(), vec![(p("c"), None)]);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(p("a"), 4), (p("d"), 5)]);
    }
}
