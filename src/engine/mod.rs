//! The engine: reactor threads, routing between them, and the handle an embedding process holds.
//! (Work in progress: the public surface below is the contract the CLI and embedders use.)

use std::net::SocketAddr;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start reactor thread: {0}")]
    Thread(std::io::Error),
    #[error("engine I/O error: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid topic: {0}")]
    Topic(#[from] crate::proto::TopicError),
    #[error("the engine has shut down")]
    ShutDown,
}

/// A running engine. Dropping it does not stop it; call [`Engine::shutdown`] then [`Engine::join`].
pub struct Engine {
    local_addr: SocketAddr,
}

impl Engine {
    /// Binds the listener and starts the reactor threads.
    pub fn start(config: Config) -> Result<Engine, EngineError> {
        let _ = config;
        Err(EngineError::Io(std::io::Error::other(
            "engine not implemented yet",
        )))
    }

    /// The address the listener is bound to (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// An in-process publisher: no socket, the lock-free queue path into the reactors.
    pub fn publisher(&self) -> LocalPublisher {
        LocalPublisher {}
    }

    /// A cloneable handle that can stop the engine from another thread (e.g. a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {}
    }

    /// Engine counters, as `lanpush stats` shows them.
    pub fn stats_json(&self) -> String {
        String::new()
    }

    /// Waits for every reactor thread to finish (after a shutdown).
    pub fn join(self) -> Result<(), EngineError> {
        Ok(())
    }
}

#[derive(Clone)]
pub struct ShutdownHandle {}

impl ShutdownHandle {
    /// Asks every reactor to close its connections and exit. Returns at once.
    pub fn shutdown(&self) {}
}

#[derive(Clone)]
pub struct LocalPublisher {}

impl LocalPublisher {
    /// Publishes one message. Never blocks on subscribers.
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        quality: u8,
        source_ts_ns: u64,
    ) -> Result<(), PublishError> {
        let _ = (topic, payload, quality, source_ts_ns);
        Err(PublishError::ShutDown)
    }
}
