//! Mutual TLS between sidecars. The outbound proxy opens TLS to the destination's sidecar with
//! its workload certificate and checks that the peer's certificate chains to the mesh's trust
//! bundle and carries the SPIFFE ID the control plane gave for that endpoint. The inbound proxy
//! terminates it and checks the client's chain the same way. ALPN says what rides inside
//! (`mycel/http1`, `mycel/h2`, `mycel/tcp`), so the inbound side needs no detection. Keys come
//! from [`crate::identity`] and are swapped whole at each renewal; open connections keep theirs.

use std::{fmt, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwapOption;

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use crate::error::SetupError;
use crate::tls::identity::Identity;

pub const ALPN_HTTP1: &[u8] = b"mycel/http1";
pub const ALPN_H2: &[u8] = b"mycel/h2";
pub const ALPN_TCP: &[u8] = b"mycel/tcp";

/// A connection to an endpoint, as [`MeshTls::dial`] opened it.
pub enum Dialed {
    Plain(TcpStream),
    Tls(Box<client::TlsStream<TcpStream>>),
}

/// What rides inside a mesh TLS connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    Http1,
    Http2,
    Tcp,
}

impl Inner {
    fn alpn(self) -> &'static [u8] {
        match self {
            Inner::Http1 => ALPN_HTTP1,
            Inner::Http2 => ALPN_H2,
            Inner::Tcp => ALPN_TCP,
        }
    }

    pub fn from_alpn(p: &[u8]) -> Option<Inner> {
        match p {
            ALPN_HTTP1 => Some(Inner::Http1),
            ALPN_H2 => Some(Inner::Http2),
            ALPN_TCP => Some(Inner::Tcp),
            _ => None,
        }
    }
}

/// Whether a ClientHello's ALPN list is the mesh's.
pub fn is_mesh_alpn(alpn: &[String]) -> bool {
    alpn.iter().any(|p| Inner::from_alpn(p.as_bytes()).is_some())
}

/// Checks a server's chain against the trust bundle, without host names: a SPIFFE certificate
/// has none. The identity is checked after the handshake (see [`MeshTls::connect`]).
struct ChainVerifier {
    roots: Vec<TrustAnchor<'static>>,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for ChainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainVerifier({} roots)", self.roots.len())
    }
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?;
        cert.verify_for_usage(
            self.algs.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate not trusted: {e}")))?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The SPIFFE ID (URI SAN) of a certificate.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    mycel_api::spiffe::of_certificate(cert.as_ref())
}

/// Client and server configurations built from one identity.
struct Keys {
    own_id: String,
    clients: [Arc<ClientConfig>; 3],
    server: Arc<ServerConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Keys {
    fn build(id: &Identity) -> Result<Keys, SetupError> {
        let provider = provider();
        let (chain, key) = id.chain_and_key()?;
        let mut roots = RootCertStore::empty();
        let mut anchors = Vec::new();
        for pem in &id.trust_bundle_pem {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(SetupError::invalid("a trust-bundle certificate"))?;
                let anchor = webpki::anchor_from_trusted_cert(&c)
                    .map_err(SetupError::invalid("a trust-bundle certificate as a trust anchor"))?;
                anchors.push(anchor.to_owned());
                roots.add(c)?;
            }
        }
        let verifier =
            Arc::new(ChainVerifier { roots: anchors, algs: provider.signature_verification_algorithms });
        let client = |inner: Inner| -> Result<Arc<ClientConfig>, SetupError> {
            let mut c = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())?;
            c.alpn_protocols = vec![inner.alpn().to_vec()];
            Ok(Arc::new(c))
        };
        let client_verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(SetupError::invalid("the client-certificate verifier"))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        let clients = [client(Inner::Http1)?, client(Inner::Http2)?, client(Inner::Tcp)?];
        Ok(Keys { own_id: id.spiffe_id.clone(), clients, server: Arc::new(server) })
    }
}

/// The proxy's mesh TLS keys, swapped whole at each renewal. Which identity an endpoint must
/// prove is the cluster's to say ([`crate::balance::Endpoints::identity`]), not this state's.
#[derive(Default)]
pub struct MeshTls {
    keys: ArcSwapOption<Keys>,
}

impl MeshTls {
    /// Installs a new identity (at start and at each renewal).
    pub fn set_identity(&self, id: &Identity) -> Result<(), SetupError> {
        self.keys.store(Some(Arc::new(Keys::build(id)?)));
        Ok(())
    }

    /// Connects to an endpoint: plain TCP, or mutual TLS carrying `inner` when the endpoint's
    /// cluster names the identity it must prove (`expected`). `timeout` bounds the TCP connect
    /// and, again, the TLS handshake.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        timeout: std::time::Duration,
        inner: Inner,
        expected: Option<&str>,
    ) -> std::io::Result<Dialed> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {timeout:?}"))
        })??;
        let _ = tcp.set_nodelay(true);
        let Some(expected) = expected else { return Ok(Dialed::Plain(tcp)) };
        let tls = tokio::time::timeout(timeout, self.connect(tcp, expected, inner))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "mutual TLS: the handshake timed out")
            })?
            .map_err(|e| std::io::Error::new(e.kind(), format!("mutual TLS: {e}")))?;
        Ok(Dialed::Tls(Box::new(tls)))
    }

    pub fn own_id(&self) -> Option<String> {
        Some(self.keys.load().as_ref()?.own_id.clone())
    }

    fn keys(&self) -> std::io::Result<Arc<Keys>> {
        self.keys.load_full().ok_or_else(|| std::io::Error::other("no workload certificate yet"))
    }

    /// Opens mutual TLS over `tcp` to an endpoint that must prove `expected`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        expected: &str,
        inner: Inner,
    ) -> std::io::Result<client::TlsStream<TcpStream>> {
        let keys = self.keys()?;
        let config = keys.clients[inner as usize].clone();
        // Not checked (the verifier ignores names); SNI carries the expected identity for logs.
        let name = ServerName::try_from("mesh.mycel.invalid").map_err(std::io::Error::other)?;
        let stream = TlsConnector::from(config).connect(name, tcp).await?;
        let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(spiffe_id);
        if peer.as_deref() != Some(expected) {
            return Err(std::io::Error::other(format!(
                "the endpoint presented {} instead of {expected}",
                peer.as_deref().unwrap_or("no SPIFFE identity")
            )));
        }
        Ok(stream)
    }

    /// Terminates mutual TLS from another sidecar: the stream, the peer's SPIFFE ID and what
    /// rides inside.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(server::TlsStream<TcpStream>, String, Inner)> {
        let keys = self.keys()?;
        let stream = TlsAcceptor::from(keys.server.clone()).accept(tcp).await?;
        let conn = stream.get_ref().1;
        let peer = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(spiffe_id)
            .ok_or_else(|| std::io::Error::other("the client certificate has no SPIFFE identity"))?;
        let inner = conn.alpn_protocol().and_then(Inner::from_alpn).unwrap_or(Inner::Tcp);
        Ok((stream, peer, inner))
    }
}
