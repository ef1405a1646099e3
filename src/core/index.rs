//! The server's authoritative index: every path it has ever seen, with the seq of its last
//! change, deletes kept as tombstones so a client that was away learns of them.
//!
//! Every accepted change gets the next seq. A client that applied everything up to seq N asks
//! for what came after N and receives each changed path's current state, in seq order.
//!
//! Tombstones are not kept for ever (see `Retention`). Forgetting one raises the `horizon`: a
//! client whose N is below it may have missed a delete, so it gets a full listing instead, in
//! which absence never means delete (a file deleted meanwhile can come back from that client).
//!
//! The index holds each path's seq, not its entry: the entries are kept by an `Entries` that
//! every method reading or writing them is given. The server's tree keeps them as its base,
//! apart from its cache only where the two differ (see `core::base`): they agree on nearly
//! every path, and an entry stored in both would cost every path some 70 bytes more.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::layered::Layered;
use super::path::{BadPath, RelPath};
use crate::proto::msg::Change;

/// Where the index's entries are kept. A path has an entry only while the index has a
/// record of it (the index is the only writer).
pub trait Entries {
    /// The live entry at `path`.
    fn entry(&self, path: &RelPath) -> Option<Entry>;
    /// Sets the entry at `path` (`None`: removes it).
    fn put_entry(&mut self, path: &RelPath, entry: Option<Entry>);
    /// How many paths have an entry.
    fn live_count(&self) -> usize;
}

/// Entries kept whole, for tests and tools.
impl Entries for BTreeMap<RelPath, Entry> {
    fn entry(&self, path: &RelPath) -> Option<Entry> {
        self.get(path).cloned()
    }

    fn put_entry(&mut self, path: &RelPath, entry: Option<Entry>) {
        match entry {
            Some(e) => self.insert(path.clone(), e),
            None => self.remove(path),
        };
    }

    fn live_count(&self) -> usize {
        self.len()
    }
}

/// The state of one path in the index, as saved and journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Current state; `None` is a tombstone.
    pub entry: Option<Entry>,
    /// Seq of the change that made it so.
    pub seq: u64,
    /// Set if that change was a rename from this path (rarely: a `RelPath` is one pointer, so
    /// an unset one costs a record 8 bytes).
    pub moved_from: Option<RelPath>,
}

/// How long, and how many, deletes are remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Tombstones older than this (in seconds) are forgotten.
    pub max_age_secs: u64,
    /// Beyond this many tombstones, the oldest are forgotten.
    pub max_count: usize,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_age_secs: 30 * 86_400,
            max_count: 100_000,
        }
    }
}

/// How far apart the (seq, time) marks that date tombstones are, in seconds.
pub const MARK_EVERY_SECS: u64 = 3600;

/// The index as it is saved: every record whole. A journal is replayed into it at start,
/// before it is split into an `Index` and its entries (`Index::from_stored`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stored {
    pub epoch: u64,
    pub seq: u64,
    pub horizon: u64,
    pub marks: Vec<(u64, u64)>,
    pub records: BTreeMap<RelPath, Record>,
}

impl Stored {
    /// Puts a journaled record back (`None`: the record is gone).
    pub fn restore(&mut self, path: RelPath, record: Option<Record>) {
        match record {
            Some(r) => self.records.insert(path, r),
            None => self.records.remove(&path),
        };
    }
}

/// The server's index.
#[derive(Clone, Debug, Default)]
pub struct Index {
    /// Identifies this index; a new one means clients must reconcile in full.
    pub epoch: u64,
    /// Seq of the latest change.
    pub seq: u64,
    /// Highest seq of a forgotten tombstone: catching up from below it needs a full listing.
    pub horizon: u64,
    /// (seq, unix seconds) pairs, oldest first, about `MARK_EVERY_SECS` apart: every change up
    /// to that seq is at least that old. Records carry no time, so this dates them.
    pub marks: Vec<(u64, u64)>,
    /// The seq of every path with a record (live or a tombstone): what the index itself keeps
    /// of a path, a few bytes of packed path and seq (see `core::packed`).
    stamps: Layered<u64>,
    /// Where each path whose record was made by a rename came from. Apart, because few are:
    /// a rename's source beside every seq would cost each path for the few that have one.
    /// Only paths in `stamps` are here, each with the `moved_from` of its record.
    moved: BTreeMap<RelPath, RelPath>,
}

impl Index {
    /// An empty index with a fresh epoch.
    pub fn new(epoch: u64) -> Index {
        Index {
            epoch,
            ..Index::default()
        }
    }

    /// The index saved as `stored`, and its live entries for an `Entries` to keep.
    pub fn from_stored(stored: Stored) -> (Index, BTreeMap<RelPath, Entry>) {
        let mut entries = Vec::new();
        let mut moved = BTreeMap::new();
        let stamps: BTreeMap<RelPath, u64> = stored
            .records
            .into_iter()
            .map(|(p, r)| {
                if let Some(e) = r.entry {
                    entries.push((p.clone(), e));
                }
                if let Some(from) = r.moved_from {
                    moved.insert(p.clone(), from);
                }
                (p, r.seq)
            })
            .collect();
        let index = Index {
            epoch: stored.epoch,
            seq: stored.seq,
            horizon: stored.horizon,
            marks: stored.marks,
            stamps: Layered::from(stamps),
            moved,
        };
        (index, entries.into_iter().collect())
    }

    /// The index with its `entries`, to save: it encodes as its `Stored` form would.
    pub fn stored<'a>(&'a self, entries: &'a dyn Entries) -> StoredRef<'a> {
        StoredRef {
            epoch: self.epoch,
            seq: self.seq,
            horizon: self.horizon,
            marks: &self.marks,
            records: Records {
                index: self,
                entries,
            },
        }
    }

    /// The current entry at `path` (`None` if absent or deleted).
    pub fn entry(&self, entries: &impl Entries, path: &RelPath) -> Option<Entry> {
        entries.entry(path)
    }

    /// The seq of `path`'s last change, if the index has a record of it.
    pub fn seq_of(&self, path: &RelPath) -> Option<u64> {
        self.stamps.get(path)
    }

    /// Where `path`'s record says it was renamed from, if a rename made it.
    fn moved_from(&self, path: &RelPath) -> Option<&RelPath> {
        self.moved.get(path)
    }

    /// Gives `path` a record with the next seq, made by a rename from `moved_from` if set.
    fn stamp(&mut self, path: &RelPath, moved_from: Option<RelPath>) {
        self.seq += 1;
        self.stamps.insert(path.clone(), self.seq);
        match moved_from {
            Some(from) => self.moved.insert(path.clone(), from),
            None => self.moved.remove(path),
        };
    }

    /// Live entries at and beneath `path`.
    pub fn live_subtree(&self, entries: &impl Entries, path: &RelPath) -> Vec<(RelPath, Entry)> {
        self.stamps
            .keys_under(path)
            .into_iter()
            .filter_map(|p| entries.entry(&p).map(|e| (p, e)))
            .collect()
    }

    /// Folds the seqs' recent changes into their packed table (see `core::layered`).
    pub fn repack(&mut self) {
        self.stamps.fold();
    }

    /// Number of live entries.
    pub fn live_count(&self, entries: &impl Entries) -> usize {
        entries.live_count()
    }

    /// Records changed since the last call (for the journal).
    pub fn take_changes(&mut self, entries: &impl Entries) -> Vec<(RelPath, Option<Record>)> {
        self.stamps
            .take_changes()
            .into_iter()
            .map(|(p, seq)| {
                let record = seq.map(|seq| Record {
                    entry: entries.entry(&p),
                    seq,
                    moved_from: self.moved_from(&p).cloned(),
                });
                (p, record)
            })
            .collect()
    }

    /// Forgets what changed, for an index about to be saved whole (`Layered::forget_changes`).
    pub fn forget_changes(&mut self) {
        self.stamps.forget_changes()
    }

    /// Records `entry` at `path` if it differs from what the index has; returns the change.
    pub fn set(
        &mut self,
        entries: &mut impl Entries,
        path: &RelPath,
        entry: Option<Entry>,
    ) -> Option<Change> {
        self.set_moved(entries, path, entry, None)
    }

    /// Gives `path`'s live entry a new seq, unchanged, so every replica hears of it again: a
    /// path ignore rules stopped hiding, which replicas may have skipped. `None` if it is not
    /// live.
    pub fn announce(&mut self, entries: &impl Entries, path: &RelPath) -> Option<Change> {
        let entry = entries.entry(path)?;
        self.stamp(path, None);
        Some(Change {
            seq: self.seq,
            path: path.clone(),
            entry: Some(entry),
            moved_from: None,
            target: None,
        })
    }

    fn set_moved(
        &mut self,
        entries: &mut impl Entries,
        path: &RelPath,
        entry: Option<Entry>,
        moved_from: Option<RelPath>,
    ) -> Option<Change> {
        // Equal also when both are `None`: deleting what has no entry is no change.
        if entries.entry(path) == entry {
            return None;
        }
        self.stamp(path, moved_from.clone());
        entries.put_entry(path, entry.clone());
        Some(Change {
            seq: self.seq,
            path: path.clone(),
            entry,
            moved_from,
            target: None,
        })
    }

    /// Records the rename of `from` (and everything beneath it) to `to`: new entries first,
    /// parents before children, each naming where it came from; then tombstones, children
    /// first. Clients applying the changes in order can rename instead of downloading.
    ///
    /// A path whose new name would be too long to travel (`RelPath::rebase`) is only deleted,
    /// as a scan would skip it; such names are returned so the caller can report them.
    pub fn rename(
        &mut self,
        entries: &mut impl Entries,
        from: &RelPath,
        to: &RelPath,
    ) -> (Vec<Change>, Vec<BadPath>) {
        let moved = self.live_subtree(entries, from);
        let mut changes = Vec::new();
        let mut refused = Vec::new();
        for (p, e) in &moved {
            match p.rebase(from, to) {
                Ok(new) => {
                    changes.extend(self.set_moved(entries, &new, Some(e.clone()), Some(p.clone())))
                }
                Err(bad) => refused.push(bad),
            }
        }
        for (p, _) in moved.iter().rev() {
            changes.extend(self.set(entries, p, None));
        }
        (changes, refused)
    }

    /// Notes that every change so far happened no later than `now` (unix seconds), if the
    /// last note is `MARK_EVERY_SECS` old. Returns the new mark, for the journal.
    pub fn mark_time(&mut self, now: u64) -> Option<(u64, u64)> {
        let due = self
            .marks
            .last()
            .is_none_or(|&(seq, at)| seq < self.seq && now >= at + MARK_EVERY_SECS);
        due.then(|| {
            self.marks.push((self.seq, now));
            (self.seq, now)
        })
    }

    /// Forgets tombstones older than the retention's age, then the oldest beyond its count,
    /// raising the horizon past them. Returns how many were forgotten.
    pub fn prune_tombstones(&mut self, entries: &impl Entries, now: u64, keep: Retention) -> usize {
        let old_enough = |at: u64| at.saturating_add(keep.max_age_secs) <= now;
        let mut cutoff = self
            .marks
            .iter()
            .filter(|(_, at)| old_enough(*at))
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0);
        let mut dead: Vec<u64> = self
            .tombstones_iter(entries)
            .map(|(_, seq)| seq)
            .filter(|seq| *seq > cutoff)
            .collect();
        if dead.len() > keep.max_count {
            let excess = dead.len() - keep.max_count;
            dead.select_nth_unstable(excess - 1);
            cutoff = cutoff.max(dead[excess - 1]);
        }
        let forget: Vec<RelPath> = self
            .tombstones_iter(entries)
            .filter(|(_, seq)| *seq <= cutoff)
            .map(|(p, _)| p)
            .collect();
        for p in &forget {
            self.stamps.remove(p);
            self.moved.remove(p);
        }
        if !forget.is_empty() {
            self.horizon = self.horizon.max(cutoff);
        }
        // A mark past its age has done its work once; the newest such is kept (it still
        // dates what came after the previous one).
        let expired = self.marks.iter().filter(|(_, at)| old_enough(*at)).count();
        self.marks.drain(..expired.saturating_sub(1));
        forget.len()
    }

    /// The records without an entry.
    fn tombstones_iter<'a>(
        &'a self,
        entries: &'a impl Entries,
    ) -> impl Iterator<Item = (RelPath, u64)> + 'a {
        self.stamps
            .iter()
            .filter(|(p, _)| entries.entry(p).is_none())
    }

    /// Whether a client that applied everything up to `since` can catch up change by change
    /// (else it needs a full listing: a delete it missed may be forgotten).
    pub fn can_catch_up_from(&self, since: u64) -> bool {
        since >= self.horizon && since <= self.seq
    }

    /// How many tombstones the index holds.
    pub fn tombstones(&self, entries: &impl Entries) -> usize {
        self.tombstones_iter(entries).count()
    }

    /// Every change after `since`, in seq order (each path's current state once).
    pub fn changes_since(&self, entries: &impl Entries, since: u64) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .stamps
            .iter()
            .filter(|(_, seq)| *seq > since)
            .map(|(p, seq)| Change {
                seq,
                entry: entries.entry(&p),
                moved_from: self.moved_from(&p).cloned(),
                path: p,
                target: None,
            })
            .collect();
        out.sort_by_key(|c| c.seq);
        out
    }

    /// Every live entry, parents before children: what a client with no usable state gets.
    pub fn full_listing(&self, entries: &impl Entries) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .stamps
            .iter()
            .filter_map(|(p, seq)| {
                entries.entry(&p).map(|e| Change {
                    seq,
                    path: p,
                    entry: Some(e),
                    moved_from: None,
                    target: None,
                })
            })
            .collect();
        out.sort_by_key(|c| c.path.depth());
        out
    }

    /// Paths of all live entries, for comparing with the disk.
    pub fn live_paths<'a>(
        &'a self,
        entries: &'a impl Entries,
    ) -> impl Iterator<Item = RelPath> + 'a {
        self.stamps
            .iter()
            .map(|(p, _)| p)
            .filter(|p| entries.entry(p).is_some())
    }
}

/// See `Index::stored`. Its fields are `Stored`'s, in order.
#[derive(Debug, Serialize)]
pub struct StoredRef<'a> {
    epoch: u64,
    seq: u64,
    horizon: u64,
    marks: &'a [(u64, u64)],
    records: Records<'a>,
}

/// Every record, encoded as `Stored::records`.
pub struct Records<'a> {
    index: &'a Index,
    entries: &'a dyn Entries,
}

impl std::fmt::Debug for Records<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} records", self.index.stamps.len())
    }
}

/// A record borrowed, encoded as a `Record`.
#[derive(Serialize)]
struct RecordRef<'a> {
    entry: Option<Entry>,
    seq: u64,
    moved_from: Option<&'a RelPath>,
}

impl Serialize for Records<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let stamps = &self.index.stamps;
        let mut map = s.serialize_map(Some(stamps.len()))?;
        for (p, seq) in stamps.iter() {
            let record = RecordRef {
                entry: self.entries.entry(&p),
                seq,
                moved_from: self.index.moved_from(&p),
            };
            map.serialize_entry(&p, &record)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::entry::Kind;

    fn file(c: &str) -> Option<Entry> {
        Some(Entry {
            kind: Kind::File,
            size: c.len() as u64,
            mtime_ns: 1,
            mode: 0o644,
            hash: *blake3::hash(c.as_bytes()).as_bytes(),
        })
    }

    fn p(s: &str) -> RelPath {
        s.parse().unwrap()
    }

    #[test]
    fn seqs_tombstones_and_catch_up() {
        let mut ix = Index::new(7);
        let mut es = BTreeMap::new();
        assert_eq!(ix.set(&mut es, &p("a"), file("1")).unwrap().seq, 1);
        assert!(
            ix.set(&mut es, &p("a"), file("1")).is_none(),
            "no change, no seq"
        );
        assert!(
            ix.set(&mut es, &p("never"), None).is_none(),
            "deleting the unknown is no change"
        );
        ix.set(&mut es, &p("b"), file("2"));
        ix.set(&mut es, &p("a"), None);
        let since1: Vec<(String, bool)> = ix
            .changes_since(&es, 1)
            .into_iter()
            .map(|c| (c.path.to_string(), c.entry.is_some()))
            .collect();
        assert_eq!(since1, [("b".into(), true), ("a".into(), false)]);
        assert!(ix.changes_since(&es, 3).is_empty());
        let full: Vec<String> = ix
            .full_listing(&es)
            .into_iter()
            .map(|c| c.path.to_string())
            .collect();
        assert_eq!(full, ["b"], "tombstones are not in a full listing");
    }

    #[test]
    fn announce_repeats_a_live_entry_under_a_new_seq() {
        let mut ix = Index::new(7);
        let mut es = BTreeMap::new();
        ix.set(&mut es, &p("a"), file("1"));
        ix.set(&mut es, &p("b"), file("2"));
        ix.set(&mut es, &p("gone"), file("3"));
        ix.set(&mut es, &p("gone"), None);
        let c = ix.announce(&es, &p("a")).unwrap();
        assert_eq!((c.seq, c.entry, c.moved_from), (5, file("1"), None));
        assert_eq!(ix.entry(&es, &p("a")), file("1"));
        let since: Vec<String> = ix
            .changes_since(&es, 4)
            .into_iter()
            .map(|c| c.path.to_string())
            .collect();
        assert_eq!(since, ["a"], "a client past the old seq hears of it again");
        assert!(
            ix.announce(&es, &p("gone")).is_none(),
            "tombstones are not announced"
        );
        assert!(ix.announce(&es, &p("never")).is_none());
        assert_eq!(ix.seq, 5);
    }

    #[test]
    fn old_tombstones_are_forgotten_and_raise_the_horizon() {
        const DAY: u64 = 86_400;
        let keep = Retention {
            max_age_secs: 30 * DAY,
            max_count: 1000,
        };
        let mut ix = Index::new(1);
        let mut es = BTreeMap::new();
        let t0 = 1_800_000_000;
        ix.set(&mut es, &p("old"), file("o"));
        ix.set(&mut es, &p("old"), None); // seq 2
        ix.set(&mut es, &p("kept"), file("k")); // seq 3
        assert!(ix.mark_time(t0).is_some());
        assert!(ix.mark_time(t0 + 60).is_none(), "marks are an hour apart");
        ix.set(&mut es, &p("recent"), file("r"));
        ix.set(&mut es, &p("recent"), None); // seq 5
        assert!(ix.mark_time(t0 + 10 * DAY).is_some());

        assert_eq!(
            ix.prune_tombstones(&es, t0 + 29 * DAY, keep),
            0,
            "not old enough yet"
        );
        assert!(ix.can_catch_up_from(1));

        assert_eq!(ix.prune_tombstones(&es, t0 + 31 * DAY, keep), 1);
        assert!(ix.seq_of(&p("old")).is_none());
        assert!(ix.seq_of(&p("recent")).is_some(), "younger than 30 days");
        assert!(
            ix.entry(&es, &p("kept")).is_some(),
            "live entries are never pruned"
        );
        assert_eq!(
            ix.horizon, 3,
            "everything up to the mark's seq may be forgotten"
        );
        assert!(
            !ix.can_catch_up_from(2),
            "a client at seq 2 may have missed the delete"
        );
        assert!(ix.can_catch_up_from(3));
        assert_eq!(
            ix.marks.len(),
            2,
            "the expired mark is kept until a newer one expires"
        );

        assert_eq!(ix.prune_tombstones(&es, t0 + 41 * DAY, keep), 1);
        assert_eq!(ix.horizon, 5);
        assert_eq!(ix.marks, [(5, t0 + 10 * DAY)]);
        assert_eq!(ix.tombstones(&es), 0);
    }

    #[test]
    fn tombstones_beyond_the_count_are_forgotten_oldest_first() {
        let keep = Retention {
            max_age_secs: u64::MAX,
            max_count: 2,
        };
        let mut ix = Index::new(1);
        let mut es = BTreeMap::new();
        for name in ["a", "b", "c", "d"] {
            ix.set(&mut es, &p(name), file(name));
        }
        for name in ["c", "a", "d", "b"] {
            ix.set(&mut es, &p(name), None); // seqs 5, 6, 7, 8
        }
        assert_eq!(ix.prune_tombstones(&es, 1_800_000_000, keep), 2);
        assert!(ix.seq_of(&p("c")).is_none() && ix.seq_of(&p("a")).is_none());
        assert!(ix.seq_of(&p("d")).is_some() && ix.seq_of(&p("b")).is_some());
        assert_eq!(ix.horizon, 6);
        assert!(!ix.can_catch_up_from(5) && ix.can_catch_up_from(6));
        let journal: Vec<(String, bool)> = ix
            .take_changes(&es)
            .into_iter()
            .map(|(p, r)| (p.to_string(), r.is_some()))
            .collect();
        assert!(
            journal.contains(&("a".into(), false)),
            "removals reach the journal"
        );
    }

    #[test]
    fn directory_rename_orders_puts_then_deletes() {
        let mut ix = Index::new(1);
        let mut es = BTreeMap::new();
        ix.set(&mut es, &p("d"), Some(Entry::dir(0o755)));
        ix.set(&mut es, &p("d/x"), file("x"));
        ix.set(&mut es, &p("dz"), file("not beneath d"));
        let (ch, refused) = ix.rename(&mut es, &p("d"), &p("e"));
        assert!(refused.is_empty());
        let got: Vec<(String, bool, Option<String>)> = ch
            .iter()
            .map(|c| {
                (
                    c.path.to_string(),
                    c.entry.is_some(),
                    c.moved_from.as_ref().map(|m| m.to_string()),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("e".into(), true, Some("d".into())),
                ("e/x".into(), true, Some("d/x".into())),
                ("d/x".into(), false, None),
                ("d".into(), false, None),
            ]
        );
        assert!(ix.entry(&es, &p("dz")).is_some());
        assert_eq!(ix.changes_since(&es, 3).len(), 4);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/plan.rs): renaming a directory to a longer name
    /// used to record paths beneath it longer than `MAX_PATH`; clients then refused every
    /// frame carrying them, and the saved index could not be loaded again.
    #[test]
    fn rename_never_records_a_path_too_long_to_travel() {
        let mut ix = Index::new(1);
        let mut es = BTreeMap::new();
        let deep = vec!["d".repeat(250); 12].join("/");
        ix.set(&mut es, &p("d"), Some(Entry::dir(0o755)));
        ix.set(&mut es, &p("d/short"), file("s"));
        ix.set(&mut es, &p(&format!("d/{deep}")), file("deep"));
        let (changes, refused) = ix.rename(&mut es, &p("d"), &p(&"e".repeat(255)));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].path, format!("{}/{deep}", "e".repeat(255)));
        for c in &changes {
            assert_eq!(RelPath::new(c.path.as_str()).as_ref(), Ok(&c.path));
        }
        assert!(
            ix.entry(&es, &p(&format!("d/{deep}"))).is_none(),
            "the old name is deleted"
        );
        assert_eq!(ix.live_count(&es), 2, "the directory and d/short moved");
        let saved = postcard::to_allocvec(&ix.stored(&es)).unwrap();
        let back: Stored = postcard::from_bytes(&saved).expect("the saved index loads");
        let (back, back_es) = Index::from_stored(back);
        assert_eq!(back.changes_since(&back_es, 0), ix.changes_since(&es, 0));
    }

    /// Repacked (its seqs folded into their table), the index keeps every record and where
    /// renames made them from.
    #[test]
    fn repacked_it_keeps_every_record_and_the_renames() {
        let mut ix = Index::new(3);
        let mut es = BTreeMap::new();
        ix.set(&mut es, &p("d"), Some(Entry::dir(0o755)));
        ix.set(&mut es, &p("d/x"), file("x"));
        ix.rename(&mut es, &p("d"), &p("e"));
        ix.take_changes(&es);
        let before = ix.changes_since(&es, 0);
        ix.repack();
        assert_eq!(ix.changes_since(&es, 0), before);
        assert_eq!(ix.moved_from(&p("e/x")), Some(&p("d/x")));
    }

    /// The index keeps seqs and borrows its entries; saved, it must be the records whole, as
    /// snapshots written before the split were, and load back the same.
    #[test]
    fn saved_it_encodes_as_its_stored_form() {
        let mut ix = Index::new(9);
        let mut es = BTreeMap::new();
        ix.set(&mut es, &p("d"), Some(Entry::dir(0o755)));
        ix.set(&mut es, &p("d/x"), file("x"));
        ix.set(&mut es, &p("gone"), file("g"));
        ix.set(&mut es, &p("gone"), None);
        ix.rename(&mut es, &p("d"), &p("e"));
        ix.mark_time(1_800_000_000);
        let stored = Stored {
            epoch: 9,
            seq: ix.seq,
            horizon: 0,
            marks: ix.marks.clone(),
            records: ix
                .stamps
                .iter()
                .map(|(k, seq)| {
                    let record = Record {
                        entry: es.get(&k).cloned(),
                        seq,
                        moved_from: ix.moved.get(&k).cloned(),
                    };
                    (k.clone(), record)
                })
                .collect(),
        };
        assert_eq!(
            stored.records[&p("e/x")].moved_from.as_ref(),
            Some(&p("d/x"))
        );
        assert_eq!(stored.records[&p("gone")].entry, None);
        let bytes = postcard::to_allocvec(&ix.stored(&es)).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&stored).unwrap());
        let (back, back_es) = Index::from_stored(postcard::from_bytes(&bytes).unwrap());
        assert_eq!(back_es, es, "the live entries, tombstones left out");
        assert_eq!(back.changes_since(&back_es, 0), ix.changes_since(&es, 0));
        assert_eq!(back.tombstones(&back_es), 3, "gone, d and d/x");
    }
}
