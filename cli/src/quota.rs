//! `mycelctl quota <policy>`: what is left of a RateLimitPolicy's global limits and quotas, as
//! the rate-limit service counts them in Redis. It asks the service's `Remaining` (which counts
//! nothing) on the loopback port 15091 of one of its pods, through a port-forward with the
//! user's own credentials (`pods/portforward` in the installation's namespace).

use anyhow::Context;
use hyper_util::rt::TokioIo;
use mycel_api::v1alpha1 as pb;
use mycel_crds::rate_limit_policy::{
    LimitKeyType, LimitScope, LimitWindow, RateLimit, RateLimitPolicy, RateUnit,
};

/// The service's loopback port, where `Remaining` answers.
pub const LOCAL_PORT: u16 = 15091;

/// What to ask.
pub struct Ask<'a> {
    pub namespace: &'a str,
    pub policy: &'a str,
    /// The key's value (a principal, an address, a header value, a path, a claim).
    pub key: Option<&'a str>,
    /// For a policy of the root namespace: the namespace whose counters to read.
    pub caller_namespace: Option<&'a str>,
    pub root_namespace: &'a str,
}

/// One row: a limit, and what the service said of it (or why it was not asked).
pub struct Row {
    pub limit: String,
    pub key: String,
    pub window: String,
    pub answer: Result<pb::RemainingResponse, String>,
    /// What the counter holds when full (a rate's burst, a quota's requests).
    pub capacity: u64,
}

/// A limit to ask: its name, key as shown, rate or window as shown, and the request (or why it
/// cannot be asked).
pub type Asked = (String, String, String, Result<pb::RemainingRequest, String>);

/// The `Remaining` request of each global limit of `p`, or why a limit cannot be asked.
pub fn requests(p: &RateLimitPolicy, ask: &Ask) -> anyhow::Result<Vec<Asked>> {
    let root = ask.namespace == ask.root_namespace;
    let namespace = match (root, ask.caller_namespace) {
        (true, Some(ns)) => ns.to_string(),
        (true, None) => anyhow::bail!(
            "{}/{} is a policy of the root namespace, counted apart for each namespace: say whose with --caller-namespace <namespace>",
            ask.namespace,
            ask.policy
        ),
        (false, Some(ns)) if ns != ask.namespace => anyhow::bail!(
            "--caller-namespace {ns}: a policy of namespace {} is counted for its own namespace only",
            ask.namespace
        ),
        (false, _) => String::new(),
    };
    let mut out = Vec::new();
    for l in &p.spec.limits {
        if l.scope != Some(LimitScope::Global) {
            continue;
        }
        let calendar = l.window == Some(LimitWindow::Calendar);
        let window = if calendar {
            format!("{:?} in {}", l.unit, l.time_zone.as_deref().unwrap_or("UTC")).to_lowercase()
        } else {
            format!("{}/{}", l.requests, unit(l.unit))
        };
        let kind = l.key.as_ref().map(|k| k.kind).unwrap_or_default();
        let value = match (kind, ask.key) {
            (LimitKeyType::Global, _) => Ok(String::new()),
            (_, Some(v)) => Ok(kind.canonical(v)),
            (_, None) => Err(format!("keyed by {kind:?}: give the value with --key")),
        };
        let shown = value.clone().unwrap_or_else(|_| "-".into());
        let req = value.map(|v| request(p, l, &v, calendar, &namespace));
        out.push((
            l.name.clone(),
            if shown.is_empty() { "(one counter)".into() } else { shown },
            window,
            req,
        ));
    }
    Ok(out)
}

fn unit(u: RateUnit) -> &'static str {
    match u {
        RateUnit::Second => "s",
        RateUnit::Minute => "min",
        RateUnit::Hour => "h",
        RateUnit::Day => "d",
        RateUnit::Month => "month",
    }
}

fn request(
    p: &RateLimitPolicy,
    l: &RateLimit,
    value: &str,
    calendar: bool,
    namespace: &str,
) -> pb::RemainingRequest {
    let ns = p.metadata.namespace.as_deref().unwrap_or_default();
    let name = p.metadata.name.as_deref().unwrap_or_default();
    let over = l
        .overrides
        .iter()
        .flatten()
        .find(|o| l.key.as_ref().map(|k| k.kind).unwrap_or_default().canonical(&o.value) == value);
    let (requests, burst) = match over {
        Some(o) => (o.requests.max(1) as u64, o.burst),
        None => (l.requests.max(1) as u64, l.burst),
    };
    pb::RemainingRequest {
        policy: format!("{ns}/{name}"),
        limit: l.name.clone(),
        key: mycel_api::ratelimit::counter_key(value),
        requests,
        per_seconds: l.unit.seconds(),
        burst: if calendar { requests } else { burst.map_or(requests, |b| b.max(1) as u64) },
        window: match (calendar, l.unit) {
            (true, RateUnit::Hour) => pb::QuotaWindow::Hour,
            (true, RateUnit::Day) => pb::QuotaWindow::Day,
            (true, RateUnit::Month) => pb::QuotaWindow::Month,
            _ => pb::QuotaWindow::None,
        } as i32,
        time_zone: if calendar { l.time_zone.clone().unwrap_or_default() } else { String::new() },
        namespace: namespace.to_string(),
    }
}

/// Asks each request of `reqs` over one port-forward to the service pod `pod`.
pub async fn ask(
    client: &kube::Client,
    mesh_namespace: &str,
    pod: &str,
    reqs: Vec<Asked>,
) -> anyhow::Result<Vec<Row>> {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client.clone(), mesh_namespace);
    let mut pf = pods.portforward(pod, &[LOCAL_PORT]).await.with_context(|| {
        format!("port-forward to {mesh_namespace}/{pod}:{LOCAL_PORT} (needs pods/portforward)")
    })?;
    let stream = pf.take_stream(LOCAL_PORT).context("port-forward gave no stream")?;
    let stream = std::sync::Mutex::new(Some(stream));
    let channel =
        tonic::transport::Endpoint::from_static("http://127.0.0.1:15091")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let s = stream.lock().unwrap_or_else(|e| e.into_inner()).take();
                async move {
                    s.map(TokioIo::new).ok_or_else(|| std::io::Error::other("the port-forward was used"))
                }
            }))
            .await
            .with_context(|| format!("the rate-limit service on {mesh_namespace}/{pod}:{LOCAL_PORT}"))?;
    let mut grpc = pb::rate_limits_client::RateLimitsClient::new(channel);
    let mut rows = Vec::new();
    for (limit, key, window, req) in reqs {
        let capacity = req.as_ref().map_or(0, |r| r.burst);
        let answer = match req {
            Err(why) => Err(why),
            Ok(r) => {
                let mut call = tonic::Request::new(r);
                call.set_timeout(std::time::Duration::from_secs(10));
                grpc.remaining(call).await.map(|a| a.into_inner()).map_err(|s| s.message().to_string())
            }
        };
        rows.push(Row { limit, key, window, answer, capacity });
    }
    drop(grpc);
    drop(pf);
    Ok(rows)
}

/// The rows as a table.
pub fn table(rows: &[Row]) -> String {
    let mut t = vec![
        ["LIMIT", "KEY", "RATE OR WINDOW", "USED", "REMAINING", "FULL AGAIN IN", "WINDOW START"]
            .map(String::from)
            .to_vec(),
    ];
    for r in rows {
        let mut row = vec![r.limit.clone(), r.key.clone(), r.window.clone()];
        match &r.answer {
            Ok(a) => row.extend([
                a.used.to_string(),
                format!("{}/{}", a.remaining, r.capacity),
                seconds(a.reset_ms),
                if a.window_start.is_empty() { "-".into() } else { a.window_start.clone() },
            ]),
            Err(e) => row.extend(["-".into(), "-".into(), "-".into(), e.clone()]),
        }
        t.push(row);
    }
    let widths: Vec<usize> =
        (0..t[0].len()).map(|i| t.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &t {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn seconds(ms: u64) -> String {
    match ms {
        0 => "now".into(),
        ms if ms < 10_000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms => {
            let s = ms.div_ceil(1000);
            match s {
                s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
                s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ns: &str, yaml: &str) -> RateLimitPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: mycel.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec: {yaml}"
        ))
        .unwrap()
    }

    const LIMITS: &str = r#"{limits: [
        {name: local, requests: 5, unit: second},
        {name: total, requests: 50, unit: second, burst: 60, scope: Global},
        {name: daily, requests: 100, unit: day, scope: Global, window: Calendar, timeZone: Europe/Berlin,
         key: {type: SourcePrincipal}, overrides: [{value: "spiffe://cluster.local/ns/shop/sa/vip", requests: 1000}]}]}"#;

    fn ask<'a>(ns: &'a str, key: Option<&'a str>, caller: Option<&'a str>) -> Ask<'a> {
        Ask { namespace: ns, policy: "p", key, caller_namespace: caller, root_namespace: "mycel-system" }
    }

    #[test]
    fn each_global_limit_is_asked_as_the_sidecar_counts_it() {
        let p = policy("shop", LIMITS);
        let reqs = requests(&p, &ask("shop", Some("cluster.local/ns/shop/sa/vip"), None)).unwrap();
        assert_eq!(reqs.len(), 2, "local limits are counted in each sidecar, not here");
        let total = reqs[0].3.as_ref().unwrap();
        assert_eq!(
            (total.policy.as_str(), total.key.as_str(), total.requests, total.per_seconds, total.burst),
            ("shop/p", "", 50, 1, 60),
            "a limit without a key has one counter, whatever --key says"
        );
        let daily = reqs[1].3.as_ref().unwrap();
        assert_eq!((daily.requests, daily.burst), (1000, 1000), "the override of this principal");
        assert_eq!((daily.window, daily.time_zone.as_str()), (pb::QuotaWindow::Day as i32, "Europe/Berlin"));
        assert_eq!(daily.key, "cluster.local/ns/shop/sa/vip");
        // Without --key, a keyed limit says what it needs; another principal has the base limit.
        let reqs = requests(&p, &ask("shop", None, None)).unwrap();
        assert!(reqs[1].3.as_ref().unwrap_err().contains("--key"));
        let reqs = requests(&p, &ask("shop", Some("spiffe://cluster.local/ns/shop/sa/web"), None)).unwrap();
        let daily = reqs[1].3.as_ref().unwrap();
        assert_eq!((daily.requests, daily.key.as_str()), (100, "cluster.local/ns/shop/sa/web"));
        let long = "x".repeat(300);
        let reqs = requests(&p, &ask("shop", Some(&long), None)).unwrap();
        assert_eq!(
            reqs[1].3.as_ref().unwrap().key,
            mycel_api::ratelimit::counter_key(&long),
            "sent as its digest"
        );
    }

    #[test]
    fn a_root_namespace_policy_needs_the_namespace_whose_counters_to_read() {
        let p = policy("mycel-system", LIMITS);
        let e = requests(&p, &ask("mycel-system", None, None)).unwrap_err().to_string();
        assert!(e.contains("--caller-namespace"), "{e}");
        let reqs = requests(&p, &ask("mycel-system", None, Some("shop"))).unwrap();
        assert_eq!(reqs[0].3.as_ref().unwrap().namespace, "shop");
        let p = policy("shop", LIMITS);
        assert!(requests(&p, &ask("shop", None, Some("web"))).is_err(), "not another namespace's");
    }

    #[test]
    fn the_table_says_what_is_left_and_when_it_is_full() {
        let rows = vec![
            Row {
                limit: "daily".into(),
                key: "k".into(),
                window: "day in utc".into(),
                capacity: 100,
                answer: Ok(pb::RemainingResponse {
                    used: 40,
                    remaining: 60,
                    reset_ms: 3_600_000 * 5 + 60_000,
                    window_start: "2026-12-04T00:00:00Z".into(),
                }),
            },
            Row {
                limit: "total".into(),
                key: "-".into(),
                window: "50/s".into(),
                capacity: 0,
                answer: Err("keyed by Header: give the value with --key".into()),
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].contains("40") && lines[1].contains("60/100") && lines[1].contains("5h01m"), "{t}");
        assert!(lines[2].ends_with("give the value with --key"), "{t}");
    }
}
