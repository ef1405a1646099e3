//! Framing: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! The length is checked against a hard limit before anything is allocated, so a hostile peer
//! cannot make us reserve memory it has not sent; an unauthenticated peer gets a far smaller
//! limit than an authenticated one.

use std::io;

use serde::de::DeserializeOwned;
use serde::Serialize;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame after authentication (a batch of changes).
pub const MAX_FRAME: usize = 16 << 20;

/// Largest frame before authentication: handshake messages are tiny.
pub const MAX_HANDSHAKE_FRAME: usize = 1024;

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    let buf = postcard::to_extend(msg, buf.split_off(0)).map_err(io::Error::other)?;
    let mut framed = buf;
    let len = (framed.len() - 4) as u32;
    framed[..4].copy_from_slice(&len.to_be_bytes());
    Ok(framed)
}

/// Writes `msg` as one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> io::Result<()> {
    let frame = encode(msg)?;
    if frame.len() - 4 > MAX_FRAME {
        return Err(io::Error::other(format!(
            "refusing to send a {} byte frame (limit {MAX_FRAME})",
            frame.len() - 4
        )));
    }
    w.write_all(&frame).await?;
    w.flush().await
}

/// Reads one frame of at most `max` bytes and decodes it. Errors say what was wrong with the
/// frame; an `UnexpectedEof` at the first byte is a clean close.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    // Grown as bytes arrive, so a peer gets no more memory than it has sent.
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    crate::core::path::take_last_refused();
    postcard::from_bytes(&buf).map_err(|e| {
        let why = match crate::core::path::take_last_refused() {
            Some(bad) => bad.to_string(),
            None => e.to_string(),
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed frame ({len} bytes): {why}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::msg::{ClientMsg, Op};

    fn decode(bytes: &[u8], max: usize) -> io::Result<ClientMsg> {
        smol::block_on(read_frame(&mut &bytes[..], max))
    }

    #[test]
    fn round_trip() {
        let msg = ClientMsg::Commit {
            id: 7,
            path: "a/b".parse().unwrap(),
            op: Op::Delete,
            base: None,
        };
        let frame = encode(&msg).unwrap();
        match decode(&frame, MAX_FRAME).unwrap() {
            ClientMsg::Commit { id, path, .. } => assert_eq!((id, path.as_str()), (7, "a/b")),
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn hostile_frames_are_refused() {
        let over = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = decode(&over, MAX_FRAME).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");

        let truncated = [0, 0, 0, 10, 1, 2];
        assert_eq!(
            decode(&truncated, MAX_FRAME).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );

        let garbage = [0, 0, 0, 3, 0xfe, 0xfe, 0xfe];
        let err = decode(&garbage, MAX_FRAME).unwrap_err();
        assert!(err.to_string().contains("malformed frame"), "{err}");

        // A commit naming a path outside the root is refused while decoding.
        let mut evil = encode(&ClientMsg::Commit {
            id: 1,
            path: "placeholder".parse().unwrap(),
            op: Op::Delete,
            base: None,
        })
        .unwrap();
        let at = evil.windows(11).position(|w| w == b"placeholder").unwrap();
        evil[at..at + 11].copy_from_slice(b"../../etc/x");
        let err = decode(&evil, MAX_FRAME).unwrap_err();
        assert!(err.to_string().contains("refused path"), "{err}");
    }
}
