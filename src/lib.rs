//! lanpush: a push engine for industrial LANs.
pub mod auth;
pub mod client;
pub mod config;
pub mod engine;
pub mod log;
pub mod mcast;
pub mod metrics;
pub mod mqtt;
pub mod proto;
pub mod service;
pub mod tls;
pub mod topic;
pub mod ws;
