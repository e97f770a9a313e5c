//! Streamed resources into the proxy's model: each converted on its own, a bad one refused with
//! the field at fault (named by the resource's name, not its position).

use std::{collections::BTreeMap, net::SocketAddr};

use mycel_api::v1alpha1 as pb;

use crate::config::{self, ConfigError, route};

/// A streamed cluster in the proxy's model. Endpoints that are not ready are left out.
pub fn convert_cluster(c: &pb::Cluster) -> Result<config::Cluster, ConfigError> {
    let invalid = |field: String, message: String| ConfigError::Invalid { field, message };
    let mut endpoints = Vec::new();
    let mut mtls_endpoints = BTreeMap::new();
    for (i, e) in c.endpoints.iter().enumerate() {
        let addr: SocketAddr = e.address.parse().map_err(|_| {
            invalid(
                format!("clusters[{}].endpoints[{i}].address", c.name),
                format!("{:?} is not ip:port", e.address),
            )
        })?;
        if e.mtls {
            if e.identity.parse::<mycel_api::spiffe::SpiffeId>().is_err() {
                return Err(invalid(
                    format!("clusters[{}].endpoints[{i}].identity", c.name),
                    format!("mutual TLS needs a SPIFFE ID, not {:?}", e.identity),
                ));
            }
            mtls_endpoints.insert(addr, e.identity.clone());
        }
        if e.ready {
            endpoints.push(addr);
        }
    }
    let addresses = c
        .addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse().map_err(|_| {
                invalid(format!("clusters[{}].addresses[{i}]", c.name), format!("{a:?} is not ip:port"))
            })
        })
        .collect::<Result<Vec<SocketAddr>, _>>()?;
    let mut lb = config::LoadBalancer::default();
    if let Some(l) = &c.load_balancer {
        use pb::load_balancer::{Algorithm, HashOn};
        lb.algorithm = match Algorithm::try_from(l.algorithm) {
            Ok(Algorithm::PeakEwma) => config::LbAlgorithm::PeakEwma,
            Ok(Algorithm::RoundRobin) => config::LbAlgorithm::RoundRobin,
            Ok(Algorithm::LeastRequest) => config::LbAlgorithm::LeastRequest,
            Ok(Algorithm::Random) => config::LbAlgorithm::Random,
            Ok(Algorithm::ConsistentHash) => config::LbAlgorithm::ConsistentHash,
            Err(_) => {
                return Err(invalid(
                    format!("clusters[{}].loadBalancer.algorithm", c.name),
                    format!("unknown algorithm {}", l.algorithm),
                ));
            }
        };
        match &l.hash_on {
            Some(HashOn::Header(h)) => lb.hash_header = Some(h.clone()),
            Some(HashOn::Cookie(h)) => {
                lb.hash_cookie = Some(h.clone());
                lb.hash_cookie_path = (!l.cookie_path.is_empty()).then(|| l.cookie_path.clone());
                lb.hash_cookie_ttl_s = (l.cookie_ttl_s > 0).then_some(u64::from(l.cookie_ttl_s));
            }
            Some(HashOn::SourceIp(b)) => lb.hash_source_ip = *b,
            None => {}
        }
    }
    Ok(config::Cluster {
        name: c.name.clone(),
        endpoints,
        connect_timeout_ms: if c.connect_timeout_ms == 0 { 1000 } else { u64::from(c.connect_timeout_ms) },
        lb,
        addresses,
        mtls_endpoints,
        max_requests: (c.max_requests > 0).then_some(c.max_requests),
        http: c.http,
        outlier_detection: c.outlier_detection.as_ref().map(|o| config::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway,
            interval_ms: if o.interval_ms == 0 { 10_000 } else { u64::from(o.interval_ms) },
            base_ejection_ms: if o.base_ejection_ms == 0 { 30_000 } else { u64::from(o.base_ejection_ms) },
            max_ejection_percent: o.max_ejection_percent.min(100),
        }),
    })
}

/// The inbound policy in the proxy's model: mutual TLS, and the authorization policies.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundPolicy {
    pub mtls: config::InboundMtls,
    pub authz: Vec<config::authz::AuthzPolicy>,
    pub jwt: Vec<config::authn::JwtRule>,
    pub rate_limits: Vec<config::ratelimit::RateLimit>,
    pub rate_limit_service: Option<config::ratelimit::Service>,
    pub outbound_rate_limits: Vec<config::ratelimit::RateLimit>,
}

/// The inbound policy from its streamed form.
pub fn convert_policy(p: &pb::PeerPolicy) -> Result<InboundPolicy, ConfigError> {
    use config::authz;
    let strings = |v: &[String]| v.to_vec();
    let ports = |v: &[u32], field: String| -> Result<Vec<u16>, ConfigError> {
        v.iter()
            .map(|p| {
                u16::try_from(*p).ok().filter(|p| *p > 0).ok_or_else(|| ConfigError::Invalid {
                    field: field.clone(),
                    message: format!("{p} is not a TCP port"),
                })
            })
            .collect()
    };
    let mut policies = Vec::with_capacity(p.authz.len());
    for a in &p.authz {
        let at = format!("authorization[{}]", a.name);
        let action = match pb::AuthzAction::try_from(a.action) {
            Ok(pb::AuthzAction::AuthzAllow) => authz::AuthzAction::Allow,
            Ok(pb::AuthzAction::AuthzDeny) => authz::AuthzAction::Deny,
            Ok(pb::AuthzAction::AuthzAudit) => authz::AuthzAction::Audit,
            Ok(pb::AuthzAction::AuthzCustom) => authz::AuthzAction::Custom,
            Err(_) => {
                return Err(ConfigError::Invalid {
                    field: format!("{at}.action"),
                    message: format!("unknown action {}", a.action),
                });
            }
        };
        let mut rules = Vec::with_capacity(a.rules.len());
        for (r, rule) in a.rules.iter().enumerate() {
            let mut to = Vec::with_capacity(rule.to.len());
            for (i, o) in rule.to.iter().enumerate() {
                let f = |l: &str| format!("{at}.rules[{r}].to[{i}].operation.{l}");
                to.push(authz::AuthzOperation {
                    hosts: strings(&o.hosts),
                    not_hosts: strings(&o.not_hosts),
                    ports: ports(&o.ports, f("ports"))?,
                    not_ports: ports(&o.not_ports, f("notPorts"))?,
                    methods: strings(&o.methods),
                    not_methods: strings(&o.not_methods),
                    paths: strings(&o.paths),
                    not_paths: strings(&o.not_paths),
                });
            }
            rules.push(authz::AuthzRule {
                from: rule
                    .from
                    .iter()
                    .map(|s| authz::AuthzSource {
                        principals: strings(&s.principals),
                        not_principals: strings(&s.not_principals),
                        namespaces: strings(&s.namespaces),
                        not_namespaces: strings(&s.not_namespaces),
                        ip_blocks: strings(&s.ip_blocks),
                        not_ip_blocks: strings(&s.not_ip_blocks),
                        remote_ip_blocks: strings(&s.remote_ip_blocks),
                        not_remote_ip_blocks: strings(&s.not_remote_ip_blocks),
                        request_principals: strings(&s.request_principals),
                        not_request_principals: strings(&s.not_request_principals),
                    })
                    .collect(),
                to,
                when: rule
                    .when
                    .iter()
                    .map(|c| authz::AuthzCondition {
                        key: c.key.clone(),
                        values: strings(&c.values),
                        not_values: strings(&c.not_values),
                    })
                    .collect(),
            });
        }
        let provider = a.provider.as_ref().map(|x| authz::ExtAuthzProvider {
            name: x.name.clone(),
            address: x.address.clone(),
            timeout_ms: u64::from(x.timeout_ms),
            fail_open: x.fail_open,
            status_on_error: u16::try_from(x.status_on_error).unwrap_or(0),
        });
        policies.push(authz::AuthzPolicy {
            name: a.name.clone(),
            action,
            dry_run: a.dry_run,
            rules,
            provider,
        });
    }
    authz::validate(&policies)?;
    let jwt: Vec<config::authn::JwtRule> = p
        .jwt
        .iter()
        .map(|r| config::authn::JwtRule {
            policy: r.policy.clone(),
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks: r.jwks.clone(),
            from_headers: r
                .from_headers
                .iter()
                .map(|h| config::authn::JwtHeader { name: h.name.clone(), prefix: h.prefix.clone() })
                .collect(),
            from_params: r.from_params.clone(),
            from_cookies: r.from_cookies.clone(),
            forward_original_token: r.forward_original_token,
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|o| config::authn::ClaimToHeader { header: o.header.clone(), claim: o.claim.clone() })
                .collect(),
            clock_skew_seconds: u64::from(r.clock_skew_seconds),
        })
        .collect();
    config::authn::validate(&jwt)?;
    let rate_limits = convert_rate_limits(&p.rate_limits, "rateLimits")?;
    let outbound_rate_limits = convert_rate_limits(&p.outbound_rate_limits, "outboundRateLimits")?;
    let rate_limit_service = p.rate_limit_service.as_ref().map(|s| config::ratelimit::Service {
        address: s.address.clone(),
        identity: s.identity.clone(),
        timeout_ms: if s.timeout_ms == 0 { 200 } else { u64::from(s.timeout_ms) },
    });
    config::ratelimit::validate(&rate_limits, rate_limit_service.as_ref())?;
    config::ratelimit::validate_outbound(&outbound_rate_limits, rate_limit_service.as_ref())?;
    Ok(InboundPolicy {
        mtls: convert_mtls(p)?,
        authz: policies,
        jwt,
        rate_limits,
        rate_limit_service,
        outbound_rate_limits,
    })
}

/// The rate limits of an inbound policy from their streamed form.
fn convert_rate_limits(
    limits: &[pb::RateLimit],
    what: &str,
) -> Result<Vec<config::ratelimit::RateLimit>, ConfigError> {
    use config::ratelimit::{LimitKey, Override, RateLimit};
    let mut out = Vec::with_capacity(limits.len());
    for l in limits {
        let at = format!("{what}[{}/{}]", l.policy, l.name);
        let key = l.key.clone().unwrap_or_default();
        let key = match pb::RateLimitKeyType::try_from(key.r#type) {
            Ok(pb::RateLimitKeyType::RateLimitKeyGlobal) => LimitKey::Global,
            Ok(pb::RateLimitKeyType::RateLimitKeySourceIp) => LimitKey::SourceIp,
            Ok(pb::RateLimitKeyType::RateLimitKeySourcePrincipal) => LimitKey::SourcePrincipal,
            Ok(pb::RateLimitKeyType::RateLimitKeyHeader) => LimitKey::Header(key.name),
            Ok(pb::RateLimitKeyType::RateLimitKeyPath) => LimitKey::Path,
            Ok(pb::RateLimitKeyType::RateLimitKeyClaim) => LimitKey::Claim(key.name),
            Err(_) => {
                return Err(ConfigError::Invalid {
                    field: format!("{at}.key"),
                    message: format!("unknown key type {}", key.r#type),
                });
            }
        };
        let matches = match &l.r#match {
            Some(m) => Some(http_match(m, &format!("{at}.match"))?),
            None => None,
        };
        let port = match l.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| ConfigError::Invalid {
                field: format!("{at}.port"),
                message: format!("{p} is not a TCP port"),
            })?),
        };
        let status = match l.status {
            0 => None,
            s => Some(u16::try_from(s).unwrap_or(0)),
        };
        let global = l.global.then(|| config::ratelimit::Global {
            failure_open: l.failure_open,
            window: match pb::QuotaWindow::try_from(l.window) {
                Ok(pb::QuotaWindow::Hour) => Some(config::ratelimit::Window::Hour),
                Ok(pb::QuotaWindow::Day) => Some(config::ratelimit::Window::Day),
                Ok(pb::QuotaWindow::Month) => Some(config::ratelimit::Window::Month),
                _ => None,
            },
            time_zone: Some(l.time_zone.clone()).filter(|z| !z.is_empty()),
        });
        if !l.global && (l.window != 0 || !l.time_zone.is_empty()) {
            return Err(ConfigError::Invalid {
                field: format!("{at}.window"),
                message: "a quota's window needs a global limit".into(),
            });
        }
        out.push(RateLimit {
            policy: l.policy.clone(),
            name: l.name.clone(),
            requests: l.requests,
            per_seconds: l.per_seconds,
            burst: Some(l.burst).filter(|b| *b > 0),
            key,
            matches,
            port,
            status,
            shadow: l.shadow,
            overrides: l
                .overrides
                .iter()
                .map(|o| Override {
                    value: o.value.clone(),
                    requests: o.requests,
                    burst: Some(o.burst).filter(|b| *b > 0),
                })
                .collect(),
            global,
            hosts: l.hosts.clone(),
        });
    }
    Ok(out)
}

/// The inbound mutual-TLS policy from its streamed form.
fn convert_mtls(p: &pb::PeerPolicy) -> Result<config::InboundMtls, ConfigError> {
    let mode = |m: i32, field: String| match pb::MtlsMode::try_from(m) {
        Ok(pb::MtlsMode::MtlsPermissive) => Ok(config::MtlsMode::Permissive),
        Ok(pb::MtlsMode::MtlsStrict) => Ok(config::MtlsMode::Strict),
        Ok(pb::MtlsMode::MtlsDisable) => Ok(config::MtlsMode::Disable),
        Err(_) => Err(ConfigError::Invalid { field, message: format!("unknown mode {m}") }),
    };
    let mut ports = BTreeMap::new();
    for (port, m) in &p.ports {
        let field = format!("peerPolicy.ports[{port}]");
        let port = u16::try_from(*port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| ConfigError::Invalid { field: field.clone(), message: "not a TCP port".into() })?;
        ports.insert(port, mode(*m, field)?);
    }
    Ok(config::InboundMtls { mode: mode(p.mode, "peerPolicy.mode".into())?, ports })
}

/// A streamed match in the proxy's model (`at` names it in an error).
fn http_match(m: &pb::HttpMatch, at: &str) -> Result<route::HttpMatch, ConfigError> {
    Ok(route::HttpMatch {
        path: string_match(&m.path, format!("{at}.path"))?,
        method: (!m.method.is_empty()).then(|| m.method.clone()),
        headers: named(&m.headers, format!("{at}.headers"))?,
        query_params: named(&m.query_params, format!("{at}.queryParams"))?,
    })
}

fn string_match(
    m: &Option<pb::StringMatch>,
    field: String,
) -> Result<Option<route::StringMatch>, ConfigError> {
    use pb::string_match::Kind;
    Ok(match m.as_ref().and_then(|m| m.kind.as_ref()) {
        None => None,
        Some(Kind::Exact(s)) => Some(route::StringMatch::Exact(s.clone())),
        Some(Kind::Prefix(s)) => Some(route::StringMatch::Prefix(s.clone())),
        Some(Kind::PathPrefix(s)) => Some(route::StringMatch::PathPrefix(s.clone())),
        Some(Kind::Regex(s)) => Some(route::StringMatch::Regex(s.clone())),
        Some(Kind::Present(true)) => Some(route::StringMatch::Present),
        Some(Kind::Absent(true)) => Some(route::StringMatch::Absent),
        Some(Kind::Present(false) | Kind::Absent(false)) => {
            return Err(ConfigError::Invalid { field, message: "a match kind set to false".into() });
        }
    })
}

fn named(v: &[pb::NamedMatch], f: String) -> Result<Vec<route::NamedMatch>, ConfigError> {
    v.iter()
        .enumerate()
        .map(|(i, m)| {
            let value = string_match(&m.r#match, format!("{f}[{i}]"))?.unwrap_or(route::StringMatch::Present);
            Ok(route::NamedMatch { name: m.name.clone(), value })
        })
        .collect()
}

/// A streamed route table in the proxy's model; `None` when it is not exported to the proxy's
/// own namespace (it is accepted, and changes nothing here).
pub fn convert_route(t: &pb::RouteTable, namespace: &str) -> Result<Option<config::RouteTable>, ConfigError> {
    if !t.export_to.is_empty() && !t.export_to.iter().any(|n| n == namespace || n == "*") {
        return Ok(None);
    }
    let field = |f: String| format!("routes[{}].{f}", t.name);
    let edits = |e: &Option<pb::HeaderEdits>| {
        e.as_ref()
            .map(|e| route::HeaderEdits {
                set: e.set.clone().into_iter().collect(),
                add: e.add.clone().into_iter().collect(),
                remove: e.remove.clone(),
            })
            .unwrap_or_default()
    };
    let mut http = Vec::new();
    for (i, r) in t.http.iter().enumerate() {
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            matches.push(http_match(m, &field(format!("http[{i}].match[{j}]")))?);
        }
        let fault = r.fault.as_ref().map(|f| route::Fault {
            delay: (f.delay_ms > 0)
                .then(|| route::FaultDelay { percent: f.delay_percent, delay_ms: u64::from(f.delay_ms) }),
            abort: (f.abort_http_status > 0 || f.abort_grpc_status > 0).then(|| route::FaultAbort {
                percent: f.abort_percent,
                http_status: (f.abort_http_status > 0)
                    .then(|| u16::try_from(f.abort_http_status).unwrap_or(0)),
                grpc_status: (f.abort_grpc_status > 0).then_some(f.abort_grpc_status),
            }),
        });
        http.push(route::HttpRule {
            name: if r.name.is_empty() { format!("rule-{i}") } else { r.name.clone() },
            matches,
            backends: r
                .backends
                .iter()
                .map(|b| route::WeightedCluster { cluster: b.cluster.clone(), weight: b.weight })
                .collect(),
            timeout_ms: (r.timeout_ms > 0).then(|| u64::from(r.timeout_ms)),
            request_headers: edits(&r.request_headers),
            response_headers: edits(&r.response_headers),
            rewrite: r.rewrite.as_ref().map(|rw| route::Rewrite {
                uri_prefix: (!rw.uri_prefix.is_empty()).then(|| rw.uri_prefix.clone()),
                authority: (!rw.authority.is_empty()).then(|| rw.authority.clone()),
                path: (!rw.path.is_empty()).then(|| rw.path.clone()),
            }),
            fault,
            retry: match &r.retry {
                None => None,
                Some(rt) => {
                    let mut retry_on = Vec::new();
                    for (j, c) in rt.retry_on.iter().enumerate() {
                        retry_on.push(route::RetryOn::parse(c).ok_or_else(|| ConfigError::Invalid {
                            field: field(format!("http[{i}].retry.retryOn[{j}]")),
                            message: format!("unknown retry condition {c:?}"),
                        })?);
                    }
                    Some(route::Retry {
                        attempts: rt.attempts,
                        per_try_timeout_ms: (rt.per_try_timeout_ms > 0)
                            .then(|| u64::from(rt.per_try_timeout_ms)),
                        retry_on,
                        backoff_ms: (rt.backoff_ms > 0).then(|| u64::from(rt.backoff_ms)),
                    })
                }
            },
            mirror: r
                .mirror
                .as_ref()
                .map(|m| route::Mirror { cluster: m.cluster.clone(), percent: m.percent }),
            redirect: r.redirect.as_ref().map(|rd| route::Redirect {
                scheme: (!rd.scheme.is_empty()).then(|| rd.scheme.clone()),
                host: (!rd.host.is_empty()).then(|| rd.host.clone()),
                port: u16::try_from(rd.port).ok().filter(|p| *p > 0),
                path: (!rd.path.is_empty()).then(|| rd.path.clone()),
                prefix: (!rd.prefix.is_empty()).then(|| rd.prefix.clone()),
                code: u16::try_from(rd.code).unwrap_or(0),
            }),
            direct_response: r.direct_response.as_ref().map(|d| route::DirectResponse {
                status: u16::try_from(d.status).unwrap_or(0),
                body: d.body.clone(),
            }),
        });
    }
    let table = config::RouteTable {
        cluster: t.name.clone(),
        source: t.source.clone(),
        export_to: t.export_to.clone(),
        http,
        tcp: t
            .tcp
            .iter()
            .map(|r| route::TcpRule {
                name: r.name.clone(),
                backends: r
                    .backends
                    .iter()
                    .map(|b| route::WeightedCluster { cluster: b.cluster.clone(), weight: b.weight })
                    .collect(),
                idle_timeout_ms: (r.idle_timeout_ms > 0).then(|| u64::from(r.idle_timeout_ms)),
            })
            .collect(),
    };
    table.validate(&format!("routes[{}]", t.name), &|_| true)?;
    Ok(Some(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_route_table_converts_and_one_not_exported_here_changes_nothing() {
        let t = pb::RouteTable {
            name: "web.shop.svc.cluster.local:80".into(),
            source: "TrafficRoute shop/web".into(),
            export_to: vec!["shop".into()],
            tcp: vec![],
            http: vec![pb::HttpRule {
                matches: vec![pb::HttpMatch {
                    path: Some(pb::StringMatch { kind: Some(pb::string_match::Kind::Prefix("/api".into())) }),
                    ..Default::default()
                }],
                backends: vec![pb::RouteBackend {
                    cluster: "web.shop.svc.cluster.local:80".into(),
                    weight: 100,
                }],
                timeout_ms: 250,
                ..Default::default()
            }],
        };
        let got = convert_route(&t, "shop").unwrap().unwrap();
        assert_eq!(got.http[0].name, "rule-0");
        assert_eq!(got.http[0].timeout_ms, Some(250));
        assert_eq!(got.http[0].matches[0].path, Some(route::StringMatch::Prefix("/api".into())));
        assert_eq!(convert_route(&t, "elsewhere").unwrap(), None);
        let mut bad = t.clone();
        bad.http[0].matches[0].path =
            Some(pb::StringMatch { kind: Some(pb::string_match::Kind::Regex("(".into())) });
        let e = convert_route(&bad, "shop").unwrap_err().to_string();
        assert!(e.starts_with("routes[web.shop.svc.cluster.local:80].http[0].match[0].path.regex"), "{e}");
    }

    #[test]
    fn streamed_clusters_convert_and_bad_ones_name_the_field() {
        let c = pb::Cluster {
            name: "web.ns.svc.cluster.local:80".into(),
            endpoints: vec![
                pb::Endpoint { address: "10.0.0.1:8080".into(), ready: true, ..Default::default() },
                pb::Endpoint { address: "10.0.0.2:8080".into(), ready: false, ..Default::default() },
            ],
            addresses: vec!["10.96.0.10:80".into()],
            ..Default::default()
        };
        let got = convert_cluster(&c).unwrap();
        assert_eq!(got.endpoints, vec!["10.0.0.1:8080".parse::<SocketAddr>().unwrap()]);
        assert_eq!(got.addresses, vec!["10.96.0.10:80".parse::<SocketAddr>().unwrap()]);
        assert_eq!(got.connect_timeout_ms, 1000);
        let mut bad = c.clone();
        bad.endpoints[1].address = "nowhere".into();
        assert_eq!(
            convert_cluster(&bad).unwrap_err().to_string(),
            "clusters[web.ns.svc.cluster.local:80].endpoints[1].address: \"nowhere\" is not ip:port"
        );
    }
}
