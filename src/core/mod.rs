//! The pure core: names, entries, the three-way plan. No filesystem, no sockets, no async.

pub mod path;
