//! The multicast state machines on a virtual clock: a sender, N receivers, a simulated group
//! (with per-receiver or shared seeded loss) and a lossless TCP path for NAKs and repairs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::mcast::ReceiverEventRef;
use crate::proto::{self, DataHeader, Decoded, Frame, Nak, StreamPos};

const ENGINE: u64 = 42;

fn data(topic: &str, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::encode_data(
        &mut out,
        &DataHeader {
            seq,
            ..DataHeader::default()
        },
        topic,
        payload,
    );
    out
}

fn sender_cfg(loss: Option<LossGen>) -> SenderConfig {
    SenderConfig {
        channel: 0,
        stream: 1,
        engine_id: ENGINE,
        datagram_bytes: 1472,
        heartbeat: Duration::from_millis(100),
        ring_bytes: 4 << 20,
        max_rate_bytes_per_s: 0,
        unicast_repair_max: 3,
        repair_window: Duration::from_millis(20),
        loss,
        linger: Duration::ZERO,
    }
}

fn rx_cfg(seed: u64) -> ReceiverConfig {
    ReceiverConfig {
        engine_id: ENGINE,
        nak_delay: Duration::from_millis(5),
        nak_retry: Duration::from_millis(60),
        repair: true,
        max_buffered: 65_536,
        seed,
    }
}

struct Rx {
    r: McastReceiver,
    loss: Option<LossGen>,
    /// (topic, seq) delivered, and GAPs.
    got: Vec<(String, u64)>,
    gaps: Vec<(String, u64, u64)>,
}

/// A sender, receivers, and the pretend network between them, on a virtual clock.
struct Net {
    now: Instant,
    sender: ChannelSender,
    rxs: Vec<Rx>,
    /// Unicast repairs in flight over "TCP": (due, receiver, bytes).
    tcp: Vec<(Instant, usize, Arc<[u8]>)>,
    gone: Vec<(Instant, usize, Nak)>,
    tcp_delay: Duration,
}

impl Net {
    fn new(
        sender_loss: Option<LossGen>,
        n: usize,
        rx_loss: impl Fn(usize) -> Option<LossGen>,
    ) -> Net {
        let now = Instant::now();
        let mut rxs = Vec::new();
        for i in 0..n {
            let mut r = McastReceiver::new(rx_cfg(i as u64 + 1));
            r.add_pattern("#");
            r.handle_stream_pos(
                now,
                StreamPos {
                    channel: 0,
                    stream: 1,
                    next_seq: 1,
                },
            );
            rxs.push(Rx {
                r,
                loss: rx_loss(i),
                got: Vec::new(),
                gaps: Vec::new(),
            });
        }
        Net {
            now,
            sender: ChannelSender::new(sender_cfg(sender_loss), now),
            rxs,
            tcp: Vec::new(),
            gone: Vec::new(),
            tcp_delay: Duration::from_micros(300),
        }
    }

    /// One engine turn with these frames, then 1 ms of network.
    fn turn(&mut self, frames: &[Vec<u8>]) {
        for f in frames {
            self.sender.handle_frame(self.now, 0, f);
        }
        self.sender.close_datagram(self.now, 0);
        self.step(Duration::from_millis(1));
    }

    fn step(&mut self, dt: Duration) {
        while let Some(d) = self.sender.poll_transmit(self.now, 0) {
            for rx in &mut self.rxs {
                if rx.loss.as_mut().is_some_and(LossGen::drop_next) {
                    continue;
                }
                rx.r.handle_datagram(self.now, &d, false);
            }
        }
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = self.tcp.drain(..).partition(|(at, _, _)| *at <= now);
        self.tcp = later;
        for (_, i, d) in due {
            self.rxs[i].r.handle_datagram(now, &d, true);
        }
        let (due, later): (Vec<_>, Vec<_>) = self.gone.drain(..).partition(|(at, _, _)| *at <= now);
        self.gone = later;
        for (_, i, g) in due {
            self.rxs[i].r.handle_gone(g);
        }
        let mut naks = Vec::new();
        let mut answers = Vec::new();
        for i in 0..self.rxs.len() {
            naks.clear();
            self.rxs[i].r.poll_naks(now, &mut naks);
            for nak in &naks {
                answers.clear();
                self.sender
                    .handle_nak(now, nak.from_seq, nak.count, &mut answers);
                for a in answers.drain(..) {
                    match a {
                        NakAnswer::Unicast(d) => self.tcp.push((now + self.tcp_delay, i, d)),
                        NakAnswer::Gone { from_seq, count } => self.gone.push((
                            now + self.tcp_delay,
                            i,
                            Nak {
                                channel: nak.channel,
                                stream: nak.stream,
                                from_seq,
                                count,
                            },
                        )),
                    }
                }
            }
        }
        for rx in &mut self.rxs {
            while let Some(e) = rx.r.poll_event() {
                match e {
                    ReceiverEvent::Data(bytes) => {
                        let Ok(Decoded::Frame(Frame::Data { header, topic, .. }, _)) =
                            proto::decode_frame(&bytes, bytes.len())
                        else {
                            panic!("receiver gave a non-DATA frame");
                        };
                        rx.got.push((topic.to_string(), header.seq));
                    }
                    ReceiverEvent::Gap {
                        topic,
                        from_seq,
                        to_seq,
                    } => rx.gaps.push((topic, from_seq, to_seq)),
                }
            }
        }
        self.now += dt;
    }

    /// Runs the network until every receiver has nothing missing (bounded).
    fn settle(&mut self) {
        for _ in 0..5_000 {
            self.step(Duration::from_millis(1));
            if self.tcp.is_empty()
                && self.gone.is_empty()
                && self.rxs.iter().all(|r| r.r.missing() == 0)
            {
                // One more heartbeat period, so a lost tail is found too.
                for _ in 0..150 {
                    self.step(Duration::from_millis(1));
                }
                if self.rxs.iter().all(|r| r.r.missing() == 0) && self.tcp.is_empty() {
                    return;
                }
            }
        }
        panic!("the network did not settle");
    }
}

/// Publishes `n` messages over 3 topics, `per_turn` per engine turn; returns what each topic
/// should show, in order.
fn publish(net: &mut Net, n: u64, per_turn: usize) -> Vec<(String, u64)> {
    let topics = ["a/x", "a/y", "b/z"];
    let mut seqs = [0u64; 3];
    let mut all = Vec::new();
    let mut batch = Vec::new();
    for i in 0..n {
        let t = (i % 3) as usize;
        seqs[t] += 1;
        batch.push(data(topics[t], seqs[t], &[7; 40]));
        all.push((topics[t].to_string(), seqs[t]));
        if batch.len() == per_turn {
            net.turn(&batch);
            batch.clear();
        }
    }
    net.turn(&batch);
    all
}

fn assert_exactly(net: &Net, want: &[(String, u64)]) {
    for (i, rx) in net.rxs.iter().enumerate() {
        assert!(
            rx.gaps.is_empty(),
            "receiver {i} reported gaps {:?}",
            rx.gaps
        );
        assert_eq!(rx.got.len(), want.len(), "receiver {i}: count");
        assert_eq!(rx.got, want, "receiver {i}: every message once, in order");
    }
}

#[test]
fn datagrams_roundtrip_and_garbage_is_refused() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    s.handle_frame(now, 99, &data("a", 1, b"x"));
    s.handle_frame(now, 99, &data("b", 1, b"yy"));
    s.close_datagram(now, 1234);
    let d = s.poll_transmit(now, 0).expect("one datagram");
    let p = parse_datagram(&d).expect("valid");
    assert_eq!(
        p.header,
        DatagramHeader {
            flags: 0,
            channel: 0,
            stream: 1,
            engine_id: ENGINE,
            seq: 1,
            send_ts_ns: 1234
        }
    );
    assert_eq!(p.frames().count(), 2);
    assert_eq!(&d[0..3], b"LP\x01");
    assert_eq!(parse_datagram(&d[..10]), Err(DatagramError::Short(10)));
    let mut bad = d.to_vec();
    bad[0] = b'X';
    assert_eq!(parse_datagram(&bad), Err(DatagramError::BadMagic));
    let truncated = &d[..d.len() - 1];
    assert_eq!(
        parse_datagram(truncated),
        Err(DatagramError::BadFrame { index: 1 })
    );
    // Another engine's datagram, and garbage, are ignored and counted.
    let mut r = McastReceiver::new(ReceiverConfig {
        engine_id: 7,
        ..rx_cfg(1)
    });
    r.handle_datagram(now, &d, false);
    r.handle_datagram(now, b"garbage", false);
    assert_eq!(r.counters.ignored, 2);
    assert!(r.poll_event().is_none());
}

#[test]
fn batches_fill_datagrams_up_to_the_configured_size() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let frame = data("plant/line1/t", 1, &[0; 100]);
    for _ in 0..100 {
        s.handle_frame(now, 0, &frame);
    }
    s.close_datagram(now, 0);
    let mut sizes = Vec::new();
    while let Some(d) = s.poll_transmit(now, 0) {
        assert!(d.len() <= 1472);
        sizes.push(d.len());
    }
    let per = (1472 - HEADER_BYTES) / frame.len();
    assert_eq!(sizes.len(), 100usize.div_ceil(per));
    assert_eq!(sizes[0], HEADER_BYTES + per * frame.len());
}

#[test]
fn without_loss_every_message_once_in_order_and_no_nak() {
    let mut net = Net::new(None, 3, |_| None);
    let want = publish(&mut net, 1000, 7);
    net.settle();
    assert_exactly(&net, &want);
    assert_eq!(net.sender.counters.naks_received, 0);
    assert!(net.sender.counters.heartbeats > 0);
}

fn repaired_with_shared_loss(percent: f64, burst: u32) {
    let mut net = Net::new(Some(LossGen::new(9, percent, burst)), 1, |_| None);
    let want = publish(&mut net, 3000, 5);
    net.settle();
    assert_exactly(&net, &want);
    let c = net.sender.counters;
    assert!(c.injected_drops > 0);
    let r = net.rxs[0].r.counters;
    // One receiver: every dropped datagram was repaired once, by unicast (few NAKs each).
    assert_eq!(c.unicast_repairs, c.injected_drops, "{c:?}");
    assert_eq!(r.repairs_received, c.injected_drops, "{r:?}");
    assert_eq!(c.multicast_repairs, 0);
    assert_eq!(c.unrecoverable, 0);
}

#[test]
fn five_percent_loss_is_repaired_exactly() {
    repaired_with_shared_loss(5.0, 1);
}

#[test]
fn twenty_percent_loss_is_repaired_exactly() {
    repaired_with_shared_loss(20.0, 1);
}

#[test]
fn bursts_of_fifty_are_repaired_exactly() {
    repaired_with_shared_loss(20.0, 50);
}

#[test]
fn independent_loss_per_receiver_is_repaired_by_unicast() {
    let mut net = Net::new(None, 2, |i| Some(LossGen::new(100 + i as u64, 20.0, 1)));
    let want = publish(&mut net, 2000, 5);
    net.settle();
    assert_exactly(&net, &want);
    let c = net.sender.counters;
    // Two receivers can never pass the unicast threshold (3) for one datagram.
    assert_eq!(c.multicast_repairs, 0, "{c:?}");
    let repaired: u64 = net.rxs.iter().map(|r| r.r.counters.repairs_received).sum();
    assert_eq!(c.unicast_repairs, repaired);
}

#[test]
fn the_same_loss_at_many_receivers_is_one_multicast_retransmission() {
    // A switch dropped it for everyone: 200 receivers NAK the same datagrams.
    let mut net = Net::new(Some(LossGen::new(5, 5.0, 1)), 200, |_| None);
    let want = publish(&mut net, 600, 5);
    net.settle();
    assert_exactly(&net, &want);
    let c = net.sender.counters;
    assert!(c.injected_drops > 0);
    assert_eq!(
        c.multicast_repairs, c.injected_drops,
        "one multicast retransmission per lost datagram: {c:?}"
    );
    assert!(
        c.unicast_repairs <= 3 * c.injected_drops,
        "unicast only for the first few NAKs: {c:?}"
    );
    // The random delay spreads the NAKs; most receivers never send theirs.
    let suppressed: u64 = net.rxs.iter().map(|r| r.r.counters.naks_suppressed).sum();
    let naked: u64 = net.rxs.iter().map(|r| r.r.counters.nak_datagrams).sum();
    assert!(
        suppressed > naked,
        "suppressed {suppressed} NAKs, sent {naked}"
    );
    assert!(c.nak_datagrams < 200 * c.injected_drops / 2, "{c:?}");
}

#[test]
fn a_lost_tail_is_found_by_the_heartbeat() {
    let mut net = Net::new(None, 1, |_| None);
    let want = publish(&mut net, 30, 10);
    // The last datagram: send it to nobody.
    net.sender.handle_frame(net.now, 0, &data("a/x", 11, b"t"));
    net.sender.close_datagram(net.now, 0);
    let _lost = net.sender.poll_transmit(net.now, 0);
    net.settle();
    let mut want = want;
    want.push(("a/x".to_string(), 11));
    assert_exactly(&net, &want);
    assert_eq!(net.sender.counters.unicast_repairs, 1);
}

#[test]
fn what_the_ring_no_longer_holds_is_a_gap() {
    let now = Instant::now();
    let mut cfg = sender_cfg(None);
    cfg.ring_bytes = 4096;
    let mut s = ChannelSender::new(cfg, now);
    let mut r = McastReceiver::new(rx_cfg(3));
    r.add_pattern("#");
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: 1,
        },
    );
    let mut sent = Vec::new();
    for seq in 1..=40 {
        s.handle_frame(now, 0, &data("t", seq, &[1; 400]));
        s.close_datagram(now, 0);
        sent.push(s.poll_transmit(now, 0).unwrap());
    }
    // Datagram 2 (message 2) lost; the receiver NAKs too late.
    for (i, d) in sent.iter().enumerate() {
        if i != 1 {
            r.handle_datagram(now, d, false);
        }
    }
    let mut naks = Vec::new();
    r.poll_naks(now + Duration::from_millis(10), &mut naks);
    assert_eq!(naks.len(), 1);
    let mut answers = Vec::new();
    s.handle_nak(now, naks[0].from_seq, naks[0].count, &mut answers);
    assert_eq!(
        answers,
        vec![NakAnswer::Gone {
            from_seq: 2,
            count: 1
        }]
    );
    r.handle_gone(Nak {
        channel: 0,
        stream: 1,
        from_seq: 2,
        count: 1,
    });
    let mut got = Vec::new();
    while let Some(e) = r.poll_event() {
        got.push(e);
    }
    assert_eq!(got.len(), 40);
    assert_eq!(
        got[1],
        ReceiverEvent::Gap {
            topic: "t".into(),
            from_seq: 2,
            to_seq: 2
        }
    );
    assert_eq!(s.counters.unrecoverable, 1);
    assert_eq!(r.counters.gone, 1);
}

/// `n` messages of topic `a/t` from `*seq + 1`, one datagram each.
fn emit(s: &mut ChannelSender, seq: &mut u64, n: u64) -> Vec<Arc<[u8]>> {
    let now = Instant::now();
    (0..n)
        .map(|_| {
            *seq += 1;
            s.handle_frame(now, 0, &data("a/t", *seq, b"v"));
            s.close_datagram(now, 0);
            s.poll_transmit(now, 0).expect("a datagram")
        })
        .collect()
}

#[test]
fn late_joiner_stitches_the_snapshot_to_the_stream_without_gap_or_duplicate() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let mut r = McastReceiver::new(rx_cfg(4));
    let mut seq = 0;
    // Messages 1..=10 went out before the receiver joined the group.
    emit(&mut s, &mut seq, 10);
    // Joined and subscribed (held until SUBACK): 11..=12 arrive before the snapshot is taken.
    r.add_pattern("a/#");
    r.hold();
    let mut joined = emit(&mut s, &mut seq, 2);
    // The snapshot is taken now: retained value seq 12, and the stream's position.
    let pos = s.position();
    // 13..=15 after the snapshot.
    joined.extend(emit(&mut s, &mut seq, 3));
    for d in &joined {
        r.handle_datagram(now, d, false);
    }
    assert!(
        r.poll_event().is_none(),
        "nothing before STREAM_POS and SUBACK"
    );
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: pos,
        },
    );
    r.handle_snapshot("a/t", 12);
    assert!(r.poll_event().is_none(), "nothing before SUBACK");
    r.unhold();
    let mut seqs = Vec::new();
    while let Some(ReceiverEvent::Data(b)) = r.poll_event() {
        seqs.push(proto::data_frame_seq(&b).unwrap());
    }
    assert_eq!(seqs, vec![13, 14, 15]);
    let mut naks = Vec::new();
    r.poll_naks(now + Duration::from_secs(1), &mut naks);
    assert!(naks.is_empty(), "nothing before the position is missing");
}

#[test]
fn a_snapshot_frame_still_in_the_open_datagram_is_not_delivered_twice() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let mut r = McastReceiver::new(rx_cfg(7));
    r.add_pattern("#");
    r.hold();
    // Message 1 is ingested (and retained) but its datagram is not sealed yet when the
    // snapshot is taken: the position names that datagram.
    s.handle_frame(now, 0, &data("a/t", 1, b"v"));
    let pos = s.position();
    s.handle_frame(now, 0, &data("a/t", 2, b"v"));
    s.close_datagram(now, 0);
    r.handle_datagram(now, &s.poll_transmit(now, 0).unwrap(), false);
    r.handle_snapshot("a/t", 1);
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: pos,
        },
    );
    r.unhold();
    let mut seqs = Vec::new();
    while let Some(ReceiverEvent::Data(b)) = r.poll_event() {
        seqs.push(proto::data_frame_seq(&b).unwrap());
    }
    assert_eq!(seqs, vec![2]);
    assert_eq!(r.counters.stitched, 1);
}

#[test]
fn a_stream_position_past_a_lost_datagram_still_naks_it() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let mut r = McastReceiver::new(rx_cfg(5));
    r.add_pattern("#");
    let pos = s.position();
    let mut sent = Vec::new();
    for seq in 1..=3 {
        s.handle_frame(now, 0, &data("t", seq, b"v"));
        s.close_datagram(now, 0);
        sent.push(s.poll_transmit(now, 0).unwrap());
    }
    // The first datagram after the position is lost; the next ones came before STREAM_POS.
    r.handle_datagram(now, &sent[1], false);
    r.handle_datagram(now, &sent[2], false);
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: pos,
        },
    );
    assert!(r.poll_event().is_none());
    let mut naks = Vec::new();
    r.poll_naks(now + Duration::from_millis(6), &mut naks);
    assert_eq!(naks.len(), 1);
    assert_eq!((naks[0].from_seq, naks[0].count), (1, 1));
    r.handle_datagram(now, &sent[0], true);
    let mut n = 0;
    while let Some(ReceiverEvent::Data(_)) = r.poll_event() {
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn duplicates_and_reordering_are_handled() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let mut r = McastReceiver::new(rx_cfg(6));
    r.add_pattern("#");
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: 1,
        },
    );
    let mut sent = Vec::new();
    for seq in 1..=20 {
        s.handle_frame(now, 0, &data("t", seq, b"v"));
        s.close_datagram(now, 0);
        sent.push(s.poll_transmit(now, 0).unwrap());
    }
    for d in sent.iter().rev().chain(sent.iter()) {
        r.handle_datagram(now, d, false);
    }
    let mut seqs = Vec::new();
    while let Some(ReceiverEvent::Data(b)) = r.poll_event() {
        seqs.push(proto::data_frame_seq(&b).unwrap());
    }
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(r.counters.duplicates, 20);
    let mut naks = Vec::new();
    r.poll_naks(now + Duration::from_secs(1), &mut naks);
    assert!(
        naks.is_empty(),
        "reordered datagrams came before their NAK was due"
    );
}

#[test]
fn latest_receivers_skip_without_naks() {
    let mut net = Net::new(None, 1, |_| Some(LossGen::new(8, 20.0, 1)));
    net.rxs[0].r = {
        let mut r = McastReceiver::new(ReceiverConfig {
            repair: false,
            ..rx_cfg(8)
        });
        r.add_pattern("#");
        r.handle_stream_pos(
            net.now,
            StreamPos {
                channel: 0,
                stream: 1,
                next_seq: 1,
            },
        );
        r
    };
    publish(&mut net, 300, 1);
    net.settle();
    let rx = &net.rxs[0];
    assert_eq!(net.sender.counters.naks_received, 0);
    assert!(rx.r.counters.skipped > 0);
    assert!(rx.gaps.is_empty());
    // In order per topic, nothing twice.
    for t in ["a/x", "a/y", "b/z"] {
        let seqs: Vec<u64> = rx
            .got
            .iter()
            .filter(|(x, _)| x == t)
            .map(|(_, s)| *s)
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{t}: {seqs:?}");
    }
}

#[test]
fn a_frame_larger_than_a_datagram_goes_by_tcp() {
    let mut net = Net::new(None, 1, |_| None);
    let big = data("a/x", 1, &[3; 4000]);
    net.turn(&[data("a/y", 1, b"small"), big, data("a/y", 2, b"after")]);
    net.settle();
    assert_eq!(
        net.rxs[0].got,
        vec![
            ("a/y".to_string(), 1),
            ("a/x".to_string(), 1),
            ("a/y".to_string(), 2)
        ]
    );
    let c = net.sender.counters;
    assert_eq!(c.oversized_frames, 1);
    assert_eq!(c.unicast_repairs, 1);
    assert!(net.rxs[0].r.counters.repairs_received == 1);
}

#[test]
fn the_send_rate_is_paced() {
    let now = Instant::now();
    let mut cfg = sender_cfg(None);
    cfg.max_rate_bytes_per_s = 1_000_000;
    let mut s = ChannelSender::new(cfg, now);
    let frame = data("t", 1, &[0; 1000]);
    for _ in 0..100 {
        s.handle_frame(now, 0, &frame);
        s.close_datagram(now, 0);
    }
    // Over 50 ms of virtual time at 1 MB/s: about 50 KB, never much more.
    let mut bytes = 0;
    let mut t = now;
    while t < now + Duration::from_millis(50) {
        while let Some(d) = s.poll_transmit(t, 0) {
            bytes += d.len();
        }
        t = s.poll_timeout().max(t + Duration::from_micros(100));
    }
    assert!((40_000..=65_000).contains(&bytes), "{bytes} bytes in 50 ms");
}

#[test]
fn pattern_overlap() {
    for (a, b, want) in [
        ("plant/line1/#", "plant/#", true),
        ("plant/line1/#", "plant/line2/#", false),
        ("plant/+/t", "plant/line1/#", true),
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("a/+", "a/b/c", false),
        ("#", "x", true),
        ("a", "a/b", false),
    ] {
        assert_eq!(patterns_overlap(a, b), want, "{a} vs {b}");
        assert_eq!(patterns_overlap(b, a), want, "{b} vs {a}");
    }
}

#[test]
fn the_loss_generator_drops_about_the_asked_share() {
    for (percent, burst) in [(5.0, 1), (20.0, 1), (20.0, 50)] {
        let mut g = LossGen::new(11, percent, burst);
        let dropped = (0..200_000).filter(|_| g.drop_next()).count() as f64 / 2000.0;
        assert!(
            (dropped - percent).abs() < percent * 0.2,
            "{percent} % in bursts of {burst}: dropped {dropped} %"
        );
    }
}

#[test]
fn hostile_datagrams_and_ranges_cannot_grow_the_receiver() {
    let now = Instant::now();
    let mut r = McastReceiver::new(ReceiverConfig {
        max_buffered: 100,
        ..rx_cfg(9)
    });
    r.add_pattern("#");
    // Datagrams on 10,000 made-up streams, none with a position: bounded buffering.
    let frame = data("t", 1, b"v");
    for i in 0..10_000u32 {
        let mut d = vec![0; HEADER_BYTES];
        DatagramHeader {
            flags: 0,
            channel: (i >> 16) as u16,
            stream: i as u16,
            engine_id: ENGINE,
            seq: u64::from(i) + 1,
            send_ts_ns: 0,
        }
        .write(&mut d);
        d.extend_from_slice(&frame);
        r.handle_datagram(now, &d, false);
    }
    assert_eq!(
        r.counters.buffer_overflow + r.counters.ignored,
        10_000 - 100
    );
    assert_eq!(r.missing(), 0, "no position, nothing tracked as missing");
    // A position, then a datagram far ahead: missing is capped, and a REPAIR_GONE of a huge
    // range marks only what was asked.
    r.handle_stream_pos(
        now,
        StreamPos {
            channel: 0,
            stream: 1,
            next_seq: 1,
        },
    );
    let mut s = ChannelSender::new(sender_cfg(None), now);
    s.handle_frame(now, 0, &frame);
    s.close_datagram(now, 0);
    let mut far = s.poll_transmit(now, 0).unwrap().to_vec();
    far[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    r.handle_datagram(now, &far, false);
    assert!(r.missing() <= 16_384, "{}", r.missing());
    r.handle_gone(Nak {
        channel: 0,
        stream: 1,
        from_seq: 0,
        count: u32::MAX,
    });
    assert_eq!(r.missing(), 0);
    r.handle_gone(Nak {
        channel: 0,
        stream: 1,
        from_seq: 0,
        count: 0,
    });
}

/// The borrowing inputs (`*_into`) hand the sink exactly what the owned ones queue, in the
/// same order, whatever the datagrams' order: held before SUBACK, before STREAM_POS, early,
/// duplicated, repaired over TCP, gone.
#[test]
fn the_borrowing_path_delivers_what_the_owned_path_does() {
    let now = Instant::now();
    let mut s = ChannelSender::new(sender_cfg(None), now);
    let mut sent = Vec::new();
    let topics = ["a/x", "a/y", "b/z", "c/w"];
    let mut seqs = [0u64; 4];
    for d in 0..60u64 {
        for k in 0..3 {
            let t = ((d * 3 + k) % 4) as usize;
            seqs[t] += 1;
            s.handle_frame(now, 0, &data(topics[t], seqs[t], b"payload"));
        }
        s.close_datagram(now, 0);
        sent.push(s.poll_transmit(now, 0).expect("a datagram"));
    }
    // A seeded scramble: some early, some twice, some only by "TCP", two gone.
    let mut order: Vec<(usize, bool)> = Vec::new();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..sent.len() {
        order.push((i, false));
        if next() % 5 == 0 && i + 3 < sent.len() {
            order.push((i + 3, false));
        }
        if next() % 7 == 0 {
            order.push((i, true));
        }
    }
    order.retain(|&(i, tcp)| (tcp || i != 17) && i != 40);
    order.insert(30, (17, true));
    let pos = StreamPos {
        channel: 0,
        stream: 1,
        next_seq: 3,
    };
    let gone = Nak {
        channel: 0,
        stream: 1,
        from_seq: 41,
        count: 1,
    };

    let mut owned = McastReceiver::new(rx_cfg(9));
    let mut borrowed = McastReceiver::new(rx_cfg(9));
    let mut got_owned = Vec::new();
    let mut got_borrowed = Vec::new();
    for r in [&mut owned, &mut borrowed] {
        r.add_pattern("a/#");
        r.add_pattern("b/z");
        r.hold();
        r.handle_snapshot("a/x", 2);
    }
    for (step, &(i, tcp)) in order.iter().enumerate() {
        let t = now + Duration::from_micros(step as u64);
        if step == 5 {
            owned.handle_stream_pos(t, pos);
            borrowed.handle_stream_pos_into(t, pos, &mut |e| got_borrowed.push(e.to_event()));
        }
        if step == 9 {
            owned.unhold();
            borrowed.unhold_into(&mut |e| got_borrowed.push(e.to_event()));
        }
        owned.handle_datagram(t, &sent[i], tcp);
        borrowed.handle_datagram_into(t, &sent[i], tcp, &mut |e| {
            if let ReceiverEventRef::Data {
                frame,
                header,
                topic,
                payload,
            } = e
            {
                // The decoded fields are the frame's.
                let Ok(Decoded::Frame(
                    Frame::Data {
                        header: h,
                        topic: tp,
                        payload: p,
                    },
                    n,
                )) = proto::decode_frame(frame, frame.len())
                else {
                    panic!("not a DATA frame");
                };
                assert_eq!((h, tp, p, n), (header, topic, payload, frame.len()));
            }
            got_borrowed.push(e.to_event());
        });
        while let Some(e) = owned.poll_event() {
            got_owned.push(e);
        }
    }
    // Datagram 41 (index 40) never came: the engine no longer has it.
    owned.handle_gone(gone);
    borrowed.handle_gone_into(gone, &mut |e| got_borrowed.push(e.to_event()));
    while let Some(e) = owned.poll_event() {
        got_owned.push(e);
    }
    assert!(borrowed.poll_event().is_none());
    assert_eq!(got_owned, got_borrowed);
    assert_eq!(owned.counters, borrowed.counters);
    // And it is right: per topic in order, from after the snapshot, only subscribed topics,
    // one GAP for the gone datagram's messages.
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    let mut gaps = 0;
    for e in &got_borrowed {
        match e {
            ReceiverEvent::Data(b) => {
                let Ok(Decoded::Frame(Frame::Data { header, topic, .. }, _)) =
                    proto::decode_frame(b, b.len())
                else {
                    panic!("not a DATA frame");
                };
                assert!(!topic.starts_with("c/"), "unsubscribed topic delivered");
                let l = last.entry(topic.to_string()).or_insert(0);
                assert!(header.seq > *l, "{topic} {} after {}", header.seq, *l);
                *l = header.seq;
            }
            ReceiverEvent::Gap { .. } => gaps += 1,
        }
    }
    assert!(gaps >= 1, "the gone datagram is reported");
    assert_eq!(last["a/x"], seqs[0]);
    assert_eq!(last["b/z"], seqs[2]);
    assert_eq!(borrowed.missing(), 0);
}

/// `linger`: turns' frames share a datagram until it is full or has waited `linger`; the
/// deadline is in `poll_timeout`, and without linger every turn seals its own.
#[test]
fn a_lingering_datagram_gathers_turns_until_full_or_due() {
    let t0 = Instant::now();
    let linger = Duration::from_millis(1);
    let mut s = ChannelSender::new(
        SenderConfig {
            linger,
            heartbeat: Duration::from_secs(10),
            ..sender_cfg(None)
        },
        t0,
    );
    let frame = data("a/x", 1, &[7; 100]);
    // Three turns 200 µs apart: one open datagram, nothing to send, woken at its deadline.
    for i in 0..3u32 {
        let now = t0 + Duration::from_micros(200) * i;
        s.handle_frame(now, 0, &frame);
        s.end_turn(now, 0);
        assert!(s.poll_transmit(now, 0).is_none(), "turn {i} sent early");
        assert_eq!(s.poll_timeout(), t0 + linger);
    }
    let due = t0 + linger;
    s.end_turn(due, 0);
    let d = s.poll_transmit(due, 0).expect("sealed at its deadline");
    assert_eq!(parse_datagram(&d).unwrap().frames().count(), 3);
    assert!(s.poll_transmit(due, 0).is_none());
    // A full datagram goes at once, whatever the linger.
    let per_datagram = (1472 - HEADER_BYTES) / frame.len();
    for _ in 0..per_datagram + 1 {
        s.handle_frame(due, 0, &frame);
    }
    s.end_turn(due, 0);
    let full = s.poll_transmit(due, 0).expect("a full datagram");
    assert_eq!(
        parse_datagram(&full).unwrap().frames().count(),
        per_datagram
    );
    assert!(s.poll_transmit(due, 0).is_none(), "the extra frame lingers");
    // Without linger, each turn is a datagram.
    let mut eager = ChannelSender::new(sender_cfg(None), t0);
    for i in 0..3u32 {
        let now = t0 + Duration::from_micros(200) * i;
        eager.handle_frame(now, 0, &frame);
        eager.end_turn(now, 0);
        assert!(eager.poll_transmit(now, 0).is_some(), "turn {i}");
    }
}
