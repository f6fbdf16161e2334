//! The publisher's side of acknowledgements (docs/PROTOCOL.md §5.8): the PUBLISH frames the
//! engine has not confirmed yet, numbered, bounded in bytes, resent after a reconnect.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};

/// Unconfirmed PUBLISH frames, oldest first, as encoded (one copy each).
#[derive(Debug)]
pub(crate) struct Unconfirmed {
    /// Names this publisher to the engine: random per `Publisher`, so another process with the
    /// same client id is never taken for this one.
    pub publisher_id: u64,
    pub max_bytes: usize,
    /// `bytes[head..]` holds the frames; the front is dropped lazily.
    bytes: Vec<u8>,
    head: usize,
    /// Each frame's length, oldest first; the first is message `next_seq - lens.len()`.
    lens: VecDeque<usize>,
    /// The number the next PUBLISH gets (from 1).
    next_seq: u64,
    /// The engine confirmed every message up to this.
    pub confirmed: u64,
}

impl Unconfirmed {
    pub(crate) fn new(max_bytes: usize) -> Unconfirmed {
        Unconfirmed {
            publisher_id: RandomState::new().hash_one(super::now_ns()),
            max_bytes,
            bytes: Vec::new(),
            head: 0,
            lens: VecDeque::new(),
            next_seq: 1,
            confirmed: 0,
        }
    }

    /// Bytes kept.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.len() - self.head
    }

    pub(crate) fn frames(&self) -> usize {
        self.lens.len()
    }

    /// Whether a frame of `len` more bytes fits (one always does when nothing is kept).
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.lens.is_empty() || self.bytes() + len <= self.max_bytes
    }

    /// The number of the oldest unconfirmed message: where an ACK_REQUEST starts numbering
    /// before the resend.
    pub(crate) fn first_seq(&self) -> u64 {
        self.next_seq - self.lens.len() as u64
    }

    /// Keeps a copy of one encoded PUBLISH frame.
    pub(crate) fn push(&mut self, frame: &[u8]) {
        self.bytes.extend_from_slice(frame);
        self.lens.push_back(frame.len());
        self.next_seq += 1;
    }

    /// The frames to resend, in order.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.bytes[self.head..]
    }

    /// The engine handled everything up to `seq`: drop those frames.
    pub(crate) fn confirm(&mut self, seq: u64) {
        while self.first_seq() <= seq {
            let Some(len) = self.lens.pop_front() else {
                break;
            };
            self.head += len;
        }
        self.confirmed = self.confirmed.max(seq.min(self.next_seq - 1));
        if self.lens.is_empty() {
            self.bytes.clear();
            self.head = 0;
        } else if self.head > self.bytes.len() / 2 {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_numbered_dropped_when_confirmed_and_bounded() {
        let mut u = Unconfirmed::new(10);
        assert!(u.has_room(100), "one frame always fits");
        u.push(b"aaaa");
        u.push(b"bbb");
        assert!(u.has_room(3) && !u.has_room(4));
        u.push(b"cc");
        assert_eq!((u.first_seq(), u.frames(), u.bytes()), (1, 3, 9));
        u.confirm(2);
        assert_eq!(u.pending(), b"cc");
        assert_eq!((u.first_seq(), u.confirmed), (3, 2));
        // An old ACK changes nothing; one past what was sent confirms only what was.
        u.confirm(1);
        assert_eq!(u.confirmed, 2);
        u.confirm(99);
        assert_eq!(
            (u.frames(), u.bytes(), u.confirmed, u.first_seq()),
            (0, 0, 3, 4)
        );
    }
}
