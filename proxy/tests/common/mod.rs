//! Helpers shared by the proxy's integration tests.

use std::time::{Duration, SystemTime};

use mycel_proxy::identity::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

/// A CA that issues SPIFFE certificates.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki { issuer: Issuer::new(params, key), ca_pem }
    }

    pub fn identity(&self, spiffe_id: &str) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.to_string().try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let now = SystemTime::now();
        Identity {
            spiffe_id: spiffe_id.into(),
            chain_pem: vec![cert.pem()],
            key_pem: key.serialize_pem(),
            trust_bundle_pem: vec![self.ca_pem.clone()],
            not_before: now,
            not_after: now + Duration::from_secs(3600),
            received: now,
        }
    }
}
