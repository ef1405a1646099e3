//! The client agent: keeps a replica of the server's tree. It remembers, per path, the last
//! state it agreed on with the server (the *base*); every path that changed on either side is
//! decided by `core::plan` from (base, local, remote), then carried out here.
//!
//! Because applying a remote change records the new base and the new local state together, the
//! watcher event that applying causes finds nothing changed: echoes cannot happen.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};
use smol::future::FutureExt;
use smol::Async;

use crate::agent::{self, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use crate::beneath::{self, Stat};
use crate::core::entry::{Entry, Kind};
use crate::core::layered::Layered;
use crate::core::path::RelPath;
use crate::core::plan::{plan, rename_locally, Decision};
use crate::core::renames::{detect_renames, Changed, Seen};
use crate::core::tracked::{worth_repacking, Tracked};
use crate::data::{DataConn, DownloadError, Resume};
use crate::fsops;
use crate::progress::Progress;
use crate::proto::auth::{random, Channel, Secret};
use crate::proto::codec::{read_frame, write_frame, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use crate::proto::msg::{
    Change, ClientMsg, Grant, Op, Outcome, PackItem, ProbeTarget, ServerMsg, PACK_FILE_MAX,
    PACK_MAX_BYTES, PACK_MAX_ITEMS, PROTOCOL_VERSION,
};
use crate::scan::Tree;
use crate::status::{self, Board, Peer, Serving};
use crate::store;
use crate::tls::{self, Fingerprint, Link};
use crate::watch::{Hint, WatchConfig, Watcher};

/// Everything the client needs to run.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of the server's control channel.
    pub server: String,
    /// The replica.
    pub root: PathBuf,
    /// Shared secret.
    pub secret: Secret,
    /// This client's name (logs, conflict copies).
    pub name: String,
    /// Watcher settings.
    pub watch: WatchConfig,
    /// Data-plane rate limit in bytes per second (`--max-rate`).
    pub max_rate: Option<u64>,
    /// Sync until converged with the server once, then exit (`--once`).
    pub once: bool,
    /// No TLS on the control channel or FTP (`--insecure-plaintext`).
    pub insecure_plaintext: bool,
    /// The server certificate to trust (`--server-fingerprint`); `None`: the one pinned in
    /// the state directory, or on first use the one the server shows.
    pub server_fingerprint: Option<Fingerprint>,
}

/// What this client has done since it started: `--once` prints it, `ferry status` shows it.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Changes from the server applied here, and the bytes downloaded for them.
    pub received: u64,
    pub received_bytes: u64,
    /// Local changes the server accepted, and the bytes uploaded for them.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Conflict copies made here (newest last).
    pub conflicts: Vec<String>,
}

impl Stats {
    fn conflict(&mut self, copy: &RelPath) {
        // Bounded: a status report, not a history.
        if self.conflicts.len() == 100 {
            self.conflicts.remove(0);
        }
        self.conflicts.push(copy.to_string());
    }
}

/// What the client persists.
#[derive(Default, Serialize, Deserialize)]
struct Saved {
    epoch: u64,
    last_seq: u64,
    base: BTreeMap<RelPath, Entry>,
    local: BTreeMap<RelPath, Seen>,
    /// Downloads being put in place (journaled before the rename, kept until the rename is
    /// durable): after a crash, one whose file is found in place gets its base, so the start
    /// does not mistake it for a new file; one whose rename was lost loses a base that says
    /// it was done (see `Client::start`).
    applying: BTreeMap<RelPath, Entry>,
}

#[derive(Serialize)]
struct SavedRef<'a> {
    epoch: u64,
    last_seq: u64,
    base: crate::core::base::Whole<'a>,
    local: &'a Layered<Seen>,
    applying: &'a BTreeMap<RelPath, Entry>,
}

/// One journal record: where the client stands, and the base and cache entries that changed.
#[derive(Serialize, Deserialize)]
struct Batch {
    epoch: u64,
    last_seq: u64,
    base: Vec<(RelPath, Option<Entry>)>,
    local: Vec<(RelPath, Option<Seen>)>,
    applying: Vec<(RelPath, Option<Entry>)>,
}

impl store::Durable for Saved {
    type Batch = Batch;
    fn apply(&mut self, b: Batch) {
        self.epoch = b.epoch;
        self.last_seq = b.last_seq;
        for (p, e) in b.base {
            match e {
                Some(e) => self.base.insert(p, e),
                None => self.base.remove(&p),
            };
        }
        for (p, s) in b.local {
            match s {
                Some(s) => self.local.insert(p, s),
                None => self.local.remove(&p),
            };
        }
        for (p, e) in b.applying {
            match e {
                Some(e) => self.applying.insert(p, e),
                None => self.applying.remove(&p),
            };
        }
    }
}

/// An error that retrying cannot fix (wrong secret, incompatible server): the client stops.
#[derive(Debug)]
struct Fatal(String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// How long after a journal append it is fsynced (see `store`).
const SYNC_DELAY: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

struct Client {
    cfg: ClientConfig,
    /// This replica's identity (see `ClientMsg::Hello`).
    id: [u8; 16],
    /// The cache of what is on disk here, and the base kept beside it (see `core::base`).
    tree: Tree,
    epoch: u64,
    last_seq: u64,
    journal: store::Journal,
    /// `(epoch, last_seq)` as last journaled.
    journaled: (u64, u64),
    /// Paths whose local state may differ from the base, not yet handled.
    dirty: BTreeSet<RelPath>,
    /// Local renames seen by scans, not yet sent.
    renames: Vec<(RelPath, RelPath)>,
    /// Batches of watcher hints.
    hints: Receiver<Vec<Hint>>,
    stats: Stats,
    /// What `ferry status` shows, and the socket it answers on.
    board: Arc<Board>,
    _status: Serving,
    /// When the byte total in the board was last counted (it walks the cache).
    counted_at: Option<Instant>,
    /// How many paths the cache held when it was last repacked (see `repack_if_grown`).
    packed_len: usize,
    /// The bytes of the pack being sent, kept from one pack to the next of a batch (see
    /// `upload_pack`): a fresh buffer of up to `PACK_MAX_BYTES` is a page fault every 4 KiB.
    pack_buf: Vec<u8>,
    /// See `Saved::applying`.
    applying: Tracked<Entry>,
    /// Files installed unsynced (see `sync`), whose `applying` records wait for it.
    unsynced_installs: Vec<RelPath>,
    /// Paths the server refused, to try again at `retry_at` (see `send_local`).
    failed: BTreeSet<RelPath>,
    /// Server changes this replica could not apply (a full disk, something in the way, a
    /// directory removed here as it was made, a path changed here as it was applied: see
    /// `decide_again`), to try again at `retry_at`. The server sends a
    /// change once: without this the path would differ here until a full listing. Each has the
    /// `since` of a `Subscribe` that brings it back, and the journal records no `last_seq`
    /// past it (`durable_seq`), so a restart asks for it again.
    unapplied: BTreeMap<RelPath, (Option<Entry>, u64)>,
    /// No more than the least `since` in `unapplied` (lowered as they are added, exact again
    /// after `retry_unapplied`; `u64::MAX` once none is left).
    unapplied_since: u64,
    /// The server change `resolve` is deciding, and the `since` that would bring it back.
    deciding: Option<(RelPath, u64)>,
    retry_at: Option<Instant>,
    retry_pause: Duration,
    /// Links this storage refused to hold (Android's shared storage): each is reported once.
    unlinkable: HashSet<RelPath>,
}

/// Where the server's certificate is pinned: `<root>/.ferry/server.fingerprint`.
fn pin_file(root: &Path) -> PathBuf {
    fsops::state_dir(root).join("server.fingerprint")
}

/// The pinned fingerprint, if one was pinned.
fn read_pin(file: &Path) -> anyhow::Result<Option<Fingerprint>> {
    match std::fs::read_to_string(file) {
        Ok(text) => text.parse().map(Some).map_err(|e: String| {
            anyhow!(
                "{}: {e}; delete it to trust the server's certificate anew",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("cannot read {}: {e}", file.display())),
    }
}

/// One connection to the server.
struct Session {
    tx: Sender<ClientMsg>,
    inbox: Receiver<ServerMsg>,
    /// Messages that arrived while we waited for a commit result.
    deferred: VecDeque<ServerMsg>,
    data: DataConn,
    next_id: u64,
    caught_up: bool,
    /// Paths named while catching up: if the server says it was a full listing (a new index,
    /// or deletes forgotten since we last caught up), the base keeps only these.
    listed: Option<HashSet<RelPath>>,
    /// Changes applied here during the catch-up, for its summary.
    applied: usize,
    /// The seq our latest accepted commit of each path got, until its change comes back:
    /// a change of that path with a lower seq (delivered while we waited) is superseded.
    committed: HashMap<RelPath, u64>,
    /// The catch-up's progress (from `Listing` to `CaughtUp`): changes handled so far, and the
    /// bytes received before it began.
    progress: Option<Progress>,
    listed_count: u64,
    bytes_before: u64,
    /// Directory renames made here (sent, or applied from the server), by old path, until the
    /// server's changes for them are in: the rename's seq and the paths moved here that the
    /// server has not yet confirmed moving.
    renames: HashMap<RelPath, (u64, BTreeSet<RelPath>)>,
    /// Targets of the server's symlink changes, checked, until they are applied here.
    targets: HashMap<RelPath, String>,
    /// Small files fetched in a pack ahead of their changes (see `ask_fetch`): the entry each
    /// was fetched as, its temporary file (durable, with that mode and mtime) and that file's
    /// stat. Used instead of a download if the change still wants that entry.
    prefetched: HashMap<RelPath, (Entry, PathBuf, Stat)>,
}

impl Session {
    /// Forgets the files fetched ahead that no change used, and removes them; returns their
    /// paths and entries (see `Client::drop_prefetched`).
    fn drop_prefetched(&mut self) -> Vec<(RelPath, Entry)> {
        self.prefetched
            .drain()
            .map(|(path, (e, part, _))| {
                let _ = std::fs::remove_file(part);
                (path, e)
            })
            .collect()
    }

    /// Per-file events are logged at info once live; during a catch-up (maybe a first sync of
    /// a big tree) they go to debug and a summary follows.
    fn applied(&mut self) -> log::Level {
        self.applied += 1;
        if self.caught_up {
            log::Level::Info
        } else {
            log::Level::Debug
        }
    }
}

/// Runs the client until it fails or is told to stop (SIGINT, SIGTERM).
pub fn run(cfg: ClientConfig) -> anyhow::Result<()> {
    let stop = crate::signals::listen().context("cannot set up signal handling")?;
    if cfg.insecure_plaintext {
        log::warn!(
            "--insecure-plaintext: the control channel and FTP run unencrypted; anyone on the \
             network can read file contents and impersonate the server"
        );
    }
    smol::block_on(async {
        let mut client = Client::start(cfg)?;
        // Stopping drops whatever `run` was doing: a download in flight stays in
        // `.ferry/tmp` (never under its real name) and resumes next time.
        let result = client
            .run()
            .or(async {
                let _ = stop.recv().await;
                Ok(())
            })
            .await;
        client.flush();
        client.sync();
        if result.is_ok() {
            log::info!("stopped");
        }
        result
    })
}

impl Client {
    fn start(cfg: ClientConfig) -> anyhow::Result<Client> {
        if !cfg.root.exists() {
            std::fs::create_dir_all(&cfg.root)
                .with_context(|| format!("cannot create {}", cfg.root.display()))?;
            log::info!("created {}", cfg.root.display());
        }
        if !std::fs::metadata(&cfg.root)?.is_dir() {
            bail!("{} is not a directory", cfg.root.display());
        }
        std::fs::create_dir_all(fsops::state_dir(&cfg.root))
            .context("cannot create the state directory")?;
        // First: a second agent on this tree must stop before it touches the state (and the
        // first one's temporary files).
        let board = Board::new("client", &cfg.name, &cfg.root);
        let status = status::serve(&cfg.root, board.clone())?;
        fsops::prepare_state_dir(&cfg.root).context("cannot prepare the state directory")?;
        let (saved, journal) =
            store::Journal::open_or_reset::<Saved>(&fsops::state_dir(&cfg.root), "client")
                .context("cannot open the client's state")?;
        let (hint_tx, hint_rx) = async_channel::unbounded();
        let watcher = Watcher::spawn(cfg.watch.clone(), hint_tx)
            .with_context(|| format!("cannot watch {}", cfg.root.display()))?;
        let (batch_tx, batch_rx) = async_channel::unbounded();
        smol::spawn(async move {
            let _watcher = watcher;
            while let Some(hints) = agent::gather_hints(&hint_rx).await {
                if batch_tx.send(hints).await.is_err() {
                    break;
                }
            }
        })
        .detach();
        let id = replica_id(&cfg.root).context("cannot read or create the replica's id")?;
        let mut tree = Tree::new(cfg.root.clone(), saved.local);
        tree.keep_base(saved.base);
        let mut client = Client {
            id,
            tree,
            cfg,
            applying: Tracked::default(),
            unsynced_installs: Vec::new(),
            failed: BTreeSet::new(),
            unapplied: BTreeMap::new(),
            unapplied_since: u64::MAX,
            deciding: None,
            retry_at: None,
            retry_pause: RETRY_MIN,
            unlinkable: HashSet::new(),
            epoch: saved.epoch,
            last_seq: saved.last_seq,
            journal,
            journaled: (saved.epoch, saved.last_seq),
            dirty: BTreeSet::new(),
            renames: Vec::new(),
            hints: batch_rx,
            stats: Stats::default(),
            board,
            _status: status,
            counted_at: None,
            packed_len: 0,
            pack_buf: Vec::new(),
        };
        log::info!("scanning {}", client.cfg.root.display());
        let changes = client.tree.scan_all()?;
        // Downloads cut off between their rename and their base: in place means applied. A
        // fetched file installed unsynced whose rename did not last (a power cut) is still in
        // `.ferry/tmp`: a base recorded for it goes, so the path is reconciled as at a first
        // contact and its absence is not taken for a local delete. (Not in place and not
        // there: the rename happened, and what stands there now was done here since.)
        for (p, e) in saved.applying {
            if client
                .tree
                .get(&p)
                .is_some_and(|s| s.entry.same_content(&e))
            {
                client.tree.set_base(&p, Some(e));
            } else {
                let fetched = fsops::fetched_path(&client.cfg.root, &p, &e.hash);
                if fetched.exists() {
                    if client.tree.base(&p).as_ref() == Some(&e) {
                        client.tree.set_base(&p, None);
                    }
                    let _ = std::fs::remove_file(fetched);
                }
            }
            client.applying.remove(&p);
        }
        fsops::clear_fetched(&client.cfg.root);
        client.note_local(changes);
        client.flush();
        Ok(client)
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let result = self.session(&mut backoff).await;
            // A session that failed mid-batch left its pack buffer.
            self.pack_buf = Vec::new();
            self.flush();
            self.sync();
            if self.cfg.once {
                return result;
            }
            match result {
                Err(e) if e.downcast_ref::<Fatal>().is_some() => return Err(e),
                Err(e) => log::warn!("{e:#}"),
                Ok(()) => {}
            }
            // Jitter spreads reconnects of many clients after a server restart.
            let jitter = 0.5 + f64::from(u32::from_le_bytes(random())) / f64::from(u32::MAX);
            let wait = backoff.mul_f64(jitter);
            log::info!("reconnecting in {} ms", wait.as_millis());
            self.offline_for(wait).await?;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// `hints` and every batch queued behind it, as one: while the agent was busy (a first
    /// sync), a poll watcher may have queued a rescan a second, and one scan answers them all.
    fn with_queued_hints(&self, mut hints: Vec<Hint>) -> Vec<Hint> {
        while let Ok(more) = self.hints.try_recv() {
            hints.extend(more);
        }
        hints
    }

    /// Keeps noting local changes while disconnected.
    async fn offline_for(&mut self, wait: Duration) -> anyhow::Result<()> {
        let deadline = smol::Timer::after(wait);
        let hints = self.hints.clone();
        let mut deadline = std::pin::pin!(deadline);
        loop {
            let next = async { hints.recv().await.ok() }
                .or(async {
                    deadline.as_mut().await;
                    None
                })
                .await;
            match next {
                Some(h) => match agent::scan_hints(&mut self.tree, h) {
                    Ok(changes) => {
                        self.note_local(changes);
                        self.flush();
                    }
                    Err(lost) => return Err(Fatal(lost.to_string()).into()),
                },
                None => return Ok(()),
            }
        }
    }

    /// Remembers scanned local changes for the next sync.
    fn note_local(&mut self, changes: Vec<Changed>) {
        if changes.is_empty() {
            return;
        }
        self.renames.extend(detect_renames(&changes));
        self.dirty.extend(changes.into_iter().map(|c| c.path));
    }

    /// Folds the cache's changes into its packed table (see `core::layered`; the base beside
    /// it is small) after a first sync or a large copy (`tracked::worth_repacking`).
    fn repack_if_grown(&mut self) {
        let now = self.tree.entries().len();
        if worth_repacking(self.packed_len, now) {
            self.tree.repack();
            log::debug!("repacked the cache ({now} paths)");
            self.packed_len = now;
        }
    }

    /// Journals what changed since the last call (no fsync: see `sync`), then posts the
    /// status: a seq `ferry status` shows is one a kill would not lose.
    fn flush(&mut self) {
        let base = self.tree.take_base_changes();
        let local = self.tree.take_changes();
        let applying = self.applying.take_changes();
        let last_seq = self.durable_seq();
        if !base.is_empty()
            || !local.is_empty()
            || !applying.is_empty()
            || self.journaled != (self.epoch, last_seq)
        {
            let batch = Batch {
                epoch: self.epoch,
                last_seq,
                base,
                local,
                applying,
            };
            match self.journal.append(&batch) {
                Ok(()) => self.journaled = (self.epoch, last_seq),
                Err(e) => log::error!("cannot write the client's journal: {e}"),
            }
        }
        self.post_status();
    }

    /// The `last_seq` the state on disk may say: not past a change still unapplied here.
    fn durable_seq(&self) -> u64 {
        self.last_seq.min(self.unapplied_since)
    }

    /// Notes a server change for `path` that could not be applied here (see `unapplied`).
    fn not_applied(&mut self, path: &RelPath, remote: Option<Entry>) {
        // A change that came as one is asked for again from just before it; any other server
        // state (a commit's conflict) by a catch-up from the start.
        let since = match &self.deciding {
            Some((p, since)) if p == path => *since,
            _ => 0,
        };
        self.unapplied_since = self.unapplied_since.min(since);
        self.unapplied.insert(path.clone(), (remote, since));
    }

    /// `path` changed here while a decision about it was carried out: it is decided again
    /// with the next local changes, against `server_has`. When the base does not say that,
    /// it is kept as not applied: decided against the base alone, a path made and removed
    /// here meanwhile would look in sync, and the server's version would never arrive.
    fn decide_again(&mut self, path: &RelPath, server_has: Option<Entry>) {
        self.dirty.insert(path.clone());
        if self.tree.base(path).as_ref() != server_has.as_ref() {
            self.not_applied(path, server_has);
        }
    }

    /// Copies the counters `ferry status` shows to its board.
    fn post_status(&mut self) {
        let bytes = match self.counted_at {
            Some(t) if t.elapsed() < Duration::from_secs(1) => None,
            _ => {
                self.counted_at = Some(Instant::now());
                let mut sum = 0;
                self.tree.entries().for_each(|_, s| sum += s.entry.size);
                Some(sum)
            }
        };
        let st = &self.stats;
        let (files, seq, pending) = (
            self.tree.entries().len() as u64,
            self.last_seq,
            (self.dirty.len() + self.renames.len() + self.unapplied.len()) as u64,
        );
        self.board.update(|r| {
            r.files = files;
            if let Some(b) = bytes {
                r.bytes = b;
            }
            r.seq = seq;
            r.pending = pending;
            r.received = st.received;
            r.received_bytes = st.received_bytes;
            r.sent = st.sent;
            r.sent_bytes = st.sent_bytes;
            r.conflicts.clone_from(&st.conflicts);
        });
    }

    /// Tells `ferry status` whether the server is reachable.
    fn post_peer(&self, addr: &str, connected: bool) {
        self.board.update(|r| {
            r.peers = vec![Peer {
                name: "server".into(),
                addr: addr.into(),
                connected,
                since: status::now(),
            }]
        });
    }

    /// fsyncs the journal, and folds it into a snapshot when it has grown. Files installed
    /// unsynced (fetched in packs) are made durable first, with their renames, and only then
    /// lose their `applying` record.
    fn sync(&mut self) {
        if !self.unsynced_installs.is_empty() {
            match fsops::sync_fs(&self.cfg.root) {
                Ok(()) => {
                    for p in std::mem::take(&mut self.unsynced_installs) {
                        self.applying.remove(&p);
                    }
                    self.flush();
                }
                Err(e) => log::error!("cannot sync {}: {e}", self.cfg.root.display()),
            }
        }
        if let Err(e) = self.journal.sync() {
            log::error!("cannot sync the client's journal: {e}");
        }
        if self.journal.wants_compaction() {
            let saved = SavedRef {
                epoch: self.epoch,
                last_seq: self.durable_seq(),
                base: self.tree.whole_base(),
                local: self.tree.entries(),
                applying: &self.applying,
            };
            if let Err(e) = self.journal.compact(&saved) {
                log::error!("cannot write the client's state snapshot: {e}");
            }
        }
    }

    async fn connect(&self) -> anyhow::Result<(Async<TcpStream>, SocketAddr)> {
        let server = self.cfg.server.clone();
        let addrs: Vec<SocketAddr> = smol::unblock(move || server.to_socket_addrs())
            .await
            .with_context(|| format!("cannot resolve server address {}", self.cfg.server))?
            .collect();
        let mut last = anyhow!("{} resolved to no address", self.cfg.server);
        for addr in addrs {
            match agent::timeout(HANDSHAKE_TIMEOUT, Async::<TcpStream>::connect(addr)).await {
                Ok(s) => {
                    let _ = s.get_ref().set_nodelay(true);
                    return Ok((s, addr));
                }
                Err(e) => last = anyhow!("cannot connect to {addr}: {e}"),
            }
        }
        Err(last)
    }

    /// TLS (pinned), then the shared-secret handshake. Returns the link, the grant, and the
    /// certificate the session runs under (`None` in plaintext).
    async fn open(
        &self,
        socket: Async<TcpStream>,
    ) -> anyhow::Result<(Link, Grant, Option<Fingerprint>)> {
        if self.cfg.insecure_plaintext {
            let mut link = Link::plain(socket);
            let grant = match self.handshake(&mut link, &Fingerprint::PLAINTEXT.0).await {
                Err(e) if e.downcast_ref::<Fatal>().is_none() => {
                    Err(e
                        .context("if the server uses TLS (the default), drop --insecure-plaintext"))
                }
                other => other,
            }?;
            return Ok((link, grant, None));
        }
        let file = pin_file(&self.cfg.root);
        // A pin that cannot be read is not retried into: the owner has to look at it.
        let stored = read_pin(&file).map_err(|e| Fatal(format!("{e:#}")))?;
        let expected = self.cfg.server_fingerprint.or(stored);
        let (config, pin) = tls::client_config(expected);
        let mut link = match Link::connect(socket, config).await {
            Ok(link) => link,
            Err(e) => match (expected, pin.seen()) {
                (Some(want), Some(got)) if want != got => {
                    let source = if self.cfg.server_fingerprint.is_some() {
                        "given with --server-fingerprint".to_string()
                    } else {
                        format!("pinned in {}", file.display())
                    };
                    bail!(Fatal(format!(
                        "REFUSING the server: its certificate {got} is not the one trusted \
                         ({want}, {source}). Someone may be intercepting the connection. If the \
                         server's key was replaced on purpose, run once with \
                         --server-fingerprint {got}"
                    )))
                }
                _ => bail!(
                    "TLS handshake with the server failed: {e} (if the server runs with \
                     --insecure-plaintext, pass it here too)"
                ),
            },
        };
        let seen = pin
            .seen()
            .context("the TLS handshake ended without a certificate")?;
        let grant = self.handshake(&mut link, &seen.0).await?;
        // Pinned only now that the server has proved it knows the secret.
        if stored != Some(seen) {
            store::write_atomic(&file, format!("{seen}\n").as_bytes()).with_context(|| {
                format!("cannot pin the server's certificate in {}", file.display())
            })?;
            if expected.is_none() {
                log::warn!(
                    "trusting the server's certificate {seen} on first use; pinned in {}. \
                     Compare it with the one the server logged at start (or `ferry status` there)",
                    file.display()
                );
            } else {
                log::info!(
                    "pinned the server's certificate {seen} in {}",
                    file.display()
                );
            }
        }
        Ok((link, grant, Some(seen)))
    }

    async fn handshake(&self, link: &mut Link, channel: &Channel) -> anyhow::Result<Grant> {
        let (r, w) = (&mut link.reader, &mut link.writer);
        let cnonce = random::<32>();
        let secret = &self.cfg.secret;
        write_frame(
            w,
            &ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                name: self.cfg.name.clone(),
                id: self.id,
                nonce: cnonce,
            },
        )
        .await?;
        let snonce = match read_frame(r, MAX_HANDSHAKE_FRAME).await? {
            ServerMsg::Challenge { nonce, .. } => nonce,
            ServerMsg::Refused { reason } => {
                bail!(Fatal(format!("the server refused us: {reason}")))
            }
            other => bail!("unexpected {} instead of Challenge", other.kind()),
        };
        let proof = secret.client_proof(channel, &snonce, &cnonce, &self.cfg.name);
        write_frame(w, &ClientMsg::Auth { proof }).await?;
        match read_frame(r, MAX_HANDSHAKE_FRAME).await? {
            ServerMsg::Welcome { proof, grant } => {
                if !secret.verify_server(channel, &cnonce, &snonce, &proof) {
                    bail!(Fatal(
                        "the server could not prove it knows the secret: wrong server, or a different secret file".into()
                    ));
                }
                Ok(grant)
            }
            ServerMsg::Refused { reason } => bail!(Fatal(format!(
                "the server refused us: {reason} (check --secret-file)"
            ))),
            other => bail!("unexpected {} instead of Welcome", other.kind()),
        }
    }

    /// One connection's life: handshake, catch-up, then live sync until it breaks.
    async fn session(&mut self, backoff: &mut Duration) -> anyhow::Result<()> {
        let (socket, addr) = self.connect().await?;
        let (link, grant, fingerprint) =
            agent::within(HANDSHAKE_TIMEOUT, "the handshake", self.open(socket)).await?;
        let ftp_ip = match &grant.ftp_host {
            Some(h) => h
                .parse()
                .with_context(|| format!("the server named an unusable FTP host {h:?}"))?,
            None => addr.ip(),
        };
        let data = DataConn::connect(
            SocketAddr::new(ftp_ip, grant.ftp_port),
            &grant.ftp_user,
            &grant.ftp_pass,
            &grant.staging,
            self.cfg.max_rate,
            // The embedded FTP server shows the same certificate.
            fingerprint.map(|fp| tls::client_config(Some(fp)).0),
        )
        .await?;
        log::info!("connected to {addr}");
        self.board.update(|r| {
            r.security = fingerprint.map_or_else(
                || "plaintext (--insecure-plaintext)".into(),
                |fp| format!("TLS, server certificate {fp}"),
            )
        });
        self.post_peer(&addr.to_string(), true);
        *backoff = MIN_BACKOFF;
        if grant.epoch != self.epoch {
            if self.epoch != 0 {
                log::warn!("the server's index is new: reconciling in full (nothing is deleted for being absent)");
            }
            self.epoch = grant.epoch;
            self.last_seq = 0;
            // A base agreed with another index proves nothing now, nor does a change of it
            // not applied here (the full reconciliation decides every path anew).
            self.tree.retain_base(|_| false);
            self.unapplied.clear();
            self.unapplied_since = u64::MAX;
        }

        let Link {
            mut reader,
            writer,
            socket,
        } = link;
        let (tx, out_rx) = async_channel::unbounded::<ClientMsg>();
        let (in_tx, inbox) = async_channel::unbounded::<ServerMsg>();
        let _writer = agent::spawn_writer(writer, socket.clone(), out_rx, || ClientMsg::Ping);
        let _reader = {
            smol::spawn(async move {
                loop {
                    match agent::timeout(
                        IDLE_TIMEOUT,
                        read_frame::<_, ServerMsg>(&mut reader, MAX_FRAME),
                    )
                    .await
                    {
                        Ok(m) => {
                            if in_tx.send(m).await.is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            log::warn!("the server closed the connection");
                            break;
                        }
                        Err(e) => {
                            log::warn!("control channel: {e}");
                            break;
                        }
                    }
                }
            })
        };
        let mut s = Session {
            tx,
            inbox,
            deferred: VecDeque::new(),
            data,
            next_id: 0,
            caught_up: false,
            listed: Some(HashSet::new()),
            applied: 0,
            committed: HashMap::new(),
            renames: HashMap::new(),
            targets: HashMap::new(),
            prefetched: HashMap::new(),
            progress: None,
            listed_count: 0,
            bytes_before: self.stats.received_bytes,
        };
        // From before any change not applied here, as after a restart: it comes again (a
        // link with its target, which a session keeps only while it lasts).
        s.send(ClientMsg::Subscribe {
            epoch: self.epoch,
            since: self.durable_seq(),
        })
        .await?;
        let result = if self.cfg.once {
            self.once(&mut s, addr).await
        } else {
            self.live(&mut s).await
        };
        let _ = socket.get_ref().shutdown(Shutdown::Both);
        self.post_peer(&addr.to_string(), false);
        self.drop_prefetched(&mut s);
        s.data.quit().await;
        result
    }

    async fn live(&mut self, s: &mut Session) -> anyhow::Result<()> {
        enum Wake {
            Msg(Option<ServerMsg>),
            Hints(Option<Vec<Hint>>),
            Save,
            Retry,
        }
        // When the journal must be fsynced by: SYNC_DELAY after its first unsynced append,
        // however busy the connection stays.
        let mut save_at: Option<Instant> = None;
        loop {
            let hints = self.hints.clone();
            if self.unapplied.is_empty() {
                self.unapplied_since = u64::MAX;
            }
            self.flush();
            if s.caught_up
                && s.deferred.is_empty()
                && self.dirty.is_empty()
                && self.renames.is_empty()
            {
                self.board.update(|r| r.last_sync = Some(status::now()));
                self.repack_if_grown();
            }
            if !self.journal.unsynced() {
                save_at = None;
            } else if save_at.is_none() {
                save_at = Some(Instant::now() + SYNC_DELAY);
            }
            if self.failed.is_empty() && self.unapplied.is_empty() {
                self.retry_at = None;
                self.retry_pause = RETRY_MIN;
            } else if self.retry_at.is_none() {
                self.retry_at = Some(Instant::now() + self.retry_pause);
                self.retry_pause = (self.retry_pause * 2).min(RETRY_MAX);
            }
            let retry_at = self.retry_at;
            let wake = if let Some(m) = s.deferred.pop_front() {
                Wake::Msg(Some(m))
            } else {
                async { Wake::Msg(s.inbox.recv().await.ok()) }
                    .or(async { Wake::Hints(hints.recv().await.ok()) })
                    .or(async {
                        match retry_at {
                            Some(at) => {
                                smol::Timer::at(at).await;
                                Wake::Retry
                            }
                            None => std::future::pending().await,
                        }
                    })
                    .or(async {
                        match save_at {
                            Some(at) => {
                                smol::Timer::at(at).await;
                                Wake::Save
                            }
                            None => std::future::pending().await,
                        }
                    })
                    .await
            };
            match wake {
                Wake::Msg(None) => bail!("lost the connection to the server"),
                Wake::Msg(Some(m)) => self.on_message(s, m).await?,
                Wake::Hints(None) => bail!(Fatal("the watcher stopped".into())),
                Wake::Hints(Some(h)) => {
                    let h = self.with_queued_hints(h);
                    let changes = agent::scan_hints(&mut self.tree, h)
                        .map_err(|lost| Fatal(lost.to_string()))?;
                    self.note_local(changes);
                    if s.caught_up {
                        self.sync_local(s).await?;
                    }
                }
                Wake::Save => self.sync(),
                Wake::Retry => {
                    self.retry_at = None;
                    self.dirty.append(&mut self.failed);
                    if s.caught_up {
                        self.retry_unapplied(s).await?;
                        self.sync_local(s).await?;
                    }
                }
            }
        }
    }

    /// `--once`: catch up, send what changed here, and repeat until a round trip to the
    /// server brings nothing new; then print a summary.
    async fn once(&mut self, s: &mut Session, addr: SocketAddr) -> anyhow::Result<()> {
        while !s.caught_up {
            let m = match s.deferred.pop_front() {
                Some(m) => m,
                None => s
                    .inbox
                    .recv()
                    .await
                    .map_err(|_| anyhow!("lost the connection to the server"))?,
            };
            self.on_message(s, m).await?;
        }
        // Bounded: each round applies what the last one brought back; a tree that keeps
        // changing (someone editing right now) is left for the next run.
        for _ in 0..16 {
            if let Ok(h) = self.hints.try_recv() {
                let h = self.with_queued_hints(h);
                let changes =
                    agent::scan_hints(&mut self.tree, h).map_err(|lost| Fatal(lost.to_string()))?;
                self.note_local(changes);
            }
            self.dirty.append(&mut self.failed);
            self.retry_unapplied(s).await?;
            self.sync_local(s).await?;
            // A probe's answer comes after every change the server sent before it.
            s.probe(ProbeTarget::Staged(BARRIER.into()), 0).await?;
            if s.deferred.is_empty()
                && self.dirty.is_empty()
                && self.renames.is_empty()
                && self.failed.is_empty()
                && self.unapplied.is_empty()
            {
                self.flush();
                self.sync();
                let st = &self.stats;
                println!(
                    "ferry: {} is in sync with {addr} at seq {}: {} received ({} bytes), {} sent ({} bytes), {} conflicts",
                    self.cfg.root.display(),
                    self.last_seq,
                    st.received,
                    st.received_bytes,
                    st.sent,
                    st.sent_bytes,
                    st.conflicts.len()
                );
                for c in &st.conflicts {
                    println!("  conflict copy: {c}");
                }
                return Ok(());
            }
            while let Some(m) = s.deferred.pop_front() {
                self.on_message(s, m).await?;
            }
        }
        if !self.failed.is_empty() {
            let paths: Vec<String> = self.failed.iter().map(|p| p.to_string()).collect();
            bail!(Fatal(format!(
                "the server kept refusing {} (see the log for why)",
                paths.join(", ")
            )));
        }
        if !self.unapplied.is_empty() {
            let paths: Vec<String> = self.unapplied.keys().map(|p| p.to_string()).collect();
            bail!(Fatal(format!(
                "could not apply the server's {} here (see the log for why)",
                paths.join(", ")
            )));
        }
        bail!(Fatal(
            "the tree kept changing; not converged after 16 rounds (run again)".into()
        ))
    }

    async fn on_message(&mut self, s: &mut Session, msg: ServerMsg) -> anyhow::Result<()> {
        // A batch of changes walks to the same few directories over and over.
        let _reuse = beneath::Reuse::start();
        match msg {
            ServerMsg::Changes(mut changes) => {
                let taken = 1 + s.more_changes(&mut changes);
                if !s.caught_up {
                    // Room for the next frames of the catch-up, while these are applied.
                    s.send(ClientMsg::Took { frames: taken }).await?;
                }
                // Small files come in packs, each covering a window of changes, pipelined:
                // while a window's files are put in place, the next one's pack is written to
                // the state directory on another thread, and the server reads the one after.
                let mut fetched_to = 0;
                let mut writing = None;
                let mut asked = None;
                for (i, c) in changes.iter().enumerate() {
                    if i == fetched_to {
                        self.drop_prefetched(s);
                        let (covered, this) = match writing.take() {
                            Some(w) => w,
                            None => {
                                let w = self.ask_fetch(s, &changes[i..]).await?;
                                (w.covered, self.download_fetched(s, w).await?)
                            }
                        };
                        fetched_to = i + covered;
                        if fetched_to < changes.len() {
                            let next = match asked.take() {
                                Some(w) => w,
                                None => self.ask_fetch(s, &changes[fetched_to..]).await?,
                            };
                            let after = fetched_to + next.covered;
                            if after < changes.len() {
                                asked = Some(self.ask_fetch(s, &changes[after..]).await?);
                            }
                            writing = Some((next.covered, self.download_fetched(s, next).await?));
                        }
                        if let Some(task) = this {
                            let fetched = task.await?;
                            self.take_fetched(s, fetched);
                        }
                    }
                    self.on_change(s, c.clone()).await?;
                    if let Some(p) = &mut s.progress {
                        s.listed_count += 1;
                        p.tick(s.listed_count, self.stats.received_bytes - s.bytes_before);
                    }
                }
                self.drop_prefetched(s);
                if s.caught_up {
                    self.sync_local(s).await?;
                }
            }
            ServerMsg::CaughtUp { seq, full } => {
                s.progress = None;
                if let Some(listed) = s.listed.take().filter(|_| full) {
                    // Known here, never listed by the server: unknown there, not deleted.
                    self.tree.retain_base(|p| listed.contains(p));
                    // A listed path was decided again; one not listed is gone there.
                    self.unapplied.retain(|p, _| listed.contains(p));
                }
                self.last_seq = self.last_seq.max(seq);
                s.caught_up = true;
                log::info!(
                    "caught up with the server at seq {seq}{}: {} changes applied here",
                    if full { " (full reconciliation)" } else { "" },
                    s.applied
                );
                // Everything that differs from the base was changed here while away.
                let differing: Vec<RelPath> = self.tree.base_differing().cloned().collect();
                self.dirty.extend(differing);
                self.sync_local(s).await?;
                self.flush();
                self.sync();
            }
            ServerMsg::Listing { changes, bytes } => {
                let mut p = Progress::new("catching up", "changes");
                p.set_total(changes, bytes);
                s.progress = Some(p);
            }
            ServerMsg::CommitResult { id, .. } | ServerMsg::PackResult { id, .. } => {
                log::debug!("late result of commit {id}")
            }
            ServerMsg::Fetched { id, .. } => log::debug!("late answer to fetch {id}"),
            ServerMsg::Ping => {}
            other => bail!(
                "protocol error: unexpected {} from the server",
                other.kind()
            ),
        }
        Ok(())
    }

    async fn on_change(&mut self, s: &mut Session, c: Change) -> anyhow::Result<()> {
        if let Some(listed) = &mut s.listed {
            listed.insert(c.path.clone());
        }
        if !s.renames.is_empty() {
            self.settle_renames(s, &c);
        }
        if let Some(&mine) = s.committed.get(&c.path) {
            if c.seq < mine {
                self.last_seq = self.last_seq.max(c.seq);
                return Ok(());
            }
            s.committed.remove(&c.path);
            if c.seq == mine
                && c.moved_from.is_none()
                && self.tree.base(&c.path).as_ref() == c.entry.as_ref()
                && self.tree.get(&c.path).map(|s| s.entry).as_ref() == c.entry.as_ref()
            {
                // Our own commit, as we agreed on it and as the cache still has it (what this
                // agent did here since, such as applying a rename, is in the cache): nothing
                // to decide. A change made here since by anything else has its own hint.
                s.targets.remove(&c.path);
                self.last_seq = self.last_seq.max(c.seq);
                return Ok(());
            }
        }
        s.targets.remove(&c.path);
        if let Some(e) = c.entry.as_ref().filter(|e| e.kind == Kind::Symlink) {
            let checked = match &c.target {
                Some(t) => e.check_link(t).map(|()| t.clone()),
                None => Err("no target"),
            };
            match checked {
                Ok(target) => {
                    s.targets.insert(c.path.clone(), target);
                }
                Err(why) => {
                    if c.target.is_some() {
                        log::error!("refused the server's link {}: {why}", c.path);
                    } else {
                        log::debug!("{} changed on the server; a newer change follows", c.path);
                    }
                    self.last_seq = self.last_seq.max(c.seq);
                    return Ok(());
                }
            }
        }
        if self
            .tree
            .ignores(&c.path, c.entry.as_ref().map(Entry::is_dir))
        {
            // Not applied here. The base no longer says what the server has, so it goes: if
            // the path is un-ignored, it is reconciled as at a first contact (same bytes:
            // nothing to do; different: a conflict copy, nothing lost).
            if self.tree.base(&c.path).as_ref() != c.entry.as_ref() {
                log::debug!(
                    "{} is ignored here: the server's change is not applied",
                    c.path
                );
                self.tree.set_base(&c.path, None);
            }
        } else {
            self.deciding = Some((c.path.clone(), c.seq.saturating_sub(1)));
            let decided = self
                .resolve(s, &c.path, c.entry, c.moved_from.as_ref(), 0)
                .await;
            self.deciding = None;
            decided?;
        }
        self.last_seq = self.last_seq.max(c.seq);
        Ok(())
    }

    /// Follows the server's changes for a directory rename made here. They end with the old
    /// directory's delete; a path moved here that the server did not move by then was not
    /// there (deleted there meanwhile, or made here meanwhile): it is sent as new.
    fn settle_renames(&mut self, s: &mut Session, c: &Change) {
        if c.moved_from.is_some() {
            for (_, moved) in s.renames.values_mut() {
                moved.remove(&c.path);
            }
        }
        if c.entry.is_some() {
            return;
        }
        let Some((seq, moved)) = s.renames.remove(&c.path) else {
            return;
        };
        if c.seq < seq {
            s.renames.insert(c.path.clone(), (seq, moved));
            return;
        }
        for p in moved {
            log::debug!("{p} was not moved on the server; sending it");
            self.tree.set_base(&p, None);
            self.dirty.insert(p);
        }
    }

    /// Sends what changed here: renames first, then every dirty path (parents before
    /// children, deletes children first).
    async fn sync_local(&mut self, s: &mut Session) -> anyhow::Result<()> {
        // Packs read many files in the same few directories.
        let _reuse = beneath::Reuse::start();
        for (from, to) in std::mem::take(&mut self.renames) {
            let Some(base_from) = self.tree.base(&from) else {
                continue;
            };
            if self.tree.base(&to).is_some()
                || self.tree.get(&to).is_none()
                || self.tree.get(&from).is_some()
            {
                continue;
            }
            let op = Op::Rename { to: to.clone() };
            if let Outcome::Done { seq } = s.commit(&from, op, Some(base_from)).await? {
                s.committed.insert(to.clone(), seq);
                // What we could not apply there moved too: the server's changes for the
                // rename say what each path is now.
                self.unapplied.retain(|p, _| !p.starts_with(&from));
                // Assume the server moved what we had agreed on beneath it; the changes it
                // sends for this rename confirm each path (see `on_change`).
                let mut moved = BTreeSet::new();
                for p in self.tree.base_keys_under(&from) {
                    if let Some(e) = self.tree.base(&p) {
                        self.tree.set_base(&p, None);
                        // A name too long to travel was not sent: no base to move for it.
                        let Ok(new) = p.rebase(&from, &to) else {
                            continue;
                        };
                        if new != to {
                            moved.insert(new.clone());
                        }
                        self.tree.set_base(&new, Some(e));
                    }
                }
                s.renames.insert(from.clone(), (seq, moved));
                self.stats.sent += 1;
                log::info!("sent rename {from} -> {to}");
            }
        }
        // Handling a path can dirty others (a conflict copy, a parent we had to create):
        // go round until nothing is left, a bounded number of times.
        for _ in 0..4 {
            if self.dirty.is_empty() {
                break;
            }
            let dirty = std::mem::take(&mut self.dirty);
            let tree = &self.tree;
            let ordered =
                agent::apply_order(dirty.into_iter().collect(), |p| tree.get(p).is_none());
            // Small files to send go in packs; deletes of files and new directories in a row of
            // commits sent without waiting for each result; both in their place in the order.
            // A pack is uploaded while the server commits the ones before (`sending`), whose
            // outcomes are taken before anything else is sent.
            let mut pack: Vec<PackItem> = Vec::new();
            let mut pack_bytes = 0;
            let mut sending: VecDeque<Uploaded> = VecDeque::new();
            let mut row: Vec<RowItem> = Vec::new();
            for path in ordered {
                let item = self.packable(&path);
                let in_row = item.is_none().then(|| self.row_item(&path)).flatten();
                let full = pack.len() == PACK_MAX_ITEMS
                    || item
                        .as_ref()
                        .is_some_and(|i| pack_bytes + i.entry.size > PACK_MAX_BYTES);
                if item.is_none() || full {
                    self.send_pack(s, std::mem::take(&mut pack), &mut sending)
                        .await?;
                    pack_bytes = 0;
                }
                if item.is_none() {
                    self.finish_packs(s, &mut sending, 0).await?;
                }
                if in_row.is_none() || row.len() == PACK_MAX_ITEMS {
                    self.send_row(s, std::mem::take(&mut row)).await?;
                }
                if let Some(item) = item {
                    pack_bytes += item.entry.size;
                    pack.push(item);
                } else if let Some(r) = in_row {
                    row.push(r);
                } else if let Some((remote, since)) = self.unapplied.get(&path).cloned() {
                    // What the server has is the change not applied yet, not the base.
                    self.resolve_unapplied(s, &path, remote, since).await?;
                } else {
                    let remote = self.tree.base(&path);
                    self.resolve(s, &path, remote, None, 0).await?;
                }
            }
            self.send_pack(s, pack, &mut sending).await?;
            self.pack_buf = Vec::new();
            self.finish_packs(s, &mut sending, 0).await?;
            self.send_row(s, row).await?;
        }
        Ok(())
    }

    /// Decides and carries out what to do with `path`, given what the server has (`remote`).
    /// Errors are transport failures (the session ends); a local problem with one path is
    /// logged and sync goes on. An ignored path is left alone.
    async fn resolve(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        remote: Option<Entry>,
        moved_from: Option<&RelPath>,
        depth: u8,
    ) -> anyhow::Result<()> {
        // What the server has now replaces a change of it we could not apply.
        self.unapplied.remove(path);
        if self.tree.ignores(path, remote.as_ref().map(Entry::is_dir)) {
            return Ok(());
        }
        // A new file, and no local change reported: no need to look (a sixth of a first
        // sync's main thread).
        let new_file_here = moved_from.is_none()
            && remote.as_ref().is_some_and(|r| r.kind == Kind::File)
            && self.tree.base(path).is_none()
            && !self.dirty.contains(path)
            && self.tree.installs_unseen(path);
        let local = if new_file_here {
            None
        } else {
            let (local, beneath) = self.tree.refresh(path);
            self.note_beneath(path, beneath);
            local.map(|s| s.entry)
        };
        // A path whose directory was moved here already (its rename still settling) moved
        // with it: whatever stands at the old path now is newer than that, and stays.
        let moved_with_dir = moved_from.is_some_and(|from| {
            s.renames
                .keys()
                .any(|dir| from.starts_with(dir) && from != dir)
        });
        if let (Some(from), Some(r), false) = (moved_from, &remote, moved_with_dir) {
            let (local_from, beneath) = self.tree.refresh(from);
            self.note_beneath(from, beneath);
            let base_from = self.tree.base(from);
            if rename_locally(
                base_from.as_ref(),
                local_from.as_ref().map(|s| &s.entry),
                local.as_ref(),
                r,
            ) {
                match fsops::rename_noreplace(&self.cfg.root, from, path) {
                    Ok(created) => {
                        self.note_created(created);
                        self.tree.rename_subtree(from, path);
                        self.tree.set_base(from, None);
                        self.tree.set_base(path, Some(r.clone()));
                        // Same bytes, but not always the same metadata: our base at the old
                        // path can be a newer commit of ours (same bytes, new mtime) than the
                        // version the server moved, if its rename reached us after our
                        // commit. Take the server's, or this path would differ forever.
                        if local_from.is_some_and(|l| l.entry != *r) {
                            match fsops::set_meta(&self.cfg.root, path, r) {
                                Ok(seen) => self.tree.set(path, Some(seen)),
                                Err(e) => log::error!("cannot set metadata of {path}: {e}"),
                            }
                        }
                        // What a moved directory held here is not necessarily what the server
                        // moved (a file created in it meanwhile): the changes that follow
                        // confirm the ones it did (see `settle_renames`).
                        let moved: BTreeSet<RelPath> = self
                            .tree
                            .entries()
                            .keys_under(path)
                            .into_iter()
                            .filter(|p| p != path)
                            .collect();
                        if !moved.is_empty() {
                            s.renames.insert(from.clone(), (0, moved));
                        }
                        self.stats.received += 1;
                        log::log!(s.applied(), "applied rename {from} -> {path}");
                        return Ok(());
                    }
                    Err(e) => {
                        log::debug!("local rename {from} -> {path} failed ({e}); fetching instead")
                    }
                }
            }
        }
        if let Some(from) = moved_from {
            // Moved here already (with a directory, by us or by an earlier change): what we
            // agreed on at the old path is the base at the new one.
            if self.tree.base(path).is_none() && self.tree.get(from).is_none() {
                if let Some(b) = self.tree.base(from) {
                    self.tree.set_base(from, None);
                    self.tree.set_base(path, Some(b));
                }
            }
        }
        let base = self.tree.base(path);
        match plan(base.as_ref(), local.as_ref(), remote.as_ref()) {
            Decision::InSync => {}
            Decision::RecordBase => self.set_base(path, remote),
            Decision::AdoptRemoteMeta => {
                let r = remote.expect("AdoptRemoteMeta has a remote entry");
                match fsops::set_meta(&self.cfg.root, path, &r) {
                    Ok(seen) => {
                        self.tree.set(path, Some(seen));
                        self.tree.set_base(path, Some(r));
                        log::log!(s.applied(), "applied metadata of {path}");
                    }
                    Err(e) => {
                        log::error!("cannot set metadata of {path}: {e}");
                        self.not_applied(path, Some(r));
                    }
                }
            }
            Decision::TakeRemote => self.take_remote(s, path, remote).await?,
            Decision::SendLocal => {
                if local.is_none() {
                    // A directory goes after what it held (the server refuses to delete a
                    // directory that is not empty).
                    self.send_deletes_beneath(s, path, depth).await?;
                }
                let outcome = self.send_local(s, path, local, remote).await?;
                if let Some(current) = outcome {
                    if depth < 2 {
                        // The server moved on meanwhile: decide again against what it has.
                        Box::pin(self.resolve(s, path, current, None, depth + 1)).await?;
                    } else {
                        self.decide_again(path, current);
                    }
                }
            }
            Decision::Conflict => {
                let from = self.tree.abs(path);
                match fsops::keep_as_conflict(&self.cfg.root, &from, path, &self.cfg.name) {
                    Ok((copy, _)) => {
                        self.tree.rename_subtree(path, &copy);
                        for p in self.tree.entries().keys_under(&copy) {
                            self.dirty.insert(p);
                        }
                        self.stats.conflict(&copy);
                        log::warn!("conflict on {path}: the server's version keeps the name; this replica's is kept as {copy}");
                        self.take_remote(s, path, remote).await?;
                    }
                    Err(e) => {
                        log::error!("conflict on {path}: cannot keep the local version: {e}");
                        self.not_applied(path, remote);
                    }
                }
            }
        }
        Ok(())
    }

    /// Records what we and the server agree `path` is: a change of it we could not apply is
    /// settled with it (a newer commit of ours, or that change put in place).
    fn set_base(&mut self, path: &RelPath, entry: Option<Entry>) {
        self.unapplied.remove(path);
        self.tree.set_base(path, entry);
    }

    /// Changes a refresh found beneath a path (a directory replaced by a file) are local
    /// changes to send.
    /// Settles every path the base has beneath `path` that is gone here, deepest first.
    async fn send_deletes_beneath(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        depth: u8,
    ) -> anyhow::Result<()> {
        let mut beneath = self.tree.base_keys_under(path);
        beneath.retain(|p| p != path);
        for p in beneath.into_iter().rev() {
            if self.tree.get(&p).is_none() {
                if let Some(remote) = self.tree.base(&p) {
                    Box::pin(self.resolve(s, &p, Some(remote), None, depth)).await?;
                }
            }
        }
        Ok(())
    }

    fn note_beneath(&mut self, path: &RelPath, changes: Vec<Changed>) {
        for c in changes {
            if &c.path != path {
                self.dirty.insert(c.path);
            }
        }
    }

    /// Parent directories we had to create are new here; they go to the server like any
    /// local change (usually they exist there, and the commit is a no-op).
    fn note_created(&mut self, created: Vec<(RelPath, Seen)>) {
        for (p, seen) in created {
            self.tree.set(&p, Some(seen));
            self.dirty.insert(p);
        }
    }

    /// Makes the local path what the server has.
    async fn take_remote(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        remote: Option<Entry>,
    ) -> anyhow::Result<()> {
        let root = self.cfg.root.clone();
        match remote {
            None => match fsops::remove(&root, path) {
                Ok(fsops::Removed::Gone) => {
                    self.tree.set(path, None);
                    self.set_base(path, None);
                    log::log!(s.applied(), "applied delete {path}");
                }
                Ok(fsops::Removed::NotEmpty) => {
                    // Something new was made inside here: keep the directory (and send it).
                    self.set_base(path, None);
                    self.dirty.insert(path.clone());
                    log::info!("kept {path}: it holds new entries");
                }
                Err(e) => {
                    log::error!("cannot delete {path}: {e}");
                    self.not_applied(path, None);
                }
            },
            Some(e) if e.kind == Kind::Dir => match self
                .unlink_for_dir(path)
                .and_then(|()| fsops::make_dir(&root, path, e.mode))
            {
                Ok((seen, created)) => {
                    self.note_created(created);
                    self.tree.set(path, Some(seen));
                    self.set_base(path, Some(e));
                    self.stats.received += 1;
                    log::log!(s.applied(), "applied mkdir {path}");
                }
                Err(err) => {
                    log::error!("cannot create directory {path}: {err}");
                    self.not_applied(path, Some(e));
                }
            },
            Some(e) if e.kind == Kind::Symlink => self.take_link(s, path, e),
            Some(e) => {
                // A fetched small file is used if it is still the one written (else downloaded).
                let ready = match s.prefetched.remove(path) {
                    Some((fetched, part, meta)) if fetched == e && still_written(&part, &meta) => {
                        Ready::Fetched(part, meta)
                    }
                    other => {
                        if let Some((_, part, _)) = other {
                            let _ = std::fs::remove_file(part);
                        }
                        let tmp = fsops::partial_path(&root, &e.hash);
                        match self.download(s, path, &e, tmp).await {
                            Ok(d) => Ready::Downloaded(d),
                            Err(DownloadError::Changed(why)) => {
                                // A newer change for this path is on its way.
                                log::debug!("{why}");
                                return Ok(());
                            }
                            Err(DownloadError::Local(err)) => {
                                log::error!("cannot download {path}: {err:#}");
                                self.not_applied(path, Some(e));
                                return Ok(());
                            }
                            Err(DownloadError::Transport(err)) => return Err(err),
                        }
                    }
                };
                let rel = path.clone();
                let entry = e.clone();
                // What the download replaces must still be what the plan saw.
                let expect = self.tree.get(path);
                // Journaled before the rename (a fetched file's record was, with its pack's).
                if self.applying.get(path) != Some(&e) {
                    self.applying.insert(path.clone(), e.clone());
                    self.flush();
                }
                let (synced, transferred) = match &ready {
                    Ready::Fetched(..) => (true, e.size),
                    Ready::Downloaded(d) => (false, d.transferred),
                };
                let installed = match ready {
                    // Synced already, and a trip to a thread would cost more than the rename.
                    Ready::Fetched(part, meta) => {
                        let installed = fsops::install_unsynced(
                            &root,
                            &meta,
                            &part,
                            &rel,
                            &entry,
                            expect.as_ref(),
                        );
                        if !matches!(installed, Ok(fsops::Install::Done { .. })) {
                            let _ = std::fs::remove_file(&part);
                        }
                        installed
                    }
                    Ready::Downloaded(d) => {
                        smol::unblock(move || {
                            let installed = fsops::install_file(
                                &root,
                                d.file,
                                &d.path,
                                &rel,
                                &entry,
                                expect.as_ref(),
                            );
                            if !matches!(installed, Ok(fsops::Install::Done { .. })) {
                                let _ = std::fs::remove_file(&d.path);
                            }
                            installed
                        })
                        .await
                    }
                };
                if synced && matches!(installed, Ok(fsops::Install::Done { .. })) {
                    // Not durable until the next `sync`: its `applying` record stays until then.
                    self.unsynced_installs.push(path.clone());
                } else {
                    self.applying.remove(path);
                }
                match installed {
                    Ok(fsops::Install::Done {
                        installed: (seen, created),
                        displaced,
                    }) => {
                        self.note_created(created);
                        self.tree.set(path, Some(seen));
                        log::log!(
                            s.applied(),
                            "applied {path} ({} bytes, {transferred} transferred)",
                            e.size
                        );
                        self.stats.received += 1;
                        self.stats.received_bytes += transferred;
                        self.set_base(path, Some(e));
                        if let Some(old) = displaced {
                            self.keep_displaced(path, &old);
                        }
                    }
                    Ok(fsops::Install::ChangedHere) => {
                        log::debug!("{path} changed here while downloading; deciding again");
                        self.decide_again(path, Some(e));
                    }
                    Err(err) => {
                        log::error!("cannot put {path} in place: {err}");
                        self.not_applied(path, Some(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// Tries again the server changes this replica could not apply (see `unapplied`).
    async fn retry_unapplied(&mut self, s: &mut Session) -> anyhow::Result<()> {
        // Each stays in `unapplied` until it is decided, so the journal's `last_seq` stays
        // below it meanwhile.
        let paths: Vec<RelPath> = self.unapplied.keys().cloned().collect();
        for path in paths {
            let Some((remote, since)) = self.unapplied.get(&path).cloned() else {
                continue;
            };
            log::debug!("trying again to apply the server's {path}");
            self.resolve_unapplied(s, &path, remote, since).await?;
        }
        self.unapplied_since = self
            .unapplied
            .values()
            .map(|u| u.1)
            .min()
            .unwrap_or(u64::MAX);
        Ok(())
    }

    /// Decides `path` again against the server change `remote` it has not applied (see
    /// `unapplied`), which a `Subscribe` from `since` brings back.
    async fn resolve_unapplied(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        remote: Option<Entry>,
        since: u64,
    ) -> anyhow::Result<()> {
        self.deciding = Some((path.clone(), since));
        let decided = self.resolve(s, path, remote.clone(), None, 0).await;
        self.deciding = None;
        if decided.is_err() {
            // The connection broke: tried again in the next session.
            self.unapplied
                .entry(path.clone())
                .or_insert((remote, since));
        }
        decided
    }

    /// Downloads `path` (as `e`) over FTP into `tmp`, resuming what an earlier attempt left.
    async fn download(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        e: &Entry,
        tmp: PathBuf,
    ) -> Result<crate::data::Downloaded, DownloadError> {
        let resume = s
            .resume_download(path, e, &tmp)
            .await
            .map_err(DownloadError::Transport)?;
        if resume.offset > 0 {
            log::info!(
                "resuming the download of {path} at byte {} of {}",
                resume.offset,
                e.size
            );
        }
        s.data
            .report_progress(self.board.transfer(path.as_str(), "download", e.size));
        let downloaded = s.data.download(path, e, tmp, resume).await;
        self.board.transfer_done();
        downloaded
    }

    /// Asks the server for a pack of the small files that `changes` (from their start) are
    /// likely to need, so they do not each cost a data connection (`download_fetched` gets it).
    /// A hint only: what the changes then decide is unchanged, and bytes no change uses are
    /// dropped.
    async fn ask_fetch(&mut self, s: &mut Session, changes: &[Change]) -> anyhow::Result<Window> {
        let mut items = Vec::new();
        let mut bytes = 0;
        let mut covered = 0;
        for c in changes {
            if let Some(e) = c.entry.as_ref().filter(|e| {
                // Empty files too: alone, each would cost a data connection for no bytes.
                e.kind == Kind::File
                    && e.size <= PACK_FILE_MAX
                    && c.moved_from.is_none()
                    && !self
                        .tree
                        .get(&c.path)
                        .is_some_and(|l| l.entry.same_content(e))
                    && s.committed.get(&c.path).is_none_or(|&mine| c.seq >= mine)
            }) {
                if items.len() == PACK_MAX_ITEMS || bytes + e.size > PACK_MAX_BYTES {
                    break;
                }
                if !self.tree.ignores(&c.path, Some(false)) {
                    bytes += e.size;
                    items.push((c.path.clone(), e.clone()));
                }
            }
            covered += 1;
        }
        // One file gains nothing from a pack.
        let asked = if items.len() < 2 {
            None
        } else {
            Some((s.ask_fetch(items.clone()).await?, items))
        };
        Ok(Window {
            covered: covered.max(1),
            asked,
        })
    }

    /// Waits for the pack `window` asked for and downloads it; its files are checked and
    /// written to the state directory on another thread (the task), while this one goes on.
    async fn download_fetched(
        &mut self,
        s: &mut Session,
        window: Window,
    ) -> anyhow::Result<Option<smol::Task<anyhow::Result<Fetched>>>> {
        let Some((id, items)) = window.asked else {
            return Ok(None);
        };
        let (staged, present) = s.fetched(id).await?;
        if present.len() != items.len() {
            bail!(
                "protocol error: the server answered a fetch of {} files with {}",
                items.len(),
                present.len()
            );
        }
        if staged.is_empty() {
            return Ok(None);
        }
        let packed = s.data.download_staged(&staged, PACK_MAX_BYTES).await?;
        log::debug!(
            "fetched a pack of {} files ({} bytes)",
            present.iter().filter(|p| **p).count(),
            packed.len()
        );
        let root = self.cfg.root.clone();
        Ok(Some(smol::unblock(move || {
            write_fetched(&root, &staged, &packed, items, present)
        })))
    }

    /// Hands the files of a fetched pack to `take_remote`, their `applying` records journaled
    /// together (one write for the pack, not one per file before its rename). Until a file is
    /// put in place, its record only says that its fetched copy in `.ferry/tmp` is to be
    /// removed after a crash (see `start`).
    fn take_fetched(&mut self, s: &mut Session, fetched: Fetched) {
        for (path, e, ..) in &fetched {
            if self.applying.get(path) != Some(e) {
                self.applying.insert(path.clone(), e.clone());
            }
        }
        self.flush();
        for (path, e, tmp, meta) in fetched {
            // The same path twice in a window: the newer one counts (same content, same
            // file: nothing to remove).
            if let Some((_, old, _)) = s.prefetched.insert(path, (e, tmp.clone(), meta)) {
                if old != tmp {
                    let _ = std::fs::remove_file(old);
                }
            }
        }
    }

    /// Drops the files fetched ahead that no change used (`Session::drop_prefetched`), and
    /// their `applying` records, unless an install of the same path and entry still waits
    /// for its sync.
    fn drop_prefetched(&mut self, s: &mut Session) {
        let unused = s.drop_prefetched();
        if unused.is_empty() {
            return;
        }
        let waiting: HashSet<&RelPath> = self.unsynced_installs.iter().collect();
        for (p, e) in unused {
            if !waiting.contains(&p) && self.applying.get(&p) == Some(&e) {
                self.applying.remove(&p);
            }
        }
    }

    /// Removes the symlink the cache knows at `path` (the link itself), so a directory can take
    /// its place; `make_dir` keeps any other.
    fn unlink_for_dir(&self, path: &RelPath) -> std::io::Result<()> {
        if self
            .tree
            .get(path)
            .is_some_and(|s| s.entry.kind == Kind::Symlink)
        {
            fsops::remove(&self.cfg.root, path)?;
        }
        Ok(())
    }

    /// Makes the local path the server's symlink `e`, with the target its change brought.
    fn take_link(&mut self, s: &mut Session, path: &RelPath, e: Entry) {
        let Some(target) = s.targets.get(path).filter(|t| e.check_link(t).is_ok()) else {
            log::debug!("no target yet for the link {path}; its change is on the way");
            return;
        };
        // What the link replaces must still be what the plan saw.
        let expect = self.tree.get(path);
        match fsops::make_link(&self.cfg.root, path, target, expect.as_ref()) {
            Ok(fsops::Install::Done {
                installed: (seen, created),
                displaced,
            }) => {
                s.targets.remove(path);
                self.note_created(created);
                self.tree.set(path, Some(seen));
                self.set_base(path, Some(e));
                self.stats.received += 1;
                log::log!(s.applied(), "applied {path} (link)");
                if let Some(old) = displaced {
                    self.keep_displaced(path, &old);
                }
            }
            Ok(fsops::Install::ChangedHere) => {
                log::debug!("{path} changed here meanwhile; deciding again");
                self.decide_again(path, Some(e));
            }
            // Storage that holds no symlinks (Android's shared storage): said once, skipped.
            Err(err) if err.raw_os_error() == Some(nix::libc::EPERM) => {
                if self.unlinkable.insert(path.clone()) {
                    log::error!(
                        "cannot create the link {path}: this storage does not hold symlinks \
                         ({err}); it is skipped here"
                    );
                }
            }
            Err(err) => {
                log::error!("cannot create the link {path}: {err}");
                self.not_applied(path, Some(e));
            }
        }
    }

    /// Keeps a local edit that finished while the server's version was being put in place.
    fn keep_displaced(&mut self, path: &RelPath, old: &std::path::Path) {
        match fsops::keep_as_conflict(&self.cfg.root, old, path, &self.cfg.name) {
            Ok((copy, created)) => {
                self.note_created(created);
                self.dirty.insert(copy.clone());
                self.stats.conflict(&copy);
                log::warn!("conflict on {path}: it was written here while the server's version arrived; this replica's is kept as {copy}");
            }
            Err(e) => log::error!(
                "conflict on {path}: cannot keep the local version (left at {}): {e}",
                old.display()
            ),
        }
    }

    /// If what `resolve` would do with `path` is upload a small file (new bytes here, nothing
    /// new from the server: its base is what the server has), the pack item that does it.
    fn packable(&mut self, path: &RelPath) -> Option<PackItem> {
        if self.tree.ignores(path, Some(false)) {
            return None;
        }
        let (local, beneath) = self.tree.refresh(path);
        self.note_beneath(path, beneath);
        let local = local?.entry;
        let base = self.tree.base(path);
        let new_bytes = local.kind == Kind::File
            && local.size <= PACK_FILE_MAX
            && !base.as_ref().is_some_and(|b| b.same_content(&local));
        new_bytes.then(|| PackItem {
            path: path.clone(),
            entry: local,
            base,
        })
    }

    /// If what `resolve` would do with `path` (nothing new from the server) is a commit that
    /// can go in a row with others: the delete of a file or link gone here, or a directory new
    /// here.
    fn row_item(&mut self, path: &RelPath) -> Option<RowItem> {
        let base = self.tree.base(path);
        match &base {
            Some(b) if b.is_dir() => return None,
            Some(_) if self.tree.ignores(path, Some(false)) => return None,
            None if self.tree.ignores(path, Some(true)) => return None,
            _ => {}
        }
        let (local, beneath) = self.tree.refresh(path);
        self.note_beneath(path, beneath);
        match (local.map(|s| s.entry), base) {
            (None, Some(base)) => Some(RowItem {
                path: path.clone(),
                op: Op::Delete,
                base: Some(base),
                local: None,
            }),
            (Some(dir), None) if dir.is_dir() => Some(RowItem {
                path: path.clone(),
                op: Op::Mkdir { mode: dir.mode },
                base: None,
                local: Some(dir),
            }),
            _ => None,
        }
    }

    /// Sends the commits of `items` in a row, then takes their results: one round trip for
    /// all rather than one each. A lone one goes the usual way.
    async fn send_row(&mut self, s: &mut Session, items: Vec<RowItem>) -> anyhow::Result<()> {
        if items.len() < 2 {
            for item in items {
                self.resolve(s, &item.path, item.base, None, 0).await?;
            }
            return Ok(());
        }
        if items.iter().any(|i| i.local.is_none()) {
            // Absent may mean out of reach (an unmounted card): never a delete then.
            self.tree
                .check_root()
                .map_err(|lost| Fatal(lost.to_string()))?;
        }
        let commits = items
            .iter()
            .map(|i| (i.path.clone(), i.op.clone(), i.base.clone()))
            .collect();
        let dirs = items.iter().filter(|i| i.local.is_some()).count();
        log::debug!(
            "sending in a row {} deletes and {dirs} new directories",
            items.len() - dirs
        );
        let outcomes = s.commit_many(commits).await?;
        for (item, outcome) in items.into_iter().zip(outcomes) {
            let what = if item.local.is_some() {
                "mkdir"
            } else {
                "delete"
            };
            if let Some(current) = self
                .committed(s, &item.path, item.local, item.base, outcome, what)
                .await?
            {
                // The server moved on meanwhile: decide again against what it has.
                Box::pin(self.resolve(s, &item.path, current, None, 1)).await?;
            }
        }
        Ok(())
    }

    /// Uploads `items` in one pack (`upload_pack`) while the server commits the packs in
    /// `sending`, whose outcomes are taken, oldest first, once more than `PACKS_AHEAD` wait.
    /// Nothing else is sent before those outcomes are taken: a lone file (sent alone) waits
    /// for them all.
    async fn send_pack(
        &mut self,
        s: &mut Session,
        items: Vec<PackItem>,
        sending: &mut VecDeque<Uploaded>,
    ) -> anyhow::Result<()> {
        if items.len() < 2 {
            self.finish_packs(s, sending, 0).await?;
        }
        if let Some(uploaded) = self.upload_pack(s, items).await? {
            sending.push_back(uploaded);
        }
        self.finish_packs(s, sending, PACKS_AHEAD).await
    }

    /// Takes the outcomes of the oldest packs in `sending` until `keep` are left.
    async fn finish_packs(
        &mut self,
        s: &mut Session,
        sending: &mut VecDeque<Uploaded>,
        keep: usize,
    ) -> anyhow::Result<()> {
        while sending.len() > keep {
            let Some(oldest) = sending.pop_front() else {
                break;
            };
            self.finish_pack(s, oldest).await?;
        }
        Ok(())
    }

    /// Sends the files of `items` in one pack: one upload, and its commit (`finish_pack` takes
    /// the outcomes). A file that changed since it was scanned is left for its next change. A
    /// lone file goes the usual way.
    async fn upload_pack(
        &mut self,
        s: &mut Session,
        items: Vec<PackItem>,
    ) -> anyhow::Result<Option<Uploaded>> {
        if items.len() < 2 {
            for item in items {
                let remote = self.tree.base(&item.path);
                self.resolve(s, &item.path, remote, None, 0).await?;
            }
            return Ok(None);
        }
        // The buffer of the pack before, if this batch sent one: its pages are mapped already.
        let mut bytes = std::mem::take(&mut self.pack_buf);
        bytes.clear();
        bytes.reserve(items.iter().map(|i| i.entry.size as usize).sum());
        let mut sent = Vec::with_capacity(items.len());
        for item in items {
            if fsops::append_file(&self.cfg.root, &item.path, &item.entry, &mut bytes) {
                sent.push(item);
            } else {
                log::debug!(
                    "{} changed before it was sent; it will be sent again",
                    item.path
                );
                self.dirty.insert(item.path);
            }
        }
        if sent.is_empty() {
            self.pack_buf = bytes;
            return Ok(None);
        }
        // Any fresh name will do (the server removes a pack once split): no need to hash the
        // whole pack again, its files were each hashed just now.
        let name = format!("p{}", agent::hex(&random::<16>()));
        s.data.report_progress(self.board.transfer(
            &format!("{} files", sent.len()),
            "upload",
            bytes.len() as u64,
        ));
        let uploaded = s.data.upload_bytes(&bytes, &name).await;
        self.board.transfer_done();
        uploaded?;
        log::debug!(
            "uploaded a pack of {} files ({} bytes)",
            sent.len(),
            bytes.len()
        );
        self.stats.sent_bytes += bytes.len() as u64;
        self.pack_buf = bytes;
        let id = s.ask_commit_pack(name, sent.clone()).await?;
        Ok(Some(Uploaded { id, sent }))
    }

    /// Waits for the outcomes of the pack `upload_pack` sent, and takes them: a file the server
    /// refused is decided again, as `resolve` would after a single commit.
    async fn finish_pack(&mut self, s: &mut Session, pack: Uploaded) -> anyhow::Result<()> {
        let outcomes = s.pack_result(pack.id, pack.sent.len()).await?;
        for (item, outcome) in pack.sent.into_iter().zip(outcomes) {
            let what = format!("{} bytes", item.entry.size);
            let path = item.path;
            if let Some(current) = self
                .committed(s, &path, Some(item.entry), item.base, outcome, &what)
                .await?
            {
                // The server moved on meanwhile: decide again against what it has.
                Box::pin(self.resolve(s, &path, current, None, 1)).await?;
            }
        }
        Ok(())
    }

    /// Sends the local state of `path` to the server, whose current entry is `server_has`.
    /// Returns the server's entry if it refused because it had moved on.
    async fn send_local(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        local: Option<Entry>,
        server_has: Option<Entry>,
    ) -> anyhow::Result<Option<Option<Entry>>> {
        let (op, what) = match &local {
            Some(e) if e.kind == Kind::File => {
                if server_has.as_ref().is_some_and(|r| r.same_content(e)) {
                    (
                        Op::Put {
                            staged: None,
                            entry: e.clone(),
                        },
                        "metadata".to_string(),
                    )
                } else {
                    // Named by content, so an upload broken off resumes under the same name.
                    let name = format!("h{}", agent::hex(&e.hash[..16]));
                    // Opened beneath the root, following no symlink: what is sent is the
                    // file in the tree, never what a link points to.
                    let (file, before) = match crate::beneath::open_file(&self.cfg.root, path) {
                        Ok(opened) => opened,
                        Err(err) => {
                            log::debug!("{path} vanished before upload: {err}");
                            self.decide_again(path, server_has.clone());
                            return Ok(None);
                        }
                    };
                    // What the scanner hashed must be what is read: the same size and mtime
                    // (the scanner's own test of a file unchanged), and no write while it is
                    // read (the change time). The server checks the hash of what arrives.
                    let same = |m: &std::fs::Metadata| {
                        m.len() == e.size && crate::scan::mtime_ns(m) == e.mtime_ns
                    };
                    if !same(&before) {
                        log::debug!("{path} changed before upload; it will be sent again");
                        self.decide_again(path, server_has.clone());
                        return Ok(None);
                    }
                    let reread = file.try_clone()?;
                    if let Staged::From(resume) = s.resume_upload(&name, e, &file).await? {
                        if resume.offset > 0 {
                            log::info!(
                                "resuming the upload of {path} at byte {} of {}",
                                resume.offset,
                                e.size
                            );
                        }
                        s.data.report_progress(self.board.transfer(
                            path.as_str(),
                            "upload",
                            e.size,
                        ));
                        let uploaded = s.data.upload(file, &name, *resume).await;
                        self.board.transfer_done();
                        let (size, sent) = uploaded?;
                        log::debug!("uploaded {path}: {sent} bytes transferred");
                        self.stats.sent_bytes += sent;
                        let after = reread.metadata()?;
                        if size != e.size || !same(&after) || ctime_ns(&after) != ctime_ns(&before)
                        {
                            // Written to while we read it: its close brings a hint, and then
                            // the finished file is sent. Nothing to commit now.
                            log::debug!("{path} changed while uploading; it will be sent again");
                            self.decide_again(path, server_has.clone());
                            return Ok(None);
                        }
                    }
                    (
                        Op::Put {
                            staged: Some(name),
                            entry: e.clone(),
                        },
                        format!("{} bytes", e.size),
                    )
                }
            }
            Some(e) if e.kind == Kind::Symlink => {
                // Read again, beneath the root: sent only if it is still what the entry says.
                match crate::beneath::read_link(&self.cfg.root, path) {
                    Ok(target) if e.check_link(&target).is_ok() => {
                        (Op::Link { target }, "link".to_string())
                    }
                    _ => {
                        log::debug!("{path} changed before it was sent; it will be sent again");
                        self.decide_again(path, server_has.clone());
                        return Ok(None);
                    }
                }
            }
            Some(e) => (Op::Mkdir { mode: e.mode }, "mkdir".to_string()),
            None => {
                // Absent may mean out of reach (an unmounted card): never a delete then.
                self.tree
                    .check_root()
                    .map_err(|lost| Fatal(lost.to_string()))?;
                (Op::Delete, "delete".to_string())
            }
        };
        let outcome = s.commit(path, op, server_has.clone()).await?;
        self.committed(s, path, local, server_has, outcome, &what)
            .await
    }

    /// Records the outcome of sending `local` for `path` (the server had `server_has`).
    /// Returns the server's entry if it refused because it had moved on.
    async fn committed(
        &mut self,
        s: &mut Session,
        path: &RelPath,
        local: Option<Entry>,
        server_has: Option<Entry>,
        outcome: Outcome,
        what: &str,
    ) -> anyhow::Result<Option<Option<Entry>>> {
        match outcome {
            Outcome::Done { seq } => {
                s.committed.insert(path.clone(), seq);
                self.stats.sent += 1;
                self.set_base(path, local);
                log::info!("sent {path} ({what})");
                Ok(None)
            }
            Outcome::Conflict { current } => Ok(Some(current)),
            Outcome::Failed { reason } => {
                log::warn!("the server refused {path}: {reason}");
                if local.is_none() && server_has.as_ref().is_some_and(|r| r.kind == Kind::Dir) {
                    // A directory the server keeps (something new is in it): have it here too,
                    // so what it holds has a place to arrive.
                    self.take_remote(s, path, server_has).await?;
                } else if local.as_ref().is_some_and(|e| e.kind == Kind::Symlink) {
                    // Not tried again: a link the server refuses (its storage holds none) stays
                    // refused; it is sent again when it changes here.
                } else {
                    // Maybe a passing problem there (a race with a local program, a full
                    // disk): tried again later, with a growing pause.
                    self.failed.insert(path.clone());
                }
                Ok(None)
            }
        }
    }
}

/// Uploads smaller than this are sent whole, without asking the server what it has staged.
const RESUME_MIN: u64 = 1 << 20;

/// The pause before a refused change is tried again, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// A staged name no upload uses: probing it is a round trip that answers after every change
/// the server sent before it.
const BARRIER: &str = "h00000000000000000000000000000000";

/// What the server already holds of an upload.
enum Staged {
    /// All of it (a commit was lost after the upload): nothing to send.
    Complete,
    /// Send from here (boxed: a hasher is large).
    From(Box<Resume>),
}

/// The files of a fetched pack, written to the state directory: path, entry, where, what.
type Fetched = Vec<(RelPath, Entry, PathBuf, Stat)>;

/// Checks the files of the pack `packed` (staged as `staged`) against their entries (`items`,
/// those `present`) and writes them to the state directory, made durable with one sync for
/// the lot where each download would have had its own fsync.
fn write_fetched(
    root: &std::path::Path,
    staged: &str,
    packed: &[u8],
    items: Vec<(RelPath, Entry)>,
    present: Vec<bool>,
) -> anyhow::Result<Fetched> {
    let _reuse = beneath::Reuse::start();
    let mut written: Fetched = Vec::new();
    // Where each file went, by temporary name (a pack holds up to a thousand files).
    let mut at: HashMap<PathBuf, Stat> = HashMap::new();
    let mut rest = packed;
    for ((path, e), here) in items.into_iter().zip(present) {
        if !here {
            continue;
        }
        if (rest.len() as u64) < e.size {
            bail!("protocol error: the server's pack {staged} is shorter than its files");
        }
        let (part, tail) = rest.split_at(e.size as usize);
        rest = tail;
        if *blake3::hash(part).as_bytes() != e.hash {
            continue;
        }
        let tmp = fsops::fetched_path(root, &path, &e.hash);
        // The same path and bytes twice in a pack: one file serves both.
        if let Some(&meta) = at.get(&tmp) {
            written.push((path, e, tmp, meta));
            continue;
        }
        match fsops::write_unsynced(&tmp, part, &e) {
            Ok(meta) => {
                at.insert(tmp.clone(), meta);
                written.push((path, e, tmp, meta));
            }
            // The last pack's, not yet put in place (or left over): that one stays as it is,
            // and this change downloads its file if it is gone by then.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => log::debug!("cannot write a fetched file to {}: {err}", tmp.display()),
        }
    }
    if let Err(err) = fsops::sync_fs(&fsops::tmp_dir(root)) {
        log::debug!("cannot sync fetched files: {err}; they are downloaded one by one");
        for (_, _, tmp, _) in written.drain(..) {
            let _ = std::fs::remove_file(tmp);
        }
    }
    Ok(written)
}

/// True if the fetched file `part` is still the one written as `meta` (a stat: no open).
fn still_written(part: &std::path::Path, meta: &Stat) -> bool {
    beneath::state_parent(part)
        .and_then(|(dir, name)| dir.stat(name))
        .is_ok_and(|now| {
            now.ino == meta.ino && now.len == meta.len && now.mtime_ns == meta.mtime_ns
        })
}

/// This replica's random identity, kept in its state directory (created on first start).
fn replica_id(root: &std::path::Path) -> std::io::Result<[u8; 16]> {
    let path = fsops::state_dir(root).join("replica.id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim();
        let mut id = [0u8; 16];
        if text.len() == 32
            && (0..16).all(|i| {
                u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                    .map(|b| id[i] = b)
                    .is_ok()
            })
        {
            return Ok(id);
        }
        log::warn!("{} is damaged; making a new one", path.display());
    }
    let id = random::<16>();
    store::write_atomic(&path, format!("{}\n", agent::hex(&id)).as_bytes())?;
    Ok(id)
}

/// Change time in nanoseconds since the epoch: any write to a file moves it.
fn ctime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.ctime() * 1_000_000_000 + meta.ctime_nsec()
}

/// BLAKE3 state over the first `len` bytes of `file`; `None` if it is shorter.
fn hash_prefix(mut file: std::fs::File, len: u64) -> Option<blake3::Hasher> {
    use std::io::{Read, Seek};
    file.rewind().ok()?;
    let mut hasher = blake3::Hasher::new();
    let n = std::io::copy(&mut file.take(len), &mut hasher).ok()?;
    (n == len).then_some(hasher)
}

/// How many changes `Session::more_changes` gathers for one call of `on_message`.
const MERGED_CHANGES: usize = 16 * 1024;

/// A file's bytes, ready to be put in place.
enum Ready {
    /// Fetched in a pack: its temporary file (durable already) and what it is.
    Fetched(PathBuf, Stat),
    Downloaded(crate::data::Downloaded),
}

/// Packs uploaded whose outcomes are not yet taken, at most, while the next one is built: the
/// server splits one (it splits two ahead, see `server::EARLY_SPLITS`) while it commits another.
const PACKS_AHEAD: usize = 2;

/// A pack uploaded and its commit sent, its outcomes not yet taken.
struct Uploaded {
    /// The commit's id.
    id: u64,
    /// The files it holds.
    sent: Vec<PackItem>,
}

/// A commit that goes in a row with others (see `Client::row_item`).
struct RowItem {
    path: RelPath,
    op: Op,
    /// What we and the server agreed on, which the commit is checked against.
    base: Option<Entry>,
    /// What is here now.
    local: Option<Entry>,
}

/// A window of changes whose small files were asked for in one pack.
struct Window {
    /// How many changes it spans.
    covered: usize,
    /// The fetch's id and the files asked for; `None`: too few to be worth a pack.
    asked: Option<(u64, Vec<(RelPath, Entry)>)>,
}

impl Session {
    /// Appends to `changes` the `Changes` frames that follow it, as far as they are here
    /// already (at most `MERGED_CHANGES` changes): a first sync's listing comes in many
    /// frames, and its packs are pipelined only within one call (see `on_message`). Other
    /// messages keep their order. Returns how many frames it took.
    fn more_changes(&mut self, changes: &mut Vec<Change>) -> u32 {
        let mut taken = 0;
        while changes.len() < MERGED_CHANGES {
            let next = match self.deferred.pop_front() {
                Some(m) => m,
                None => match self.inbox.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match next {
                ServerMsg::Changes(more) => {
                    changes.extend(more);
                    taken += 1;
                }
                other => {
                    self.deferred.push_front(other);
                    break;
                }
            }
        }
        taken
    }

    /// Asks the server about a file and waits for the answer: (size, hash of the prefix).
    async fn probe(
        &mut self,
        target: ProbeTarget,
        len: u64,
    ) -> anyhow::Result<(u64, crate::core::entry::Hash)> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(ClientMsg::Probe { id, target, len }).await?;
        self.answer("probing a transfer", |m| match m {
            ServerMsg::Probed {
                id: got,
                size,
                hash,
            } if got == id => ControlFlow::Break((size, hash)),
            other => ControlFlow::Continue(other),
        })
        .await
    }

    /// Waits for the answer `pick` takes (`Break`; any other message comes back as
    /// `Continue`), keeping the other messages for later.
    async fn answer<T>(
        &mut self,
        doing: &str,
        mut pick: impl FnMut(ServerMsg) -> ControlFlow<T, ServerMsg>,
    ) -> anyhow::Result<T> {
        loop {
            match self.inbox.recv().await {
                Ok(msg) => match pick(msg) {
                    ControlFlow::Break(answer) => return Ok(answer),
                    ControlFlow::Continue(other) => self.deferred.push_back(other),
                },
                Err(_) => bail!("lost the connection to the server while {doing}"),
            }
        }
    }

    /// Where to start uploading `src` (whose entry is `e`) as the staged file `name`: after
    /// the part a broken earlier attempt left, if the server's hash of it matches ours.
    async fn resume_upload(
        &mut self,
        name: &str,
        e: &Entry,
        src: &std::fs::File,
    ) -> anyhow::Result<Staged> {
        if e.size < RESUME_MIN {
            // Sending it again costs less than the round trip that asks.
            return Ok(Staged::From(Box::default()));
        }
        let (size, hash) = self
            .probe(ProbeTarget::Staged(name.to_string()), u64::MAX)
            .await?;
        // (A size of 0 may mean "no such file": an empty file is always sent.)
        if size > 0 && size == e.size && hash == e.hash {
            return Ok(Staged::Complete);
        }
        if size == 0 || size >= e.size {
            return Ok(Staged::From(Box::default()));
        }
        // (A second descriptor shares the offset: `upload` seeks to where it starts.)
        let src = src.try_clone()?;
        Ok(Staged::From(Box::new(
            match smol::unblock(move || hash_prefix(src, size)).await {
                Some(h) if *h.finalize().as_bytes() == hash => Resume {
                    offset: size,
                    hasher: h,
                },
                _ => Resume::default(),
            },
        )))
    }

    /// Where to start downloading `path` (expected `e`) into `tmp`: after the part a broken
    /// earlier attempt left, if the server's file starts with the same bytes.
    async fn resume_download(
        &mut self,
        path: &RelPath,
        e: &Entry,
        tmp: &std::path::Path,
    ) -> anyhow::Result<Resume> {
        let have = std::fs::metadata(tmp).map_or(0, |m| m.len());
        if have == 0 || have >= e.size {
            return Ok(Resume::default());
        }
        let Ok(tmp) = std::fs::File::open(tmp) else {
            return Ok(Resume::default());
        };
        let Some(local) = smol::unblock(move || hash_prefix(tmp, have)).await else {
            return Ok(Resume::default());
        };
        let (size, hash) = self.probe(ProbeTarget::File(path.clone()), have).await?;
        Ok(if size == e.size && hash == *local.finalize().as_bytes() {
            Resume {
                offset: have,
                hasher: local,
            }
        } else {
            Resume::default()
        })
    }

    async fn send(&self, msg: ClientMsg) -> anyhow::Result<()> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| anyhow!("lost the connection to the server"))
    }

    /// Asks the server for a pack of `items`; `fetched` waits for the answer.
    async fn ask_fetch(&mut self, items: Vec<(RelPath, Entry)>) -> anyhow::Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(ClientMsg::Fetch { id, items }).await?;
        Ok(id)
    }

    /// Waits for the answer to the fetch `id`: the pack's staged name and which items it
    /// holds.
    async fn fetched(&mut self, id: u64) -> anyhow::Result<(String, Vec<bool>)> {
        self.kept_or_answer("fetching files", |m| match m {
            ServerMsg::Fetched {
                id: got,
                staged,
                present,
            } if got == id => ControlFlow::Break((staged, present)),
            other => ControlFlow::Continue(other),
        })
        .await
    }

    /// `answer`, for a request sent a while ago: its answer may have come while another was
    /// awaited, and been kept for later.
    async fn kept_or_answer<T>(
        &mut self,
        doing: &str,
        mut pick: impl FnMut(ServerMsg) -> ControlFlow<T, ServerMsg>,
    ) -> anyhow::Result<T> {
        let mut others = VecDeque::with_capacity(self.deferred.len());
        while let Some(m) = self.deferred.pop_front() {
            match pick(m) {
                ControlFlow::Break(answer) => {
                    others.append(&mut self.deferred);
                    self.deferred = others;
                    return Ok(answer);
                }
                ControlFlow::Continue(other) => others.push_back(other),
            }
        }
        self.deferred = others;
        self.answer(doing, pick).await
    }

    /// Sends a pack's commit; `pack_result` waits for its outcomes.
    async fn ask_commit_pack(
        &mut self,
        staged: String,
        items: Vec<PackItem>,
    ) -> anyhow::Result<u64> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(ClientMsg::CommitPack { id, staged, items })
            .await?;
        Ok(id)
    }

    /// Waits for the outcomes of the pack commit `id` of `n` files, one per file.
    async fn pack_result(&mut self, id: u64, n: usize) -> anyhow::Result<Vec<Outcome>> {
        let outcomes = self
            .kept_or_answer("committing a pack", |m| match m {
                ServerMsg::PackResult { id: got, outcomes } if got == id => {
                    ControlFlow::Break(outcomes)
                }
                other => ControlFlow::Continue(other),
            })
            .await?;
        if outcomes.len() != n {
            bail!(
                "protocol error: {} outcomes for a pack of {n} files",
                outcomes.len()
            );
        }
        Ok(outcomes)
    }

    /// Sends commits in a row, then waits for all their results (the server answers in order;
    /// other messages are kept for later).
    async fn commit_many(
        &mut self,
        commits: Vec<(RelPath, Op, Option<Entry>)>,
    ) -> anyhow::Result<Vec<Outcome>> {
        let first = self.next_id + 1;
        let n = commits.len();
        for (path, op, base) in commits {
            self.next_id += 1;
            let id = self.next_id;
            self.send(ClientMsg::Commit { id, path, op, base }).await?;
        }
        let ids = first..first + n as u64;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        // Counted, not searched for after each result (up to a thousand deletes at a time).
        let mut waiting = n;
        while waiting > 0 {
            let (id, outcome) = self
                .answer("committing a row of changes", |m| match m {
                    ServerMsg::CommitResult { id, outcome } if ids.contains(&id) => {
                        ControlFlow::Break((id, outcome))
                    }
                    other => ControlFlow::Continue(other),
                })
                .await?;
            if outcomes[(id - first) as usize].replace(outcome).is_none() {
                waiting -= 1;
            }
        }
        Ok(outcomes.into_iter().flatten().collect())
    }

    /// Sends a commit and waits for its result, keeping other messages for later.
    async fn commit(
        &mut self,
        path: &RelPath,
        op: Op,
        base: Option<Entry>,
    ) -> anyhow::Result<Outcome> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(ClientMsg::Commit {
            id,
            path: path.clone(),
            op,
            base,
        })
        .await?;
        self.answer(&format!("committing {path}"), |m| match m {
            ServerMsg::CommitResult { id: got, outcome } if got == id => {
                ControlFlow::Break(outcome)
            }
            other => ControlFlow::Continue(other),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsops::tests::file_entry;

    #[test]
    fn a_fetched_file_waiting_to_be_put_in_place_is_never_rewritten() {
        let root = std::env::temp_dir().join(format!("ferry-fetched-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        fsops::prepare_state_dir(&root).unwrap();
        let bytes = b"the same bytes".to_vec();
        let entry = file_entry(&bytes);
        let path: RelPath = "d/f".parse().unwrap();
        let item = (path.clone(), entry.clone());
        // Twice in one pack: one file serves both.
        let twice = [bytes.clone(), bytes.clone()].concat();
        let first = write_fetched(&root, "p1", &twice, vec![item.clone(); 2], vec![true; 2]);
        let first = first.unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!((&first[0].2, first[0].3), (&first[1].2, first[1].3));
        // The next pack brings it again while the first still waits to be put in place (it is
        // written while that pack's files are installed): the waiting file is left as it is.
        let second = write_fetched(&root, "p2", &bytes, vec![item], vec![true]).unwrap();
        assert!(second.is_empty(), "{second:?}");
        assert!(still_written(&first[0].2, &first[0].3));
        assert_eq!(std::fs::read(&first[0].2).unwrap(), bytes);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_start_after_a_lost_rename_drops_the_base_and_takes_no_delete() {
        use std::os::unix::fs::PermissionsExt;
        // A power cut lost the rename of a fetched file, not its journaled base: the file
        // still waits in `.ferry/tmp` and is absent from the tree.
        let root = std::env::temp_dir().join(format!("ferry-lost-rename-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let state = fsops::state_dir(&root);
        std::fs::create_dir_all(fsops::tmp_dir(&root)).unwrap();
        let bytes = b"fetched".to_vec();
        let entry = file_entry(&bytes);
        let (lost, done): (RelPath, RelPath) = ("lost".parse().unwrap(), "done".parse().unwrap());
        let waiting = fsops::fetched_path(&root, &lost, &entry.hash);
        std::fs::write(&waiting, &bytes).unwrap();
        std::fs::write(root.join("done"), &bytes).unwrap();
        let both: BTreeMap<RelPath, Entry> =
            [(lost.clone(), entry.clone()), (done.clone(), entry.clone())].into();
        let (_, mut journal) = store::Journal::open_or_reset::<Saved>(&state, "client").unwrap();
        journal
            .compact(&Saved {
                epoch: 1,
                last_seq: 2,
                base: both.clone(),
                local: BTreeMap::new(),
                applying: both,
            })
            .unwrap();
        drop(journal);
        let secret = root.join("secret");
        std::fs::write(&secret, "a-secret-of-enough-bytes").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let client = Client::start(ClientConfig {
            server: "127.0.0.1:1".into(),
            root: root.clone(),
            secret: Secret::load(&secret).unwrap(),
            name: "t".into(),
            watch: WatchConfig {
                root: root.clone(),
                backend: crate::watch::Backend::Poll,
                poll_interval: Duration::from_secs(60),
            },
            max_rate: None,
            once: false,
            insecure_plaintext: true,
            server_fingerprint: None,
        })
        .unwrap();
        // The lost one is reconciled as at a first contact (its absence is no delete); the
        // one in place keeps its base; nothing waits in `.ferry/tmp`.
        assert_eq!(client.tree.base(&lost), None);
        assert_eq!(client.tree.base(&done).as_ref(), Some(&entry));
        assert!(client.applying.is_empty());
        assert!(!waiting.exists());
        drop(client);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
