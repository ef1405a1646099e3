//! The control-channel messages. Each is one postcard-encoded frame (see `codec`).
//!
//! Order on a connection: `Hello` → `Challenge` → `Auth` → `Welcome` (or `Refused`), then the
//! client's `Subscribe` and, from then on, `Commit`s one way and `Changes` the other. The
//! changes a `Subscribe` asks for (a listing of the whole tree on a first sync) come
//! `Listing`, `Changes`…, `CaughtUp`, at most `CATCH_UP_WINDOW` frames ahead of the `Took`s
//! that say the client has taken them, so that neither side queues all of them at once.

use serde::{Deserialize, Serialize};

use crate::core::entry::{Entry, Hash};
use crate::core::path::RelPath;

/// Bumped whenever a message changes shape; peers with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 5;

/// At most this many changes in one `Changes` frame.
pub const CHANGES_PER_FRAME: usize = 512;

/// How many `Changes` frames of a catch-up the server sends ahead of the client's `Took`s:
/// 32,768 changes, room for two of the client's merged batches (so its pipeline never waits
/// for the next), and a few MiB of memory however big the tree.
pub const CATCH_UP_WINDOW: usize = 64;

/// Random bytes each side contributes to the handshake, so a proof is never replayed.
pub type Nonce = [u8; 32];

/// HMAC-SHA256 proof of the shared secret over the handshake transcript.
pub type Proof = [u8; 32];

/// Messages a client sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First frame: who we are and our half of the challenge.
    Hello {
        /// Must equal `PROTOCOL_VERSION`.
        version: u32,
        /// The client's name, used in logs and conflict names.
        name: String,
        /// The replica's random identity (kept in its state directory): names its staging
        /// area on the server, so an upload broken by a lost connection resumes there.
        id: [u8; 16],
        /// Client nonce.
        nonce: Nonce,
    },
    /// Proof that the client knows the secret (answers `Challenge`).
    Auth {
        /// HMAC over the transcript (see `auth`).
        proof: Proof,
    },
    /// Send every change after `since` under `epoch`, then live changes.
    Subscribe {
        /// The server epoch the client's state belongs to (0: none yet).
        epoch: u64,
        /// The last seq the client applied under that epoch.
        since: u64,
    },
    /// Apply one change to the server's tree, if `base` is still what the server has.
    Commit {
        /// Echoed in the `CommitResult`.
        id: u64,
        /// The path the change is about.
        path: RelPath,
        /// What to do.
        op: Op,
        /// What the client believes the server has at `path` (`None`: nothing). The server
        /// refuses with `Conflict` if that is no longer true.
        base: Option<Entry>,
    },
    /// Asks for the size and hash of what the server holds, to resume a broken transfer
    /// after checking the part already there. Answered by `Probed`.
    Probe {
        /// Echoed in the answer.
        id: u64,
        /// Which file.
        target: ProbeTarget,
        /// Hash at most this many bytes from the start.
        len: u64,
    },
    /// Puts many small files at once: their bytes were uploaded back to back, in `items`'
    /// order, as one staged file `staged` (a pack). Each item is committed as a `Put` would
    /// be; answered by one `PackResult`. Saves a data connection and a round trip per file.
    CommitPack {
        /// Echoed in the `PackResult`.
        id: u64,
        /// Name of the pack in the replica's staging area.
        staged: String,
        /// The files, in the order of their bytes in the pack.
        items: Vec<PackItem>,
    },
    /// Asks for many small files at once: the server writes the bytes of those it still has
    /// as listed into one staged file (a pack) for the client to download. Answered by
    /// `Fetched`.
    Fetch {
        /// Echoed in the answer.
        id: u64,
        /// The files and the entries the client expects of them.
        items: Vec<(RelPath, Entry)>,
    },
    /// The client has taken `frames` more `Changes` frames of its catch-up (those before
    /// `CaughtUp`) from its queue: room for as many more.
    Took {
        /// How many frames.
        frames: u32,
    },
    /// Keepalive.
    Ping,
}

/// One file of a `CommitPack`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PackItem {
    /// Where it goes.
    pub path: RelPath,
    /// The file's entry (its bytes are the next `entry.size` bytes of the pack).
    pub entry: Entry,
    /// What the client believes the server has at `path`, as in `Commit`.
    pub base: Option<Entry>,
}

/// At most this many files in one pack (either way), and bytes in one pack: a pack is held in
/// memory while it is built and split.
pub const PACK_MAX_ITEMS: usize = 1024;
pub const PACK_MAX_BYTES: u64 = 4 << 20;
/// Files up to this size travel in packs; larger ones have a transfer of their own.
pub const PACK_FILE_MAX: u64 = 128 << 10;

/// A file a `Probe` asks about.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ProbeTarget {
    /// A (partial) upload in the client's staging area.
    Staged(String),
    /// A file in the tree.
    File(RelPath),
}

/// A change a client asks the server to make.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Put a file: its bytes were uploaded to the replica's staging area as `staged`; `None`
    /// when only metadata (mtime, mode) changes and the server already has these bytes.
    Put {
        /// Name of the uploaded file in `.ferry/staging/<replica>/` (see `Grant::staging`).
        staged: Option<String>,
        /// The file's final entry (the server checks size and hash against it).
        entry: Entry,
    },
    /// Create a directory (or change its mode).
    Mkdir {
        /// Permission bits.
        mode: u32,
    },
    /// Delete a file or an empty directory.
    Delete,
    /// Rename `path` (with everything beneath it) to `to`, which must be absent.
    Rename {
        /// The new name.
        to: RelPath,
    },
    /// Make `path` a symlink to `target` (its entry is `Entry::link(target)`); the server
    /// creates it as it is and never follows it.
    Link {
        /// The link's text: any path, at most `MAX_LINK_TARGET` bytes, no NUL.
        target: String,
    },
}

/// Messages the server sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to `Hello`: the server's half of the challenge.
    Challenge {
        /// Server protocol version.
        version: u32,
        /// Server nonce.
        nonce: Nonce,
    },
    /// Authentication succeeded.
    Welcome {
        /// The server's own proof, so the client knows it is not talking to an impostor.
        proof: Proof,
        /// What this session may use.
        grant: Grant,
    },
    /// The server refuses the connection; it closes after this frame.
    Refused {
        /// Why, for the client's log.
        reason: String,
    },
    /// Changes in seq order (a catch-up batch or a live broadcast), at most
    /// `CHANGES_PER_FRAME`.
    Changes(Vec<Change>),
    /// Catch-up is complete up to `seq`; `full` means the catch-up was a full listing (new
    /// epoch or new client): paths the client knew but that were not listed are unknown to the
    /// server, not deleted.
    CaughtUp {
        /// Highest seq sent.
        seq: u64,
        /// Whether the catch-up was a full listing.
        full: bool,
    },
    /// Outcome of a `Commit`.
    CommitResult {
        /// The `Commit`'s id.
        id: u64,
        /// What happened.
        outcome: Outcome,
    },
    /// Answer to `Probe`.
    Probed {
        /// The `Probe`'s id.
        id: u64,
        /// The file's size (0 if there is none).
        size: u64,
        /// BLAKE3 of its first `min(size, len)` bytes.
        hash: Hash,
    },
    /// Keepalive.
    Ping,
    /// Sent before a catch-up's changes: how many there are and the bytes of their files, so
    /// the client can show progress.
    Listing { changes: u64, bytes: u64 },
    /// Outcome of a `CommitPack`, one per item in its order.
    PackResult {
        /// The `CommitPack`'s id.
        id: u64,
        /// What happened to each item.
        outcomes: Vec<Outcome>,
    },
    /// Answer to `Fetch`: the pack `staged` in the client's staging area holds, back to back,
    /// the bytes of the items marked present (the others changed on the server: their new
    /// state comes as a change).
    Fetched {
        /// The `Fetch`'s id.
        id: u64,
        /// Name of the pack in the client's staging area; empty if no item is present.
        staged: String,
        /// For each item of the `Fetch`, whether its bytes are in the pack.
        present: Vec<bool>,
    },
}

/// What an authenticated session gets: the index it talks to and its data-plane access.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Grant {
    /// Identifies this server index; changes only if its index was lost.
    pub epoch: u64,
    /// Host of the FTP data plane; `None`: the address the client connected to.
    pub ftp_host: Option<String>,
    /// Port of the FTP data plane.
    pub ftp_port: u16,
    /// FTP user (valid while this control session lives, with the embedded server).
    pub ftp_user: String,
    /// FTP password for `ftp_user`.
    pub ftp_pass: String,
    /// Staging directory name for this client's uploads (the same in every session, so a
    /// broken upload can resume).
    pub staging: String,
}

/// One accepted change to the server's tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Server sequence number of this change.
    pub seq: u64,
    /// The path changed.
    pub path: RelPath,
    /// Its new state; `None` for a delete (tombstone).
    pub entry: Option<Entry>,
    /// Set when this entry arrived by a rename from that path, so a client can rename locally
    /// instead of downloading again.
    pub moved_from: Option<RelPath>,
    /// For a symlink entry: its target, read when the change is sent (the index does not keep
    /// it). `None` if the link changed since: a newer change follows. The receiver checks it
    /// against the entry (`Entry::check_link`).
    pub target: Option<String>,
}

/// Outcome of a commit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied as seq.
    Done {
        /// The seq of the (last) change the commit made.
        seq: u64,
    },
    /// The server's state differs from the client's base; here is what it has.
    Conflict {
        /// The server's current entry at the path.
        current: Option<Entry>,
    },
    /// Refused for another reason (bad staged file, I/O error); the client logs it.
    Failed {
        /// Why.
        reason: String,
    },
}

impl ClientMsg {
    /// The message's kind, for logs (without its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "Hello",
            ClientMsg::Auth { .. } => "Auth",
            ClientMsg::Subscribe { .. } => "Subscribe",
            ClientMsg::Commit { .. } => "Commit",
            ClientMsg::Probe { .. } => "Probe",
            ClientMsg::CommitPack { .. } => "CommitPack",
            ClientMsg::Fetch { .. } => "Fetch",
            ClientMsg::Took { .. } => "Took",
            ClientMsg::Ping => "Ping",
        }
    }
}

impl ServerMsg {
    /// The message's kind, for logs (without its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMsg::Challenge { .. } => "Challenge",
            ServerMsg::Welcome { .. } => "Welcome",
            ServerMsg::Refused { .. } => "Refused",
            ServerMsg::Changes(_) => "Changes",
            ServerMsg::CaughtUp { .. } => "CaughtUp",
            ServerMsg::CommitResult { .. } => "CommitResult",
            ServerMsg::Probed { .. } => "Probed",
            ServerMsg::Ping => "Ping",
            ServerMsg::Listing { .. } => "Listing",
            ServerMsg::PackResult { .. } => "PackResult",
            ServerMsg::Fetched { .. } => "Fetched",
        }
    }
}
