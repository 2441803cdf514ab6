//! [`BoxStore`]: a store chosen at run time.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;

use super::{Claim, Peeked, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe mirror of [`Store`], implemented for every store.
trait DynStore: Send + Sync + 'static {
    fn claim<'a>(
        &'a self,
        key: RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;
    fn renew<'a>(
        &'a self,
        key: RecordKey,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn complete<'a>(
        &'a self,
        key: RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn release<'a>(&'a self, key: RecordKey, token: Token)
    -> BoxFuture<'a, Result<(), StoreError>>;
    fn peek<'a>(&'a self, key: RecordKey) -> BoxFuture<'a, Result<Peeked, StoreError>>;
    fn name(&self) -> &'static str;
}

impl<S: Store> DynStore for S {
    fn claim<'a>(
        &'a self,
        key: RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move { Store::claim(self, &key, fingerprint, lease).await })
    }

    fn renew<'a>(
        &'a self,
        key: RecordKey,
        token: Token,
        lease: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Store::renew(self, &key, token, lease).await })
    }

    fn complete<'a>(
        &'a self,
        key: RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Store::complete(self, &key, token, record, ttl).await })
    }

    fn release<'a>(
        &'a self,
        key: RecordKey,
        token: Token,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Store::release(self, &key, token).await })
    }

    fn peek<'a>(&'a self, key: RecordKey) -> BoxFuture<'a, Result<Peeked, StoreError>> {
        Box::pin(async move { Store::peek(self, &key).await })
    }

    fn name(&self) -> &'static str {
        Store::name(self)
    }
}

/// A type-erased [`Store`], so a server can pick its store at run time (from
/// configuration, say) and still name one layer type.
///
/// Cloning is cheap. Each call costs one allocation for the boxed future.
///
/// ```
/// use tower_idempotency::{BoxStore, IdempotencyLayer, MemoryStore};
///
/// let store = match std::env::var("IDEMPOTENCY_STORE").as_deref() {
///     // Ok("redis") => BoxStore::new(redis_store),
///     _ => BoxStore::new(MemoryStore::default()),
/// };
/// let layer: IdempotencyLayer<BoxStore> = IdempotencyLayer::new(store);
/// ```
#[derive(Clone)]
pub struct BoxStore(Arc<dyn DynStore>);

impl BoxStore {
    /// Erases the type of `store`.
    pub fn new(store: impl Store) -> Self {
        BoxStore(Arc::new(store))
    }
}

impl fmt::Debug for BoxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxStore")
    }
}

impl Store for BoxStore {
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.0.claim(key.clone(), fingerprint, lease)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.renew(key.clone(), token, lease)
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.complete(key.clone(), token, record, ttl)
    }

    fn release(
        &self,
        key: &RecordKey,
        token: Token,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.release(key.clone(), token)
    }

    fn peek(&self, key: &RecordKey) -> impl Future<Output = Result<Peeked, StoreError>> + Send {
        self.0.peek(key.clone())
    }

    fn name(&self) -> &'static str {
        self.0.name()
    }
}
