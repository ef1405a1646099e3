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
