//! Opaque TCP: connect to the first endpoint that answers (over mutual TLS when the endpoint is
//! in the mesh), then copy both ways until each side has closed its half (a half-close is passed
//! on, not turned into a full close).
//!
//! Between two plain TCP sockets the bytes never enter the proxy: `splice(2)` moves them through
//! a pipe inside the kernel. Where TLS is on either side, or a TCP rule's idle timeout watches
//! the connection, they are copied through user space.

use std::sync::Arc;

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tracing::debug;

use crate::{
    Shared,
    balance::Endpoints,
    context::Conn,
    tls::mtls::{Dialed, Inner, MeshTls},
};

/// A byte stream: plain TCP, or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One side of a TCP proxy connection.
pub enum Stream {
    Plain(TcpStream),
    /// TLS (or anything else that must pass through user space).
    Wrapped(Box<dyn Io>),
}

/// Connects to an endpoint of `endpoints`, skipping (and ejecting) those that fail. An endpoint
/// with a mesh identity is reached over mutual TLS and must prove that identity.
pub async fn connect(endpoints: &Endpoints, key: Option<u64>, mesh: &MeshTls) -> Result<Stream, String> {
    let order = endpoints.order(key);
    if order.is_empty() {
        return Err(format!("cluster {:?} has no endpoints", endpoints.cluster));
    }
    let mut last = String::new();
    for addr in order {
        match mesh
            .dial(addr, endpoints.connect_timeout, Inner::Tcp, endpoints.identity(addr).map(|i| &**i))
            .await
        {
            Ok(Dialed::Plain(s)) => return Ok(Stream::Plain(s)),
            Ok(Dialed::Tls(tls)) => return Ok(Stream::Wrapped(tls)),
            Err(e) => last = format!("connect to {addr}: {e}"),
        }
        endpoints.eject(addr);
    }
    Err(last)
}

/// Proxies one connection to an endpoint of `cluster`, and counts the bytes both ways. With
/// `idle`, a connection that carries no byte either way for that long is closed (both sides).
pub async fn serve(
    downstream: Stream,
    conn: &Conn,
    cluster: Arc<Endpoints>,
    shared: Arc<Shared>,
    idle: Option<std::time::Duration>,
) {
    let labels = &conn.labels;
    let key = crate::balance::connection_key(&cluster.lb, conn.peer);
    let upstream = match connect(&cluster, key, &shared.mesh).await {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "tcp: no upstream");
            return;
        }
    };
    let copied = match (downstream, upstream) {
        (down, up) if idle.is_some() => {
            let start = std::time::Instant::now();
            let last = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut down = Watched { inner: boxed(down), last: last.clone(), start };
            let mut up = Watched { inner: boxed(up), last: last.clone(), start };
            let copy = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 * 1024, 64 * 1024);
            until_idle(copy, idle.unwrap_or_default(), &last, start).await
        }
        (Stream::Plain(down), Stream::Plain(up)) => splice::copy_bidirectional(&down, &up).await,
        (down, up) => {
            let (mut down, mut up) = (boxed(down), boxed(up));
            tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 * 1024, 64 * 1024).await
        }
    };
    match copied {
        Ok((from_client, to_client)) => {
            shared.metrics.bytes_received.get_or_create(labels).inc_by(from_client);
            shared.metrics.bytes_sent.get_or_create(labels).inc_by(to_client);
        }
        Err(e) => debug!(error = %e, "tcp: copy ended"),
    }
}

/// Runs `copy` until it ends, or until no byte moved for `idle` (then the connection is closed:
/// dropping the copy drops both sides).
async fn until_idle(
    copy: impl std::future::Future<Output = std::io::Result<(u64, u64)>>,
    idle: std::time::Duration,
    last: &std::sync::atomic::AtomicU64,
    start: std::time::Instant,
) -> std::io::Result<(u64, u64)> {
    tokio::pin!(copy);
    loop {
        let since = std::time::Duration::from_millis(last.load(std::sync::atomic::Ordering::Relaxed));
        let quiet = start.elapsed().saturating_sub(since);
        if quiet >= idle {
            debug!(?idle, "tcp: idle timeout");
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "idle timeout"));
        }
        tokio::select! {
            r = &mut copy => return r,
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// A stream that notes when it last read or wrote bytes (ms since `start`), so that a connection
/// still draining to a slow reader is not idle.
struct Watched {
    inner: Box<dyn Io>,
    last: Arc<std::sync::atomic::AtomicU64>,
    start: std::time::Instant,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn boxed(s: Stream) -> Box<dyn Io> {
    match s {
        Stream::Plain(s) => Box::new(s),
        Stream::Wrapped(b) => b,
    }
}

/// Zero-copy forwarding between two TCP sockets: socket → pipe → socket with `splice(2)`,
/// waiting on tokio's readiness so that it costs no thread.
pub mod splice {
    use std::{
        io,
        os::fd::{AsRawFd, OwnedFd, RawFd},
    };

    use tokio::{io::Interest, net::TcpStream};

    /// Bytes one pipe holds (the kernel rounds up to pages). Larger than the default 64 KiB so
    /// that one wake-up moves more; the pages are only taken while data is in flight.
    const PIPE_SIZE: usize = 256 * 1024;

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let (read, write) = crate::sys::pipe(PIPE_SIZE)?;
            Ok(Pipe { read, write })
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        crate::sys::splice(from, to, len)
    }

    /// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`.
    async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
        let pipe = Pipe::new()?;
        let mut total = 0u64;
        loop {
            // Fill the pipe from the source. The pipe is empty here, so EAGAIN is the socket's.
            let n = loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // The source closed its sending half: pass the half-close on.
                let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return Ok(total);
            }
            // Drain the pipe into the destination. EAGAIN is the socket's (its buffer is full).
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
        }
    }

    /// Both directions at once, until each has ended; the first error ends both. Returns the
    /// bytes moved `a → b` and `b → a`.
    pub async fn copy_bidirectional(a: &TcpStream, b: &TcpStream) -> io::Result<(u64, u64)> {
        tokio::try_join!(one_way(a, b), one_way(b, a))
    }
}
