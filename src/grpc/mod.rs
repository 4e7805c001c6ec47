//! The gRPC edge: generated types, the service, and the server with health and reflection.

mod admin;
pub mod auth;
pub mod codec;
pub mod convert;
mod layer;
mod ratelimit;
mod server;
mod service;

pub use admin::AdminService;
pub use layer::{REQUEST_ID_HEADER, code_name};
pub use ratelimit::{EnvoyRateLimitService, RateLimitService};
pub use server::{Authentication, LIVENESS, Lifecycle, SERVICE_NAME, Server};
pub use service::{Defaults, SpendingLimitsService};

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("allowance.v1");
    include!(concat!(env!("OUT_DIR"), "/client/allowance.v1.rs"));

    /// Encoded descriptors of `allowance.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/allowance_descriptor.bin"));

    /// Encoded descriptors of Envoy's `envoy.service.ratelimit.v3` (from the `.proto` files envoy-types ships),
    /// so that reflection lists the rate-limit service and grpcurl can call it without proto files.
    pub const ENVOY_RLS_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_rls_descriptor.bin"));
}
