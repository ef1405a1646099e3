//! Agents refuse to start, or to keep trying, when their configuration cannot work, and say
//! what to do.

use std::process::Command;

use super::util::*;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn missing_or_short_secret_is_a_clear_error() {
    let d = TempDir::new("secret");
    let root = d.0.join("root");
    let missing = d.0.join("no-such-secret");
    let (ok, err) = run(&[
        "client",
        "--server",
        "127.0.0.1:9",
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        missing.to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert!(!ok);
    assert!(
        err.contains("no-such-secret") && err.contains("cannot read secret file"),
        "{err}"
    );

    let short = d.0.join("short");
    write_secret(&short, "short\n");
    let (ok, err) = run(&[
        "server",
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        short.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--ftp-listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(
        err.contains("short") && err.contains("at least 16"),
        "{err}"
    );
}

#[test]
fn secret_other_users_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let d = TempDir::new("secret-mode");
    let root = d.0.join("root");
    let secret = d.0.join("secret");
    let secret_s = secret.to_str().unwrap();
    write_secret(&secret, "0123456789abcdef-test-secret\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let fix = format!("run `chmod 600 {secret_s}`");
    let server = [
        "server",
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        secret_s,
        "--listen",
        "127.0.0.1:0",
        "--ftp-listen",
        "127.0.0.1:0",
    ];
    let (ok, err) = run(&server);
    assert!(!ok, "a server with a world-readable secret must not start");
    assert!(
        err.contains("readable by other users (mode 0644)") && err.contains(&fix),
        "{err}"
    );
    assert!(
        !root.join(".ferry").exists(),
        "refused before touching the tree"
    );

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, err) = run(&[
        "client",
        "--server",
        "127.0.0.1:9",
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        secret_s,
        "--name",
        "x",
    ]);
    assert!(!ok, "a client with a group-readable secret must not start");
    assert!(err.contains("(mode 0640)") && err.contains(&fix), "{err}");

    // Not a regular file: a directory.
    let (ok, err) = run(&[
        "client",
        "--server",
        "127.0.0.1:9",
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        d.0.to_str().unwrap(),
        "--name",
        "x",
    ]);
    assert!(!ok);
    assert!(err.contains("is not a regular file"), "{err}");
}

#[test]
fn wrong_secret_is_refused_and_the_client_stops() {
    let cl = Cluster::start("wrong-secret", &[]);
    let wrong = cl.dir.0.join("wrong");
    write_secret(&wrong, "a-different-secret-entirely");
    let root = cl.dir.0.join("intruder");
    let (ok, err) = run(&[
        "client",
        "--server",
        cl.control(),
        "--root",
        root.to_str().unwrap(),
        "--secret-file",
        wrong.to_str().unwrap(),
        "--name",
        "intruder",
    ]);
    assert!(!ok, "a client with the wrong secret must stop");
    assert!(err.contains("wrong secret"), "{err}");
    // The server logs the refusal after sending it: the client may have stopped first.
    wait_until(
        "the server logs the failed authentication",
        || cl.log("server").contains("failed authentication"),
        || cl.log("server"),
    );
}

#[test]
fn version_prints_target_and_default_watcher() {
    let out = Command::new(ferry()).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("ferry ") && text.contains("default watcher"),
        "{text}"
    );
}
