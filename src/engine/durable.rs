//! Durable sessions of native clients, engine-wide: what a client id's subscriptions had been
//! delivered, kept after its connection closes, so that its next connection (a reconnect, or a
//! new process with the same id) resumes where it stopped (docs/PROTOCOL.md §8).
//!
//! Opt-in per SUBSCRIBE: the resume list carries the *session marker* (a position with the empty
//! topic and `last_seq = u64::MAX`) and the HELLO named a client id. From then on the connection
//! records, per topic, the last `seq` of a DATA frame (or the `to_seq` of a GAP) **wholly written
//! to its socket** — not queued, not acknowledged: a frame in the kernel's send buffer when the
//! peer dies is counted as delivered, which is the best the engine can know without an
//! acknowledgement, and the closest to what the client actually read (a queued frame that never
//! left would be lost without a GAP if it counted). When the connection closes, its patterns and
//! positions are merged into the id's session (highest `seq` per topic).
//!
//! Design shared with `mqtt_sessions.rs` (and, like it, touched once per SUBSCRIBE with the
//! marker and once per close, never on the data path; the clock is the caller's `now`), with
//! two differences: a session is *read*, not taken, at SUBSCRIBE (two live connections with one
//! id both resume from it and both merge into it when they close: no takeover), and bounds are
//! counted in bytes as well as sessions: `limits.max_durable_sessions` and
//! `limits.max_durable_session_bytes`. A session is forgotten `limits.client_session_expiry_s`
//! after its last connection closed; over a bound, the sessions closed longest ago go first, and
//! a new id is not given a session while every kept one has a live connection.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ahash::HashMap;

use crate::proto::{self, DeliveryMode, Frame, TopicPosition};

pub(crate) use crate::proto::SESSION_MARKER_SEQ;

/// Bytes counted for a kept session besides its strings (map entries, bookkeeping).
const ENTRY_OVERHEAD_BYTES: usize = 64;
/// Bytes counted per pattern or position besides its string.
const ITEM_OVERHEAD_BYTES: usize = 24;

/// What a durable session holds: its subscriptions and, per topic, the last `seq` written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SessionState {
    pub patterns: Vec<(String, DeliveryMode)>,
    pub positions: HashMap<Box<str>, u64>,
}

impl SessionState {
    /// Memory charged to the session against `limits.max_durable_session_bytes`.
    pub(crate) fn bytes(&self) -> usize {
        ENTRY_OVERHEAD_BYTES
            + self
                .patterns
                .iter()
                .map(|(p, _)| p.len() + ITEM_OVERHEAD_BYTES)
                .sum::<usize>()
            + self
                .positions
                .keys()
                .map(|t| t.len() + ITEM_OVERHEAD_BYTES)
                .sum::<usize>()
    }

    /// Takes `other` in: its patterns not already here, and the higher `seq` of each topic.
    fn merge(&mut self, other: SessionState) {
        for (pattern, mode) in other.patterns {
            match self.patterns.iter_mut().find(|(p, _)| *p == pattern) {
                Some(entry) => entry.1 = mode,
                None => self.patterns.push((pattern, mode)),
            }
        }
        for (topic, seq) in other.positions {
            let e = self.positions.entry(topic).or_insert(0);
            *e = (*e).max(seq);
        }
    }

    pub(crate) fn has_pattern(&self, pattern: &str) -> bool {
        self.patterns.iter().any(|(p, _)| p == pattern)
    }

    /// A frame was wholly written to the connection: a DATA frame moves its topic to its `seq`,
    /// a GAP to its `to_seq` (the loss was reported; a resume must not report it again).
    pub(crate) fn handle_written(&mut self, frame: &[u8]) {
        match frame.get(proto::LEN_PREFIX_BYTES) {
            Some(&proto::KIND_DATA) => {
                if let (Some(topic), Some(seq)) =
                    (proto::data_frame_topic(frame), proto::data_frame_seq(frame))
                {
                    self.advance(topic, seq);
                }
            }
            Some(&proto::KIND_GAP) => {
                if let Ok(proto::Decoded::Frame(Frame::Gap(gap), _)) =
                    proto::decode_frame(frame, usize::MAX)
                {
                    self.advance(&gap.topic, gap.to_seq);
                }
            }
            _ => {}
        }
    }

    fn advance(&mut self, topic: &str, seq: u64) {
        match self.positions.get_mut(topic) {
            Some(last) => *last = (*last).max(seq),
            None => {
                self.positions.insert(topic.into(), seq);
            }
        }
    }
}

struct Entry {
    state: SessionState,
    bytes: usize,
    /// Connections of the id that opted in and have not closed.
    live: u32,
    gone_at: Option<Instant>,
}

struct Inner {
    by_id: HashMap<Box<str>, Entry>,
    bytes: usize,
}

/// The durable sessions of the engine; see the module documentation.
pub(crate) struct DurableSessions {
    inner: Mutex<Inner>,
    expiry: Duration,
    max_sessions: usize,
    max_bytes: usize,
}

/// Counts for the stats document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurableCounts {
    pub sessions: usize,
    pub live: usize,
    pub bytes: usize,
}

impl DurableSessions {
    pub(crate) fn new(expiry: Duration, max_sessions: usize, max_bytes: usize) -> Self {
        DurableSessions {
            inner: Mutex::new(Inner {
                by_id: HashMap::default(),
                bytes: 0,
            }),
            expiry,
            max_sessions,
            max_bytes,
        }
    }

    /// A connection of `client_id` opts in. Returns what the session holds (empty for a new
    /// one), or `None` when no session can be given (every kept one is live and a bound is
    /// reached, or the bounds are 0): the connection is then not durable.
    pub(crate) fn attach(&self, client_id: &str, now: Instant) -> Option<SessionState> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep(&mut inner, now);
        if let Some(entry) = inner.by_id.get_mut(client_id) {
            entry.live += 1;
            entry.gone_at = None;
            return Some(entry.state.clone());
        }
        let fresh = SessionState::default();
        let bytes = fresh.bytes() + client_id.len();
        self.make_room(&mut inner, 1, bytes);
        if inner.by_id.len() >= self.max_sessions || inner.bytes + bytes > self.max_bytes {
            return None;
        }
        inner.bytes += bytes;
        inner.by_id.insert(
            client_id.into(),
            Entry {
                state: fresh.clone(),
                bytes,
                live: 1,
                gone_at: None,
            },
        );
        Some(fresh)
    }

    /// A durable connection of `client_id` closed with `state`: merged into the session, which
    /// is kept for `expiry` once no connection of the id is live.
    pub(crate) fn detach(&self, client_id: &str, state: SessionState, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = inner.by_id.get_mut(client_id) else {
            // Evicted while live (cannot happen: live ones are never evicted) or swept.
            return;
        };
        entry.state.merge(state);
        entry.live = entry.live.saturating_sub(1);
        if entry.live == 0 {
            entry.gone_at = Some(now);
        }
        let old = entry.bytes;
        entry.bytes = entry.state.bytes() + client_id.len();
        let new = entry.bytes;
        inner.bytes = inner.bytes - old + new;
        self.sweep(&mut inner, now);
        self.make_room(&mut inner, 0, 0);
    }

    pub(crate) fn counts(&self) -> DurableCounts {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        DurableCounts {
            sessions: inner.by_id.len(),
            live: inner.by_id.values().filter(|e| e.live > 0).count(),
            bytes: inner.bytes,
        }
    }

    fn sweep(&self, inner: &mut Inner, now: Instant) {
        let expiry = self.expiry;
        let mut freed = 0;
        inner.by_id.retain(|_, e| {
            let keep = e
                .gone_at
                .is_none_or(|gone| now.saturating_duration_since(gone) < expiry);
            if !keep {
                freed += e.bytes;
            }
            keep
        });
        inner.bytes -= freed;
    }

    /// Drops the sessions closed longest ago until `extra_sessions` and `extra_bytes` more fit
    /// (or no closed one is left).
    fn make_room(&self, inner: &mut Inner, extra_sessions: usize, extra_bytes: usize) {
        while inner.by_id.len() + extra_sessions > self.max_sessions
            || inner.bytes + extra_bytes > self.max_bytes
        {
            let oldest = inner
                .by_id
                .iter()
                .filter_map(|(id, e)| e.gone_at.map(|at| (at, id)))
                .min()
                .map(|(_, id)| id.clone());
            let Some(id) = oldest else { return };
            if let Some(e) = inner.by_id.remove(&id) {
                inner.bytes -= e.bytes;
            }
        }
    }
}

/// Whether a SUBSCRIBE's resume list carries the session marker.
pub(crate) fn has_session_marker(resume: &[TopicPosition]) -> bool {
    resume
        .iter()
        .any(|p| p.topic.is_empty() && p.last_seq == SESSION_MARKER_SEQ)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(topic: &str, seq: u64) -> SessionState {
        let mut s = SessionState {
            patterns: vec![("a/#".into(), DeliveryMode::All)],
            ..Default::default()
        };
        s.positions.insert(topic.into(), seq);
        s
    }

    #[test]
    fn a_session_is_kept_after_close_and_expires() {
        let t0 = Instant::now();
        let d = DurableSessions::new(Duration::from_secs(10), 100, 1 << 20);
        assert_eq!(d.attach("c", t0), Some(SessionState::default()));
        d.detach("c", state("a/b", 3), t0);
        assert_eq!(
            d.attach("c", t0 + Duration::from_secs(9)),
            Some(state("a/b", 3))
        );
        d.detach("c", state("a/b", 2), t0 + Duration::from_secs(9));
        assert_eq!(d.counts().sessions, 1);
        assert_eq!(
            d.attach("c", t0 + Duration::from_secs(18)),
            Some(state("a/b", 3)),
            "merged: the higher seq wins"
        );
        d.detach("c", SessionState::default(), t0 + Duration::from_secs(18));
        assert_eq!(
            d.attach("c", t0 + Duration::from_secs(28)),
            Some(SessionState::default()),
            "expired: a new one"
        );
    }

    #[test]
    fn live_sessions_never_expire_nor_are_evicted() {
        let t0 = Instant::now();
        let d = DurableSessions::new(Duration::from_secs(1), 2, 1 << 20);
        d.attach("a", t0);
        d.attach("b", t0);
        assert_eq!(
            d.attach("c", t0 + Duration::from_secs(5)),
            None,
            "both live"
        );
        d.detach("a", state("t", 1), t0 + Duration::from_secs(5));
        assert!(
            d.attach("c", t0 + Duration::from_secs(5)).is_some(),
            "a evicted"
        );
        assert_eq!(d.counts().sessions, 2);
        assert_eq!(d.counts().live, 2);
    }

    #[test]
    fn bounded_in_bytes_the_oldest_closed_dropped_first() {
        let t0 = Instant::now();
        let d = DurableSessions::new(Duration::from_secs(100), 1000, 2000);
        for i in 0..100u64 {
            let id = format!("c{i}");
            let now = t0 + Duration::from_millis(i);
            d.attach(&id, now);
            d.detach(&id, state(&"x".repeat(200), i), now);
        }
        let counts = d.counts();
        assert!(counts.bytes <= 2000, "{counts:?}");
        assert!(counts.sessions >= 2, "{counts:?}");
        assert_eq!(
            d.attach("c99", t0 + Duration::from_secs(1)).map(|s| s
                .positions
                .values()
                .copied()
                .collect::<Vec<_>>()),
            Some(vec![99]),
            "the newest kept"
        );
        assert_eq!(
            d.attach("c0", t0 + Duration::from_secs(1)),
            Some(Default::default())
        );
    }

    #[test]
    fn written_frames_move_positions() {
        let mut s = SessionState::default();
        let mut buf = Vec::new();
        proto::encode_frame(
            &mut buf,
            &Frame::Gap(proto::Gap {
                topic: "t".into(),
                from_seq: 1,
                to_seq: 7,
            }),
        );
        s.handle_written(&buf);
        assert_eq!(s.positions.get("t"), Some(&7));
        s.handle_written(&[0, 0, 0, 1, proto::KIND_PING]);
        assert_eq!(s.positions.len(), 1);
    }
}
