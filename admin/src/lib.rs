//! The admin HTTP server every Mycel process runs (the proxy on 15020, the control plane on
//! 15014, the operator on its admin port): health, metrics and debugging, HTTP/1.1 only.
//!
//! One implementation, so that all three hold the same line against a hostile caller: a request
//! head must arrive within [`HEAD_TIMEOUT`], an accept error (out of descriptors) pauses the loop
//! instead of ending or spinning it, and every path that is not declared public answers only on
//! loopback — reached with `kubectl port-forward` — with a 403 that says so.

#![forbid(unsafe_code)]

use std::{convert::Infallible, future::Future, net::IpAddr, sync::Arc, time::Duration};

use http_body_util::Full;
pub use hyper::{Method, StatusCode};
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// Longest a caller may take to send a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an accept error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A request, as a handler sees it.
#[derive(Clone, Debug)]
pub struct Asked {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
}

impl Asked {
    /// The value of `name` in the query string, with `%2C` and `%3D` decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.replace("%2C", ",").replace("%3D", "="))
    }
}

/// An answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain", body: body.into() }
    }

    pub fn json(body: impl Into<String>) -> Reply {
        Reply { status: StatusCode::OK, content_type: "application/json", body: body.into() }
    }

    /// Prometheus text exposition.
    pub fn metrics(body: impl Into<String>) -> Reply {
        Reply { status: StatusCode::OK, content_type: "text/plain; version=0.0.4", body: body.into() }
    }

    pub fn not_found() -> Reply {
        Reply::text(StatusCode::NOT_FOUND, "not found\n")
    }
}

/// Who may ask what.
pub struct Access {
    /// Paths answered to any caller (probes, metrics); every other path only on loopback.
    pub public: fn(&str) -> bool,
    /// How to reach a loopback-only path, for the 403's message (e.g. "use `kubectl
    /// port-forward pod/<pod> 15020` and ask 127.0.0.1:15020").
    pub how: &'static str,
}

/// Whether `path` answers a caller at `peer` under `access`.
pub fn answers(access: &Access, path: &str, peer: IpAddr) -> bool {
    peer.is_loopback() || peer.to_canonical().is_loopback() || (access.public)(path)
}

/// Serves `handler` on `listener` until the task is dropped.
pub async fn serve<H, F>(listener: TcpListener, access: Access, handler: H)
where
    H: Fn(Asked) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    let access = Arc::new(access);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: give a closing connection a moment.
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let (handler, access) = (handler.clone(), access.clone());
        let peer = peer.ip();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (handler, access) = (handler.clone(), access.clone());
                async move {
                    let path = req.uri().path().to_string();
                    let reply = if answers(&access, &path, peer) {
                        let asked = Asked {
                            method: req.method().clone(),
                            query: req.uri().query().map(str::to_string),
                            path,
                        };
                        handler(asked).await
                    } else {
                        Reply::text(
                            StatusCode::FORBIDDEN,
                            format!("{path} answers only on localhost: {}\n", access.how),
                        )
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(reply.status)
                            .header("content-type", reply.content_type)
                            .body(Full::new(Bytes::from(reply.body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn access() -> Access {
        Access { public: |p| p == "/metrics", how: "use a port-forward" }
    }

    #[test]
    fn only_public_paths_answer_off_loopback() {
        let pod_net: IpAddr = "10.244.0.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let a = access();
        assert!(answers(&a, "/metrics", pod_net));
        assert!(!answers(&a, "/debug", pod_net));
        for local in ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap(), mapped] {
            assert!(answers(&a, "/debug", local));
        }
    }

    #[tokio::test]
    async fn it_answers_and_a_silent_caller_is_dropped_after_the_head_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(serve(l, access(), |a: Asked| async move {
            Reply::text(StatusCode::OK, format!("{} {} {:?}", a.method, a.path, a.param("level")))
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x?level=a%2Cb HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("GET /x Some(\"a,b\")"), "{out}");

        tokio::time::pause();
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET / HTT").await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(HEAD_TIMEOUT * 2, silent.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(_)) | Ok(Err(_))), "the connection was closed, not left open");
    }
}
