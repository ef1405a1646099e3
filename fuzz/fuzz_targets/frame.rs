//! The control channel's frame decoder on arbitrary bytes, as both ends read them: the server
//! reads `ClientMsg`s (handshake limit first, then the full limit), the client `ServerMsg`s.
//!
//! The input is a stream of frames, decoded one after another until the first error, as a
//! connection would. Every frame that decodes must re-encode to a frame that decodes to the
//! same message and re-encodes to the same bytes; the handshake limit must only ever refuse
//! what is over it.

#![no_main]

use std::fmt::Debug;
use std::io;

use ferry::proto::codec::{encode, read_frame, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use ferry::proto::msg::{ClientMsg, ServerMsg};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A connection never reads more frames than this from one input (bounds each run).
const MAX_FRAMES: usize = 64;

/// What decoding each frame of `data` gives, up to and including the first error.
fn decode_all<T: DeserializeOwned>(data: &[u8], max: usize) -> Vec<(usize, io::Result<T>)> {
    let mut r = data;
    let mut out = Vec::new();
    for _ in 0..MAX_FRAMES {
        let announced = r
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()) as usize);
        let got = smol::block_on(read_frame::<_, T>(&mut r, max));
        let failed = got.is_err();
        out.push((announced, got));
        if failed || r.is_empty() {
            break;
        }
    }
    out
}

fn check<T: Serialize + DeserializeOwned + Debug>(data: &[u8]) {
    let full = decode_all::<T>(data, MAX_FRAME);
    for (_, got) in &full {
        match got {
            Ok(msg) => {
                let frame = encode(msg).expect("a decoded message encodes");
                assert_eq!(
                    u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                    frame.len() - 4,
                    "the length prefix counts the body"
                );
                let again: T = smol::block_on(read_frame(&mut &frame[..], MAX_FRAME))
                    .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
                assert_eq!(format!("{msg:?}"), format!("{again:?}"), "round trip");
                assert_eq!(encode(&again).unwrap(), frame, "re-encoding is stable");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(!text.is_empty(), "errors say what was wrong");
                if e.kind() == io::ErrorKind::InvalidData {
                    assert!(
                        text.contains("exceeds the limit") || text.contains("malformed frame"),
                        "unexpected error text: {text}"
                    );
                }
            }
        }
    }
    // The handshake limit gives the same answers frame by frame, except that a frame over it
    // is refused (and ends the connection) before its body is read.
    let small = decode_all::<T>(data, MAX_HANDSHAKE_FRAME);
    for ((len, big), (_, small)) in full.iter().zip(&small) {
        match (big, small) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}")),
            (_, Err(e)) if *len > MAX_HANDSHAKE_FRAME => {
                assert!(e.to_string().contains("exceeds the limit"), "{e}");
                break;
            }
            (Err(a), Err(b)) => assert_eq!(a.kind(), b.kind()),
            (a, b) => panic!("limits disagree on a {len} byte frame: {a:?} vs {b:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check::<ClientMsg>(data);
    check::<ServerMsg>(data);
});
