//! Pacing: a publisher faster than the healthy `all` subscribers its messages feed is slowed,
//! not shed into GAPs (docs/ARCHITECTURE.md, "Pacing").
//!
//! Two roles, each a plain value a shard keeps, linked by a per-topic [`Gate`]:
//! - the *subscriber's* shard: a connection whose queue passes `delivery.pace_window_bytes`
//!   while an `all` subscription takes a topic's frames (or whose frames of it wait for a
//!   replay) *holds* that topic ([`Holds`]); the shard counts holders per topic
//!   ([`PaceBook::hold`]), closes the topic's gate with its first and opens it with its last,
//!   and then tells every shard the topic may flow again (`CoreMsg::Resume`);
//! - the *publisher's* shard: a connection that publishes to a topic whose gate is closed is
//!   not read again ([`PaceBook::pause`]) until the gate opens. Its unread bytes wait in its
//!   read buffer, then in the kernel's, and TCP slows the gateway.
//!
//! The gate is an atomic rather than a message because a message waits for the publisher's
//! reactor to drain its inbox: on a loaded machine that took up to 40 ms, in which a publisher
//! at full speed sends megabytes. What the publisher's shard has already sent on is bounded by
//! what one reactor may leave in another's inbox (`reactor::MAX_IN_FLIGHT_BYTES`); the queue
//! past the pace window absorbs it. Resuming may take a message: it only costs throughput, and
//! every `core::TICK` a paused connection whose gate is open is resumed regardless.
//!
//! A holder lets go when its queue drains below half the window, when it closes, and by the
//! release rule ([`Holds::release_due`]): its socket took nothing for `delivery.stall_ms`, or
//! it held for `delivery.pace_release_ms` without once draining. A released connection paces no
//! one until its queue is empty again; meanwhile its mode applies as before pacing existed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{HashMap, HashSet};

/// A topic's pacing gate, shared by every shard (it lives in the owner table): bit i set while
/// a connection on shard i holds the topic back. A publisher's shard reads it with each publish
/// (one relaxed load beside the owner lookup), so a hold takes effect at the publisher's next
/// message, not after a round of messages between reactors.
pub(crate) type Gate = Arc<AtomicU64>;

/// Why a holder was released by the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Its socket took nothing for `stall_ms`.
    Stalled(Duration),
    /// It held publishers back for `pace_release_ms` without once draining.
    Behind(Duration),
}

impl std::fmt::Display for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Release::Stalled(d) => write!(f, "its socket took nothing for {} ms", d.as_millis()),
            Release::Behind(d) => write!(
                f,
                "it held publishers back for {} ms without draining",
                d.as_millis()
            ),
        }
    }
}

/// One subscriber connection's part: the topics it holds back.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    /// Held topics.
    topics: HashSet<String>,
    /// Since when it has held something without draining below half the window.
    since: Option<Instant>,
    /// Released by the rule: holds nothing until its queue has emptied.
    pub released: bool,
}

impl Holds {
    pub(crate) fn is_holding(&self) -> bool {
        self.since.is_some()
    }

    pub(crate) fn holds(&self, topic: &str) -> bool {
        !self.topics.is_empty() && self.topics.contains(topic)
    }

    /// Starts holding `topic`. `true` if this is the connection's first hold, so its release
    /// deadline must be armed.
    pub(crate) fn add(&mut self, now: Instant, topic: &str) -> bool {
        self.topics.insert(topic.to_string());
        let first = self.since.is_none();
        if first {
            self.since = Some(now);
        }
        first
    }

    /// Lets go of everything held, returning the topics.
    pub(crate) fn take(&mut self) -> impl Iterator<Item = String> {
        self.since = None;
        std::mem::take(&mut self.topics).into_iter()
    }

    /// When the release rule would next apply, given the last time the socket took bytes.
    pub(crate) fn deadline(
        &self,
        last_sent: Instant,
        stall: Duration,
        release: Duration,
    ) -> Option<Instant> {
        let since = self.since?;
        Some((since.max(last_sent) + stall).min(since + release))
    }

    /// The release rule at `now`: `Some` if the connection must stop pacing.
    pub(crate) fn release_due(
        &self,
        now: Instant,
        last_sent: Instant,
        stall: Duration,
        release: Duration,
    ) -> Option<Release> {
        let since = self.since?;
        let quiet = now.saturating_duration_since(since.max(last_sent));
        let held = now.saturating_duration_since(since);
        if quiet >= stall {
            Some(Release::Stalled(quiet))
        } else if held >= release {
            Some(Release::Behind(held))
        } else {
            None
        }
    }
}

/// A connection the shard does not read, and the gate it waits for.
#[derive(Debug)]
struct Paused {
    slot: usize,
    conn_id: u64,
    topic: String,
    gate: Gate,
}

/// One shard's pacing book: its holders per topic and the connections it stopped reading.
#[derive(Debug)]
pub(crate) struct PaceBook {
    /// This shard's bit in the gates.
    bit: u64,
    /// Topics held by this shard's connections: the gate, and how many connections hold it.
    held: HashMap<String, (Gate, u32)>,
    paused: Vec<Paused>,
    resumed: Vec<usize>,
}

impl PaceBook {
    pub(crate) fn new(shard: u16) -> PaceBook {
        PaceBook {
            bit: 1u64 << shard,
            held: HashMap::default(),
            paused: Vec::new(),
            resumed: Vec::new(),
        }
    }

    /// One more local holder of `topic`: the first closes its gate for this shard.
    pub(crate) fn hold(&mut self, topic: &str, gate: Gate) {
        let entry = self.held.entry(topic.to_string()).or_insert((gate, 0));
        entry.1 += 1;
        if entry.1 == 1 {
            entry.0.fetch_or(self.bit, Ordering::SeqCst);
        }
    }

    /// One holder fewer: the last opens the gate for this shard. `true` if the gate is now
    /// open for every shard: the topic's paused publishers may be resumed.
    pub(crate) fn unhold(&mut self, topic: &str) -> bool {
        let Some(entry) = self.held.get_mut(topic) else {
            return false;
        };
        entry.1 -= 1;
        if entry.1 > 0 {
            return false;
        }
        let Some((gate, _)) = self.held.remove(topic) else {
            return false;
        };
        gate.fetch_and(!self.bit, Ordering::SeqCst) == self.bit
    }

    /// Topics held by this shard's connections.
    #[cfg(test)]
    pub(crate) fn held_topics(&self) -> usize {
        self.held.len()
    }

    /// Stops reading connection `slot` (id `conn_id`) until `topic`'s gate opens.
    pub(crate) fn pause(&mut self, slot: usize, conn_id: u64, topic: &str, gate: Gate) {
        self.paused.push(Paused {
            slot,
            conn_id,
            topic: topic.to_string(),
            gate,
        });
    }

    /// `topic`'s gate opened (or `None`: any gate, the periodic check): the connections
    /// waiting for an open gate are readable again.
    pub(crate) fn handle_resume(&mut self, topic: Option<&str>) {
        let resumed = &mut self.resumed;
        self.paused.retain(|p| {
            let open = topic.is_none_or(|t| t == p.topic) && p.gate.load(Ordering::SeqCst) == 0;
            if open {
                resumed.push(p.slot);
            }
            !open
        });
    }

    /// The connection in `slot` closed: it waits for nothing any more.
    pub(crate) fn forget(&mut self, slot: usize, conn_id: u64) {
        self.paused
            .retain(|p| !(p.slot == slot && p.conn_id == conn_id));
    }

    /// Connections paused now.
    pub(crate) fn paused_connections(&self) -> usize {
        self.paused.len()
    }

    /// A connection whose gate opened since the last call: the driver reads it again.
    pub(crate) fn poll_resumed(&mut self) -> Option<usize> {
        self.resumed.pop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_gate_closes_with_a_shards_first_holder_and_opens_with_the_last_shards_last() {
        let gate = Gate::default();
        let (mut a, mut b) = (PaceBook::new(0), PaceBook::new(1));
        a.hold("t", gate.clone());
        a.hold("t", gate.clone());
        b.hold("t", gate.clone());
        assert_eq!(gate.load(Ordering::SeqCst), 0b11);
        assert_eq!(a.held_topics(), 1);
        assert!(!a.unhold("t"));
        assert!(!a.unhold("t"), "shard 1 still holds it");
        assert_eq!(gate.load(Ordering::SeqCst), 0b10);
        assert!(b.unhold("t"), "open for every shard");
        assert!(!b.unhold("t"), "an unknown topic is not underflowed");
        assert_eq!(gate.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_resume_frees_only_connections_whose_gate_is_open() {
        let (ga, gb) = (Gate::default(), Gate::default());
        ga.store(1, Ordering::SeqCst);
        gb.store(1, Ordering::SeqCst);
        let mut book = PaceBook::new(0);
        book.pause(3, 30, "a", ga.clone());
        book.pause(4, 40, "b", gb.clone());
        book.pause(5, 50, "a", ga.clone());
        book.forget(5, 50);
        book.handle_resume(Some("a"));
        assert_eq!(
            book.poll_resumed(),
            None,
            "closed again before the resume arrived"
        );
        ga.store(0, Ordering::SeqCst);
        gb.store(0, Ordering::SeqCst);
        book.handle_resume(Some("a"));
        assert_eq!(book.poll_resumed(), Some(3));
        assert_eq!(book.poll_resumed(), None);
        assert_eq!(book.paused_connections(), 1);
        // The periodic check finds the open gate the message did not name.
        book.handle_resume(None);
        assert_eq!(book.poll_resumed(), Some(4));
        assert_eq!(book.paused_connections(), 0);
    }

    #[test]
    fn a_stalled_holder_is_released_after_stall_and_a_slow_one_after_release() {
        let t0 = Instant::now();
        let (stall, release) = (250 * MS, 5000 * MS);
        let mut holds = Holds::default();
        assert_eq!(holds.deadline(t0, stall, release), None);
        assert!(holds.add(t0, "a"));
        assert!(!holds.add(t0 + MS, "b"));
        assert!(holds.holds("a") && !holds.holds("c"));
        // Stalled: nothing written since before the hold.
        assert_eq!(holds.deadline(t0, stall, release), Some(t0 + stall));
        assert_eq!(holds.release_due(t0 + 249 * MS, t0, stall, release), None);
        assert_eq!(
            holds.release_due(t0 + stall, t0, stall, release),
            Some(Release::Stalled(stall))
        );
        // Slow but live: written to every 100 ms, never drained; released at 5 s.
        let now = t0 + 4900 * MS;
        assert_eq!(holds.release_due(now, now - 100 * MS, stall, release), None);
        let now = t0 + release;
        assert_eq!(
            holds.release_due(now, now - 100 * MS, stall, release),
            Some(Release::Behind(release))
        );
        let taken: Vec<_> = holds.take().collect();
        assert_eq!(taken.len(), 2);
        assert!(!holds.is_holding());
    }
}
