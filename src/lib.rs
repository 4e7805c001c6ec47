//! allowance: atomic spending limits over gRPC and Postgres.
//!
//! Layers: [`domain`] (pure logic), [`storage`] (all SQL), [`app`] (transactions, clock, batching) and
//! [`grpc`] (the thin transport edge).

pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod storage;
pub mod telemetry;
pub mod tls;
