//! Changes to a replica's tree, made so that no reader ever sees a half-written file under its
//! real name: bytes land in a temporary file in the state directory, are checked, fsynced and
//! given their mtime and mode, then renamed into place. A symlink is made under a temporary
//! name beside its place and renamed into it the same way.
//!
//! Every path passed here is a validated `RelPath`, and every change is made through
//! descriptors of the directories on the way, opened one component at a time beneath the root
//! without following symlinks (`crate::beneath`): a symlink or file in the way is refused, and
//! one swapped in while a change is under way cannot redirect it, so nothing is ever written
//! outside the root. Temporary files move into place with `renameat` from the state
//! directory's descriptor to the parent's.

use std::fs::{self, File, FileTimes, Permissions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::beneath::{self, Dir, Stat};
use crate::core::entry::{Entry, Kind};
use crate::core::path::{RelPath, STATE_DIR};
use crate::core::renames::Seen;
use crate::scan::dir_seen;

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
/// recent partial downloads (`partial_path`) so they can resume, and fetched files
/// (`fetched_path`): a client's start looks for those first, then clears them
/// (`clear_fetched`).
pub fn prepare_state_dir(root: &Path) -> io::Result<()> {
    let tmp = tmp_dir(root);
    fs::create_dir_all(&tmp)?;
    for e in fs::read_dir(&tmp)?.flatten() {
        let name = e.file_name();
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        let keep = match name.to_str().and_then(|n| n.chars().next()) {
            Some('r') => e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < PARTIAL_MAX_AGE),
            Some('f') => true,
            _ => false,
        };
        if !(keep && is_file) {
            let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
        }
    }
    Ok(())
}

/// Removes the fetched files (`fetched_path`) that `prepare_state_dir` kept.
pub fn clear_fetched(root: &Path) {
    let Ok(dir) = fs::read_dir(tmp_dir(root)) else {
        return;
    };
    for e in dir.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with('f')) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Where the download of the file whose hash is `hash` is assembled: the same name every time,
/// so a download broken off (lost connection, killed process) resumes from what is there.
pub fn partial_path(root: &Path, hash: &crate::core::entry::Hash) -> PathBuf {
    tmp_dir(root).join(format!("r{}.part", crate::agent::hex(&hash[..16])))
}

/// Creates the temporary file `tmp` holding `bytes` with `entry`'s mode and mtime, for
/// `install_unsynced`, and returns what it now is. A file there already is left alone
/// (`AlreadyExists`): it may be being put in place. One this call created and could not finish
/// is removed. (On Android it is fsynced here: shared storage is a FUSE filesystem, where
/// `syncfs` may not reach it.)
pub fn write_unsynced(tmp: &Path, bytes: &[u8], entry: &Entry) -> io::Result<Stat> {
    use std::io::Write;
    let (dir, name) = beneath::state_parent(tmp)?;
    // Created with the entry's mode, which the umask (022 as a rule) mostly leaves alone: the
    // `fchmod` is then not needed, one system call of six a file in a first sync.
    let mut file = dir.create_file(name, entry.mode)?;
    let written = (|| {
        file.write_all(bytes)?;
        file.set_times(FileTimes::new().set_modified(system_time(entry.mtime_ns)))?;
        let mut made = Stat::from(&file.metadata()?);
        if made.perm() != entry.mode {
            file.set_permissions(Permissions::from_mode(entry.mode))?;
            made = Stat::from(&file.metadata()?);
        }
        if cfg!(target_os = "android") {
            file.sync_all()?;
        }
        Ok(made)
    })();
    if written.is_err() {
        let _ = dir.remove_file(name);
    }
    written
}

/// Makes everything written to the filesystem holding `dir` durable: one `syncfs` for a
/// batch of files instead of an fsync each.
pub fn sync_fs(dir: &Path) -> io::Result<()> {
    let d = File::open(dir)?;
    nix::unistd::syncfs(&d).map_err(io::Error::from)
}

/// Has a large file's bytes written to disk while more of them arrive, so the fsync before it
/// is put in place finds little left to do: the disk works while the network does, instead of
/// after it. Every `STEP` bytes the kernel is asked to start writing back what arrived since
/// the last step, and to drop from the page cache what the step before wrote back, so a large
/// transfer does not push everything else out of a small machine's memory either.
#[derive(Debug)]
pub struct Writeback {
    /// Writeback has been asked for up to here.
    asked: u64,
}

impl Writeback {
    const STEP: u64 = 8 << 20;

    /// For a file written from offset `from` on.
    pub fn new(from: u64) -> Self {
        Writeback { asked: from }
    }

    /// The range to pass to `start_writeback` now that the file holds `end` bytes, once a
    /// step has passed since the last one.
    pub fn due(&mut self, end: u64) -> Option<(u64, u64)> {
        if end < self.asked + Self::STEP {
            return None;
        }
        let range = (self.asked.saturating_sub(Self::STEP), end);
        self.asked = end;
        Some(range)
    }
}

/// Starts writing bytes `from..to` of `file` back to disk without waiting for it, and drops
/// those already written back from the page cache (`POSIX_FADV_DONTNEED` does both). Advice
/// only: an offset that does not fit `off_t` (a 32-bit target past 2 GiB) or a filesystem that
/// ignores it changes nothing but speed.
pub fn start_writeback(file: &File, (from, to): (u64, u64)) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    if let (Ok(offset), Ok(len)) = (from.try_into(), (to - from).try_into()) {
        let _ = posix_fadvise(file, offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// What a `Sink::write` returns: the sink and the buffer, for the next chunk.
pub type Written = io::Result<(Sink, Vec<u8>)>;

/// A file arriving over the network: hashed as it is written, and written back as it grows
/// (see `Writeback`). Written a chunk at a time on a blocking thread, so the connection's thread
/// only reads (and decrypts) the next chunk meanwhile.
#[derive(Debug)]
pub struct Sink {
    /// The file, open for writing at its end.
    pub file: File,
    /// The hash of everything in it, if it is being hashed.
    pub hasher: Option<blake3::Hasher>,
    writeback: Writeback,
    /// Bytes in the file.
    written: u64,
}

impl Sink {
    /// For `file`, which holds `written` bytes (hashed into `hasher`) and is positioned after.
    pub fn new(file: File, hasher: Option<blake3::Hasher>, written: u64) -> Sink {
        Sink {
            file,
            hasher,
            writeback: Writeback::new(written),
            written,
        }
    }

    /// Hashes and appends `chunk` (blocking); hands back the buffer for the next one.
    pub fn write(mut self, chunk: Vec<u8>) -> Written {
        use std::io::Write;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&chunk);
        }
        self.file.write_all(&chunk)?;
        self.written += chunk.len() as u64;
        if let Some(range) = self.writeback.due(self.written) {
            start_writeback(&self.file, range);
        }
        Ok((self, chunk))
    }
}

/// Appends to `bytes` the regular file `rel` beneath `root` (as `beneath::open_file` opens it),
/// if it is still `entry`: its size, then the hash of what was read. Returns whether it was
/// appended (`bytes` is left as it was otherwise). For packs of small files: an open, an
/// `fstat` and one read of the known size, where `read_to_end` probed with small reads and
/// read once more for the end of the file.
pub fn append_file(root: &Path, rel: &RelPath, entry: &Entry, bytes: &mut Vec<u8>) -> bool {
    use std::io::Read;
    let start = bytes.len();
    let read = beneath::open_file(root, rel).and_then(|(mut file, meta)| {
        if meta.len() != entry.size {
            return Ok(false);
        }
        let len = usize::try_from(entry.size).map_err(io::Error::other)?;
        bytes.resize(start + len, 0);
        file.read_exact(&mut bytes[start..])?;
        Ok(true)
    });
    let same = matches!(read, Ok(true)) && *blake3::hash(&bytes[start..]).as_bytes() == entry.hash;
    if !same {
        bytes.truncate(start);
    }
    same
}

/// Where a file fetched in a pack waits in `<root>/.ferry/tmp` before it is put in place at
/// `rel`: named by path and content, so a start after a power cut can tell whether its rename
/// was lost (the file is still here) or happened (see the client's `applying` record).
pub fn fetched_path(root: &Path, rel: &RelPath, hash: &crate::core::entry::Hash) -> PathBuf {
    let of_path = blake3::hash(rel.as_str().as_bytes());
    tmp_dir(root).join(format!(
        "f{}{}.part",
        crate::agent::hex(&of_path.as_bytes()[..8]),
        crate::agent::hex(&hash[..8])
    ))
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

/// Directories ferry had to create on the way to a path, parents first.
pub type Created = Vec<(RelPath, Seen)>;

/// What now stands at a path ferry wrote, plus the parent directories it had to create.
pub type Installed = (Seen, Created);

/// Opens the directory that holds `rel` beneath `root`, creating missing directories on the
/// way (returned, parents first); a symlink or file on the way is refused.
fn parent_made<'a>(root: &Path, rel: &'a RelPath) -> io::Result<(Dir, &'a str, Created)> {
    let mut created = Vec::new();
    let (dir, name) = beneath::parent(root, rel, Some(&mut created))?;
    let created = created
        .into_iter()
        .map(|(p, meta)| (p, dir_seen(&meta)))
        .collect();
    Ok((dir, name, created))
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
/// download was decided). `tmp` is its path, in the state directory.
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
    let meta = Stat::from(&file.metadata()?);
    drop(file);
    place(root, &meta, tmp, rel, entry, expect, true)
}

/// `install_file` for a temporary file written by `write_unsynced` (`meta`: what it returned),
/// synced neither before nor after its rename: an fsync per small file costs more than writing
/// it. The caller makes a batch of these durable with one `sync_fs` before it records any of
/// them durably (the server before it journals the commits; a client keeps them in its
/// `applying` record until then).
pub fn install_unsynced(
    root: &Path,
    meta: &Stat,
    tmp: &Path,
    rel: &RelPath,
    entry: &Entry,
    expect: Option<&Seen>,
) -> io::Result<Install> {
    place(root, meta, tmp, rel, entry, expect, false)
}

/// Renames the temporary file (`meta`: what it is) into place (see `install_file`);
/// `sync_dir`: fsync the directory after the rename.
fn place(
    root: &Path,
    meta: &Stat,
    tmp: &Path,
    rel: &RelPath,
    entry: &Entry,
    expect: Option<&Seen>,
    sync_dir: bool,
) -> io::Result<Install> {
    let seen = Seen {
        entry: Entry {
            kind: Kind::File,
            size: meta.len,
            mtime_ns: meta.mtime_ns,
            mode: meta.perm(),
            hash: entry.hash,
        },
        ino: meta.ino,
    };
    let (tmp_dir, tmp_name) = beneath::state_parent(tmp)?;
    let (dir, name, created) = parent_made(root, rel)?;
    let aside = tmp.with_extension("replaced");
    match replace((&tmp_dir, tmp_name), (&dir, name), expect, &aside, sync_dir)? {
        None => Ok(Install::ChangedHere),
        Some(displaced) => Ok(Install::Done {
            installed: (seen, created),
            displaced,
        }),
    }
}

/// Creates the symlink `rel` pointing at `target` (any text: it is never resolved), replacing
/// what stands there provided it is still `expect`, as `install_file` does. The link is made
/// under a temporary name in the same directory and renamed into place, so a link whose
/// target changes is replaced atomically. It has no mode or mtime to set.
pub fn make_link(
    root: &Path,
    rel: &RelPath,
    target: &str,
    expect: Option<&Seen>,
) -> io::Result<Install> {
    let (dir, name, created) = parent_made(root, rel)?;
    // `.#` names are ignored by the built-in rules (emacs lock files, which are symlinks
    // too): a watcher that sees this one in its moment does not sync it.
    let n: [u8; 8] = crate::proto::auth::random();
    let tmp_name = format!(".#ferry-{:016x}", u64::from_le_bytes(n));
    dir.symlink(target, &tmp_name)?;
    let made = dir.stat(&tmp_name).and_then(|meta| {
        let aside = tmp_path(root).with_extension("replaced");
        let placed = replace((&dir, &tmp_name), (&dir, name), expect, &aside, true)?;
        Ok(placed.map(|displaced| (meta.ino, displaced)))
    });
    match made {
        Ok(Some((ino, displaced))) => Ok(Install::Done {
            installed: (
                Seen {
                    entry: Entry::link(target),
                    ino,
                },
                created,
            ),
            displaced,
        }),
        Ok(None) => {
            let _ = dir.remove_file(&tmp_name);
            Ok(Install::ChangedHere)
        }
        Err(e) => {
            let _ = dir.remove_file(&tmp_name);
            Err(e)
        }
    }
}

/// Renames `from` (a directory and a name in it) to `to`, provided what stands at `to` is
/// still `expect`; `None` (nothing done) if not. A directory standing there must be empty
/// (its children were deleted first); `remove_dir` refuses anything else.
///
/// A replaced file is hard-linked aside first, as `aside` (a free path in the state
/// directory), and checked after the rename, so an edit that finished in between is kept:
/// returned as where it went. Otherwise the replaced entry is gone.
fn replace(
    from: (&Dir, &str),
    to: (&Dir, &str),
    expect: Option<&Seen>,
    aside: &Path,
    sync_dir: bool,
) -> io::Result<Option<Option<PathBuf>>> {
    let (dir, name) = to;
    // Nothing expected there (a new file, the common case): the kernel refuses to replace
    // anything, which spares looking first. Something there after all takes the checks below.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if expect.is_none() {
        match from.0.rename_file_noreplace(from.1, dir, name) {
            Ok(()) => {
                if sync_dir {
                    dir.sync()?;
                }
                return Ok(Some(None));
            }
            Err(e)
                if e.kind() == io::ErrorKind::AlreadyExists
                    || e.raw_os_error() == Some(nix::libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let mut kept = None;
    match dir.stat(name) {
        // A directory only where one was expected: one the cache has not heard of yet (just
        // made here) is a change here, like a file.
        Ok(m) if m.is_dir() => match expect {
            Some(seen) if seen.entry.is_dir() => dir.remove_dir(name)?,
            _ => return Ok(None),
        },
        Ok(m) => match expect {
            Some(seen) if unchanged(&m, seen) => {
                let (aside_dir, aside_name) = beneath::state_parent(aside)?;
                let _ = aside_dir.remove_file(aside_name);
                // Without hard links (some Android storage) the window is only the rename.
                kept = dir
                    .hard_link(name, &aside_dir, aside_name)
                    .is_ok()
                    .then_some((aside_dir, aside_name, seen));
            }
            _ => return Ok(None),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    from.0.rename(from.1, dir, name)?;
    if sync_dir {
        dir.sync()?;
    }
    let displaced =
        kept.and_then(
            |(aside_dir, aside_name, seen)| match aside_dir.stat(aside_name) {
                Ok(m) if !unchanged(&m, seen) => Some(aside.to_path_buf()),
                _ => {
                    let _ = aside_dir.remove_file(aside_name);
                    None
                }
            },
        );
    Ok(Some(displaced))
}

/// Moves `from` (a local version that lost to another for `path`) to the first free conflict
/// name for `path` (see `conflict_name`), made now by replica `who`. `from` is `path`'s own
/// place in the tree or a file in the state directory (see `Install::Done`). Returns the
/// conflict name and the parent directories created on the way.
pub fn keep_as_conflict(
    root: &Path,
    from: &Path,
    path: &RelPath,
    who: &str,
) -> io::Result<(RelPath, Vec<(RelPath, Seen)>)> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (from_dir, from_name) = source(root, from)?;
    // Two conflicts on one path within a second share a first name: count on.
    let mut attempt = 1;
    loop {
        let copy = crate::core::plan::conflict_name(path, now, who, attempt);
        match move_noreplace(root, &from_dir, &from_name, &copy) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(e),
            Ok(created) => return Ok((copy, created)),
        }
    }
}

/// The directory holding `from` and its name there: resolved beneath the root if `from` is in
/// the tree, by path if it is in ferry's state directory. Anything else is refused.
fn source(root: &Path, from: &Path) -> io::Result<(Dir, String)> {
    if from.starts_with(state_dir(root)) {
        let (dir, name) = beneath::state_parent(from)?;
        return Ok((dir, name.to_string()));
    }
    let rel = from
        .strip_prefix(root)
        .ok()
        .and_then(Path::to_str)
        .and_then(|s| RelPath::new(s).ok())
        .ok_or_else(|| io::Error::other(format!("{} is not in the tree", from.display())))?;
    let (dir, name) = beneath::parent(root, &rel, None)?;
    Ok((dir, name.to_string()))
}

/// True if `meta` is still the file or symlink `seen` describes (same inode, size, and for a
/// file mtime; a symlink's target cannot change in place).
fn unchanged(meta: &Stat, seen: &Seen) -> bool {
    let same_kind = match seen.entry.kind {
        Kind::File => meta.is_file() && meta.mtime_ns == seen.entry.mtime_ns,
        Kind::Symlink => meta.is_symlink(),
        Kind::Dir => false,
    };
    same_kind && meta.ino == seen.ino && meta.len == seen.entry.size
}

/// Creates directory `rel` (or sets its mode if it exists). Returns its state.
pub fn make_dir(root: &Path, rel: &RelPath, mode: u32) -> io::Result<Installed> {
    let (dir, name, created) = parent_made(root, rel)?;
    match dir.stat(name) {
        Ok(m) if m.is_dir() => {}
        Ok(m) if m.is_file() => {
            dir.remove_file(name)?;
            dir.mkdir(name)?;
        }
        // A symlink the caller knows of is removed first (`remove`); any other is kept, and so
        // is a special file (a FIFO, a socket) nothing syncs.
        Ok(_) => {
            return Err(io::Error::other(format!(
                "{rel}: a symlink or special file is in the way"
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => dir.mkdir(name)?,
        Err(e) => return Err(e),
    }
    let meta = set_mode_and_mtime(&dir, name, rel, mode, None)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{rel} is not a directory")));
    }
    Ok((dir_seen(&meta), created))
}

/// Sets the mode (and the mtime, if given) of `name` in `dir`, never through a symlink, and
/// returns its metadata afterwards. Through a descriptor opened with `O_NOFOLLOW` where it can
/// be read; otherwise with the `AT_SYMLINK_NOFOLLOW` calls.
fn set_mode_and_mtime(
    dir: &Dir,
    name: &str,
    rel: &RelPath,
    mode: u32,
    mtime_ns: Option<i64>,
) -> io::Result<Stat> {
    // ELOOP from `O_NOFOLLOW`; EOPNOTSUPP from `fchmodat(AT_SYMLINK_NOFOLLOW)` on a symlink.
    let symlink = |e: io::Error| match e.raw_os_error() {
        Some(nix::libc::ELOOP | nix::libc::EOPNOTSUPP) => {
            io::Error::other(format!("{rel} is a symlink"))
        }
        _ => e,
    };
    match dir.open_for_meta(name).map_err(symlink)? {
        Some(f) => {
            f.set_permissions(Permissions::from_mode(mode))?;
            if let Some(ns) = mtime_ns {
                f.set_times(FileTimes::new().set_modified(system_time(ns)))?;
            }
            Ok(Stat::from(&f.metadata()?))
        }
        None => {
            dir.chmod_nofollow(name, mode).map_err(symlink)?;
            if let Some(ns) = mtime_ns {
                dir.set_mtime_nofollow(name, ns)?;
            }
            dir.stat(name)
        }
    }
}

/// Sets a file's mode and mtime (bytes unchanged). Returns its new state.
pub fn set_meta(root: &Path, rel: &RelPath, entry: &Entry) -> io::Result<Seen> {
    let (dir, name) = beneath::parent(root, rel, None)?;
    let mtime = (entry.kind == Kind::File).then_some(entry.mtime_ns);
    let meta = set_mode_and_mtime(&dir, name, rel, entry.mode, mtime)?;
    let mut e = entry.clone();
    if e.kind == Kind::File {
        e.mtime_ns = meta.mtime_ns;
    }
    Ok(Seen {
        entry: e,
        ino: meta.ino,
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

/// Deletes a file or an empty directory at `rel` (a symlink there is removed itself).
pub fn remove(root: &Path, rel: &RelPath) -> io::Result<Removed> {
    // A missing directory on the way: the path is gone already.
    let (dir, name) = match beneath::parent(root, rel, None) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Gone),
        Err(e) => return Err(e),
    };
    let meta = match dir.stat(name) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Gone),
        Err(e) => return Err(e),
    };
    let result = if meta.is_dir() {
        dir.remove_dir(name)
    } else {
        dir.remove_file(name)
    };
    match result {
        Ok(()) => Ok(Removed::Gone),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(Removed::NotEmpty),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removed::Gone),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to`, never replacing anything at `to`. Returns the parent directories it
/// had to create.
pub fn rename_noreplace(
    root: &Path,
    from: &RelPath,
    to: &RelPath,
) -> io::Result<Vec<(RelPath, Seen)>> {
    let (from_dir, from_name) = beneath::parent(root, from, None)?;
    move_noreplace(root, &from_dir, from_name, to)
}

/// Renames the file or directory at `from` (in the tree or in the state directory, see
/// `keep_as_conflict`) to `to`, never replacing anything there. Returns the parent
/// directories it had to create.
pub fn rename_into(root: &Path, from: &Path, to: &RelPath) -> io::Result<Vec<(RelPath, Seen)>> {
    let (from_dir, from_name) = source(root, from)?;
    move_noreplace(root, &from_dir, &from_name, to)
}

/// Renames `from_name` in `from_dir` to `to` beneath `root`, never replacing anything there.
fn move_noreplace(
    root: &Path,
    from_dir: &Dir,
    from_name: &str,
    to: &RelPath,
) -> io::Result<Vec<(RelPath, Seen)>> {
    let (dir, name, created) = parent_made(root, to)?;
    from_dir.rename_noreplace(from_name, &dir, name)?;
    Ok(created)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::scan::mtime_ns;
    use std::os::unix::fs::MetadataExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-fsops-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        prepare_state_dir(&d).unwrap();
        d
    }

    #[test]
    fn a_file_is_appended_only_as_its_entry_says() {
        let root = tmp("append");
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/a"), b"alpha").unwrap();
        fs::write(root.join("d/e"), b"").unwrap();
        std::os::unix::fs::symlink("a", root.join("d/link")).unwrap();
        let p = |s: &str| -> RelPath { s.parse().unwrap() };
        let mut bytes = b"head".to_vec();
        assert!(append_file(
            &root,
            &p("d/a"),
            &file_entry(b"alpha"),
            &mut bytes
        ));
        assert!(append_file(&root, &p("d/e"), &file_entry(b""), &mut bytes));
        assert_eq!(bytes, b"headalpha");
        // Another size, other bytes of the same size, gone, a symlink: nothing appended.
        for (rel, entry) in [
            ("d/a", file_entry(b"alph")),
            ("d/a", file_entry(b"alpho")),
            ("d/gone", file_entry(b"alpha")),
            ("d/link", file_entry(b"alpha")),
        ] {
            assert!(!append_file(&root, &p(rel), &entry, &mut bytes), "{rel}");
            assert_eq!(bytes, b"headalpha", "{rel}");
        }
        fs::remove_dir_all(&root).unwrap();
    }

    /// A file read to be sent keeps its access time (`O_NOATIME`): with `relatime`, an access
    /// time older than the mtime is what makes a plain read write the inode.
    #[test]
    fn reading_a_file_to_send_it_leaves_its_access_time() {
        use std::io::Read;
        let root = tmp("noatime");
        let old_atime = |name: &str| {
            let f = fs::File::options()
                .write(true)
                .open(root.join(name))
                .unwrap();
            let mtime = SystemTime::now() - Duration::from_secs(10);
            f.set_times(
                fs::FileTimes::new()
                    .set_accessed(mtime - Duration::from_secs(3600))
                    .set_modified(mtime),
            )
            .unwrap();
            fs::metadata(root.join(name)).unwrap().atime()
        };
        // The control: where a plain read leaves the access time too (a `noatime` mount),
        // this test cannot tell the difference; it says so and checks nothing.
        fs::write(root.join("plain"), b"read plainly").unwrap();
        let before = old_atime("plain");
        fs::read(root.join("plain")).unwrap();
        if fs::metadata(root.join("plain")).unwrap().atime() == before {
            eprintln!("skipped: reads do not update access times on this filesystem");
            return;
        }
        fs::write(root.join("f"), b"read to send").unwrap();
        let before = old_atime("f");
        let p: RelPath = "f".parse().unwrap();
        let mut bytes = Vec::new();
        assert!(append_file(
            &root,
            &p,
            &file_entry(b"read to send"),
            &mut bytes
        ));
        let (mut file, _) = beneath::open_file(&root, &p).unwrap();
        file.read_to_end(&mut Vec::new()).unwrap();
        assert_eq!(fs::metadata(root.join("f")).unwrap().atime(), before);
        fs::remove_dir_all(&root).unwrap();
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

    #[test]
    fn walks_reuse_directories_only_while_a_guard_lives() {
        let root = tmp("reuse");
        fs::create_dir_all(root.join("a/b")).unwrap();
        let rel: RelPath = "a/b/f".parse().unwrap();
        let walk = || beneath::parent(&root, &rel, None).unwrap().0;
        assert!(!walk().is(&walk()), "reused with no guard");
        let kept = {
            let _reuse = beneath::Reuse::start();
            let first = walk();
            assert!(first.is(&walk()), "not reused under a guard");
            {
                let _inner = beneath::Reuse::start();
                assert!(
                    first.is(&walk()),
                    "an inner guard dropped what the outer kept"
                );
            }
            assert!(
                first.is(&walk()),
                "an inner guard's end dropped what the outer kept"
            );
            first
        };
        assert!(!kept.is(&walk()), "reused after the guard");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_directory_ferry_removes_or_renames_is_not_reused() {
        let root = tmp("reuse-moved");
        let _reuse = beneath::Reuse::start();
        let put = |rel: &str| {
            let t = tmp_path(&root);
            let e = file_entry(rel.as_bytes());
            let meta = write_unsynced(&t, rel.as_bytes(), &e).unwrap();
            let rel: RelPath = rel.parse().unwrap();
            let done = install_unsynced(&root, &meta, &t, &rel, &e, None);
            assert!(matches!(done, Ok(Install::Done { .. })), "{rel}: {done:?}");
        };
        // Removed, then made again by the next install: the new one is written.
        put("a/f");
        assert_eq!(
            remove(&root, &"a/f".parse().unwrap()).unwrap(),
            Removed::Gone
        );
        assert_eq!(remove(&root, &"a".parse().unwrap()).unwrap(), Removed::Gone);
        put("a/g");
        assert_eq!(fs::read(root.join("a/g")).unwrap(), b"a/g");
        // Renamed away: a file for its old path goes to a new directory there, not with it.
        put("b/x");
        rename_noreplace(&root, &"b".parse().unwrap(), &"c".parse().unwrap()).unwrap();
        put("b/y");
        assert_eq!(fs::read(root.join("b/y")).unwrap(), b"b/y");
        assert!(
            !root.join("c/y").exists(),
            "written into the renamed directory"
        );
        // Removed by someone else (a user's `rm -r`), then made again by ferry (the server
        // refused the delete): what goes in it goes in the new one.
        put("d/e/f");
        fs::remove_dir_all(root.join("d")).unwrap();
        make_dir(&root, &"d".parse().unwrap(), 0o755).unwrap();
        make_dir(&root, &"d/e".parse().unwrap(), 0o755).unwrap();
        put("d/e/g");
        assert_eq!(fs::read(root.join("d/e/g")).unwrap(), b"d/e/g");
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

    /// The directory at `rel` as a scan would have seen it.
    fn dir_seen_at(root: &Path, rel: &str) -> Seen {
        let mut seen = seen_at(root, rel);
        seen.entry.kind = Kind::Dir;
        seen.entry.size = 0;
        seen
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
    fn install_replaces_a_directory_only_if_it_was_seen() {
        let root = tmp("install-dir-race");
        let e = file_entry(b"remote");
        let rel: RelPath = "d".parse().unwrap();
        let fetched = || {
            let t = tmp_path(&root);
            (write_unsynced(&t, b"remote", &e).unwrap(), t)
        };

        // Seen as absent (a first sync does not look before it installs), but an empty
        // directory was made meanwhile: it stays, and so does the fetched file.
        fs::create_dir(root.join("d")).unwrap();
        let (meta, t) = fetched();
        let got = install_unsynced(&root, &meta, &t, &rel, &e, None).unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        assert!(root.join("d").is_dir());
        assert!(t.exists());

        // Seen as that directory (its children deleted for the server's file): replaced.
        let seen = dir_seen_at(&root, "d");
        let got = install_unsynced(&root, &meta, &t, &rel, &e, Some(&seen)).unwrap();
        assert!(matches!(got, Install::Done { .. }), "{got:?}");
        assert_eq!(fs::read(root.join("d")).unwrap(), b"remote");
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

    /// Every file and directory beneath `dir`, with its bytes or mode: to show nothing changed.
    fn listing(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            let bytes = if m.is_file() {
                fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            out.push((e.path(), bytes, m.mode()));
            if m.is_dir() {
                out.extend(listing(&e.path()));
            }
        }
        out.sort();
        out
    }

    /// The entry of a file holding `bytes` (for other modules' tests too).
    pub(crate) fn file_entry(bytes: &[u8]) -> Entry {
        Entry {
            kind: Kind::File,
            size: bytes.len() as u64,
            mtime_ns: 1_600_000_000_000_000_000,
            mode: 0o600,
            hash: *blake3::hash(bytes).as_bytes(),
        }
    }

    #[test]
    fn a_symlink_or_file_on_the_way_is_refused_at_every_level() {
        let root = tmp("in-the-way");
        let outside = tmp("in-the-way-outside");
        fs::create_dir(outside.join("sub")).unwrap();
        fs::write(outside.join("sub/keep"), "outside").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("real/link")).unwrap();
        fs::write(root.join("file"), "a file").unwrap();
        fs::write(root.join("here"), "here").unwrap();
        let before = listing(&outside);
        // (path, what the error names): a symlink as parent, as grandparent, deeper, and a
        // file as parent.
        for (rel, names) in [
            ("link/new", "link"),
            ("link/sub/new", "link"),
            ("link/sub/keep", "link"),
            ("real/link/sub/new", "real/link"),
            ("file/new", "file"),
        ] {
            let rel: RelPath = rel.parse().unwrap();
            let in_the_way = |what: &str, r: io::Result<()>| {
                let e = r.expect_err(&format!("{what} {rel} must be refused"));
                assert_eq!(
                    e.to_string(),
                    format!("{names} is not a directory (a symlink or file is in the way)"),
                    "{what} {rel}"
                );
            };
            let t = tmp_path(&root);
            fs::write(&t, b"evil").unwrap();
            let f = File::open(&t).unwrap();
            let r = install_file(&root, f, &t, &rel, &file_entry(b"evil"), None);
            in_the_way("install", r.map(drop));
            in_the_way("mkdir", make_dir(&root, &rel, 0o700).map(drop));
            in_the_way(
                "set_meta",
                set_meta(&root, &rel, &file_entry(b"")).map(drop),
            );
            in_the_way("remove", remove(&root, &rel).map(drop));
            let here: RelPath = "here".parse().unwrap();
            in_the_way("rename to", rename_noreplace(&root, &here, &rel).map(drop));
            in_the_way(
                "rename from",
                rename_noreplace(&root, &rel, &here).map(drop),
            );
            let r = keep_as_conflict(&root, &root.join("here"), &rel, "pi");
            in_the_way("conflict copy", r.map(drop));
            fs::remove_file(&t).unwrap();
        }
        assert_eq!(listing(&outside), before, "nothing outside changed");
        assert_eq!(fs::read(root.join("here")).unwrap(), b"here");
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn a_symlink_at_the_leaf_is_never_followed() {
        let root = tmp("leaf");
        let outside = tmp("leaf-outside");
        fs::write(outside.join("target"), "outside").unwrap();
        fs::set_permissions(outside.join("target"), Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(outside.join("target"), root.join("to-file")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("to-dir")).unwrap();
        let before = listing(&outside);
        let rel = |s: &str| -> RelPath { s.parse().unwrap() };

        let e = set_meta(&root, &rel("to-file"), &file_entry(b"outside")).unwrap_err();
        assert_eq!(e.to_string(), "to-file is a symlink");
        let e = set_meta(&root, &rel("to-dir"), &Entry::dir(0o700)).unwrap_err();
        assert_eq!(e.to_string(), "to-dir is a symlink");
        // A download for a path where a symlink stands replaces nothing.
        let t = tmp_path(&root);
        fs::write(&t, b"x").unwrap();
        let got = install_file(
            &root,
            File::open(&t).unwrap(),
            &t,
            &rel("to-file"),
            &file_entry(b"x"),
            None,
        )
        .unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        // Without read permission the mode is set by name, still not through a symlink.
        fs::write(root.join("locked"), "x").unwrap();
        fs::set_permissions(root.join("locked"), Permissions::from_mode(0o200)).unwrap();
        let seen = set_meta(&root, &rel("locked"), &file_entry(b"x")).unwrap();
        assert_eq!(seen.entry.mode, 0o600);
        let meta = fs::metadata(root.join("locked")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(mtime_ns(&meta), file_entry(b"x").mtime_ns);
        let e = make_dir(&root, &rel("to-dir"), 0o700).unwrap_err();
        assert_eq!(
            e.to_string(),
            "to-dir: a symlink or special file is in the way"
        );
        // Removing a symlink removes the link, not what it points to.
        assert_eq!(remove(&root, &rel("to-dir")).unwrap(), Removed::Gone);
        assert_eq!(remove(&root, &rel("to-file")).unwrap(), Removed::Gone);
        assert!(fs::symlink_metadata(root.join("to-file")).is_err());
        assert_eq!(listing(&outside), before, "nothing outside changed");
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn links_are_made_and_replaced_as_links() {
        let root = tmp("links");
        let outside = tmp("links-outside");
        fs::write(outside.join("target"), "outside").unwrap();
        let before = listing(&outside);
        let rel = |s: &str| -> RelPath { s.parse().unwrap() };
        let made = |r: io::Result<Install>| match r.unwrap() {
            Install::Done {
                installed: (seen, created),
                displaced: None,
            } => (seen, created),
            other => panic!("{other:?}"),
        };
        let target = outside.join("target");
        let target = target.to_str().unwrap();

        // New, with its parents; absolute, dangling and `..` targets are just text.
        let (seen, created) = made(make_link(&root, &rel("a/b/abs"), target, None));
        assert_eq!(seen.entry, Entry::link(target));
        assert_eq!(created.len(), 2);
        assert_eq!(
            fs::read_link(root.join("a/b/abs")).unwrap(),
            Path::new(target)
        );
        made(make_link(&root, &rel("dangling"), "../../nowhere", None));
        assert_eq!(
            fs::read_link(root.join("dangling")).unwrap(),
            Path::new("../../nowhere")
        );

        // A new target replaces the link, provided it is still the one seen.
        let (seen2, _) = made(make_link(&root, &rel("a/b/abs"), "elsewhere", Some(&seen)));
        assert_eq!(seen2.entry, Entry::link("elsewhere"));
        let got = make_link(&root, &rel("a/b/abs"), "third", Some(&seen)).unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        assert_eq!(
            fs::read_link(root.join("a/b/abs")).unwrap(),
            Path::new("elsewhere")
        );
        let got = make_link(&root, &rel("a/b/abs"), "third", None).unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");

        // A file becomes a link (and a link a file) when what was seen still stands there.
        fs::write(root.join("f"), "file").unwrap();
        let seen_f = seen_at(&root, "f");
        made(make_link(&root, &rel("f"), "to", Some(&seen_f)));
        assert_eq!(fs::read_link(root.join("f")).unwrap(), Path::new("to"));
        let t = tmp_path(&root);
        fs::write(&t, b"x").unwrap();
        let link_seen = Seen {
            entry: Entry::link("to"),
            ino: fs::symlink_metadata(root.join("f")).unwrap().ino(),
        };
        let got = install_file(
            &root,
            File::open(&t).unwrap(),
            &t,
            &rel("f"),
            &file_entry(b"x"),
            Some(&link_seen),
        )
        .unwrap();
        assert!(matches!(got, Install::Done { .. }), "{got:?}");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"x");

        // An empty directory gives way if it was seen (not if it is new to the caller);
        // nothing temporary is left behind.
        fs::create_dir(root.join("was-dir")).unwrap();
        let got = make_link(&root, &rel("was-dir"), "x", None).unwrap();
        assert!(matches!(got, Install::ChangedHere), "{got:?}");
        made(make_link(
            &root,
            &rel("was-dir"),
            "x",
            Some(&dir_seen_at(&root, "was-dir")),
        ));
        let names: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".#"))
            .collect();
        assert!(names.is_empty(), "{names:?}");
        assert_eq!(listing(&outside), before, "nothing outside changed");
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }

    /// The race the descriptors close: a directory swapped for a symlink after it was opened
    /// is still the one written to. Writing by path after a `symlink_metadata` check (what
    /// this module did before) would follow the new symlink here.
    #[test]
    fn a_directory_swapped_for_a_symlink_after_it_was_opened_is_still_the_one_written() {
        let root = tmp("swap");
        let outside = tmp("swap-outside");
        fs::create_dir(root.join("d")).unwrap();
        let rel: RelPath = "d/big".parse().unwrap();
        let (dir, name) = beneath::parent(&root, &rel, None).unwrap();
        let t = tmp_path(&root);
        fs::write(&t, b"bytes").unwrap();
        let (tmp_dir, tmp_name) = beneath::state_parent(&t).unwrap();
        // Swapped between the walk and the rename.
        fs::rename(root.join("d"), root.join("d.away")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        tmp_dir.rename(tmp_name, &dir, name).unwrap();
        assert_eq!(fs::read(root.join("d.away/big")).unwrap(), b"bytes");
        assert!(!outside.join("big").exists());
        // And the next walk refuses the symlink.
        let e = beneath::parent(&root, &rel, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotADirectory);
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
