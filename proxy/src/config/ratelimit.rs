//! Rate limits in the proxy's model (streamed from RateLimitPolicy, or written in a static
//! configuration): token buckets on this workload's inbound requests. The counting is
//! [`crate::policy::ratelimit`]'s.

use serde::{Deserialize, Serialize};

use super::{ConfigError, route::HttpMatch};

/// The most limits one proxy counts (each keeps its own table of buckets; the control plane
/// sends at most as many).
pub const MAX_LIMITS: usize = 64;

/// The largest rate and bucket, and the longest unit (a day).
const MAX_REQUESTS: u64 = 1_000_000_000;
const MAX_PER_SECONDS: u64 = 86_400;

/// One limit: a bucket of `burst` requests, refilled at `requests` per `per_seconds`, one per
/// value of `key`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// `<namespace>/<name>` of the policy, in metrics and logs.
    #[serde(default)]
    pub policy: String,
    /// The limit's name: in metrics, logs and the refused request's headers.
    pub name: String,
    pub requests: u64,
    #[serde(default = "one")]
    pub per_seconds: u64,
    /// Default: `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    #[serde(default, skip_serializing_if = "LimitKey::is_global")]
    pub key: LimitKey,
    /// Only matching requests count; all when unset.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<HttpMatch>,
    /// Only requests to this destination port count; any when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The refused request's status (default 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Count what it would refuse; refuse nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
}

fn one() -> u64 {
    1
}

/// What is counted apart: one bucket for all (`global`), or one per value of the key. A request
/// without a value (no header, no token, a plaintext caller's principal) counts in one bucket
/// shared by all such requests.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum LimitKey {
    #[default]
    Global,
    SourceIp,
    /// The peer's SPIFFE ID without `spiffe://`.
    SourcePrincipal,
    /// A header's value (the name lowercase).
    Header(String),
    /// The normalised path, without the query.
    Path,
    /// A claim of the verified JSON Web Token, `a.b` for a nested one.
    Claim(String),
}

impl LimitKey {
    fn is_global(&self) -> bool {
        *self == LimitKey::Global
    }
}

/// Another rate for one value of the key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Override {
    pub value: String,
    pub requests: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

/// That every limit can be counted: rates and bucket sizes above zero, names unique within a
/// policy, a status that is an error, matches that compile; `rateLimits[<policy>/<name>]` names
/// the one that fails.
pub fn validate(limits: &[RateLimit]) -> Result<(), ConfigError> {
    let invalid = |field: String, message: &str| Err(ConfigError::Invalid { field, message: message.into() });
    if limits.len() > MAX_LIMITS {
        return invalid("rateLimits".into(), &format!("more than {MAX_LIMITS} limits"));
    }
    let mut names = std::collections::HashSet::new();
    for l in limits {
        let at = format!("rateLimits[{}/{}]", l.policy, l.name);
        if l.name.is_empty() || !names.insert((&l.policy, &l.name)) {
            return invalid(format!("{at}.name"), "must be set and unique within its policy");
        }
        // Sent in response headers (a structured field's string): a DNS label.
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !label(&l.name) {
            return invalid(format!("{at}.name"), "must be a DNS label (a-z, 0-9, '-', at most 63)");
        }
        if l.policy.len() > 253 || l.policy.bytes().any(|b| b.is_ascii_control() || b == b'"') {
            return invalid(format!("{at}.policy"), "must be <namespace>/<name>");
        }
        if !(1..=MAX_REQUESTS).contains(&l.requests) {
            return invalid(format!("{at}.requests"), "must be within 1-1000000000");
        }
        if !(1..=MAX_PER_SECONDS).contains(&l.per_seconds) {
            return invalid(format!("{at}.perSeconds"), "must be within 1-86400");
        }
        if l.burst.is_some_and(|b| !(1..=MAX_REQUESTS).contains(&b)) {
            return invalid(format!("{at}.burst"), "must be within 1-1000000000");
        }
        if l.status.is_some_and(|s| !(400..=599).contains(&s)) {
            return invalid(format!("{at}.status"), "must be within 400-599");
        }
        if let LimitKey::Header(h) | LimitKey::Claim(h) = &l.key
            && h.is_empty()
        {
            return invalid(format!("{at}.key"), "names no header or claim");
        }
        if let LimitKey::Header(h) = &l.key
            && hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return invalid(format!("{at}.key"), &format!("{h:?} is not a header name"));
        }
        if let Some(m) = &l.matches {
            m.validate(&format!("{at}.match"))?;
        }
        for (i, o) in l.overrides.iter().enumerate() {
            if !(1..=MAX_REQUESTS).contains(&o.requests)
                || o.burst.is_some_and(|b| !(1..=MAX_REQUESTS).contains(&b))
            {
                return invalid(
                    format!("{at}.overrides[{i}]"),
                    "requests and burst must be within 1-1000000000",
                );
            }
        }
        if !l.overrides.is_empty() && l.key.is_global() {
            return invalid(format!("{at}.overrides"), "need a key other than global");
        }
    }
    Ok(())
}
