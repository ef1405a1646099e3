//! kill -9 in the middle of work: a big upload, a big download, a burst of small files. After
//! restarts every tree is identical, nothing written is missing, no temporary or partial file
//! shows under a real name, and a broken big transfer resumes instead of starting over.

use std::collections::BTreeSet;
use std::path::Path;

use super::util::*;

const BIG: u64 = 256 << 20;
/// How much of the big file must have crossed before the kill.
const PART: u64 = 32 << 20;
/// Slow enough that the kill lands mid-transfer, fast enough to finish in seconds.
const RATE: &str = "64M";

/// The number in `log` right after the last occurrence of `prefix`.
fn last_number_after(log: &str, prefix: &str) -> Option<u64> {
    let at = log.rfind(prefix)? + prefix.len();
    let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Exactly these paths (and their directories) and nothing else, in every tree.
fn assert_exactly(cl: &Cluster, files: &[String]) {
    let want: BTreeSet<String> = files
        .iter()
        .flat_map(|f| {
            let mut parts: Vec<String> = Vec::new();
            let mut at = String::new();
            for c in f.split('/') {
                if !at.is_empty() {
                    at.push('/');
                }
                at.push_str(c);
                parts.push(at.clone());
            }
            parts
        })
        .collect();
    for root in cl.roots() {
        let got: BTreeSet<String> = snapshot(&root).into_keys().collect();
        assert_eq!(got, want, "{}: unexpected or missing names", root.display());
    }
}

#[test]
fn server_killed_mid_upload_resumes_it() {
    let mut cl = Cluster::start_paced("crash-upload", "a", RATE);
    let bytes = move_in_random(&cl, &cl.root("a"), "big", BIG);

    let staging = cl.server_root().join(".ferry/staging");
    wait_for("part of the upload is staged", &mut cl, |_| {
        file_at_least(&staging, PART)
    });
    cl.kill_server();
    cl.start_server();

    cl.wait_converged("the big file is on the server", |cl| {
        has(&cl.server_root(), "big", &bytes)
    });
    assert_exactly(&cl, &["big".to_string()]);
    let log = cl.log("a");
    let resumed_at = last_number_after(&log, "resuming the upload of big at byte ")
        .unwrap_or_else(|| panic!("the upload did not resume\n{log}"));
    assert!(resumed_at >= PART, "resumed at byte {resumed_at}");
    let sent = last_number_after(&log, "uploaded big: ").expect("the upload finished");
    assert_eq!(sent, BIG - resumed_at, "bytes sent after the restart");
}

#[test]
fn client_killed_mid_download_resumes_it() {
    let mut cl = Cluster::start_paced("crash-download", "b", RATE);
    let bytes = move_in_random(&cl, &cl.server_root(), "big", BIG);

    let tmp = cl.root("b").join(".ferry/tmp");
    wait_for(
        "part of the download is in b's state directory",
        &mut cl,
        |_| file_at_least(&tmp, PART),
    );
    cl.kill_client("b");
    assert!(
        !cl.root("b").join("big").exists(),
        "a partial download is visible under its real name"
    );
    cl.start_client("b");

    cl.wait_converged("the big file is on b", |cl| {
        has(&cl.root("b"), "big", &bytes)
    });
    assert_exactly(&cl, &["big".to_string()]);
    let log = cl.log("b");
    let resumed_at = last_number_after(&log, "resuming the download of big at byte ")
        .unwrap_or_else(|| panic!("the download did not resume\n{log}"));
    assert!(resumed_at >= PART, "resumed at byte {resumed_at}");
    let got = last_number_after(&log, &format!("applied big ({BIG} bytes, "))
        .expect("the download finished");
    assert_eq!(got, BIG - resumed_at, "bytes received after the restart");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "leftovers in b's temporary directory"
    );
}

/// 1,000 small files in 10 directories, each with its own bytes.
fn burst() -> Vec<(String, Vec<u8>)> {
    (0..1000)
        .map(|i| {
            (
                format!("burst/d{}/f{i}.dat", i % 10),
                noise(200 + i % 700, i as u64),
            )
        })
        .collect()
}

/// How many of the burst's files `root` holds with the right bytes.
fn count(root: &Path, set: &[(String, Vec<u8>)]) -> usize {
    set.iter().filter(|(p, b)| has(root, p, b)).count()
}

/// Writes the burst into `a`, waits until `victim_has` of them reached the victim, runs
/// `kill`, checks the kill landed mid-burst, runs `restart`, and checks that every tree ends
/// with exactly the burst.
fn burst_with_kill(
    cl: &mut Cluster,
    victim: &Path,
    kill: impl FnOnce(&mut Cluster),
    restart: impl FnOnce(&mut Cluster),
) {
    let set = burst();
    // Written over a fifth of a second or so, as a program saving files would, so the burst
    // travels in several packs rather than one the victim might take whole before the kill.
    for (i, (p, b)) in set.iter().enumerate() {
        write(&cl.root("a"), p, b);
        if i % 50 == 49 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    let at_kill = wait_for("some of the burst arrived", cl, |_| {
        let n = count(victim, &set);
        (n >= 100).then_some(n)
    });
    kill(cl);
    let after_kill = count(victim, &set);
    assert!(
        after_kill < set.len(),
        "the kill came after the burst had arrived ({at_kill} files then)"
    );
    restart(cl);
    cl.wait_converged("every tree has the whole burst", |cl| {
        cl.roots().iter().all(|r| count(r, &set) == set.len())
    });
    let names: Vec<String> = set.into_iter().map(|(p, _)| p).collect();
    assert_exactly(cl, &names);
}

#[test]
fn server_killed_during_a_burst_loses_nothing() {
    let mut cl = Cluster::start("crash-burst-server", &[("b", Watch::Poll)]);
    // The sender paced (the burst is about 550 KB), so the server is still receiving at the kill.
    cl.add_client_with("a", Watch::Auto, Vec::new(), &["--max-rate", "100K"]);
    let server = cl.server_root();
    burst_with_kill(
        &mut cl,
        &server,
        Cluster::kill_server,
        Cluster::start_server,
    );
}

#[test]
fn clients_killed_during_a_burst_lose_nothing() {
    // The sender and a receiver die together: the sender finds what it had not sent from its
    // journal and a scan; the receiver finishes from the seq it had reached.
    let mut cl = Cluster::start("crash-burst-clients", &[("a", Watch::Auto)]);
    // The receiver paced (the burst is about 550 KB), so it is still receiving at the kill.
    cl.add_client_with("b", Watch::Auto, Vec::new(), &["--max-rate", "100K"]);
    let b = cl.root("b");
    burst_with_kill(
        &mut cl,
        &b,
        |cl| {
            cl.kill_client("a");
            cl.kill_client("b");
        },
        |cl| {
            cl.start_client("a");
            cl.start_client("b");
        },
    );
}
