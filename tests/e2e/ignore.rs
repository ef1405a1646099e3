//! Ignore rules: `.ferryignore` files (gitignore syntax, synced like any file) and the built-in
//! list keep paths on their replica, on the sending and on the receiving side; rules changed at
//! run time take effect without a restart, and ignoring never deletes anything.
//!
//! Trees differ on purpose here, so these tests check paths one by one. To show that something
//! did not travel, each waits for a marker written after it to arrive first.

use std::io::Write;
use std::path::Path;

use ferry::proto::codec::encode;
use ferry::proto::msg::{ClientMsg, Op, Outcome, ServerMsg};

use super::hostile::{authenticated, recv};
use super::util::*;

const TWO: &[(&str, Watch)] = &[("a", Watch::Auto), ("b", Watch::Poll)];

/// Asserts that none of `paths` exists under `root`.
#[track_caller]
fn absent(cl: &Cluster, root: &Path, paths: &[&str]) {
    for p in paths {
        assert!(
            !root.join(p).exists(),
            "{p} reached {}\n{}",
            root.display(),
            cl.logs()
        );
    }
}

/// Waits until every root in `roots` holds `rel` with `bytes`.
fn wait_everywhere(cl: &Cluster, roots: &[&Path], rel: &str, bytes: &[u8]) {
    wait_until(
        &format!("{rel} reaches every tree"),
        || roots.iter().all(|r| has(r, rel, bytes)),
        || cl.logs(),
    );
}

#[test]
fn ferryignore_keeps_matching_files_on_their_replica() {
    let cl = Cluster::start("ignore-files", TWO);
    let (a, b, s) = (cl.root("a"), cl.root("b"), cl.server_root());
    let all = [s.as_path(), a.as_path(), b.as_path()];

    write(&a, ".ferryignore", "# build output\n*.log\nbuild/\n");
    wait_everywhere(
        &cl,
        &all,
        ".ferryignore",
        b"# build output\n*.log\nbuild/\n",
    );

    // Ignored on a client, and in the server's own tree.
    write(&a, "app.log", "client log");
    write(&a, "src/debug.log", "client log");
    write(&a, "build/out.bin", "client build");
    write(&s, "server.log", "server log");
    write(&s, "build/server.o", "server build");
    write(&s, "docs/deep/trace.log", "server log");
    // Markers, written after them: once these are everywhere, the rest would have been too.
    write(&a, "src/main.rs", "fn main() {}");
    write(&s, "docs/readme.txt", "from the server");
    wait_everywhere(&cl, &all, "src/main.rs", b"fn main() {}");
    wait_everywhere(&cl, &all, "docs/readme.txt", b"from the server");

    absent(&cl, &s, &["app.log", "src/debug.log", "build/out.bin"]);
    absent(
        &cl,
        &b,
        &["app.log", "src/debug.log", "build", "server.log"],
    );
    absent(&cl, &b, &["docs/deep/trace.log"]);
    absent(
        &cl,
        &a,
        &["server.log", "build/server.o", "docs/deep/trace.log"],
    );
    // Nothing was deleted where it was written.
    assert!(has(&a, "build/out.bin", b"client build"));
    assert!(has(&s, "build/server.o", b"server build"));

    // Edits to ignored files stay put too; edits to the rest still travel.
    write(&s, "server.log", "server log, more");
    write(&a, "app.log", "client log, more");
    write(&a, "src/main.rs", "fn main() { edited }");
    write(&s, "docs/readme.txt", "edited on the server");
    wait_everywhere(&cl, &all, "src/main.rs", b"fn main() { edited }");
    wait_everywhere(&cl, &all, "docs/readme.txt", b"edited on the server");
    absent(&cl, &b, &["app.log", "server.log"]);
    absent(&cl, &a, &["server.log"]);
}

#[test]
fn built_in_ignores_never_leave_their_replica() {
    let cl = Cluster::start("ignore-builtin", TWO);
    let (a, b, s) = (cl.root("a"), cl.root("b"), cl.server_root());
    let all = [s.as_path(), a.as_path(), b.as_path()];
    write(&a, ".notes.txt.swp", "vim swap");
    write(&a, "photos/.DS_Store", "finder");
    write(&a, "report.odt~", "backup");
    write(&b, "photos/Thumbs.db", "explorer");
    write(&b, ".~lock.report.odt#", "libreoffice");
    write(&s, ".#notes.org", "emacs lock");
    write(&s, "photos/desktop.ini", "explorer");
    write(&a, "notes.txt", "the real thing");
    write(&b, "photos/cat.jpg", "meow");
    write(&s, "agenda.org", "from the server");
    wait_everywhere(&cl, &all, "notes.txt", b"the real thing");
    wait_everywhere(&cl, &all, "photos/cat.jpg", b"meow");
    wait_everywhere(&cl, &all, "agenda.org", b"from the server");
    for (root, own) in [
        (&s, &[".#notes.org", "photos/desktop.ini"][..]),
        (
            &a,
            &[".notes.txt.swp", "photos/.DS_Store", "report.odt~"][..],
        ),
        (&b, &["photos/Thumbs.db", ".~lock.report.odt#"][..]),
    ] {
        let others: Vec<&str> = [
            ".notes.txt.swp",
            "photos/.DS_Store",
            "report.odt~",
            "photos/Thumbs.db",
            ".~lock.report.odt#",
            ".#notes.org",
            "photos/desktop.ini",
        ]
        .into_iter()
        .filter(|p| !own.contains(p))
        .collect();
        absent(&cl, root, &others);
        for p in own {
            assert!(root.join(p).exists(), "{p} was removed from its replica");
        }
    }
}

#[test]
fn rules_changed_at_run_time_take_effect_without_a_restart() {
    let cl = Cluster::start("ignore-runtime", TWO);
    let (a, b, s) = (cl.root("a"), cl.root("b"), cl.server_root());
    let all = [s.as_path(), a.as_path(), b.as_path()];
    write(&a, "data.log", "v1");
    write(&a, "logs/old.log", "v1");
    write(&a, "keep.txt", "v1");
    cl.wait_converged("the files reach every tree", |_| {
        has(&b, "data.log", b"v1") && has(&b, "logs/old.log", b"v1") && has(&s, "keep.txt", b"v1")
    });

    // A pattern is added on the poll client: the files it matches stay everywhere...
    write(&b, ".ferryignore", "*.log\n");
    wait_everywhere(&cl, &all, ".ferryignore", b"*.log\n");
    write(&a, "marker-1", "1");
    wait_everywhere(&cl, &all, "marker-1", b"1");
    for root in all {
        assert!(
            has(root, "data.log", b"v1"),
            "ignoring deleted data.log in {}",
            root.display()
        );
        assert!(has(root, "logs/old.log", b"v1"));
    }
    // ...and later changes to them stay local.
    write(&a, "data.log", "v2, edited on a while ignored");
    write(&s, "logs/old.log", "v2, edited on the server while ignored");
    write(&a, "fresh.log", "made on a while ignored");
    std::fs::remove_file(b.join("logs/old.log")).unwrap();
    write(&a, "keep.txt", "v2");
    write(&s, "marker-2", "2");
    wait_everywhere(&cl, &all, "keep.txt", b"v2");
    wait_everywhere(&cl, &all, "marker-2", b"2");
    assert!(has(&s, "data.log", b"v1") && has(&b, "data.log", b"v1"));
    assert!(
        has(&a, "logs/old.log", b"v1"),
        "neither the edit nor the delete travelled"
    );
    assert!(!b.join("logs/old.log").exists());
    absent(&cl, &s, &["fresh.log"]);
    absent(&cl, &b, &["fresh.log"]);

    // The pattern goes (deleted on a): what changed meanwhile is picked up, no restart.
    std::fs::remove_file(a.join(".ferryignore")).unwrap();
    wait_everywhere(&cl, &all, "fresh.log", b"made on a while ignored");
    wait_everywhere(&cl, &all, "data.log", b"v2, edited on a while ignored");
    // old.log: edited on the server, deleted on b while ignored: the edit wins, as it does
    // when a delete meets an edit.
    wait_everywhere(
        &cl,
        &all,
        "logs/old.log",
        b"v2, edited on the server while ignored",
    );
    cl.wait_converged("every tree is the same again", |_| {
        !s.join(".ferryignore").exists()
    });
}

#[test]
fn a_client_does_not_apply_changes_its_rules_ignore() {
    let mut cl = Cluster::start("ignore-receive", &[("a", Watch::Auto)]);
    let (a, s) = (cl.root("a"), cl.server_root());
    write(&s, "logs/app.log", "server log");
    write(&s, "x.txt", "x");
    wait_everywhere(&cl, &[&a], "logs/app.log", b"server log");
    wait_everywhere(&cl, &[&a], "x.txt", b"x");

    // A client whose tree holds a rule the server has not seen yet: the server's change for
    // the path it ignores arrives in its catch-up, and is not applied.
    let late = cl.dir.0.join("late");
    write(&late, ".ferryignore", "*.log\n");
    cl.add_client("late", Watch::Auto, Vec::new());
    wait_everywhere(&cl, &[&late], "x.txt", b"x");
    wait_everywhere(&cl, &[&s, &a], ".ferryignore", b"*.log\n");
    absent(&cl, &late, &["logs/app.log"]);
    assert!(
        has(&s, "logs/app.log", b"server log"),
        "nothing deleted on the server"
    );
    assert!(
        has(&a, "logs/app.log", b"server log"),
        "nothing deleted on a"
    );

    // The rule has reached the server: a file made there now stays there.
    write(&s, "logs/new.log", "new server log");
    write(&s, "marker", "m");
    wait_everywhere(&cl, &[&a, &late], "marker", b"m");
    absent(&cl, &a, &["logs/new.log"]);
    absent(&cl, &late, &["logs/new.log", "logs/app.log"]);
}

#[test]
fn the_server_refuses_commits_for_paths_it_ignores() {
    let cl = Cluster::start_with("ignore-refuse", &[("a", Watch::Auto)], |s| {
        write(s, ".ferryignore", "*.log\n");
        write(s, "kept.log", "server log");
    });
    let (a, s) = (cl.root("a"), cl.server_root());
    wait_everywhere(&cl, &[&a], ".ferryignore", b"*.log\n");

    // A client that disagrees about the rules (here a raw one) is told why, and nothing moves.
    let commits = [
        ("junk.log", Op::Mkdir { mode: 0o755 }),
        ("kept.log", Op::Delete),
        ("notes.swp", Op::Mkdir { mode: 0o755 }),
    ];
    let mut conn = authenticated(&cl);
    for (i, (path, op)) in commits.into_iter().enumerate() {
        let id = i as u64 + 1;
        conn.write_all(
            &encode(&ClientMsg::Commit {
                id,
                path: path.parse().unwrap(),
                op,
                base: None,
            })
            .unwrap(),
        )
        .unwrap();
        let outcome = loop {
            match recv(&mut conn).unwrap() {
                ServerMsg::CommitResult { id: got, outcome } if got == id => break outcome,
                _ => {}
            }
        };
        match outcome {
            Outcome::Failed { reason } => assert!(
                reason.contains(path) && reason.contains("ignored"),
                "{path}: {reason}"
            ),
            other => panic!("{path}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!s.join("junk.log").exists() && !s.join("notes.swp").exists());
    assert!(has(&s, "kept.log", b"server log"));
    absent(&cl, &a, &["kept.log", "junk.log", "notes.swp"]);
}
