//! The SQL of history partitions and retention: listing, creating ahead, exporting and dropping old
//! partitions of `transactions`, and deleting old audit events. Maintenance, off the serving path: these
//! statements run on a replica's pool once an hour, or from the CLI.

use std::path::{Path, PathBuf};

use chrono::TimeDelta;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::{StoredLimit, account_key, stored_limit};
use crate::domain::{AccountKey, Timestamp, utc_month_start};
use crate::storage::{HistoryPartition, PartitionDrop, StorageError};

/// How long a retention run waits for the lock on `transactions` that detaching a partition needs: while it
/// waits, new statements on the table queue behind it, so it gives up rather than stall the service.
const LOCK_TIMEOUT: &str = "5s";

/// Audit events deleted per statement.
const AUDIT_BATCH: i64 = 10_000;

/// Attached partitions (from the `transactions_partitions` view of the migration) and detached leftovers.
pub(super) async fn partitions(pool: &PgPool) -> Result<Vec<HistoryPartition>, StorageError> {
    let rows = sqlx::query!(
        r#"SELECT name AS "name!", lower, upper, is_default AS "is_default!", rows_estimate AS "rows_estimate!",
                  false AS "detached!"
           FROM transactions_partitions
           UNION ALL
           -- Left by a run that detached a partition and stopped before dropping it.
           SELECT c.relname::text, NULL, NULL, false, c.reltuples::int8, true
           FROM pg_class c
           WHERE c.relname ~ '^transactions_[0-9]{6}$|^transactions_legacy$' AND c.relkind = 'r'
             AND NOT c.relispartition AND c.relnamespace = current_schema()::regnamespace"#
    )
    .fetch_all(pool)
    .await?;
    let mut partitions: Vec<HistoryPartition> = rows
        .into_iter()
        .map(|r| HistoryPartition {
            name: r.name,
            from: r.lower,
            to: r.upper,
            is_default: r.is_default,
            detached: r.detached,
            rows_estimate: r.rows_estimate,
        })
        .collect();
    // Oldest first, then detached leftovers, the default last.
    partitions.sort_by_key(|p| (p.is_default, p.detached, p.to.is_none(), p.to));
    Ok(partitions)
}

pub(super) async fn create(
    pool: &PgPool,
    from: Timestamp,
    to: Timestamp,
) -> Result<Vec<String>, StorageError> {
    let existing = partitions(pool).await?;
    let mut created = Vec::new();
    let mut month = utc_month_start(from, 0);
    while month < to {
        let end = utc_month_start(month, 1);
        let covered = existing.iter().any(|p| {
            !p.is_default && !p.detached && p.from.is_none_or(|f| f < end) && p.to.is_some_and(|t| t > month)
        });
        if !covered {
            let name = format!("transactions_{}", month.format("%Y%m"));
            let made = sqlx::query_scalar!(
                r#"SELECT transactions_create_partition($1, $2, $3) AS "created!""#,
                name,
                month,
                end
            )
            .fetch_one(pool)
            .await?;
            if made {
                tracing::info!(partition = %name, from = %month, to = %end, "created a history partition");
                created.push(name);
            }
        }
        month = end;
    }
    Ok(created)
}

pub(super) async fn drop_partition(
    pool: &PgPool,
    name: &str,
    export_dir: Option<&Path>,
) -> Result<PartitionDrop, StorageError> {
    let Some(partition) = partitions(pool).await?.into_iter().find(|p| p.name == name) else {
        return Ok(PartitionDrop::NotFound);
    };
    if partition.is_default {
        return Ok(PartitionDrop::Default);
    }
    // The name comes from the catalogue and matches `transactions_…`: safe to quote into DDL.
    let table = format!("\"{}\"", partition.name.replace('"', "\"\""));
    if !partition.detached {
        // Open holds keep it. Counted before the detach, by a scan of the partition that makes no serving
        // statement wait (no index finds open holds: state changes are HOT updates, see the migration
        // 20261204000001). A batch cannot open a hold in the partition between this count and the detach:
        // a hold's created_at is its batch's `now`, by the database's clock and never before its account's
        // last write, and this partition ended before the retention floor (more than the longest period
        // plus MAX_HOLD_TTL ago). Holds released meanwhile only make the count too cautious.
        let open: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE state = 1"))
            .fetch_one(pool)
            .await?;
        if open > 0 {
            return Ok(PartitionDrop::OpenHolds(u64::try_from(open).unwrap_or(0)));
        }
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE transactions DETACH PARTITION {table}")).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    // Detached: no serving statement reads it any more, so the export blocks no one.
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(pool).await?;
    let exported = match export_dir {
        Some(dir) => Some(export(pool, &partition.name, &table, dir).await?),
        None => None,
    };
    sqlx::query(&format!("DROP TABLE {table}")).execute(pool).await?;
    tracing::info!(partition = %partition.name, rows, exported = ?exported, "dropped a history partition");
    Ok(PartitionDrop::Dropped { rows: u64::try_from(rows).unwrap_or(0), exported })
}

/// Writes the table as CSV with a header to `<dir>/<name>.csv`: into `.partial`, synced, renamed, and the
/// directory synced, so a file named `.csv` is always complete.
async fn export(pool: &PgPool, name: &str, table: &str, dir: &Path) -> Result<PathBuf, StorageError> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        StorageError::Export(format!("{what} {}: {e}", path.display()))
    };
    let partial = dir.join(format!("{name}.csv.partial"));
    let done = dir.join(format!("{name}.csv"));
    let mut file = tokio::fs::File::create(&partial).await.map_err(|e| io("creating", &partial, e))?;
    let mut conn = pool.acquire().await?;
    let mut stream = conn
        .copy_out_raw(&format!("COPY (SELECT * FROM {table} ORDER BY created_at, transaction_id, position) TO STDOUT WITH (FORMAT csv, HEADER)"))
        .await?;
    while let Some(chunk) = stream.next().await.transpose()? {
        file.write_all(&chunk).await.map_err(|e| io("writing", &partial, e))?;
    }
    drop(stream);
    file.sync_all().await.map_err(|e| io("syncing", &partial, e))?;
    drop(file);
    tokio::fs::rename(&partial, &done).await.map_err(|e| io("renaming", &partial, e))?;
    let directory = tokio::fs::File::open(dir).await.map_err(|e| io("opening", dir, e))?;
    directory.sync_all().await.map_err(|e| io("syncing", dir, e))?;
    Ok(done)
}

pub(super) async fn longest_spending_period(pool: &PgPool) -> Result<Option<TimeDelta>, StorageError> {
    // Distinct periods only: a handful of texts, whatever the number of keys (one pass over accounts).
    let rows = sqlx::query!(
        r#"SELECT DISTINCT period AS "period!" FROM plan_limits WHERE burst IS NULL
           UNION
           SELECT DISTINCT l->>'period' FROM accounts a CROSS JOIN LATERAL jsonb_array_elements(a.limits) l
           WHERE l->'burst' IS NULL OR l->'burst' = 'null'::jsonb"#
    )
    .fetch_all(pool)
    .await?;
    let mut longest = None;
    for r in rows {
        let spec =
            stored_limit(StoredLimit { name: "period".into(), period: r.period, amount: None, burst: None })?;
        longest = longest.max(Some(spec.period.longest_span()));
    }
    Ok(longest)
}

pub(super) async fn accounts_written_before(
    pool: &PgPool,
    before: Timestamp,
    after: Option<&AccountKey>,
    limit: u32,
) -> Result<Vec<AccountKey>, StorageError> {
    let (key_id, unit) = after.map_or(("", ""), |a| (a.key_id.as_str(), a.unit.as_str()));
    let rows = sqlx::query!(
        r#"SELECT key_id, unit FROM accounts
           WHERE (key_id, unit) > ($1, $2) AND updated_at < $3 AND totals <> '[]'::jsonb
           ORDER BY key_id, unit LIMIT $4"#,
        key_id,
        unit,
        before,
        i64::from(limit)
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|r| account_key(r.key_id, r.unit)).collect()
}

pub(super) async fn delete_audit_events_before(
    pool: &PgPool,
    before: Timestamp,
) -> Result<u64, StorageError> {
    let mut deleted = 0;
    loop {
        // A batch per statement: short transactions, and the index on `at` finds each batch.
        let n = sqlx::query!(
            r#"DELETE FROM audit_events
               WHERE id = ANY(ARRAY(SELECT id FROM audit_events WHERE at < $1 ORDER BY at LIMIT $2))"#,
            before,
            AUDIT_BATCH
        )
        .execute(pool)
        .await?
        .rows_affected();
        deleted += n;
        if n < AUDIT_BATCH as u64 {
            return Ok(deleted);
        }
    }
}
