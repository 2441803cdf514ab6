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
//! | 408, 425, 429, 502, 503, 504 | yes, after `Retry-After` when given | the server or a proxy says "not processed, try again" |
//! | 409 with problem `code` `request-in-flight` | yes, after `Retry-After` | the first attempt is still running; the retry gets its answer |
//! | 400, 422, any other 4xx | no | a reused key or a bad request does not get better |
//! | 500 and other 5xx | no | the work may have happened; a retry with the key would get the same recorded answer |
//! | any answer, for a request without a key whose method is not idempotent | no | nothing ties a second attempt to the first |

mod intent;
mod policy;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
mod reqwest;
mod retry;

pub(crate) use intent::check_numbers;
pub use intent::{IntentKey, IntentKeyError};
#[cfg(feature = "reqwest")]
pub use reqwest::RetryMiddleware;
pub use retry::{
    AttemptEvent, AttemptOutcome, Ending, Retry, RetryBody, RetryError, RetryErrorKind,
    RetryFuture, RetryLayer, RetryReport,
};
