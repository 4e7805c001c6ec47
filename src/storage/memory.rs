//! The storage contract kept in memory behind one mutex: every batch is trivially atomic. For tests and for
//! running the domain without a database; it scans all transactions where Postgres uses an index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    Access, BatchOutput, Cursor, HistoryPartition, HoldBookkeeping, HoldCheck, PartitionDrop, PlanDeletion,
    PlanInfo, StorageError, Store, sorted_unique,
};
use crate::domain::rate::{RateBook, RateState};
use crate::domain::rules::Rule;
use crate::domain::{
    Account, AccountKey, Actor, AgedOut, AuditEvent, AuditFilter, CallerId, CallerRecord, Counted,
    ExpiringHold, KeyId, Ledger, LimitName, Loaded, Period, Plan, PlanName, Rejection, Timestamp, Totals,
    Transaction, TransactionId, TxState, counts,
};

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Jobs running under [`Store::exclusively`].
    jobs: Mutex<BTreeSet<&'static str>>,
}

/// Takes a job off the running list when it ends (also when its future is dropped half-way).
struct JobGuard<'a> {
    jobs: &'a Mutex<BTreeSet<&'static str>>,
    name: &'static str,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(self.name);
    }
}

#[derive(Default, Clone)]
struct State {
    accounts: BTreeMap<AccountKey, Account>,
    transactions: BTreeMap<TransactionId, Transaction>,
    /// Accounts' shares of holds released as expired while the transaction itself still says held (the
    /// per-row state 4 of Postgres).
    released: BTreeSet<(TransactionId, AccountKey)>,
    plans: BTreeMap<PlanName, Plan>,
    key_plans: BTreeMap<KeyId, PlanName>,
    callers: Vec<CallerRecord>,
    audit: Vec<AuditEvent>,
    rate_states: BTreeMap<(AccountKey, LimitName), RateState>,
    rules: BTreeMap<LimitName, Rule>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accounts in key order after `after` that `keep` selects, at most `limit`.
    fn accounts_page(
        &self,
        after: Option<&AccountKey>,
        limit: u32,
        keep: impl Fn(&Account) -> bool,
    ) -> Vec<AccountKey> {
        let state = self.lock();
        state
            .accounts
            .values()
            .filter(|a| after.is_none_or(|k| a.key > *k) && keep(a))
            .take(limit as usize)
            .map(|a| a.key.clone())
            .collect()
    }
}

impl State {
    /// What `account`'s share of `t` counts at `now`: (committed, held).
    fn share(&self, t: &Transaction, account: &AccountKey, now: Timestamp) -> (i128, i128) {
        match t.state_at(now) {
            TxState::Committed => (t.amount.into(), 0),
            TxState::Held if !self.released.contains(&(t.id.clone(), account.clone())) => {
                (0, t.amount.into())
            }
            _ => (0, 0),
        }
    }

    fn charging<'a>(&'a self, account: &'a AccountKey) -> impl Iterator<Item = &'a Transaction> + 'a {
        self.transactions.values().filter(move |t| t.accounts.contains(account))
    }

    /// What `period` of `account` counts at `now`, summed from its transactions.
    fn sum(&self, key: &AccountKey, period: &Period, now: Timestamp) -> Totals {
        let since = period.start_at(now);
        let mut totals = Totals::empty(since);
        for t in self.charging(key).filter(|t| counts(period, since, t.created_at)) {
            let (c, h) = self.share(t, key, now);
            totals.committed += c;
            totals.held += h;
        }
        totals
    }

    fn audit(&mut self, mut event: AuditEvent) {
        event.id = self.audit.len() as i64 + 1;
        self.audit.push(event);
    }

    fn account(&self, key: &AccountKey) -> Account {
        let mut account = self.accounts.get(key).cloned().unwrap_or_else(|| Account::new(key.clone()));
        account.plan = self.key_plans.get(&key.key_id).cloned();
        account.plan_limits = account
            .plan
            .as_ref()
            .and_then(|p| self.plans.get(p))
            .and_then(|p| p.limits.get(&key.unit).cloned())
            .unwrap_or_default();
        account
    }

    fn load(
        &self,
        accounts: &[AccountKey],
        ids: &[TransactionId],
        also: &[(AccountKey, Period)],
        now: Timestamp,
        recount: bool,
    ) -> Loaded {
        let owners = ids.iter().filter_map(|id| self.transactions.get(id)).flat_map(|t| t.accounts.clone());
        let keys: Vec<AccountKey> = accounts.iter().cloned().chain(owners).collect();
        let accounts: Vec<Account> = sorted_unique(&keys).iter().map(|k| self.account(k)).collect();
        // Never earlier than the accounts' last write, as `Ledger::open` will decide.
        let now = accounts.iter().filter_map(|a| a.as_of).fold(now, Timestamp::max);
        let mut loaded = Loaded {
            transactions: ids.iter().filter_map(|id| self.transactions.get(id).cloned()).collect(),
            ..Loaded::default()
        };
        for account in &accounts {
            let key = &account.key;
            for t in self.charging(key) {
                let released = self.released.contains(&(t.id.clone(), key.clone()));
                let expired = t.expires_at.filter(|e| *e <= now);
                if let Some(expires_at) = expired.filter(|_| t.state == TxState::Held && !released) {
                    loaded.expiring.push(ExpiringHold {
                        id: t.id.clone(),
                        account: key.clone(),
                        created_at: t.created_at,
                        expires_at,
                        amount: t.amount,
                    });
                }
            }
            for range in account.aging_ranges(now) {
                let mut out = AgedOut { period: range.period, committed: 0, held: 0 };
                for t in
                    self.charging(key).filter(|t| t.created_at > range.after && t.created_at <= range.upto)
                {
                    let (c, h) = self.share(t, key, now);
                    out.committed += c;
                    out.held += h;
                }
                loaded.aged.push((key.clone(), out));
            }
            let tracked = Loaded::tracked(account, also);
            for period in account.missing_periods(&tracked) {
                loaded.fresh.push((key.clone(), period, self.sum(key, &period, now)));
            }
            if recount {
                for period in tracked {
                    loaded.recounted.push((key.clone(), period, self.sum(key, &period, now)));
                }
            }
        }
        loaded.accounts = accounts;
        loaded.also = also.to_vec();
        loaded
    }
}

impl Store for MemoryStore {
    async fn with_ledger<R, F>(
        &self,
        access: Access,
        accounts: &[AccountKey],
        transactions: &[TransactionId],
        also: &[(AccountKey, Period)],
        now: Timestamp,
        mut apply: F,
    ) -> Result<BatchOutput<R>, StorageError>
    where
        R: Send,
        F: FnMut(&mut Ledger) -> R + Send,
    {
        let mut state = self.lock();
        let mut ledger = Ledger::open(now, state.load(accounts, transactions, also, now, access.recounts()));
        let now = ledger.now();
        let value = apply(&mut ledger);
        let changes = ledger.into_changes();
        if access.writes() {
            for account in changes.accounts {
                state.accounts.insert(account.key.clone(), account);
            }
            for tx in changes.inserted.into_iter().chain(changes.updated) {
                state.transactions.insert(tx.id.clone(), tx);
            }
            state.released.extend(changes.expired);
            for event in changes.audit {
                state.audit(event);
            }
        }
        Ok(BatchOutput { value, expired_holds: changes.expired_holds, now })
    }

    async fn get_transaction(
        &self,
        id: &TransactionId,
        now: Timestamp,
    ) -> Result<Option<(Transaction, Timestamp)>, StorageError> {
        Ok(self.lock().transactions.get(id).map(|t| (t.clone(), now)))
    }

    async fn list_transactions(
        &self,
        account: &AccountKey,
        cursor: Option<&Cursor>,
        limit: u32,
        now: Timestamp,
    ) -> Result<(Vec<Transaction>, Timestamp), StorageError> {
        let state = self.lock();
        let mut txs: Vec<Transaction> = state
            .charging(account)
            .filter(|t| cursor.is_none_or(|c| (t.created_at, &t.id) < (c.created_at, &c.transaction_id)))
            .cloned()
            .collect();
        txs.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        txs.truncate(limit as usize);
        Ok((txs, now))
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
            .flat_map(|t| {
                t.accounts.iter().filter(|a| !state.released.contains(&(t.id.clone(), (*a).clone())))
            })
            .cloned()
            .collect();
        let mut keys = sorted_unique(&keys);
        keys.truncate(limit as usize);
        Ok(keys)
    }

    async fn open_holds(&self) -> Result<u64, StorageError> {
        let state = self.lock();
        let open = |t: &&Transaction| {
            t.state == TxState::Held && !state.released.contains(&(t.id.clone(), t.accounts[0].clone()))
        };
        Ok(state.transactions.values().filter(open).count() as u64)
    }

    async fn check_holds(&self, _accounts: &[AccountKey]) -> Result<HoldCheck, StorageError> {
        // Nothing to diverge: the open holds and the expired ones are found from the transactions themselves
        // on every read (see `open_holds` and `with_ledger`), never counted apart or behind a cursor.
        Ok(HoldCheck::default())
    }

    async fn repair_hold_bookkeeping(
        &self,
        _accounts: &[AccountKey],
        _by: &Actor,
        _now: Timestamp,
    ) -> Result<Vec<HoldBookkeeping>, StorageError> {
        Ok(Vec::new())
    }

    async fn counted(
        &self,
        account: &AccountKey,
        period: &Period,
        from: Timestamp,
        now: Timestamp,
        max_committed: u32,
    ) -> Result<Counted, StorageError> {
        let state = self.lock();
        let mut counted = Counted { complete: true, ..Counted::default() };
        for t in state.charging(account).filter(|t| t.created_at >= from) {
            match (state.share(t, account, now), t.expires_at) {
                ((0, held), Some(expires_at)) if held > 0 => {
                    counted.holds.push((t.created_at, expires_at, t.amount))
                }
                ((c, _), _) if c > 0 && period.rolling_length().is_some() => {
                    counted.committed.push((t.created_at, t.amount))
                }
                _ => {}
            }
        }
        counted.committed.sort();
        if counted.committed.len() > max_committed as usize {
            counted.committed.truncate(max_committed as usize);
            counted.complete = false;
        }
        Ok(counted)
    }

    async fn put_plan(&self, plan: &Plan, audit: AuditEvent) -> Result<(), StorageError> {
        let mut state = self.lock();
        let before = state.plans.insert(plan.name.clone(), plan.clone());
        state.audit(audit.change(before.map(|p| p.audit_json()), Some(plan.audit_json())));
        Ok(())
    }

    async fn get_plan(&self, name: &PlanName) -> Result<Option<PlanInfo>, StorageError> {
        let state = self.lock();
        Ok(state.plans.get(name).map(|plan| PlanInfo {
            plan: plan.clone(),
            keys: state.key_plans.values().filter(|p| *p == name).count() as u64,
        }))
    }

    async fn list_plans(&self) -> Result<Vec<PlanInfo>, StorageError> {
        let state = self.lock();
        Ok(state
            .plans
            .values()
            .map(|plan| PlanInfo {
                plan: plan.clone(),
                keys: state.key_plans.values().filter(|p| **p == plan.name).count() as u64,
            })
            .collect())
    }

    async fn delete_plan(&self, name: &PlanName, audit: AuditEvent) -> Result<PlanDeletion, StorageError> {
        let mut state = self.lock();
        if !state.plans.contains_key(name) {
            return Ok(PlanDeletion::NotFound);
        }
        let keys = state.key_plans.values().filter(|p| *p == name).count() as u64;
        if keys > 0 {
            return Ok(PlanDeletion::InUse(keys));
        }
        let before = state.plans.remove(name);
        state.audit(audit.change(before.map(|p| p.audit_json()), None));
        Ok(PlanDeletion::Deleted)
    }

    async fn assign_plan(
        &self,
        key: &KeyId,
        plan: Option<&PlanName>,
        audit: AuditEvent,
    ) -> Result<bool, StorageError> {
        let mut state = self.lock();
        if plan.is_some_and(|p| !state.plans.contains_key(p)) {
            return Ok(false);
        }
        let before = match plan {
            None => state.key_plans.remove(key),
            Some(p) => state.key_plans.insert(key.clone(), p.clone()),
        };
        let json = |p: Option<&PlanName>| serde_json::json!({ "plan": p.map(PlanName::as_str) });
        state.audit(audit.change(Some(json(before.as_ref())), Some(json(plan))));
        Ok(true)
    }

    async fn create_caller(&self, record: &CallerRecord, audit: AuditEvent) -> Result<(), StorageError> {
        let mut state = self.lock();
        state.callers.push(record.clone());
        state.audit(audit.change(None, Some(record.caller.audit_json())));
        Ok(())
    }

    async fn update_caller<F>(
        &self,
        id: CallerId,
        apply: F,
    ) -> Result<Option<Result<CallerRecord, Rejection>>, StorageError>
    where
        F: FnOnce(&CallerRecord) -> Result<Option<(CallerRecord, AuditEvent)>, Rejection> + Send,
    {
        let mut state = self.lock();
        let Some(i) = state.callers.iter().position(|c| c.caller.id == id) else {
            return Ok(None);
        };
        let result = match apply(&state.callers[i]) {
            Ok(Some((next, audit))) => {
                let before = state.callers[i].caller.audit_json();
                state.audit(audit.change(Some(before), Some(next.caller.audit_json())));
                state.callers[i] = next.clone();
                Ok(next)
            }
            Ok(None) => Ok(state.callers[i].clone()),
            Err(rejection) => Err(rejection),
        };
        Ok(Some(result))
    }

    async fn callers(&self) -> Result<Vec<CallerRecord>, StorageError> {
        Ok(self.lock().callers.clone())
    }

    async fn audit_events(&self, filter: &AuditFilter, limit: u32) -> Result<Vec<AuditEvent>, StorageError> {
        let state = self.lock();
        Ok(state
            .audit
            .iter()
            .rev()
            .filter(|e| filter.before_id.is_none_or(|id| e.id < id))
            .filter(|e| filter.key_id.as_ref().is_none_or(|k| e.key_id.as_deref() == Some(k.as_str())))
            .filter(|e| filter.caller_id.is_none_or(|c| e.caller_id == Some(c)))
            .filter(|e| filter.since.is_none_or(|t| e.at >= t))
            .filter(|e| filter.until.is_none_or(|t| e.at < t))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn with_rates<R, F>(
        &self,
        accounts: &[AccountKey],
        now: Option<Timestamp>,
        mut apply: F,
    ) -> Result<R, StorageError>
    where
        R: Send,
        F: FnMut(&mut RateBook) -> R + Send,
    {
        let mut state = self.lock();
        let now = now.unwrap_or_else(|| crate::clock::Clock::now(&crate::clock::SystemClock));
        let mut book = RateBook { now, ..RateBook::default() };
        for key in sorted_unique(accounts) {
            book.limits.insert(key.clone(), state.account(&key).effective_rate_limits());
            for ((k, name), s) in state.rate_states.iter().filter(|((k, _), _)| k == &key) {
                book.loaded.insert((k.clone(), name.clone()));
                book.states.insert((k.clone(), name.clone()), *s);
            }
        }
        let value = apply(&mut book);
        state.rate_states.extend(book.changed);
        Ok(value)
    }

    async fn rate_rules(&self) -> Result<Vec<Rule>, StorageError> {
        Ok(self.lock().rules.values().cloned().collect())
    }

    async fn put_rate_rule(&self, rule: &Rule, audit: AuditEvent) -> Result<(), StorageError> {
        let mut state = self.lock();
        let before = state.rules.insert(rule.name.clone(), rule.clone());
        state.audit(audit.change(before.map(|r| r.audit_json()), Some(rule.audit_json())));
        Ok(())
    }

    async fn delete_rate_rule(&self, name: &LimitName, audit: AuditEvent) -> Result<bool, StorageError> {
        let mut state = self.lock();
        let Some(before) = state.rules.remove(name) else { return Ok(false) };
        state.audit(audit.change(Some(before.audit_json()), None));
        Ok(true)
    }

    async fn account_keys(
        &self,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        Ok(self.accounts_page(after, limit, |_| true))
    }

    async fn exclusively<J>(&self, name: &'static str, job: J) -> Result<Option<J::Output>, StorageError>
    where
        J: Future + Send,
        J::Output: Send,
    {
        if !self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(name) {
            return Ok(None);
        }
        let _running = JobGuard { jobs: &self.jobs, name };
        Ok(Some(job.await))
    }

    /// History in memory is one unpartitioned list: nothing to create or drop (retention is a no-op).
    async fn history_partitions(&self) -> Result<Vec<HistoryPartition>, StorageError> {
        Ok(Vec::new())
    }

    async fn create_history_partitions(
        &self,
        _from: Timestamp,
        _to: Timestamp,
    ) -> Result<Vec<String>, StorageError> {
        Ok(Vec::new())
    }

    async fn drop_history_partition(
        &self,
        _name: &str,
        _export_dir: Option<&std::path::Path>,
    ) -> Result<PartitionDrop, StorageError> {
        Ok(PartitionDrop::NotFound)
    }

    async fn longest_spending_period(&self) -> Result<Option<chrono::TimeDelta>, StorageError> {
        let state = self.lock();
        let own = state.accounts.values().flat_map(|a| a.limits.values());
        let planned = state.plans.values().flat_map(|p| p.limits.values().flatten());
        Ok(own.chain(planned).filter(|l| !l.is_rate()).map(|l| l.period.longest_span()).max())
    }

    async fn accounts_written_before(
        &self,
        before: Timestamp,
        after: Option<&AccountKey>,
        limit: u32,
    ) -> Result<Vec<AccountKey>, StorageError> {
        Ok(self.accounts_page(after, limit, |a| !a.totals.is_empty() && a.as_of.is_none_or(|t| t < before)))
    }

    async fn delete_audit_events_before(&self, before: Timestamp) -> Result<u64, StorageError> {
        let mut state = self.lock();
        let n = state.audit.len();
        state.audit.retain(|e| e.at >= before);
        Ok((n - state.audit.len()) as u64)
    }

    async fn ready(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
