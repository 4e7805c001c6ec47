//! Reconciliation: every account's running totals and hold bookkeeping against its transactions.
//!
//! The check walks the accounts in key order, a page per batch: each page is one read-only snapshot batch
//! ([`Access::Check`]) that refreshes the running totals to `now` as any batch does and sums every tracked
//! period from history with the same statement that gives a newly applied period its totals, and the ledger
//! compares the two ([`Ledger::divergences`](crate::domain::Ledger::divergences)). The snapshot blocks no
//! one and sees no half-applied batch. A second statement reads every open hold of the page's accounts
//! ([`Store::check_holds`]): those behind their account's expiry cursor, which nothing would ever release
//! ([`StaleHold`]), and each account's count of open holds and latest hold expiry against its rows
//! ([`HoldBookkeeping`]).
//!
//! A repair runs one more batch for the accounts found diverging or with stale holds, under their row locks
//! ([`Access::Repair`]), like every other change: it finds the divergences again there, sets those periods'
//! totals to the recount, releases the stale holds' rows (and nothing else: the recount has the totals
//! right whether or not they still counted a stale hold), and records `totals.repair` audit events in the
//! same database transaction. Then the hold bookkeeping of the accounts found wrong or with stale holds is
//! set to what their rows now say, under their row locks, with its own `totals.repair` events. The report
//! of a repair lists the divergences and stale holds it repaired and the bookkeeping the check found.

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
    /// Open holds behind their account's expiry cursor; with a repair, those it released.
    pub stale_holds: Vec<StaleHold>,
    /// Accounts whose count of open holds or latest hold expiry differed from their rows when checked (a
    /// repair then sets them to what the rows say).
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
            let found = self
                .store
                .with_ledger(Access::Check, &page, &[], &[], self.clock.now(), |ledger| ledger.divergences())
                .await
                .inspect_err(metrics::storage_error)?
                .value;
            let holds = self.store.check_holds(&page).await.inspect_err(metrics::storage_error)?;
            let Some(by) = repair else {
                report.divergences.extend(found);
                report.stale_holds.extend(holds.stale);
                report.hold_bookkeeping.extend(holds.bookkeeping);
                after = Some(last);
                continue;
            };
            // The ledger's repair first: it sets the totals to the recount and releases the stale holds'
            // rows. Then the bookkeeping, counted from the rows as they are after those releases.
            // Either list may name an account more than once: storage takes each once.
            let diverged: Vec<AccountKey> = found
                .iter()
                .map(|d| d.account.clone())
                .chain(holds.stale.iter().map(|h| h.account.clone()))
                .collect();
            if !diverged.is_empty() {
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
            let counted: Vec<AccountKey> = holds
                .bookkeeping
                .iter()
                .map(|b| b.account.clone())
                .chain(holds.stale.iter().map(|h| h.account.clone()))
                .collect();
            if !counted.is_empty() {
                self.store
                    .repair_hold_bookkeeping(&counted, by, self.clock.now())
                    .await
                    .inspect_err(metrics::storage_error)?;
            }
            // What was found: a stale hold's release may have set its account's count right already.
            report.hold_bookkeeping.extend(holds.bookkeeping);
            after = Some(last);
        }
        Ok(report)
    }
}
