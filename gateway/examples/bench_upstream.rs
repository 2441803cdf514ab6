//! A minimal upstream for the gateway's load comparison: answers every
//! request with a small JSON body (`201` for `POST`), keep-alive, on the
//! address given (default `127.0.0.1:8080`). See `scripts/gateway-load.sh`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    println!("listening on http://{}", listener.local_addr().unwrap());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let post = req.method() == Method::POST;
                    // Read the whole request, as a real handler would.
                    let _ = req.into_body().collect().await;
                    let mut response = Response::new(Full::new(Bytes::from_static(
                        br#"{"appointment":"a-1","slot":"09:00"}"#,
                    )));
                    if post {
                        *response.status_mut() = StatusCode::CREATED;
                    }
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
