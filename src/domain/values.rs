//! Validated values: once built, a value of these types is known to be acceptable, so nothing past the edge
//! re-checks it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::TimeDelta;

/// Longest accepted key id, unit and transaction id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
pub const MAX_METADATA_ENTRIES: usize = 16;
pub const MAX_METADATA_KEY_BYTES: usize = 64;
pub const MAX_METADATA_VALUE_BYTES: usize = 512;
pub const MIN_HOLD_TTL: TimeDelta = TimeDelta::seconds(1);
pub const MAX_HOLD_TTL: TimeDelta = TimeDelta::days(30);

/// Bad input, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidArgument {
    /// The request field at fault, as a path: `limit.period.calendar.time_zone`, `limits[2].name`.
    pub field: Cow<'static, str>,
    pub reason: String,
}

impl InvalidArgument {
    pub fn new(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }

    /// The same error for a field nested in `parent`.
    pub fn within(self, parent: &str) -> Self {
        Self { field: format!("{parent}.{}", self.field).into(), reason: self.reason }
    }
}

fn check_id(field: &'static str, value: &str) -> Result<(), InvalidArgument> {
    if value.is_empty() {
        return Err(InvalidArgument::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(InvalidArgument::new(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidArgument::new(field, "must not contain control characters"));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: impl Into<String>) -> Result<Self, InvalidArgument> {
                let value = value.into();
                check_id($field, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The caller's key (an API key, an account). Any key is valid; keys need no registration.
    KeyId,
    "key_id"
);
id_type!(
    /// What is counted: a currency, "requests", "tokens".
    Unit,
    "unit"
);
id_type!(
    /// The caller's id for one transfer, unique across the service.
    TransactionId,
    "transaction_id"
);

/// One ledger: the spending of one key in one unit. Limits and running totals live per account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountKey {
    pub key_id: KeyId,
    pub unit: Unit,
}

impl AccountKey {
    pub fn new(key_id: KeyId, unit: Unit) -> Self {
        Self { key_id, unit }
    }
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.key_id, self.unit)
    }
}

/// A strictly positive amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(i64);

impl Amount {
    pub fn parse(field: &'static str, value: i64) -> Result<Self, InvalidArgument> {
        if value <= 0 {
            return Err(InvalidArgument::new(field, format!("must be positive, got {value}")));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A limit: the most that committed + held spend may reach in a window. Zero blocks all spending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Limit(i64);

impl Limit {
    pub fn parse(value: i64) -> Result<Self, InvalidArgument> {
        if value < 0 {
            return Err(InvalidArgument::new("limit", format!("must not be negative, got {value}")));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// How long a hold counts before it expires on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HoldTtl(TimeDelta);

impl HoldTtl {
    pub fn parse(value: TimeDelta) -> Result<Self, InvalidArgument> {
        if value < MIN_HOLD_TTL || value > MAX_HOLD_TTL {
            return Err(InvalidArgument::new(
                "hold_ttl",
                format!(
                    "must be between {}s and {}s, got {}s",
                    MIN_HOLD_TTL.num_seconds(),
                    MAX_HOLD_TTL.num_seconds(),
                    value.num_milliseconds() as f64 / 1000.0
                ),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> TimeDelta {
        self.0
    }
}

/// The caller's annotations of a transaction, bounded in count and size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub fn parse(entries: impl IntoIterator<Item = (String, String)>) -> Result<Self, InvalidArgument> {
        let map: BTreeMap<String, String> = entries.into_iter().collect();
        if map.len() > MAX_METADATA_ENTRIES {
            return Err(InvalidArgument::new(
                "metadata",
                format!("at most {MAX_METADATA_ENTRIES} entries, got {}", map.len()),
            ));
        }
        for (k, v) in &map {
            if k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES {
                return Err(InvalidArgument::new(
                    "metadata",
                    format!("keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes"),
                ));
            }
            if v.len() > MAX_METADATA_VALUE_BYTES {
                return Err(InvalidArgument::new(
                    "metadata",
                    format!(
                        "value of {k:?} must be at most {MAX_METADATA_VALUE_BYTES} bytes, got {}",
                        v.len()
                    ),
                ));
            }
            // Postgres text and jsonb cannot hold NUL.
            if k.contains('\0') || v.contains('\0') {
                return Err(InvalidArgument::new("metadata", "must not contain NUL characters"));
            }
        }
        Ok(Self(map))
    }

    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_entries(self) -> BTreeMap<String, String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_long_and_control_characters() {
        assert_eq!(KeyId::parse("").unwrap_err().field, "key_id");
        assert!(TransactionId::parse("x".repeat(MAX_ID_BYTES)).is_ok());
        let long = TransactionId::parse("x".repeat(MAX_ID_BYTES + 1)).unwrap_err();
        assert_eq!(long.field, "transaction_id");
        assert!(long.reason.contains("128"));
        assert!(Unit::parse("us\0d").is_err());
        // Multi-byte characters count in bytes.
        assert!(KeyId::parse("é".repeat(65)).is_err());
    }

    #[test]
    fn amounts_limits_and_ttls_have_bounds() {
        assert!(Amount::parse("amount", 0).is_err());
        assert!(Amount::parse("amount", -1).is_err());
        assert_eq!(Amount::parse("amount", i64::MAX).unwrap().get(), i64::MAX);
        assert!(Limit::parse(-1).is_err());
        assert_eq!(Limit::parse(0).unwrap().get(), 0);
        assert!(HoldTtl::parse(TimeDelta::milliseconds(999)).is_err());
        assert!(HoldTtl::parse(TimeDelta::seconds(1)).is_ok());
        assert!(HoldTtl::parse(TimeDelta::days(30)).is_ok());
        assert!(HoldTtl::parse(TimeDelta::days(30) + TimeDelta::microseconds(1)).is_err());
    }

    #[test]
    fn metadata_is_bounded() {
        let ok = (0..16).map(|i| (format!("k{i}"), "v".to_string()));
        assert!(Metadata::parse(ok).is_ok());
        let too_many = (0..17).map(|i| (format!("k{i}"), "v".to_string()));
        assert_eq!(Metadata::parse(too_many).unwrap_err().field, "metadata");
        let big = [("k".to_string(), "v".repeat(MAX_METADATA_VALUE_BYTES + 1))];
        assert!(Metadata::parse(big).is_err());
        assert!(Metadata::parse([(String::new(), "v".to_string())]).is_err());
    }
}
