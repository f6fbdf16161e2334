//! The owner shard's record of its topics: sequence numbers, retained values and the replay ring.
//!
//! Sans-IO. Each topic has one owner shard, so this needs no synchronisation. The replay ring is
//! bounded in bytes across all of the shard's topics: frames are evicted oldest first, whatever
//! their topic. Frames are shared (`Arc`), so a frame in the ring, the retained slot and a dozen
//! outboxes is one allocation.

use std::collections::VecDeque;

use ahash::HashMap;
use std::sync::Arc;

use super::outbox::SharedFrame;
use crate::proto::{self, Frame, Gap, PublishRef, DATA_FLAG_SNAPSHOT};

/// A retained value as the snapshot file holds it (`persist.rs`): a DATA frame.
pub(crate) type RetainedFrame = SharedFrame;
use crate::topic::TopicTree;

struct TopicEntry {
    /// Sequence number of the newest message; 0 before the first.
    seq: u64,
    /// The newest DATA frame: the retained value.
    last: Option<SharedFrame>,
    /// `last` flagged SNAPSHOT, made on demand and dropped on the next message.
    snapshot: Option<SharedFrame>,
    /// Recent frames, oldest first, with consecutive sequence numbers ending at `seq`.
    ring: VecDeque<SharedFrame>,
    /// Stamp of the last update, matching this topic's live entry in the retained LRU.
    updated: u64,
    /// The fan-out core's cache of which other shards want this topic: (epoch, shard mask).
    interest: (u64, u64),
}

impl TopicEntry {
    /// Bytes of retained value this topic holds (the value and its snapshot-flagged copy).
    fn retained_bytes(&self) -> usize {
        self.last.as_ref().map_or(0, |f| f.len()) + self.snapshot.as_ref().map_or(0, |f| f.len())
    }
}

impl TopicEntry {
    /// Sequence number of the oldest frame still in the ring (`seq + 1` when it is empty).
    fn oldest_seq(&self) -> u64 {
        self.seq + 1 - self.ring.len() as u64
    }
}

/// How far a replay got for one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Everything up to the newest message was produced: live delivery can take over.
    CaughtUp,
    /// The byte budget ran out; continue from this sequence number.
    More(u64),
}

pub struct TopicStore {
    /// Topic ids by name, for the per-message lookup (one hash, no split into levels).
    by_name: HashMap<Box<str>, u32>,
    /// The same ids in a trie, for snapshots and replays by pattern.
    ids: TopicTree<u32>,
    topics: Vec<TopicEntry>,
    /// Topic id of every frame in the rings, in arrival order: the eviction order.
    order: VecDeque<u32>,
    ring_bytes: usize,
    max_ring_bytes: usize,
    /// Bytes of retained values (and their snapshot copies), bounded by `max_retained_bytes`.
    retained_bytes: usize,
    max_retained_bytes: usize,
    /// Topics by last update, oldest first: `(id, stamp)`, live while the topic's `updated`
    /// equals the stamp (older entries are skipped, and compacted away in bulk).
    lru: VecDeque<(u32, u64)>,
    next_stamp: u64,
    /// Retained values dropped to keep within `max_retained_bytes`.
    retained_evicted: u64,
}

impl TopicStore {
    pub fn new(max_ring_bytes: usize, max_retained_bytes: usize) -> TopicStore {
        TopicStore {
            retained_bytes: 0,
            max_retained_bytes,
            lru: VecDeque::new(),
            next_stamp: 1,
            retained_evicted: 0,
            by_name: HashMap::default(),
            ids: TopicTree::new(),
            topics: Vec::new(),
            order: VecDeque::new(),
            ring_bytes: 0,
            max_ring_bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }

    pub fn retained_evicted(&self) -> u64 {
        self.retained_evicted
    }

    /// [`TopicStore::ingest_as`] by topic name; returns the topic's id too. For tests: the
    /// engine keeps each topic's id (`owners.rs`) and asks it once.
    #[cfg(test)]
    pub fn ingest(&mut self, publish: &PublishRef<'_>, ingest_ts_ns: u64) -> (SharedFrame, u32) {
        let id = self.topic_id(publish.topic);
        (self.ingest_as(id, publish, ingest_ts_ns), id)
    }

    /// Takes a publish of topic `id` ([`TopicStore::topic_id`] of `publish.topic`) in: next
    /// sequence number, the DATA frame encoded once straight into one shared allocation,
    /// retained and put in the ring. No lookup by name. Returns the shared frame.
    pub fn ingest_as(
        &mut self,
        id: u32,
        publish: &PublishRef<'_>,
        ingest_ts_ns: u64,
    ) -> SharedFrame {
        debug_assert_eq!(self.by_name.get(publish.topic), Some(&id));
        let entry = &mut self.topics[id as usize];
        entry.seq += 1;
        let seq = entry.seq;
        let frame = proto::data_frame_shared(publish, seq, ingest_ts_ns, 0);
        self.retained_bytes -= entry.retained_bytes();
        entry.last = Some(frame.clone());
        entry.snapshot = None;
        self.retained_bytes += frame.len();
        entry.updated = self.next_stamp;
        if self.max_ring_bytes > 0 {
            entry.ring.push_back(frame.clone());
            self.order.push_back(id);
            self.ring_bytes += frame.len();
            self.evict();
        }
        self.lru.push_back((id, self.next_stamp));
        self.next_stamp += 1;
        self.evict_retained();
        frame
    }

    /// The id of `topic`, a new entry (no message yet) if it has none. Ids are dense, from 0,
    /// and name the same topic for the engine's life (the match caches rely on it,
    /// `matches.rs`).
    pub fn topic_id(&mut self, topic: &str) -> u32 {
        if let Some(&id) = self.by_name.get(topic) {
            return id;
        }
        let id = self.topics.len() as u32;
        self.by_name.insert(topic.into(), id);
        self.ids.insert(topic, id);
        self.topics.push(TopicEntry {
            seq: 0,
            last: None,
            snapshot: None,
            ring: VecDeque::new(),
            updated: 0,
            interest: (0, 0),
        });
        id
    }

    /// Takes in a retained value from before the engine restarted (`persist.rs`), a DATA frame
    /// flagged SNAPSHOT and RESTORED with seq 0 (it is only ever sent as a snapshot): the topic's value for snapshots until it is published again,
    /// which numbers from 1 as every topic does in a new run. Not in the ring: a resuming
    /// subscriber's positions belong to this run, and this value is not part of it. A topic
    /// already known keeps what it has.
    pub fn restore(&mut self, topic: &str, frame: RetainedFrame) {
        let id = self.topic_id(topic);
        let entry = &mut self.topics[id as usize];
        if entry.last.is_some() || entry.seq > 0 {
            return;
        }
        self.retained_bytes += frame.len();
        entry.last = Some(frame);
        entry.updated = self.next_stamp;
        self.lru.push_back((id, self.next_stamp));
        self.next_stamp += 1;
        self.evict_retained();
    }

    /// A number that changes whenever a retained value does: the snapshot file is rewritten
    /// only when it moved.
    pub fn retained_version(&self) -> u64 {
        self.next_stamp
    }

    /// Every retained value (one DATA frame per topic that has one, shared, not copied), for the
    /// snapshot file.
    pub fn retained_frames(&self, out: &mut Vec<RetainedFrame>) {
        out.extend(self.topics.iter().filter_map(|e| e.last.clone()));
    }

    /// The fan-out core's per-topic interest cache (`core.rs`): (epoch, shard mask).
    pub fn interest(&mut self, id: u32) -> &mut (u64, u64) {
        &mut self.topics[id as usize].interest
    }

    /// Drops the retained values updated longest ago until the bound holds again.
    fn evict_retained(&mut self) {
        while self.retained_bytes > self.max_retained_bytes {
            let Some((id, stamp)) = self.lru.pop_front() else {
                return;
            };
            let entry = &mut self.topics[id as usize];
            if entry.updated != stamp {
                continue;
            }
            self.retained_bytes -= entry.retained_bytes();
            entry.last = None;
            entry.snapshot = None;
            self.retained_evicted += 1;
        }
        // Superseded entries pile up for topics updated often: drop them once they outnumber
        // the live ones, so the queue stays within twice the topics (amortised O(1) a publish).
        if self.lru.len() > 2 * self.topics.len() + 64 {
            let topics = &self.topics;
            self.lru
                .retain(|&(id, stamp)| topics[id as usize].updated == stamp);
        }
    }

    fn evict(&mut self) {
        while self.ring_bytes > self.max_ring_bytes {
            let Some(id) = self.order.pop_front() else {
                return;
            };
            let oldest = self.topics[id as usize].ring.pop_front();
            self.ring_bytes -= oldest.map_or(0, |f| f.len());
        }
    }

    /// The retained value of every topic matching `pattern`, flagged SNAPSHOT.
    pub fn snapshot(&mut self, pattern: &str, out: &mut Vec<SharedFrame>) {
        let mut ids = Vec::new();
        self.ids.for_each_matching(pattern, |_, &id| ids.push(id));
        for id in ids {
            let entry = &mut self.topics[id as usize];
            let Some(last) = &entry.last else { continue };
            let snap = match &entry.snapshot {
                Some(snap) => snap.clone(),
                // A restored value is flagged as a snapshot already.
                None if entry.seq == 0 => last.clone(),
                None => {
                    let snap: SharedFrame =
                        Arc::from(proto::data_frame_with_flags(last, DATA_FLAG_SNAPSHOT));
                    self.retained_bytes += snap.len();
                    entry.snapshot = Some(snap.clone());
                    snap
                }
            };
            out.push(snap);
        }
        self.evict_retained();
    }

    /// Every message of `topic` from `from_seq` on, up to `budget` bytes (at least one frame).
    /// Messages no longer in the ring are named by a GAP frame first. The frames are the very ones
    /// sent live (shared, not copied): a replayed message is byte-identical to the original.
    pub fn replay(
        &self,
        topic: &str,
        from_seq: u64,
        budget: &mut usize,
        out: &mut Vec<SharedFrame>,
    ) -> Replay {
        let Some(&id) = self.by_name.get(topic) else {
            return Replay::CaughtUp;
        };
        let entry = &self.topics[id as usize];
        let from_seq = from_seq.max(1);
        if from_seq > entry.seq {
            return Replay::CaughtUp;
        }
        let oldest = entry.oldest_seq();
        if from_seq < oldest {
            out.push(gap_frame(topic, from_seq, oldest - 1));
        }
        let start = from_seq.max(oldest);
        for (i, frame) in entry
            .ring
            .iter()
            .enumerate()
            .skip((start - oldest) as usize)
        {
            if *budget < frame.len() && i as u64 > start - oldest {
                return Replay::More(oldest + i as u64);
            }
            *budget = budget.saturating_sub(frame.len());
            out.push(frame.clone());
        }
        Replay::CaughtUp
    }

    /// A resuming subscription: for every topic matching `pattern`, replay from after the
    /// position the client gave (from the first message for topics it did not name). Topics the
    /// budget did not cover are appended to `lagged` with the sequence number to continue from.
    pub fn resume(
        &self,
        pattern: &str,
        positions: &HashMap<String, u64>,
        budget: &mut usize,
        out: &mut Vec<SharedFrame>,
        lagged: &mut Vec<(String, u64)>,
    ) {
        let mut topics = Vec::new();
        self.ids
            .for_each_matching(pattern, |topic, _| topics.push(topic.to_string()));
        for topic in topics {
            // A client resuming a topic from its start (a new run: its positions were dropped)
            // gets the value restored from before the restart, if the topic has no newer one.
            if !positions.contains_key(&topic) {
                if let Some(entry) = self
                    .by_name
                    .get(topic.as_str())
                    .map(|&id| &self.topics[id as usize])
                {
                    if let (0, Some(restored)) = (entry.seq, &entry.last) {
                        *budget = budget.saturating_sub(restored.len());
                        out.push(restored.clone());
                    }
                }
            }
            let from_seq = positions.get(&topic).map_or(1, |last| last + 1);
            if let Replay::More(next) = self.replay(&topic, from_seq, budget, out) {
                lagged.push((topic, next));
            }
        }
    }
}

/// An encoded GAP frame: messages `from_seq ..= to_seq` of `topic` are lost.
pub fn gap_frame(topic: &str, from_seq: u64, to_seq: u64) -> SharedFrame {
    let mut buf = Vec::new();
    proto::encode_control(
        &mut buf,
        &Frame::Gap(Gap {
            topic: topic.to_string(),
            from_seq,
            to_seq,
        }),
    );
    buf.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode_frame, Decoded};

    fn publish(store: &mut TopicStore, topic: &str, payload: &[u8]) -> SharedFrame {
        let p = PublishRef {
            topic,
            source_ts_ns: 7,
            quality: 192,
            payload,
        };
        store.ingest(&p, 9).0
    }

    /// (kind, topic, seq or range) of each frame, for compact assertions.
    fn describe(frames: &[SharedFrame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match decode_frame(f, 1 << 20).unwrap() {
                Decoded::Frame(Frame::Data { header, topic, .. }, _) => {
                    format!("{topic}#{} f{}", header.seq, header.flags)
                }
                Decoded::Frame(Frame::Gap(g), _) => {
                    format!("gap {} {}..={}", g.topic, g.from_seq, g.to_seq)
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn sequences_are_per_topic_and_the_snapshot_is_the_latest() {
        let mut store = TopicStore::new(1 << 20, usize::MAX);
        publish(&mut store, "a/x", b"1");
        publish(&mut store, "a/x", b"2");
        publish(&mut store, "a/y", b"1");
        publish(&mut store, "b", b"1");
        let mut out = Vec::new();
        store.snapshot("a/+", &mut out);
        let mut got = describe(&out);
        got.sort();
        assert_eq!(got, ["a/x#2 f1", "a/y#1 f1"]);
    }

    #[test]
    fn replay_names_evicted_messages_in_a_gap_then_replays_the_rest() {
        let frame_len = publish(&mut TopicStore::new(0, usize::MAX), "t", b"p").len();
        // Room for exactly 3 frames across topics.
        let mut store = TopicStore::new(3 * frame_len, usize::MAX);
        for _ in 0..4 {
            publish(&mut store, "t", b"p");
        }
        publish(&mut store, "u", b"p"); // evicts t#2: ring holds t#3, t#4, u#1
        assert_eq!(store.ring_bytes(), 3 * frame_len);
        let mut out = Vec::new();
        let mut budget = usize::MAX;
        assert_eq!(
            store.replay("t", 1, &mut budget, &mut out),
            Replay::CaughtUp
        );
        assert_eq!(describe(&out), ["gap t 1..=2", "t#3 f0", "t#4 f0"]);
        out.clear();
        assert_eq!(
            store.replay("t", 5, &mut budget, &mut out),
            Replay::CaughtUp
        );
        assert!(out.is_empty());
    }

    #[test]
    fn replay_stops_at_the_budget_and_says_where_to_continue() {
        let mut store = TopicStore::new(1 << 20, usize::MAX);
        let len = (0..10)
            .map(|_| publish(&mut store, "t", b"p").len())
            .last()
            .unwrap();
        let mut out = Vec::new();
        let mut budget = 3 * len;
        assert_eq!(store.replay("t", 2, &mut budget, &mut out), Replay::More(5));
        assert_eq!(describe(&out), ["t#2 f0", "t#3 f0", "t#4 f0"]);
        // At least one frame even when the budget is spent, so a replay always progresses.
        out.clear();
        assert_eq!(store.replay("t", 5, &mut 0, &mut out), Replay::More(6));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn resume_replays_unnamed_topics_from_their_first_message() {
        let mut store = TopicStore::new(1 << 20, usize::MAX);
        for topic in ["a/x", "a/x", "a/y", "a/x"] {
            publish(&mut store, topic, b"p");
        }
        let positions: HashMap<String, u64> = [("a/x".to_string(), 2u64)].into_iter().collect();
        let (mut out, mut lagged) = (Vec::new(), Vec::new());
        store.resume(
            "a/#",
            &positions,
            &mut usize::MAX.clone(),
            &mut out,
            &mut lagged,
        );
        let mut got = describe(&out);
        got.sort();
        assert_eq!(got, ["a/x#3 f0", "a/y#1 f0"]);
        assert!(lagged.is_empty());
    }

    fn restored(topic: &str, payload: &[u8]) -> SharedFrame {
        let p = PublishRef {
            topic,
            source_ts_ns: 7,
            quality: 192,
            payload,
        };
        proto::data_frame_shared(&p, 0, 5, proto::DATA_FLAG_RESTORED | DATA_FLAG_SNAPSHOT)
    }

    #[test]
    fn a_restored_value_is_in_snapshots_until_its_topic_is_published() {
        let mut store = TopicStore::new(1 << 20, usize::MAX);
        let v0 = store.retained_version();
        store.restore("a/x", restored("a/x", b"old"));
        store.restore("a/y", restored("a/y", b"old"));
        assert_ne!(store.retained_version(), v0);
        let mut out = Vec::new();
        store.snapshot("a/+", &mut out);
        let mut got = describe(&out);
        got.sort();
        assert_eq!(got, ["a/x#0 f5", "a/y#0 f5"], "SNAPSHOT | RESTORED, seq 0");
        // Not part of this run's numbering: a resume from the start gets it (a client that
        // found a new engine_id resumes so), one that names the topic does not.
        let (mut replay, mut lagged) = (Vec::new(), Vec::new());
        let mut budget = usize::MAX;
        store.resume(
            "a/#",
            &HashMap::default(),
            &mut budget,
            &mut replay,
            &mut lagged,
        );
        let mut got = describe(&replay);
        got.sort();
        assert_eq!(got, ["a/x#0 f5", "a/y#0 f5"]);
        replay.clear();
        let named: HashMap<String, u64> = [("a/x".to_string(), 0u64)].into_iter().collect();
        store.resume("a/x", &named, &mut budget, &mut replay, &mut lagged);
        assert!(replay.is_empty(), "{:?}", describe(&replay));
        // The first publish numbers from 1 and replaces it.
        assert_eq!(
            proto::data_frame_seq(&publish(&mut store, "a/x", b"new")),
            Some(1)
        );
        out.clear();
        store.snapshot("a/x", &mut out);
        assert_eq!(describe(&out), ["a/x#1 f1"]);
        // A known topic keeps its value.
        store.restore("a/x", restored("a/x", b"older"));
        let mut frames = Vec::new();
        store.retained_frames(&mut frames);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().any(|f| proto::data_frame_seq(f) == Some(1)));
    }

    #[test]
    fn retained_values_are_bounded_and_the_stalest_go_first() {
        let frame_len = publish(&mut TopicStore::new(0, usize::MAX), "t/0", b"p").len();
        let mut store = TopicStore::new(0, 3 * frame_len);
        for t in 0..3 {
            publish(&mut store, &format!("t/{t}"), b"p");
        }
        publish(&mut store, "t/0", b"q"); // t/1 is now the stalest
        publish(&mut store, "t/3", b"p");
        assert_eq!(store.retained_evicted(), 1);
        assert!(store.retained_bytes() <= 3 * frame_len);
        let mut snap = Vec::new();
        store.snapshot("t/+", &mut snap);
        let topics: Vec<&str> = snap
            .iter()
            .map(|f| proto::data_frame_topic(f).unwrap())
            .collect();
        assert!(!topics.contains(&"t/1"), "{topics:?}");
        // The topic's numbering goes on.
        assert_eq!(
            proto::data_frame_seq(&publish(&mut store, "t/1", b"p")),
            Some(2)
        );
        // Many updates of few topics keep the LRU queue within twice the topics.
        for i in 0..10_000 {
            publish(&mut store, &format!("t/{}", i % 4), b"p");
        }
        assert!(store.lru.len() <= 2 * store.len() + 64 + 1);
    }
}
