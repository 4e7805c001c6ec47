//! The SQL of reconciliation's check of each account's hold bookkeeping: the count of its open holds and the
//! latest expiry the sweeper looks for (`accounts.open_holds`, `accounts.holds_until`; see the migration
//! 20261204000001), against its rows. Off the serving path.

use sqlx::{PgConnection, PgPool};

use super::{account_key, key_columns};
use crate::domain::{AccountKey, Actor, AuditAction, AuditEvent, Timestamp};
use crate::storage::{HoldBookkeeping, StorageError};

/// The accounts among `accounts` whose bookkeeping differs from their rows.
pub(super) async fn check(
    pool: &PgPool,
    accounts: &[AccountKey],
) -> Result<Vec<HoldBookkeeping>, StorageError> {
    let mut conn = pool.acquire().await?;
    Ok(diverging(&mut conn, accounts).await?.into_iter().map(|(_, b)| b).collect())
}

/// [`check`], then sets the bookkeeping of the accounts that differ to what their rows say, under their row
/// locks (taken in id order, as batches take them), with one audit event per account (by `by`, at `now`).
pub(super) async fn repair(
    pool: &PgPool,
    accounts: &[AccountKey],
    by: &Actor,
    now: Timestamp,
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
    let found = diverging(&mut tx, accounts).await?;
    if found.is_empty() {
        return Ok(found.into_iter().map(|(_, b)| b).collect());
    }
    let ids: Vec<i64> = found.iter().map(|(id, _)| *id).collect();
    let counts: Vec<i32> = found.iter().map(|(_, b)| b.open_hold_rows).collect();
    let untils: Vec<Option<Timestamp>> = found.iter().map(|(_, b)| b.repaired_holds_until()).collect();
    sqlx::query!(
        r#"UPDATE accounts a SET open_holds = u.open_holds, holds_until = u.holds_until
           FROM UNNEST($1::int8[], $2::int4[], $3::timestamptz[]) AS u(id, open_holds, holds_until)
           WHERE a.id = u.id"#,
        &ids,
        &counts,
        &untils as &[Option<Timestamp>],
    )
    .execute(&mut *tx)
    .await?;
    let events: Vec<AuditEvent> = found
        .iter()
        .map(|(_, b)| {
            let json = |open: i32, until: Option<Timestamp>| {
                serde_json::json!({
                    "open_holds": open,
                    "holds_until": until.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                })
            };
            AuditEvent::new(by, now, AuditAction::TotalsRepair, "holds")
                .on(&b.account.key_id, Some(&b.account.unit))
                .change(
                    Some(json(b.open_holds, b.holds_until)),
                    Some(json(b.open_hold_rows, b.repaired_holds_until())),
                )
        })
        .collect();
    super::audit::insert_audit(&mut tx, &events).await?;
    tx.commit().await?;
    Ok(found.into_iter().map(|(_, b)| b).collect())
}

/// The bookkeeping of each of `accounts` that differs from its rows, in key order, with the accounts' row ids.
async fn diverging(
    conn: &mut PgConnection,
    accounts: &[AccountKey],
) -> Result<Vec<(i64, HoldBookkeeping)>, StorageError> {
    let (keys, units) = key_columns(accounts);
    // Every open hold of the account (its share of each transaction, all partitions, by the index on
    // (account_id, expires_at)): those whose first key it is are counted on it; those expiring after its
    // cursor must be covered by `holds_until`, or the sweeper never looks at the account while it is idle.
    let rows = sqlx::query!(
        r#"SELECT a.id, a.key_id, a.unit, a.open_holds, a.holds_until, a.updated_at,
                  h.rows AS "rows!", h.latest
           FROM accounts a
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE t.position = 0)::int4 AS rows,
                      max(t.expires_at) FILTER (WHERE t.expires_at > a.updated_at) AS latest
               FROM transactions t
               WHERE t.account_id = a.id AND t.state = 1) h
           WHERE a.key_id = ANY($1) AND a.unit = ANY($2)
             AND (a.key_id, a.unit) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))
             AND (a.open_holds <> h.rows OR h.latest > COALESCE(a.holds_until, '-infinity'))
           ORDER BY a.key_id, a.unit"#,
        &keys,
        &units,
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                r.id,
                HoldBookkeeping {
                    account: account_key(r.key_id, r.unit)?,
                    open_holds: r.open_holds,
                    open_hold_rows: r.rows,
                    holds_until: r.holds_until,
                    latest_expiry_after_cursor: r.latest,
                    cursor: r.updated_at,
                },
            ))
        })
        .collect()
}
