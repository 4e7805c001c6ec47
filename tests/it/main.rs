//! One test binary: end-to-end tests against the server in-process, database tests, the model test.

mod auth;
mod clock;
mod concurrency;
mod db;
mod decoding;
mod drill;
mod fuzz;
mod grpc;
mod helpers;
mod history;
mod lifecycle;
mod model;
mod plans;
pub(crate) mod quotas;
mod ratelimit;
mod reconcile;
mod tls;
mod tracing;
mod upgrade;
