//! A map that remembers which keys changed since it was last asked, so an agent can journal
//! just those (see `store::Journal`) instead of rewriting its whole state.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::path::RelPath;

/// A `BTreeMap` keyed by path whose writes are tracked. Reads go through `Deref`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Tracked<V> {
    map: BTreeMap<RelPath, V>,
    #[serde(skip)]
    dirty: BTreeSet<RelPath>,
}

impl<V> Default for Tracked<V> {
    fn default() -> Self {
        Tracked {
            map: BTreeMap::new(),
            dirty: BTreeSet::new(),
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
    /// Sets `key`; returns the old value.
    pub fn insert(&mut self, key: RelPath, value: V) -> Option<V> {
        self.dirty.insert(key.clone());
        self.map.insert(key, value)
    }

    /// Removes `key`; returns the old value.
    pub fn remove(&mut self, key: &RelPath) -> Option<V> {
        let old = self.map.remove(key);
        if old.is_some() {
            self.dirty.insert(key.clone());
        }
        old
    }

    /// Keeps only the entries `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&RelPath, &V) -> bool) {
        let dirty = &mut self.dirty;
        self.map.retain(|k, v| {
            let kept = keep(k, v);
            if !kept {
                dirty.insert(k.clone());
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
        match value {
            Some(v) => self.map.insert(key, v),
            None => self.map.remove(&key),
        };
    }

    /// Every key written since the last call, with its current value (`None`: removed).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<V>)> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|k| {
                let v = self.map.get(&k).cloned();
                (k, v)
            })
            .collect()
    }
}

impl<V> From<BTreeMap<RelPath, V>> for Tracked<V> {
    fn from(map: BTreeMap<RelPath, V>) -> Self {
        Tracked {
            map,
            dirty: BTreeSet::new(),
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
}
