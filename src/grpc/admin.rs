//! The `allowance.v1.AdminService` service: callers and the audit trail. Decode, call the app, encode.

use tonic::{Request, Response, Status};

use super::auth::{actor, check_unconfined};
use super::convert;
use super::pb::{self, admin_service_server};
use crate::app::{Allowance, DEFAULT_AUDIT_PAGE, Error};
use crate::domain::{
    AuditFilter, CallerId, CallerName, InvalidArgument, KeyId, KeyPrefixes, LimitName, Scope, Unit,
    parse_scopes,
};
use crate::storage::Store;

pub struct AdminService<S> {
    app: Allowance<S>,
    default_unit: Unit,
}

impl<S: Store> AdminService<S> {
    pub fn new(app: Allowance<S>, default_unit: Unit) -> Self {
        Self { app, default_unit }
    }
}

fn invalid(e: InvalidArgument) -> Status {
    Error::from(e).into()
}

fn scopes(values: &[i32]) -> Result<std::collections::BTreeSet<Scope>, InvalidArgument> {
    let scopes = values
        .iter()
        .enumerate()
        .map(|(i, v)| match pb::Scope::try_from(*v) {
            Ok(pb::Scope::Spend) => Ok(Scope::Spend),
            Ok(pb::Scope::Read) => Ok(Scope::Read),
            Ok(pb::Scope::Admin) => Ok(Scope::Admin),
            Ok(pb::Scope::Ratelimit) => Ok(Scope::RateLimit),
            Ok(pb::Scope::Unspecified) => {
                Err(InvalidArgument::new(format!("scopes[{i}]"), "must be specified"))
            }
            Err(_) => Err(InvalidArgument::new(format!("scopes[{i}]"), format!("unknown value {v}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    parse_scopes(scopes)
}

/// Page tokens are opaque to clients: `a1.<id of the last event>`.
fn decode_token(token: &str) -> Result<Option<i64>, InvalidArgument> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || InvalidArgument::new("page_token", "is not a token this service issued");
    let id = token.strip_prefix("a1.").ok_or_else(bad)?;
    id.parse::<i64>().ok().filter(|id| *id > 0).map(Some).ok_or_else(bad)
}

#[tonic::async_trait]
impl<S: Store> admin_service_server::AdminService for AdminService<S> {
    #[tracing::instrument(name = "grpc.create_caller", skip_all)]
    async fn create_caller(
        &self,
        request: Request<pb::CreateCallerRequest>,
    ) -> Result<Response<pb::CreateCallerResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "managing callers")?;
        let r = request.into_inner();
        let name = CallerName::parse(r.name).map_err(invalid)?;
        let scopes = scopes(&r.scopes).map_err(invalid)?;
        let prefixes = KeyPrefixes::parse(r.key_prefixes).map_err(invalid)?;
        let issued = self.app.create_caller(name, scopes, prefixes, &by).await?;
        tracing::info!(caller = %issued.caller.id, "caller created");
        Ok(Response::new(pb::CreateCallerResponse {
            caller: Some(convert::caller(&issued.caller)),
            credential: issued.credential,
        }))
    }

    #[tracing::instrument(name = "grpc.list_callers", skip_all)]
    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        check_unconfined(&actor(&request), "listing callers")?;
        let callers = self.app.list_callers().await?;
        Ok(Response::new(pb::ListCallersResponse { callers: callers.iter().map(convert::caller).collect() }))
    }

    #[tracing::instrument(name = "grpc.rotate_caller", skip_all)]
    async fn rotate_caller(
        &self,
        request: Request<pb::RotateCallerRequest>,
    ) -> Result<Response<pb::RotateCallerResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "managing callers")?;
        let id = CallerId::parse("id", &request.into_inner().id).map_err(invalid)?;
        let issued = self.app.rotate_caller(id, &by).await?;
        tracing::info!(caller = %id, "caller rotated");
        Ok(Response::new(pb::RotateCallerResponse {
            caller: Some(convert::caller(&issued.caller)),
            credential: issued.credential,
        }))
    }

    #[tracing::instrument(name = "grpc.revoke_caller", skip_all)]
    async fn revoke_caller(
        &self,
        request: Request<pb::RevokeCallerRequest>,
    ) -> Result<Response<pb::RevokeCallerResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "managing callers")?;
        let r = request.into_inner();
        let id = CallerId::parse("id", &r.id).map_err(invalid)?;
        let caller = self.app.revoke_caller(id, r.previous_secret_only, &by).await?;
        tracing::info!(caller = %id, previous_secret_only = r.previous_secret_only, "caller revoked");
        Ok(Response::new(pb::RevokeCallerResponse { caller: Some(convert::caller(&caller)) }))
    }

    #[tracing::instrument(name = "grpc.list_audit_events", skip_all)]
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        check_unconfined(&actor(&request), "reading the audit trail")?;
        let r = request.into_inner();
        let filter = AuditFilter {
            key_id: (!r.key_id.is_empty()).then(|| KeyId::parse(r.key_id)).transpose().map_err(invalid)?,
            caller_id: (!r.caller_id.is_empty())
                .then(|| CallerId::parse("caller_id", &r.caller_id))
                .transpose()
                .map_err(invalid)?,
            since: r
                .start_time
                .as_ref()
                .map(|t| convert::stored_instant(t, "start_time"))
                .transpose()
                .map_err(invalid)?,
            until: r
                .end_time
                .as_ref()
                .map(|t| convert::stored_instant(t, "end_time"))
                .transpose()
                .map_err(invalid)?,
            before_id: decode_token(&r.page_token).map_err(invalid)?,
        };
        let page_size = convert::page_size(r.page_size, DEFAULT_AUDIT_PAGE).map_err(invalid)?;
        let (events, next) = self.app.audit_events(filter, page_size).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.iter().map(convert::audit_event).collect(),
            next_page_token: next.map(|id| format!("a1.{id}")).unwrap_or_default(),
        }))
    }

    #[tracing::instrument(name = "grpc.put_rate_limit_rule", skip_all)]
    async fn put_rate_limit_rule(
        &self,
        request: Request<pb::PutRateLimitRuleRequest>,
    ) -> Result<Response<pb::PutRateLimitRuleResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "managing rate-limit rules")?;
        let rule =
            convert::rule(request.into_inner().rule, &self.default_unit, self.app.now()).map_err(invalid)?;
        self.app.put_rule(rule.clone(), &by).await?;
        Ok(Response::new(pb::PutRateLimitRuleResponse { rule: Some(convert::rule_to_pb(&rule)) }))
    }

    #[tracing::instrument(name = "grpc.list_rate_limit_rules", skip_all)]
    async fn list_rate_limit_rules(
        &self,
        request: Request<pb::ListRateLimitRulesRequest>,
    ) -> Result<Response<pb::ListRateLimitRulesResponse>, Status> {
        check_unconfined(&actor(&request), "reading rate-limit rules")?;
        let rules = self.app.list_rules().await?;
        Ok(Response::new(pb::ListRateLimitRulesResponse {
            rules: rules.iter().map(convert::rule_to_pb).collect(),
        }))
    }

    #[tracing::instrument(name = "grpc.delete_rate_limit_rule", skip_all)]
    async fn delete_rate_limit_rule(
        &self,
        request: Request<pb::DeleteRateLimitRuleRequest>,
    ) -> Result<Response<pb::DeleteRateLimitRuleResponse>, Status> {
        let by = actor(&request);
        check_unconfined(&by, "managing rate-limit rules")?;
        let name = LimitName::parse(request.into_inner().name)
            .map_err(|e| invalid(InvalidArgument::new("name", e.reason)))?;
        self.app.delete_rule(name, &by).await?;
        Ok(Response::new(pb::DeleteRateLimitRuleResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_checked() {
        assert_eq!(decode_token("").unwrap(), None);
        assert_eq!(decode_token("a1.42").unwrap(), Some(42));
        for bad in ["42", "a1.", "a1.-1", "a1.0", "a1.x", "a1.99999999999999999999"] {
            assert_eq!(decode_token(bad).unwrap_err().field, "page_token", "{bad}");
        }
    }
}
