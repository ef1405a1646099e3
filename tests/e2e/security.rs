//! Only the right peers get in: the control channel and FTP run over TLS, a client pins the
//! server's certificate and refuses a different one, unauthenticated connections are closed
//! in time, failing addresses are shut out, and the number of connections is capped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::proto::auth::Secret;
use ferry::proto::msg::ServerMsg;

use super::hostile::{connect, handshake};
use super::util::*;

/// True once the peer has closed `s`.
fn closed(s: &mut impl Read) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

/// Runs `ferry client --once` named `name` (its tree beside the cluster's) against the
/// cluster's server with `extra` flags; returns whether it succeeded, and its stderr.
fn run_once(cl: &Cluster, name: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(ferry())
        .args(["client", "--once", "--name", name, "--server", cl.control()])
        .args(extra)
        .arg("--root")
        .arg(cl.dir.0.join(name))
        .arg("--secret-file")
        .arg(cl.secret())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn first_contact_pins_the_certificate_and_a_changed_one_is_refused() {
    let mut cl = Cluster::start("pinning", &[("a", Watch::Auto)]);
    let (a, server) = (cl.root("a"), cl.server_root());
    let first = cl.fingerprint().to_string();
    assert!(
        first.starts_with("sha256:"),
        "the server prints its fingerprint: {first}"
    );
    write(&server, "before.txt", "over TLS");
    cl.wait_converged("a file travels over TLS and FTPS", |_| {
        has(&a, "before.txt", b"over TLS")
    });
    let log = cl.log("a");
    assert!(
        log.contains(&format!(
            "trusting the server's certificate {first} on first use"
        )),
        "{log}"
    );
    let pinned = std::fs::read_to_string(a.join(".ferry/server.fingerprint")).unwrap();
    assert_eq!(
        pinned.trim(),
        first,
        "pinned after the server proved the secret"
    );
    assert!(cl
        .log("server")
        .contains(&format!("TLS certificate {first}")));

    // The server gets a new key (as an impostor with the secret would have): the client
    // refuses it, loudly, and stops.
    cl.kill_client("a");
    cl.kill_server();
    std::fs::remove_dir_all(server.join(".ferry/tls")).unwrap();
    cl.start_server();
    let second = cl.fingerprint().to_string();
    assert_ne!(first, second, "a new key was made");
    write(&server, "after.txt", "must not arrive");
    cl.start_client("a");
    let status = wait_for("the client stops", &mut cl, |cl| cl.client_exited("a"));
    assert!(!status.success(), "a changed certificate is fatal");
    let log = cl.log("a");
    assert!(
        log.contains("REFUSING the server")
            && log.contains(&second)
            && log.contains(&first)
            && log.contains(&format!("--server-fingerprint {second}")),
        "the refusal names both certificates and the way out\n{log}"
    );
    assert!(
        !a.join("after.txt").exists(),
        "nothing came from the refused server"
    );

    // The owner confirms the new certificate once; the client syncs and pins it.
    cl.set_client_args("a", &["--server-fingerprint", &second]);
    cl.start_client("a");
    cl.wait_converged("the confirmed server is synced", |_| {
        has(&a, "after.txt", b"must not arrive")
    });
    let pinned = std::fs::read_to_string(a.join(".ferry/server.fingerprint")).unwrap();
    assert_eq!(pinned.trim(), second);
}

#[test]
fn a_wrong_fingerprint_is_refused_before_anything_is_sent() {
    let mut cl = Cluster::start("wrong-fingerprint", &[]);
    write(
        &cl.server_root(),
        "secret-plans.txt",
        "not for impostors' clients",
    );
    let wrong = format!("sha256:{}", "00".repeat(32));
    cl.add_client_with(
        "a",
        Watch::Auto,
        Vec::new(),
        &["--server-fingerprint", &wrong],
    );
    let status = wait_for("the client stops", &mut cl, |cl| cl.client_exited("a"));
    assert!(!status.success());
    let log = cl.log("a");
    assert!(log.contains("REFUSING the server"), "{log}");
    assert!(!cl.root("a").join("secret-plans.txt").exists());
    // The secret never went out: the server saw a TLS failure, not a failed proof.
    assert!(!cl.log("server").contains("failed authentication"));
}

#[test]
fn plaintext_only_when_both_sides_ask_for_it() {
    let cl = Cluster::start_custom(
        "plaintext",
        &[("a", Watch::Auto), ("b", Watch::Poll)],
        Some(vec![
            "--ftp-listen".into(),
            "127.0.0.1:0".into(),
            "--insecure-plaintext".into(),
        ]),
        |_| {},
    );
    assert_eq!(cl.fingerprint(), "none");
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "clear.txt", "in the clear");
    cl.wait_converged("plaintext sync works", |_| {
        has(&b, "clear.txt", b"in the clear")
    });
    for agent in ["server", "a"] {
        assert!(
            cl.log(agent)
                .contains("--insecure-plaintext: the control channel and FTP run unencrypted"),
            "{agent} warns at start"
        );
    }

    // A TLS client against the plaintext server: a clear error, and it is told why.
    let (ok, err) = run_once(&cl, "tls", &[]);
    assert!(!ok);
    assert!(
        err.contains("--insecure-plaintext, pass it here too"),
        "{err}"
    );
}

#[test]
fn a_plaintext_client_is_turned_away_by_a_tls_server() {
    let cl = Cluster::start("plaintext-client", &[]);
    write(&cl.server_root(), "x.txt", "x");
    let (ok, err) = run_once(&cl, "old", &["--insecure-plaintext"]);
    assert!(!ok);
    assert!(err.contains("drop --insecure-plaintext"), "{err}");
    assert!(!cl.dir.0.join("old/x.txt").exists());
    wait_until(
        "the server logs the failed TLS handshake",
        || cl.log("server").contains("TLS handshake failed"),
        || cl.logs(),
    );
}

#[test]
fn the_embedded_ftp_server_refuses_plaintext_logins() {
    let cl = Cluster::start("ftps-required", &[]);
    let mut s = TcpStream::connect(cl.ftp_addr()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let reply = |s: &mut TcpStream| {
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let greeting = reply(&mut s);
    assert!(greeting.starts_with("220"), "{greeting}");
    s.write_all(b"USER anyone\r\n").unwrap();
    let answer = reply(&mut s);
    assert!(
        answer.starts_with('5'),
        "a login without AUTH TLS is refused: {answer}"
    );
}

#[test]
fn an_unauthenticated_connection_is_closed_in_time() {
    let cl = Cluster::start("auth-timeout", &[]);
    // One that never starts TLS, one that completes TLS and then says nothing.
    let mut raw = TcpStream::connect(cl.control()).unwrap();
    raw.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut tls = connect(&cl);
    let start = Instant::now();
    assert!(closed(&mut raw) && closed(&mut tls));
    // Well before the read timeout: closed by the server, not by us giving up.
    assert!(start.elapsed() < DEADLINE / 2, "{:?}", start.elapsed());
    let log = cl.log("server");
    assert!(log.contains("the handshake timed out after 5 s"), "{log}");
}

/// Runs the handshake with `secret` over TLS; returns what the server answered to Auth
/// (`None`: it closed the connection before that).
fn try_secret(cl: &Cluster, secret: &Secret) -> Option<ServerMsg> {
    let channel = cl
        .fingerprint()
        .parse::<ferry::tls::Fingerprint>()
        .unwrap()
        .0;
    handshake(&mut connect(cl), secret, &channel, "guesser")
}

#[test]
fn an_address_that_keeps_failing_is_shut_out_and_others_keep_syncing() {
    let cl = Cluster::start("rate-limit", &[("a", Watch::Auto), ("b", Watch::Poll)]);
    let (a, b) = (cl.root("a"), cl.root("b"));
    write(&a, "first.txt", "connected");
    cl.wait_converged("both clients are connected", |_| {
        has(&b, "first.txt", b"connected")
    });
    let wrong = Secret::from_bytes(b"guessing-the-secret-0000");
    let limit = 10; // ferry::gate::MAX_FAILURES
    for i in 0..limit {
        let answer = try_secret(&cl, &wrong);
        assert!(
            matches!(answer, Some(ServerMsg::Refused { .. })),
            "guess {i} is refused: {answer:?}"
        );
    }
    // The server answers before it counts the failure: wait until the last one is counted.
    wait_until(
        "the address is shut out",
        || {
            cl.log("server")
                .contains("10 failed handshakes within 60 s; refusing it for 60 s")
        },
        || cl.logs(),
    );
    // Now every connection from this address is closed before TLS, even an honest one.
    assert!(
        try_secret_raw_closed(&cl),
        "a shut-out address is closed at once"
    );
    // The clients that were connected are not disturbed.
    write(&a, "still.txt", "syncing");
    cl.wait_converged("connected clients keep syncing", |_| {
        has(&b, "still.txt", b"syncing")
    });
}

/// True if the server closes a fresh TCP connection without a TLS handshake.
fn try_secret_raw_closed(cl: &Cluster) -> bool {
    let s = TcpStream::connect(cl.control()).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let tls = rustls::ClientConnection::new(
        ferry::tls::client_config(None).0,
        ferry::tls::SERVER_NAME.try_into().unwrap(),
    )
    .unwrap();
    let mut conn = rustls::StreamOwned::new(tls, s);
    let mut handshake = Ok(());
    while conn.conn.is_handshaking() {
        if let Err(e) = conn.conn.complete_io(&mut conn.sock) {
            handshake = Err(e);
            break;
        }
    }
    handshake.is_err()
}

#[test]
fn connections_are_capped() {
    let mut cl = Cluster::start("max-connections", &[]);
    cl.kill_server();
    cl.set_server_args(&["--max-connections", "3"]);
    cl.start_server();
    cl.add_client("a", Watch::Auto, Vec::new());
    write(&cl.root("a"), "one.txt", "1");
    let server = cl.server_root();
    cl.wait_converged("a is connected", |_| has(&server, "one.txt", b"1"));
    // Two idle connections fill the cap; the next is closed at once.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(cl.control()).unwrap())
        .collect();
    let mut extra = TcpStream::connect(cl.control()).unwrap();
    extra.set_read_timeout(Some(DEADLINE)).unwrap();
    let start = Instant::now();
    assert!(closed(&mut extra));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "closed at once, not by the handshake timeout: {:?}",
        start.elapsed()
    );
    wait_until(
        "the refusal is logged",
        || {
            cl.log("server")
                .contains("3 connections are open (--max-connections)")
        },
        || cl.logs(),
    );
    // Closed connections free their places: a new client gets in.
    drop(idle);
    cl.add_client("b", Watch::Auto, Vec::new());
    let b = cl.root("b");
    cl.wait_converged("b got in", |_| has(&b, "one.txt", b"1"));
}

#[test]
fn the_server_key_must_be_private() {
    let mut cl = Cluster::start("key-mode", &[]);
    let key = cl.server_root().join(".ferry/tls/key.pem");
    cl.kill_server();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(ferry())
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--ftp-listen",
            "127.0.0.1:0",
        ])
        .arg("--root")
        .arg(cl.server_root())
        .arg("--secret-file")
        .arg(cl.secret())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("readable by other users") && err.contains("chmod 600"),
        "{err}"
    );
}

/// Sends one FTP command and returns the reply line.
fn ftp(s: &mut TcpStream, command: &str) -> String {
    s.write_all(format!("{command}\r\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "FTP server closed");
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn ftp_logins_die_with_their_control_session() {
    // Plaintext, to speak FTP by hand; the confinement is the same with TLS.
    let cl = Cluster::start_custom(
        "ftp-session",
        &[],
        Some(vec![
            "--ftp-listen".into(),
            "127.0.0.1:0".into(),
            "--insecure-plaintext".into(),
        ]),
        |dir| write(&dir.join("server"), "shared.txt", "12345"),
    );
    let secret = Secret::load(cl.secret()).unwrap();
    let mut control = TcpStream::connect(cl.control()).unwrap();
    control.set_read_timeout(Some(DEADLINE)).unwrap();
    let Some(ServerMsg::Welcome { grant, .. }) =
        handshake(&mut control, &secret, &[0; 32], "short-lived")
    else {
        panic!("no welcome")
    };

    let mut data = TcpStream::connect(cl.ftp_addr()).unwrap();
    data.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut greeting = [0u8; 256];
    let n = data.read(&mut greeting).unwrap();
    assert!(greeting[..n].starts_with(b"220"));
    assert!(ftp(&mut data, &format!("USER {}", grant.ftp_user)).starts_with("331"));
    assert!(ftp(&mut data, &format!("PASS {}", grant.ftp_pass)).starts_with("230"));
    let size = ftp(&mut data, "SIZE /shared.txt");
    assert!(
        size.starts_with("213 5"),
        "readable while the session lives: {size}"
    );
    let listing = ftp(&mut data, "MKD /new");
    assert!(
        listing.starts_with('5'),
        "no directories over FTP: {listing}"
    );

    drop(control);
    wait_until(
        "the server notices the session ended",
        || cl.log("server").contains("short-lived disconnected"),
        || cl.logs(),
    );
    let size = ftp(&mut data, "SIZE /shared.txt");
    assert!(
        size.starts_with('5'),
        "the login is worthless once its control session is gone: {size}"
    );
}
