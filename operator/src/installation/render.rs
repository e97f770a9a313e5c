//! From a `MeshInstallation` to the objects of its control-plane revision. Pure functions: the
//! profile and the spec resolve into one [`Effective`] configuration, which renders into the
//! desired objects. No I/O here, so every rule about names, labels and defaults is testable alone.

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind};
use mycel_crds::common::LogLevel;
use mycel_crds::mesh_installation::{
    AccessLogFormat, FailurePolicy, MeshInstallation, MtlsMode, Profile, PullPolicy, ServiceType,
};
use serde::Serialize;

use crate::controlplane::inject::ROOT_CONFIGMAP;
use serde_json::{Value, json};

/// Field manager of every write the operator makes.
pub const MANAGER: &str = "mycel-operator";
/// Name of the generated root CA Secret, shared by every revision in the root namespace.
pub const CA_SECRET: &str = "mycel-ca";
pub const LABEL_REV: &str = "mycel.io/rev";
pub const LABEL_INSTALLATION: &str = "mycel.io/installation";
pub const LABEL_INSTALLATION_NS: &str = "mycel.io/installation-namespace";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Ports fixed by the architecture.
pub const PORT_XDS: i32 = 15012;
pub const PORT_WEBHOOK: i32 = 15017;
pub const PORT_MONITORING: i32 = 15014;

/// Images the operator deploys unless the installation overrides them.
#[derive(Clone, Debug)]
pub struct ImageDefaults {
    pub registry: String,
    pub version: String,
}

impl Default for ImageDefaults {
    fn default() -> Self {
        ImageDefaults {
            registry: "docker.io/mycel".into(),
            version: format!("v{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// The installation after profile defaults and overrides: what the objects are rendered from and
/// what the control plane reads from the mesh ConfigMap.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Effective {
    pub name: String,
    pub namespace: String,
    pub revision: String,
    pub profile: Profile,
    pub version: String,
    pub control_plane_image: String,
    pub proxy_image: String,
    pub pull_policy: PullPolicy,
    pub control_plane_replicas: i32,
    pub control_plane_resources: Value,
    pub control_plane_log_level: LogLevel,
    pub proxy_resources: Value,
    pub proxy_log_level: LogLevel,
    pub proxy_concurrency: i32,
    pub proxy_drain_duration: String,
    pub mtls_mode: MtlsMode,
    pub trust_domain: String,
    pub ca_secret: Option<String>,
    pub workload_cert_ttl: String,
    pub metrics_enabled: bool,
    pub tracing_sampling_percent: f64,
    pub otlp_endpoint: Option<String>,
    pub access_log_enabled: bool,
    pub access_log_format: AccessLogFormat,
    pub gateway: Option<Gateway>,
    pub webhook_failure_policy: FailurePolicy,
    /// The rate-limit service, when the installation enables it (`spec.rateLimit`).
    pub rate_limit: Option<RateLimit>,
    /// External authorizers (`spec.extensionProviders`), as the control plane tells proxies.
    pub extension_providers: Vec<ExtensionProvider>,
}

/// An external authorizer, with its defaults applied.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    /// `host:port` (an IPv6 host in brackets).
    pub address: String,
    pub timeout_ms: u64,
    pub fail_open: bool,
    pub status_on_error: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub replicas: i32,
    pub redis_addresses: Vec<String>,
    pub redis_cluster: bool,
    /// `(Secret, key)` of the Redis password.
    pub redis_password_secret: Option<(String, String)>,
    /// `(Secret, key)` of the CA that Redis's certificate chains to: TLS to Redis.
    pub redis_tls_ca_secret: Option<(String, String)>,
    /// What proxies wait for a decision.
    pub timeout_ms: u64,
    pub resources: Value,
}

/// The rate-limit service's port for proxies (mutual TLS), and its local one (`mycelctl quota`).
pub const PORT_RATELIMIT: i32 = 15090;
pub const PORT_RATELIMIT_LOCAL: i32 = 15091;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    pub replicas: i32,
    pub service_type: ServiceType,
    pub resources: Value,
}

impl Effective {
    /// Applies the profile's defaults, then the spec's explicit values.
    pub fn resolve(mi: &MeshInstallation, images: &ImageDefaults) -> Effective {
        let spec = &mi.spec;
        let profile = spec.profile;
        let version = spec.version.clone().unwrap_or_else(|| images.version.clone());
        let imgs = spec.images.clone().unwrap_or_default();
        let registry = imgs.registry.unwrap_or_else(|| images.registry.clone());
        let cp = spec.control_plane.clone().unwrap_or_default();
        let proxy = spec.proxy.clone().unwrap_or_default();
        let telemetry = spec.telemetry.clone().unwrap_or_default();
        let tracing = telemetry.tracing.clone().unwrap_or_default();
        let access_log = telemetry.access_log.clone();
        let gw = spec.ingress_gateway.clone().unwrap_or_default();
        let demo = profile == Profile::Demo;
        let to_value = |r: Option<k8s_openapi::api::core::v1::ResourceRequirements>, default: Value| {
            r.map(|r| serde_json::to_value(r).unwrap_or(Value::Null)).unwrap_or(default)
        };
        Effective {
            name: mi.metadata.name.clone().unwrap_or_default(),
            namespace: mi.metadata.namespace.clone().unwrap_or_default(),
            revision: spec.revision.clone(),
            profile,
            control_plane_image: imgs
                .control_plane
                .unwrap_or_else(|| format!("{registry}/operator:{version}")),
            proxy_image: imgs.proxy.unwrap_or_else(|| format!("{registry}/proxy:{version}")),
            version,
            pull_policy: imgs.pull_policy.unwrap_or(PullPolicy::IfNotPresent),
            control_plane_replicas: cp.replicas.unwrap_or(1),
            control_plane_resources: to_value(
                cp.resources,
                json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}}),
            ),
            control_plane_log_level: cp.log_level.unwrap_or_default(),
            proxy_resources: to_value(
                proxy.resources,
                json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "256Mi"}}),
            ),
            proxy_log_level: proxy.log_level.unwrap_or_default(),
            proxy_concurrency: proxy.concurrency.unwrap_or(2),
            proxy_drain_duration: proxy.drain_duration.map(|d| d.0).unwrap_or_else(|| "5s".into()),
            mtls_mode: spec.mtls.clone().map(|m| m.mode).unwrap_or_default(),
            trust_domain: spec.trust_domain.clone(),
            ca_secret: spec.ca.clone().and_then(|c| c.secret_name),
            workload_cert_ttl: spec
                .ca
                .clone()
                .and_then(|c| c.workload_cert_ttl)
                .map(|d| d.0)
                .unwrap_or_else(|| "24h".into()),
            metrics_enabled: telemetry.metrics.map(|m| m.enabled).unwrap_or(profile != Profile::Minimal),
            tracing_sampling_percent: tracing
                .sampling_percent
                .unwrap_or(if demo && tracing.otlp_endpoint.is_some() { 100.0 } else { 0.0 }),
            otlp_endpoint: tracing.otlp_endpoint,
            access_log_enabled: access_log.as_ref().map(|a| a.enabled).unwrap_or(demo),
            access_log_format: access_log.map(|a| a.format).unwrap_or_default(),
            gateway: gw.enabled.unwrap_or(demo).then(|| Gateway {
                replicas: gw.replicas.unwrap_or(1),
                service_type: gw.service_type.unwrap_or(ServiceType::ClusterIP),
                resources: to_value(
                    gw.resources,
                    json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
                ),
            }),
            webhook_failure_policy: spec.webhook.clone().map(|w| w.failure_policy).unwrap_or_default(),
            rate_limit: spec.rate_limit.clone().map(|r| RateLimit {
                replicas: r.replicas.unwrap_or(2),
                redis_addresses: r.redis.addresses.iter().map(|a| a.0.clone()).collect(),
                redis_cluster: r.redis.cluster.unwrap_or(false),
                redis_password_secret: r.redis.password_secret.map(|p| (p.name, p.key)),
                redis_tls_ca_secret: r.redis.tls.map(|t| (t.ca_secret.name, t.ca_secret.key)),
                // The schema bounds it to (0, 10s].
                timeout_ms: r
                    .timeout
                    .and_then(|t| t.parse().ok())
                    .map_or(200, |d: std::time::Duration| (d.as_millis() as u64).clamp(1, 10_000)),
                resources: to_value(
                    r.resources,
                    json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
                ),
            }),
            extension_providers: spec
                .extension_providers
                .iter()
                .map(|p| {
                    let g = &p.envoy_ext_authz_grpc;
                    let host =
                        if g.service.contains(':') { format!("[{}]", g.service) } else { g.service.clone() };
                    ExtensionProvider {
                        name: p.name.clone(),
                        address: format!("{host}:{}", g.port),
                        // The schema bounds it to (0, 30s].
                        timeout_ms: g
                            .timeout
                            .as_ref()
                            .and_then(|t| t.parse().ok())
                            .map_or(1000, |d| (d.as_millis() as u64).clamp(1, 30_000)),
                        fail_open: g.fail_open.unwrap_or(false),
                        status_on_error: g.status_on_error.map_or(403, |c| c.clamp(200, 599) as u16),
                    }
                })
                .collect(),
        }
    }

    pub fn control_plane_name(&self) -> String {
        format!("mycel-control-plane-{}", self.revision)
    }
    /// Cluster-scoped objects carry the namespace too: two root namespaces never collide.
    pub fn cluster_scoped_name(&self, what: &str) -> String {
        format!("mycel-{what}-{}-{}", self.namespace, self.revision)
    }
    /// The rate-limit service's Deployment, Service and ServiceAccount (its mesh identity is
    /// `…/sa/mycel-ratelimit-<rev>`).
    pub fn rate_limit_name(&self) -> String {
        format!("mycel-ratelimit-{}", self.revision)
    }

    pub fn gateway_name(&self) -> String {
        format!("mycel-ingressgateway-{}", self.revision)
    }
    /// The gateway's own ServiceAccount (it needs no API access, so no token is mounted; its
    /// mesh identity is `…/sa/mycel-ingressgateway-<rev>`).
    pub fn gateway_service_account(&self) -> String {
        self.gateway_name()
    }
    /// The Secret the control plane signs with: the user's, or the generated root.
    pub fn ca_secret_name(&self) -> String {
        self.ca_secret.clone().unwrap_or_else(|| CA_SECRET.to_string())
    }
    pub fn mesh_config_name(&self) -> String {
        format!("mycel-mesh-{}", self.revision)
    }
    pub fn webhook_secret_name(&self) -> String {
        format!("mycel-webhook-tls-{}", self.revision)
    }
    /// DNS names the webhook serving certificate must carry.
    pub fn webhook_dns_names(&self) -> Vec<String> {
        let svc = self.control_plane_name();
        vec![format!("{svc}.{}.svc", self.namespace), format!("{svc}.{}.svc.cluster.local", self.namespace)]
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
            ("app.kubernetes.io/part-of".to_string(), "mycel".to_string()),
            (LABEL_REV.to_string(), self.revision.clone()),
            (LABEL_INSTALLATION.to_string(), self.name.clone()),
            (LABEL_INSTALLATION_NS.to_string(), self.namespace.clone()),
        ])
    }

    /// Namespace selector of the injection webhook: the default revision serves
    /// `mycel.io/inject=enabled` namespaces (without a `mycel.io/rev` label); every revision serves
    /// `mycel.io/rev=<revision>`.
    pub fn injection_namespace_selectors(&self) -> Vec<Value> {
        let mut v = vec![json!({"matchExpressions": [
            {"key": LABEL_REV, "operator": "In", "values": [self.revision]},
            {"key": "mycel.io/inject", "operator": "NotIn", "values": ["disabled"]}
        ]})];
        if self.revision == mycel_crds::mesh_installation::DEFAULT_REVISION {
            v.push(json!({"matchExpressions": [
                {"key": "mycel.io/inject", "operator": "In", "values": ["enabled"]},
                {"key": LABEL_REV, "operator": "DoesNotExist"}
            ]}));
        }
        v
    }
}

/// One object the installation wants, ready for server-side apply.
#[derive(Clone, Debug)]
pub struct Desired {
    pub resource: ApiResource,
    pub namespaced: bool,
    pub name: String,
    pub body: Value,
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub fn deployment_resource() -> ApiResource {
    ar("apps", "v1", "Deployment", "deployments")
}
pub fn mutating_webhook_resource() -> ApiResource {
    ar("admissionregistration.k8s.io", "v1", "MutatingWebhookConfiguration", "mutatingwebhookconfigurations")
}
pub fn validating_webhook_resource() -> ApiResource {
    ar(
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
    )
}
/// Every cluster-scoped kind the operator creates (cleaned up by the finalizer).
pub fn cluster_scoped_resources() -> Vec<ApiResource> {
    vec![
        ar("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles"),
        ar("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings"),
        mutating_webhook_resource(),
        validating_webhook_resource(),
    ]
}

/// Everything one revision consists of, in the order it is applied. `owner` is the
/// installation's owner reference (namespaced objects only); `ca_bundle_pem` what webhook
/// clients must trust.
pub fn render(eff: &Effective, owner: &Value, ca_bundle_pem: &str) -> Vec<Desired> {
    use base64::Engine;
    let ns = &eff.namespace;
    let cp = eff.control_plane_name();
    let labels = eff.labels();
    let mut cp_labels = labels.clone();
    cp_labels.insert("app".into(), "mycel-control-plane".into());
    let selector = json!({"app": "mycel-control-plane", LABEL_REV: eff.revision});
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
    let meta = |name: &str, namespaced: bool, labels: &BTreeMap<String, String>| {
        let mut m = json!({"name": name, "labels": labels});
        if namespaced {
            m["namespace"] = json!(ns);
            m["ownerReferences"] = json!([owner]);
        }
        m
    };
    let mut out = Vec::new();
    let mut push = |resource: ApiResource, namespaced: bool, name: String, mut body: Value| {
        body["apiVersion"] = json!(resource.api_version);
        body["kind"] = json!(resource.kind);
        out.push(Desired { resource, namespaced, name, body });
    };

    push(
        ar("", "v1", "ServiceAccount", "serviceaccounts"),
        true,
        cp.clone(),
        json!({"metadata": meta(&cp, true, &labels)}),
    );

    // What the control plane reads and writes, nothing more (see `control_plane_cluster_rules`).
    let cluster_role = eff.cluster_scoped_name("control-plane");
    push(
        ar("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles"),
        false,
        cluster_role.clone(),
        json!({"metadata": meta(&cluster_role, false, &labels), "rules": control_plane_cluster_rules()}),
    );
    push(
        ar("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings"),
        false,
        cluster_role.clone(),
        json!({
            "metadata": meta(&cluster_role, false, &labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "ServiceAccount", "name": cp, "namespace": ns}]
        }),
    );
    push(
        ar("rbac.authorization.k8s.io", "v1", "Role", "roles"),
        true,
        cp.clone(),
        json!({
            "metadata": meta(&cp, true, &labels),
            "rules": control_plane_namespace_rules(eff)
        }),
    );
    push(
        ar("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
        true,
        cp.clone(),
        json!({
            "metadata": meta(&cp, true, &labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": cp},
            "subjects": [{"kind": "ServiceAccount", "name": cp, "namespace": ns}]
        }),
    );

    let mesh_json = serde_json::to_string_pretty(eff).unwrap_or_default();
    push(
        ar("", "v1", "ConfigMap", "configmaps"),
        true,
        eff.mesh_config_name(),
        json!({"metadata": meta(&eff.mesh_config_name(), true, &labels), "data": {"mesh.json": mesh_json}}),
    );

    let ca_secret = eff.ca_secret_name();
    // The pod template changes when the configuration does, so a change rolls the control plane.
    let config_hash = fnv1a(mesh_json.as_bytes());
    push(
        deployment_resource(),
        true,
        cp.clone(),
        json!({
            "metadata": meta(&cp, true, &cp_labels),
            "spec": {
                "replicas": eff.control_plane_replicas,
                "selector": {"matchLabels": selector},
                // Old pods keep serving (webhooks, config) until new ones are ready.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {
                        "labels": cp_labels,
                        "annotations": {"mycel.io/config-hash": format!("{config_hash:016x}")}
                    },
                    "spec": {
                        "serviceAccountName": cp,
                        "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "control-plane",
                            "image": eff.control_plane_image,
                            "imagePullPolicy": pull_policy(eff.pull_policy),
                            "args": ["control-plane", "--revision", eff.revision, "--mesh-config", "/etc/mycel/mesh/mesh.json"],
                            "env": [
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "RUST_LOG", "value": log_level(eff.control_plane_log_level)},
                            ],
                            "ports": [
                                {"name": "grpc-xds", "containerPort": PORT_XDS},
                                {"name": "https-webhook", "containerPort": PORT_WEBHOOK},
                                {"name": "http-monitoring", "containerPort": PORT_MONITORING},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT_MONITORING}, "periodSeconds": 3},
                            "resources": eff.control_plane_resources,
                            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "mesh", "mountPath": "/etc/mycel/mesh", "readOnly": true},
                                {"name": "ca", "mountPath": "/etc/mycel/ca", "readOnly": true},
                                {"name": "webhook-tls", "mountPath": "/etc/mycel/webhook", "readOnly": true},
                            ]
                        }],
                        "volumes": [
                            {"name": "mesh", "configMap": {"name": eff.mesh_config_name()}},
                            {"name": "ca", "secret": {"secretName": ca_secret}},
                            {"name": "webhook-tls", "secret": {"secretName": eff.webhook_secret_name()}},
                        ]
                    }
                }
            }
        }),
    );
    push(
        ar("", "v1", "Service", "services"),
        true,
        cp.clone(),
        json!({
            "metadata": meta(&cp, true, &cp_labels),
            "spec": {
                "selector": selector,
                "ports": [
                    {"name": "grpc-xds", "port": PORT_XDS, "targetPort": PORT_XDS},
                    {"name": "https-webhook", "port": 443, "targetPort": PORT_WEBHOOK},
                    {"name": "http-monitoring", "port": PORT_MONITORING, "targetPort": PORT_MONITORING},
                ]
            }
        }),
    );

    let injector = eff.cluster_scoped_name("sidecar-injector");
    let webhooks: Vec<Value> = eff
        .injection_namespace_selectors()
        .into_iter()
        .enumerate()
        .map(|(i, ns_selector)| {
            json!({
                "name": format!("{}.sidecar-injector.mycel.io", ["rev", "default"][i.min(1)]),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": failure_policy(eff.webhook_failure_policy),
                "reinvocationPolicy": "Never",
                "timeoutSeconds": 10,
                "clientConfig": {"service": {"name": cp, "namespace": ns, "path": "/inject", "port": 443}, "caBundle": ca_bundle},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
                "namespaceSelector": ns_selector,
                "objectSelector": {"matchExpressions": [{"key": "mycel.io/inject", "operator": "NotIn", "values": ["false"]}]}
            })
        })
        .collect();
    push(
        mutating_webhook_resource(),
        false,
        injector.clone(),
        json!({"metadata": meta(&injector, false, &labels), "webhooks": webhooks}),
    );
    let validator = eff.cluster_scoped_name("validator");
    push(
        validating_webhook_resource(),
        false,
        validator.clone(),
        json!({
            "metadata": meta(&validator, false, &labels),
            "webhooks": [{
                "name": "validation.mycel.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                // Schema and CEL rules already guard every field; this webhook adds cross-object
                // checks and must never block the API while a revision is starting.
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
                "clientConfig": {"service": {"name": cp, "namespace": ns, "path": "/validate", "port": 443}, "caBundle": ca_bundle},
                "rules": [{
                    "apiGroups": ["mycel.io"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                    "resources": ["trafficroutes", "destinationpolicies", "peerauthentications", "authorizationpolicies", "requestauthentications", "ratelimitpolicies"]
                }],
                "objectSelector": {"matchExpressions": [{"key": LABEL_REV, "operator": "In", "values": [eff.revision]}]}
            }]
        }),
    );

    if let Some(gw) = &eff.gateway {
        let name = eff.gateway_name();
        let mut gw_labels = labels.clone();
        gw_labels.insert("app".into(), "mycel-ingressgateway".into());
        let gw_selector = json!({"app": "mycel-ingressgateway", LABEL_REV: eff.revision});
        // Its own identity, bound to no Role: the gateway talks to its control plane only (with
        // the projected `mycel-ca` token below), never to the Kubernetes API.
        let gw_sa = eff.gateway_service_account();
        push(
            ar("", "v1", "ServiceAccount", "serviceaccounts"),
            true,
            gw_sa.clone(),
            json!({"metadata": meta(&gw_sa, true, &gw_labels), "automountServiceAccountToken": false}),
        );
        push(
            deployment_resource(),
            true,
            name.clone(),
            json!({
                "metadata": meta(&name, true, &gw_labels),
                "spec": {
                    "replicas": gw.replicas,
                    "selector": {"matchLabels": gw_selector},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                    "template": {
                        "metadata": {"labels": gw_labels},
                        "spec": {
                            "serviceAccountName": gw_sa,
                            "automountServiceAccountToken": false,
                            "containers": [{
                                "name": "gateway",
                                "image": eff.proxy_image,
                                "imagePullPolicy": pull_policy(eff.pull_policy),
                                "args": ["run", "--mode", "gateway"],
                                "env": [
                                    {"name": "MYCEL_CONTROL_PLANE", "value": format!("{cp}.{ns}.svc:{PORT_XDS}")},
                                    {"name": "MYCEL_REVISION", "value": eff.revision},
                                    {"name": "MYCEL_TRUST_DOMAIN", "value": eff.trust_domain},
                                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                    {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
                                    {"name": "RUST_LOG", "value": log_level(eff.proxy_log_level)},
                                ],
                                "volumeMounts": [
                                    {"name": "mycel-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                                    {"name": "mycel-ca-root", "mountPath": "/etc/mycel/ca", "readOnly": true},
                                ],
                                "ports": [
                                    {"name": "http", "containerPort": 8080},
                                    {"name": "https", "containerPort": 8443},
                                    {"name": "http-admin", "containerPort": 15020},
                                ],
                                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020}},
                                "resources": gw.resources,
                            }],
                            "volumes": [
                                {"name": "mycel-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "mycel-ca", "expirationSeconds": 43200, "path": "mycel-token"}}]}},
                                {"name": "mycel-ca-root", "configMap": {"name": ROOT_CONFIGMAP}},
                            ]
                        }
                    }
                }
            }),
        );
        push(
            ar("", "v1", "Service", "services"),
            true,
            name.clone(),
            json!({
                "metadata": meta(&name, true, &gw_labels),
                "spec": {
                    "type": service_type(gw.service_type),
                    "selector": gw_selector,
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080},
                        {"name": "https", "port": 443, "targetPort": 8443},
                    ]
                }
            }),
        );
    }

    if let Some(rl) = &eff.rate_limit {
        let name = eff.rate_limit_name();
        let mut rl_labels = labels.clone();
        rl_labels.insert("app".into(), "mycel-ratelimit".into());
        let rl_selector = json!({"app": "mycel-ratelimit", LABEL_REV: eff.revision});
        // Like the gateway's: an identity of its own for mutual TLS, no Kubernetes API token.
        push(
            ar("", "v1", "ServiceAccount", "serviceaccounts"),
            true,
            name.clone(),
            json!({"metadata": meta(&name, true, &rl_labels), "automountServiceAccountToken": false}),
        );
        let mut env = vec![
            json!({"name": "MYCEL_REDIS_ADDRESSES", "value": rl.redis_addresses.join(",")}),
            json!({"name": "MYCEL_REDIS_CLUSTER", "value": rl.redis_cluster.to_string()}),
            json!({"name": "MYCEL_ROOT_NAMESPACE", "value": ns}),
            json!({"name": "MYCEL_CONTROL_PLANE", "value": format!("{cp}.{ns}.svc:{PORT_XDS}")}),
            json!({"name": "MYCEL_REVISION", "value": eff.revision}),
            json!({"name": "MYCEL_TRUST_DOMAIN", "value": eff.trust_domain}),
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
            json!({"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}),
            json!({"name": "RUST_LOG", "value": log_level(eff.proxy_log_level)}),
        ];
        if let Some((secret, key)) = &rl.redis_password_secret {
            env.push(json!({"name": "MYCEL_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}));
        }
        let mut mounts = vec![
            json!({"name": "mycel-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}),
            json!({"name": "mycel-ca-root", "mountPath": "/etc/mycel/ca", "readOnly": true}),
        ];
        let mut volumes = vec![
            json!({"name": "mycel-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "mycel-ca", "expirationSeconds": 43200, "path": "mycel-token"}}]}}),
            json!({"name": "mycel-ca-root", "configMap": {"name": ROOT_CONFIGMAP}}),
        ];
        if let Some((secret, key)) = &rl.redis_tls_ca_secret {
            env.push(json!({"name": "MYCEL_REDIS_TLS_CA", "value": "/etc/mycel/redis-tls/ca.pem"}));
            mounts
                .push(json!({"name": "redis-tls-ca", "mountPath": "/etc/mycel/redis-tls", "readOnly": true}));
            volumes.push(json!({"name": "redis-tls-ca", "secret": {"secretName": secret, "items": [{"key": key, "path": "ca.pem"}]}}));
        }
        push(
            deployment_resource(),
            true,
            name.clone(),
            json!({
                "metadata": meta(&name, true, &rl_labels),
                "spec": {
                    "replicas": rl.replicas,
                    "selector": {"matchLabels": rl_selector},
                    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                    "template": {
                        "metadata": {"labels": rl_labels},
                        "spec": {
                            "serviceAccountName": name,
                            "automountServiceAccountToken": false,
                            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
                            "containers": [{
                                "name": "ratelimit",
                                "image": eff.proxy_image,
                                "imagePullPolicy": pull_policy(eff.pull_policy),
                                "command": ["/usr/local/bin/mycel-ratelimit"],
                                "env": env,
                                "volumeMounts": mounts,
                                "ports": [
                                    {"name": "grpc", "containerPort": PORT_RATELIMIT},
                                    {"name": "http-admin", "containerPort": 15020},
                                ],
                                // Ready while it has a certificate and Redis answers.
                                // Its check waits up to 2 s for Redis: the kubelet waits longer.
                                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15020}, "periodSeconds": 2, "timeoutSeconds": 3},
                                "resources": rl.resources,
                                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                            }],
                            "volumes": volumes,
                        }
                    }
                }
            }),
        );
        push(
            ar("", "v1", "Service", "services"),
            true,
            name.clone(),
            json!({
                "metadata": meta(&name, true, &rl_labels),
                "spec": {
                    "selector": rl_selector,
                    "ports": [{"name": "grpc", "port": PORT_RATELIMIT, "targetPort": PORT_RATELIMIT, "appProtocol": "grpc"}]
                }
            }),
        );
    }
    out
}

/// The control plane's cluster-wide permissions: one rule per kind of API call it makes, and
/// nothing else. The operator must hold each of them itself (`config/rbac/role.yaml`), since
/// Kubernetes refuses to grant what the granter lacks; `operator/tests/rbac.rs` checks it does.
pub fn control_plane_cluster_rules() -> Value {
    json!([
        // Discovery (`controlplane::model`): a watcher each, which lists, then watches; no get.
        {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        // Every policy kind: PeerAuthentication is translated, the others only reported on
        // (`controlplane::translate::unimplemented`).
        {"apiGroups": ["mycel.io"], "resources": ["peerauthentications", "trafficroutes", "destinationpolicies", "authorizationpolicies", "requestauthentications", "ratelimitpolicies"], "verbs": ["list", "watch"]},
        // Policy status (`controlplane::status`): conditions, a server-side apply; no get.
        {"apiGroups": ["mycel.io"], "resources": ["peerauthentications/status", "trafficroutes/status", "destinationpolicies/status", "authorizationpolicies/status", "requestauthentications/status", "ratelimitpolicies/status"], "verbs": ["patch"]},
        // Gateway API mesh routes (`controlplane::translate::gamma`): watched; their status's
        // `parents` list is shared with other controllers, so it is read before it is written.
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["list", "watch"]},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["get", "patch"]},
        // Which namespaces the revision injects (`controlplane::webhook::publish_roots`).
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        // Sign: which service account a workload's projected token proves.
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        // The mesh root certificate in every injected namespace: one server-side apply, a PATCH
        // with no GET before it. Applying a ConfigMap that does not exist yet is authorized as
        // `create` too, and (unlike a POST, whose name RBAC cannot see) with the object's name,
        // so `resourceNames` narrows `create` here as well. No other ConfigMap can be written.
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [ROOT_CONFIGMAP], "verbs": ["create", "patch"]},
    ])
}

/// The control plane's permissions in the installation's namespace: reading its CA Secret by
/// name (`controlplane::read_ca`, every few seconds). The mesh ConfigMap and the webhook Secret
/// reach it as volumes, which the kubelet reads, not the control plane.
pub fn control_plane_namespace_rules(eff: &Effective) -> Value {
    json!([
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [eff.ca_secret_name()], "verbs": ["get"]},
    ])
}

fn pull_policy(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
}

fn failure_policy(p: FailurePolicy) -> &'static str {
    match p {
        FailurePolicy::Fail => "Fail",
        FailurePolicy::Ignore => "Ignore",
    }
}

fn service_type(t: ServiceType) -> &'static str {
    match t {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    }
}

fn log_level(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

/// A stable 64-bit hash: the same input gives the same annotation in every process.
fn fnv1a(bytes: &[u8]) -> u64 {
    mycel_api::hash::fnv1a(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mi(spec: Value) -> MeshInstallation {
        serde_json::from_value(json!({
            "apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation",
            "metadata": {"name": "mesh", "namespace": "mycel-system", "uid": "u1"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn profiles_choose_defaults_that_the_spec_overrides() {
        let images = ImageDefaults::default();
        let minimal = Effective::resolve(
            &mi(json!({"profile": "minimal", "revision": "default", "trustDomain": "cluster.local"})),
            &images,
        );
        assert!(!minimal.metrics_enabled && minimal.gateway.is_none() && !minimal.access_log_enabled);
        let demo = Effective::resolve(
            &mi(json!({"profile": "demo", "revision": "default", "trustDomain": "cluster.local"})),
            &images,
        );
        assert!(demo.metrics_enabled && demo.gateway.is_some() && demo.access_log_enabled);
        let overridden = Effective::resolve(
            &mi(
                json!({"profile": "demo", "revision": "default", "trustDomain": "cluster.local", "ingressGateway": {"enabled": false}, "version": "v9"}),
            ),
            &images,
        );
        assert!(overridden.gateway.is_none());
        assert_eq!(overridden.control_plane_image, "docker.io/mycel/operator:v9");
    }

    #[test]
    fn the_control_planes_replica_count_reaches_it_for_policy_status() {
        let eff = Effective::resolve(
            &mi(
                json!({"revision": "default", "trustDomain": "cluster.local", "controlPlane": {"replicas": 3}}),
            ),
            &ImageDefaults::default(),
        );
        let file: crate::controlplane::MeshFile =
            serde_json::from_value(serde_json::to_value(&eff).unwrap()).unwrap();
        assert_eq!(file.control_plane_replicas, Some(3));
    }

    #[test]
    fn spec_mtls_mode_reaches_the_control_plane_and_every_injected_sidecar() {
        let images = ImageDefaults::default();
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local", "mtls": {"mode": "STRICT"}})),
            &images,
        );
        // What the control plane and its injector read from mesh.json.
        let mesh_json = serde_json::to_value(&eff).unwrap();
        let file: crate::controlplane::MeshFile = serde_json::from_value(mesh_json.clone()).unwrap();
        assert_eq!(file.mtls_mode, Some(mycel_crds::peer_authentication::PeerMtlsMode::Strict));
        let proxy: crate::controlplane::inject::ProxySettings = serde_json::from_value(mesh_json).unwrap();
        assert_eq!(proxy.mtls_mode, "STRICT");
        let default =
            Effective::resolve(&mi(json!({"revision": "default", "trustDomain": "cluster.local"})), &images);
        let proxy: crate::controlplane::inject::ProxySettings =
            serde_json::from_value(serde_json::to_value(&default).unwrap()).unwrap();
        assert_eq!(proxy.mtls_mode, "PERMISSIVE");
    }

    #[test]
    fn spec_extension_providers_reach_the_control_plane_with_their_defaults() {
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local", "extensionProviders": [
                {"name": "opa", "envoyExtAuthzGrpc": {"service": "opa.authz.svc.cluster.local", "port": 9191}},
                {"name": "local", "envoyExtAuthzGrpc": {"service": "::1", "port": 9000, "timeout": "250ms", "failOpen": true, "statusOnError": 503}},
            ]})),
            &ImageDefaults::default(),
        );
        let file: crate::controlplane::MeshFile =
            serde_json::from_value(serde_json::to_value(&eff).unwrap()).unwrap();
        let got = file.ext_authz();
        let opa = &got["opa"];
        assert_eq!(
            (opa.address.as_str(), opa.timeout_ms, opa.fail_open, opa.status_on_error),
            ("opa.authz.svc.cluster.local:9191", 1000, false, 403)
        );
        let local = &got["local"];
        assert_eq!(
            (local.address.as_str(), local.timeout_ms, local.fail_open, local.status_on_error),
            ("[::1]:9000", 250, true, 503)
        );
    }

    /// What the injector makes of a pod under the installation `eff`, through mesh.json as the
    /// control plane reads it.
    fn injected(eff: &Effective) -> Value {
        let settings: crate::controlplane::inject::ProxySettings =
            serde_json::from_value(serde_json::to_value(eff).unwrap()).unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": {"containers": [{"name": "app", "image": "app"}]}});
        crate::controlplane::inject::inject(&pod, &settings).unwrap().unwrap()
    }

    fn sidecar(pod: &Value) -> &Value {
        pod["spec"]["initContainers"].as_array().unwrap().iter().find(|c| c["name"] == "mycel-proxy").unwrap()
    }

    fn object<'a>(objects: &'a [Desired], kind: &str) -> &'a Value {
        &objects.iter().find(|d| d.resource.kind == kind).unwrap().body
    }

    #[test]
    fn spec_images_name_the_control_plane_and_sidecar_images_and_their_pull_policy() {
        let images = ImageDefaults::default();
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local",
                "images": {"controlPlane": "corp.example/cp:1", "proxy": "corp.example/proxy:2", "pullPolicy": "Always"}})),
            &images,
        );
        let objects = render(&eff, &json!({}), "CA");
        let container = &object(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            (container["image"].as_str(), container["imagePullPolicy"].as_str()),
            (Some("corp.example/cp:1"), Some("Always"))
        );
        let pod = injected(&eff);
        assert_eq!(sidecar(&pod)["image"], "corp.example/proxy:2");
        assert_eq!(sidecar(&pod)["imagePullPolicy"], "Always");
        // A registry alone: both images from it, at the installation's version.
        let eff = Effective::resolve(
            &mi(
                json!({"revision": "default", "trustDomain": "cluster.local", "version": "v7", "images": {"registry": "mirror.example/mycel"}}),
            ),
            &images,
        );
        assert_eq!(eff.control_plane_image, "mirror.example/mycel/operator:v7");
        assert_eq!(sidecar(&injected(&eff))["image"], "mirror.example/mycel/proxy:v7");
    }

    #[test]
    fn spec_control_plane_log_level_and_resources_reach_its_deployment() {
        let images = ImageDefaults::default();
        let resources = json!({"requests": {"cpu": "300m"}, "limits": {"memory": "2Gi"}, "claims": [{"name": "gpu", "request": "one"}]});
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local",
                "controlPlane": {"logLevel": "debug", "resources": resources}})),
            &images,
        );
        let objects = render(&eff, &json!({}), "CA");
        let container = &object(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["resources"], resources);
        let env = container["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug"), "{env:?}");
    }

    #[test]
    fn spec_proxy_settings_reach_every_injected_sidecar() {
        let images = ImageDefaults::default();
        let resources = json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}, "claims": [{"name": "c", "request": "r"}]});
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local",
                "proxy": {"logLevel": "debug", "concurrency": 4, "drainDuration": "1m30s", "resources": resources}})),
            &images,
        );
        let pod = injected(&eff);
        let proxy = sidecar(&pod);
        assert_eq!(proxy["args"], json!(["run", "--sidecar", "--concurrency", "4", "--drain-secs", "90"]));
        assert_eq!(proxy["resources"], resources);
        let env = proxy["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "RUST_LOG" && e["value"] == "debug"), "{env:?}");
    }

    #[test]
    fn spec_trust_domain_names_every_identity_and_ca_workload_cert_ttl_reaches_the_ca() {
        let images = ImageDefaults::default();
        let eff = Effective::resolve(
            &mi(
                json!({"revision": "default", "trustDomain": "corp.example", "ca": {"workloadCertTTL": "12h"}}),
            ),
            &images,
        );
        let file: crate::controlplane::MeshFile =
            serde_json::from_value(serde_json::to_value(&eff).unwrap()).unwrap();
        assert_eq!(file.trust_domain, "corp.example", "the control plane signs and names identities in it");
        assert_eq!(file.workload_cert_ttl.as_deref(), Some("12h"), "the CA's certificate lifetime");
        let pod = injected(&eff);
        let env = sidecar(&pod)["env"].as_array().unwrap().clone();
        assert!(
            env.iter().any(|e| e["name"] == "MYCEL_TRUST_DOMAIN" && e["value"] == "corp.example"),
            "{env:?}"
        );
    }

    #[test]
    fn spec_webhook_failure_policy_is_the_injectors() {
        let images = ImageDefaults::default();
        for (policy, expected) in [("Ignore", "Ignore"), ("Fail", "Fail")] {
            let eff = Effective::resolve(
                &mi(
                    json!({"revision": "default", "trustDomain": "cluster.local", "webhook": {"failurePolicy": policy}}),
                ),
                &images,
            );
            let objects = render(&eff, &json!({}), "CA");
            for hook in object(&objects, "MutatingWebhookConfiguration")["webhooks"].as_array().unwrap() {
                assert_eq!(hook["failurePolicy"], expected);
            }
        }
    }

    #[test]
    fn the_default_revision_also_serves_the_inject_label() {
        let images = ImageDefaults::default();
        let def =
            Effective::resolve(&mi(json!({"revision": "default", "trustDomain": "cluster.local"})), &images);
        assert_eq!(def.injection_namespace_selectors().len(), 2);
        let canary =
            Effective::resolve(&mi(json!({"revision": "canary", "trustDomain": "cluster.local"})), &images);
        let sel = canary.injection_namespace_selectors();
        assert_eq!(sel.len(), 1);
        assert_eq!(sel[0]["matchExpressions"][0]["values"][0], "canary");
    }

    fn body<'a>(out: &'a [Desired], kind: &str, name: &str) -> &'a Value {
        &out.iter()
            .find(|d| d.resource.kind == kind && d.name == name)
            .unwrap_or_else(|| panic!("no {kind}/{name}"))
            .body
    }

    /// Every rule of the control plane's roles, spelled out: a change here is a deliberate one
    /// (and `docs/operator.md` lists the same permissions with their reasons).
    #[test]
    fn the_control_plane_is_granted_exactly_the_calls_it_makes() {
        let images = ImageDefaults::default();
        for (spec, ca) in [
            (json!({"revision": "canary", "trustDomain": "cluster.local"}), "mycel-ca"),
            (
                json!({"revision": "canary", "trustDomain": "cluster.local", "ca": {"secretName": "corp-ca"}}),
                "corp-ca",
            ),
        ] {
            let eff = Effective::resolve(&mi(spec), &images);
            let out = render(&eff, &json!({}), "CA");
            let cluster = "mycel-control-plane-mycel-system-canary";
            assert_eq!(
                body(&out, "ClusterRole", cluster)["rules"],
                json!([
                    {"apiGroups": [""], "resources": ["services", "pods"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["mycel.io"], "resources": ["peerauthentications", "trafficroutes", "destinationpolicies", "authorizationpolicies", "requestauthentications", "ratelimitpolicies"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["mycel.io"], "resources": ["peerauthentications/status", "trafficroutes/status", "destinationpolicies/status", "authorizationpolicies/status", "requestauthentications/status", "ratelimitpolicies/status"], "verbs": ["patch"]},
                    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["get", "patch"]},
                    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mycel-ca-root-cert"], "verbs": ["create", "patch"]},
                ])
            );
            assert_eq!(
                body(&out, "Role", "mycel-control-plane-canary")["rules"],
                json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [ca], "verbs": ["get"]}])
            );
            // Each bound to the control plane's ServiceAccount alone, which its pods run as.
            let subjects = json!([{"kind": "ServiceAccount", "name": "mycel-control-plane-canary", "namespace": "mycel-system"}]);
            let crb = body(&out, "ClusterRoleBinding", cluster);
            assert_eq!(crb["subjects"], subjects);
            assert_eq!(
                crb["roleRef"],
                json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster})
            );
            let rb = body(&out, "RoleBinding", "mycel-control-plane-canary");
            assert_eq!(rb["subjects"], subjects);
            assert_eq!(
                rb["roleRef"],
                json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "mycel-control-plane-canary"})
            );
            let pod = &body(&out, "Deployment", "mycel-control-plane-canary")["spec"]["template"]["spec"];
            assert_eq!(pod["serviceAccountName"], "mycel-control-plane-canary");
            assert_eq!(pod["volumes"][1]["secret"]["secretName"], ca, "the Secret the Role names");
        }
    }

    #[test]
    fn spec_rate_limit_runs_the_rate_limit_service_against_its_redis() {
        let images = ImageDefaults::default();
        let none =
            Effective::resolve(&mi(json!({"revision": "default", "trustDomain": "cluster.local"})), &images);
        assert!(
            !render(&none, &json!({}), "CA").iter().any(|d| d.name.contains("ratelimit")),
            "off unless set"
        );
        let eff = Effective::resolve(
            &mi(json!({"revision": "default", "trustDomain": "cluster.local", "rateLimit": {
                "replicas": 3, "timeout": "300ms",
                "redis": {"addresses": ["redis-0.redis:6379", "redis-1.redis:6379"], "cluster": true,
                          "passwordSecret": {"name": "redis-auth", "key": "password"},
                          "tls": {"caSecret": {"name": "redis-tls", "key": "ca.crt"}}},
                "resources": {"requests": {"cpu": "20m"}, "limits": {"memory": "64Mi"}, "claims": [{"name": "gpu", "request": "r"}]}
            }})),
            &images,
        );
        let out = render(&eff, &json!({}), "CA");
        let d = body(&out, "Deployment", "mycel-ratelimit-default");
        assert_eq!(d["spec"]["replicas"], 3);
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "mycel-ratelimit-default", "its mesh identity");
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            body(&out, "ServiceAccount", "mycel-ratelimit-default")["automountServiceAccountToken"],
            false
        );
        let c = &pod["containers"][0];
        assert_eq!(c["command"], json!(["/usr/local/bin/mycel-ratelimit"]));
        assert_eq!(c["image"], eff.proxy_image, "it ships in the proxy image");
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "20m"}, "limits": {"memory": "64Mi"}, "claims": [{"name": "gpu", "request": "r"}]})
        );
        let env = |name: &str| {
            c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned().unwrap_or_default()
        };
        assert_eq!(env("MYCEL_REDIS_ADDRESSES")["value"], "redis-0.redis:6379,redis-1.redis:6379");
        assert_eq!(env("MYCEL_REDIS_CLUSTER")["value"], "true");
        assert_eq!(
            env("MYCEL_REDIS_PASSWORD")["valueFrom"],
            json!({"secretKeyRef": {"name": "redis-auth", "key": "password"}})
        );
        assert_eq!(env("MYCEL_ROOT_NAMESPACE")["value"], "mycel-system");
        // TLS to Redis: the CA from its Secret, as a file.
        assert_eq!(env("MYCEL_REDIS_TLS_CA")["value"], "/etc/mycel/redis-tls/ca.pem");
        let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "redis-tls-ca").unwrap();
        assert_eq!(
            volume["secret"],
            json!({"secretName": "redis-tls", "items": [{"key": "ca.crt", "path": "ca.pem"}]})
        );
        assert!(
            c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "redis-tls-ca" && m["mountPath"] == "/etc/mycel/redis-tls")
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
        let svc = body(&out, "Service", "mycel-ratelimit-default");
        assert_eq!(svc["spec"]["ports"][0]["port"], PORT_RATELIMIT);
        // The control plane learns the proxies' timeout from the mesh file.
        let file: crate::controlplane::MeshFile =
            serde_json::from_value(serde_json::to_value(&eff).unwrap()).unwrap();
        assert_eq!(file.rate_limit.map(|r| r.timeout_ms), Some(300));
        assert!(
            !render(&eff, &json!({}), "CA").iter().any(|d| d.resource.kind.ends_with("Binding")
                && d.body["subjects"].to_string().contains("ratelimit")),
            "nothing grants it API access"
        );
    }

    #[test]
    fn the_gateway_runs_as_its_own_service_account_without_an_api_token() {
        let images = ImageDefaults::default();
        let eff = Effective::resolve(
            &mi(
                json!({"revision": "default", "trustDomain": "cluster.local", "ingressGateway": {"enabled": true}}),
            ),
            &images,
        );
        let out = render(&eff, &json!({}), "CA");
        let sa = body(&out, "ServiceAccount", "mycel-ingressgateway-default");
        assert_eq!(sa["automountServiceAccountToken"], false);
        assert_eq!(sa["metadata"]["namespace"], "mycel-system");
        let pod = &body(&out, "Deployment", "mycel-ingressgateway-default")["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "mycel-ingressgateway-default");
        assert_eq!(pod["automountServiceAccountToken"], false);
        // Its certificate still comes from the control plane, with the projected mycel-ca token.
        assert_eq!(
            pod["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "mycel-ca"
        );
        // Nothing grants it anything.
        for d in out.iter().filter(|d| d.resource.kind.ends_with("Binding")) {
            assert!(
                !d.body["subjects"].to_string().contains("ingressgateway"),
                "{} {} binds the gateway",
                d.resource.kind,
                d.name
            );
        }
        let without = Effective::resolve(
            &mi(
                json!({"revision": "default", "trustDomain": "cluster.local", "ingressGateway": {"enabled": false}}),
            ),
            &images,
        );
        let out = render(&without, &json!({}), "CA");
        assert!(!out.iter().any(|d| d.name.contains("ingressgateway")));
    }

    #[test]
    fn rendering_is_deterministic_and_complete() {
        let images = ImageDefaults::default();
        let eff =
            Effective::resolve(&mi(json!({"revision": "default", "trustDomain": "cluster.local"})), &images);
        let a = render(&eff, &json!({}), "CA");
        let b = render(&eff, &json!({}), "CA");
        assert_eq!(
            a.iter().map(|d| &d.body).collect::<Vec<_>>(),
            b.iter().map(|d| &d.body).collect::<Vec<_>>()
        );
        let kinds: Vec<&str> = a.iter().map(|d| d.resource.kind.as_str()).collect();
        for k in [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "Deployment",
            "Service",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ] {
            assert!(kinds.contains(&k), "{k} missing");
        }
    }
}
