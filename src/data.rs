//! The client's side of the data plane: FTP via suppaftp (smol). The only module that names
//! suppaftp. Downloads are hashed as they arrive and land in a temporary file; uploads go to
//! the session's staging area on the server.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use smol::io::AsyncReadExt;
use suppaftp::smol::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::FtpError;

use crate::core::entry::{short_hash, Entry, Hash};
use crate::core::path::RelPath;

/// One logged-in FTP connection.
pub struct DataConn {
    ftp: AsyncFtpStream,
    /// `.ferry/staging/<session>` on the server, as an FTP path.
    staging: String,
}

impl std::fmt::Debug for DataConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataConn")
            .field("staging", &self.staging)
            .finish()
    }
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: smol::io::AsyncRead + Unpin> smol::io::AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = &mut *self;
        let poll = std::pin::Pin::new(&mut me.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = poll {
            me.hasher.update(&buf[..n]);
        }
        poll
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
}

impl DataConn {
    /// Connects and logs in with the session's credentials.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        pass: &str,
        session: &str,
    ) -> anyhow::Result<DataConn> {
        let mut ftp = AsyncFtpStream::connect_timeout(addr, Duration::from_secs(10))
            .await
            .with_context(|| format!("cannot reach the FTP data plane at {addr}"))?;
        ftp.login(user, pass)
            .await
            .with_context(|| format!("FTP login at {addr} refused"))?;
        // suppaftp starts in ASCII mode, which would rewrite line endings.
        ftp.transfer_type(FileType::Binary).await?;
        Ok(DataConn {
            ftp,
            staging: format!("/.ferry/staging/{session}"),
        })
    }

    /// Downloads `rel` into a temporary file at `tmp`, checking it against `entry` (size, hash).
    pub async fn download(
        &mut self,
        rel: &RelPath,
        entry: &Entry,
        tmp: PathBuf,
    ) -> Result<Downloaded, DownloadError> {
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
        let mut file = match File::create(&tmp) {
            Ok(f) => f,
            Err(e) => {
                let _ = stream.finish().await;
                return Err(DownloadError::Local(anyhow::Error::new(e).context(
                    format!("cannot create temporary file {}", tmp.display()),
                )));
            }
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let mut local_error = None;
        let read: std::io::Result<()> = async {
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Ok(());
                }
                total += n as u64;
                hasher.update(&buf[..n]);
                if local_error.is_none() {
                    if let Err(e) = file.write_all(&buf[..n]) {
                        local_error = Some(e);
                    }
                }
            }
        }
        .await;
        let finished = stream.finish().await;
        let fail = |e| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        if let Err(e) = read {
            return Err(fail(DownloadError::Transport(
                anyhow::Error::new(e).context(format!("download of {rel} broke off")),
            )));
        }
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
                return Err(fail(DownloadError::Transport(
                    anyhow::Error::new(e).context(format!("download of {rel} did not complete")),
                )))
            }
        }
        if let Some(e) = local_error {
            return Err(fail(DownloadError::Local(
                anyhow::Error::new(e).context(format!("cannot write {}", tmp.display())),
            )));
        }
        let hash = *hasher.finalize().as_bytes();
        if total != entry.size || hash != entry.hash {
            return Err(fail(DownloadError::Changed(format!(
                "{rel} changed on the server during download ({total} bytes, hash {}; expected {} bytes, hash {})",
                short_hash(&hash),
                entry.size,
                short_hash(&entry.hash)
            ))));
        }
        Ok(Downloaded { file, path: tmp })
    }

    /// Uploads an open local file to the staging area as `name`; returns the size and hash of
    /// the bytes sent, so the caller can tell whether the file changed while it was read.
    pub async fn upload(&mut self, src: File, name: &str) -> anyhow::Result<(u64, Hash)> {
        let reader = smol::Unblock::with_capacity(256 * 1024, src);
        let mut reader = HashingReader {
            inner: smol::io::BufReader::with_capacity(256 * 1024, reader),
            hasher: blake3::Hasher::new(),
        };
        let target = format!("{}/{name}", self.staging);
        let sent = self
            .ftp
            .put_file(&target, &mut reader)
            .await
            .with_context(|| format!("FTP STOR {target}"))?;
        Ok((sent, *reader.hasher.finalize().as_bytes()))
    }

    /// Closes politely.
    pub async fn quit(mut self) {
        let _ = self.ftp.quit().await;
    }
}
