//! The multicast sender's syscall: a turn's datagrams by one `send` each or by `sendmmsg` (up
//! to 64 a call), through the engine's own code (`lanpush::engine::mcast_send`, the function
//! `src/engine/mcast_io.rs` uses). Per datagram, for turns of 1, 4, 16 and 64 datagrams of
//! 1,472 bytes (a full channel datagram) and of 200 bytes (a turn of two or three small
//! messages).
//!
//! The datagrams go to a unicast UDP socket on 127.0.0.1 that is never read: once its buffer
//! is full the kernel drops them after the whole send path, which is what both variants pay
//! per datagram; what differs is the syscall entry and exit, which `sendmmsg` pays once per
//! call. (Multicast on the host's loopback would need a route on a host interface; the
//! group's fan-out to receivers is the same work for both variants anyway.)
//!
//! `cargo bench --bench mcast_send` (add `-- --quick` for a short run).

use std::net::UdpSocket;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lanpush::engine::mcast_send;

fn sockets() -> (UdpSocket, UdpSocket) {
    let sink = UdpSocket::bind("127.0.0.1:0").expect("bind the sink");
    let tx = UdpSocket::bind("127.0.0.1:0").expect("bind the sender");
    tx.connect(sink.local_addr().unwrap()).expect("connect");
    tx.set_nonblocking(true).unwrap();
    (sink, tx)
}

fn send_vs_sendmmsg(c: &mut Criterion) {
    let (_sink, tx) = sockets();
    for bytes in [1472usize, 200] {
        let mut group = c.benchmark_group(format!("mcast_send_{bytes}B"));
        for turn in [1usize, 4, 16, 64] {
            let run: Vec<(u16, Arc<[u8]>)> = (0..turn)
                .map(|_| (0, Arc::from(vec![7u8; bytes])))
                .collect();
            group.throughput(Throughput::Elements(turn as u64));
            for (name, batched) in [("send", false), ("sendmmsg", true)] {
                // One call for the turn (more only if the send buffer was momentarily full).
                let calls = mcast_send(&tx, &run, batched).unwrap();
                assert!(if batched {
                    calls <= turn as u64
                } else {
                    calls == turn as u64
                });
                group.bench_function(format!("{name}/{turn}_per_turn"), |b| {
                    b.iter(|| mcast_send(&tx, &run, batched).unwrap())
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, send_vs_sendmmsg);
criterion_main!(benches);
