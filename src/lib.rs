//! ferry: keeps one directory tree identical across a server agent and its clients.

pub mod core;
pub mod proto;
pub mod scan;
