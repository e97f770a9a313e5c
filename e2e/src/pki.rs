//! Certificates of the local cluster: one CA that signs the API server's serving certificate
//! and each component's client certificate, plus the service-account signing key. Generated
//! fresh for every cluster start; nothing here is meant for production.

use std::{net::IpAddr, path::Path};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;

/// A PEM certificate and its PEM private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// The cluster CA, able to sign more certificates.
pub struct Ca {
    pub pem: Pem,
    issuer: Issuer<'static, KeyPair>,
}

fn rc(e: rcgen::Error) -> Error {
    Error::Pki(e.to_string())
}

impl Ca {
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let key = KeyPair::generate().map_err(rc)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(rc)?;
        let pem = Pem { cert: cert.pem(), key: key.serialize_pem() };
        Ok(Ca { pem, issuer: Issuer::new(params, key) })
    }

    /// A client certificate for `CN=<user>, O=<groups…>` as the API server reads it.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Pem, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params)
    }

    /// A serving certificate for the given DNS names and IPs.
    pub fn server(&self, common_name: &str, dns: &[&str], ips: &[IpAddr]) -> Result<Pem, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        for d in dns {
            params.subject_alt_names.push(SanType::DnsName((*d).try_into().map_err(rc)?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Result<Pem, Error> {
        let key = KeyPair::generate().map_err(rc)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rc)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// A fresh key pair for signing service-account tokens: (PKCS#8 private PEM, public PEM).
pub fn signing_key() -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(rc)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Writes `<dir>/<name>.crt` and `<dir>/<name>.key` (the key readable by the owner only).
pub fn write(dir: &Path, name: &str, pem: &Pem) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::write(dir.join(format!("{name}.crt")), &pem.cert).map_err(Error::io(dir))?;
    let key_path = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(Error::io(&key_path))?;
    std::io::Write::write_all(&mut f, pem.key.as_bytes()).map_err(Error::io(&key_path))
}
