//! Every kind of change, made on clients with either watcher and directly in the server's
//! tree, reaches every other tree.

use std::fs;

use super::util::*;

const THREE: &[(&str, Watch)] = &[("a", Watch::Auto), ("b", Watch::Poll), ("c", Watch::Auto)];

#[test]
fn file_and_directory_operations_propagate() {
    let cl = Cluster::start("ops", THREE);
    let (a, b, c, s) = (cl.root("a"), cl.root("b"), cl.root("c"), cl.server_root());

    // Create: a small file, an empty file, a multi-MB file, odd names, nested and empty dirs.
    let big = noise(5 << 20, 7);
    write(&a, "hello.txt", "hello from a\n");
    write(&a, "empty", "");
    write(&b, "big.bin", &big);
    write(&c, "name with spaces.txt", "spaces");
    write(&a, "ünï cødé 日本.txt", "unicode");
    fs::create_dir_all(a.join("deep/er/est")).unwrap();
    write(&b, "docs/x/y/z.md", "# nested");
    fs::create_dir_all(c.join("void")).unwrap();
    cl.wait_converged("creations reach every tree", |_| {
        has(&c, "hello.txt", b"hello from a\n")
            && has(&a, "big.bin", &big)
            && has(&s, "ünï cødé 日本.txt", b"unicode")
            && has(&b, "empty", b"")
            && has(&a, "docs/x/y/z.md", b"# nested")
            && b.join("void").is_dir()
            && c.join("deep/er/est").is_dir()
    });

    // Overwrite, append, truncate (shorter, then to zero).
    write(&b, "hello.txt", "rewritten by b");
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(c.join("name with spaces.txt"))
            .unwrap();
        f.write_all(b" + appended by c").unwrap();
    }
    fs::OpenOptions::new()
        .write(true)
        .open(a.join("big.bin"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    cl.wait_converged("overwrite, append and truncate reach every tree", |_| {
        has(&a, "hello.txt", b"rewritten by b")
            && has(&a, "name with spaces.txt", b"spaces + appended by c")
            && has(&b, "big.bin", &big[..1000])
    });
    fs::OpenOptions::new()
        .write(true)
        .open(b.join("big.bin"))
        .unwrap()
        .set_len(0)
        .unwrap();
    cl.wait_converged("truncation to zero reaches every tree", |_| {
        has(&c, "big.bin", b"")
    });

    // Renames: a file, a non-empty directory, a move into another directory.
    fs::rename(a.join("hello.txt"), a.join("renamed.txt")).unwrap();
    fs::rename(b.join("docs"), b.join("papers")).unwrap();
    fs::rename(c.join("empty"), c.join("deep/er/empty-moved")).unwrap();
    cl.wait_converged("renames reach every tree", |_| {
        has(&c, "renamed.txt", b"rewritten by b")
            && !c.join("hello.txt").exists()
            && has(&a, "papers/x/y/z.md", b"# nested")
            && !a.join("docs").exists()
            && has(&b, "deep/er/empty-moved", b"")
    });

    // Deletes: a file, an empty dir, a whole tree.
    fs::remove_file(c.join("renamed.txt")).unwrap();
    fs::remove_dir(a.join("void")).unwrap();
    fs::remove_dir_all(b.join("papers")).unwrap();
    cl.wait_converged("deletes reach every tree", |_| {
        !a.join("renamed.txt").exists() && !c.join("void").exists() && !c.join("papers").exists()
    });

    // Changes made directly in the server's tree by another program.
    write(&s, "from-server/notes.txt", "written on the NAS");
    write(&s, "ünï cødé 日本.txt", "edited on the NAS");
    fs::remove_dir_all(s.join("deep")).unwrap();
    cl.wait_converged("server-side edits reach every client", |_| {
        has(&b, "from-server/notes.txt", b"written on the NAS")
            && has(&c, "ünï cødé 日本.txt", b"edited on the NAS")
            && !a.join("deep").exists()
    });
}

#[test]
fn burst_of_500_files_converges() {
    let cl = Cluster::start("burst", THREE);
    let a = cl.root("a");
    for i in 0..500 {
        write(
            &a,
            &format!("burst/d{}/f{i:03}.txt", i % 5),
            format!("file {i}\n"),
        );
    }
    cl.wait_converged("all 500 files reach every tree", |cl| {
        cl.roots().iter().all(|r| {
            (0..500).all(|i| {
                has(
                    r,
                    &format!("burst/d{}/f{i:03}.txt", i % 5),
                    format!("file {i}\n").as_bytes(),
                )
            })
        })
    });
}

#[test]
fn first_contact_merges_both_sides_without_losing_anything() {
    let cl = Cluster::start_with("first", &[], |s| {
        write(s, "shared/same.txt", "same bytes");
        write(s, "shared/differs.txt", "server's version");
        write(s, "only-on-server.txt", "server");
    });
    let mut cl = cl;
    let dir = cl.dir.0.clone();
    // A client that already has a tree of its own joins.
    let root = dir.join("late");
    write(&root, "shared/same.txt", "same bytes");
    write(&root, "shared/differs.txt", "client's version");
    write(&root, "only-on-client.txt", "client");
    let log = dir.join("late.log");
    let _late = Proc::spawn(
        &[
            "client",
            "--server",
            cl.control(),
            "--root",
            root.to_str().unwrap(),
            "--secret-file",
            cl.secret().to_str().unwrap(),
            "--name",
            "late",
            "-v",
        ],
        &log,
    );
    let s = cl.server_root();
    wait_until(
        "both sides hold everything, the differing file once per version",
        || {
            let conflict = |r: &std::path::Path| {
                fs::read_dir(r.join("shared"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("differs.conflict-")
                            && n.ends_with("-late.txt")
                            && fs::read(e.path()).ok().as_deref() == Some(b"client's version")
                    })
            };
            snapshot(&s) == snapshot(&root)
                && has(&root, "only-on-server.txt", b"server")
                && has(&s, "only-on-client.txt", b"client")
                && has(&s, "shared/differs.txt", b"server's version")
                && conflict(&s)
        },
        || {
            format!(
                "{}\n{}",
                diff(&snapshot(&s), &snapshot(&root)),
                fs::read_to_string(&log).unwrap_or_default()
            )
        },
    );
    cl.kill_server();
}

#[test]
fn directory_renames_move_instead_of_transferring() {
    let cl = Cluster::start("dir-rename", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("photos/{}/img{i}.jpg", i % 3), noise(64 << 10, i)))
        .collect();
    for (p, bytes) in &files {
        write(&a, p, bytes);
    }
    cl.wait_converged("the photos are everywhere", |_| {
        files.iter().all(|(p, bytes)| has(&b, p, bytes))
    });

    // Renamed on a client, and then back on the other.
    fs::rename(a.join("photos"), a.join("album")).unwrap();
    cl.wait_converged("the rename reaches every tree", |_| {
        !b.join("photos").exists()
            && files
                .iter()
                .all(|(p, bytes)| has(&b, &p.replace("photos/", "album/"), bytes))
    });
    // b has not only moved the files but settled the rename (its applied seq is the
    // server's): a user moving things again before that is another test.
    cl.wait_recorded("b");
    fs::rename(b.join("album"), b.join("photos")).unwrap();
    cl.wait_converged("the rename back reaches every tree", |_| {
        !a.join("album").exists() && files.iter().all(|(p, bytes)| has(&a, p, bytes))
    });
    for agent in ["a", "b"] {
        let log = cl.log(agent);
        let moved_by_transfer: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("album/") && (l.contains("uploaded") || l.contains("transferred"))
            })
            .collect();
        assert!(
            moved_by_transfer.is_empty(),
            "{agent} transferred moved files: {moved_by_transfer:#?}"
        );
    }
    assert!(
        cl.log("a").contains("sent rename photos -> album"),
        "{}",
        cl.logs()
    );
    assert!(
        cl.log("b").contains("applied rename photos -> album"),
        "{}",
        cl.logs()
    );
}

/// A server change a client cannot apply (here something is in the way) is tried again until
/// it can be: the server sends each change once, so without a retry the client would differ
/// until a full listing. A client killed meanwhile asks for it again when it restarts.
#[test]
fn a_change_that_cannot_be_applied_here_is_tried_again() {
    // A FIFO is not synced, so the server never hears of it, and no directory can be made at
    // its name.
    let fifo = |path: &std::path::Path| {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    };
    let mut cl = Cluster::start_custom("unapplied", &[("a", Watch::Auto)], None, |dir| {
        fs::create_dir(dir.join("a")).unwrap();
        fifo(&dir.join("a/box"));
    });
    let (a, s) = (cl.root("a"), cl.server_root());
    let cannot_make = |cl: &Cluster, dir: &str| {
        let log = cl.log("a");
        log.contains(&format!("cannot create directory {dir}"))
            && log.contains(&format!("cannot put {dir}/inside.txt in place"))
    };

    // Tried again while the client runs.
    write(&s, "box/inside.txt", "made on the server");
    wait_until(
        "the client says it can make neither the directory nor its file",
        || cannot_make(&cl, "box"),
        || cl.logs(),
    );
    fs::remove_file(a.join("box")).unwrap();
    cl.wait_converged(
        "the directory and its file arrive once the way is clear",
        |_| has(&a, "box/inside.txt", b"made on the server"),
    );

    // Asked for again after a restart, though later changes were applied and journaled.
    fifo(&a.join("crate"));
    write(&s, "crate/inside.txt", "made on the server too");
    wait_until(
        "the client says it cannot make them either",
        || cannot_make(&cl, "crate"),
        || cl.logs(),
    );
    write(&s, "later.txt", "a later change");
    wait_until(
        "the later change arrives",
        || has(&a, "later.txt", b"a later change"),
        || cl.logs(),
    );
    // Once the change arrived, so the server's seq read there is at least the change's.
    cl.wait_recorded("a");
    cl.kill_client("a");
    fs::remove_file(a.join("crate")).unwrap();
    cl.start_client("a");
    cl.wait_converged(
        "the directory and its file arrive after the restart",
        |_| has(&a, "crate/inside.txt", b"made on the server too"),
    );
}
