//! The state machine of one batch: the locked accounts and the transactions the batch touches, refreshed to
//! `now`, then changed by reserve / commit / reverse / limit operations applied in order. Pure: storage loads
//! the inputs and writes back [`Changes`].

use std::collections::{BTreeMap, HashMap};

use super::{
    Account, AccountKey, AgedOut, Amount, HoldTtl, Limit, Metadata, Timestamp, Transaction, TransactionId,
    TxState, Window, WindowUsage,
};

/// A reservation as the caller asked for it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserve {
    pub transaction_id: TransactionId,
    pub account: AccountKey,
    pub amount: Amount,
    pub hold_ttl: HoldTtl,
    /// Record as committed at once instead of holding.
    pub commit: bool,
    pub metadata: Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Allowed {
        transaction: Transaction,
        /// Usage of the windows with a limit, after this reservation.
        usage: Vec<WindowUsage>,
        /// The transaction already existed: a retry, answered without holding again.
        replayed: bool,
    },
    Denied {
        exceeded: Vec<Window>,
        usage: Vec<WindowUsage>,
    },
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
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
}

/// What a batch changed, for storage to write back.
#[derive(Debug, Default)]
pub struct Changes {
    pub accounts: Vec<Account>,
    pub inserted: Vec<Transaction>,
    pub updated: Vec<Transaction>,
    /// Holds found expired and released while refreshing.
    pub expired_holds: u64,
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
    expired_holds: u64,
}

/// What storage loaded for a batch, under the accounts' locks.
#[derive(Debug, Default)]
pub struct Loaded {
    pub accounts: Vec<Account>,
    /// The transactions the batch's operations name (those that exist).
    pub transactions: Vec<Transaction>,
    /// Every HELD transaction of these accounts with `expires_at <= now`.
    pub expiring: Vec<Transaction>,
    /// Sums of what leaves each window, for the ranges given by [`Account::aging_ranges`].
    pub aged: Vec<(AccountKey, AgedOut)>,
}

impl Ledger {
    /// Opens the ledger at `now`: releases expired holds, then ages every window to `now`.
    pub fn open(now: Timestamp, loaded: Loaded) -> Self {
        let mut ledger = Self {
            now,
            accounts: loaded.accounts.into_iter().map(|a| (a.key.clone(), Tracked::loaded(a))).collect(),
            transactions: loaded
                .transactions
                .into_iter()
                .map(|t| (t.id.clone(), Tracked::loaded(t)))
                .collect(),
            expired_holds: 0,
        };
        for hold in loaded.expiring {
            let tx = ledger.transactions.entry(hold.id.clone()).or_insert_with(|| Tracked::loaded(hold));
            if tx.value.state_at(now) != TxState::Expired || tx.value.state != TxState::Held {
                continue;
            }
            tx.value.state = TxState::Expired;
            if let Some(account) = ledger.accounts.get_mut(&tx.value.account) {
                account.value.release_expired(tx.value.created_at, tx.value.amount);
            }
            ledger.expired_holds += 1;
        }
        let mut aged: HashMap<AccountKey, Vec<AgedOut>> = HashMap::new();
        for (key, out) in loaded.aged {
            aged.entry(key).or_default().push(out);
        }
        for (key, account) in &mut ledger.accounts {
            account.value.age_out(now, aged.remove(key).unwrap_or_default());
        }
        ledger
    }

    pub fn now(&self) -> Timestamp {
        self.now
    }

    pub fn account(&self, key: &AccountKey) -> &Account {
        &self.accounts[key].value
    }

    fn account_mut(&mut self, key: &AccountKey) -> &mut Account {
        &mut self.accounts.get_mut(key).expect("the batch locks every account its operations name").value
    }

    pub fn reserve(&mut self, req: Reserve) -> Result<ReserveOutcome, Rejection> {
        let now = self.now;
        if let Some(existing) = self.transactions.get(&req.transaction_id) {
            let existing = &existing.value;
            if existing.account != req.account || existing.held_amount != req.amount.get() {
                return Err(Rejection::AlreadyExists(format!(
                    "transaction {} already exists with a different key, unit or amount",
                    req.transaction_id
                )));
            }
            return Ok(ReserveOutcome::Allowed {
                transaction: existing.clone(),
                usage: self.account(&req.account).limited_usage(),
                replayed: true,
            });
        }
        let account = self.account_mut(&req.account);
        let exceeded = account.exceeded_by(req.amount.get());
        if !exceeded.is_empty() {
            return Ok(ReserveOutcome::Denied { exceeded, usage: account.limited_usage() });
        }
        let amount = req.amount.get();
        let transaction = Transaction {
            id: req.transaction_id.clone(),
            account: req.account.clone(),
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
        if req.commit {
            account.adjust(now, amount.into(), 0);
        } else {
            account.adjust(now, 0, amount.into());
        }
        let usage = account.limited_usage();
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
        self.account_mut(&tx.account).adjust(tx.created_at, final_amount.into(), -released);
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
        self.account_mut(&tx.account).adjust(tx.created_at, -committed, -held);
        let transaction = self.update(id, |t| {
            t.state = TxState::Reversed;
            t.reversed_at = Some(now);
        });
        Ok(Reversed { transaction, from: tx.state })
    }

    /// Sets (`Some`) or removes (`None`) the limit of one window.
    pub fn set_limit(&mut self, key: &AccountKey, window: Window, limit: Option<Limit>) -> WindowUsage {
        let account = self.account_mut(key);
        account.limits[window.index()] = limit.map(Limit::get);
        account.usage(window)
    }

    fn transaction(&self, id: &TransactionId) -> Result<&Transaction, Rejection> {
        self.transactions.get(id).map(|t| &t.value).ok_or_else(|| Rejection::NotFound(id.clone()))
    }

    fn update(&mut self, id: &TransactionId, change: impl FnOnce(&mut Transaction)) -> Transaction {
        let tx = &mut self.transactions.get_mut(id).expect("checked by the caller").value;
        change(tx);
        tx.clone()
    }

    /// Everything that differs from what was loaded.
    pub fn into_changes(self) -> Changes {
        let mut changes = Changes { expired_holds: self.expired_holds, ..Changes::default() };
        for tracked in self.accounts.into_values() {
            if tracked.original.as_ref() != Some(&tracked.value) {
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
        // Keys sorted: writes lock rows in one order, so concurrent batches cannot deadlock.
        changes.inserted.sort_by(|a, b| a.id.cmp(&b.id));
        changes.updated.sort_by(|a, b| a.id.cmp(&b.id));
        changes
    }
}
