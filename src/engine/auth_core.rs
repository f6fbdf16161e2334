//! Password checks off the reactor: the core's side of the seam (a child module of `core.rs`, so
//! it reaches the core's state). An argon2 run costs ~30 ms by design (docs/SECURITY.md), far
//! too long for a loop turn that serves every other connection of the reactor, so the core
//! never makes one:
//!
//! 1. A HELLO (or MQTT CONNECT) whose credentials need a run parks its session: the session
//!    stays in `AwaitHello` (the handshake time-out still applies), holds what WELCOME needs
//!    ([`PendingHello`]), and is *verifying*: the core handles no further input of it (the bytes
//!    pipelined behind the HELLO wait in the driver's read buffer, as a paced publisher's do),
//!    and the driver leaves its socket unread ([`FanoutCore::is_paused`]).
//! 2. The run to make comes out of [`FanoutCore::poll_verification`]; the reactor hands it to
//!    the `lanpush-auth` thread (`verifier.rs`), the test harness makes it in line.
//! 3. The verdict comes back through [`FanoutCore::handle_verified`] (the reactor gets it as a
//!    [`CoreMsg::Verified`](super::CoreMsg) in its inbox), which completes the HELLO exactly as
//!    an in-line check did: WELCOME, or ERROR 16 with its audit line and counters. A verdict for
//!    a connection that has closed since, or whose slot another connection now holds (the
//!    connection id says), is ignored. Then the connection is resumed
//!    ([`FanoutCore::poll_resumed`]): the driver hands it the bytes that waited.

use std::collections::VecDeque;
use std::time::Instant;

use super::mqtt_core::MqttConnectTail;
use super::{ConnRef, FanoutCore};
use crate::auth::{AuthError, PendingAuth, Verification};
use crate::engine::guard::HelloAuth;
use crate::engine::session::Fatal;

/// A HELLO waiting for its argon2 run: what finishes the check, and what WELCOME needs.
#[derive(Debug)]
pub(crate) struct PendingHello {
    pub(super) auth: PendingAuth,
    pub(super) client_id: String,
    /// Already clamped to the configured bounds.
    pub(super) keepalive_ms: u32,
    pub(super) features: u32,
    /// An MQTT CONNECT's part after the admission (will, keep-alive, saved session).
    pub(super) mqtt: Option<MqttConnectTail>,
}

/// A run for the verifier: the connection waiting for it, and the run.
#[derive(Debug)]
pub(crate) struct VerifyRequest {
    pub conn: ConnRef,
    pub verification: Verification,
}

/// What became of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The secret matches the hash.
    Match,
    /// It does not (or the user is unknown: the dummy hash matches nothing).
    Mismatch,
    /// The verifier's queue was full: the run was not made, the HELLO is refused as over the
    /// budget ("too many authentication attempts").
    Busy,
}

impl Verdict {
    pub(crate) fn of(verified: bool) -> Verdict {
        if verified {
            Verdict::Match
        } else {
            Verdict::Mismatch
        }
    }
}

/// Verification requests not yet taken by the driver, oldest first.
pub(crate) type VerifyQueue = VecDeque<VerifyRequest>;

impl FanoutCore {
    /// HELLO's credentials, as far as the core goes without an argon2 run: admitted at once
    /// (WELCOME), refused (the fatal ERROR), or parked until the verdict.
    pub(super) fn authenticate_hello(
        &mut self,
        now: Instant,
        slot: usize,
        client_id: String,
        keepalive_ms: u32,
        token: &str,
        features: u32,
    ) -> Result<(), Fatal> {
        let session = self.session(slot).expect("caller looked it up");
        let (conn_id, peer) = (session.id, session.guard.peer);
        // Cloned once per HELLO, for the borrow of the shard's guard.
        let certificate = session.guard.certificate.clone();
        let auth = self.guard.begin_authentication(
            &self.shared.auth,
            token,
            now,
            conn_id,
            peer,
            certificate.as_deref(),
        )?;
        match auth {
            HelloAuth::Admitted(identity) => {
                self.admit_hello(now, slot, identity, client_id, keepalive_ms, features)
            }
            HelloAuth::Verify(auth, verification) => {
                let session = self.session_mut(slot).expect("caller looked it up");
                session.verifying = Some(Box::new(PendingHello {
                    auth,
                    client_id,
                    keepalive_ms,
                    features,
                    mqtt: None,
                }));
                self.verifications.push_back(VerifyRequest {
                    conn: ConnRef {
                        slot: slot as u32,
                        id: conn_id,
                    },
                    verification,
                });
                Ok(())
            }
        }
    }

    /// Whether connection `slot` waits for the verdict on its HELLO.
    #[cfg(test)]
    pub(crate) fn is_verifying(&self, slot: usize) -> bool {
        self.session(slot).is_some_and(|s| s.verifying.is_some())
    }

    /// The next argon2 run to make off the core, oldest first; its verdict goes to
    /// [`FanoutCore::handle_verified`].
    pub(crate) fn poll_verification(&mut self) -> Option<VerifyRequest> {
        self.verifications.pop_front()
    }

    /// The verdict on the HELLO of connection `conn_id` in `slot`: completes it as an in-line
    /// check would have (WELCOME, or ERROR 16 audited and counted), then resumes its input.
    /// Ignored if that connection has closed since (its slot may hold another one by now).
    pub(crate) fn handle_verified(
        &mut self,
        now: Instant,
        slot: usize,
        conn_id: u64,
        verdict: Verdict,
    ) {
        self.now = now;
        let Some(session) = self.session_mut(slot).filter(|s| s.id == conn_id) else {
            return;
        };
        let Some(hello) = session.verifying.take() else {
            return;
        };
        if session.is_closing() {
            return;
        }
        let peer = session.guard.peer;
        let PendingHello {
            auth,
            client_id,
            keepalive_ms,
            features,
            mqtt,
        } = *hello;
        let identity = match verdict {
            Verdict::Busy => Err(self.guard.refused(
                AuthError::Throttled {
                    user: auth.user().to_string(),
                },
                now,
                conn_id,
                peer,
            )),
            Verdict::Match | Verdict::Mismatch => self.guard.finish_authentication(
                &self.shared.auth,
                auth,
                verdict == Verdict::Match,
                now,
                conn_id,
                peer,
            ),
        };
        let result = identity
            .and_then(|identity| {
                self.admit_hello(now, slot, identity, client_id, keepalive_ms, features)
            })
            .and_then(|()| match mqtt {
                Some(tail) => self.finish_mqtt_connect(now, slot, tail),
                None => Ok(()),
            });
        if let Err(fatal) = result {
            self.fail(now, slot, fatal);
            return;
        }
        // The bytes pipelined behind the HELLO: the driver hands them over next.
        self.resumed.push(slot);
    }
}
