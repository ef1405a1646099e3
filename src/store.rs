//! Crash-safe snapshots of an agent's state in its state directory.
//!
//! A snapshot is written to a temporary file, fsynced, renamed over the old one and the
//! directory fsynced: after a crash at any instant the file holds either the old or the new
//! state, never a mix. What the last snapshot missed is found again by the next start's scan
//! (see server.rs for how sequence numbers stay unique across such a crash).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Marks a ferry state file and its format version.
const MAGIC: &[u8; 8] = b"ferry\x00\x00\x01";

/// Writes `value` to `path` atomically and durably.
pub fn save<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_atomic(path, &encode(value)?)
}

/// Encodes `value` as a snapshot (so the caller can write it off its own thread).
pub fn encode<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    postcard::to_extend(value, MAGIC.to_vec()).map_err(io::Error::other)
}

/// Writes encoded snapshot bytes to `path` atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    sync_dir(dir.unwrap_or(Path::new(".")))
}

/// Reads a snapshot; `Ok(None)` if there is none yet.
pub fn load<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !bytes.starts_with(MAGIC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a ferry state file of this version",
                path.display()
            ),
        ));
    }
    postcard::from_bytes(&bytes[MAGIC.len()..])
        .map(Some)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged: {e}", path.display()),
            )
        })
}

/// fsyncs a directory so a rename in it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.bin");
        assert_eq!(load::<Vec<u32>>(&p).unwrap(), None);
        save(&p, &vec![1u32, 2, 3]).unwrap();
        assert_eq!(load::<Vec<u32>>(&p).unwrap(), Some(vec![1, 2, 3]));
        fs::write(&p, b"garbage").unwrap();
        let err = load::<Vec<u32>>(&p).unwrap_err().to_string();
        assert!(err.contains("not a ferry state file"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
