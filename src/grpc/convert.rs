//! Proto <-> domain. Decoding validates: what comes out of here is a domain value or INVALID_ARGUMENT.

use chrono::TimeDelta;

use super::pb;
use crate::domain::{
    AccountKey, HoldTtl, InvalidArgument, KeyId, Timestamp, Transaction, TxState, Unit, Window, WindowUsage,
};

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

pub fn hold_ttl(d: Option<&prost_types::Duration>, default: HoldTtl) -> Result<HoldTtl, InvalidArgument> {
    let Some(d) = d else { return Ok(default) };
    let invalid = || InvalidArgument::new("hold_ttl", "is not a valid duration");
    if !(-999_999_999..=999_999_999).contains(&d.nanos) || (d.seconds > 0 && d.nanos < 0) {
        return Err(invalid());
    }
    let delta = TimeDelta::try_seconds(d.seconds)
        .and_then(|s| s.checked_add(&TimeDelta::nanoseconds(d.nanos.into())))
        .ok_or_else(invalid)?;
    HoldTtl::parse(delta)
}

pub fn window(value: i32) -> Result<Window, InvalidArgument> {
    match pb::Window::try_from(value) {
        Ok(pb::Window::Daily) => Ok(Window::Daily),
        Ok(pb::Window::Weekly) => Ok(Window::Weekly),
        Ok(pb::Window::Monthly) => Ok(Window::Monthly),
        Ok(pb::Window::Annual) => Ok(Window::Annual),
        Ok(pb::Window::Unspecified) => Err(InvalidArgument::new("window", "must be specified")),
        Err(_) => Err(InvalidArgument::new("window", format!("unknown value {value}"))),
    }
}

pub fn window_to_pb(w: Window) -> pb::Window {
    match w {
        Window::Daily => pb::Window::Daily,
        Window::Weekly => pb::Window::Weekly,
        Window::Monthly => pb::Window::Monthly,
        Window::Annual => pb::Window::Annual,
    }
}

/// An account from the request's key and unit; an empty unit is the server's default.
pub fn account(key_id: String, unit: String, default_unit: &Unit) -> Result<AccountKey, InvalidArgument> {
    let unit = if unit.is_empty() { default_unit.clone() } else { Unit::parse(unit)? };
    Ok(AccountKey::new(KeyId::parse(key_id)?, unit))
}

/// Totals above i64::MAX (possible on an unlimited key) are reported as i64::MAX.
fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

pub fn usage(u: &WindowUsage) -> pb::WindowUsage {
    pb::WindowUsage {
        window: window_to_pb(u.window).into(),
        limit: u.limit,
        spent: saturate(u.spent),
        held: saturate(u.held),
        remaining: u.remaining().map(saturate),
    }
}

pub fn state(s: TxState) -> pb::TransactionState {
    match s {
        TxState::Held => pb::TransactionState::Held,
        TxState::Committed => pb::TransactionState::Committed,
        TxState::Reversed => pb::TransactionState::Reversed,
        TxState::Expired => pb::TransactionState::Expired,
    }
}

pub fn transaction(t: Transaction) -> pb::Transaction {
    pb::Transaction {
        transaction_id: t.id.into_string(),
        key_id: t.account.key_id.into_string(),
        unit: t.account.unit.into_string(),
        amount: t.amount,
        state: state(t.state).into(),
        created_at: Some(timestamp(t.created_at)),
        expires_at: t.expires_at.map(timestamp),
        committed_at: t.committed_at.map(timestamp),
        reversed_at: t.reversed_at.map(timestamp),
        metadata: t.metadata.into_entries().into_iter().collect(),
        held_amount: t.held_amount,
        committed_late: t.committed_late,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_defaults_when_unset_and_is_bounded() {
        let default = HoldTtl::parse(TimeDelta::minutes(15)).unwrap();
        assert_eq!(hold_ttl(None, default).unwrap(), default);
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(hold_ttl(Some(&d(1, 0)), default).unwrap().get(), TimeDelta::seconds(1));
        assert!(hold_ttl(Some(&d(0, 999_999_999)), default).is_err());
        assert!(hold_ttl(Some(&d(-5, 0)), default).is_err());
        assert!(hold_ttl(Some(&d(i64::MAX, 0)), default).is_err());
        assert!(hold_ttl(Some(&d(5, 2_000_000_000)), default).is_err());
        assert_eq!(hold_ttl(Some(&d(0, 0)), default).unwrap_err().field, "hold_ttl");
    }

    #[test]
    fn windows_decode_and_reject_unspecified() {
        assert_eq!(window(2).unwrap(), Window::Weekly);
        assert_eq!(window(0).unwrap_err().field, "window");
        assert_eq!(window(99).unwrap_err().field, "window");
    }

    #[test]
    fn usage_saturates_huge_totals() {
        let u = WindowUsage { window: Window::Daily, limit: None, spent: i128::from(i64::MAX) * 2, held: 0 };
        let pb = usage(&u);
        assert_eq!(pb.spent, i64::MAX);
        assert_eq!(pb.remaining, None);
    }
}
