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

/// Creates the state directory and empties its temporary area (leftovers of a crash).
pub fn prepare_state_dir(root: &Path) -> io::Result<()> {
    let tmp = tmp_dir(root);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)
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

/// Gives `file` (a finished temporary file) the entry's mode and mtime, makes it durable and
/// renames it to `rel`. `tmp` is its path. Returns what now stands at `rel`, plus any parent
/// directories created on the way.
pub fn install_file(
    root: &Path,
    file: File,
    tmp: &Path,
    rel: &RelPath,
    entry: &Entry,
) -> io::Result<Installed> {
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
    // A directory standing where the file goes must be empty (its children were deleted first).
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir(&target)?;
    }
    fs::rename(tmp, &target)?;
    crate::store::sync_dir(target.parent().unwrap_or(root))?;
    Ok((seen, created))
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
    let created = ensure_parents(root, to)?;
    rename_exclusive(&root.join(from.as_str()), &root.join(to.as_str()))?;
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
        let (seen, created) =
            install_file(&root, File::open(&t).unwrap(), &t, &rel, &entry).unwrap();
        assert_eq!(seen.entry, entry);
        assert_eq!(created.len(), 2);
        let meta = fs::metadata(root.join("new/dir/f.txt")).unwrap();
        assert_eq!(mtime_ns(&meta), entry.mtime_ns);
        assert_eq!(meta.mode() & 0o7777, 0o640);
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
        assert!(install_file(&root, File::open(&t).unwrap(), &t, &rel, &e).is_err());
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
