//! The agent's side: one key per intent, and retries that carry it.
//!
//! The server half of this crate makes a retried write execute once; this
//! half makes the retry happen under the same key. The key is fixed before
//! the first attempt ([`IntentKey`], derived from what the intent *is*, or
//! random and kept), and every attempt of that intent carries it.

mod intent;

pub(crate) use intent::canonical_json;
pub use intent::{IntentKey, IntentKeyError};
