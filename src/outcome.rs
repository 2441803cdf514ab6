//! What the layer did with a request, for logging and metrics layers.

use crate::RejectionKind;

/// Put in the response's extensions by the layer for every request that
/// carried a key (and every rejected one), so outer layers can log or count
/// it. Requests the layer passes through untouched (methods it does not
/// protect, or no key when keys are optional) carry none.
///
/// ```
/// use tower_idempotency::Outcome;
///
/// fn label(response: &http::Response<()>) -> &'static str {
///     match response.extensions().get::<Outcome>() {
///         Some(Outcome::Executed) => "executed",
///         Some(Outcome::Replayed) => "replayed",
///         Some(Outcome::Rejected(_)) => "rejected",
///         Some(_) => "other",
///         None => "unprotected",
///     }
/// }
/// # assert_eq!(label(&http::Response::new(())), "unprotected");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The request claimed its key and the service ran.
    Executed,
    /// The response is a replay of the key's recorded response.
    Replayed,
    /// The layer answered with a rejection; the service did not run.
    Rejected(RejectionKind),
    /// The store failed and the layer is configured to fail open: the service
    /// ran without protection.
    FailedOpen,
}
