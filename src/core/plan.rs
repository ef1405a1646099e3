//! The three-way plan: what to do with one path, given what the client and server last agreed
//! on (*base*), what is on the client's disk (*local*) and what the server has (*remote*).
//!
//! Pure: no I/O. The client calls it for every path that changed on either side; `apply` and
//! the control channel carry out the decision. The rules (DESIGN.md, "Plan"):
//! only remote changed → take remote; only local changed → send local; both changed to the same
//! bytes → only the base moves; both changed differently → conflict (the server's version keeps
//! the name, the local one is kept as a conflict copy); modify versus delete → the modification
//! survives.

use super::entry::Entry;
use super::path::RelPath;

/// What to do with one path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Both sides still match the base.
    InSync,
    /// Both sides changed to exactly the same state: record it as the new base.
    RecordBase,
    /// Both sides hold the same bytes but metadata (mtime, mode) differs: take the server's
    /// metadata locally and record it as the base. No bytes move.
    AdoptRemoteMeta,
    /// Make the local path what the server has: download, mkdir or delete here.
    TakeRemote,
    /// Make the server's path what is here: upload, mkdir or delete there.
    SendLocal,
    /// Both changed differently: keep the local version under a conflict name (it then syncs
    /// as a new file) and take the server's version under the original name.
    Conflict,
}

/// Decides what to do with one path. `None` means absent (or deleted).
pub fn plan(base: Option<&Entry>, local: Option<&Entry>, remote: Option<&Entry>) -> Decision {
    let local_changed = local != base;
    let remote_changed = remote != base;
    match (local_changed, remote_changed) {
        (false, false) => Decision::InSync,
        (false, true) => Decision::TakeRemote,
        (true, false) => Decision::SendLocal,
        (true, true) => match (local, remote) {
            _ if local == remote => Decision::RecordBase,
            // Modify beats delete, whichever side deleted.
            (None, Some(_)) => Decision::TakeRemote,
            (Some(_), None) => Decision::SendLocal,
            (Some(l), Some(r)) if l.same_content(r) => Decision::AdoptRemoteMeta,
            (Some(_), Some(_)) => Decision::Conflict,
            (None, None) => unreachable!("covered by local == remote"),
        },
    }
}

/// True if a server-side rename `from → to` can be applied here as a local rename, moving no
/// bytes: the source is still what we last agreed on, it holds the renamed entry's bytes, and
/// nothing local sits at the destination.
pub fn rename_locally(
    base_from: Option<&Entry>,
    local_from: Option<&Entry>,
    local_to: Option<&Entry>,
    remote_to: &Entry,
) -> bool {
    match (base_from, local_from) {
        (Some(b), Some(l)) => b == l && l.same_content(remote_to) && local_to.is_none(),
        _ => false,
    }
}

/// The name a losing local version is kept under:
/// `NAME.conflict-YYYYMMDD-HHMMSS-CLIENT.EXT` (UTC), beside the original. `attempt` counts
/// from 1; later attempts (the first name was taken: two conflicts on one path within a
/// second) add `-2`, `-3`… after the client name.
///
/// Always a valid path: to keep the name within `MAX_COMPONENT` and the path within
/// `MAX_PATH`, the stem is shortened, then the extension given up (it becomes part of the
/// stem); a directory so deep that not even the tag fits beside the original puts the copy
/// at the top of the tree instead.
pub fn conflict_name(path: &RelPath, unix_secs: i64, client: &str, attempt: u32) -> RelPath {
    use super::path::{MAX_COMPONENT, MAX_PATH};

    let name = path.file_name();
    // A leading dot is part of the stem (".bashrc" has no extension).
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let client: String = client
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let (y, mo, d, h, mi, s) = civil_utc(unix_secs);
    let mut tag = format!(".conflict-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{client}");
    if attempt > 1 {
        tag += &format!("-{attempt}");
    }
    // Room for the new name beside the original (the tag is short: it always fits at the top).
    let mut parent = path.parent();
    let beside = parent.as_ref().map_or(MAX_COMPONENT, |p| {
        MAX_COMPONENT.min(MAX_PATH.saturating_sub(p.as_str().len() + 1))
    });
    let room = if beside >= tag.len() {
        beside
    } else {
        parent = None;
        MAX_COMPONENT
    };
    let (stem, ext) = if tag.len() + ext.len() <= room {
        (stem, ext)
    } else {
        (name, "")
    };
    let mut cut = stem.len().min(room - tag.len() - ext.len());
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let file = format!("{}{tag}{ext}", &stem[..cut]);
    let full = match parent {
        Some(p) => format!("{p}/{file}"),
        None => file,
    };
    RelPath::new(full).expect("a conflict name built from a valid path is valid")
}

/// (year, month, day, hour, minute, second) in UTC; Howard Hinnant's `civil_from_days`.
pub fn civil_utc(unix_secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::Decision::*;
    use super::*;
    use crate::core::entry::Kind;

    fn file(content: &str, mtime: i64) -> Option<Entry> {
        Some(Entry {
            kind: Kind::File,
            size: content.len() as u64,
            mtime_ns: mtime,
            mode: 0o644,
            hash: *blake3::hash(content.as_bytes()).as_bytes(),
        })
    }

    fn dir() -> Option<Entry> {
        Some(Entry::dir(0o755))
    }

    fn link(target: &str) -> Option<Entry> {
        Some(Entry::link(target))
    }

    /// name, base, local, remote, expected decision
    type Row = (
        &'static str,
        Option<Entry>,
        Option<Entry>,
        Option<Entry>,
        Decision,
    );

    /// name, base at source, local at source, local at target, renamed entry, expected
    type RenameRow<'a> = (
        &'static str,
        Option<&'a Entry>,
        Option<&'a Entry>,
        Option<&'a Entry>,
        &'a Entry,
        bool,
    );

    #[test]
    fn decision_table() {
        let a = file("a", 1);
        let a_touched = file("a", 2);
        let b = file("b", 2);
        let c = file("c", 3);
        let (l, m, n) = (link("/abs/x"), link("../rel"), link("dangling"));
        // A file holding a link's target text: same size and hash, another kind.
        let l_text = Some(Entry {
            mtime_ns: 0,
            mode: 0,
            ..file("/abs/x", 0).unwrap()
        });
        #[rustfmt::skip]
        let table: &[Row] = &[
            // name                              base        local             remote            decision
            ("nothing anywhere",                 None,       None,             None,             InSync),
            ("unchanged file",                   a.clone(),  a.clone(),        a.clone(),        InSync),
            ("unchanged dir",                    dir(),      dir(),            dir(),            InSync),
            ("remote created",                   None,       None,             a.clone(),        TakeRemote),
            ("remote modified",                  a.clone(),  a.clone(),        b.clone(),        TakeRemote),
            ("remote touched",                   a.clone(),  a.clone(),        a_touched.clone(),TakeRemote),
            ("remote deleted",                   a.clone(),  a.clone(),        None,             TakeRemote),
            ("remote mkdir",                     None,       None,             dir(),            TakeRemote),
            ("remote rmdir",                     dir(),      dir(),            None,             TakeRemote),
            ("local created",                    None,       a.clone(),        None,             SendLocal),
            ("local modified",                   a.clone(),  b.clone(),        a.clone(),        SendLocal),
            ("local touched",                    a.clone(),  a_touched.clone(),a.clone(),        SendLocal),
            ("local deleted",                    a.clone(),  None,             a.clone(),        SendLocal),
            ("local mkdir",                      None,       dir(),            None,             SendLocal),
            ("local file replaced by dir",       a.clone(),  dir(),            a.clone(),        SendLocal),
            ("both made the same change",        a.clone(),  b.clone(),        b.clone(),        RecordBase),
            ("both created the same file",       None,       b.clone(),        b.clone(),        RecordBase),
            ("both deleted",                     a.clone(),  None,             None,             RecordBase),
            ("both made the dir",                None,       dir(),            dir(),            RecordBase),
            ("same bytes, different mtime",      a.clone(),  file("b", 7),     b.clone(),        AdoptRemoteMeta),
            ("first contact, same bytes",        None,       file("b", 7),     b.clone(),        AdoptRemoteMeta),
            ("both modified differently",        a.clone(),  b.clone(),        c.clone(),        Conflict),
            ("both created differently",         None,       b.clone(),        c.clone(),        Conflict),
            ("file here, dir there",             None,       b.clone(),        dir(),            Conflict),
            ("local modify beats remote delete", a.clone(),  b.clone(),        None,             SendLocal),
            ("remote modify beats local delete", a.clone(),  None,             b.clone(),        TakeRemote),
            // Symlinks follow the same rules; a link is never the same as a file or directory.
            ("remote link created",              None,       None,             l.clone(),        TakeRemote),
            ("remote link retargeted",           l.clone(),  l.clone(),        m.clone(),        TakeRemote),
            ("local link retargeted",            l.clone(),  m.clone(),        l.clone(),        SendLocal),
            ("local link deleted",               l.clone(),  None,             l.clone(),        SendLocal),
            ("local link replaced by a file",    l.clone(),  a.clone(),        l.clone(),        SendLocal),
            ("remote file replaced by a link",   a.clone(),  a.clone(),        l.clone(),        TakeRemote),
            ("both made the same link",          None,       l.clone(),        l.clone(),        RecordBase),
            ("links retargeted differently",     l.clone(),  m.clone(),        n.clone(),        Conflict),
            ("link here, dir there",             None,       l.clone(),        dir(),            Conflict),
            ("link here, its text as a file",    None,       l.clone(),        l_text.clone(),   Conflict),
            ("link modify beats delete",         l.clone(),  m.clone(),        None,             SendLocal),
        ];
        for (name, base, local, remote, want) in table {
            let got = plan(base.as_ref(), local.as_ref(), remote.as_ref());
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn rename_locally_table() {
        let a = file("a", 1).unwrap();
        let b = file("b", 1).unwrap();
        #[rustfmt::skip]
        let table: &[RenameRow<'_>] = &[
            ("clean source, free target",   Some(&a), Some(&a), None,     &a, true),
            ("source edited locally",       Some(&a), Some(&b), None,     &a, false),
            ("source gone locally",         Some(&a), None,     None,     &a, false),
            ("target taken locally",        Some(&a), Some(&a), Some(&b), &a, false),
            ("renamed entry has new bytes", Some(&a), Some(&a), None,     &b, false),
            ("source never agreed",         None,     Some(&a), None,     &a, false),
        ];
        for (name, bf, lf, lt, rt, want) in table {
            assert_eq!(rename_locally(*bf, *lf, *lt, rt), *want, "{name}");
        }
    }

    #[test]
    fn conflict_names() {
        // 2026-11-25 03:15:00 UTC
        let t = 1_795_576_500;
        #[rustfmt::skip]
        let table = [
            ("notes.txt",        "laptop",   "notes.conflict-20261125-031500-laptop.txt"),
            ("a/b/archive.tar.gz","pi",      "a/b/archive.tar.conflict-20261125-031500-pi.gz"),
            ("Makefile",         "phone",    "Makefile.conflict-20261125-031500-phone"),
            (".bashrc",          "x",        ".bashrc.conflict-20261125-031500-x"),
            ("d/ünï.md",         "my phone", "d/ünï.conflict-20261125-031500-my_phone.md"),
        ];
        for (path, client, want) in table {
            let got = conflict_name(&path.parse().unwrap(), t, client, 1);
            assert_eq!(got.as_str(), want);
        }
        let again = conflict_name(&"a/notes.txt".parse().unwrap(), t, "pi", 2);
        assert_eq!(again.as_str(), "a/notes.conflict-20261125-031500-pi-2.txt");
        let long = format!("{}.txt", "é".repeat(125));
        for attempt in [1, 2, 100] {
            let got = conflict_name(&long.parse().unwrap(), t, "c", attempt);
            assert!(got.as_str().len() <= 255 && got.as_str().ends_with(".txt"));
        }
    }

    /// Found by fuzzing (fuzz/fuzz_targets/plan.rs): names and paths near the limits used to
    /// make `conflict_name` panic instead of shortening.
    #[test]
    fn conflict_names_at_the_limits() {
        let t = 1_795_576_500;
        let valid = |p: &RelPath| RelPath::new(p.as_str()).as_ref() == Ok(p);
        // An extension too long to keep beside the tag: it is shortened with the stem.
        let long_ext: RelPath = format!("b/a.{}", "e".repeat(253)).parse().unwrap();
        for attempt in [1, 2, 100] {
            let got = conflict_name(&long_ext, t, "client-name", attempt);
            assert!(valid(&got), "{got}");
            assert_eq!(got.parent(), long_ext.parent());
            assert!(got.file_name().starts_with("a.eee"), "{got}");
            assert!(
                got.file_name().ends_with("-client-name") || attempt > 1,
                "{got}"
            );
        }
        // A path near MAX_PATH: the name is shortened to keep the whole path within it.
        let deep = vec!["d".repeat(250); 12].join("/");
        let near: RelPath = format!("{deep}/{}.txt", "n".repeat(40)).parse().unwrap();
        let got = conflict_name(&near, t, "pi", 1);
        assert!(valid(&got) && got.as_str().len() <= crate::core::path::MAX_PATH);
        assert_eq!(got.parent(), near.parent());
        assert!(
            got.as_str().ends_with(".conflict-20261125-031500-pi.txt"),
            "{got}"
        );
        // So deep that not even the tag fits beside it: the copy goes to the top of the tree.
        let deeper: RelPath = format!("{deep}/{}/x.txt", "e".repeat(35)).parse().unwrap();
        let got = conflict_name(&deeper, t, "pi", 1);
        assert!(valid(&got), "{got}");
        assert_eq!(got.as_str(), "x.conflict-20261125-031500-pi.txt");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil_utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil_utc(-1), (1969, 12, 31, 23, 59, 59));
    }
}
