//! The period over which a limit bounds committed + held spend: rolling (the last N seconds) or calendar
//! (N days, weeks, months or years counted from an anchor in an IANA time zone, resetting at each boundary).
//!
//! Calendar boundaries are computed from the anchor, never accumulated step by step and never by a job: the
//! k-th boundary is the anchor's local date and time moved by k × N units in the zone, so a monthly quota
//! anchored on the 31st resets on the 28th/29th/30th of shorter months and on the 31st again after them, and a
//! boundary at local midnight stays at local midnight across DST changes.

use std::fmt;
use std::str::FromStr;

use chrono::{
    Datelike, Days, DurationRound, LocalResult, Months, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc,
};
use chrono_tz::Tz;

use super::{InvalidArgument, Timestamp};

/// Longest period of any kind: a rolling length, or what N calendar units may span.
pub const MAX_PERIOD_DAYS: i64 = 400;
/// How far from the current time a calendar anchor may lie.
pub const MAX_ANCHOR_DISTANCE: TimeDelta = TimeDelta::days(36_525);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CalendarUnit {
    Day,
    Week,
    Month,
    Year,
}

impl CalendarUnit {
    pub const ALL: [CalendarUnit; 4] =
        [CalendarUnit::Day, CalendarUnit::Week, CalendarUnit::Month, CalendarUnit::Year];

    pub fn as_str(self) -> &'static str {
        match self {
            CalendarUnit::Day => "day",
            CalendarUnit::Week => "week",
            CalendarUnit::Month => "month",
            CalendarUnit::Year => "year",
        }
    }

    /// Most units of this kind in one period, so that no period spans more than [`MAX_PERIOD_DAYS`].
    pub fn max_count(self) -> u32 {
        match self {
            CalendarUnit::Day => 400,
            CalendarUnit::Week => 57,
            CalendarUnit::Month => 13,
            CalendarUnit::Year => 1,
        }
    }

    /// The average length of one unit, used only to guess which period an instant falls in.
    fn average(self) -> TimeDelta {
        match self {
            CalendarUnit::Day => TimeDelta::days(1),
            CalendarUnit::Week => TimeDelta::days(7),
            // 365.2425 / 12 days and 365.2425 days.
            CalendarUnit::Month => TimeDelta::seconds(2_629_746),
            CalendarUnit::Year => TimeDelta::seconds(31_556_952),
        }
    }
}

impl FromStr for CalendarUnit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_suffix('s').unwrap_or(&s);
        CalendarUnit::ALL
            .into_iter()
            .find(|u| u.as_str() == s)
            .ok_or_else(|| format!("unknown calendar unit {s:?}: expected day, week, month or year"))
    }
}

/// A calendar period: `count` × `unit` from `anchor`, in `zone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Calendar {
    pub unit: CalendarUnit,
    pub count: u32,
    pub anchor: Timestamp,
    pub zone: Tz,
}

/// Where a limit counts spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A spend counts while `now - created_at < length`. Whole seconds, 1 s to 400 days.
    Rolling(TimeDelta),
    /// A spend counts while it was created in the calendar period that contains `now`.
    Calendar(Calendar),
}

impl Period {
    pub fn rolling(length: TimeDelta) -> Result<Self, InvalidArgument> {
        let field = "period.rolling";
        if length.subsec_nanos() != 0 {
            return Err(InvalidArgument::new(field, "must be a whole number of seconds"));
        }
        if length < TimeDelta::seconds(1) || length > TimeDelta::days(MAX_PERIOD_DAYS) {
            return Err(InvalidArgument::new(
                field,
                format!(
                    "must be between 1 second and {MAX_PERIOD_DAYS} days, got {}",
                    span_text(length.abs().num_seconds())
                ),
            ));
        }
        Ok(Period::Rolling(length))
    }

    /// A calendar period, validated against `now`: the anchor lies within ±100 years of it.
    pub fn calendar(
        unit: CalendarUnit,
        count: u32,
        anchor: Timestamp,
        zone: &str,
        now: Timestamp,
    ) -> Result<Self, InvalidArgument> {
        if count == 0 || count > unit.max_count() {
            return Err(InvalidArgument::new(
                "period.calendar.count",
                match unit.max_count() {
                    1 => format!(
                        "must be 1 for {}s (a period spans at most {MAX_PERIOD_DAYS} days), got {count}",
                        unit.as_str()
                    ),
                    max => format!(
                        "must be 1 to {max} for {}s (a period spans at most {MAX_PERIOD_DAYS} days), got {count}",
                        unit.as_str()
                    ),
                },
            ));
        }
        let zone: Tz = zone.parse().map_err(|_| {
            InvalidArgument::new("period.calendar.time_zone", format!("unknown IANA time zone {zone:?}"))
        })?;
        // Postgres and the canonical text keep microseconds: finer digits would not survive a reload.
        let anchor = anchor.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(anchor);
        if (anchor - now).abs() > MAX_ANCHOR_DISTANCE {
            return Err(InvalidArgument::new(
                "period.calendar.anchor",
                format!("must be within 100 years of now, got {}", anchor.to_rfc3339()),
            ));
        }
        Ok(Period::Calendar(Calendar { unit, count, anchor, zone }))
    }

    /// The rolling window length, or `None` for a calendar period.
    pub fn rolling_length(&self) -> Option<TimeDelta> {
        match self {
            Period::Rolling(length) => Some(*length),
            Period::Calendar(_) => None,
        }
    }

    /// Where counting starts at `now`: a spend created after this instant (rolling) or at or after it
    /// (calendar: the current period's start) counts.
    pub fn start_at(&self, now: Timestamp) -> Timestamp {
        match self {
            Period::Rolling(length) => now - *length,
            Period::Calendar(c) => c.bounds(now).0,
        }
    }

    /// The most time one period spans: how far back from `now` a spend it counts can have been created
    /// (a calendar period's units at their longest, plus an hour for a DST change). For retention's floor.
    pub fn longest_span(&self) -> TimeDelta {
        match self {
            Period::Rolling(length) => *length,
            Period::Calendar(c) => {
                let unit = match c.unit {
                    CalendarUnit::Day => TimeDelta::days(1),
                    CalendarUnit::Week => TimeDelta::days(7),
                    CalendarUnit::Month => TimeDelta::days(31),
                    CalendarUnit::Year => TimeDelta::days(366),
                };
                unit * c.count as i32 + TimeDelta::hours(1)
            }
        }
    }

    /// The earliest creation time the period counts at `now`, inclusive (for range queries).
    pub fn counts_from(&self, now: Timestamp) -> Timestamp {
        match self {
            Period::Rolling(_) => self.start_at(now) + TimeDelta::microseconds(1),
            Period::Calendar(_) => self.start_at(now),
        }
    }
}

impl Calendar {
    /// The `k`-th boundary (0 is the anchor; negative ones lie before it).
    pub fn boundary(&self, k: i64) -> Timestamp {
        if k == 0 {
            // Exactly the anchor, even when it names the second of two instants with the same local time.
            return self.anchor;
        }
        let local = self.anchor.with_timezone(&self.zone).naive_local();
        let steps = k * i64::from(self.count);
        let date = match self.unit {
            CalendarUnit::Day => shift_days(local.date(), steps),
            CalendarUnit::Week => shift_days(local.date(), steps * 7),
            CalendarUnit::Month => shift_months(local.date(), steps),
            CalendarUnit::Year => shift_months(local.date(), steps * 12),
        };
        localize(self.zone, date.and_time(local.time()))
    }

    /// The period `[start, end)` that contains `at`.
    pub fn bounds(&self, at: Timestamp) -> (Timestamp, Timestamp) {
        let step = self.unit.average() * self.count as i32;
        let mut k = (at - self.anchor).num_seconds().div_euclid(step.num_seconds());
        // The guess is off by at most one or two periods (DST, month lengths); walk to the right one.
        while self.boundary(k) > at {
            k -= 1;
        }
        while self.boundary(k + 1) <= at {
            k += 1;
        }
        (self.boundary(k), self.boundary(k + 1))
    }
}

/// The first instant of the UTC month of `at`, moved `months` months on: the bounds of the monthly history
/// partitions.
pub fn utc_month_start(at: Timestamp, months: u32) -> Timestamp {
    let first = at.date_naive().with_day0(0).expect("day 1 exists");
    first.checked_add_months(Months::new(months)).unwrap_or(first).and_time(chrono::NaiveTime::MIN).and_utc()
}

fn shift_days(date: NaiveDate, days: i64) -> NaiveDate {
    let shifted = if days >= 0 {
        date.checked_add_days(Days::new(days.unsigned_abs()))
    } else {
        date.checked_sub_days(Days::new(days.unsigned_abs()))
    };
    // Anchors lie within 100 years of a clock reading and periods span at most 400 days: far inside chrono's
    // ±262,000-year range.
    shifted.expect("calendar boundaries stay within chrono's date range")
}

/// Months added with the day of month clamped to the target month's length (Jan 31 + 1 month = Feb 28/29).
fn shift_months(date: NaiveDate, months: i64) -> NaiveDate {
    let magnitude = u32::try_from(months.unsigned_abs()).expect("calendar boundaries stay within range");
    let shifted = if months >= 0 {
        date.checked_add_months(Months::new(magnitude))
    } else {
        date.checked_sub_months(Months::new(magnitude))
    };
    shifted.expect("calendar boundaries stay within chrono's date range")
}

/// A local date and time in `zone` as an instant. An ambiguous time (DST ends) is its earlier instant; a time
/// that does not exist (DST starts) moves forward by the gap, as 02:30 becomes 03:30.
fn localize(zone: Tz, local: NaiveDateTime) -> Timestamp {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        LocalResult::None => {
            // The offset in force just before the gap: read it a day earlier, where the wall clock is valid.
            let before = zone.offset_from_utc_datetime(&(local - TimeDelta::days(1)));
            let offset = chrono::Offset::fix(&before);
            let utc = local - TimeDelta::seconds(i64::from(offset.local_minus_utc()));
            Utc.from_utc_datetime(&utc)
        }
    }
}

/// The canonical text of a period, as stored: `rolling 86400s`, or
/// `calendar 1 month from 2026-01-31T00:00:00.000000Z in Europe/Paris`. It identifies the period: two
/// limits with the same text share their running totals.
impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Period::Rolling(length) => write!(f, "rolling {}s", length.num_seconds()),
            Period::Calendar(c) => write!(
                f,
                "calendar {} {} from {} in {}",
                c.count,
                c.unit.as_str(),
                c.anchor.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
                c.zone.name()
            ),
        }
    }
}

impl FromStr for Period {
    type Err = String;

    /// Parses the canonical text (not validated against a clock: stored periods were validated when set).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a period: {s:?}");
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["rolling", secs] => {
                let secs: i64 = secs.strip_suffix('s').ok_or_else(bad)?.parse().map_err(|_| bad())?;
                Period::rolling(TimeDelta::try_seconds(secs).ok_or_else(bad)?).map_err(|e| e.to_string())
            }
            ["calendar", count, unit, "from", anchor, "in", zone] => {
                let unit: CalendarUnit = unit.parse()?;
                let count: u32 = count.parse().map_err(|_| bad())?;
                let anchor = chrono::DateTime::parse_from_rfc3339(anchor).map_err(|_| bad())?.to_utc();
                let zone: Tz = zone.parse().map_err(|_| bad())?;
                if count == 0 || count > unit.max_count() {
                    return Err(bad());
                }
                Ok(Period::Calendar(Calendar { unit, count, anchor, zone }))
            }
            _ => Err(bad()),
        }
    }
}

impl PartialOrd for Period {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Ordered by canonical text: deterministic, and the same order in every replica.
impl Ord for Period {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

/// A span of whole seconds as `1d 2h 3m 4s` (zero parts left out; `0s` for none): days at most, never months
/// or years, whose lengths vary. humantime reads it back.
pub fn span_text(seconds: i64) -> String {
    if seconds <= 0 {
        return "0s".to_owned();
    }
    let parts = [
        (seconds / 86_400, "d"),
        (seconds % 86_400 / 3600, "h"),
        (seconds % 3600 / 60, "m"),
        (seconds % 60, "s"),
    ];
    parts.iter().filter(|(n, _)| *n > 0).map(|(n, u)| format!("{n}{u}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn spans_read_in_days_never_months_or_years() {
        assert_eq!(span_text(0), "0s");
        assert_eq!(span_text(500 * 86_400), "500d");
        assert_eq!(span_text(86_400 + 2 * 3600 + 3 * 60 + 4), "1d 2h 3m 4s");
        let e = Period::rolling(TimeDelta::days(500)).unwrap_err();
        assert!(e.reason.ends_with("got 500d"), "{}", e.reason);
    }

    #[test]
    fn utc_month_starts_cross_the_year() {
        let mid = at("2026-12-31T23:59:59.999999Z");
        assert_eq!(utc_month_start(mid, 0), at("2026-12-01T00:00:00Z"));
        assert_eq!(utc_month_start(mid, 1), at("2027-01-01T00:00:00Z"));
        assert_eq!(utc_month_start(at("2027-01-31T12:00:00+05:00"), 2), at("2027-03-01T00:00:00Z"));
    }

    fn cal(unit: CalendarUnit, count: u32, anchor: &str, zone: &str) -> Calendar {
        match Period::calendar(unit, count, at(anchor), zone, at(anchor)).unwrap() {
            Period::Calendar(c) => c,
            Period::Rolling(_) => unreachable!(),
        }
    }

    #[test]
    fn monthly_from_the_31st_resets_on_the_last_day_of_shorter_months() {
        let c = cal(CalendarUnit::Month, 1, "2026-01-31T00:00:00Z", "UTC");
        assert_eq!(c.boundary(1), at("2026-02-28T00:00:00Z"));
        assert_eq!(c.boundary(2), at("2026-03-31T00:00:00Z"));
        assert_eq!(c.boundary(3), at("2026-04-30T00:00:00Z"));
        assert_eq!(c.boundary(-1), at("2025-12-31T00:00:00Z"));
        // 2028 is a leap year.
        assert_eq!(c.boundary(25), at("2028-02-29T00:00:00Z"));
        assert_eq!(
            c.bounds(at("2026-02-28T00:00:00Z")),
            (at("2026-02-28T00:00:00Z"), at("2026-03-31T00:00:00Z"))
        );
        assert_eq!(
            c.bounds(at("2026-02-27T23:59:59.999999Z")),
            (at("2026-01-31T00:00:00Z"), at("2026-02-28T00:00:00Z"))
        );
    }

    #[test]
    fn yearly_from_a_leap_day() {
        let c = cal(CalendarUnit::Year, 1, "2024-02-29T12:00:00Z", "UTC");
        assert_eq!(c.boundary(1), at("2025-02-28T12:00:00Z"));
        assert_eq!(c.boundary(4), at("2028-02-29T12:00:00Z"));
    }

    #[test]
    fn daily_boundaries_stay_at_local_midnight_across_dst() {
        // Europe/Paris: CET (+1) until 2026-03-29 02:00, then CEST (+2).
        let c = cal(CalendarUnit::Day, 1, "2026-03-27T23:00:00Z", "Europe/Paris");
        assert_eq!(c.boundary(1), at("2026-03-28T23:00:00Z"));
        assert_eq!(c.boundary(2), at("2026-03-29T22:00:00Z"), "the 23-hour day");
        let (start, end) = c.bounds(at("2026-03-29T12:00:00Z"));
        assert_eq!((start, end), (at("2026-03-28T23:00:00Z"), at("2026-03-29T22:00:00Z")));
        assert_eq!(end - start, TimeDelta::hours(23));
    }

    #[test]
    fn a_boundary_in_a_dst_gap_moves_forward_and_an_ambiguous_one_takes_the_earlier_instant() {
        // America/New_York springs forward 2026-03-08 02:00 -> 03:00 and falls back 2026-11-01 02:00 -> 01:00.
        let gap = cal(CalendarUnit::Day, 1, "2026-03-07T07:30:00Z", "America/New_York"); // 02:30 EST
        assert_eq!(gap.boundary(1), at("2026-03-08T07:30:00Z"), "02:30 does not exist: 03:30 EDT");
        let fold = cal(CalendarUnit::Day, 1, "2026-10-31T05:30:00Z", "America/New_York"); // 01:30 EDT
        assert_eq!(fold.boundary(1), at("2026-11-01T05:30:00Z"), "01:30 happens twice: the first, EDT");
    }

    #[test]
    fn weeks_and_multiples() {
        let c = cal(CalendarUnit::Week, 2, "2026-01-05T00:00:00Z", "UTC");
        assert_eq!(c.boundary(1), at("2026-01-19T00:00:00Z"));
        let q = cal(CalendarUnit::Month, 3, "2026-01-01T00:00:00Z", "UTC");
        assert_eq!(
            q.bounds(at("2026-05-15T00:00:00Z")),
            (at("2026-04-01T00:00:00Z"), at("2026-07-01T00:00:00Z"))
        );
    }

    #[test]
    fn bounds_contain_the_instant_far_from_the_anchor() {
        let c = cal(CalendarUnit::Month, 1, "2026-01-31T10:00:00Z", "Australia/Sydney");
        for days in [-36_000i64, -400, -1, 0, 1, 59, 400, 36_000] {
            let t = at("2026-01-31T10:00:00Z") + TimeDelta::days(days) + TimeDelta::minutes(7);
            let (start, end) = c.bounds(t);
            assert!(start <= t && t < end, "{t} not in [{start}, {end})");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let now = at("2026-01-01T00:00:00Z");
        assert_eq!(Period::rolling(TimeDelta::zero()).unwrap_err().field, "period.rolling");
        assert!(Period::rolling(TimeDelta::days(400)).is_ok());
        assert!(Period::rolling(TimeDelta::days(400) + TimeDelta::seconds(1)).is_err());
        assert!(Period::rolling(TimeDelta::milliseconds(1500)).is_err());
        let err = Period::calendar(CalendarUnit::Month, 1, now, "Mars/Olympus", now).unwrap_err();
        assert_eq!(err.field, "period.calendar.time_zone");
        let err = Period::calendar(CalendarUnit::Month, 0, now, "UTC", now).unwrap_err();
        assert_eq!(err.field, "period.calendar.count");
        assert!(Period::calendar(CalendarUnit::Month, 14, now, "UTC", now).is_err());
        assert!(Period::calendar(CalendarUnit::Year, 2, now, "UTC", now).is_err());
        let far = now + TimeDelta::days(36_526);
        assert_eq!(
            Period::calendar(CalendarUnit::Day, 1, far, "UTC", now).unwrap_err().field,
            "period.calendar.anchor"
        );
    }

    #[test]
    fn canonical_text_round_trips() {
        let now = at("2026-01-31T00:00:00Z");
        for p in [
            Period::rolling(TimeDelta::days(1)).unwrap(),
            Period::calendar(CalendarUnit::Month, 1, now, "Europe/Paris", now).unwrap(),
            Period::calendar(CalendarUnit::Week, 3, now + TimeDelta::microseconds(7), "UTC", now).unwrap(),
        ] {
            assert_eq!(p.to_string().parse::<Period>().unwrap(), p, "{p}");
        }
        assert!("rolling 0s".parse::<Period>().is_err());
        assert!("weekly".parse::<Period>().is_err());
    }
}
