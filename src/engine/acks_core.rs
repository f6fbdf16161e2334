//! Publisher acknowledgements' side of the core (`acks.rs` holds the per-connection state): a
//! connection's ACK_REQUEST, its numbered PUBLISHes, and the ACK frames, at most one per
//! connection per loop turn (queued by [`FanoutCore::flush`] before it writes), never one per
//! message.

use std::sync::Arc;
use std::time::Instant;

use super::{mark_dirty, FanoutCore};
use crate::engine::acks::{Numbered, PublishAcks};
use crate::engine::outbox::SharedFrame;
use crate::engine::session::Fatal;
use crate::proto::PublishRef;

impl FanoutCore {
    /// ACK_REQUEST on `slot`: acknowledgements on, numbering from `next_seq` (a second request
    /// numbers afresh). The answer is an ACK at the end of the turn.
    pub(super) fn handle_ack_request(&mut self, slot: usize, publisher_id: u64, next_seq: u64) {
        let Some(session) = self.session(slot) else {
            return;
        };
        let position = (!session.client_id.is_empty())
            .then(|| {
                self.shared
                    .clients
                    .publisher_position(&session.client_id, publisher_id)
            })
            .flatten();
        let Some(session) = self.session_mut(slot) else {
            return;
        };
        session.acks = Some(Box::new(PublishAcks::new(next_seq, position)));
        self.mark_ack_dirty(slot);
    }

    /// A PUBLISH of a connection with acknowledgements: numbered, dropped when an earlier
    /// connection of the publisher took it, else handled as any; handled (taken or refused
    /// with an ERROR) counts for the next ACK.
    pub(super) fn handle_acked_publish(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        publish: PublishRef<'_>,
    ) -> Result<(), Fatal> {
        let Some(acks) = self.session_mut(slot).and_then(|s| s.acks.as_deref_mut()) else {
            return self.handle_publish(now, read_ns, slot, publish);
        };
        match acks.numbered() {
            Numbered::Duplicate => {
                self.counters.publish_duplicates += 1;
                self.mark_ack_dirty(slot);
                Ok(())
            }
            Numbered::Take(seq) => {
                self.handle_publish(now, read_ns, slot, publish)?;
                if let Some(acks) = self.session_mut(slot).and_then(|s| s.acks.as_deref_mut()) {
                    acks.handled(seq);
                }
                self.mark_ack_dirty(slot);
                Ok(())
            }
        }
    }

    fn mark_ack_dirty(&mut self, slot: usize) {
        if let Some(acks) = self.session_mut(slot).and_then(|s| s.acks.as_deref_mut()) {
            if !acks.in_dirty {
                acks.in_dirty = true;
                self.ack_dirty.push(slot);
            }
        }
    }

    /// Queues the ACK of every connection that handled PUBLISHes since its last one; those whose
    /// last ACK is still unwritten stay listed for a later turn (a tick comes every 25 ms).
    pub(super) fn queue_acks(&mut self) {
        let mut dirty = std::mem::take(&mut self.ack_dirty);
        dirty.retain(|&slot| {
            let Some(session) = self.session_mut(slot).filter(|s| !s.is_closing()) else {
                return false;
            };
            let Some(acks) = session.acks.as_deref_mut() else {
                return false;
            };
            acks.in_dirty = false;
            if let Err(fatal) = self.queue_ack(slot, false) {
                let now = self.now;
                self.fail(now, slot, fatal);
                return false;
            }
            let Some(acks) = self.session_mut(slot).and_then(|s| s.acks.as_deref_mut()) else {
                return false;
            };
            acks.in_dirty = acks.pending();
            acks.in_dirty
        });
        // Listed while this ran (nothing does today; kept correct if that changes).
        dirty.append(&mut self.ack_dirty);
        self.ack_dirty = dirty;
    }

    /// Queues an ACK for what `slot` has handled, if anything is unacknowledged and (unless
    /// `force`) its last ACK has been written.
    pub(super) fn queue_ack(&mut self, slot: usize, force: bool) -> Result<(), Fatal> {
        let Some(session) = self.session_mut(slot) else {
            return Ok(());
        };
        let Some(seq) = session.acks.as_deref().and_then(|a| a.poll_ack(force)) else {
            return Ok(());
        };
        self.scratch.clear();
        crate::proto::encode_ack(&mut self.scratch, seq);
        let frame: SharedFrame = Arc::from(&self.scratch[..]);
        let session = self
            .sessions
            .get_mut(slot)
            .and_then(Option::as_mut)
            .expect("looked up above");
        session.queue_reply(frame.clone())?;
        if let Some(acks) = session.acks.as_deref_mut() {
            acks.sent(seq, &frame);
        }
        mark_dirty(session, slot, &mut self.dirty);
        self.counters.acks_sent += 1;
        Ok(())
    }
}
