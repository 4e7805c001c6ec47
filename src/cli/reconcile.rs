//! `allowance reconcile`: recompute every account's running totals from the ledger, against the database.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::output::Format;
use crate::app::{Allowance, Reconciliation};
use crate::clock::SystemClock;
use crate::domain::{Actor, Divergence, Totals};
use crate::storage::Store;
use crate::storage::postgres::PgStore;

/// Exit code when divergences were found and not repaired.
pub const EXIT_DIVERGED: u8 = 4;

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Set every diverging period's totals to what the ledger sums to, under the accounts' row locks (each
    /// repair is recorded in the audit trail as totals.repair). Without it, nothing is written.
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
totals with the sums of its transactions, as a newly applied limit would count them.

Exit codes: 0 consistent (or every divergence repaired), 1 error, 4 divergences found and not repaired.

Examples:
  allowance reconcile --database-url \"$DATABASE_URL\"
  allowance reconcile --repair --json";

pub async fn run(args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let store = PgStore::connect(&args.database_url, 2).await.context("connecting to the database")?;
    store.ready().await.context("the database is not ready (run `allowance migrate`)")?;
    let app = Allowance::new(Arc::new(store.clone()), Arc::new(SystemClock));
    let by = Actor::anonymous("cli:reconcile", uuid::Uuid::new_v4().to_string());
    let report = app.reconcile(args.repair.then_some(&by)).await.context("reconciling")?;
    store.pool().close().await;
    print(Format::of(args.json), &report);
    Ok(if report.divergences.is_empty() || report.repaired {
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

fn print(format: Format, report: &Reconciliation) {
    match format {
        Format::Json => {
            let value = json!({
                "accounts": report.accounts,
                "repaired": report.repaired,
                "divergences": report.divergences.iter().map(divergence_json).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
        }
        Format::Table => {
            let verb = if report.repaired { "repaired" } else { "diverged" };
            for d in &report.divergences {
                println!(
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
            let n = report.divergences.len();
            let what = match (n, report.repaired) {
                (0, _) => "running totals equal the ledger".to_owned(),
                (_, true) => format!("{n} diverging period(s) repaired"),
                (_, false) => format!("{n} diverging period(s), not repaired (--repair fixes them)"),
            };
            println!("checked {} account(s): {what}", report.accounts);
        }
    }
}
