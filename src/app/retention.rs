//! History retention: monthly partitions of `transactions` created ahead of time, partitions older than any
//! limit, hold and audit needs dropped (optionally exported first), old audit events deleted.
//!
//! **The floor.** A partition is dropped only when all its rows were created before `now - retention`, and
//! retention is never less than the longest spending period configured (a key's own limits and plans') plus
//! the longest hold ([`MAX_HOLD_TTL`]) plus a day: no period counts those rows any more, and no hold in them
//! can still be open (partitions with open holds are kept all the same).
//!
//! **Idle accounts.** A rolling period's running totals subtract what leaves the period when the account is
//! next refreshed, by a range scan over `(since, now - length]`. An account no batch has written for a long
//! time still has an old `since`: its next refresh must find the rows to subtract. So before dropping, every
//! account last written before `newest dropped bound + longest period` is refreshed (a write batch with no
//! operations, under its row lock, like any other): its totals then no longer depend on the dropped rows.

use std::path::PathBuf;

use chrono::TimeDelta;

use super::{Allowance, Error, metrics};
use crate::domain::{AccountKey, InvalidArgument, MAX_HOLD_TTL, Timestamp, utc_month_start};
use crate::storage::{Access, HistoryPartition, PartitionDrop, Store};

/// Added to the floor: clocks of replicas that disagree, a run late by an interval.
pub const RETENTION_MARGIN: TimeDelta = TimeDelta::days(1);

/// Accounts refreshed per batch before a drop.
const REFRESH_PAGE: u32 = 100;

/// What a retention run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// How long history is kept; raised to the floor (see [`RetentionSettings::strict`]).
    pub retention: TimeDelta,
    /// Months of partitions kept ready after the current one.
    pub ahead_months: u32,
    /// Where dropped partitions are written as CSV first; `None`: not exported.
    pub export_dir: Option<PathBuf>,
    /// Audit events older than this are deleted; `None`: kept for ever.
    pub audit_retention: Option<TimeDelta>,
    /// A retention below the floor is refused (the CLI, where an operator asked for it) instead of raised to
    /// it with a warning (the service's periodic job: limits may change after start-up).
    pub strict: bool,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            retention: TimeDelta::days(430),
            ahead_months: 1,
            export_dir: None,
            audit_retention: None,
            strict: false,
        }
    }
}

/// A partition a run dropped, or would drop (a dry run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub name: String,
    /// Rows it held (a dry run: the planner's estimate).
    pub rows: i64,
    pub exported: Option<PathBuf>,
}

/// What one retention run did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    pub dry_run: bool,
    pub now: Timestamp,
    /// The least retention allowed now.
    pub floor: TimeDelta,
    /// The retention applied: the one asked for, or the floor if that was more.
    pub retention: TimeDelta,
    /// Partitions entirely older than this are dropped.
    pub cutoff: Timestamp,
    pub created: Vec<String>,
    pub dropped: Vec<Dropped>,
    /// Partitions old enough but kept, with why.
    pub kept: Vec<(String, String)>,
    /// Idle accounts refreshed before dropping.
    pub refreshed_accounts: u64,
    pub audit_deleted: u64,
}

/// A retention as operators write it: `430d`, `1d 12h` (days at most, never months or years).
pub fn format_retention(d: TimeDelta) -> String {
    crate::domain::span_text(d.num_seconds())
}

/// The least retention given the longest spending period: that period, the longest hold and the margin.
fn floor(longest: Option<TimeDelta>) -> TimeDelta {
    longest.unwrap_or_default() + MAX_HOLD_TTL + RETENTION_MARGIN
}

impl<S: Store> Allowance<S> {
    /// The least retention: the longest spending period configured plus the longest hold plus a margin.
    pub async fn retention_floor(&self) -> Result<TimeDelta, Error> {
        Ok(floor(self.longest_spending_period().await?))
    }

    /// The longest spending period configured (one pass over every account's limits).
    async fn longest_spending_period(&self) -> Result<Option<TimeDelta>, Error> {
        Ok(self.store.longest_spending_period().await.inspect_err(metrics::storage_error)?)
    }

    /// Creates the current month's partition and `ahead_months` after it. Returns the names created.
    pub async fn create_partitions(&self, ahead_months: u32) -> Result<Vec<String>, Error> {
        let now = self.clock.now();
        let created = self
            .store
            .create_history_partitions(utc_month_start(now, 0), utc_month_start(now, ahead_months + 1))
            .await
            .inspect_err(metrics::storage_error)?;
        metrics::partitions_created(created.len());
        Ok(created)
    }

    pub async fn partitions(&self) -> Result<Vec<HistoryPartition>, Error> {
        Ok(self.store.history_partitions().await.inspect_err(metrics::storage_error)?)
    }

    /// One retention run (see the module's documentation). Run it under
    /// [`Store::exclusively`]`(`[`HISTORY_JOB`](crate::storage::HISTORY_JOB)`, …)` so that one replica at a
    /// time does.
    #[tracing::instrument(name = "app.retention", skip_all, fields(dry_run))]
    pub async fn retention(
        &self,
        settings: &RetentionSettings,
        dry_run: bool,
    ) -> Result<RetentionReport, Error> {
        let now = self.clock.now();
        let longest = self.longest_spending_period().await?;
        let floor = floor(longest);
        if settings.retention < floor {
            let floor_text = format_retention(floor);
            let asked = format_retention(settings.retention);
            if settings.strict {
                return Err(InvalidArgument::new(
                    "retention",
                    format!(
                        "{asked} is below the floor of {floor_text} (the longest spending period configured \
                         plus the longest hold plus a day)"
                    ),
                )
                .into());
            }
            tracing::warn!(retention = %asked, floor = %floor_text, "retention below the floor: keeping the floor");
        }
        let retention = settings.retention.max(floor);
        let cutoff = now - retention;
        let mut report = RetentionReport {
            dry_run,
            now,
            floor,
            retention,
            cutoff,
            created: Vec::new(),
            dropped: Vec::new(),
            kept: Vec::new(),
            refreshed_accounts: 0,
            audit_deleted: 0,
        };
        if !dry_run {
            report.created = self.create_partitions(settings.ahead_months).await?;
        }
        let old: Vec<HistoryPartition> = self
            .partitions()
            .await?
            .into_iter()
            .filter(|p| !p.is_default && (p.detached || p.to.is_some_and(|to| to <= cutoff)))
            .collect();
        if dry_run {
            report.dropped = old
                .iter()
                .map(|p| Dropped { name: p.name.clone(), rows: p.rows_estimate, exported: None })
                .collect();
        } else if !old.is_empty() {
            let newest = old.iter().filter_map(|p| p.to).max().unwrap_or(cutoff);
            report.refreshed_accounts = self.refresh_idle_accounts(newest, longest, now).await?;
            for p in old {
                let outcome = self
                    .store
                    .drop_history_partition(&p.name, settings.export_dir.as_deref())
                    .await
                    .inspect_err(metrics::storage_error)?;
                match outcome {
                    PartitionDrop::Dropped { rows, exported } => {
                        metrics::partitions_dropped(1);
                        report.dropped.push(Dropped {
                            name: p.name,
                            rows: i64::try_from(rows).unwrap_or(i64::MAX),
                            exported,
                        });
                    }
                    PartitionDrop::OpenHolds(n) => {
                        tracing::warn!(partition = %p.name, open_holds = n, "kept an old partition: it has open holds");
                        report.kept.push((p.name, format!("{n} open hold(s)")));
                    }
                    PartitionDrop::Default | PartitionDrop::NotFound => {}
                }
            }
        }
        if let Some(keep) = settings.audit_retention.filter(|_| !dry_run) {
            report.audit_deleted = self
                .store
                .delete_audit_events_before(now - keep)
                .await
                .inspect_err(metrics::storage_error)?;
        }
        if !dry_run {
            metrics::retention_succeeded(now);
        }
        Ok(report)
    }

    /// Refreshes every account with running totals last written before `bound + longest period`: afterwards
    /// no rolling period's aging scan reaches back before `bound`. Returns how many were looked at.
    async fn refresh_idle_accounts(
        &self,
        bound: Timestamp,
        longest: Option<TimeDelta>,
        now: Timestamp,
    ) -> Result<u64, Error> {
        let Some(longest) = longest else { return Ok(0) };
        let before = bound + longest;
        let mut after: Option<AccountKey> = None;
        let mut refreshed = 0;
        loop {
            let page = self
                .store
                .accounts_written_before(before, after.as_ref(), REFRESH_PAGE)
                .await
                .inspect_err(metrics::storage_error)?;
            let Some(last) = page.last().cloned() else { return Ok(refreshed) };
            refreshed += page.len() as u64;
            // No operations: the batch refreshes the accounts to `now` and writes their aged totals.
            self.store
                .with_ledger(Access::Write, &page, &[], &[], now, |_| ())
                .await
                .inspect_err(metrics::storage_error)?;
            after = Some(last);
        }
    }
}
