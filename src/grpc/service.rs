//! The `allowance.v1.SpendingLimits` service: decode, call the app, encode. No logic of its own.

use tonic::{Request, Response, Status};

use super::auth::{actor, check_keys, check_unconfined};
use super::convert;
use super::pb::{self, spending_limits_server::SpendingLimits};
use crate::app::{Allowance, DEFAULT_PAGE_SIZE, Error};
use crate::domain::{
    Amount, HoldTtl, InvalidArgument, KeyId, Limit, LimitName, Metadata, PlanName, Reserve, ReserveOutcome,
    TransactionId, Unit, Window,
};
use crate::storage::{Cursor, StorageError, Store};

/// Server-side defaults applied to requests that leave a field unset.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub unit: Unit,
    pub hold_ttl: HoldTtl,
}

pub struct SpendingLimitsService<S> {
    app: Allowance<S>,
    defaults: Defaults,
}

impl<S: Store> SpendingLimitsService<S> {
    pub fn new(app: Allowance<S>, defaults: Defaults) -> Self {
        Self { app, defaults }
    }
}

/// The whole error-to-status table. Storage trouble is UNAVAILABLE so callers retry; no driver or SQL text
/// ever reaches a client.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        use crate::domain::Rejection;
        match e {
            Error::InvalidArgument(e) => Status::invalid_argument(e.to_string()),
            Error::Rejected(
                r @ (Rejection::NotFound(_)
                | Rejection::PlanNotFound(_)
                | Rejection::CallerNotFound(_)
                | Rejection::RuleNotFound(_)),
            ) => Status::not_found(r.to_string()),
            Error::Rejected(Rejection::InvalidArgument(e)) => Status::invalid_argument(e.to_string()),
            Error::Rejected(r @ Rejection::AlreadyExists(_)) => Status::already_exists(r.to_string()),
            Error::Rejected(r @ Rejection::FailedPrecondition(_)) => {
                Status::failed_precondition(r.to_string())
            }
            Error::ShuttingDown => {
                Status::unavailable("the server is shutting down; retry on another replica")
            }
            Error::Internal => Status::internal("internal error"),
            Error::Storage(
                e @ (StorageError::Unavailable(_)
                | StorageError::Contended
                | StorageError::NotMigrated { .. }),
            ) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "storage unavailable");
                Status::unavailable("storage is unavailable; retry later")
            }
            Error::Storage(e @ (StorageError::Corrupt(_) | StorageError::Export(_))) => {
                tracing::error!(error = %e, "storage returned invalid data or failed an export");
                Status::internal("internal error")
            }
        }
    }
}

fn invalid(e: InvalidArgument) -> Status {
    Error::from(e).into()
}

/// Page tokens are opaque to clients: `v1.<created_at micros>.<transaction id>`.
fn encode_cursor(c: &Cursor) -> String {
    format!("v1.{}.{}", c.created_at.timestamp_micros(), c.transaction_id)
}

fn decode_cursor(token: &str) -> Result<Option<Cursor>, InvalidArgument> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || InvalidArgument::new("page_token", "is not a token this service issued");
    let mut parts = token.splitn(3, '.');
    let (Some("v1"), Some(micros), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    Ok(Some(Cursor {
        // Range-checked here: a time Postgres cannot store must not reach SQL (it would fail as a database
        // error, UNAVAILABLE, and a client following the README would retry forever).
        created_at: chrono::DateTime::from_timestamp_micros(micros)
            .filter(|t| convert::storable(*t))
            .ok_or_else(bad)?,
        transaction_id: TransactionId::parse(id).map_err(|_| bad())?,
    }))
}

#[tonic::async_trait]
impl<S: Store> SpendingLimits for SpendingLimitsService<S> {
    #[tracing::instrument(name = "grpc.reserve_spending", skip_all)]
    async fn reserve_spending(
        &self,
        request: Request<pb::ReserveSpendingRequest>,
    ) -> Result<Response<pb::ReserveSpendingResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let reserve = Reserve {
            accounts: convert::reservation_accounts(
                r.key_id,
                r.additional_key_ids,
                r.unit,
                &self.defaults.unit,
            )
            .map_err(invalid)?,
            transaction_id: TransactionId::parse(r.transaction_id).map_err(invalid)?,
            amount: Amount::parse("amount", r.amount).map_err(invalid)?,
            hold_ttl: convert::hold_ttl(r.hold_ttl.as_ref(), self.defaults.hold_ttl).map_err(invalid)?,
            commit: r.commit,
            metadata: Metadata::parse(r.metadata).map_err(invalid)?,
        };
        check_keys(&by, reserve.accounts.iter().map(|a| &a.key_id))?;
        let first = reserve.accounts[0].clone();
        let outcome = self.app.reserve(reserve).await?;
        let usage = outcome.windows(&first).iter().map(convert::usage).collect();
        let limits = outcome.usage().iter().map(convert::limit_usage).collect();
        let response = match outcome {
            ReserveOutcome::Allowed { transaction, .. } => pb::ReserveSpendingResponse {
                allowed: true,
                usage,
                limits,
                transaction: Some(convert::transaction(transaction)),
                ..Default::default()
            },
            ReserveOutcome::Denied { exceeded, .. } => {
                let windows: Vec<i32> = Window::ALL
                    .into_iter()
                    .filter(|w| {
                        exceeded
                            .iter()
                            .any(|e| e.usage.account == first && e.usage.name.as_str() == w.as_str())
                    })
                    .map(|w| convert::window_to_pb(w).into())
                    .collect();
                pb::ReserveSpendingResponse {
                    allowed: false,
                    exceeded: windows,
                    usage,
                    limits,
                    transaction: None,
                    exceeded_limits: exceeded.iter().map(convert::exceeded).collect(),
                    retry_after: convert::overall_retry_after(&exceeded),
                }
            }
        };
        Ok(Response::new(response))
    }

    #[tracing::instrument(name = "grpc.commit", skip_all)]
    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let id = TransactionId::parse(r.transaction_id).map_err(invalid)?;
        let amount = r.amount.map(|a| Amount::parse("amount", a)).transpose().map_err(invalid)?;
        let committed = self.app.commit(id, amount, by).await?;
        Ok(Response::new(pb::CommitResponse {
            transaction: Some(convert::transaction(committed.transaction)),
        }))
    }

    #[tracing::instrument(name = "grpc.reverse", skip_all)]
    async fn reverse(
        &self,
        request: Request<pb::ReverseRequest>,
    ) -> Result<Response<pb::ReverseResponse>, Status> {
        let by = actor(&request);
        let id = TransactionId::parse(request.into_inner().transaction_id).map_err(invalid)?;
        let reversed = self.app.reverse(id, by).await?;
        Ok(Response::new(pb::ReverseResponse {
            transaction: Some(convert::transaction(reversed.transaction)),
        }))
    }

    #[tracing::instrument(name = "grpc.get_limits", skip_all)]
    async fn get_limits(
        &self,
        request: Request<pb::GetLimitsRequest>,
    ) -> Result<Response<pb::GetLimitsResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        let usage = self.app.get_limits(account.clone()).await?;
        Ok(Response::new(pb::GetLimitsResponse {
            key_id: account.key_id.into_string(),
            unit: account.unit.into_string(),
            usage: usage.windows.iter().map(convert::usage).collect(),
            limits: usage.limits.iter().map(convert::limit_usage).collect(),
            plan: usage.plan.map(|p| p.to_string()).unwrap_or_default(),
            key_limits: usage.own.iter().map(convert::limit_to_pb).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.set_limit", skip_all)]
    async fn set_limit(
        &self,
        request: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        let window = convert::window(r.window).map_err(invalid)?;
        let limit = Limit::parse(r.limit).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        let usage = self.app.set_limit(account, window, Some(limit), by).await?;
        Ok(Response::new(pb::SetLimitResponse { usage: Some(convert::usage(&usage)) }))
    }

    #[tracing::instrument(name = "grpc.remove_limit", skip_all)]
    async fn remove_limit(
        &self,
        request: Request<pb::RemoveLimitRequest>,
    ) -> Result<Response<pb::RemoveLimitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        let window = convert::window(r.window).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        let usage = self.app.set_limit(account, window, None, by).await?;
        Ok(Response::new(pb::RemoveLimitResponse { usage: Some(convert::usage(&usage)) }))
    }

    #[tracing::instrument(name = "grpc.get_transaction", skip_all)]
    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        let by = actor(&request);
        let id = TransactionId::parse(request.into_inner().transaction_id).map_err(invalid)?;
        let transaction = self.app.get_transaction(id, &by).await?;
        Ok(Response::new(convert::transaction(transaction)))
    }

    #[tracing::instrument(name = "grpc.list_transactions", skip_all)]
    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        let page_size = convert::page_size(r.page_size, DEFAULT_PAGE_SIZE).map_err(invalid)?;
        let cursor = decode_cursor(&r.page_token).map_err(invalid)?;
        let (page, next) = self.app.list_transactions(account, cursor, page_size).await?;
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions: page.into_iter().map(convert::transaction).collect(),
            next_page_token: next.as_ref().map(encode_cursor).unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "grpc.put_limit", skip_all)]
    async fn put_limit(
        &self,
        request: Request<pb::PutLimitRequest>,
    ) -> Result<Response<pb::PutLimitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        let spec = convert::limit(r.limit, "limit", self.app.now()).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        let usage = self.app.put_limit(account, spec, by).await?;
        Ok(Response::new(pb::PutLimitResponse { usage: usage.as_ref().map(convert::limit_usage) }))
    }

    #[tracing::instrument(name = "grpc.delete_limit", skip_all)]
    async fn delete_limit(
        &self,
        request: Request<pb::DeleteLimitRequest>,
    ) -> Result<Response<pb::DeleteLimitResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let account = convert::account(r.key_id, r.unit, &self.defaults.unit).map_err(invalid)?;
        let name = LimitName::parse(r.name).map_err(invalid)?;
        check_keys(&by, [&account.key_id])?;
        if !self.app.remove_limit(account.clone(), name.clone(), by).await? {
            return Err(Status::not_found(format!("key {account} has no limit named {name} of its own")));
        }
        Ok(Response::new(pb::DeleteLimitResponse {}))
    }

    #[tracing::instrument(name = "grpc.put_plan", skip_all)]
    async fn put_plan(
        &self,
        request: Request<pb::PutPlanRequest>,
    ) -> Result<Response<pb::PutPlanResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "changing plans")?;
        let r = request.into_inner();
        let plan = convert::plan(r.name, r.limits, &self.defaults.unit, self.app.now()).map_err(invalid)?;
        let plan = self.app.put_plan(plan, &by).await?;
        Ok(Response::new(pb::PutPlanResponse { plan: Some(convert::plan_to_pb(plan)) }))
    }

    #[tracing::instrument(name = "grpc.get_plan", skip_all)]
    async fn get_plan(
        &self,
        request: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::GetPlanResponse>, Status> {
        let name = PlanName::parse(request.into_inner().name)
            .map_err(|e| invalid(InvalidArgument::new("name", e.reason)))?;
        let plan = self.app.get_plan(name).await?;
        Ok(Response::new(pb::GetPlanResponse { plan: Some(convert::plan_to_pb(plan)) }))
    }

    #[tracing::instrument(name = "grpc.list_plans", skip_all)]
    async fn list_plans(
        &self,
        _request: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let plans = self.app.list_plans().await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans: plans.into_iter().map(convert::plan_to_pb).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.delete_plan", skip_all)]
    async fn delete_plan(
        &self,
        request: Request<pb::DeletePlanRequest>,
    ) -> Result<Response<pb::DeletePlanResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "deleting plans")?;
        let name = PlanName::parse(request.into_inner().name)
            .map_err(|e| invalid(InvalidArgument::new("name", e.reason)))?;
        self.app.delete_plan(name, &by).await?;
        Ok(Response::new(pb::DeletePlanResponse {}))
    }

    #[tracing::instrument(name = "grpc.assign_plan", skip_all)]
    async fn assign_plan(
        &self,
        request: Request<pb::AssignPlanRequest>,
    ) -> Result<Response<pb::AssignPlanResponse>, Status> {
        let by = actor(&request);
        let r = request.into_inner();
        let key = KeyId::parse(r.key_id).map_err(invalid)?;
        let plan = if r.plan.is_empty() { None } else { Some(PlanName::parse(r.plan).map_err(invalid)?) };
        check_keys(&by, [&key])?;
        self.app.assign_plan(key, plan, &by).await?;
        Ok(Response::new(pb::AssignPlanResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_even_with_dots_in_ids() {
        let c = Cursor {
            created_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            transaction_id: TransactionId::parse("tx.with.dots").unwrap(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), Some(c));
        assert_eq!(decode_cursor("").unwrap(), None);
        assert_eq!(decode_cursor("garbage").unwrap_err().field, "page_token");
        assert!(decode_cursor("v1.notanumber.x").is_err());
        assert_eq!(decode_cursor("v1.-220000000000000000.x").unwrap_err().field, "page_token");
        assert_eq!(decode_cursor("v1.9223372036854775807.x").unwrap_err().field, "page_token");
    }
}
