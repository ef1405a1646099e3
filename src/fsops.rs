//! Changes to a replica's tree, made so that no reader ever sees a half-written file under its
//! real name: bytes land in a temporary file in the state directory, are checked, fsynced and
//! given their mtime and mode, then renamed into place.
//!
//! Every path passed here is a validated `RelPath`; in addition no directory on the way to it
//! may be a symlink, so nothing is ever written outside the root.
//! RACE: a symlink swapped in between the check and the write could still redirect it; the
//! security work replaces these checks with openat/`O_NOFOLLOW` resolution beneath the root.

use std::fs::{self, File, FileTimes, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::core::entry::{Entry, Kind};
use crate::core::path::{RelPath, STATE_DIR};
use crate::core::renames::Seen;
use crate::scan::{dir_seen, mtime_ns};

/// `<root>/.ferry`.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join(STATE_DIR)
}

/// `<root>/.ferry/tmp`, where downloads are assembled.
pub fn tmp_dir(root: &Path) -> PathBuf {
    state_dir(root).join("tmp")
}

/// Downloads not resumed for this long are given up.
const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Creates the state directory and clears its temporary area of a crash's leftovers, keeping
/// recent partial downloads (`partial_path`) so they can resume.
pub fn prepare_state_dir(root: &Path) -> io::Result<()> {
    let tmp = tmp_dir(root);
    fs::create_dir_all(&tmp)?;
    for e in fs::read_dir(&tmp)?.flatten() {
        let name = e.file_name();
        let resumable = name.to_str().is_some_and(|n| n.starts_with('r'))
            && e.file_type().is_ok_and(|t| t.is_file())
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < PARTIAL_MAX_AGE);
        if !resumable {
            let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
        }
    }
    Ok(())
}

/// Where the download of the file whose hash is `hash` is assembled: the same name every time,
/// so a download broken off (lost connection, killed process) resumes from what is there.
pub fn partial_path(root: &Path, hash: &crate::core::entry::Hash) -> PathBuf {
    tmp_dir(root).join(format!("r{}.part", crate::agent::hex(&hash[..16])))
}

/// A fresh temporary file name in `<root>/.ferry/tmp`.
pub fn tmp_path(root: &Path) -> PathBuf {
    let n: [u8; 8] = crate::proto::auth::random();
    tmp_dir(root).join(format!("{:016x}.part", u64::from_le_bytes(n)))
}

/// Converts nanoseconds since the epoch to a `SystemTime`.
pub fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// What now stands at a path ferry wrote, plus the parent directories it had to create.
pub type Installed = (Seen, Vec<(RelPath, Seen)>);

/// Checks that every directory between the root and `rel`'s parent is a real directory (not a
/// symlink), creating missing ones. Returns the directories it created, parents first.
pub fn ensure_parents(root: &Path, rel: &RelPath) -> io::Result<Vec<(RelPath, Seen)>> {
    let mut created = Vec::new();
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = rel.as_str().split('/').collect();
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a directory (a symlink or file is in the way)",
                    parts[..=i].join("/")
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir)?;
                let rel_dir = RelPath::new(parts[..=i].join("/")).map_err(io::Error::other)?;
                created.push((rel_dir, dir_seen(&fs::symlink_metadata(&dir)?)));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// How installing a downloaded file went.
#[derive(Debug)]
pub enum Install {
    /// In place. `displaced` is where the replaced file went when it had been written to
    /// since it was last looked at (a local edit racing the download): the caller keeps it
    /// as a conflict copy. Otherwise the replaced file is gone.
    Done {
        installed: Installed,
        displaced: Option<PathBuf>,
    },
    /// Not installed: something was created here, or a file replaced, while downloading.
    ChangedHere,
}

/// Gives `file` (a finished temporary file) the entry's mode and mtime, makes it durable and
/// renames it to `rel`, provided what stands there is still `expect` (what was seen when the
/// download was decided). `tmp` is its path.
///
/// The replaced file is hard-linked aside first and checked after the rename, so an edit
/// that finished in between is kept (as `displaced`) rather than lost.
pub fn install_file(
    root: &Path,
    file: File,
    tmp: &Path,
    rel: &RelPath,
    entry: &Entry,
    expect: Option<&Seen>,
) -> io::Result<Install> {
    file.set_permissions(Permissions::from_mode(entry.mode))?;
    file.set_times(FileTimes::new().set_modified(system_time(entry.mtime_ns)))?;
    file.sync_all()?;
    let meta = file.metadata()?;
    let seen = Seen {
        entry: Entry {
            kind: Kind::File,
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
            mode: meta.mode() & 0o7777,
            hash: entry.hash,
        },
        ino: meta.ino(),
    };
    drop(file);
    let created = ensure_parents(root, rel)?;
    let target = root.join(rel.as_str());
    let mut aside = None;
    match fs::symlink_metadata(&target) {
        // A directory standing where the file goes must be empty (its children were deleted
        // first); `remove_dir` refuses anything else.
        Ok(m) if m.is_dir() => fs::remove_dir(&target)?,
        Ok(m) => match expect {
            Some(seen) if unchanged(&m, seen) => {
                let path = tmp.with_extension("replaced");
                let _ = fs::remove_file(&path);
                // Without hard links (some Android storage) the window is only the rename.
                aside = fs::hard_link(&target, &path)
                    .is_ok()
                    .then_some((path, seen));
            }
            _ => return Ok(Install::ChangedHere),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::rename(tmp, &target)?;
    crate::store::sync_dir(target.parent().unwrap_or(root))?;
    let displaced = match aside {
        Some((path, seen)) => match fs::symlink_metadata(&path) {
            Ok(m) if !unchanged(&m, seen) => Some(path),
            _ => {
                let _ = fs::remove_file(&path);
                None
            }
        },
        None => None,
    };
    Ok(Install::Done {
        installed: (seen, created),
        displaced,
    })
}

/// Moves `from` (a local version that lost to another for `path`) to the first free conflict
/// name for `path` (see `conflict_name`), made now by replica `who`. Returns that name and
/// the parent directories created on the way.
pub fn keep_as_conflict(
    root: &Path,
    from: &Path,
    path: &RelPath,
    who: &str,
) -> io::Result<(RelPath, Vec<(RelPath, Seen)>)> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    // Two conflicts on one path within a second share a first name: count on.
    let mut attempt = 1;
    loop {
        let copy = crate::core::plan::conflict_name(path, now, who, attempt);
        match rename_into(root, from, &copy) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
            Ok(created) => return Ok((copy, created)),
        }
    }
}

/// True if `meta` is still the file `seen` describes (same inode, size and mtime).
fn unchanged(meta: &fs::Metadata, seen: &Seen) -> bool {
    meta.is_file()
        && meta.ino() == seen.ino
        && meta.len() == seen.entry.size
        && mtime_ns(meta) == seen.entry.mtime_ns
}

/// Creates directory `rel` (or sets its mode if it exists). Returns its state.
pub fn make_dir(root: &Path, rel: &RelPath, mode: u32) -> io::Result<Installed> {
    let created = ensure_parents(root, rel)?;
    let target = root.join(rel.as_str());
    match fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => {}
        Ok(m) if m.is_file() => {
            fs::remove_file(&target)?;
            fs::create_dir(&target)?;
        }
        Ok(_) => return Err(io::Error::other(format!("{rel}: a symlink is in the way"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&target)?,
        Err(e) => return Err(e),
    }
    fs::set_permissions(&target, Permissions::from_mode(mode))?;
    Ok((dir_seen(&fs::symlink_metadata(&target)?), created))
}

/// Sets a file's mode and mtime (bytes unchanged). Returns its new state.
pub fn set_meta(root: &Path, rel: &RelPath, entry: &Entry) -> io::Result<Seen> {
    ensure_parents(root, rel)?;
    let target = root.join(rel.as_str());
    let meta = fs::symlink_metadata(&target)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other(format!("{rel} is a symlink")));
    }
    fs::set_permissions(&target, Permissions::from_mode(entry.mode))?;
    if entry.kind == Kind::File {
        let f = File::options().write(true).open(&target)?;
        f.set_times(FileTimes::new().set_modified(system_time(entry.mtime_ns)))?;
    }
    let meta = fs::symlink_metadata(&target)?;
    let mut e = entry.clone();
    if e.kind == Kind::File {
        e.mtime_ns = mtime_ns(&meta);
    }
    Ok(Seen {
        entry: e,
        ino: meta.ino(),
    })
}

/// What `remove` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// The path is gone (or was already).
    Gone,
    /// A directory still holds entries, so it was kept.
    NotEmpty,
}

/// Deletes a file or an empty directory at `rel`.
pub fn remove(root: &Path, rel: &RelPath) -> io::Result<Removed> {
    ensure_parents_exist_or_gone(root, rel)?;
    let target = root.join(rel.as_str());
    let meta = match fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Gone),
        Err(e) => return Err(e),
    };
    let result = if meta.is_dir() {
        fs::remove_dir(&target)
    } else {
        fs::remove_file(&target)
    };
    match result {
        Ok(()) => Ok(Removed::Gone),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(Removed::NotEmpty),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removed::Gone),
        Err(e) => Err(e),
    }
}

/// Like `ensure_parents` but creates nothing: a missing parent means the path is gone already.
fn ensure_parents_exist_or_gone(root: &Path, rel: &RelPath) -> io::Result<()> {
    let mut dir = root.to_path_buf();
    let parts: Vec<&str> = rel.as_str().split('/').collect();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{rel}: a symlink or file is in the way"
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Renames `from` to `to`, never replacing anything at `to`.
pub fn rename_noreplace(
    root: &Path,
    from: &RelPath,
    to: &RelPath,
) -> io::Result<Vec<(RelPath, Seen)>> {
    ensure_parents_exist_or_gone(root, from)?;
    rename_into(root, &root.join(from.as_str()), to)
}

/// Renames the file or directory at `from` (any path on the root's filesystem) to `to`,
/// never replacing anything there. Returns the parent directories it had to create.
pub fn rename_into(root: &Path, from: &Path, to: &RelPath) -> io::Result<Vec<(RelPath, Seen)>> {
    let created = ensure_parents(root, to)?;
    rename_exclusive(from, &root.join(to.as_str()))?;
    Ok(created)
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rename_exclusive(from: &Path, to: &Path) -> io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(io::Error::from)
}

/// `rename` that fails with `AlreadyExists` instead of replacing `to`. musl and bionic builds
/// get no `renameat2` from nix, so: a file is hard-linked to `to` (which refuses an existing
/// target) and then unlinked; a directory, or a file on a filesystem without hard links
/// (Android's shared storage), is checked for then renamed.
/// RACE: in the checked case, an entry created at `to` in between is replaced if it is an
/// empty directory (rename refuses files over directories and non-empty directories).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn rename_exclusive(from: &Path, to: &Path) -> io::Result<()> {
    if !fs::symlink_metadata(from)?.is_dir() {
        match fs::hard_link(from, to) {
            Ok(()) => return fs::remove_file(from),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {} // no hard links here: fall back to check-then-rename
        }
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-fsops-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        prepare_state_dir(&d).unwrap();
        d
    }

    #[test]
    fn install_sets_mtime_mode_and_parents() {
        let root = tmp("install");
        let t = tmp_path(&root);
        fs::write(&t, b"hello").unwrap();
        let entry = Entry {
            kind: Kind::File,
            size: 5,
            mtime_ns: 1_600_000_000_123_456_789,
            mode: 0o640,
            hash: *blake3::hash(b"hello").as_bytes(),
        };
        let rel: RelPath = "new/dir/f.txt".parse().unwrap();
        let Install::Done {
            installed: (seen, created),
            displaced: None,
        } = install_file(&root, File::open(&t).unwrap(), &t, &rel, &entry, None).unwrap()
        else {
            panic!("not installed")
        };
        assert_eq!(seen.entry, entry);
        assert_eq!(created.len(), 2);
        let meta = fs::metadata(root.join("new/dir/f.txt")).unwrap();
        assert_eq!(mtime_ns(&meta), entry.mtime_ns);
        assert_eq!(meta.mode() & 0o7777, 0o640);
        fs::remove_dir_all(&root).unwrap();
    }

    /// The file at `rel` as a scan would have seen it.
    fn seen_at(root: &Path, rel: &str) -> Seen {
        let m = fs::symlink_metadata(root.join(rel)).unwrap();
        Seen {
            entry: Entry {
                kind: Kind::File,
                size: m.len(),
                mtime_ns: mtime_ns(&m),
                mode: m.mode() & 0o7777,
                hash: [0; 32],
            },
            ino: m.ino(),
        }
    }

    #[test]
    fn install_replaces_only_what_was_seen() {
        let root = tmp("install-race");
        let entry = |bytes: &[u8]| Entry {
            kind: Kind::File,
            size: bytes.len() as u64,
            mtime_ns: 1_600_000_000_000_000_000,
            mode: 0o644,
            hash: *blake3::hash(bytes).as_bytes(),
        };
        let rel: RelPath = "f".parse().unwrap();
        let download = |bytes: &[u8]| {
            let t = tmp_path(&root);
            fs::write(&t, bytes).unwrap();
            (File::open(&t).unwrap(), t)
        };

        // Seen as absent, but a file was made meanwhile: left alone, download kept.
        fs::write(root.join("f"), b"made here").unwrap();
        let (file, t) = download(b"remote");
        let got = install_file(&root, file, &t, &rel, &entry(b"remote"), None).unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        assert!(t.exists());
        assert_eq!(fs::read(root.join("f")).unwrap(), b"made here");

        let install_remote = |t: &Path, seen: &Seen| {
            let file = File::open(t).unwrap();
            install_file(&root, file, t, &rel, &entry(b"remote"), Some(seen)).unwrap()
        };

        // Seen, then written again: left alone.
        let seen = seen_at(&root, "f");
        fs::write(root.join("f"), b"made here, edited").unwrap();
        let got = install_remote(&t, &seen);
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"made here, edited");

        // Unchanged since seen: replaced, and nothing left beside it.
        let seen = seen_at(&root, "f");
        let got = install_remote(&t, &seen);
        assert!(
            matches!(
                got,
                Install::Done {
                    displaced: None,
                    ..
                }
            ),
            "{got:?}"
        );
        assert_eq!(fs::read(root.join("f")).unwrap(), b"remote");
        assert_eq!(fs::read_dir(tmp_dir(&root)).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn conflict_copies_never_replace_each_other() {
        let root = tmp("conflicts");
        let rel: RelPath = "d/notes.txt".parse().unwrap();
        fs::create_dir(root.join("d")).unwrap();
        let mut copies = Vec::new();
        for text in ["one", "two", "three"] {
            fs::write(root.join("d/notes.txt"), text).unwrap();
            let (copy, _) = keep_as_conflict(&root, &root.join("d/notes.txt"), &rel, "pi").unwrap();
            assert_eq!(fs::read_to_string(root.join(copy.as_str())).unwrap(), text);
            copies.push(copy);
        }
        copies.sort();
        copies.dedup();
        assert_eq!(copies.len(), 3, "{copies:?}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn symlinked_parent_is_refused() {
        let root = tmp("symlink");
        let outside = tmp("outside");
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let rel: RelPath = "link/evil.txt".parse().unwrap();
        let t = tmp_path(&root);
        fs::write(&t, b"x").unwrap();
        let e = Entry {
            kind: Kind::File,
            size: 1,
            mtime_ns: 0,
            mode: 0o644,
            hash: *blake3::hash(b"x").as_bytes(),
        };
        assert!(install_file(&root, File::open(&t).unwrap(), &t, &rel, &e, None).is_err());
        assert!(make_dir(&root, &rel, 0o755).is_err());
        assert!(!outside.join("evil.txt").exists());
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn remove_keeps_non_empty_dirs_and_rename_never_replaces() {
        let root = tmp("remove");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), "x").unwrap();
        fs::write(root.join("g"), "y").unwrap();
        let d: RelPath = "d".parse().unwrap();
        assert_eq!(remove(&root, &d).unwrap(), Removed::NotEmpty);
        let err = rename_noreplace(&root, &"g".parse().unwrap(), &"d/f".parse().unwrap());
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(root.join("d/f")).unwrap(), "x");
        assert_eq!(
            remove(&root, &"d/f".parse().unwrap()).unwrap(),
            Removed::Gone
        );
        assert_eq!(remove(&root, &d).unwrap(), Removed::Gone);
        assert_eq!(
            remove(&root, &"nothing/here".parse().unwrap()).unwrap(),
            Removed::Gone
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
