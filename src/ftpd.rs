//! The FTP server embedded in the server agent: libunftp on its own thread with a small tokio
//! runtime (the rest of ferry runs on smol; tokio stays inside this module).
//!
//! Why libunftp: a maintained FTP(S) server library whose storage back-end and authenticator
//! are traits, so confinement is ours to write rather than configuration to get right. We wrap
//! its local-filesystem back-end (`unftp-sbe-fs`, which opens everything beneath the root
//! through cap-std, so no path or symlink resolves outside it) in `Confined`:
//!
//! - a session may read (RETR, SIZE, MDTM, with REST) any path that is a valid `RelPath` —
//!   never anything in `.ferry/` — and the files in its own staging directory;
//! - it may write (STOR, REST+STOR) and delete only `.ferry/staging/<its client>/<name>`;
//! - listings, MKD, RMD and renames are refused everywhere: clients learn the tree from the
//!   control channel, not from FTP.
//!
//! Credentials are per control session (`FtpCredentials`): inserted when a client authenticates
//! on the control channel, removed when that session ends; from then on an FTP login made with
//! them can do nothing more.

use std::collections::HashMap;
use std::fmt::{self, Debug, Display};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use async_trait::async_trait;
use libunftp::options::FtpsRequired;
use unftp_core::auth::{
    AuthenticationError, Authenticator, Credentials, Principal, UserDetail, UserDetailError,
    UserDetailProvider,
};
use unftp_core::storage::{
    Error, ErrorKind, Fileinfo, Result as StorageResult, StorageBackend, FEATURE_RESTART,
};
use unftp_sbe_fs::{Filesystem, Meta};

use crate::core::path::{RelPath, STATE_DIR};
use crate::fsops;

/// Per-session FTP credentials, shared between the control channel and the FTP server.
#[derive(Clone, Default, Debug)]
pub struct FtpCredentials {
    /// user → (BLAKE3 of the password, staging directory name)
    inner: Arc<Mutex<HashMap<String, (blake3::Hash, String)>>>,
}

impl FtpCredentials {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `user` log in with `pass`; its uploads go to `.ferry/staging/<staging>/`.
    pub fn insert(&self, user: &str, pass: &str, staging: &str) {
        self.lock().insert(
            user.to_string(),
            (blake3::hash(pass.as_bytes()), staging.to_string()),
        );
    }

    /// Revokes `user` (new logins fail).
    pub fn remove(&self, user: &str) {
        self.lock().remove(user);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (blake3::Hash, String)>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The staging directory of `user` if `pass` is right. blake3::Hash compares in constant time.
    fn check(&self, user: &str, pass: &str) -> Option<String> {
        let table = self.lock();
        let (hash, staging) = table.get(user)?;
        (*hash == blake3::hash(pass.as_bytes())).then(|| staging.clone())
    }

    fn staging(&self, user: &str) -> Option<String> {
        self.lock().get(user).map(|(_, s)| s.clone())
    }

    /// True while `user`'s control session lives.
    fn live(&self, user: &str) -> bool {
        self.lock().contains_key(user)
    }
}

/// The hashes of the uploads the FTP server wrote in full, taken as their bytes arrived, so
/// the commit that follows need not read a large file back to check it. A receipt is trusted
/// only while the staged file is as its upload left it (same inode, size and change time), and
/// is never written for an upload that overlapped another to the same file: their writes may
/// have interleaved, so that file is read back.
#[derive(Clone, Default, Debug)]
pub struct Receipts {
    inner: Arc<Mutex<ReceiptTable>>,
}

#[derive(Default, Debug)]
struct ReceiptTable {
    done: HashMap<PathBuf, Receipt>,
    /// Uploads under way per file, and whether two or more were at once since it had none.
    writing: HashMap<PathBuf, (u32, bool)>,
}

#[derive(Debug)]
struct Receipt {
    ino: u64,
    size: u64,
    ctime: (i64, i64),
    hash: [u8; 32],
}

/// An upload under way to one staged file (see `Receipts::begin`).
struct Writing<'a> {
    receipts: &'a Receipts,
    path: PathBuf,
}

impl Receipts {
    /// Smaller uploads are read back: cheap, and too many to keep receipts for.
    const MIN_SIZE: u64 = 1 << 20;
    /// Receipts never taken (an upload abandoned before its commit) are dropped past this.
    const MAX: usize = 64;

    fn lock(&self) -> std::sync::MutexGuard<'_, ReceiptTable> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes an upload to `path` beginning: what a receipt said of the file no longer holds.
    fn begin(&self, path: PathBuf) -> Writing<'_> {
        let mut table = self.lock();
        table.done.remove(&path);
        let (n, overlapped) = table.writing.entry(path.clone()).or_default();
        *n += 1;
        *overlapped |= *n > 1;
        Writing {
            receipts: self,
            path,
        }
    }

    /// Forgets the receipt for `path`.
    pub fn forget(&self, path: &Path) {
        self.lock().done.remove(path);
    }

    /// The hash of the staged file at `path` as its upload wrote it, if there is a receipt
    /// and `meta` (the file's now) shows it unchanged since. The receipt is used up.
    pub fn take(&self, path: &Path, meta: &std::fs::Metadata) -> Option<[u8; 32]> {
        use std::os::unix::fs::MetadataExt;
        let r = self.lock().done.remove(path)?;
        let same = r.ino == meta.ino()
            && r.size == meta.len()
            && r.ctime == (meta.ctime(), meta.ctime_nsec());
        same.then_some(r.hash)
    }
}

impl Writing<'_> {
    /// The upload wrote the whole file, `meta` as it left it, whose bytes hash to `hash`.
    fn finish(self, meta: &std::fs::Metadata, hash: blake3::Hash) {
        use std::os::unix::fs::MetadataExt;
        let mut table = self.receipts.lock();
        let alone = table.writing.get(&self.path).is_some_and(|&(_, o)| !o);
        if !alone || meta.len() < Receipts::MIN_SIZE {
            return;
        }
        if table.done.len() >= Receipts::MAX {
            table.done.clear();
        }
        let receipt = Receipt {
            ino: meta.ino(),
            size: meta.len(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            hash: *hash.as_bytes(),
        };
        table.done.insert(self.path.clone(), receipt);
    }
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut table = self.receipts.lock();
        if let Some((n, _)) = table.writing.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                table.writing.remove(&self.path);
            }
        }
    }
}

/// The running FTP server.
#[derive(Debug)]
pub struct EmbeddedFtp {
    /// The address it accepts connections on.
    pub addr: SocketAddr,
    _thread: std::thread::JoinHandle<()>,
}

/// Starts the FTP server for `root` on `listen` (port 0 picks a free port; `addr` tells
/// which). Returns once it accepts connections.
pub fn start(
    root: PathBuf,
    listen: SocketAddr,
    creds: FtpCredentials,
    receipts: Receipts,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<EmbeddedFtp> {
    let listener = std::net::TcpListener::bind(listen).with_context(|| {
        format!("cannot listen for FTP on {listen} (in use? try another --ftp-listen)")
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    // Open the root once here so a bad root is reported now, not per connection.
    Filesystem::new(root.clone())
        .with_context(|| format!("the FTP server cannot open {}", root.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the FTP server's runtime")?;
    let thread = std::thread::Builder::new()
        .name("ftp".into())
        .spawn(move || runtime.block_on(serve(listener, root, creds, receipts, tls)))?;
    Ok(EmbeddedFtp {
        addr,
        _thread: thread,
    })
}

async fn serve(
    listener: std::net::TcpListener,
    root: PathBuf,
    creds: FtpCredentials,
    receipts: Receipts,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("the FTP server cannot use its socket: {e}");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("FTP accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // Replies are small and answered at once: don't let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        let server = match build(&root, &creds, &receipts, tls.clone()) {
            Ok(s) => s,
            Err(e) => {
                log::error!("FTP session from {peer} not served: {e}");
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = server.service(stream).await {
                log::debug!("FTP session from {peer} ended: {e:?}");
            }
        });
    }
}

/// One libunftp server per connection: `Server::service` consumes it, and building one is
/// cheap (a few `Arc`s and a directory handle).
fn build(
    root: &Path,
    creds: &FtpCredentials,
    receipts: &Receipts,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<libunftp::Server<Confined, SessionUser>> {
    let root = root.to_path_buf();
    let fs_root = root.clone();
    let session_creds = creds.clone();
    let receipts = receipts.clone();
    let builder = libunftp::ServerBuilder::with_user_detail_provider(
        Box::new(move || Confined {
            fs: Filesystem::new(fs_root.clone()).expect("the root was opened at start"),
            root: fs_root.clone(),
            creds: session_creds.clone(),
            receipts: receipts.clone(),
        }),
        Arc::new(Users(creds.clone())),
    )
    .authenticator(Arc::new(Auth(creds.clone())))
    .greeting("ferry")
    .idle_session_timeout(300);
    // With TLS, nothing is accepted in plaintext: not the login, not a byte of a file.
    let builder = match tls {
        Some(config) => builder
            .ftps_manual::<PathBuf>(config)
            .ftps_required(FtpsRequired::All, FtpsRequired::All),
        None => builder,
    };
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("cannot configure the FTP server: {e}"))
}

/// A logged-in FTP user: which staging area it may write.
#[derive(Debug, Clone)]
pub struct SessionUser {
    name: String,
    staging: String,
}

impl Display for SessionUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "staging {}", self.staging)
    }
}

impl UserDetail for SessionUser {}

#[derive(Debug)]
struct Auth(FtpCredentials);

#[async_trait]
impl Authenticator for Auth {
    async fn authenticate(
        &self,
        user: &str,
        creds: &Credentials,
    ) -> Result<Principal, AuthenticationError> {
        let pass = creds
            .password
            .as_deref()
            .ok_or(AuthenticationError::BadPassword)?;
        match self.0.check(user, pass) {
            Some(_) => Ok(Principal {
                username: user.to_string(),
            }),
            None => Err(AuthenticationError::BadPassword),
        }
    }
}

#[derive(Debug)]
struct Users(FtpCredentials);

#[async_trait]
impl UserDetailProvider for Users {
    type User = SessionUser;

    async fn provide_user_detail(&self, p: &Principal) -> Result<SessionUser, UserDetailError> {
        match self.0.staging(&p.username) {
            Some(staging) => Ok(SessionUser {
                name: p.username.clone(),
                staging,
            }),
            None => Err(UserDetailError::UserNotFound {
                username: p.username.clone(),
            }),
        }
    }
}

/// What a path names, for one session.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// A path in the synced tree (read-only over FTP).
    Tree,
    /// A file in the client's own staging directory (read, write, delete).
    OwnStaging,
    /// The root directory itself (only as a working directory).
    Root,
}

/// Classifies an FTP path, or `None` if the session may not touch it at all.
fn place(user: &SessionUser, path: &Path) -> Option<Place> {
    let s = path.to_str()?;
    let s = s.strip_prefix('/').unwrap_or(s);
    if s.is_empty() || s == "." {
        return Some(Place::Root);
    }
    let staging = format!("{STATE_DIR}/staging/{}/", user.staging);
    if let Some(name) = s.strip_prefix(&staging) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        return ok.then_some(Place::OwnStaging);
    }
    RelPath::new(s).ok().map(|_| Place::Tree)
}

/// Buffer size for the data connections' file reads and writes.
const COPY_BUF: usize = 256 << 10;

/// An upload is hashed and written this much at a time.
const CHUNK: usize = 4 * COPY_BUF;

/// What a blocking write returned; a panic in it is an error here.
fn joined<T>(r: Result<std::io::Result<T>, tokio::task::JoinError>) -> std::io::Result<T> {
    r.map_err(std::io::Error::other)?
}

fn denied() -> Error {
    Error::from(ErrorKind::PermissionDenied)
}

/// unftp-sbe-fs with ferry's confinement rules in front of it.
#[derive(Debug)]
struct Confined {
    fs: Filesystem,
    root: PathBuf,
    creds: FtpCredentials,
    receipts: Receipts,
}

impl Confined {
    /// What `path` is to `user`, or `None` if it may not touch it — or anything at all once
    /// its control session has ended (a login outlives its credentials only until then).
    fn place(&self, user: &SessionUser, path: &Path) -> Option<Place> {
        if !self.creds.live(&user.name) {
            return None;
        }
        place(user, path)
    }
}

#[async_trait]
impl StorageBackend<SessionUser> for Confined {
    type Metadata = Meta;

    fn supported_features(&self) -> u32 {
        FEATURE_RESTART
    }

    async fn metadata<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &SessionUser,
        path: P,
    ) -> StorageResult<Meta> {
        match self.place(user, path.as_ref()) {
            Some(Place::Tree | Place::OwnStaging) => self.fs.metadata(user, path).await,
            _ => Err(denied()),
        }
    }

    async fn list<P: AsRef<Path> + Send + Debug>(
        &self,
        _user: &SessionUser,
        _path: P,
    ) -> StorageResult<Vec<Fileinfo<PathBuf, Meta>>> {
        Err(denied())
    }

    async fn get<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &SessionUser,
        path: P,
        start_pos: u64,
    ) -> StorageResult<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> {
        match self.place(user, path.as_ref()) {
            Some(Place::Tree | Place::OwnStaging) => {
                // The back-end reads through a 4 KiB buffer, each read a trip to tokio's
                // blocking pool; reads this large go past it to the file.
                let inner = self.fs.get(user, path, start_pos).await?;
                Ok(Box::new(tokio::io::BufReader::with_capacity(
                    COPY_BUF, inner,
                )))
            }
            _ => Err(denied()),
        }
    }

    async fn put<
        P: AsRef<Path> + Send + Debug,
        R: tokio::io::AsyncRead + Send + Sync + Unpin + 'static,
    >(
        &self,
        user: &SessionUser,
        input: R,
        path: P,
        start_pos: u64,
    ) -> StorageResult<u64> {
        if self.place(user, path.as_ref()) != Some(Place::OwnStaging) {
            return Err(denied());
        }
        let dir = self
            .root
            .join(STATE_DIR)
            .join("staging")
            .join(&user.staging);
        let local = |e: std::io::Error| Error::new(ErrorKind::LocalError, e);
        std::fs::create_dir_all(&dir).map_err(local)?;
        let name = path.as_ref().file_name().ok_or_else(denied)?;
        // Written here rather than by the back-end, which copies through 4 KiB buffers (a trip
        // to tokio's blocking pool for each): large buffers make a large upload several
        // times faster. `place` checked the name; the staging directory is the server's own.
        use std::os::unix::fs::OpenOptionsExt;
        use tokio::io::AsyncReadExt;
        let path = dir.join(name);
        let writing = self.receipts.begin(path.clone());
        let mut file = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(local)?;
        file.set_len(start_pos).map_err(local)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start_pos)).map_err(local)?;
        // A whole upload is hashed as it arrives (see `Receipts`); a resumed one is not.
        let hasher = (start_pos == 0).then(blake3::Hasher::new);
        let mut sink = Some(fsops::Sink::new(file, hasher, start_pos));
        // While one chunk is hashed and written on a blocking thread, the next is read (and
        // decrypted) here: the data connection's thread does only that.
        let mut writing_chunk: Option<tokio::task::JoinHandle<fsops::Written>> = None;
        let mut input = input;
        let mut chunk = vec![0u8; CHUNK];
        let mut spare = Vec::new();
        let mut filled = 0;
        let mut copied = 0u64;
        loop {
            let n = input.read(&mut chunk[filled..]).await.map_err(local)?;
            filled += n;
            copied += n as u64;
            if filled < CHUNK && n > 0 {
                continue;
            }
            if n == 0 && writing_chunk.is_none() {
                // All of it fit in one chunk (a small file): written here, without the trip to
                // a thread and back that a change's latency would pay for.
                chunk.truncate(filled);
                let s = sink
                    .take()
                    .expect("the sink is here when no write is under way");
                sink = Some(s.write(chunk).map_err(local)?.0);
                break;
            }
            if filled > 0 {
                let s = match writing_chunk.take() {
                    Some(w) => {
                        let (s, buf) = joined(w.await).map_err(local)?;
                        spare = buf;
                        s
                    }
                    None => sink
                        .take()
                        .expect("the sink is here when no write is under way"),
                };
                // (A second buffer only for a file of more than one chunk.)
                if spare.is_empty() {
                    spare = vec![0u8; CHUNK];
                }
                spare.resize(CHUNK, 0);
                let mut full = std::mem::replace(&mut chunk, std::mem::take(&mut spare));
                full.truncate(filled);
                filled = 0;
                writing_chunk = Some(tokio::task::spawn_blocking(move || s.write(full)));
            }
            if n == 0 {
                break;
            }
        }
        let sink = match writing_chunk {
            Some(w) => joined(w.await).map_err(local)?.0,
            None => sink.expect("the sink is here when no write is under way"),
        };
        if let Some(h) = sink.hasher {
            let meta = sink.file.metadata().map_err(local)?;
            writing.finish(&meta, h.finalize());
        }
        Ok(copied)
    }

    async fn del<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &SessionUser,
        path: P,
    ) -> StorageResult<()> {
        match self.place(user, path.as_ref()) {
            Some(Place::OwnStaging) => self.fs.del(user, path).await,
            _ => Err(denied()),
        }
    }

    async fn mkd<P: AsRef<Path> + Send + Debug>(
        &self,
        _user: &SessionUser,
        _path: P,
    ) -> StorageResult<()> {
        Err(denied())
    }

    async fn rename<P: AsRef<Path> + Send + Debug>(
        &self,
        _user: &SessionUser,
        _from: P,
        _to: P,
    ) -> StorageResult<()> {
        Err(denied())
    }

    async fn rmd<P: AsRef<Path> + Send + Debug>(
        &self,
        _user: &SessionUser,
        _path: P,
    ) -> StorageResult<()> {
        Err(denied())
    }

    async fn cwd<P: AsRef<Path> + Send + Debug>(
        &self,
        user: &SessionUser,
        path: P,
    ) -> StorageResult<()> {
        match self.place(user, path.as_ref()) {
            Some(Place::Root) => Ok(()),
            _ => Err(denied()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_table() {
        let u = SessionUser {
            name: "ferry-1".into(),
            staging: "7-ab".into(),
        };
        #[rustfmt::skip]
        let table: &[(&str, Option<Place>)] = &[
            ("/",                              Some(Place::Root)),
            ("/a/b.txt",                       Some(Place::Tree)),
            ("a/b.txt",                        Some(Place::Tree)),
            ("/.ferry/staging/7-ab/u1",        Some(Place::OwnStaging)),
            ("/.ferry/staging/7-ab/../x",      None),
            ("/.ferry/staging/7-ab/a/b",       None),
            ("/.ferry/staging/8-cd/u1",        None),
            ("/.ferry/server.journal",         None),
            ("/../etc/passwd",                 None),
            ("/a/../../b",                     None),
            ("/a//b",                          None),
        ];
        for (path, want) in table {
            assert_eq!(place(&u, Path::new(path)), *want, "{path}");
        }
    }

    #[test]
    fn a_receipt_holds_only_while_the_file_is_as_uploaded() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("ferry-receipts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("u1");
        let bytes = vec![7u8; Receipts::MIN_SIZE as usize];
        let hash = blake3::hash(&bytes);
        std::fs::write(&path, &bytes).unwrap();
        let meta = || std::fs::metadata(&path).unwrap();
        let receipts = Receipts::default();
        let upload = || receipts.begin(path.clone()).finish(&meta(), hash);

        upload();
        assert_eq!(receipts.take(&path, &meta()), Some(*hash.as_bytes()));
        assert_eq!(
            receipts.take(&path, &meta()),
            None,
            "a receipt is used once"
        );

        // Written to after its upload (same size, so only the change time tells).
        upload();
        let before = meta();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while meta().ctime_nsec() == before.ctime_nsec() && meta().ctime() == before.ctime() {
            assert!(
                std::time::Instant::now() < deadline,
                "the change time never moved"
            );
            let mut f = std::fs::File::options().write(true).open(&path).unwrap();
            f.write_all(b"x").unwrap();
        }
        assert_eq!(receipts.take(&path, &meta()), None);

        // Replaced by another file (the old one kept aside, so its inode cannot come back).
        upload();
        std::fs::rename(&path, dir.join("old")).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(receipts.take(&path, &meta()), None);

        // Forgotten, or another upload to the same file begun since.
        upload();
        receipts.forget(&path);
        assert_eq!(receipts.take(&path, &meta()), None);
        upload();
        drop(receipts.begin(path.clone()));
        assert_eq!(receipts.take(&path, &meta()), None);

        // Two uploads at once: neither can vouch for what the file holds, in either order;
        // one alone afterwards can.
        let (a, b) = (receipts.begin(path.clone()), receipts.begin(path.clone()));
        a.finish(&meta(), hash);
        b.finish(&meta(), hash);
        assert_eq!(receipts.take(&path, &meta()), None);
        let (a, b) = (receipts.begin(path.clone()), receipts.begin(path.clone()));
        b.finish(&meta(), hash);
        let c = receipts.begin(path.clone());
        a.finish(&meta(), hash);
        c.finish(&meta(), hash);
        assert_eq!(receipts.take(&path, &meta()), None);
        upload();
        assert_eq!(receipts.take(&path, &meta()), Some(*hash.as_bytes()));

        // Small files get none.
        std::fs::write(&path, b"small").unwrap();
        receipts
            .begin(path.clone())
            .finish(&meta(), blake3::hash(b"small"));
        assert_eq!(receipts.take(&path, &meta()), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
