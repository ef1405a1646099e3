//! SIGINT and SIGTERM become a message: the agent stops at its next await point, flushes its
//! state and exits cleanly. A second signal exits at once.
//!
//! The signals are blocked in the calling thread (so in every thread it starts later) and a
//! small thread waits for them with `sigwait`: no handler, no unsafe code.

use std::io;

use async_channel::Receiver;
use nix::sys::signal::{SigSet, Signal};

/// Starts listening; call before the agent starts any thread. The receiver gets the first
/// SIGINT or SIGTERM.
pub fn listen() -> io::Result<Receiver<Signal>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().map_err(io::Error::from)?;
    let (tx, rx) = async_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = false;
            while let Ok(sig) = set.wait() {
                if seen {
                    log::warn!("{sig} again: exiting now");
                    std::process::exit(130);
                }
                seen = true;
                log::info!("{sig}: stopping (send it again to exit at once)");
                let _ = tx.try_send(sig);
            }
        })?;
    Ok(rx)
}
