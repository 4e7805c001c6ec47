//! Limits as data: a named amount over a [`Period`], set on a key or in a plan, and the plans themselves.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{InvalidArgument, Period, Unit, Window};

/// Most limits one key may set of its own, and most limits (per unit) one plan may hold.
pub const MAX_LIMITS: usize = 32;
/// Most keys one reservation may charge.
pub const MAX_KEYS_PER_RESERVATION: usize = 8;
const MAX_NAME_BYTES: usize = 64;

fn check_name(field: &'static str, value: &str) -> Result<(), InvalidArgument> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(InvalidArgument::new(field, format!("must be 1 to {MAX_NAME_BYTES} bytes")));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
        return Err(InvalidArgument::new(
            field,
            format!("{value:?} may hold only ASCII letters, digits, '_', '-' and '.'"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidArgument> {
                let value = value.into();
                check_name($field, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidArgument;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// A limit's name, unique per key (and per plan and unit): `daily`, `monthly-invoice`, `burst.1m`.
    LimitName,
    "name"
);
name_type!(
    /// A plan's name: `free`, `pro`.
    PlanName,
    "plan"
);

impl LimitName {
    /// The limit a round-1 window stands for: a rolling limit named after it.
    pub fn of_window(window: Window) -> Self {
        Self(window.as_str().to_owned())
    }
}

/// One limit as set: on a key (where `amount: None` explicitly lifts a plan's limit of the same name) or in a
/// plan (always an amount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSpec {
    pub name: LimitName,
    pub period: Period,
    /// The most that committed + held spend may reach in the period; `None` is unlimited. For a rate limit:
    /// the requests (or cost) allowed per period.
    pub amount: Option<i64>,
    /// Set for a **rate limit** (see [`super::rate`]): at most this much cost at once; the allowance refills
    /// at `amount` per `period` (GCRA) on rolling periods, and resets at each boundary on calendar ones. A
    /// rate limit counts requests through CheckRate and Envoy's protocol, never spending.
    pub burst: Option<i64>,
}

/// Largest rate-limit burst (and rate amount): keeps the GCRA arithmetic far from overflow.
pub const MAX_RATE: i64 = 1_000_000_000;

/// Longest a rolling rate limit may take to refill its whole burst (`burst × period ÷ amount`, GCRA's
/// tolerance): 100 years, far beyond any real limit. A key's state (its theoretical arrival time) lies at most
/// this far ahead, so it stays a date every tool can store and read.
pub const MAX_RATE_REFILL: chrono::TimeDelta = chrono::TimeDelta::days(36_525);

impl LimitSpec {
    pub fn new(name: LimitName, period: Period, amount: Option<i64>) -> Result<Self, InvalidArgument> {
        if let Some(a) = amount
            && a < 0
        {
            return Err(InvalidArgument::new("amount", format!("must not be negative, got {a}")));
        }
        Ok(Self { name, period, amount, burst: None })
    }

    /// Makes this a rate limit with `burst`: 1 to 1e9, and the amount at most 1e9.
    pub fn with_burst(mut self, burst: i64) -> Result<Self, InvalidArgument> {
        if !(1..=MAX_RATE).contains(&burst) {
            return Err(InvalidArgument::new(
                "burst",
                format!("must be between 1 and {MAX_RATE}, got {burst}"),
            ));
        }
        if let Some(a) = self.amount
            && a > MAX_RATE
        {
            return Err(InvalidArgument::new(
                "amount",
                format!("a rate limit's amount must be at most {MAX_RATE}"),
            ));
        }
        self.burst = Some(burst);
        Ok(self)
    }

    /// Refuses a rolling rate limit that would take longer than [`MAX_RATE_REFILL`] to refill its burst. Not
    /// part of [`LimitSpec::with_burst`]: limits stored before this rule must still load.
    pub fn check_refill(self) -> Result<Self, InvalidArgument> {
        if let (Some(burst), Some(amount), Period::Rolling(length)) = (self.burst, self.amount, self.period)
            && amount > 0
        {
            let length = i128::from(length.num_microseconds().unwrap_or(i64::MAX));
            let refill = i128::from(burst) * length / i128::from(amount);
            let max = i128::from(MAX_RATE_REFILL.num_microseconds().unwrap_or(i64::MAX));
            if refill > max {
                return Err(InvalidArgument::new(
                    "burst",
                    format!(
                        "refilling a burst of {burst} at {amount} per {} takes more than {} days \
                         (burst × period ÷ amount); lower the burst or raise the amount",
                        self.period,
                        MAX_RATE_REFILL.num_days()
                    ),
                ));
            }
        }
        Ok(self)
    }

    pub fn is_rate(&self) -> bool {
        self.burst.is_some()
    }

    /// The round-1 limit of a window: rolling over the window's length.
    pub fn of_window(window: Window, amount: Option<i64>) -> Self {
        Self {
            name: LimitName::of_window(window),
            period: Period::Rolling(window.length()),
            amount,
            burst: None,
        }
    }

    /// As the audit trail records it (`amount: null` is unlimited).
    pub fn audit_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "name": self.name.as_str(), "period": self.period.to_string(), "amount": self.amount
        });
        if let Some(burst) = self.burst {
            json["burst"] = burst.into();
        }
        json
    }
}

/// Where an effective limit comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitSource {
    Key,
    Plan,
}

/// A limit that applies to an account: its own, or its plan's where it has none of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveLimit {
    pub name: LimitName,
    pub period: Period,
    pub amount: i64,
    pub source: LimitSource,
}

/// Own limits override the plan's of the same name (whatever their kind); an own limit without an amount
/// removes it. Sorted by name.
fn merged<'a>(
    own: &'a BTreeMap<LimitName, LimitSpec>,
    plan: &'a [LimitSpec],
) -> impl Iterator<Item = (&'a LimitSpec, LimitSource)> {
    let mut out: BTreeMap<&LimitName, (&LimitSpec, LimitSource)> = BTreeMap::new();
    let tagged =
        plan.iter().map(|l| (l, LimitSource::Plan)).chain(own.values().map(|l| (l, LimitSource::Key)));
    for (spec, source) in tagged {
        match spec.amount {
            Some(_) => {
                out.insert(&spec.name, (spec, source));
            }
            None => {
                out.remove(&spec.name);
            }
        }
    }
    out.into_values()
}

/// The spending limits that apply, merged as [`merged`] does: rate limits are not spending limits.
pub fn effective_limits(own: &BTreeMap<LimitName, LimitSpec>, plan: &[LimitSpec]) -> Vec<EffectiveLimit> {
    merged(own, plan)
        .filter(|(spec, _)| !spec.is_rate())
        .map(|(spec, source)| EffectiveLimit {
            name: spec.name.clone(),
            period: spec.period,
            amount: spec.amount.unwrap_or(i64::MAX),
            source,
        })
        .collect()
}

/// The rate limits that apply (each with an amount and a burst), merged by name as spending limits are.
pub fn effective_rate_limits(
    own: &BTreeMap<LimitName, LimitSpec>,
    plan: &[LimitSpec],
) -> Vec<(LimitSpec, LimitSource)> {
    merged(own, plan)
        .filter(|(spec, _)| spec.is_rate())
        .map(|(spec, source)| (spec.clone(), source))
        .collect()
}

/// A named set of limits per unit. Keys assigned to it get its limits, unless they override them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: PlanName,
    pub limits: BTreeMap<Unit, Vec<LimitSpec>>,
}

impl Plan {
    /// Validates a plan's limits: every one has an amount, names are unique per unit, at most
    /// [`MAX_LIMITS`] per unit.
    pub fn new(name: PlanName, limits: Vec<(Unit, LimitSpec)>) -> Result<Self, InvalidArgument> {
        let mut by_unit: BTreeMap<Unit, Vec<LimitSpec>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (i, (unit, spec)) in limits.into_iter().enumerate() {
            if spec.amount.is_none() {
                return Err(InvalidArgument::new(
                    format!("limits[{i}].amount"),
                    format!(
                        "plan limit {} needs an amount: only a key's own limit may be unlimited",
                        spec.name
                    ),
                ));
            }
            if !seen.insert((unit.clone(), spec.name.clone())) {
                return Err(InvalidArgument::new(
                    format!("limits[{i}].name"),
                    format!("limit {} appears twice for unit {unit}", spec.name),
                ));
            }
            by_unit.entry(unit).or_default().push(spec);
        }
        if let Some((unit, specs)) = by_unit.iter().find(|(_, s)| s.len() > MAX_LIMITS) {
            return Err(InvalidArgument::new(
                "limits",
                format!("at most {MAX_LIMITS} limits per unit, got {} for {unit}", specs.len()),
            ));
        }
        for specs in by_unit.values_mut() {
            specs.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(Self { name, limits: by_unit })
    }

    /// As the audit trail records it: the limits by unit.
    pub fn audit_json(&self) -> serde_json::Value {
        let limits: serde_json::Map<String, serde_json::Value> = self
            .limits
            .iter()
            .map(|(unit, specs)| (unit.to_string(), specs.iter().map(LimitSpec::audit_json).collect()))
            .collect();
        serde_json::json!({ "name": self.name.as_str(), "limits": limits })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn spec(name: &str, days: i64, amount: Option<i64>) -> LimitSpec {
        LimitSpec::new(
            LimitName::parse(name).unwrap(),
            Period::rolling(TimeDelta::days(days)).unwrap(),
            amount,
        )
        .unwrap()
    }

    #[test]
    fn a_rate_limit_refills_its_burst_within_a_hundred_years() {
        // 10 a year with a burst of 1,000: a hundred years.
        assert!(spec("r", 365, Some(10)).with_burst(1_000).unwrap().check_refill().is_ok());
        let e = spec("r", 366, Some(10)).with_burst(1_000).unwrap().check_refill().unwrap_err();
        assert!(e.reason.contains("36525 days"), "{}", e.reason);
        assert!(spec("r", 400, Some(1)).with_burst(MAX_RATE).unwrap().check_refill().is_err());
        // A limit of 0 never refills: nothing to bound.
        assert!(spec("r", 400, Some(0)).with_burst(MAX_RATE).unwrap().check_refill().is_ok());
    }

    #[test]
    fn own_limits_override_the_plan_and_none_lifts_it() {
        let plan =
            vec![spec("daily", 1, Some(100)), spec("monthly", 30, Some(1000)), spec("weekly", 7, Some(500))];
        let own: BTreeMap<_, _> =
            [spec("daily", 1, Some(50)), spec("weekly", 7, None), spec("extra", 2, Some(9))]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect();
        let eff = effective_limits(&own, &plan);
        let got: Vec<(&str, i64, LimitSource)> =
            eff.iter().map(|l| (l.name.as_str(), l.amount, l.source)).collect();
        assert_eq!(
            got,
            vec![
                ("daily", 50, LimitSource::Key),
                ("extra", 9, LimitSource::Key),
                ("monthly", 1000, LimitSource::Plan)
            ]
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(LimitName::parse("burst.1m").is_ok());
        assert_eq!(LimitName::parse("").unwrap_err().field, "name");
        assert!(LimitName::parse("has space").is_err());
        assert!(LimitName::parse("x".repeat(65)).is_err());
        assert_eq!(PlanName::parse("pro plan").unwrap_err().field, "plan");
        assert!(
            LimitSpec::new(LimitName::parse("a").unwrap(), Period::Rolling(TimeDelta::days(1)), Some(-1))
                .is_err()
        );
    }

    #[test]
    fn plans_reject_duplicates_and_unlimited_entries() {
        let usd = Unit::parse("usd").unwrap();
        let name = PlanName::parse("free").unwrap();
        let dup = vec![(usd.clone(), spec("daily", 1, Some(1))), (usd.clone(), spec("daily", 2, Some(2)))];
        assert_eq!(Plan::new(name.clone(), dup).unwrap_err().field, "limits[1].name");
        let other_unit = vec![
            (usd.clone(), spec("daily", 1, Some(1))),
            (Unit::parse("eur").unwrap(), spec("daily", 1, Some(1))),
        ];
        assert!(Plan::new(name.clone(), other_unit).is_ok());
        assert_eq!(
            Plan::new(name.clone(), vec![(usd.clone(), spec("d", 1, None))]).unwrap_err().field,
            "limits[0].amount"
        );
        let many = (0..33).map(|i| (usd.clone(), spec(&format!("l{i}"), 1, Some(1)))).collect();
        assert_eq!(Plan::new(name, many).unwrap_err().field, "limits");
    }
}
