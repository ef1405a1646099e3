//! The command line (argh), turned into validated configurations before anything runs.
//!
//! Settings come from three places, in this order of precedence: the command line, the config
//! file (`crate::config`), the built-in defaults. So the argh structs hold `Option`s (`None`:
//! not on the command line), the file fills what they left out, and the defaults, written in
//! each flag's help, are applied last, where the values are validated.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use argh::FromArgs;

use crate::client::{self, ClientConfig};
use crate::config::{self, Merge};
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
#[cfg_attr(test, derive(argh::ArgsInfo))]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
struct ServerArgs {
    /// read settings from this TOML file (default: <root>/.ferry/config.toml if it exists);
    /// the command line overrides it
    #[argh(option)]
    config: Option<PathBuf>,
    /// the directory to serve (required)
    #[argh(option)]
    root: Option<PathBuf>,
    /// control channel address (default 0.0.0.0:7700)
    #[argh(option)]
    listen: Option<String>,
    /// embedded FTP server address (default 0.0.0.0:7721)
    #[argh(option)]
    ftp_listen: Option<String>,
    /// file holding the shared secret, at least 16 bytes (required)
    #[argh(option)]
    secret_file: Option<PathBuf>,
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
    #[argh(option)]
    watcher: Option<String>,
    /// poll watcher interval in milliseconds (default 1000)
    #[argh(option)]
    poll_interval_ms: Option<u64>,
    /// forget deletes after this many days; a client away longer reconciles in full, and
    /// files deleted meanwhile may come back from it (default 30)
    #[argh(option)]
    tombstone_days: Option<u64>,
    /// remember at most this many deletes, forgetting the oldest first (default 100000)
    #[argh(option)]
    max_tombstones: Option<usize>,
    /// connections open at once, at most (default 64)
    #[argh(option)]
    max_connections: Option<usize>,
    /// no TLS: the control channel and FTP run unencrypted and unauthenticated by
    /// certificate (for tests and old FTP servers; --ftp-external needs it)
    #[argh(switch)]
    insecure_plaintext: bool,
    /// write the bound addresses and certificate fingerprint to this file once serving
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
#[cfg_attr(test, derive(argh::ArgsInfo))]
struct ClientArgs {
    /// read settings from this TOML file (default: <root>/.ferry/config.toml if it exists);
    /// the command line overrides it
    #[argh(option)]
    config: Option<PathBuf>,
    /// the server's control address, HOST:PORT (required)
    #[argh(option)]
    server: Option<String>,
    /// the local replica directory, created if missing (required)
    #[argh(option)]
    root: Option<PathBuf>,
    /// file holding the shared secret, the server's (required)
    #[argh(option)]
    secret_file: Option<PathBuf>,
    /// this client's name in logs and conflict copies (default: host name)
    #[argh(option)]
    name: Option<String>,
    /// watcher backend: auto, inotify or poll (default auto)
    #[argh(option)]
    watcher: Option<String>,
    /// poll watcher interval in milliseconds (default 1000)
    #[argh(option)]
    poll_interval_ms: Option<u64>,
    /// limit file transfers to this many bytes per second (suffixes K, M, G: 2M is 2 MiB/s)
    #[argh(option, from_str_fn(parse_rate))]
    max_rate: Option<u64>,
    /// sync until in step with the server, print a summary and exit (0 when in sync)
    #[argh(switch)]
    once: bool,
    /// trust only the server certificate with this fingerprint (sha256:..., as the server
    /// logs at start); default: the one pinned on first contact
    #[argh(option)]
    server_fingerprint: Option<String>,
    /// no TLS: for a server started with --insecure-plaintext
    #[argh(switch)]
    insecure_plaintext: bool,
    /// log more detail
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// log only warnings and errors
    #[argh(switch, short = 'q')]
    quiet: bool,
}

impl ServerArgs {
    /// Takes from the config file every setting the command line left out.
    fn merge(&mut self, m: &mut Merge<'_>) -> anyhow::Result<()> {
        m.fill("root", &mut self.root)?;
        m.fill("listen", &mut self.listen)?;
        m.fill("ftp-listen", &mut self.ftp_listen)?;
        m.fill("secret-file", &mut self.secret_file)?;
        m.fill("ftp-external", &mut self.ftp_external)?;
        m.fill("ftp-user", &mut self.ftp_user)?;
        m.fill("ftp-password-file", &mut self.ftp_password_file)?;
        m.fill("watcher", &mut self.watcher)?;
        m.fill("poll-interval-ms", &mut self.poll_interval_ms)?;
        m.fill("tombstone-days", &mut self.tombstone_days)?;
        m.fill("max-tombstones", &mut self.max_tombstones)?;
        m.fill("max-connections", &mut self.max_connections)?;
        m.fill("ready-file", &mut self.ready_file)?;
        m.fill_switches([("insecure-plaintext", &mut self.insecure_plaintext)])?;
        m.fill_switches([("verbose", &mut self.verbose), ("quiet", &mut self.quiet)])
    }
}

impl ClientArgs {
    /// Takes from the config file every setting the command line left out.
    fn merge(&mut self, m: &mut Merge<'_>) -> anyhow::Result<()> {
        m.fill("server", &mut self.server)?;
        m.fill("root", &mut self.root)?;
        m.fill("secret-file", &mut self.secret_file)?;
        m.fill("name", &mut self.name)?;
        m.fill("watcher", &mut self.watcher)?;
        m.fill("poll-interval-ms", &mut self.poll_interval_ms)?;
        m.fill_parsed("max-rate", &mut self.max_rate, parse_rate)?;
        m.fill("server-fingerprint", &mut self.server_fingerprint)?;
        m.fill_switches([("once", &mut self.once)])?;
        m.fill_switches([("insecure-plaintext", &mut self.insecure_plaintext)])?;
        m.fill_switches([("verbose", &mut self.verbose), ("quiet", &mut self.quiet)])
    }
}

/// A setting that has no default, from the command line or the config file.
fn required<T>(value: Option<T>, key: &str) -> anyhow::Result<T> {
    value.with_context(|| {
        format!("--{key} is required: give it on the command line or as `{key} = ...` in the config file")
    })
}

/// The root, which has no default either; without it there is no `<root>/.ferry/config.toml`
/// to look in, so only `--config` can stand in for `--root`.
fn required_root(root: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    root.context(
        "--root is required: give it on the command line, or as `root = ...` in a file named \
         by --config (without a root there is no <root>/.ferry/config.toml to look in)",
    )
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
        Some(Cmd::Server(mut a)) => {
            let (explicit, root) = (a.config.clone(), a.root.clone());
            let file = config::merge_into(explicit.as_deref(), root.as_deref(), |m| a.merge(m))?;
            run_server(a, file)
        }
        Some(Cmd::Client(mut a)) => {
            let (explicit, root) = (a.config.clone(), a.root.clone());
            let file = config::merge_into(explicit.as_deref(), root.as_deref(), |m| a.merge(m))?;
            crate::logger::init(
                a.name.as_deref().unwrap_or("client"),
                verbosity(a.verbose, a.quiet),
            );
            let cfg = client_config(a)?;
            log_settings(file.as_deref(), &cfg.watch);
            client::run(cfg)
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

/// Says where the settings came from, and the one choice made at run time: the watcher.
fn log_settings(file: Option<&Path>, watch: &WatchConfig) {
    if let Some(file) = file {
        log::info!("settings from {}", file.display());
    }
    match watch.backend {
        Backend::Poll => log::info!(
            "watcher: poll, every {} ms",
            watch.poll_interval.as_millis()
        ),
        b => log::info!("watcher: {}", b.name()),
    }
}

/// The watcher settings; `None`s take the defaults.
fn watch_config(
    root: &Path,
    watcher: Option<&str>,
    poll_ms: Option<u64>,
) -> anyhow::Result<WatchConfig> {
    let poll_ms = poll_ms.unwrap_or(1000);
    let backend = match watcher.unwrap_or("auto") {
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
fn run_server(a: ServerArgs, file: Option<PathBuf>) -> anyhow::Result<()> {
    crate::logger::init("server", verbosity(a.verbose, a.quiet));
    let cfg = server_config(a)?;
    log_settings(file.as_deref(), &cfg.watch);
    crate::server::run(cfg)
}

#[cfg(feature = "server")]
fn server_config(a: ServerArgs) -> anyhow::Result<crate::server::ServerConfig> {
    let root = std::path::absolute(required_root(a.root)?)?;
    use crate::server::FtpMode;
    let ftp = match (a.ftp_external, a.ftp_user, a.ftp_password_file) {
        (None, None, None) => FtpMode::Embedded(parse_addr(
            "--ftp-listen",
            a.ftp_listen.as_deref().unwrap_or("0.0.0.0:7721"),
        )?),
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
    if matches!(ftp, FtpMode::External { .. }) && !a.insecure_plaintext {
        bail!(
            "--ftp-external sends file contents and the FTP password unencrypted: add \
             --insecure-plaintext (here and on every client) to accept that, or use the \
             embedded FTP server, which speaks TLS"
        );
    }
    let max_connections = a.max_connections.unwrap_or(64);
    if max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    Ok(crate::server::ServerConfig {
        watch: watch_config(&root, a.watcher.as_deref(), a.poll_interval_ms)?,
        listen: parse_addr("--listen", a.listen.as_deref().unwrap_or("0.0.0.0:7700"))?,
        ftp,
        secret: Secret::load(&required(a.secret_file, "secret-file")?)?,
        ready_file: a.ready_file,
        retention: crate::core::index::Retention {
            max_age_secs: a.tombstone_days.unwrap_or(30).saturating_mul(86_400),
            max_count: a.max_tombstones.unwrap_or(100_000),
        },
        insecure_plaintext: a.insecure_plaintext,
        max_connections,
        root,
    })
}

#[cfg(not(feature = "server"))]
fn run_server(_: ServerArgs, _: Option<PathBuf>) -> anyhow::Result<()> {
    bail!("this ferry was built without the server (cargo feature `server`); build it with default features")
}

fn client_config(a: ClientArgs) -> anyhow::Result<ClientConfig> {
    let server = required(a.server, "server")?;
    if !server.contains(':') {
        bail!("--server {server:?} needs a port, e.g. {server}:7700");
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
    let root = std::path::absolute(required_root(a.root)?)?;
    Ok(ClientConfig {
        server,
        watch: watch_config(&root, a.watcher.as_deref(), a.poll_interval_ms)?,
        secret: Secret::load(&required(a.secret_file, "secret-file")?)?,
        root,
        name,
        max_rate: a.max_rate,
        once: a.once,
        insecure_plaintext: a.insecure_plaintext,
        server_fingerprint: match a.server_fingerprint {
            Some(fp) if a.insecure_plaintext => {
                bail!("--server-fingerprint {fp} cannot be checked with --insecure-plaintext: drop one")
            }
            Some(fp) => Some(
                fp.parse()
                    .map_err(|e: String| anyhow::anyhow!("--server-fingerprint: {e}"))?,
            ),
            None => None,
        },
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
        Secret::create(&secret, crate::agent::hex(&bytes).as_bytes())?;
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
    use super::*;

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

    /// The long flags of a subcommand, less `--help` and `--config`.
    fn flags<T: argh::ArgsInfo>() -> Vec<&'static str> {
        let mut flags: Vec<&str> = T::get_args_info()
            .flags
            .iter()
            .map(|f| f.long.trim_start_matches("--"))
            .filter(|f| !["help", "config"].contains(f))
            .collect();
        flags.sort();
        flags
    }

    fn keys(merge: impl FnOnce(&mut Merge<'_>) -> anyhow::Result<()>) -> Vec<&'static str> {
        let empty = config::File::parse(Path::new("empty.toml"), "").unwrap();
        let mut m = Merge::new(&empty);
        merge(&mut m).unwrap();
        let mut keys = m.known().to_vec();
        keys.sort();
        keys
    }

    #[test]
    fn every_flag_is_a_config_key() {
        let mut server = ServerArgs::from_args(&["server"], &[]).unwrap();
        assert_eq!(keys(|m| server.merge(m)), flags::<ServerArgs>());
        let mut client = ClientArgs::from_args(&["client"], &[]).unwrap();
        assert_eq!(keys(|m| client.merge(m)), flags::<ClientArgs>());
    }

    /// A temporary directory with a secret file in it.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("ferry-cli-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            let _ = std::fs::remove_file(d.join("secret"));
            Secret::create(&d.join("secret"), b"0123456789abcdef-test").unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The client's configuration from `cli` and, if given, a config file holding `file`.
    fn client(dir: &Path, cli: &[&str], file: Option<&str>) -> anyhow::Result<ClientConfig> {
        let mut a =
            ClientArgs::from_args(&["client"], cli).map_err(|e| anyhow::anyhow!("{}", e.output))?;
        if let Some(text) = file {
            let path = dir.join("ferry.toml");
            let f = config::File::parse(&path, text)?;
            let mut m = Merge::new(&f);
            a.merge(&mut m)?;
            m.finish()?;
        }
        client_config(a)
    }

    #[test]
    fn client_settings_by_precedence() {
        let d = Dir::new("client");
        let secret = d.0.join("secret");
        let secret = secret.to_str().unwrap();
        let root = d.0.join("root");
        let root = root.to_str().unwrap();
        let base = ["--root", root, "--secret-file", secret];
        let file = "server = \"nas:7700\"\nname = \"from-file\"\nwatcher = \"poll\"\n\
                    poll-interval-ms = 500\nmax-rate = \"2M\"\nquiet = true";

        // Built-in defaults: nothing but what is required.
        let c = client(
            &d.0,
            &[&base[..], &["--server", "h:1", "--name", "n"]].concat(),
            None,
        )
        .unwrap();
        assert_eq!(
            (c.watch.backend, c.watch.poll_interval, c.max_rate),
            (default_backend(), Duration::from_millis(1000), None)
        );

        // The file fills everything the command line left out.
        let c = client(&d.0, &base, Some(file)).unwrap();
        assert_eq!(
            (c.server.as_str(), c.name.as_str(), c.watch.backend),
            ("nas:7700", "from-file", Backend::Poll)
        );
        assert_eq!(
            (c.watch.poll_interval, c.max_rate),
            (Duration::from_millis(500), Some(2 << 20))
        );

        // The command line wins.
        let cli = [
            &base[..],
            &[
                "--server",
                "pi:1",
                "--name",
                "from-cli",
                "--watcher",
                "inotify",
            ],
            &["--poll-interval-ms", "7", "--max-rate", "1K"],
        ]
        .concat();
        let c = client(&d.0, &cli, Some(file)).unwrap();
        assert_eq!(
            (c.server.as_str(), c.name.as_str(), c.watch.backend),
            ("pi:1", "from-cli", Backend::Inotify)
        );
        assert_eq!(
            (c.watch.poll_interval, c.max_rate),
            (Duration::from_millis(7), Some(1024))
        );

        // Paths in the file are relative to it; the root may come from the file.
        let c = client(
            &d.0,
            &[],
            Some("server = \"h:1\"\nname = \"n\"\nroot = \"r\"\nsecret-file = \"secret\""),
        )
        .unwrap();
        assert_eq!(c.root, d.0.join("r"));

        // The file's values are validated like the command line's.
        for (text, want) in [
            ("watcher = \"fsevents\"", "unknown watcher \"fsevents\""),
            ("max-rate = \"fast\"", "key \"max-rate\": bad rate \"fast\""),
            ("poll-interval-ms = 0", "at least 1"),
            ("name = \"\"", "--name must be 1 to 64"),
        ] {
            let cli = [&base[..], &["--server", "h:1"]].concat();
            let err = format!("{:#}", client(&d.0, &cli, Some(text)).unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn missing_required_settings_say_where_to_give_them() {
        let d = Dir::new("required");
        let secret = d.0.join("secret");
        let secret = secret.to_str().unwrap();
        for (cli, want) in [
            (
                vec!["--server", "h:1", "--secret-file", secret],
                "--root is required",
            ),
            (
                vec!["--root", "r", "--secret-file", secret],
                "--server is required",
            ),
            (
                vec!["--root", "r", "--server", "h:1"],
                "--secret-file is required",
            ),
        ] {
            let err = format!("{:#}", client(&d.0, &cli, None).unwrap_err());
            assert!(err.contains(want), "{cli:?}: {err}");
        }
    }

    #[cfg(feature = "server")]
    #[test]
    fn server_settings_by_precedence() {
        let d = Dir::new("server");
        let path = d.0.join("ferry.toml");
        let file = config::File::parse(
            &path,
            "root = \"share\"\nsecret-file = \"secret\"\nlisten = \"127.0.0.1:1\"\n\
             tombstone-days = 2\nmax-tombstones = 5\nready-file = \"ready\"",
        )
        .unwrap();
        let merged = |cli: &[&str]| {
            let mut a = ServerArgs::from_args(&["server"], cli).unwrap();
            let mut m = Merge::new(&file);
            a.merge(&mut m).unwrap();
            m.finish().unwrap();
            server_config(a).unwrap()
        };
        let c = merged(&[]);
        assert_eq!(c.root, d.0.join("share"));
        assert_eq!(c.listen.to_string(), "127.0.0.1:1");
        assert_eq!(c.ready_file, Some(d.0.join("ready")));
        assert_eq!(
            (c.retention.max_age_secs, c.retention.max_count),
            (2 * 86_400, 5)
        );
        let c = merged(&["--tombstone-days", "3", "--listen", "127.0.0.1:2"]);
        assert_eq!(c.listen.to_string(), "127.0.0.1:2");
        assert_eq!(
            (c.retention.max_age_secs, c.retention.max_count),
            (3 * 86_400, 5)
        );
    }
}
