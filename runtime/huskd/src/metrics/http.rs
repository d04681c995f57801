//! The metrics endpoint: a deliberately small HTTP/1.x server that answers `GET /metrics` (and
//! `HEAD`) and nothing else. A request head is read with a bound (8 KiB) and a time limit
//! (5 s); one request per connection; every answer closes it. Scrapes do not reach the gRPC API
//! and can change nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// The text exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    BadRequest,
}

/// Routes a request head (its first line decides).
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|b| *b == b'\n').next() else {
        return Route::BadRequest;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics { head_only: false },
        ("HEAD", "/metrics") => Route::Metrics { head_only: true },
        (_, "/metrics") => Route::BadMethod,
        _ => Route::NotFound,
    }
}

/// Reads a request head: up to the blank line, at most [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n.min(MAX_HEAD - head.len())]);
    }
    Some(head)
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

async fn serve_one<F, Fut>(mut stream: TcpStream, render: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await else {
        let _ = stream
            .write_all(&response(
                "400 Bad Request",
                "text/plain",
                "bad request\n",
                false,
            ))
            .await;
        return;
    };
    let answer = match route(&head) {
        Route::Metrics { head_only } => {
            response("200 OK", CONTENT_TYPE, &render().await, head_only)
        }
        Route::NotFound => response("404 Not Found", "text/plain", "only /metrics here\n", false),
        Route::BadMethod => response(
            "405 Method Not Allowed",
            "text/plain",
            "GET or HEAD only\n",
            false,
        ),
        Route::BadRequest => response("400 Bad Request", "text/plain", "bad request\n", false),
    };
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
}

/// Binds `addr` now (so that a bad address fails huskd's start) and returns the server to run.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves scrapes on `listener` for ever; `render` makes the page.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            serve_one(stream, render).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_and_head_of_metrics_are_served() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
    }

    #[tokio::test]
    async fn a_scrape_gets_the_page_and_oversized_or_odd_requests_are_refused() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, || async { "husk_up 1\n".to_string() }));
        let ask = |request: Vec<u8>| async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&request).await.unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nhusk_up 1\n"), "{ok}");
        // An endless head is cut off (the answer may be lost to the reset of the unread rest).
        let big = ask([b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 20_000]].concat()).await;
        assert!(!big.contains("200 OK"), "{big}");
        let other = ask(b"GET /admin HTTP/1.1\r\n\r\n".to_vec()).await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
