//! No echo loops: after a burst of changes on several clients converges, nothing more moves.

use std::time::Duration;

use super::util::*;

#[test]
fn idle_after_burst_makes_no_transfers() {
    let cl = Cluster::start(
        "echo",
        &[("a", Watch::Auto), ("b", Watch::Poll), ("c", Watch::Auto)],
    );
    let (a, b, c, s) = (cl.root("a"), cl.root("b"), cl.root("c"), cl.server_root());
    for i in 0..20 {
        write(&a, &format!("a/{i}.txt"), format!("a {i}"));
        write(&b, &format!("b/{i}.txt"), format!("b {i}"));
        write(&c, &format!("c/{i}.txt"), format!("c {i}"));
    }
    write(&s, "s.txt", "server");
    std::fs::rename(a.join("a/0.txt"), a.join("a/zero.txt")).unwrap();
    cl.wait_converged("the burst converges", |cl| {
        cl.roots().iter().all(|r| {
            has(r, "c/19.txt", b"c 19")
                && has(r, "a/zero.txt", b"a 0")
                && has(r, "s.txt", b"server")
        })
    });
    // Agents log a change just after making it, so let the logs settle first (bounded).
    let mut settled = cl.change_events();
    wait_until(
        "the logs settle",
        || {
            std::thread::sleep(Duration::from_millis(500));
            let now = cl.change_events();
            std::mem::replace(&mut settled, now) == now
        },
        || cl.logs(),
    );
    assert!(
        settled >= 61,
        "the burst was logged ({settled} change events)"
    );
    // This wait is an observation window: it asserts that nothing happens in it, so a timed
    // wait is the point, not a stand-in for synchronisation. It spans several poll intervals.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cl.change_events(),
        settled,
        "changes moved while idle (an echo)\n{}",
        cl.logs()
    );
    assert!(cl.converged());
}
