//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the one
//! form the control plane signs, the proxies check and `mycelctl` shows.

use std::fmt;

/// A workload's SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a workload identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct SpiffeError(pub String);

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

/// The SPIFFE ID (the `spiffe://` URI SAN) a DER certificate carries, as written there; what
/// both ends of mutual TLS read from the peer's certificate.
pub fn of_certificate(der: &[u8]) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    })
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<SpiffeId, SpiffeError> {
        let bad = || SpiffeError(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(bad)?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let segment = |x: &str| {
            !x.is_empty() && x.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if !(segment(trust_domain) && segment(ns) && segment(sa)) {
            return Err(bad());
        }
        Ok(SpiffeId::new(trust_domain, ns, sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_malformed_ones_are_refused() {
        let id: SpiffeId = "spiffe://corp.example/ns/shop/sa/web".parse().unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("corp.example", "shop", "web")
        );
        assert_eq!(id.to_string(), "spiffe://corp.example/ns/shop/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "a", "b").to_string(), "spiffe://cluster.local/ns/a/sa/b");
        for bad in [
            "spiffe://t/ns/a",
            "spiffe://t/ns/a/sa/b/c",
            "spiffe://t/sa/b/ns/a",
            "https://t/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://t/ns//sa/b",
            "spiffe://t/ns/a b/sa/c",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
