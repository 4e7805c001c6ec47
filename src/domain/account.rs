//! An account's limits and running totals, and how the totals are kept exact without summing history.
//!
//! An account is one key in one unit. It has limits of its own and those of its key's plan; the totals are
//! kept per distinct [`Period`] (two limits over the same period share them, and a limit's amount can change
//! without touching them). Invariant, for every period `p` with totals, after [`Account::advance`] at `now`:
//! - `committed[p]` = Σ amount of its COMMITTED transactions that `p` counts,
//! - `held[p]` = Σ amount of its HELD transactions unexpired at `now` that `p` counts,
//!
//! where a rolling period counts what was created after `since` = `now - length` (never moved backwards), and a
//! calendar period counts what was created at or after `since` = the start of the period containing `now`.
//! So usage is read from the totals in O(1): a rolling period subtracts each transaction once when it ages
//! out, a calendar period drops its totals whole at a boundary. Totals for a period that newly applies (a limit
//! set, a plan changed) are summed from history once, by storage, when the account is next loaded.

use std::collections::{BTreeMap, BTreeSet};

use chrono::TimeDelta;
use serde::{Deserialize, Serialize};

use super::{
    AccountKey, EffectiveLimit, LimitName, LimitSource, LimitSpec, Period, PlanName, Timestamp, Window,
    effective_limits,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Committed spend counted in the period. Kept in i128: an unlimited key may record more than i64::MAX in
    /// total, and no sum may wrap or fail.
    #[serde(rename = "c", with = "i128_text")]
    pub committed: i128,
    #[serde(rename = "h", with = "i128_text")]
    pub held: i128,
    /// Rolling: transactions created at or before this instant no longer count. Calendar: the start of the
    /// period being counted.
    #[serde(rename = "s")]
    pub since: Timestamp,
}

/// i128 as a decimal string: JSON numbers lose precision past 2^53 in many readers.
mod i128_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Totals {
    pub fn empty(since: Timestamp) -> Self {
        Self { committed: 0, held: 0, since }
    }

    pub fn used(&self) -> i128 {
        self.committed + self.held
    }
}

/// Does `period`, counting from `since`, count a transaction created at `created_at`?
pub fn counts(period: &Period, since: Timestamp, created_at: Timestamp) -> bool {
    match period {
        Period::Rolling(_) => created_at > since,
        Period::Calendar(_) => created_at >= since,
    }
}

/// Transactions leaving one rolling period of one account: the sums of what they counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgedOut {
    pub period: Period,
    /// Σ amount of COMMITTED transactions created in `(since, now - length]`.
    pub committed: i128,
    /// Σ amount of HELD transactions unexpired at `now` created in that range. Holds expiring by `now` are
    /// handled by [`Account::release_expired`] instead, so that nothing is subtracted twice.
    pub held: i128,
}

/// A range of creation times whose transactions leave a rolling period at `now`: `(after, upto]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgingRange {
    pub period: Period,
    pub after: Timestamp,
    pub upto: Timestamp,
}

/// Usage of one limit (or of a period without a limit) as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitUsage {
    pub account: AccountKey,
    pub name: LimitName,
    pub period: Period,
    /// `None` when nothing limits this period (round-1 windows without a limit).
    pub limit: Option<i64>,
    pub source: Option<LimitSource>,
    pub spent: i128,
    pub held: i128,
    /// Calendar periods: the current period `[start, resets_at)`.
    pub period_start: Option<Timestamp>,
    pub resets_at: Option<Timestamp>,
}

/// `max(0, limit - spent - held)`, or `None` without a limit.
fn remaining(limit: Option<i64>, spent: i128, held: i128) -> Option<i128> {
    limit.map(|limit| (i128::from(limit) - spent - held).max(0))
}

impl LimitUsage {
    /// `max(0, limit - spent - held)`, or `None` without a limit.
    pub fn remaining(&self) -> Option<i128> {
        remaining(self.limit, self.spent, self.held)
    }
}

/// Usage of a round-1 window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUsage {
    pub window: Window,
    pub limit: Option<i64>,
    pub spent: i128,
    pub held: i128,
}

impl WindowUsage {
    pub fn remaining(&self) -> Option<i128> {
        remaining(self.limit, self.spent, self.held)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub key: AccountKey,
    /// The key's own limits in this unit, by name; an entry without an amount lifts the plan's limit.
    pub limits: BTreeMap<LimitName, LimitSpec>,
    /// The key's plan and its limits in this unit. Read-only here: plans change apart from accounts.
    pub plan: Option<PlanName>,
    pub plan_limits: Vec<LimitSpec>,
    pub totals: BTreeMap<Period, Totals>,
    /// The `now` of the last batch that wrote the account; `None` for a new one. A batch never decides at an
    /// earlier instant (see [`crate::domain::Ledger::open`]).
    pub as_of: Option<Timestamp>,
}

impl Account {
    /// A fresh account: no limits, nothing counted.
    pub fn new(key: AccountKey) -> Self {
        Self {
            key,
            limits: BTreeMap::new(),
            plan: None,
            plan_limits: Vec::new(),
            totals: BTreeMap::new(),
            as_of: None,
        }
    }

    pub fn effective_limits(&self) -> Vec<EffectiveLimit> {
        effective_limits(&self.limits, &self.plan_limits)
    }

    /// The rate limits that apply (own over the plan's by name), with where each comes from.
    pub fn effective_rate_limits(&self) -> Vec<(super::LimitSpec, super::LimitSource)> {
        super::effective_rate_limits(&self.limits, &self.plan_limits)
    }

    /// The periods whose totals must be kept: those of the effective limits, those of the plan's limits
    /// even where an own limit overrides them (removing the override makes the plan's limit apply at once,
    /// within the same batch, so its totals must already be exact), and `also`.
    pub fn tracked_periods(&self, also: &[Period]) -> BTreeSet<Period> {
        self.effective_limits()
            .into_iter()
            .map(|l| l.period)
            .chain(self.plan_limits.iter().map(|l| l.period))
            .chain(also.iter().copied())
            .collect()
    }

    /// Periods in `wanted` without totals yet: storage sums them from history.
    pub fn missing_periods(&self, wanted: &BTreeSet<Period>) -> Vec<Period> {
        wanted.iter().filter(|p| !self.totals.contains_key(p)).copied().collect()
    }

    /// The creation-time ranges whose transactions leave a rolling period by `now`; empty ranges are left out.
    pub fn aging_ranges(&self, now: Timestamp) -> impl Iterator<Item = AgingRange> + '_ {
        self.totals.iter().filter_map(move |(period, totals)| {
            let upto = now - period.rolling_length()?;
            (upto > totals.since).then_some(AgingRange { period: *period, after: totals.since, upto })
        })
    }

    /// Stops counting an expired hold (created at `created_at`) in every period that still counts it.
    /// Must run before [`Account::advance`] of the same refresh: it tests inclusion against the old starts.
    pub fn release_expired(&mut self, created_at: Timestamp, amount: i64) {
        self.adjust(created_at, 0, -i128::from(amount));
    }

    /// Moves every period to `now`: rolling ones subtract what left them, calendar ones that passed a boundary
    /// start again from zero. Then keeps totals for `tracked` only, adding `fresh` (summed by storage at `now`)
    /// for the periods that had none.
    pub fn advance(
        &mut self,
        now: Timestamp,
        aged: impl IntoIterator<Item = AgedOut>,
        tracked: &BTreeSet<Period>,
        fresh: impl IntoIterator<Item = (Period, Totals)>,
    ) {
        for out in aged {
            if let Some(totals) = self.totals.get_mut(&out.period) {
                totals.committed -= out.committed;
                totals.held -= out.held;
            }
        }
        for (period, totals) in &mut self.totals {
            match period {
                Period::Rolling(length) => totals.since = totals.since.max(now - *length),
                Period::Calendar(c) => {
                    let (start, _) = c.bounds(now);
                    // Only forwards: a clock read behind the stored period keeps counting it.
                    if start > totals.since {
                        *totals = Totals::empty(start);
                    }
                }
            }
        }
        self.totals.retain(|p, _| tracked.contains(p));
        for (period, totals) in fresh {
            if tracked.contains(&period) {
                self.totals.entry(period).or_insert(totals);
            }
        }
    }

    /// Adds `committed` and `held` to every period that counts a transaction created at `created_at`.
    pub fn adjust(&mut self, created_at: Timestamp, committed: i128, held: i128) {
        for (period, totals) in &mut self.totals {
            if counts(period, totals.since, created_at) {
                totals.committed += committed;
                totals.held += held;
            }
        }
    }

    fn totals_of(&self, period: &Period) -> Totals {
        // Every tracked period has totals once the ledger is open; an absent one has counted nothing.
        self.totals.get(period).copied().unwrap_or(Totals {
            committed: 0,
            held: 0,
            since: Timestamp::MIN_UTC,
        })
    }

    /// The effective limits that `amount` more would exceed. Reaching a limit exactly is allowed.
    pub fn exceeded_by(&self, amount: i64) -> Vec<EffectiveLimit> {
        self.effective_limits()
            .into_iter()
            .filter(|l| self.totals_of(&l.period).used() + i128::from(amount) > i128::from(l.amount))
            .collect()
    }

    pub fn usage_of(
        &self,
        name: LimitName,
        period: Period,
        limit: Option<i64>,
        source: Option<LimitSource>,
        now: Timestamp,
    ) -> LimitUsage {
        let totals = self.totals_of(&period);
        let (period_start, resets_at) = match &period {
            Period::Calendar(c) => {
                let (start, end) = c.bounds(now.max(totals.since));
                (Some(start), Some(end))
            }
            Period::Rolling(_) => (None, None),
        };
        LimitUsage {
            account: self.key.clone(),
            name,
            period,
            limit,
            source,
            spent: totals.committed,
            held: totals.held,
            period_start,
            resets_at,
        }
    }

    /// Usage of every effective limit, by name.
    pub fn limit_usage(&self, now: Timestamp) -> Vec<LimitUsage> {
        self.effective_limits()
            .into_iter()
            .map(|l| self.usage_of(l.name, l.period, Some(l.amount), Some(l.source), now))
            .collect()
    }

    /// A round-1 window: the effective limit of its name, else the rolling window without a limit.
    pub fn window_usage(&self, window: Window) -> WindowUsage {
        let name = LimitName::of_window(window);
        let (period, limit) = match self.effective_limits().into_iter().find(|l| l.name == name) {
            Some(l) => (l.period, Some(l.amount)),
            None => (Period::Rolling(window.length()), None),
        };
        let totals = self.totals_of(&period);
        WindowUsage { window, limit, spent: totals.committed, held: totals.held }
    }

    pub fn all_windows(&self) -> Vec<WindowUsage> {
        Window::ALL.into_iter().map(|w| self.window_usage(w)).collect()
    }
}

/// What storage found still counting in one period of an account, to work out when capacity returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// Open holds the period counts: (created_at, expires_at, amount).
    pub holds: Vec<(Timestamp, Timestamp, i64)>,
    /// Committed spend the period counts, oldest first: (created_at, amount). Rolling periods only.
    pub committed: Vec<(Timestamp, i64)>,
    /// False when `committed` was cut short: later rows exist.
    pub complete: bool,
}

/// When a reservation of `amount` would first fit under `limit` in `period` if nothing else happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    After(TimeDelta),
    /// The amount alone exceeds the limit: it never fits.
    Never,
}

/// Works out [`RetryAfter`] from the usage now (`used`) and what still counts: each spend stops counting when
/// it ages out of a rolling period, a hold when it expires, everything at a calendar boundary.
pub fn retry_after(
    period: &Period,
    used: i128,
    limit: i64,
    amount: i64,
    now: Timestamp,
    counted: &Counted,
) -> RetryAfter {
    let limit = i128::from(limit);
    let amount = i128::from(amount);
    if amount > limit {
        return RetryAfter::Never;
    }
    let need = used + amount - limit;
    if need <= 0 {
        return RetryAfter::After(TimeDelta::zero());
    }
    let (horizon, leave_after): (Timestamp, Option<TimeDelta>) = match period {
        Period::Rolling(length) => (now + *length, Some(*length)),
        Period::Calendar(c) => (c.bounds(now).1, None),
    };
    let mut events: Vec<(Timestamp, i128)> =
        Vec::with_capacity(counted.holds.len() + counted.committed.len());
    for &(created, expires, amount) in &counted.holds {
        let ages = leave_after.map_or(horizon, |l| created + l);
        events.push((expires.min(ages), amount.into()));
    }
    if let Some(length) = leave_after {
        events.extend(
            counted.committed.iter().map(|&(created, amount)| (created + length, i128::from(amount))),
        );
    }
    events.sort();
    // Past the last committed row seen, unseen rows may free capacity earlier than the horizon: stop there
    // only when the list was complete.
    let seen_until = match (counted.complete, counted.committed.last(), leave_after) {
        (false, Some(&(created, _)), Some(length)) => Some(created + length),
        _ => None,
    };
    let mut freed = 0i128;
    for (at, amount) in events {
        if seen_until.is_some_and(|s| at > s) {
            break;
        }
        freed += amount;
        if freed >= need {
            return RetryAfter::After((at - now).max(TimeDelta::zero()));
        }
    }
    // Not found among what was read (the list was cut short), or everything counted now has stopped
    // counting by the horizon: the horizon is the safe answer.
    RetryAfter::After(horizon - now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CalendarUnit, KeyId, Unit};

    fn t(secs: i64) -> Timestamp {
        chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn key() -> AccountKey {
        AccountKey::new(KeyId::parse("k").unwrap(), Unit::parse("usd").unwrap())
    }

    #[test]
    fn rolling_retry_after_waits_for_enough_spend_to_age_out() {
        let day = Period::Rolling(TimeDelta::days(1));
        let counted = Counted {
            holds: vec![],
            committed: vec![(t(-80_000), 30), (t(-50_000), 30), (t(-10), 40)],
            complete: true,
        };
        // used 100 of 100: 30 more fits once the first 30 has aged out, at -80_000 + 86_400.
        assert_eq!(
            retry_after(&day, 100, 100, 30, t(0), &counted),
            RetryAfter::After(TimeDelta::seconds(6_400))
        );
        assert_eq!(
            retry_after(&day, 100, 100, 31, t(0), &counted),
            RetryAfter::After(TimeDelta::seconds(36_400))
        );
        assert_eq!(retry_after(&day, 100, 100, 101, t(0), &counted), RetryAfter::Never);
        assert_eq!(retry_after(&day, 50, 100, 50, t(0), &counted), RetryAfter::After(TimeDelta::zero()));
    }

    #[test]
    fn holds_free_capacity_when_they_expire() {
        let day = Period::Rolling(TimeDelta::days(1));
        let counted =
            Counted { holds: vec![(t(-10), t(890), 60)], committed: vec![(t(-20), 40)], complete: true };
        assert_eq!(
            retry_after(&day, 100, 100, 50, t(0), &counted),
            RetryAfter::After(TimeDelta::seconds(890))
        );
    }

    #[test]
    fn calendar_retry_after_is_the_boundary_unless_a_hold_expires_first() {
        let month = Period::calendar(CalendarUnit::Month, 1, t(0), "UTC", t(0)).unwrap();
        let end = match &month {
            Period::Calendar(c) => c.bounds(t(10)).1,
            Period::Rolling(_) => unreachable!(),
        };
        let none = Counted { complete: true, ..Counted::default() };
        assert_eq!(retry_after(&month, 100, 100, 1, t(10), &none), RetryAfter::After(end - t(10)));
        let hold = Counted { holds: vec![(t(5), t(100), 10)], complete: true, ..Counted::default() };
        assert_eq!(
            retry_after(&month, 100, 100, 10, t(10), &hold),
            RetryAfter::After(TimeDelta::seconds(90))
        );
    }

    #[test]
    fn calendar_totals_restart_at_a_boundary_and_rolling_ones_age() {
        let month = Period::calendar(CalendarUnit::Month, 1, t(0), "UTC", t(0)).unwrap();
        let day = Period::Rolling(TimeDelta::days(1));
        let mut a = Account::new(key());
        let tracked: BTreeSet<Period> = [month, day].into();
        a.advance(t(0), [], &tracked, [(month, Totals::empty(t(0))), (day, Totals::empty(t(-86_400)))]);
        a.adjust(t(0), 10, 0);
        assert_eq!(a.totals[&month].committed, 10);
        assert_eq!(a.totals[&day].committed, 10);
        // 40 days later: the month restarted, the day aged out its 10 (storage reports it).
        let later = t(40 * 86_400);
        a.advance(later, [AgedOut { period: day, committed: 10, held: 0 }], &tracked, []);
        assert_eq!(a.totals[&month].committed, 0);
        assert_eq!(a.totals[&day].committed, 0);
        assert!(a.totals[&month].since > t(0));
        // A period no longer tracked is dropped.
        a.advance(later, [], &[day].into(), []);
        assert!(!a.totals.contains_key(&month));
    }
}
