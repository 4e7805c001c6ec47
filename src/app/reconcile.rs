//! Reconciliation: every account's running totals and hold bookkeeping against its transactions.
//!
//! The check walks the accounts in key order, a page per batch: each page is one read-only snapshot batch
//! ([`Access::Check`]) that refreshes the running totals to `now` as any batch does and sums every tracked
//! period from history with the same statement that gives a newly applied period its totals, and the ledger
//! compares the two ([`Ledger::divergences`](crate::domain::Ledger::divergences)). The snapshot blocks no
//! one and sees no half-applied batch. The same batch looks for holds behind each account's expiry cursor,
//! which nothing would ever release ([`StaleHold`]), and a second statement compares each account's count of
//! open holds and latest hold expiry with its rows ([`HoldBookkeeping`]).
//!
//! A repair runs one more batch for the accounts found diverging or with stale holds, under their row locks
//! ([`Access::Repair`]), like every other change: it finds the divergences again there, releases the stale
//! holds as any expired hold is released, sets the diverging periods' totals to the recount, and records a
//! `totals.repair` audit event per account in the same database transaction. Then the bookkeeping of the
//! accounts whose counts differ is set to what their rows say, under their row locks, with its own
//! `totals.repair` events.

use super::{Allowance, Error, metrics};
use crate::domain::{AccountKey, Actor, Divergence, StaleHold};
use crate::storage::{Access, HoldBookkeeping, Store};

/// Accounts per batch: each costs one sum over its history per tracked period.
const PAGE: u32 = 100;

/// What one reconciliation found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Accounts checked.
    pub accounts: u64,
    /// Periods whose running totals differ from the ledger; with a repair, those it repaired.
    pub divergences: Vec<Divergence>,
    /// Holds that still counted behind their account's expiry cursor; with a repair, those it released.
    pub stale_holds: Vec<StaleHold>,
    /// Accounts whose count of open holds or latest hold expiry differs from their rows; with a repair,
    /// those it set right.
    pub hold_bookkeeping: Vec<HoldBookkeeping>,
    /// Whether what was found was repaired.
    pub repaired: bool,
}

impl Reconciliation {
    /// Whether nothing diverged.
    pub fn is_consistent(&self) -> bool {
        self.divergences.is_empty() && self.stale_holds.is_empty() && self.hold_bookkeeping.is_empty()
    }
}

impl<S: Store> Allowance<S> {
    /// Checks every account; with `repair` (by `by`, for the audit trail), sets what diverges to what the
    /// ledger says: the totals, the release of stale holds, the hold bookkeeping.
    #[tracing::instrument(name = "app.reconcile", skip_all, fields(repair = repair.is_some()))]
    pub async fn reconcile(&self, repair: Option<&Actor>) -> Result<Reconciliation, Error> {
        let mut report = Reconciliation { repaired: repair.is_some(), ..Reconciliation::default() };
        let mut after: Option<AccountKey> = None;
        loop {
            let page =
                self.store.account_keys(after.as_ref(), PAGE).await.inspect_err(metrics::storage_error)?;
            let Some(last) = page.last().cloned() else { break };
            report.accounts += page.len() as u64;
            let (found, stale) = self
                .store
                .with_ledger(Access::Check, &page, &[], &[], self.clock.now(), |ledger| {
                    (ledger.divergences(), ledger.stale_holds())
                })
                .await
                .inspect_err(metrics::storage_error)?
                .value;
            match repair {
                Some(by) if !found.is_empty() || !stale.is_empty() => {
                    let mut diverged: Vec<AccountKey> = found
                        .into_iter()
                        .map(|d| d.account)
                        .chain(stale.into_iter().map(|h| h.account))
                        .collect();
                    diverged.sort();
                    diverged.dedup();
                    let (repaired, released) = self
                        .store
                        .with_ledger(Access::Repair, &diverged, &[], &[], self.clock.now(), |ledger| {
                            (ledger.repair(by), ledger.repair_stale_holds(by))
                        })
                        .await
                        .inspect_err(metrics::storage_error)?
                        .value;
                    report.divergences.extend(repaired);
                    report.stale_holds.extend(released);
                }
                _ => {
                    report.divergences.extend(found);
                    report.stale_holds.extend(stale);
                }
            }
            // After the ledger's repair, which releases the stale holds and so changes the counts.
            let counts = self.store.hold_bookkeeping(&page).await.inspect_err(metrics::storage_error)?;
            match repair {
                Some(by) if !counts.is_empty() => {
                    let accounts: Vec<AccountKey> = counts.into_iter().map(|c| c.account).collect();
                    let repaired = self
                        .store
                        .repair_hold_bookkeeping(&accounts, by, self.clock.now())
                        .await
                        .inspect_err(metrics::storage_error)?;
                    report.hold_bookkeeping.extend(repaired);
                }
                _ => report.hold_bookkeeping.extend(counts),
            }
            after = Some(last);
        }
        Ok(report)
    }
}
