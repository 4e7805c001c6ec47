//! Traces: with OTEL_EXPORTER_OTLP_ENDPOINT set, spans go to the collector over OTLP/gRPC, parented on the
//! caller's W3C traceparent. (nextest runs each test in its own process, so the global subscriber is ours.)

use std::sync::{Arc, Mutex};

use allowance::clock::ManualClock;
use allowance::config::LogFormat;
use allowance::storage::postgres::PgStore;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use sqlx::PgPool;
use tokio_stream::wrappers::TcpListenerStream;

use crate::helpers::call::reserve_req;
use crate::helpers::{TestServer, epoch};

/// A received span: (trace id, name).
type Received = (Vec<u8>, String);

/// A collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (s.trace_id, s.name)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn spans_are_exported_over_otlp_under_the_callers_trace(pool: PgPool) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let service = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    // SAFETY: set before any other thread of this test process reads the environment.
    unsafe { std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint) };
    let telemetry = allowance::telemetry::init(LogFormat::Text, "info").unwrap();

    let s = TestServer::start(PgStore::new(pool), Arc::new(ManualClock::new(epoch()))).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(reserve_req("k", "t1", 5));
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    assert!(s.client.clone().reserve_spending(request).await.unwrap().into_inner().allowed);
    s.stop().await.unwrap();
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await.unwrap();

    let spans = collector.0.lock().unwrap().clone();
    let wanted: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect();
    let names: Vec<&str> = spans.iter().filter(|(t, _)| *t == wanted).map(|(_, n)| n.as_str()).collect();
    assert!(names.contains(&"grpc.request"), "spans of the caller's trace: {names:?} (all: {spans:?})");
    assert!(names.contains(&"grpc.reserve_spending"), "{names:?}");
}
