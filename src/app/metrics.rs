//! Business metrics, recorded once per operation whichever way it ran (alone or in a batch). Labels are
//! bounded: never a key or transaction id; units beyond the first [`MAX_UNIT_LABELS`] share one label.

use std::collections::HashSet;
use std::sync::Mutex;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use super::{Operation, Outcome};
use crate::domain::{Committed, Rejection, ReserveOutcome, TxState, Unit};
use crate::storage::StorageError;

pub const MAX_UNIT_LABELS: usize = 64;

pub fn describe() {
    describe_counter!(
        "allowance_reservations_total",
        "Reservations by outcome: allowed, denied or replayed."
    );
    describe_counter!(
        "allowance_reservations_exceeded_total",
        "Limits exceeded by denied reservations, by limit name (a denial counts once per exceeded limit and key)."
    );
    describe_counter!(
        "allowance_commits_total",
        "Holds committed; late=true when the hold had expired first."
    );
    describe_counter!(
        "allowance_reverses_total",
        "Transactions reversed, by the state they were reversed from."
    );
    describe_counter!("allowance_holds_expired_total", "Holds found past their expiry and released.");
    describe_counter!(
        "allowance_amount_reserved_total",
        "Amount reserved (held or committed at once), per unit."
    );
    describe_counter!("allowance_amount_committed_total", "Amount committed, per unit.");
    describe_histogram!("allowance_batch_size", "Operations per database transaction.");
    describe_counter!(
        "allowance_rate_checks_total",
        "Rate-limit decisions per rule (check_rate for CheckRate) and limit name: allowed, denied or shadow_denied."
    );
    describe_counter!(
        "allowance_history_partitions_created_total",
        "Monthly partitions of the transaction history created ahead of time."
    );
    describe_counter!(
        "allowance_history_partitions_dropped_total",
        "Partitions of the transaction history dropped by retention (exported first when configured)."
    );
    describe_gauge!(
        "allowance_history_last_success_timestamp_seconds",
        "When the history job (partitions ahead, retention) last finished without error, Unix seconds."
    );
    describe_histogram!(
        "allowance_rate_batch_size",
        "Rate checks per database transaction (hits coalesced per key)."
    );
}

/// A unit as a label: the first units seen get their own, the rest share `_other`.
fn unit_label(unit: &Unit) -> String {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.contains(unit.as_str()) || seen.len() < MAX_UNIT_LABELS {
        seen.insert(unit.as_str().to_owned());
        unit.as_str().to_owned()
    } else {
        "_other".to_owned()
    }
}

fn amount(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(super) fn storage_error(e: &StorageError) {
    let kind = match e {
        StorageError::Unavailable(_) | StorageError::NotMigrated { .. } => "unavailable",
        StorageError::Contended => "contended",
        StorageError::Corrupt(_) => "corrupt",
        StorageError::Export(_) => "export",
    };
    counter!("allowance_db_errors_total", "kind" => kind).increment(1);
}

pub(super) fn partitions_created(n: usize) {
    if n > 0 {
        counter!("allowance_history_partitions_created_total").increment(n as u64);
    }
}

pub(super) fn partitions_dropped(n: usize) {
    counter!("allowance_history_partitions_dropped_total").increment(n as u64);
}

pub(super) fn retention_succeeded(at: crate::domain::Timestamp) {
    gauge!("allowance_history_last_success_timestamp_seconds").set(at.timestamp() as f64);
}

pub(super) fn expired(holds: u64) {
    if holds > 0 {
        counter!("allowance_holds_expired_total").increment(holds);
    }
}

pub(super) fn batch(operations: &[Operation], results: &[Result<Outcome, Rejection>], expired_holds: u64) {
    histogram!("allowance_batch_size").record(operations.len() as f64);
    expired(expired_holds);
    for (operation, result) in operations.iter().zip(results) {
        let Ok(outcome) = result else { continue };
        match (operation, outcome) {
            (
                Operation::Reserve(r),
                Outcome::Reserved(ReserveOutcome::Allowed { transaction, replayed, .. }),
            ) => {
                if *replayed {
                    counter!("allowance_reservations_total", "outcome" => "replayed").increment(1);
                    continue;
                }
                counter!("allowance_reservations_total", "outcome" => "allowed").increment(1);
                let unit = unit_label(&r.accounts[0].unit);
                counter!("allowance_amount_reserved_total", "unit" => unit.clone())
                    .increment(amount(transaction.amount));
                if transaction.state == TxState::Committed {
                    counter!("allowance_commits_total", "late" => "false").increment(1);
                    counter!("allowance_amount_committed_total", "unit" => unit)
                        .increment(amount(transaction.amount));
                }
            }
            (Operation::Reserve(r), Outcome::Reserved(ReserveOutcome::Denied { exceeded, .. })) => {
                counter!("allowance_reservations_total", "outcome" => "denied").increment(1);
                for e in exceeded {
                    // The label keeps its round-1 name and holds the limit's name (chosen by operators, so
                    // bounded; keys never label a metric).
                    counter!("allowance_reservations_exceeded_total", "window" => e.usage.name.to_string())
                        .increment(1);
                }
                // A normal business outcome, not an error.
                let names: Vec<String> =
                    exceeded.iter().map(|e| format!("{}/{}", e.usage.account, e.usage.name)).collect();
                tracing::debug!(account = %r.accounts[0], amount = r.amount.get(), exceeded = ?names, "reservation denied");
            }
            (_, Outcome::Committed(Committed { replayed: true, .. })) => {}
            (_, Outcome::Committed(Committed { transaction, late, .. })) => {
                counter!("allowance_commits_total", "late" => if *late { "true" } else { "false" })
                    .increment(1);
                counter!("allowance_amount_committed_total", "unit" => unit_label(&transaction.primary().unit))
                    .increment(amount(transaction.amount));
                if *late {
                    tracing::info!(
                        transaction_id = %transaction.id,
                        amount = transaction.amount,
                        "committed a hold after it had expired: spend recorded late"
                    );
                }
            }
            (_, Outcome::Reversed(r)) => {
                counter!("allowance_reverses_total", "from" => r.from.as_str()).increment(1);
            }
            _ => {}
        }
    }
}
