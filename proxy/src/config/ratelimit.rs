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
    /// Counted by the mesh's rate-limit service, in one counter per key shared by every proxy
    /// the policy selects, instead of in this proxy's buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global: Option<Global>,
    /// Only requests to these hosts count (exact, or `*.` and a suffix); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

fn one() -> u64 {
    1
}

fn yes() -> bool {
    true
}

/// How a global limit is counted and what happens while it cannot be.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Global {
    /// Admit (true) or refuse with 503 (false) while the rate-limit service cannot decide.
    #[serde(default = "yes")]
    pub failure_open: bool,
    /// A quota: `requests` per calendar window in `time_zone`, reset at its boundary (and no
    /// rate); a rate (GCRA) when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// IANA name of the windows' time zone (UTC when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

/// The calendar window of a quota.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Window {
    Hour,
    Day,
    Month,
}

/// Where global limits are decided: the mesh's rate-limit service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// `host:port`.
    pub address: String,
    /// The SPIFFE ID its certificate must carry.
    pub identity: String,
    /// How long a decision may take before a limit's failure mode applies.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    200
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
pub fn validate(limits: &[RateLimit], service: Option<&Service>) -> Result<(), ConfigError> {
    validate_in("rateLimits", limits, service)
}

/// The limits of the requests a workload sends ([`validate`], and keyed by what a sender's
/// requests carry: no key, a header or the path).
pub fn validate_outbound(limits: &[RateLimit], service: Option<&Service>) -> Result<(), ConfigError> {
    validate_in("outboundRateLimits", limits, service)?;
    for l in limits {
        if !matches!(l.key, LimitKey::Global | LimitKey::Header(_) | LimitKey::Path) {
            return Err(ConfigError::Invalid {
                field: format!("outboundRateLimits[{}/{}].key", l.policy, l.name),
                message: "an outbound limit is keyed by nothing, a header or the path (its caller is this workload)".into(),
            });
        }
    }
    Ok(())
}

fn validate_in(what: &str, limits: &[RateLimit], service: Option<&Service>) -> Result<(), ConfigError> {
    let invalid = |field: String, message: &str| Err(ConfigError::Invalid { field, message: message.into() });
    if limits.len() > MAX_LIMITS {
        return invalid(what.into(), &format!("more than {MAX_LIMITS} limits"));
    }
    if let Some(s) = service {
        if s.address.is_empty() || s.address.len() > 253 || !s.address.contains(':') {
            return invalid("rateLimitService.address".into(), "must be host:port");
        }
        if !s.identity.starts_with("spiffe://") {
            return invalid("rateLimitService.identity".into(), "must be a SPIFFE ID");
        }
        if !(1..=10_000).contains(&s.timeout_ms) {
            return invalid("rateLimitService.timeoutMs".into(), "must be within 1-10000");
        }
    }
    let mut names = std::collections::HashSet::new();
    for l in limits {
        let at = format!("{what}[{}/{}]", l.policy, l.name);
        if l.hosts.len() > 16
            || l.hosts.iter().any(|h| {
                let name = h.strip_prefix("*.").unwrap_or(h);
                name.is_empty()
                    || name.len() > 253
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            })
        {
            return invalid(
                format!("{at}.hosts"),
                "at most 16, each a lowercase host name or *. and a suffix, without a port",
            );
        }
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
        // A quota's unit is its calendar window, up to a month of 31 days.
        let longest =
            if l.global.as_ref().is_some_and(|g| g.window.is_some()) { 31 * 86_400 } else { MAX_PER_SECONDS };
        if !(1..=longest).contains(&l.per_seconds) {
            return invalid(format!("{at}.perSeconds"), &format!("must be within 1-{longest}"));
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
        if let Some(g) = &l.global {
            if service.is_none() {
                return invalid(
                    format!("{at}.global"),
                    "no rate-limit service is configured (rateLimitService) to count it",
                );
            }
            if g.time_zone.as_ref().is_some_and(|z| {
                z.is_empty()
                    || z.len() > 64
                    || !z.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
            }) {
                return invalid(format!("{at}.global.timeZone"), "is not an IANA time zone name");
            }
            if g.time_zone.is_some() && g.window.is_none() {
                return invalid(format!("{at}.global.timeZone"), "applies to a quota's window only");
            }
            // What the rate-limit service accepts, so that no request's check is refused whole.
            if l.policy.split_once('/').is_none_or(|(ns, name)| ns.is_empty() || name.is_empty()) {
                return invalid(
                    format!("{at}.policy"),
                    "a global limit names its policy as <namespace>/<name> (the rate-limit service counts by it)",
                );
            }
            if l.name.len() > 63 {
                return invalid(format!("{at}.name"), "a global limit's name has at most 63 characters");
            }
            let rates = std::iter::once((l.requests, l.burst))
                .chain(l.overrides.iter().map(|o| (o.requests, o.burst)));
            for (requests, burst) in rates {
                let burst = burst.unwrap_or(requests);
                if g.window.is_none() && !mycel_api::ratelimit::within_memory(requests, l.per_seconds, burst)
                {
                    return invalid(
                        format!("{at}.burst"),
                        "burst × perSeconds / requests must be at most 31 days",
                    );
                }
            }
        }
        if !l.overrides.is_empty() && l.key.is_global() {
            return invalid(format!("{at}.overrides"), "need a key other than global");
        }
    }
    Ok(())
}
