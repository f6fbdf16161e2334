//! The reactor's multicast sockets: one UDP socket per channel, connected to the group, and the
//! syscall that sends a turn's datagrams (`sendmmsg`: one call for up to [`MAX_BATCH`]
//! datagrams of a channel, instead of one `send` each). The datagrams themselves come from the
//! core (`mcast_core.rs`), which knows nothing of sockets.
//!
//! UDP GSO is not used: it cuts one buffer into equal segments, and a turn's datagrams have
//! the sizes their frames give them (padding them would cost the bytes GSO saves).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};

use super::core::FanoutCore;
use crate::config::Config;

/// Datagrams per `sendmmsg` call.
pub(crate) const MAX_BATCH: usize = 64;
/// Datagrams sent per loop turn: the rest waits for the next turn (bounded work).
const MAX_PER_TURN: usize = 1024;

/// Counters only the driver sees.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct McastIoCounters {
    /// sendmmsg / send calls made.
    pub syscalls: u64,
    /// Datagrams the kernel refused (a full socket buffer, no route): receivers NAK them.
    pub send_errors: u64,
}

pub(crate) struct McastSockets {
    sockets: Vec<UdpSocket>,
    batch: Vec<(u16, Arc<[u8]>)>,
    use_sendmmsg: bool,
    /// Per channel.
    pub counters: Vec<McastIoCounters>,
}

/// One channel's figures on one reactor, for the stats document (`ShardStats::mcast`).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct McastChannelStats {
    pub sender: crate::mcast::SenderCounters,
    pub io: McastIoCounters,
}

impl McastChannelStats {
    /// The figures of the stats document's `multicast` list, by name.
    pub(crate) fn fields(&self) -> [(&'static str, u64); 15] {
        let s = &self.sender;
        [
            ("datagrams_sent", s.datagrams_sent),
            ("bytes_sent", s.bytes_sent),
            ("heartbeats", s.heartbeats),
            ("naks_received", s.naks_received),
            ("nak_datagrams", s.nak_datagrams),
            ("unicast_repairs", s.unicast_repairs),
            ("multicast_repairs", s.multicast_repairs),
            ("naks_suppressed", s.naks_suppressed),
            ("unrecoverable", s.unrecoverable),
            ("oversized_frames", s.oversized_frames),
            ("injected_drops", s.injected_drops),
            ("rate_dropped", s.rate_dropped),
            ("send_syscalls", self.io.syscalls),
            ("send_errors", self.io.send_errors),
            ("naks_refused", s.naks_refused),
        ]
    }
}

impl McastSockets {
    /// One socket per configured channel; `None` when there is none.
    pub(crate) fn open(config: &Config) -> io::Result<Option<McastSockets>> {
        let channels = &config.multicast.channels;
        if channels.is_empty() {
            return Ok(None);
        }
        let mut sockets = Vec::new();
        for c in channels {
            let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            socket.set_multicast_if_v4(&c.interface)?;
            socket.set_multicast_ttl_v4(c.ttl)?;
            // Receivers on this host (and the tests' namespace) hear the group too, unless the
            // channel says none run here.
            socket.set_multicast_loop_v4(c.loopback)?;
            socket.set_send_buffer_size(4 << 20)?;
            socket.set_nonblocking(true)?;
            let group = SocketAddr::V4(SocketAddrV4::new(c.group, c.port));
            socket.connect(&group.into())?;
            sockets.push(socket.into());
        }
        Ok(Some(McastSockets {
            sockets,
            batch: Vec::with_capacity(MAX_BATCH),
            use_sendmmsg: true,
            counters: vec![McastIoCounters::default(); channels.len()],
        }))
    }

    /// Hands this reactor's socket counters to the stats document.
    pub(crate) fn publish_stats(&self, stats: &std::sync::Mutex<Vec<McastChannelStats>>) {
        let Ok(mut all) = stats.lock() else {
            return;
        };
        all.resize(self.counters.len(), McastChannelStats::default());
        for (slot, io) in all.iter_mut().zip(&self.counters) {
            slot.io = *io;
        }
    }

    /// Sends what the core has for the groups now, at most [`MAX_PER_TURN`] datagrams.
    pub(crate) fn send(&mut self, core: &mut FanoutCore, now: Instant, unix_ns: u64) {
        let mut sent = 0;
        while sent < MAX_PER_TURN {
            self.batch.clear();
            while self.batch.len() < MAX_BATCH {
                match core.poll_datagram(now, unix_ns) {
                    Some(d) => self.batch.push(d),
                    None => break,
                }
            }
            if self.batch.is_empty() {
                return;
            }
            sent += self.batch.len();
            let batch = std::mem::take(&mut self.batch);
            let mut start = 0;
            while start < batch.len() {
                let ch = batch[start].0;
                let end = start + batch[start..].iter().take_while(|(c, _)| *c == ch).count();
                self.send_run(ch, &batch[start..end]);
                start = end;
            }
            self.batch = batch;
        }
    }

    /// Datagrams of one channel.
    fn send_run(&mut self, ch: u16, run: &[(u16, Arc<[u8]>)]) {
        let (Some(socket), Some(counters)) = (
            self.sockets.get(ch as usize),
            self.counters.get_mut(ch as usize),
        ) else {
            return;
        };
        let mut at = 0;
        while at < run.len() {
            // One datagram left: `send` is cheaper than a `sendmmsg` of one (2.6-2.8 µs vs
            // 2.9-3.4 µs on the reference machine, bench/RESULTS.md), and one per turn is the
            // common case at plant rates.
            if self.use_sendmmsg && run.len() - at > 1 {
                counters.syscalls += 1;
                match sendmmsg(socket, &run[at..]) {
                    Ok(n) if n > 0 => at += n,
                    Ok(_) => {
                        counters.send_errors += (run.len() - at) as u64;
                        return;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        self.use_sendmmsg = false;
                    }
                    Err(_) => {
                        // The first datagram failed (a full buffer): it is in the ring, and
                        // receivers will NAK it. Try the rest.
                        counters.send_errors += 1;
                        at += 1;
                    }
                }
            } else {
                counters.syscalls += 1;
                if socket.send(&run[at].1).is_err() {
                    counters.send_errors += 1;
                }
                at += 1;
            }
        }
    }
}

/// `sendmmsg(2)` on a connected socket: how many of `run` the kernel took.
pub(super) fn sendmmsg(socket: &UdpSocket, run: &[(u16, Arc<[u8]>)]) -> io::Result<usize> {
    let n = run.len().min(MAX_BATCH);
    let mut iovs: [libc::iovec; MAX_BATCH] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_BATCH];
    // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths); the fields used are
    // set below.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: run[i].1.as_ptr() as *mut libc::c_void,
            iov_len: run[i].1.len(),
        };
    }
    for i in 0..n {
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs[..n]` point at `iovs[..n]`, which point at datagrams `run` keeps alive
    // for the call; the kernel only reads them (a send). The socket is connected, so no
    // address is needed.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}
