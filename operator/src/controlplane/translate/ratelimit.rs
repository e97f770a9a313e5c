//! RateLimitPolicy → the `rate_limits` of a workload's inbound PeerPolicy: the limits of every
//! policy that selects the workload (as an AuthorizationPolicy selects it, [`authz::selects`]),
//! in namespace and name order, each counted by the workload's sidecar in its own token buckets.

use std::collections::BTreeMap;

use mycel_api::v1alpha1 as pb;
use mycel_crds::rate_limit_policy::{
    FailureMode, LimitKeyType, LimitScope, LimitWindow, RateLimitPolicy, RateUnit,
};

use super::authz;

/// The most limits one workload's sidecar counts: each keeps a bounded table of buckets, so
/// their number bounds the memory. The limits of the policies after it (the root namespace's
/// first, then namespace and name order) are left out there, and those policies say so.
pub const MAX_LIMITS_PER_WORKLOAD: usize = 64;

/// A RateLimitPolicy, as policy resolution needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rl {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    pub selector: Option<BTreeMap<String, String>>,
    /// What proxies receive: its limits without those of `invalid`.
    pub limits: Vec<pb::RateLimit>,
    /// Values no proxy can use, each naming its field; the limit that has one is not sent.
    pub invalid: Vec<String>,
    /// `direction: Outbound`: its limits count what the selected workloads send.
    pub outbound: bool,
}

impl Rl {
    /// `service`: whether the installation runs the rate-limit service (`spec.rateLimit`), which
    /// every limit of `scope: Global` needs.
    pub fn from_object(p: RateLimitPolicy, service: bool) -> Rl {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let policy = format!("{namespace}/{name}");
        let mut invalid = Vec::new();
        let outbound = p.spec.direction == Some(mycel_crds::rate_limit_policy::Direction::Outbound);
        let mut limits = Vec::new();
        for (i, l) in p.spec.limits.iter().enumerate() {
            let at = format!("spec.limits[{i}]");
            let mut bad = Vec::new();
            let matched =
                l.matches.as_ref().map(|m| super::route::http_match(m, &format!("{at}.match"), &mut bad));
            if l.key.as_ref().is_some_and(|k| k.kind == LimitKeyType::SourceIP) {
                for (j, o) in l.overrides.iter().flatten().enumerate() {
                    if o.value.parse::<std::net::IpAddr>().is_err() {
                        bad.push(format!(
                            "{at}.overrides[{j}].value: {:?} is not an IP address (the key is SourceIP)",
                            o.value
                        ));
                    }
                }
            }
            let global = l.scope == Some(LimitScope::Global);
            if outbound
                && l.key.as_ref().is_some_and(|k| {
                    !matches!(k.kind, LimitKeyType::Global | LimitKeyType::Header | LimitKeyType::Path)
                })
            {
                bad.push(format!(
                    "{at}.key: an Outbound limit is keyed by nothing (Global), a Header or the Path"
                ));
            }
            if !outbound && l.hosts.is_some() {
                bad.push(format!("{at}.hosts: applies to direction Outbound only"));
            }
            if global && !service {
                bad.push(format!(
                    "{at}.scope: Global limits are counted by the mesh's rate-limit service, which this installation does not run: set spec.rateLimit (its Redis) in the MeshInstallation, or scope: Local"
                ));
            }
            if let Some(z) = &l.time_zone
                && z != "UTC"
                && jiff::tz::TimeZone::get(z).is_err()
            {
                bad.push(format!(
                    "{at}.timeZone: {z:?} is not an IANA time zone (such as Europe/Berlin or UTC)"
                ));
            }
            let calendar = global && l.window == Some(LimitWindow::Calendar);
            if global && !calendar {
                // What the proxy and the rate-limit service refuse: a proxy would reject the
                // whole policy update, so the limit is left out here, and said.
                let per = per_seconds(l.unit);
                let rates = std::iter::once(("", l.requests, l.burst))
                    .chain(l.overrides.iter().flatten().map(|o| ("override's ", o.requests, o.burst)));
                for (what, requests, burst) in rates {
                    let requests = requests.max(1) as u64;
                    let burst = burst.map_or(requests, |b| b.max(1) as u64);
                    if !mycel_api::ratelimit::within_memory(requests, per, burst) {
                        bad.push(format!(
                            "{at}: a global limit's {what}burst × unit / requests is at most 31 days (burst {burst} over {requests} a {:?}): lower the burst, or count it as a quota (window: Calendar)",
                            l.unit
                        ));
                    }
                }
            }
            if !bad.is_empty() {
                invalid.extend(bad);
                continue;
            }
            let key = l.key.as_ref();
            let kind = key.map(|k| k.kind).unwrap_or_default();
            let (key_type, key_name) = match kind {
                LimitKeyType::Global => (pb::RateLimitKeyType::RateLimitKeyGlobal, String::new()),
                LimitKeyType::SourceIP => (pb::RateLimitKeyType::RateLimitKeySourceIp, String::new()),
                LimitKeyType::SourcePrincipal => {
                    (pb::RateLimitKeyType::RateLimitKeySourcePrincipal, String::new())
                }
                LimitKeyType::Header => (
                    pb::RateLimitKeyType::RateLimitKeyHeader,
                    key.and_then(|k| k.header.clone()).unwrap_or_default().to_ascii_lowercase(),
                ),
                LimitKeyType::Path => (pb::RateLimitKeyType::RateLimitKeyPath, String::new()),
                LimitKeyType::Claim => (
                    pb::RateLimitKeyType::RateLimitKeyClaim,
                    key.and_then(|k| k.claim.clone()).unwrap_or_default(),
                ),
            };
            let requests = l.requests.max(1) as u64;
            limits.push(pb::RateLimit {
                policy: policy.clone(),
                name: l.name.clone(),
                requests,
                per_seconds: per_seconds(l.unit),
                // A calendar quota has none (the schema says so); its counter is the window's.
                burst: if calendar { requests } else { l.burst.map_or(requests, |b| b.max(1) as u64) },
                key: Some(pb::RateLimitKey { r#type: key_type as i32, name: key_name }),
                r#match: matched,
                port: l.matches.as_ref().and_then(|m| m.port).map_or(0, |p| p.max(0) as u32),
                status: l.status.map_or(0, |s| s.max(0) as u32),
                shadow: l.shadow.unwrap_or(false),
                overrides: l
                    .overrides
                    .iter()
                    .flatten()
                    .map(|o| {
                        let requests = o.requests.max(1) as u64;
                        pb::RateLimitOverride {
                            value: kind.canonical(&o.value),
                            requests,
                            burst: o.burst.map_or(requests, |b| b.max(1) as u64),
                        }
                    })
                    .collect(),
                global,
                failure_open: l.failure_mode != Some(FailureMode::Closed),
                window: match (calendar, l.unit) {
                    (false, _) | (true, RateUnit::Second | RateUnit::Minute) => pb::QuotaWindow::None,
                    (true, RateUnit::Hour) => pb::QuotaWindow::Hour,
                    (true, RateUnit::Day) => pb::QuotaWindow::Day,
                    (true, RateUnit::Month) => pb::QuotaWindow::Month,
                } as i32,
                time_zone: if calendar { l.time_zone.clone().unwrap_or_default() } else { String::new() },
                hosts: l.hosts.iter().flatten().map(|h| h.0.clone()).collect(),
            });
        }
        Rl {
            namespace,
            name,
            generation: p.metadata.generation.unwrap_or_default(),
            selector: p.spec.selector.map(|s| s.match_labels),
            limits,
            invalid,
            outbound,
        }
    }

    /// Whether it selects pods of `namespace` with `labels`.
    pub fn applies(&self, namespace: &str, labels: &BTreeMap<String, String>, root: &str) -> bool {
        authz::selects(&self.namespace, self.selector.as_ref(), namespace, labels, root)
    }

    /// Whether it could select some pod of `namespace` (by its selector).
    pub fn may_select_in(&self, namespace: &str, root: &str) -> bool {
        authz::may_select_in(&self.namespace, self.selector.is_some(), namespace, root)
    }
}

/// The length of a unit, in seconds.
pub fn per_seconds(unit: RateUnit) -> u64 {
    unit.seconds()
}

/// What a workload of `namespace` with `labels` counts: the limits of the policies of `sorted`
/// (in namespace and name order) that select it, the root namespace's first (a namespace
/// cannot push the mesh's limits out), at most [`MAX_LIMITS_PER_WORKLOAD`]; the policies that
/// count there; and those left out for the bound.
pub fn for_workload<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    sorted: &'a [Rl],
    root: &str,
    outbound: bool,
) -> (Vec<pb::RateLimit>, Vec<&'a Rl>, Vec<&'a Rl>) {
    let mut limits = Vec::new();
    let mut by = Vec::new();
    let mut over = Vec::new();
    let mut applying: Vec<&Rl> =
        sorted.iter().filter(|r| r.outbound == outbound && r.applies(namespace, labels, root)).collect();
    applying.sort_by_key(|r| r.namespace != root);
    for rl in applying {
        if limits.len() + rl.limits.len() > MAX_LIMITS_PER_WORKLOAD {
            over.push(rl);
            continue;
        }
        limits.extend(rl.limits.iter().cloned());
        by.push(rl);
    }
    (limits, by, over)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(ns: &str, name: &str, yaml: &str) -> Rl {
        let mut p: RateLimitPolicy = serde_yaml::from_str(&format!(
            "apiVersion: mycel.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: {ns}, generation: 3}}\nspec: {yaml}"
        ))
        .unwrap();
        p.metadata.generation = Some(3);
        Rl::from_object(p, true)
    }

    #[test]
    fn a_policy_becomes_the_limits_its_workloads_count() {
        let r = rl(
            "shop",
            "api",
            r#"{selector: {matchLabels: {app: api}}, limits: [
                {name: per-client, requests: 10, unit: minute, burst: 20, key: {type: SourcePrincipal},
                 overrides: [{value: "spiffe://cluster.local/ns/shop/sa/batch", requests: 100}],
                 match: {method: GET, path: {prefix: /api}, port: 8080}, status: 503, shadow: true},
                {name: per-key, requests: 5, unit: day, key: {type: Header, header: X-Api-Key}}]}"#,
        );
        assert!(r.invalid.is_empty(), "{:?}", r.invalid);
        let [a, b] = &r.limits[..] else { panic!("{:?}", r.limits) };
        assert_eq!((a.policy.as_str(), a.name.as_str()), ("shop/api", "per-client"));
        assert_eq!(
            (a.requests, a.per_seconds, a.burst, a.port, a.status, a.shadow),
            (10, 60, 20, 8080, 503, true)
        );
        assert_eq!(a.key.as_ref().unwrap().r#type, pb::RateLimitKeyType::RateLimitKeySourcePrincipal as i32);
        assert_eq!(a.overrides[0].value, "cluster.local/ns/shop/sa/batch", "the principal's form, no scheme");
        assert_eq!((a.overrides[0].requests, a.overrides[0].burst), (100, 100), "burst defaults to requests");
        let m = a.r#match.as_ref().unwrap();
        assert_eq!(m.method, "GET");
        assert_eq!(m.path.as_ref().unwrap().kind, Some(pb::string_match::Kind::Prefix("/api".into())));
        assert_eq!((b.requests, b.per_seconds, b.burst, b.status, b.shadow), (5, 86_400, 5, 0, false));
        assert_eq!(b.key.as_ref().unwrap().name, "x-api-key", "header names are lowercased");
    }

    #[test]
    fn outbound_policies_limit_what_the_selected_workloads_send_to_their_hosts() {
        let r = rl(
            "shop",
            "egress",
            r#"{direction: Outbound, limits: [
                {name: api, requests: 10, unit: second, hosts: [api.example.com, "*.example.org"]},
                {name: by-path, requests: 5, unit: second, key: {type: Path}, scope: Global},
                {name: by-caller, requests: 5, unit: second, key: {type: SourcePrincipal}}]}"#,
        );
        assert!(r.outbound);
        let [api, by_path] = &r.limits[..] else { panic!("{:?}", r.limits) };
        assert_eq!(api.hosts, ["api.example.com", "*.example.org"]);
        assert!(by_path.global && by_path.hosts.is_empty(), "any host");
        assert!(r.invalid.len() == 1 && r.invalid[0].starts_with("spec.limits[2].key"), "{:?}", r.invalid);
        let inbound =
            rl("shop", "in", "{limits: [{name: a, requests: 1, unit: second, hosts: [x.example]}]}");
        assert!(!inbound.outbound && inbound.invalid[0].contains("hosts"), "{:?}", inbound.invalid);
        // A workload counts each direction's limits in its own list.
        let labels = BTreeMap::new();
        let sorted = [r.clone(), rl("shop", "local", "{limits: [{name: a, requests: 1, unit: second}]}")];
        let (inb, ..) = for_workload("shop", &labels, &sorted, "mycel-system", false);
        let (out, by, _) = for_workload("shop", &labels, &sorted, "mycel-system", true);
        assert_eq!((inb.len(), out.len()), (1, 2));
        assert_eq!(by.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["egress"]);
    }

    #[test]
    fn global_limits_and_calendar_quotas_say_how_the_service_counts_them() {
        let r = rl(
            "shop",
            "global",
            r#"{limits: [
                {name: rate, requests: 50, unit: second, burst: 60, scope: Global, failureMode: Closed},
                {name: monthly, requests: 1000, unit: month, scope: Global, window: Calendar, timeZone: Europe/Berlin},
                {name: hourly, requests: 100, unit: hour, scope: Global, window: Calendar},
                {name: local, requests: 5, unit: second},
                {name: nowhere, requests: 5, unit: day, scope: Global, window: Calendar, timeZone: Mars/Olympus},
                {name: edge, requests: 1, unit: day, burst: 31, scope: Global},
                {name: forever, requests: 1, unit: day, burst: 32, scope: Global},
                {name: vip, requests: 1, unit: day, scope: Global, key: {type: SourcePrincipal},
                 overrides: [{value: a/ns/b/sa/c, requests: 2, burst: 63}]}]}"#,
        );
        let [rate, monthly, hourly, local, edge] = &r.limits[..] else { panic!("{:?}", r.limits) };
        assert_eq!(edge.burst, 31, "31 days of memory is the bound");
        assert!(rate.global && !rate.failure_open, "failureMode Closed");
        assert_eq!(
            (rate.window, rate.burst, rate.per_seconds),
            (pb::QuotaWindow::None as i32, 60, 1),
            "a rate"
        );
        assert!(monthly.global && monthly.failure_open, "failureMode defaults to Open");
        assert_eq!(
            (monthly.window, monthly.time_zone.as_str()),
            (pb::QuotaWindow::Month as i32, "Europe/Berlin")
        );
        assert_eq!((monthly.requests, monthly.burst, monthly.per_seconds), (1000, 1000, 31 * 86_400));
        assert_eq!((hourly.window, hourly.time_zone.as_str()), (pb::QuotaWindow::Hour as i32, ""), "UTC");
        assert!(!local.global, "scope defaults to Local");
        assert_eq!(r.invalid.len(), 3, "{:?}", r.invalid);
        assert!(r.invalid[0].starts_with("spec.limits[4].timeZone") && r.invalid[0].contains("Mars/Olympus"));
        // What the proxy would refuse (its whole policy update with it) is left out here.
        assert!(
            r.invalid[1].starts_with("spec.limits[6]:") && r.invalid[1].contains("31 days"),
            "{:?}",
            r.invalid
        );
        assert!(
            r.invalid[2].starts_with("spec.limits[7]:") && r.invalid[2].contains("override's"),
            "{:?}",
            r.invalid
        );
        // Without the installation's service, a Global limit is named and left out.
        let mut p: RateLimitPolicy = serde_yaml::from_str(
            "apiVersion: mycel.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: g, namespace: shop}\nspec: {limits: [{name: g, requests: 1, unit: second, scope: Global}]}",
        )
        .unwrap();
        p.metadata.generation = Some(1);
        let r = Rl::from_object(p, false);
        assert!(r.limits.is_empty());
        assert!(
            r.invalid[0].starts_with("spec.limits[0].scope") && r.invalid[0].contains("spec.rateLimit"),
            "{:?}",
            r.invalid
        );
    }

    #[test]
    fn a_limit_with_a_value_no_proxy_can_use_is_left_out_and_named() {
        let r = rl(
            "shop",
            "bad",
            r#"{limits: [{name: bad, requests: 1, unit: second, match: {path: {regex: "(?=x)"}}},
                         {name: good, requests: 1, unit: second}]}"#,
        );
        assert_eq!(r.limits.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["good"]);
        assert!(r.invalid[0].starts_with("spec.limits[0].match.path.regex"), "{:?}", r.invalid);
    }

    #[test]
    fn a_workload_counts_the_limits_of_the_policies_that_select_it_up_to_the_bound() {
        let labels = BTreeMap::from([("app".to_string(), "api".to_string())]);
        let many: String = (0..32).map(|i| format!("{{name: l{i}, requests: 1, unit: second}},")).collect();
        // Namespace `app` sorts before the root namespace: its policies must not push the
        // mesh's limit out.
        let sorted = vec![
            rl("app", "a", &format!("{{limits: [{many}]}}")),
            rl("app", "b", &format!("{{selector: {{matchLabels: {{app: api}}}}, limits: [{many}]}}")),
            rl(
                "app",
                "c",
                "{selector: {matchLabels: {app: web}}, limits: [{name: w, requests: 1, unit: second}]}",
            ),
            rl("mycel-system", "mesh", "{limits: [{name: m, requests: 1, unit: second}]}"),
            rl("other", "d", "{limits: [{name: o, requests: 1, unit: second}]}"),
        ];
        let (limits, by, over) = for_workload("app", &labels, &sorted, "mycel-system", false);
        let names = |v: &[&Rl]| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&by), ["mesh", "a"], "the mesh's first, then in order, until the bound");
        assert_eq!(names(&over), ["b"], "left out, and it says so");
        assert_eq!(limits.len(), 33);
    }

    #[test]
    fn an_override_of_an_address_must_be_one() {
        let r = rl(
            "shop",
            "ip",
            r#"{limits: [{name: ip, requests: 1, unit: second, key: {type: SourceIP}, overrides: [{value: "10.0.0.1", requests: 2}, {value: "ten", requests: 2}]}]}"#,
        );
        assert!(r.limits.is_empty());
        assert_eq!(r.invalid.len(), 1, "{:?}", r.invalid);
        assert!(r.invalid[0].starts_with("spec.limits[0].overrides[1].value"), "{:?}", r.invalid);
    }
}
