//! Nothing escapes a replica's root through a symlink: not one planted in a client's tree
//! where the server has a directory, and not one swapped in while a download is under way.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::util::*;

/// Every file beneath `dir` with its bytes, to show that nothing there changed.
pub(super) fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(contents(&e.path()));
        } else {
            out.push((e.path(), fs::read(e.path()).unwrap()));
        }
    }
    out.sort();
    out
}

/// Files beneath `root` (not through symlinks) holding what `outside` put in `<outside>/secret`.
pub(super) fn copies_of_secret(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(root).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(copies_of_secret(&e.path()));
        } else if t.is_file() && fs::read(e.path()).unwrap() == SECRET {
            out.push(e.path());
        }
    }
    out
}

const SECRET: &[u8] = b"not to be synced";

/// A directory outside every root, holding one file.
pub(super) fn outside(dir: &Path) -> PathBuf {
    let out = dir.join("outside");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("secret"), SECRET).unwrap();
    out
}

/// Each client's `link/` directory is replaced by a symlink `link -> <outside>` while the
/// client is down, and the server (where `link/` is still a real directory) gains `link/x`.
/// The catch-up at the next start brings `link/x` before the client sends anything: writing
/// it by path would put it in `<outside>`. The clients refuse, say so, and go on syncing.
#[test]
fn a_symlink_planted_in_a_client_tree_is_never_written_through() {
    let mut cl = Cluster::start("beneath-planted", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let outside_dir = outside(&cl.dir.0);
    let before = contents(&outside_dir);
    write(&cl.server_root(), "link/old", "old");
    cl.wait_converged("link/ is everywhere", |cl| {
        has(&cl.root("b"), "link/old", b"old")
    });
    for client in ["a", "b"] {
        cl.kill_client(client);
        let root = cl.root(client);
        fs::rename(root.join("link"), root.join("link.away")).unwrap();
        std::os::unix::fs::symlink(&outside_dir, root.join("link")).unwrap();
    }
    write(&cl.server_root(), "link/x", "from the server");
    for client in ["a", "b"] {
        cl.start_client(client);
    }
    let refusal =
        "cannot put link/x in place: link is not a directory (a symlink or file is in the way)";
    for client in ["a", "b"] {
        wait_until(
            &format!("{client} refuses to write through its symlink"),
            || cl.log(client).contains(refusal),
            || cl.logs(),
        );
    }
    // Sync goes on: a file from the server and one from a client travel.
    write(&cl.server_root(), "after.txt", "still syncing");
    write(&cl.root("a"), "from-a.txt", "a too");
    wait_until(
        "other files still sync",
        || {
            ["a", "b"]
                .iter()
                .all(|c| has(&cl.root(c), "after.txt", b"still syncing"))
                && has(&cl.server_root(), "from-a.txt", b"a too")
                && has(&cl.root("b"), "from-a.txt", b"a too")
        },
        || cl.logs(),
    );
    assert!(!outside_dir.join("x").exists(), "written through a symlink");
    assert_eq!(contents(&outside_dir), before, "something outside changed");
    // Nothing was read through the links either: the outside file reached no replica.
    for root in cl.roots() {
        assert_eq!(copies_of_secret(&root), Vec::<PathBuf>::new());
    }
}

/// A big download into `d/` is under way when the client's `d` is renamed away and a symlink
/// `d -> <outside>` takes its place; a hundred small files for `d/` queue up behind it. From
/// the moment the big download is complete until the client has logged what it did with it
/// and with half the small ones, the test keeps exchanging the two names
/// (`renameat2(RENAME_EXCHANGE)`), so `d` flips between the real directory and the symlink
/// while files are put in place.
///
/// Why this fails without resolution beneath the root: the old code checked each directory
/// on the way with `symlink_metadata`, then renamed by path. A symlink standing at `d` during
/// a whole install is refused by both, but with `d` flipping, the check can see the real
/// directory and the rename, a few system calls later, the symlink: the file lands in
/// `<outside>`. Run against the old code, this test found files in `<outside>` (the big one
/// in one run of three) every time. Through descriptors the rename goes into the directory
/// that was opened (beneath the root, wherever it is by then), or a symlink met on the walk
/// is refused: nothing can appear in `<outside>`.
#[test]
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn a_directory_swapped_for_a_symlink_mid_download_is_not_written_through() {
    const BIG: u64 = 64 << 20;
    const SMALL: usize = 100;
    // 64 MiB at 16 MiB/s: four seconds, long enough to swap the directory mid-download.
    let mut cl = Cluster::start_paced("beneath-swap", "a", "16M");
    let outside_dir = outside(&cl.dir.0);
    let before = contents(&outside_dir);
    let root = cl.root("a");
    write(&cl.server_root(), "d/small", "small");
    wait_until("a has d/", || has(&root, "d/small", b"small"), || cl.logs());
    move_in_random(&cl, &cl.server_root().join("d"), "big", BIG);
    let tmp = root.join(".ferry/tmp");
    wait_for("the download is under way", &mut cl, |_| {
        file_at_least(&tmp, 4 << 20)
    });
    // Small files queue up behind the big one: each install is one more chance for a race.
    for i in 0..SMALL {
        write(
            &cl.server_root(),
            &format!("d/s{i:03}"),
            format!("small {i}"),
        );
    }
    fs::rename(root.join("d"), root.join("d.away")).unwrap();
    std::os::unix::fs::symlink(&outside_dir, root.join("d")).unwrap();

    // Complete: seen at full size, or already put in place (or refused) before it was seen.
    let big_done = |log: &str| {
        log.contains("applied d/big (")
            || log.contains("cannot put d/big in place")
            || log.contains("d/big changed here while downloading")
    };
    wait_for("the download is complete", &mut cl, |cl| {
        file_at_least(&tmp, BIG).or_else(|| big_done(&cl.log("a")).then(PathBuf::new))
    });
    let flipping = AtomicBool::new(true);
    let flips = std::thread::scope(|scope| {
        let flipper = scope.spawn(|| {
            let mut flips = 0u64;
            while flipping.load(Ordering::Relaxed) {
                exchange(&root.join("d"), &root.join("d.away"));
                flips += 1;
            }
            flips
        });
        // Stops the flipper however the wait ends (a panic too: the scope joins it).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        let stop = Stop(&flipping);
        wait_until(
            "the client logs what it did with d/big and the small files",
            || {
                let log = cl.log("a");
                let done = |path: &str| {
                    log.contains(&format!("applied {path} ("))
                        || log.contains(&format!("cannot put {path} in place"))
                        || log.contains(&format!("{path} changed here while downloading"))
                };
                big_done(&log)
                    && (0..SMALL).filter(|i| done(&format!("d/s{i:03}"))).count() >= SMALL / 2
            },
            || cl.logs(),
        );
        drop(stop);
        flipper.join().unwrap()
    });
    if root.join("d").is_dir() && !root.join("d").is_symlink() {
        exchange(&root.join("d"), &root.join("d.away"));
    }
    assert!(root.join("d").is_symlink());
    assert_eq!(contents(&outside_dir), before, "written through a symlink");

    // The client goes on syncing.
    write(&cl.server_root(), "later.txt", "later");
    write(&root, "from-a.txt", "from a");
    wait_until(
        "other files still sync",
        || has(&root, "later.txt", b"later") && has(&cl.server_root(), "from-a.txt", b"from a"),
        || cl.logs(),
    );
    assert_eq!(contents(&outside_dir), before, "written through a symlink");
    eprintln!("{flips} flips while files were put in place");
}

/// Swaps the names `a` and `b` atomically.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exchange(a: &Path, b: &Path) {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE).unwrap();
}
