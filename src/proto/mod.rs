//! The control channel's wire format: messages, framing, and the handshake's proofs.

pub mod auth;
pub mod codec;
pub mod msg;
