//! The server's authoritative index: every path it has ever seen, with the seq of its last
//! change, deletes kept as tombstones so a client that was away learns of them.
//!
//! Every accepted change gets the next seq. A client that applied everything up to seq N asks
//! for what came after N and receives each changed path's current state, in seq order.
//!
//! Tombstones are not kept for ever (see `Retention`). Forgetting one raises the `horizon`: a
//! client whose N is below it may have missed a delete, so it gets a full listing instead, in
//! which absence never means delete (a file deleted meanwhile can come back from that client).

use serde::{Deserialize, Serialize};

use super::entry::Entry;
use super::path::{BadPath, RelPath};
use super::tracked::Tracked;
use crate::proto::msg::Change;

/// The state of one path in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Current state; `None` is a tombstone.
    pub entry: Option<Entry>,
    /// Seq of the change that made it so.
    pub seq: u64,
    /// Set if that change was a rename from this path. Boxed: rarely set, and every record
    /// of a large index pays for its size.
    pub moved_from: Option<Box<RelPath>>,
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

/// The server's index.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
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
    records: Tracked<Record>,
}

impl Index {
    /// An empty index with a fresh epoch.
    pub fn new(epoch: u64) -> Index {
        Index {
            epoch,
            seq: 0,
            horizon: 0,
            marks: Vec::new(),
            records: Tracked::default(),
        }
    }

    /// The current entry at `path` (`None` if absent or deleted).
    pub fn entry(&self, path: &RelPath) -> Option<&Entry> {
        self.records.get(path).and_then(|r| r.entry.as_ref())
    }

    /// The record at `path`, tombstones included.
    pub fn record(&self, path: &RelPath) -> Option<&Record> {
        self.records.get(path)
    }

    /// Live entries at and beneath `path`.
    pub fn live_subtree(&self, path: &RelPath) -> Vec<(RelPath, Entry)> {
        let (lo, hi) = (format!("{path}/"), format!("{path}0"));
        let mut out: Vec<(RelPath, Entry)> = self
            .entry(path)
            .map(|e| (path.clone(), e.clone()))
            .into_iter()
            .collect();
        out.extend(
            self.records
                .range::<str, _>((
                    std::ops::Bound::Included(lo.as_str()),
                    std::ops::Bound::Excluded(hi.as_str()),
                ))
                .filter_map(|(p, r)| r.entry.clone().map(|e| (p.clone(), e))),
        );
        out
    }

    /// `map` with its keys sharing their text with the index's (see `path::share_keys`): for
    /// the tree cache loaded beside the index, whose paths are mostly the same.
    pub fn share_keys<V>(
        &self,
        map: std::collections::BTreeMap<RelPath, V>,
    ) -> std::collections::BTreeMap<RelPath, V> {
        super::path::share_keys(map, &self.records)
    }

    /// Hands the records to `repack` (see `tracked::repack`), which moves them with the tree
    /// cache whose keys they share.
    pub fn repack_with(&mut self, repack: impl FnOnce(&mut Tracked<Record>) -> bool) -> bool {
        repack(&mut self.records)
    }

    /// Number of live entries.
    pub fn live_count(&self) -> usize {
        self.records.values().filter(|r| r.entry.is_some()).count()
    }

    /// Records changed since the last call (for the journal).
    pub fn take_changes(&mut self) -> Vec<(RelPath, Option<Record>)> {
        self.records.take_changes()
    }

    /// Forgets what changed, for an index about to be saved whole (`Tracked::forget_changes`).
    pub fn forget_changes(&mut self) {
        self.records.forget_changes()
    }

    /// Puts a journaled record back (replaying the journal).
    pub fn restore(&mut self, path: RelPath, record: Option<Record>) {
        self.records.restore(path, record);
    }

    /// Records `entry` at `path` if it differs from what the index has; returns the change.
    pub fn set(&mut self, path: &RelPath, entry: Option<Entry>) -> Option<Change> {
        self.set_moved(path, entry, None)
    }

    /// Gives `path`'s live entry a new seq, unchanged, so every replica hears of it again: a
    /// path ignore rules stopped hiding, which replicas may have skipped. `None` if it is not
    /// live.
    pub fn announce(&mut self, path: &RelPath) -> Option<Change> {
        let entry = self.entry(path)?.clone();
        self.seq += 1;
        self.records.insert(
            path.clone(),
            Record {
                entry: Some(entry.clone()),
                seq: self.seq,
                moved_from: None,
            },
        );
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
        path: &RelPath,
        entry: Option<Entry>,
        moved_from: Option<RelPath>,
    ) -> Option<Change> {
        if self.entry(path) == entry.as_ref() {
            return None;
        }
        if entry.is_none() && !self.records.contains_key(path) {
            return None;
        }
        self.seq += 1;
        self.records.insert(
            path.clone(),
            Record {
                entry: entry.clone(),
                seq: self.seq,
                moved_from: moved_from.clone().map(Box::new),
            },
        );
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
    pub fn rename(&mut self, from: &RelPath, to: &RelPath) -> (Vec<Change>, Vec<BadPath>) {
        let moved = self.live_subtree(from);
        let mut changes = Vec::new();
        let mut refused = Vec::new();
        for (p, e) in &moved {
            match p.rebase(from, to) {
                Ok(new) => changes.extend(self.set_moved(&new, Some(e.clone()), Some(p.clone()))),
                Err(bad) => refused.push(bad),
            }
        }
        for (p, _) in moved.iter().rev() {
            changes.extend(self.set(p, None));
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
    pub fn prune_tombstones(&mut self, now: u64, keep: Retention) -> usize {
        let old_enough = |at: u64| at.saturating_add(keep.max_age_secs) <= now;
        let mut cutoff = self
            .marks
            .iter()
            .filter(|(_, at)| old_enough(*at))
            .map(|(seq, _)| *seq)
            .max()
            .unwrap_or(0);
        let mut dead: Vec<u64> = self
            .records
            .values()
            .filter(|r| r.entry.is_none() && r.seq > cutoff)
            .map(|r| r.seq)
            .collect();
        if dead.len() > keep.max_count {
            let excess = dead.len() - keep.max_count;
            dead.select_nth_unstable(excess - 1);
            cutoff = cutoff.max(dead[excess - 1]);
        }
        let forget: Vec<RelPath> = self
            .records
            .iter()
            .filter(|(_, r)| r.entry.is_none() && r.seq <= cutoff)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &forget {
            self.records.remove(p);
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

    /// Whether a client that applied everything up to `since` can catch up change by change
    /// (else it needs a full listing: a delete it missed may be forgotten).
    pub fn can_catch_up_from(&self, since: u64) -> bool {
        since >= self.horizon && since <= self.seq
    }

    /// How many tombstones the index holds.
    pub fn tombstones(&self) -> usize {
        self.records.values().filter(|r| r.entry.is_none()).count()
    }

    /// Every change after `since`, in seq order (each path's current state once).
    pub fn changes_since(&self, since: u64) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .records
            .iter()
            .filter(|(_, r)| r.seq > since)
            .map(|(p, r)| Change {
                seq: r.seq,
                path: p.clone(),
                entry: r.entry.clone(),
                moved_from: r.moved_from.as_deref().cloned(),
                target: None,
            })
            .collect();
        out.sort_by_key(|c| c.seq);
        out
    }

    /// Every live entry, parents before children: what a client with no usable state gets.
    pub fn full_listing(&self) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .records
            .iter()
            .filter_map(|(p, r)| {
                r.entry.as_ref().map(|e| Change {
                    seq: r.seq,
                    path: p.clone(),
                    entry: Some(e.clone()),
                    moved_from: None,
                    target: None,
                })
            })
            .collect();
        out.sort_by_key(|c| c.path.depth());
        out
    }

    /// Paths of all live entries, for comparing with the disk.
    pub fn live_paths(&self) -> impl Iterator<Item = &RelPath> {
        self.records
            .iter()
            .filter(|(_, r)| r.entry.is_some())
            .map(|(p, _)| p)
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
        assert_eq!(ix.set(&p("a"), file("1")).unwrap().seq, 1);
        assert!(ix.set(&p("a"), file("1")).is_none(), "no change, no seq");
        assert!(
            ix.set(&p("never"), None).is_none(),
            "deleting the unknown is no change"
        );
        ix.set(&p("b"), file("2"));
        ix.set(&p("a"), None);
        let since1: Vec<(String, bool)> = ix
            .changes_since(1)
            .into_iter()
            .map(|c| (c.path.to_string(), c.entry.is_some()))
            .collect();
        assert_eq!(since1, [("b".into(), true), ("a".into(), false)]);
        assert!(ix.changes_since(3).is_empty());
        let full: Vec<String> = ix
            .full_listing()
            .into_iter()
            .map(|c| c.path.to_string())
            .collect();
        assert_eq!(full, ["b"], "tombstones are not in a full listing");
    }

    #[test]
    fn announce_repeats_a_live_entry_under_a_new_seq() {
        let mut ix = Index::new(7);
        ix.set(&p("a"), file("1"));
        ix.set(&p("b"), file("2"));
        ix.set(&p("gone"), file("3"));
        ix.set(&p("gone"), None);
        let c = ix.announce(&p("a")).unwrap();
        assert_eq!((c.seq, c.entry, c.moved_from), (5, file("1"), None));
        assert_eq!(ix.entry(&p("a")), file("1").as_ref());
        let since: Vec<String> = ix
            .changes_since(4)
            .into_iter()
            .map(|c| c.path.to_string())
            .collect();
        assert_eq!(since, ["a"], "a client past the old seq hears of it again");
        assert!(
            ix.announce(&p("gone")).is_none(),
            "tombstones are not announced"
        );
        assert!(ix.announce(&p("never")).is_none());
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
        let t0 = 1_800_000_000;
        ix.set(&p("old"), file("o"));
        ix.set(&p("old"), None); // seq 2
        ix.set(&p("kept"), file("k")); // seq 3
        assert!(ix.mark_time(t0).is_some());
        assert!(ix.mark_time(t0 + 60).is_none(), "marks are an hour apart");
        ix.set(&p("recent"), file("r"));
        ix.set(&p("recent"), None); // seq 5
        assert!(ix.mark_time(t0 + 10 * DAY).is_some());

        assert_eq!(
            ix.prune_tombstones(t0 + 29 * DAY, keep),
            0,
            "not old enough yet"
        );
        assert!(ix.can_catch_up_from(1));

        assert_eq!(ix.prune_tombstones(t0 + 31 * DAY, keep), 1);
        assert!(ix.record(&p("old")).is_none());
        assert!(ix.record(&p("recent")).is_some(), "younger than 30 days");
        assert!(
            ix.entry(&p("kept")).is_some(),
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

        assert_eq!(ix.prune_tombstones(t0 + 41 * DAY, keep), 1);
        assert_eq!(ix.horizon, 5);
        assert_eq!(ix.marks, [(5, t0 + 10 * DAY)]);
        assert_eq!(ix.tombstones(), 0);
    }

    #[test]
    fn tombstones_beyond_the_count_are_forgotten_oldest_first() {
        let keep = Retention {
            max_age_secs: u64::MAX,
            max_count: 2,
        };
        let mut ix = Index::new(1);
        for name in ["a", "b", "c", "d"] {
            ix.set(&p(name), file(name));
        }
        for name in ["c", "a", "d", "b"] {
            ix.set(&p(name), None); // seqs 5, 6, 7, 8
        }
        assert_eq!(ix.prune_tombstones(1_800_000_000, keep), 2);
        assert!(ix.record(&p("c")).is_none() && ix.record(&p("a")).is_none());
        assert!(ix.record(&p("d")).is_some() && ix.record(&p("b")).is_some());
        assert_eq!(ix.horizon, 6);
        assert!(!ix.can_catch_up_from(5) && ix.can_catch_up_from(6));
        let journal: Vec<(String, bool)> = ix
            .take_changes()
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
        ix.set(&p("d"), Some(Entry::dir(0o755)));
        ix.set(&p("d/x"), file("x"));
        ix.set(&p("dz"), file("not beneath d"));
        let (ch, refused) = ix.rename(&p("d"), &p("e"));
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
        assert!(ix.entry(&p("dz")).is_some());
        assert_eq!(ix.changes_since(3).len(), 4);
    }

    /// Found by fuzzing (fuzz/fuzz_targets/plan.rs): renaming a directory to a longer name
    /// used to record paths beneath it longer than `MAX_PATH`; clients then refused every
    /// frame carrying them, and the saved index could not be loaded again.
    #[test]
    fn rename_never_records_a_path_too_long_to_travel() {
        let mut ix = Index::new(1);
        let deep = vec!["d".repeat(250); 12].join("/");
        ix.set(&p("d"), Some(Entry::dir(0o755)));
        ix.set(&p("d/short"), file("s"));
        ix.set(&p(&format!("d/{deep}")), file("deep"));
        let (changes, refused) = ix.rename(&p("d"), &p(&"e".repeat(255)));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].path, format!("{}/{deep}", "e".repeat(255)));
        for c in &changes {
            assert_eq!(RelPath::new(c.path.as_str()).as_ref(), Ok(&c.path));
        }
        assert!(
            ix.entry(&p(&format!("d/{deep}"))).is_none(),
            "the old name is deleted"
        );
        assert_eq!(ix.live_count(), 2, "the directory and d/short moved");
        let saved = postcard::to_allocvec(&ix).unwrap();
        let back: Index = postcard::from_bytes(&saved).expect("the saved index loads");
        assert_eq!(back.changes_since(0), ix.changes_since(0));
    }
}
