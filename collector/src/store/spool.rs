//! The spool: the durable hand-off between the pipeline and the store writer.
//!
//! A batch is acknowledged to its sender only once it is here (DESIGN.md, reliability): the
//! appender thread writes batches to append-only segment files, syncs them (one sync for every
//! batch waiting, so a busy collector pays one per group), and only then answers. The writer
//! reads the same files in order, so a batch written while ClickHouse is down waits on disk,
//! not in memory, and a collector killed at any moment replays on start what it had not
//! written yet. Segments whose batches are all in ClickHouse are deleted.
//!
//! A record is `len: u32, crc32: u32, seq: u64, payload` (little-endian; the checksum covers
//! seq and payload). `seq` is the batch id: the store writes it with the rows so that a replay
//! can tell what is already there. A torn record at the end of the last segment (a crash during
//! a write) is cut off at open; a bad record anywhere else ends its segment's replay and is
//! counted.
//!
//! The writer's progress is kept in `written` (the last seq known to be in ClickHouse), so a
//! restart replays from there; what the marker missed, the write ledger catches (writer.rs).

use std::{
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

const HEADER: usize = 16;
/// Larger records are refused at append and treated as corruption when read.
pub const MAX_RECORD: usize = 256 << 20;

/// Why a batch was not made durable. Nothing of it is on disk; the sender may retry.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpoolError {
    #[error("the spool is full ({used} of {limit} bytes): ClickHouse is behind or down")]
    Full { used: u64, limit: u64 },
    #[error("the spool cannot write: {0}")]
    Io(String),
}

/// What opening the spool found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Records found, oldest first: `first..=last` seqs (with gaps across restarts).
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records that failed their checksum or were cut short (the torn tail included).
    pub corrupt: u64,
    /// Every batch up to this seq was in ClickHouse when the last run said so.
    pub written_through: u64,
}

const WRITTEN_MARKER: &str = "written";

struct Segment {
    /// The last seq in it (one less than its first while empty).
    last_seq: u64,
    bytes: u64,
    path: PathBuf,
}

/// The appending side: owned by one thread.
pub struct SpoolFiles {
    dir: PathBuf,
    segments: Vec<Segment>,
    current: Option<File>,
    next_seq: u64,
    bytes: u64,
    max_bytes: u64,
    segment_bytes: u64,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.seg"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let seq = name.to_str()?.strip_suffix(".seg")?.parse().ok()?;
            Some((seq, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Reads one record; `Ok(None)` at a clean end, `Err` on a torn or corrupt record.
fn read_record(reader: &mut impl Read) -> io::Result<Option<(u64, Vec<u8>)>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match reader.read(&mut header[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "torn record header")),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len > MAX_RECORD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "record length out of range"));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload)?;
    if checksum(seq, &payload) != crc {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "checksum mismatch"));
    }
    Ok(Some((seq, payload)))
}

impl SpoolFiles {
    /// Opens (or creates) the spool in `dir`, checking every record; cuts a torn tail off the
    /// last segment.
    pub fn open(dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<(Self, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut recovered = Recovered::default();
        let mut segments = Vec::new();
        let found = list_segments(dir)?;
        let count = found.len();
        for (i, (first_seq, path)) in found.into_iter().enumerate() {
            let mut reader = BufReader::new(File::open(&path)?);
            let (mut good_bytes, mut last_seq) = (0u64, first_seq.saturating_sub(1));
            loop {
                match read_record(&mut reader) {
                    Ok(Some((seq, payload))) => {
                        good_bytes += (HEADER + payload.len()) as u64;
                        last_seq = seq;
                        recovered.records += 1;
                        recovered.first_seq.get_or_insert(seq);
                        recovered.last_seq = Some(seq);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        recovered.corrupt += 1;
                        tracing::warn!(segment = %path.display(), "spool record unreadable after {good_bytes} bytes: {e}");
                        if i + 1 == count {
                            // A write cut short by a crash: what follows was never acknowledged.
                            OpenOptions::new().write(true).open(&path)?.set_len(good_bytes)?;
                        }
                        break;
                    }
                }
            }
            segments.push(Segment {
                last_seq,
                bytes: good_bytes,
                path,
            });
        }
        // Batch ids never repeat: past the last one on disk and past any earlier run's (which
        // counted up from its own start time in microseconds, one id per batch).
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let next_seq = now_us.max(recovered.last_seq.map_or(0, |s| s + 1));
        recovered.written_through = fs::read_to_string(dir.join(WRITTEN_MARKER))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let files = Self {
            dir: dir.to_path_buf(),
            segments,
            current: None,
            next_seq,
            bytes,
            max_bytes,
            segment_bytes: segment_bytes.max(1),
        };
        Ok((files, recovered))
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The seq the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends the payloads as one group and syncs them: all durable, or (on an error) none
    /// of them written. Returns the first seq given; the rest follow one by one.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<u64, SpoolError> {
        let size: u64 = payloads.iter().map(|p| (HEADER + p.len()) as u64).sum();
        if self.bytes + size > self.max_bytes {
            return Err(SpoolError::Full {
                used: self.bytes,
                limit: self.max_bytes,
            });
        }
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_RECORD) {
            return Err(SpoolError::Io(format!(
                "a batch of {} bytes is too large to spool",
                p.len()
            )));
        }
        let rotate = match self.segments.last() {
            None => true,
            Some(last) => self.current.is_none() || last.bytes >= self.segment_bytes,
        };
        if rotate {
            self.start_segment().map_err(|e| SpoolError::Io(e.to_string()))?;
        }
        let first = self.next_seq;
        let mut buffer = Vec::with_capacity(size as usize);
        for (i, payload) in payloads.iter().enumerate() {
            let seq = first + i as u64;
            buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buffer.extend_from_slice(&checksum(seq, payload).to_le_bytes());
            buffer.extend_from_slice(&seq.to_le_bytes());
            buffer.extend_from_slice(payload);
        }
        let segment = self.segments.last_mut().expect("a segment is open");
        let file = self.current.as_mut().expect("a segment is open");
        let written = file.write_all(&buffer).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Nothing half-written may stay: cut back to the last whole record, and append to a
            // fresh file next time (this one's handle may be unusable).
            let _ = file.set_len(segment.bytes);
            self.current = None;
            if segment.bytes == 0 {
                let _ = fs::remove_file(&segment.path);
                self.segments.pop();
            }
            return Err(SpoolError::Io(e.to_string()));
        }
        segment.bytes += size;
        segment.last_seq = first + payloads.len() as u64 - 1;
        self.bytes += size;
        self.next_seq = first + payloads.len() as u64;
        Ok(first)
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.next_seq);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // The new name must survive a crash as well as its contents.
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(Segment {
            last_seq: self.next_seq.saturating_sub(1),
            bytes: 0,
            path,
        });
        self.current = Some(file);
        Ok(())
    }

    /// Deletes the segments whose every batch has seq <= `through` (all written to ClickHouse),
    /// except the one being appended to.
    pub fn release(&mut self, through: u64) {
        // Not synced: a marker lost in a crash only means more replay, which the ledger skips.
        let marker = self.dir.join(WRITTEN_MARKER);
        let temporary = self.dir.join("written.tmp");
        if let Err(e) = fs::write(&temporary, through.to_string()).and_then(|()| fs::rename(&temporary, &marker)) {
            tracing::warn!("cannot record the spool's written mark: {e}");
        }
        let open = self.segments.len().saturating_sub(usize::from(self.current.is_some()));
        let done = self.segments[..open]
            .iter()
            .take_while(|s| s.last_seq <= through)
            .count();
        for segment in self.segments.drain(..done) {
            if let Err(e) = fs::remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), "cannot delete a written spool segment: {e}");
            }
            self.bytes -= segment.bytes;
        }
    }
}

/// The reading side: the writer's cursor over the segments, in seq order.
pub struct SpoolReader {
    dir: PathBuf,
    /// The open segment, where its next record starts, and the first seq of the segment.
    open: Option<(BufReader<File>, u64, u64)>,
    /// Records whose checksum failed while reading (also counted at open).
    pub corrupt: u64,
}

impl SpoolReader {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            open: None,
            corrupt: 0,
        }
    }

    /// The next record with seq in `from..=until` (until: the last durable seq), if any.
    pub fn read(&mut self, from: u64, until: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
        if from > until {
            return Ok(None);
        }
        loop {
            if self.open.is_none() {
                // The segment holding `from`, or the first after it.
                let segments = list_segments(&self.dir)?;
                let start = segments.iter().rposition(|(first, _)| *first <= from).unwrap_or(0);
                let Some((first, path)) = segments.get(start) else {
                    return Ok(None);
                };
                let file = File::open(path)?;
                self.open = Some((BufReader::new(file), 0, *first));
            }
            let (reader, offset, first) = self.open.as_mut().expect("opened above");
            let segment_first = *first;
            let result = read_record(reader);
            let result_kind = result.as_ref().err().map(io::Error::kind);
            match result {
                Ok(Some((seq, payload))) => {
                    *offset += (HEADER + payload.len()) as u64;
                    if seq > until {
                        // Not durable yet (or being written): come back to it.
                        reader.seek(SeekFrom::Start(*offset - (HEADER + payload.len()) as u64))?;
                        *offset -= (HEADER + payload.len()) as u64;
                        return Ok(None);
                    }
                    if seq >= from {
                        return Ok(Some((seq, payload)));
                    }
                }
                Ok(None) | Err(_) => {
                    let corrupt = matches!(&result_kind, Some(io::ErrorKind::InvalidData));
                    let at = *offset;
                    // The end of this segment (or a record still being written): move on if a
                    // later segment exists (appends never go back to an earlier one), else
                    // wait for more.
                    let later = list_segments(&self.dir)?.into_iter().find(|(f, _)| *f > segment_first);
                    match later {
                        Some((next_first, path)) => {
                            self.corrupt += u64::from(corrupt);
                            self.open = Some((BufReader::new(File::open(path)?), 0, next_first));
                        }
                        None => {
                            reader.seek(SeekFrom::Start(at))?;
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(range: std::ops::Range<u8>) -> Vec<Vec<u8>> {
        range.map(|i| vec![i; 10 + i as usize]).collect()
    }

    fn read_all(reader: &mut SpoolReader, from: u64, until: u64) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut next = from;
        while let Some((seq, payload)) = reader.read(next, until).unwrap() {
            next = seq + 1;
            out.push((seq, payload));
        }
        out
    }

    #[test]
    fn batches_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, recovered) = SpoolFiles::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(recovered, Recovered::default());
        let first = spool.append(&payloads(0..3)).unwrap();
        spool.append(&payloads(3..5)).unwrap();
        spool.append(&payloads(5..6)).unwrap();
        assert!(list_segments(dir.path()).unwrap().len() >= 2, "segments rotate by size");
        let mut reader = SpoolReader::new(dir.path());
        let got = read_all(&mut reader, 0, first + 3);
        assert_eq!(got.len(), 4, "only what is durable up to `until`");
        let got = read_all(&mut reader, first + 4, u64::MAX);
        assert_eq!(got.iter().map(|(s, _)| s - first).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(got[1].1, vec![5; 15]);
        drop(spool);

        let (spool, recovered) = SpoolFiles::open(dir.path(), 1 << 20, 100).unwrap();
        assert_eq!(recovered.records, 6);
        assert_eq!(recovered.first_seq, Some(first));
        assert_eq!(recovered.corrupt, 0);
        assert!(spool.next_seq() > first + 5, "ids never repeat after a restart");
    }

    #[test]
    fn a_torn_tail_is_cut_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = SpoolFiles::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        let first = spool.append(&payloads(0..4)).unwrap();
        drop(spool);
        let (_, path) = list_segments(dir.path()).unwrap().pop().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        // A crash in the middle of the last record.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (mut spool, recovered) = SpoolFiles::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!((recovered.records, recovered.corrupt), (3, 1));
        // Appending goes on after the last whole record.
        spool.append(&payloads(9..10)).unwrap();
        let got = read_all(&mut SpoolReader::new(dir.path()), 0, u64::MAX);
        assert_eq!(got.len(), 4);
        assert_eq!(got[3].1, vec![9; 19]);
        drop(spool);

        // A flipped byte inside the second record of the first segment.
        let (_, path) = list_segments(dir.path()).unwrap().remove(0);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(HEADER + 10) + HEADER + 2] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let (_, recovered) = SpoolFiles::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!(recovered.corrupt, 1);
        assert_eq!(recovered.first_seq, Some(first));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever the groups, segment size and where a crash cuts the last file, the spool
        /// gives back whole records in order: everything appended before the cut, nothing else.
        #[test]
        fn replays_exactly_the_whole_records_in_order(
            groups in proptest::collection::vec(proptest::collection::vec(0usize..300, 1..5), 1..12),
            segment_bytes in 64u64..2048,
            cut in 0u64..400,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (mut spool, _) = SpoolFiles::open(dir.path(), 1 << 30, segment_bytes).unwrap();
            let mut appended = Vec::new();
            for (g, sizes) in groups.iter().enumerate() {
                let payloads: Vec<Vec<u8>> = sizes.iter().map(|n| vec![g as u8; *n]).collect();
                let first = spool.append(&payloads).unwrap();
                appended.extend(payloads.into_iter().enumerate().map(|(i, p)| (first + i as u64, p)));
            }
            drop(spool);
            // A crash while writing: the last segment loses its last `cut` bytes.
            let (_, last) = list_segments(dir.path()).unwrap().pop().unwrap();
            let len = fs::metadata(&last).unwrap().len();
            OpenOptions::new().write(true).open(&last).unwrap().set_len(len.saturating_sub(cut)).unwrap();
            let (_, recovered) = SpoolFiles::open(dir.path(), 1 << 30, segment_bytes).unwrap();
            let got = read_all(&mut SpoolReader::new(dir.path()), 0, u64::MAX);
            proptest::prop_assert_eq!(got.len() as u64, recovered.records);
            proptest::prop_assert!(got.len() <= appended.len());
            proptest::prop_assert_eq!(&got[..], &appended[..got.len()]);
            if cut == 0 {
                proptest::prop_assert_eq!(got.len(), appended.len());
            }
            proptest::prop_assert!(recovered.corrupt <= 1);
        }
    }

    #[test]
    fn a_full_disk_refuses_the_group_and_the_next_group_goes_to_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = SpoolFiles::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        // The next segment's file is a device whose every write fails with ENOSPC.
        let path = segment_path(dir.path(), spool.next_seq());
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let refused = spool.append(&payloads(0..2));
        match &refused {
            Err(SpoolError::Io(message)) => assert!(message.contains("No space left"), "{message}"),
            other => panic!("expected a write error, got {other:?}"),
        }
        assert_eq!(spool.bytes(), 0);
        assert!(!path.exists(), "the failed segment is gone");
        let first = spool.append(&payloads(2..3)).unwrap();
        let got = read_all(&mut SpoolReader::new(dir.path()), 0, u64::MAX);
        assert_eq!(got, vec![(first, vec![2; 12])], "only the batch that was written");
        drop(spool);
        let (_, recovered) = SpoolFiles::open(dir.path(), 1 << 20, 1 << 20).unwrap();
        assert_eq!((recovered.records, recovered.corrupt), (1, 0));
    }

    #[test]
    fn a_full_spool_refuses_without_writing_and_frees_space_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = SpoolFiles::open(dir.path(), 200, 50).unwrap();
        let first = spool.append(&payloads(0..3)).unwrap();
        spool.append(&payloads(3..5)).unwrap();
        let before = spool.bytes();
        let refused = spool.append(&payloads(5..8));
        assert!(matches!(refused, Err(SpoolError::Full { .. })), "{refused:?}");
        assert_eq!(spool.bytes(), before, "nothing of a refused group is written");
        spool.release(first + 2);
        assert!(spool.bytes() < before, "written segments are deleted");
        spool.append(&payloads(5..6)).unwrap();
        let got = read_all(&mut SpoolReader::new(dir.path()), first + 3, u64::MAX);
        assert_eq!(got.iter().map(|(s, _)| s - first).collect::<Vec<_>>(), vec![3, 4, 5]);
    }
}
