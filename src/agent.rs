//! What the server and client agents share: timeouts, keepalive timings, and turning a burst
//! of watcher hints into one batch of scanned changes.

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use smol::future::FutureExt;

use crate::core::path::RelPath;
use crate::core::renames::Changed;
use crate::ignore::IGNORE_FILE;
use crate::scan::{RootLost, Tree};
use crate::watch::Hint;

/// How often an idle connection sends a `Ping`.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// A connection silent for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Time a client allows for connecting and the whole handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time the server allows a new connection to finish TLS and prove the secret: it is closed
/// if it has not authenticated by then.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// A burst of hints is gathered until it has been quiet this long...
const QUIET: Duration = Duration::from_millis(5);

/// ...or this long has passed since its first hint.
const MAX_GATHER: Duration = Duration::from_millis(100);

/// Runs `fut`, failing with `TimedOut` after `limit`.
pub async fn timeout<T>(
    limit: Duration,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    fut.or(async {
        smol::Timer::after(limit).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {} s", limit.as_secs()),
        ))
    })
    .await
}

/// Runs `fut`, failing with "`what` timed out" after `limit`.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    fut.or(async {
        smol::Timer::after(limit).await;
        Err(anyhow::anyhow!(
            "{what} timed out after {} s",
            limit.as_secs()
        ))
    })
    .await
}

/// Spawns the task that writes `rx`'s messages to `stream`, sending `ping` whenever the
/// connection has been idle for `KEEPALIVE`. When `rx` closes or a write fails, it shuts the
/// socket down, which ends the reader too.
pub fn spawn_writer<M: serde::Serialize + Send + Sync + 'static>(
    mut writer: crate::tls::Writer,
    socket: std::sync::Arc<smol::Async<std::net::TcpStream>>,
    rx: async_channel::Receiver<M>,
    ping: impl Fn() -> M + Send + Sync + 'static,
) -> smol::Task<()> {
    smol::spawn(async move {
        loop {
            let next = async { rx.recv().await.ok() }
                .or(async {
                    smol::Timer::after(KEEPALIVE).await;
                    Some(ping())
                })
                .await;
            let Some(msg) = next else { break };
            if crate::proto::codec::write_frame(&mut writer, &msg)
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
    })
}

/// Waits for the next hint, then gathers the rest of its burst. `None` when the watcher is gone.
pub async fn gather_hints(rx: &async_channel::Receiver<Vec<Hint>>) -> Option<Vec<Hint>> {
    let mut hints = rx.recv().await.ok()?;
    let start = Instant::now();
    loop {
        while let Ok(more) = rx.try_recv() {
            hints.extend(more);
        }
        let left = MAX_GATHER.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let next = async { rx.recv().await.ok() }
            .or(async {
                smol::Timer::after(QUIET.min(left)).await;
                None
            })
            .await;
        match next {
            Some(more) => hints.extend(more),
            None => break,
        }
    }
    Some(hints)
}

/// Scans what `hints` point at; returns what changed on disk. If anything looks deleted, the
/// root is checked first (`Tree::check_root`): a lost root is an error, never deletes.
pub fn scan_hints(tree: &mut Tree, hints: Vec<Hint>) -> Result<Vec<Changed>, RootLost> {
    // The hints of a batch are mostly in a few directories.
    let _reuse = crate::beneath::Reuse::start();
    let changes = if hints.contains(&Hint::Rescan) {
        match tree.scan_all() {
            Ok(c) => c,
            Err(e) => {
                tree.check_root()?;
                log::error!("cannot scan {}: {e}", tree.root().display());
                Vec::new()
            }
        }
    } else {
        let mut paths: Vec<std::path::PathBuf> = hints
            .into_iter()
            .filter_map(|h| match h {
                Hint::Path(p) => Some(p),
                Hint::Rescan => None,
            })
            .collect();
        paths.sort();
        paths.dedup();
        let mut changes = Vec::new();
        // A directory's scan looks at its whole subtree: hints beneath it add nothing (sorted
        // by component, they follow it).
        let mut scanned: Option<std::path::PathBuf> = None;
        for p in paths {
            if scanned.as_ref().is_some_and(|s| p.starts_with(s)) {
                continue;
            }
            changes.extend(tree.scan_path(&p));
            scanned = Some(p);
        }
        changes
    };
    // A `.ferryignore` that changed (seen just now, or written by ferry since the last batch).
    let mut changes = changes;
    changes.extend(tree.scan_rule_changes());
    if changes.iter().any(|c| c.new.is_none()) {
        tree.check_root()?;
    }
    Ok(changes)
}

/// Orders paths for applying: creations and updates parents first, then deletions children
/// first (`is_delete` tells which a path is). Ignore rules travel ahead of what they decide
/// on: deleted `.ferryignore` files come first, and a new or changed one before anything
/// else of its depth.
pub fn apply_order(mut paths: Vec<RelPath>, is_delete: impl Fn(&RelPath) -> bool) -> Vec<RelPath> {
    paths.sort();
    paths.dedup();
    let is_rules = |p: &RelPath| p.file_name() == IGNORE_FILE;
    let (mut dels, mut puts): (Vec<RelPath>, Vec<RelPath>) =
        paths.into_iter().partition(|p| is_delete(p));
    puts.sort_by(|a, b| (a.depth(), !is_rules(a), a).cmp(&(b.depth(), !is_rules(b), b)));
    dels.sort_by(|a, b| {
        (!is_rules(a), std::cmp::Reverse(a.depth()), a).cmp(&(
            !is_rules(b),
            std::cmp::Reverse(b.depth()),
            b,
        ))
    });
    let rules_dels = dels.iter().take_while(|p| is_rules(p)).count();
    let mut out: Vec<RelPath> = dels.drain(..rules_dels).collect();
    out.extend(puts);
    out.extend(dels);
    out
}

/// Lower-case hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    // Not a `format!` a byte: this names every fetched file of a first sync.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_two_lowercase_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff, 0x10]), "000fa5ff10");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn apply_order_puts_rules_first_parents_first_then_deletes_children_first() {
        let paths: Vec<RelPath> = [
            "-x.log",
            "a/.ferryignore",
            "a/!b",
            "a",
            "gone/.ferryignore",
            "gone/f",
            "gone",
            ".ferryignore",
            "z/y/x",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let deleted = |p: &RelPath| p.as_str().starts_with("gone");
        let order: Vec<String> = apply_order(paths, deleted)
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            order,
            [
                "gone/.ferryignore",
                ".ferryignore",
                "-x.log",
                "a",
                "a/.ferryignore",
                "a/!b",
                "z/y/x",
                "gone/f",
                "gone",
            ]
        );
    }
}
