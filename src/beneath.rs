//! Paths resolved beneath a replica's root through directory file descriptors, never through a
//! symlink.
//!
//! Checking a path with `symlink_metadata` and then using it by name leaves a window: a
//! directory on the way swapped for a symlink in between redirects the use to wherever the
//! link points. Here each component is opened relative to the directory before it with
//! `O_NOFOLLOW`, and the final operation is made relative to the last directory's descriptor
//! (`renameat`, `mkdirat`, `unlinkat`, ...). A symlink or a file on the way fails the walk
//! (ELOOP, ENOTDIR); whatever happens to the names afterwards, the operation acts in the
//! directory that was opened, which is beneath the root.
//!
//! A component-by-component walk works on every Linux and Android kernel ferry runs on;
//! `openat2(RESOLVE_BENEATH)` would only save a few system calls. What costs is walking
//! again for every file of a batch: while a [`Reuse`] guard lives, walks on its thread start
//! from the directories recent walks opened (see there). Directories are opened with
//! `O_PATH`, which, like a walk by path, needs search permission only. The root itself is
//! opened by path and may be a symlink to the real tree: that is the user's choice, not
//! something a peer can plant.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::core::path::RelPath;

/// Whether `Dir::open_file` still asks for `O_NOATIME` (see there).
static NOATIME: AtomicBool = AtomicBool::new(true);

/// The few fields of a `stat` ferry looks at. From `fstatat` for a name in a directory: one
/// system call per entry, which is what a scan of a large tree costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `st_mode`: the kind and the permission bits.
    pub mode: u32,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes (a symlink's: its target's length).
    pub len: u64,
    /// Modification time in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time in nanoseconds since the epoch: unlike the mtime, nobody can set it,
    /// so a directory whose ctime has not moved has the same names (see `crate::scan`).
    pub ctime_ns: i64,
}

impl Stat {
    #[allow(clippy::unnecessary_cast)] // `mode_t` is narrower on some targets
    fn is(&self, kind: nix::libc::mode_t) -> bool {
        self.mode & nix::libc::S_IFMT as u32 == kind as u32
    }

    /// A directory.
    pub fn is_dir(&self) -> bool {
        self.is(nix::libc::S_IFDIR)
    }

    /// A regular file.
    pub fn is_file(&self) -> bool {
        self.is(nix::libc::S_IFREG)
    }

    /// A symlink.
    pub fn is_symlink(&self) -> bool {
        self.is(nix::libc::S_IFLNK)
    }

    /// The permission bits.
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

impl From<nix::sys::stat::FileStat> for Stat {
    #[allow(clippy::unnecessary_cast)] // the field types vary by target
    fn from(st: nix::sys::stat::FileStat) -> Stat {
        Stat {
            mode: st.st_mode as u32,
            ino: st.st_ino as u64,
            len: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
        }
    }
}

impl From<&Metadata> for Stat {
    fn from(m: &Metadata) -> Stat {
        use std::os::unix::fs::MetadataExt;
        Stat {
            mode: m.mode(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        }
    }
}

/// An open directory (an `O_PATH` descriptor): names are resolved relative to it. Cloning
/// shares the descriptor.
#[derive(Clone, Debug)]
pub struct Dir(Arc<OwnedFd>);

/// Opening a directory: `O_PATH` needs no read permission and follows nothing with `O_NOFOLLOW`.
fn dir_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Why a walk stopped: something that is not a directory stands at `prefix`.
fn in_the_way(prefix: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotADirectory,
        format!("{prefix} is not a directory (a symlink or file is in the way)"),
    )
}

/// True for the errors `O_NOFOLLOW | O_DIRECTORY` gives when a symlink or file is in the way.
fn not_a_dir(e: Errno) -> bool {
    matches!(e, Errno::ELOOP | Errno::ENOTDIR)
}

impl Dir {
    /// Opens a replica's root (following it if it is a symlink: see the module doc).
    pub fn root(root: &Path) -> io::Result<Dir> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        Ok(Dir(Arc::new(openat(AT_FDCWD, root, flags, Mode::empty())?)))
    }

    /// Opens a directory named by path: ferry's own state directories, never a peer's path.
    pub fn at_path(dir: &Path) -> io::Result<Dir> {
        reuse::by_path(dir)
    }

    /// Opens the subdirectory `name`; a symlink there fails with ELOOP or ENOTDIR.
    pub fn open_dir(&self, name: &str) -> nix::Result<Dir> {
        openat(&self.0, name, dir_flags(), Mode::empty()).map(|fd| Dir(Arc::new(fd)))
    }

    /// What `name` itself is (a symlink is reported as one, not followed).
    pub fn stat(&self, name: &str) -> io::Result<Stat> {
        use nix::sys::stat::fstatat;
        Ok(fstatat(&self.0, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?.into())
    }

    /// What this directory is.
    pub fn meta(&self) -> io::Result<Stat> {
        Ok(nix::sys::stat::fstat(&self.0)?.into())
    }

    /// Opens `name` for reading if it is a regular file, with its metadata (callers compare it
    /// with what they expect: one `fstat`, not two). `O_NOFOLLOW` refuses a symlink (ELOOP);
    /// `O_NONBLOCK` keeps a FIFO swapped in from blocking the open.
    ///
    /// Read with `O_NOATIME` while the kernel allows it: a file freshly written has an access
    /// time no newer than its mtime, so (`relatime`) its first read would dirty its inode, a
    /// write to the disk (a phone's flash) for every file scanned or sent. Only a file's owner
    /// may ask (EPERM otherwise): the first refusal turns it off for the rest of the run.
    pub fn open_file(&self, name: &str) -> io::Result<(File, Metadata)> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let noatime = NOATIME.load(Ordering::Relaxed);
        let first = if noatime {
            flags | OFlag::O_NOATIME
        } else {
            flags
        };
        let mut opened = openat(&self.0, name, first, Mode::empty());
        if noatime && matches!(opened, Err(Errno::EPERM)) {
            NOATIME.store(false, Ordering::Relaxed);
            opened = openat(&self.0, name, flags, Mode::empty());
        }
        let file = File::from(opened.map_err(|e| {
            if e == Errno::ELOOP {
                io::Error::other("a symlink (not followed)")
            } else {
                e.into()
            }
        })?);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok((file, meta))
    }

    /// Creates the regular file `name` for writing, with `mode` less the umask; anything there
    /// already (a symlink too) fails with `AlreadyExists`.
    pub fn create_file(&self, name: &str, mode: u32) -> io::Result<File> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        Ok(File::from(openat(
            &self.0,
            name,
            flags,
            Mode::from_bits_truncate(mode),
        )?))
    }

    /// Opens `name` (a file or a directory) so its mode and times can be set through the
    /// descriptor; a symlink there fails with ELOOP. Needs read permission: `None` without it.
    pub fn open_for_meta(&self, name: &str) -> io::Result<Option<File>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match openat(&self.0, name, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::EACCES) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets the mode of `name` without following a symlink there (for what `open_for_meta`
    /// cannot open). The C library refuses a symlink (EOPNOTSUPP).
    pub fn chmod_nofollow(&self, name: &str, mode: u32) -> io::Result<()> {
        use nix::sys::stat::{fchmodat, FchmodatFlags};
        let mode = Mode::from_bits_truncate(mode as nix::libc::mode_t);
        Ok(fchmodat(
            &self.0,
            name,
            mode,
            FchmodatFlags::NoFollowSymlink,
        )?)
    }

    /// Sets the mtime of `name` (its atime too: to the same value) without following a symlink.
    pub fn set_mtime_nofollow(&self, name: &str, mtime_ns: i64) -> io::Result<()> {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        let (secs, nanos) = (
            mtime_ns.div_euclid(1_000_000_000),
            mtime_ns.rem_euclid(1_000_000_000),
        );
        // time_t and the nanoseconds field are 32 bits on armv7: seconds beyond its range are
        // clamped rather than wrapped; nanoseconds always fit.
        #[allow(clippy::useless_conversion)] // same-type conversions where they are 64 bits
        let t = TimeSpec::new(
            secs.try_into()
                .unwrap_or_else(|_| (if secs < 0 { i32::MIN } else { i32::MAX }).into()),
            (nanos as i32).into(),
        );
        Ok(utimensat(
            &self.0,
            name,
            &t,
            &t,
            UtimensatFlags::NoFollowSymlink,
        )?)
    }

    /// The target of the symlink `name` (EINVAL if it is not one).
    pub fn read_link(&self, name: &str) -> io::Result<std::ffi::OsString> {
        Ok(nix::fcntl::readlinkat(&self.0, name)?)
    }

    /// Creates the symlink `name` pointing at `target` (never resolved: any text will do).
    pub fn symlink(&self, target: &str, name: &str) -> nix::Result<()> {
        nix::unistd::symlinkat(target, &self.0, name)
    }

    /// Creates the directory `name` (mode 0o777 less the umask, as `mkdir` does). A directory
    /// kept at that path (see [`Reuse`]) was removed by someone else meanwhile: forgotten, so
    /// what goes beneath the path goes into the new one.
    pub fn mkdir(&self, name: &str) -> nix::Result<()> {
        reuse::forget();
        nix::sys::stat::mkdirat(&self.0, name, Mode::from_bits_truncate(0o777))
    }

    /// Removes the non-directory `name` (a symlink itself, not what it points to).
    pub fn remove_file(&self, name: &str) -> io::Result<()> {
        Ok(nix::unistd::unlinkat(
            &self.0,
            name,
            UnlinkatFlags::NoRemoveDir,
        )?)
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &str) -> io::Result<()> {
        reuse::forget();
        Ok(nix::unistd::unlinkat(
            &self.0,
            name,
            UnlinkatFlags::RemoveDir,
        )?)
    }

    /// Renames `name` to `to_name` in `to`, replacing what is there (as `rename` does). For
    /// putting a file in place: unlike `rename_noreplace`, it leaves the directories a
    /// [`Reuse`] holds as they are, so it must not move a directory.
    pub fn rename(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        Ok(nix::fcntl::renameat(&self.0, name, &to.0, to_name)?)
    }

    /// Hard-links `name` as `to_name` in `to` (a symlink is linked itself, not followed).
    pub fn hard_link(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        Ok(nix::unistd::linkat(
            &self.0,
            name,
            &to.0,
            to_name,
            nix::fcntl::AtFlags::empty(),
        )?)
    }

    /// Renames `name` to `to_name` in `to`, failing with `AlreadyExists` rather than replacing
    /// anything there.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn rename_noreplace(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        reuse::forget();
        self.rename_file_noreplace(name, to, to_name)
    }

    /// `rename_noreplace` for a file (which no kept directory can be beneath). Filesystems
    /// without the flag (some FUSE ones) refuse it with `EINVAL`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn rename_file_noreplace(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        use nix::fcntl::{renameat2, RenameFlags};
        Ok(renameat2(
            &self.0,
            name,
            &to.0,
            to_name,
            RenameFlags::RENAME_NOREPLACE,
        )?)
    }

    /// Renames `name` to `to_name` in `to`, failing with `AlreadyExists` rather than replacing
    /// anything there. musl and bionic builds get no `renameat2` from nix, so: a file is
    /// hard-linked to the target (which refuses an existing one) and then unlinked; a
    /// directory, or a file on a filesystem without hard links (Android's shared storage), is
    /// checked for, then renamed.
    /// RACE: in the checked case, an entry created at the target in between is replaced if it
    /// is an empty directory (rename refuses files over directories and non-empty directories).
    /// Either way nothing leaves the two directories.
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn rename_noreplace(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        reuse::forget();
        if !self.stat(name)?.is_dir() {
            match self.hard_link(name, to, to_name) {
                Ok(()) => return self.remove_file(name),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
                Err(_) => {} // no hard links here: fall back to check-then-rename
            }
        }
        if to.stat(to_name).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{to_name} exists"),
            ));
        }
        self.rename(name, to, to_name)
    }

    /// Makes the entries of this directory durable (renames into it, creations).
    pub fn sync(&self) -> io::Result<()> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        File::from(openat(&self.0, ".", flags, Mode::empty())?).sync_all()
    }

    /// This directory opened for listing (`nix::dir`), so a walk reads the directory it holds
    /// rather than whatever a path names by then.
    pub fn list(&self) -> io::Result<nix::dir::Dir> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        Ok(nix::dir::Dir::from_fd(openat(
            &self.0,
            ".",
            flags,
            Mode::empty(),
        )?)?)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The directory that holds `rel`, opened beneath `root`, and `rel`'s last component. With
/// `created`, missing directories on the way are made and pushed there (parents first, with
/// their metadata); without it, a missing one is a `NotFound` error. A symlink or file on the
/// way is a `NotADirectory` error naming it.
pub fn parent<'a>(
    root: &Path,
    rel: &'a RelPath,
    created: Option<&mut Vec<(RelPath, Stat)>>,
) -> io::Result<(Dir, &'a str)> {
    let s = rel.as_str();
    let (dirs, name) = match s.rfind('/') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => ("", s),
    };
    if let Some(dir) = reuse::parent(root, dirs) {
        return Ok((dir, name));
    }
    let dir = walk(reuse::by_path(root)?, dirs, created)?;
    reuse::keep(root, dirs, &dir);
    Ok((dir, name))
}

/// Opens `dirs` (a relative path of directories; empty: `dir` itself) beneath `dir`, one
/// component at a time, as `parent` does.
fn walk(
    mut dir: Dir,
    dirs: &str,
    mut created: Option<&mut Vec<(RelPath, Stat)>>,
) -> io::Result<Dir> {
    if dirs.is_empty() {
        return Ok(dir);
    }
    let mut end = 0;
    for part in dirs.split('/') {
        end += part.len();
        let next = match (dir.open_dir(part), created.as_deref_mut()) {
            (Err(Errno::ENOENT), Some(created)) => {
                let made = match dir.mkdir(part) {
                    Ok(()) => true,
                    Err(Errno::EEXIST) => false, // made meanwhile: opened like any other
                    Err(e) => return Err(e.into()),
                };
                let next = dir.open_dir(part);
                if let (true, Ok(d)) = (made, &next) {
                    let path = RelPath::new(&dirs[..end]).map_err(io::Error::other)?;
                    created.push((path, d.meta()?));
                }
                next
            }
            (other, _) => other,
        };
        dir = match next {
            Ok(d) => d,
            Err(e) if not_a_dir(e) => return Err(in_the_way(&dirs[..end])),
            Err(e) => return Err(e.into()),
        };
        end += 1;
    }
    Ok(dir)
}

/// The directory that holds `path` (a file in ferry's state directory, named by path) and the
/// file's name.
pub fn state_parent(path: &Path) -> io::Result<(Dir, &str)> {
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| io::Error::other(format!("bad state file {}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok((Dir::at_path(dir)?, name))
}

/// Opens the regular file `rel` beneath `root` for reading, with its metadata, following no
/// symlink on the way or at the end: what feeds an upload is always a file in the tree.
pub fn open_file(root: &Path, rel: &RelPath) -> io::Result<(File, Metadata)> {
    let (dir, name) = parent(root, rel, None)?;
    dir.open_file(name)
}

/// The target of the symlink `rel` beneath `root` (its own text: nothing is followed), if it is
/// one and its target is UTF-8 (what can travel).
pub fn read_link(root: &Path, rel: &RelPath) -> io::Result<String> {
    let (dir, name) = parent(root, rel, None)?;
    dir.read_link(name)?
        .into_string()
        .map_err(|_| io::Error::other("the symlink's target is not UTF-8"))
}

/// Keeps the directories walks open for the length of a batch (see [`Reuse`]).
pub use reuse::Reuse;

mod reuse {
    use std::cell::{Cell, RefCell};
    use std::io;
    use std::marker::PhantomData;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use super::Dir;

    /// How long a kept directory is handed out: a bound on the window described at [`Reuse`].
    const FRESH: Duration = Duration::from_millis(250);

    /// Parent directories kept at once (a batch's files are mostly in a few directories).
    const PARENTS: usize = 8;

    /// While one lives, walks on its thread reuse the directories recent walks opened: the
    /// roots and state directories opened by path, and the last few parent directories
    /// reached. A batch of a thousand files in one directory then opens it once, not a
    /// thousand times (three times each: to look, to install, to see the watcher's echo).
    ///
    /// What that changes: a kept directory is the one that stood at its path when it was
    /// opened. Renamed or removed meanwhile by someone else, it is still the one acted in,
    /// wherever it went: the race every walk-then-act has, over a longer window. So the
    /// window is kept short: ferry's own removals, renames and creations of directories
    /// forget everything, a directory is kept at most [`FRESH`], and a guard spans one batch. Its
    /// thread only: a walk on another thread opens its own.
    #[derive(Debug)]
    pub struct Reuse {
        _this_thread: PhantomData<*const ()>,
    }

    struct Kept {
        since: Instant,
        by_path: Vec<(PathBuf, Dir)>,
        parents: Vec<(PathBuf, String, Dir)>,
    }

    thread_local! {
        static GUARDS: Cell<u32> = const { Cell::new(0) };
        static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
    }

    impl Reuse {
        /// Starts reusing (nested guards share the outer one's directories).
        pub fn start() -> Reuse {
            GUARDS.with(|g| g.set(g.get() + 1));
            Reuse {
                _this_thread: PhantomData,
            }
        }
    }

    impl Drop for Reuse {
        fn drop(&mut self) {
            let left = GUARDS.with(|g| {
                g.set(g.get() - 1);
                g.get()
            });
            if left == 0 {
                KEPT.with(|k| k.borrow_mut().take());
            }
        }
    }

    /// Runs `f` on the kept directories if a guard lives (dropping stale ones first).
    fn with_kept<T>(f: impl FnOnce(&mut Kept) -> Option<T>) -> Option<T> {
        if GUARDS.with(Cell::get) == 0 {
            return None;
        }
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            let kept = k.get_or_insert_with(|| Kept {
                since: Instant::now(),
                by_path: Vec::new(),
                parents: Vec::new(),
            });
            if kept.since.elapsed() > FRESH {
                kept.by_path.clear();
                kept.parents.clear();
                kept.since = Instant::now();
            }
            f(kept)
        })
    }

    /// The directory at `path` (a root or a state directory), opened by path.
    pub(super) fn by_path(path: &Path) -> io::Result<Dir> {
        let found = with_kept(|k| {
            k.by_path
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, d)| d.clone())
        });
        if let Some(dir) = found {
            return Ok(dir);
        }
        let dir = Dir::root(path)?;
        with_kept(|k| {
            k.by_path.push((path.to_path_buf(), dir.clone()));
            Some(())
        });
        Ok(dir)
    }

    /// The directory `dirs` beneath `root`, if a walk opened it lately.
    pub(super) fn parent(root: &Path, dirs: &str) -> Option<Dir> {
        with_kept(|k| {
            k.parents
                .iter()
                .find(|(r, d, _)| d == dirs && r == root)
                .map(|(_, _, dir)| dir.clone())
        })
    }

    /// Keeps `dir`, just walked to as `dirs` beneath `root`.
    pub(super) fn keep(root: &Path, dirs: &str, dir: &Dir) {
        if dirs.is_empty() {
            return; // the root itself: kept by path
        }
        with_kept(|k| {
            if k.parents.len() == PARENTS {
                k.parents.remove(0);
            }
            k.parents
                .push((root.to_path_buf(), dirs.to_string(), dir.clone()));
            Some(())
        });
    }

    /// Forgets every kept directory: one may have been renamed or removed.
    pub(super) fn forget() {
        with_kept(|k| {
            k.by_path.clear();
            k.parents.clear();
            Some(())
        });
    }
}

#[cfg(test)]
impl Dir {
    /// The same descriptor (a directory handed out again), not merely the same directory.
    pub fn is(&self, other: &Dir) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// True if `e` says `rel` is not in the tree: missing, or a symlink or file stands where one
/// of its directories should be.
pub fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}
