//! Durable state: a root that vanishes never turns into deletes; lost state directories and
//! a fresh server index reconcile in full without deleting or losing anything.

use std::time::Instant;

use super::util::*;

fn files(n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| (format!("d{}/f{i}.txt", i % 4), noise(100 + i, i as u64)))
        .collect()
}

fn all_have(cl: &Cluster, roots: &[std::path::PathBuf], set: &[(String, Vec<u8>)]) -> bool {
    let _ = cl;
    roots.iter().all(|r| set.iter().all(|(p, b)| has(r, p, b)))
}

/// Waits until `exited` reports an exit; returns whether it was a failure exit.
fn wait_exit(cl: &mut Cluster, what: &str, mut exited: impl FnMut(&mut Cluster) -> Option<bool>) {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(failed) = exited(cl) {
            assert!(failed, "{what} exited with success\n{}", cl.logs());
            return;
        }
        assert!(Instant::now() < end, "{what} did not stop\n{}", cl.logs());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Replaces `root` by an empty directory, as unmounting a disk leaves its mount point.
fn unmount_like(root: &std::path::Path) -> std::path::PathBuf {
    let gone = root.with_extension("unmounted");
    std::fs::rename(root, &gone).unwrap();
    std::fs::create_dir(root).unwrap();
    gone
}

#[test]
fn server_root_gone_stops_the_server_without_deletes() {
    let mut cl = Cluster::start(
        "root-gone-server",
        &[("a", Watch::Auto), ("b", Watch::Poll)],
    );
    let set = files(20);
    for (p, b) in &set {
        write(&cl.root("a"), p, b);
    }
    cl.wait_converged("the files are everywhere", |cl| {
        all_have(cl, &cl.roots(), &set)
    });

    let gone = unmount_like(&cl.server_root());
    wait_exit(&mut cl, "the server", |cl| {
        cl.server_exited().map(|s| !s.success())
    });
    let log = cl.log("server");
    assert!(
        log.contains("stopping rather than passing on deletes"),
        "the server says why it stopped\n{log}"
    );
    assert!(
        !log.contains("(delete)"),
        "the server recorded no delete\n{log}"
    );
    // Its clients notice the server is gone; their files are all still there.
    wait_until(
        "both clients lost the server",
        || {
            ["a", "b"]
                .iter()
                .all(|c| cl.log(c).contains("reconnecting in"))
        },
        || cl.logs(),
    );
    let clients = vec![cl.root("a"), cl.root("b"), gone];
    assert!(
        all_have(&cl, &clients, &set),
        "nothing was deleted\n{}",
        cl.logs()
    );
    for c in ["a", "b"] {
        assert!(
            !cl.log(c).contains("applied delete"),
            "{c} applied no delete"
        );
    }
}

#[test]
fn client_root_gone_stops_the_client_without_deletes() {
    let mut cl = Cluster::start(
        "root-gone-client",
        &[("a", Watch::Poll), ("b", Watch::Auto)],
    );
    let set = files(20);
    for (p, b) in &set {
        write(&cl.server_root(), p, b);
    }
    cl.wait_converged("the files are everywhere", |cl| {
        all_have(cl, &cl.roots(), &set)
    });

    let gone = unmount_like(&cl.root("a"));
    wait_exit(&mut cl, "client a", |cl| {
        cl.client_exited("a").map(|s| !s.success())
    });
    let log = cl.log("a");
    assert!(
        log.contains("stopping rather than passing on deletes"),
        "client a says why it stopped\n{log}"
    );
    let others = vec![cl.server_root(), cl.root("b"), gone];
    assert!(
        all_have(&cl, &others, &set),
        "nothing was deleted\n{}",
        cl.logs()
    );
    assert!(!cl.log("server").contains("(delete)"), "{}", cl.logs());
}

/// Files that only one side knows, after a state directory is lost, come back everywhere.
fn reconcile_after_lost_state(test: &str, lose: impl FnOnce(&mut Cluster)) {
    let mut cl = Cluster::start(test, &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let set = files(30);
    for (p, b) in &set {
        write(&cl.root("b"), p, b);
    }
    cl.wait_converged("the files are everywhere", |cl| {
        all_have(cl, &cl.roots(), &set)
    });
    lose(&mut cl);
    cl.wait_converged("a full reconciliation", |cl| {
        all_have(cl, &cl.roots(), &set)
            && cl.roots().iter().all(|r| {
                has(r, "only-on-a.txt", b"a")
                    && has(r, "only-on-server.txt", b"s")
                    && has(r, "removed-on-server-meanwhile.txt", b"still wanted")
            })
    });
    let log = cl.log("server");
    assert!(!log.contains("(delete)"), "server: {log}");
    for c in ["a", "b"] {
        let log = cl.log(c);
        assert!(!log.contains("applied delete"), "{c}: {log}");
        assert!(!log.contains("(delete)"), "{c}: {log}");
    }
}

#[test]
fn client_state_deleted_reconciles_in_full() {
    reconcile_after_lost_state("lost-client-state", |cl| {
        let (a, s) = (cl.root("a"), cl.server_root());
        write(&a, "removed-on-server-meanwhile.txt", "still wanted");
        cl.wait_converged("the doomed file is everywhere", |cl| {
            cl.roots()
                .iter()
                .all(|r| has(r, "removed-on-server-meanwhile.txt", b"still wanted"))
        });
        cl.kill_client("a");
        std::fs::remove_dir_all(a.join(".ferry")).unwrap();
        write(&a, "only-on-a.txt", "a");
        write(&s, "only-on-server.txt", "s");
        // a has no state to tell this delete from "never had it": it keeps its copy, which
        // then comes back (nothing lost; see README on lost state).
        let b = cl.root("b");
        std::fs::remove_file(b.join("removed-on-server-meanwhile.txt")).unwrap();
        wait_until(
            "the delete reached the server",
            || {
                cl.log("server")
                    .contains("committed removed-on-server-meanwhile.txt (delete)")
                    && cl
                        .log("b")
                        .contains("sent removed-on-server-meanwhile.txt (delete)")
            },
            || cl.logs(),
        );
        // From here on no delete may happen: forget the logs so far.
        for n in ["server", "a", "b"] {
            std::fs::write(cl.dir.0.join(format!("{n}.log")), "").unwrap();
        }
        cl.start_client("a");
    });
}

#[test]
fn fresh_server_index_reconciles_in_full() {
    reconcile_after_lost_state("lost-server-state", |cl| {
        let (a, s) = (cl.root("a"), cl.server_root());
        write(&a, "removed-on-server-meanwhile.txt", "still wanted");
        cl.wait_converged("the doomed file is everywhere", |cl| {
            cl.roots()
                .iter()
                .all(|r| has(r, "removed-on-server-meanwhile.txt", b"still wanted"))
        });
        cl.kill_server();
        // The index is lost; the TLS key is kept (a new key would be refused by the clients'
        // pins, which `security.rs` tests).
        for e in std::fs::read_dir(s.join(".ferry")).unwrap().flatten() {
            if e.file_name() != "tls" {
                let _ =
                    std::fs::remove_file(e.path()).or_else(|_| std::fs::remove_dir_all(e.path()));
            }
        }
        std::fs::remove_file(s.join("removed-on-server-meanwhile.txt")).unwrap();
        write(&s, "only-on-server.txt", "s");
        write(&a, "only-on-a.txt", "a");
        for n in ["server", "a", "b"] {
            std::fs::write(cl.dir.0.join(format!("{n}.log")), "").unwrap();
        }
        cl.start_server();
    });
}

#[test]
fn client_away_past_tombstone_retention_reconciles_without_deletes() {
    let mut cl = Cluster::start("tombstones", &[("a", Watch::Auto), ("b", Watch::Auto)]);
    let set = files(6);
    for (p, b) in &set {
        write(&cl.root("a"), p, b);
    }
    cl.wait_converged("the files are everywhere", |cl| {
        all_have(cl, &cl.roots(), &set)
    });

    // b is away while a deletes one file and adds another.
    cl.kill_client("b");
    let (gone, _) = &set[0];
    std::fs::remove_file(cl.root("a").join(gone)).unwrap();
    write(&cl.root("a"), "new.txt", b"made while b was away");
    // Acknowledged to a, too: a delete whose answer a never got is a's to send again.
    let sent = format!("sent {gone} (delete)");
    wait_until(
        "the server has a's changes",
        || cl.log("a").contains(&sent) && cl.server_root().join("new.txt").exists(),
        || cl.logs(),
    );

    // The server forgets every delete (retention 0): b is now further behind than any
    // tombstone reaches.
    cl.set_server_args(&["--max-tombstones", "0"]);
    cl.kill_server();
    cl.start_server();
    assert!(
        cl.log("server").contains("forgot 1 deletes"),
        "{}",
        cl.logs()
    );

    cl.start_client("b");
    // The documented rule: b reconciles in full, absence deletes nothing, so the file b
    // still has comes back to everyone.
    cl.wait_converged("b's copy of the deleted file is back everywhere", |cl| {
        cl.roots().iter().all(|r| {
            set.iter().all(|(p, bytes)| has(r, p, bytes))
                && has(r, "new.txt", b"made while b was away")
        })
    });
    let log = cl.log("b");
    assert!(log.contains("(full reconciliation)"), "{log}");
    assert!(!log.contains("applied delete"), "{log}");
}
