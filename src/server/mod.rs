//! The server half: the tower layer and what runs a protected request.
//!
//! - `layer`: [`IdempotencyLayer`](crate::IdempotencyLayer), its settings
//!   and the shared `Config`;
//! - `service`: [`Idempotency`](crate::Idempotency), the request path, from
//!   the key's check to the recorded response;
//! - `future`: [`ResponseFuture`](crate::ResponseFuture), which finishes a
//!   protected request in the background when its client goes away;
//! - `body`: the request body handed to the service and the response body
//!   that tees what it streams into the record;
//! - `claim`: a claim held by this process (renew, complete, release,
//!   retry);
//! - `background`: the requests and completions running for clients that
//!   left, and the drain at shutdown;
//! - `budget`: the bound on request bytes buffered at once.

pub(crate) mod background;
pub(crate) mod body;
pub(crate) mod budget;
pub(crate) mod claim;
pub(crate) mod future;
pub(crate) mod layer;
pub(crate) mod service;
