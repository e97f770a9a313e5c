//! Authorization policies in the proxy's model (streamed from AuthorizationPolicy, or written in
//! a static configuration): who may call this workload's inbound side, and how. The evaluation
//! is [`crate::policy::authz`]'s.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// One policy. Its rules are ORed: the policy matches a request that matches any; no rule matches
/// nothing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzPolicy {
    /// `<namespace>/<name>`, in metrics and logs.
    pub name: String,
    #[serde(default)]
    pub action: AuthzAction,
    /// Evaluated and reported, never enforced.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
    /// The external authorizer of a CUSTOM policy; a CUSTOM policy without one refuses what it
    /// matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtAuthzProvider>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

/// An external authorizer speaking Envoy's external authorization gRPC API, in plaintext.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzProvider {
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// How long a decision may take (1 ms to 30 s).
    pub timeout_ms: u64,
    /// Without a decision: let the request go on (`true`) or refuse it with `status_on_error`.
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default = "default_status_on_error")]
    pub status_on_error: u16,
}

fn default_status_on_error() -> u16 {
    403
}

impl AuthzAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
            AuthzAction::Custom => "CUSTOM",
        }
    }
}

/// Every present part must match: any `from`, any `to`, every `when`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// Who calls. An empty list is not set; set lists are ANDed, the values of one ORed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// `<iss>/<sub>` of the request's valid token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// The original client's address (in a sidecar, the peer's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What is called.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A condition on one attribute.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzCondition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// The condition keys the proxy knows.
pub const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "request.method",
    "request.path",
    "request.headers[<name>]",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[<name>]",
];

/// Checks what a policy list holds that the evaluation could not use; errors name the field
/// (`authorization[<policy>].rules[2].from[0].source.ipBlocks[1]`).
pub fn validate(policies: &[AuthzPolicy]) -> Result<(), ConfigError> {
    let invalid = |field: String, message: String| Err(ConfigError::Invalid { field, message });
    let mut names = std::collections::BTreeSet::new();
    for p in policies {
        let at = format!("authorization[{}]", p.name);
        if p.name.is_empty() || !names.insert(p.name.as_str()) {
            return invalid(format!("{at}.name"), "must be set and unique".into());
        }
        if let Some(x) = &p.provider {
            if p.action != AuthzAction::Custom {
                return invalid(format!("{at}.provider"), "only a CUSTOM policy has a provider".into());
            }
            if x.address.parse::<http::uri::Authority>().ok().and_then(|a| a.port_u16()).is_none() {
                return invalid(
                    format!("{at}.provider.address"),
                    format!("{:?} is not host:port", x.address),
                );
            }
            if !(1..=30_000).contains(&x.timeout_ms) {
                return invalid(format!("{at}.provider.timeoutMs"), "must be 1 to 30000".into());
            }
            if hyper::StatusCode::from_u16(x.status_on_error).is_err() || x.status_on_error < 200 {
                return invalid(
                    format!("{at}.provider.statusOnError"),
                    "must be an HTTP status of 200 to 599".into(),
                );
            }
        }
        for (r, rule) in p.rules.iter().enumerate() {
            for (i, s) in rule.from.iter().enumerate() {
                for (list, blocks) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (j, b) in blocks.iter().enumerate() {
                        if !mycel_api::authz::is_ip_block(b) {
                            return invalid(
                                format!("{at}.rules[{r}].from[{i}].source.{list}[{j}]"),
                                format!("{b:?} is not an IP address or a CIDR"),
                            );
                        }
                    }
                }
            }
            for (i, o) in rule.to.iter().enumerate() {
                for (list, ports) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                    if ports.contains(&0) {
                        return invalid(
                            format!("{at}.rules[{r}].to[{i}].operation.{list}"),
                            "0 is not a port".into(),
                        );
                    }
                }
                for (list, paths) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
                    for (j, path) in paths.iter().enumerate() {
                        if let Some(m) = mycel_api::authz::path_template_error(path) {
                            return invalid(format!("{at}.rules[{r}].to[{i}].operation.{list}[{j}]"), m);
                        }
                    }
                }
            }
            for (i, c) in rule.when.iter().enumerate() {
                let field = format!("{at}.rules[{r}].when[{i}]");
                if ConditionKey::parse(&c.key).is_none() {
                    return invalid(
                        format!("{field}.key"),
                        format!("{:?} is not one of {}", c.key, CONDITION_KEYS.join(", ")),
                    );
                }
                for (list, values) in [("values", &c.values), ("notValues", &c.not_values)] {
                    for (j, v) in values.iter().enumerate() {
                        if let Some(m) = mycel_api::authz::condition_value_error(&c.key, v) {
                            return invalid(format!("{field}.{list}[{j}]"), m);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A `when` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    RequestMethod,
    RequestPath,
    /// Lowercased.
    RequestHeader(String),
    RequestAuthPrincipal,
    RequestAuthAudiences,
    RequestAuthPresenter,
    /// The claim's name, then names inside it (`request.auth.claims[a][b]`).
    RequestAuthClaim(Vec<String>),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Option<ConditionKey> {
        Some(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "destination.port" => ConditionKey::DestinationPort,
            "request.method" => ConditionKey::RequestMethod,
            "request.path" => ConditionKey::RequestPath,
            "request.auth.principal" => ConditionKey::RequestAuthPrincipal,
            "request.auth.audiences" => ConditionKey::RequestAuthAudiences,
            "request.auth.presenter" => ConditionKey::RequestAuthPresenter,
            _ if key.starts_with("request.auth.claims[") => {
                let mut rest = key.strip_prefix("request.auth.claims")?;
                let mut path = Vec::new();
                while !rest.is_empty() {
                    let (name, tail) = rest.strip_prefix('[')?.split_once(']')?;
                    if name.is_empty() || name.contains('[') || path.len() == 8 {
                        return None;
                    }
                    path.push(name.to_string());
                    rest = tail;
                }
                ConditionKey::RequestAuthClaim(path)
            }
            _ => {
                let name = key.strip_prefix("request.headers[")?.strip_suffix(']')?;
                if name.is_empty() || hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return None;
                }
                ConditionKey::RequestHeader(name.to_ascii_lowercase())
            }
        })
    }

    /// Whether only an HTTP request has it.
    pub fn http(&self) -> bool {
        !matches!(
            self,
            ConditionKey::SourceIp
                | ConditionKey::RemoteIp
                | ConditionKey::SourceNamespace
                | ConditionKey::SourcePrincipal
                | ConditionKey::DestinationPort
        )
    }
}
