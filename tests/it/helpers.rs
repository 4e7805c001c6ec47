//! Shared test plumbing: databases, an in-process server on port 0, a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use allowance::app::{Allowance, BatchConfig};
use allowance::clock::{Clock, ManualClock};
use allowance::domain::{HoldTtl, Unit};
use allowance::grpc::pb::spending_limits_client::SpendingLimitsClient;
use allowance::grpc::{Authentication, Defaults, Lifecycle, Server};
use allowance::storage::Store;
use allowance::storage::postgres::PgStore;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Who test calls act as when they call the app directly: no caller, confined to nothing.
pub fn actor() -> allowance::domain::Actor {
    allowance::domain::Actor::anonymous("test", "")
}

/// 2030-01-01T00:00:00Z: tests start here and move time by hand.
pub fn epoch() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(1_893_456_000, 0).unwrap()
}

pub fn defaults() -> Defaults {
    Defaults {
        unit: Unit::parse("usd").unwrap(),
        hold_ttl: HoldTtl::parse(chrono::TimeDelta::minutes(15)).unwrap(),
    }
}

pub fn lifecycle() -> Lifecycle {
    Lifecycle {
        health_interval: Duration::from_millis(100),
        drain_delay: Duration::ZERO,
        grace: Duration::from_secs(5),
        sweep_interval: Duration::from_secs(3600),
        rules_refresh: Duration::from_millis(100),
        reconcile_interval: None,
        history_interval: None,
    }
}

/// A server running in-process on 127.0.0.1:0 and a client connected to it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub client: SpendingLimitsClient<Channel>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start<S: Store>(store: S, clock: Arc<dyn Clock>) -> Self {
        Self::start_with(store, clock, lifecycle()).await
    }

    /// A server with group commit on, as `allowance serve` runs it.
    pub async fn start_with<S: Store>(store: S, clock: Arc<dyn Clock>, lifecycle: Lifecycle) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = Allowance::new(Arc::new(store), clock).with_batching(BatchConfig::default());
        let server = Server { app, defaults: defaults(), lifecycle, auth: Authentication::Off, tls: None };
        let handle = tokio::spawn(server.run(listener, shutdown.clone()));
        let client = SpendingLimitsClient::new(channel(addr).await);
        Self { addr, client, shutdown, handle }
    }

    /// A server with authentication on, re-reading the callers table every `refresh`, on its own pool.
    pub async fn authenticated(pool: &PgPool, clock: &ManualClock, refresh: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let store = PgStore::new(second_pool(pool, 8).await);
        let app =
            Allowance::new(Arc::new(store), Arc::new(clock.clone())).with_batching(BatchConfig::default());
        let server = Server {
            app,
            defaults: defaults(),
            lifecycle: lifecycle(),
            auth: Authentication::On { refresh },
            tls: None,
        };
        let handle = tokio::spawn(server.run(listener, shutdown.clone()));
        let client = SpendingLimitsClient::new(channel(addr).await);
        Self { addr, client, shutdown, handle }
    }

    /// A server on its own pool of the same database, as a second replica would be.
    pub async fn on(pool: &PgPool, clock: &ManualClock) -> Self {
        Self::start(PgStore::new(pool.clone()), Arc::new(clock.clone())).await
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the server gracefully and returns how its run ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.handle).await?
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    for _ in 0..50 {
        if let Ok(ch) = endpoint.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("server at {addr} did not start");
}

/// Another pool on the database of `pool`, for a second replica.
pub async fn second_pool(pool: &PgPool, max: u32) -> PgPool {
    let options: PgConnectOptions = (*pool.connect_options()).clone();
    PgPoolOptions::new().max_connections(max).connect_with(options).await.unwrap()
}

/// A TCP proxy in front of Postgres that a test can cut and restore, to play a database outage, or arm to
/// cut connections right after they send COMMIT (the database commits, the service never hears).
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<std::sync::Mutex<(bool, CancellationToken)>>,
    /// COMMITs still to cut, and how many were.
    commit_cuts: Arc<std::sync::atomic::AtomicU32>,
    commits_cut: Arc<std::sync::atomic::AtomicU32>,
}

/// A simple-protocol query message `COMMIT`, as sqlx ends a transaction.
const COMMIT_MESSAGE: &[u8] = b"Q\x00\x00\x00\x0bCOMMIT\x00";

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(std::sync::Mutex::new((true, CancellationToken::new())));
        let commit_cuts = Arc::new(AtomicU32::new(0));
        let commits_cut = Arc::new(AtomicU32::new(0));
        let shared = state.clone();
        let (to_cut, cut_count) = (commit_cuts.clone(), commits_cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (up, cut) = {
                    let s = shared.lock().unwrap();
                    (s.0, s.1.clone())
                };
                if !up {
                    continue; // dropped: the connection is refused
                }
                let (to_cut, cut_count) = (to_cut.clone(), cut_count.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let upward = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_client.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            to_server.write_all(&buf[..n]).await?;
                            let commit = buf[..n].windows(COMMIT_MESSAGE.len()).any(|w| w == COMMIT_MESSAGE);
                            let armed = commit
                                && to_cut
                                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                                    .is_ok();
                            if armed {
                                cut_count.fetch_add(1, Ordering::SeqCst);
                                return Ok(()); // both connections close: the COMMIT went, its answer never comes
                            }
                        }
                    };
                    tokio::select! {
                        _ = upward => {}
                        _ = tokio::io::copy(&mut from_server, &mut to_client) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Self { addr, state, commit_cuts, commits_cut }
    }

    /// Down: every open connection is cut and new ones are refused. Up: connections go through again.
    pub fn set_up(&self, up: bool) {
        let mut s = self.state.lock().unwrap();
        if !up {
            s.1.cancel();
            s.1 = CancellationToken::new();
        }
        s.0 = up;
    }

    /// Cuts the connections that send the next `n` COMMITs, right after forwarding them.
    pub fn cut_after_commits(&self, n: u32) {
        self.commit_cuts.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many connections were cut right after a COMMIT.
    pub fn commits_cut(&self) -> u32 {
        self.commits_cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A pool for the database of `pool`, connecting through this proxy, in plaintext (so that the proxy
    /// can tell a COMMIT).
    pub fn pool_for(&self, pool: &PgPool) -> PgPool {
        let options: PgConnectOptions = (*pool.connect_options())
            .clone()
            .host("127.0.0.1")
            .port(self.addr.port())
            .ssl_mode(sqlx::postgres::PgSslMode::Disable);
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy_with(options)
    }
}

/// The Postgres server address of `pool`.
pub fn upstream(pool: &PgPool) -> SocketAddr {
    let o = pool.connect_options();
    let host = if o.get_host() == "localhost" { "127.0.0.1" } else { o.get_host() };
    format!("{host}:{}", o.get_port()).parse().expect("tests use a TCP Postgres address")
}

/// Short calls for tests; each panics on a transport error and returns the gRPC result.
pub mod call {
    use allowance::grpc::pb;
    use allowance::grpc::pb::spending_limits_client::SpendingLimitsClient;
    use tonic::transport::Channel;

    pub type Client = SpendingLimitsClient<Channel>;

    pub fn reserve_req(key: &str, tx: &str, amount: i64) -> pb::ReserveSpendingRequest {
        pb::ReserveSpendingRequest {
            key_id: key.into(),
            transaction_id: tx.into(),
            amount,
            unit: "usd".into(),
            ..Default::default()
        }
    }

    pub async fn reserve(c: &mut Client, key: &str, tx: &str, amount: i64) -> pb::ReserveSpendingResponse {
        c.reserve_spending(reserve_req(key, tx, amount)).await.unwrap().into_inner()
    }

    pub async fn set_limit(c: &mut Client, key: &str, window: pb::Window, limit: i64) {
        c.set_limit(pb::SetLimitRequest {
            key_id: key.into(),
            unit: "usd".into(),
            window: window.into(),
            limit,
        })
        .await
        .unwrap();
    }

    pub async fn commit(
        c: &mut Client,
        tx: &str,
        amount: Option<i64>,
    ) -> Result<pb::Transaction, tonic::Status> {
        c.commit(pb::CommitRequest { transaction_id: tx.into(), amount })
            .await
            .map(|r| r.into_inner().transaction.unwrap())
    }

    pub async fn reverse(c: &mut Client, tx: &str) -> Result<pb::Transaction, tonic::Status> {
        c.reverse(pb::ReverseRequest { transaction_id: tx.into() })
            .await
            .map(|r| r.into_inner().transaction.unwrap())
    }

    /// Usage of one window: (spent, held, remaining).
    pub async fn usage(c: &mut Client, key: &str, window: pb::Window) -> (i64, i64, Option<i64>) {
        let r = c
            .get_limits(pb::GetLimitsRequest { key_id: key.into(), unit: "usd".into() })
            .await
            .unwrap()
            .into_inner();
        let u = r.usage.into_iter().find(|u| u.window == window as i32).unwrap();
        (u.spent, u.held, u.remaining)
    }

    pub async fn get(c: &mut Client, tx: &str) -> Result<pb::Transaction, tonic::Status> {
        c.get_transaction(pb::GetTransactionRequest { transaction_id: tx.into() })
            .await
            .map(|r| r.into_inner())
    }
}

/// A gRPC client that sends and receives raw bytes: for requests no generated client would encode.
pub mod raw {
    use std::net::SocketAddr;

    use prost::bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    #[derive(Debug, Clone, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;

        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }

        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }

    /// One unary call of `path` (`/package.Service/Method`) with `body` as the encoded request.
    pub async fn call(addr: SocketAddr, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
        let mut grpc = tonic::client::Grpc::new(super::channel(addr).await);
        grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(tonic::Response::into_inner)
    }

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A length-delimited field (string, bytes, message) with number `tag`.
    pub fn field(tag: u32, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(tag) << 3 | 2, &mut out);
        varint(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
        out
    }

    /// A varint field (integers, bools, enums) with number `tag`.
    pub fn varint_field(tag: u32, value: i64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(u64::from(tag) << 3, &mut out);
        varint(value as u64, &mut out);
        out
    }
}
