//! A subscriber that receives carried topics by UDP multicast (docs/PROTOCOL.md §12).
//!
//! Its TCP session brings the channel list, the retained snapshot, STREAM_POS, the REPAIRs of
//! what the group lost, and the live messages of topics no channel carries; the group brings
//! the rest. The ordering, NAK timing and stitching are [`McastReceiver`]'s (sans-IO); this
//! file only owns the sockets.
//!
//! Contract: as [`super::Subscriber`], poll with [`McastSubscriber::next_event`] at least
//! every half keep-alive (the polls send PINGs and NAKs). Unlike it, this one does not
//! reconnect: a broken session ends with `Err` (a multicast receiver that reconnects would
//! need its streams' positions again; not built yet).

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::conn::{frame_name, Conn, Fill, MAX_INBOUND_FRAME_BYTES};
use super::{deadline_after, ping_interval, ClientError, ClientOptions, Event, Message};
use crate::mcast::{
    patterns_overlap, McastReceiver, ReceiverConfig, ReceiverCounters, ReceiverEvent,
};
use crate::proto::{
    decode_frame, encode_control, encode_ping, encode_pong, validate_pattern, ChannelInfo, Decoded,
    DeliveryMode, Frame, Mcast, Subscribe, DATA_FLAG_RESTORED, DATA_FLAG_SNAPSHOT,
};

/// Default receive buffer per channel socket: 4 MiB holds about 2,800 full datagrams, 280 ms
/// of a 10,000-datagram/s channel.
pub const DEFAULT_RECV_BUFFER_BYTES: usize = 4 << 20;

/// Settings of a multicast receiver beyond [`ClientOptions`].
#[derive(Debug, Clone)]
pub struct McastOptions {
    /// Address of the interface to join the groups on (`0.0.0.0`: the route's).
    pub interface: Ipv4Addr,
    pub recv_buffer_bytes: usize,
    /// Random NAK delay ceiling and the retry interval.
    pub nak_delay: Duration,
    pub nak_retry: Duration,
}

impl Default for McastOptions {
    fn default() -> Self {
        McastOptions {
            interface: Ipv4Addr::UNSPECIFIED,
            recv_buffer_bytes: DEFAULT_RECV_BUFFER_BYTES,
            nak_delay: Duration::from_millis(5),
            nak_retry: Duration::from_millis(60),
        }
    }
}

/// Counters of a [`McastSubscriber`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct McastCounters {
    pub receiver: ReceiverCounters,
    /// Datagrams the kernel dropped because a channel socket's receive buffer was full
    /// (SO_RXQ_OVFL), summed over the channels.
    pub recv_buffer_overflows: u64,
    /// Messages received over TCP (snapshot values, topics no channel carries).
    pub tcp_messages: u64,
}

struct Channel {
    socket: UdpSocket,
    /// The kernel's cumulative drop count for this socket, last seen.
    drops: u32,
}

/// See the module doc.
pub struct McastSubscriber {
    conn: Conn,
    channels: Vec<Channel>,
    receiver: McastReceiver,
    pending: VecDeque<Event>,
    awaiting_subacks: usize,
    out: Vec<u8>,
    naks: Vec<crate::proto::Nak>,
    datagram: Vec<u8>,
    nonce: u64,
    counters: McastCounters,
    keepalive: Duration,
}

impl McastSubscriber {
    /// Connects, learns the channels, joins those that can carry `patterns`, subscribes, and
    /// returns once every SUBACK arrived.
    pub fn connect(
        opts: ClientOptions,
        mcast: McastOptions,
        patterns: Vec<String>,
        mode: DeliveryMode,
    ) -> Result<McastSubscriber, ClientError> {
        for p in &patterns {
            validate_pattern(p, opts.max_topic_bytes).map_err(|source| ClientError::Pattern {
                pattern: p.clone(),
                source,
            })?;
        }
        let mut conn = Conn::open(&opts, opts.read_buffer_bytes)?;
        let engine_id = conn.welcome.engine_id;
        let keepalive = ping_interval(conn.welcome.keepalive_ms);
        let mut out = Vec::new();
        encode_control(&mut out, &Frame::Multicast(Mcast::ChannelsRequest));
        conn.send(&out)?;
        out.clear();
        let infos = await_channels(&mut conn, opts.connect_timeout)?;
        let mut channels = Vec::new();
        for info in infos.iter().filter(|c| {
            patterns
                .iter()
                .any(|p| c.patterns.iter().any(|q| patterns_overlap(p, q)))
        }) {
            channels.push(join(info, &mcast)?);
        }
        let repair = !matches!(mode, DeliveryMode::Latest);
        let mut receiver = McastReceiver::new(ReceiverConfig {
            engine_id,
            nak_delay: mcast.nak_delay,
            nak_retry: mcast.nak_retry,
            repair,
            max_buffered: 65_536,
            seed: super::now_ns() ^ u64::from(std::process::id()),
        });
        for (i, p) in patterns.iter().enumerate() {
            receiver.add_pattern(p);
            receiver.hold();
            encode_control(
                &mut out,
                &Frame::Subscribe(Subscribe {
                    sub_id: i as u32 + 1,
                    pattern: p.clone(),
                    mode,
                    resume: Vec::new(),
                }),
            );
        }
        conn.send(&out)?;
        out.clear();
        let mut sub = McastSubscriber {
            conn,
            channels,
            receiver,
            pending: VecDeque::new(),
            awaiting_subacks: patterns.len(),
            out,
            naks: Vec::new(),
            datagram: vec![0; 65_536],
            nonce: 0,
            counters: McastCounters::default(),
            keepalive,
        };
        let deadline = Instant::now() + opts.connect_timeout;
        while sub.awaiting_subacks > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Handshake(format!(
                    "no SUBACK within {:?}",
                    opts.connect_timeout
                )));
            }
            sub.turn(deadline.min(now + Duration::from_millis(50)))?;
        }
        Ok(sub)
    }

    /// The engine's WELCOME on the TCP session.
    pub fn welcome(&self) -> &crate::proto::Welcome {
        &self.conn.welcome
    }

    /// The channels joined (their group sockets).
    pub fn channels_joined(&self) -> usize {
        self.channels.len()
    }

    pub fn counters(&self) -> McastCounters {
        McastCounters {
            receiver: self.receiver.counters,
            ..self.counters
        }
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` if none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let deadline = deadline_after(Instant::now(), timeout);
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            // At least one round, reading without waiting, even with a zero timeout.
            self.turn(deadline)?;
            if self.pending.is_empty() && Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }

    /// The first joined group's socket, for a caller that waits on many receivers with its own
    /// epoll (readable: a datagram waits; poll [`McastSubscriber::next_event`] with a zero
    /// timeout then, and at least every few milliseconds for NAKs and the TCP session).
    pub fn group_fd(&self) -> Option<std::os::fd::RawFd> {
        self.channels.first().map(|c| c.socket.as_raw_fd())
    }

    /// One round: read what is there (group sockets, TCP), send NAKs and PINGs, then wait for
    /// input until `deadline` or the next NAK or PING.
    fn turn(&mut self, deadline: Instant) -> Result<(), ClientError> {
        self.read_groups()?;
        self.read_tcp()?;
        let now = Instant::now();
        self.naks.clear();
        self.receiver.poll_naks(now, &mut self.naks);
        for nak in self.naks.drain(..) {
            encode_control(&mut self.out, &Frame::Multicast(Mcast::Nak(nak)));
        }
        if now >= self.conn.last_send + self.keepalive {
            self.nonce += 1;
            encode_ping(&mut self.out, self.nonce);
        }
        if !self.out.is_empty() {
            self.conn.send(&self.out)?;
            self.out.clear();
        }
        if !self.pending.is_empty() || Instant::now() >= deadline {
            return Ok(());
        }
        let mut wake = deadline.min(self.conn.last_send + self.keepalive);
        if let Some(at) = self.receiver.poll_timeout() {
            wake = wake.min(at);
        }
        self.wait(wake.saturating_duration_since(Instant::now()))
    }

    /// Waits until a socket is readable or `timeout` passes.
    fn wait(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let mut fds: Vec<libc::pollfd> = self
            .channels
            .iter()
            .map(|c| c.socket.as_raw_fd())
            .chain(std::iter::once(self.conn.raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the
        // call; poll only writes their `revents`.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        Ok(())
    }

    fn read_groups(&mut self) -> Result<(), ClientError> {
        for i in 0..self.channels.len() {
            loop {
                let (n, drops) =
                    match recv_counting_drops(&self.channels[i].socket, &mut self.datagram) {
                        Ok(r) => r,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.into()),
                    };
                if let Some(d) = drops {
                    let ch = &mut self.channels[i];
                    self.counters.recv_buffer_overflows += u64::from(d.wrapping_sub(ch.drops));
                    ch.drops = d;
                }
                self.receiver
                    .handle_datagram(Instant::now(), &self.datagram[..n], false);
                self.take_receiver_events();
            }
        }
        Ok(())
    }

    fn read_tcp(&mut self) -> Result<(), ClientError> {
        loop {
            match self.conn.fill(None)? {
                Fill::Eof => {
                    return Err(ClientError::ConnectionLost {
                        lost_frames: 0,
                        cause: "the engine closed the connection".into(),
                    })
                }
                Fill::WouldBlock => return Ok(()),
                Fill::Data => self.decode_tcp()?,
            }
        }
    }

    fn decode_tcp(&mut self) -> Result<(), ClientError> {
        let mut used = 0;
        while let Decoded::Frame(frame, n) =
            decode_frame(&self.conn.pending()[used..], MAX_INBOUND_FRAME_BYTES)?
        {
            used += n;
            let now = Instant::now();
            match frame {
                Frame::Data {
                    header,
                    topic,
                    payload,
                } => {
                    self.receiver.handle_snapshot(topic, header.seq);
                    self.counters.tcp_messages += 1;
                    self.pending.push_back(Event::Message(Message {
                        topic: topic.to_string(),
                        seq: header.seq,
                        source_ts_ns: header.source_ts_ns,
                        ingest_ts_ns: header.ingest_ts_ns,
                        quality: header.quality,
                        snapshot: header.flags & DATA_FLAG_SNAPSHOT != 0,
                        restored: header.flags & DATA_FLAG_RESTORED != 0,
                        payload: payload.to_vec(),
                    }));
                }
                Frame::SubAck(_) => {
                    self.awaiting_subacks = self.awaiting_subacks.saturating_sub(1);
                    self.receiver.unhold();
                }
                Frame::Gap(g) => self.pending.push_back(Event::Gap {
                    topic: g.topic,
                    from_seq: g.from_seq,
                    to_seq: g.to_seq,
                }),
                Frame::Ping { nonce } => encode_pong(&mut self.out, nonce),
                Frame::Pong { .. } => {}
                Frame::Multicast(Mcast::StreamPos(pos)) => {
                    self.receiver.handle_stream_pos(now, pos)
                }
                Frame::Multicast(Mcast::Repair(d)) => self.receiver.handle_datagram(now, d, true),
                Frame::Multicast(Mcast::RepairGone(g)) => self.receiver.handle_gone(g),
                Frame::Error(e) => {
                    self.conn.consume(used);
                    return Err(ClientError::Engine {
                        code: e.code,
                        reason: e.reason,
                    });
                }
                other => {
                    let name = frame_name(&other);
                    self.conn.consume(used);
                    return Err(ClientError::Handshake(format!("unexpected {name} frame")));
                }
            }
            self.take_receiver_events();
        }
        self.conn.consume(used);
        Ok(())
    }

    fn take_receiver_events(&mut self) {
        while let Some(e) = self.receiver.poll_event() {
            match e {
                ReceiverEvent::Data(bytes) => {
                    if let Ok(Decoded::Frame(
                        Frame::Data {
                            header,
                            topic,
                            payload,
                        },
                        _,
                    )) = decode_frame(&bytes, bytes.len())
                    {
                        self.pending.push_back(Event::Message(Message {
                            topic: topic.to_string(),
                            seq: header.seq,
                            source_ts_ns: header.source_ts_ns,
                            ingest_ts_ns: header.ingest_ts_ns,
                            quality: header.quality,
                            snapshot: false,
                            restored: false,
                            payload: payload.to_vec(),
                        }));
                    }
                }
                ReceiverEvent::Gap {
                    topic,
                    from_seq,
                    to_seq,
                } => self.pending.push_back(Event::Gap {
                    topic,
                    from_seq,
                    to_seq,
                }),
            }
        }
    }
}

fn await_channels(conn: &mut Conn, budget: Duration) -> Result<Vec<ChannelInfo>, ClientError> {
    let deadline = Instant::now() + budget;
    loop {
        let step = match decode_frame(conn.pending(), MAX_INBOUND_FRAME_BYTES)? {
            Decoded::Frame(Frame::Multicast(Mcast::Channels(c)), n) => Some((Ok(c.channels), n)),
            Decoded::Frame(Frame::Ping { .. }, n) => {
                conn.consume(n);
                continue;
            }
            Decoded::Frame(Frame::Error(e), n) => Some((
                Err(ClientError::Engine {
                    code: e.code,
                    reason: e.reason,
                }),
                n,
            )),
            Decoded::Frame(other, n) => Some((
                Err(ClientError::Handshake(format!(
                    "expected CHANNELS, got {}",
                    frame_name(&other)
                ))),
                n,
            )),
            Decoded::NeedMore(_) => None,
        };
        if let Some((result, n)) = step {
            conn.consume(n);
            return result;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Handshake(format!(
                "no CHANNELS within {budget:?}"
            )));
        }
        if conn.fill(Some(deadline - now))? == Fill::Eof {
            return Err(ClientError::Handshake(
                "the engine closed the connection before CHANNELS (an engine without multicast?)"
                    .into(),
            ));
        }
    }
}

/// A socket bound to the group's port and joined to the group.
fn join(info: &ChannelInfo, opts: &McastOptions) -> Result<Channel, ClientError> {
    let group: Ipv4Addr = info
        .group
        .parse()
        .map_err(|_| ClientError::Handshake(format!("CHANNELS named group {:?}", info.group)))?;
    if !group.is_multicast() {
        return Err(ClientError::Handshake(format!(
            "CHANNELS named {group}, not a multicast group"
        )));
    }
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Several receivers on one host share the port.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_recv_buffer_size(opts.recv_buffer_bytes)?;
    enable_drop_count(&socket)?;
    // Bound to the group address: datagrams of other groups on this port are not delivered here.
    socket.bind(&SocketAddrV4::new(group, info.port).into())?;
    socket.join_multicast_v4(&group, &opts.interface)?;
    socket.set_nonblocking(true)?;
    Ok(Channel {
        socket: socket.into(),
        drops: 0,
    })
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

/// One datagram into `buf`, and the socket's drop count if the kernel attached it.
fn recv_counting_drops(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, Option<u32>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsg holding a u32, 8-aligned.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (which points at `buf`) and `control`, all live and
    // writable for their stated lengths during the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut drops = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // `msg_controllen`; the data of an SO_RXQ_OVFL cmsg is one u32 (read unaligned).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SO_RXQ_OVFL {
                drops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const u32));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, drops))
}
