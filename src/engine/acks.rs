//! Publisher acknowledgements (docs/PROTOCOL.md §5.8): a connection that sent ACK_REQUEST has
//! its PUBLISHes numbered (the publisher's own sequence, from the request's `next_seq` on) and
//! is told, cumulatively, how far the engine has handled them: one ACK frame per loop turn at
//! most, never one per message.
//!
//! "Handled" is the promise MQTT's PUBACK makes (`mqtt_core.rs`): the core has validated the
//! PUBLISH and taken it (ingested, when this shard owns the topic, or put in this turn's batch
//! for the owner shard, which leaves in order and is never dropped), or refused it with an
//! ERROR that precedes the ACK. It means "in the engine's memory", not "on disk".
//!
//! Duplicates: the highest number taken is kept per client id and publisher id
//! ([`PublisherPosition`], in the client id's entry of `clients.rs`, so bounded and forgotten
//! with it). A later connection of the same publisher that resends what an earlier one had
//! already handed over (the ACK was lost with the connection) has those PUBLISHes dropped and
//! acknowledged: exactly once within one run of the engine. An engine restart forgets the
//! positions, so what a killed engine had taken but not acknowledged comes again: at least once
//! across restarts.
//!
//! A plain value, fed "a PUBLISH arrived" and "it was handled"; the core decides when to send.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// The highest publisher sequence number the engine handled for one publisher of a client id,
/// shared by its connections (a new connection reads it, every connection raises it).
#[derive(Debug)]
pub(crate) struct PublisherPosition {
    pub publisher_id: u64,
    taken: AtomicU64,
}

impl PublisherPosition {
    pub(crate) fn new(publisher_id: u64) -> PublisherPosition {
        PublisherPosition {
            publisher_id,
            taken: AtomicU64::new(0),
        }
    }

    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    fn raise(&self, seq: u64) {
        self.taken.fetch_max(seq, Ordering::AcqRel);
    }
}

/// What the core does with a PUBLISH of an acknowledged connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Numbered {
    /// Handle it; it is message `seq` of the publisher.
    Take(u64),
    /// An earlier connection of this publisher handed it over already: drop it.
    Duplicate,
}

/// One connection's acknowledgement state.
#[derive(Debug)]
pub(crate) struct PublishAcks {
    /// The number of the next PUBLISH read.
    next_seq: u64,
    /// PUBLISHes numbered up to this were handled on an earlier connection: duplicates.
    duplicate_through: u64,
    /// Everything up to this is handled.
    handled: u64,
    /// The highest number an ACK has been queued for; `None` before the first (which always
    /// goes, to answer the ACK_REQUEST).
    acked: Option<u64>,
    /// The last ACK queued (not kept alive by this: the outbox's count tells if it is written).
    last_ack: Option<Weak<[u8]>>,
    position: Option<Arc<PublisherPosition>>,
    /// Listed in the core's list of connections with an ACK to send.
    pub in_dirty: bool,
}

impl PublishAcks {
    /// Acknowledgements from message `next_seq` on (at least 1); `position` is the client id's
    /// record of this publisher, `None` without a client id (no duplicate detection).
    pub(crate) fn new(next_seq: u64, position: Option<Arc<PublisherPosition>>) -> PublishAcks {
        let before = next_seq.saturating_sub(1);
        let remembered = position.as_ref().map_or(0, |p| p.taken());
        PublishAcks {
            next_seq,
            duplicate_through: remembered,
            // Nothing before `next_seq` is the engine's concern; what an earlier connection
            // took, the publisher may forget too.
            handled: before.max(remembered),
            acked: None,
            last_ack: None,
            position,
            in_dirty: false,
        }
    }

    /// A PUBLISH was read: its number, or that it is a duplicate (which counts as handled).
    pub(crate) fn numbered(&mut self) -> Numbered {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        if seq <= self.duplicate_through {
            return Numbered::Duplicate;
        }
        Numbered::Take(seq)
    }

    /// Message `seq` was handled (taken, or refused with an ERROR).
    pub(crate) fn handled(&mut self, seq: u64) {
        self.handled = self.handled.max(seq);
        if let Some(p) = &self.position {
            p.raise(seq);
        }
    }

    /// Something handled is not acknowledged yet.
    pub(crate) fn pending(&self) -> bool {
        self.acked.is_none_or(|acked| self.handled > acked)
    }

    /// The number to acknowledge now, if any: not while the last ACK is still unwritten (one
    /// in the outbox at a time, so a publisher that does not read costs one frame), unless
    /// `force` (an ACK must precede a PONG).
    pub(crate) fn poll_ack(&self, force: bool) -> Option<u64> {
        if !self.pending() {
            return None;
        }
        // Strong holders of a queued ACK: the outbox and the reply list; once written, at most
        // the reply list.
        if !force && self.last_ack.as_ref().is_some_and(|w| w.strong_count() > 1) {
            return None;
        }
        Some(self.handled)
    }

    /// An ACK for `seq` was queued as `frame`.
    pub(crate) fn sent(&mut self, seq: u64, frame: &Arc<[u8]>) {
        self.acked = Some(seq);
        self.last_ack = Some(Arc::downgrade(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_next_seq_and_acknowledges_cumulatively() {
        let mut a = PublishAcks::new(5, None);
        assert_eq!(
            a.poll_ack(false),
            Some(4),
            "the first ACK says where numbering starts"
        );
        let frame: Arc<[u8]> = Arc::from(&b"ack"[..]);
        a.sent(4, &frame);
        assert_eq!(a.poll_ack(false), None);
        assert_eq!(a.numbered(), Numbered::Take(5));
        assert_eq!(a.numbered(), Numbered::Take(6));
        a.handled(5);
        a.handled(6);
        assert_eq!(a.poll_ack(false), Some(6));
    }

    #[test]
    fn an_unwritten_ack_holds_the_next_back_unless_forced() {
        let mut a = PublishAcks::new(1, None);
        let frame: Arc<[u8]> = Arc::from(&b"ack"[..]);
        let in_outbox = frame.clone();
        a.sent(0, &frame);
        let Numbered::Take(seq) = a.numbered() else {
            panic!()
        };
        a.handled(seq);
        assert_eq!(a.poll_ack(false), None, "the last ACK is still queued");
        assert_eq!(a.poll_ack(true), Some(1));
        drop(in_outbox);
        assert_eq!(a.poll_ack(false), Some(1), "written: the next may go");
    }

    #[test]
    fn a_later_connection_of_the_same_publisher_drops_what_was_taken() {
        let position = Arc::new(PublisherPosition::new(7));
        let mut first = PublishAcks::new(1, Some(position.clone()));
        for _ in 0..3 {
            let Numbered::Take(seq) = first.numbered() else {
                panic!()
            };
            first.handled(seq);
        }
        // The connection died before its ACK: the publisher resends from 2.
        let mut second = PublishAcks::new(2, Some(position.clone()));
        assert_eq!(second.poll_ack(false), Some(3));
        assert_eq!(second.numbered(), Numbered::Duplicate);
        assert_eq!(second.numbered(), Numbered::Duplicate);
        assert_eq!(second.numbered(), Numbered::Take(4));
        assert_eq!(position.taken(), 3);
    }
}
