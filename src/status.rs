//! `ferry status`: each running agent answers on a unix socket in its state directory
//! (`<root>/.ferry/status.sock`) with a JSON report of what it is doing; the `status` command
//! reads it and prints it as text or JSON.
//!
//! The agent keeps a `Board` that its loop updates at a few points (cheap copies), plus the
//! byte counter of the transfer in flight, which the data plane bumps as bytes pass; a request
//! is answered from the board without waiting for the agent's loop, so a long transfer still
//! shows its progress.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use smol::Async;

/// What an agent says about itself.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// "server" or "client".
    pub role: String,
    pub name: String,
    pub root: String,
    pub pid: u32,
    pub version: String,
    /// Unix seconds.
    pub started: u64,
    /// A client's server, or a server's connected clients.
    pub peers: Vec<Peer>,
    /// Files (and directories) tracked, and the bytes in the files.
    pub files: u64,
    pub bytes: u64,
    /// The server's latest seq, or the last one a client applied.
    pub seq: u64,
    /// Paths waiting to be sent (client) or clients still catching up (server).
    pub pending: u64,
    pub transfer: Option<Transfer>,
    /// When the client last had nothing left to do (unix seconds).
    pub last_sync: Option<u64>,
    /// Changes applied here from elsewhere, and bytes downloaded for them.
    pub received: u64,
    pub received_bytes: u64,
    /// Changes sent from here and accepted, and bytes uploaded for them.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Conflict copies made here, newest last.
    pub conflicts: Vec<String>,
    /// The last warnings and errors logged.
    pub errors: Vec<String>,
    /// "TLS, certificate sha256:..." (the server's own, or the one a client pinned), or
    /// "plaintext".
    #[serde(default)]
    pub security: String,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub addr: String,
    pub connected: bool,
    /// Unix seconds: connected since, or disconnected since.
    pub since: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub path: String,
    /// "upload" or "download".
    pub direction: String,
    pub done: u64,
    pub total: u64,
}

/// An agent's live report, shared with its status socket.
#[derive(Debug, Default)]
pub struct Board {
    report: Mutex<Report>,
    transfer: Mutex<Option<(Transfer, Arc<AtomicU64>)>>,
}

impl Board {
    pub fn new(role: &str, name: &str, root: &Path) -> Arc<Board> {
        Arc::new(Board {
            report: Mutex::new(Report {
                role: role.into(),
                name: name.into(),
                root: root.display().to_string(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
                started: now(),
                ..Report::default()
            }),
            transfer: Mutex::new(None),
        })
    }

    /// Changes the report.
    pub fn update(&self, f: impl FnOnce(&mut Report)) {
        if let Ok(mut r) = self.report.lock() {
            f(&mut r);
        }
    }

    /// Shows a transfer in flight; `done` is bumped by the data plane. Returns the counter.
    pub fn transfer(&self, path: &str, direction: &str, total: u64) -> Arc<AtomicU64> {
        let done = Arc::new(AtomicU64::new(0));
        let t = Transfer {
            path: path.into(),
            direction: direction.into(),
            done: 0,
            total,
        };
        if let Ok(mut slot) = self.transfer.lock() {
            *slot = Some((t, done.clone()));
        }
        done
    }

    /// The transfer in flight ended.
    pub fn transfer_done(&self) {
        if let Ok(mut slot) = self.transfer.lock() {
            *slot = None;
        }
    }

    /// The report as of now.
    pub fn snapshot(&self) -> Report {
        let mut r = self.report.lock().map(|r| r.clone()).unwrap_or_default();
        if let Ok(slot) = self.transfer.lock() {
            r.transfer = slot.as_ref().map(|(t, done)| Transfer {
                done: done.load(Ordering::Relaxed),
                ..t.clone()
            });
        }
        r.errors = crate::logger::recent_problems();
        r
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the agent for `root` answers.
pub fn socket_path(root: &Path) -> PathBuf {
    crate::fsops::state_dir(root).join("status.sock")
}

/// Starts answering status requests for the agent of `root`. Fails if another agent already
/// answers there (two agents on one tree would fight over it). The socket is removed when the
/// returned guard is dropped.
pub fn serve(root: &Path, board: Arc<Board>) -> anyhow::Result<Serving> {
    let path = socket_path(root);
    if UnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "another ferry agent is already running for {} (see `ferry status --root {}`)",
            root.display(),
            root.display()
        );
    }
    let _ = std::fs::remove_file(&path); // left by an agent that was killed
    let listener = match UnixListener::bind(&path).and_then(Async::new) {
        Ok(l) => l,
        Err(e) => {
            // Not worth stopping the agent for (a root path too long for a socket, say).
            log::warn!(
                "`ferry status` will not reach this agent: cannot listen on {}: {e}",
                path.display()
            );
            return Ok(Serving { bound: None });
        }
    };
    let task = smol::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let report = serde_json::to_vec(&board.snapshot()).unwrap_or_default();
            smol::spawn(async move {
                use smol::io::AsyncWriteExt;
                let mut stream = stream;
                let _ = stream.write_all(&report).await;
            })
            .detach();
        }
    });
    Ok(Serving {
        bound: Some((path, task)),
    })
}

/// The status socket of a running agent (if it could be made).
#[derive(Debug)]
pub struct Serving {
    bound: Option<(PathBuf, smol::Task<()>)>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some((path, _)) = &self.bound {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Asks the agent of `root` for its report.
pub fn query(root: &Path) -> anyhow::Result<Report> {
    let path = socket_path(root);
    let mut stream = UnixStream::connect(&path).map_err(|e| {
        anyhow::anyhow!(
            "no ferry agent is running for {} ({}: {e})",
            root.display(),
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The report as text for people.
pub fn render(r: &Report, now: u64, out: &mut impl Write) -> io::Result<()> {
    let ago = |t: u64| human_duration(now.saturating_sub(t));
    writeln!(
        out,
        "ferry {} \"{}\" for {} (pid {}, version {}, up {})",
        r.role,
        r.name,
        r.root,
        r.pid,
        r.version,
        ago(r.started)
    )?;
    if r.peers.is_empty() {
        writeln!(out, "  peers      none connected")?;
    }
    for p in &r.peers {
        let state = if p.connected {
            format!("connected for {}", ago(p.since))
        } else {
            format!("not connected (for {})", ago(p.since))
        };
        writeln!(out, "  peer       {} {}: {state}", p.name, p.addr)?;
    }
    writeln!(
        out,
        "  tracked    {} entries, {}",
        r.files,
        human_bytes(r.bytes)
    )?;
    writeln!(out, "  seq        {}", r.seq)?;
    if !r.security.is_empty() {
        writeln!(out, "  security   {}", r.security)?;
    }
    match &r.transfer {
        Some(t) => writeln!(
            out,
            "  pending    {}; {} {}: {} of {} ({}%)",
            r.pending,
            t.direction,
            t.path,
            human_bytes(t.done),
            human_bytes(t.total),
            (t.done * 100).checked_div(t.total).unwrap_or(100)
        )?,
        None => writeln!(out, "  pending    {}; no transfer in flight", r.pending)?,
    }
    if r.role == "client" {
        match r.last_sync {
            Some(t) => writeln!(out, "  last sync  {} ago", ago(t))?,
            None => writeln!(out, "  last sync  not yet")?,
        }
    }
    writeln!(
        out,
        "  received   {} changes ({}); sent {} ({})",
        r.received,
        human_bytes(r.received_bytes),
        r.sent,
        human_bytes(r.sent_bytes)
    )?;
    if r.conflicts.is_empty() {
        writeln!(out, "  conflicts  none")?;
    } else {
        writeln!(out, "  conflicts  {}:", r.conflicts.len())?;
        for c in &r.conflicts {
            writeln!(out, "    {c}")?;
        }
    }
    if r.errors.is_empty() {
        writeln!(out, "  errors     none")?;
    } else {
        writeln!(out, "  errors     last {}:", r.errors.len())?;
        for e in &r.errors {
            writeln!(out, "    {e}")?;
        }
    }
    Ok(())
}

/// `1.5 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `3h 02m`, `45s`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(61), "1m 01s");
        assert_eq!(human_duration(3 * 3600 + 120), "3h 02m");
        assert_eq!(human_duration(2 * 86_400 + 3600), "2d 01h");
    }

    #[test]
    fn text_report_names_everything() {
        let r = Report {
            role: "client".into(),
            name: "pi".into(),
            root: "/data".into(),
            started: 1000,
            peers: vec![Peer {
                name: "server".into(),
                addr: "nas:7700".into(),
                connected: true,
                since: 1500,
            }],
            files: 12,
            bytes: 3 << 20,
            pending: 2,
            transfer: Some(Transfer {
                path: "v.mp4".into(),
                direction: "download".into(),
                done: 1 << 20,
                total: 4 << 20,
            }),
            last_sync: Some(1990),
            conflicts: vec!["a.conflict-x.txt".into()],
            ..Report::default()
        };
        let mut out = Vec::new();
        render(&r, 2000, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        for want in [
            "ferry client \"pi\" for /data",
            "up 16m 40s",
            "server nas:7700: connected for 8m 20s",
            "12 entries, 3.0 MiB",
            "download v.mp4: 1.0 MiB of 4.0 MiB (25%)",
            "last sync  10s ago",
            "a.conflict-x.txt",
            "errors     none",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }
}
