//! The client's side of the data plane: FTP via suppaftp (smol). The only module that names
//! suppaftp. Downloads are hashed as they arrive and land in a temporary file; uploads go to
//! the client's staging area on the server. Both can start part-way (REST), continuing a
//! transfer that was broken off, and both can be paced to a maximum rate.

use std::fs::File;
use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use suppaftp::smol::{AsyncRustlsConnector, AsyncRustlsFtpStream};
use suppaftp::types::FileType;
use suppaftp::FtpError;

use crate::core::entry::{short_hash, Entry};
use crate::core::path::RelPath;

/// How much a transfer reads and writes at a time.
const COPY_BUF: usize = 256 * 1024;

/// A download is hashed and written this much at a time.
const CHUNK: usize = 4 * COPY_BUF;

/// One logged-in FTP connection.
pub struct DataConn {
    ftp: AsyncRustlsFtpStream,
    /// `.ferry/staging/<client>` on the server, as an FTP path.
    staging: String,
    /// Bytes per second at most (`--max-rate`).
    max_rate: Option<u64>,
    /// Bytes of the current file transferred so far, for `ferry status`.
    progress: Arc<AtomicU64>,
}

impl std::fmt::Debug for DataConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataConn")
            .field("staging", &self.staging)
            .finish()
    }
}

/// Keeps a transfer at or below a rate: after each chunk, says until when to wait.
#[derive(Debug)]
struct Pacer {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Option<Pacer> {
        rate.filter(|r| *r > 0).map(|rate| Pacer {
            rate,
            start: Instant::now(),
            bytes: 0,
        })
    }

    /// Counts `n` more bytes; returns when the transfer may go on, if not now.
    fn after(&mut self, n: usize) -> Option<Instant> {
        self.bytes += n as u64;
        let due = self.start + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        (due > Instant::now()).then_some(due)
    }
}

/// Counts what passes through it in `progress`, paced by an optional `Pacer`.
struct PacedReader<R> {
    inner: R,
    pacer: Option<Pacer>,
    wait: Option<smol::Timer>,
    /// Bytes of the file read so far (from the start of the file, not of this attempt).
    progress: Arc<AtomicU64>,
}

impl<R> PacedReader<R> {
    fn new(inner: R, max_rate: Option<u64>, progress: Arc<AtomicU64>) -> Self {
        PacedReader {
            inner,
            pacer: Pacer::new(max_rate),
            wait: None,
            progress,
        }
    }
}

impl<R: smol::io::AsyncRead + Unpin> smol::io::AsyncRead for PacedReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = &mut *self;
        if let Some(t) = &mut me.wait {
            ready!(Pin::new(t).poll(cx));
            me.wait = None;
        }
        let n = ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        me.progress.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(due) = me.pacer.as_mut().and_then(|p| p.after(n)) {
            me.wait = Some(smol::Timer::at(due));
        }
        Poll::Ready(Ok(n))
    }
}

/// Why a download did not produce a file.
#[derive(Debug)]
pub enum DownloadError {
    /// The file on the server is not the one expected (changed, renamed or deleted since);
    /// a newer change for it is on its way.
    Changed(String),
    /// This replica could not store it (disk full, permissions).
    Local(anyhow::Error),
    /// The connection failed; the session is over.
    Transport(anyhow::Error),
}

/// A downloaded file, checked, waiting to be installed.
#[derive(Debug)]
pub struct Downloaded {
    /// The open temporary file.
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Bytes that came over the network (less than the size when it resumed).
    pub transferred: u64,
}

/// Where a transfer starts: at 0, or after a part already there whose hash state is given.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// Bytes already there.
    pub offset: u64,
    /// BLAKE3 state over those bytes.
    pub hasher: blake3::Hasher,
}

impl DataConn {
    /// Connects and logs in with the session's credentials.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        pass: &str,
        staging: &str,
        max_rate: Option<u64>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<DataConn> {
        let mut ftp = AsyncRustlsFtpStream::connect_timeout(addr, Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot reach the FTP data plane at {addr}"))?;
        if let Some(config) = tls {
            // Explicit FTPS: AUTH TLS before the login, then every data connection private.
            let connector = AsyncRustlsConnector::from(futures_rustls::TlsConnector::from(config));
            ftp = ftp
                .into_secure(connector, crate::tls::SERVER_NAME)
                .await
                .with_context(|| format!("cannot start TLS with the FTP server at {addr}"))?;
        }
        ftp.login(user, pass)
            .await
            .with_context(|| format!("FTP login at {addr} refused"))?;
        // suppaftp starts in ASCII mode, which would rewrite line endings.
        ftp.transfer_type(FileType::Binary).await?;
        Ok(DataConn {
            ftp,
            staging: format!("/.ferry/staging/{staging}"),
            max_rate,
            progress: Arc::default(),
        })
    }

    /// Downloads `rel` into the temporary file `tmp`, from `resume.offset` on (the bytes
    /// before are already there), checking the whole against `entry` (size, hash). If the
    /// connection breaks, what arrived stays in `tmp` for the next attempt to resume.
    pub async fn download(
        &mut self,
        rel: &RelPath,
        entry: &Entry,
        tmp: PathBuf,
        resume: Resume,
    ) -> Result<Downloaded, DownloadError> {
        let transport = |e: FtpError, what: String| {
            DownloadError::Transport(anyhow::Error::new(e).context(what))
        };
        if resume.offset > 0 {
            self.ftp
                .resume_transfer(resume.offset as usize)
                .await
                .map_err(|e| transport(e, format!("FTP REST {}", resume.offset)))?;
        }
        let mut stream = match self.ftp.retr_as_stream(format!("/{rel}")).await {
            Ok(s) => s,
            // 5xx: the server has no such file now (deleted or renamed since).
            Err(FtpError::UnexpectedResponse(r)) => {
                return Err(DownloadError::Changed(format!(
                    "{rel} is no longer on the server ({})",
                    String::from_utf8_lossy(&r.body).trim()
                )))
            }
            Err(e) => {
                return Err(DownloadError::Transport(
                    anyhow::Error::new(e).context(format!("FTP RETR {rel}")),
                ))
            }
        };
        let opened = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(resume.offset == 0)
            .open(&tmp)
            .and_then(|mut f| {
                f.set_len(resume.offset)?;
                f.seek(SeekFrom::Start(resume.offset))?;
                Ok(f)
            });
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(DownloadError::Local(anyhow::Error::new(e).context(
                    format!("cannot create temporary file {}", tmp.display()),
                )));
            }
        };
        // Hashed and written a chunk at a time on a blocking thread while the next is read.
        let mut sink = Some(crate::fsops::Sink::new(
            file,
            Some(resume.hasher),
            resume.offset,
        ));
        let mut writing: Option<smol::Task<crate::fsops::Written>> = None;
        let (mut chunk, mut spare) = (vec![0u8; CHUNK], Vec::new());
        let mut filled = 0;
        let mut total = resume.offset;
        self.progress.store(total, Ordering::Relaxed);
        let mut local_error = None;
        let mut pacer = Pacer::new(self.max_rate);
        let read: std::io::Result<()> = async {
            loop {
                let n = stream.read(&mut chunk[filled..]).await?;
                filled += n;
                total += n as u64;
                self.progress.store(total, Ordering::Relaxed);
                if let Some(due) = pacer.as_mut().and_then(|p| p.after(n)) {
                    smol::Timer::at(due).await;
                }
                if filled < CHUNK && n > 0 {
                    continue;
                }
                if n == 0 && writing.is_none() && local_error.is_none() {
                    // All of it fit in one chunk (a small file): written here, without the trip
                    // to a thread and back that a change's latency would pay for.
                    chunk.truncate(filled);
                    let s = sink
                        .take()
                        .expect("the sink is here when no write is under way");
                    match s.write(chunk) {
                        Ok((s, _)) => sink = Some(s),
                        Err(e) => local_error = Some(e),
                    }
                    return Ok(());
                }
                // After a local error the rest is read and dropped: the transfer ends cleanly.
                let ready = match writing.take() {
                    Some(w) => w.await.map(|(s, buf)| {
                        spare = buf;
                        s
                    }),
                    None => sink.take().ok_or_else(|| std::io::ErrorKind::Other.into()),
                };
                match ready {
                    Ok(s) if filled > 0 => {
                        // (A second buffer only for a file of more than one chunk.)
                        if spare.is_empty() {
                            spare = vec![0u8; CHUNK];
                        }
                        spare.resize(CHUNK, 0);
                        let mut full = std::mem::replace(&mut chunk, std::mem::take(&mut spare));
                        full.truncate(filled);
                        writing = Some(smol::unblock(move || s.write(full)));
                    }
                    Ok(s) => sink = Some(s),
                    Err(e) => {
                        local_error.get_or_insert(e);
                    }
                }
                filled = 0;
                if n == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        // What was handed over is written before anything else: a broken-off download keeps
        // all that arrived, for the next attempt to resume after.
        if let Some(w) = writing.take() {
            match w.await {
                Ok((s, _)) => sink = Some(s),
                Err(e) => {
                    local_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = read {
            // Keep what arrived: the next attempt resumes after checking it.
            return Err(DownloadError::Transport(
                anyhow::Error::new(e).context(format!("download of {rel} broke off")),
            ));
        }
        let finished = stream.finish().await;
        let fail = |e| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        match finished {
            Ok(()) => {}
            // A refusal at the end (some servers answer 150, then 550 when the file went
            // away meanwhile): the file changed, the connection is fine.
            Err(FtpError::UnexpectedResponse(r)) => {
                return Err(fail(DownloadError::Changed(format!(
                    "{rel} went away on the server during download ({})",
                    String::from_utf8_lossy(&r.body).trim()
                ))))
            }
            Err(e) => {
                return Err(DownloadError::Transport(
                    anyhow::Error::new(e).context(format!("download of {rel} did not complete")),
                ))
            }
        }
        if let Some(e) = local_error {
            return Err(fail(DownloadError::Local(
                anyhow::Error::new(e).context(format!("cannot write {}", tmp.display())),
            )));
        }
        let Some(crate::fsops::Sink {
            file,
            hasher: Some(hasher),
            ..
        }) = sink
        else {
            return Err(fail(DownloadError::Local(anyhow::anyhow!(
                "cannot write {}",
                tmp.display()
            ))));
        };
        let hash = *hasher.finalize().as_bytes();
        if total != entry.size || hash != entry.hash {
            return Err(fail(DownloadError::Changed(format!(
                "{rel} changed on the server during download ({total} bytes, hash {}; expected {} bytes, hash {})",
                short_hash(&hash),
                entry.size,
                short_hash(&entry.hash)
            ))));
        }
        Ok(Downloaded {
            file,
            path: tmp,
            transferred: total - resume.offset,
        })
    }

    /// Uploads an open local file to the staging area as `name`, from `resume.offset` on (the
    /// staged part before it was checked to match); returns the size of the whole file as sent
    /// and the bytes that went over the network. Not hashed here: the server hashes what
    /// arrives and refuses a commit whose hash it does not match, and the caller tells a file
    /// written to while it was read by its metadata, as the scanner does.
    pub async fn upload(
        &mut self,
        mut src: File,
        name: &str,
        resume: Resume,
    ) -> anyhow::Result<(u64, u64)> {
        src.seek(SeekFrom::Start(resume.offset))?;
        self.progress.store(resume.offset, Ordering::Relaxed);
        let target = format!("{}/{name}", self.staging);
        if resume.offset > 0 {
            self.ftp
                .resume_transfer(resume.offset as usize)
                .await
                .with_context(|| format!("FTP REST {} for {target}", resume.offset))?;
        }
        let reader = smol::Unblock::with_capacity(COPY_BUF, src);
        let sent = self.store(&target, reader).await?;
        Ok((resume.offset + sent, sent))
    }

    /// Uploads `bytes` (a pack of small files) to the staging area as `name`.
    pub async fn upload_bytes(&mut self, bytes: &[u8], name: &str) -> anyhow::Result<()> {
        self.progress.store(0, Ordering::Relaxed);
        let target = format!("{}/{name}", self.staging);
        self.store(&target, smol::io::Cursor::new(bytes)).await?;
        Ok(())
    }

    /// Stores what `reader` holds as `target` on the server, paced and counted; returns the
    /// bytes sent. Written `COPY_BUF` at a time: suppaftp's `put_file` copies through 8 KiB,
    /// which costs a TLS record, a system call and a wake-up of the server every 8 KiB.
    async fn store(
        &mut self,
        target: &str,
        reader: impl smol::io::AsyncRead + Unpin,
    ) -> anyhow::Result<u64> {
        let mut stream = self
            .ftp
            .put_with_stream(target)
            .await
            .with_context(|| format!("FTP STOR {target}"))?;
        let mut reader = PacedReader::new(reader, self.max_rate, self.progress.clone());
        let mut buf = vec![0u8; COPY_BUF];
        let mut sent = 0u64;
        let copied: std::io::Result<()> = async {
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                stream.write_all(&buf[..n]).await?;
                sent += n as u64;
            }
        }
        .await;
        copied.with_context(|| format!("FTP STOR {target}"))?;
        stream
            .finish()
            .await
            .with_context(|| format!("FTP STOR {target}"))?;
        Ok(sent)
    }

    /// Downloads the staged file `name` (a pack the server made) into memory, at most `max`
    /// bytes, and removes it from the staging area.
    pub async fn download_staged(&mut self, name: &str, max: u64) -> anyhow::Result<Vec<u8>> {
        let target = format!("{}/{name}", self.staging);
        let stream = self
            .ftp
            .retr_as_stream(&target)
            .await
            .with_context(|| format!("FTP RETR {target}"))?;
        let mut reader = PacedReader::new(stream, self.max_rate, self.progress.clone());
        self.progress.store(0, Ordering::Relaxed);
        let mut bytes = Vec::new();
        (&mut reader)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .await
            .with_context(|| format!("download of {target} broke off"))?;
        reader
            .inner
            .finish()
            .await
            .with_context(|| format!("download of {target} did not complete"))?;
        if bytes.len() as u64 > max {
            anyhow::bail!("{target} is larger than {max} bytes");
        }
        // Left behind, it would only wait for the server's pruning of old staged files.
        if let Err(e) = self.ftp.rm(&target).await {
            log::debug!("cannot remove {target}: {e}");
        }
        Ok(bytes)
    }

    /// From now on, transfers count their bytes (of the whole file) in `progress`.
    pub fn report_progress(&mut self, progress: Arc<AtomicU64>) {
        self.progress = progress;
    }

    /// Closes politely.
    pub async fn quit(mut self) {
        let _ = self.ftp.quit().await;
    }
}
