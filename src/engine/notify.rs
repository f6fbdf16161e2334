//! Cross-thread hand-off into a reactor: an MPSC channel plus a mio `Waker`, woken only when the
//! reactor may be asleep.
//!
//! The race to avoid: a sender sees "already notified", skips the wake, and the reactor goes to
//! sleep with the message unseen. The protocol:
//! - sender: `send(msg)`, then `if !notified.swap(true) { waker.wake() }`;
//! - reactor, before sleeping: `notified.store(false)`, then look at the channel once more; only
//!   if it is empty may it block in `poll`.
//!
//! Both sides use `SeqCst`, so either the reactor's second look sees the message, or the sender's
//! swap sees `false` and wakes it. A burst of sends costs one wake syscall, not one per message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// The waking half, shared by every sender into one reactor.
pub struct Notifier {
    notified: AtomicBool,
    waker: mio::Waker,
}

impl Notifier {
    pub fn new(waker: mio::Waker) -> Notifier {
        Notifier {
            notified: AtomicBool::new(false),
            waker,
        }
    }

    /// Call after sending. Wakes the reactor unless a wake is already pending.
    pub fn notify(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            // A failed wake means the eventfd is gone, i.e. the reactor has exited; the message
            // is then moot.
            let _ = self.waker.wake();
        }
    }

    /// Reactor side: call before the final look at the inbox that precedes sleeping.
    pub fn arm(&self) {
        self.notified.store(false, Ordering::SeqCst);
    }
}

/// A sender into one reactor's inbox.
pub struct Mailbox<T> {
    tx: Sender<T>,
    notifier: Arc<Notifier>,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
            notifier: self.notifier.clone(),
        }
    }
}

impl<T> Mailbox<T> {
    pub fn new(tx: Sender<T>, notifier: Arc<Notifier>) -> Mailbox<T> {
        Mailbox { tx, notifier }
    }

    /// Sends and wakes. Fails only if the reactor is gone.
    pub fn send(&self, msg: T) -> Result<(), T> {
        self.tx.send(msg).map_err(|e| e.into_inner())?;
        self.notifier.notify();
        Ok(())
    }

    /// Sends, waiting at most `timeout` for room: `Err` if the inbox stayed full or the reactor
    /// is gone.
    pub fn send_timeout(&self, msg: T, timeout: std::time::Duration) -> Result<(), T> {
        self.tx
            .send_timeout(msg, timeout)
            .map_err(|e| e.into_inner())?;
        self.notifier.notify();
        Ok(())
    }

    /// Sends without blocking: `Err` if the (bounded) inbox is full or the reactor is gone.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(msg)?;
        self.notifier.notify();
        Ok(())
    }

    /// Wakes the reactor without sending anything, for a request it reads elsewhere (the
    /// engine's shutdown flag). Never blocks. The caller must publish that request (a `SeqCst`
    /// store) before calling, and the reactor must read it after [`Inbox::arm_and_check_empty`]
    /// or at the top of a loop turn, for the same reason as a message: see the module docs.
    pub fn wake(&self) {
        self.notifier.notify();
    }
}

/// Reactor side of the inbox.
pub struct Inbox<T> {
    pub rx: Receiver<T>,
    pub notifier: Arc<Notifier>,
}

impl<T> Inbox<T> {
    /// Arms the notifier and reports whether the reactor may sleep (the inbox is still empty).
    pub fn arm_and_check_empty(&self) -> bool {
        self.notifier.arm();
        self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Hammers the sleep/wake hand-off: a reactor that sleeps whenever its inbox looks empty
    /// must still see every message, with no lost wake-up (a lost one would stall until the
    /// poll timeout, which here is 10 s and fails the test's deadline).
    #[test]
    fn no_lost_wakeups_between_arm_and_sleep() {
        const TOKEN: mio::Token = mio::Token(0);
        const MESSAGES: u64 = 20_000;
        let mut poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), TOKEN).unwrap();
        let notifier = Arc::new(Notifier::new(waker));
        let (tx, rx) = crossbeam_channel::unbounded();
        let inbox = Inbox {
            rx,
            notifier: notifier.clone(),
        };
        let mailbox = Mailbox::new(tx, notifier);
        let sender = std::thread::spawn(move || {
            for i in 0..MESSAGES {
                mailbox.send(i).unwrap();
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let started = std::time::Instant::now();
        let mut events = mio::Events::with_capacity(8);
        let mut received = 0;
        while received < MESSAGES {
            while inbox.rx.try_recv().is_ok() {
                received += 1;
            }
            if received < MESSAGES && inbox.arm_and_check_empty() {
                poll.poll(&mut events, Some(Duration::from_secs(10)))
                    .unwrap();
            }
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "stalled: a wake-up was lost"
            );
        }
        sender.join().unwrap();
    }

    /// `wake` rouses a sleeping reactor with an empty inbox, and does not block when the
    /// inbox is full (it is how a shutdown reaches a reactor that has no room for a message).
    #[test]
    fn wake_rouses_a_sleeping_reactor_without_a_message() {
        const TOKEN: mio::Token = mio::Token(0);
        let mut poll = mio::Poll::new().unwrap();
        let notifier = Arc::new(Notifier::new(
            mio::Waker::new(poll.registry(), TOKEN).unwrap(),
        ));
        let (tx, rx) = crossbeam_channel::bounded(1);
        let inbox = Inbox {
            rx,
            notifier: notifier.clone(),
        };
        let mailbox = Mailbox::new(tx, notifier);
        let mut events = mio::Events::with_capacity(8);
        for full in [false, true] {
            if full {
                mailbox.try_send(1u8).unwrap();
                assert!(
                    mailbox.try_send(2).is_err(),
                    "a bound of 1 holds one message"
                );
                // The send's own wake, consumed as a reactor turn would.
                poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
                inbox.notifier.arm();
            } else {
                assert!(inbox.arm_and_check_empty());
            }
            mailbox.wake();
            // A lost wake leaves this poll to its 10 s timeout with no event.
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .unwrap();
            assert!(
                events.iter().any(|e| e.token() == TOKEN),
                "not woken (inbox full: {full})"
            );
        }
        assert_eq!(inbox.rx.try_recv(), Ok(1), "wake sends nothing");
        assert!(inbox.rx.try_recv().is_err());
    }
}
