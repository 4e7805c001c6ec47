//! The storage contract kept in memory behind one mutex: every batch is trivially atomic. For tests and for
//! running the domain without a database; it scans all transactions where Postgres uses an index.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Access, BatchOutput, Cursor, StorageError, Store, sorted_unique};
use crate::domain::{
    Account, AccountKey, AgedOut, Ledger, Loaded, Timestamp, Transaction, TransactionId, TxState,
};

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default, Clone)]
struct State {
    accounts: BTreeMap<AccountKey, Account>,
    transactions: BTreeMap<TransactionId, Transaction>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn load(&self, accounts: &[AccountKey], ids: &[TransactionId], now: Timestamp) -> Loaded {
        let owners = ids.iter().filter_map(|id| self.transactions.get(id)).map(|t| t.account.clone());
        let accounts: Vec<AccountKey> = accounts.iter().cloned().chain(owners).collect();
        let accounts: Vec<Account> = sorted_unique(&accounts)
            .into_iter()
            .map(|key| self.accounts.get(&key).cloned().unwrap_or_else(|| Account::new(key, now)))
            .collect();
        let of_batch = |t: &&Transaction| accounts.iter().any(|a| a.key == t.account);
        let expiring = self
            .transactions
            .values()
            .filter(of_batch)
            .filter(|t| t.state == TxState::Held && t.expires_at.is_some_and(|e| e <= now))
            .cloned()
            .collect();
        let mut aged = Vec::new();
        for account in &accounts {
            for range in account.aging_ranges(now) {
                let leaving = self.transactions.values().filter(|t| {
                    t.account == account.key && t.created_at > range.after && t.created_at <= range.upto
                });
                let mut out = AgedOut { window: range.window, committed: 0, held: 0 };
                for t in leaving {
                    match t.state_at(now) {
                        TxState::Committed => out.committed += i128::from(t.amount),
                        TxState::Held => out.held += i128::from(t.amount),
                        TxState::Reversed | TxState::Expired => {}
                    }
                }
                aged.push((account.key.clone(), out));
            }
        }
        Loaded {
            transactions: ids.iter().filter_map(|id| self.transactions.get(id).cloned()).collect(),
            accounts,
            expiring,
            aged,
        }
    }
}

impl Store for MemoryStore {
    async fn with_ledger<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        transactions: &[TransactionId],
        now: Timestamp,
        mut apply: F,
    ) -> Result<BatchOutput<R>, StorageError>
    where
        R: Send,
        F: FnMut(&mut Ledger) -> R + Send,
    {
        let mut state = self.lock();
        let mut ledger = Ledger::open(now, state.load(accounts, transactions, now));
        let value = apply(&mut ledger);
        let changes = ledger.into_changes();
        if access == Access::Write {
            for account in changes.accounts {
                state.accounts.insert(account.key.clone(), account);
            }
            for tx in changes.inserted.into_iter().chain(changes.updated) {
                state.transactions.insert(tx.id.clone(), tx);
            }
        }
        Ok(BatchOutput { value, expired_holds: changes.expired_holds })
    }

    async fn get_transaction(&self, id: &TransactionId) -> Result<Option<Transaction>, StorageError> {
        Ok(self.lock().transactions.get(id).cloned())
    }

    async fn list_transactions(
        &self,
        account: &AccountKey,
        cursor: Option<&Cursor>,
        limit: u32,
    ) -> Result<Vec<Transaction>, StorageError> {
        let state = self.lock();
        let mut txs: Vec<Transaction> = state
            .transactions
            .values()
            .filter(|t| &t.account == account)
            .filter(|t| cursor.is_none_or(|c| (t.created_at, &t.id) < (c.created_at, &c.transaction_id)))
            .cloned()
            .collect();
        txs.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        txs.truncate(limit as usize);
        Ok(txs)
    }

    async fn accounts_with_expired_holds(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        let state = self.lock();
        let keys: Vec<AccountKey> = state
            .transactions
            .values()
            .filter(|t| t.state == TxState::Held && t.state_at(now) == TxState::Expired)
            .map(|t| t.account.clone())
            .collect();
        let mut keys = sorted_unique(&keys);
        keys.truncate(limit as usize);
        Ok(keys)
    }

    async fn open_holds(&self, now: Timestamp) -> Result<u64, StorageError> {
        Ok(self.lock().transactions.values().filter(|t| t.state_at(now) == TxState::Held).count() as u64)
    }

    async fn ready(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
