//! The core's multicast side on the harness (`mcast_core.rs`): CHANNELS, STREAM_POS before
//! SUBACK, carried topics off the receiver's TCP session, datagrams from the owner, NAKs routed
//! to the stream's reactor and answered by REPAIR or REPAIR_GONE.

use super::harness::{Cluster, Got, McastGot};
use crate::mcast::{parse_datagram, ChannelConfig};
use crate::proto::{error_code, DeliveryMode, Frame, Mcast, Nak};

fn cluster() -> Cluster {
    Cluster::new(2, |c| {
        c.multicast.channels = vec![ChannelConfig {
            group: "239.192.0.1".parse().unwrap(),
            port: 7420,
            interface: std::net::Ipv4Addr::UNSPECIFIED,
            ttl: 1,
            max_rate_bytes_per_s: 0,
            datagram_bytes: 1472,
            linger_us: 0,
            loopback: true,
            patterns: vec!["plant/#".into()],
        }];
    })
}

fn mcast(got: &[Got]) -> Vec<McastGot> {
    got.iter()
        .filter_map(|g| match g {
            Got::Mcast(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_multicast_receiver_gets_positions_snapshot_and_repairs_over_tcp() {
    let mut c = cluster();
    // The topic's owner is reactor 1 (its first publisher's).
    let publisher = c.connect(1, "gw");
    c.publish(publisher, "plant/a", b"1");
    c.run();
    let rx = c.connect(0, "hmi");
    let tcp = c.connect(0, "tcp-hmi");
    c.send(rx, &Frame::Multicast(Mcast::ChannelsRequest));
    c.subscribe(rx, 1, "plant/#", DeliveryMode::All);
    c.subscribe(rx, 2, "other/#", DeliveryMode::All);
    c.subscribe(tcp, 1, "plant/#", DeliveryMode::All);
    c.run();
    let got = c.recv(rx);
    let Some(Got::Mcast(McastGot::Channels(channels))) =
        got.iter().find(|g| matches!(g, Got::Mcast(_)))
    else {
        panic!("CHANNELS first: {got:?}");
    };
    assert_eq!(channels[0].patterns, vec!["plant/#".to_string()]);
    // Per subscription, one STREAM_POS per reactor's stream, all before the SUBACK.
    let subacks: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, g)| matches!(g, Got::SubAck { .. }))
        .map(|(i, _)| i)
        .collect();
    let positions: Vec<(usize, crate::proto::StreamPos)> = got
        .iter()
        .enumerate()
        .filter_map(|(i, g)| match g {
            Got::Mcast(McastGot::StreamPos(p)) => Some((i, *p)),
            _ => None,
        })
        .collect();
    assert_eq!(positions.len(), 4, "{got:?}");
    let first_sub_positions: Vec<u16> = positions
        .iter()
        .filter(|(i, _)| *i < subacks[0])
        .map(|(_, p)| p.stream)
        .collect();
    assert!(
        first_sub_positions.contains(&0) && first_sub_positions.contains(&1),
        "both streams' positions before the first SUBACK: {got:?}"
    );
    let pos1 = positions.iter().find(|(_, p)| p.stream == 1).unwrap().1;
    assert_eq!(pos1.next_seq, 2, "datagram 1 held message 1");
    assert!(got.iter().any(
        |g| matches!(g, Got::Data { topic, seq: 1, snapshot: true, .. } if topic == "plant/a")
    ));

    // Live: the carried topic goes by the group only, the uncarried one by TCP.
    while c.cores[1].poll_datagram(c.now, 0).is_some() {}
    c.publish(publisher, "plant/a", b"2");
    c.publish(publisher, "plant/a", b"3");
    c.publish(publisher, "other/x", b"x");
    c.run();
    let got = c.recv(rx);
    let live: Vec<&str> = got
        .iter()
        .filter_map(|g| match g {
            Got::Data { topic, .. } => Some(topic.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(live, vec!["other/x"]);
    let tcp_got = c.recv(tcp);
    assert_eq!(
        super::core_tests::data(&tcp_got)
            .iter()
            .filter(|(t, _, _)| t == "plant/a")
            .count(),
        3,
        "a TCP subscriber is served as before"
    );
    let (channel, datagram) = c.cores[1].poll_datagram(c.now, 0).expect("a datagram");
    assert_eq!(channel, 0);
    let d = parse_datagram(&datagram).unwrap();
    assert_eq!((d.header.stream, d.header.seq), (1, pos1.next_seq));
    assert_eq!(d.frames().count(), 2, "one turn's frames in one datagram");

    // A NAK on reactor 0 for reactor 1's stream: routed there, answered by REPAIR.
    let nak = |from_seq, count| {
        Frame::Multicast(Mcast::Nak(Nak {
            channel: 0,
            stream: 1,
            from_seq,
            count,
        }))
    };
    c.send(rx, &nak(pos1.next_seq, 1));
    c.run();
    assert_eq!(
        mcast(&c.recv(rx)),
        vec![McastGot::Repair(datagram.to_vec())]
    );
    // Never sent: REPAIR_GONE.
    c.send(rx, &nak(1000, 2));
    c.run();
    assert_eq!(
        mcast(&c.recv(rx)),
        vec![McastGot::RepairGone(Nak {
            channel: 0,
            stream: 1,
            from_seq: 1000,
            count: 2
        })]
    );
    // A NAK of a channel that does not exist: a non-fatal ERROR.
    c.send(
        rx,
        &Frame::Multicast(Mcast::Nak(Nak {
            channel: 9,
            stream: 0,
            from_seq: 1,
            count: 1,
        })),
    );
    c.run();
    assert!(c.recv(rx).contains(&Got::Error {
        code: error_code::UNEXPECTED_FRAME
    }));
    assert!(!c.is_closed(rx));
    for i in 0..2 {
        c.cores[i].publish_stats(&c.shared.shards[i]);
    }
    let stats = c.shared.stats_document(Vec::new(), false);
    let ch = &stats["multicast"][0];
    assert_eq!(ch["naks_received"], 2, "{ch}");
    assert_eq!(ch["unicast_repairs"], 1, "{ch}");
    assert_eq!(ch["unrecoverable"], 2, "{ch}");
}

#[test]
fn without_channels_nothing_changes_and_channels_is_empty() {
    let mut c = Cluster::new(2, |_| {});
    let rx = c.connect(0, "hmi");
    c.send(rx, &Frame::Multicast(Mcast::ChannelsRequest));
    c.subscribe(rx, 1, "plant/#", DeliveryMode::All);
    let publisher = c.connect(1, "gw");
    c.publish(publisher, "plant/a", b"1");
    c.run();
    let got = c.recv(rx);
    assert_eq!(mcast(&got), vec![McastGot::Channels(Vec::new())]);
    assert_eq!(super::core_tests::data(&got).len(), 1, "served over TCP");
    assert!(c.cores[1].poll_datagram(c.now, 0).is_none());
}
