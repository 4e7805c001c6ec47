//! `allowance bench`: a load generator that drives a running server over gRPC and reports throughput,
//! latency percentiles and errors by status code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;

use super::client::{AuthorizedChannel, Bearer};

use crate::config::parse_duration;
use crate::grpc::code_name;
use crate::grpc::pb::{
    self, rate_limit_service_client::RateLimitServiceClient, spending_limits_client::SpendingLimitsClient,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Reserve then commit: the pair counts as one operation.
    ReserveCommit,
    /// Reserve and let the hold expire.
    ReserveOnly,
    /// Reserve then reverse: the pair counts as one operation.
    ReserveReverse,
    /// Read usage.
    GetLimits,
    /// grpc.health.v1 Check: the ceiling of the server and client, with no database work.
    Health,
    /// RateLimitService.CheckRate of cost 1 against a rate limit `bench-rate` of each key (set up with
    /// --limit per second, burst --limit: nothing is denied unless asked).
    CheckRate,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  allowance bench --concurrency 64 --duration 20s --keys 10000 --mode reserve-commit"
)]
pub struct BenchArgs {
    /// Server address.
    #[arg(long, env = "ALLOWANCE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    #[command(flatten)]
    pub tls: super::tls::ClientTlsArgs,
    /// Operations in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Keys to spread the load over, uniformly; 1 is one hot key.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Keys are named <prefix><n>, n from 0; default: a prefix unique to this run.
    #[arg(long)]
    pub key_prefix: Option<String>,
    #[arg(long, value_enum, default_value_t = Mode::ReserveCommit)]
    pub mode: Mode,
    /// Amount of each reservation.
    #[arg(long, default_value_t = 1)]
    pub amount: i64,
    /// Fraction of reservations made to be denied (asking for more than the limit); the rest fit easily.
    #[arg(long, default_value_t = 0.0)]
    pub deny_ratio: f64,
    /// How long each hold lasts (e.g. 1m); default: the server's. With `reserve-only`, a short one makes the
    /// holds expire within the run, so that expiry and the sweeper are exercised.
    #[arg(long, value_parser = parse_duration)]
    pub hold_ttl: Option<Duration>,
    /// Daily limit set on every key before the run (high: nothing is denied unless asked).
    #[arg(long, default_value_t = 1_000_000_000_000_000)]
    pub limit: i64,
    /// Do not set limits first (keys keep whatever they have).
    #[arg(long, conflicts_with = "setup_only")]
    pub no_setup: bool,
    /// Only set the limits, then exit (so the database can be analysed before a measured run).
    #[arg(long)]
    pub setup_only: bool,
    /// Operations per second over all workers (each worker paces itself); default: as fast as they can. For
    /// soaks at a steady, modest load.
    #[arg(long)]
    pub rate: Option<f64>,
    /// gRPC connections to spread the load over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The caller's credential (needs the spend scope, and admin unless --no-setup).
    #[arg(long, env = "ALLOWANCE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// What one worker saw while measuring.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: BTreeMap<&'static str, u64>,
    denied: u64,
}

/// A small fast generator: xorshift64*, seeded per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p && p > 0.0
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0 && args.keys > 0 && args.connections > 0, "counts must be positive");
    anyhow::ensure!((0.0..=1.0).contains(&args.deny_ratio), "--deny-ratio must be between 0 and 1");
    anyhow::ensure!(args.rate.is_none_or(|r| r.is_finite() && r > 0.0), "--rate must be positive");
    anyhow::ensure!(
        args.amount > 0 && args.amount < args.limit,
        "--amount must be positive and below --limit"
    );
    let endpoint = super::tls::endpoint(&args.addr, &args.tls)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(5));
    let bearer = Bearer::new(args.token.as_deref()).map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(InterceptedService::new(endpoint.connect().await?, bearer.clone()));
    }
    let run_id = format!("{:x}", chrono::Utc::now().timestamp_micros());
    let prefix = args.key_prefix.clone().unwrap_or_else(|| format!("bench-{run_id}-"));
    if !args.no_setup {
        set_limits(&channels, &prefix, args.keys, args.limit, args.mode).await?;
    }
    if args.setup_only {
        return Ok(());
    }

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let mut workers = JoinSet::new();
    for w in 0..args.concurrency {
        let channel = channels[w % channels.len()].clone();
        let worker = Worker {
            client: SpendingLimitsClient::new(channel.clone()),
            rate: RateLimitServiceClient::new(channel.clone()),
            health: tonic_health::pb::health_client::HealthClient::new(channel),
            prefix: prefix.clone(),
            tx_prefix: format!("{run_id}-{w}-"),
            keys: args.keys,
            mode: args.mode,
            amount: args.amount,
            deny_amount: args.limit.saturating_add(1),
            deny_ratio: args.deny_ratio,
            hold_ttl: args.hold_ttl.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            }),
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ ((w as u64 + 1) * 0xD1B5_4A32_D192_ED03)),
            pace: args.rate.map(|r| Duration::from_secs_f64(args.concurrency as f64 / r)),
        };
        workers.spawn(worker.run(measure_from, end));
    }
    let mut total = Tally::default();
    for tally in workers.join_all().await {
        total.latencies_us.extend(tally.latencies_us);
        total.denied += tally.denied;
        for (code, n) in tally.errors {
            *total.errors.entry(code).or_default() += n;
        }
    }
    report(&args, &prefix, total);
    Ok(())
}

async fn set_limits(
    channels: &[AuthorizedChannel],
    prefix: &str,
    keys: u64,
    limit: i64,
    mode: Mode,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let per_task = keys.div_ceil(32);
    for t in 0..32u64 {
        let mut client = SpendingLimitsClient::new(channels[t as usize % channels.len()].clone());
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            for k in (t * per_task)..((t + 1) * per_task).min(keys) {
                let key_id = format!("{prefix}{k}");
                if mode == Mode::CheckRate {
                    let rate = limit.min(crate::domain::MAX_RATE);
                    let period = pb::Period {
                        kind: Some(pb::period::Kind::Rolling(prost_types::Duration { seconds: 1, nanos: 0 })),
                    };
                    let limit = pb::Limit {
                        name: "bench-rate".into(),
                        period: Some(period),
                        amount: Some(rate),
                        burst: Some(rate),
                    };
                    client
                        .put_limit(pb::PutLimitRequest { key_id, unit: String::new(), limit: Some(limit) })
                        .await?;
                    continue;
                }
                client
                    .set_limit(pb::SetLimitRequest {
                        key_id,
                        unit: String::new(),
                        window: pb::Window::Daily.into(),
                        limit,
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    for r in tasks.join_all().await {
        r.map_err(|s| anyhow::anyhow!("setting limits: {}: {}", code_name(s.code()), s.message()))?;
    }
    Ok(())
}

struct Worker {
    client: SpendingLimitsClient<AuthorizedChannel>,
    rate: RateLimitServiceClient<AuthorizedChannel>,
    health: tonic_health::pb::health_client::HealthClient<AuthorizedChannel>,
    prefix: String,
    tx_prefix: String,
    keys: u64,
    mode: Mode,
    amount: i64,
    deny_amount: i64,
    deny_ratio: f64,
    hold_ttl: Option<prost_types::Duration>,
    rng: Rng,
    /// The time between two operations of this worker, with --rate.
    pace: Option<Duration>,
}

impl Worker {
    async fn run(mut self, measure_from: Instant, end: Instant) -> Tally {
        let mut tally = Tally::default();
        let mut n = 0u64;
        let mut ticks = self.pace.map(|p| {
            // Each worker starts at its own offset within the period: started together, they would all call
            // at once every period, and a paced load would measure its own bursts.
            let offset = p.mul_f64(self.rng.below(1 << 20) as f64 / f64::from(1 << 20));
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            if let Some(t) = &mut ticks {
                t.tick().await;
            }
            let started = Instant::now();
            if started >= end {
                return tally;
            }
            n += 1;
            let outcome = self.one(n).await;
            if started < measure_from {
                continue;
            }
            match outcome {
                Ok(denied) => {
                    tally.latencies_us.push(started.elapsed().as_micros() as u64);
                    tally.denied += u64::from(denied);
                }
                Err(status) => *tally.errors.entry(code_name(status.code())).or_default() += 1,
            }
        }
    }

    /// One operation; returns whether it was denied.
    async fn one(&mut self, n: u64) -> Result<bool, tonic::Status> {
        if self.mode == Mode::Health {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            self.health.check(request).await?;
            return Ok(false);
        }
        let key_id = format!("{}{}", self.prefix, self.rng.below(self.keys));
        if self.mode == Mode::GetLimits {
            self.client.get_limits(pb::GetLimitsRequest { key_id, unit: String::new() }).await?;
            return Ok(false);
        }
        if self.mode == Mode::CheckRate {
            let cost = if self.rng.chance(self.deny_ratio) { Some(self.deny_amount) } else { None };
            let r = self.rate.check_rate(pb::CheckRateRequest { key_id, cost, ..Default::default() }).await?;
            return Ok(!r.into_inner().allowed);
        }
        let deny = self.rng.chance(self.deny_ratio);
        let transaction_id = format!("{}{n}", self.tx_prefix);
        let reserved = self
            .client
            .reserve_spending(pb::ReserveSpendingRequest {
                key_id,
                transaction_id: transaction_id.clone(),
                amount: if deny { self.deny_amount } else { self.amount },
                hold_ttl: self.hold_ttl,
                ..Default::default()
            })
            .await?
            .into_inner();
        if !reserved.allowed {
            return Ok(true);
        }
        match self.mode {
            Mode::ReserveCommit => {
                self.client.commit(pb::CommitRequest { transaction_id, amount: None }).await?;
            }
            Mode::ReserveReverse => {
                self.client.reverse(pb::ReverseRequest { transaction_id }).await?;
            }
            Mode::ReserveOnly | Mode::GetLimits | Mode::Health | Mode::CheckRate => {}
        }
        Ok(false)
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn report(args: &BenchArgs, prefix: &str, mut tally: Tally) {
    tally.latencies_us.sort_unstable();
    let ops = tally.latencies_us.len() as u64;
    let secs = args.duration.as_secs_f64();
    let l = &tally.latencies_us;
    let (p50, p95, p99, max) =
        (percentile(l, 0.50), percentile(l, 0.95), percentile(l, 0.99), percentile(l, 1.0));
    let errors: u64 = tally.errors.values().sum();
    let mode = args.mode.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    if args.json {
        let v = json!({
            "mode": mode,
            "concurrency": args.concurrency,
            "keys": args.keys,
            "key_prefix": prefix,
            "duration_s": secs,
            "operations": ops,
            "ops_per_sec": ops as f64 / secs,
            "denied": tally.denied,
            "latency_ms": { "p50": p50, "p95": p95, "p99": p99, "max": max },
            "errors": tally.errors,
        });
        outln!("{v}");
    } else {
        outln!(
            "{mode}: concurrency {}, {} keys, {secs:.0}s: {:.0} ops/s ({ops} ops, {} denied, {errors} errors)",
            args.concurrency,
            args.keys,
            ops as f64 / secs,
            tally.denied
        );
        outln!("latency ms: p50 {p50:.3}  p95 {p95:.3}  p99 {p99:.3}  max {max:.3}");
        for (code, n) in &tally.errors {
            outln!("  {code}: {n}");
        }
    }
}
