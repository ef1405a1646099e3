//! The command line (argh), turned into validated configurations before anything runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use argh::FromArgs;

use crate::client::{self, ClientConfig};
use crate::proto::auth::Secret;
use crate::watch::{default_backend, Backend, WatchConfig};

/// ferry keeps one directory tree identical across a server and its clients.
#[derive(FromArgs, Debug)]
struct Args {
    /// print the version, target and default watcher
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Cmd {
    Server(ServerArgs),
    Client(ClientArgs),
    Status(StatusArgs),
    Demo(DemoArgs),
}

/// Show what the agent running for a tree is doing.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
struct StatusArgs {
    /// the agent's tree (default: the current directory)
    #[argh(option, default = "PathBuf::from(\".\")")]
    root: PathBuf,
    /// print the report as JSON (for scripts)
    #[argh(switch)]
    json: bool,
}

/// Run the server agent: own a tree and serve it to clients.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "server")]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
struct ServerArgs {
    /// the directory to serve
    #[argh(option)]
    root: PathBuf,
    /// control channel address (default 0.0.0.0:7700)
    #[argh(option, default = "\"0.0.0.0:7700\".into()")]
    listen: String,
    /// embedded FTP server address (default 0.0.0.0:7721)
    #[argh(option, default = "\"0.0.0.0:7721\".into()")]
    ftp_listen: String,
    /// file holding the shared secret (at least 16 bytes)
    #[argh(option)]
    secret_file: PathBuf,
    /// use this external FTP server (IP:PORT, root = --root) instead of the embedded one
    #[argh(option)]
    ftp_external: Option<String>,
    /// with --ftp-external: the FTP account clients log in with
    #[argh(option)]
    ftp_user: Option<String>,
    /// with --ftp-external: file holding that account's password
    #[argh(option)]
    ftp_password_file: Option<PathBuf>,
    /// watcher backend: auto, inotify or poll (default auto)
    #[argh(option, default = "\"auto\".into()")]
    watcher: String,
    /// poll watcher interval in milliseconds (default 1000)
    #[argh(option, default = "1000")]
    poll_interval_ms: u64,
    /// forget deletes after this many days; a client away longer reconciles in full, and
    /// files deleted meanwhile may come back from it (default 30)
    #[argh(option, default = "30")]
    tombstone_days: u64,
    /// remember at most this many deletes, forgetting the oldest first (default 100000)
    #[argh(option, default = "100_000")]
    max_tombstones: usize,
    /// write the bound addresses to this file once serving
    #[argh(option)]
    ready_file: Option<PathBuf>,
    /// log more detail
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// log only warnings and errors
    #[argh(switch, short = 'q')]
    quiet: bool,
}

/// Run a client agent: keep a local replica of the server's tree.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "client")]
struct ClientArgs {
    /// the server's control address, HOST:PORT
    #[argh(option)]
    server: String,
    /// the local replica directory (created if missing)
    #[argh(option)]
    root: PathBuf,
    /// file holding the shared secret (the server's)
    #[argh(option)]
    secret_file: PathBuf,
    /// this client's name in logs and conflict copies (default: host name)
    #[argh(option)]
    name: Option<String>,
    /// watcher backend: auto, inotify or poll (default auto)
    #[argh(option, default = "\"auto\".into()")]
    watcher: String,
    /// poll watcher interval in milliseconds (default 1000)
    #[argh(option, default = "1000")]
    poll_interval_ms: u64,
    /// limit file transfers to this many bytes per second (suffixes K, M, G: 2M is 2 MiB/s)
    #[argh(option, from_str_fn(parse_rate))]
    max_rate: Option<u64>,
    /// sync until in step with the server, print a summary and exit (0 when in sync)
    #[argh(switch)]
    once: bool,
    /// log more detail
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// log only warnings and errors
    #[argh(switch, short = 'q')]
    quiet: bool,
}

/// Parses a rate like `500K`, `2M`, `1.5G` or `1048576` (bytes per second; K = 1024).
fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let scale: u64 = match unit {
        'B' => 1,
        'K' => 1 << 10,
        'M' => 1 << 20,
        'G' => 1 << 30,
        _ => {
            return Err(format!(
                "bad rate {s:?}: use a number with K, M or G, like 2M"
            ))
        }
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 => Ok(((n * scale as f64) as u64).max(1)),
        _ => Err(format!(
            "bad rate {s:?}: use a positive number of bytes per second, like 500K or 2M"
        )),
    }
}

/// Start a server and two clients on 127.0.0.1 under a demo directory, to watch ferry work.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "demo")]
struct DemoArgs {
    /// where to put the demo trees (default ./demo)
    #[argh(option, default = "PathBuf::from(\"demo\")")]
    dir: PathBuf,
}

/// Parses the command line and runs what it asks for.
pub fn main() -> anyhow::Result<()> {
    let args: Args = argh::from_env();
    if args.version {
        println!("{}", version());
        return Ok(());
    }
    match args.cmd {
        None => {
            bail!("say what to run: `ferry server`, `ferry client`, `ferry status` or `ferry demo` (see --help)")
        }
        Some(Cmd::Server(a)) => run_server(a),
        Some(Cmd::Client(a)) => {
            crate::logger::init(
                a.name.as_deref().unwrap_or("client"),
                verbosity(a.verbose, a.quiet),
            );
            client::run(client_config(a)?)
        }
        Some(Cmd::Status(a)) => status(&a),
        Some(Cmd::Demo(a)) => demo(&a.dir),
    }
}

/// `ferry status`: exits non-zero when no agent answers.
fn status(a: &StatusArgs) -> anyhow::Result<()> {
    let report = crate::status::query(&a.root)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        use std::io::Write;
        writeln!(out)?;
    } else {
        crate::status::render(&report, crate::status::now(), &mut out)?;
    }
    Ok(())
}

/// `ferry 0.1.0 (x86_64-unknown-linux-gnu, default watcher inotify)`.
pub fn version() -> String {
    format!(
        "ferry {} ({}, default watcher {})",
        env!("CARGO_PKG_VERSION"),
        env!("FERRY_TARGET"),
        default_backend().name()
    )
}

fn verbosity(verbose: bool, quiet: bool) -> i8 {
    i8::from(verbose) - i8::from(quiet)
}

fn watch_config(root: &Path, watcher: &str, poll_ms: u64) -> anyhow::Result<WatchConfig> {
    let backend = match watcher {
        "auto" => default_backend(),
        "inotify" => Backend::Inotify,
        "poll" => Backend::Poll,
        other => bail!("unknown watcher {other:?}: use auto, inotify or poll"),
    };
    if poll_ms == 0 {
        bail!("--poll-interval-ms must be at least 1");
    }
    Ok(WatchConfig {
        root: root.to_path_buf(),
        backend,
        poll_interval: Duration::from_millis(poll_ms),
    })
}

#[cfg_attr(not(feature = "server"), allow(dead_code))]
fn parse_addr(flag: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.parse()
        .with_context(|| format!("{flag} {s:?} is not an IP:PORT address (e.g. 0.0.0.0:7700)"))
}

#[cfg(feature = "server")]
fn run_server(a: ServerArgs) -> anyhow::Result<()> {
    crate::logger::init("server", verbosity(a.verbose, a.quiet));
    let root = std::path::absolute(&a.root)?;
    use crate::server::FtpMode;
    let ftp = match (a.ftp_external, a.ftp_user, a.ftp_password_file) {
        (None, None, None) => FtpMode::Embedded(parse_addr("--ftp-listen", &a.ftp_listen)?),
        (Some(addr), Some(user), Some(pass_file)) => {
            let pass = std::fs::read_to_string(&pass_file)
                .with_context(|| {
                    format!("cannot read --ftp-password-file {}", pass_file.display())
                })?
                .trim_end_matches(['\r', '\n'])
                .to_string();
            FtpMode::External {
                addr: parse_addr("--ftp-external", &addr)?,
                user,
                pass,
            }
        }
        _ => bail!("--ftp-external needs --ftp-user and --ftp-password-file (and they need it)"),
    };
    let cfg = crate::server::ServerConfig {
        watch: watch_config(&root, &a.watcher, a.poll_interval_ms)?,
        listen: parse_addr("--listen", &a.listen)?,
        ftp,
        secret: Secret::load(&a.secret_file)?,
        ready_file: a.ready_file,
        retention: crate::core::index::Retention {
            max_age_secs: a.tombstone_days.saturating_mul(86_400),
            max_count: a.max_tombstones,
        },
        root,
    };
    crate::server::run(cfg)
}

#[cfg(not(feature = "server"))]
fn run_server(_: ServerArgs) -> anyhow::Result<()> {
    bail!("this ferry was built without the server (cargo feature `server`); build it with default features")
}

fn client_config(a: ClientArgs) -> anyhow::Result<ClientConfig> {
    if !a.server.contains(':') {
        bail!(
            "--server {:?} needs a port, e.g. {}:7700",
            a.server,
            a.server
        );
    }
    let name = match a.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "client".into()),
    };
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        bail!("--name must be 1 to 64 printable characters");
    }
    let root = std::path::absolute(&a.root)?;
    Ok(ClientConfig {
        server: a.server,
        watch: watch_config(&root, &a.watcher, a.poll_interval_ms)?,
        secret: Secret::load(&a.secret_file)?,
        root,
        name,
        max_rate: a.max_rate,
        once: a.once,
    })
}

/// Kills the demo's agents when the demo ends.
struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn demo(dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    std::fs::create_dir_all(dir)?;
    let dir = std::path::absolute(dir)?;
    let secret = dir.join("secret");
    if !secret.exists() {
        let bytes: [u8; 24] = crate::proto::auth::random();
        std::fs::write(&secret, crate::agent::hex(&bytes))?;
    }
    let ready = dir.join("server.ready");
    let _ = std::fs::remove_file(&ready);
    let mut agents = Agents(Vec::new());
    let server = Command::new(&exe)
        .args([
            "server",
            "--listen",
            "127.0.0.1:7700",
            "--ftp-listen",
            "127.0.0.1:7721",
        ])
        .arg("--root")
        .arg(dir.join("server"))
        .arg("--secret-file")
        .arg(&secret)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .spawn()?;
    agents.0.push(server);
    std::fs::create_dir_all(dir.join("server"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        if std::time::Instant::now() > deadline || agents.0[0].try_wait()?.is_some() {
            bail!("the demo server did not start (is port 7700 or 7721 in use?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, watcher) in [("laptop", "inotify"), ("phone", "poll")] {
        let child = Command::new(&exe)
            .args([
                "client",
                "--server",
                "127.0.0.1:7700",
                "--name",
                name,
                "--watcher",
                watcher,
            ])
            .arg("--root")
            .arg(dir.join(name))
            .arg("--secret-file")
            .arg(&secret)
            .stdin(Stdio::null())
            .spawn()?;
        agents.0.push(child);
    }
    println!(
        "\nferry demo: a server and two clients on 127.0.0.1\n\
         \n  server tree:  {0}/server\n  laptop tree:  {0}/laptop   (inotify watcher)\n  phone tree:   {0}/phone    (poll watcher, 1 s)\n\
         \nTry, in another terminal:\n  echo hello > {0}/laptop/hello.txt      # appears in server/ and phone/\n  mkdir -p {0}/phone/a/b && mv {0}/laptop/hello.txt {0}/laptop/a/\n  rm -r {0}/server/a                     # deletes travel too\n\
         \nPress Ctrl-C to stop.\n",
        dir.display()
    );
    // Ctrl-C or `kill` ends the demo through `Agents`' drop, which stops its agents: the
    // signals are blocked here and taken by a thread (children were spawned before, so they
    // keep the default handling).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;
    let flag = stop.clone();
    std::thread::spawn(move || {
        let _ = signals.wait();
        flag.store(true, std::sync::atomic::Ordering::Release);
    });
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        for c in &mut agents.0 {
            if let Some(status) = c.try_wait()? {
                bail!("a demo agent exited ({status}); stopping the demo");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping the demo");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates() {
        for (text, want) in [
            ("1000", 1000),
            ("500K", 500 << 10),
            ("2M", 2 << 20),
            ("2m", 2 << 20),
            ("1.5M", 3 << 19),
            ("1G", 1 << 30),
            (" 64M ", 64 << 20),
        ] {
            assert_eq!(parse_rate(text), Ok(want), "{text}");
        }
        for bad in ["", "0", "-1M", "2X", "M", "fast", "inf", "NaNK"] {
            let err = parse_rate(bad).unwrap_err();
            assert!(err.contains("like"), "{bad}: {err}");
        }
    }
}
