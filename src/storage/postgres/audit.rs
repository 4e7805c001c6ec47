//! SQL of callers and of the audit trail.

use sqlx::{PgConnection, PgExecutor};

use crate::domain::{
    AuditAction, AuditEvent, AuditFilter, Caller, CallerId, CallerName, CallerRecord, KeyPrefixes, Scope,
    SecretHash, Timestamp,
};
use crate::storage::StorageError;

/// Appends audit events, in the caller's transaction. With `database_clock`, each is stamped with the
/// database's clock instead of the instant the application gave it (a replica's clock, for events made
/// outside a batch), so that one clock orders the whole trail.
pub(super) async fn insert_audit(
    conn: &mut PgConnection,
    events: &[AuditEvent],
    database_clock: bool,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let mut at = Vec::new();
    let mut caller_ids = Vec::new();
    let mut caller_names = Vec::new();
    let mut request_ids = Vec::new();
    let mut actions = Vec::new();
    let mut key_ids = Vec::new();
    let mut units = Vec::new();
    let mut subjects = Vec::new();
    let mut befores = Vec::new();
    let mut afters = Vec::new();
    for e in events {
        at.push(e.at);
        caller_ids.push(e.caller_id.map(CallerId::uuid));
        caller_names.push(e.caller_name.clone());
        request_ids.push(e.request_id.clone());
        actions.push(e.action.as_str().to_owned());
        key_ids.push(e.key_id.clone());
        units.push(e.unit.clone());
        subjects.push(e.subject.clone());
        befores.push(e.before.clone());
        afters.push(e.after.clone());
    }
    sqlx::query!(
        r#"INSERT INTO audit_events (at, caller_id, caller_name, request_id, action, key_id, unit, subject,
                                    before, after)
           SELECT CASE WHEN $11 THEN clock_timestamp() ELSE u.at END, u.caller_id, u.caller_name, u.request_id,
                  u.action, u.key_id, u.unit, u.subject, u.before, u.after
           FROM UNNEST($1::timestamptz[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                       $7::text[], $8::text[], $9::jsonb[], $10::jsonb[])
               AS u(at, caller_id, caller_name, request_id, action, key_id, unit, subject, before, after)"#,
        &at,
        &caller_ids as &[Option<uuid::Uuid>],
        &caller_names,
        &request_ids,
        &actions,
        &key_ids as &[Option<String>],
        &units as &[Option<String>],
        &subjects,
        &befores as &[Option<serde_json::Value>],
        &afters as &[Option<serde_json::Value>],
        database_clock,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub(super) async fn insert_caller(conn: &mut PgConnection, r: &CallerRecord) -> Result<(), sqlx::Error> {
    let c = &r.caller;
    let scopes: Vec<String> = c.scopes.iter().map(|s| s.as_str().to_owned()).collect();
    sqlx::query!(
        r#"INSERT INTO callers (id, name, scopes, key_prefixes, secret_hash, previous_secret_hash, created_at,
                               rotated_at, revoked_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $7)"#,
        c.id.uuid(),
        c.name.as_str(),
        &scopes,
        c.key_prefixes.as_slice(),
        r.secret_hash.as_bytes(),
        r.previous_secret_hash.as_ref().map(SecretHash::as_bytes),
        c.created_at,
        c.rotated_at,
        c.revoked_at,
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes what may change of a caller: its secrets and the rotation and revocation times.
pub(super) async fn update_caller(
    conn: &mut PgConnection,
    r: &CallerRecord,
    now: Timestamp,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"UPDATE callers SET secret_hash = $2, previous_secret_hash = $3, rotated_at = $4, revoked_at = $5,
                              updated_at = $6
           WHERE id = $1"#,
        r.caller.id.uuid(),
        r.secret_hash.as_bytes(),
        r.previous_secret_hash.as_ref().map(SecretHash::as_bytes),
        r.caller.rotated_at,
        r.caller.revoked_at,
        now,
    )
    .execute(conn)
    .await?;
    Ok(())
}

struct CallerRow {
    id: uuid::Uuid,
    name: String,
    scopes: Vec<String>,
    key_prefixes: Vec<String>,
    secret_hash: Vec<u8>,
    previous_secret_hash: Option<Vec<u8>>,
    created_at: Timestamp,
    rotated_at: Option<Timestamp>,
    revoked_at: Option<Timestamp>,
}

impl CallerRow {
    fn into_domain(self) -> Result<CallerRecord, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("caller {}: invalid {what}", self.id));
        let scopes = self
            .scopes
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<Option<_>>()
            .ok_or_else(|| corrupt("scopes"))?;
        let previous_secret_hash = match &self.previous_secret_hash {
            Some(h) => Some(SecretHash::from_bytes(h).ok_or_else(|| corrupt("previous secret hash"))?),
            None => None,
        };
        Ok(CallerRecord {
            caller: Caller {
                id: CallerId::from_uuid(self.id),
                name: CallerName::parse(self.name.clone()).map_err(|_| corrupt("name"))?,
                scopes,
                key_prefixes: KeyPrefixes::parse(self.key_prefixes.clone())
                    .map_err(|_| corrupt("key prefixes"))?,
                created_at: self.created_at,
                rotated_at: self.rotated_at,
                revoked_at: self.revoked_at,
                has_previous_secret: previous_secret_hash.is_some(),
            },
            secret_hash: SecretHash::from_bytes(&self.secret_hash).ok_or_else(|| corrupt("secret hash"))?,
            previous_secret_hash,
        })
    }
}

/// One caller, locked for update when `lock`.
pub(super) async fn caller_for_update(
    conn: &mut PgConnection,
    id: CallerId,
) -> Result<Option<CallerRecord>, StorageError> {
    let row = sqlx::query_as!(
        CallerRow,
        r#"SELECT id, name, scopes, key_prefixes, secret_hash, previous_secret_hash, created_at, rotated_at,
                  revoked_at
           FROM callers WHERE id = $1 FOR UPDATE"#,
        id.uuid()
    )
    .fetch_optional(conn)
    .await?;
    row.map(CallerRow::into_domain).transpose()
}

pub(super) async fn all_callers<'e>(db: impl PgExecutor<'e>) -> Result<Vec<CallerRecord>, StorageError> {
    let rows = sqlx::query_as!(
        CallerRow,
        r#"SELECT id, name, scopes, key_prefixes, secret_hash, previous_secret_hash, created_at, rotated_at,
                  revoked_at
           FROM callers ORDER BY created_at, id"#
    )
    .fetch_all(db)
    .await?;
    rows.into_iter().map(CallerRow::into_domain).collect()
}

pub(super) async fn audit_events<'e>(
    db: impl PgExecutor<'e>,
    filter: &AuditFilter,
    limit: u32,
) -> Result<Vec<AuditEvent>, StorageError> {
    let rows = sqlx::query!(
        r#"SELECT id, at, caller_id, caller_name, request_id, action, key_id, unit, subject, before, after
           FROM audit_events
           WHERE ($1::bigint IS NULL OR id < $1)
             AND ($2::text IS NULL OR key_id = $2)
             AND ($3::uuid IS NULL OR caller_id = $3)
             AND ($4::timestamptz IS NULL OR at >= $4)
             AND ($5::timestamptz IS NULL OR at < $5)
           ORDER BY id DESC
           LIMIT $6"#,
        filter.before_id,
        filter.key_id.as_ref().map(|k| k.as_str()),
        filter.caller_id.map(CallerId::uuid),
        filter.since,
        filter.until,
        i64::from(limit),
    )
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|r| {
            let action = AuditAction::parse(&r.action)
                .ok_or_else(|| StorageError::Corrupt(format!("audit event {}: unknown action", r.id)))?;
            Ok(AuditEvent {
                id: r.id,
                at: r.at,
                caller_id: r.caller_id.map(CallerId::from_uuid),
                caller_name: r.caller_name,
                request_id: r.request_id,
                action,
                key_id: r.key_id,
                unit: r.unit,
                subject: r.subject,
                before: r.before,
                after: r.after,
            })
        })
        .collect()
}
