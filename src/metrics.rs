//! Metrics through the `metrics` facade (feature `metrics`): every decision
//! of the layer and of its store, for whatever recorder the application
//! installs (Prometheus, StatsD, OpenTelemetry). Without the feature, or
//! without a recorder, each call here costs next to nothing.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `idempotency_requests_total` | counter | `outcome`, `route` | keyed requests by how they ended: `executed`, `replayed`, `failed_open`, or the rejection's code (`missing_key`, `invalid_key`, `key_reused`, `anonymous_request`, `request_in_flight`, `body_too_large`, `body_unreadable`, `response_not_retained`, `store_unavailable`, `outcome_unknown`, `audit_unavailable`) |
//! | `idempotency_store_operation_duration_seconds` | histogram | `operation`, `store` | time of each `claim`, `renew`, `complete`, `release` |
//! | `idempotency_store_errors_total` | counter | `operation`, `store`, `error` | store operations that failed: `unavailable`, `timeout`, `full`, `corrupt`, `fenced` |
//! | `idempotency_leases_taken_over_total` | counter | | claims that took over a lapsed claim |
//! | `idempotency_completions_fenced_total` | counter | | completions refused because another claim took the key over |
//! | `idempotency_completions_retried_total` | counter | | completion attempts after the store failed to take a record |
//! | `idempotency_completions_abandoned_total` | counter | | records given up after the completion retry limit |
//! | `idempotency_records_evicted_live_total` | counter | `store` | records a bounded store evicted before their TTL |
//! | `idempotency_detached_requests` | gauge | | requests running after their client went away |
//! | `idempotency_recorded_bytes_total` | counter | | bytes of records the store took |
//!
//! `route` is the label [`IdempotencyLayer::with_metrics_route`](crate::IdempotencyLayer::with_metrics_route)
//! gives a request: by default axum's matched route template (feature
//! `axum`, when the layer runs inside the router), else `other`. Never the
//! key, the scope or the raw path.

#[cfg(feature = "metrics")]
use std::time::Duration;

use crate::{Outcome, RejectionKind};

/// The `outcome` label of an outcome.
pub(crate) fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Executed => "executed",
        Outcome::Replayed => "replayed",
        Outcome::FailedOpen => "failed_open",
        Outcome::Rejected(kind) => match kind {
            RejectionKind::MissingKey => "missing_key",
            RejectionKind::InvalidKey => "invalid_key",
            RejectionKind::KeyReused => "key_reused",
            RejectionKind::AnonymousRequest => "anonymous_request",
            RejectionKind::RequestInFlight => "request_in_flight",
            RejectionKind::BodyTooLarge => "body_too_large",
            RejectionKind::BodyUnreadable => "body_unreadable",
            RejectionKind::ResponseNotRetained => "response_not_retained",
            RejectionKind::StoreUnavailable => "store_unavailable",
            RejectionKind::OutcomeUnknown => "outcome_unknown",
            RejectionKind::AuditUnavailable => "audit_unavailable",
            RejectionKind::Overloaded => "overloaded",
        },
    }
}

/// A keyed request ended with `outcome`.
#[inline]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) fn request(outcome: Option<&Outcome>, route: String) {
    #[cfg(feature = "metrics")]
    if let Some(outcome) = outcome {
        metrics::counter!(
            "idempotency_requests_total",
            "outcome" => outcome_label(outcome),
            "route" => route,
        )
        .increment(1);
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, route);
}

/// A store operation took `elapsed` and ended with `error` (`None`: it
/// succeeded).
#[inline]
#[cfg(feature = "metrics")]
pub(crate) fn store_operation(
    operation: &'static str,
    store: &'static str,
    elapsed: Duration,
    error: Option<&'static str>,
) {
    metrics::histogram!(
        "idempotency_store_operation_duration_seconds",
        "operation" => operation,
        "store" => store,
    )
    .record(elapsed.as_secs_f64());
    if let Some(error) = error {
        metrics::counter!(
            "idempotency_store_errors_total",
            "operation" => operation,
            "store" => store,
            "error" => error,
        )
        .increment(1);
    }
}

macro_rules! plain_counter {
    ($(#[$doc:meta] $fn:ident => $name:literal),* $(,)?) => {
        $(
            #[$doc]
            #[inline]
            pub(crate) fn $fn() {
                #[cfg(feature = "metrics")]
                metrics::counter!($name).increment(1);
            }
        )*
    };
}

plain_counter! {
    /// A claim took over a lapsed claim.
    lease_taken_over => "idempotency_leases_taken_over_total",
    /// A completion was fenced.
    completion_fenced => "idempotency_completions_fenced_total",
    /// A completion was tried again after a store failure.
    completion_retried => "idempotency_completions_retried_total",
    /// A record was given up after the completion retry limit.
    completion_abandoned => "idempotency_completions_abandoned_total",
}

/// A bounded store evicted a record before its TTL.
#[inline]
pub(crate) fn evicted_live(store: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_records_evicted_live_total", "store" => store).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = store;
}

/// The number of requests running after their client left changed by
/// `delta`.
#[inline]
pub(crate) fn detached(delta: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("idempotency_detached_requests").increment(delta);
    #[cfg(not(feature = "metrics"))]
    let _ = delta;
}

/// The store took a record of `bytes`.
#[inline]
pub(crate) fn recorded(bytes: usize) {
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_recorded_bytes_total").increment(bytes as u64);
    #[cfg(not(feature = "metrics"))]
    let _ = bytes;
}
