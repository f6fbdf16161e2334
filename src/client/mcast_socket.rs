//! The multicast receiver's syscalls: joining a group (socket2), SO_RXQ_OVFL, and `recvmmsg`
//! into a caller-owned batch of datagram buffers. The only `unsafe` of the receiver.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Datagrams one `recvmmsg` takes at most.
pub(super) const RECV_BATCH: usize = 16;
/// The largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Control bytes per datagram: one cmsg holding a u32 (SO_RXQ_OVFL), 8-aligned, with room.
const CONTROL_WORDS: usize = 8;

/// A socket bound to the group's port and joined to the group, non-blocking: what every
/// [`super::McastSubscriber`] channel reads (also `lanpush-bench mcast-floor`'s receivers, so
/// the floor's sockets are set up as the engine's receivers' are).
pub fn join(
    group: Ipv4Addr,
    port: u16,
    interface: Ipv4Addr,
    recv_buffer_bytes: usize,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Several receivers on one host share the port.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(recv_buffer_bytes)?;
    enable_drop_count(&socket)?;
    // Bound to the group address: datagrams of other groups on this port are not delivered here.
    socket.bind(&SocketAddrV4::new(group, port).into())?;
    socket.join_multicast_v4(&group, &interface)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// SO_RXQ_OVFL: each datagram comes with the socket's cumulative count of datagrams dropped
/// for want of buffer room.
fn enable_drop_count(socket: &Socket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One received datagram of a [`RecvBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Received {
    pub len: usize,
    /// The socket's cumulative drop count, if the kernel attached it.
    pub drops: Option<u32>,
    /// Longer than the slot: cut (the receiver ignores it; NAKs repair it).
    pub truncated: bool,
}

/// [`RECV_BATCH`] datagram buffers filled by one `recvmmsg`. It holds no pointers between
/// calls (the `mmsghdr`s are built on the stack per call), so it is `Send`.
pub(super) struct RecvBatch {
    slot_bytes: usize,
    bufs: Vec<u8>,
    control: Vec<[u64; CONTROL_WORDS]>,
    got: [Received; RECV_BATCH],
}

impl RecvBatch {
    /// Slots of `datagram_bytes` (the largest the channels send), clamped to a UDP payload.
    pub(super) fn new(datagram_bytes: usize) -> RecvBatch {
        let slot_bytes = datagram_bytes.clamp(1, MAX_UDP_PAYLOAD);
        RecvBatch {
            slot_bytes,
            bufs: vec![0; slot_bytes * RECV_BATCH],
            control: vec![[0; CONTROL_WORDS]; RECV_BATCH],
            got: [Received {
                len: 0,
                drops: None,
                truncated: false,
            }; RECV_BATCH],
        }
    }

    /// Datagram `i` of the last [`RecvBatch::recv`] (`i` below what it returned).
    pub(super) fn datagram(&self, i: usize) -> (&[u8], Received) {
        let got = self.got[i];
        let start = i * self.slot_bytes;
        (&self.bufs[start..start + got.len.min(self.slot_bytes)], got)
    }

    /// Reads up to [`RECV_BATCH`] datagrams without waiting: how many came (`WouldBlock` when
    /// none waited).
    pub(super) fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        // SAFETY: all-zero iovec and mmsghdr are valid values of these plain C structs.
        let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        for (i, (iov, msg)) in iovs.iter_mut().zip(msgs.iter_mut()).enumerate() {
            iov.iov_base = self.bufs[i * self.slot_bytes..].as_mut_ptr() as *mut libc::c_void;
            iov.iov_len = self.slot_bytes;
            msg.msg_hdr.msg_control = self.control[i].as_mut_ptr() as *mut libc::c_void;
            msg.msg_hdr.msg_controllen = std::mem::size_of::<[u64; CONTROL_WORDS]>() as _;
        }
        for (iov, msg) in iovs.iter_mut().zip(msgs.iter_mut()) {
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs` holds RECV_BATCH headers, each pointing at its own iovec (a disjoint
        // `slot_bytes` range of `bufs`) and its own control array, all live and writable for
        // the call; no timeout pointer.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (msg, got) in msgs.iter().zip(self.got.iter_mut()).take(n) {
            let mut drops = None;
            // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within the
            // `msg_controllen` it set; the data of an SO_RXQ_OVFL cmsg is one u32 (read
            // unaligned).
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg.msg_hdr);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SO_RXQ_OVFL
                    {
                        drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const u32));
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg.msg_hdr, cmsg);
                }
            }
            *got = Received {
                len: msg.msg_len as usize,
                drops,
                truncated: msg.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            };
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// recvmmsg over a unicast loopback pair: several datagrams in one call, each whole, a
    /// longer one marked truncated, then WouldBlock.
    #[test]
    fn recvmmsg_takes_a_batch_and_marks_truncation() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(8);
        assert_eq!(
            batch.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        for i in 0..3u8 {
            tx.send(&[i; 5]).unwrap();
        }
        tx.send(&[9; 12]).unwrap();
        let n = batch.recv(&rx).unwrap();
        assert_eq!(n, 4);
        for i in 0..3 {
            let (bytes, got) = batch.datagram(i);
            assert_eq!(bytes, &[i as u8; 5]);
            assert!(!got.truncated);
        }
        let (bytes, got) = batch.datagram(3);
        assert_eq!(bytes, &[9; 8]);
        assert!(got.truncated);
        assert_eq!(
            batch.recv(&rx).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
