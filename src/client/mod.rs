//! The agent's side: one key per intent, and retries that carry it.
//!
//! The server half of this crate makes a retried write execute once; this
//! half makes the retry happen under the same key. The key is fixed before
//! the first attempt ([`IntentKey`], derived from what the intent *is*, or
//! random and kept), and every attempt of that intent carries it
//! ([`RetryLayer`] for any tower HTTP client, `RetryMiddleware` for
//! `reqwest` with the `reqwest` feature).
//!
//! | answer | retried? | why |
//! |---|---|---|
//! | connection refused or reset, no answer within the attempt timeout | yes | not done, or not known to be done: the key makes the retry safe |
//! | 408, 425, 429, 502, 503, 504 | yes, after `Retry-After` when given | "try again": 408, 425 and 429 say nothing ran, as does a 503 whose code says so (`store-unavailable`, `overloaded`, ...); a 502, 504 or other 503 may come from a proxy after it forwarded the request |
//! | 409 in flight: `code` `request-in-flight` or `idempotency_key_in_use`; for a keyed request, a 409 problem without a `code` (the IETF draft's) or a 409 with `Retry-After` | yes, after `Retry-After` | the first attempt is still running; the retry gets its answer |
//! | 400, 422, any other 4xx (another 409 included) | no | a reused key or a bad request does not get better |
//! | 500 and other 5xx | no | the work may have happened; a retry with the key would get the same recorded answer |
//! | any answer, for a request without a key whose method is not idempotent | no | nothing ties a second attempt to the first |
//!
//! To judge a 409, the client reads its body when its media type is JSON
//! (`application/json` or any `+json`, in any case), and a 500, 502 or 503
//! problem document, whatever its framing (a length, chunks, or until the
//! connection closes): at most 64 KiB within the attempt's time. The body
//! read is handed back whole.
//!
//! These rules are [`DefaultPolicy`]. Another server's "still running" or
//! "not processed" can be taught with a [`RetryPolicy`] (a closure will
//! do): for a whole client through [`RetryLayer::with_policy`], for one
//! request as a [`RequestPolicy`] in its extensions.

mod finite;
mod intent;
mod learnt;
mod policy;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
mod reqwest;
mod retry;

pub(crate) use finite::has_non_finite;
pub(crate) use intent::check_numbers;
pub use intent::{IntentKey, IntentKeyError};
pub use learnt::LearntTimeout;
pub use policy::{Answer, DefaultPolicy, Judgement, Reach, RequestPolicy, RetryPolicy};
#[cfg(feature = "reqwest")]
pub use reqwest::RetryMiddleware;
pub use retry::{
    AttemptEvent, AttemptOutcome, Ending, Retry, RetryBody, RetryError, RetryErrorKind,
    RetryFuture, RetryLayer, RetryReport,
};
