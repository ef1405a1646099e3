//! Concurrent edits of one file on two clients: the server's version keeps the name, the other
//! is kept as exactly one conflict copy, everywhere.

use nix::sys::signal::Signal;

use super::util::*;

#[test]
fn concurrent_edits_keep_both_versions() {
    let cl = Cluster::start(
        "conflict",
        &[("a", Watch::Auto), ("b", Watch::Poll), ("c", Watch::Auto)],
    );
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "doc.txt", "original");
    cl.wait_converged("the original reaches every tree", |_| {
        has(&b, "doc.txt", b"original")
    });

    // Freeze b so its edit is guaranteed to race with a's.
    cl.signal_client("b", Signal::SIGSTOP);
    write(&a, "doc.txt", "a's edit");
    wait_until(
        "the server has a's edit",
        || has(&cl.server_root(), "doc.txt", b"a's edit"),
        || cl.logs(),
    );
    write(&b, "doc.txt", "b's edit, made while frozen");
    cl.signal_client("b", Signal::SIGCONT);

    let copies = |root: &std::path::Path| -> Vec<(String, Vec<u8>)> {
        std::fs::read_dir(root)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                (n.starts_with("doc.conflict-") && n.ends_with("-b.txt"))
                    .then(|| (n, std::fs::read(e.path()).unwrap()))
            })
            .collect()
    };
    cl.wait_converged("both versions are everywhere", |cl| {
        cl.roots()
            .iter()
            .all(|r| has(r, "doc.txt", b"a's edit") && copies(r).len() == 1)
    });
    let (name, bytes) = &copies(&cl.server_root())[0];
    assert_eq!(
        bytes, b"b's edit, made while frozen",
        "{name} holds b's version"
    );
}

/// A file made here while the server's file of that name downloads stops its install ("changed
/// here"); if it is then deleted before anything is sent, the client must still know what the
/// server has, or it takes "nothing here, nothing agreed" as in sync and the server's file
/// never arrives. Found by the random test.
#[test]
fn a_server_file_met_by_a_local_create_and_delete_mid_download_still_arrives() {
    const BIG: u64 = 32 << 20;
    // Seeded before the client starts, so both arrive in its catch-up, one after the other:
    // nothing is sent from here until it ends, which leaves time for the local delete.
    let mut cl = Cluster::start_with("changed-then-deleted", &[], |server| {
        random_file(&server.join("a-big"), BIG);
        random_file(&server.join("b-next"), 2 * BIG);
    });
    let big = read(&cl.server_root(), "a-big").unwrap();
    let next = read(&cl.server_root(), "b-next").unwrap();
    // 96 MiB at 16 MiB/s: about two seconds for a-big, four for b-next.
    cl.add_client_with("b", Watch::Auto, Vec::new(), &["--max-rate", "16M"]);
    let root = cl.root("b");
    wait_for("a-big's download is under way", &mut cl, |_| {
        file_at_least(&root.join(".ferry/tmp"), 4 << 20)
    });
    write(&root, "a-big", "made here");
    wait_until(
        "b finds a-big changed here",
        || cl.log("b").contains("a-big changed here while downloading"),
        || cl.logs(),
    );
    std::fs::remove_file(root.join("a-big")).unwrap();
    assert!(
        !cl.log("b").contains("caught up"),
        "the delete must come before the catch-up ends (b-next on its way)\n{}",
        cl.log("b")
    );
    cl.wait_converged("the server's files reach b", |cl| {
        has(&cl.root("b"), "a-big", &big) && has(&cl.root("b"), "b-next", &next)
    });
}
