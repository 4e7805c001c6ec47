//! `allowance partitions …` and `allowance retention run`: the transaction history's partitions, against the
//! database directly (no server needed).

use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::json;

use super::output::Format;
use crate::app::{Allowance, RetentionReport, format_retention};
use crate::clock::SystemClock;
use crate::config::HistoryConfig;
use crate::storage::postgres::PgStore;
use crate::storage::{HISTORY_JOB, HistoryPartition, Store};

#[derive(Debug, Args)]
pub struct Database {
    /// The database (direct access). It must be migrated.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, value_name = "URL")]
    pub database_url: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PartitionsCommand {
    /// List the partitions of the transaction history: name, range of created_at, estimated rows.
    #[command(after_help = "Example:\n  allowance partitions list --json")]
    List(Database),
    /// Create the current month's partition and --ahead months after it (UTC), where missing.
    #[command(after_help = "Example:\n  allowance partitions create --ahead 6")]
    Create {
        #[command(flatten)]
        db: Database,
        /// Months after the current one.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=24))]
        ahead: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Create partitions ahead, then export (with --export-dir) and drop the partitions older than the
    /// retention, and delete audit events older than --audit-retention. Waits for no one: if the job runs
    /// elsewhere (a replica), it says so and exits 1.
    #[command(after_help = "Examples:\n  allowance retention run --dry-run\n  \
                            allowance retention run --retention 500d --export-dir /var/backups/allowance")]
    Run {
        #[command(flatten)]
        db: Database,
        /// Show what would be dropped; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        history: HistoryConfig,
    },
}

async fn connect(db: &Database) -> anyhow::Result<(PgStore, Allowance<PgStore>)> {
    let store = PgStore::connect(&db.database_url, 2).await.context("connecting to the database")?;
    store.ready().await.context("the database is not ready (run `allowance migrate`)")?;
    let app = Allowance::new(Arc::new(store.clone()), Arc::new(SystemClock));
    Ok((store, app))
}

fn instant(t: Option<crate::domain::Timestamp>) -> Option<String> {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

fn partition_json(p: &HistoryPartition) -> serde_json::Value {
    json!({
        "name": p.name,
        "from": instant(p.from),
        "to": instant(p.to),
        "default": p.is_default,
        "detached": p.detached,
        "rows_estimate": p.rows_estimate,
    })
}

pub async fn partitions(command: PartitionsCommand) -> anyhow::Result<()> {
    match command {
        PartitionsCommand::List(db) => {
            let (store, app) = connect(&db).await?;
            let partitions = app.partitions().await.context("listing partitions")?;
            store.pool().close().await;
            match Format::of(db.json) {
                Format::Json => {
                    let list: Vec<_> = partitions.iter().map(partition_json).collect();
                    outln!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
                }
                Format::Table => {
                    outln!("{:<24} {:<22} {:<22} {:>12}", "NAME", "FROM", "TO", "ROWS (EST.)");
                    for p in &partitions {
                        let (from, to) = match (p.is_default, p.detached) {
                            (true, _) => ("(default)".to_owned(), "".to_owned()),
                            (_, true) => ("(detached)".to_owned(), "".to_owned()),
                            _ => (
                                instant(p.from).unwrap_or_else(|| "-infinity".into()),
                                instant(p.to).unwrap_or_else(|| "infinity".into()),
                            ),
                        };
                        outln!("{:<24} {from:<22} {to:<22} {:>12}", p.name, p.rows_estimate.max(0));
                    }
                }
            }
        }
        PartitionsCommand::Create { db, ahead } => {
            let (store, app) = connect(&db).await?;
            let created = app.create_partitions(ahead).await.context("creating partitions")?;
            store.pool().close().await;
            match Format::of(db.json) {
                Format::Json => outln!("{}", json!({ "created": created })),
                Format::Table if created.is_empty() => outln!("every partition needed already exists"),
                Format::Table => created.iter().for_each(|name| outln!("created {name}")),
            }
        }
    }
    Ok(())
}

pub async fn retention(command: RetentionCommand) -> anyhow::Result<()> {
    let RetentionCommand::Run { db, dry_run, history } = command;
    let settings = history.settings(true, !dry_run).map_err(anyhow::Error::msg)?;
    let (store, app) = connect(&db).await?;
    let run = store.exclusively(HISTORY_JOB, app.retention(&settings, dry_run)).await;
    store.pool().close().await;
    let report = match run.context("taking the history job's lock")? {
        None => anyhow::bail!("the history job is running elsewhere (a replica); try again later"),
        Some(report) => report?,
    };
    print(Format::of(db.json), &report);
    Ok(())
}

fn print(format: Format, r: &RetentionReport) {
    match format {
        Format::Json => {
            let value = json!({
                "dry_run": r.dry_run,
                "floor": format_retention(r.floor),
                "retention": format_retention(r.retention),
                "cutoff": instant(Some(r.cutoff)),
                "created": r.created,
                // A dry run knows only the planner's estimate, none for a table never analysed.
                "dropped": r.dropped.iter().map(|d| json!({
                    "name": d.name, "rows": (d.rows >= 0).then_some(d.rows),
                    "exported": d.exported.as_ref().map(|p| p.display().to_string()),
                })).collect::<Vec<_>>(),
                "kept": r.kept.iter().map(|(name, why)| json!({ "name": name, "reason": why })).collect::<Vec<_>>(),
                "refreshed_accounts": r.refreshed_accounts,
                "audit_deleted": r.audit_deleted,
            });
            outln!("{}", serde_json::to_string_pretty(&value).expect("JSON"));
        }
        Format::Table => {
            let verb = if r.dry_run { "would drop" } else { "dropped" };
            r.created.iter().for_each(|name| outln!("created {name}"));
            for d in &r.dropped {
                match &d.exported {
                    Some(path) => {
                        outln!("{verb} {} ({} rows, exported to {})", d.name, d.rows, path.display())
                    }
                    None if !r.dry_run => outln!("{verb} {} ({} rows)", d.name, d.rows),
                    None if d.rows < 0 => outln!("{verb} {} (rows not yet counted by ANALYZE)", d.name),
                    None => outln!("{verb} {} (about {} rows)", d.name, d.rows),
                }
            }
            r.kept.iter().for_each(|(name, why)| outln!("kept {name}: {why}"));
            outln!(
                "retention {} (floor {}): history before {} {}; {} audit event(s) deleted",
                format_retention(r.retention),
                format_retention(r.floor),
                instant(Some(r.cutoff)).unwrap_or_default(),
                if r.dropped.is_empty() { "is already gone" } else { verb },
                r.audit_deleted
            );
        }
    }
}
