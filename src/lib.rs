//! ferry: keeps one directory tree identical across a server agent and its clients.
//!
//! `core` is pure (names, entries, index, plan); everything else is an edge around it: the
//! watchers, the scanner, filesystem changes, the FTP data plane, the control channel, and the
//! two agents that tie them together.

// Unsafe code is denied everywhere but in `core::text`, one small audited module (its tests run
// under Miri in CI).
#![deny(unsafe_code)]
#![warn(missing_debug_implementations, rust_2018_idioms)]

pub mod agent;
pub mod beneath;
pub mod cli;
pub mod client;
pub mod config;
pub mod core;
pub mod data;
pub mod fsops;
#[cfg(feature = "server")]
pub mod ftpd;
#[cfg(feature = "server")]
pub mod gate;
pub mod hash;
pub mod ignore;
pub mod logger;
pub mod progress;
pub mod proto;
pub mod scan;
#[cfg(feature = "server")]
pub mod server;
pub mod signals;
pub mod status;
pub mod store;
pub mod tls;
pub mod watch;
