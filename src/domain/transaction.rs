use super::{AccountKey, Metadata, Timestamp, TransactionId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxState {
    Held,
    Committed,
    Reversed,
    Expired,
}

impl TxState {
    /// The stored code; the same numbers as the proto enum.
    pub fn code(self) -> i16 {
        match self {
            TxState::Held => 1,
            TxState::Committed => 2,
            TxState::Reversed => 3,
            TxState::Expired => 4,
        }
    }

    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            1 => TxState::Held,
            2 => TxState::Committed,
            3 => TxState::Reversed,
            4 => TxState::Expired,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TxState::Held => "held",
            TxState::Committed => "committed",
            TxState::Reversed => "reversed",
            TxState::Expired => "expired",
        }
    }
}

/// One transfer's reservation and what became of it. Transactions are never deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub id: TransactionId,
    /// The accounts it charges, all in one unit, as the caller named them (at least one; the first is the
    /// round-1 `key_id`).
    pub accounts: Vec<AccountKey>,
    /// The held amount while held or expired; the final amount once committed; what last counted once reversed.
    /// Every account is charged the same amount.
    pub amount: i64,
    /// The amount originally reserved.
    pub held_amount: i64,
    pub state: TxState,
    pub created_at: Timestamp,
    /// When an uncommitted hold stops counting; `None` for a reservation committed in the same call.
    pub expires_at: Option<Timestamp>,
    pub committed_at: Option<Timestamp>,
    pub reversed_at: Option<Timestamp>,
    /// Committed after its hold had expired: the money moved although the hold no longer counted.
    pub committed_late: bool,
    pub metadata: Metadata,
}

impl Transaction {
    /// The first account named: the round-1 key and unit.
    pub fn primary(&self) -> &AccountKey {
        &self.accounts[0]
    }

    /// The state as of `now`: a hold past its expiry is expired even before any write has recorded it.
    pub fn state_at(&self, now: Timestamp) -> TxState {
        match (self.state, self.expires_at) {
            (TxState::Held, Some(expires_at)) if expires_at <= now => TxState::Expired,
            (state, _) => state,
        }
    }

    /// The transaction as a reader at `now` should see it.
    pub fn as_of(mut self, now: Timestamp) -> Self {
        self.state = self.state_at(now);
        self
    }
}

/// A hold past its expiry that still counts in one account's totals: one account's share of a transaction,
/// released (and recorded as expired) by the next refresh of that account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiringHold {
    pub id: TransactionId,
    pub account: AccountKey,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub amount: i64,
}
