//! Fault drills: clients that reserve, commit and reverse — retrying with the same transaction id after any
//! answer that says "retry" — run while something fails; then the books are checked:
//! - every transaction a client saw committed is committed, with the amount it committed;
//! - every reversal it saw stuck, every hold it saw is still held, every denial recorded nothing;
//! - no id appears twice, nor one no client made, and every transaction charges exactly its keys;
//! - no key has more committed + held than its limit;
//! - the running totals equal the ledger (reconciliation finds nothing);
//! - every client got an answer to everything it asked (no call gave up), and nothing answered a fault of
//!   ours (INTERNAL, UNKNOWN) or a refusal a retry of the same request must not get (NOT_FOUND for a
//!   transaction the client made, ALREADY_EXISTS for its own retry).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allowance::app::Allowance;
use allowance::clock::Clock;
use allowance::grpc::pb;
use allowance::grpc::pb::spending_limits_client::SpendingLimitsClient;
use allowance::storage::postgres::PgStore;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const USER_LIMIT: i64 = 3_000;
pub const ORG_LIMIT: i64 = 30_000;
/// Longest a client keeps retrying one operation before the drill counts it as lost.
const GIVE_UP_AFTER: Duration = Duration::from_secs(90);

/// What a client last saw of one of its transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// Reserved and neither committed nor reversed by the client: held for `amount`.
    Held(i64),
    Committed(i64),
    Reversed,
    Denied,
}

#[derive(Debug, Clone)]
struct Record {
    keys: Vec<String>,
    seen: Seen,
}

/// Everything the clients saw.
#[derive(Debug, Default)]
pub struct Outcomes {
    records: HashMap<String, Record>,
    /// Answers no client may get, and operations that never got an answer.
    anomalies: Vec<String>,
    /// Retries: attempts answered "retry" (or not answered at all) that were sent again.
    pub retries: u64,
}

impl Outcomes {
    pub fn committed(&self) -> usize {
        self.records.values().filter(|r| matches!(r.seen, Seen::Committed(_))).count()
    }
}

/// The load: `clients` concurrent clients, each reserving on one of `keys` user keys (a quarter of the time
/// also on the shared key `org`), then committing (sometimes less), reversing or leaving the hold.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub clients: usize,
    pub keys: usize,
}

/// Clients for the replicas' addresses; each client prefers its own and moves on to the next on trouble.
pub fn clients(addrs: &[SocketAddr]) -> Vec<SpendingLimitsClient<Channel>> {
    addrs
        .iter()
        .map(|addr| {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(1));
            SpendingLimitsClient::new(endpoint.connect_lazy())
        })
        .collect()
}

fn retryable(code: Code) -> bool {
    // What a client of a payments service must retry (with the same transaction id): the service or the
    // network said "not now", or gave no answer at all.
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown
    )
}

/// Runs `call` until it gets an answer that is not "retry", moving to the next replica after each failure.
/// `Err` is either a definite refusal or (after [`GIVE_UP_AFTER`]) the last failure.
async fn with_retries<T, F, Fut>(
    targets: &[SpendingLimitsClient<Channel>],
    prefer: usize,
    retries: &mut u64,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut(SpendingLimitsClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    let mut target = prefer;
    let mut attempt = 0u64;
    loop {
        let answer =
            tokio::time::timeout(Duration::from_secs(10), call(targets[target % targets.len()].clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 10 s")));
        match answer {
            Ok(v) => return Ok(v),
            Err(s) if retryable(s.code()) && started.elapsed() < GIVE_UP_AFTER => {
                // Unknown is retried as a transport failure would be, but only from a dead connection: a
                // handler's UNKNOWN would be a panic, which the fuzz tests rule out.
                attempt += 1;
                *retries += 1;
                target += 1;
                tokio::time::sleep(Duration::from_millis((20 * attempt).min(250))).await;
            }
            Err(s) => return Err(s),
        }
    }
}

/// Tiny deterministic generator: the drills need variety, not quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

pub fn user_key(i: usize) -> String {
    format!("user-{i}")
}

/// Sets every key's daily limit (through the replicas, with retries).
pub async fn set_limits(targets: &[SpendingLimitsClient<Channel>], load: Load) {
    let mut keys: Vec<(String, i64)> = (0..load.keys).map(|i| (user_key(i), USER_LIMIT)).collect();
    keys.push(("org".to_owned(), ORG_LIMIT));
    let mut retries = 0;
    for (key, limit) in keys {
        with_retries(targets, 0, &mut retries, |mut c| {
            let key = key.clone();
            async move {
                c.set_limit(pb::SetLimitRequest {
                    key_id: key,
                    unit: "usd".into(),
                    window: pb::Window::Daily.into(),
                    limit,
                })
                .await
            }
        })
        .await
        .expect("setting limits");
    }
}

/// Runs the load until `stop` is cancelled (each client finishes the transaction it is on).
pub async fn run(
    targets: Vec<SpendingLimitsClient<Channel>>,
    load: Load,
    stop: CancellationToken,
) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let targets = Arc::new(targets);
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..load.clients {
        let (targets, stop, outcomes) = (targets.clone(), stop.clone(), outcomes.clone());
        tasks.spawn(async move {
            let mut rng =
                Rng(0x9e37_79b9_7f4a_7c15 ^ (client as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut retries = 0;
            let mut i = 0;
            while !stop.is_cancelled() {
                let id = format!("c{client}-{i}");
                i += 1;
                let mut keys = vec![user_key(rng.below(load.keys as u64) as usize)];
                if rng.below(4) == 0 {
                    keys.push("org".to_owned());
                }
                let amount = 1 + rng.below(120) as i64;
                let choice = rng.below(4);
                let partial = 1 + rng.below(amount as u64) as i64;
                let (record, anomaly) =
                    one_transaction(&targets, client, &mut retries, &id, &keys, amount, choice, partial)
                        .await;
                let mut o = outcomes.lock().unwrap();
                if let Some(record) = record {
                    o.records.insert(id.clone(), record);
                }
                if let Some(anomaly) = anomaly {
                    o.anomalies.push(format!("{id}: {anomaly}"));
                }
            }
            outcomes.lock().unwrap().retries += retries;
        });
    }
    while tasks.join_next().await.is_some() {}
    Arc::try_unwrap(outcomes).unwrap().into_inner().unwrap()
}

/// Reserve, then commit (all or `partial`), reverse or leave the hold. Returns what the client saw and,
/// where it saw what it must not, why.
#[allow(clippy::too_many_arguments)]
async fn one_transaction(
    targets: &[SpendingLimitsClient<Channel>],
    prefer: usize,
    retries: &mut u64,
    id: &str,
    keys: &[String],
    amount: i64,
    choice: u64,
    partial: i64,
) -> (Option<Record>, Option<String>) {
    let request = pb::ReserveSpendingRequest {
        key_id: keys[0].clone(),
        additional_key_ids: keys[1..].to_vec(),
        transaction_id: id.to_owned(),
        amount,
        unit: "usd".into(),
        ..Default::default()
    };
    let record = |seen| Some(Record { keys: keys.to_vec(), seen });
    let reserved = with_retries(targets, prefer, retries, |mut c| {
        let r = request.clone();
        async move { c.reserve_spending(r).await.map(|r| r.into_inner()) }
    })
    .await;
    match reserved {
        Ok(r) if !r.allowed => return (record(Seen::Denied), None),
        Ok(r) => {
            let t = r.transaction.unwrap_or_default();
            if t.held_amount != amount || t.key_ids != keys {
                return (record(Seen::Held(amount)), Some(format!("reserve answered {t:?}")));
            }
        }
        // Unknown outcome: the transaction may or may not exist; the check below allows either.
        Err(s) => return (None, Some(format!("reserve: {:?} {}", s.code(), s.message()))),
    }
    match choice {
        0 | 1 => {
            let final_amount = if choice == 0 { amount } else { partial };
            let committed = with_retries(targets, prefer, retries, |mut c| async move {
                c.commit(pb::CommitRequest { transaction_id: id.to_owned(), amount: Some(final_amount) })
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
            match committed {
                Ok(r) if r.transaction.as_ref().is_some_and(|t| t.amount == final_amount) => {
                    (record(Seen::Committed(final_amount)), None)
                }
                // Possibly committed, possibly not: only held is known for sure.
                Ok(r) => (None, Some(format!("commit answered {r:?}"))),
                Err(s) => (None, Some(format!("commit: {:?} {}", s.code(), s.message()))),
            }
        }
        2 => match with_retries(targets, prefer, retries, |mut c| async move {
            c.reverse(pb::ReverseRequest { transaction_id: id.to_owned() }).await
        })
        .await
        {
            Ok(_) => (record(Seen::Reversed), None),
            Err(s) => (None, Some(format!("reverse: {:?} {}", s.code(), s.message()))),
        },
        _ => (record(Seen::Held(amount)), None),
    }
}

/// One row of `transactions`: (position, key, amount, held amount, state).
type StoredRow = (i16, String, i64, i64, i16);

/// Checks the books against what the clients saw; panics with every discrepancy.
pub async fn verify(pool: &PgPool, outcomes: &Outcomes, clock: Arc<dyn Clock>) {
    eprintln!(
        "drill: {} transactions seen, {} committed, {} retries, {} anomalies",
        outcomes.records.len(),
        outcomes.committed(),
        outcomes.retries,
        outcomes.anomalies.len()
    );
    let mut problems: Vec<String> = outcomes.anomalies.clone();
    let rows = sqlx::query(
        "SELECT t.transaction_id, t.position, a.key_id, t.amount, t.held_amount, t.state
         FROM transactions t JOIN accounts a ON a.id = t.account_id ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut stored: HashMap<String, Vec<StoredRow>> = HashMap::new();
    for r in rows {
        stored.entry(r.get(0)).or_default().push((r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)));
    }
    for (id, rows) in &stored {
        let positions: Vec<i16> = rows.iter().map(|r| r.0).collect();
        if positions != (0..rows.len() as i16).collect::<Vec<_>>() {
            problems.push(format!("{id}: rows at positions {positions:?}"));
        }
        let Some(record) = outcomes.records.get(id) else {
            // Only a transaction whose client never got an answer may be unknown to the clients.
            if !outcomes.anomalies.iter().any(|a| a.starts_with(&format!("{id}: "))) {
                problems.push(format!("{id}: stored, but no client made it"));
            }
            continue;
        };
        let keys: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
        if keys != record.keys.iter().map(String::as_str).collect::<Vec<_>>() {
            problems.push(format!("{id}: charges {keys:?}, the client named {:?}", record.keys));
        }
        let (_, _, amount, held, state) = rows[0].clone();
        if rows.iter().any(|r| (r.2, r.3, r.4) != (amount, held, state)) {
            problems.push(format!("{id}: rows disagree: {rows:?}"));
        }
        let ok = match record.seen {
            Seen::Committed(a) => state == 2 && amount == a,
            Seen::Reversed => state == 3,
            Seen::Held(a) => state == 1 && amount == a,
            Seen::Denied => false,
        };
        if !ok {
            problems.push(format!("{id}: the client saw {:?}, the database holds {rows:?}", record.seen));
        }
    }
    for (id, record) in &outcomes.records {
        if record.seen != Seen::Denied && !stored.contains_key(id) {
            problems.push(format!("{id}: the client saw {:?}, the database has nothing", record.seen));
        }
    }
    // Limits: what counts (held and committed; the drills run well inside a day) within each key's limit.
    let used = sqlx::query(
        "SELECT a.key_id, SUM(t.amount)::int8 FROM transactions t JOIN accounts a ON a.id = t.account_id
         WHERE t.state IN (1, 2) GROUP BY a.key_id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for r in used {
        let (key, used): (String, i64) = (r.get(0), r.get(1));
        let limit = if key == "org" { ORG_LIMIT } else { USER_LIMIT };
        if used > limit {
            problems.push(format!("{key}: {used} committed and held, over its limit of {limit}"));
        }
    }
    let app = Allowance::new(Arc::new(PgStore::new(pool.clone())), clock);
    let report = app.reconcile(None).await.expect("reconciliation");
    for d in report.divergences {
        problems.push(format!("running totals diverge from the ledger: {d:?}"));
    }
    for h in report.stale_holds {
        problems.push(format!("a hold behind its account's expiry cursor: {h:?}"));
    }
    for b in report.hold_bookkeeping {
        problems.push(format!("hold bookkeeping diverges from the rows: {b:?}"));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// Polls a replica's health until it reads `want`; false after `within`.
pub async fn wait_for(addr: SocketAddr, want: ServingStatus, within: Duration) -> bool {
    let started = Instant::now();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    while started.elapsed() < within {
        if let Ok(channel) = endpoint.connect().await {
            let request =
                tonic_health::pb::HealthCheckRequest { service: allowance::grpc::SERVICE_NAME.into() };
            if let Ok(r) = HealthClient::new(channel).check(request).await
                && r.into_inner().status() == want
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `allowance serve` as a process of its own (the shipped binary), authentication off, on free ports.
pub struct Replica {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Replica {
    pub async fn spawn(database_url: &str, name: &str) -> Self {
        let log = std::env::temp_dir().join(format!("allowance-drill-{}-{name}.log", std::process::id()));
        for _ in 0..3 {
            let (grpc, metrics) = (free_port(), free_port());
            let addr: SocketAddr = format!("127.0.0.1:{grpc}").parse().unwrap();
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_allowance"))
                .arg("serve")
                .env("DATABASE_URL", database_url)
                .env("ALLOWANCE_LISTEN", addr.to_string())
                .env("ALLOWANCE_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
                .env("ALLOWANCE_INSECURE_NO_AUTH", "true")
                .env("ALLOWANCE_DB_POOL_SIZE", "6")
                .env("ALLOWANCE_HEALTH_INTERVAL", "200ms")
                .env("ALLOWANCE_SHUTDOWN_GRACE", "10s")
                .env("ALLOWANCE_RECONCILE_INTERVAL", "0")
                .stdin(std::process::Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::options().append(true).open(&log).unwrap())
                .spawn()
                .expect("the allowance binary");
            let mut replica = Replica { child, addr, log: log.clone() };
            if wait_for(addr, ServingStatus::Serving, Duration::from_secs(60)).await {
                return replica;
            }
            replica.kill(); // a port taken meanwhile, most likely: try others
        }
        panic!(
            "{name} did not become SERVING; its log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A Postgres of the test's own (scripts/pg-throwaway start-private), that it may stop and start again.
pub struct PrivatePostgres {
    dir: PathBuf,
    pub url: String,
}

fn throwaway(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-throwaway");
    let out = std::process::Command::new(script)
        .args(args)
        .env("ALLOWANCE_PG_OPTS", "-c fsync=off -c synchronous_commit=off")
        .output()
        .expect("scripts/pg-throwaway");
    assert!(out.status.success(), "pg-throwaway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("allowance-drill-pg-{}-{nanos}", std::process::id()));
        let url = throwaway(&["start-private", dir.to_str().unwrap()]);
        Self { dir, url }
    }

    /// Stops the server keeping its data: the database is gone until [`PrivatePostgres::resume`].
    pub fn pause(&self) {
        throwaway(&["pause-private", self.dir.to_str().unwrap()]);
    }

    pub fn resume(&self) {
        throwaway(&["resume-private", self.dir.to_str().unwrap()]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        throwaway(&["stop-private", self.dir.to_str().unwrap()]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The drills

use allowance::clock::{ManualClock, SystemClock};

use crate::helpers::{Proxy, TestServer, epoch, lifecycle, second_pool, upstream};

const LOAD: Load = Load { clients: 32, keys: 8 };

/// Waits (bounded) until `done` holds.
async fn until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (a) The network between the service and its database fails: connections cut right after they sent a
/// batch's COMMIT (the database commits, the service never hears: the clients get UNAVAILABLE for work that
/// was done), and the whole link down for a second.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn drill_network_cuts_between_service_and_database(pool: PgPool) {
    let proxy = Proxy::start(upstream(&pool)).await;
    let clock = ManualClock::new(epoch());
    let s = TestServer::start(PgStore::new(proxy.pool_for(&pool)), Arc::new(clock.clone())).await;
    let targets = clients(&[s.addr]);
    set_limits(&targets, LOAD).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(run(targets, LOAD, stop.clone()));

    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_after_commits(5);
    until("five COMMITs cut", Duration::from_secs(60), || proxy.commits_cut() >= 5).await;
    proxy.set_up(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_up(true);
    proxy.cut_after_commits(3);
    until("three more COMMITs cut", Duration::from_secs(60), || proxy.commits_cut() >= 8).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let outcomes = running.await.unwrap();

    assert!(outcomes.retries > 0, "the faults were seen by clients");
    assert!(outcomes.committed() >= LOAD.clients, "the load ran: {} committed", outcomes.committed());
    verify(&pool, &outcomes, Arc::new(clock)).await;
}

/// (b) SIGTERM of one of two replicas during load (the in-process server's graceful shutdown): it stops
/// within its grace period with every call it had taken answered; clients move to the other replica.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn drill_sigterm_of_a_replica_during_load(pool: PgPool) {
    let clock = ManualClock::new(epoch());
    let mut lc = lifecycle();
    lc.grace = Duration::from_secs(20);
    let a =
        TestServer::start_with(PgStore::new(second_pool(&pool, 6).await), Arc::new(clock.clone()), lc).await;
    let b =
        TestServer::start_with(PgStore::new(second_pool(&pool, 6).await), Arc::new(clock.clone()), lc).await;
    let targets = clients(&[a.addr, b.addr]);
    set_limits(&targets, LOAD).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(run(targets, LOAD, stop.clone()));

    tokio::time::sleep(Duration::from_millis(800)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), a.stop()).await.expect("replica a stops").unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "in-flight calls finished well within the 20 s grace ({:?})",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    let outcomes = running.await.unwrap();
    drop(b);

    assert!(outcomes.committed() >= LOAD.clients, "the load ran: {} committed", outcomes.committed());
    verify(&pool, &outcomes, Arc::new(clock)).await;
}

/// (c) Postgres stops mid-load and starts again: the shipped binary reports NOT_SERVING meanwhile and SERVING
/// after, never exits, and clients retrying get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_postgres_restart_mid_load() {
    let pg = PrivatePostgres::start();
    let server = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&pg.url).await.unwrap();
    sqlx::query("CREATE DATABASE drill").execute(&server).await.unwrap();
    server.close().await;
    let url = format!("{}/drill", pg.url.rsplit_once('/').unwrap().0);
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    allowance::storage::postgres::MIGRATOR.run(&pool).await.unwrap();
    pool.close().await;

    let mut replica = Replica::spawn(&url, "pg-restart").await;
    let targets = clients(&[replica.addr]);
    set_limits(&targets, LOAD).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(run(targets, LOAD, stop.clone()));

    tokio::time::sleep(Duration::from_secs(1)).await;
    let pg = Arc::new(pg);
    let paused = pg.clone();
    tokio::task::spawn_blocking(move || paused.pause()).await.unwrap();
    assert!(
        wait_for(replica.addr, ServingStatus::NotServing, Duration::from_secs(30)).await,
        "NOT_SERVING while the database is down"
    );
    // Longer than a call waits for a connection (5 s): clients get UNAVAILABLE and retry.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let resumed = pg.clone();
    tokio::task::spawn_blocking(move || resumed.resume()).await.unwrap();
    assert!(
        wait_for(replica.addr, ServingStatus::Serving, Duration::from_secs(60)).await,
        "SERVING again once the database is back; log:\n{}",
        replica.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let outcomes = running.await.unwrap();
    assert!(replica.running(), "the process never exits; log:\n{}", replica.log_text());
    // A batch cut off by the shutdown failed as a whole: nothing in it is one operation's doing, so it is not
    // run again one operation at a time (each waiting for the database in turn, holding its worker).
    assert!(
        !replica.log_text().contains("running its operations one by one"),
        "a database going away is not a statement refused; log:\n{}",
        replica.log_text()
    );
    assert!(outcomes.committed() >= LOAD.clients, "the load ran: {} committed", outcomes.committed());
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(&url).await.unwrap();
    verify(&pool, &outcomes, Arc::new(SystemClock)).await;
    pool.close().await;
    drop(replica);
}

/// (d) SIGKILL of one of two replicas (the shipped binary) while 32 clients reserve, commit and reverse;
/// the clients of the dead one retry on the other with the same transaction ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_sigkill_of_one_of_two_replicas() {
    let db = crate::db::TestDatabase::create("drill_sigkill").await;
    let mut a = Replica::spawn(&db.url(), "a").await;
    let mut b = Replica::spawn(&db.url(), "b").await;
    let targets = clients(&[a.addr, b.addr]);
    set_limits(&targets, LOAD).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(run(targets, LOAD, stop.clone()));

    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill();
    assert!(!a.running());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    let outcomes = running.await.unwrap();
    assert!(b.running(), "the other replica keeps serving; log:\n{}", b.log_text());

    assert!(outcomes.retries > 0, "the kill was seen by clients");
    assert!(outcomes.committed() >= LOAD.clients, "the load ran: {} committed", outcomes.committed());
    verify(&db.pool, &outcomes, Arc::new(SystemClock)).await;
}

/// Opens every connection of a pool of 4 whose connections are named `name`, then ends them all while they
/// sit idle, as a database restart or an idle-session timeout does.
async fn end_idle_connections(pool: &PgPool, serving: &PgPool, name: &str) {
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(serving.acquire().await.unwrap());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await; // their release (sqlx pings on release)
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1) t",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(ended, 4, "every connection of the serving pool was open and is now ended");
}

/// Reads and the readiness check run again on another connection when theirs had died while idle, as batches
/// do at BEGIN: neither fails for it (readiness stayed NOT_SERVING for seconds after a database restart, and
/// reads answered UNAVAILABLE once per dead connection).
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn reads_and_readiness_after_idle_connections_died(pool: PgPool) {
    use allowance::domain::TransactionId;
    use allowance::storage::Store;

    use crate::helpers::actor;
    use crate::history::{account, allowed, reserve};

    let options = (*pool.connect_options()).clone().application_name("idle-reads");
    let serving = PgStore::pool_options(4).connect_with(options).await.unwrap();
    let app = Allowance::new(Arc::new(PgStore::new(serving.clone())), Arc::new(ManualClock::new(epoch())));
    assert!(allowed(&app, reserve("k", "t0", 1, false)).await);
    end_idle_connections(&pool, &serving, "idle-reads").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let account = account("k");
    for i in 0..6 {
        app.store().ready().await.unwrap_or_else(|e| panic!("readiness check {i}: {e}"));
        app.get_transaction(TransactionId::parse("t0").unwrap(), &actor())
            .await
            .unwrap_or_else(|e| panic!("read {i}: {e}"));
        app.list_transactions(account.clone(), None, 10).await.unwrap();
    }
}

/// The serving pool hands out connections without pinging them first (a round trip per batch saved): a
/// connection that died while idle — the database restarted, a proxy closed it — must cost no call an error.
#[sqlx::test(migrator = "allowance::storage::postgres::MIGRATOR")]
async fn connections_that_died_while_idle_cost_no_call_an_error(pool: PgPool) {
    use crate::history::{allowed, reserve};

    let options = (*pool.connect_options()).clone().application_name("idle-victim");
    let serving = PgStore::pool_options(4).connect_with(options).await.unwrap();
    // The app alone, without a server's background jobs, which would otherwise meet the dead connections first.
    let app = Allowance::new(Arc::new(PgStore::new(serving.clone())), Arc::new(ManualClock::new(epoch())));
    end_idle_connections(&pool, &serving, "idle-victim").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..8 {
        assert!(
            allowed(&app, reserve("k", &format!("t{i}"), 1, true)).await,
            "call {i} after the connections died"
        );
    }
}
