//! A hostile peer speaking raw frames: each bad input is refused with a clear log line, its
//! connection is closed, nothing is written outside the root, and honest clients keep syncing.

use ferry::proto::auth::{random, Secret};
use ferry::proto::codec::encode;
use ferry::proto::msg::{ClientMsg, Op, ServerMsg, PROTOCOL_VERSION};
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

/// Authenticates as a client named "hostile" with the right secret.
pub(super) fn authenticated(cl: &Cluster) -> Conn {
    let mut s = connect(cl);
    let secret = Secret::load(cl.secret()).unwrap();
    let nonce = random::<32>();
    s.write_all(
        &encode(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: "hostile".into(),
            id: [7; 16],
            nonce,
        })
        .unwrap(),
    )
    .unwrap();
    let ServerMsg::Challenge { nonce: sn, .. } = recv(&mut s).unwrap() else {
        panic!("no challenge")
    };
    let channel = cl.fingerprint().parse::<Fingerprint>().unwrap().0;
    let proof = secret.client_proof(&channel, &sn, &nonce, "hostile");
    s.write_all(&encode(&ClientMsg::Auth { proof }).unwrap())
        .unwrap();
    assert!(matches!(recv(&mut s).unwrap(), ServerMsg::Welcome { .. }));
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

    let log = std::fs::read_to_string(cl.dir.0.join("server.log")).unwrap();
    for needle in [
        "refused path \"../x\"",
        "refused path \"/etc/passwd\"",
        "refused path \"a\\r\\nDELE x\"",
        "exceeds the limit",
        "unexpected Hello",
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
