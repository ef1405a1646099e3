//! Crash-safe state in an agent's state directory: atomic snapshots, and a journal of
//! changes on top of the latest snapshot.
//!
//! A snapshot is written to a temporary file, fsynced, renamed over the old one and the
//! directory fsynced: after a crash at any instant the file holds either the old or the new
//! state, never a mix.
//!
//! The journal (`Journal`) appends one checksummed record per batch of changes. An append is
//! a plain `write`: it survives the process being killed at any instant (the kernel has it),
//! and an fsync follows within a second, so a power cut loses at most that last second. A
//! record torn by either is detected by its length and checksum and dropped whole on the next
//! start, and what it held is found again by that start's scan of the tree (see server.rs for
//! how sequence numbers stay unique across such a loss). When the journal outgrows the
//! snapshot it is folded into a new snapshot ("compaction"), so start-up replay stays short.
//!
//! Why not an embedded database (redb, sled)? The agents keep their whole index in memory
//! anyway (every scan and plan reads it); the store only has to make that map durable. A
//! journal of the entries that changed does exactly that in a hundred lines with the
//! serialization ferry already uses, adds nothing to the binary, and never rewrites pages of
//! a B-tree on the phone's flash for a one-file change.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
    write_atomic_with(path, |w| w.write_all(bytes)).map(drop)
}

/// Writes what `fill` writes to `path` atomically and durably; returns its length.
fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> io::Result<u64> {
    let tmp = path.with_extension("tmp");
    let len = {
        let mut w = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
        fill(&mut w)?;
        let f = w.into_inner().map_err(io::IntoInnerError::into_error)?;
        f.sync_all()?;
        f.metadata()?.len()
    };
    fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    sync_dir(dir.unwrap_or(Path::new(".")))?;
    Ok(len)
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

/// Marks a journal file and its format version.
const JOURNAL_MAGIC: &[u8; 8] = b"ferryJ\x00\x01";

/// Bytes of BLAKE3 kept as a record's checksum.
const SUM: usize = 8;

/// The journal is folded into a snapshot once it is this large and larger than the snapshot.
const COMPACT_MIN: u64 = 1 << 20;

/// A state made durable as a snapshot plus a journal of batches.
pub trait Durable: Serialize + DeserializeOwned + Default {
    /// One journal record: what changed in one step.
    type Batch: Serialize + DeserializeOwned;
    /// Replays one record onto the state.
    fn apply(&mut self, batch: Self::Batch);
}

/// The state's snapshot on disk: generation, then the state.
#[derive(Serialize, serde::Deserialize)]
struct Snapshot<S> {
    generation: u64,
    state: S,
}

/// The append-only half of a durable state (see the module comment).
#[derive(Debug)]
pub struct Journal {
    snapshot_path: PathBuf,
    path: PathBuf,
    file: File,
    /// Matches the snapshot's; a journal of another generation is stale and ignored.
    generation: u64,
    len: u64,
    snapshot_len: u64,
    unsynced: bool,
}

fn checksum(bytes: &[u8]) -> [u8; SUM] {
    let mut sum = [0u8; SUM];
    sum.copy_from_slice(&blake3::hash(bytes).as_bytes()[..SUM]);
    sum
}

fn damaged(path: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} is damaged: {why}", path.display()),
    )
}

impl Journal {
    /// Loads `<dir>/<name>.snap` and replays `<dir>/<name>.journal` onto it (a missing
    /// snapshot is the default state). A torn last record is cut off; a damaged snapshot is
    /// an error (the caller starts afresh, see server.rs and client.rs).
    pub fn open<S: Durable>(dir: &Path, name: &str) -> io::Result<(S, Journal)> {
        let snapshot_path = dir.join(format!("{name}.snap"));
        let path = dir.join(format!("{name}.journal"));
        let snapshot_len = fs::metadata(&snapshot_path).map_or(0, |m| m.len());
        let (mut state, generation) = match load::<Snapshot<S>>(&snapshot_path)? {
            Some(s) => (s.state, s.generation),
            None => (S::default(), 0),
        };
        let mut journal = Journal {
            file: match File::options().read(true).append(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Journal::create(&path, generation)?
                }
                Err(e) => return Err(e),
            },
            snapshot_path,
            path,
            generation,
            len: 0,
            snapshot_len,
            unsynced: false,
        };
        journal.replay(&mut state)?;
        Ok((state, journal))
    }

    /// Like `open`, but a damaged state is reported and replaced by the default state (for the
    /// agents, that means a full reconciliation in which nothing is deleted).
    pub fn open_or_reset<S: Durable>(dir: &Path, name: &str) -> io::Result<(S, Journal)> {
        match Journal::open(dir, name) {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                log::warn!("{e}; starting afresh (a full reconciliation that deletes nothing)");
                let _ = fs::remove_file(dir.join(format!("{name}.snap")));
                let _ = fs::remove_file(dir.join(format!("{name}.journal")));
                Journal::open(dir, name)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes a new, empty journal of `generation` atomically and opens it for appending.
    fn create(path: &Path, generation: u64) -> io::Result<File> {
        let mut header = JOURNAL_MAGIC.to_vec();
        header.extend_from_slice(&generation.to_le_bytes());
        write_atomic(path, &header)?;
        File::options().read(true).append(true).open(path)
    }

    fn replay<S: Durable>(&mut self, state: &mut S) -> io::Result<()> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        let header = JOURNAL_MAGIC.len() + 8;
        let generation = bytes
            .get(JOURNAL_MAGIC.len()..header)
            .filter(|_| bytes.starts_with(JOURNAL_MAGIC))
            .map(|g| u64::from_le_bytes(g.try_into().expect("8 bytes")));
        if generation != Some(self.generation) {
            // Left over from before the last compaction (or not a journal): the snapshot
            // already holds everything it could say.
            if generation.is_none() {
                log::warn!(
                    "{} is not a ferry journal; replacing it",
                    self.path.display()
                );
            }
            self.file = Journal::create(&self.path, self.generation)?;
            self.len = header as u64;
            return Ok(());
        }
        let mut at = header;
        let mut records = 0usize;
        while let Some(batch) = Journal::record_at(&bytes, at) {
            let (payload, next) = batch;
            match postcard::from_bytes::<S::Batch>(payload) {
                Ok(b) => state.apply(b),
                Err(e) => return Err(damaged(&self.path, format!("record {records}: {e}"))),
            }
            records += 1;
            at = next;
        }
        if at < bytes.len() {
            log::warn!(
                "{}: dropped a record torn by a crash ({} bytes); the start-up scan finds what it held",
                self.path.display(),
                bytes.len() - at
            );
            self.file.set_len(at as u64)?;
            self.file.sync_data()?;
        }
        self.len = at as u64;
        log::debug!("{}: replayed {records} records", self.path.display());
        Ok(())
    }

    /// The payload of the whole, intact record starting at `at`, and where the next starts.
    fn record_at(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let len = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let sum = bytes.get(at + 4..at + 4 + SUM)?;
        let start = at + 4 + SUM;
        let payload = bytes.get(start..start.checked_add(len)?)?;
        (checksum(payload) == sum).then_some((payload, start + len))
    }

    /// Appends one record (no fsync: see `sync`).
    pub fn append<B: Serialize>(&mut self, batch: &B) -> io::Result<()> {
        // Encoded after room for the length and checksum, filled in after: a first sync's
        // batch holds every path, and is not copied.
        let mut record =
            postcard::to_extend(batch, vec![0u8; 4 + SUM]).map_err(io::Error::other)?;
        let len = u32::try_from(record.len() - 4 - SUM).map_err(io::Error::other)?;
        let sum = checksum(&record[4 + SUM..]);
        record[..4].copy_from_slice(&len.to_le_bytes());
        record[4..4 + SUM].copy_from_slice(&sum);
        // One write call, so a kill leaves the record whole or absent (torn only by a power cut).
        self.file.write_all(&record)?;
        self.len += record.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// True if appends since the last `sync` are not yet on stable storage.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Makes every append so far survive a power cut.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// True when the journal has grown enough that `compact` should fold it in.
    pub fn wants_compaction(&self) -> bool {
        self.len > COMPACT_MIN && self.len > self.snapshot_len
    }

    /// Writes `state` (everything the journal says, and more) as the next snapshot, then
    /// starts an empty journal. A crash between the two leaves a journal of the old
    /// generation, which the next `open` ignores.
    pub fn compact<S: Serialize>(&mut self, state: &S) -> io::Result<()> {
        let generation = self.generation + 1;
        // Encoded straight into the file: encoded whole first, the snapshot of a million
        // paths was a buffer of 100+ MiB on top of the state.
        self.snapshot_len = write_atomic_with(&self.snapshot_path, |w| {
            w.write_all(MAGIC)?;
            postcard::to_io(&Snapshot { generation, state }, w).map_err(io::Error::other)?;
            Ok(())
        })?;
        self.generation = generation;
        self.file = Journal::create(&self.path, generation)?;
        self.len = (JOURNAL_MAGIC.len() + 8) as u64;
        self.unsynced = false;
        Ok(())
    }
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

    #[derive(Default, Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Counter(Vec<u32>);

    impl Durable for Counter {
        type Batch = u32;
        fn apply(&mut self, b: u32) {
            self.0.push(b);
        }
    }

    #[test]
    fn journal_replays_cuts_torn_tails_and_compacts() {
        let dir = std::env::temp_dir().join(format!("ferry-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (s, mut j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s, Counter::default());
        for i in 1..=3u32 {
            j.append(&i).unwrap();
        }
        j.sync().unwrap();
        drop(j);
        let (s, mut j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3]);

        // A record torn in the middle (as by a power cut) is dropped whole, and appends
        // continue after the last whole one.
        j.append(&4u32).unwrap();
        let path = dir.join("t.journal");
        let len = fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        drop(j);
        let (s, mut j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3]);
        j.append(&5u32).unwrap();
        drop(j);
        let (s, j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3, 5]);

        // Garbage after a whole record: cut off too.
        drop(j);
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let (s, mut j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3, 5]);

        // Compaction: the snapshot holds it all, the journal starts over; a stale journal of
        // the previous generation (a crash between the two writes) is ignored.
        let stale = fs::read(&path).unwrap();
        j.compact(&s).unwrap();
        j.append(&6u32).unwrap();
        drop(j);
        let (s, j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3, 5, 6]);
        drop(j);
        fs::write(&path, &stale).unwrap();
        let (s, _j) = Journal::open::<Counter>(&dir, "t").unwrap();
        assert_eq!(s.0, [1, 2, 3, 5]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
