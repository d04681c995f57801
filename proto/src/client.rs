//! Connecting a gRPC client to huskd, the one way the CLI and the containerd shim do it.
//!
//! Addresses: `unix:///path/to/huskd.sock` (huskd's default transport) or `http://HOST:PORT`
//! (huskd `--tcp`). Every other form is refused before any connection is tried.

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why no channel to huskd could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Neither `unix://` nor `http://`.
    #[error("huskd address {0:?}: use unix:///path/to/huskd.sock or http://HOST:PORT")]
    BadAddress(String),
    /// The address is well-formed but nothing answered there; `message` is the cause chain.
    #[error("cannot reach huskd at {host}: {message}")]
    Unreachable { host: String, message: String },
}

/// A channel to huskd at `host`.
pub async fn channel(host: &str) -> Result<Channel, ConnectError> {
    let unreachable = |e: tonic::transport::Error| ConnectError::Unreachable {
        host: host.to_string(),
        message: source_chain(&e),
    };
    if let Some(path) = host.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is required by the API but unused: every connection goes to the socket.
        Endpoint::from_static("http://huskd.local")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(unreachable)
    } else if host.starts_with("http://") {
        Endpoint::from_shared(host.to_string())
            .map_err(|_| ConnectError::BadAddress(host.to_string()))?
            .connect()
            .await
            .map_err(unreachable)
    } else {
        Err(ConnectError::BadAddress(host.to_string()))
    }
}

/// An error and its sources, `: `-separated (tonic's own message alone says "transport error").
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unix_and_http_addresses_are_tried() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for bad in ["/run/husk/huskd.sock", "tcp://1.2.3.4:5", ""] {
            let e = runtime.block_on(channel(bad)).unwrap_err();
            assert!(matches!(e, ConnectError::BadAddress(_)), "{bad}: {e}");
        }
        let e = runtime
            .block_on(channel("unix:///nonexistent/huskd.sock"))
            .unwrap_err();
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
