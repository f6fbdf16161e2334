//! STATS off the data path: one `lanpush-stats` thread builds the engine's stats document when
//! someone asks, so a reactor never merges histograms or serialises connections while its
//! subscribers wait.
//!
//! A STATS_REQUEST becomes a [`StatsJob`] that the reactor hands over without blocking (a full
//! queue is answered with ERROR BUSY). The thread takes every job queued, asks each reactor for
//! its report (`ShardMsg::Report`, answered between two loop turns: its connections'
//! figures, and its latency histograms posted to the metrics board — reactors make neither on a
//! timer), merges the histograms, builds one document for all of them, bounds it
//! to the frame limit, and sends each requester's reactor the encoded STATS frame. A connection
//! has at most one request in flight (the core coalesces the rest), so a client that floods
//! STATS_REQUESTs costs one document per reply it actually reads.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::core::{ConnRef, CoreMsg};
use super::notify::Mailbox;
use super::outbox::SharedFrame;
use super::reactor::ShardMsg;
use super::EngineShared;
use crate::auth::Identity;
use crate::proto::{self, Frame};

/// STATS requests waiting for the stats thread, engine-wide.
pub(crate) const STATS_QUEUE: usize = 1024;
/// How long the stats thread waits for the reactors' connection lists.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection on reactor `shard` asked for STATS.
#[derive(Debug, Clone)]
pub(crate) struct StatsJob {
    pub shard: u16,
    pub conn: ConnRef,
    /// The identity whose view it gets, or `None` for an admin's: the whole document.
    pub viewer: Option<Arc<Identity>>,
}

/// Starts the stats thread. It ends when every sender of jobs is gone.
pub(crate) fn spawn(
    shared: Arc<EngineShared>,
    mailboxes: Vec<Mailbox<ShardMsg>>,
    jobs: Receiver<StatsJob>,
    max_frame_bytes: usize,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lanpush-stats".into())
        .spawn(move || {
            while let Ok(first) = jobs.recv() {
                let batch: Vec<StatsJob> = std::iter::once(first).chain(jobs.try_iter()).collect();
                let doc = collect(&shared, &mailboxes);
                let mut whole = None;
                for job in batch {
                    let frame = match &job.viewer {
                        None => whole
                            .get_or_insert_with(|| stats_frame(doc.clone(), max_frame_bytes))
                            .clone(),
                        Some(viewer) => {
                            stats_frame(scoped(&doc, viewer, job.conn.id), max_frame_bytes)
                        }
                    };
                    let msg = ShardMsg::Core(CoreMsg::StatsReply {
                        conn: job.conn,
                        frame,
                    });
                    // A reactor that is gone has no connection to answer.
                    let _ = mailboxes[job.shard as usize].send(msg);
                }
            }
        })
}

/// The stats document with every reactor's connections (those that answer in time; the
/// document says `"partial": true` otherwise). Blocks the calling thread, never a reactor.
pub(crate) fn collect(shared: &EngineShared, mailboxes: &[Mailbox<ShardMsg>]) -> serde_json::Value {
    let (tx, rx): (Sender<Vec<serde_json::Value>>, _) = crossbeam_channel::bounded(mailboxes.len());
    let deadline = Instant::now() + COLLECT_TIMEOUT;
    let mut asked = 0;
    for mailbox in mailboxes {
        let wait = deadline.saturating_duration_since(Instant::now());
        if mailbox
            .send_timeout(ShardMsg::Report(tx.clone()), wait)
            .is_ok()
        {
            asked += 1;
        }
    }
    drop(tx);
    let mut connections = Vec::new();
    let mut answered = 0;
    while answered < asked {
        match rx.recv_deadline(deadline) {
            Ok(list) => {
                connections.extend(list);
                answered += 1;
            }
            Err(_) => break,
        }
    }
    shared.stats_document(connections, answered < mailboxes.len())
}

/// What an identity without `admin` may see of the stats document: the counters, its own
/// connection (none of the others: not their ids, client ids nor subscriptions), and the
/// latency of the topic prefixes its ACL lets it receive from.
pub(crate) fn scoped(
    doc: &serde_json::Value,
    viewer: &Identity,
    conn_id: u64,
) -> serde_json::Value {
    let mut doc = doc.clone();
    if let Some(list) = doc
        .get_mut("connections")
        .and_then(serde_json::Value::as_array_mut)
    {
        list.retain(|c| c["id"].as_u64() == Some(conn_id));
    }
    if let Some(map) = doc.as_object_mut() {
        map.remove("connections_omitted");
    }
    if let Some(latency) = doc.get_mut("latency") {
        let own = conn_id.to_string();
        if let Some(conns) = latency
            .get_mut("connections")
            .and_then(serde_json::Value::as_object_mut)
        {
            conns.retain(|id, _| *id == own);
        }
        if let Some(prefixes) = latency
            .get_mut("prefixes")
            .and_then(serde_json::Value::as_object_mut)
        {
            prefixes.retain(|prefix, _| viewer.acl.may_see_prefix(prefix));
        }
    }
    doc["view"] = viewer.name().into();
    doc
}

/// The STATS frame for `doc`, within `max_frame_bytes`: connections are left out from the end
/// (and counted in `connections_omitted`) until it fits.
pub(crate) fn stats_frame(mut doc: serde_json::Value, max_frame_bytes: usize) -> SharedFrame {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        proto::encode_control(&mut buf, &Frame::Stats(doc.to_string()));
        if buf.len() - proto::LEN_PREFIX_BYTES <= max_frame_bytes {
            return buf.into();
        }
        // Per-connection latency summaries go first: the counters matter more.
        if let Some(latency) = doc
            .get_mut("latency")
            .and_then(|l| l.get_mut("connections"))
            .and_then(serde_json::Value::as_object_mut)
            .filter(|m| !m.is_empty())
        {
            let omitted = latency.len();
            latency.clear();
            doc["latency_connections_omitted"] = omitted.into();
            continue;
        }
        let Some(list) = doc
            .get_mut("connections")
            .and_then(serde_json::Value::as_array_mut)
            .filter(|l| !l.is_empty())
        else {
            // Nothing left to omit: the counters alone (a few KiB) fit any sane frame limit.
            doc = serde_json::json!({ "error": "stats document exceeds max_frame_bytes" });
            continue;
        };
        let keep = list.len() * max_frame_bytes / (buf.len() + 1);
        let omitted = list.len() - keep.min(list.len() - 1);
        list.truncate(list.len() - omitted);
        let before = doc["connections_omitted"].as_u64().unwrap_or(0);
        doc["connections_omitted"] = (before + omitted as u64).into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stats_frame_is_bounded_and_says_what_it_left_out() {
        let connections: Vec<serde_json::Value> = (0..1000)
            .map(|i| serde_json::json!({"id": i, "client_id": format!("hmi-{i}")}))
            .collect();
        let doc = serde_json::json!({"totals": {"delivered": 1}, "connections": connections});
        let frame = stats_frame(doc, 4096);
        assert!(frame.len() <= 4096 + proto::LEN_PREFIX_BYTES);
        let Ok(proto::Decoded::Frame(Frame::Stats(json), _)) = proto::decode_frame(&frame, 4096)
        else {
            panic!("not a STATS frame");
        };
        let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
        let kept = doc["connections"].as_array().unwrap().len() as u64;
        assert!(kept > 0);
        assert_eq!(kept + doc["connections_omitted"].as_u64().unwrap(), 1000);
    }
}
