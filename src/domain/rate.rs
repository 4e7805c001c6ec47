//! Request rate limits: GCRA on rolling periods, fixed windows on calendar periods. Pure arithmetic over one
//! timestamp (and, for calendar periods, one counter) of state per key and limit.
//!
//! GCRA (the generic cell rate algorithm, as in the `governor` crate and redis-cell), in whole microseconds:
//! a limit of `amount` per `period` with `burst` spaces requests by the emission interval `T = period /
//! amount` and tolerates a debt of `τ = T × burst`. The state is the theoretical arrival time `tat`. A request
//! of cost `c` at `now` would move it to `tat' = max(tat, now) + c × T`; it is admitted iff `tat' − now ≤ τ`.
//! That is exactly a token bucket of `burst` tokens refilled at `amount` per `period` — without a refill
//! job and with one timestamp of state. Rounding always favours the limit: `c × T` rounds up, `τ` down.

use std::collections::{HashMap, HashSet};

use chrono::TimeDelta;

use super::{AccountKey, LimitName, LimitSource, LimitSpec, Period, Timestamp};

/// The state of one rate limit of one account, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    /// Rolling: the theoretical arrival time (whole µs). Calendar: the start of the period `used` counts.
    pub tat: Timestamp,
    /// Rolling: the tat's remainder below a µs, in 1/amount µs. Calendar: what the period has counted.
    pub used: i64,
}

/// One limit's answer to one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// How much more cost would be admitted right now (after this request, if admitted).
    pub remaining: i64,
    /// When this same request would first be admitted, if nothing else happened; `None` when admitted, or
    /// when it never can be (its cost exceeds the burst, or the limit is 0).
    pub retry_after: Option<TimeDelta>,
    /// When the limit is back to its full allowance if nothing else happens (calendar: the period's end).
    pub reset_after: TimeDelta,
    /// The cost exceeds what the limit could ever admit at once.
    pub exceeds_burst: bool,
    /// The state after this request (unchanged when refused or of cost 0).
    pub state: Option<RateState>,
}

fn micros(d: TimeDelta) -> i128 {
    i128::from(d.num_microseconds().unwrap_or(i64::MAX))
}

fn delta(us: i128) -> TimeDelta {
    TimeDelta::microseconds(i64::try_from(us.max(0)).unwrap_or(i64::MAX))
}

fn ceil_div(a: i128, b: i128) -> i128 {
    (a + b - 1).div_euclid(b)
}

/// The decision of `limit` (a rate limit: `amount` and `burst` set) for a request of `cost` at `now`.
pub fn decide(limit: &LimitSpec, state: Option<RateState>, now: Timestamp, cost: i64) -> RateDecision {
    let amount = limit.amount.unwrap_or(0);
    let burst = limit.burst.unwrap_or(1);
    match limit.period {
        Period::Rolling(length) => gcra(micros(length), amount, burst, state, now, cost),
        Period::Calendar(calendar) => window(&calendar, amount, burst, state, now, cost),
    }
}

fn gcra(
    period: i128,
    amount: i64,
    burst: i64,
    state: Option<RateState>,
    now: Timestamp,
    cost: i64,
) -> RateDecision {
    if amount == 0 {
        // A limit of 0 admits nothing, ever.
        return RateDecision {
            allowed: cost == 0,
            remaining: 0,
            retry_after: None,
            reset_after: TimeDelta::zero(),
            exceeds_burst: cost > 0,
            state: None,
        };
    }
    // Exact arithmetic in ticks of 1/amount µs: the emission interval is then `period` ticks, the tolerance
    // `burst × period`, and the stored state is the tat in µs plus its remainder in ticks (`used`), so
    // nothing rounds and a burst of exactly `burst` is admitted whatever the period and amount.
    let (a, b, c) = (i128::from(amount), i128::from(burst), i128::from(cost));
    let now_t = i128::from(now.timestamp_micros()) * a;
    let tat_t = state
        .map_or(now_t, |s| i128::from(s.tat.timestamp_micros()) * a + i128::from(s.used).clamp(0, a - 1));
    let base = tat_t.max(now_t);
    let tau = b * period;
    let new_tat = base + c * period;
    let remaining = |tat: i128| (tau - (tat - now_t)).max(0) / period;
    let micros_of = |ticks: i128| delta(ceil_div(ticks.max(0), a));
    if new_tat - now_t <= tau {
        RateDecision {
            allowed: true,
            remaining: i64::try_from(remaining(new_tat)).unwrap_or(i64::MAX),
            retry_after: None,
            reset_after: micros_of(new_tat - now_t),
            exceeds_burst: false,
            state: (cost > 0).then(|| RateState {
                tat: instant(new_tat.div_euclid(a)),
                used: i64::try_from(new_tat.rem_euclid(a)).unwrap_or(0),
            }),
        }
    } else {
        let exceeds_burst = c > b;
        RateDecision {
            allowed: false,
            remaining: i64::try_from(remaining(base)).unwrap_or(i64::MAX),
            retry_after: (!exceeds_burst).then(|| micros_of(new_tat - now_t - tau)),
            reset_after: micros_of(base - now_t),
            exceeds_burst,
            state: None,
        }
    }
}

/// The latest theoretical arrival time stored: the end of year 9999, a date every tool reads. Limits refill
/// in at most [`super::limit::MAX_RATE_REFILL`], so only a state written under an older, looser rule could
/// reach it.
const LATEST_TAT_MICROS: i64 = 253_402_300_799_999_999;

fn instant(us: i128) -> Timestamp {
    let us = i64::try_from(us).unwrap_or(i64::MAX).min(LATEST_TAT_MICROS);
    Timestamp::from_timestamp_micros(us).unwrap_or(Timestamp::MAX_UTC)
}

fn window(
    period: &super::Calendar,
    amount: i64,
    burst: i64,
    state: Option<RateState>,
    now: Timestamp,
    cost: i64,
) -> RateDecision {
    // Time never runs backwards for a window: a state written for a later period (by a batch that read a
    // later clock) is decided in that period, never overwritten as if its period had not begun.
    let now = state.map_or(now, |s| now.max(s.tat));
    let (start, end) = period.bounds(now);
    let used = state.filter(|s| s.tat == start).map_or(0, |s| s.used);
    let reset_after = end - now;
    // The burst caps one request's cost, as for rolling periods; the period's amount caps their sum.
    if cost > amount || cost > burst {
        return RateDecision {
            allowed: false,
            remaining: (amount - used).max(0),
            retry_after: None,
            reset_after,
            exceeds_burst: true,
            state: None,
        };
    }
    if used.saturating_add(cost) <= amount {
        RateDecision {
            allowed: true,
            remaining: amount - used - cost,
            retry_after: None,
            reset_after,
            exceeds_burst: false,
            state: (cost > 0).then_some(RateState { tat: start, used: used + cost }),
        }
    } else {
        RateDecision {
            allowed: false,
            remaining: (amount - used).max(0),
            retry_after: Some(reset_after),
            reset_after,
            exceeds_burst: false,
            state: None,
        }
    }
}

/// Which limits one item of a check counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every rate limit of the account, or those named.
    All { names: Option<Vec<LimitName>> },
    /// The account's limit of this name; else `fallback` (a rule's default). `replace` (Envoy's
    /// per-descriptor override) is used instead of either.
    Named { name: LimitName, fallback: Option<LimitSpec>, replace: Option<LimitSpec> },
}

/// One account's part of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateItem {
    pub account: AccountKey,
    pub selection: Selection,
    /// 0 checks without counting.
    pub cost: i64,
    /// Counted and reported, never denying.
    pub shadow: bool,
}

/// One limit's part of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitDecision {
    pub limit: LimitSpec,
    /// `None`: from the request itself (an override) or a rule's default.
    pub source: Option<LimitSource>,
    pub decision: RateDecision,
}

/// The answer to a check: admitted only if every limit of every non-shadow item admits it; then every
/// limit counts it, else none does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateOutcome {
    pub allowed: bool,
    /// Per item, in order: its limits' decisions.
    pub items: Vec<Vec<LimitDecision>>,
}

impl RateOutcome {
    /// When the same check would first be admitted: the longest wait of the denying limits (`None` if one
    /// never can admit it, or if allowed).
    pub fn retry_after(&self, shadow: &[bool]) -> Option<TimeDelta> {
        if self.allowed {
            return None;
        }
        let mut longest = TimeDelta::zero();
        for (decisions, shadow) in self.items.iter().zip(shadow) {
            for d in decisions.iter().filter(|d| !d.decision.allowed && !shadow) {
                longest = longest.max(d.decision.retry_after?);
            }
        }
        Some(longest)
    }
}

/// The rate limits and states of a batch's accounts, loaded under the states' row locks, at the database's
/// clock. Checks run in order against it; changed states are written back by storage.
#[derive(Debug, Default)]
pub struct RateBook {
    pub now: Timestamp,
    pub limits: HashMap<AccountKey, Vec<(LimitSpec, LimitSource)>>,
    pub states: HashMap<(AccountKey, LimitName), RateState>,
    /// The states that existed when loaded (the others are created by this batch).
    pub loaded: HashSet<(AccountKey, LimitName)>,
    /// States changed by this batch, to be written.
    pub changed: HashMap<(AccountKey, LimitName), RateState>,
}

impl RateBook {
    fn limits_of(&self, item: &RateItem) -> Vec<(LimitSpec, Option<LimitSource>)> {
        let own = self.limits.get(&item.account).map(Vec::as_slice).unwrap_or_default();
        match &item.selection {
            Selection::All { names } => own
                .iter()
                .filter(|(l, _)| names.as_ref().is_none_or(|n| n.contains(&l.name)))
                .map(|(l, s)| (l.clone(), Some(*s)))
                .collect(),
            Selection::Named { replace: Some(limit), .. } => vec![(limit.clone(), None)],
            Selection::Named { name, fallback, replace: None } => {
                match own.iter().find(|(l, _)| &l.name == name) {
                    Some((l, s)) => vec![(l.clone(), Some(*s))],
                    None => fallback.iter().map(|l| (l.clone(), None)).collect(),
                }
            }
        }
    }

    /// Decides a check and, if admitted, counts it. Limits met twice in one check (two items on the same
    /// key and limit) count the second time on top of the first.
    pub fn check(&mut self, items: &[RateItem]) -> RateOutcome {
        let mut scratch: HashMap<(AccountKey, LimitName), RateState> = HashMap::new();
        let mut allowed = true;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let mut decisions = Vec::new();
            for (limit, source) in self.limits_of(item) {
                let key = (item.account.clone(), limit.name.clone());
                let state = scratch.get(&key).or_else(|| self.states.get(&key)).copied();
                let decision = decide(&limit, state, self.now, item.cost);
                if let Some(next) = decision.state {
                    scratch.insert(key, next);
                }
                allowed &= decision.allowed || item.shadow;
                decisions.push(LimitDecision { limit, source, decision });
            }
            out.push(decisions);
        }
        if allowed {
            for (key, state) in scratch {
                self.states.insert(key.clone(), state);
                self.changed.insert(key, state);
            }
        }
        RateOutcome { allowed, items: out }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::{CalendarUnit, LimitName};

    fn rate(period_us: i64, amount: i64, burst: i64) -> LimitSpec {
        LimitSpec::new(
            LimitName::parse("r").unwrap(),
            Period::Rolling(TimeDelta::microseconds(period_us)),
            Some(amount),
        )
        .unwrap()
        .with_burst(burst)
        .unwrap()
    }

    fn at(us: i64) -> Timestamp {
        Timestamp::from_timestamp_micros(1_900_000_000_000_000 + us).unwrap()
    }

    #[test]
    fn ten_per_second_with_a_burst_of_ten() {
        let limit = rate(1_000_000, 10, 10);
        let mut state = None;
        for i in 0..10 {
            let d = decide(&limit, state, at(0), 1);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 9 - i);
            state = d.state;
        }
        let denied = decide(&limit, state, at(0), 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Some(TimeDelta::milliseconds(100)));
        assert_eq!(denied.reset_after, TimeDelta::seconds(1));
        assert!(decide(&limit, state, at(100_000), 1).allowed, "one token back after 100 ms");
        let too_big = decide(&limit, None, at(0), 11);
        assert!(!too_big.allowed && too_big.exceeds_burst && too_big.retry_after.is_none());
        let peek = decide(&limit, state, at(0), 0);
        assert!(peek.allowed && peek.state.is_none() && peek.remaining == 0);
    }

    /// A calendar-month rate limit from the epoch, in UTC.
    fn monthly(amount: i64, burst: i64) -> LimitSpec {
        let month =
            Period::calendar(CalendarUnit::Month, 1, Timestamp::UNIX_EPOCH, "UTC", Timestamp::UNIX_EPOCH)
                .unwrap();
        LimitSpec::new(LimitName::parse("m").unwrap(), month, Some(amount))
            .unwrap()
            .with_burst(burst)
            .unwrap()
    }

    #[test]
    fn calendar_periods_count_in_fixed_windows_that_reset_at_the_boundary() {
        let limit = monthly(2, 2);
        let jan31 = "2027-01-31T23:59:59Z".parse().unwrap();
        let a = decide(&limit, None, jan31, 2);
        assert!(a.allowed && a.remaining == 0);
        let b = decide(&limit, a.state, jan31, 1);
        assert_eq!((b.allowed, b.retry_after), (false, Some(TimeDelta::seconds(1))));
        let feb = decide(&limit, a.state, "2027-02-01T00:00:00Z".parse().unwrap(), 1);
        assert!(feb.allowed && feb.remaining == 1, "February is a new period");
    }

    #[test]
    fn a_calendar_limit_refuses_a_cost_above_its_burst() {
        let limit = monthly(10, 3);
        let now = "2027-01-15T00:00:00Z".parse().unwrap();
        let big = decide(&limit, None, now, 4);
        assert!(!big.allowed && big.exceeds_burst && big.retry_after.is_none(), "{big:?}");
        let fits = decide(&limit, None, now, 3);
        assert!(fits.allowed && fits.remaining == 7);
    }

    #[test]
    fn a_state_never_lies_past_year_9999() {
        // Refused when set now (check_refill), but a limit stored before that rule still loads: 1 per 400
        // days with a burst of a billion refills in 400 billion days.
        let limit = rate(400 * 86_400_000_000, 1, 1_000_000_000);
        assert!(limit.clone().check_refill().is_err());
        let d = decide(&limit, None, at(0), 1_000_000_000);
        let tat = d.state.unwrap().tat;
        assert_eq!(tat.timestamp_micros(), LATEST_TAT_MICROS);
        assert_eq!(tat.to_rfc3339(), "9999-12-31T23:59:59.999999+00:00");
        // A request after it is decided from there (the cap forgave the debt past year 9999, which such a
        // limit would take longer than that to refill anyway), and its state stays readable.
        let next = decide(&limit, d.state, at(1), 1);
        assert!(next.state.is_none_or(|s| s.tat.timestamp_micros() <= LATEST_TAT_MICROS));
    }

    /// The obviously-correct model: a token bucket in exact rational arithmetic.
    struct Bucket {
        tokens_num: i128, // tokens × period
        last: i128,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn gcra_admits_exactly_what_a_token_bucket_admits(
            amount in 1i64..50,
            period in 1i64..200_000,
            burst in 1i64..20,
            requests in proptest::collection::vec((0i64..20_000, 0i64..25), 1..80),
        ) {
            let limit = rate(period, amount, burst);
            let (p, a, b) = (i128::from(period), i128::from(amount), i128::from(burst));
            let mut bucket = Bucket { tokens_num: b * p, last: 0 };
            let mut state = None;
            let mut now = 0i64;
            for (gap, cost) in requests {
                now += gap;
                let t = i128::from(now);
                bucket.tokens_num = (bucket.tokens_num + (t - bucket.last) * a).min(b * p);
                bucket.last = t;
                let fits = i128::from(cost) * p <= bucket.tokens_num;
                let d = decide(&limit, state, at(now), cost);
                prop_assert_eq!(d.allowed, fits, "at {} cost {}", now, cost);
                if fits {
                    bucket.tokens_num -= i128::from(cost) * p;
                    if cost > 0 { state = d.state; }
                    prop_assert_eq!(i128::from(d.remaining), bucket.tokens_num / p);
                } else if let Some(retry) = d.retry_after {
                    // Waiting exactly retry_after admits it; a microsecond less does not.
                    let wait = retry.num_microseconds().unwrap();
                    prop_assert!(decide(&limit, state, at(now + wait), cost).allowed);
                    prop_assert!(wait == 0 || !decide(&limit, state, at(now + wait - 1), cost).allowed);
                } else {
                    prop_assert!(i128::from(cost) > b, "only a cost above the burst never fits");
                }
            }
        }
    }
}
