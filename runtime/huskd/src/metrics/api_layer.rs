//! A tower layer around the gRPC server that times every call for
//! `husk_api_request_duration_seconds`: from the request's arrival until the response (its
//! headers) is ready, labelled by method path and gRPC status code.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

use super::Registry;

/// Method paths recorded under their own name; anything else is `other` (so that a client
/// cannot grow the label set without bound).
const KNOWN_PREFIXES: &[&str] = &["/husk.v1.Husk/", "/grpc.health.v1.Health/"];

#[derive(Clone)]
pub struct ApiTimerLayer {
    registry: Arc<Registry>,
}

impl ApiTimerLayer {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl<S> tower::Layer<S> for ApiTimerLayer {
    type Service = ApiTimer<S>;

    fn layer(&self, inner: S) -> ApiTimer<S> {
        ApiTimer {
            inner,
            registry: Arc::clone(&self.registry),
        }
    }
}

#[derive(Clone)]
pub struct ApiTimer<S> {
    inner: S,
    registry: Arc<Registry>,
}

/// The method label of a request path.
fn method_label(path: &str) -> String {
    let known = KNOWN_PREFIXES.iter().any(|p| path.starts_with(p))
        && path.len() <= 96
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._".contains(&b));
    if known {
        path.to_string()
    } else {
        "other".to_string()
    }
}

/// The gRPC status code of a response by its headers: an error answered at once carries
/// `grpc-status` there ("trailers-only"); otherwise the call succeeded as far as its start
/// goes ("0"; a stream's final status is in its trailers, not seen here).
fn status_code(headers: &http::HeaderMap) -> String {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 2 && v.bytes().all(|b| b.is_ascii_digit()))
        .unwrap_or("0")
        .to_string()
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ApiTimer<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = method_label(request.uri().path());
        let start = Instant::now();
        let registry = Arc::clone(&self.registry);
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(response) => status_code(response.headers()),
                Err(_) => "transport".to_string(),
            };
            registry.observe_api(&method, &code, start.elapsed().as_secs_f64());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_stay_bounded() {
        assert_eq!(
            method_label("/husk.v1.Husk/CreateVm"),
            "/husk.v1.Husk/CreateVm"
        );
        assert_eq!(method_label("/evil.Service/x"), "other");
        assert_eq!(method_label("/husk.v1.Husk/\"x"), "other");
        let mut h = http::HeaderMap::new();
        assert_eq!(status_code(&h), "0");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_code(&h), "5");
        h.insert("grpc-status", http::HeaderValue::from_static("5; x"));
        assert_eq!(status_code(&h), "0");
    }
}
