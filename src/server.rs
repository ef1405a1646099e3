//! The server agent: owns the authoritative tree and index, accepts commits from clients,
//! notices changes other programs make in its tree, and broadcasts every accepted change.
//!
//! One actor task owns all state (index, tree cache, client table) and handles one `Event` at
//! a time, so a commit's check of the base and its rename into place can never interleave with
//! another change to the same path. Connection tasks only speak the protocol.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use smol::Async;

use crate::agent::{self, hex, AUTH_TIMEOUT, IDLE_TIMEOUT};
use crate::beneath::Stat;
use crate::core::entry::{check_target, Entry, Kind};
use crate::core::index::{Index, Record, Retention, Stored, StoredRef, MARK_EVERY_SECS};
use crate::core::layered::Layered;
use crate::core::path::RelPath;
use crate::core::renames::{detect_renames, Changed, Seen};
use crate::core::tracked::worth_repacking;
use crate::fsops;
use crate::ftpd::{self, FtpCredentials, Receipts};
use crate::gate::{Gate, Ticket};
use crate::proto::auth::{random, Channel, Secret};
use crate::proto::codec::{read_frame, write_frame, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use crate::proto::msg::{
    Change, ClientMsg, Grant, Op, Outcome, PackItem, ProbeTarget, ServerMsg, CATCH_UP_WINDOW,
    CHANGES_PER_FRAME, PACK_FILE_MAX, PACK_MAX_BYTES, PACK_MAX_ITEMS, PROTOCOL_VERSION,
};
use crate::scan::{RootLost, Tree};
use crate::status::{self, Board, Peer, Serving};
use crate::store;
use crate::tls::{self, Link};
use crate::watch::{Hint, WatchConfig, Watcher};

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The tree it owns.
    pub root: PathBuf,
    /// Control channel address.
    pub listen: SocketAddr,
    /// Which FTP server carries the bytes.
    pub ftp: FtpMode,
    /// Shared secret.
    pub secret: Secret,
    /// Watcher settings.
    pub watch: WatchConfig,
    /// How long and how many deletes are remembered for clients that were away.
    pub retention: Retention,
    /// Written with the bound addresses once the server accepts connections.
    pub ready_file: Option<PathBuf>,
    /// No TLS on the control channel or the embedded FTP server (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    /// Connections open at once, at most (`--max-connections`).
    pub max_connections: usize,
}

/// The data plane's FTP server.
#[derive(Debug, Clone)]
pub enum FtpMode {
    /// The embedded server (libunftp), listening here: per-session credentials, writes
    /// confined to the replica's staging area.
    Embedded(SocketAddr),
    /// The NAS's own FTP server, whose root is the same tree: one shared account handed to every
    /// authenticated client (see README for what this gives up).
    External {
        /// `HOST:PORT` clients connect to (an unspecified IP means "the server's address").
        addr: SocketAddr,
        /// The FTP account.
        user: String,
        /// Its password.
        pass: String,
    },
}

/// Seqs are reserved in steps of this many, durably, before any is handed out: after a crash
/// the server resumes above the reservation, so no seq is ever given to two changes. A step
/// costs a file written and two fsyncs on the server's loop, so it is large: a step of 1,000
/// came once per pack of small files. A crash skipping up to a million seqs costs nothing (a
/// u64 lasts).
const SEQ_RESERVATION: u64 = 1 << 20;

/// A client whose outgoing queue grows past this many frames is too slow and is dropped (it
/// reconnects and catches up from its last seq). A catch-up's own frames do not count: they
/// wait in its `CatchUp` until the client has room.
const MAX_QUEUED_FRAMES: usize = 10_000;

/// Events waiting for the main loop. Bounded, so that a peer sending frames faster than the
/// server handles them is slowed down (its reading task waits for room, then TCP's window
/// closes on it) instead of queueing them in memory without limit.
const MAX_QUEUED_EVENTS: usize = 256;

/// How long after a journal append it is fsynced (see `store`).
const SYNC_DELAY: Duration = Duration::from_secs(1);

/// What the server persists: its index and the tree cache (inodes for rename detection,
/// and so a restart does not re-hash every file).
#[derive(Default, Serialize, Deserialize)]
struct Saved {
    index: Stored,
    local: BTreeMap<RelPath, Seen>,
}

/// Borrowed form of `Saved`, to write a snapshot without cloning.
#[derive(Serialize)]
struct SavedRef<'a> {
    index: StoredRef<'a>,
    local: &'a Layered<Seen>,
}

/// One journal record: what changed in the index and the tree cache.
#[derive(Serialize, Deserialize)]
struct Batch {
    seq: u64,
    horizon: u64,
    /// A new (seq, time) mark of the index, if one was made.
    mark: Option<(u64, u64)>,
    records: Vec<(RelPath, Option<Record>)>,
    local: Vec<(RelPath, Option<Seen>)>,
}

impl store::Durable for Saved {
    type Batch = Batch;
    fn apply(&mut self, b: Batch) {
        self.index.seq = self.index.seq.max(b.seq);
        self.index.horizon = self.index.horizon.max(b.horizon);
        if let Some(mark) = b.mark {
            if self.index.marks.last().is_none_or(|last| last.0 < mark.0) {
                self.index.marks.push(mark);
            }
        }
        for (p, r) in b.records {
            self.index.restore(p, r);
        }
        for (p, s) in b.local {
            match s {
                Some(s) => self.local.insert(p, s),
                None => self.local.remove(&p),
            };
        }
    }
}

enum Event {
    Connected {
        id: u64,
        name: String,
        staging: String,
        tx: Sender<ServerMsg>,
        socket: Arc<Async<TcpStream>>,
    },
    Msg {
        id: u64,
        msg: ClientMsg,
        /// For a `CommitPack`: its files, split out while earlier events were handled.
        split: Option<Split>,
    },
    Gone {
        id: u64,
    },
    Hints(Vec<Hint>),
    Sync,
    /// Hourly: see `Server::housekeeping`.
    Housekeeping,
    /// SIGINT or SIGTERM.
    Stop,
}

struct ClientHandle {
    name: String,
    /// Its staging directory's name (see `Grant::staging`).
    staging: String,
    tx: Sender<ServerMsg>,
    socket: Arc<Async<TcpStream>>,
    subscribed: bool,
    /// The catch-up its `Subscribe` asked for, while some of it is still to be sent.
    catch_up: Option<CatchUp>,
    /// Unix seconds.
    since: u64,
    /// Its address, for `ferry status`.
    addr: String,
}

/// A catch-up on its way to a client: its frames are made and sent as the client takes the
/// ones before (`ClientMsg::Took`), at most `CATCH_UP_WINDOW` ahead. Queued at once, a
/// listing was read whole into the client's memory (187 MiB for a million paths).
struct CatchUp {
    /// The changes not sent yet.
    rest: std::vec::IntoIter<Change>,
    /// How many more frames the client has room for.
    room: usize,
    /// The `CaughtUp` that ends it.
    seq: u64,
    full: bool,
    /// Frames published meanwhile, sent after the `CaughtUp`.
    held: Vec<Vec<Change>>,
}

impl ClientHandle {
    /// Sends what the client has room for of its catch-up, and once all of it is sent, the
    /// `CaughtUp` and the frames held back meanwhile.
    fn send_catch_up(&mut self) {
        let Some(up) = &mut self.catch_up else {
            return;
        };
        while up.room > 0 && up.rest.len() > 0 {
            let frame: Vec<Change> = up.rest.by_ref().take(CHANGES_PER_FRAME).collect();
            up.room -= 1;
            let _ = self.tx.try_send(ServerMsg::Changes(frame));
        }
        if up.rest.len() == 0 {
            let up = self.catch_up.take().expect("checked above");
            let _ = self.tx.try_send(ServerMsg::CaughtUp {
                seq: up.seq,
                full: up.full,
            });
            for frame in up.held {
                let _ = self.tx.try_send(ServerMsg::Changes(frame));
            }
        }
    }

    /// Frames waiting for it: queued to its writer, or held back behind its catch-up.
    fn waiting(&self) -> usize {
        self.tx.len() + self.catch_up.as_ref().map_or(0, |up| up.held.len())
    }
}

/// What connection tasks share.
struct Shared {
    root: PathBuf,
    secret: Secret,
    epoch: u64,
    /// FTP host clients should use (`None`: the address they reached us on) and port.
    ftp_host: Option<String>,
    ftp_port: u16,
    /// The external server's shared account; `None` with the embedded server.
    external: Option<(String, String)>,
    creds: FtpCredentials,
    /// TLS for the control channel (`None`: `--insecure-plaintext`).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// What the handshake is bound to: the certificate's fingerprint (zeros in plaintext).
    channel: Channel,
    gate: Arc<Gate>,
    /// Splits packs as their commits arrive.
    splitter: Arc<Splitter>,
}

struct Server {
    root: PathBuf,
    index: Index,
    tree: Tree,
    clients: HashMap<u64, ClientHandle>,
    events: Sender<Event>,
    /// Seqs up to this are durably reserved.
    reserved: u64,
    journal: store::Journal,
    /// An fsync of the journal is scheduled.
    sync_pending: bool,
    /// Set when a scan found the root gone: the server stops (see `Tree::check_root`).
    lost: Option<RootLost>,
    retention: Retention,
    /// A mark of the index not yet journaled.
    new_mark: Option<(u64, u64)>,
    /// What `ferry status` shows, and the socket it answers on.
    board: Arc<Board>,
    _status: Serving,
    /// When the entry and byte totals in the board were last counted (they walk the index).
    counted_at: Option<Instant>,
    /// How many paths the tree cache held when it was last repacked (see `repack_if_grown`).
    packed_len: usize,
    /// Commits accepted, and changes published, since the start.
    accepted: u64,
    published: u64,
    /// Files of the pack being committed, by the name its commits give them (see
    /// `split_pack`): checked and durable already, so put in place without a hash or a sync of
    /// their own; the pack's renames are synced once at its end.
    pack_parts: HashMap<String, (PathBuf, Stat)>,
    /// Hashes the embedded FTP server took of uploads as they arrived.
    receipts: Receipts,
    splitter: Arc<Splitter>,
}

fn seq_file(root: &Path) -> PathBuf {
    fsops::state_dir(root).join("server.seq")
}

fn staging_dir(root: &Path) -> PathBuf {
    fsops::state_dir(root).join("staging")
}

/// Uploads not resumed for this long are given up (their staged part is removed).
const STAGED_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The path of the staged upload `name` of the client whose staging directory is `staging`.
fn staged_path(root: &Path, staging: &str, name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("bad staged file name {name:?}");
    }
    Ok(staging_dir(root).join(staging).join(name))
}

/// Size of `file` and BLAKE3 of its first `len` bytes; (0, hash of nothing) if it could not
/// be opened or is not a regular file.
fn prefix_hash(file: std::io::Result<std::fs::File>, len: u64) -> (u64, crate::core::entry::Hash) {
    use std::io::Read;
    let none = (0, *blake3::hash(b"").as_bytes());
    let Ok(f) = file else { return none };
    let Ok(meta) = f.metadata() else { return none };
    if !meta.is_file() {
        return none;
    }
    let mut hasher = blake3::Hasher::new();
    match hasher.update_reader(f.take(len)) {
        Ok(_) => (meta.len(), *hasher.finalize().as_bytes()),
        Err(_) => none,
    }
}

/// Opens a staged upload for reading (not through a symlink: staging areas hold files only).
fn open_staged(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

/// A pack's files, being split out of it: what `split_pack` returns.
type Split = smol::Task<anyhow::Result<Vec<Option<(PathBuf, Stat)>>>>;

/// Splits packs into their files (see `split_pack`) on other threads.
struct Splitter {
    root: PathBuf,
    /// The state directory's `tmp`, where the files go.
    tmp: PathBuf,
    receipts: Receipts,
    /// Packs split so far: each one's files get fresh names.
    made: std::sync::atomic::AtomicU64,
    /// Splits under way.
    running: Arc<std::sync::atomic::AtomicUsize>,
}

/// Splits started as their `CommitPack` arrives (ahead of the server's commits) at once, at
/// most: each holds a pack's bytes (up to `PACK_MAX_BYTES`) in memory while it runs.
const EARLY_SPLITS: usize = 2;

impl Splitter {
    /// `start`, from a connection, while fewer than `EARLY_SPLITS` run: the pack is split by
    /// the time the server gets to its commit, if earlier ones kept it busy. `None`: the
    /// server splits it when it gets there.
    fn start_early(&self, staging: &str, staged: &str, items: &[PackItem]) -> Option<Split> {
        use std::sync::atomic::Ordering;
        self.running
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < EARLY_SPLITS).then_some(n + 1)
            })
            .ok()?;
        let running = Running(self.running.clone());
        Some(self.split(staging, staged, items, running))
    }

    /// Starts splitting, on another thread, the pack a client (whose staging directory is
    /// `staging`) uploaded as `staged`, for the `items` of its `CommitPack`.
    fn start(&self, staging: &str, staged: &str, items: &[PackItem]) -> Split {
        self.running
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let running = Running(self.running.clone());
        self.split(staging, staged, items, running)
    }

    fn split(&self, staging: &str, staged: &str, items: &[PackItem], running: Running) -> Split {
        use std::sync::atomic::Ordering;
        let checked = if items.len() > PACK_MAX_ITEMS {
            Err(anyhow::anyhow!(
                "{} files in one pack (at most {PACK_MAX_ITEMS})",
                items.len()
            ))
        } else {
            staged_path(&self.root, staging, staged)
        };
        let entries: Vec<Entry> = items.iter().map(|i| i.entry.clone()).collect();
        let (tmp, receipts) = (self.tmp.clone(), self.receipts.clone());
        let prefix = format!("k{}", self.made.fetch_add(1, Ordering::Relaxed));
        smol::unblock(move || {
            let _running = running;
            checked.and_then(|pack| {
                receipts.forget(&pack);
                split_pack(&pack, &tmp, &prefix, &entries)
            })
        })
    }
}

/// One split under way, counted in `Splitter::running` for as long as it lives (run, or
/// dropped unrun).
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits for a split whose commit will not be made, and removes its files.
async fn discard(split: Split) {
    if let Ok(parts) = split.await {
        for (path, _) in parts.into_iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Splits the pack at `pack` into one file per entry, in the state directory's `tmp` (out of
/// the client's reach) as `<prefix>-<i>`, each with its entry's size, mode and mtime. The pack
/// is removed; it must hold exactly the entries' bytes, at most `PACK_MAX_BYTES`. A file whose
/// bytes do not match its entry's hash is not written (`None`); the others are made durable
/// with one `sync_fs` and returned with what they are.
fn split_pack(
    pack: &Path,
    tmp: &Path,
    prefix: &str,
    entries: &[Entry],
) -> anyhow::Result<Vec<Option<(PathBuf, Stat)>>> {
    use std::io::Read;
    let _reuse = crate::beneath::Reuse::start();
    let file =
        open_staged(pack).with_context(|| format!("staged pack {} is missing", pack.display()))?;
    let len = file.metadata()?.len();
    let _ = std::fs::remove_file(pack);
    // Each size is checked before they are added up: a peer's sizes could overflow the sum.
    if let Some(e) = entries.iter().find(|e| e.size > PACK_FILE_MAX) {
        bail!(
            "a file of {} bytes in a pack (at most {PACK_FILE_MAX})",
            e.size
        );
    }
    let total: u64 = entries.iter().map(|e| e.size).sum();
    if len != total || total > PACK_MAX_BYTES {
        bail!("the pack holds {len} bytes, its files {total} (at most {PACK_MAX_BYTES})");
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes)?;
    let mut parts = Vec::with_capacity(entries.len());
    let mut rest = &bytes[..];
    for (i, e) in entries.iter().enumerate() {
        let (part, tail) = rest.split_at(e.size as usize);
        rest = tail;
        if *blake3::hash(part).as_bytes() != e.hash {
            parts.push(None);
            continue;
        }
        let path = tmp.join(format!("{prefix}-{i}"));
        let meta = fsops::write_unsynced(&path, part, e)?;
        parts.push(Some((path, meta)));
    }
    if let Err(e) = fsops::sync_fs(tmp) {
        for (path, _) in parts.iter().flatten() {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.into());
    }
    Ok(parts)
}

/// Writes the bytes of the `wanted` files (read beneath `root`, each checked against its
/// entry) back to back into `pack`; says for each whether it is there.
fn build_pack(
    root: &Path,
    wanted: &[Option<(RelPath, Entry)>],
    pack: &Path,
) -> anyhow::Result<Vec<bool>> {
    let _reuse = crate::beneath::Reuse::start();
    let mut bytes = Vec::new();
    let present = wanted
        .iter()
        .map(|w| {
            w.as_ref()
                .is_some_and(|(path, e)| fsops::append_file(root, path, e, &mut bytes))
        })
        .collect();
    if let Some(dir) = pack.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(pack, &bytes).with_context(|| format!("cannot write {}", pack.display()))?;
    Ok(present)
}

/// Removes staged uploads nobody came back for, and anything else that does not belong.
fn prune_staging(root: &Path) {
    let Ok(dirs) = std::fs::read_dir(staging_dir(root)) else {
        return;
    };
    for dir in dirs.flatten() {
        let path = dir.path();
        if !dir.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        for f in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let stale = f
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > STAGED_MAX_AGE);
            if stale {
                log::info!(
                    "removing an upload not resumed for a day: {}",
                    f.path().display()
                );
                let _ = std::fs::remove_file(f.path());
            }
        }
        let _ = std::fs::remove_dir(&path);
    }
}

/// Runs the server until it fails or is told to stop (SIGINT, SIGTERM).
pub fn run(cfg: ServerConfig) -> anyhow::Result<()> {
    let stop = crate::signals::listen().context("cannot set up signal handling")?;
    smol::block_on(serve(cfg, stop))
}

async fn serve(cfg: ServerConfig, stop: Receiver<nix::sys::signal::Signal>) -> anyhow::Result<()> {
    let root = cfg.root.clone();
    let meta = std::fs::metadata(&root)
        .with_context(|| format!("server root {} is not accessible", root.display()))?;
    if !meta.is_dir() {
        bail!("server root {} is not a directory", root.display());
    }
    std::fs::create_dir_all(fsops::state_dir(&root))
        .context("cannot create the state directory")?;
    // First: a second agent on this tree must stop before it touches the state (and the
    // first one's temporary files).
    let board = Board::new("server", "server", &root);
    let status = status::serve(&root, board.clone())?;
    fsops::prepare_state_dir(&root).context("cannot prepare the state directory")?;
    fsops::clear_fetched(&root);
    prune_staging(&root);
    std::fs::create_dir_all(staging_dir(&root))?;
    let identity = if cfg.insecure_plaintext {
        log::warn!(
            "--insecure-plaintext: the control channel and FTP run unencrypted; anyone on the \
             network can read file contents and the FTP passwords, and impersonate this server"
        );
        None
    } else {
        let id = tls::load_or_create(&fsops::state_dir(&root).join("tls"))?;
        log::info!(
            "TLS certificate {} (clients pin it: --server-fingerprint)",
            id.fingerprint
        );
        Some(id)
    };

    let (saved, journal) =
        store::Journal::open_or_reset::<Saved>(&fsops::state_dir(&root), "server")
            .context("cannot open the server's state")?;
    let ((mut index, entries), local) = (Index::from_stored(saved.index), saved.local);
    if index.epoch == 0 {
        index = Index::new(u64::from_le_bytes(random()) | 1);
        log::info!("new index, epoch {:016x}", index.epoch);
    }
    let reserved: u64 = store::load(&seq_file(&root))?.unwrap_or(0);
    index.seq = index.seq.max(reserved);

    let (hint_tx, hint_rx) = async_channel::unbounded();
    let _watcher = Watcher::spawn(cfg.watch.clone(), hint_tx)
        .with_context(|| format!("cannot watch {}", root.display()))?;

    let (events_tx, events_rx) = async_channel::bounded(MAX_QUEUED_EVENTS);
    let receipts = Receipts::default();
    let mut server = Server {
        root: root.clone(),
        index,
        tree: {
            // The index's entries are kept as the tree's base (see `core::index`).
            let mut tree = Tree::new(root.clone(), local);
            tree.keep_base(entries);
            tree
        },
        clients: HashMap::new(),
        events: events_tx.clone(),
        reserved,
        journal,
        sync_pending: false,
        lost: None,
        retention: cfg.retention,
        new_mark: None,
        board,
        _status: status,
        counted_at: None,
        packed_len: 0,
        accepted: 0,
        published: 0,
        pack_parts: HashMap::new(),
        receipts: receipts.clone(),
        splitter: Arc::new(Splitter {
            tmp: fsops::tmp_dir(&root),
            root: root.clone(),
            receipts,
            made: Default::default(),
            running: Default::default(),
        }),
    };
    log::info!("scanning {}", root.display());
    server.startup_scan()?;
    if let Some(lost) = server.lost.take() {
        return Err(lost.into());
    }

    let creds = FtpCredentials::new();
    // The embedded server lives as long as this function (its thread stops with the process).
    let (_embedded, ftp_addr, external) = match &cfg.ftp {
        FtpMode::Embedded(listen) => {
            let tls = identity.as_ref().map(|id| id.config.clone());
            let ftp = ftpd::start(
                root.clone(),
                *listen,
                creds.clone(),
                server.receipts.clone(),
                tls,
            )?;
            let addr = ftp.addr;
            (Some(ftp), addr, None)
        }
        FtpMode::External { addr, user, pass } => {
            log::warn!(
                "using the external FTP server at {addr}: one shared account for every client, \
                 writes not confined to staging (see README, \"External FTP server\")"
            );
            (None, *addr, Some((user.clone(), pass.clone())))
        }
    };
    let listener = Async::<TcpListener>::bind(cfg.listen).with_context(|| {
        format!(
            "cannot listen on {} (in use? try another --listen)",
            cfg.listen
        )
    })?;
    let control = listener.get_ref().local_addr()?;
    log::info!(
        "serving {} on control {control}, FTP {}, watcher {}, {} entries, epoch {:016x}",
        root.display(),
        ftp_addr,
        cfg.watch.backend.name(),
        server.index.live_count(&server.tree),
        server.index.epoch
    );
    if let Some(ready) = &cfg.ready_file {
        let fingerprint = identity
            .as_ref()
            .map_or_else(|| "none".to_string(), |id| id.fingerprint.to_string());
        let text = format!("control={control}\nftp={ftp_addr}\nfingerprint={fingerprint}\n");
        store::write_atomic(ready, text.as_bytes())
            .with_context(|| format!("cannot write ready file {}", ready.display()))?;
    }

    server.board.update(|r| {
        r.security = identity.as_ref().map_or_else(
            || "plaintext (--insecure-plaintext)".into(),
            |id| format!("TLS, certificate {}", id.fingerprint),
        )
    });
    let shared = Arc::new(Shared {
        root: root.clone(),
        secret: cfg.secret.clone(),
        epoch: server.index.epoch,
        ftp_host: (!ftp_addr.ip().is_unspecified()).then(|| ftp_addr.ip().to_string()),
        ftp_port: ftp_addr.port(),
        external,
        creds,
        channel: identity
            .as_ref()
            .map_or(tls::Fingerprint::PLAINTEXT, |id| id.fingerprint)
            .0,
        tls: identity.map(|id| id.config),
        gate: Gate::new(cfg.max_connections),
        splitter: server.splitter.clone(),
    });
    smol::spawn(accept_loop(listener, shared, events_tx.clone())).detach();
    {
        let events = events_tx.clone();
        smol::spawn(async move {
            loop {
                smol::Timer::after(Duration::from_secs(MARK_EVERY_SECS)).await;
                if events.send(Event::Housekeeping).await.is_err() {
                    break;
                }
            }
        })
        .detach();
    }
    smol::spawn(forward_hints(hint_rx, events_tx.clone())).detach();
    smol::spawn(async move {
        if stop.recv().await.is_ok() {
            let _ = events_tx.send(Event::Stop).await;
        }
    })
    .detach();
    while let Ok(ev) = events_rx.recv().await {
        if let Event::Stop = ev {
            // Uploads in flight stay staged (they resume); the state is made durable.
            server.flush();
            server.sync();
            log::info!("stopped");
            return Ok(());
        }
        server.handle(ev).await;
        server.flush();
        if let Some(lost) = server.lost.take() {
            return Err(lost.into());
        }
    }
    Ok(())
}

async fn forward_hints(rx: Receiver<Vec<Hint>>, events: Sender<Event>) {
    while let Some(hints) = agent::gather_hints(&rx).await {
        if events.send(Event::Hints(hints)).await.is_err() {
            break;
        }
    }
    // At a stop the event queue closes before the watcher is dropped: no news then.
    if !events.is_closed() {
        log::error!("the watcher stopped; changes made directly in the tree are no longer seen");
    }
}

async fn accept_loop(listener: Async<TcpListener>, shared: Arc<Shared>, events: Sender<Event>) {
    let mut next_id = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let now = Instant::now();
                let ticket = match shared.gate.admit(peer.ip(), now) {
                    Ok(t) => t,
                    Err(refusal) => {
                        // Closed at once, before a byte is read.
                        if shared.gate.should_log(now) {
                            log::warn!("{peer}: refused: {refusal}");
                        }
                        continue;
                    }
                };
                next_id += 1;
                let _ = stream.get_ref().set_nodelay(true);
                smol::spawn(connection(
                    stream,
                    peer,
                    next_id,
                    ticket,
                    shared.clone(),
                    events.clone(),
                ))
                .detach();
            }
            Err(e) => {
                log::warn!("accept failed: {e}");
                smol::Timer::after(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads the handshake; returns the client's name, staging directory and FTP user.
async fn handshake(
    link: &mut Link,
    shared: &Shared,
    id: u64,
) -> anyhow::Result<(String, String, String)> {
    let (r, w) = (&mut link.reader, &mut link.writer);
    let ClientMsg::Hello {
        version,
        name,
        id: client_id,
        nonce: cnonce,
    } = read_frame(r, MAX_HANDSHAKE_FRAME).await?
    else {
        bail!("expected Hello as the first frame");
    };
    let refuse = |reason: String| ServerMsg::Refused { reason };
    if version != PROTOCOL_VERSION {
        let why = format!("protocol version {version}; this server speaks {PROTOCOL_VERSION}");
        write_frame(w, &refuse(why.clone())).await?;
        bail!(why);
    }
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        write_frame(w, &refuse("bad client name".into())).await?;
        bail!("bad client name {name:?}");
    }
    let snonce = random::<32>();
    write_frame(
        w,
        &ServerMsg::Challenge {
            version: PROTOCOL_VERSION,
            nonce: snonce,
        },
    )
    .await?;
    let ClientMsg::Auth { proof } = read_frame(r, MAX_HANDSHAKE_FRAME).await? else {
        bail!("expected Auth after Challenge");
    };
    if !shared
        .secret
        .verify_client(&shared.channel, &snonce, &cnonce, &name, &proof)
    {
        write_frame(w, &refuse("authentication failed: wrong secret".into())).await?;
        bail!("client {name:?} failed authentication (wrong secret)");
    }
    let staging = hex(&client_id);
    let (user, pass) = match &shared.external {
        None => {
            let user = format!("ferry-{id}-{}", hex(&random::<6>()));
            let pass = hex(&random::<16>());
            shared.creds.insert(&user, &pass, &staging);
            (user, pass)
        }
        Some((user, pass)) => {
            // The external server writes as its own account and creates no directories for
            // us: make the client's staging directory, writable by that account.
            let dir = staging_dir(&shared.root).join(&staging);
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            (user.clone(), pass.clone())
        }
    };
    write_frame(
        w,
        &ServerMsg::Welcome {
            proof: shared
                .secret
                .server_proof(&shared.channel, &cnonce, &snonce),
            grant: Grant {
                epoch: shared.epoch,
                ftp_host: shared.ftp_host.clone(),
                ftp_port: shared.ftp_port,
                ftp_user: user.clone(),
                ftp_pass: pass,
                staging: staging.clone(),
            },
        },
    )
    .await?;
    Ok((name, staging, user))
}

async fn connection(
    stream: Async<TcpStream>,
    peer: SocketAddr,
    id: u64,
    mut ticket: Ticket,
    shared: Arc<Shared>,
    events: Sender<Event>,
) {
    let hs = async {
        let mut link = match &shared.tls {
            Some(config) => Link::accept(stream, config.clone()).await.map_err(|e| {
                anyhow::anyhow!("TLS handshake failed: {e} (a client with --insecure-plaintext?)")
            })?,
            None => Link::plain(stream),
        };
        let who = handshake(&mut link, &shared, id).await.map_err(|e| {
            if shared.tls.is_none() && e.to_string().contains("exceeds the limit") {
                e.context("a TLS client? this server runs with --insecure-plaintext")
            } else {
                e
            }
        })?;
        Ok((link, who))
    };
    let (link, (name, staging, user)) = match agent::within(AUTH_TIMEOUT, "the handshake", hs).await
    {
        Ok(v) => {
            ticket.authenticated();
            v
        }
        Err(e) => {
            log::warn!("{peer}: refused: {e:#}");
            if let Some(block) = ticket.failed(Instant::now()) {
                log::warn!(
                    "{}: {} failed handshakes within {} s; refusing it for {} s",
                    peer.ip(),
                    crate::gate::MAX_FAILURES,
                    crate::gate::WINDOW.as_secs(),
                    block.as_secs()
                );
            }
            return;
        }
    };
    let Link {
        mut reader,
        writer,
        socket,
    } = link;
    log::info!("{name} connected from {peer}");
    let (tx, rx) = async_channel::unbounded();
    let _ = events
        .send(Event::Connected {
            id,
            name: name.clone(),
            staging: staging.clone(),
            tx,
            socket: socket.clone(),
        })
        .await;
    let writer = agent::spawn_writer(writer, socket.clone(), rx, || ServerMsg::Ping);
    loop {
        match agent::timeout(
            IDLE_TIMEOUT,
            read_frame::<_, ClientMsg>(&mut reader, MAX_FRAME),
        )
        .await
        {
            Ok(msg) => {
                let split = match &msg {
                    ClientMsg::CommitPack { staged, items, .. } => {
                        shared.splitter.start_early(&staging, staged, items)
                    }
                    _ => None,
                };
                if events.send(Event::Msg { id, msg, split }).await.is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                log::info!("{name} disconnected");
                break;
            }
            Err(e) => {
                log::warn!("{name} ({peer}): {e}; closing the connection");
                break;
            }
        }
    }
    shared.creds.remove(&user);
    let _ = events.send(Event::Gone { id }).await;
    let _ = socket.get_ref().shutdown(Shutdown::Both);
    writer.await;
    drop(ticket);
}

impl Server {
    /// Brings the index up to date with the disk after a start: every difference is a change
    /// made while the server was down.
    fn startup_scan(&mut self) -> anyhow::Result<()> {
        let changes = self
            .tree
            .scan_all()
            .with_context(|| format!("cannot scan {}", self.root.display()))?;
        let mut out = self.ingest(changes);
        // Entries the index has but the cache lost track of (not ignored ones: ignoring never
        // deletes).
        let missing: Vec<RelPath> = self
            .index
            .live_paths(&self.tree)
            .filter(|p| self.tree.get(p).is_none())
            .filter(|p| {
                !self.tree.ignores(
                    p,
                    self.index.entry(&self.tree, p).as_ref().map(Entry::is_dir),
                )
            })
            .collect();
        if !missing.is_empty() {
            if let Err(lost) = self.tree.check_root() {
                self.lost = Some(lost);
                return Ok(());
            }
        }
        for p in agent::apply_order(missing, |_| true) {
            out.extend(self.index.set(&mut self.tree, &p, None));
        }
        self.publish(out);
        self.housekeeping();
        // A snapshot now: the first start's epoch, and a short journal from here on. It holds
        // everything, so what the scan changed is not journaled first: that record's lists
        // and encoding were the peak of a first start (100,000 paths: 82 MiB, 62 without).
        self.post_status();
        self.index.forget_changes();
        self.tree.forget_changes();
        self.tree.forget_base_changes();
        self.new_mark = None;
        let saved = SavedRef {
            index: self.index.stored(&self.tree),
            local: self.tree.entries(),
        };
        self.journal
            .compact(&saved)
            .context("cannot write the server's state")?;
        self.repack_if_grown();
        Ok(())
    }

    /// Folds the index's and the tree cache's changes into their packed tables (see
    /// `core::layered`) after the start's scan, a first upload or a large copy
    /// (`tracked::worth_repacking`).
    fn repack_if_grown(&mut self) {
        let now = self.tree.entries().len();
        if worth_repacking(self.packed_len, now) {
            self.tree.repack();
            self.index.repack();
            log::debug!("repacked the index and the cache ({now} paths)");
            self.packed_len = now;
        }
    }

    async fn handle(&mut self, ev: Event) {
        // An event (a pack's commits, a batch of hints) walks to the same few directories.
        let _reuse = crate::beneath::Reuse::start();
        match ev {
            Event::Connected {
                id,
                name,
                staging,
                tx,
                socket,
            } => {
                let addr = socket
                    .get_ref()
                    .peer_addr()
                    .map_or_else(|_| "?".into(), |a| a.to_string());
                self.clients.insert(
                    id,
                    ClientHandle {
                        since: status::now(),
                        addr,
                        name,
                        staging,
                        tx,
                        socket,
                        subscribed: false,
                        catch_up: None,
                    },
                );
            }
            Event::Gone { id } => {
                // Its staging area stays: a broken upload resumes there when it is back.
                self.clients.remove(&id);
            }
            Event::Msg { id, msg, split } => self.on_message(id, msg, split).await,
            Event::Hints(hints) => match agent::scan_hints(&mut self.tree, hints) {
                Ok(changes) => {
                    let out = self.ingest(changes);
                    self.publish(out);
                }
                Err(lost) => self.lost = Some(lost),
            },
            Event::Sync => {
                self.sync_pending = false;
                self.sync();
                self.repack_if_grown();
            }
            Event::Housekeeping => self.housekeeping(),
            Event::Stop => {}
        }
    }

    async fn on_message(&mut self, id: u64, msg: ClientMsg, split: Option<Split>) {
        match msg {
            ClientMsg::Subscribe { .. } if self.clients.get(&id).is_some_and(|c| c.subscribed) => {
                // One listing per connection: a peer asking again and again (without reading)
                // would have the server queue whole listings for it without limit.
                let name = self.clients.get(&id).map_or("?".into(), |c| c.name.clone());
                log::warn!("{name}: a second Subscribe on one connection; closing");
                self.drop_client(id);
            }
            ClientMsg::Subscribe { epoch, since } => {
                let (mut changes, full) =
                    if epoch == self.index.epoch && self.index.can_catch_up_from(since) {
                        (self.index.changes_since(&self.tree, since), false)
                    } else {
                        (self.index.full_listing(&self.tree), true)
                    };
                // What the rules hide now is not sent (the index keeps what it knew of it).
                let tree = &self.tree;
                changes.retain(|c| !tree.ignores(&c.path, c.entry.as_ref().map(Entry::is_dir)));
                self.attach_targets(&mut changes);
                let Some(c) = self.clients.get_mut(&id) else {
                    return;
                };
                log::debug!(
                    "{} subscribed after seq {since}: sending {} changes{}",
                    c.name,
                    changes.len(),
                    if full { " (full listing)" } else { "" }
                );
                let bytes = changes
                    .iter()
                    .filter_map(|c| c.entry.as_ref().map(|e| e.size))
                    .sum();
                let _ = c.tx.try_send(ServerMsg::Listing {
                    changes: changes.len() as u64,
                    bytes,
                });
                c.catch_up = Some(CatchUp {
                    rest: changes.into_iter(),
                    room: CATCH_UP_WINDOW,
                    seq: self.index.seq,
                    full,
                    held: Vec::new(),
                });
                c.subscribed = true;
                c.send_catch_up();
            }
            ClientMsg::Took { frames } => {
                if let Some(c) = self.clients.get_mut(&id) {
                    if let Some(up) = &mut c.catch_up {
                        // Never more than the window, whatever a peer claims to have taken.
                        up.room = (up.room + frames as usize).min(CATCH_UP_WINDOW);
                    }
                    c.send_catch_up();
                }
            }
            ClientMsg::Commit {
                id: cid,
                path,
                op,
                base,
            } => {
                let Some((name, staging)) = self.committer(id) else {
                    return;
                };
                let (outcome, changes) = self.commit(&name, &staging, &path, op, base).await;
                if let Outcome::Failed { reason } = &outcome {
                    log::warn!("{name}: commit of {path} failed: {reason}");
                }
                if let Some(c) = self.clients.get(&id) {
                    let _ = c.tx.try_send(ServerMsg::CommitResult { id: cid, outcome });
                }
                self.publish(changes);
            }
            ClientMsg::Probe {
                id: pid,
                target,
                len,
            } => {
                if self.drop_if_not_reading(id) {
                    return;
                }
                let Some(c) = self.clients.get(&id) else {
                    return;
                };
                type Open = Box<dyn FnOnce() -> std::io::Result<std::fs::File> + Send>;
                let open: Open = match target {
                    ProbeTarget::Staged(name) => match staged_path(&self.root, &c.staging, &name) {
                        Ok(p) => Box::new(move || open_staged(&p)),
                        Err(e) => {
                            log::warn!("{}: {e}; closing", c.name);
                            self.drop_client(id);
                            return;
                        }
                    },
                    // Beneath the root, following no symlink (see `beneath`).
                    ProbeTarget::File(path) => {
                        let root = self.root.clone();
                        Box::new(move || crate::beneath::open_file(&root, &path).map(|(f, _)| f))
                    }
                };
                // Hashing may read a large file: off the actor, answered when done.
                let tx = c.tx.clone();
                smol::spawn(async move {
                    let (size, hash) = smol::unblock(move || prefix_hash(open(), len)).await;
                    let _ = tx
                        .send(ServerMsg::Probed {
                            id: pid,
                            size,
                            hash,
                        })
                        .await;
                })
                .detach();
            }
            ClientMsg::CommitPack {
                id: cid,
                staged,
                items,
            } => {
                let Some((name, staging)) = self.committer(id) else {
                    if let Some(split) = split {
                        discard(split).await;
                    }
                    return;
                };
                let split = split.unwrap_or_else(|| self.splitter.start(&staging, &staged, &items));
                let (outcomes, changes) = self.commit_pack(&name, &staged, items, split).await;
                if let Some(c) = self.clients.get(&id) {
                    let _ = c.tx.try_send(ServerMsg::PackResult { id: cid, outcomes });
                }
                self.publish(changes);
            }
            ClientMsg::Fetch { id: fid, items } => {
                if self.drop_if_not_reading(id) {
                    return;
                }
                let Some(c) = self.clients.get(&id) else {
                    return;
                };
                if items.len() > PACK_MAX_ITEMS {
                    log::warn!("{}: a Fetch of {} files; closing", c.name, items.len());
                    self.drop_client(id);
                    return;
                }
                // Only what is still as asked (and synced, and small) goes in; the bytes are
                // checked against the entry as they are read.
                let mut bytes = 0;
                let wanted: Vec<Option<(RelPath, Entry)>> = items
                    .into_iter()
                    .map(|(path, e)| {
                        let ok = e.kind == Kind::File
                            && e.size <= PACK_FILE_MAX
                            && bytes + e.size <= PACK_MAX_BYTES
                            && self.index.entry(&self.tree, &path).as_ref() == Some(&e)
                            && !self.tree.ignores(&path, Some(false));
                        bytes += if ok { e.size } else { 0 };
                        ok.then_some((path, e))
                    })
                    .collect();
                let pack = staged_path(&self.root, &c.staging, &format!("f{fid}"));
                let (root, tx, who) = (self.root.clone(), c.tx.clone(), c.name.clone());
                // Reading many files: off the actor, answered when done.
                smol::spawn(async move {
                    let built = smol::unblock(move || {
                        let pack = pack?;
                        let present = build_pack(&root, &wanted, &pack)?;
                        let name = pack.file_name().unwrap_or_default().to_string_lossy();
                        anyhow::Ok((name.into_owned(), present))
                    })
                    .await;
                    let (staged, present) = built.unwrap_or_else(|e| {
                        log::warn!("{who}: cannot build a pack of files: {e:#}");
                        (String::new(), Vec::new())
                    });
                    let _ = tx
                        .send(ServerMsg::Fetched {
                            id: fid,
                            staged,
                            present,
                        })
                        .await;
                })
                .detach();
            }
            ClientMsg::Ping => {}
            other => {
                let name = self.clients.get(&id).map_or("?".into(), |c| c.name.clone());
                log::warn!(
                    "{name}: unexpected {} after the handshake; closing",
                    other.kind()
                );
                self.drop_client(id);
            }
        }
    }

    /// Fills in the target of each symlink change from disk (the index does not keep it),
    /// checked against the change's entry. Left `None` if the link changed since: the change
    /// that follows (from the scan that notices) carries the new one.
    fn attach_targets(&self, changes: &mut [Change]) {
        for c in changes {
            let Some(e) = c.entry.as_ref().filter(|e| e.kind == Kind::Symlink) else {
                continue;
            };
            c.target = crate::beneath::read_link(&self.root, &c.path)
                .ok()
                .filter(|t| e.check_link(t).is_ok());
            if c.target.is_none() {
                log::debug!(
                    "{} changed since it was recorded; a newer change follows",
                    c.path
                );
            }
        }
    }

    /// Drops client `id` if more than `MAX_QUEUED_FRAMES` frames wait to be written to it:
    /// it asks without reading the answers, which would otherwise pile up here without limit.
    /// (As in `publish`: a client that was merely slow reconnects, and sends what was not
    /// answered again.) Returns whether it was dropped.
    /// The name and staging area of client `id`, if it is still here and reads its answers
    /// (one that does not is dropped).
    fn committer(&mut self, id: u64) -> Option<(String, String)> {
        if self.drop_if_not_reading(id) {
            return None;
        }
        let c = self.clients.get(&id)?;
        Some((c.name.clone(), c.staging.clone()))
    }

    fn drop_if_not_reading(&mut self, id: u64) -> bool {
        match self.clients.get(&id) {
            Some(c) if c.waiting() > MAX_QUEUED_FRAMES => {
                log::warn!(
                    "{}: does not read its answers ({} waiting); closing",
                    c.name,
                    c.waiting()
                );
                self.drop_client(id);
                true
            }
            _ => false,
        }
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(c) = self.clients.remove(&id) {
            let _ = c.socket.get_ref().shutdown(Shutdown::Both);
        }
    }

    /// Turns scanned disk changes into index changes (renames recognised as such). Deletes
    /// are only believed while the root is intact; otherwise nothing is recorded and the
    /// server stops. Ignored paths are left as the index knew them; a path the rules stopped
    /// hiding (`Tree::scan_rule_changes`) is announced again, for replicas that skipped it.
    fn ingest(&mut self, changes: Vec<Changed>) -> Vec<Change> {
        if self.lost.is_some() {
            return Vec::new();
        }
        if changes.iter().any(|c| c.new.is_none()) {
            if let Err(lost) = self.tree.check_root() {
                self.lost = Some(lost);
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        let mut paths: Vec<RelPath> = Vec::new();
        for (from, to) in detect_renames(&changes) {
            if self.index.entry(&self.tree, &from).is_some()
                && self.index.entry(&self.tree, &to).is_none()
            {
                let (changes, refused) = self.index.rename(&mut self.tree, &from, &to);
                for bad in refused {
                    log::warn!("{bad}: renaming {from} to {to} made it too long to sync");
                }
                out.extend(changes);
                // The index may have moved what was already gone from the directory (a
                // delete not yet seen): check every moved path against the disk below.
                paths.extend(
                    self.index
                        .live_subtree(&self.tree, &to)
                        .into_iter()
                        .map(|(p, _)| p),
                );
            }
        }
        let touched: HashSet<RelPath> = changes
            .iter()
            .filter(|c| c.old.is_some() && c.old == c.new)
            .map(|c| c.path.clone())
            .collect();
        paths.extend(changes.into_iter().map(|c| c.path));
        paths.sort();
        paths.dedup();
        let tree = &self.tree;
        for p in agent::apply_order(paths, |p| tree.get(p).is_none()) {
            let disk = self.tree.get(&p).map(|s| s.entry);
            let is_dir = match &disk {
                Some(e) => Some(e.is_dir()),
                None => self.index.entry(&self.tree, &p).map(|e| e.is_dir()),
            };
            if self.tree.ignores(&p, is_dir) {
                continue;
            }
            match self.index.set(&mut self.tree, &p, disk) {
                Some(c) => out.push(c),
                None if touched.contains(&p) => out.extend(self.index.announce(&self.tree, &p)),
                None => {}
            }
        }
        out
    }

    /// Makes changes durable enough (seq reservation), logs them and broadcasts them.
    fn publish(&mut self, mut changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        self.attach_targets(&mut changes);
        self.published += changes.len() as u64;
        if self.index.seq > self.reserved {
            self.reserved = self.index.seq + SEQ_RESERVATION;
            if let Err(e) = store::save(&seq_file(&self.root), &self.reserved) {
                log::error!(
                    "cannot reserve seqs in {}: {e}",
                    seq_file(&self.root).display()
                );
            }
        }
        // A first scan of a big tree is summarised, not logged file by file.
        let detail = if changes.len() > 100 {
            log::info!(
                "committed {} changes (seq {} to {})",
                changes.len(),
                changes[0].seq,
                self.index.seq
            );
            log::Level::Debug
        } else {
            log::Level::Info
        };
        for c in &changes {
            let what = match (&c.entry, &c.moved_from) {
                (None, _) => "delete".to_string(),
                (Some(_), Some(from)) => format!("rename from {from}"),
                (Some(e), None) if e.kind == Kind::Dir => "mkdir".to_string(),
                (Some(e), None) if e.kind == Kind::Symlink => "link".to_string(),
                (Some(e), None) => format!("{} bytes", e.size),
            };
            log::log!(detail, "committed {} ({what}) as seq {}", c.path, c.seq);
        }
        let mut slow = Vec::new();
        for chunk in changes.chunks(CHANGES_PER_FRAME) {
            for (id, c) in &mut self.clients {
                if !c.subscribed {
                    continue;
                }
                if c.waiting() > MAX_QUEUED_FRAMES {
                    slow.push(*id);
                } else if let Some(up) = &mut c.catch_up {
                    up.held.push(chunk.to_vec());
                } else {
                    let _ = c.tx.try_send(ServerMsg::Changes(chunk.to_vec()));
                }
            }
        }
        for id in slow {
            log::warn!("a client is not keeping up; dropping it so it reconnects and catches up");
            self.drop_client(id);
        }
    }

    /// Journals what changed in the index and the tree cache since the last call, and
    /// schedules the fsync.
    fn flush(&mut self) {
        self.post_status();
        let records = self.index.take_changes(&self.tree);
        // The entries went into `records`.
        self.tree.forget_base_changes();
        let local = self.tree.take_changes();
        let mark = self.new_mark.take();
        if records.is_empty() && local.is_empty() && mark.is_none() {
            return;
        }
        let batch = Batch {
            seq: self.index.seq,
            horizon: self.index.horizon,
            mark,
            records,
            local,
        };
        if let Err(e) = self.journal.append(&batch) {
            log::error!("cannot write the server's journal: {e}");
        }
        if !self.sync_pending {
            self.sync_pending = true;
            let events = self.events.clone();
            smol::spawn(async move {
                smol::Timer::after(SYNC_DELAY).await;
                let _ = events.send(Event::Sync).await;
            })
            .detach();
        }
    }

    /// Copies what `ferry status` shows to its board.
    fn post_status(&mut self) {
        let totals = match self.counted_at {
            Some(t) if t.elapsed() < Duration::from_secs(1) => None,
            _ => {
                self.counted_at = Some(Instant::now());
                let live = self.index.live_count(&self.tree) as u64;
                let mut bytes = 0;
                self.tree.entries().for_each(|_, s| bytes += s.entry.size);
                Some((live, bytes))
            }
        };
        let peers: Vec<Peer> = self
            .clients
            .values()
            .map(|c| Peer {
                name: c.name.clone(),
                addr: c.addr.clone(),
                connected: true,
                since: c.since,
            })
            .collect();
        let (seq, accepted, published) = (self.index.seq, self.accepted, self.published);
        self.board.update(|r| {
            if let Some((files, bytes)) = totals {
                r.files = files;
                r.bytes = bytes;
            }
            r.peers = peers;
            r.seq = seq;
            r.received = accepted;
            r.sent = published;
        });
    }

    /// Dates the index's changes (a mark an hour) and forgets tombstones past retention.
    fn housekeeping(&mut self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(mark) = self.index.mark_time(now) {
            self.new_mark = Some(mark);
        }
        let forgotten = self.index.prune_tombstones(&self.tree, now, self.retention);
        if forgotten > 0 {
            log::info!(
                "forgot {forgotten} deletes (older than {} days, or beyond the newest {}); a \
                 client last in sync before seq {} reconciles in full",
                self.retention.max_age_secs / 86_400,
                self.retention.max_count,
                self.index.horizon
            );
        }
    }

    /// fsyncs the journal, and folds it into a snapshot when it has grown.
    fn sync(&mut self) {
        if let Err(e) = self.journal.sync() {
            log::error!("cannot sync the server's journal: {e}");
        }
        if self.journal.wants_compaction() {
            let saved = SavedRef {
                index: self.index.stored(&self.tree),
                local: self.tree.entries(),
            };
            if let Err(e) = self.journal.compact(&saved) {
                log::error!("cannot write the server's state snapshot: {e}");
            }
        }
    }

    /// Commits the items of a pack the client uploaded as `staged`, split into one file each
    /// (`split`, see `start_split`). Each is committed as a single `Put` is; what is left of
    /// them (a conflict, a refusal) is removed: the client sends such a file again on its own.
    async fn commit_pack(
        &mut self,
        name: &str,
        staged: &str,
        items: Vec<PackItem>,
        split: Split,
    ) -> (Vec<Outcome>, Vec<Change>) {
        let n = items.len();
        let parts = match split.await {
            Ok(parts) => parts,
            Err(e) => {
                let reason = format!("{e:#}");
                log::warn!("{name}: pack {staged} refused: {reason}");
                return (vec![Outcome::Failed { reason }; n], Vec::new());
            }
        };
        let mut outcomes = Vec::with_capacity(n);
        let mut changes = Vec::new();
        for (i, (item, part)) in items.into_iter().zip(parts).enumerate() {
            let (outcome, more) = match part {
                None => {
                    let reason = format!("{}: uploaded bytes do not match their hash", item.path);
                    (Outcome::Failed { reason }, Vec::new())
                }
                Some(part) => {
                    // A name no upload can have (see `staged_path`): only this pack's part.
                    let part_name = format!("pack.{i}");
                    self.pack_parts.insert(part_name.clone(), part);
                    let op = Op::Put {
                        staged: Some(part_name),
                        entry: item.entry,
                    };
                    // No staging directory: the part is found by its name.
                    self.commit(name, "", &item.path, op, item.base).await
                }
            };
            if let Outcome::Failed { reason } = &outcome {
                log::warn!("{name}: commit of {} failed: {reason}", item.path);
            }
            outcomes.push(outcome);
            changes.extend(more);
        }
        // What was not put in place (refused, or there already).
        for (_, (path, _)) in self.pack_parts.drain() {
            let _ = std::fs::remove_file(path);
        }
        // The parts were renamed into place unsynced: durable now, before the commits are
        // journaled (after this event) and announced.
        if let Err(e) = fsops::sync_fs(&self.root) {
            log::error!("cannot sync {}: {e}", self.root.display());
        }
        (outcomes, changes)
    }

    /// Picks up a change made directly on disk at `path` before a commit is checked against it.
    fn refresh(&mut self, path: &RelPath) -> Vec<Change> {
        let (_, changes) = self.tree.refresh(path);
        self.ingest(changes)
    }

    fn done(&self, path: &RelPath) -> Outcome {
        Outcome::Done {
            seq: self.index.seq_of(path).unwrap_or(self.index.seq),
        }
    }

    /// Applies one client commit if its base still holds. Returns the outcome and the changes.
    async fn commit(
        &mut self,
        name: &str,
        staging: &str,
        path: &RelPath,
        op: Op,
        base: Option<Entry>,
    ) -> (Outcome, Vec<Change>) {
        let ignored = match &op {
            Op::Put { entry, .. } => self.tree.ignores(path, Some(entry.is_dir())),
            Op::Mkdir { .. } => self.tree.ignores(path, Some(true)),
            Op::Link { .. } => self.tree.ignores(path, Some(false)),
            Op::Delete => self.tree.ignores(path, None),
            Op::Rename { to } => {
                let is_dir = self.tree.get(path).map(|s| s.entry.is_dir());
                self.tree.ignores(path, is_dir) || self.tree.ignores(to, is_dir)
            }
        };
        if ignored {
            let reason = format!(
                "{path}{} is ignored on the server (a .ferryignore rule or a built-in pattern), \
                 so it is not synced",
                match &op {
                    Op::Rename { to } => format!(" -> {to}"),
                    _ => String::new(),
                }
            );
            return (Outcome::Failed { reason }, Vec::new());
        }
        // A new file: no need to look (`installed` answers a refused install with a conflict).
        let new_file_here = base.is_none()
            && matches!(&op, Op::Put { entry, staged: Some(_) } if entry.kind == Kind::File)
            && self.tree.installs_unseen(path);
        let mut changes = if new_file_here {
            Vec::new()
        } else {
            self.refresh(path)
        };
        let current = self.index.entry(&self.tree, path);
        let conflict = |current: Option<Entry>| Outcome::Conflict { current };
        // A program writing `path` while the commit runs is caught by `install_file`.
        let result: anyhow::Result<Outcome> = match op {
            Op::Put { staged, entry } => {
                if entry.kind != Kind::File {
                    let reason = format!("{path}: a put carries a file's entry");
                    return (Outcome::Failed { reason }, changes);
                }
                if current.as_ref() == Some(&entry) {
                    return (self.done(path), changes);
                }
                if current != base {
                    return (conflict(current), changes);
                }
                if current.as_ref().is_some_and(Entry::is_dir)
                    && self.index.live_subtree(&self.tree, path).len() > 1
                {
                    return (conflict(current), changes);
                }
                match staged {
                    None => self.put_meta(path, current.as_ref(), &entry, &mut changes),
                    Some(name) => {
                        self.put_staged(staging, &name, path, entry, &mut changes)
                            .await
                    }
                }
            }
            Op::Mkdir { mode } => {
                if current
                    .as_ref()
                    .is_some_and(|c| c.is_dir() && c.mode == mode)
                {
                    return (self.done(path), changes);
                }
                if current != base {
                    return (conflict(current), changes);
                }
                // A symlink there (the base the client agreed on) gives way: the link itself.
                let unlinked = if current.as_ref().is_some_and(|c| c.kind == Kind::Symlink) {
                    fsops::remove(&self.root, path).map(drop)
                } else {
                    Ok(())
                };
                unlinked
                    .and_then(|()| fsops::make_dir(&self.root, path, mode))
                    .map(|(seen, created)| {
                        self.record(path, seen, created, &mut changes);
                        self.done(path)
                    })
                    .map_err(Into::into)
            }
            Op::Delete => {
                if current.is_none() {
                    return (self.done(path), changes);
                }
                if current != base {
                    return (conflict(current), changes);
                }
                match fsops::remove(&self.root, path) {
                    Ok(fsops::Removed::Gone) => {
                        self.tree.set(path, None);
                        changes.extend(self.index.set(&mut self.tree, path, None));
                        Ok(self.done(path))
                    }
                    Ok(fsops::Removed::NotEmpty) => Ok(Outcome::Failed {
                        reason: format!("{path} is not empty on the server"),
                    }),
                    Err(e) => Err(e.into()),
                }
            }
            Op::Link { target } => {
                if let Err(why) = check_target(&target) {
                    let reason = format!("{path}: {why}");
                    return (Outcome::Failed { reason }, changes);
                }
                let entry = Entry::link(&target);
                if current.as_ref() == Some(&entry) {
                    return (self.done(path), changes);
                }
                if current != base
                    || (current.as_ref().is_some_and(Entry::is_dir)
                        && self.index.live_subtree(&self.tree, path).len() > 1)
                {
                    return (conflict(current), changes);
                }
                // What the link replaces must still be what the index was just refreshed from.
                let expect = self.tree.get(path);
                match fsops::make_link(&self.root, path, &target, expect.as_ref()) {
                    Ok(installed) => Ok(self.installed(path, installed, &mut changes)),
                    Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => Ok(Outcome::Failed {
                        reason: format!("the server's storage does not hold symlinks ({e})"),
                    }),
                    Err(e) => Err(e.into()),
                }
            }
            Op::Rename { to } => {
                changes.extend(self.refresh(&to));
                if current.is_none() || current != base {
                    return (conflict(current), changes);
                }
                let refusal = if self.index.entry(&self.tree, &to).is_some() {
                    Some("the target exists")
                } else if to.starts_with(path) {
                    Some("a directory cannot move into itself")
                } else {
                    None
                };
                if let Some(why) = refusal {
                    let reason = format!("cannot rename {path} to {to}: {why}");
                    return (Outcome::Failed { reason }, changes);
                }
                match fsops::rename_noreplace(&self.root, path, &to) {
                    Ok(created) => {
                        self.record_created(created, &mut changes);
                        self.tree.rename_subtree(path, &to);
                        let (moved, refused) = self.index.rename(&mut self.tree, path, &to);
                        for bad in refused {
                            log::warn!("{bad}: renaming {path} to {to} made it too long to sync");
                        }
                        changes.extend(moved);
                        Ok(self.done(&to))
                    }
                    Err(e) => Err(e.into()),
                }
            }
        };
        let outcome = result.unwrap_or_else(|e| Outcome::Failed {
            reason: format!("{e:#}"),
        });
        if matches!(outcome, Outcome::Done { .. }) {
            self.accepted += 1;
            log::debug!("{name}: commit of {path} accepted");
        }
        (outcome, changes)
    }

    /// Records parent directories ferry had to create on the way to a path.
    fn record_created(&mut self, created: Vec<(RelPath, Seen)>, changes: &mut Vec<Change>) {
        for (p, s) in created {
            self.tree.set(&p, Some(s.clone()));
            changes.extend(self.index.set(&mut self.tree, &p, Some(s.entry)));
        }
    }

    /// Records what a commit put at `path` (and the parents it created).
    fn record(
        &mut self,
        path: &RelPath,
        seen: Seen,
        created: Vec<(RelPath, Seen)>,
        changes: &mut Vec<Change>,
    ) {
        self.record_created(created, changes);
        self.tree.set(path, Some(seen.clone()));
        changes.extend(self.index.set(&mut self.tree, path, Some(seen.entry)));
    }

    fn put_meta(
        &mut self,
        path: &RelPath,
        current: Option<&Entry>,
        entry: &Entry,
        changes: &mut Vec<Change>,
    ) -> anyhow::Result<Outcome> {
        if !current.is_some_and(|c| c.same_content(entry)) {
            return Ok(Outcome::Failed {
                reason: format!("{path}: metadata-only update, but the server holds other bytes"),
            });
        }
        let seen = fsops::set_meta(&self.root, path, entry)?;
        self.record(path, seen, Vec::new(), changes);
        Ok(self.done(path))
    }

    async fn put_staged(
        &mut self,
        staging: &str,
        staged: &str,
        path: &RelPath,
        entry: Entry,
        changes: &mut Vec<Change>,
    ) -> anyhow::Result<Outcome> {
        if let Some((part, meta)) = self.pack_parts.get(staged) {
            // Checked by `split_pack` and out of the client's reach since; synced already,
            // and a trip to a thread would cost more than the rename.
            let expect = self.tree.get(path);
            let installed =
                fsops::install_unsynced(&self.root, meta, part, path, &entry, expect.as_ref())?;
            if matches!(installed, fsops::Install::Done { .. }) {
                self.pack_parts.remove(staged);
            }
            return Ok(self.installed(path, installed, changes));
        }
        let staged_path = staged_path(&self.root, staging, staged)?;
        let root = self.root.clone();
        let rel = path.clone();
        let staged = staged.to_string();
        // What the upload replaces must still be what the index was just refreshed from.
        let expect = self.tree.get(path);
        let receipts = self.receipts.clone();
        let install = move || -> anyhow::Result<Option<fsops::Install>> {
            let file = open_staged(&staged_path)
                .with_context(|| format!("staged upload {staged} is missing"))?;
            let meta = file.metadata()?;
            let hash = match receipts.take(&staged_path, &meta) {
                Some(hash) => hash,
                None => *blake3::Hasher::new()
                    .update_reader(&file)?
                    .finalize()
                    .as_bytes(),
            };
            if meta.len() != entry.size || hash != entry.hash {
                let _ = std::fs::remove_file(&staged_path);
                return Ok(None);
            }
            Ok(Some(fsops::install_file(
                &root,
                file,
                &staged_path,
                &rel,
                &entry,
                expect.as_ref(),
            )?))
        };
        // Hashing and fsync are slow: off the executor's threads.
        let installed = smol::unblock(install).await?;
        match installed {
            None => Ok(Outcome::Failed {
                reason: format!("{path}: uploaded bytes do not match their size and hash"),
            }),
            Some(installed) => Ok(self.installed(path, installed, changes)),
        }
    }

    /// Records what `install_file` or `make_link` did at `path`, keeping a version of the
    /// server's that was written meanwhile as a conflict copy.
    fn installed(
        &mut self,
        path: &RelPath,
        installed: fsops::Install,
        changes: &mut Vec<Change>,
    ) -> Outcome {
        match installed {
            fsops::Install::ChangedHere => {
                // Written here meanwhile: that is the server's version now; the client
                // decides again against it (an upload stays staged for a retry).
                changes.extend(self.refresh(path));
                Outcome::Conflict {
                    current: self.index.entry(&self.tree, path),
                }
            }
            fsops::Install::Done {
                installed: (seen, created),
                displaced,
            } => {
                self.record(path, seen, created, changes);
                if let Some(old) = displaced {
                    match fsops::keep_as_conflict(&self.root, &old, path, "server") {
                        Ok((copy, created)) => {
                            self.record_created(created, changes);
                            changes.extend(self.refresh(&copy));
                            log::warn!("conflict on {path}: it was written here while an upload arrived; the server's version is kept as {copy}");
                        }
                        Err(e) => log::error!(
                            "conflict on {path}: cannot keep the server's version (left at {}): {e}",
                            old.display()
                        ),
                    }
                }
                self.done(path)
            }
        }
    }
}
