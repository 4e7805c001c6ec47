//! An account's running totals per window, and how they are kept exact without summing history.
//!
//! Invariant, for every window `w` of an account after [`Account::refresh`] at `now`:
//! - `committed[w]` = Σ amount of its COMMITTED transactions with `created_at > aged_through[w]`
//! - `held[w]` = Σ amount of its HELD transactions unexpired at `now` with `created_at > aged_through[w]`
//! - `aged_through[w]` = `now - w.length()` (never moved backwards)
//!
//! So usage is read from the totals in O(1), and each transaction is subtracted once per window when it ages
//! out (amortised O(1) per transaction, whatever the key's history).

use super::{AccountKey, Timestamp, Window};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowTotals {
    /// Committed spend counted in the window. Kept in i128 (numeric in Postgres): an unlimited key may record
    /// more than i64::MAX in total, and no sum may wrap or fail.
    pub committed: i128,
    pub held: i128,
    /// Transactions created at or before this instant have left the window and are no longer counted.
    pub aged_through: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub key: AccountKey,
    pub limits: [Option<i64>; 4],
    pub windows: [WindowTotals; 4],
}

/// Transactions leaving one window of one account: the sums of what they counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgedOut {
    pub window: Window,
    /// Σ amount of COMMITTED transactions created in `(aged_through, now - length]`.
    pub committed: i128,
    /// Σ amount of HELD transactions unexpired at `now` created in that range. Holds expiring at `now` are
    /// handled by [`Account::release_expired`] instead, so that nothing is subtracted twice.
    pub held: i128,
}

/// A range of creation times whose transactions leave a window at `now`: `(after, upto]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgingRange {
    pub window: Window,
    pub after: Timestamp,
    pub upto: Timestamp,
}

/// Usage of one window as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUsage {
    pub window: Window,
    pub limit: Option<i64>,
    pub spent: i128,
    pub held: i128,
}

impl WindowUsage {
    /// `max(0, limit - spent - held)`, or `None` without a limit.
    pub fn remaining(&self) -> Option<i128> {
        self.limit.map(|limit| (i128::from(limit) - self.spent - self.held).max(0))
    }
}

impl Account {
    /// A fresh account at `now`: nothing counted, nothing to age out.
    pub fn new(key: AccountKey, now: Timestamp) -> Self {
        let windows =
            Window::ALL.map(|w| WindowTotals { committed: 0, held: 0, aged_through: now - w.length() });
        Self { key, limits: [None; 4], windows }
    }

    /// The creation-time ranges whose transactions leave a window by `now`; empty ranges are left out.
    pub fn aging_ranges(&self, now: Timestamp) -> impl Iterator<Item = AgingRange> + '_ {
        Window::ALL.into_iter().filter_map(move |window| {
            let after = self.windows[window.index()].aged_through;
            let upto = now - window.length();
            (upto > after).then_some(AgingRange { window, after, upto })
        })
    }

    /// Does a transaction created at `created_at` count in `window` (given the totals are refreshed)?
    pub fn counts_in(&self, window: Window, created_at: Timestamp) -> bool {
        created_at > self.windows[window.index()].aged_through
    }

    /// Stops counting an expired hold (created at `created_at`) in every window that still counts it.
    /// Must run before [`Account::age_out`] of the same refresh: it tests inclusion against the old cutoffs.
    pub fn release_expired(&mut self, created_at: Timestamp, amount: i64) {
        self.adjust(created_at, 0, -i128::from(amount));
    }

    /// Advances every window to `now`, subtracting what left it.
    pub fn age_out(&mut self, now: Timestamp, aged: impl IntoIterator<Item = AgedOut>) {
        for out in aged {
            let totals = &mut self.windows[out.window.index()];
            totals.committed -= out.committed;
            totals.held -= out.held;
        }
        for window in Window::ALL {
            let totals = &mut self.windows[window.index()];
            totals.aged_through = totals.aged_through.max(now - window.length());
        }
    }

    /// Adds `committed` and `held` to every window that counts a transaction created at `created_at`.
    pub fn adjust(&mut self, created_at: Timestamp, committed: i128, held: i128) {
        for window in Window::ALL {
            if self.counts_in(window, created_at) {
                let totals = &mut self.windows[window.index()];
                totals.committed += committed;
                totals.held += held;
            }
        }
    }

    /// The windows whose limit `amount` more would exceed. Reaching a limit exactly is allowed.
    pub fn exceeded_by(&self, amount: i64) -> Vec<Window> {
        Window::ALL
            .into_iter()
            .filter(|w| {
                let totals = &self.windows[w.index()];
                self.limits[w.index()].is_some_and(|limit| {
                    totals.committed + totals.held + i128::from(amount) > i128::from(limit)
                })
            })
            .collect()
    }

    pub fn usage(&self, window: Window) -> WindowUsage {
        let totals = &self.windows[window.index()];
        WindowUsage { window, limit: self.limits[window.index()], spent: totals.committed, held: totals.held }
    }

    /// Usage of the windows that have a limit.
    pub fn limited_usage(&self) -> Vec<WindowUsage> {
        Window::ALL.into_iter().filter(|w| self.limits[w.index()].is_some()).map(|w| self.usage(w)).collect()
    }

    pub fn all_usage(&self) -> Vec<WindowUsage> {
        Window::ALL.into_iter().map(|w| self.usage(w)).collect()
    }
}
