//! The `MeshInstallation` controller. One reconcile, in order:
//! 1. check what the schema cannot (revision claimed twice, CA Secret missing or malformed) —
//!    on failure say so in status and change nothing else;
//! 2. make sure the CA root and the webhook serving certificate exist (never overwriting a CA);
//! 3. server-side apply every object of the revision (`render`), so fields of other managers stay;
//! 4. observe the Deployments and webhooks and write a status that says what is true now.
//!
//! Deletion goes through a finalizer that removes the cluster-scoped objects; namespaced ones
//! are garbage-collected through their owner reference.

pub mod render;
pub mod status;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Secret, Service, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use mycel_crds::{MeshInstallation, mesh_installation::ComponentStatus};
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::{
    Error,
    metrics::Metrics,
    pki::{self, Ca},
};
use render::{CA_SECRET, Effective, ImageDefaults, MANAGER};
use status::Outcome;

pub const FINALIZER: &str = "mycel.io/installation-cleanup";

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub images: ImageDefaults,
    pub metrics: Arc<Metrics>,
}

/// Runs the controller until `shutdown` resolves. `namespace` limits it to one namespace.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    images: ImageDefaults,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let installations: Api<MeshInstallation> = scoped(&client, &namespace);
    let managed = watcher::Config::default().labels(&format!("{}={MANAGER}", render::LABEL_MANAGED_BY));
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
        ),
        client: client.clone(),
        images,
        metrics,
    });
    // Cluster-scoped objects cannot carry an owner reference to a namespaced installation;
    // their labels lead back to it.
    let by_labels = |obj: DynamicObject| {
        let labels = obj.labels();
        match (labels.get(render::LABEL_INSTALLATION), labels.get(render::LABEL_INSTALLATION_NS)) {
            (Some(name), Some(ns)) => Some(ObjectRef::<MeshInstallation>::new(name).within(ns)),
            _ => None,
        }
    };
    let mut controller = Controller::new(installations, watcher::Config::default())
        .owns(scoped::<Deployment>(&client, &namespace), managed.clone())
        .owns(scoped::<Service>(&client, &namespace), managed.clone())
        .owns(scoped::<ConfigMap>(&client, &namespace), managed.clone())
        .owns(scoped::<ServiceAccount>(&client, &namespace), managed.clone())
        .owns(scoped::<Secret>(&client, &namespace), managed.clone())
        .owns(scoped::<Role>(&client, &namespace), managed.clone())
        .owns(scoped::<RoleBinding>(&client, &namespace), managed.clone());
    for ar in render::cluster_scoped_resources() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        controller = controller.watches_with(api, ar, managed.clone(), by_labels);
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

#[instrument(skip_all, fields(installation = %format!("{}/{}", mi.namespace().unwrap_or_default(), mi.name_any())))]
async fn reconcile(mi: Arc<MeshInstallation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = mi.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<MeshInstallation> = Api::namespaced(ctx.client.clone(), &ns);
    let res = finalizer(&api, FINALIZER, mi, |event| async {
        match event {
            Finalizer::Apply(mi) => apply(&mi, &ctx).await,
            Finalizer::Cleanup(mi) => cleanup(&mi, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(started.elapsed());
    res
}

fn error_policy(mi: Arc<MeshInstallation>, err: &Error, ctx: Arc<Context>) -> Action {
    warn!(installation = %mi.name_any(), error = %err, "reconcile failed; retrying in 15s");
    ctx.metrics.failed(err);
    Action::requeue(Duration::from_secs(15))
}

async fn apply(mi: &MeshInstallation, ctx: &Context) -> Result<Action, Error> {
    let eff = Effective::resolve(mi, &ctx.images);
    let previous_ready = is_ready(mi);
    let outcome = match install(mi, &eff, ctx).await? {
        Ok(outcome) => outcome,
        Err(invalid) => invalid,
    };
    let not_implemented = serde_json::to_value(mi)
        .map(|v| crate::controlplane::translate::unimplemented::MESH_INSTALLATION.set_by(&v))
        .unwrap_or_default();
    let new_status = status::compute(
        mi.status.as_ref(),
        mi.metadata.generation,
        &eff.revision,
        &eff.version,
        &outcome,
        &not_implemented,
    );
    if mi.status.as_ref() != Some(&new_status) {
        let api: Api<MeshInstallation> = Api::namespaced(ctx.client.clone(), &eff.namespace);
        let patch =
            json!({"apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation", "status": new_status});
        api.patch_status(&eff.name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
    }
    // Events for transitions a person wants to see in `kubectl describe`.
    let reference = mi.object_ref(&());
    let ready = outcome.ready();
    let event = match (&outcome, previous_ready, ready) {
        (Outcome::Invalid { reason, message }, _, _) if degraded_reason(mi) != Some(reason.to_string()) => {
            Some(Event {
                type_: EventType::Warning,
                reason: reason.to_string(),
                note: Some(message.clone()),
                action: "Validate".into(),
                secondary: None,
            })
        }
        (Outcome::Applied { .. }, false, true) => Some(Event {
            type_: EventType::Normal,
            reason: "Ready".into(),
            note: Some(format!("revision {} ({}) is ready", eff.revision, eff.version)),
            action: "Install".into(),
            secondary: None,
        }),
        (Outcome::Applied { .. }, true, false) => Some(Event {
            type_: EventType::Warning,
            reason: "NotReady".into(),
            note: Some("a component of the revision is no longer ready".into()),
            action: "Observe".into(),
            secondary: None,
        }),
        _ => None,
    };
    if let Some(ev) = event
        && let Err(e) = ctx.recorder.publish(&ev, &reference).await
    {
        warn!(error = %e, "could not publish an event");
    }
    Ok(match outcome {
        Outcome::Invalid { .. } => Action::requeue(Duration::from_secs(60)),
        _ if !ready => Action::requeue(Duration::from_secs(10)),
        _ => Action::requeue(Duration::from_secs(600)),
    })
}

fn is_ready(mi: &MeshInstallation) -> bool {
    mi.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn degraded_reason(mi: &MeshInstallation) -> Option<String> {
    mi.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}

/// Checks, then applies. The inner `Err` is a spec problem the user must fix (nothing applied).
async fn install(
    mi: &MeshInstallation,
    eff: &Effective,
    ctx: &Context,
) -> Result<Result<Outcome, Outcome>, Error> {
    if let Some(invalid) = revision_conflict(mi, eff, ctx).await? {
        return Ok(Err(invalid));
    }
    let ca = match load_or_create_ca(eff, ctx).await? {
        Ok(ca) => ca,
        Err(invalid) => return Ok(Err(invalid)),
    };
    ensure_webhook_cert(mi, eff, &ca, ctx).await?;
    let owner = json!({
        "apiVersion": "mycel.io/v1alpha1",
        "kind": "MeshInstallation",
        "name": eff.name,
        "uid": mi.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    });
    let pp = PatchParams::apply(MANAGER).force();
    for d in render::render(eff, &owner, &ca.trust_bundle_pem) {
        let api: Api<DynamicObject> = if d.namespaced {
            Api::namespaced_with(ctx.client.clone(), &eff.namespace, &d.resource)
        } else {
            Api::all_with(ctx.client.clone(), &d.resource)
        };
        api.patch(&d.name, &pp, &Patch::Apply(&d.body)).await?;
    }
    if eff.gateway.is_none() {
        // Turned off: remove a gateway an earlier spec asked for.
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &eff.namespace);
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &eff.namespace);
        let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &eff.namespace);
        ignore_not_found(
            deployments.delete(&eff.gateway_name(), &DeleteParams::background()).await.map(|_| ()),
        )?;
        ignore_not_found(
            services.delete(&eff.gateway_name(), &DeleteParams::background()).await.map(|_| ()),
        )?;
        ignore_not_found(
            accounts.delete(&eff.gateway_service_account(), &DeleteParams::background()).await.map(|_| ()),
        )?;
    }
    Ok(Ok(observe(eff, &ca.trust_bundle_pem, ctx).await?))
}

/// Revisions are cluster-wide (they select namespaces by label). An installation that already
/// holds the revision keeps it; between newcomers the oldest claim wins.
async fn revision_conflict(
    mi: &MeshInstallation,
    eff: &Effective,
    ctx: &Context,
) -> Result<Option<Outcome>, Error> {
    let all: Api<MeshInstallation> = Api::all(ctx.client.clone());
    let holds = |m: &MeshInstallation| {
        m.status.as_ref().is_some_and(|s| {
            s.revision.as_deref() == Some(eff.revision.as_str())
                && !s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "RevisionConflict")
        })
    };
    // Sorts holders first, then by age, then by name.
    let key = |m: &MeshInstallation| {
        (
            !holds(m),
            m.metadata.creation_timestamp.clone().map(|t| t.0),
            m.namespace().unwrap_or_default(),
            m.name_any(),
        )
    };
    let mine = key(mi);
    let winner = all
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|o| o.metadata.deletion_timestamp.is_none() && o.spec.revision == eff.revision)
        .filter(|o| key(o) < mine)
        .min_by_key(key);
    Ok(winner.map(|o| Outcome::Invalid {
        reason: "RevisionConflict",
        message: format!(
            "spec.revision: revision {:?} is already installed by {}/{}; choose another revision for this installation",
            eff.revision,
            o.namespace().unwrap_or_default(),
            o.name_any()
        ),
    }))
}

/// The CA to sign with: the user's Secret if the spec names one (checked), else the generated
/// root, created once and never overwritten.
async fn load_or_create_ca(eff: &Effective, ctx: &Context) -> Result<Result<Ca, Outcome>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &eff.namespace);
    let (name, user_supplied) = match &eff.ca_secret {
        Some(n) => (n.clone(), true),
        None => (CA_SECRET.to_string(), false),
    };
    let field = if user_supplied { "spec.ca.secretName" } else { "the generated CA" };
    match secrets.get_opt(&name).await? {
        Some(s) => {
            let data = s.data.unwrap_or_default();
            match Ca::from_secret_data(|k| data.get(k).map(|b| b.0.clone())) {
                Ok(ca) => Ok(Ok(ca)),
                Err(e) => Ok(Err(Outcome::Invalid {
                    reason: "CASecretInvalid",
                    message: format!("{field}: Secret {}/{name} {e}", eff.namespace),
                })),
            }
        }
        None if user_supplied => Ok(Err(Outcome::Invalid {
            reason: "CASecretNotFound",
            message: format!(
                "spec.ca.secretName: Secret {}/{name} does not exist; create it with tls.crt and tls.key, or remove the field to use a generated CA",
                eff.namespace
            ),
        })),
        None => {
            let ca = Ca::generate_root(&eff.trust_domain)?;
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": eff.namespace, "labels": {"app.kubernetes.io/part-of": "mycel"},
                    "annotations": {"mycel.io/note": "Generated once by mycel-operator and never overwritten. Deleting it re-keys the mesh."}},
                "type": "kubernetes.io/tls",
                "data": {
                    pki::TLS_CRT: ByteString(ca.cert_pem.clone().into_bytes()),
                    pki::TLS_KEY: ByteString(ca.key_pem.clone().into_bytes()),
                }
            }))?;
            match secrets
                .create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &secret)
                .await
            {
                Ok(_) => {
                    info!(secret = %name, "generated the mesh root CA");
                    Ok(Ok(ca))
                }
                // Another revision created it meanwhile: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => Box::pin(load_or_create_ca(eff, ctx)).await,
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Issues the webhook serving certificate when missing, expiring, or signed by another CA.
async fn ensure_webhook_cert(
    mi: &MeshInstallation,
    eff: &Effective,
    ca: &Ca,
    ctx: &Context,
) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &eff.namespace);
    let name = eff.webhook_secret_name();
    let names = eff.webhook_dns_names();
    if let Some(s) = secrets.get_opt(&name).await? {
        let data = s.data.unwrap_or_default();
        let same_ca = data.get(pki::CA_CRT).map(|b| b.0.as_slice()) == Some(ca.trust_bundle_pem.as_bytes());
        let fresh = data
            .get(pki::TLS_CRT)
            .is_some_and(|c| pki::serving_cert_fresh(&c.0, &names, Duration::from_secs(30 * 24 * 3600)));
        if same_ca && fresh {
            return Ok(());
        }
    }
    let (cert, key) = ca.issue_serving(&names, Duration::from_secs(365 * 24 * 3600))?;
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": eff.namespace, "labels": eff.labels(),
            "ownerReferences": [{"apiVersion": "mycel.io/v1alpha1", "kind": "MeshInstallation", "name": eff.name,
                "uid": mi.metadata.uid, "controller": true, "blockOwnerDeletion": true}]},
        "type": "kubernetes.io/tls",
        "stringData": {pki::TLS_CRT: cert, pki::TLS_KEY: key, pki::CA_CRT: ca.trust_bundle_pem},
    });
    secrets.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(body)).await?;
    info!(secret = %name, "issued the webhook serving certificate");
    Ok(())
}

/// Readiness of each component, as the cluster reports it.
async fn observe(eff: &Effective, ca_bundle_pem: &str, ctx: &Context) -> Result<Outcome, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &eff.namespace);
    let control_plane = deployment_status(deployments.get_opt(&eff.control_plane_name()).await?);
    let gateway = match &eff.gateway {
        Some(_) => Some(deployment_status(deployments.get_opt(&eff.gateway_name()).await?)),
        None => None,
    };
    use base64::Engine;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem);
    let mut missing = Vec::new();
    for (ar, what) in [
        (render::mutating_webhook_resource(), "sidecar-injector"),
        (render::validating_webhook_resource(), "validator"),
    ] {
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        let name = eff.cluster_scoped_name(what);
        let ok = api.get_opt(&name).await?.is_some_and(|o| {
            o.data["webhooks"].as_array().is_some_and(|ws| {
                !ws.is_empty() && ws.iter().all(|w| w["clientConfig"]["caBundle"] == bundle.as_str())
            })
        });
        if !ok {
            missing.push(format!("{} {name} is missing or lacks the CA bundle", ar.kind));
        }
    }
    let webhooks = ComponentStatus {
        ready: missing.is_empty(),
        message: (!missing.is_empty()).then(|| missing.join("; ")),
    };
    Ok(Outcome::Applied { control_plane, webhooks, gateway })
}

fn deployment_status(d: Option<Deployment>) -> ComponentStatus {
    let Some(d) = d else {
        return ComponentStatus { ready: false, message: Some("Deployment not found".into()) };
    };
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.unwrap_or_default();
    let current = st.observed_generation >= d.metadata.generation;
    let updated = st.updated_replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    let rolled_out = current && updated >= want && available >= want && st.replicas.unwrap_or(0) <= want;
    let available_cond = st.conditions.unwrap_or_default().into_iter().find(|c| c.type_ == "Available");
    if rolled_out && available_cond.as_ref().is_some_and(|c| c.status == "True") {
        return ComponentStatus { ready: true, message: None };
    }
    let mut msg = format!("{available}/{want} replicas available, {updated}/{want} updated");
    if let Some(c) = available_cond.filter(|c| c.status != "True")
        && let Some(m) = c.message
    {
        msg.push_str(&format!(": {m}"));
    }
    ComponentStatus { ready: false, message: Some(msg) }
}

/// Deletes the cluster-scoped objects of this installation (namespaced ones follow their owner).
async fn cleanup(mi: &MeshInstallation, ctx: &Context) -> Result<Action, Error> {
    let selector = format!(
        "{}={},{}={}",
        render::LABEL_INSTALLATION,
        mi.name_any(),
        render::LABEL_INSTALLATION_NS,
        mi.namespace().unwrap_or_default()
    );
    for ar in render::cluster_scoped_resources() {
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        for obj in api.list(&ListParams::default().labels(&selector)).await? {
            ignore_not_found(api.delete(&obj.name_any(), &DeleteParams::background()).await.map(|_| ()))?;
        }
    }
    let _ = ctx
        .recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "Deleted".into(),
                note: Some(format!("removed revision {}", mi.spec.revision)),
                action: "Uninstall".into(),
                secondary: None,
            },
            &mi.object_ref(&()),
        )
        .await;
    info!("removed the revision's cluster-scoped objects");
    Ok(Action::await_change())
}

fn ignore_not_found(r: Result<(), kube::Error>) -> Result<(), Error> {
    match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map_err(Error::from),
    }
}
