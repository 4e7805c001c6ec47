//! Callers: who may call, with which scopes, on which keys. Credentials are checked against an in-memory copy
//! of the `callers` table, so authentication costs no database round trip; every replica re-reads the table
//! every refresh interval, which bounds how long a revoked credential keeps working elsewhere.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{Allowance, Error, metrics};
use crate::domain::{
    Actor, AuditAction, AuditEvent, AuditFilter, AuthFailure, Caller, CallerId, CallerName, CallerRecord,
    Credential, KeyPrefixes, Rejection, Scope, Secret,
};
use crate::storage::Store;

/// Most audit events returned by one page.
pub const MAX_AUDIT_PAGE: u32 = 1000;
pub const DEFAULT_AUDIT_PAGE: u32 = 100;

/// The credentials every call is checked against.
pub struct CallerCache {
    state: RwLock<CacheState>,
    /// Past this age without a successful refresh, authentication refuses (UNAVAILABLE) rather than trust a
    /// copy that may miss revocations.
    max_age: Duration,
}

struct CacheState {
    by_id: HashMap<CallerId, CallerRecord>,
    loaded_at: Option<Instant>,
    /// Changes this replica made, with when: a re-read that started before a change was committed returns
    /// the row as it was, and must not undo the change here.
    local: HashMap<CallerId, (CallerRecord, Instant)>,
}

impl CallerCache {
    pub fn new(max_age: Duration) -> Self {
        let state = CacheState { by_id: HashMap::new(), loaded_at: None, local: HashMap::new() };
        Self { state: RwLock::new(state), max_age }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CacheState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CacheState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the whole copy with what the table held when a read that started at `started` ran. Changes
    /// this replica made after `started` may be missing from it; they are kept.
    pub fn replace(&self, callers: Vec<CallerRecord>, started: Instant) {
        let mut by_id: HashMap<CallerId, CallerRecord> =
            callers.into_iter().map(|c| (c.caller.id, c)).collect();
        let mut state = self.write();
        state.local.retain(|_, (_, at)| *at >= started);
        for (id, (record, _)) in &state.local {
            by_id.insert(*id, record.clone());
        }
        state.by_id = by_id;
        state.loaded_at = Some(started);
    }

    /// A change made by this replica takes effect here at once (others see it at their next refresh).
    fn upsert(&self, record: CallerRecord) {
        let mut state = self.write();
        state.local.insert(record.caller.id, (record.clone(), Instant::now()));
        state.by_id.insert(record.caller.id, record);
    }

    /// Loaded, and re-read within the maximum age: calls can be checked.
    pub fn is_fresh(&self) -> bool {
        self.read().loaded_at.is_some_and(|at| at.elapsed() <= self.max_age)
    }

    /// The caller presenting `credential`, if its secret is valid, it is not revoked and it holds `scope`.
    pub fn authenticate(&self, credential: &Credential, scope: Option<Scope>) -> Result<Caller, AuthFailure> {
        if !self.is_fresh() {
            return Err(AuthFailure::Unavailable);
        }
        let state = self.read();
        let Some(record) = state.by_id.get(&credential.id) else {
            // Hash anyway: an unknown id must not answer faster than a known one with a wrong secret.
            std::hint::black_box(crate::domain::SecretHash::of(credential.secret()));
            return Err(AuthFailure::UnknownCaller);
        };
        record.authenticate(credential.secret())?;
        if let Some(scope) = scope
            && !record.caller.scopes.contains(&scope)
        {
            return Err(AuthFailure::MissingScope(scope));
        }
        Ok(record.caller.clone())
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A caller just created or rotated, with the credential to hand over once.
#[derive(Debug)]
pub struct IssuedCredential {
    pub caller: Caller,
    /// `<id>:<secret>`: shown once, never stored or logged.
    pub credential: String,
}

fn new_secret() -> Result<Secret, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| {
        tracing::error!(error = %e, "the operating system's random source failed");
        Error::Internal
    })?;
    Ok(Secret::from_random(bytes))
}

impl<S: Store> Allowance<S> {
    /// The credentials this replica checks calls against.
    pub fn caller_cache(&self) -> Arc<CallerCache> {
        self.callers.clone()
    }

    /// Re-reads every caller from the database into this replica's cache.
    pub async fn refresh_callers(&self) -> Result<usize, Error> {
        let started = Instant::now();
        let callers = self.store.callers().await.inspect_err(metrics::storage_error)?;
        let n = callers.len();
        self.callers.replace(callers, started);
        Ok(n)
    }

    /// Creates a caller and its first secret.
    pub async fn create_caller(
        &self,
        name: CallerName,
        scopes: BTreeSet<Scope>,
        key_prefixes: KeyPrefixes,
        by: &Actor,
    ) -> Result<IssuedCredential, Error> {
        let secret = new_secret()?;
        let now = self.clock.now();
        let caller = Caller {
            id: CallerId::new_random(),
            name,
            scopes,
            key_prefixes,
            created_at: now,
            rotated_at: None,
            revoked_at: None,
            has_previous_secret: false,
        };
        let record =
            CallerRecord { caller: caller.clone(), secret_hash: secret.hash(), previous_secret_hash: None };
        let audit = AuditEvent::new(by, now, AuditAction::CallerCreate, caller.id.to_string());
        self.store.create_caller(&record, audit).await.inspect_err(metrics::storage_error)?;
        self.callers.upsert(record);
        Ok(IssuedCredential { credential: Credential::format(caller.id, &secret), caller })
    }

    /// Issues a second secret; the current one keeps working until [`Allowance::revoke_caller`] with
    /// `previous_secret_only`.
    pub async fn rotate_caller(&self, id: CallerId, by: &Actor) -> Result<IssuedCredential, Error> {
        let secret = new_secret()?;
        let now = self.clock.now();
        let hash = secret.hash();
        let record = self
            .update_caller(id, |current| {
                let next = current.rotate(hash, now)?;
                Ok(Some((next, AuditEvent::new(by, now, AuditAction::CallerRotate, id.to_string()))))
            })
            .await?;
        Ok(IssuedCredential { credential: Credential::format(id, &secret), caller: record.caller })
    }

    /// Revokes a caller for good, or with `previous_secret_only` only the secret its last rotation replaced.
    /// Revoking a revoked caller changes nothing.
    pub async fn revoke_caller(
        &self,
        id: CallerId,
        previous_secret_only: bool,
        by: &Actor,
    ) -> Result<Caller, Error> {
        let now = self.clock.now();
        let record = self
            .update_caller(id, |current| {
                if previous_secret_only {
                    let next = current.revoke_previous_secret()?;
                    let event =
                        AuditEvent::new(by, now, AuditAction::CallerRevokePreviousSecret, id.to_string());
                    return Ok(Some((next, event)));
                }
                Ok(current
                    .revoke(now)
                    .map(|next| (next, AuditEvent::new(by, now, AuditAction::CallerRevoke, id.to_string()))))
            })
            .await?;
        Ok(record.caller)
    }

    async fn update_caller<F>(&self, id: CallerId, apply: F) -> Result<CallerRecord, Error>
    where
        F: FnOnce(&CallerRecord) -> Result<Option<(CallerRecord, AuditEvent)>, Rejection> + Send,
    {
        match self.store.update_caller(id, apply).await.inspect_err(metrics::storage_error)? {
            None => Err(Rejection::CallerNotFound(id).into()),
            Some(result) => {
                let record = result?;
                self.callers.upsert(record.clone());
                Ok(record)
            }
        }
    }

    pub async fn list_callers(&self) -> Result<Vec<Caller>, Error> {
        let records = self.store.callers().await.inspect_err(metrics::storage_error)?;
        Ok(records.into_iter().map(|r| r.caller).collect())
    }

    /// One page of audit events, newest first, and the id to continue below if there may be more.
    pub async fn audit_events(
        &self,
        filter: AuditFilter,
        page_size: u32,
    ) -> Result<(Vec<AuditEvent>, Option<i64>), Error> {
        let page_size = page_size.clamp(1, MAX_AUDIT_PAGE);
        let events = self.store.audit_events(&filter, page_size).await.inspect_err(metrics::storage_error)?;
        let next = (events.len() == page_size as usize).then(|| events.last().map(|e| e.id)).flatten();
        Ok((events, next))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::domain::{SecretHash, Timestamp};

    fn record(secret: &str, revoked: bool) -> CallerRecord {
        CallerRecord {
            caller: Caller {
                id: CallerId::from_uuid(uuid::Uuid::nil()),
                name: CallerName::parse("svc").unwrap(),
                scopes: BTreeSet::from([Scope::Read]),
                key_prefixes: KeyPrefixes::any(),
                created_at: Timestamp::UNIX_EPOCH,
                rotated_at: None,
                revoked_at: revoked.then_some(Timestamp::UNIX_EPOCH),
                has_previous_secret: false,
            },
            secret_hash: SecretHash::of(secret),
            previous_secret_hash: None,
        }
    }

    fn credential(secret: &str) -> Credential {
        Credential::parse(&format!("{}:{secret}", uuid::Uuid::nil())).unwrap()
    }

    #[test]
    fn a_re_read_that_started_before_a_local_change_does_not_undo_it() {
        let cache = CallerCache::new(Duration::from_secs(30));
        cache.replace(vec![record("s", false)], Instant::now());
        let read_started = Instant::now();
        cache.upsert(record("s", true)); // revoked here, after that read began
        cache.replace(vec![record("s", false)], read_started);
        assert_eq!(cache.authenticate(&credential("s"), None), Err(AuthFailure::Revoked));
        // A read that started after the change carries it; the local copy is then dropped.
        cache.replace(vec![record("s", true)], Instant::now());
        assert_eq!(cache.authenticate(&credential("s"), None), Err(AuthFailure::Revoked));
        assert!(cache.read().local.is_empty());
    }

    #[test]
    fn a_copy_too_old_or_never_loaded_refuses_rather_than_trusting_it() {
        let cache = CallerCache::new(Duration::from_millis(50));
        assert_eq!(cache.authenticate(&credential("s"), None), Err(AuthFailure::Unavailable));
        cache.replace(vec![record("s", false)], Instant::now());
        assert_eq!(
            cache.authenticate(&credential("s"), Some(Scope::Read)).map(|c| c.name),
            Ok(CallerName::parse("svc").unwrap())
        );
        assert_eq!(
            cache.authenticate(&credential("s"), Some(Scope::Spend)),
            Err(AuthFailure::MissingScope(Scope::Spend))
        );
        assert_eq!(cache.authenticate(&credential("x"), None), Err(AuthFailure::WrongSecret));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.authenticate(&credential("s"), None), Err(AuthFailure::Unavailable));
    }
}
