//! After a first sync or a large copy, each agent moves its maps into fresh memory
//! (`tracked::repack`): what it then works from must be what it had.

use std::fs;

use super::util::*;

#[test]
fn agents_sync_on_after_repacking_their_maps() {
    // Past the 10,000 paths that make a repack worth it (`tracked::worth_repacking`): the
    // server repacks after its start's scan, the client after its first sync.
    let (dirs, per) = (60, 200);
    let name = |i: usize| format!("d{}/f{i}", i % dirs);
    let cl = Cluster::start_with("repack", &[("a", Watch::Auto)], |root| {
        for i in 0..dirs * per {
            write(root, &name(i), format!("file {i}"));
        }
    });
    let (a, server) = (cl.root("a"), cl.server_root());
    cl.wait_converged("the first sync is done", |_| {
        a.join(name(dirs * per - 1)).exists()
    });
    wait_until(
        "both agents repacked their maps",
        || cl.log("server").contains("repacked") && cl.log("a").contains("repacked"),
        || cl.logs(),
    );
    // Each kind of change, both ways, now goes through the repacked maps: an edit (the base
    // and the cache must still hold the file as synced, or this is a conflict), a new file, a
    // delete, a directory rename.
    write(&a, &name(1), "edited on the client");
    write(&server, &name(2), "edited on the server");
    write(&a, "new/on-client", "new");
    fs::remove_file(a.join(name(3))).unwrap();
    fs::rename(server.join("d4"), server.join("moved")).unwrap();
    cl.wait_converged("every change is everywhere", |_| {
        read(&server, &name(1)).as_deref() == Some(b"edited on the client".as_slice())
            && read(&a, &name(2)).as_deref() == Some(b"edited on the server".as_slice())
            && read(&server, "new/on-client").is_some()
            && read(&server, &name(3)).is_none()
            && a.join("moved").is_dir()
            && !a.join("d4").exists()
    });
    for agent in ["server", "a"] {
        let log = cl.log(agent);
        assert!(
            !log.contains("conflict"),
            "a repacked map lost a base\n{log}"
        );
    }
}
