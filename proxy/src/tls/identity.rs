//! The workload's identity: a key pair made here (the private key never leaves the process), a
//! certificate for `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` signed by the
//! control plane's CA on presentation of the pod's projected service-account token, and the
//! trust bundle that came with it. Renewed at about half the certificate's life; a failed
//! renewal keeps the current certificate and retries with backoff.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use mycel_api::v1alpha1::{SignRequest, certificates_client::CertificatesClient};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::SetupError;
use crate::xds::{Backoff, Bootstrap, channel};

/// A signed certificate with its key, as PEM.
#[derive(Clone)]
pub struct Identity {
    pub spiffe_id: String,
    /// Leaf first, then intermediates.
    pub chain_pem: Vec<String>,
    pub key_pem: String,
    pub trust_bundle_pem: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this proxy received it (the CA backdates `not_before` for clock skew).
    pub received: SystemTime,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The certificate chain and private key, parsed for rustls.
    pub fn chain_and_key(
        &self,
    ) -> Result<
        (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>),
        SetupError,
    > {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let chain = self
            .chain_pem
            .iter()
            .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(SetupError::invalid("the workload certificate chain"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(SetupError::invalid("the workload private key"))?;
        Ok((chain, key))
    }

    /// When to renew: half-way through the life it had when it arrived, and never sooner than
    /// a second after that.
    pub fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.received).unwrap_or_default();
        self.received + (life / 2).max(Duration::from_secs(1))
    }
}

/// The pod's token, read anew each time (the kubelet rotates projected tokens).
fn read_token(path: &PathBuf) -> Result<String, SetupError> {
    let t = std::fs::read_to_string(path).map_err(|error| SetupError::Io {
        what: format!("reading the service-account token {}", path.display()),
        error,
    })?;
    Ok(t.trim().to_string())
}

fn validity(leaf_pem: &str) -> Result<(SystemTime, SystemTime), SetupError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes())
        .map_err(SetupError::invalid("the CA's certificate is not PEM"))?;
    let cert = pem.parse_x509().map_err(SetupError::invalid("the CA's certificate does not parse"))?;
    let at = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    Ok((at(cert.validity().not_before), at(cert.validity().not_after)))
}

/// Asks the CA for a certificate over a new key.
pub async fn request(boot: &Bootstrap, trust: &[String]) -> Result<Identity, SetupError> {
    let spiffe_id = boot.spiffe_id();
    let key = KeyPair::generate().map_err(SetupError::invalid("generating a key pair"))?;
    let mut params = CertificateParams::default();
    let san = spiffe_id.clone().try_into().map_err(SetupError::invalid("the SPIFFE ID as a URI"))?;
    params.subject_alt_names = vec![SanType::URI(san)];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(SetupError::invalid("building the CSR"))?;
    let token = read_token(&boot.token_path)?;
    let ch = channel(boot, trust, None).await?;
    let mut req = tonic::Request::new(SignRequest {
        csr_pem: csr,
        ttl_seconds: boot.cert_ttl.map(|t| t.as_secs() as i64).unwrap_or(0),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(SetupError::invalid("the token is not valid header text"))?,
    );
    let resp = CertificatesClient::new(ch)
        .sign(req)
        .await
        .map_err(SetupError::refused("the CA refused"))?
        .into_inner();
    let leaf = resp
        .cert_chain_pem
        .first()
        .ok_or_else(|| SetupError::Invalid("the CA answered without a certificate".into()))?;
    let (not_before, not_after) = validity(leaf)?;
    Ok(Identity {
        spiffe_id,
        chain_pem: resp.cert_chain_pem,
        key_pem: key.serialize_pem(),
        trust_bundle_pem: if resp.trust_bundle_pem.is_empty() {
            trust.to_vec()
        } else {
            resp.trust_bundle_pem
        },
        not_before,
        not_after,
        received: SystemTime::now(),
    })
}

/// Keeps a valid identity in `tx`: signs one, then renews at half-life, forever.
pub async fn maintain(
    boot: Arc<Bootstrap>,
    tx: watch::Sender<Option<Arc<Identity>>>,
    shared: Arc<crate::Shared>,
) {
    let metrics = &shared.metrics;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let current = tx.borrow().clone();
        if let Some(id) = &current {
            let wait = id.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        let trust =
            current.as_ref().map(|i| i.trust_bundle_pem.clone()).unwrap_or_else(|| boot.ca_roots.clone());
        match request(&boot, &trust).await {
            Ok(id) => {
                info!(identity = %id.spiffe_id, not_after = ?id.not_after, "workload certificate {}", if current.is_some() { "renewed" } else { "issued" });
                metrics.certificate(true, id.not_after);
                backoff.reset();
                let _ = tx.send(Some(Arc::new(id)));
            }
            Err(e) => {
                metrics.certificate(false, SystemTime::UNIX_EPOCH);
                let delay = backoff.next_delay();
                warn!(retry_in = ?delay, "cannot get a workload certificate: {e:#}");
                tokio::time::sleep(delay).await;
                if current.as_ref().is_some_and(|id| SystemTime::now() >= id.not_after) {
                    warn!("the workload certificate expired; peers will refuse it until renewal succeeds");
                }
            }
        }
    }
}
