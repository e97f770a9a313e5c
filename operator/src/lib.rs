//! The Mycel operator and control plane. The operator reconciles `MeshInstallation` into a
//! control-plane revision ([`installation`]); the control plane (next) serves config, certificates
//! and webhooks. Data-path code does not belong here: it lives in `mycel-proxy`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod controlplane;
pub mod installation;
pub mod leader;
pub mod metrics;
pub mod pki;

/// Errors of a reconcile. Variant names appear in metrics (`error` label) and logs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("CA: {0}")]
    Ca(#[from] pki::CaError),
    #[error("serialisation: {0}")]
    Json(#[from] serde_json::Error),
    #[error("MeshInstallation has no namespace")]
    NotNamespaced,
}

impl Error {
    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Ca(_) => "ca",
            Error::Json(_) => "json",
            Error::NotNamespaced => "not_namespaced",
        }
    }
}
