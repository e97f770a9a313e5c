//! The proxy's own HTTP/1.1 server for plaintext client connections, in front of hyper's.
//!
//! hyper's HTTP/1 server keeps a read buffer and a write buffer (8 KiB each) for as long as a
//! connection lives, idle or not, and has no setting for either. Here a connection holds no
//! buffer between requests: it waits until the socket is readable, reads into one scratch
//! buffer per thread, and parses the head with `httparse`.
//!
//! This server answers the common case itself: a request whose head arrives whole in one read,
//! with no body (no `Content-Length` above 0, no `Transfer-Encoding`), no `Expect`, no protocol
//! switch (`Upgrade`, `CONNECT`), HTTP/1.1, and nothing after it in the read (no pipelining).
//! At the first request that is anything else, it hands the connection to hyper together with
//! the bytes read so far, and hyper serves the rest of the connection. Malformed heads go to
//! hyper too, so that the client gets hyper's error response.

use std::{
    cell::RefCell,
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::FutureExt;
use http_body_util::{BodyExt, Empty};
use hyper::{
    Method, Request, Response, StatusCode, Uri, Version,
    body::{Body as _, Bytes},
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::watch,
};

use crate::{error::ProxyError, http::Body};

/// The largest head read in one go; a longer one is hyper's to read.
const SCRATCH: usize = 16 * 1024;
/// Header lines a head may have here (hyper, which takes over beyond, allows 100).
const MAX_HEADERS: usize = 64;
/// A first body chunk up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    /// The `date` header, formatted once per second.
    static DATE: RefCell<(u64, HeaderValue)> = const { RefCell::new((0, HeaderValue::from_static(""))) };
}

/// How a connection's time with this server ended.
pub enum Outcome {
    /// It is over: either side closed it, it failed, or the proxy is draining.
    Closed,
    /// A request this server does not serve: hyper serves the connection from here on, starting
    /// with these bytes (already read from the socket).
    Handoff(Bytes),
}

// Lives for one read, on the stack: boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Read {
    Request { req: Request<Body>, close: bool, head_only: bool },
    Handoff(Bytes),
    Eof,
    Again,
}

/// Serves requests on `stream` with `respond` until the connection ends or a request needs
/// hyper. When `stop` fires, an idle connection is closed and a busy one is closed after its
/// response, which says `connection: close`. A connection that sends no request for `idle`
/// (after opening, or after a response) is closed.
pub async fn serve<F, Fut>(
    stream: &mut TcpStream,
    stop: &mut watch::Receiver<bool>,
    idle: std::time::Duration,
    mut respond: F,
) -> Outcome
where
    F: FnMut(Request<Body>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    // One timer for the connection's life, moved only when it fires: a request in between just
    // notes the time (no timer-wheel work per request), and a timer that fires early is set
    // again for what is left of the idle time.
    let mut since = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep_until(since + idle);
    tokio::pin!(idle_timer);
    loop {
        // Between requests the connection holds no buffer: wait until there are bytes to read.
        tokio::select! {
            biased;
            r = stream.readable() => if r.is_err() { return Outcome::Closed },
            _ = stop.changed() => return Outcome::Closed,
            _ = &mut idle_timer => {
                if tokio::time::Instant::now() < since + idle {
                    idle_timer.as_mut().reset(since + idle);
                    continue;
                }
                let _ = stream.shutdown().await;
                return Outcome::Closed;
            }
        }
        let read = SCRATCH_BUF.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Ok(Read::Eof),
            Ok(n) => Ok(parse(&buf[..n])),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Again),
            Err(e) => Err(e),
        });
        let (req, close, head_only) = match read {
            Ok(Read::Request { req, close, head_only }) => (req, close, head_only),
            Ok(Read::Handoff(bytes)) => return Outcome::Handoff(bytes),
            Ok(Read::Again) => continue,
            Ok(Read::Eof) | Err(_) => return Outcome::Closed,
        };
        let resp = respond(req).await;
        let close = close || *stop.borrow();
        if write_response(stream, resp, head_only, close).await.is_err() || close {
            let _ = stream.shutdown().await;
            return Outcome::Closed;
        }
        since = tokio::time::Instant::now();
    }
}

/// A request this server takes, or the bytes to hand to hyper.
fn parse(buf: &[u8]) -> Read {
    let handoff = || Read::Handoff(Bytes::copy_from_slice(buf));
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut headers);
    match head.parse(buf) {
        // Anything after the head (a body, a pipelined request) is hyper's to read.
        Ok(httparse::Status::Complete(n)) if n == buf.len() && head.version == Some(1) => {}
        _ => return handoff(),
    }
    let (Some(method), Some(path)) = (head.method, head.path) else { return handoff() };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return handoff() };
    if method == Method::CONNECT {
        return handoff();
    }
    let Ok(uri) = Uri::try_from(path) else { return handoff() };
    let mut map = HeaderMap::with_capacity(head.headers.len());
    let mut close = false;
    for h in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else { return handoff() };
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return handoff();
        }
        if name == header::CONTENT_LENGTH && h.value.trim_ascii() != b"0" {
            return handoff();
        }
        if name == header::CONNECTION {
            close |= h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else { return handoff() };
        map.append(name, value);
    }
    let head_only = method == Method::HEAD;
    let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Read::Request { req, close, head_only }
}

/// Writes `resp` with HTTP/1.1 framing of this hop's own: `content-length` when the body's size
/// is known, chunked otherwise, and no body after a `HEAD` or for 204 and 304 (whose
/// `content-length`, if any, describes another response and is passed on for `HEAD` and 304).
/// Never more bytes than announced. Whatever is ready goes out before waiting for more of the
/// body, so a streamed response flows. An error means the connection cannot carry another
/// response.
async fn write_response(
    stream: &mut TcpStream,
    resp: Response<Body>,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let (mut parts, mut body) = resp.into_parts();
    if parts.status.is_informational() {
        // Only a protocol switch has a 1xx as its last response, and this request asked for none.
        let why =
            format!("upstream answered {} to a request that asked for no protocol switch", parts.status);
        (parts, body) = ProxyError::UpstreamProtocol { cause: why }.into_response().into_parts();
    }
    let status = parts.status;
    let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let bodyless = head_only || no_body;
    // The announced length; `None` is chunked.
    let length = if bodyless { Some(0) } else { body.size_hint().exact() };
    let mut out = Vec::with_capacity(256 + length.map_or(0, |n| n.min(COALESCE as u64) as usize));
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // The upstream's own reason phrase when it had one (hyper's client keeps it), or the usual.
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // Framing and connection management are this hop's own.
        if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
            continue;
        }
        if name == header::CONTENT_LENGTH && (!bodyless || status == StatusCode::NO_CONTENT) {
            continue;
        }
        put_header(&mut out, name.as_str(), value.as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        DATE.with_borrow_mut(|(secs, value)| {
            let now = SystemTime::now();
            let s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if *secs != s {
                *value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                    .unwrap_or(HeaderValue::from_static(""));
                *secs = s;
            }
            put_header(&mut out, "date", value.as_bytes());
        });
    }
    if !bodyless {
        match length {
            Some(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            None => put_header(&mut out, "transfer-encoding", b"chunked"),
        }
    }
    if close {
        put_header(&mut out, "connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if bodyless {
        return stream.write_all(&out).await;
    }
    let mut sent = 0u64;
    loop {
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                // Nothing more yet: what is ready goes out first.
                if !out.is_empty() {
                    stream.write_all(&out).await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        let Some(frame) = next else { break };
        let frame = match frame {
            Ok(frame) => frame,
            // The upstream failed in the middle of the body: the client learns it from the
            // connection closing before the announced end.
            Err(e) => {
                let _ = stream.write_all(&out).await;
                return Err(io::Error::other(e));
            }
        };
        let Ok(mut data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if length.is_some_and(|n| sent > n) {
            let _ = stream.write_all(&out).await;
            return Err(io::Error::other("response body longer than its announced length"));
        }
        if length.is_none() {
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if out.len() + data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            stream.write_all(&out).await?;
            out.clear();
            stream.write_all_buf(&mut data).await?;
        }
        if length.is_none() {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= COALESCE {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
    if length.is_none() {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        stream.write_all(&out).await?;
    }
    match length {
        Some(n) if n != sent => Err(io::Error::other("response body shorter than its announced length")),
        _ => Ok(()),
    }
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A connection handed to hyper: the bytes already read come first, then the socket.
pub struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(prefix: Bytes, inner: TcpStream) -> Rewind {
        Rewind { prefix, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(raw: &[u8]) -> Option<(Request<Body>, bool, bool)> {
        match parse(raw) {
            Read::Request { req, close, head_only } => Some((req, close, head_only)),
            _ => None,
        }
    }

    #[test]
    fn a_bodyless_request_is_served_here_and_anything_else_goes_to_hyper() {
        let (req, close, head_only) =
            taken(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nX-Two: 2\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri(), "/a?b=c");
        assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
        assert!(!close && !head_only);
        let (_, close, head_only) =
            taken(b"HEAD / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").unwrap();
        assert!(close && head_only);
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"GET / HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            match parse(raw) {
                Read::Handoff(b) => assert_eq!(&b[..], raw, "hyper gets every byte read"),
                _ => panic!("served here: {}", String::from_utf8_lossy(raw)),
            }
        }
    }
}
