//! Pure domain logic: periods, limits and plans, validated values, running totals and the batch state
//! machine. No I/O.

mod account;
mod auth;
mod ledger;
mod limit;
mod period;
pub mod rate;
pub mod rules;
mod transaction;
mod values;
mod window;

pub use account::{
    Account, AgedOut, AgingRange, Counted, LimitUsage, RetryAfter, Totals, WindowUsage, counts, retry_after,
};
pub use auth::{
    Actor, AuditAction, AuditEvent, AuditFilter, AuthFailure, Caller, CallerId, CallerName, CallerRecord,
    Credential, KeyPrefixes, MAX_KEY_PREFIXES, Scope, Secret, SecretHash, parse_scopes,
};
pub use ledger::{
    Changes, Committed, Divergence, Exceeded, Ledger, Loaded, Rejection, Reserve, ReserveOutcome, Reversed,
    StaleHold, windows_of,
};
pub use limit::{
    EffectiveLimit, LimitName, LimitSource, LimitSpec, MAX_KEYS_PER_RESERVATION, MAX_LIMITS, MAX_RATE, Plan,
    PlanName, effective_limits, effective_rate_limits,
};
pub use period::{
    Calendar, CalendarUnit, MAX_ANCHOR_DISTANCE, MAX_PERIOD_DAYS, Period, span_text, utc_month_start,
};
pub use transaction::{ExpiringHold, Transaction, TxState};
pub use values::*;
pub use window::Window;

/// Instants are kept to the microsecond, the precision Postgres stores.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
