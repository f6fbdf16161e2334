//! `lanpush-bench mcast-floor`: the floor under any multicast fan-out on this host. A sender
//! that writes timestamped datagrams straight to a group, and N plain group sockets read by one
//! minimal loop (level-triggered epoll, one `recv` per readable socket, a histogram) — no
//! broker, no session, no repair. It is the multicast counterpart of the brief's TCP ceiling
//! ("one process writing batches straight to the same sockets"): what the kernel's copy into N
//! sockets and N reads cost when all receivers share one CPU, which no engine can beat on the
//! same topology. `bench/multicast.sh` runs it as the `floor` rows, the sender in the engine's
//! namespace and CPU, the receivers in lanpush-bench's.
//!
//! Datagram layout (little endian): magic `LPFL`, kind (0 warm-up, 1 measured, 2 end), a u16
//! count, then `count` messages of `size` bytes, each starting with its intended send time
//! (ns since the UNIX epoch, as every payload of the tool). An end datagram carries, instead of
//! messages, the number of measured messages sent (u64) and the measured window (u64 ns).

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::{Clock, WallClock};
use crate::recorder::{intended_ns, new_histogram, write_intended, TIMESTAMP_BYTES};
use crate::report::Percentiles;
use crate::sys::{Epoll, Events};

const MAGIC: &[u8; 4] = b"LPFL";
const HEADER_BYTES: usize = 7;
const WARMUP: u8 = 0;
const MEASURED: u8 = 1;
const END: u8 = 2;
/// End datagrams sent, 10 ms apart (one may be dropped by a full receive buffer).
const END_REPEATS: usize = 5;

/// What the sender sends.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Group and port.
    #[arg(long, default_value = "239.192.0.9:7429")]
    pub group: SocketAddrV4,
    /// The interface address to send from.
    #[arg(long, default_value = "0.0.0.0")]
    pub interface: Ipv4Addr,
    /// Messages per second.
    #[arg(long, default_value_t = 10)]
    pub rate: u64,
    /// Messages per datagram (a broker's batch; 1 at low rates).
    #[arg(long, default_value_t = 1)]
    pub per_datagram: usize,
    /// Bytes per message (at least 8: the timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of warm-up, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
}

/// What the receivers do.
#[derive(Debug, Clone, clap::Args)]
pub struct RecvArgs {
    /// Group and port.
    #[arg(long, default_value = "239.192.0.9:7429")]
    pub group: SocketAddrV4,
    /// The interface address to join on.
    #[arg(long, default_value = "0.0.0.0")]
    pub interface: Ipv4Addr,
    /// Group sockets, one per receiver.
    #[arg(long, default_value_t = 100)]
    pub receivers: usize,
    /// Bytes per message, as the sender's `--size`.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Give up after this many seconds without the sender's end.
    #[arg(long, default_value_t = 120.0)]
    pub max_seconds: f64,
    /// Also write the result as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

/// The two ends of the floor, run as two processes (in two namespaces, on two CPUs).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Role {
    /// Sends timestamped datagrams to the group, then an end.
    Send(SendArgs),
    /// Joins N sockets to the group and reads them until the end; prints the result.
    Recv(RecvArgs),
}

/// Runs one end; the receiving end prints a summary line (and writes `--json`).
pub fn run(role: &Role) -> io::Result<()> {
    match role {
        Role::Send(args) => send(args),
        Role::Recv(args) => {
            let r = recv(args)?;
            println!(
                "mcast-floor: {} receivers, {} of {} measured messages ({} lost, {} without the \
                 end), {:.0} msg/s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
                r.receivers,
                r.received,
                r.published * r.receivers as u64,
                r.lost,
                r.receivers_without_end,
                r.msg_per_s,
                r.latency_us.p50,
                r.latency_us.p99,
                r.latency_us.p99_9,
                r.latency_us.max
            );
            if let Some(path) = &args.json {
                let json = serde_json::to_string_pretty(&r).map_err(io::Error::other)?;
                std::fs::write(path, json)?;
            }
            Ok(())
        }
    }
}

/// The receivers' result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FloorResult {
    pub receivers: usize,
    /// Measured messages the sender sent (from its end datagram; 0 if none arrived).
    pub published: u64,
    /// Measured messages received, summed over the receivers.
    pub received: u64,
    pub lost: u64,
    pub receivers_without_end: usize,
    pub msg_per_s: f64,
    pub latency_us: Percentiles,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datagram {
    Messages { measured: bool },
    End { measured_sent: u64, window_ns: u64 },
}

fn header(kind: u8, count: u16) -> [u8; HEADER_BYTES] {
    let mut h = [0; HEADER_BYTES];
    h[..4].copy_from_slice(MAGIC);
    h[4] = kind;
    h[5..7].copy_from_slice(&count.to_le_bytes());
    h
}

/// The kind of a datagram and its message count, or `None` for a stranger's.
fn parse(bytes: &[u8]) -> Option<(Datagram, usize)> {
    if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
        return None;
    }
    let count = u16::from_le_bytes([bytes[5], bytes[6]]) as usize;
    match bytes[4] {
        WARMUP | MEASURED => Some((
            Datagram::Messages {
                measured: bytes[4] == MEASURED,
            },
            count,
        )),
        END => {
            let body = bytes.get(HEADER_BYTES..HEADER_BYTES + 16)?;
            let word = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().unwrap_or([0; 8]));
            Some((
                Datagram::End {
                    measured_sent: word(0),
                    window_ns: word(8),
                },
                0,
            ))
        }
        _ => None,
    }
}

/// Sends `warmup + duration` seconds of datagrams at `rate` messages/s, then the end.
pub fn send(args: &SendArgs) -> io::Result<()> {
    crate::sys::tighten_timer_slack();
    if args.size < TIMESTAMP_BYTES || args.per_datagram == 0 || args.rate == 0 {
        return Err(io::Error::other(
            "--size must be at least 8, --per-datagram and --rate at least 1",
        ));
    }
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_multicast_if_v4(&args.interface)?;
    socket.set_multicast_ttl_v4(1)?;
    socket.set_send_buffer_size(4 << 20)?;
    socket.connect(&args.group.into())?;
    let socket: UdpSocket = socket.into();
    let clock = WallClock::new();
    let start = clock.now_ns() + 10_000_000;
    let measure_from = start + (args.warmup * 1e9) as u64;
    let end = measure_from + (args.duration * 1e9) as u64;
    let interval_ns = 1e9 / args.rate as f64;
    let mut buf = Vec::with_capacity(HEADER_BYTES + args.per_datagram * args.size);
    let (mut next, mut measured_sent) = (0u64, 0u64);
    loop {
        let first = start + (next as f64 * interval_ns) as u64;
        if first >= end {
            break;
        }
        // A batch leaves when its last message is due (as a broker's lingering datagram): the
        // earlier ones wait for it, and that wait counts in their latency.
        let last = start + ((next + args.per_datagram as u64 - 1) as f64 * interval_ns) as u64;
        clock.sleep_until(last);
        let measured = first >= measure_from;
        buf.clear();
        buf.extend_from_slice(&header(
            if measured { MEASURED } else { WARMUP },
            args.per_datagram as u16,
        ));
        for i in 0..args.per_datagram as u64 {
            let at = buf.len();
            buf.resize(at + args.size, 0);
            write_intended(
                &mut buf[at..],
                start + ((next + i) as f64 * interval_ns) as u64,
            );
        }
        socket.send(&buf)?;
        next += args.per_datagram as u64;
        if measured {
            measured_sent += args.per_datagram as u64;
        }
    }
    buf.clear();
    buf.extend_from_slice(&header(END, 0));
    buf.extend_from_slice(&measured_sent.to_le_bytes());
    buf.extend_from_slice(&(end - measure_from).to_le_bytes());
    for _ in 0..END_REPEATS {
        std::thread::sleep(Duration::from_millis(10));
        socket.send(&buf)?;
    }
    eprintln!("mcast-floor send: {next} messages, {measured_sent} measured");
    Ok(())
}

/// One receiver's tally.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    measured: u64,
    ended: bool,
}

/// Reads one datagram's messages into `histogram` and `tally`; returns the end datagram's
/// figures when it is one.
fn take(
    bytes: &[u8],
    now_ns: u64,
    size: usize,
    tally: &mut Tally,
    histogram: &mut Histogram<u64>,
) -> Option<(u64, u64)> {
    match parse(bytes)? {
        (
            Datagram::End {
                measured_sent,
                window_ns,
            },
            _,
        ) => {
            tally.ended = true;
            Some((measured_sent, window_ns))
        }
        (Datagram::Messages { measured: true }, count) => {
            for m in bytes[HEADER_BYTES..].chunks(size.max(1)).take(count) {
                if let Some(intended) = intended_ns(m) {
                    histogram.saturating_record(now_ns.saturating_sub(intended).max(1));
                    tally.measured += 1;
                }
            }
            None
        }
        (Datagram::Messages { measured: false }, _) => None,
    }
}

/// Joins `receivers` sockets, prints `ready`, and reads until every one has the end (or
/// `max_seconds`).
pub fn recv(args: &RecvArgs) -> io::Result<FloorResult> {
    let size = args.size.max(TIMESTAMP_BYTES);
    let mut sockets = Vec::with_capacity(args.receivers);
    let epoll = Epoll::new()?;
    for i in 0..args.receivers {
        let socket = lanpush::client::join_multicast_group(
            *args.group.ip(),
            args.group.port(),
            args.interface,
            lanpush::client::DEFAULT_RECV_BUFFER_BYTES,
        )?;
        epoll.add(socket.as_raw_fd(), i as u64)?;
        sockets.push(socket);
    }
    println!("ready {}", args.receivers);
    let clock = WallClock::new();
    let mut histogram = new_histogram();
    let mut tallies = vec![Tally::default(); args.receivers];
    let mut events = Events::with_capacity(args.receivers.clamp(1, 1024));
    let mut buf = vec![0u8; 65_536];
    let (mut published, mut window_ns, mut ended) = (0, 0, 0);
    let give_up = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    while ended < args.receivers && Instant::now() < give_up {
        epoll.wait(&mut events, 50)?;
        for token in events.tokens() {
            let i = token as usize;
            let n = match sockets[i].recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let was_ended = tallies[i].ended;
            if let Some((sent, window)) = take(
                &buf[..n],
                clock.now_ns(),
                size,
                &mut tallies[i],
                &mut histogram,
            ) {
                (published, window_ns) = (sent, window);
                if !was_ended {
                    ended += 1;
                }
            }
        }
    }
    let received: u64 = tallies.iter().map(|t| t.measured).sum();
    Ok(FloorResult {
        receivers: args.receivers,
        published,
        received,
        lost: (published * args.receivers as u64).saturating_sub(received),
        receivers_without_end: tallies.iter().filter(|t| !t.ended).count(),
        msg_per_s: received as f64 / (window_ns.max(1) as f64 / 1e9),
        latency_us: Percentiles::of(&histogram),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(kind: u8, stamps: &[u64], size: usize) -> Vec<u8> {
        let mut d = header(kind, stamps.len() as u16).to_vec();
        for &s in stamps {
            let at = d.len();
            d.resize(at + size, 0);
            write_intended(&mut d[at..], s);
        }
        d
    }

    #[test]
    fn measured_messages_are_timed_and_counted_warmup_ones_are_not() {
        let (mut tally, mut h) = (Tally::default(), new_histogram());
        let warm = messages(WARMUP, &[1_000, 2_000], 64);
        assert_eq!(take(&warm, 10_000, 64, &mut tally, &mut h), None);
        assert_eq!((tally.measured, h.len()), (0, 0));
        let measured = messages(MEASURED, &[5_000, 7_000, 9_000], 64);
        assert_eq!(take(&measured, 10_000, 64, &mut tally, &mut h), None);
        assert_eq!((tally.measured, h.len()), (3, 3));
        // Within the histogram's three significant digits.
        assert!(h.equivalent(h.max(), 5_000), "{}", h.max());
        assert!(h.equivalent(h.min(), 1_000), "{}", h.min());
    }

    #[test]
    fn the_end_carries_what_was_sent_and_strangers_are_ignored() {
        let (mut tally, mut h) = (Tally::default(), new_histogram());
        let mut end = header(END, 0).to_vec();
        end.extend_from_slice(&50u64.to_le_bytes());
        end.extend_from_slice(&5_000_000_000u64.to_le_bytes());
        assert_eq!(
            take(&end, 0, 64, &mut tally, &mut h),
            Some((50, 5_000_000_000))
        );
        assert!(tally.ended);
        assert_eq!(parse(b"LPFL"), None);
        assert_eq!(parse(b"XXXX\x01\x01\x00"), None);
        // A short end (no figures) is not taken for one.
        assert_eq!(parse(&header(END, 0)), None);
        // A count larger than the datagram holds takes only the whole messages there are.
        let mut short = messages(MEASURED, &[1, 2], 64);
        short[5] = 9;
        take(&short, 100, 64, &mut tally, &mut h);
        assert_eq!(tally.measured, 2);
    }
}
