//! A stand-in lanpush engine for tests of the driver and the runner: thread per connection,
//! HELLO/WELCOME, SUBSCRIBE answered with SUBACK, one stale *snapshot* DATA and a PING, and every
//! PUBLISH forwarded as DATA to the matching subscribers. Slow and simple on purpose.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use lanpush::proto::{
    decode_frame, encode_control, encode_data, encode_ping, DataHeader, Decoded, Frame, SubAck,
    Welcome, DATA_FLAG_SNAPSHOT, PROTOCOL_VERSION,
};

use crate::recorder::write_intended;
use crate::scenario::matches;

const MAX_FRAME_BYTES: usize = 1 << 20;

#[derive(Default)]
struct Shared {
    subscribers: Mutex<Vec<(String, TcpStream)>>,
    pongs: AtomicU64,
    publishes: AtomicU64,
    stop: AtomicBool,
}

pub struct FakeEngine {
    pub addr: String,
    shared: Arc<Shared>,
}

impl FakeEngine {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { break };
                let shared = accept_shared.clone();
                thread::spawn(move || serve(stream, shared));
            }
        });
        FakeEngine { addr, shared }
    }

    pub fn pongs(&self) -> u64 {
        self.shared.pongs.load(Ordering::Relaxed)
    }

    /// SUBSCRIBEs answered so far.
    pub fn subscriptions(&self) -> usize {
        self.shared.subscribers.lock().unwrap().len()
    }

    pub fn publishes(&self) -> u64 {
        self.shared.publishes.load(Ordering::Relaxed)
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(&self.addr);
        for (_, s) in self.shared.subscribers.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        filled += n;
        let mut start = 0;
        while let Ok(Decoded::Frame(frame, used)) =
            decode_frame(&buf[start..filled], MAX_FRAME_BYTES)
        {
            start += used;
            match frame {
                Frame::Hello(_) => encode_control(
                    &mut out,
                    &Frame::Welcome(Welcome {
                        version: PROTOCOL_VERSION,
                        keepalive_ms: 30_000,
                        max_frame_bytes: MAX_FRAME_BYTES as u32,
                        max_subscriptions: 16,
                        reactor: 0,
                        connection_id: 1,
                        engine_id: 1,
                        engine_version: String::new(),
                    }),
                ),
                Frame::Subscribe(sub) => {
                    encode_control(
                        &mut out,
                        &Frame::SubAck(SubAck {
                            sub_id: sub.sub_id,
                            mode: sub.mode,
                        }),
                    );
                    // A retained value from long ago, flagged as snapshot: must not be counted.
                    let mut payload = [0u8; 16];
                    write_intended(&mut payload, 1);
                    encode_data(
                        &mut out,
                        &DataHeader {
                            seq: 1,
                            flags: DATA_FLAG_SNAPSHOT,
                            ..Default::default()
                        },
                        "bench/snapshot",
                        &payload,
                    );
                    encode_ping(&mut out, 42);
                    stream.write_all(&out).unwrap();
                    out.clear();
                    let clone = stream.try_clone().unwrap();
                    shared
                        .subscribers
                        .lock()
                        .unwrap()
                        .push((sub.pattern, clone));
                }
                Frame::Publish(p) => {
                    shared.publishes.fetch_add(1, Ordering::Relaxed);
                    let mut data = Vec::new();
                    encode_data(
                        &mut data,
                        &DataHeader {
                            seq: 1,
                            source_ts_ns: p.source_ts_ns,
                            ..Default::default()
                        },
                        p.topic,
                        p.payload,
                    );
                    for (pattern, sub) in shared.subscribers.lock().unwrap().iter_mut() {
                        if matches(pattern, p.topic) {
                            let _ = sub.write_all(&data);
                        }
                    }
                }
                Frame::Pong { nonce } => {
                    assert_eq!(nonce, 42);
                    shared.pongs.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}
