//! What the layer benches share: a 1 KiB handler, its requests, and
//! running one to its end.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt, service_fn};

pub const KIB: &[u8] = &[b'a'; 1024];

/// A trivial handler answering with 1 KiB.
pub fn handler<B>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    service_fn(|_req: Request<B>| async { Ok(Response::new(Full::new(Bytes::from_static(KIB)))) })
}

pub fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::post("/book")
        .header("content-type", "application/json")
        .header("authorization", "Bearer bench");
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    req.body(Full::new(Bytes::from_static(KIB))).unwrap()
}

pub fn get() -> Request<Full<Bytes>> {
    Request::get("/book").body(Full::default()).unwrap()
}

/// Runs one request to its end, body included (the record completes there).
pub async fn run<S, B>(svc: &S, req: Request<Full<Bytes>>) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}
