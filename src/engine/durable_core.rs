//! The durable sessions' side of the core (`durable.rs` holds the engine-wide registry): a
//! connection joins its client id's session at a SUBSCRIBE with the session marker, and gives
//! back what was written to it when it closes.

use super::FanoutCore;
use crate::proto::DeliveryMode;

impl FanoutCore {
    /// A SUBSCRIBE with the session marker on `slot`: the connection joins its client id's
    /// durable session (at its first such SUBSCRIBE) and the pattern is added to it. Returns the
    /// session's positions when the session already had this pattern (the SUBSCRIBE is then a
    /// resume from them), `None` when it is new to the pattern or no session could be had (a
    /// SUBSCRIBE without the marker, then).
    pub(super) fn durable_subscribe(
        &mut self,
        slot: usize,
        pattern: &str,
        mode: DeliveryMode,
    ) -> Option<Vec<(String, u64)>> {
        let now = self.now;
        let session = self.session(slot)?;
        if session.client_id.is_empty() {
            return None;
        }
        if session.durable.is_none() {
            let state = self.shared.durable.attach(&session.client_id, now)?;
            self.session_mut(slot)?.durable = Some(Box::new(state));
        }
        let durable = self.session_mut(slot)?.durable.as_deref_mut()?;
        if durable.has_pattern(pattern) {
            Some(
                durable
                    .positions
                    .iter()
                    .map(|(t, seq)| (t.to_string(), *seq))
                    .collect(),
            )
        } else {
            durable.patterns.push((pattern.to_owned(), mode));
            None
        }
    }

    /// A durable connection closes: what was written to it goes into its id's session.
    pub(super) fn save_durable_session(&mut self, slot: usize) {
        let now = self.now;
        let Some(session) = self.session_mut(slot) else {
            return;
        };
        let Some(state) = session.durable.take() else {
            return;
        };
        let client_id = session.client_id.clone();
        self.shared.durable.detach(&client_id, *state, now);
    }
}
