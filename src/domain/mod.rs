//! Pure domain logic: windows, validated values, running totals and the batch state machine. No I/O.

mod account;
mod ledger;
mod transaction;
mod values;
mod window;

pub use account::{Account, AgedOut, AgingRange, WindowTotals, WindowUsage};
pub use ledger::{Changes, Committed, Ledger, Loaded, Rejection, Reserve, ReserveOutcome, Reversed};
pub use transaction::{Transaction, TxState};
pub use values::*;
pub use window::Window;

/// Instants are kept to the microsecond, the precision Postgres stores.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
