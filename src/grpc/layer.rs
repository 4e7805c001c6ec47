//! A tower layer around every gRPC call: a request id (the client's `x-request-id`, or a new one) returned in
//! the response headers, a span `grpc.request` parented on the caller's W3C `traceparent` and carrying the
//! request id, and the latency histogram by method and status code.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::histogram;
use opentelemetry::propagation::Extractor;
use tonic::Code;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Methods that get their own label; anything else a client sends is `other`, so labels stay bounded.
const METHODS: &[&str] = &[
    "ReserveSpending",
    "Commit",
    "Reverse",
    "GetLimits",
    "SetLimit",
    "RemoveLimit",
    "GetTransaction",
    "ListTransactions",
    "PutLimit",
    "DeleteLimit",
    "PutPlan",
    "GetPlan",
    "ListPlans",
    "DeletePlan",
    "AssignPlan",
    "CreateCaller",
    "ListCallers",
    "RotateCaller",
    "RevokeCaller",
    "ListAuditEvents",
    "PutRateLimitRule",
    "ListRateLimitRules",
    "DeleteRateLimitRule",
    "CheckRate",
    "ShouldRateLimit",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest request id kept from a client; a longer or non-printable one is replaced.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// The client's request id if it is a sane one (1 to 128 printable ASCII characters), else a new UUID.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_REQUEST_ID_BYTES && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ObserveLayer;

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

fn method_label(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS.iter().find(|m| **m == name).copied().unwrap_or("other")
}

/// The call's status: in the headers for an error answered at once, else OK (sent in the trailers).
fn status_label<B>(response: &http::Response<B>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32);
    code_name(code)
}

pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(request.headers())));
        let id = request_id(request.headers());
        let header = http::HeaderValue::from_str(&id).ok();
        let span = tracing::info_span!(
            "grpc.request",
            rpc.method = method,
            request_id = %id,
            rpc.grpc.status_code = tracing::field::Empty
        );
        request.extensions_mut().insert(super::auth::RequestId(id));
        let _ = span.set_parent(parent);
        let started = Instant::now();
        let call = self.inner.call(request);
        Box::pin(
            async move {
                let mut result = call.await;
                if let (Ok(response), Some(header)) = (&mut result, header) {
                    response.headers_mut().insert(REQUEST_ID_HEADER, header);
                }
                let code = result.as_ref().map_or("UNKNOWN", status_label);
                tracing::Span::current().record("rpc.grpc.status_code", code);
                histogram!("allowance_grpc_request_duration_seconds", "method" => method, "code" => code)
                    .record(started.elapsed().as_secs_f64());
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label("/allowance.v1.SpendingLimits/ReserveSpending"), "ReserveSpending");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(method_label("/evil/random-123"), "other");
    }

    #[test]
    fn every_method_served_has_its_own_label() {
        use prost::Message;
        let mut served = Vec::new();
        for set in [crate::grpc::pb::FILE_DESCRIPTOR_SET, crate::grpc::pb::ENVOY_RLS_DESCRIPTOR_SET] {
            let set = prost_types::FileDescriptorSet::decode(set).unwrap();
            for file in set.file {
                for service in &file.service {
                    for method in &service.method {
                        served.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                    }
                }
            }
        }
        assert!(served.iter().any(|m| m.ends_with("RateLimitService/ShouldRateLimit")), "{served:?}");
        for path in &served {
            assert_ne!(method_label(path), "other", "{path}");
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_up_otherwise() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(request_id(&headers).len(), 36);
        headers.insert(REQUEST_ID_HEADER, http::HeaderValue::from_static("req-42"));
        assert_eq!(request_id(&headers), "req-42");
        headers.insert(REQUEST_ID_HEADER, http::HeaderValue::from_static("has space"));
        assert_ne!(request_id(&headers), "has space");
        headers.insert(REQUEST_ID_HEADER, http::HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(request_id(&headers).len(), 36);
    }
}
