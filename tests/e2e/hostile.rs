//! A hostile peer speaking raw frames: each bad input is refused with a clear log line, its
//! connection is closed, nothing is written outside the root, and honest clients keep syncing.

use ferry::proto::auth::{random, Secret};
use ferry::proto::codec::encode;
use ferry::proto::msg::{
    ClientMsg, Op, ProbeTarget, ServerMsg, CATCH_UP_WINDOW, CHANGES_PER_FRAME, PROTOCOL_VERSION,
};
use ferry::tls::Fingerprint;
use std::io::{Read, Write};
use std::net::TcpStream;

use super::util::*;

/// A TLS connection to the server, trusting its certificate as an honest client would.
pub(super) type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A plain TCP connection to the server (which expects TLS on it).
fn connect_raw(cl: &Cluster) -> TcpStream {
    let s = TcpStream::connect(cl.control()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// A TLS connection, handshake done, nothing sent yet.
pub(super) fn connect(cl: &Cluster) -> Conn {
    let fp: Fingerprint = cl.fingerprint().parse().unwrap();
    let (config, _) = ferry::tls::client_config(Some(fp));
    let name = ferry::tls::SERVER_NAME.try_into().unwrap();
    let tls = rustls::ClientConnection::new(config, name).unwrap();
    let mut s = rustls::StreamOwned::new(tls, connect_raw(cl));
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).unwrap();
    }
    s
}

pub(super) fn recv(s: &mut impl Read) -> std::io::Result<ServerMsg> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    postcard::from_bytes(&buf).map_err(std::io::Error::other)
}

/// Says Hello as `name` and answers the Challenge with `secret`'s proof for `channel` (the
/// certificate's fingerprint; zeros in plaintext). Returns the server's answer to the proof,
/// `None` if it closed the connection or sent something else before that.
pub(super) fn handshake(
    s: &mut (impl Read + Write),
    secret: &Secret,
    channel: &[u8; 32],
    name: &str,
) -> Option<ServerMsg> {
    let nonce = random::<32>();
    let hello = ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        name: name.into(),
        id: [7; 16],
        nonce,
    };
    s.write_all(&encode(&hello).unwrap()).ok()?;
    let Ok(ServerMsg::Challenge { nonce: sn, .. }) = recv(s) else {
        return None;
    };
    let proof = secret.client_proof(channel, &sn, &nonce, name);
    s.write_all(&encode(&ClientMsg::Auth { proof }).unwrap())
        .ok()?;
    recv(s).ok()
}

/// Authenticates over TLS as a client named "hostile" with the right secret.
pub(super) fn authenticated(cl: &Cluster) -> Conn {
    let mut s = connect(cl);
    let secret = Secret::load(cl.secret()).unwrap();
    let channel = cl.fingerprint().parse::<Fingerprint>().unwrap().0;
    let answer = handshake(&mut s, &secret, &channel, "hostile");
    assert!(
        matches!(answer, Some(ServerMsg::Welcome { .. })),
        "{answer:?}"
    );
    s
}

/// True once the server has closed `s` (reads hit end of stream or an error).
fn closed(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue, // pings or other frames before the close
        }
    }
}

/// A commit frame whose path bytes are replaced by `evil` after encoding (a real client cannot
/// build such a path: `RelPath` refuses it).
fn commit_with_path(evil: &[u8]) -> Vec<u8> {
    let placeholder: String = "p".repeat(evil.len());
    let mut f = encode(&ClientMsg::Commit {
        id: 1,
        path: placeholder.parse().unwrap(),
        op: Op::Delete,
        base: None,
    })
    .unwrap();
    let at = f
        .windows(evil.len())
        .position(|w| w == placeholder.as_bytes())
        .unwrap();
    f[at..at + evil.len()].copy_from_slice(evil);
    f
}

#[test]
fn hostile_frames_are_refused_and_honest_clients_keep_syncing() {
    let cl = Cluster::start("hostile", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    let outside = cl.dir.0.clone();

    // Before TLS: plaintext where TLS is expected.
    let mut s = connect_raw(&cl);
    s.write_all(&encode(&ClientMsg::Ping).unwrap()).unwrap();
    assert!(closed(&mut s), "plaintext closes the connection");

    // Before authentication: garbage, an oversized length, a wrong secret.
    let mut s = connect(&cl);
    s.write_all(&[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .unwrap();
    assert!(closed(&mut s), "garbage closes the connection");
    let mut s = connect(&cl);
    s.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
    assert!(closed(&mut s), "an oversized frame closes the connection");
    let mut s = connect(&cl);
    s.write_all(
        &encode(&ClientMsg::Hello {
            version: PROTOCOL_VERSION + 1,
            name: "x".into(),
            id: [7; 16],
            nonce: [0; 32],
        })
        .unwrap(),
    )
    .unwrap();
    assert!(
        matches!(recv(&mut s), Ok(ServerMsg::Refused { .. })),
        "an unknown version is refused"
    );
    // Out of order before authentication: Auth where Hello belongs.
    let mut s = connect(&cl);
    s.write_all(&encode(&ClientMsg::Auth { proof: [0; 32] }).unwrap())
        .unwrap();
    assert!(closed(&mut s), "Auth before Hello closes the connection");

    // After authentication: hostile paths, each on its own connection.
    let evil: &[&[u8]] = &[
        b"../x",
        b"/etc/passwd",
        b"a/../../escaped",
        b"a\r\nDELE x",
        b"a\0b",
        b".ferry/server.journal",
    ];
    for path in evil {
        let mut s = authenticated(&cl);
        s.write_all(&commit_with_path(path)).unwrap();
        assert!(
            closed(&mut s),
            "a commit for {path:?} closes the connection"
        );
    }
    // An oversized frame and an out-of-order Hello after authentication.
    let mut s = authenticated(&cl);
    s.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
    assert!(closed(&mut s));
    let mut s = authenticated(&cl);
    s.write_all(
        &encode(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: "again".into(),
            id: [7; 16],
            nonce: [0; 32],
        })
        .unwrap(),
    )
    .unwrap();
    assert!(closed(&mut s));
    // A second Subscribe: each asks for a whole listing, so only one is allowed.
    let mut s = authenticated(&cl);
    let subscribe = encode(&ClientMsg::Subscribe { epoch: 0, since: 0 }).unwrap();
    s.write_all(&subscribe).unwrap();
    s.write_all(&subscribe).unwrap();
    assert!(closed(&mut s), "a second Subscribe closes the connection");

    let log = std::fs::read_to_string(cl.dir.0.join("server.log")).unwrap();
    for needle in [
        "refused path \"../x\"",
        "refused path \"/etc/passwd\"",
        "refused path \"a\\r\\nDELE x\"",
        "exceeds the limit",
        "unexpected Hello",
        "expected Hello as the first frame",
        "a second Subscribe",
    ] {
        assert!(
            log.contains(needle),
            "the server log names the problem ({needle})\n{log}"
        );
    }
    assert!(
        !outside.join("x").exists() && !outside.join("escaped").exists(),
        "nothing written outside the root"
    );
    assert!(
        cl.server_root().join(".ferry/server.snap").exists(),
        "state untouched"
    );

    // Honest clients were never disturbed.
    write(&a, "still-syncing.txt", "yes");
    cl.wait_converged("honest clients keep syncing", |_| {
        has(&b, "still-syncing.txt", b"yes")
    });
}

/// A process's resident memory now and at its peak (VmRSS, VmHWM in /proc/PID/status), in KiB.
fn memory_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_flood_of_tiny_frames_is_absorbed_and_honest_clients_keep_syncing() {
    // A million keepalives (5 bytes each): legal after authentication, and nothing to do for
    // the server but read them, so only how it queues them can cost memory.
    const PINGS: usize = 1_000_000;
    const PER_WRITE: usize = 10_000;
    // Far above what the server needs (a few MiB), far below a million queued messages.
    const MAX_GROWTH_KIB: u64 = 64 * 1024;

    let cl = Cluster::start("flood", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "before.txt", "up");
    cl.wait_converged("both clients are syncing", |_| has(&b, "before.txt", b"up"));
    // Idle authenticated connections: a server with many clients spends more on each message
    // it handles, while reading a frame costs the same.
    let idle: Vec<Conn> = (0..40).map(|_| authenticated(&cl)).collect();
    let pid = cl.server_pid();
    let (_, peak_before) = memory_kib(pid);

    let mut s = authenticated(&cl);
    let pings = encode(&ClientMsg::Ping).unwrap().repeat(PER_WRITE);
    // Answered only once every ping before it has been handled (frames are handled in order).
    let probe = encode(&ClientMsg::Probe {
        id: 99,
        target: ProbeTarget::Staged("flood-end".into()),
        len: 0,
    })
    .unwrap();
    let flood = std::thread::spawn(move || {
        for _ in 0..PINGS / PER_WRITE {
            s.write_all(&pings).unwrap();
        }
        s.write_all(&probe).unwrap();
        s
    });

    // Meanwhile the honest clients keep converging.
    write(&a, "during-flood.txt", "yes");
    write(&b, "from-b.txt", "also");
    cl.wait_converged("honest clients converge during the flood", |_| {
        has(&b, "during-flood.txt", b"yes") && has(&a, "from-b.txt", b"also")
    });

    let mut s = flood.join().expect("the flood was accepted");
    let mut answered = false;
    for _ in 0..100 {
        match recv(&mut s) {
            Ok(ServerMsg::Probed { id: 99, .. }) => {
                answered = true;
                break;
            }
            Ok(_) => continue, // keepalives
            Err(e) => panic!("the flooding connection broke: {e}\n{}", cl.logs()),
        }
    }
    assert!(answered, "the server answers after the flood");
    let (rss, peak) = memory_kib(pid);
    assert!(
        peak.saturating_sub(peak_before) < MAX_GROWTH_KIB,
        "the server's memory grew with the flood: peak {peak} KiB (before {peak_before} KiB, \
         now {rss} KiB)"
    );
    eprintln!(
        "server memory: peak {peak_before} KiB before the flood, {peak} KiB after, {rss} KiB now"
    );

    drop(idle);
    write(&a, "after-flood.txt", "still");
    cl.wait_converged("honest clients converge after the flood", |_| {
        has(&b, "after-flood.txt", b"still")
    });
}

#[test]
fn a_peer_that_never_reads_its_answers_is_closed() {
    // Deletes of ignored names (`*.swp`): each is refused at once, with a reason naming the
    // path. The peer never reads, so the answers can only pile up on the server.
    const COMMITS: u64 = 300_000;
    const PER_WRITE: u64 = 1_000;

    let cl = Cluster::start("unread", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "before.txt", "up");
    cl.wait_converged("both clients are syncing", |_| has(&b, "before.txt", b"up"));
    let pid = cl.server_pid();
    let (_, peak_before) = memory_kib(pid);

    let mut s = authenticated(&cl);
    let flood = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < COMMITS {
            let batch: Vec<u8> = (sent..sent + PER_WRITE)
                .flat_map(|i| {
                    encode(&ClientMsg::Commit {
                        id: i,
                        path: format!("{}-{i}.swp", "x".repeat(240)).parse().unwrap(),
                        op: Op::Delete,
                        base: None,
                    })
                    .unwrap()
                })
                .collect();
            if s.write_all(&batch).is_err() {
                return (sent, s); // the server closed the connection
            }
            sent += PER_WRITE;
        }
        (sent, s)
    });

    write(&a, "during-flood.txt", "yes");
    cl.wait_converged("honest clients converge during the flood", |_| {
        has(&b, "during-flood.txt", b"yes")
    });
    let (sent, mut s) = flood.join().unwrap();
    let (rss, peak) = memory_kib(pid);
    eprintln!("{sent} commits sent; server memory: peak {peak_before} KiB before, {peak} KiB after, {rss} KiB now");
    assert!(
        peak.saturating_sub(peak_before) < 48 * 1024,
        "the server's memory grew with the unread answers: peak {peak} KiB (before \
         {peak_before} KiB, now {rss} KiB)"
    );
    wait_until(
        "the server closes the connection that does not read",
        || cl.log("server").contains("does not read its answers"),
        || cl.logs(),
    );
    assert!(closed(&mut s));
    write(&b, "after-flood.txt", "still");
    cl.wait_converged("honest clients converge after the flood", |_| {
        has(&a, "after-flood.txt", b"still")
    });
}

/// Reads frames up to the answer to probe `id`, skipping keepalives: how many `Changes`
/// frames came before it, with how many changes, and whether a `CaughtUp` came.
fn frames_before_probed(s: &mut impl Read, id: u64) -> (usize, usize, bool) {
    let (mut frames, mut changes, mut caught_up) = (0, 0, false);
    loop {
        match recv(s).unwrap() {
            ServerMsg::Changes(c) => {
                assert!(!caught_up, "changes of the catch-up after its CaughtUp");
                frames += 1;
                changes += c.len();
            }
            ServerMsg::CaughtUp { full, .. } => {
                assert!(full, "a first subscribe gets a full listing");
                caught_up = true;
            }
            ServerMsg::Probed { id: got, .. } if got == id => return (frames, changes, caught_up),
            ServerMsg::Ping => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn a_catch_up_is_sent_only_as_fast_as_the_client_takes_it() {
    // More changes than the server sends ahead of a client's `Took`s.
    const DIRS: usize = 80;
    const PER_DIR: usize = 500;
    let paths = DIRS * (PER_DIR + 1);
    assert!(paths > (CATCH_UP_WINDOW + 1) * CHANGES_PER_FRAME);
    let mut cl = Cluster::start_with("window", &[], |root| {
        for d in 0..DIRS {
            std::fs::create_dir(root.join(format!("d{d}"))).unwrap();
            for f in 0..PER_DIR {
                std::fs::File::create(root.join(format!("d{d}/f{f}"))).unwrap();
            }
        }
    });

    // A peer that subscribes and takes nothing: a probe's answer comes after every frame the
    // server sent before it, so the frames before it are all the server sends unasked.
    let mut s = authenticated(&cl);
    let probe = |id| {
        encode(&ClientMsg::Probe {
            id,
            target: ProbeTarget::Staged("none".into()),
            len: 0,
        })
        .unwrap()
    };
    s.write_all(&encode(&ClientMsg::Subscribe { epoch: 0, since: 0 }).unwrap())
        .unwrap();
    let listed = match recv(&mut s).unwrap() {
        ServerMsg::Listing { changes, .. } => changes as usize,
        other => panic!("expected the Listing, got {other:?}"),
    };
    assert!(listed >= paths, "{listed} changes listed for {paths} paths");
    s.write_all(&probe(1)).unwrap();
    let (frames, mut got, done) = frames_before_probed(&mut s, 1);
    assert_eq!(
        (frames, done),
        (CATCH_UP_WINDOW, false),
        "frames sent before the client took any"
    );

    // Each frame taken makes room for one more.
    s.write_all(&encode(&ClientMsg::Took { frames: 1 }).unwrap())
        .unwrap();
    s.write_all(&probe(2)).unwrap();
    let (frames, changes, done) = frames_before_probed(&mut s, 2);
    assert_eq!((frames, done), (1, false), "sent for one frame taken");
    got += changes;

    // Room for all the rest: the catch-up ends with its CaughtUp.
    s.write_all(&encode(&ClientMsg::Took { frames: 1_000 }).unwrap())
        .unwrap();
    s.write_all(&probe(3)).unwrap();
    let (_, changes, done) = frames_before_probed(&mut s, 3);
    assert!(done, "no CaughtUp after the whole listing was taken");
    assert_eq!(
        got + changes,
        listed,
        "changes sent against the Listing's count"
    );

    // A real client takes its frames as it applies them, and syncs the whole tree.
    cl.add_client("a", Watch::Auto, Vec::new());
    cl.wait_converged("the client has the whole tree", |cl| {
        cl.root("a")
            .join(format!("d{}/f{}", DIRS - 1, PER_DIR - 1))
            .exists()
    });
}
