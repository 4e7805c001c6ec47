//! Callers, their scopes and tenants, credentials and audit events. Pure: hashing and comparing secrets is
//! arithmetic; the random bytes of a new secret are the caller's to supply.

use std::collections::BTreeSet;
use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{InvalidArgument, KeyId, Timestamp};

/// Most key prefixes one caller may be confined to.
pub const MAX_KEY_PREFIXES: usize = 16;
/// Longest caller name, request id and key prefix, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// What a caller may do. Scopes are independent: `admin` does not imply `spend` or `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// ReserveSpending, Commit, Reverse.
    Spend,
    /// GetLimits, GetTransaction, ListTransactions.
    Read,
    /// Limits, plans, callers, rules and the audit trail.
    Admin,
    /// RateLimitService.CheckRate and Envoy's rate-limit protocol.
    RateLimit,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Spend, Scope::Read, Scope::Admin, Scope::RateLimit];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Spend => "spend",
            Scope::Read => "read",
            Scope::Admin => "admin",
            Scope::RateLimit => "ratelimit",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A caller's id: the public half of its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallerId(uuid::Uuid);

impl CallerId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    pub fn parse(field: &'static str, s: &str) -> Result<Self, InvalidArgument> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| InvalidArgument::new(field, "is not a caller id (a UUID)"))
    }

    pub fn from_uuid(id: uuid::Uuid) -> Self {
        Self(id)
    }

    pub fn uuid(self) -> uuid::Uuid {
        self.0
    }
}

impl fmt::Display for CallerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

fn check_text(field: &'static str, value: &str) -> Result<(), InvalidArgument> {
    if value.is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(InvalidArgument::new(field, format!("must be at most {MAX_NAME_BYTES} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Keys a caller may touch: those starting with one of its prefixes. No prefix: every key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPrefixes(Vec<String>);

impl KeyPrefixes {
    pub fn parse(prefixes: Vec<String>) -> Result<Self, InvalidArgument> {
        if prefixes.len() > MAX_KEY_PREFIXES {
            return Err(InvalidArgument::new(
                "key_prefixes",
                format!("at most {MAX_KEY_PREFIXES} prefixes, got {}", prefixes.len()),
            ));
        }
        for p in &prefixes {
            check_text("key_prefixes", p)?;
        }
        let unique: BTreeSet<String> = prefixes.into_iter().collect();
        Ok(Self(unique.into_iter().collect()))
    }

    /// Every key.
    pub fn any() -> Self {
        Self(Vec::new())
    }

    pub fn is_confined(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn allows(&self, key: &KeyId) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| key.as_str().starts_with(p.as_str()))
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// A caller's human-readable name (not unique).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerName(String);

impl CallerName {
    pub fn parse(value: impl Into<String>) -> Result<Self, InvalidArgument> {
        let value = value.into();
        check_text("name", &value)?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A set of scopes, at least one.
pub fn parse_scopes(scopes: impl IntoIterator<Item = Scope>) -> Result<BTreeSet<Scope>, InvalidArgument> {
    let scopes: BTreeSet<Scope> = scopes.into_iter().collect();
    if scopes.is_empty() {
        return Err(InvalidArgument::new("scopes", "name at least one of spend, read, admin, ratelimit"));
    }
    Ok(scopes)
}

/// A new secret: 256 random bits, shown once as 64 hex digits.
pub struct Secret(String);

impl Secret {
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }

    /// The secret itself: to hand to the caller once, never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// SHA-256 of a secret: what is stored.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Constant time: how much of a guess matched must not show in how long the answer took.
    pub fn matches(&self, secret: &str) -> bool {
        Self::of(secret).0.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(<redacted>)")
    }
}

/// `<caller id>:<secret>`, as a client presents it.
pub struct Credential {
    pub id: CallerId,
    secret: String,
}

impl Credential {
    pub fn parse(s: &str) -> Option<Self> {
        let (id, secret) = s.split_once(':')?;
        let id = CallerId(uuid::Uuid::try_parse(id).ok()?);
        if secret.is_empty() || secret.len() > 256 {
            return None;
        }
        Some(Self { id, secret: secret.to_owned() })
    }

    pub fn format(id: CallerId, secret: &Secret) -> String {
        format!("{id}:{}", secret.expose())
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}:<redacted>)", self.id)
    }
}

/// A caller as an administrator sees it (no secret material).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: CallerId,
    pub name: CallerName,
    pub scopes: BTreeSet<Scope>,
    pub key_prefixes: KeyPrefixes,
    pub created_at: Timestamp,
    pub rotated_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// A rotation is under way: the secret before the last rotation still works.
    pub has_previous_secret: bool,
}

impl Caller {
    pub fn audit_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name.as_str(),
            "scopes": self.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "key_prefixes": self.key_prefixes.as_slice(),
            "rotated_at": self.rotated_at,
            "revoked_at": self.revoked_at,
            "secrets": if self.has_previous_secret { 2 } else { 1 },
        })
    }
}

/// A caller with the hashes of its valid secrets: what authentication checks against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRecord {
    pub caller: Caller,
    pub secret_hash: SecretHash,
    pub previous_secret_hash: Option<SecretHash>,
}

impl CallerRecord {
    /// A new secret becomes current; the current one stays valid as the previous until revoked. Refused while
    /// a previous secret is still valid (revoke it first), so at most two secrets ever work.
    pub fn rotate(&self, new: SecretHash, now: Timestamp) -> Result<CallerRecord, super::Rejection> {
        self.check_active()?;
        if self.previous_secret_hash.is_some() {
            return Err(super::Rejection::FailedPrecondition(format!(
                "caller {} already has a previous secret from its last rotation; revoke it first",
                self.caller.id
            )));
        }
        let mut next = self.clone();
        next.previous_secret_hash = Some(std::mem::replace(&mut next.secret_hash, new));
        next.caller.has_previous_secret = true;
        next.caller.rotated_at = Some(now);
        Ok(next)
    }

    /// Ends a rotation: only the newest secret works from now on.
    pub fn revoke_previous_secret(&self) -> Result<CallerRecord, super::Rejection> {
        self.check_active()?;
        if self.previous_secret_hash.is_none() {
            return Err(super::Rejection::FailedPrecondition(format!(
                "caller {} has no previous secret to revoke",
                self.caller.id
            )));
        }
        let mut next = self.clone();
        next.previous_secret_hash = None;
        next.caller.has_previous_secret = false;
        Ok(next)
    }

    /// Revokes every secret of the caller, for good. `None` when it was already revoked.
    pub fn revoke(&self, now: Timestamp) -> Option<CallerRecord> {
        if self.caller.revoked_at.is_some() {
            return None;
        }
        let mut next = self.clone();
        next.caller.revoked_at = Some(now);
        Some(next)
    }

    fn check_active(&self) -> Result<(), super::Rejection> {
        match self.caller.revoked_at {
            Some(_) => {
                Err(super::Rejection::FailedPrecondition(format!("caller {} is revoked", self.caller.id)))
            }
            None => Ok(()),
        }
    }
}

/// Why a call was refused before it reached the service. Labels are the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `authorization` metadata.
    Missing,
    /// Not `Bearer <uuid>:<secret>`.
    Malformed,
    UnknownCaller,
    WrongSecret,
    Revoked,
    MissingScope(Scope),
    /// A key or transaction outside the caller's key prefixes.
    OtherTenant,
    /// The credentials could not be loaded (the database has been unreachable for too long).
    Unavailable,
}

impl AuthFailure {
    /// Every `reason` label.
    pub const REASONS: [&'static str; 8] = [
        "missing_credential",
        "malformed_credential",
        "unknown_caller",
        "wrong_secret",
        "revoked",
        "missing_scope",
        "other_tenant",
        "credentials_unavailable",
    ];

    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credential",
            AuthFailure::Malformed => "malformed_credential",
            AuthFailure::UnknownCaller => "unknown_caller",
            AuthFailure::WrongSecret => "wrong_secret",
            AuthFailure::Revoked => "revoked",
            AuthFailure::MissingScope(_) => "missing_scope",
            AuthFailure::OtherTenant => "other_tenant",
            AuthFailure::Unavailable => "credentials_unavailable",
        }
    }
}

impl CallerRecord {
    /// Checks a presented secret. Revoked callers fail whatever the secret.
    pub fn authenticate(&self, secret: &str) -> Result<(), AuthFailure> {
        // Both hashes are always compared, so the time taken does not tell which one matched.
        let current = self.secret_hash.matches(secret);
        let previous = self.previous_secret_hash.as_ref().is_some_and(|h| h.matches(secret));
        if !(current | previous) {
            return Err(AuthFailure::WrongSecret);
        }
        if self.caller.revoked_at.is_some() {
            return Err(AuthFailure::Revoked);
        }
        Ok(())
    }
}

/// Who makes a call: for tenant checks and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `None` when authentication is off or the CLI writes to the database directly.
    pub caller_id: Option<CallerId>,
    pub caller_name: String,
    pub request_id: String,
    pub key_prefixes: KeyPrefixes,
}

impl Actor {
    /// Not a caller: an unauthenticated server, a test, the service itself. Confined to nothing.
    pub fn anonymous(name: &str, request_id: impl Into<String>) -> Self {
        Self {
            caller_id: None,
            caller_name: name.to_owned(),
            request_id: request_id.into(),
            key_prefixes: KeyPrefixes::any(),
        }
    }

    pub fn of(caller: &Caller, request_id: impl Into<String>) -> Self {
        Self {
            caller_id: Some(caller.id),
            caller_name: caller.name.as_str().to_owned(),
            request_id: request_id.into(),
            key_prefixes: caller.key_prefixes.clone(),
        }
    }

    pub fn may_touch(&self, key: &KeyId) -> bool {
        self.key_prefixes.allows(key)
    }
}

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    LimitPut,
    LimitDelete,
    PlanPut,
    PlanDelete,
    PlanAssign,
    CallerCreate,
    CallerRotate,
    CallerRevoke,
    CallerRevokePreviousSecret,
    TransactionReverse,
    RulePut,
    RuleDelete,
    /// `allowance reconcile --repair` set an account's running totals to what its transactions sum to.
    TotalsRepair,
}

impl AuditAction {
    pub const ALL: [AuditAction; 13] = [
        AuditAction::LimitPut,
        AuditAction::LimitDelete,
        AuditAction::PlanPut,
        AuditAction::PlanDelete,
        AuditAction::PlanAssign,
        AuditAction::CallerCreate,
        AuditAction::CallerRotate,
        AuditAction::CallerRevoke,
        AuditAction::CallerRevokePreviousSecret,
        AuditAction::TransactionReverse,
        AuditAction::RulePut,
        AuditAction::RuleDelete,
        AuditAction::TotalsRepair,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::LimitPut => "limit.put",
            AuditAction::LimitDelete => "limit.delete",
            AuditAction::PlanPut => "plan.put",
            AuditAction::PlanDelete => "plan.delete",
            AuditAction::PlanAssign => "plan.assign",
            AuditAction::CallerCreate => "caller.create",
            AuditAction::CallerRotate => "caller.rotate",
            AuditAction::CallerRevoke => "caller.revoke",
            AuditAction::CallerRevokePreviousSecret => "caller.revoke_previous_secret",
            AuditAction::TransactionReverse => "transaction.reverse",
            AuditAction::RulePut => "rule.put",
            AuditAction::RuleDelete => "rule.delete",
            AuditAction::TotalsRepair => "totals.repair",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// One change, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Assigned by storage; 0 until stored.
    pub id: i64,
    pub at: Timestamp,
    pub caller_id: Option<CallerId>,
    pub caller_name: String,
    pub request_id: String,
    pub action: AuditAction,
    pub key_id: Option<String>,
    pub unit: Option<String>,
    pub subject: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl AuditEvent {
    pub fn new(actor: &Actor, at: Timestamp, action: AuditAction, subject: impl Into<String>) -> Self {
        Self {
            id: 0,
            at,
            caller_id: actor.caller_id,
            caller_name: actor.caller_name.clone(),
            request_id: actor.request_id.clone(),
            action,
            key_id: None,
            unit: None,
            subject: subject.into(),
            before: None,
            after: None,
        }
    }

    pub fn on(mut self, key_id: &KeyId, unit: Option<&super::Unit>) -> Self {
        self.key_id = Some(key_id.as_str().to_owned());
        self.unit = unit.map(|u| u.as_str().to_owned());
        self
    }

    pub fn change(mut self, before: Option<serde_json::Value>, after: Option<serde_json::Value>) -> Self {
        self.before = before;
        self.after = after;
        self
    }
}

/// Which audit events to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub key_id: Option<KeyId>,
    pub caller_id: Option<CallerId>,
    /// At or after.
    pub since: Option<Timestamp>,
    /// Before.
    pub until: Option<Timestamp>,
    /// Events with an id below this (the previous page's last).
    pub before_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(revoked: bool, previous: Option<&str>) -> CallerRecord {
        CallerRecord {
            caller: Caller {
                id: CallerId::new_random(),
                name: CallerName::parse("svc").unwrap(),
                scopes: BTreeSet::from([Scope::Spend]),
                key_prefixes: KeyPrefixes::any(),
                created_at: Timestamp::UNIX_EPOCH,
                rotated_at: None,
                revoked_at: revoked.then_some(Timestamp::UNIX_EPOCH),
                has_previous_secret: previous.is_some(),
            },
            secret_hash: SecretHash::of("current"),
            previous_secret_hash: previous.map(SecretHash::of),
        }
    }

    #[test]
    fn both_secrets_work_during_a_rotation_and_none_after_revocation() {
        assert_eq!(record(false, None).authenticate("current"), Ok(()));
        assert_eq!(record(false, None).authenticate("old"), Err(AuthFailure::WrongSecret));
        assert_eq!(record(false, Some("old")).authenticate("old"), Ok(()));
        assert_eq!(record(true, Some("old")).authenticate("current"), Err(AuthFailure::Revoked));
        // A wrong secret on a revoked caller says wrong secret: revocation is not revealed to a guesser.
        assert_eq!(record(true, None).authenticate("guess"), Err(AuthFailure::WrongSecret));
    }

    #[test]
    fn credentials_parse_and_never_print_their_secret() {
        let id = CallerId::new_random();
        let secret = Secret::from_random([7; 32]);
        let text = Credential::format(id, &secret);
        let parsed = Credential::parse(&text).unwrap();
        assert_eq!(parsed.id, id);
        assert!(SecretHash::of(parsed.secret()) == secret.hash());
        assert!(!format!("{parsed:?}{secret:?}{:?}", secret.hash()).contains(secret.expose()));
        assert!(Credential::parse("not-a-uuid:abc").is_none());
        assert!(Credential::parse(&format!("{id}:")).is_none());
        assert!(Credential::parse(&id.to_string()).is_none());
    }

    #[test]
    fn prefixes_confine_keys() {
        let tenant = KeyPrefixes::parse(vec!["acme/".into(), "acme-".into()]).unwrap();
        assert!(tenant.allows(&KeyId::parse("acme/card-1").unwrap()));
        assert!(!tenant.allows(&KeyId::parse("globex/card-1").unwrap()));
        assert!(KeyPrefixes::any().allows(&KeyId::parse("anything").unwrap()));
        assert!(KeyPrefixes::parse(vec![String::new()]).is_err());
        assert!(KeyPrefixes::parse(vec!["p".into(); MAX_KEY_PREFIXES + 1]).is_err());
    }
}
