//! `allowance reconcile`: recompute every account's running totals and hold bookkeeping from the ledger,
//! against the database.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::output::Format;
use crate::app::{Allowance, Reconciliation};
use crate::clock::SystemClock;
use crate::domain::{Actor, Divergence, StaleHold, Timestamp, Totals};
use crate::storage::postgres::PgStore;
use crate::storage::{HoldBookkeeping, Store};

/// Exit code when divergences were found and not repaired.
pub const EXIT_DIVERGED: u8 = 4;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Set what diverges to what the ledger says, under the accounts' row locks: each diverging period's
    /// totals, the release of stale holds, the count of open holds and the latest hold expiry (each repair is
    /// recorded in the audit trail as totals.repair). Without it, nothing is written.
    #[arg(long)]
    pub repair: bool,
    /// The database to reconcile (direct access, no server needed). It must be migrated.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub const HELP: &str = "\
Reads every account (in pages, each from one consistent snapshot: it blocks no one) and compares its running
totals with the sums of its transactions, as a newly applied limit would count them. It also looks for holds
that expired before the account's last write yet were never released (stale: nothing would ever release
them), and compares each account's count of open holds and the latest expiry the sweeper looks for with its
transactions.

Exit codes: 0 consistent (or every divergence repaired), 1 error, 4 divergences found and not repaired.

Examples:
  allowance reconcile --database-url \"$DATABASE_URL\"
  allowance reconcile --repair --json";

pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    // The database's clock, as `allowance serve` uses: a repair's batches then decide (and move each
    // account's expiry cursor) at the time the replicas use, whatever this machine's clock says.
    let store = PgStore::connect(&args.database_url, 2)
        .await
        .context("connecting to the database")?
        .with_database_clock();
    store.ready().await.context("the database is not ready (run `allowance migrate`)")?;
    let app = Allowance::new(Arc::new(store.clone()), Arc::new(SystemClock));
    let by = Actor::anonymous("cli:reconcile", uuid::Uuid::new_v4().to_string());
    let report = app.reconcile(args.repair.then_some(&by)).await.context("reconciling")?;
    store.pool().close().await;
    print(Format::of(args.json), &report);
    Ok(if report.is_consistent() || report.repaired {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIVERGED)
    })
}

fn totals_json(t: &Totals) -> serde_json::Value {
    json!({
        "committed": t.committed.to_string(),
        "held": t.held.to_string(),
        "since": t.since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

fn divergence_json(d: &Divergence) -> serde_json::Value {
    json!({
        "key_id": d.account.key_id.as_str(),
        "unit": d.account.unit.as_str(),
        "period": d.period.to_string(),
        "running": totals_json(&d.running),
        "ledger": totals_json(&d.ledger),
    })
}

fn time(t: &Timestamp) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn stale_json(h: &StaleHold) -> serde_json::Value {
    json!({
        "key_id": h.account.key_id.as_str(),
        "unit": h.account.unit.as_str(),
        "transaction_id": h.transaction_id.as_str(),
        "expires_at": time(&h.expires_at),
        "last_write": time(&h.cursor),
        "amount": h.amount.to_string(),
    })
}

fn bookkeeping_json(b: &HoldBookkeeping) -> serde_json::Value {
    json!({
        "key_id": b.account.key_id.as_str(),
        "unit": b.account.unit.as_str(),
        "open_holds": {"counted": b.open_holds, "rows": b.open_hold_rows},
        "holds_until": {
            "kept": b.holds_until.as_ref().map(time),
            "latest_open_expiry": b.latest_expiry_after_cursor.as_ref().map(time),
        },
    })
}

fn print(format: Format, report: &Reconciliation) {
    match format {
        Format::Json => {
            let value = json!({
                "accounts": report.accounts,
                "repaired": report.repaired,
                "divergences": report.divergences.iter().map(divergence_json).collect::<Vec<_>>(),
                "stale_holds": report.stale_holds.iter().map(stale_json).collect::<Vec<_>>(),
                "hold_bookkeeping": report.hold_bookkeeping.iter().map(bookkeeping_json).collect::<Vec<_>>(),
            });
            outln!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
        }
        Format::Table => {
            let verb = if report.repaired { "repaired" } else { "diverged" };
            for d in &report.divergences {
                outln!(
                    "{verb}: key {} unit {} period {}: running committed {} held {} since {}, ledger committed {} held {} since {}",
                    d.account.key_id,
                    d.account.unit,
                    d.period,
                    d.running.committed,
                    d.running.held,
                    d.running.since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    d.ledger.committed,
                    d.ledger.held,
                    d.ledger.since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                );
            }
            let released = if report.repaired { "released" } else { "stale" };
            for h in &report.stale_holds {
                outln!(
                    "{released}: key {} unit {} hold {} of {} expired {}, before the account's last write {}",
                    h.account.key_id,
                    h.account.unit,
                    h.transaction_id,
                    h.amount,
                    time(&h.expires_at),
                    time(&h.cursor),
                );
            }
            let set = if report.repaired { "repaired" } else { "diverged" };
            for b in &report.hold_bookkeeping {
                let until = |t: Option<&Timestamp>| t.map_or_else(|| "none".to_owned(), time);
                outln!(
                    "{set}: key {} unit {} open holds counted {}, in the rows {}; holds_until {}, latest open expiry {}",
                    b.account.key_id,
                    b.account.unit,
                    b.open_holds,
                    b.open_hold_rows,
                    until(b.holds_until.as_ref()),
                    until(b.latest_expiry_after_cursor.as_ref()),
                );
            }
            let found: Vec<String> = [
                (report.divergences.len(), "diverging period(s)"),
                (report.stale_holds.len(), "stale hold(s)"),
                (report.hold_bookkeeping.len(), "account(s) with diverging hold bookkeeping"),
            ]
            .into_iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
            let what = match (found.is_empty(), report.repaired) {
                (true, _) => "running totals equal the ledger, hold bookkeeping the rows".to_owned(),
                (false, true) => format!("{} repaired", found.join(", ")),
                (false, false) => format!("{}, not repaired (--repair fixes them)", found.join(", ")),
            };
            outln!("checked {} account(s): {what}", report.accounts);
        }
    }
}
