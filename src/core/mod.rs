//! The pure core: names, entries, the three-way plan. No filesystem, no sockets, no async.
//! A newcomer can read this folder alone and know every decision ferry makes.

pub mod base;
pub mod entry;
pub mod index;
pub mod layered;
pub mod packed;
pub mod path;
pub mod plan;
pub mod renames;
pub mod text;
pub mod tracked;
