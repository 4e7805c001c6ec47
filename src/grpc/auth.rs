//! Authentication and authorisation at the edge: every call but health and reflection presents a credential
//! (`authorization: Bearer <caller id>:<secret>`), checked against the replica's cached copy of the callers
//! table (no database round trip), and must hold the scope of its method. Tenant checks (key prefixes) need
//! the decoded request and happen in the services.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use metrics::counter;
use tonic::Status;

use crate::app::CallerCache;
use crate::domain::{Actor, AuthFailure, Caller, Credential, KeyId, Scope};

/// The caller a call was authenticated as, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Caller);

/// The call's request id (the client's `x-request-id`, or one made up), in the request's extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requirement {
    /// Health and reflection: Kubernetes probes and grpcurl carry no credential.
    Open,
    /// A valid credential and, if any, this scope.
    Caller(Option<Scope>),
}

const OPEN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The scope of every method; a method of ours missing here needs a credential but no scope (so a new method
/// is never open by accident).
fn requirement(path: &str) -> Requirement {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if OPEN_SERVICES.contains(&service) {
        return Requirement::Open;
    }
    let scope = match (service, method) {
        ("allowance.v1.SpendingLimits", "ReserveSpending" | "Commit" | "Reverse") => Some(Scope::Spend),
        ("allowance.v1.SpendingLimits", "GetLimits" | "GetTransaction" | "ListTransactions") => {
            Some(Scope::Read)
        }
        (
            "allowance.v1.SpendingLimits",
            "SetLimit" | "RemoveLimit" | "PutLimit" | "DeleteLimit" | "PutPlan" | "GetPlan" | "ListPlans"
            | "DeletePlan" | "AssignPlan",
        ) => Some(Scope::Admin),
        ("allowance.v1.AdminService", _) => Some(Scope::Admin),
        ("allowance.v1.RateLimitService", _) | ("envoy.service.ratelimit.v3.RateLimitService", _) => {
            Some(Scope::RateLimit)
        }
        _ => None,
    };
    Requirement::Caller(scope)
}

/// Counts and logs a refusal. Never the secret; the caller id is not secret.
pub fn refused(failure: AuthFailure, method: &str, caller: Option<String>) -> Status {
    counter!("allowance_auth_failures_total", "reason" => failure.reason()).increment(1);
    let method = method.rsplit('/').next().unwrap_or_default();
    tracing::info!(reason = failure.reason(), method, caller = caller.as_deref(), "call refused");
    match failure {
        AuthFailure::Missing => Status::unauthenticated(
            "missing credential: send the metadata `authorization: Bearer <caller id>:<secret>`",
        ),
        AuthFailure::Malformed => Status::unauthenticated(
            "malformed credential: expected `authorization: Bearer <caller id>:<secret>`",
        ),
        // One answer for all three: a guesser must not learn which ids exist or were revoked.
        AuthFailure::UnknownCaller | AuthFailure::WrongSecret | AuthFailure::Revoked => {
            Status::unauthenticated("invalid credential")
        }
        AuthFailure::MissingScope(scope) => {
            Status::permission_denied(format!("the caller lacks the `{scope}` scope that {method} needs"))
        }
        AuthFailure::OtherTenant => {
            Status::permission_denied("the key is outside the key prefixes this caller is confined to")
        }
        AuthFailure::Unavailable => Status::unavailable(
            "credentials cannot be checked right now (the database is unreachable); retry later",
        ),
    }
}

/// Checks a call's credential. `Ok(None)`: nothing to check (an open method).
fn check(cache: &CallerCache, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Status> {
    let Requirement::Caller(scope) = requirement(path) else { return Ok(None) };
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(refused(AuthFailure::Missing, path, None));
    };
    let credential = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| Credential::parse(token.trim()))?
        })
        .ok_or_else(|| refused(AuthFailure::Malformed, path, None))?;
    cache
        .authenticate(&credential, scope)
        .map(Some)
        .map_err(|failure| refused(failure, path, Some(credential.id.to_string())))
}

/// The tower layer; `None` turns authentication off (every call is anonymous and unconfined).
#[derive(Clone)]
pub struct AuthLayer {
    cache: Option<Arc<CallerCache>>,
}

impl AuthLayer {
    pub fn new(cache: Option<Arc<CallerCache>>) -> Self {
        Self { cache }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, cache: self.cache.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    cache: Option<Arc<CallerCache>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(cache) = &self.cache {
            match check(cache, request.uri().path(), request.headers()) {
                Ok(Some(caller)) => {
                    request.extensions_mut().insert(Authenticated(caller));
                }
                Ok(None) => {}
                Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
            }
        }
        Box::pin(self.inner.call(request))
    }
}

/// Who makes the call, for tenant checks and the audit trail.
pub fn actor<T>(request: &tonic::Request<T>) -> Actor {
    let request_id = request.extensions().get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
    match request.extensions().get::<Authenticated>() {
        Some(Authenticated(caller)) => Actor::of(caller, request_id),
        None => Actor::anonymous("anonymous", request_id),
    }
}

/// PERMISSION_DENIED unless the actor may touch every key.
pub fn check_keys<'a>(actor: &Actor, keys: impl IntoIterator<Item = &'a KeyId>) -> Result<(), Status> {
    if keys.into_iter().all(|k| actor.may_touch(k)) {
        return Ok(());
    }
    Err(refused(AuthFailure::OtherTenant, "", actor.caller_id.map(|id| id.to_string())))
}

/// PERMISSION_DENIED for a caller confined to key prefixes: plans, callers and the audit trail are shared by
/// every tenant.
pub fn check_unconfined(actor: &Actor, what: &str) -> Result<(), Status> {
    if !actor.key_prefixes.is_confined() {
        return Ok(());
    }
    counter!("allowance_auth_failures_total", "reason" => AuthFailure::OtherTenant.reason()).increment(1);
    Err(Status::permission_denied(format!(
        "{what} needs a caller that is not confined to key prefixes: they are shared by every tenant"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_ours_needs_a_credential_and_only_probes_are_open() {
        assert_eq!(requirement("/grpc.health.v1.Health/Check"), Requirement::Open);
        assert_eq!(
            requirement("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Requirement::Open
        );
        assert_eq!(
            requirement("/allowance.v1.SpendingLimits/Commit"),
            Requirement::Caller(Some(Scope::Spend))
        );
        assert_eq!(
            requirement("/allowance.v1.SpendingLimits/GetLimits"),
            Requirement::Caller(Some(Scope::Read))
        );
        assert_eq!(
            requirement("/allowance.v1.SpendingLimits/PutPlan"),
            Requirement::Caller(Some(Scope::Admin))
        );
        assert_eq!(
            requirement("/allowance.v1.AdminService/ListCallers"),
            Requirement::Caller(Some(Scope::Admin))
        );
        // Unknown methods and look-alike services are not open.
        assert_eq!(requirement("/allowance.v1.SpendingLimits/Unknown"), Requirement::Caller(None));
        assert_eq!(requirement("/grpc.health.v1.HealthX/Check"), Requirement::Caller(None));
        assert_eq!(requirement("/"), Requirement::Caller(None));
    }
}
