//! One reactor thread: the only code that holds file descriptors. A mio `Poll` over its share
//! of the connections (and, on reactor 0, the listener), a timerfd for microsecond deadlines,
//! and the inbox from the other reactors; everything else is the sans-IO [`FanoutCore`].
//!
//! Each loop turn: poll (sleeping until the core's next deadline when idle), accept, read each
//! readable connection into the core, take the inbox, run the core's deadlines, flush the core's
//! outboxes to the sockets, drop the connections the core closed, send the core's messages to
//! the other reactors. Every turn does bounded work: at most `MAX_EVENTS` readiness events,
//! `MAX_ACCEPTS` accepts, `READ_BUDGET_BYTES` per connection, `MAX_INBOX_MSGS` messages and
//! `MAX_INBOX_FRAMES` frames from the inbox; whatever is left is resumed on the next turn
//! without sleeping.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::core::{CoreMsg, FanoutCore, Transport, Verdict};
use super::native::{self, Reply};
use super::notify::{Inbox, Mailbox};
use super::readbuf::{BufPool, ReadBuf};
use super::stats::StatsJob;
use super::timer::DeadlineTimer;
use super::tls_link::{Plain, TlsIoError, TlsLink};
use super::verifier::VerifyJob;
use super::wire::WireKind;
use super::ws_link::{LinkInput, WsLink};
use super::{now_unix_ns, EngineShared};
use crate::config::Config;
use crate::proto::{self, error_code};

pub(crate) const WAKER_TOKEN: Token = Token(usize::MAX - 1);
const LISTENER_TOKEN: Token = Token(usize::MAX - 2);
const TIMER_TOKEN: Token = Token(usize::MAX - 3);
const MQTT_LISTENER_TOKEN: Token = Token(usize::MAX - 4);
const WS_LISTENER_TOKEN: Token = Token(usize::MAX - 5);
const TLS_LISTENER_TOKEN: Token = Token(usize::MAX - 6);
const TLS_MQTT_LISTENER_TOKEN: Token = Token(usize::MAX - 7);

/// Readiness events taken per `poll` call.
const MAX_EVENTS: usize = 1024;
/// Bytes read from one connection per loop turn before moving on to the others. Small enough
/// that one turn's fan-out leaves every subscriber's frames for a single vectored write.
const READ_BUDGET_BYTES: usize = 64 * 1024;
/// Cross-shard messages handled per loop turn, and frames (in publish and delivery batches):
/// whichever bound is reached first ends the turn's share of the inbox.
const MAX_INBOX_MSGS: usize = 256;
const MAX_INBOX_FRAMES: usize = 16 * 1024;
/// Bytes of messages a reactor lets wait in one peer's inbox before it stops reading its own
/// connections until the peer catches up. Bounds what is in flight between reactors, so that a
/// subscriber's queue overshoots the pace window (`delivery.pace_window_bytes`) by at most about
/// this much while its publisher is being paused.
pub(crate) const MAX_IN_FLIGHT_BYTES: usize = 1024 * 1024;
/// Longest sleep while reads are held back for a peer reactor whose inbox is full.
const THROTTLE_NAP: Duration = Duration::from_micros(200);
/// Connections accepted per loop turn; the rest of the backlog is taken on the next turns.
const MAX_ACCEPTS: usize = 256;
/// After an accept failed for lack of descriptors or memory, wait this long before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a closed WebSocket connection's socket is kept, after its close frame, for the
/// peer's close: dropping it at once would turn the peer's own close frame into a reset (mqtt.js
/// reports EPIPE after its DISCONNECT).
const WS_LINGER: Duration = Duration::from_secs(1);
/// Longest sleep of a draining reactor between two looks at its inbox and sockets.
const DRAIN_NAP: Duration = Duration::from_millis(2);

/// Messages into a reactor: connections (which only the driver may hold) and the core's
/// messages.
pub(crate) enum ShardMsg {
    /// A connection accepted by reactor 0, now owned by the receiver.
    NewConn {
        stream: TcpStream,
        conn_id: u64,
        wire: WireKind,
        /// Accepted by the WebSocket listener.
        ws: bool,
        /// Accepted on a TLS listener: the receiver runs the handshake.
        tls: bool,
    },
    /// A core message from a `LocalPublisher` or the stats thread.
    Core(CoreMsg),
    /// A core message from a peer reactor, counted in the receiver's `inbox_bytes`.
    Peer(CoreMsg),
    /// The stats thread asks for this reactor's report: its histograms posted to the metrics
    /// board, and its connections as `lanpush stats` shows them (`FanoutCore::report`).
    Report(crossbeam_channel::Sender<Vec<serde_json::Value>>),
    /// The persist thread asks for this reactor's retained values, unless they are still at
    /// `version` (`persist.rs`).
    Retained {
        shard: usize,
        version: Option<u64>,
        reply: crossbeam_channel::Sender<super::persist::RetainedAnswer>,
    },
    /// A reloaded configuration (SIGHUP), restart-only keys unchanged.
    Reload(Arc<Config>),
    Shutdown,
}

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Native,
    Mqtt,
    /// WebSocket: the core serves it as native until the upgrade names its subprotocol.
    WebSocket,
    /// The native protocol over TLS.
    Tls,
    /// MQTT over TLS.
    TlsMqtt,
}

/// A connection's transport half: the socket and what has been read but not yet used.
struct Link {
    stream: TcpStream,
    input: ReadBuf,
    wire: WireKind,
    /// A WebSocket connection's bridge (`ws_link.rs`): its socket bytes go through it.
    ws: Option<Box<WsLink>>,
    /// The core has closed this WebSocket connection; the socket waits for the peer's close
    /// (its input is discarded) until [`WS_LINGER`] has passed.
    lingering: bool,
    /// The source address, counted in `EngineShared::sources` while the link lives.
    peer: Option<std::net::SocketAddr>,
    /// Accepted on a TLS listener: the rustls state between the socket and the core.
    tls: Option<Box<TlsLink>>,
}

impl Link {
    /// Writes the TLS link's waiting ciphertext: `Ok(true)` when none is left (always, for
    /// plain TCP).
    fn flush_tls(&mut self) -> io::Result<bool> {
        match self.tls.as_mut() {
            Some(tls) => tls.flush_to(&mut self.stream),
            None => Ok(true),
        }
    }
}

/// The reactor's sockets as the core's [`Transport`]; counts failed writes.
struct Sockets<'a> {
    links: &'a mut [Option<Link>],
    io_errors: &'a mut u64,
}

impl Transport for Sockets<'_> {
    fn write(&mut self, slot: usize, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let result = match (link.ws.as_deref_mut(), link.tls.as_deref_mut()) {
            (Some(ws), _) => ws.write(&mut link.stream, slices),
            // Encrypt only once the last ciphertext is out (tls_link.rs, the driver's duties).
            (None, Some(tls)) => match tls.flush_to(&mut link.stream) {
                Ok(true) => tls.write_plain(slices).and_then(|n| {
                    // What the socket does not take now waits for its writable event.
                    tls.flush_to(&mut link.stream).map(|_| n)
                }),
                Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e),
            },
            (None, None) => link.stream.write_vectored(slices),
        };
        if let Err(e) = &result {
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                // The core closes the connection and logs why (its disconnect line).
                *self.io_errors += 1;
            }
        }
        result
    }

    fn shutdown_write(&mut self, slot: usize) {
        if let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) {
            // A WebSocket ends with a close frame first (the rest when the socket takes it).
            let ready = match link.ws.as_deref_mut() {
                Some(ws) => ws.handle_shutdown(&mut link.stream, crate::ws::close_code::POLICY),
                None => true,
            };
            if let Some(tls) = link.tls.as_mut() {
                tls.close();
                let _ = tls.flush_to(&mut link.stream);
            }
            if ready {
                let _ = link.stream.shutdown(Shutdown::Write);
            }
        }
    }

    fn unix_ns(&mut self) -> u64 {
        now_unix_ns()
    }
}

/// Counters only the driver sees.
#[derive(Default)]
struct DriverCounters {
    accepted: u64,
    /// Loop turns that held socket reads back because a peer's inbox was full.
    throttled_turns: u64,
    /// Connections closed because a read or write failed (not a clean EOF).
    io_errors: u64,
    /// TLS connections closed by a TLS failure: a bad handshake or record, a refused or
    /// missing client certificate.
    tls_failures: u64,
}

/// An accepted connection on its way to another reactor: socket, connection id, codec,
/// WebSocket, TLS.
type NewConn = (TcpStream, u64, WireKind, bool, bool);

/// A reactor's share of TLS: the listeners (reactor 0 only) and the rustls config (every
/// reactor, for the handshakes of the connections it is dealt).
#[derive(Default)]
pub(crate) struct TlsSetup {
    pub listener: Option<TcpListener>,
    pub mqtt_listener: Option<TcpListener>,
    pub config: Option<Arc<rustls::ServerConfig>>,
}

pub(crate) struct Reactor {
    id: u16,
    n_shards: u16,
    config: Arc<Config>,
    shared: Arc<EngineShared>,
    poll: Poll,
    listener: Option<TcpListener>,
    /// The MQTT listener (`mqtt.listen`), on the same reactor as the native one.
    mqtt_listener: Option<TcpListener>,
    /// The WebSocket listener (`websocket.listen`).
    ws_listener: Option<TcpListener>,
    /// WebSocket connections with control frames waiting for an open binary frame to end.
    ws_flush: Vec<usize>,
    /// Closed WebSocket connections waiting for their peer's close, and until when.
    ws_lingering: Vec<(usize, Instant)>,
    /// The TLS listeners (`tls.listen`, `tls.mqtt_listen`), on the same reactor.
    tls_listener: Option<TcpListener>,
    tls_mqtt_listener: Option<TcpListener>,
    /// The rustls server config, when a TLS listener is on (every reactor runs handshakes).
    tls_config: Option<Arc<rustls::ServerConfig>>,
    /// The listener may still hold connections (budget spent or a failed accept): accept
    /// again at this time without waiting for an event (edge-triggered readiness would not
    /// report them again).
    accept_again: Option<Instant>,
    next_target: usize,
    inbox: Inbox<ShardMsg>,
    peers: Vec<Mailbox<ShardMsg>>,
    /// Connections for each peer, sent before the core's messages.
    new_conns: Vec<Vec<NewConn>>,
    links: Vec<Option<Link>>,
    /// Read buffers lent to the connections while they read (`readbuf.rs`).
    read_bufs: BufPool,
    /// Connections closed since the heap was last trimmed (`trim.rs`).
    closed_since_trim: u64,
    free_slots: Vec<usize>,
    read_again: Vec<usize>,
    core: FanoutCore,
    counters: DriverCounters,
    shutting_down: bool,
    /// Draining after a shutdown request: new connections are refused.
    draining: bool,
    /// A peer's inbox was full at the end of the last turn: socket reads wait (the publishers
    /// feel TCP backpressure) until it has taken this reactor's backlog.
    throttled: bool,
    /// Wakes the poll at the core's deadline with microsecond precision.
    timer: DeadlineTimer,
    /// STATS requests go to the stats thread.
    stats_jobs: crossbeam_channel::Sender<StatsJob>,
    /// argon2 runs go to the verifier thread (`verifier.rs`).
    verify_jobs: crossbeam_channel::Sender<VerifyJob>,
    /// The multicast channels' sockets (`mcast_io.rs`); `None` when none is configured.
    mcast: Option<super::mcast_io::McastSockets>,
}

impl Reactor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u16,
        n_shards: u16,
        config: Arc<Config>,
        shared: Arc<EngineShared>,
        poll: Poll,
        listener: Option<TcpListener>,
        mqtt_listener: Option<TcpListener>,
        ws_listener: Option<TcpListener>,
        tls: TlsSetup,
        inbox: Inbox<ShardMsg>,
        peers: Vec<Mailbox<ShardMsg>>,
        stats_jobs: crossbeam_channel::Sender<StatsJob>,
        verify_jobs: crossbeam_channel::Sender<VerifyJob>,
    ) -> io::Result<Reactor> {
        let mut listener = listener;
        if let Some(l) = listener.as_mut() {
            poll.registry()
                .register(l, LISTENER_TOKEN, Interest::READABLE)?;
        }
        let mut mqtt_listener = mqtt_listener;
        if let Some(l) = mqtt_listener.as_mut() {
            poll.registry()
                .register(l, MQTT_LISTENER_TOKEN, Interest::READABLE)?;
        }
        let TlsSetup {
            listener: mut tls_listener,
            mqtt_listener: mut tls_mqtt_listener,
            config: tls_config,
        } = tls;
        if let Some(l) = tls_listener.as_mut() {
            poll.registry()
                .register(l, TLS_LISTENER_TOKEN, Interest::READABLE)?;
        }
        if let Some(l) = tls_mqtt_listener.as_mut() {
            poll.registry()
                .register(l, TLS_MQTT_LISTENER_TOKEN, Interest::READABLE)?;
        }
        let mut ws_listener = ws_listener;
        if let Some(l) = ws_listener.as_mut() {
            poll.registry()
                .register(l, WS_LISTENER_TOKEN, Interest::READABLE)?;
        }
        let mut timer = DeadlineTimer::new()?;
        poll.registry()
            .register(&mut timer, TIMER_TOKEN, Interest::READABLE)?;
        let now = Instant::now();
        let mcast = super::mcast_io::McastSockets::open(&config)?;
        Ok(Reactor {
            mcast,
            core: FanoutCore::new(id, n_shards, config.clone(), shared.clone(), now),
            id,
            n_shards,
            config,
            shared,
            poll,
            listener,
            mqtt_listener,
            ws_listener,
            ws_flush: Vec::new(),
            ws_lingering: Vec::new(),
            tls_listener,
            tls_mqtt_listener,
            tls_config,
            accept_again: None,
            next_target: 0,
            inbox,
            peers,
            new_conns: (0..n_shards).map(|_| Vec::new()).collect(),
            links: Vec::new(),
            read_bufs: BufPool::default(),
            closed_since_trim: 0,
            free_slots: Vec::new(),
            read_again: Vec::new(),
            counters: DriverCounters::default(),
            shutting_down: false,
            draining: false,
            throttled: false,
            timer,
            stats_jobs,
            verify_jobs,
        })
    }

    /// The event loop. Returns when the engine shuts down.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(MAX_EVENTS);
        while !self.shutting_down && !self.shared.shutdown_requested() {
            let before = Instant::now();
            let accept_due = self.accept_again.is_some_and(|at| at <= before);
            let busy = accept_due
                || self.core.wants_flush()
                || (!self.read_again.is_empty() && !self.throttled);
            // The shutdown flag is read after arming, like the inbox: a request made after the
            // loop's check either is seen here or wakes the poll (notify.rs).
            let timeout =
                if busy || !self.inbox.arm_and_check_empty() || self.shared.shutdown_requested() {
                    Duration::ZERO
                } else {
                    if self.closed_since_trim >= super::trim::TRIM_AFTER_CLOSES {
                        // A quiet moment after many closes: give their memory back.
                        let closed = std::mem::take(&mut self.closed_since_trim);
                        let started = Instant::now();
                        super::trim::release_free_heap();
                        tracing::debug!(
                            reactor = self.id,
                            closed,
                            took_us = started.elapsed().as_micros() as u64,
                            "returned free heap to the system after connections closed"
                        );
                    }
                    let mut wake = self.core.poll_timeout();
                    if let Some(at) = self.accept_again {
                        wake = wake.min(at);
                    }
                    if let Some(&(_, at)) = self.ws_lingering.first() {
                        wake = wake.min(at);
                    }
                    if self.throttled {
                        wake = wake.min(before + THROTTLE_NAP);
                    }
                    if wake > before {
                        // The poll's own timeout has millisecond steps; the timer is exact.
                        self.timer.arm(wake, before)?;
                    }
                    wake.saturating_duration_since(before)
                };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    TIMER_TOKEN => self.timer.fired(),
                    LISTENER_TOKEN
                    | MQTT_LISTENER_TOKEN
                    | WS_LISTENER_TOKEN
                    | TLS_LISTENER_TOKEN
                    | TLS_MQTT_LISTENER_TOKEN => self.accept(now),
                    Token(slot) if self.is_lingering(slot) => self.linger_read(slot),
                    Token(slot) => {
                        if event.is_writable() {
                            self.handle_writable(now, slot);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if self.throttled {
                                self.read_again.push(slot);
                            } else {
                                self.handle_readable(slot, now);
                            }
                        }
                    }
                }
            }
            if self.accept_again.is_some_and(|at| at <= now) {
                self.accept(now);
            }
            if !self.throttled {
                for slot in std::mem::take(&mut self.read_again) {
                    self.handle_readable(slot, now);
                }
            }
            self.drain_inbox(now);
            if now >= self.core.poll_timeout() {
                self.core.handle_timeout(now);
            }
            self.forward_stats_requests();
            self.forward_verifications(now);
            self.flush(now);
            self.flush_ws(now);
            self.end_lingering(now);
            self.send_datagrams(now);
            self.resume_paused(now);
            self.drop_closed();
            self.send_outgoing();
            self.publish_stats();
        }
        self.drain(&mut events)?;
        let now = Instant::now();
        self.core.shut_down(now);
        self.flush(now);
        for slot in 0..self.links.len() {
            self.core.handle_closed(now, slot);
        }
        self.drop_closed();
        self.publish_stats();
        self.shared
            .handle_final_retained(self.id, self.core.retained_frames());
        Ok(())
    }

    /// The drain after a shutdown request, up to `server.drain_ms`: stop accepting and reading,
    /// pass on every publish already read, take in what the other reactors pass on, and write
    /// out what is queued. Ends early once every reactor has passed its publishes on and this
    /// one has nothing left to take in or write.
    fn drain(&mut self, events: &mut Events) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(self.config.server.drain_ms);
        self.draining = true;
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        if let Some(mut listener) = self.ws_listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        for mut listener in [self.tls_listener.take(), self.tls_mqtt_listener.take()]
            .into_iter()
            .flatten()
        {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.read_again.clear();
        let n = self.n_shards as usize;
        let (mut quiesced, mut settled) = (false, false);
        loop {
            let now = Instant::now();
            self.drain_inbox(now);
            if now >= self.core.poll_timeout() {
                self.core.handle_timeout(now);
            }
            self.flush(now);
            self.drop_closed();
            let sending = self.new_conns.iter().any(|c| !c.is_empty())
                || (0..n).any(|peer| !self.core.outgoing(peer).is_empty());
            if settled && sending {
                // Not settled while passing something on (a catch-up's replay request).
                settled = false;
                self.shared.drain_settled.fetch_sub(1, Ordering::SeqCst);
            }
            self.send_outgoing();
            self.publish_stats();
            // Phase 1: every publish this reactor read has gone to its owner.
            if !quiesced && !self.throttled && self.new_conns.iter().all(Vec::is_empty) {
                quiesced = true;
                self.shared.drain_quiesced.fetch_add(1, Ordering::SeqCst);
            }
            // Phase 2: once no reactor reads or holds a publish, only inbox messages make new
            // ones (a publish ingested makes deliveries). A reactor is settled while its inbox
            // and outgoing queues are empty; a sender counts itself settled only after its
            // sends, so a reactor that sees everyone settled finds every message in its inbox.
            let everyone_quiesced = self.shared.drain_quiesced.load(Ordering::SeqCst) >= n;
            let idle = everyone_quiesced
                && !self.throttled
                && self.inbox.rx.is_empty()
                && self.new_conns.iter().all(Vec::is_empty);
            if idle != settled {
                settled = idle;
                if idle {
                    self.shared.drain_settled.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.shared.drain_settled.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let done = settled
                && self.shared.drain_settled.load(Ordering::SeqCst) >= n
                && self.inbox.rx.is_empty()
                && !self.core.has_output();
            if done || now >= deadline {
                let connections = self.links.iter().flatten().count();
                if done {
                    tracing::info!(
                        reactor = self.id,
                        connections,
                        "drained: closing connections with ERROR 12"
                    );
                } else {
                    tracing::warn!(
                        reactor = self.id,
                        connections,
                        drain_ms = self.config.server.drain_ms,
                        "drain deadline reached with frames still queued: closing connections with ERROR 12"
                    );
                }
                return Ok(());
            }
            let nap = DRAIN_NAP.min(deadline.saturating_duration_since(now));
            match self.poll.poll(events, Some(nap)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN | LISTENER_TOKEN => {}
                    TIMER_TOKEN => self.timer.fired(),
                    // Reads wait: nothing new is taken in while draining.
                    Token(slot) if event.is_writable() => {
                        let now = Instant::now();
                        self.handle_writable(now, slot);
                    }
                    Token(_) => {}
                }
            }
        }
    }

    /// The turn's multicast datagrams (after `flush`, which seals them).
    fn send_datagrams(&mut self, now: Instant) {
        if let Some(m) = self.mcast.as_mut() {
            m.send(&mut self.core, now, now_unix_ns());
        }
    }

    fn flush(&mut self, now: Instant) {
        let mut sockets = Sockets {
            links: &mut self.links,
            io_errors: &mut self.counters.io_errors,
        };
        self.core.flush(now, &mut sockets);
    }

    // ----- accepting -----

    /// Accepts on every listener until its backlog is empty or the turn's budget is spent; in
    /// the latter case (and after a failure) the next turn goes on without waiting for another
    /// event.
    fn accept(&mut self, now: Instant) {
        self.accept_again = None;
        self.accept_from(now, Listener::Native);
        self.accept_from(now, Listener::Mqtt);
        self.accept_from(now, Listener::WebSocket);
        self.accept_from(now, Listener::Tls);
        self.accept_from(now, Listener::TlsMqtt);
    }

    fn accept_from(&mut self, now: Instant, kind: Listener) {
        let wire = match kind {
            Listener::Mqtt | Listener::TlsMqtt => WireKind::Mqtt,
            Listener::Native | Listener::WebSocket | Listener::Tls => WireKind::Native,
        };
        for _ in 0..MAX_ACCEPTS {
            let listener = match kind {
                Listener::Native => self.listener.as_ref(),
                Listener::Mqtt => self.mqtt_listener.as_ref(),
                Listener::WebSocket => self.ws_listener.as_ref(),
                Listener::Tls => self.tls_listener.as_ref(),
                Listener::TlsMqtt => self.tls_mqtt_listener.as_ref(),
            };
            let Some(listener) = listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connections stay in the backlog; try again soon
                    // (so this line comes at most every ACCEPT_RETRY).
                    tracing::warn!(
                        error = %e,
                        open_connections = self.shared.open_connections.load(Ordering::Relaxed),
                        "accept failed; retrying in 100 ms"
                    );
                    self.accept_again_at(now + ACCEPT_RETRY);
                    return;
                }
            };
            let open = self.shared.open_connections.fetch_add(1, Ordering::Relaxed);
            if open >= self.config.limits.max_connections {
                self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                // MQTT has no answer before CONNECT: the close alone refuses it.
                if kind == Listener::Native {
                    refuse(
                        stream,
                        error_code::TOO_MANY_CONNECTIONS,
                        "the engine is at max_connections",
                    );
                }
                continue;
            }
            if !self.admit_source(peer) {
                self.core.handle_address_refused(now, peer);
                let reason = format!(
                    "too many connections from {} (limits.max_connections_per_address = {})",
                    peer.ip(),
                    self.config.limits.max_connections_per_address
                );
                self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                if kind == Listener::Native {
                    refuse(stream, error_code::TOO_MANY_CONNECTIONS, &reason);
                }
                continue;
            }
            let _ = stream.set_nodelay(true);
            let sndbuf = self.config.delivery.socket_send_buffer_bytes;
            if sndbuf > 0 {
                // Bounds what the kernel holds for a subscriber that stopped reading: less to
                // retransmit into its full window, less latency hidden below the outbox.
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf);
            }
            let conn_id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
            self.counters.accepted += 1;
            let target = self.next_target % self.n_shards as usize;
            self.next_target = self.next_target.wrapping_add(1);
            let ws = kind == Listener::WebSocket;
            let tls = matches!(kind, Listener::Tls | Listener::TlsMqtt);
            if target == self.id as usize {
                self.add_conn(stream, conn_id, wire, ws, tls, now);
            } else {
                self.new_conns[target].push((stream, conn_id, wire, ws, tls));
            }
        }
        // Budget spent: the rest of the backlog is taken next turn.
        self.accept_again_at(now);
    }

    /// Counts a connection from `peer` against `limits.max_connections_per_address`.
    fn admit_source(&self, peer: std::net::SocketAddr) -> bool {
        self.config.limits.max_connections_per_address == 0
            || self
                .shared
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_admit(peer.ip())
    }

    /// A connection counted by [`Reactor::admit_source`] is gone.
    fn release_source(&self, peer: Option<std::net::SocketAddr>) {
        if let Some(peer) = peer.filter(|_| self.config.limits.max_connections_per_address > 0) {
            self.shared
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .release(peer.ip());
        }
    }

    /// Accepts again at `at`, or earlier if the other listener asked for that.
    fn accept_again_at(&mut self, at: Instant) {
        self.accept_again = Some(self.accept_again.map_or(at, |again| again.min(at)));
    }

    fn add_conn(
        &mut self,
        mut stream: TcpStream,
        conn_id: u64,
        wire: WireKind,
        ws: bool,
        tls: bool,
        now: Instant,
    ) {
        let peer = stream.peer_addr().ok();
        if self.draining {
            self.release_source(peer);
            self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            // A refusal in the clear would be garbage to a TLS client: the close refuses it.
            if wire == WireKind::Native && !ws && !tls {
                refuse(
                    stream,
                    error_code::SHUTTING_DOWN,
                    "the engine is shutting down",
                );
            }
            return;
        }
        let tls = if tls {
            let made = self
                .tls_config
                .clone()
                .ok_or(rustls::Error::General("no TLS config".into()))
                .and_then(TlsLink::new);
            match made {
                Ok(link) => Some(Box::new(link)),
                Err(e) => {
                    tracing::error!(conn = conn_id, error = %e, "cannot start a TLS connection");
                    self.release_source(peer);
                    self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
        } else {
            None
        };
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.links.push(None);
            self.links.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::error!(conn = conn_id, error = %e, "cannot register a connection");
            self.release_source(peer);
            self.free_slots.push(slot);
            self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let ws = ws.then(|| Box::new(WsLink::new(self.ws_bridge())));
        self.links[slot] = Some(Link {
            stream,
            input: ReadBuf::default(),
            wire,
            ws,
            lingering: false,
            peer,
            tls,
        });
        self.core.open_wire(now, slot, conn_id, wire);
        if let Some(peer) = peer {
            self.core.set_peer(slot, peer);
        }
        // Data may have arrived before registration: edge-triggered readiness would not report it.
        self.read_again.push(slot);
    }

    // ----- reading -----

    fn handle_readable(&mut self, slot: usize, now: Instant) {
        let max_frame = self.config.limits.max_frame_bytes;
        let mut budget = READ_BUDGET_BYTES;
        loop {
            // Pacing: a paused connection is left unread (its bytes wait in the kernel) until
            // the core resumes it (`resume_paused`).
            if self.core.is_paused(slot) {
                return;
            }
            let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            // The length of a frame larger than the buffer, once its prefix is in (a length
            // over the limit is refused by the core, not buffered).
            let needed = match link.wire {
                // A WebSocket link's buffer holds frames, which its bridge takes whole.
                _ if link.ws.is_some() => None,
                WireKind::Native => proto::frame_len_hint(link.input.data())
                    .filter(|&len| len <= max_frame + proto::LEN_PREFIX_BYTES),
                // An MQTT fixed header is at most 5 bytes.
                WireKind::Mqtt => crate::mqtt::packet_len_hint(link.input.data())
                    .filter(|&len| len <= max_frame + 5),
            };
            if link.tls.is_some() {
                match self.read_tls(slot, needed, now) {
                    Some(n) => {
                        budget = budget.saturating_sub(n);
                        if budget == 0 {
                            self.read_again.push(slot);
                            return;
                        }
                        continue;
                    }
                    None => return,
                }
            }
            match link
                .stream
                .read(link.input.spare(needed, &mut self.read_bufs))
            {
                Ok(0) => {
                    self.core.handle_closed(now, slot);
                    self.drop_closed();
                    return;
                }
                Ok(n) => {
                    link.input.filled(n);
                    // The ingest time of every PUBLISH in this read: when the engine took it off
                    // the socket (one clock read per read, not per message).
                    let read_ns = now_unix_ns();
                    if link.ws.is_some() {
                        if !self.handle_ws_input(now, read_ns, slot) {
                            return;
                        }
                    } else {
                        let used = self
                            .core
                            .handle_input(now, read_ns, slot, link.input.data());
                        link.input.consume(used, &mut self.read_bufs);
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.read_again.push(slot);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    link.input.rest(&mut self.read_bufs);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.io_error(now, slot, "read", &e);
                    return;
                }
            }
        }
    }

    /// One step of reading a TLS connection (tls_link.rs, the driver's duties): decrypted bytes
    /// waiting in rustls go to the core first; only when there are none is the socket read.
    /// Returns the bytes moved, or `None` when the socket would block or the connection ended.
    fn read_tls(&mut self, slot: usize, needed: Option<usize>, now: Instant) -> Option<usize> {
        let link = self.links.get_mut(slot).and_then(Option::as_mut)?;
        let Link {
            stream, input, tls, ..
        } = link;
        let tls = tls.as_mut()?;
        match tls.take_plaintext(input.spare(needed, &mut self.read_bufs)) {
            Plain::Bytes(n) => {
                input.filled(n);
                let used = self
                    .core
                    .handle_input(now, now_unix_ns(), slot, input.data());
                input.consume(used, &mut self.read_bufs);
                return Some(n);
            }
            Plain::Closed => {
                self.core.handle_closed(now, slot);
                self.drop_closed();
                return None;
            }
            Plain::Empty => {}
        }
        let result = tls.read_from(stream);
        // The handshake's answers (or the alert of a failure) go out at once.
        let flushed = tls.flush_to(stream);
        match result {
            Ok(0) => {
                self.core.handle_closed(now, slot);
                self.drop_closed();
                None
            }
            Ok(n) => {
                if let Some(names) = tls.poll_peer_names() {
                    self.core.set_certificate_names(slot, names);
                }
                if let Err(e) = flushed {
                    self.io_error(now, slot, "write", &e);
                    return None;
                }
                Some(n)
            }
            Err(TlsIoError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing decrypted, nothing on the socket: an idle connection keeps no buffer.
                input.rest(&mut self.read_bufs);
                None
            }
            Err(TlsIoError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => Some(0),
            Err(TlsIoError::Io(e)) => {
                self.io_error(now, slot, "read", &e);
                None
            }
            Err(TlsIoError::Tls(e)) => {
                self.counters.tls_failures += 1;
                self.core
                    .handle_transport_error(now, slot, format!("TLS failed: {e}"));
                self.drop_closed();
                None
            }
        }
    }

    /// Connections that pacing paused and has let go: the input they left in their buffer
    /// first, then their socket, on the next turn.
    fn resume_paused(&mut self, now: Instant) {
        while let Some(slot) = self.core.poll_resumed() {
            let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Some(ws) = link.ws.as_deref_mut() {
                if !ws.core_input().is_empty() {
                    let used = self
                        .core
                        .handle_input(now, now_unix_ns(), slot, ws.core_input());
                    ws.consume_core_input(used);
                }
            } else if !link.input.data().is_empty() {
                let used = self
                    .core
                    .handle_input(now, now_unix_ns(), slot, link.input.data());
                link.input.consume(used, &mut self.read_bufs);
            }
            self.read_again.push(slot);
        }
    }

    /// A WebSocket link read bytes: through its bridge into the core. `false` when the
    /// connection is gone.
    fn handle_ws_input(&mut self, now: Instant, read_ns: u64, slot: usize) -> bool {
        let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let Some(ws) = link.ws.as_deref_mut() else {
            return false;
        };
        let raw = link.input.data();
        let upgraded = ws.handle_input(raw);
        let n = raw.len();
        link.input.consume(n, &mut self.read_bufs);
        if let LinkInput::Upgraded(wire) = upgraded {
            link.wire = wire;
            self.core.set_wire(slot, wire);
        }
        if !ws.core_input().is_empty() {
            let used = self.core.handle_input(now, read_ns, slot, ws.core_input());
            ws.consume_core_input(used);
        }
        self.flush_ws_link(now, slot)
    }

    /// Writes what a WebSocket link has pending (upgrade answer, pong, close, JSON frames);
    /// closes the connection once its bridge is closed and everything is out. `false` when the
    /// connection is gone.
    fn flush_ws_link(&mut self, now: Instant, slot: usize) -> bool {
        let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let Some(ws) = link.ws.as_deref_mut() else {
            return true;
        };
        let flushed = ws.flush(&mut link.stream);
        if ws.shutdown_due() {
            let _ = link.stream.shutdown(Shutdown::Write);
        }
        match flushed {
            Err(e) => {
                self.io_error(now, slot, "write", &e);
                false
            }
            Ok(done) if ws.is_closed() => {
                let reason = ws.closed_reason.clone().unwrap_or_default();
                if done {
                    let _ = link.stream.shutdown(Shutdown::Write);
                }
                self.core.handle_transport_error(now, slot, reason);
                self.drop_closed();
                false
            }
            Ok(done) => {
                if !done && ws.wants_flush() {
                    self.ws_flush.push(slot);
                }
                true
            }
        }
    }

    /// The socket of `slot` can take bytes again: a WebSocket link's own pending bytes first,
    /// then the core's.
    fn handle_writable(&mut self, now: Instant, slot: usize) {
        // Ciphertext a TLS link holds goes first: the core may have nothing new to write.
        if let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) {
            match link.flush_tls() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    self.io_error(now, slot, "write", &e);
                    return;
                }
            }
        }
        let ws = self
            .links
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.ws.is_some());
        if ws && !self.flush_ws_link(now, slot) {
            return;
        }
        self.core.handle_writable(slot);
    }

    /// WebSocket links whose control frames waited for the end of a binary frame.
    fn flush_ws(&mut self, now: Instant) {
        if self.ws_flush.is_empty() {
            return;
        }
        let mut slots = std::mem::take(&mut self.ws_flush);
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            self.flush_ws_link(now, slot);
        }
    }

    /// A new WebSocket connection's bridge: the configured origins, and the live page's own.
    fn ws_bridge(&self) -> crate::ws::WsBridge {
        let ws = &self.config.websocket;
        let mut allowed = ws.origins.clone();
        if let Some(addr) = self.shared.metrics_addr.get() {
            allowed.push(format!("http://{addr}"));
            if addr.ip().is_loopback() {
                allowed.push(format!("http://localhost:{}", addr.port()));
            }
        }
        crate::ws::WsBridge::new(
            crate::ws::handshake::OriginPolicy { allowed },
            ws.max_message_bytes,
        )
    }

    fn io_error(&mut self, now: Instant, slot: usize, what: &str, e: &io::Error) {
        self.counters.io_errors += 1;
        self.core
            .handle_transport_error(now, slot, format!("{what} failed: {e}"));
        self.drop_closed();
    }

    /// Drops the transport of every connection the core has closed.
    fn drop_closed(&mut self) {
        while let Some(slot) = self.core.poll_closed() {
            if let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) {
                if let Some(ws) = link.ws.as_deref_mut().filter(|_| !self.draining) {
                    // A WebSocket ends with the close handshake: our close frame (unless the
                    // bridge already sent one), then the peer's, or WS_LINGER.
                    let _ = ws.handle_shutdown(&mut link.stream, crate::ws::close_code::NORMAL);
                    let _ = link.stream.shutdown(Shutdown::Write);
                    link.lingering = true;
                    self.ws_lingering.push((slot, Instant::now() + WS_LINGER));
                    continue;
                }
            }
            self.drop_link(slot);
        }
    }

    fn drop_link(&mut self, slot: usize) {
        if let Some(mut link) = self.links.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut link.stream);
            self.release_source(link.peer);
            self.free_slots.push(slot);
            self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            self.closed_since_trim += 1;
        }
    }

    fn is_lingering(&self, slot: usize) -> bool {
        self.links
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|l| l.lingering)
    }

    /// A lingering WebSocket's input is discarded until the peer closes (EOF) or fails.
    fn linger_read(&mut self, slot: usize) {
        let Some(link) = self.links.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            match link.stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.ws_lingering.retain(|&(s, _)| s != slot);
        self.drop_link(slot);
    }

    /// Lingering WebSockets whose time is up (oldest first: they were pushed in time order).
    fn end_lingering(&mut self, now: Instant) {
        while let Some(&(slot, at)) = self.ws_lingering.first() {
            if at > now {
                return;
            }
            self.ws_lingering.remove(0);
            self.drop_link(slot);
        }
    }

    // ----- other reactors -----

    fn drain_inbox(&mut self, now: Instant) {
        let mut frames_budget = MAX_INBOX_FRAMES;
        for _ in 0..MAX_INBOX_MSGS {
            if frames_budget == 0 {
                return;
            }
            let Ok(msg) = self.inbox.rx.try_recv() else {
                return;
            };
            match msg {
                ShardMsg::NewConn {
                    stream,
                    conn_id,
                    wire,
                    ws,
                    tls,
                } => self.add_conn(stream, conn_id, wire, ws, tls, now),
                ShardMsg::Core(msg) => {
                    frames_budget = frames_budget.saturating_sub(FanoutCore::msg_weight(&msg));
                    self.core.handle_msg(now, msg);
                }
                ShardMsg::Peer(msg) => {
                    self.shared.shards[self.id as usize]
                        .inbox_bytes
                        .fetch_sub(FanoutCore::msg_bytes(&msg), Ordering::Relaxed);
                    frames_budget = frames_budget.saturating_sub(FanoutCore::msg_weight(&msg));
                    self.core.handle_msg(now, msg);
                }
                ShardMsg::Report(reply) => {
                    // The channel has room for every reactor's answer: never blocks.
                    let _ = reply.try_send(self.core.report());
                }
                ShardMsg::Retained {
                    shard,
                    version,
                    reply,
                } => {
                    let now_version = self.core.retained_version();
                    let answer = (version != Some(now_version))
                        .then(|| (now_version, self.core.retained_frames()));
                    // The channel has room for every reactor's answer: never blocks.
                    let _ = reply.try_send((shard, answer));
                }
                ShardMsg::Reload(config) => {
                    self.config = config.clone();
                    self.core.handle_reload(config);
                }
                ShardMsg::Shutdown => self.shutting_down = true,
            }
        }
    }

    fn forward_stats_requests(&mut self) {
        while let Some(conn) = self.core.poll_stats_request() {
            let job = StatsJob {
                shard: self.id,
                conn,
                viewer: self.core.stats_viewer(conn),
            };
            if self.stats_jobs.try_send(job).is_err() {
                self.core.handle_stats_busy(conn);
            }
        }
    }

    /// HELLOs parked for an argon2 run: the runs go to the verifier thread; a full queue
    /// refuses the HELLO at once (`Verdict::Busy`), the reactor never waits.
    fn forward_verifications(&mut self, now: Instant) {
        while let Some(request) = self.core.poll_verification() {
            let job = VerifyJob {
                shard: self.id,
                conn: request.conn,
                verification: request.verification,
            };
            if let Err(e) = self.verify_jobs.try_send(job) {
                let conn = e.into_inner().conn;
                self.core
                    .handle_verified(now, conn.slot as usize, conn.id, Verdict::Busy);
            }
        }
    }

    fn send_outgoing(&mut self) {
        let mut throttled = false;
        for peer in 0..self.n_shards as usize {
            if peer == self.id as usize {
                continue;
            }
            let conns = std::mem::take(&mut self.new_conns[peer]);
            for (stream, conn_id, wire, ws, tls) in conns {
                if let Err(TrySendError::Full(ShardMsg::NewConn {
                    stream,
                    conn_id,
                    wire,
                    ws,
                    tls,
                })) = self.peers[peer].try_send(ShardMsg::NewConn {
                    stream,
                    conn_id,
                    wire,
                    ws,
                    tls,
                }) {
                    self.new_conns[peer].push((stream, conn_id, wire, ws, tls));
                }
            }
            let queue = self.core.outgoing(peer);
            if queue.is_empty() {
                continue;
            }
            // Drained in place, so the queue keeps its capacity from turn to turn.
            let mut kept = Vec::new();
            let mut msgs = queue.drain(..);
            let in_flight = &self.shared.shards[peer].inbox_bytes;
            while let Some(msg) = msgs.next() {
                let bytes = FanoutCore::msg_bytes(&msg);
                if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT_BYTES {
                    kept.push(msg);
                    kept.extend(msgs.by_ref());
                    break;
                }
                // Counted before the send, so the receiver's subtraction never underflows.
                in_flight.fetch_add(bytes, Ordering::Relaxed);
                match self.peers[peer].try_send(ShardMsg::Peer(msg)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(ShardMsg::Peer(msg))) => {
                        in_flight.fetch_sub(bytes, Ordering::Relaxed);
                        // The peer is behind: keep the rest, in order, for the next turn.
                        kept.push(msg);
                        kept.extend(msgs.by_ref());
                        break;
                    }
                    Err(_) => {}
                }
            }
            drop(msgs);
            throttled |= !kept.is_empty();
            queue.append(&mut kept);
        }
        self.throttled = throttled;
        if throttled {
            self.counters.throttled_turns += 1;
        }
    }

    /// Hands this turn's counters to readers on other threads: a few relaxed stores per turn,
    /// cheaper than deciding whether anything changed.
    fn publish_stats(&mut self) {
        let s = &self.shared.shards[self.id as usize];
        self.core.publish_stats(s);
        let c = &self.counters;
        s.accepted.store(c.accepted, Ordering::Relaxed);
        s.throttled_turns
            .store(c.throttled_turns, Ordering::Relaxed);
        s.io_errors.store(c.io_errors, Ordering::Relaxed);
        s.tls_failures.store(c.tls_failures, Ordering::Relaxed);
        if let Some(m) = &self.mcast {
            m.publish_stats(&s.mcast);
        }
    }
}

/// Refuses a connection at accept time with an ERROR frame, best effort.
fn refuse(mut stream: TcpStream, code: u16, reason: &str) {
    let mut buf = Vec::new();
    native::encode_reply(
        &mut buf,
        Reply::Error {
            code,
            reason: reason.to_string(),
        },
    );
    let _ = stream.write(&buf);
    let _ = stream.shutdown(Shutdown::Write);
}
