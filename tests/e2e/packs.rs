//! Small files travel in packs: many files in one FTP transfer and one commit round trip
//! (`CommitPack`), and fetched many at a time (`Fetch`). A pack is only a way to carry bytes:
//! each file in it is checked and committed as a single upload would be.

use std::fs;
use std::path::Path;

use ferry::core::entry::{Entry, Kind};
use ferry::data::DataConn;
use ferry::proto::auth::Secret;
use ferry::proto::codec::encode;
use ferry::proto::msg::{ClientMsg, Grant, Outcome, PackItem, ServerMsg, PACK_MAX_ITEMS};
use ferry::tls::Fingerprint;
use std::io::Write;

use super::hostile::{connect, handshake, recv, Conn};
use super::util::*;

/// Every file under `dir` (recursively), for checking nothing was left behind.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

#[test]
fn many_small_files_travel_in_packs_both_ways() {
    let cl = Cluster::start("packs", &[("a", Watch::Auto), ("b", Watch::Auto)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    // Made beside the tree and moved in at once: a burst, as a copy or an unpacked archive.
    let outside = cl.dir.0.join("outside");
    let body = |i: usize| noise(50 + i * 37 % 9000, i as u64);
    for i in 0..300 {
        write(&outside, &format!("batch/d{}/f{i}.txt", i % 10), body(i));
    }
    fs::rename(outside.join("batch"), a.join("batch")).unwrap();
    cl.wait_converged("300 small files are everywhere", |cl| {
        cl.roots()
            .iter()
            .all(|r| (0..300).all(|i| has(r, &format!("batch/d{}/f{i}.txt", i % 10), &body(i))))
    });
    // Its 11 new directories went as one row of commits, not one round trip each.
    assert!(
        cl.log("a")
            .contains("sending in a row 0 deletes and 11 new directories"),
        "a sent its new directories one by one\n{}",
        cl.log("a")
    );
    assert!(
        cl.log("a").contains("uploaded a pack of"),
        "a sent no pack\n{}",
        cl.log("a")
    );
    assert!(
        cl.log("b").contains("fetched a pack of"),
        "b fetched no pack\n{}",
        cl.log("b")
    );
    // And a burst of deletes goes as a row of commits, not one round trip each.
    fs::remove_dir_all(b.join("batch")).unwrap();
    cl.wait_converged("the deletes are everywhere", |cl| {
        cl.roots().iter().all(|r| !r.join("batch").exists())
    });
    assert!(
        cl.log("b").contains(" deletes and 0 new directories"),
        "b sent its deletes one by one\n{}",
        cl.log("b")
    );
    // Nothing is left behind: not the packs, not their parts, not a fetched file.
    let leftovers: Vec<String> = [
        cl.server_root().join(".ferry/staging"),
        a.join(".ferry/tmp"),
        b.join(".ferry/tmp"),
    ]
    .iter()
    .flat_map(|d| files_under(d))
    .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

/// A pack's files are created with their entry's mode, less the umask; a mode the umask
/// strips (group or other write) is set afterwards. Every mode arrives both ways.
#[test]
fn modes_travel_in_packs() {
    use std::os::unix::fs::PermissionsExt;
    let cl = Cluster::start("pack-modes", &[("a", Watch::Auto), ("b", Watch::Auto)]);
    let modes = [
        0o600, 0o640, 0o644, 0o664, 0o666, 0o700, 0o755, 0o775, 0o444, 0o400,
    ];
    let outside = cl.dir.0.join("outside");
    for (i, mode) in modes.iter().enumerate() {
        // Enough files that they travel in a pack, whatever the threshold.
        for j in 0..20 {
            let rel = format!("modes/m{mode:o}/f{j}");
            write(&outside, &rel, noise(100 + i + j, (i * 20 + j) as u64));
            let p = outside.join(&rel);
            fs::set_permissions(p, fs::Permissions::from_mode(*mode)).unwrap();
        }
    }
    fs::rename(outside.join("modes"), cl.root("a").join("modes")).unwrap();
    let all_modes = |r: &Path| {
        modes.iter().all(|mode| {
            (0..20).all(|j| {
                fs::metadata(r.join(format!("modes/m{mode:o}/f{j}")))
                    .is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
            })
        })
    };
    cl.wait_converged("every file has its mode everywhere", |cl| {
        cl.roots().iter().all(|r| all_modes(r))
    });
    assert!(
        cl.log("a").contains("uploaded a pack of"),
        "{}",
        cl.log("a")
    );
    assert!(cl.log("b").contains("fetched a pack of"), "{}", cl.log("b"));
}

/// An authenticated raw connection and what the server granted it.
fn session(cl: &Cluster) -> (Conn, Grant) {
    let mut s = connect(cl);
    let secret = Secret::load(cl.secret()).unwrap();
    let channel = cl.fingerprint().parse::<Fingerprint>().unwrap().0;
    match handshake(&mut s, &secret, &channel, "packer") {
        Some(ServerMsg::Welcome { grant, .. }) => (s, grant),
        other => panic!("not welcomed: {other:?}"),
    }
}

/// Uploads `bytes` as `name` to the session's staging area, as a client's data plane does.
fn upload(cl: &Cluster, grant: &Grant, name: &str, bytes: &[u8]) {
    let fp: Fingerprint = cl.fingerprint().parse().unwrap();
    let (tls, _) = ferry::tls::client_config(Some(fp));
    let addr = format!("127.0.0.1:{}", grant.ftp_port).parse().unwrap();
    smol::block_on(async {
        let mut data = DataConn::connect(
            addr,
            &grant.ftp_user,
            &grant.ftp_pass,
            &grant.staging,
            None,
            Some(tls),
        )
        .await
        .unwrap();
        data.upload_bytes(bytes, name).await.unwrap();
        data.quit().await;
    });
}

fn file_entry(bytes: &[u8]) -> Entry {
    Entry {
        kind: Kind::File,
        size: bytes.len() as u64,
        mtime_ns: 1_600_000_000_000_000_000,
        mode: 0o644,
        hash: *blake3::hash(bytes).as_bytes(),
    }
}

fn item(path: &str, entry: Entry) -> PackItem {
    PackItem {
        path: path.parse().unwrap(),
        entry,
        base: None,
    }
}

/// The outcomes of a `CommitPack` (skipping anything else the server sends first).
fn commit_pack(s: &mut Conn, id: u64, staged: &str, items: Vec<PackItem>) -> Vec<Outcome> {
    let msg = ClientMsg::CommitPack {
        id,
        staged: staged.into(),
        items,
    };
    s.write_all(&encode(&msg).unwrap()).unwrap();
    loop {
        match recv(s).unwrap() {
            ServerMsg::PackResult { id: got, outcomes } if got == id => return outcomes,
            _ => continue,
        }
    }
}

#[test]
fn a_pack_is_checked_file_by_file_and_a_bad_one_writes_nothing() {
    let cl = Cluster::start("packs-bad", &[("a", Watch::Auto)]);
    let srv = cl.server_root();
    let (mut s, grant) = session(&cl);
    let (one, two) = (noise(60, 1), noise(60, 2));

    // The files claim more bytes than the pack holds: every one is refused.
    upload(&cl, &grant, "pshort", &one);
    let outcomes = commit_pack(
        &mut s,
        1,
        "pshort",
        vec![item("x1", file_entry(&one)), item("x2", file_entry(&two))],
    );
    assert!(
        outcomes.len() == 2 && outcomes.iter().all(|o| matches!(o, Outcome::Failed { .. })),
        "{outcomes:?}"
    );
    assert!(!srv.join("x1").exists() && !srv.join("x2").exists());

    // Sizes that would overflow their sum (wrapping to the pack's length) are refused too.
    upload(&cl, &grant, "pwrap", &one[..1]);
    let huge = |size| Entry {
        size,
        ..file_entry(&one)
    };
    let outcomes = commit_pack(
        &mut s,
        7,
        "pwrap",
        vec![item("w1", huge(u64::MAX)), item("w2", huge(2))],
    );
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Failed { .. })),
        "{outcomes:?}"
    );

    // A pack with no such staged file, and one with a name no upload can have.
    for (id, name) in [(2, "pmissing"), (3, "../../escape")] {
        let outcomes = commit_pack(&mut s, id, name, vec![item("x3", file_entry(&one))]);
        assert!(
            matches!(outcomes[..], [Outcome::Failed { .. }]),
            "{name}: {outcomes:?}"
        );
    }

    // Sizes add up, but the second file's bytes are not what its entry says: the first is
    // committed, the second refused.
    let mut both = one.clone();
    both.extend_from_slice(&two);
    upload(&cl, &grant, "pmixed", &both);
    let outcomes = commit_pack(
        &mut s,
        4,
        "pmixed",
        vec![item("y1", file_entry(&one)), item("y2", file_entry(&one))],
    );
    assert!(
        matches!(outcomes[..], [Outcome::Done { .. }, Outcome::Failed { .. }]),
        "{outcomes:?}"
    );
    assert_eq!(fs::read(srv.join("y1")).unwrap(), one);
    assert!(!srv.join("y2").exists());
    let staged = files_under(&srv.join(".ferry/staging"));
    assert!(staged.is_empty(), "left in staging: {staged:?}");
    // The packs' files were split out into the state directory's tmp: none is left there.
    let split = files_under(&srv.join(".ferry/tmp"));
    assert!(split.is_empty(), "left in tmp: {split:?}");

    // A fetch of a file the server does not have: answered, nothing in the pack.
    let fetch = ClientMsg::Fetch {
        id: 5,
        items: vec![("nowhere".parse().unwrap(), file_entry(&one))],
    };
    s.write_all(&encode(&fetch).unwrap()).unwrap();
    let answer = loop {
        match recv(&mut s).unwrap() {
            m @ ServerMsg::Fetched { .. } => break m,
            _ => continue,
        }
    };
    assert!(
        matches!(&answer, ServerMsg::Fetched { id: 5, present, .. } if present == &[false]),
        "{answer:?}"
    );

    // The honest client got y1 all along.
    cl.wait_converged("y1 reached the client", |cl| has(&cl.root("a"), "y1", &one));

    // Too many files in one fetch: the connection is closed.
    let items = (0..=PACK_MAX_ITEMS)
        .map(|i| (format!("f{i}").parse().unwrap(), file_entry(&one)))
        .collect();
    s.write_all(&encode(&ClientMsg::Fetch { id: 6, items }).unwrap())
        .unwrap();
    let closed = (0..100).any(|_| recv(&mut s).is_err());
    assert!(closed, "the connection stayed open");
    assert!(cl.log("server").contains("a Fetch of 1025 files; closing"));
}

/// Empty files have no bytes to send, but each alone would still cost a data connection: a
/// first sync fetches them in packs like any small file.
#[test]
fn empty_files_are_fetched_in_packs() {
    let mut cl = Cluster::start_with("pack-empty", &[], |root| {
        for i in 0..40 {
            write(root, &format!("empty/e{i}"), b"");
        }
    });
    cl.add_client("b", Watch::Auto, Vec::new());
    cl.wait_converged("the empty files are on b", |cl| {
        (0..40).all(|i| has(&cl.root("b"), &format!("empty/e{i}"), b""))
    });
    assert!(
        cl.log("b").contains("fetched a pack of 40 files (0 bytes)"),
        "{}",
        cl.log("b")
    );
}
