//! Reconciliation: every account's running totals against what its transactions sum to.
//!
//! The check walks the accounts in key order, a page per batch: each page is one read-only snapshot batch
//! ([`Access::Check`]) that refreshes the running totals to `now` as any batch does and sums every tracked
//! period from history with the same statement that gives a newly applied period its totals, and the ledger
//! compares the two ([`Ledger::divergences`](crate::domain::Ledger::divergences)). The snapshot blocks no
//! one and sees no half-applied batch. A repair runs one more batch for the accounts found diverging, under
//! their row locks ([`Access::Repair`]), like every other change: it finds the divergences again there,
//! sets those periods' totals to the recount and records a `totals.repair` audit event per account in the
//! same database transaction.

use super::{Allowance, Error, metrics};
use crate::domain::{AccountKey, Actor, Divergence};
use crate::storage::{Access, Store};

/// Accounts per batch: each costs one sum over its history per tracked period.
const PAGE: u32 = 100;

/// What one reconciliation found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Accounts checked.
    pub accounts: u64,
    /// Periods whose running totals differ from the ledger; with a repair, those it repaired.
    pub divergences: Vec<Divergence>,
    /// Whether the divergences were repaired.
    pub repaired: bool,
}

impl<S: Store> Allowance<S> {
    /// Checks every account; with `repair` (by `by`, for the audit trail), sets the totals that diverge to
    /// what the ledger sums to.
    #[tracing::instrument(name = "app.reconcile", skip_all, fields(repair = repair.is_some()))]
    pub async fn reconcile(&self, repair: Option<&Actor>) -> Result<Reconciliation, Error> {
        let mut report = Reconciliation { repaired: repair.is_some(), ..Reconciliation::default() };
        let mut after: Option<AccountKey> = None;
        loop {
            let page =
                self.store.account_keys(after.as_ref(), PAGE).await.inspect_err(metrics::storage_error)?;
            let Some(last) = page.last().cloned() else { break };
            report.accounts += page.len() as u64;
            let found = self
                .store
                .with_ledger(Access::Check, &page, &[], &[], self.clock.now(), |ledger| ledger.divergences())
                .await
                .inspect_err(metrics::storage_error)?
                .value;
            match repair {
                Some(by) if !found.is_empty() => {
                    let mut diverged: Vec<AccountKey> = found.into_iter().map(|d| d.account).collect();
                    diverged.dedup();
                    let repaired = self
                        .store
                        .with_ledger(Access::Repair, &diverged, &[], &[], self.clock.now(), |ledger| {
                            ledger.repair(by)
                        })
                        .await
                        .inspect_err(metrics::storage_error)?
                        .value;
                    report.divergences.extend(repaired);
                }
                _ => report.divergences.extend(found),
            }
            after = Some(last);
        }
        Ok(report)
    }
}
