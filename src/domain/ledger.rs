//! The state machine of one batch: the locked accounts and the transactions the batch touches, refreshed to
//! `now`, then changed by reserve / commit / reverse / limit operations applied in order. Pure: storage loads
//! the inputs and writes back [`Changes`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{
    Account, AccountKey, AgedOut, Amount, ExpiringHold, HoldTtl, InvalidArgument, LimitName, LimitSpec,
    LimitUsage, MAX_LIMITS, Metadata, Period, Timestamp, Totals, Transaction, TransactionId, TxState, Window,
    WindowUsage,
};

/// A reservation as the caller asked for it, validated: one or more accounts of one unit, none repeated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserve {
    pub transaction_id: TransactionId,
    pub accounts: Vec<AccountKey>,
    pub amount: Amount,
    pub hold_ttl: HoldTtl,
    /// Record as committed at once instead of holding.
    pub commit: bool,
    pub metadata: Metadata,
}

/// One limit a reservation would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub usage: LimitUsage,
    /// When the same reservation would first fit if nothing else happened; filled in after the batch (it
    /// needs a look at history), `None` until then.
    pub retry_after: Option<super::RetryAfter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Allowed {
        transaction: Transaction,
        /// Usage of every effective limit of every account charged, after this reservation.
        usage: Vec<LimitUsage>,
        /// The transaction already existed: a retry, answered without holding again.
        replayed: bool,
    },
    Denied {
        /// Every limit of every account that the reservation would exceed.
        exceeded: Vec<Exceeded>,
        usage: Vec<LimitUsage>,
    },
}

impl ReserveOutcome {
    pub fn usage(&self) -> &[LimitUsage] {
        match self {
            ReserveOutcome::Allowed { usage, .. } | ReserveOutcome::Denied { usage, .. } => usage,
        }
    }

    /// The round-1 windows that have a limit, of `first` (the reservation's `key_id`): other keys charged
    /// have no place in round-1 fields.
    pub fn windows(&self, first: &AccountKey) -> Vec<WindowUsage> {
        windows_of(self.usage().iter().filter(|u| &u.account == first))
    }
}

/// Usage entries named after round-1 windows, as windows.
pub fn windows_of<'a>(usage: impl Iterator<Item = &'a LimitUsage>) -> Vec<WindowUsage> {
    let by_name: HashMap<&str, &LimitUsage> = usage.map(|u| (u.name.as_str(), u)).collect();
    Window::ALL
        .into_iter()
        .filter_map(|window| {
            let u = by_name.get(window.as_str())?;
            Some(WindowUsage { window, limit: u.limit, spent: u.spent, held: u.held })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub transaction: Transaction,
    /// The hold had expired before this commit; the spend is recorded anyway.
    pub late: bool,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reversed {
    pub transaction: Transaction,
    /// The state it was reversed from; `Reversed` for a repeated reverse.
    pub from: TxState,
}

/// A request that cannot be carried out as asked. Each is the caller's to handle, never a fault of the service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("transaction {0} not found")]
    NotFound(TransactionId),
    #[error("plan {0} not found")]
    PlanNotFound(super::PlanName),
    #[error("caller {0} not found")]
    CallerNotFound(super::CallerId),
    #[error("rule {0} not found")]
    RuleNotFound(super::LimitName),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
}

/// What a batch changed, for storage to write back.
#[derive(Debug, Default)]
pub struct Changes {
    pub accounts: Vec<Account>,
    pub inserted: Vec<Transaction>,
    pub updated: Vec<Transaction>,
    /// Accounts' shares of holds found expired and released while refreshing, whose transaction is not in
    /// `updated` (that one is written whole).
    pub expired: Vec<(TransactionId, AccountKey)>,
    /// The shares in `expired` that were stale ([`StaleHold`]): their rows are released, and nothing is
    /// counted off their accounts (the bookkeeping repair that follows sets the counts from the rows).
    pub stale: Vec<(TransactionId, AccountKey)>,
    /// Holds released while refreshing (one per account share).
    pub expired_holds: u64,
    /// Audit events of the batch's changes, written in the same database transaction.
    pub audit: Vec<super::AuditEvent>,
}

struct Tracked<T> {
    value: T,
    /// As loaded; `None` for a value this batch created.
    original: Option<T>,
}

impl<T: Clone> Tracked<T> {
    fn loaded(value: T) -> Self {
        Self { original: Some(value.clone()), value }
    }
}

pub struct Ledger {
    now: Timestamp,
    accounts: BTreeMap<AccountKey, Tracked<Account>>,
    transactions: HashMap<TransactionId, Tracked<Transaction>>,
    expired: Vec<(TransactionId, AccountKey)>,
    audit: Vec<super::AuditEvent>,
    recounted: HashMap<AccountKey, BTreeMap<Period, Totals>>,
    stale: Vec<StaleHold>,
}

/// A hold still open behind its account's expiry cursor: it expired at or before the account's last write,
/// which promises that every such hold was released (see the migration 20261204000001). Nothing releases it
/// in the normal course: its row stays open, and keeps its partition, for ever (and, if the account's totals
/// still count it, it counts as held for ever). Reconciliation finds them (`Store::check_holds`); only its
/// repair batch loads them (it looks behind the cursor), and the ledger then releases the row alone,
/// leaving the totals to the repair's recount and the open-hold count to the bookkeeping repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleHold {
    pub account: AccountKey,
    pub transaction_id: TransactionId,
    pub expires_at: Timestamp,
    /// The account's last write (its expiry cursor) when the hold was found.
    pub cursor: Timestamp,
    pub amount: i64,
}

/// One period of one account whose running totals differ from what its transactions sum to: a broken
/// invariant (see [`crate::domain::Account`]), found by reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub account: AccountKey,
    pub period: Period,
    /// The totals kept in the account, refreshed to the batch's `now` as any batch refreshes them.
    pub running: Totals,
    /// What the account's transactions sum to in the period at `now`, summed afresh from history.
    pub ledger: Totals,
}

/// What storage loaded for a batch, under the accounts' locks.
#[derive(Debug, Default)]
pub struct Loaded {
    pub accounts: Vec<Account>,
    /// The transactions the batch's operations name (those that exist).
    pub transactions: Vec<Transaction>,
    /// Every hold of these accounts past its expiry at `now` that still counts.
    pub expiring: Vec<ExpiringHold>,
    /// Sums of what leaves each rolling period, for the ranges given by [`Account::aging_ranges`].
    pub aged: Vec<(AccountKey, AgedOut)>,
    /// Totals summed from history at `now` for the periods in [`Account::missing_periods`].
    pub fresh: Vec<(AccountKey, Period, Totals)>,
    /// Periods to keep totals for besides the accounts' effective limits (see [`Loaded::tracked`]).
    pub also: Vec<(AccountKey, Period)>,
    /// Only when reconciling: every tracked period of every account summed from history at `now`, by the
    /// same code as `fresh` (empty otherwise).
    pub recounted: Vec<(AccountKey, Period, Totals)>,
}

impl Loaded {
    /// The periods an account's totals are kept for in this batch: its effective limits', and those the batch
    /// asked for (a limit about to be set, a round-1 window to report).
    pub fn tracked(account: &Account, also: &[(AccountKey, Period)]) -> BTreeSet<Period> {
        let extra: Vec<Period> = also.iter().filter(|(k, _)| k == &account.key).map(|(_, p)| *p).collect();
        account.tracked_periods(&extra)
    }
}

impl Ledger {
    /// Opens the ledger at `now`: releases expired holds, then moves every period to `now`.
    ///
    /// `now` is first raised to the latest instant at which any of the batch's accounts was written: time
    /// never runs backwards for an account, whatever the clock of the replica deciding. Otherwise a replica
    /// behind another (or a clock stepped back) would decide against totals already moved past its `now`
    /// and record spend that no period counts.
    pub fn open(now: Timestamp, loaded: Loaded) -> Self {
        let now = loaded.accounts.iter().filter_map(|a| a.as_of).fold(now, Timestamp::max);
        let mut ledger = Self {
            now,
            accounts: loaded.accounts.into_iter().map(|a| (a.key.clone(), Tracked::loaded(a))).collect(),
            transactions: loaded
                .transactions
                .into_iter()
                .map(|t| (t.id.clone(), Tracked::loaded(t)))
                .collect(),
            expired: Vec::new(),
            audit: Vec::new(),
            recounted: HashMap::new(),
            stale: Vec::new(),
        };
        for (key, period, totals) in loaded.recounted {
            ledger.recounted.entry(key).or_default().insert(period, totals);
        }
        for hold in loaded.expiring {
            if let Some(account) = ledger.accounts.get_mut(&hold.account) {
                // A stale hold's row is released, and nothing else: whether the totals still count it depends
                // on how it came to be stale, and the recount of a repair sets them right either way.
                match account.value.as_of.filter(|cursor| hold.expires_at <= *cursor) {
                    Some(cursor) => ledger.stale.push(StaleHold {
                        account: hold.account.clone(),
                        transaction_id: hold.id.clone(),
                        expires_at: hold.expires_at,
                        cursor,
                        amount: hold.amount,
                    }),
                    None => account.value.release_expired(hold.created_at, hold.amount),
                }
                ledger.expired.push((hold.id, hold.account));
            }
        }
        for tx in ledger.transactions.values_mut() {
            if tx.value.state_at(now) == TxState::Expired {
                tx.value.state = TxState::Expired;
            }
        }
        let mut aged: HashMap<AccountKey, Vec<AgedOut>> = HashMap::new();
        for (key, out) in loaded.aged {
            aged.entry(key).or_default().push(out);
        }
        let mut fresh: HashMap<AccountKey, Vec<(Period, Totals)>> = HashMap::new();
        for (key, period, totals) in loaded.fresh {
            fresh.entry(key).or_default().push((period, totals));
        }
        for (key, account) in &mut ledger.accounts {
            let tracked = Loaded::tracked(&account.value, &loaded.also);
            account.value.advance(
                now,
                aged.remove(key).unwrap_or_default(),
                &tracked,
                fresh.remove(key).unwrap_or_default(),
            );
        }
        ledger
    }

    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Every period of the batch's accounts whose running totals, refreshed to `now`, differ from the
    /// recount of its transactions. Empty unless storage loaded a recount (when reconciling).
    pub fn divergences(&self) -> Vec<Divergence> {
        let mut found = Vec::new();
        for (key, recounted) in &self.recounted {
            let Some(account) = self.accounts.get(key) else { continue };
            for (period, ledger) in recounted {
                // Every tracked period has totals once the ledger is open (missing ones were summed fresh).
                let Some(running) = account.value.totals.get(period) else { continue };
                if running != ledger {
                    found.push(Divergence {
                        account: key.clone(),
                        period: *period,
                        running: *running,
                        ledger: *ledger,
                    });
                }
            }
        }
        found.sort_by(|a, b| (&a.account, a.period).cmp(&(&b.account, b.period)));
        found
    }

    /// The holds this batch found behind their accounts' expiry cursors (see [`StaleHold`]), in key and id
    /// order. The ledger released their rows at `now`.
    pub fn stale_holds(&self) -> Vec<StaleHold> {
        let mut found = self.stale.clone();
        found.sort_by(|a, b| (&a.account, &a.transaction_id).cmp(&(&b.account, &b.transaction_id)));
        found
    }

    /// Records the release of the stale holds (which the batch's write carries out) as repairs: one audit
    /// event per account (by `by`), listing them. Returns them.
    pub fn repair_stale_holds(&mut self, by: &super::Actor) -> Vec<StaleHold> {
        let found = self.stale_holds();
        let mut by_account: BTreeMap<&AccountKey, Vec<serde_json::Value>> = BTreeMap::new();
        for h in &found {
            by_account.entry(&h.account).or_default().push(serde_json::json!({
                "transaction_id": h.transaction_id.as_str(),
                "expires_at": h.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "amount": h.amount.to_string(),
            }));
        }
        for (key, holds) in by_account {
            self.audit.push(
                super::AuditEvent::new(by, self.now, super::AuditAction::TotalsRepair, "holds")
                    .on(&key.key_id, Some(&key.unit))
                    .change(Some(serde_json::json!({ "unreleased_expired_holds": holds })), None),
            );
        }
        found
    }

    /// Sets every diverging period's totals to the recount, recording one audit event per account (by `by`,
    /// with the totals before and after). Returns what was repaired. Storage writes the accounts back under
    /// the locks the batch holds, so no reservation interleaves.
    pub fn repair(&mut self, by: &super::Actor) -> Vec<Divergence> {
        let found = self.divergences();
        let mut by_account: BTreeMap<&AccountKey, Vec<&Divergence>> = BTreeMap::new();
        for d in &found {
            by_account.entry(&d.account).or_default().push(d);
        }
        let json = |t: &Totals| {
            serde_json::json!({
                "committed": t.committed.to_string(),
                "held": t.held.to_string(),
                "since": t.since.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            })
        };
        let mut events = Vec::new();
        for (key, divergences) in by_account {
            let account = self.account_mut(key);
            let (mut before, mut after) = (serde_json::Map::new(), serde_json::Map::new());
            for d in divergences {
                account.totals.insert(d.period, d.ledger);
                before.insert(d.period.to_string(), json(&d.running));
                after.insert(d.period.to_string(), json(&d.ledger));
            }
            events.push(
                super::AuditEvent::new(by, self.now, super::AuditAction::TotalsRepair, "totals")
                    .on(&key.key_id, Some(&key.unit))
                    .change(Some(before.into()), Some(after.into())),
            );
        }
        self.audit.extend(events);
        found
    }

    pub fn account(&self, key: &AccountKey) -> &Account {
        &self.accounts[key].value
    }

    fn account_mut(&mut self, key: &AccountKey) -> &mut Account {
        &mut self.accounts.get_mut(key).expect("the batch locks every account its operations name").value
    }

    /// Usage of every effective limit of `accounts`, in the order named.
    fn usage_of(&self, accounts: &[AccountKey]) -> Vec<LimitUsage> {
        accounts.iter().flat_map(|a| self.account(a).limit_usage(self.now)).collect()
    }

    pub fn reserve(&mut self, req: Reserve) -> Result<ReserveOutcome, Rejection> {
        let now = self.now;
        if let Some(existing) = self.transactions.get(&req.transaction_id) {
            let existing = &existing.value;
            // The same keys in any order are the same request (a client may build the list from a set).
            let mut keys = existing.accounts.clone();
            let mut asked = req.accounts.clone();
            keys.sort();
            asked.sort();
            if keys != asked || existing.held_amount != req.amount.get() {
                return Err(Rejection::AlreadyExists(format!(
                    "transaction {} already exists with different keys, unit or amount",
                    req.transaction_id
                )));
            }
            // A retry asking to commit at once must not be answered with a hold that will expire uncommitted.
            if req.commit && existing.expires_at.is_some() {
                return Err(Rejection::AlreadyExists(format!(
                    "transaction {} already exists as a hold, not committed at once: commit it with Commit",
                    req.transaction_id
                )));
            }
            return Ok(ReserveOutcome::Allowed {
                transaction: existing.clone(),
                usage: self.usage_of(&existing.accounts),
                replayed: true,
            });
        }
        let amount = req.amount.get();
        let mut exceeded = Vec::new();
        for key in &req.accounts {
            let account = self.account(key);
            for limit in account.exceeded_by(amount) {
                let usage =
                    account.usage_of(limit.name, limit.period, Some(limit.amount), Some(limit.source), now);
                exceeded.push(Exceeded { usage, retry_after: None });
            }
        }
        if !exceeded.is_empty() {
            return Ok(ReserveOutcome::Denied { exceeded, usage: self.usage_of(&req.accounts) });
        }
        let transaction = Transaction {
            id: req.transaction_id.clone(),
            accounts: req.accounts.clone(),
            amount,
            held_amount: amount,
            state: if req.commit { TxState::Committed } else { TxState::Held },
            created_at: now,
            expires_at: (!req.commit).then(|| now + req.hold_ttl.get()),
            committed_at: req.commit.then_some(now),
            reversed_at: None,
            committed_late: false,
            metadata: req.metadata,
        };
        let (committed, held) = if req.commit { (amount.into(), 0) } else { (0, amount.into()) };
        for key in &req.accounts {
            self.account_mut(key).adjust(now, committed, held);
        }
        let usage = self.usage_of(&req.accounts);
        self.transactions.insert(req.transaction_id, Tracked { value: transaction.clone(), original: None });
        Ok(ReserveOutcome::Allowed { transaction, usage, replayed: false })
    }

    /// HELD (or EXPIRED, late) -> COMMITTED for `amount` (default: the held amount).
    pub fn commit(&mut self, id: &TransactionId, amount: Option<Amount>) -> Result<Committed, Rejection> {
        let now = self.now;
        let tx = self.transaction(id)?.clone();
        let final_amount = amount.map_or(tx.held_amount, Amount::get);
        match tx.state {
            TxState::Committed if amount.is_none() || final_amount == tx.amount => {
                return Ok(Committed { late: tx.committed_late, transaction: tx, replayed: true });
            }
            TxState::Committed => {
                return Err(Rejection::FailedPrecondition(format!(
                    "transaction {id} is already committed for {}, not {final_amount}",
                    tx.amount
                )));
            }
            TxState::Reversed => {
                return Err(Rejection::FailedPrecondition(format!(
                    "transaction {id} was reversed and cannot be committed"
                )));
            }
            TxState::Held | TxState::Expired => {}
        }
        if final_amount > tx.held_amount {
            return Err(Rejection::FailedPrecondition(format!(
                "commit amount {final_amount} exceeds the held amount {}",
                tx.held_amount
            )));
        }
        let late = tx.state == TxState::Expired;
        // An expired hold no longer counts; a live one is released as the spend replaces it.
        let released = if late { 0 } else { i128::from(tx.amount) };
        for key in &tx.accounts {
            self.account_mut(key).adjust(tx.created_at, final_amount.into(), -released);
        }
        let tx = self.update(id, |t| {
            t.state = TxState::Committed;
            t.amount = final_amount;
            t.committed_at = Some(now);
            t.committed_late = late;
        });
        Ok(Committed { transaction: tx, late, replayed: false })
    }

    /// HELD -> REVERSED releases the hold; COMMITTED -> REVERSED refunds the spend; EXPIRED -> REVERSED
    /// records the caller's word. Reversing again changes nothing.
    pub fn reverse(&mut self, id: &TransactionId) -> Result<Reversed, Rejection> {
        let now = self.now;
        let tx = self.transaction(id)?.clone();
        let (committed, held) = match tx.state {
            TxState::Reversed => return Ok(Reversed { transaction: tx, from: TxState::Reversed }),
            TxState::Held => (0, i128::from(tx.amount)),
            TxState::Committed => (i128::from(tx.amount), 0),
            TxState::Expired => (0, 0),
        };
        for key in &tx.accounts {
            self.account_mut(key).adjust(tx.created_at, -committed, -held);
        }
        let transaction = self.update(id, |t| {
            t.state = TxState::Reversed;
            t.reversed_at = Some(now);
        });
        Ok(Reversed { transaction, from: tx.state })
    }

    /// Sets a key's own limit (replacing one of the same name). Its period's totals must be loaded: the batch
    /// asks for them with [`Loaded::also`].
    pub fn put_limit(&mut self, key: &AccountKey, spec: LimitSpec) -> Result<Option<LimitUsage>, Rejection> {
        let now = self.now;
        let account = self.account_mut(key);
        if !account.limits.contains_key(&spec.name) && account.limits.len() >= MAX_LIMITS {
            return Err(InvalidArgument::new(
                "name",
                format!("key {key} already has {MAX_LIMITS} limits, the most it may have; remove one first"),
            )
            .into());
        }
        let name = spec.name.clone();
        account.limits.insert(name.clone(), spec);
        Ok(account.limit_usage(now).into_iter().find(|u| u.name == name))
    }

    /// Removes a key's own limit of that name (a plan's limit of the same name applies again). Returns whether
    /// there was one.
    pub fn remove_limit(&mut self, key: &AccountKey, name: &LimitName) -> bool {
        self.account_mut(key).limits.remove(name).is_some()
    }

    /// A transaction the batch loaded or created, as it stands now.
    pub fn find(&self, id: &TransactionId) -> Option<&Transaction> {
        self.transactions.get(id).map(|t| &t.value)
    }

    /// Records an audit event, to be written with the batch's changes.
    pub fn record(&mut self, event: super::AuditEvent) {
        self.audit.push(event);
    }

    fn transaction(&self, id: &TransactionId) -> Result<&Transaction, Rejection> {
        self.transactions.get(id).map(|t| &t.value).ok_or_else(|| Rejection::NotFound(id.clone()))
    }

    fn update(&mut self, id: &TransactionId, change: impl FnOnce(&mut Transaction)) -> Transaction {
        let tx = &mut self.transactions.get_mut(id).expect("checked by the caller").value;
        change(tx);
        tx.clone()
    }

    /// Everything that differs from what was loaded. Totals are kept only for the periods that the accounts'
    /// limits now need.
    pub fn into_changes(self) -> Changes {
        let mut changes =
            Changes { expired_holds: self.expired.len() as u64, audit: self.audit, ..Changes::default() };
        for mut tracked in self.accounts.into_values() {
            let keep = tracked.value.tracked_periods(&[]);
            tracked.value.totals.retain(|p, _| keep.contains(p));
            if tracked.original.as_ref() != Some(&tracked.value) {
                tracked.value.as_of = Some(self.now);
                changes.accounts.push(tracked.value);
            }
        }
        for tracked in self.transactions.into_values() {
            match &tracked.original {
                None => changes.inserted.push(tracked.value),
                Some(original) if *original != tracked.value => changes.updated.push(tracked.value),
                Some(_) => {}
            }
        }
        let updated: BTreeSet<&TransactionId> = changes.updated.iter().map(|t| &t.id).collect();
        changes.expired = self.expired.into_iter().filter(|(id, _)| !updated.contains(id)).collect();
        changes.stale = self.stale.into_iter().map(|h| (h.transaction_id, h.account)).collect();
        // Keys sorted: writes lock rows in one order, so concurrent batches cannot deadlock.
        changes.inserted.sort_by(|a, b| a.id.cmp(&b.id));
        changes.updated.sort_by(|a, b| a.id.cmp(&b.id));
        changes.expired.sort();
        changes
    }
}
