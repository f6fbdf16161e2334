//! Retained values across restarts: the snapshot file, and the thread that writes it.
//!
//! **File format** (version 1), all integers little-endian:
//!
//! ```text
//! offset size
//!  0      8   magic "LPRETAIN"
//!  8      2   format version (1)
//! 10      2   reserved, 0
//! 12      4   CRC-32 (IEEE) of the body
//! 16      8   body length in bytes
//! 24      ..  body: bincode 2, standard() configuration: Vec<RetainedRecord>
//! ```
//!
//! A file whose magic, version, length or checksum is wrong is not loaded (the engine starts
//! with no retained values and says why); nothing past the header is trusted before the
//! checksum matched, and the body is decoded with bincode's allocation limit in proportion to
//! its length ([`decode_records`]), so a length field cannot make the engine allocate more than
//! the file could hold.
//!
//! **Writing** ([`save`]): the whole file goes to `<path>.tmp`, is fsynced, renamed over
//! `<path>` and the directory fsynced: a crash leaves the old file or the new one, never half
//! of one. A stale `.tmp` from a crash is ignored at start and overwritten by the next save.
//!
//! **Who writes** ([`spawn`]): the `lanpush-persist` thread, every `retained.persist_interval_ms`,
//! asks each reactor for its retained values if they changed since the last answer
//! (`ShardMsg::Retained`: shared frames, a reference count each, no copy on the reactor) and
//! writes the file from them off the data path. At shutdown [`super::Engine::join`] writes it
//! once more from what each reactor left after its drain.
//!
//! **Where a loaded value goes**: each topic is claimed for its hash owner
//! ([`super::owners::OwnerTable::claim_for_local`]) before the reactors start, and that
//! shard's store holds it (`TopicStore::restore`) like any retained value: snapshot-on-subscribe
//! needs nothing new. The trade-off: a restored topic is owned by its hash shard, not by its
//! first publisher's, for the rest of the run (one hop more per message when they differ).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use bincode::{Decode, Encode};
use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::notify::Mailbox;
use super::reactor::ShardMsg;
use super::store::RetainedFrame;
use super::EngineShared;
use crate::proto::{self, Decoded, Frame, PublishRef, DATA_FLAG_RESTORED, DATA_FLAG_SNAPSHOT};

const MAGIC: &[u8; 8] = b"LPRETAIN";
const FORMAT_VERSION: u16 = 1;
const HEADER_BYTES: usize = 24;
/// How long the persist thread waits for a reactor's retained values.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a retained-values file: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// One retained value in the file: what a DATA frame carries, less the run's `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RetainedRecord {
    pub topic: String,
    pub source_ts_ns: u64,
    pub ingest_ts_ns: u64,
    pub quality: u8,
    pub payload: Vec<u8>,
}

impl RetainedRecord {
    /// The record of a retained DATA frame; `None` if it is not one.
    pub(crate) fn from_frame(frame: &[u8]) -> Option<RetainedRecord> {
        match proto::decode_frame(frame, usize::MAX).ok()? {
            Decoded::Frame(
                Frame::Data {
                    header,
                    topic,
                    payload,
                },
                _,
            ) => Some(RetainedRecord {
                topic: topic.to_string(),
                source_ts_ns: header.source_ts_ns,
                ingest_ts_ns: header.ingest_ts_ns,
                quality: header.quality,
                payload: payload.to_vec(),
            }),
            _ => None,
        }
    }

    /// The DATA frame a restored value is sent as: seq 0, flagged SNAPSHOT and RESTORED (it is
    /// only ever sent as a snapshot).
    pub(crate) fn to_frame(&self) -> RetainedFrame {
        let publish = PublishRef {
            topic: &self.topic,
            source_ts_ns: self.source_ts_ns,
            quality: self.quality,
            payload: &self.payload,
        };
        proto::data_frame_shared(
            &publish,
            0,
            self.ingest_ts_ns,
            DATA_FLAG_RESTORED | DATA_FLAG_SNAPSHOT,
        )
    }

    fn bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + 32
    }
}

/// The file's bytes for `records`, keeping records in order while their bytes stay within
/// `max_bytes` (`retained.max_bytes`). Returns the bytes and how many records were left out.
pub fn encode(records: &[RetainedRecord], max_bytes: usize) -> (Vec<u8>, usize) {
    let mut total = 0usize;
    let kept = records
        .iter()
        .take_while(|r| {
            total = total.saturating_add(r.bytes());
            total <= max_bytes
        })
        .count();
    let body =
        bincode::encode_to_vec(&records[..kept], bincode::config::standard()).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    (out, records.len() - kept)
}

/// The records in a file's bytes; `Err` names what is wrong.
pub fn decode(bytes: &[u8]) -> Result<Vec<RetainedRecord>, String> {
    let header = bytes
        .get(..HEADER_BYTES)
        .ok_or_else(|| format!("{} bytes, shorter than the header", bytes.len()))?;
    if &header[..8] != MAGIC {
        return Err("wrong magic".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]);
    let version = u16_at(8);
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}, this engine reads {FORMAT_VERSION}"
        ));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&header[12..16]);
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let body = &bytes[HEADER_BYTES..];
    if u64::from_le_bytes(len) != body.len() as u64 {
        return Err(format!(
            "the header announces {} body bytes, the file has {} (cut short?)",
            u64::from_le_bytes(len),
            body.len()
        ));
    }
    if crc32fast::hash(body) != u32::from_le_bytes(crc) {
        return Err("checksum mismatch".into());
    }
    let (records, used) = decode_records(body).map_err(|e| format!("body: {e}"))?;
    if used != body.len() {
        return Err(format!("{} bytes after the records", body.len() - used));
    }
    Ok(records)
}

/// Before it allocates a string or a vector, bincode claims its in-memory size against the
/// configured limit. An honest body claims at most 16 bytes per body byte (a record is 72 bytes
/// in memory and at least 5 in the file; topic and payload bytes claim one each), so a length
/// field the body cannot back makes the decode fail at this bound instead of allocating it.
const CLAIM_BYTES_PER_BODY_BYTE: usize = 16;
const CLAIM_SLACK_BYTES: usize = 4096;

/// Decodes the records with bincode's limit at the smallest tier (powers of 4, as it takes its
/// limit as a const generic) that holds the body's claim budget: at most 4 times that budget.
fn decode_records(
    body: &[u8],
) -> Result<(Vec<RetainedRecord>, usize), bincode::error::DecodeError> {
    let budget = body
        .len()
        .saturating_mul(CLAIM_BYTES_PER_BODY_BYTE)
        .saturating_add(CLAIM_SLACK_BYTES);
    let config = bincode::config::standard();
    macro_rules! tiers {
        ($($bits:literal),+) => {
            $(if budget <= 1usize << $bits {
                return bincode::decode_from_slice(body, config.with_limit::<{ 1usize << $bits }>());
            })+
        };
    }
    tiers!(16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38);
    // A file is refused over `max_file_bytes`, far below 2^34 bytes of body.
    bincode::decode_from_slice(body, config.with_limit::<{ 1usize << 40 }>())
}

/// The temporary file a save writes before renaming it over `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Writes `bytes` as `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let tmp = temp_path(path);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PersistError::Io { path, source }
    };
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    // The rename is durable once the directory is: without this a crash may undo it.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

/// Reads the records of `path`: `Ok(None)` if there is no file. A file larger than
/// `max_file_bytes` is refused unread.
pub fn load(path: &Path, max_file_bytes: u64) -> Result<Option<Vec<RetainedRecord>>, PersistError> {
    let io_err = |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len > max_file_bytes {
        return Err(PersistError::Format {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, more than retained.max_bytes allows ({max_file_bytes})"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_file_bytes)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    decode(&bytes)
        .map(Some)
        .map_err(|reason| PersistError::Format {
            path: path.to_path_buf(),
            reason,
        })
}

/// The largest snapshot file accepted for `retained.max_bytes`: the records plus their
/// per-record overhead, with room for a bound lowered since the file was written.
pub fn max_file_bytes(max_retained_bytes: usize) -> u64 {
    (max_retained_bytes as u64)
        .saturating_mul(2)
        .max(1 << 20)
        .saturating_add(HEADER_BYTES as u64)
}

/// Loads the file at start and hands each value to its owner: the per-shard lists
/// `FanoutCore::new` takes from [`EngineShared`]. A missing file is a first start; a bad one is
/// logged, moved aside to `<path>.corrupt` for inspection, and the engine starts without it.
pub(crate) fn restore_at_start(
    path: &Path,
    shared: &EngineShared,
    config: &crate::config::Config,
) -> Vec<Vec<RetainedFrame>> {
    let max_retained_bytes = config.retained.max_bytes;
    let mut per_shard: Vec<Vec<RetainedFrame>> = vec![Vec::new(); shared.shards.len()];
    let records = match load(path, max_file_bytes(max_retained_bytes)) {
        Ok(Some(records)) => records,
        Ok(None) => {
            tracing::info!(path = %path.display(), "no retained-values file yet: starting empty");
            return per_shard;
        }
        Err(e) => {
            let mut aside = path.as_os_str().to_owned();
            aside.push(".corrupt");
            let moved = fs::rename(path, &aside).is_ok();
            tracing::error!(
                error = %e,
                moved_to = moved.then(|| PathBuf::from(&aside).display().to_string()),
                "retained values not restored"
            );
            return per_shard;
        }
    };
    let (mut restored, mut refused, mut invalid) = (0usize, 0usize, 0usize);
    for record in &records {
        // The limits may have been lowered since the file was written: what the engine would
        // refuse from a publisher now, it does not restore either.
        let limits = &config.limits;
        let data_len = super::core::data_frame_len(record.topic.len(), record.payload.len());
        if proto::validate_topic(&record.topic, limits.max_topic_bytes).is_err()
            || data_len > limits.max_frame_bytes
        {
            invalid += 1;
            continue;
        }
        match shared.owners.claim_for_local(&record.topic) {
            Some(owned) => {
                per_shard[owned.owner as usize].push(record.to_frame());
                restored += 1;
            }
            None => refused += 1,
        }
    }
    tracing::info!(path = %path.display(), restored, refused_max_topics = refused, refused_invalid = invalid, "retained values restored");
    per_shard
}

/// A reactor's answer to `ShardMsg::Retained`: `None` if nothing changed since the version
/// asked about, else its version and retained frames.
pub(crate) type RetainedAnswer = (usize, Option<(u64, Vec<RetainedFrame>)>);

/// Writes the file for the retained frames of every shard; logs the outcome.
pub(crate) fn write_values(
    path: &Path,
    shards: &[Vec<RetainedFrame>],
    max_bytes: usize,
    last: bool,
) {
    let records: Vec<RetainedRecord> = shards
        .iter()
        .flatten()
        .filter_map(|f| RetainedRecord::from_frame(f))
        .collect();
    let (bytes, left_out) = encode(&records, max_bytes);
    if left_out > 0 {
        tracing::warn!(
            left_out,
            "retained.max_bytes reached: values left out of the snapshot file"
        );
    }
    let values = records.len() - left_out;
    match save(path, &bytes) {
        Ok(()) if last => tracing::info!(
            path = %path.display(),
            values,
            bytes = bytes.len(),
            "retained values saved at shutdown"
        ),
        Ok(()) => tracing::debug!(
            path = %path.display(),
            values,
            bytes = bytes.len(),
            "retained values saved"
        ),
        Err(e) => tracing::error!(error = %e, "cannot save the retained values"),
    }
}

/// Asks every reactor for its retained values (`versions[shard]`: answer "unchanged" if still
/// at it). Per shard: `None` if it did not answer within [`ANSWER_TIMEOUT`].
fn ask(mailboxes: &[Mailbox<ShardMsg>], versions: &[Option<u64>]) -> Vec<Option<RetainedAnswer>> {
    let (tx, rx) = crossbeam_channel::bounded::<RetainedAnswer>(mailboxes.len());
    let mut asked = 0;
    for (shard, mailbox) in mailboxes.iter().enumerate() {
        let msg = ShardMsg::Retained {
            shard,
            version: versions[shard],
            reply: tx.clone(),
        };
        if mailbox.send_timeout(msg, ANSWER_TIMEOUT).is_ok() {
            asked += 1;
        }
    }
    drop(tx);
    let mut answers: Vec<Option<RetainedAnswer>> = (0..mailboxes.len()).map(|_| None).collect();
    for _ in 0..asked {
        let Ok(answer) = rx.recv_timeout(ANSWER_TIMEOUT) else {
            break;
        };
        let shard = answer.0;
        answers[shard] = Some(answer);
    }
    answers
}

/// Starts the `lanpush-persist` thread. Every `interval` it asks each reactor whether its
/// retained values changed since the last save (a version number: no frames move when none
/// did); if any did, it asks every reactor for its values and rewrites the file from them. It
/// holds the frames only while it writes, so it never keeps superseded values alive, and it
/// never writes a file that misses a reactor that did not answer. It ends when `stop` is sent
/// to or dropped.
pub(crate) fn spawn(
    path: PathBuf,
    interval: Duration,
    max_bytes: usize,
    mailboxes: Vec<Mailbox<ShardMsg>>,
    stop: Receiver<()>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lanpush-persist".into())
        .spawn(move || {
            let mut versions: Vec<Option<u64>> = vec![None; mailboxes.len()];
            loop {
                match stop.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let changed = ask(&mailboxes, &versions)
                    .iter()
                    .any(|a| !matches!(a, Some((_, None))));
                if !changed {
                    continue;
                }
                let answers = ask(&mailboxes, &vec![None; mailboxes.len()]);
                let mut frames = Vec::with_capacity(answers.len());
                for (shard, answer) in answers.into_iter().enumerate() {
                    match answer {
                        Some((_, Some((version, values)))) => {
                            versions[shard] = Some(version);
                            frames.push(values);
                        }
                        _ => {
                            tracing::warn!(
                                reactor = shard,
                                "a reactor did not hand over its retained values: the snapshot \
                                 file keeps its previous contents"
                            );
                            break;
                        }
                    }
                }
                if frames.len() == mailboxes.len() {
                    write_values(&path, &frames, max_bytes, false);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(topic: &str, payload: &[u8]) -> RetainedRecord {
        RetainedRecord {
            topic: topic.into(),
            source_ts_ns: 1,
            ingest_ts_ns: 2,
            quality: 192,
            payload: payload.into(),
        }
    }

    #[test]
    fn records_roundtrip_through_the_file_format() {
        let records = vec![
            record("a/b", b"x"),
            record("plant/line1/temp", &[0, 255, 7]),
        ];
        let (bytes, left_out) = encode(&records, usize::MAX);
        assert_eq!(left_out, 0);
        assert_eq!(&bytes[..8], b"LPRETAIN");
        assert_eq!(decode(&bytes).unwrap(), records);
        let (empty, _) = encode(&[], usize::MAX);
        assert_eq!(empty.len(), HEADER_BYTES + 1, "the list length, 0");
        assert_eq!(decode(&empty).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_file_is_refused_with_the_reason() {
        let (bytes, _) = encode(&[record("a", b"12345")], usize::MAX);
        // Cut short anywhere: never decoded.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&flipped).unwrap_err(), "checksum mismatch");
        let mut version = bytes.clone();
        version[8] = 9;
        assert!(decode(&version).unwrap_err().contains("version 9"));
        assert_eq!(
            decode(b"not a snapshot file at all").unwrap_err(),
            "wrong magic"
        );
    }

    #[test]
    fn a_length_field_the_body_cannot_back_is_refused_not_allocated() {
        // One record whose payload length claims 2^40 bytes, behind a valid header and CRC.
        let mut body = vec![1u8]; // one record
        body.extend_from_slice(&[1, b'a', 0, 0, 192]); // topic "a", timestamps 0, quality
        body.push(0xFD); // payload length: u64 varint ...
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let mut file = Vec::new();
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        file.extend_from_slice(&0u16.to_le_bytes());
        file.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&body);
        let err = decode(&file).unwrap_err();
        assert!(err.starts_with("body:"), "{err}");
    }

    #[test]
    fn the_file_is_bounded_by_max_bytes() {
        let records: Vec<RetainedRecord> = (0..10)
            .map(|i| record(&format!("t/{i}"), &[0; 100]))
            .collect();
        let (bytes, left_out) = encode(&records, 3 * records[0].bytes());
        assert_eq!(left_out, 7);
        assert_eq!(decode(&bytes).unwrap().len(), 3);
    }

    #[test]
    fn a_frame_becomes_a_record_and_back_flagged_restored() {
        let r = record("a/b", b"v");
        let frame = r.to_frame();
        assert_eq!(proto::data_frame_seq(&frame), Some(0));
        assert_eq!(
            proto::data_frame_flags(&frame),
            Some(DATA_FLAG_RESTORED | DATA_FLAG_SNAPSHOT)
        );
        assert_eq!(RetainedRecord::from_frame(&frame), Some(r));
    }

    #[test]
    fn save_replaces_the_file_atomically_and_ignores_a_stale_temp_file() {
        let dir = std::env::temp_dir().join(format!("lanpush-persist-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("retained.bin");
        assert!(load(&path, 1 << 20).unwrap().is_none(), "no file yet");
        // A crash mid-write leaves a half temp file: it does not matter.
        fs::write(temp_path(&path), b"LPRETAIN\x01\x00half").unwrap();
        let (bytes, _) = encode(&[record("a", b"1")], usize::MAX);
        save(&path, &bytes).unwrap();
        assert!(!temp_path(&path).exists());
        assert_eq!(
            load(&path, 1 << 20).unwrap().unwrap(),
            vec![record("a", b"1")]
        );
        assert!(load(&path, 8).is_err(), "over the size bound");
        fs::remove_dir_all(&dir).unwrap();
    }
}
