//! The tool's one error type: each variant says what the tool was doing.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad flag or parameter combination.
    #[error("{0}")]
    Usage(String),
    /// A scenario file that does not parse.
    #[error("scenario file {0}")]
    Scenario(String),
    /// Starting or talking to the engine process.
    #[error("engine: {0}")]
    Engine(String),
    /// Connecting or subscribing to the target.
    #[error("{context}: {source}")]
    Connect {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Reading or writing a file, or another local I/O failure.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A saved result that cannot be read back.
    #[error("{path}: {reason}")]
    BadResult { path: String, reason: String },
}

impl BenchError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Io { context, source }
    }

    pub fn connect(context: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let context = context.into();
        move |source| BenchError::Connect { context, source }
    }
}
