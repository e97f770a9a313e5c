//! Upstream HTTP connections, pooled per endpoint: HTTP/1.1 connections are reused one request
//! at a time, an HTTP/2 connection is shared by all requests to its endpoint. Each is plaintext
//! or mutual TLS (an endpoint with a mesh identity must prove it).
//!
//! A request that could not be sent — no connection could be opened, or a reused connection
//! closed before it went out — comes back to the caller whole, so that it can go to another
//! endpoint without having been copied beforehand.

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    drain,
    http::Body,
    tls::mtls::{Dialed, Inner, MeshTls},
};

/// Idle HTTP/1.1 connections kept per endpoint: enough for bursts, bounded for memory.
const MAX_IDLE_PER_ENDPOINT: usize = 64;
/// An idle connection unused this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Endpoint, and the identity it proved over mutual TLS (`None`: plaintext). A connection is
/// reused only for the identity it was opened for.
type Key = (SocketAddr, Option<Arc<str>>);

#[derive(Default)]
struct Idle {
    h1: HashMap<Key, Vec<(http1::SendRequest<Body>, Instant)>>,
    h2: HashMap<Key, http2::SendRequest<Body>>,
    /// Shut down: connections are neither kept nor shared any more.
    closed: bool,
}

pub struct Pool {
    mesh: Arc<MeshTls>,
    idle: Arc<Mutex<Idle>>,
    /// Where connection tasks run, so that shutdown drains them.
    tasks: Arc<drain::Tasks>,
}

/// Why a request got no response.
pub enum SendError {
    /// It was not sent (no connection could be opened): here it is back.
    NotSent(std::io::Error, Box<Request<Body>>),
    /// The connection failed while the request or its response was on the way.
    Failed(hyper::Error),
}

impl Pool {
    /// A pool; a background task closes connections idle for too long while the pool lives.
    pub fn new(mesh: Arc<MeshTls>, tasks: Arc<drain::Tasks>) -> Pool {
        let idle = Arc::new(Mutex::new(Idle::default()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&idle)));
        }
        Pool { mesh, idle, tasks }
    }

    /// At shutdown: closes every idle connection (one no request holds ends at once), and takes
    /// none back from here on.
    pub fn close(&self) {
        if let Ok(mut i) = self.idle.lock() {
            *i = Idle { closed: true, ..Idle::default() };
        }
    }

    /// Sends `req` to `addr` (its URI already in the form the version wants; over mutual TLS
    /// to an endpoint that must prove `identity`, when given) and returns the response; its body
    /// gives the connection back to the pool once read to the end.
    pub async fn send(
        &self,
        req: Request<Body>,
        addr: SocketAddr,
        identity: Option<&Arc<str>>,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, SendError> {
        let key = (addr, identity.cloned());
        if req.version() == hyper::Version::HTTP_2 {
            self.send_h2(req, key, connect_timeout).await
        } else {
            self.send_h1(req, key, connect_timeout).await
        }
    }

    async fn send_h1(
        &self,
        mut req: Request<Body>,
        key: Key,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, SendError> {
        // Reuse: the most recently used connection first (the warmest, the least likely closed).
        while let Some(mut tx) = self.pop_h1(&key) {
            if tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.pooled(resp, key, tx)),
                Err(mut e) => match e.take_message() {
                    // Closed just before the request went out: another connection takes it.
                    Some(r) => req = r,
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
        // Boxed: opening a connection (TCP, maybe a TLS handshake) is a large future, and every
        // downstream connection keeps room for its request's future while it lives.
        let mut tx = match Box::pin(self.open_h1(&key, connect_timeout)).await {
            Ok(tx) => tx,
            Err(e) => return Err(SendError::NotSent(e, Box::new(req))),
        };
        match tx.send_request(req).await {
            Ok(resp) => Ok(self.pooled(resp, key, tx)),
            Err(e) => Err(SendError::Failed(e)),
        }
    }

    async fn send_h2(
        &self,
        req: Request<Body>,
        key: Key,
        connect_timeout: Duration,
    ) -> Result<Response<PooledBody>, SendError> {
        let shared = self.idle.lock().ok().and_then(|i| i.h2.get(&key).filter(|t| !t.is_closed()).cloned());
        let mut tx = match shared {
            Some(tx) => tx,
            None => {
                let tx = match Box::pin(self.open_h2(&key, connect_timeout)).await {
                    Ok(tx) => tx,
                    Err(e) => return Err(SendError::NotSent(e, Box::new(req))),
                };
                if let Ok(mut i) = self.idle.lock()
                    && !i.closed
                {
                    i.h2.insert(key.clone(), tx.clone());
                }
                tx
            }
        };
        if let Err(e) = tx.ready().await {
            return Err(SendError::Failed(e));
        }
        match tx.send_request(req).await {
            Ok(resp) => Ok(resp.map(|inner| PooledBody { inner, back: None })),
            Err(e) => Err(SendError::Failed(e)),
        }
    }

    fn pop_h1(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.h1.get_mut(key)?;
        while let Some((tx, _)) = list.pop() {
            if !tx.is_closed() {
                return Some(tx);
            }
        }
        None
    }

    fn pooled(
        &self,
        resp: Response<Incoming>,
        key: Key,
        tx: http1::SendRequest<Body>,
    ) -> Response<PooledBody> {
        let back = Some(Return { idle: Arc::downgrade(&self.idle), key, tx });
        resp.map(|inner| PooledBody { inner, back })
    }

    async fn open_h1(&self, key: &Key, timeout: Duration) -> std::io::Result<http1::SendRequest<Body>> {
        match self.mesh.dial(key.0, timeout, Inner::Http1, key.1.as_deref()).await? {
            Dialed::Plain(io) => handshake_h1(io, &self.tasks).await,
            Dialed::Tls(io) => handshake_h1(*io, &self.tasks).await,
        }
        .map_err(std::io::Error::other)
    }

    async fn open_h2(&self, key: &Key, timeout: Duration) -> std::io::Result<http2::SendRequest<Body>> {
        match self.mesh.dial(key.0, timeout, Inner::Http2, key.1.as_deref()).await? {
            Dialed::Plain(io) => handshake_h2(io, &self.tasks).await,
            Dialed::Tls(io) => handshake_h2(*io, &self.tasks).await,
        }
        .map_err(std::io::Error::other)
    }
}

async fn handshake_h1<I>(io: I, tasks: &drain::Tasks) -> hyper::Result<http1::SendRequest<Body>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    // With upgrades: a `101 Switching Protocols` hands the connection over to the tunnel.
    let conn = conn.with_upgrades();
    tasks.spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

async fn handshake_h2<I>(io: I, tasks: &drain::Tasks) -> hyper::Result<http2::SendRequest<Body>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(io)).await?;
    tasks.spawn(async move {
        let _ = conn.await;
    });
    Ok(tx)
}

/// Closes idle connections past their time, every 30 s, for as long as the pool lives.
async fn sweep(idle: Weak<Mutex<Idle>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(idle) = idle.upgrade() else { return };
        let Ok(mut i) = idle.lock() else { return };
        let now = Instant::now();
        i.h1.retain(|_, list| {
            list.retain(|(tx, since)| !tx.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT);
            !list.is_empty()
        });
        i.h2.retain(|_, tx| !tx.is_closed());
    }
}

/// Where an HTTP/1.1 connection goes back once its response has been read.
struct Return {
    idle: Weak<Mutex<Idle>>,
    key: Key,
    tx: http1::SendRequest<Body>,
}

impl Return {
    fn give_back(self) {
        if self.tx.is_closed() {
            return;
        }
        let Some(idle) = self.idle.upgrade() else { return };
        let Ok(mut i) = idle.lock() else { return };
        if i.closed {
            return;
        }
        let list = i.h1.entry(self.key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push((self.tx, Instant::now()));
        }
    }
}

/// A response body that returns its HTTP/1.1 connection to the pool when it ends. Dropped
/// before its end, the connection is not reused (hyper closes it).
pub struct PooledBody {
    inner: Incoming,
    back: Option<Return>,
}

impl hyper::body::Body for PooledBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(back) = self.back.take()
        {
            back.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (a HEAD, a 204, a 304) may never be polled.
        if self.inner.is_end_stream()
            && let Some(back) = self.back.take()
        {
            back.give_back();
        }
    }
}
