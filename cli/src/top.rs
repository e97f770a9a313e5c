//! `mycelctl top`: live traffic of a namespace's meshed workloads, read from their sidecars'
//! metrics (through the API server's pod proxy) at the start and the end of a window. It shows,
//! for each workload, what it served: request rate, success rate and latency percentiles, the
//! share of its inbound connections (since the sidecar started) that arrived over mutual TLS,
//! and its identity. It also shows each
//! caller → Service edge with its rate and success.

use mycel_api::metrics as names;
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

/// One sample: metric name → (labels, value).
type Sample = Vec<(String, BTreeMap<String, String>, f64)>;

fn parse(text: &str) -> Sample {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((head, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        labels.insert(k.trim_matches(',').to_string(), v.trim_end_matches('"').to_string());
                    }
                }
                (n.to_string(), labels)
            }
            None => (head.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

fn sum(s: &Sample, name: &str, pred: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
    s.iter().filter(|(n, l, _)| n == name && pred(l)).map(|(_, _, v)| v).sum()
}

/// Percentile from cumulative histogram buckets (upper bound → count), linear within a bucket.
fn percentile(buckets: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = buckets.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let target = total * q;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for (bound_micros, count) in buckets {
        let bound = *bound_micros as f64 / 1e6;
        if *count >= target {
            if bound.is_infinite() || *bound_micros == u64::MAX {
                return Some(prev_bound);
            }
            let frac = if count > &prev_count { (target - prev_count) / (count - prev_count) } else { 1.0 };
            return Some(prev_bound + (bound - prev_bound) * frac);
        }
        prev_bound = bound;
        prev_count = *count;
    }
    Some(prev_bound)
}

fn workload_of(p: &Pod) -> String {
    let labels = p.metadata.labels.clone().unwrap_or_default();
    if let Some(a) = labels.get("app").or_else(|| labels.get("app.kubernetes.io/name")) {
        return a.clone();
    }
    if let Some(j) = labels.get("job-name") {
        return j.clone();
    }
    p.metadata.name.clone().unwrap_or_default()
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(s) if s < 0.001 => format!("{:.0}µs", s * 1e6),
        Some(s) => format!("{:.1}ms", s * 1e3),
        None => "-".into(),
    }
}

/// Reads every meshed pod's metrics twice, `window` apart, and renders the two tables.
pub async fn top(client: Client, namespace: &str, window: Duration) -> anyhow::Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let meshed: Vec<Pod> = pods
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing pods in {namespace}"))?
        .items
        .into_iter()
        .filter(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.spec.as_ref().is_some_and(|s| {
                    s.init_containers
                        .iter()
                        .flatten()
                        .chain(s.containers.iter())
                        .any(|c| c.name == "mycel-proxy")
                })
        })
        .collect();
    anyhow::ensure!(!meshed.is_empty(), "no running pod with a mycel sidecar in namespace {namespace}");
    let scrape = |name: String| {
        let client = client.clone();
        let path = format!("/api/v1/namespaces/{namespace}/pods/{name}:15020/proxy/metrics");
        async move {
            let text = client.request_text(http::Request::get(path).body(Vec::new())?).await?;
            Ok::<_, anyhow::Error>(parse(&text))
        }
    };
    let names: Vec<String> = meshed.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let first: Vec<Sample> = futures::future::try_join_all(names.iter().cloned().map(scrape)).await?;
    tokio::time::sleep(window).await;
    let second: Vec<Sample> = futures::future::try_join_all(names.iter().cloned().map(scrape)).await?;
    let secs = window.as_secs_f64();

    #[derive(Default)]
    struct Row {
        pods: usize,
        requests: f64,
        ok: f64,
        buckets: BTreeMap<u64, f64>,
        conns: f64,
        all_conns: f64,
        mtls: f64,
        identity: String,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for (i, pod) in meshed.iter().enumerate() {
        let (a, b) = (&first[i], &second[i]);
        let d = |name: &str, pred: &dyn Fn(&BTreeMap<String, String>) -> bool| {
            sum(b, name, pred) - sum(a, name, pred)
        };
        let inbound =
            |l: &BTreeMap<String, String>| l.get("direction").map(String::as_str) == Some("inbound");
        let w = workload_of(pod);
        let row = rows.entry(w.clone()).or_default();
        row.pods += 1;
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        row.identity = mycel_api::spiffe::SpiffeId::new(&trust_domain_of(pod), namespace, &sa).to_string();
        row.requests += d(names::REQUESTS_TOTAL, &inbound);
        row.ok += d(names::REQUESTS_TOTAL, &|l| {
            inbound(l) && l.get("code").and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| c < 500)
        });
        row.conns += d(names::CONNECTIONS_TOTAL, &inbound);
        // The mutual-TLS share counts every connection since the sidecar started: long-lived
        // connections opened before the window count too.
        row.all_conns += sum(b, names::CONNECTIONS_TOTAL, inbound);
        row.mtls += sum(b, names::CONNECTIONS_TOTAL, |l: &BTreeMap<String, String>| {
            inbound(l) && l.get("protocol").map(String::as_str) == Some("mtls")
        });
        let les: std::collections::BTreeSet<String> = b
            .iter()
            .filter(|(n, l, _)| n == names::REQUEST_DURATION_BUCKET && inbound(l))
            .filter_map(|(_, l, _)| l.get("le").cloned())
            .collect();
        for le in les {
            let bound = if le == "+Inf" { u64::MAX } else { (le.parse::<f64>().unwrap_or(0.0) * 1e6) as u64 };
            let v = d(names::REQUEST_DURATION_BUCKET, &|l| inbound(l) && l.get("le") == Some(&le));
            *row.buckets.entry(bound).or_default() += v;
        }
        let mut clusters: HashMap<String, (f64, f64)> = HashMap::new();
        for (n, l, _) in b.iter().filter(|(n, l, _)| n == names::REQUESTS_TOTAL && !inbound(l)) {
            let Some(c) = l.get("cluster") else { continue };
            let _ = n;
            clusters.entry(c.clone()).or_default();
        }
        for (c, e) in clusters.iter_mut() {
            let outbound_to = |l: &BTreeMap<String, String>| !inbound(l) && l.get("cluster") == Some(c);
            e.0 += d(names::REQUESTS_TOTAL, &outbound_to);
            e.1 += d(names::REQUESTS_TOTAL, &|l| {
                outbound_to(l) && l.get("code").and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| c < 500)
            });
        }
        for (c, (total, ok)) in clusters {
            if total > 0.0 {
                let service = c.split(".svc.").next().unwrap_or(&c).to_string();
                let e = edges.entry((w.clone(), service)).or_default();
                e.0 += total;
                e.1 += ok;
            }
        }
    }

    let mut table = vec![
        ["WORKLOAD", "PODS", "RPS", "SUCCESS", "P50", "P90", "P99", "CONN/S", "MTLS", "IDENTITY"]
            .map(String::from)
            .to_vec(),
    ];
    for (w, r) in &rows {
        let success =
            if r.requests > 0.0 { format!("{:.2}%", 100.0 * r.ok / r.requests) } else { "-".into() };
        let mtls =
            if r.all_conns > 0.0 { format!("{:.0}%", 100.0 * r.mtls / r.all_conns) } else { "-".into() };
        table.push(vec![
            w.clone(),
            r.pods.to_string(),
            format!("{:.1}", r.requests / secs),
            success,
            ms(percentile(&r.buckets, 0.5)),
            ms(percentile(&r.buckets, 0.9)),
            ms(percentile(&r.buckets, 0.99)),
            format!("{:.1}", r.conns / secs),
            mtls,
            r.identity.clone(),
        ]);
    }
    let mut out = render(&table);
    if !edges.is_empty() {
        let mut t = vec![["FROM", "TO SERVICE", "RPS", "SUCCESS"].map(String::from).to_vec()];
        for ((from, to), (total, ok)) in &edges {
            t.push(vec![
                from.clone(),
                to.clone(),
                format!("{:.1}", total / secs),
                format!("{:.2}%", 100.0 * ok / total),
            ]);
        }
        out.push('\n');
        out.push_str(&render(&t));
    }
    Ok(out)
}

/// Columns padded to their widest cell, two spaces apart.
pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> =
            r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The trust domain a pod's sidecar was injected with (`MYCEL_TRUST_DOMAIN`), else the default.
fn trust_domain_of(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "MYCEL_TRUST_DOMAIN")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| "cluster.local".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_and_percentiles_interpolate() {
        let s = parse(
            "# HELP x\nmycel_proxy_requests_total{direction=\"inbound\",listener=\"inbound\",cluster=\"original-destination\",code=\"200\"} 7\nplain 3\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].1["code"], "200");
        assert_eq!(s[0].2, 7.0);
        assert_eq!(sum(&s, "plain", |_| true), 3.0);
        let buckets: BTreeMap<u64, f64> =
            [(1000, 50.0), (2000, 90.0), (4000, 100.0), (u64::MAX, 100.0)].into();
        assert_eq!(percentile(&buckets, 0.5), Some(0.001));
        let p90 = percentile(&buckets, 0.9).unwrap();
        assert!((p90 - 0.002).abs() < 1e-9, "{p90}");
        let p99 = percentile(&buckets, 0.99).unwrap();
        assert!(p99 > 0.0038 && p99 < 0.004, "{p99}");
        assert_eq!(percentile(&BTreeMap::new(), 0.5), None);
    }

    #[test]
    fn the_identity_shown_uses_the_sidecars_trust_domain() {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "mycel-proxy",
                "env": [{"name": "MYCEL_TRUST_DOMAIN", "value": "corp.example"}]}]}
        }))
        .unwrap();
        assert_eq!(trust_domain_of(&pod), "corp.example");
        let plain: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(serde_json::json!({"spec": {"containers": [{"name": "app"}]}})).unwrap();
        assert_eq!(trust_domain_of(&plain), "cluster.local");
    }
}
