//! argon2 off the data path: one `lanpush-auth` thread makes the password checks the reactors
//! hand it (`auth_core.rs` is the core's side), so a reactor never spends a loop turn hashing
//! while its other connections wait.
//!
//! A HELLO that needs a run becomes a [`VerifyJob`] that the reactor hands over without
//! blocking, on a queue bounded at [`queue_capacity`] (a full queue refuses the HELLO as over
//! the budget). Each reactor still starts at most `auth.max_verifications_per_s` runs a second
//! (its token bucket, `guard.rs`), so the thread's work is bounded by the config: with the
//! default parameters (~31 ms a run) one thread makes about 30 runs a second, the default
//! budget of three reactors. The verdict goes back to the reactor's inbox
//! ([`CoreMsg::Verified`], with its waker), like a STATS reply. Once a shutdown is requested
//! the jobs still queued are dropped unmade (every connection is closed with SHUTTING_DOWN
//! anyway), so a stop waits for one run at most; the thread ends when every reactor (each
//! holding a sender of jobs) has exited.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;

use super::core::{ConnRef, CoreMsg, Verdict};
use super::notify::Mailbox;
use super::reactor::ShardMsg;
use super::EngineShared;
use crate::auth::Verification;
use crate::config::Config;

/// Jobs waiting below this many are always accepted (a small budget still absorbs a burst).
const MIN_QUEUE: usize = 16;

/// A connection on reactor `shard` waits for the verdict on its HELLO.
#[derive(Debug)]
pub(crate) struct VerifyJob {
    pub shard: u16,
    pub conn: ConnRef,
    pub verification: Verification,
}

/// Runs waiting for the thread, engine-wide: one second of every reactor's budget (past that
/// the thread is more than a second behind, and a client is better told to try again).
pub(crate) fn queue_capacity(config: &Config, shards: usize) -> usize {
    (config.auth.max_verifications_per_s as usize)
        .saturating_mul(shards)
        .max(MIN_QUEUE)
}

/// Starts the verifier thread. It ends when every sender of jobs is gone.
pub(crate) fn spawn(
    shared: Arc<EngineShared>,
    mailboxes: Vec<Mailbox<ShardMsg>>,
    jobs: Receiver<VerifyJob>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lanpush-auth".into())
        .spawn(move || {
            while let Ok(job) = jobs.recv() {
                if shared.shutdown_requested() {
                    continue;
                }
                let verdict = Verdict::of(job.verification.run());
                // The secret goes now, not when the next job replaces it.
                drop(job.verification);
                let msg = ShardMsg::Core(CoreMsg::Verified {
                    conn: job.conn,
                    verdict,
                });
                // A reactor that is gone has no connection to answer.
                let _ = mailboxes[job.shard as usize].send(msg);
            }
        })
}
