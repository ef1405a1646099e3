//! The client's side of the data plane: FTP via suppaftp (smol). The only module that names
//! suppaftp. Downloads are hashed as they arrive and land in a temporary file; uploads go to
//! the session's staging area on the server.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use smol::io::AsyncReadExt;
use suppaftp::smol::AsyncFtpStream;
use suppaftp::types::FileType;

use crate::core::entry::{short_hash, Entry};
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
    ) -> anyhow::Result<Downloaded> {
        let mut stream = self
            .ftp
            .retr_as_stream(format!("/{rel}"))
            .await
            .with_context(|| format!("FTP RETR {rel}"))?;
        let mut file = File::create(&tmp)
            .with_context(|| format!("cannot create temporary file {}", tmp.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let result: anyhow::Result<()> = async {
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > entry.size {
                    bail!(
                        "{rel}: server sent more than the expected {} bytes",
                        entry.size
                    );
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n])?;
            }
            Ok(())
        }
        .await;
        let finished = stream.finish().await;
        if let Err(e) = result.and(finished.map_err(anyhow::Error::from)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("download of {rel} broke off")));
        }
        let hash = *hasher.finalize().as_bytes();
        if total != entry.size || hash != entry.hash {
            let _ = std::fs::remove_file(&tmp);
            bail!(
                "{rel} changed on the server during download ({total} bytes, hash {}; expected {} bytes, hash {})",
                short_hash(&hash),
                entry.size,
                short_hash(&entry.hash)
            );
        }
        Ok(Downloaded { file, path: tmp })
    }

    /// Uploads the local file `src` to the staging area as `name`; returns bytes sent.
    pub async fn upload(&mut self, src: &Path, name: &str) -> anyhow::Result<u64> {
        let file = smol::fs::File::open(src)
            .await
            .with_context(|| format!("cannot open {}", src.display()))?;
        let mut reader = smol::io::BufReader::with_capacity(256 * 1024, file);
        let target = format!("{}/{name}", self.staging);
        self.ftp
            .put_file(&target, &mut reader)
            .await
            .with_context(|| format!("FTP STOR {target}"))
    }

    /// Closes politely.
    pub async fn quit(mut self) {
        let _ = self.ftp.quit().await;
    }
}
