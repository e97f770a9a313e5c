//! The proxy's one typed configuration model: listeners, and the clusters (endpoint sets) they
//! send to. Loaded from YAML or JSON (later also streamed by the control plane), validated as a
//! whole; a config that fails validation is rejected with an error naming the field, and the
//! proxy keeps the last good one.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

pub mod authn;
pub mod authz;
pub mod ratelimit;
pub mod route;
pub use route::RouteTable;

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address of the admin server (`/healthz/ready`, `/config_dump`, `/metrics`).
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// How requests to a cluster are routed (streamed from TrafficRoute); a cluster without a
    /// table sends every request to its own endpoints.
    /// Matches are written `{exact: x}`, `{prefix: /api}`, `{regex: …}`, `present` or `absent`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub routes: Vec<RouteTable>,
    /// How inbound listeners accept connections from other sidecars (streamed by the control
    /// plane from PeerAuthentication).
    #[serde(default, skip_serializing_if = "InboundMtls::is_default")]
    pub inbound_mtls: InboundMtls,
    /// Who may call this workload's inbound side (streamed from AuthorizationPolicy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<authz::AuthzPolicy>,
    /// Which JSON Web Tokens this workload's inbound side accepts (streamed from
    /// RequestAuthentication).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_authentication: Vec<authn::JwtRule>,
    /// Token buckets on this workload's inbound requests (streamed from RateLimitPolicy).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub rate_limits: Vec<ratelimit::RateLimit>,
    /// Where the limits of scope Global are decided (streamed with the inbound policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_service: Option<ratelimit::Service>,
    /// Token buckets on the requests this workload sends (RateLimitPolicy of direction Outbound).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "serde_yaml::with::singleton_map_recursive"
    )]
    pub outbound_rate_limits: Vec<ratelimit::RateLimit>,
    /// Set while a streamed proxy has not received its first inbound policy: it then accepts
    /// no inbound connection (no window in which every caller is allowed).
    #[serde(skip)]
    pub inbound_pending: bool,
    /// What a downstream client or an upstream may take of the proxy's time and memory.
    #[serde(default)]
    pub limits: Limits,
    /// Set when clusters also arrive from the control plane: a listener may then name one that
    /// has not arrived yet (its requests get 503 until it does).
    #[serde(skip)]
    pub streamed: bool,
}

/// Bounds on what one connection may take, so that a slow or hostile peer cannot hold the proxy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// An HTTP/1.1 request head must arrive whole within this long of the connection opening or
    /// of its previous response (so an idle keep-alive connection is closed after it too).
    #[serde(default = "Limits::default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// A request head (HTTP/1.1) or header list (HTTP/2) larger than this is refused (431).
    #[serde(default = "Limits::default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// A TLS handshake (mesh TLS in, and out to an endpoint) must finish within this long.
    #[serde(default = "Limits::default_tls_handshake_timeout")]
    pub tls_handshake_timeout_ms: u64,
    /// An upstream must start its response within this long of the request being sent (504).
    #[serde(default = "Limits::default_response_header_timeout")]
    pub upstream_response_header_timeout_ms: u64,
}

impl Limits {
    fn default_header_read_timeout() -> u64 {
        60_000
    }
    fn default_max_header_bytes() -> u32 {
        64 * 1024
    }
    fn default_tls_handshake_timeout() -> u64 {
        10_000
    }
    fn default_response_header_timeout() -> u64 {
        300_000
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn upstream_response_header_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_response_header_timeout_ms)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_ms: Self::default_header_read_timeout(),
            max_header_bytes: Self::default_max_header_bytes(),
            tls_handshake_timeout_ms: Self::default_tls_handshake_timeout(),
            upstream_response_header_timeout_ms: Self::default_response_header_timeout(),
        }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15020))
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// The cluster every connection or request goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Instead of a cluster: where each connection was addressed before the capture rules
    /// redirected it here (inbound: that port on loopback, where the app listens).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub original_destination: bool,
    #[serde(default)]
    pub direction: Direction,
    /// How long `auto` waits for the client's first bytes (default 500 ms).
    #[serde(default = "default_detect_timeout")]
    pub detect_timeout_ms: u64,
}

fn default_detect_timeout() -> u64 {
    500
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic the workload sends.
    #[default]
    Outbound,
    /// Traffic addressed to the workload.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Told from the first bytes: HTTP/1.1 or HTTP/2 is proxied as HTTP, anything else (TLS
    /// included) as opaque TCP. Server-first protocols wait `detectTimeoutMs`, then go opaque.
    Auto,
    /// HTTP/1.1 or HTTP/2 (prior knowledge), proxied request by request.
    Http,
    /// Opaque TCP, proxied byte for byte (half-close included).
    Tcp,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Connect timeout in milliseconds (default 1000).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default)]
    pub lb: LoadBalancer,
    /// Virtual addresses (a Service's ClusterIP and port): a captured outbound connection to
    /// one of them is balanced over `endpoints` instead of going where it was addressed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// Endpoints reached over mutual TLS, with the SPIFFE ID each must prove.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mtls_endpoints: std::collections::BTreeMap<SocketAddr, String>,
    /// Requests in flight to this cluster at once; more are refused at once with 503 `UO`
    /// (circuit breaking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Endpoints that keep failing are ejected for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// The port is declared HTTP: an outbound connection to it is served as HTTP whatever its
    /// first bytes (a client that connects ahead of its first request is not taken for TCP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
}

/// When an endpoint that keeps failing is ejected, and for how long (Envoy's and Istio's
/// outlier detection: consecutive errors eject at once; ejections end on the sweep after their
/// time is up; the time grows with each ejection and shrinks back while the endpoint is well).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx (connect failures, resets and timeouts included); 0 is off.
    #[serde(default)]
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (connect failures, resets and timeouts included); 0 is off.
    #[serde(default)]
    pub consecutive_gateway: u32,
    #[serde(default = "OutlierDetection::default_interval")]
    pub interval_ms: u64,
    #[serde(default = "OutlierDetection::default_base_ejection")]
    pub base_ejection_ms: u64,
    #[serde(default = "OutlierDetection::default_max_percent")]
    pub max_ejection_percent: u32,
}

impl OutlierDetection {
    fn default_interval() -> u64 {
        10_000
    }
    fn default_base_ejection() -> u64 {
        30_000
    }
    fn default_max_percent() -> u32 {
        10
    }
}

/// Inbound mutual TLS: a mode, and per destination port overrides.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundMtls {
    #[serde(default)]
    pub mode: MtlsMode,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ports: std::collections::BTreeMap<u16, MtlsMode>,
}

impl InboundMtls {
    fn is_default(&self) -> bool {
        *self == InboundMtls::default()
    }

    /// The mode for connections to `port`.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Mutual TLS from sidecars and plaintext from anyone else, on the same port.
    #[default]
    Permissive,
    /// Mutual TLS only: plaintext connections are closed.
    Strict,
    /// Plaintext only: mesh TLS is passed to the app untouched.
    Disable,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// What `ConsistentHash` hashes: exactly one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_header: Option<String>,
    /// With `hashCookieTtlS`, a request without the cookie gets one (a random value), set on its
    /// response with `hashCookiePath`; without, the cookie is the app's and is only read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_cookie_ttl_s: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hash_source_ip: bool,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// Power of two choices on peak-EWMA latency × requests in flight.
    #[default]
    PeakEwma,
    RoundRobin,
    /// Power of two choices on requests in flight.
    LeastRequest,
    Random,
    /// Maglev consistent hashing on a header, a cookie or the client's IP.
    ConsistentHash,
}

fn default_connect_timeout() -> u64 {
    1000
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cannot parse the configuration: {0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl Config {
    /// Parses YAML (JSON is YAML too) and validates.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_with(text, false)
    }

    /// Parses and validates, for a proxy whose clusters also arrive from the control plane
    /// when `streamed` is set.
    pub fn parse_with(text: &str, streamed: bool) -> Result<Config, ConfigError> {
        let mut c: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.streamed = streamed;
        c.validate()?;
        Ok(c)
    }

    /// Checks what types cannot: unique names and addresses, references that resolve.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| Err(ConfigError::Invalid { field, message });
        let l = &self.limits;
        for (field, v) in [
            ("limits.headerReadTimeoutMs", l.header_read_timeout_ms),
            ("limits.tlsHandshakeTimeoutMs", l.tls_handshake_timeout_ms),
            ("limits.upstreamResponseHeaderTimeoutMs", l.upstream_response_header_timeout_ms),
        ] {
            if v == 0 {
                return invalid(field.into(), "must be above 0".into());
            }
        }
        authz::validate(&self.authorization)?;
        authn::validate(&self.request_authentication)?;
        ratelimit::validate(&self.rate_limits, self.rate_limit_service.as_ref())?;
        ratelimit::validate_outbound(&self.outbound_rate_limits, self.rate_limit_service.as_ref())?;
        if l.max_header_bytes < 8192 {
            return invalid("limits.maxHeaderBytes".into(), "must be at least 8192".into());
        }
        let mut cluster_names = BTreeSet::new();
        let mut vips = std::collections::BTreeMap::new();
        for (i, c) in self.clusters.iter().enumerate() {
            if c.name.is_empty() {
                return invalid(format!("clusters[{i}].name"), "must not be empty".into());
            }
            if !cluster_names.insert(c.name.as_str()) {
                return invalid(
                    format!("clusters[{i}].name"),
                    format!("{:?} is used by another cluster", c.name),
                );
            }
            let hash_keys = [c.lb.hash_header.is_some(), c.lb.hash_cookie.is_some(), c.lb.hash_source_ip]
                .iter()
                .filter(|x| **x)
                .count();
            if let Some(name) = &c.lb.hash_cookie
                && !mycel_api::route::cookie_name(name)
            {
                return invalid(
                    format!("clusters[{i}].lb.hashCookie"),
                    format!("{name:?} is not a cookie name"),
                );
            }
            if let Some(p) = &c.lb.hash_cookie_path
                && !mycel_api::route::cookie_path(p)
            {
                return invalid(
                    format!("clusters[{i}].lb.hashCookiePath"),
                    format!("{p:?} is not a cookie path"),
                );
            }
            if c.lb.algorithm == LbAlgorithm::ConsistentHash && hash_keys != 1 {
                return invalid(
                    format!("clusters[{i}].lb"),
                    "ConsistentHash needs exactly one of hashHeader, hashCookie or hashSourceIp: true".into(),
                );
            }
            if c.lb.algorithm != LbAlgorithm::ConsistentHash && hash_keys != 0 {
                return invalid(
                    format!("clusters[{i}].lb"),
                    "hash settings need algorithm: ConsistentHash".into(),
                );
            }
            if c.connect_timeout_ms == 0 {
                return invalid(format!("clusters[{i}].connectTimeoutMs"), "must be above 0".into());
            }
            if c.max_requests == Some(0) {
                return invalid(
                    format!("clusters[{i}].maxRequests"),
                    "must be above 0 (leave it out for no limit)".into(),
                );
            }
            if let Some(o) = &c.outlier_detection {
                if o.interval_ms == 0 || o.base_ejection_ms == 0 {
                    return invalid(
                        format!("clusters[{i}].outlierDetection"),
                        "intervalMs and baseEjectionMs must be above 0".into(),
                    );
                }
                if o.max_ejection_percent > 100 {
                    return invalid(
                        format!("clusters[{i}].outlierDetection.maxEjectionPercent"),
                        "must be at most 100".into(),
                    );
                }
            }
            for (j, a) in c.addresses.iter().enumerate() {
                if let Some(other) = vips.insert(*a, c.name.as_str()) {
                    return invalid(
                        format!("clusters[{i}].addresses[{j}]"),
                        format!("{a} is already an address of cluster {other:?}"),
                    );
                }
            }
        }
        let mut routed = BTreeSet::new();
        for (i, t) in self.routes.iter().enumerate() {
            if !routed.insert(t.cluster.as_str()) {
                return invalid(
                    format!("routes[{i}].cluster"),
                    format!("{:?} has another route table", t.cluster),
                );
            }
            t.validate(&format!("routes[{i}]"), &|c| self.streamed || cluster_names.contains(c))?;
        }
        let mut names = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() {
                return invalid(format!("listeners[{i}].name"), "must not be empty".into());
            }
            if !names.insert(l.name.as_str()) {
                return invalid(
                    format!("listeners[{i}].name"),
                    format!("{:?} is used by another listener", l.name),
                );
            }
            if l.address.port() != 0 && !addresses.insert(l.address) {
                return invalid(
                    format!("listeners[{i}].address"),
                    format!("{} is used by another listener", l.address),
                );
            }
            match (&l.cluster, l.original_destination) {
                (Some(_), true) | (None, false) => {
                    return invalid(
                        format!("listeners[{i}]"),
                        "set exactly one of cluster or originalDestination: true".into(),
                    );
                }
                (Some(c), false) if !self.streamed && !cluster_names.contains(c.as_str()) => {
                    let known: Vec<&str> = cluster_names.iter().copied().collect();
                    return invalid(
                        format!("listeners[{i}].cluster"),
                        format!("no cluster named {c:?}; defined clusters: [{}]", known.join(", ")),
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_config_parses() {
        let c = Config::parse(
            "listeners:\n- {name: web, address: '127.0.0.1:0', protocol: http, cluster: backend}\nclusters:\n- {name: backend, endpoints: ['127.0.0.1:8080']}\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].protocol, Protocol::Http);
        assert_eq!(c.admin.port(), 15020);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("listeners:\n- {name: web, address: '127.0.0.1:0', protocol: http, cluster: nope}\nclusters:\n- {name: backend}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "listeners[0].cluster: no cluster named \"nope\"; defined clusters: [backend]");
        let e = Config::parse("listeners:\n- {name: web, address: '127.0.0.1:0', protocol: tcp}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "listeners[0]: set exactly one of cluster or originalDestination: true");
        let e = Config::parse("clusters:\n- {name: a}\n- {name: a}\n").unwrap_err().to_string();
        assert!(e.starts_with("clusters[1].name:"), "{e}");
        let e = Config::parse("listeners:\n- {name: web, address: 'nowhere', protocol: http, cluster: a}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listeners[0]") && e.contains("address"), "{e}");
        let e = Config::parse("listners: []\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `listners`"), "{e}");
        let e =
            Config::parse("listeners:\n- {name: web, address: '127.0.0.1:0', protocol: udp, cluster: a}\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("protocol") && e.contains("udp"), "{e}");
    }
}
