//! A connection's read buffer: bytes read from the socket and not yet used by the core.
//!
//! Sans-IO: the reactor reads into [`ReadBuf::spare`], reports how many bytes came with
//! [`ReadBuf::filled`], hands [`ReadBuf::data`] to the core and drops what it used with
//! [`ReadBuf::consume`]. Memory follows what a peer actually sends, not what it announces:
//! - a connection holds no buffer until it reads, and one of [`INITIAL_BYTES`] from its reactor's
//!   [`BufPool`] while it reads; the buffer doubles when a read fills it, up to [`BUSY_BYTES`],
//!   so a busy publisher gets large reads;
//! - a buffer that never grew goes back to the pool whenever it is drained (every frame read
//!   was whole), so an idle connection holds no buffer at all: 10,000 idle subscribers cost
//!   4 KiB each less (`tests/faults.rs`), and a light sender (PONGs, a SUBSCRIBE, one PUBLISH
//!   per write) takes and gives back the same pooled buffer, without allocating;
//! - a frame larger than the buffer makes it grow only by doubling as the frame's bytes arrive,
//!   never past the frame's announced length (itself checked against the frame limit), so a peer
//!   that announces a 1 MiB frame and trickles it costs about twice what it has sent;
//! - once drained, a buffer grown past [`BUSY_BYTES`] shrinks back.

/// A new connection's buffer.
pub(crate) const INITIAL_BYTES: usize = 4 * 1024;
/// Largest size reached by doubling on full reads (larger only for a large frame).
pub(crate) const BUSY_BYTES: usize = 64 * 1024;
/// Drained buffers a reactor's pool keeps for the next reads (256 KiB); more are freed.
pub(crate) const POOL_BUFFERS: usize = 64;

/// A reactor's spare read buffers of [`INITIAL_BYTES`], lent to connections while they read.
#[derive(Debug, Default)]
pub(crate) struct BufPool {
    free: Vec<Vec<u8>>,
}

impl BufPool {
    fn take(&mut self) -> Vec<u8> {
        self.free.pop().unwrap_or_else(|| vec![0; INITIAL_BYTES])
    }

    fn give(&mut self, buf: Vec<u8>) {
        if self.free.len() < POOL_BUFFERS && buf.len() == INITIAL_BYTES {
            self.free.push(buf);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.free.len()
    }
}

/// Starts without a buffer: one comes from the pool at the first read.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Room offered by the last [`ReadBuf::spare`], and whether the read filled it all (the
    /// peer had more to send: a busy sender).
    offered: usize,
    last_read_full: bool,
}

impl ReadBuf {
    /// Bytes read and not yet used.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Room to read into, made first if the buffer is full (see the module docs). `needed` is
    /// the total length of the frame at the start of [`ReadBuf::data`], when its prefix is
    /// there and it is within the frame limit. A connection without a buffer takes one from
    /// `pool`.
    pub(crate) fn spare(&mut self, needed: Option<usize>, pool: &mut BufPool) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = pool.take();
        }
        if self.end == self.buf.len() {
            self.make_room(needed);
        }
        self.offered = self.buf.len() - self.end;
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`ReadBuf::spare`].
    pub(crate) fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.last_read_full = n == self.offered;
        self.end += n;
    }

    /// The core used `n` bytes from the front of [`ReadBuf::data`]. A drained buffer that
    /// never grew goes back to `pool`.
    pub(crate) fn consume(&mut self, n: usize, pool: &mut BufPool) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > BUSY_BYTES {
                self.buf.truncate(BUSY_BYTES);
                self.buf.shrink_to_fit();
            } else if self.buf.len() == INITIAL_BYTES {
                pool.give(std::mem::take(&mut self.buf));
            }
        }
    }

    /// The socket had nothing more (the read would block): a drained buffer that never grew
    /// goes back to `pool` (the read that found nothing took it from there).
    pub(crate) fn rest(&mut self, pool: &mut BufPool) {
        if self.start == self.end && self.buf.len() == INITIAL_BYTES {
            pool.give(std::mem::take(&mut self.buf));
        }
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn make_room(&mut self, needed: Option<usize>) {
        let pending = self.end - self.start;
        // A partial frame moves to the front.
        self.buf.copy_within(self.start..self.end, 0);
        self.start = 0;
        self.end = pending;
        let len = self.buf.len();
        let grown = if pending == len {
            // One frame larger than the buffer: double towards its length as it arrives.
            needed
                .filter(|&need| need > len)
                .map_or(len, |need| (len * 2).min(need))
        } else if self.last_read_full && len < BUSY_BYTES {
            // A busy sender: larger reads, up to the busy size.
            (len * 2).min(BUSY_BYTES)
        } else {
            len
        };
        self.buf.resize(grown, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(b: &mut ReadBuf, bytes: &[u8], needed: Option<usize>) -> usize {
        let spare = b.spare(needed, &mut BufPool::default());
        let n = spare.len().min(bytes.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        b.filled(n);
        n
    }

    #[test]
    fn starts_small_and_doubles_on_full_reads_up_to_the_busy_size() {
        let mut b = ReadBuf::default();
        assert_eq!(b.capacity(), 0, "no buffer before the first read");
        let chunk = vec![1u8; 1 << 20];
        let mut sizes = Vec::new();
        for _ in 0..8 {
            let n = read(&mut b, &chunk, None);
            b.consume(n - 1, &mut BufPool::default()); // a partial frame stays behind each time
            sizes.push(b.capacity());
        }
        assert_eq!(*sizes.last().unwrap(), BUSY_BYTES);
        assert!(sizes.windows(2).all(|w| w[1] >= w[0]));
    }

    #[test]
    fn an_announced_frame_is_not_allocated_before_its_bytes_arrive() {
        let mut b = ReadBuf::default();
        let need = 1 << 20;
        let mut received = 0;
        // The peer trickles its 1 MiB frame: memory tracks what came, not what was announced.
        for _ in 0..100 {
            received += read(&mut b, &[7u8; 1000], Some(need));
            assert!(
                b.capacity() <= 2 * received.max(INITIAL_BYTES),
                "{}",
                b.capacity()
            );
        }
        // The whole frame fits once it is all there, and not more.
        while received < need {
            received += read(&mut b, &vec![7u8; need - received], Some(need));
        }
        assert_eq!(b.data().len(), need);
        assert!(b.capacity() <= need);
        b.consume(need, &mut BufPool::default());
        assert!(b.capacity() <= BUSY_BYTES, "shrinks back once drained");
    }

    #[test]
    fn a_partial_frame_moves_to_the_front_in_order() {
        let mut b = ReadBuf::default();
        let bytes: Vec<u8> = (0..INITIAL_BYTES).map(|i| i as u8).collect();
        read(&mut b, &bytes, None);
        b.consume(INITIAL_BYTES - 10, &mut BufPool::default());
        read(&mut b, &[0xee; 5], None);
        assert_eq!(&b.data()[..10], &bytes[INITIAL_BYTES - 10..]);
        assert_eq!(&b.data()[10..], &[0xee; 5]);
        assert_eq!(
            b.capacity(),
            2 * INITIAL_BYTES,
            "a full read grows the buffer once"
        );
    }

    #[test]
    fn an_idle_connection_holds_no_buffer_and_light_reads_reuse_the_pool() {
        let mut pool = BufPool::default();
        let mut b = ReadBuf::default();
        // A SUBSCRIBE, then a PONG now and then: each read is used whole.
        for frame in [&[1u8; 60][..], &[2u8; 13][..], &[3u8; 13][..]] {
            let spare = b.spare(None, &mut pool);
            spare[..frame.len()].copy_from_slice(frame);
            b.filled(frame.len());
            assert_eq!(b.data(), frame);
            b.consume(frame.len(), &mut pool);
            assert_eq!(b.capacity(), 0, "drained: the buffer is back in the pool");
            assert_eq!(pool.len(), 1, "one buffer, taken and given back");
            // The reactor reads until the socket would block: that read takes the buffer again.
            b.spare(None, &mut pool);
            assert_eq!(pool.len(), 0);
            b.rest(&mut pool);
            assert_eq!((b.capacity(), pool.len()), (0, 1));
        }
        // A partial frame keeps the buffer until it is whole.
        let spare = b.spare(None, &mut pool);
        spare[..3].copy_from_slice(&[9, 0, 0]);
        b.filled(3);
        b.consume(0, &mut pool);
        assert_eq!((b.capacity(), pool.len()), (INITIAL_BYTES, 0));
        b.consume(3, &mut pool);
        assert_eq!((b.capacity(), pool.len()), (0, 1));
    }

    #[test]
    fn a_grown_buffer_is_kept_and_the_pool_is_bounded() {
        let mut pool = BufPool::default();
        let mut b = ReadBuf::default();
        read(&mut b, &[5u8; INITIAL_BYTES], None);
        b.consume(INITIAL_BYTES - 1, &mut pool);
        read(&mut b, &[5u8; 100], None);
        assert_eq!(
            b.capacity(),
            2 * INITIAL_BYTES,
            "a busy sender's buffer grew"
        );
        let n = b.data().len();
        b.consume(n, &mut pool);
        assert_eq!(
            b.capacity(),
            2 * INITIAL_BYTES,
            "and stays while it is busy"
        );
        assert_eq!(pool.len(), 0, "only buffers of the initial size are pooled");
        for _ in 0..POOL_BUFFERS + 10 {
            pool.give(vec![0; INITIAL_BYTES]);
        }
        assert_eq!(pool.len(), POOL_BUFFERS);
    }
}
