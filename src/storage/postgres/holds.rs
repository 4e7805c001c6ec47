//! The SQL of reconciliation's check of each account's holds: open holds behind its expiry cursor, and its
//! hold bookkeeping — the count of its open holds and the latest expiry the sweeper looks for
//! (`accounts.open_holds`, `accounts.holds_until`; see the migration 20261204000001) — against its rows.
//! Off the serving path.

use sqlx::{PgConnection, PgPool};

use super::{account_key, key_columns, parse_stored};
use crate::domain::{AccountKey, Actor, AuditAction, AuditEvent, StaleHold, Timestamp, TransactionId};
use crate::storage::{HoldBookkeeping, HoldCheck, StorageError};

/// What is wrong with the holds of `accounts`, from one snapshot.
pub(super) async fn check(pool: &PgPool, accounts: &[AccountKey]) -> Result<HoldCheck, StorageError> {
    let mut conn = pool.acquire().await?;
    let mut found = HoldCheck::default();
    for (_, stale, bookkeeping) in read(&mut conn, accounts).await? {
        found.stale.extend(stale);
        found.bookkeeping.extend(bookkeeping);
    }
    Ok(found)
}

/// Sets the bookkeeping of the accounts among `accounts` that differs from their rows to what the rows say,
/// under their row locks (taken in id order, as batches take them), with one audit event per account (by
/// `by`, at `now`). Returns what it changed.
pub(super) async fn repair(
    pool: &PgPool,
    accounts: &[AccountKey],
    by: &Actor,
    now: Timestamp,
    database_clock: bool,
) -> Result<Vec<HoldBookkeeping>, StorageError> {
    let mut tx = pool.begin().await?;
    let (keys, units) = key_columns(accounts);
    sqlx::query!(
        r#"SELECT a.id FROM accounts a
           WHERE a.key_id = ANY($1) AND a.unit = ANY($2)
             AND (a.key_id, a.unit) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
           ORDER BY a.id
           FOR UPDATE"#,
        &keys,
        &units,
    )
    .fetch_all(&mut *tx)
    .await?;
    // Read committed: this statement's snapshot is taken after the locks, so it sees every batch that wrote
    // these accounts before, and none can write them until the commit.
    let found: Vec<(i64, HoldBookkeeping)> = read(&mut tx, accounts)
        .await?
        .into_iter()
        .filter_map(|(id, _, bookkeeping)| bookkeeping.map(|b| (id, b)))
        .collect();
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = found.iter().map(|(id, _)| *id).collect();
    let counts: Vec<i32> = found.iter().map(|(_, b)| b.open_hold_rows).collect();
    let untils: Vec<Option<Timestamp>> = found.iter().map(|(_, b)| b.repaired_holds_until()).collect();
    sqlx::query!(
        r#"UPDATE accounts a SET open_holds = u.open_holds, holds_until = u.holds_until
           FROM UNNEST($1::int8[], $2::int4[], $3::timestamptz[]) AS u(id, open_holds, holds_until)
           WHERE a.id = ANY($1) AND a.id = u.id"#,
        &ids,
        &counts,
        &untils as &[Option<Timestamp>],
    )
    .execute(&mut *tx)
    .await?;
    let json = |open: i32, until: Option<Timestamp>| {
        serde_json::json!({
            "open_holds": open,
            "holds_until": until.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        })
    };
    let events: Vec<AuditEvent> = found
        .iter()
        .map(|(_, b)| {
            AuditEvent::new(by, now, AuditAction::TotalsRepair, "holds")
                .on(&b.account.key_id, Some(&b.account.unit))
                .change(
                    Some(json(b.open_holds, b.holds_until)),
                    Some(json(b.open_hold_rows, b.repaired_holds_until())),
                )
        })
        .collect();
    super::audit::insert_audit(&mut tx, &events, database_clock).await?;
    tx.commit().await?;
    Ok(found.into_iter().map(|(_, b)| b).collect())
}

/// Each of `accounts` with something wrong with its holds, in key order: its row id, its open holds behind
/// its cursor, and its bookkeeping if that differs from its rows.
async fn read(
    conn: &mut PgConnection,
    accounts: &[AccountKey],
) -> Result<Vec<(i64, Vec<StaleHold>, Option<HoldBookkeeping>)>, StorageError> {
    let (keys, units) = key_columns(accounts);
    // Every open hold of the account (its share of each transaction, all partitions, by the index on
    // (account_id, expires_at)): those whose first key it is are counted on it; those expiring after its
    // cursor must be covered by `holds_until`, or the sweeper never looks at the account while it is idle;
    // none may expire at or before the cursor.
    let rows = sqlx::query!(
        r#"SELECT a.id, a.key_id, a.unit, a.open_holds, a.holds_until, a.updated_at,
                  h.rows AS "rows!", h.latest, h.stale_ids AS "stale_ids!",
                  h.stale_expiries AS "stale_expiries!", h.stale_amounts AS "stale_amounts!"
           FROM accounts a
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE t.position = 0)::int4 AS rows,
                      max(t.expires_at) FILTER (WHERE t.expires_at > a.updated_at) AS latest,
                      COALESCE(array_agg(t.transaction_id ORDER BY t.transaction_id)
                                   FILTER (WHERE t.expires_at <= a.updated_at), '{}') AS stale_ids,
                      COALESCE(array_agg(t.expires_at ORDER BY t.transaction_id)
                                   FILTER (WHERE t.expires_at <= a.updated_at), '{}') AS stale_expiries,
                      COALESCE(array_agg(t.amount ORDER BY t.transaction_id)
                                   FILTER (WHERE t.expires_at <= a.updated_at), '{}') AS stale_amounts
               FROM transactions t
               WHERE t.account_id = a.id AND t.state = 1) h
           WHERE a.key_id = ANY($1) AND a.unit = ANY($2)
             AND (a.key_id, a.unit) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
             AND (a.open_holds <> h.rows OR h.latest > COALESCE(a.holds_until, '-infinity')
                  OR cardinality(h.stale_ids) > 0)
           ORDER BY a.key_id, a.unit"#,
        &keys,
        &units,
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let account = account_key(r.key_id, r.unit)?;
            let stale = r
                .stale_ids
                .into_iter()
                .zip(r.stale_expiries)
                .zip(r.stale_amounts)
                .map(|((id, expires_at), amount)| {
                    Ok(StaleHold {
                        account: account.clone(),
                        transaction_id: parse_stored(TransactionId::parse(id))?,
                        expires_at,
                        cursor: r.updated_at,
                        amount,
                    })
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            let latest = r.latest;
            let diverges =
                r.open_holds != r.rows || latest.is_some_and(|l| r.holds_until.is_none_or(|u| l > u));
            let bookkeeping = diverges.then(|| HoldBookkeeping {
                account: account.clone(),
                open_holds: r.open_holds,
                open_hold_rows: r.rows,
                holds_until: r.holds_until,
                latest_expiry_after_cursor: latest,
                cursor: r.updated_at,
            });
            Ok((r.id, stale, bookkeeping))
        })
        .collect()
}
