//! TLS on the gRPC port: rustls with the control plane's serving certificate, and client
//! certificates verified against the mesh's trust bundle when a proxy presents one (signing its
//! first certificate, it has none yet). Each connection carries the peer's SPIFFE ID to the
//! handlers. The server configuration is swapped whole when the CA or the serving certificate
//! changes; open connections keep theirs.

use super::StartError;
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// The URI SAN of a verified client certificate.
    pub spiffe_id: Option<String>,
    /// The pod that certificate was issued to (its subject's common name), when the token it
    /// was signed for was bound to one.
    pub pod: Option<String>,
}

/// A server-side TLS connection that tells tonic who its peer is.
pub struct Conn(TlsStream<TcpStream>, Peer);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.1.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The server configuration in force; replaced whole.
pub type ServerTls = Arc<RwLock<Arc<ServerConfig>>>;

/// A server configuration from PEM: the serving chain and key, and the roots client
/// certificates must chain to.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    roots_pem: &[String],
) -> Result<ServerConfig, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(StartError::tls)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(StartError::tls)?;
    let mut roots = RootCertStore::empty();
    for pem in roots_pem {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.map_err(StartError::tls)?).map_err(StartError::tls)?;
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(StartError::tls)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StartError::tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(StartError::tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    mycel_api::spiffe::of_certificate(cert.as_ref())
}

/// The pod a workload certificate (DER) was issued to: its subject's common name
/// ([`crate::pki::Ca::sign_workload`]).
pub fn bound_pod(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client never holds
/// up the others), yielding finished connections to tonic.
/// TLS handshakes in progress at most: when thousands of proxies connect at once, the rest wait
/// in the accept queue instead of all holding handshake buffers (memory the allocator keeps).
const HANDSHAKES: usize = 64;

pub fn incoming(listener: TcpListener, tls: ServerTls) -> ReceiverStream<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let config = tls.read().map(|c| c.clone());
            let Ok(config) = config else { continue };
            let conns = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let handshake = TlsAcceptor::from(config).accept(tcp);
                match tokio::time::timeout(std::time::Duration::from_secs(10), handshake).await {
                    Ok(Ok(stream)) => {
                        let leaf = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let spiffe_id = leaf.and_then(spiffe_id);
                        let pod = leaf.filter(|_| spiffe_id.is_some()).and_then(|c| bound_pod(c.as_ref()));
                        let peer = Peer { remote: Some(remote), spiffe_id, pod };
                        let _ = conns.send(Ok(Conn(stream, peer))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
