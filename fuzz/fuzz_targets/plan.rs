//! The pure core on arbitrary small inputs: the three-way plan, local renames, conflict names,
//! rename detection, and the server's index under a sequence of operations.
//!
//! The inputs are mirrors (`arbitrary` is derived here, not on ferry's types) over small
//! domains, so that equal entries, shared prefixes and inode reuse are common. Beyond "no
//! panic", each step checks what the code documents.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use ferry::core::entry::{Entry, Kind};
use ferry::core::index::{Index, Retention, Stored};
use ferry::core::path::{RelPath, MAX_COMPONENT, MAX_PATH};
use ferry::core::plan::{civil_utc, conflict_name, plan, rename_locally, Decision};
use ferry::core::renames::{detect_renames, Changed, Seen};
use libfuzzer_sys::fuzz_target;

/// Component names: short ones that collide, and long ones that reach the length limits.
fn component(i: u8) -> String {
    match i % 12 {
        0 => "a".into(),
        1 => "b".into(),
        2 => "c.txt".into(),
        3 => ".hidden".into(),
        4 => "ünï".into(),
        5 => "archive.tar.gz".into(),
        6 => "x".repeat(MAX_COMPONENT),
        7 => "y".repeat(200),
        8 => format!("a.{}", "e".repeat(MAX_COMPONENT - 2)),
        9 => format!("{}.txt", "é".repeat(125)),
        10 => ".ferry".into(),
        _ => "z".into(),
    }
}

#[derive(Arbitrary, Debug)]
enum P {
    /// Components from the table above (the first 1 to 14 are used).
    Parts(Vec<u8>),
    /// Anything; not used if the validator refuses it.
    Raw(String),
}

impl P {
    fn get(&self) -> Option<RelPath> {
        let s = match self {
            P::Parts(ix) => {
                let parts: Vec<String> = ix.iter().take(14).map(|&i| component(i)).collect();
                parts.join("/")
            }
            P::Raw(s) => s.clone(),
        };
        RelPath::new(s).ok()
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct E {
    dir: bool,
    content: u8,
    mtime: u8,
    mode: bool,
}

impl E {
    fn get(self) -> Entry {
        let mode = if self.mode { 0o600 } else { 0o644 };
        if self.dir {
            return Entry::dir(mode | 0o100);
        }
        // Symlinks too: their entries carry the target's hash and length, nothing else.
        if self.content % 4 == 3 {
            return Entry::link(["t", "../u"][usize::from(self.mtime % 2)]);
        }
        let content = self.content % 3;
        Entry {
            kind: Kind::File,
            size: u64::from(content),
            mtime_ns: i64::from(self.mtime % 3),
            mode,
            hash: [content; 32],
        }
    }
}

fn entry(e: &Option<E>) -> Option<Entry> {
    e.map(E::get)
}

#[derive(Arbitrary, Debug)]
enum IndexOp {
    Set(P, Option<E>),
    Rename(P, P),
    Announce(P),
    Mark(u16),
    Prune {
        now: u16,
        max_age: u8,
        max_count: u8,
    },
    Since(u8),
}

#[derive(Arbitrary, Debug)]
struct ChangeIn {
    path: P,
    old: Option<(E, u8)>,
    new: Option<(E, u8)>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    triples: Vec<(Option<E>, Option<E>, Option<E>)>,
    local_renames: Vec<(Option<E>, Option<E>, Option<E>, E)>,
    conflicts: Vec<(P, i64, String, u8)>,
    scan: Vec<ChangeIn>,
    ops: Vec<IndexOp>,
}

/// The decision with the roles of local and remote swapped.
fn mirrored(d: Decision) -> Decision {
    match d {
        Decision::TakeRemote => Decision::SendLocal,
        Decision::SendLocal => Decision::TakeRemote,
        other => other,
    }
}

fn check_plan(b: Option<Entry>, l: Option<Entry>, r: Option<Entry>) {
    let d = plan(b.as_ref(), l.as_ref(), r.as_ref());
    assert_eq!(
        plan(b.as_ref(), r.as_ref(), l.as_ref()),
        mirrored(d),
        "symmetry"
    );
    let (lc, rc) = (l != b, r != b);
    let expect_simple = match (lc, rc) {
        (false, false) => Some(Decision::InSync),
        (false, true) => Some(Decision::TakeRemote),
        (true, false) => Some(Decision::SendLocal),
        (true, true) if l == r => Some(Decision::RecordBase),
        _ => None,
    };
    if let Some(want) = expect_simple {
        assert_eq!(d, want);
    }
    match d {
        // Modify beats delete; same bytes never conflict.
        Decision::Conflict => {
            let (l, r) = (l.unwrap(), r.unwrap());
            assert!(!l.same_content(&r));
        }
        Decision::AdoptRemoteMeta => assert!(l.unwrap().same_content(&r.unwrap())),
        Decision::TakeRemote if lc => assert!(l.is_none()),
        Decision::SendLocal if rc => assert!(r.is_none()),
        _ => {}
    }
}

fn check_conflict_name(path: &RelPath, secs: i64, client: &str, attempt: u32) {
    let got = conflict_name(path, secs, client, attempt);
    // A valid path (the constructor checks), beside the original, never the original.
    assert_eq!(RelPath::new(got.as_str()).as_ref(), Ok(&got));
    assert_ne!(&got, path);
    // Beside the original, or at the top when the directory is too deep for the tag.
    let too_deep = |p: RelPath| p.as_str().len() + 1 + got.file_name().len() > MAX_PATH;
    assert!(
        got.parent() == path.parent() || (got.depth() == 1 && path.parent().is_some_and(too_deep)),
        "{got} is beside {path}"
    );
    assert!(got.file_name().contains(".conflict-"), "{got}");
    if attempt < u32::MAX {
        assert_ne!(got, conflict_name(path, secs, client, attempt + 1));
    }
    let (y, mo, d, h, mi, s) = civil_utc(secs);
    assert!(
        (1..=12).contains(&mo) && (1..=31).contains(&d),
        "{y}-{mo}-{d}"
    );
    assert!(h < 24 && mi < 60 && s < 60);
}

fn check_renames(input: &[ChangeIn]) {
    let mut seen_paths = std::collections::BTreeSet::new();
    let mut changes = Vec::new();
    for c in input.iter().take(32) {
        let Some(path) = c.path.get() else { continue };
        if !seen_paths.insert(path.clone()) {
            continue; // a scan reports each path once
        }
        let seen = |s: &Option<(E, u8)>| {
            s.map(|(e, ino)| Seen {
                entry: e.get(),
                ino: u64::from(ino % 8),
            })
        };
        changes.push(Changed {
            path,
            old: seen(&c.old),
            new: seen(&c.new),
        });
    }
    let renames = detect_renames(&changes);
    let mut depth = 0;
    for (from, to) in &renames {
        let f = changes
            .iter()
            .find(|c| &c.path == from)
            .expect("from is a change");
        let t = changes
            .iter()
            .find(|c| &c.path == to)
            .expect("to is a change");
        assert!(f.old.is_some() && f.new.is_none(), "{from} vanished");
        assert!(t.old.is_none() && t.new.is_some(), "{to} appeared");
        let (old, new) = (f.old.as_ref().unwrap(), t.new.as_ref().unwrap());
        assert_eq!(old.ino, new.ino);
        assert!(old.entry.same_content(&new.entry));
        assert!(!to.starts_with(from) && !from.starts_with(to));
        assert!(to.depth() >= depth, "parents first");
        depth = to.depth();
    }
}

fn check_index(ops: &[IndexOp]) {
    let mut ix = Index::new(1);
    let mut es = BTreeMap::new();
    let keep = Retention::default();
    for op in ops.iter().take(64) {
        let before = ix.seq;
        let horizon = ix.horizon;
        let mut changes = Vec::new();
        match op {
            IndexOp::Set(p, e) => {
                let Some(p) = p.get() else { continue };
                let e = entry(e);
                let had = ix.seq_of(&p).is_some();
                let old = ix.entry(&es, &p);
                let c = ix.set(&mut es, &p, e.clone());
                assert_eq!(c.is_some(), old != e && (e.is_some() || had));
                assert_eq!(ix.entry(&es, &p), e);
                changes.extend(c);
            }
            IndexOp::Rename(from, to) => {
                let (Some(from), Some(to)) = (from.get(), to.get()) else {
                    continue;
                };
                // What the server checks first (see `Server::commit` and `ingest`).
                let moved = ix.entry(&es, &from);
                if moved.is_none() || ix.entry(&es, &to).is_some() || to.starts_with(&from) {
                    continue;
                }
                let live = ix.live_count(&es);
                let refused;
                (changes, refused) = ix.rename(&mut es, &from, &to);
                for bad in &refused {
                    assert!(RelPath::new(bad.path.as_str()).is_err(), "{bad}");
                }
                assert!(ix.entry(&es, &from).is_none(), "{from} moved away");
                assert_eq!(ix.entry(&es, &to), moved, "{to} holds what {from} held");
                assert!(ix.live_count(&es) <= live);
            }
            IndexOp::Announce(p) => {
                let Some(p) = p.get() else { continue };
                let live = ix.entry(&es, &p);
                let c = ix.announce(&es, &p);
                assert_eq!(c.is_some(), live.is_some());
                changes.extend(c);
            }
            IndexOp::Mark(hours) => {
                let now = 1_800_000_000 + u64::from(*hours) * 3600;
                if let Some((seq, at)) = ix.mark_time(now) {
                    assert_eq!((seq, at), (ix.seq, now));
                }
            }
            IndexOp::Prune {
                now,
                max_age,
                max_count,
            } => {
                let live = ix.live_count(&es);
                let keep = Retention {
                    max_age_secs: u64::from(*max_age) * 3600,
                    max_count: usize::from(*max_count),
                };
                let now = 1_800_000_000 + u64::from(*now) * 3600;
                ix.prune_tombstones(&es, now, keep);
                assert_eq!(ix.live_count(&es), live, "live entries are never pruned");
                assert!(ix.horizon >= horizon && ix.horizon <= ix.seq);
            }
            IndexOp::Since(since) => {
                let since = u64::from(*since);
                let got = ix.changes_since(&es, since);
                assert!(got.iter().all(|c| c.seq > since));
            }
        }
        let _ = keep;
        // Changes carry fresh, increasing seqs and valid paths.
        let mut last = before;
        for c in &changes {
            assert!(c.seq > last && c.seq <= ix.seq, "seq order");
            last = c.seq;
            assert_eq!(RelPath::new(c.path.as_str()).as_ref(), Ok(&c.path));
        }
        let all = ix.changes_since(&es, 0);
        assert!(
            all.windows(2).all(|w| w[0].seq < w[1].seq),
            "one path per seq"
        );
        let full = ix.full_listing(&es);
        assert!(full
            .windows(2)
            .all(|w| w[0].path.depth() <= w[1].path.depth()));
        assert!(ix.can_catch_up_from(ix.seq));
    }
    // The index is saved and loaded (the server's snapshot): it must come back whole.
    let bytes = postcard::to_allocvec(&ix.stored(&es)).unwrap();
    let back: Stored = postcard::from_bytes(&bytes).expect("a saved index loads");
    let (back, back_es) = Index::from_stored(back);
    assert_eq!(back_es, es);
    assert_eq!(back.changes_since(&back_es, 0), ix.changes_since(&es, 0));
    assert_eq!(
        (back.seq, back.horizon, back.epoch),
        (ix.seq, ix.horizon, ix.epoch)
    );
}

fuzz_target!(|input: Input| {
    for (b, l, r) in input.triples.iter().take(32) {
        check_plan(entry(b), entry(l), entry(r));
    }
    for (bf, lf, lt, rt) in input.local_renames.iter().take(32) {
        let (bf, lf, lt, rt) = (entry(bf), entry(lf), entry(lt), rt.get());
        if rename_locally(bf.as_ref(), lf.as_ref(), lt.as_ref(), &rt) {
            assert!(bf == lf && lt.is_none() && lf.unwrap().same_content(&rt));
        }
    }
    for (p, secs, client, attempt) in input.conflicts.iter().take(8) {
        if let Some(p) = p.get() {
            check_conflict_name(&p, *secs, client, u32::from(*attempt % 100) + 1);
        }
    }
    check_renames(&input.scan);
    check_index(&input.ops);
});
