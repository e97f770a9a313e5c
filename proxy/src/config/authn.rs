//! Request authentication in the proxy's model (streamed from RequestAuthentication, or written
//! in a static configuration): which JSON Web Tokens this workload's inbound side accepts. The
//! verification is [`crate::policy::jwt`]'s.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// One issuer's tokens.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// `<namespace>/<name>` of the policy, in logs.
    #[serde(default)]
    pub policy: String,
    pub issuer: String,
    /// `aud` must name one of these; any audience when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The JSON Web Key Set; empty: no key, so every token of the issuer fails.
    #[serde(default)]
    pub jwks: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
}

fn default_clock_skew() -> u64 {
    60
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// Header names that only this proxy may set, whatever a rule says.
const RESERVED: &[&str] = &[
    "host",
    "x-forwarded-client-cert",
    crate::error::ERROR_HEADER,
    "content-length",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// Checks what the verification could not use; errors name the field
/// (`requestAuthentication[<issuer>].fromHeaders[0].name`). A key set that does not parse is not
/// an error here: its keys are skipped (so tokens it would have verified fail), as a key set that
/// has not been fetched yet.
pub fn validate(rules: &[JwtRule]) -> Result<(), ConfigError> {
    let invalid = |field: String, message: String| Err(ConfigError::Invalid { field, message });
    let mut issuers = std::collections::BTreeSet::new();
    let header = |n: &str| hyper::header::HeaderName::from_bytes(n.as_bytes()).is_ok();
    for r in rules {
        let at = format!("requestAuthentication[{}]", r.issuer);
        if r.issuer.is_empty() || !issuers.insert(r.issuer.as_str()) {
            return invalid(format!("{at}.issuer"), "must be set and unique".into());
        }
        for (i, h) in r.from_headers.iter().enumerate() {
            if !header(&h.name) {
                return invalid(
                    format!("{at}.fromHeaders[{i}].name"),
                    format!("{:?} is not a header name", h.name),
                );
            }
        }
        for (i, o) in r.output_claim_to_headers.iter().enumerate() {
            if !header(&o.header) || RESERVED.contains(&o.header.to_ascii_lowercase().as_str()) {
                return invalid(
                    format!("{at}.outputClaimToHeaders[{i}].header"),
                    format!("{:?} is not a header name a claim may set", o.header),
                );
            }
            if o.claim.is_empty() {
                return invalid(format!("{at}.outputClaimToHeaders[{i}].claim"), "must be set".into());
            }
        }
    }
    Ok(())
}
