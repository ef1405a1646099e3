//! ferry: keeps one directory tree identical across a server agent and its clients.

pub mod core;
pub mod data;
pub mod fsops;
pub mod logger;
pub mod proto;
pub mod scan;
pub mod store;
