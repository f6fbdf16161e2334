//! Tests of the engine's handles (`LocalPublisher`, `ShutdownHandle`, `Engine::join`) and of
//! the reactor thread wrapper, on engines assembled by hand: inboxes the test holds, and
//! closures standing in for the reactors, so no test depends on what a reactor does inside.

use std::sync::mpsc;
use std::time::Duration;

use super::core::CoreMsg;
use super::*;

/// How long a step that must not block may take before the test calls it blocked.
const BOUND: Duration = Duration::from_secs(10);

/// Engine state for `n` reactors whose inboxes (of `capacity` messages) and polls the test holds.
struct Rig {
    config: Arc<Config>,
    shared: Arc<EngineShared>,
    inboxes: Vec<Inbox<ShardMsg>>,
    polls: Vec<Poll>,
}

fn rig(n: usize, capacity: usize) -> Rig {
    let config = Arc::new(Config::default());
    let (mut mailboxes, mut inboxes, mut polls) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let poll = Poll::new().unwrap();
        let notifier = Arc::new(Notifier::new(
            mio::Waker::new(poll.registry(), WAKER_TOKEN).unwrap(),
        ));
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        mailboxes.push(Mailbox::new(tx, notifier.clone()));
        inboxes.push(Inbox { rx, notifier });
        polls.push(poll);
    }
    let shared = Arc::new(EngineShared {
        mailboxes,
        ..EngineShared::new(n, &config)
    });
    Rig {
        config,
        shared,
        inboxes,
        polls,
    }
}

fn reactor_failures(shared: &EngineShared) -> u64 {
    let doc = shared.stats_document(Vec::new(), false);
    doc["totals"]["reactor_failures"].as_u64().unwrap()
}

fn is_shutdown(msg: Result<ShardMsg, crossbeam_channel::RecvTimeoutError>) -> bool {
    matches!(msg, Ok(ShardMsg::Shutdown))
}

// ----- LocalPublisher: no lock after a topic's first publish -----

#[test]
fn a_local_publisher_is_send() {
    fn send<T: Send>() {}
    send::<LocalPublisher>();
}

#[test]
fn a_repeat_local_publish_takes_no_lock() {
    let rig = rig(2, 16);
    let publisher = LocalPublisher::new(rig.config.clone(), rig.shared.clone());
    let topic = "plant/line1/temp";
    let owner = owners::owner_of(topic, 2) as usize;
    publisher.publish(topic, b"first", 0, 0).unwrap();
    assert!(matches!(
        rig.inboxes[owner].rx.try_recv(),
        Ok(ShardMsg::Core(CoreMsg::Publish(_)))
    ));

    // With the owner table's mutex held here, a publish that took it would wait for the guard.
    let guard = rig.shared.owners.lock_for_test();
    let (done_tx, done_rx) = mpsc::channel();
    let publishing = std::thread::spawn(move || {
        let result = publisher.publish(topic, b"again", 0, 0);
        let _ = done_tx.send(result.is_ok());
    });
    let done = done_rx.recv_timeout(BOUND);
    drop(guard);
    publishing.join().unwrap();
    assert_eq!(
        done,
        Ok(true),
        "a repeat publish waited for the owner table's lock"
    );
    let Ok(ShardMsg::Core(CoreMsg::Publish(buf))) = rig.inboxes[owner].rx.try_recv() else {
        panic!("the repeat publish did not reach the topic's owner");
    };
    assert!(buf.ends_with(b"again"));
}

#[test]
fn a_local_publish_goes_to_the_shard_that_claimed_the_topic_first() {
    let rig = rig(2, 16);
    let topic = "gw1/tag1";
    let claimant = 1 - owners::owner_of(topic, 2);
    assert_eq!(rig.shared.owners.claim(topic, claimant), Some(claimant));
    let publisher = LocalPublisher::new(rig.config.clone(), rig.shared.clone());
    // Twice: the first answer comes from the table, the second from the cache.
    for _ in 0..2 {
        publisher.publish(topic, b"x", 0, 0).unwrap();
        let got = rig.inboxes[claimant as usize].rx.try_recv();
        assert!(matches!(got, Ok(ShardMsg::Core(CoreMsg::Publish(_)))));
    }
    // A clone starts with an empty cache and finds the same owner.
    publisher.clone().publish(topic, b"y", 0, 0).unwrap();
    let got = rig.inboxes[claimant as usize].rx.try_recv();
    assert!(matches!(got, Ok(ShardMsg::Core(CoreMsg::Publish(_)))));
}

// ----- ShutdownHandle: never blocks -----

#[test]
fn shutdown_returns_at_once_when_every_inbox_is_full() {
    let mut rig = rig(2, 1);
    let mut events = mio::Events::with_capacity(4);
    for (mailbox, poll) in rig.shared.mailboxes.iter().zip(&mut rig.polls) {
        assert!(mailbox
            .try_send(ShardMsg::Core(CoreMsg::Publish(Vec::new())))
            .is_ok());
        // A reactor takes the wake of that message, as its turn would, and arms again.
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
    }
    for inbox in &rig.inboxes {
        inbox.notifier.arm();
    }
    let handle = ShutdownHandle {
        shared: rig.shared.clone(),
    };
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        handle.shutdown();
        let _ = done_tx.send(());
    });
    assert_eq!(
        done_rx.recv_timeout(BOUND),
        Ok(()),
        "shutdown() blocked on a full inbox"
    );
    assert!(rig.shared.shutdown_requested());
    for (id, poll) in rig.polls.iter_mut().enumerate() {
        // A lost wake leaves this poll to its timeout with no event.
        poll.poll(&mut events, Some(BOUND)).unwrap();
        assert!(
            events.iter().any(|e| e.token() == WAKER_TOKEN),
            "reactor {id} was not woken"
        );
    }
    // A reactor that only obeys the message gets it once it has made room.
    for inbox in &rig.inboxes {
        assert!(matches!(
            inbox.rx.try_recv(),
            Ok(ShardMsg::Core(CoreMsg::Publish(_)))
        ));
        assert!(is_shutdown(inbox.rx.recv_timeout(BOUND)));
    }
    // And publishers are told at once.
    let publisher = LocalPublisher::new(rig.config.clone(), rig.shared.clone());
    assert!(matches!(
        publisher.publish("a", b"x", 0, 0),
        Err(PublishError::ShutDown)
    ));
}

#[test]
fn shutdown_queues_a_message_where_there_is_room_and_only_once() {
    let rig = rig(3, 4);
    let handle = ShutdownHandle {
        shared: rig.shared.clone(),
    };
    handle.shutdown();
    handle.clone().shutdown();
    for inbox in &rig.inboxes {
        assert!(matches!(inbox.rx.try_recv(), Ok(ShardMsg::Shutdown)));
        assert!(inbox.rx.is_empty(), "one request, one message");
    }
}

// ----- a failing reactor stops the engine, loudly -----

#[test]
fn a_reactor_error_is_counted_and_returned_and_stops_the_others() {
    let rig = rig(3, 4);
    let result = reactor_thread_body(
        || Err(io::Error::other("epoll_wait: bad file descriptor")),
        1,
        &rig.shared,
    );
    let Err(EngineError::Reactor { id: 1, source }) = result else {
        panic!("not a reactor error: {result:?}");
    };
    assert!(source.to_string().contains("bad file descriptor"));
    assert_eq!(reactor_failures(&rig.shared), 1);
    assert!(rig.shared.shutdown_requested());
    for inbox in &rig.inboxes {
        assert!(matches!(inbox.rx.try_recv(), Ok(ShardMsg::Shutdown)));
    }
}

#[test]
fn a_reactor_panic_is_caught_counted_and_returned_and_stops_the_others() {
    let rig = rig(2, 4);
    let result = reactor_thread_body(|| panic!("slot {} is not live", 7), 0, &rig.shared);
    let Err(EngineError::Panicked { id: 0, message }) = &result else {
        panic!("not a panic: {result:?}");
    };
    assert_eq!(message, "slot 7 is not live");
    assert_eq!(reactor_failures(&rig.shared), 1);
    assert!(rig.shared.shutdown_requested());
    assert!(matches!(
        rig.inboxes[1].rx.try_recv(),
        Ok(ShardMsg::Shutdown)
    ));
    // A `&str` payload too.
    let result = reactor_thread_body(|| panic!("static"), 1, &rig.shared);
    assert!(
        matches!(&result, Err(EngineError::Panicked { id: 1, message }) if message == "static")
    );
    assert_eq!(reactor_failures(&rig.shared), 2);
}

#[test]
fn a_reactor_that_returns_unasked_is_a_failure_and_an_asked_one_is_not() {
    let rig = rig(2, 4);
    let result = reactor_thread_body(|| Ok(()), 1, &rig.shared);
    assert!(matches!(result, Err(EngineError::Stopped { id: 1 })));
    assert_eq!(reactor_failures(&rig.shared), 1);
    assert!(rig.shared.shutdown_requested());
    assert!(reactor_thread_body(|| Ok(()), 0, &rig.shared).is_ok());
    assert_eq!(reactor_failures(&rig.shared), 1);
}

/// A stand-in for a reactor loop that obeys only the flag: arm, check, sleep until woken.
fn flag_reactor(
    mut poll: Poll,
    inbox: Inbox<ShardMsg>,
    shared: Arc<EngineShared>,
) -> impl FnOnce() -> io::Result<()> + Send + 'static {
    move || {
        // The whole inbox, not just the notifier the loop reads: its receiver stays open, as a
        // reactor's does.
        let inbox = inbox;
        let mut events = mio::Events::with_capacity(4);
        loop {
            inbox.notifier.arm();
            if shared.shutdown_requested() {
                return Ok(());
            }
            // No timeout: only the wake can end this sleep (the test bounds the whole).
            poll.poll(&mut events, None)?;
        }
    }
}

#[test]
fn join_reports_the_failed_reactor_after_it_stopped_the_others() {
    let Rig {
        config,
        shared,
        inboxes,
        polls,
    } = rig(3, 4);
    let mut threads = Vec::new();
    for (id, (poll, inbox)) in polls.into_iter().zip(inboxes).enumerate() {
        let thread = if id == 2 {
            drop((poll, inbox));
            spawn_reactor(id, None, shared.clone(), || {
                Err(io::Error::other("timerfd_settime: invalid argument"))
            })
        } else {
            spawn_reactor(
                id,
                None,
                shared.clone(),
                flag_reactor(poll, inbox, shared.clone()),
            )
        };
        threads.push(thread.unwrap());
    }
    let engine = Engine {
        local_addr: "127.0.0.1:0".parse().unwrap(),
        mqtt_addr: None,
        tls_addr: None,
        tls_mqtt_addr: None,
        ws_addr: None,
        threads,
        stats_thread: std::thread::spawn(|| {}),
        verifier_thread: std::thread::spawn(|| {}),
        shared: shared.clone(),
        current: Arc::new(std::sync::Mutex::new(config.clone())),
        config,
        persist: None,
    };
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(engine.join());
    });
    let result = done_rx
        .recv_timeout(BOUND)
        .expect("the other reactors did not stop after one failed");
    let Err(EngineError::Reactor { id: 2, source }) = result else {
        panic!("not reactor 2's error: {result:?}");
    };
    assert!(source.to_string().contains("timerfd_settime"));
    assert_eq!(reactor_failures(&shared), 1);
}

#[test]
fn a_real_engine_stops_on_the_flag_and_a_wake_alone() {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.threads = 2;
    config.server.pin_threads = false;
    let engine = Engine::start(config).unwrap();
    let shared = engine.shared.clone();
    shared.shutting_down.store(true, Ordering::SeqCst);
    for mailbox in &shared.mailboxes {
        mailbox.wake();
    }
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || done_tx.send(engine.join().is_ok()).unwrap());
    assert_eq!(
        done_rx.recv_timeout(std::time::Duration::from_secs(5)),
        Ok(true),
        "the reactors did not stop on the flag"
    );
}
