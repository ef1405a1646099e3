//! Symlinks inside a tree travel as links (their target text) and are never followed: not to
//! read what they point to, not to write through them.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::beneath::{contents, copies_of_secret, outside};
use super::util::*;

/// True if `root/rel` is a symlink whose target text is `target`.
fn is_link(root: &Path, rel: &str, target: &Path) -> bool {
    let p = root.join(rel);
    fs::symlink_metadata(&p).is_ok_and(|m| m.is_symlink())
        && fs::read_link(&p).is_ok_and(|t| t == target)
}

/// Makes `root/rel` a symlink to `target` the way `ln -sfn` does: a new link under a temporary
/// name (one the built-in rules ignore), renamed over whatever is there.
fn relink(root: &Path, rel: &str, target: &Path) {
    let tmp = root.join(format!("{rel}~"));
    symlink(target, &tmp).unwrap();
    fs::rename(&tmp, root.join(rel)).unwrap();
}

/// Files of `<outside>` found as real files beneath `root` (not through symlinks): what a
/// replica would hold had a link been followed.
fn read_through(root: &Path) -> Vec<PathBuf> {
    let mut found = copies_of_secret(root);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in fs::read_dir(&dir).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                dirs.push(e.path());
            } else if t.is_file() && e.file_name() == "deeper" {
                found.push(e.path());
            }
        }
    }
    found
}

#[test]
fn links_travel_as_their_target_text_and_are_never_followed() {
    let cl = Cluster::start("links", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let outside_dir = outside(&cl.dir.0);
    fs::create_dir_all(outside_dir.join("sub")).unwrap();
    fs::write(outside_dir.join("sub/deeper"), "also outside").unwrap();
    let before = contents(&outside_dir);
    let a = cl.root("a");
    write(&a, "d/file.txt", "in the tree");
    let links: Vec<(&str, PathBuf)> = vec![
        // A directory outside every root, with files in it, by absolute path.
        ("out", outside_dir.clone()),
        ("d/rel", PathBuf::from("file.txt")),
        ("d/up", PathBuf::from("../../outside/sub")),
        ("dangling", PathBuf::from("does/not/exist")),
        ("to-d", PathBuf::from("d")),
    ];
    for (rel, target) in &links {
        symlink(target, a.join(rel)).unwrap();
    }
    cl.wait_converged("every link is everywhere, as a link", |cl| {
        cl.roots()
            .iter()
            .all(|r| links.iter().all(|(rel, t)| is_link(r, rel, t)))
    });
    for root in cl.roots() {
        assert_eq!(
            read_through(&root),
            Vec::<PathBuf>::new(),
            "read through a link"
        );
    }

    // A new target, a delete, a link turned into a file and a file into a link, a rename, and
    // a link made in the server's own tree.
    relink(&a, "out", Path::new("/nonexistent/elsewhere"));
    fs::remove_file(a.join("dangling")).unwrap();
    fs::remove_file(a.join("d/rel")).unwrap();
    write(&a, "d/rel", "a file now");
    let b = cl.root("b");
    fs::remove_file(b.join("d/file.txt")).unwrap();
    symlink("rel", b.join("d/file.txt")).unwrap();
    fs::rename(a.join("to-d"), a.join("to-d-renamed")).unwrap();
    symlink("server-made", cl.server_root().join("from-server")).unwrap();
    cl.wait_converged("the changes are everywhere", |cl| {
        cl.roots().iter().all(|r| {
            is_link(r, "out", Path::new("/nonexistent/elsewhere"))
                && fs::symlink_metadata(r.join("dangling")).is_err()
                && has(r, "d/rel", b"a file now")
                && is_link(r, "d/file.txt", Path::new("rel"))
                && is_link(r, "to-d-renamed", Path::new("d"))
                && fs::symlink_metadata(r.join("to-d")).is_err()
                && is_link(r, "from-server", Path::new("server-made"))
        })
    });
    assert!(
        cl.log("a").contains("sent rename to-d -> to-d-renamed"),
        "a link's rename travels as a rename\n{}",
        cl.logs()
    );
    assert_eq!(contents(&outside_dir), before, "something outside changed");
    for root in cl.roots() {
        assert_eq!(
            read_through(&root),
            Vec::<PathBuf>::new(),
            "read through a link"
        );
    }
}

/// A client starts with a symlink `link -> <outside>` where the server has a real directory
/// `link/` with a file in it: both changed differently, so it is a conflict. The client's
/// link is kept under a conflict name (still a link, synced as one), the server's directory
/// takes the name, and nothing is written into or read from `<outside>`.
#[test]
fn a_link_where_the_server_has_a_directory_is_a_conflict_not_a_way_out() {
    let mut outside_dir = PathBuf::new();
    let mut cl = Cluster::start_custom("links-conflict", &[], None, |dir| {
        outside_dir = outside(dir);
        write(&dir.join("server"), "link/x", "from the server");
        fs::create_dir_all(dir.join("a")).unwrap();
        symlink(&outside_dir, dir.join("a/link")).unwrap();
    });
    let before = contents(&outside_dir);
    cl.add_client("a", Watch::Auto, Vec::new());
    let copy = |root: &Path| -> Option<String> {
        fs::read_dir(root).ok()?.flatten().find_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with("link.conflict-").then_some(name)
        })
    };
    cl.wait_converged("the conflict is settled everywhere", |cl| {
        cl.roots().iter().all(|r| {
            has(r, "link/x", b"from the server")
                && copy(r).is_some_and(|c| is_link(r, &c, &outside_dir))
        })
    });
    assert!(cl.log("a").contains("conflict on link"), "{}", cl.log("a"));
    assert_eq!(contents(&outside_dir), before, "something outside changed");
    for root in cl.roots() {
        assert_eq!(
            copies_of_secret(&root),
            Vec::<PathBuf>::new(),
            "read through a link"
        );
    }
}

/// A commit of a link whose target cannot be one (empty, NUL, over 4096 bytes), or a put that
/// claims to be a link, is refused with the reason; nothing is created and the connection
/// stays usable.
#[test]
fn bad_link_commits_are_refused() {
    use ferry::core::entry::Entry;
    use ferry::proto::codec::encode;
    use ferry::proto::msg::{ClientMsg, Op, Outcome, ServerMsg};
    use std::io::Write;

    let cl = Cluster::start("links-hostile", &[]);
    let mut s = super::hostile::authenticated(&cl);
    let long = "x".repeat(4097);
    let commits: Vec<(&str, Op, &str)> = vec![
        (
            "empty",
            Op::Link {
                target: String::new(),
            },
            "empty symlink target",
        ),
        (
            "nul",
            Op::Link {
                target: "a\0b".into(),
            },
            "contains a NUL byte",
        ),
        ("long", Op::Link { target: long }, "longer than 4096 bytes"),
        (
            "put-link",
            Op::Put {
                staged: None,
                entry: Entry::link("/etc"),
            },
            "a put carries a file's entry",
        ),
    ];
    for (i, (path, op, why)) in commits.into_iter().enumerate() {
        let id = i as u64 + 1;
        let msg = ClientMsg::Commit {
            id,
            path: path.parse().unwrap(),
            op,
            base: None,
        };
        s.write_all(&encode(&msg).unwrap()).unwrap();
        let reason = loop {
            match super::hostile::recv(&mut s).unwrap() {
                ServerMsg::CommitResult {
                    id: got,
                    outcome: Outcome::Failed { reason },
                } if got == id => break reason,
                ServerMsg::CommitResult { outcome, .. } => panic!("{path}: {outcome:?}"),
                _ => continue, // pings
            }
        };
        assert!(reason.contains(why), "{path}: {reason}");
        assert!(fs::symlink_metadata(cl.server_root().join(path)).is_err());
    }
    // A good one on the same connection is accepted.
    let msg = ClientMsg::Commit {
        id: 99,
        path: "good".parse().unwrap(),
        op: Op::Link {
            target: "../anything/at all".into(),
        },
        base: None,
    };
    s.write_all(&encode(&msg).unwrap()).unwrap();
    wait_until(
        "the good link is made",
        || is_link(&cl.server_root(), "good", Path::new("../anything/at all")),
        || cl.logs(),
    );
}
