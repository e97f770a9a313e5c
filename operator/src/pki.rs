//! The mesh CA as the operator handles it: generating the root once, loading a user-supplied CA
//! from a Secret (with errors that say what is wrong with it), and issuing the webhook serving
//! certificate. Signing workload certificates is the control plane's job, not this module's.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Keys of a CA Secret (the layout cert-manager writes).
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";

/// What is wrong with a CA Secret, in words a user can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    #[error("has no {0:?} entry; a CA Secret needs tls.crt and tls.key (PEM)")]
    MissingKey(&'static str),
    #[error("{0:?} is not a PEM certificate: {1}")]
    BadCertificate(&'static str, String),
    #[error("tls.key is not a PEM private key: {0}")]
    BadKey(String),
    #[error("tls.crt is not a CA certificate (basicConstraints CA:TRUE is required)")]
    NotACa,
    #[error("tls.key does not belong to the certificate in tls.crt")]
    KeyMismatch,
    #[error("the certificate in tls.crt expired")]
    Expired,
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// A CA able to sign, with the PEM bundle that clients must trust.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    /// Roots (and intermediates) to trust: `ca.crt` if the Secret has it, else `tls.crt`.
    pub trust_bundle_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn gen_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

impl Ca {
    /// A new self-signed root for `trust_domain`, valid ten years.
    pub fn generate_root(trust_domain: &str) -> Result<Ca, CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "mycel root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = time_now() - Duration::from_secs(3600);
        params.not_after = time_now() + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            trust_bundle_pem: cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads and checks a CA from a Secret's data.
    pub fn from_secret_data(get: impl Fn(&str) -> Option<Vec<u8>>) -> Result<Ca, CaError> {
        let cert = get(TLS_CRT).ok_or(CaError::MissingKey(TLS_CRT))?;
        let key = get(TLS_KEY).ok_or(CaError::MissingKey(TLS_KEY))?;
        let cert_pem =
            String::from_utf8(cert).map_err(|e| CaError::BadCertificate(TLS_CRT, e.to_string()))?;
        let key_pem = String::from_utf8(key).map_err(|e| CaError::BadKey(e.to_string()))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| CaError::BadCertificate(TLS_CRT, e.to_string()))?;
        let x509 = pem.parse_x509().map_err(|e| CaError::BadCertificate(TLS_CRT, e.to_string()))?;
        if !x509.is_ca() {
            return Err(CaError::NotACa);
        }
        if !x509.validity().is_valid() {
            return Err(CaError::Expired);
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey(e.to_string()))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::KeyMismatch);
        }
        let trust_bundle_pem = match get(CA_CRT) {
            Some(ca) => {
                let ca = String::from_utf8(ca).map_err(|e| CaError::BadCertificate(CA_CRT, e.to_string()))?;
                x509_parser::pem::parse_x509_pem(ca.as_bytes())
                    .map_err(|e| CaError::BadCertificate(CA_CRT, e.to_string()))?;
                ca
            }
            None => cert_pem.clone(),
        };
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaError::BadCertificate(TLS_CRT, e.to_string()))?;
        Ok(Ca { cert_pem, key_pem, trust_bundle_pem, issuer })
    }

    /// A serving certificate for `dns_names` (and IP addresses among them), valid for `ttl`.
    pub fn issue_serving(&self, dns_names: &[String], ttl: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
        for d in dns_names {
            let san = match d.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(d.clone().try_into().map_err(gen_err)?),
            };
            params.subject_alt_names.push(san);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.not_before = time_now() - Duration::from_secs(300);
        params.not_after = time_now() + ttl;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Why a workload certificate was not signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("csr_pem is not a valid PEM certificate signing request (or its signature is wrong)")]
    BadCsr,
    #[error("the CSR must carry exactly one URI SAN, {expected}; it carries [{found}]")]
    WrongIdentity { expected: String, found: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl Ca {
    /// Signs a workload certificate for `spiffe_id` over the CSR's public key, valid for `ttl`.
    /// Nothing else of the request is trusted: the CA sets every field itself.
    /// Signs a workload certificate for `spiffe_id`, the only URI SAN the CSR may carry. `pod`,
    /// the pod the caller's token is bound to (if it is), becomes the subject's common name, so
    /// that the config stream can hold the proxy to the pod it says it is.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        spiffe_id: &str,
        pod: Option<&str>,
        ttl: Duration,
    ) -> Result<String, SignError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|_| SignError::BadCsr)?;
        let found: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if found.len() != 1 || found[0] != spiffe_id {
            return Err(SignError::WrongIdentity { expected: spiffe_id.into(), found: found.join(", ") });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(pod) = pod {
            params.distinguished_name.push(rcgen::DnType::CommonName, pod);
        }
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id.to_string().try_into().map_err(|e: rcgen::Error| SignError::Generate(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // A little slack for clocks that disagree.
        params.not_before = time_now() - Duration::from_secs(60);
        params.not_after = time_now() + ttl;
        let signed = rcgen::CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| SignError::Generate(e.to_string()))?;
        Ok(signed.pem())
    }

    /// Certificates between a leaf and the roots: the signing certificate itself when it is an
    /// intermediate (not self-signed), with whatever else `tls.crt` holds.
    pub fn intermediates_pem(&self) -> Vec<String> {
        let blocks = pem_blocks(&self.cert_pem);
        let self_signed = x509_parser::pem::parse_x509_pem(self.cert_pem.as_bytes())
            .ok()
            .and_then(|(_, p)| p.parse_x509().ok().map(|c| c.subject() == c.issuer()))
            .unwrap_or(true);
        if self_signed { Vec::new() } else { blocks }
    }

    /// The roots (and any intermediates) peers must trust, one PEM per certificate.
    pub fn trust_bundle(&self) -> Vec<String> {
        pem_blocks(&self.trust_bundle_pem)
    }
}

/// Splits concatenated PEM certificates.
pub fn pem_blocks(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter_map(|b| b.find("-----BEGIN CERTIFICATE-----").map(|i| format!("{}\n", &b[i..])))
        .collect()
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Whether `cert_pem` names every one of `dns_names` and stays valid for at least `margin`.
pub fn serving_cert_fresh(cert_pem: &[u8], dns_names: &[String], margin: Duration) -> bool {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert_pem) else {
        return false;
    };
    let Ok(x509) = pem.parse_x509() else {
        return false;
    };
    let Some(remaining) = x509.validity().time_to_expiration() else {
        return false;
    };
    if remaining.whole_seconds() < margin.as_secs() as i64 {
        return false;
    }
    let names: Vec<String> = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    dns_names.iter().all(|d| names.contains(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data<'a>(pairs: &'a [(&'static str, String)]) -> impl Fn(&str) -> Option<Vec<u8>> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_bytes().to_vec())
    }

    #[test]
    fn a_generated_root_loads_back_and_signs() {
        let root = Ca::generate_root("cluster.local").unwrap();
        let loaded =
            Ca::from_secret_data(data(&[(TLS_CRT, root.cert_pem.clone()), (TLS_KEY, root.key_pem.clone())]))
                .unwrap();
        let names = vec!["mycel-control-plane-default.mycel-system.svc".to_string()];
        let (cert, _) = loaded.issue_serving(&names, Duration::from_secs(3600 * 24 * 365)).unwrap();
        assert!(serving_cert_fresh(cert.as_bytes(), &names, Duration::from_secs(3600 * 24 * 30)));
        assert!(!serving_cert_fresh(cert.as_bytes(), &["other.svc".to_string()], Duration::ZERO));
        assert!(!serving_cert_fresh(cert.as_bytes(), &names, Duration::from_secs(3600 * 24 * 400)));
    }

    #[test]
    fn workload_certificates_carry_only_the_asked_identity() {
        let root = Ca::generate_root("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let csr = |ids: &[&str]| {
            let mut p = CertificateParams::default();
            p.subject_alt_names =
                ids.iter().map(|i| SanType::URI(i.to_string().try_into().unwrap())).collect();
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
        let id = "spiffe://cluster.local/ns/a/sa/web";
        let pem = root.sign_workload(&csr(&[id]), id, Some("web-1"), Duration::from_secs(600)).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = p.parse_x509().unwrap();
        assert!(!cert.is_ca());
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 660, "ttl plus one minute of backdating");
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
        assert_eq!(
            crate::controlplane::tls::bound_pod(&p.contents).as_deref(),
            Some("web-1"),
            "bound to its pod"
        );
        let e = root.sign_workload(
            &csr(&["spiffe://cluster.local/ns/a/sa/admin"]),
            id,
            None,
            Duration::from_secs(60),
        );
        assert!(matches!(e, Err(SignError::WrongIdentity { .. })), "{e:?}");
        let e = root.sign_workload(
            &csr(&[id, "spiffe://cluster.local/ns/a/sa/admin"]),
            id,
            None,
            Duration::from_secs(60),
        );
        assert!(matches!(e, Err(SignError::WrongIdentity { .. })), "{e:?}");
        assert_eq!(root.sign_workload("garbage", id, None, Duration::from_secs(60)), Err(SignError::BadCsr));
        assert!(root.intermediates_pem().is_empty());
        assert_eq!(root.trust_bundle().len(), 1);
    }

    #[test]
    fn an_intermediate_ca_signs_and_roots_can_overlap_in_a_rotation() {
        let root = Ca::generate_root("cluster.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "mycel intermediate");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let inter = p.signed_by(&key, &root.issuer).unwrap();
        let next_root = Ca::generate_root("cluster.local").unwrap();
        // The layout cert-manager writes for an intermediate: tls.crt/tls.key, roots in ca.crt
        // (here the current root and the one replacing it).
        let bundle = format!("{}{}", root.cert_pem, next_root.cert_pem);
        let ca = Ca::from_secret_data(data(&[
            (TLS_CRT, inter.pem()),
            (TLS_KEY, key.serialize_pem()),
            (CA_CRT, bundle),
        ]))
        .unwrap();
        assert_eq!(ca.intermediates_pem().len(), 1, "workload chains carry the intermediate");
        assert_eq!(ca.trust_bundle().len(), 2, "both roots are trusted during the overlap");
        let leaf_key = KeyPair::generate().unwrap();
        let mut lp = CertificateParams::default();
        let id = "spiffe://cluster.local/ns/a/sa/web";
        lp.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        let csr = lp.serialize_request(&leaf_key).unwrap().pem().unwrap();
        let leaf_pem = ca.sign_workload(&csr, id, None, Duration::from_secs(600)).unwrap();
        let (_, leaf) = x509_parser::pem::parse_x509_pem(leaf_pem.as_bytes()).unwrap();
        let leaf = leaf.parse_x509().unwrap();
        let (_, inter_pem) = x509_parser::pem::parse_x509_pem(ca.intermediates_pem()[0].as_bytes()).unwrap();
        let inter_cert = inter_pem.parse_x509().unwrap();
        assert_eq!(leaf.issuer(), inter_cert.subject());
        leaf.verify_signature(Some(inter_cert.public_key())).expect("signed by the intermediate");
        let (_, root_pem) = x509_parser::pem::parse_x509_pem(ca.trust_bundle()[0].as_bytes()).unwrap();
        inter_cert
            .verify_signature(Some(root_pem.parse_x509().unwrap().public_key()))
            .expect("which the root signed");
    }

    #[test]
    fn bad_ca_secrets_are_explained() {
        let root = Ca::generate_root("cluster.local").unwrap();
        let other = Ca::generate_root("cluster.local").unwrap();
        let err = |pairs: &[(&'static str, String)]| Ca::from_secret_data(data(pairs)).err().unwrap();
        assert_eq!(err(&[(TLS_KEY, root.key_pem.clone())]), CaError::MissingKey(TLS_CRT));
        assert_eq!(err(&[(TLS_CRT, root.cert_pem.clone())]), CaError::MissingKey(TLS_KEY));
        assert!(matches!(
            err(&[(TLS_CRT, "garbage".into()), (TLS_KEY, root.key_pem.clone())]),
            CaError::BadCertificate(..)
        ));
        assert!(matches!(
            err(&[(TLS_CRT, root.cert_pem.clone()), (TLS_KEY, "garbage".into())]),
            CaError::BadKey(_)
        ));
        assert_eq!(
            err(&[(TLS_CRT, root.cert_pem.clone()), (TLS_KEY, other.key_pem.clone())]),
            CaError::KeyMismatch
        );
        let (leaf, leaf_key) = root.issue_serving(&["a.svc".into()], Duration::from_secs(3600)).unwrap();
        assert_eq!(err(&[(TLS_CRT, leaf), (TLS_KEY, leaf_key)]), CaError::NotACa);
    }
}
