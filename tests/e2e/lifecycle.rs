//! Living with it: clean shutdown on SIGTERM/SIGINT, one-shot sync, the rate limit.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::util::*;

const BIG: u64 = 96 << 20;

/// Names under `root` (outside `.ferry`) other than `allowed`.
fn strays(root: &Path, allowed: &[&str]) -> Vec<String> {
    snapshot(root)
        .into_keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .collect()
}

#[test]
fn sigterm_mid_download_stops_cleanly_and_resumes() {
    let mut cl = Cluster::start_paced("sigterm-client", "b", "32M");
    let bytes = move_in_random(&cl, &cl.server_root(), "big", BIG);
    let tmp = cl.root("b").join(".ferry/tmp");
    wait_for("the download is under way", &mut cl, |_| {
        file_at_least(&tmp, 8 << 20)
    });

    cl.signal_client("b", Signal::SIGTERM);
    let status = wait_for("b exits", &mut cl, |cl| cl.client_exited("b"));
    assert!(status.success(), "b exited with {status}\n{}", cl.logs());
    assert!(cl.log("b").contains("stopped"), "{}", cl.log("b"));
    assert!(
        strays(&cl.root("b"), &[]).is_empty(),
        "partial file under a real name"
    );

    cl.start_client("b");
    cl.wait_converged("the file arrives after the restart", |cl| {
        has(&cl.root("b"), "big", &bytes)
    });
    assert!(
        cl.log("b").contains("resuming the download of big"),
        "{}",
        cl.log("b")
    );
}

#[test]
fn sigterm_mid_upload_stops_the_server_cleanly() {
    let mut cl = Cluster::start_paced("sigterm-server", "a", "32M");
    let bytes = move_in_random(&cl, &cl.root("a"), "big", BIG);
    let staging = cl.server_root().join(".ferry/staging");
    wait_for("the upload is under way", &mut cl, |_| {
        file_at_least(&staging, 8 << 20)
    });

    cl.signal_server(Signal::SIGINT);
    let status = wait_for("the server exits", &mut cl, |cl| cl.server_exited());
    assert!(
        status.success(),
        "the server exited with {status}\n{}",
        cl.logs()
    );
    assert!(cl.log("server").contains("stopped"), "{}", cl.log("server"));
    // The watcher goes down with the server: a clean stop, not an error.
    assert!(
        !cl.log("server").contains("the watcher stopped"),
        "{}",
        cl.log("server")
    );
    assert!(
        strays(&cl.server_root(), &[]).is_empty(),
        "partial file under a real name"
    );

    cl.start_server();
    cl.wait_converged("the file arrives after the restart", |cl| {
        has(&cl.server_root(), "big", &bytes)
    });
    assert!(
        cl.log("a").contains("resuming the upload of big"),
        "{}",
        cl.log("a")
    );
}

/// The client does not hash an upload as it reads it (the server does): it must still tell,
/// by the file's metadata, that the file was rewritten while it was sent, and send the new
/// version rather than commit the old entry for bytes that no longer match it.
#[test]
fn a_file_rewritten_mid_upload_arrives_as_last_written() {
    let mut cl = Cluster::start_paced("rewrite-mid-upload", "a", "32M");
    let mut bytes = move_in_random(&cl, &cl.root("a"), "big", BIG);
    let staging = cl.server_root().join(".ferry/staging");
    wait_for("the upload is under way", &mut cl, |_| {
        file_at_least(&staging, 8 << 20)
    });
    // In place, same size: only the metadata tells the client the bytes it sent changed.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(cl.root("a").join("big"))
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
    }
    bytes[1 << 20..(1 << 20) + 4096].fill(0x5a);
    cl.wait_converged("the rewritten file arrives", |cl| {
        has(&cl.server_root(), "big", &bytes)
    });
    let log = cl.log("a");
    assert!(log.contains("big changed while uploading"), "{log}");
    assert!(!log.contains("the server refused"), "{log}");
    assert!(
        strays(&cl.server_root(), &["big"]).is_empty(),
        "{}",
        cl.logs()
    );
}

/// Runs `ferry client --once` on `root` against the cluster's server (bounded in time);
/// returns its exit status, stdout and stderr.
fn run_once(
    cl: &Cluster,
    root: &Path,
    extra: &[&str],
) -> (std::process::ExitStatus, String, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(ferry())
        .args(["client", "--once", "--server", cl.control(), "--root"])
        .arg(root)
        .arg("--secret-file")
        .arg(cl.secret())
        .args(["--name", "oneshot"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("ferry client --once did not finish\n{}", cl.logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = child.wait_with_output().unwrap();
    (
        status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn once_syncs_both_ways_then_exits() {
    let mut cl = Cluster::start_with("once", &[], |srv| {
        for i in 0..20 {
            write(srv, &format!("docs/s{i}.txt"), format!("server file {i}"));
        }
    });
    let root = cl.dir.0.join("oneshot");
    write(&root, "photos/local.jpg", noise(200_000, 7));
    write(&root, "docs/s3.txt", "changed here before the first sync");

    let (status, out, err) = run_once(&cl, &root, &[]);
    assert!(status.success(), "{status}\nstdout: {out}\nstderr: {err}");
    assert!(out.contains("is in sync with"), "{out}");
    assert!(
        out.contains("1 conflicts") && out.contains("conflict copy: docs/s3.conflict-"),
        "{out}"
    );
    assert_eq!(
        snapshot(&cl.server_root()),
        snapshot(&root),
        "not converged when --once exited\n{}",
        diff(&snapshot(&cl.server_root()), &snapshot(&root))
    );
    assert!(has(
        &cl.server_root(),
        "photos/local.jpg",
        &noise(200_000, 7)
    ));

    // A second run has nothing to do; with the server gone it fails and says why.
    let (status, out, _) = run_once(&cl, &root, &[]);
    assert!(
        status.success() && out.contains("0 received") && out.contains("0 sent"),
        "{out}"
    );
    cl.kill_server();
    let (status, _, err) = run_once(&cl, &root, &[]);
    assert!(!status.success(), "--once succeeded with no server");
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn max_rate_bounds_transfer_speed() {
    const LEN: u64 = 12 << 20;
    let cl = Cluster::start_paced("max-rate", "b", "4M");
    let outside = cl.dir.0.join("file.outside");
    random_file(&outside, LEN);
    let bytes = std::fs::read(&outside).unwrap();
    let started = Instant::now();
    std::fs::rename(&outside, cl.server_root().join("file")).unwrap();
    cl.wait_converged("the file arrives", |cl| has(&cl.root("b"), "file", &bytes));
    // 12 MiB at 4 MiB/s is 3 s; a lower bound only (a slow machine takes longer, never less).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "12 MiB at --max-rate 4M took {took:?}"
    );
}

/// Runs `ferry status` with `args`: exit status, stdout, stderr.
fn status(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = std::process::Command::new(ferry())
        .arg("status")
        .args(args)
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(root: &Path) -> serde_json::Value {
    let (st, out, err) = status(&["--root", root.to_str().unwrap(), "--json"]);
    assert!(st.success(), "ferry status failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn status_reports_peers_transfers_and_conflicts() {
    let mut cl = Cluster::start("status", &[("a", Watch::Auto)]);
    cl.add_client_with("b", Watch::Auto, Vec::new(), &["--max-rate", "16M"]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "notes.txt", "first");
    cl.wait_converged("notes.txt is everywhere", |_| {
        has(&b, "notes.txt", b"first")
    });

    // A conflict made on b: both sides edit while b is stopped.
    cl.kill_client("b");
    write(&a, "notes.txt", "a's edit");
    write(&b, "notes.txt", "b's edit");
    wait_until(
        "the server has a's edit",
        || has(&cl.server_root(), "notes.txt", b"a's edit"),
        || cl.logs(),
    );
    cl.start_client("b");
    cl.wait_converged("the conflict is settled", |_| {
        has(&b, "notes.txt", b"a's edit")
    });

    // A transfer in flight.
    move_in_random(&cl, &cl.server_root(), "big", 64 << 20);
    let tmp = b.join(".ferry/tmp");
    wait_for("the download is under way", &mut cl, |_| {
        file_at_least(&tmp, 2 << 20)
    });
    let (st, text, err) = status(&["--root", b.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    for want in [
        "ferry client \"b\"",
        "connected for",
        "download big:",
        "notes.conflict-",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
    let json = status_json(&b);
    assert_eq!(json["role"], "client");
    assert_eq!(json["transfer"]["path"], "big");
    assert!(json["transfer"]["done"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["transfer"]["total"], 64 << 20);
    assert_eq!(json["peers"][0]["connected"], true);

    let server = status_json(&cl.server_root());
    assert_eq!(server["role"], "server");
    let names: Vec<&str> = server["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"a") && names.contains(&"b"), "{server}");

    cl.wait_converged("big arrives", |cl| cl.root("b").join("big").exists());
    wait_until(
        "b reports a finished sync",
        || {
            let j = status_json(&b);
            j["transfer"].is_null() && j["last_sync"].is_u64() && j["files"].as_u64() == Some(3)
        },
        || status(&["--root", b.to_str().unwrap()]).1,
    );
}

#[test]
fn status_without_an_agent_and_a_second_agent_are_refused() {
    let mut cl = Cluster::start("status-none", &[("a", Watch::Auto)]);
    let nobody = cl.dir.0.join("nobody");
    std::fs::create_dir_all(&nobody).unwrap();
    let (st, _, err) = status(&["--root", nobody.to_str().unwrap()]);
    assert!(!st.success(), "status succeeded with no agent");
    assert!(err.contains("no ferry agent is running"), "{err}");

    // A second client on a's tree stops before touching it.
    wait_until(
        "a is connected",
        || cl.log("a").contains("caught up"),
        || cl.logs(),
    );
    // A temporary file of a's, which a start clears: the second agent must not.
    let a_tmp = cl.root("a").join(".ferry/tmp/0123456789abcdef.part");
    std::fs::write(&a_tmp, b"a's").unwrap();
    let out = std::process::Command::new(ferry())
        .args(["client", "--server", cl.control(), "--root"])
        .arg(cl.root("a"))
        .arg("--secret-file")
        .arg(cl.secret())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another ferry agent is already running"),
        "{err}"
    );
    assert!(
        cl.client_exited("a").is_none(),
        "the first agent must keep running"
    );
    assert!(
        a_tmp.exists(),
        "the second agent cleared a's temporary files"
    );
}

#[test]
fn a_long_first_sync_reports_progress() {
    // 8 MiB at 2 MiB/s: about 4 s, past the 2 s a report waits for.
    let mut cl = Cluster::start_with("progress", &[], |srv| {
        for i in 0..8 {
            write(srv, &format!("f{i}.bin"), noise(1 << 20, i));
        }
    });
    cl.add_client_with("b", Watch::Auto, Vec::new(), &["--max-rate", "2M"]);
    cl.wait_converged("the first sync is done", |cl| {
        (0..8).all(|i| has(&cl.root("b"), &format!("f{i}.bin"), &noise(1 << 20, i)))
    });
    let log = cl.log("b");
    let line = log
        .lines()
        .find(|l| l.contains("catching up: "))
        .unwrap_or_else(|| panic!("no progress line in\n{log}"));
    assert!(
        line.contains(" of 8 changes, ") && line.contains(" of 8.0 MiB"),
        "{line}"
    );
}
