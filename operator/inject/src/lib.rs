//! Sidecar injection: what a Pod of an enabled namespace becomes. This is a pure function of the
//! pod and the installation's proxy settings, shared by the admission webhook and by
//! `mycelctl inject` (a crate of its own, so the CLI links nothing else of the operator).
//!
//! The pod gains two init containers in front of its own:
//! - `mycel-init`, which installs the capture rules and exits;
//! - `mycel-proxy`, a native sidecar (`restartPolicy: Always`). Its startup probe holds the app
//!   back until the proxy has its first config, and Jobs complete when their app exits.
//!
//! It also gains a projected service-account token (audience `mycel-ca`) and the mesh's root
//! certificate from the `mycel-ca-root-cert` ConfigMap. The app's HTTP and TCP probes are
//! rewritten to the proxy's admin port, which performs them on localhost, so that they still
//! pass when the workload accepts only mutual TLS. A pod that already has `mycel-proxy` is left
//! alone, so injecting twice changes nothing.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// Name of the sidecar container.
pub const PROXY: &str = "mycel-proxy";
pub const INIT: &str = "mycel-init";
/// ConfigMap (in every injected namespace) with the mesh's roots, key `root-cert.pem`.
pub const ROOT_CONFIGMAP: &str = "mycel-ca-root-cert";
pub const PROXY_UID: i64 = 1337;
const ADMIN_PORT: i64 = 15020;

/// The installation's proxy settings (from the operator's `mesh.json`).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxySettings {
    pub namespace: String,
    pub revision: String,
    pub trust_domain: String,
    pub proxy_image: String,
    pub pull_policy: String,
    pub proxy_resources: Value,
    pub proxy_log_level: String,
    pub proxy_concurrency: i64,
    pub proxy_drain_duration: String,
    /// The installation's `spec.mtls.mode`: the sidecar's inbound mode until its first policy
    /// arrives, so that a STRICT mesh never accepts plaintext in that window.
    pub mtls_mode: String,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            namespace: "mycel-system".into(),
            revision: "default".into(),
            trust_domain: "cluster.local".into(),
            proxy_image: format!("docker.io/mycel/proxy:v{}", env!("CARGO_PKG_VERSION")),
            pull_policy: "IfNotPresent".into(),
            proxy_resources: json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "256Mi"}}),
            proxy_log_level: "info".into(),
            proxy_concurrency: 2,
            proxy_drain_duration: "5s".into(),
            mtls_mode: "PERMISSIVE".into(),
        }
    }
}

impl ProxySettings {
    /// `host:port` of the revision's gRPC port.
    pub fn control_plane(&self) -> String {
        format!("mycel-control-plane-{}.{}.svc:15012", self.revision, self.namespace)
    }
}

/// Why a pod is not injected (not an error).
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    OptedOut,
    AlreadyInjected,
    HostNetwork,
}

/// A pod annotation that is not usable, naming it and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("annotation {annotation}: {message}")]
pub struct BadAnnotation {
    pub annotation: String,
    pub message: String,
}

/// Whole seconds of a duration in the schema's notation (`1m30s`, `500ms`, `2h`), rounded up;
/// the installation's schema admits only valid ones, and 5 s stands for anything else.
fn seconds(d: &str) -> i64 {
    mycel_crds::common::parse_duration(d.trim()).map(|d| d.as_secs_f64().ceil() as i64).unwrap_or(5)
}

fn port_list(annotation: &str, v: &str) -> Result<String, BadAnnotation> {
    let mut out = Vec::new();
    for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => out.push(n.to_string()),
            _ => {
                return Err(BadAnnotation {
                    annotation: annotation.into(),
                    message: format!(
                        "{p:?} is not a port; give a comma-separated list such as \"8081,9090\""
                    ),
                });
            }
        }
    }
    Ok(out.join(","))
}

/// The mutated pod, or why it is left as it is.
pub fn inject(pod: &Value, s: &ProxySettings) -> Result<Result<Value, Skip>, BadAnnotation> {
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(pod["metadata"]["annotations"].clone()).unwrap_or_default();
    if annotations.get("mycel.io/inject").map(String::as_str) == Some("false")
        || pod["metadata"]["labels"]["mycel.io/inject"].as_str() == Some("false")
    {
        return Ok(Err(Skip::OptedOut));
    }
    let spec = &pod["spec"];
    let names = spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .filter_map(|c| c["name"].as_str());
    if names.clone().any(|n| n == PROXY) {
        return Ok(Err(Skip::AlreadyInjected));
    }
    if spec["hostNetwork"].as_bool() == Some(true) {
        return Ok(Err(Skip::HostNetwork));
    }
    let ann = |k: &str| annotations.get(k).cloned();

    // Resources and settings, overridable per pod.
    let mut resources = s.proxy_resources.clone();
    for (key, path) in [
        ("mycel.io/proxy-cpu", ("requests", "cpu")),
        ("mycel.io/proxy-memory", ("requests", "memory")),
        ("mycel.io/proxy-cpu-limit", ("limits", "cpu")),
        ("mycel.io/proxy-memory-limit", ("limits", "memory")),
    ] {
        if let Some(v) = ann(key) {
            let ok = !v.is_empty()
                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
                && v.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '.');
            if !ok {
                return Err(BadAnnotation {
                    annotation: key.into(),
                    message: format!("{v:?} is not a Kubernetes quantity such as \"100m\" or \"64Mi\""),
                });
            }
            resources[path.0][path.1] = json!(v);
        }
    }
    let log_level = ann("mycel.io/proxy-log-level").unwrap_or_else(|| s.proxy_log_level.to_lowercase());
    if !["trace", "debug", "info", "warn", "error"].contains(&log_level.as_str()) {
        return Err(BadAnnotation {
            annotation: "mycel.io/proxy-log-level".into(),
            message: format!("{log_level:?} is not one of trace, debug, info, warn, error"),
        });
    }
    let concurrency = match ann("mycel.io/proxy-concurrency") {
        Some(v) => v.parse::<i64>().ok().filter(|n| (0..=64).contains(n)).ok_or_else(|| BadAnnotation {
            annotation: "mycel.io/proxy-concurrency".into(),
            message: format!("{v:?} is not a number of worker threads from 0 (one per CPU) to 64"),
        })?,
        None => s.proxy_concurrency,
    };
    let mut init_args = vec![json!("init")];
    for (key, flag) in [
        ("mycel.io/exclude-inbound-ports", "--exclude-inbound-ports"),
        ("mycel.io/exclude-outbound-ports", "--exclude-outbound-ports"),
    ] {
        if let Some(v) = ann(key) {
            let ports = port_list(key, &v)?;
            if !ports.is_empty() {
                init_args.push(json!(flag));
                init_args.push(json!(ports));
            }
        }
    }
    if let Some(v) = ann("mycel.io/exclude-outbound-cidrs") {
        // Checked here, so that a bad value is refused at admission with the annotation's name
        // instead of leaving the pod stuck in its init container.
        let cidrs = mycel_api::net::parse_cidr_list(&v).map_err(|message| BadAnnotation {
            annotation: "mycel.io/exclude-outbound-cidrs".into(),
            message,
        })?;
        let list: Vec<String> = cidrs.iter().map(|c| c.to_string()).collect();
        if !list.is_empty() {
            init_args.push(json!("--exclude-outbound-cidrs"));
            init_args.push(json!(list.join(",")));
        }
    }

    // Probes: rewritten to the proxy, which runs them against localhost.
    let mut pod = pod.clone();
    let mut app_probes = serde_json::Map::new();
    if let Some(containers) = pod["spec"]["containers"].as_array_mut() {
        for c in containers {
            let name = c["name"].as_str().unwrap_or("").to_string();
            let ports = c["ports"].clone();
            for (kind, path) in
                [("livenessProbe", "livez"), ("readinessProbe", "readyz"), ("startupProbe", "startupz")]
            {
                let probe = &mut c[kind];
                if !probe.is_object() {
                    continue;
                }
                let resolve = |port: &Value| -> Option<i64> {
                    match port {
                        Value::Number(n) => n.as_i64(),
                        Value::String(named) => ports
                            .as_array()?
                            .iter()
                            .find(|p| p["name"].as_str() == Some(named))
                            .and_then(|p| p["containerPort"].as_i64()),
                        _ => None,
                    }
                };
                let original = if probe["httpGet"].is_object() {
                    let g = &probe["httpGet"];
                    if g["scheme"].as_str() == Some("HTTPS") {
                        continue;
                    }
                    let Some(port) = resolve(&g["port"]) else { continue };
                    json!({"httpGet": {"path": g["path"].as_str().unwrap_or("/"), "port": port}})
                } else if probe["tcpSocket"].is_object() {
                    let Some(port) = resolve(&probe["tcpSocket"]["port"]) else { continue };
                    json!({"tcpSocket": {"port": port}})
                } else {
                    continue;
                };
                let key = format!("/app-health/{name}/{path}");
                app_probes.insert(key.clone(), original);
                let obj = probe.as_object_mut().expect("checked above");
                obj.remove("tcpSocket");
                obj.insert("httpGet".into(), json!({"path": key, "port": ADMIN_PORT}));
            }
        }
    }

    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let env = |name: &str, mut v: Value| {
        v["name"] = json!(name);
        v
    };
    let mut proxy_env = vec![
        env("POD_NAME", field("metadata.name")),
        env("POD_NAMESPACE", field("metadata.namespace")),
        env("SERVICE_ACCOUNT", field("spec.serviceAccountName")),
        env("INSTANCE_IPS", field("status.podIPs")),
        env("MYCEL_CONTROL_PLANE", json!({"value": s.control_plane()})),
        env("MYCEL_REVISION", json!({"value": s.revision})),
        env("MYCEL_TRUST_DOMAIN", json!({"value": s.trust_domain})),
        env("MYCEL_CA_ROOTS", json!({"value": "/etc/mycel/ca/root-cert.pem"})),
        env("MYCEL_TOKEN_PATH", json!({"value": "/var/run/secrets/tokens/mycel-token"})),
        env("MYCEL_INBOUND_MTLS_DEFAULT", json!({"value": s.mtls_mode})),
        env("RUST_LOG", json!({"value": log_level})),
    ];
    if let Some(v) = ann("mycel.io/cert-ttl-seconds") {
        let secs = v.parse::<u64>().ok().filter(|s| *s >= 10).ok_or_else(|| BadAnnotation {
            annotation: "mycel.io/cert-ttl-seconds".into(),
            message: format!("{v:?} is not a number of seconds of at least 10"),
        })?;
        proxy_env.push(env("MYCEL_CERT_TTL_SECS", json!({"value": secs.to_string()})));
    }
    if !app_probes.is_empty() {
        proxy_env.push(env("MYCEL_APP_PROBES", json!({"value": Value::Object(app_probes).to_string()})));
    }
    let init = json!({
        "name": INIT,
        "image": s.proxy_image,
        "imagePullPolicy": s.pull_policy,
        "args": init_args,
        "env": [{"name": "MYCEL_PROXY_UID", "value": PROXY_UID.to_string()}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    });
    let proxy = json!({
        "name": PROXY,
        "image": s.proxy_image,
        "imagePullPolicy": s.pull_policy,
        "restartPolicy": "Always",
        "args": ["run", "--sidecar", "--concurrency", concurrency.to_string(), "--drain-secs", seconds(&s.proxy_drain_duration).to_string()],
        "env": proxy_env,
        "ports": [{"name": "mycel-admin", "containerPort": ADMIN_PORT}],
        "startupProbe": {"httpGet": {"path": "/healthz/ready", "port": ADMIN_PORT}, "periodSeconds": 1, "failureThreshold": 600},
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": ADMIN_PORT}, "periodSeconds": 5},
        "resources": resources,
        "securityContext": {
            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": [
            {"name": "mycel-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            {"name": "mycel-ca-root", "mountPath": "/etc/mycel/ca", "readOnly": true},
        ]
    });
    let mut inits = vec![init, proxy];
    inits.extend(pod["spec"]["initContainers"].as_array().cloned().unwrap_or_default());
    pod["spec"]["initContainers"] = Value::Array(inits);
    let mut volumes = pod["spec"]["volumes"].as_array().cloned().unwrap_or_default();
    volumes.push(json!({"name": "mycel-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "mycel-ca", "expirationSeconds": 43200, "path": "mycel-token"}}]}}));
    volumes.push(json!({"name": "mycel-ca-root", "configMap": {"name": ROOT_CONFIGMAP}}));
    pod["spec"]["volumes"] = Value::Array(volumes);
    if !pod["metadata"]["annotations"].is_object() {
        pod["metadata"]["annotations"] = json!({});
    }
    pod["metadata"]["annotations"]["mycel.io/status"] = json!(format!("injected, revision {}", s.revision));
    Ok(Ok(pod))
}

/// JSON Patch that turns `from` into `to`, for the parts injection changes.
pub fn patch(from: &Value, to: &Value) -> Value {
    let mut ops = Vec::new();
    for path in ["/spec/initContainers", "/spec/containers", "/spec/volumes", "/metadata/annotations"] {
        let ptr = |v: &Value| v.pointer(path).cloned();
        let (a, b) = (ptr(from), ptr(to));
        if a != b
            && let Some(b) = b
        {
            // "add" replaces a member that exists.
            ops.push(json!({"op": "add", "path": path, "value": b}));
        }
    }
    Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "containers": [{
                    "name": "web", "image": "app",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "livenessProbe": {"tcpSocket": {"port": 8080}}
                }]
            }
        })
    }

    #[test]
    fn a_pod_gets_the_sidecar_capture_token_and_rewritten_probes() {
        let s = ProxySettings::default();
        let out = inject(&pod(), &s).unwrap().unwrap();
        let inits = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits[0]["name"], INIT);
        assert_eq!(inits[1]["name"], PROXY);
        assert_eq!(inits[1]["restartPolicy"], "Always");
        let c = &out["spec"]["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"], json!({"path": "/app-health/web/readyz", "port": 15020}));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/app-health/web/livez");
        assert!(c["livenessProbe"].get("tcpSocket").is_none());
        let env = inits[1]["env"].as_array().unwrap();
        let probes = env.iter().find(|e| e["name"] == "MYCEL_APP_PROBES").unwrap()["value"].as_str().unwrap();
        let probes: Value = serde_json::from_str(probes).unwrap();
        assert_eq!(probes["/app-health/web/readyz"], json!({"httpGet": {"path": "/ready", "port": 8080}}));
        assert_eq!(probes["/app-health/web/livez"], json!({"tcpSocket": {"port": 8080}}));
        let default_mode = env.iter().find(|e| e["name"] == "MYCEL_INBOUND_MTLS_DEFAULT").unwrap();
        assert_eq!(
            default_mode["value"], "PERMISSIVE",
            "the installation's spec.mtls.mode, until the first policy"
        );
        // Injecting the result again changes nothing.
        assert_eq!(inject(&out, &s).unwrap(), Err(Skip::AlreadyInjected));
        assert_eq!(patch(&out, &out), json!([]));
        assert_eq!(patch(&pod(), &out).as_array().unwrap().len(), 4);
    }

    #[test]
    fn annotations_override_and_bad_ones_are_named() {
        let s = ProxySettings::default();
        let mut p = pod();
        p["metadata"]["annotations"] =
            json!({"mycel.io/proxy-cpu": "250m", "mycel.io/exclude-inbound-ports": "9090, 9091"});
        let out = inject(&p, &s).unwrap().unwrap();
        assert_eq!(out["spec"]["initContainers"][1]["resources"]["requests"]["cpu"], "250m");
        assert_eq!(
            out["spec"]["initContainers"][0]["args"],
            json!(["init", "--exclude-inbound-ports", "9090,9091"])
        );
        p["metadata"]["annotations"] = json!({"mycel.io/exclude-outbound-ports": "http"});
        let e = inject(&p, &s).unwrap_err();
        assert_eq!(e.annotation, "mycel.io/exclude-outbound-ports");
        assert!(e.to_string().contains("\"http\" is not a port"), "{e}");
        p["metadata"]["annotations"] = json!({"mycel.io/proxy-memory": "lots"});
        assert!(inject(&p, &s).unwrap_err().to_string().contains("quantity"));
        p["metadata"]["annotations"] = json!({"mycel.io/inject": "false"});
        assert_eq!(inject(&p, &s).unwrap(), Err(Skip::OptedOut));
        // A bad CIDR is refused at admission, naming the annotation (an IPv4 prefix stops at /32).
        for bad in ["10.0.0.0/64", "10.0.0.0/8,example.com"] {
            p["metadata"]["annotations"] = json!({"mycel.io/exclude-outbound-cidrs": bad});
            let e = inject(&p, &s).unwrap_err();
            assert_eq!(e.annotation, "mycel.io/exclude-outbound-cidrs", "{bad}");
        }
        p["metadata"]["annotations"] = json!({"mycel.io/exclude-outbound-cidrs": "10.0.0.0/8, fd00::/8"});
        let out = inject(&p, &s).unwrap().unwrap();
        assert_eq!(
            out["spec"]["initContainers"][0]["args"],
            json!(["init", "--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8"])
        );
    }

    #[test]
    fn limit_and_log_level_annotations_override_the_installation() {
        let s = ProxySettings::default();
        let mut p = pod();
        p["metadata"]["annotations"] = json!({
            "mycel.io/proxy-cpu-limit": "500m",
            "mycel.io/proxy-memory-limit": "96Mi",
            "mycel.io/proxy-log-level": "debug",
        });
        let out = inject(&p, &s).unwrap().unwrap();
        let proxy = &out["spec"]["initContainers"][1];
        assert_eq!(proxy["resources"]["limits"], json!({"cpu": "500m", "memory": "96Mi"}));
        let env = proxy["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug"), "{env:?}");
        p["metadata"]["annotations"] = json!({"mycel.io/proxy-log-level": "loud"});
        assert_eq!(inject(&p, &s).unwrap_err().annotation, "mycel.io/proxy-log-level");
        p["metadata"]["annotations"] = json!({"mycel.io/proxy-memory-limit": "a lot"});
        assert_eq!(inject(&p, &s).unwrap_err().annotation, "mycel.io/proxy-memory-limit");
    }

    #[test]
    fn the_drain_duration_is_read_in_the_schema_notation() {
        assert_eq!(seconds("1m30s"), 90);
        assert_eq!(seconds("2m"), 120);
        assert_eq!(seconds("1500ms"), 2);
        assert_eq!(seconds("45s"), 45);
        assert_eq!(seconds("1h"), 3600);
    }
}
