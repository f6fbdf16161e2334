//! A connection's outbound queue: shared encoded frames waiting for the socket.
//!
//! Sans-IO: the reactor asks for [`Outbox::fill_slices`], hands them to one vectored write, and
//! reports the bytes written with [`Outbox::consume`]. A partial write is resumed from the middle
//! of the front frame. The queue is bounded in bytes and in frames; [`Outbox::push`] refuses past
//! either bound and the caller applies the subscription's delivery policy.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

/// One encoded frame, shared by every queue it was delivered to.
pub type SharedFrame = Arc<[u8]>;

#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<SharedFrame>,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// Bytes queued and not yet written.
    queued_bytes: usize,
    max_bytes: usize,
    max_frames: usize,
}

/// Why [`Outbox::push`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    pub fn new(max_bytes: usize, max_frames: usize) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            front_written: 0,
            queued_bytes: 0,
            max_bytes,
            max_frames,
        }
    }

    /// Queues a frame if it fits both bounds.
    pub fn push(&mut self, frame: SharedFrame) -> Result<(), Full> {
        if !self.has_room(frame.len()) {
            return Err(Full);
        }
        self.push_unbounded(frame);
        Ok(())
    }

    /// Queues a frame regardless of the bounds: for the few control frames (WELCOME, SUBACK,
    /// PONG, ERROR) whose count per connection is itself bounded.
    pub fn push_unbounded(&mut self, frame: SharedFrame) {
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Whether a frame of `len` bytes would be accepted by [`Outbox::push`].
    pub fn has_room(&self, len: usize) -> bool {
        self.frames.len() < self.max_frames && self.queued_bytes + len <= self.max_bytes
    }

    /// Below half of both bounds: the point at which overflow state is moved back in.
    pub fn is_below_half(&self) -> bool {
        self.frames.len() * 2 <= self.max_frames && self.queued_bytes * 2 <= self.max_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn queued_frames(&self) -> usize {
        self.frames.len()
    }

    /// Bytes still to write (a partly written front frame counts only its rest).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes - self.front_written
    }

    /// Fills `slices` with the queued bytes in order, at most `max_bytes` in total (at least one
    /// slice if anything is queued). Returns how many slices it filled.
    pub fn fill_slices<'a>(&'a self, slices: &mut [IoSlice<'a>], max_bytes: usize) -> usize {
        let mut n = 0;
        let mut bytes = 0;
        for (i, frame) in self.frames.iter().enumerate() {
            if n == slices.len() || (n > 0 && bytes + frame.len() > max_bytes) {
                break;
            }
            let part = if i == 0 {
                &frame[self.front_written..]
            } else {
                &frame[..]
            };
            slices[n] = IoSlice::new(part);
            bytes += part.len();
            n += 1;
        }
        n
    }

    /// Drops what a write took: `written` bytes from the front.
    pub fn consume(&mut self, written: usize) {
        self.consume_with(written, |_| {});
    }

    /// As [`Outbox::consume`], handing each frame the write completed to `done`.
    pub fn consume_with(&mut self, mut written: usize, mut done: impl FnMut(&[u8])) {
        while written > 0 {
            // The caller reports no more than it was given to write.
            let front_len = self
                .frames
                .front()
                .expect("consume beyond queued bytes")
                .len();
            let rest = front_len - self.front_written;
            if written < rest {
                self.front_written += written;
                return;
            }
            written -= rest;
            self.queued_bytes -= front_len;
            self.front_written = 0;
            if let Some(frame) = self.frames.pop_front() {
                done(&frame);
            }
        }
    }

    /// Drops every queued frame except a partly written front one (which must be finished for
    /// the byte stream to stay framed).
    pub fn discard_unstarted(&mut self) {
        let keep = usize::from(self.front_written > 0);
        self.frames.truncate(keep);
        self.queued_bytes = self.frames.iter().map(|f| f.len()).sum();
    }

    /// The frames queued, front first (tests look at what is shared).
    #[cfg(test)]
    pub fn frames(&self) -> impl Iterator<Item = &SharedFrame> {
        self.frames.iter()
    }

    /// True when the front frame is partly written: nothing may be inserted before it.
    pub fn mid_frame(&self) -> bool {
        self.front_written > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(byte: u8, len: usize) -> SharedFrame {
        vec![byte; len].into()
    }

    fn drain_with_writes(outbox: &mut Outbox, write_sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        for &size in write_sizes.iter().cycle() {
            if outbox.is_empty() {
                break;
            }
            let mut slices = [IoSlice::new(&[]); 4];
            let n = outbox.fill_slices(&mut slices, 1 << 20);
            let mut taken = 0;
            for s in &slices[..n] {
                let take = (size - taken).min(s.len());
                out.extend_from_slice(&s[..take]);
                taken += take;
            }
            outbox.consume(taken);
        }
        out
    }

    #[test]
    fn partial_writes_resume_mid_frame_in_order() {
        let mut outbox = Outbox::new(1 << 20, 100);
        for (i, len) in [3usize, 10, 1, 7, 20].iter().enumerate() {
            outbox.push(frame(i as u8, *len)).unwrap();
        }
        let expected: Vec<u8> = [3usize, 10, 1, 7, 20]
            .iter()
            .enumerate()
            .flat_map(|(i, len)| std::iter::repeat_n(i as u8, *len))
            .collect();
        let got = drain_with_writes(&mut outbox, &[2, 5, 1, 13]);
        assert_eq!(got, expected);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn discard_unstarted_keeps_only_a_partly_written_front_frame() {
        let mut outbox = Outbox::new(1 << 20, 100);
        for i in 0..3 {
            outbox.push(frame(i, 10)).unwrap();
        }
        outbox.discard_unstarted();
        assert!(outbox.is_empty());
        for i in 0..3 {
            outbox.push(frame(i, 10)).unwrap();
        }
        outbox.consume(4);
        outbox.discard_unstarted();
        assert_eq!((outbox.queued_frames(), outbox.queued_bytes()), (1, 6));
        outbox.push(frame(9, 5)).unwrap();
        assert_eq!(
            drain_with_writes(&mut outbox, &[100]),
            [[0u8; 6].as_slice(), &[9; 5]].concat()
        );
    }

    #[test]
    fn bounds_in_bytes_and_frames() {
        let mut outbox = Outbox::new(10, 3);
        outbox.push(frame(1, 6)).unwrap();
        assert_eq!(outbox.push(frame(2, 5)), Err(Full), "byte bound");
        outbox.push(frame(2, 4)).unwrap();
        outbox.push_unbounded(frame(3, 100));
        assert_eq!(outbox.push(frame(4, 0)), Err(Full), "frame bound");
        assert_eq!(outbox.queued_bytes(), 110);
    }

    #[test]
    fn fill_respects_byte_cap_but_always_makes_progress() {
        let mut outbox = Outbox::new(1 << 20, 100);
        outbox.push(frame(1, 100)).unwrap();
        outbox.push(frame(2, 100)).unwrap();
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(outbox.fill_slices(&mut slices, 10), 1);
        assert_eq!(outbox.fill_slices(&mut slices, 150), 1);
        assert_eq!(outbox.fill_slices(&mut slices, 200), 2);
        outbox.consume(150);
        assert!(outbox.mid_frame());
        let mut slices = [IoSlice::new(&[]); 8];
        let n = outbox.fill_slices(&mut slices, 1000);
        assert_eq!((n, slices[0].len()), (1, 50));
    }
}
