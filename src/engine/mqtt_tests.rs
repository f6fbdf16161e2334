//! The MQTT listener's semantics on the in-memory harness (virtual clock, no sockets): the
//! packet ⇄ `Op` mapping, retained values, QoS 1 both ways with the in-flight window, the will,
//! keep-alive, malformed packets, and the encode-once sharing of a QoS 0 PUBLISH.

use std::sync::Arc;
use std::time::Duration;

use super::harness::{Client, Cluster, Got};
use crate::mqtt::{self, Connect, Decoded, Packet, Publish, QoS, Will};

/// What an MQTT client read, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum In {
    ConnAck(u8),
    /// CONNACK with session present 1.
    ConnAckResumed,
    SubAck(Vec<u8>),
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
        pkid: u16,
    },
    PubAck(u16),
    UnsubAck,
    PingResp,
}

fn decode_all(bytes: &[u8]) -> Vec<In> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match mqtt::decode_packet(&bytes[at..], usize::MAX).expect("the engine writes valid MQTT") {
            Decoded::Packet(p, n) => {
                at += n;
                out.push(match p {
                    Packet::ConnAck {
                        session_present: true,
                        code: 0,
                    } => In::ConnAckResumed,
                    Packet::ConnAck { code, .. } => In::ConnAck(code),
                    Packet::SubAck { codes, .. } => In::SubAck(codes),
                    Packet::Publish(p) => In::Publish {
                        topic: p.topic.into(),
                        payload: p.payload.into(),
                        qos: p.qos as u8,
                        retain: p.retain,
                        pkid: p.pkid,
                    },
                    Packet::PubAck { pkid } => In::PubAck(pkid),
                    Packet::UnsubAck { .. } => In::UnsubAck,
                    Packet::PingResp => In::PingResp,
                    other => panic!("the engine sent a client packet: {other:?}"),
                });
            }
            Decoded::NeedMore(_) => panic!("a partial packet in {bytes:02x?}"),
        }
    }
    out
}

fn publish_in(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> In {
    In::Publish {
        topic: topic.into(),
        payload: payload.into(),
        qos,
        retain,
        pkid,
    }
}

struct Mqtt<'a> {
    cluster: &'a mut Cluster,
}

impl Mqtt<'_> {
    fn send(&mut self, client: Client, packet: &Packet<'_>) {
        let mut bytes = Vec::new();
        mqtt::encode_packet(&mut bytes, packet);
        let used = self.cluster.send_bytes(client, &bytes);
        assert_eq!(used, bytes.len());
        self.cluster.run();
    }

    fn recv(&mut self, client: Client) -> Vec<In> {
        decode_all(&self.cluster.recv_bytes(client))
    }

    fn connect_with(&mut self, shard: u16, connect: Connect<'_>) -> Client {
        let client = self.cluster.connect_mqtt_raw(shard);
        self.send(client, &Packet::Connect(connect));
        assert_eq!(self.recv(client), vec![In::ConnAck(0)]);
        client
    }

    fn connect(&mut self, shard: u16, client_id: &str) -> Client {
        self.connect_with(shard, connect(client_id, 60, None))
    }

    fn subscribe(&mut self, client: Client, filter: &str, qos: QoS) -> Vec<In> {
        self.send(
            client,
            &Packet::Subscribe {
                pkid: 1,
                filters: vec![(filter, qos)],
            },
        );
        self.recv(client)
    }

    fn publish(&mut self, client: Client, topic: &str, payload: &[u8], qos: QoS, pkid: u16) {
        self.send(
            client,
            &Packet::Publish(Publish {
                topic,
                payload,
                qos,
                retain: false,
                dup: false,
                pkid,
            }),
        );
    }
}

fn connect<'a>(client_id: &'a str, keep_alive_s: u16, will: Option<Will<'a>>) -> Connect<'a> {
    Connect {
        client_id,
        clean_session: true,
        keep_alive_s,
        username: None,
        password: None,
        will,
    }
}

fn data_payloads(got: &[Got]) -> Vec<(String, Vec<u8>, bool)> {
    got.iter()
        .filter_map(|g| match g {
            Got::Data {
                topic,
                payload,
                snapshot,
                ..
            } => Some((topic.clone(), payload.clone(), *snapshot)),
            _ => None,
        })
        .collect()
}

#[test]
fn mqtt_and_native_clients_see_each_others_messages() {
    let mut cluster = Cluster::new(2, |_| {});
    let native_sub = cluster.connect(0, "hmi");
    cluster.subscribe(native_sub, 1, "plant/#", crate::proto::DeliveryMode::All);
    cluster.run();
    cluster.recv(native_sub);
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    // The MQTT clients on the other shard: the messages cross shards both ways.
    let sub = m.connect(1, "mqtt-sub");
    assert_eq!(
        m.subscribe(sub, "plant/+/t", QoS::AtMostOnce),
        vec![In::SubAck(vec![0])]
    );
    let publisher = m.connect(1, "mqtt-pub");

    m.cluster.publish(native_pub, "plant/l1/t", b"21.5");
    m.cluster.run();
    assert_eq!(
        m.recv(sub),
        vec![publish_in("plant/l1/t", b"21.5", 0, false, 0)]
    );

    m.publish(publisher, "plant/l2/t", b"7", QoS::AtMostOnce, 0);
    assert_eq!(
        m.recv(sub),
        vec![publish_in("plant/l2/t", b"7", 0, false, 0)]
    );
    let got = m.cluster.recv(native_sub);
    assert_eq!(
        data_payloads(&got),
        vec![
            ("plant/l1/t".to_string(), b"21.5".to_vec(), false),
            ("plant/l2/t".to_string(), b"7".to_vec(), false)
        ]
    );
    assert!(m.recv(publisher).is_empty(), "QoS 0 has no acknowledgement");
}

#[test]
fn retained_values_arrive_after_suback_with_retain_set() {
    let mut cluster = Cluster::new(2, |_| {});
    let native_pub = cluster.connect(0, "plc");
    cluster.publish(native_pub, "plant/a", b"1");
    cluster.publish(native_pub, "plant/a", b"2");
    cluster.run();
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let publisher = m.connect(1, "gw");
    // PUBLISH retain=1 is retained like every message (the engine keeps each topic's last).
    m.send(
        publisher,
        &Packet::Publish(Publish {
            topic: "plant/b",
            payload: b"x",
            qos: QoS::AtMostOnce,
            retain: true,
            dup: false,
            pkid: 0,
        }),
    );
    let late = m.connect(0, "late");
    let got = m.subscribe(late, "plant/#", QoS::AtLeastOnce);
    // The retained values, from both shards, then SUBACK (spec 3.8.4 allows this order).
    assert_eq!(got.last(), Some(&In::SubAck(vec![1])));
    let mut values = got[..got.len() - 1].to_vec();
    values.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(
        values,
        vec![
            publish_in("plant/a", b"2", 0, true, 0),
            publish_in("plant/b", b"x", 0, true, 0)
        ]
    );
    // Live messages after it have RETAIN 0.
    m.cluster.publish(native_pub, "plant/a", b"3");
    m.cluster.run();
    assert_eq!(m.recv(late), vec![publish_in("plant/a", b"3", 1, false, 1)]);
}

#[test]
fn qos1_inbound_is_acknowledged_once_the_core_took_it() {
    let mut cluster = Cluster::new(2, |_| {});
    let native_sub = cluster.connect(1, "hist");
    cluster.subscribe(native_sub, 1, "#", crate::proto::DeliveryMode::All);
    cluster.run();
    cluster.recv(native_sub);
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let publisher = m.connect(0, "gw");
    m.publish(publisher, "a/b", b"v", QoS::AtLeastOnce, 42);
    assert_eq!(m.recv(publisher), vec![In::PubAck(42)]);
    let got = m.cluster.recv(native_sub);
    assert_eq!(
        data_payloads(&got),
        vec![("a/b".to_string(), b"v".to_vec(), false)]
    );
}

#[test]
fn qos1_outbound_respects_the_window_and_catches_up_from_the_ring() {
    let mut cluster = Cluster::new(1, |c| c.mqtt.max_inflight = 2);
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let sub = m.connect(0, "hist");
    assert_eq!(
        m.subscribe(sub, "t/#", QoS::ExactlyOnce),
        vec![In::SubAck(vec![1])]
    );
    for i in 0..5u8 {
        m.cluster.publish(native_pub, "t/a", &[i]);
    }
    m.cluster.run();
    let first = m.recv(sub);
    assert_eq!(
        first,
        vec![
            publish_in("t/a", &[0], 1, false, 1),
            publish_in("t/a", &[1], 1, false, 2)
        ],
        "two in flight, the rest wait"
    );
    // The window is full and the topic lags: the MQTT subscriber (mode `all`) holds the native
    // publisher back (pacing), so the rest arrives as the subscriber acknowledges, caught up
    // from the ring at QoS 1, in order, none lost.
    assert!(
        m.cluster.unread_by_engine(native_pub) > 0,
        "the publisher is paced"
    );
    let mut payloads = vec![0u8, 1];
    let mut next_ack = 1u16;
    for _ in 0..10 {
        if payloads.len() == 5 {
            break;
        }
        m.send(sub, &Packet::PubAck { pkid: next_ack });
        next_ack += 1;
        for got in m.recv(sub) {
            let In::Publish {
                payload, qos, pkid, ..
            } = got
            else {
                panic!("expected PUBLISH, got {got:?}");
            };
            assert_eq!((qos, pkid as usize), (1, payloads.len() + 1));
            payloads.push(payload[0]);
        }
    }
    assert_eq!(payloads, [0, 1, 2, 3, 4], "in order, none lost");
    assert_eq!(
        m.cluster.unread_by_engine(native_pub),
        0,
        "the publisher resumed"
    );
    while next_ack <= 5 {
        m.send(sub, &Packet::PubAck { pkid: next_ack });
        next_ack += 1;
    }
    m.cluster.publish(native_pub, "t/a", b"live");
    m.cluster.run();
    assert_eq!(m.recv(sub), vec![publish_in("t/a", b"live", 1, false, 6)]);
}

#[test]
fn a_qos0_publish_is_encoded_once_and_shared_by_every_mqtt_subscriber() {
    let mut cluster = Cluster::new(1, |_| {});
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let subs: Vec<Client> = (0..3)
        .map(|i| {
            let c = m.connect(0, &format!("hmi{i}"));
            m.subscribe(c, "plant/#", QoS::AtMostOnce);
            c
        })
        .collect();
    for &c in &subs {
        m.cluster.set_capacity(c, 0);
    }
    m.cluster.publish(native_pub, "plant/t", b"42");
    m.cluster.run();
    let core = &m.cluster.cores[0];
    let fronts: Vec<_> = subs
        .iter()
        .map(|c| {
            core.session(c.slot)
                .and_then(|s| s.outbox.frames().last().cloned())
                .expect("queued")
        })
        .collect();
    assert!(fronts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
    assert_eq!(
        decode_all(&fronts[0]),
        vec![publish_in("plant/t", b"42", 0, false, 0)]
    );
}

#[test]
fn the_will_is_published_when_the_connection_dies_not_after_disconnect() {
    let mut cluster = Cluster::new(2, |_| {});
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let watcher = m.connect(0, "watcher");
    m.subscribe(watcher, "status/#", QoS::AtMostOnce);
    let will = Will {
        topic: "status/gw",
        message: b"offline",
        qos: QoS::AtMostOnce,
        retain: true,
    };
    let dies = m.connect_with(1, connect("gw", 60, Some(will)));
    m.cluster.hang_up(dies);
    assert_eq!(
        m.recv(watcher),
        vec![publish_in("status/gw", b"offline", 0, false, 0)]
    );

    let polite = m.connect_with(
        1,
        connect(
            "gw2",
            60,
            Some(Will {
                topic: "status/gw2",
                ..will
            }),
        ),
    );
    m.send(polite, &Packet::Disconnect);
    assert!(m.cluster.is_closed(polite));
    assert!(m.recv(watcher).is_empty(), "no will after DISCONNECT");
}

#[test]
fn keepalive_closes_after_one_and_a_half_periods_and_publishes_the_will() {
    let mut cluster = Cluster::new(1, |_| {});
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let watcher = m.connect_with(0, connect("w", 0, None));
    m.subscribe(watcher, "status/#", QoS::AtMostOnce);
    let will = Will {
        topic: "status/x",
        message: b"lost",
        qos: QoS::AtMostOnce,
        retain: false,
    };
    let client = m.connect_with(0, connect("x", 2, Some(will)));
    m.cluster.advance(Duration::from_millis(1_500));
    m.send(client, &Packet::PingReq);
    assert_eq!(m.recv(client), vec![In::PingResp]);
    m.cluster.advance(Duration::from_millis(2_999));
    assert!(
        !m.cluster.is_closed(client),
        "1.5 x 2 s after the PINGREQ: not yet"
    );
    assert!(
        m.cluster.recv_bytes(client).is_empty(),
        "an MQTT server never pings"
    );
    m.cluster.advance(Duration::from_millis(1_100));
    assert!(m.cluster.write_shut(client) || m.cluster.is_closed(client));
    assert_eq!(
        m.recv(watcher),
        vec![publish_in("status/x", b"lost", 0, false, 0)]
    );
    // Keep-alive 0: never closed for silence.
    m.cluster.advance(Duration::from_secs(3_600));
    assert!(!m.cluster.is_closed(watcher));
}

#[test]
fn malformed_and_unexpected_packets_close_the_connection() {
    let mut cluster = Cluster::new(1, |_| {});
    // Not CONNECT first: closed without a CONNACK.
    let c = cluster.connect_mqtt_raw(0);
    cluster.send_bytes(c, &[0xc0, 0]);
    cluster.run();
    assert!(cluster.recv_bytes(c).is_empty());
    assert!(cluster.write_shut(c) || cluster.is_closed(c));
    // MQTT 5: CONNACK 1 (unacceptable protocol level), then the close.
    let c = cluster.connect_mqtt_raw(0);
    cluster.send_bytes(
        c,
        &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0, 0],
    );
    cluster.run();
    assert_eq!(decode_all(&cluster.recv_bytes(c)), vec![In::ConnAck(1)]);
    assert!(cluster.write_shut(c) || cluster.is_closed(c));
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    // Empty client id without clean session: CONNACK 2.
    let c = m.cluster.connect_mqtt_raw(0);
    m.send(
        c,
        &Packet::Connect(Connect {
            clean_session: false,
            ..connect("", 10, None)
        }),
    );
    assert_eq!(m.recv(c), vec![In::ConnAck(2)]);
    for bad in [
        &[0x36u8, 5, 0, 1, b'a', 0, 1][..], // QoS 3
        &[0x30, 5, 0, 3, b'a', b'/', b'#'], // wildcard in a topic name
        &[0x34, 6, 0, 1, b'a', 0, 1, b'v'], // QoS 2
        &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 0, 0, 0], // CONNECT twice
        &[0x30, 0xff, 0xff, 0xff, 0x7f],    // larger than max_frame_bytes
    ] {
        let c = m.connect(0, "c");
        let errors_before = m.cluster.cores[0].counters.protocol_errors;
        m.cluster.send_bytes(c, bad);
        m.cluster.run();
        assert!(
            m.cluster.write_shut(c) || m.cluster.is_closed(c),
            "{bad:02x?} did not close"
        );
        assert_eq!(
            m.cluster.cores[0].counters.protocol_errors,
            errors_before + 1
        );
    }
}

#[test]
fn subscribe_refuses_bad_filters_and_unsubscribe_stops_delivery() {
    let mut cluster = Cluster::new(1, |_| {});
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let c = m.connect(0, "hmi");
    m.send(
        c,
        &Packet::Subscribe {
            pkid: 9,
            filters: vec![("a/#", QoS::AtMostOnce), ("a/b#", QoS::AtLeastOnce)],
        },
    );
    assert_eq!(m.recv(c), vec![In::SubAck(vec![0, mqtt::SUBACK_FAILURE])]);
    // The same filter again replaces the subscription: one copy per message.
    assert_eq!(
        m.subscribe(c, "a/#", QoS::AtLeastOnce),
        vec![In::SubAck(vec![1])]
    );
    m.cluster.publish(native_pub, "a/x", b"1");
    m.cluster.run();
    assert_eq!(m.recv(c), vec![publish_in("a/x", b"1", 1, false, 1)]);
    m.send(
        c,
        &Packet::Unsubscribe {
            pkid: 10,
            filters: vec!["a/#", "never/subscribed"],
        },
    );
    assert_eq!(m.recv(c), vec![In::UnsubAck]);
    m.cluster.publish(native_pub, "a/x", b"2");
    m.cluster.run();
    assert!(m.recv(c).is_empty());
    assert_eq!(
        m.cluster.cores[0].session(c.slot).map(|s| s.sub_count()),
        Some(0)
    );
}

#[test]
fn suback_waits_for_the_snapshot_of_another_shard() {
    let mut cluster = Cluster::new(2, |_| {});
    let native_pub = cluster.connect(0, "plc");
    cluster.publish(native_pub, "plant/a", b"1");
    cluster.run();
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let late = m.connect(1, "late");
    let got = m.subscribe(late, "plant/#", QoS::AtMostOnce);
    assert_eq!(
        got,
        vec![publish_in("plant/a", b"1", 0, true, 0), In::SubAck(vec![0])]
    );
}

#[test]
fn no_will_from_a_refused_connect_or_at_engine_shutdown() {
    let mut cluster = Cluster::new(1, |c| c.limits.max_client_id_bytes = 8);
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let watcher = m.connect(0, "w");
    m.subscribe(watcher, "status/#", QoS::AtMostOnce);
    let will = Will {
        topic: "status/x",
        message: b"lost",
        qos: QoS::AtMostOnce,
        retain: false,
    };
    // A client id over limits.max_client_id_bytes: CONNACK 2, and no will.
    let refused = m.cluster.connect_mqtt_raw(0);
    m.send(
        refused,
        &Packet::Connect(connect("far-too-long-an-id", 10, Some(will))),
    );
    assert_eq!(m.recv(refused), vec![In::ConnAck(2)]);
    m.cluster.hang_up(refused);
    assert!(m.recv(watcher).is_empty());
    let gw = m.connect_with(0, connect("gw", 10, Some(will)));
    let published = m.cluster.cores[0].counters.publishes_in;
    let now = m.cluster.now;
    m.cluster.cores[0].shut_down(now);
    m.cluster.run();
    // The reactor drops every connection after the shutdown's last flush.
    m.cluster.hang_up(gw);
    assert_eq!(
        m.cluster.cores[0].counters.publishes_in, published,
        "no will at shutdown"
    );
}

#[test]
fn mqtt_deliveries_are_counted_and_measured_like_native_ones() {
    let mut cluster = Cluster::new(1, |_| {});
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let qos0 = m.connect(0, "hmi");
    m.subscribe(qos0, "plant/#", QoS::AtMostOnce);
    let qos1 = m.connect(0, "historian");
    m.subscribe(qos1, "plant/#", QoS::AtLeastOnce);
    for i in 0..3u8 {
        m.cluster.publish(native_pub, "plant/t", &[i]);
    }
    m.cluster.run();
    assert_eq!(m.recv(qos0).len(), 3);
    assert_eq!(m.recv(qos1).len(), 3);
    let core = &m.cluster.cores[0];
    let conns = core.report();
    let latency = m.cluster.shared.metrics.merged().to_json();
    for (client, inflight) in [(qos0, 0), (qos1, 3)] {
        let id = core.session(client.slot).map(|s| s.id).unwrap();
        let conn = conns.iter().find(|c| c["id"] == id).unwrap();
        assert_eq!(conn["protocol"], "mqtt");
        assert_eq!(conn["delivered"], 3);
        assert_eq!(conn["mqtt_inflight"], inflight);
        assert_eq!(
            latency["connections"][id.to_string()]["ingest_to_write"]["count"],
            3,
            "every PUBLISH written is measured from its DATA frame"
        );
    }
}

#[test]
fn packets_fed_one_byte_at_a_time_are_handled_once_whole() {
    let mut cluster = Cluster::new(1, |_| {});
    let native_pub = cluster.connect(0, "plc");
    let c = cluster.connect_mqtt_raw(0);
    let mut stream = Vec::new();
    mqtt::encode_packet(&mut stream, &Packet::Connect(connect("slow", 30, None)));
    mqtt::encode_packet(
        &mut stream,
        &Packet::Subscribe {
            pkid: 3,
            filters: vec![("a/#", QoS::AtLeastOnce)],
        },
    );
    mqtt::encode_packet(&mut stream, &Packet::PingReq);
    // What a reactor does: the bytes not used yet stay in the read buffer.
    let mut buffered = Vec::new();
    for &byte in &stream {
        buffered.push(byte);
        let used = cluster.send_bytes(c, &buffered);
        buffered.drain(..used);
    }
    assert!(buffered.is_empty());
    cluster.run();
    assert_eq!(
        decode_all(&cluster.recv_bytes(c)),
        vec![In::ConnAck(0), In::SubAck(vec![1]), In::PingResp]
    );
    cluster.publish(native_pub, "a/b", b"v");
    cluster.run();
    assert_eq!(
        decode_all(&cluster.recv_bytes(c)),
        vec![publish_in("a/b", b"v", 1, false, 1)]
    );
}

#[test]
fn a_persistent_session_resumes_from_what_the_client_acknowledged() {
    let mut cluster = Cluster::new(2, |_| {});
    let native_pub = cluster.connect(0, "plc");
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    let persistent = |clean_session| Connect {
        clean_session,
        ..connect("historian", 30, None)
    };
    let first = m.connect_with(1, persistent(false));
    assert_eq!(
        m.subscribe(first, "t/#", QoS::AtLeastOnce),
        vec![In::SubAck(vec![1])]
    );
    for i in 1..=3u8 {
        m.cluster.publish(native_pub, "t/a", &[i]);
    }
    m.cluster.run();
    assert_eq!(m.recv(first).len(), 3);
    // 1 and 2 acknowledged, 3 not; then the connection dies and 4, 5 are published.
    m.send(first, &Packet::PubAck { pkid: 1 });
    m.send(first, &Packet::PubAck { pkid: 2 });
    m.cluster.hang_up(first);
    for i in 4..=5u8 {
        m.cluster.publish(native_pub, "t/a", &[i]);
    }
    m.cluster.run();

    // Back, on the other reactor, without subscribing: 3 (unacknowledged), 4 and 5, at QoS 1.
    let again = m.cluster.connect_mqtt_raw(0);
    m.send(again, &Packet::Connect(persistent(false)));
    let got = m.recv(again);
    assert_eq!(got[0], In::ConnAckResumed);
    let payloads: Vec<(Vec<u8>, u8)> = got[1..]
        .iter()
        .map(|p| match p {
            In::Publish { payload, qos, .. } => (payload.clone(), *qos),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(payloads, vec![(vec![3], 1), (vec![4], 1), (vec![5], 1)]);
    m.cluster.publish(native_pub, "t/a", &[6]);
    m.cluster.run();
    assert!(matches!(
        &m.recv(again)[..],
        [In::Publish { payload, qos: 1, .. }] if payload == &[6]
    ));
    m.cluster.hang_up(again);

    // A clean session discards it: nothing resumes, now or on the next persistent CONNECT.
    let clean = m.connect_with(1, persistent(true));
    m.cluster.hang_up(clean);
    let last = m.connect_with(1, persistent(false));
    m.cluster.publish(native_pub, "t/a", &[7]);
    m.cluster.run();
    assert!(
        m.recv(last).is_empty(),
        "no subscription survived the clean session"
    );
}

/// One reactor with the `[auth]` section `text`.
fn auth_cluster(text: &str) -> Cluster {
    let auth = crate::config::Config::from_toml_str(text, "test")
        .unwrap()
        .auth;
    Cluster::new(1, |c| c.auth = auth)
}

#[test]
fn connect_credentials_go_to_the_same_authentication_and_acls_as_native_clients() {
    let hash = crate::auth::hash_password(b"gw-pw").unwrap();
    let text = format!(
        "[auth]\nanonymous = false\nanonymous_roles = []\n[[auth.users]]\nname = \"gw\"\n\
         secret_hash = \"{hash}\"\npublish = [\"plant/#\"]\nsubscribe = [\"plant/#\"]\n"
    );
    let mut cluster = auth_cluster(&text);
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    type Case<'a> = (Option<&'a str>, Option<&'a [u8]>, u8);
    let cases: [Case; 3] = [
        (None, None, 4),
        (Some("gw"), Some(b"wrong"), 4),
        (Some("gw"), Some(b"gw-pw"), 0),
    ];
    let mut accepted = None;
    for (username, password, code) in cases {
        let c = m.cluster.connect_mqtt_raw(0);
        m.send(
            c,
            &Packet::Connect(Connect {
                username,
                password,
                ..connect("gw", 10, None)
            }),
        );
        assert_eq!(m.recv(c), vec![In::ConnAck(code)], "{username:?}");
        if code == 0 {
            accepted = Some(c);
        } else {
            assert!(
                m.cluster.write_shut(c) || m.cluster.is_closed(c),
                "a refused CONNECT is closed"
            );
        }
    }
    // The ACL applies: a PUBLISH outside `plant/#` is refused (MQTT 3.1.1 has no negative
    // acknowledgement, so the connection is closed), one inside goes through.
    let gw = accepted.unwrap();
    m.publish(gw, "plant/a", b"ok", QoS::AtLeastOnce, 1);
    assert_eq!(m.recv(gw), vec![In::PubAck(1)]);
    m.publish(gw, "valve/cmd", b"OPEN", QoS::AtMostOnce, 0);
    m.cluster.run();
    assert!(m.cluster.is_closed(gw) || m.cluster.write_shut(gw));
}

#[test]
fn a_connect_waiting_for_argon2_keeps_its_will_and_the_packets_behind_it() {
    let gw = crate::auth::hash_password(b"gw-pw").unwrap();
    let watch = crate::auth::hash_password(b"watch-pw").unwrap();
    let text = format!(
        "[auth]\nanonymous = false\nanonymous_roles = []\n\
         [[auth.users]]\nname = \"gw\"\nsecret_hash = \"{gw}\"\npublish = [\"plant/#\", \"status/#\"]\n\
         [[auth.users]]\nname = \"watch\"\nsecret_hash = \"{watch}\"\nsubscribe = [\"#\"]\n"
    );
    let mut cluster = auth_cluster(&text);
    let mut m = Mqtt {
        cluster: &mut cluster,
    };
    // Checked in line: the harness plays the verifier thread unless told to hold.
    let watcher = m.connect_with(
        0,
        Connect {
            username: Some("watch"),
            password: Some(b"watch-pw"),
            ..connect("watcher", 60, None)
        },
    );
    assert_eq!(
        m.subscribe(watcher, "#", QoS::AtLeastOnce),
        vec![In::SubAck(vec![1])]
    );
    m.cluster.hold_verifications(true);
    let c = m.cluster.connect_mqtt_raw(0);
    let will = Will {
        topic: "status/gw",
        message: b"offline",
        qos: QoS::AtMostOnce,
        retain: false,
    };
    let mut bytes = Vec::new();
    mqtt::encode_packet(
        &mut bytes,
        &Packet::Connect(Connect {
            username: Some("gw"),
            password: Some(b"gw-pw"),
            ..connect("gw", 10, Some(will))
        }),
    );
    let head = bytes.len();
    mqtt::encode_packet(
        &mut bytes,
        &Packet::Publish(Publish {
            topic: "plant/a",
            payload: b"1",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: 5,
        }),
    );
    assert_eq!(
        m.cluster.send_bytes(c, &bytes),
        head,
        "only CONNECT is taken"
    );
    m.cluster.run();
    assert_eq!(m.recv(c), vec![], "no CONNACK before the verdict");
    assert_eq!(m.recv(watcher), vec![], "nothing published yet");
    m.cluster.release_verifications();
    assert_eq!(m.recv(c), vec![In::ConnAck(0), In::PubAck(5)]);
    assert_eq!(
        m.recv(watcher),
        vec![publish_in("plant/a", b"1", 1, false, 1)]
    );
    // The CONNECT's keep-alive (10 s, closed after 15 s of silence) and will came through.
    m.cluster.advance(Duration::from_secs(16));
    assert!(m.cluster.is_closed(c) || m.cluster.write_shut(c));
    assert_eq!(
        m.recv(watcher),
        vec![publish_in("status/gw", b"offline", 1, false, 2)]
    );
}
