//! A tonic booking service behind the idempotency layer: the gRPC demo of
//! `tower-idempotency`.
//!
//! `Book` is protected: keys are required (`idempotency-key` metadata), the
//! caller comes from the `authorization` metadata (`Bearer ada.v1` and
//! `Bearer ada.v2` are two tokens of `ada`), and rejections are gRPC
//! statuses. `ListBookings` is a read and passes through.
//!
//! The binary (`src/main.rs`) serves it; the tests under `tests/` drive it
//! with the tonic client over real TCP.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};
use tower_idempotency::{IdempotencyLayer, Principal, Store};

/// The generated `booking.v1` messages, client and server.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("booking.v1");
}

use proto::{
    BookRequest, Booking, ListBookingsRequest, ListBookingsResponse,
    bookings_server::{self, BookingsServer},
};

/// The full path of the protected method.
pub const BOOK: &str = "/booking.v1.Bookings/Book";

/// The bookings ever stored, shared by clones.
#[derive(Debug, Clone, Default)]
pub struct Bookings {
    rows: Arc<Mutex<Vec<Booking>>>,
    next_id: Arc<AtomicU64>,
    unavailable: Arc<AtomicU32>,
}

impl Bookings {
    /// Every booking stored so far.
    pub fn rows(&self) -> Vec<Booking> {
        self.rows.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Makes the next `calls` bookings fail with `UNAVAILABLE` before they
    /// store anything, as a backend that is briefly down does.
    pub fn fail_next(&self, calls: u32) {
        self.unavailable.store(calls, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl bookings_server::Bookings for Bookings {
    async fn book(&self, request: Request<BookRequest>) -> Result<Response<Booking>, Status> {
        let request = request.into_inner();
        if request.caller.is_empty() || request.slot.is_empty() || request.provider.is_empty() {
            return Err(Status::invalid_argument(
                "caller, slot and provider are required",
            ));
        }
        let down = self
            .unavailable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if down {
            return Err(Status::unavailable(
                "the practice system is unavailable; nothing was booked",
            ));
        }
        if request.delay_ms > 0 {
            // The practice-management system takes its time to commit.
            tokio::time::sleep(Duration::from_millis(request.delay_ms.min(60_000))).await;
        }
        let booking = Booking {
            id: self.next_id.fetch_add(1, Ordering::SeqCst) + 1,
            caller: request.caller,
            slot: request.slot,
            provider: request.provider,
        };
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(booking.clone());
        Ok(Response::new(booking))
    }

    async fn list_bookings(
        &self,
        _request: Request<ListBookingsRequest>,
    ) -> Result<Response<ListBookingsResponse>, Status> {
        Ok(Response::new(ListBookingsResponse {
            bookings: self.rows(),
        }))
    }
}

/// The layer as the demo configures it: `Book` protected, keys required,
/// gRPC statuses for rejections and for what is recorded.
pub fn idempotency<St>(store: St) -> IdempotencyLayer<St>
where
    St: Clone,
{
    IdempotencyLayer::new(store)
        .with_grpc([BOOK])
        .with_required_key(true)
}

/// The caller of a request: the part of its bearer token before the first
/// `.`, as the HTTP demo has it.
pub fn principal_of<B>(request: &http::Request<B>) -> Option<Principal> {
    let value = request.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let id = token.trim().split('.').next()?;
    (!id.is_empty()).then(|| Principal::new(id))
}

/// Authentication as a tower layer in front of the idempotency layer: puts
/// the caller's [`Principal`] into the request extensions. A keyed call
/// without one is rejected by the idempotency layer (`UNAUTHENTICATED`).
pub fn authenticate<B>(mut request: http::Request<B>) -> http::Request<B> {
    if let Some(principal) = principal_of(&request) {
        request.extensions_mut().insert(principal);
    }
    request
}

/// Serves `bookings` on `listener` behind `layer` until `shutdown`
/// resolves, then returns (the caller drains the layer). Connections use
/// `TCP_NODELAY`, as gRPC servers should: a response written in more than
/// one piece must not wait for the client's delayed ACK.
pub async fn serve<St>(
    listener: TcpListener,
    layer: IdempotencyLayer<St>,
    bookings: Bookings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error>
where
    St: Store + Clone,
{
    tonic::transport::Server::builder()
        .layer(tower::util::MapRequestLayer::new(authenticate))
        .layer(layer)
        .add_service(BookingsServer::new(bookings))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
