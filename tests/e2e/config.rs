//! The config file: `<root>/.ferry/config.toml` or `--config FILE` sets any flag, the command
//! line overrides it, and a file with an unknown key or a wrong type stops the agent.

use std::fs;
use std::path::Path;
use std::process::Command;

use super::util::*;

fn log_has(log: &Path, text: &str) -> bool {
    fs::read_to_string(log).is_ok_and(|l| l.contains(text))
}

#[test]
fn client_reads_its_roots_file_and_the_command_line_wins() {
    let cl = Cluster::start("config-client", &[]);
    let root = cl.dir.0.join("phone");
    let file = root.join(".ferry/config.toml");
    // Everything but the root comes from the file; the secret's path is relative to it.
    write(
        &root,
        ".ferry/config.toml",
        format!(
            "server = \"{}\"\nsecret-file = \"../../secret\"\nname = \"from-file\"\n\
             watcher = \"poll\"\npoll-interval-ms = 200\nverbose = true\n",
            cl.control()
        ),
    );
    let log = cl.dir.0.join("phone.log");
    let client = Proc::spawn(&["client", "--root", root.to_str().unwrap()], &log);
    let explain = || fs::read_to_string(&log).unwrap_or_default() + &cl.logs();
    wait_until(
        "the server sees the client by the file's name",
        || cl.log("server").contains("from-file connected from"),
        explain,
    );
    assert!(
        log_has(
            &log,
            &format!("from-file: settings from {}", file.display())
        ),
        "{}",
        explain()
    );
    assert!(
        log_has(&log, "from-file: watcher: poll, every 200 ms"),
        "{}",
        explain()
    );
    // It syncs, and logs in detail (`verbose = true`).
    write(&root, "hello.txt", "from the file's client");
    wait_until(
        "the client's file reaches the server",
        || has(&cl.server_root(), "hello.txt", b"from the file's client"),
        explain,
    );
    wait_until(
        "the upload is logged at debug level",
        || log_has(&log, "DEBUG from-file: uploaded hello.txt"),
        explain,
    );
    drop(client);

    // The same root with flags: they win over the file.
    let log = cl.dir.0.join("phone-cli.log");
    let _client = Proc::spawn(
        &[
            "client",
            "--root",
            root.to_str().unwrap(),
            "--name",
            "from-cli",
            "--watcher",
            "inotify",
        ],
        &log,
    );
    let explain = || fs::read_to_string(&log).unwrap_or_default() + &cl.logs();
    wait_until(
        "the server sees the client by the command line's name",
        || cl.log("server").contains("from-cli connected from"),
        explain,
    );
    assert!(log_has(&log, "from-cli: watcher: inotify"), "{}", explain());
    assert!(!log_has(&log, "from-file"), "{}", explain());
}

#[test]
fn server_reads_config_flag_and_the_command_line_wins() {
    let d = TempDir::new("config-server");
    write_secret(&d.0.join("secret"), "0123456789abcdef-test-secret\n");
    write(&d.0, "share/seed.txt", "served from the file's root");
    let etc = d.0.join("etc");
    fs::create_dir_all(&etc).unwrap();
    let file = etc.join("ferry.toml");
    fs::write(
        &file,
        "root = \"../share\"\nsecret-file = \"../secret\"\nlisten = \"127.0.0.1:0\"\n\
         ftp-listen = \"127.0.0.1:0\"\nready-file = \"../from-file.ready\"\n",
    )
    .unwrap();
    let (from_file, from_cli) = (d.0.join("from-file.ready"), d.0.join("from-cli.ready"));
    let log = d.0.join("server.log");
    let explain = || fs::read_to_string(&log).unwrap_or_default();

    let mut server = Proc::spawn(&["server", "--config", file.to_str().unwrap()], &log);
    wait_until(
        "the server writes the file's ready file",
        || from_file.exists() || server.exited().is_some(),
        explain,
    );
    assert!(server.exited().is_none(), "{}", explain());
    assert!(log_has(&log, &format!("settings from {}", file.display())));
    // It serves the file's root with the file's secret: a client gets the seeded file.
    let ready = fs::read_to_string(&from_file).unwrap();
    let control = ready
        .lines()
        .find_map(|l| l.strip_prefix("control="))
        .unwrap();
    let client_root = d.0.join("client");
    let secret = d.0.join("secret");
    let _client = Proc::spawn(
        &[
            "client",
            "--server",
            control,
            "--root",
            client_root.to_str().unwrap(),
            "--secret-file",
            secret.to_str().unwrap(),
            "--name",
            "c",
        ],
        &d.0.join("client.log"),
    );
    wait_until(
        "the client gets the file's root's content",
        || has(&client_root, "seed.txt", b"served from the file's root"),
        || explain() + &fs::read_to_string(d.0.join("client.log")).unwrap_or_default(),
    );
    drop(server);

    fs::remove_file(&from_file).unwrap();
    let mut server = Proc::spawn(
        &[
            "server",
            "--config",
            file.to_str().unwrap(),
            "--ready-file",
            from_cli.to_str().unwrap(),
        ],
        &log,
    );
    wait_until(
        "the server writes the command line's ready file",
        || from_cli.exists() || server.exited().is_some(),
        explain,
    );
    assert!(server.exited().is_none(), "{}", explain());
    assert!(!from_file.exists(), "the command line's --ready-file wins");
}

/// Runs ferry to its end (it fails before it connects anywhere) and returns (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(ferry()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_files_are_errors_naming_key_and_file() {
    let d = TempDir::new("config-bad");
    let root = d.0.join("root");
    let root = root.to_str().unwrap();
    // No such secret: were the file ignored, the client would still stop at once.
    let secret = d.0.join("no-such-secret");
    let secret = secret.to_str().unwrap();
    let client = |config: &Path| {
        run(&[
            "client",
            "--config",
            config.to_str().unwrap(),
            "--server",
            "127.0.0.1:9",
            "--root",
            root,
            "--secret-file",
            secret,
        ])
    };

    let bad = d.0.join("bad.toml");
    fs::write(&bad, "name = \"x\"\nmax_rat = \"2M\"\n").unwrap();
    let (ok, err) = client(&bad);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}: unknown key \"max_rat\"", bad.display()))
            && err.contains("max-rate"),
        "{err}"
    );

    let wrong = d.0.join("wrong.toml");
    fs::write(&wrong, "poll-interval-ms = \"fast\"\n").unwrap();
    let (ok, err) = client(&wrong);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: key \"poll-interval-ms\" must be a non-negative integer",
            wrong.display()
        )),
        "{err}"
    );

    let missing = d.0.join("missing.toml");
    let (ok, err) = client(&missing);
    assert!(!ok);
    assert!(
        err.contains("cannot read config file") && err.contains("missing.toml"),
        "{err}"
    );

    // The file in the root is read too, and held to the same rules.
    write(
        Path::new(root),
        ".ferry/config.toml",
        "tombstone-days = 3\n",
    );
    let (ok, err) = run(&[
        "client",
        "--server",
        "127.0.0.1:9",
        "--root",
        root,
        "--secret-file",
        secret,
    ]);
    assert!(!ok);
    assert!(
        err.contains("config.toml: unknown key \"tombstone-days\""),
        "{err}"
    );

    // Without --root or --config there is no root to find a file in.
    let (ok, err) = run(&["server", "--secret-file", secret]);
    assert!(!ok);
    assert!(err.contains("--root is required"), "{err}");
}
