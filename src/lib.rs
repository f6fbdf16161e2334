//! lanpush: a push engine for industrial LANs.
pub mod config;
pub mod engine;
pub mod proto;
pub mod topic;
