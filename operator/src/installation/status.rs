//! What the status of a `MeshInstallation` says, computed from what the operator observed.
//! Conditions follow the Kubernetes API conventions and kstatus: `Ready`, `Progressing` and
//! `Degraded` for people and Argo CD, plus `Reconciling` and `Stalled`, which Flux's kstatus reads.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use mycel_crds::{
    Condition,
    mesh_installation::{ComponentStatus, ComponentsStatus, MeshInstallationStatus},
};

/// What the last reconcile found.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The objects are applied; the components are as observed.
    Applied { control_plane: ComponentStatus, webhooks: ComponentStatus, gateway: Option<ComponentStatus> },
    /// The spec cannot be installed as it is; nothing was changed.
    Invalid { reason: &'static str, message: String },
}

impl Outcome {
    pub fn ready(&self) -> bool {
        match self {
            Outcome::Applied { control_plane, webhooks, gateway } => {
                control_plane.ready && webhooks.ready && gateway.as_ref().is_none_or(|g| g.ready)
            }
            Outcome::Invalid { .. } => false,
        }
    }
}

/// The new status: conditions keep their `lastTransitionTime` unless their status changes.
pub fn compute(
    previous: Option<&MeshInstallationStatus>,
    generation: Option<i64>,
    revision: &str,
    version: &str,
    outcome: &Outcome,
    not_implemented: &[String],
) -> MeshInstallationStatus {
    let prev_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let mut conds = Vec::new();
    let mut set = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" }.to_string();
        let last = prev_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        conds.push(Condition {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message,
            last_transition_time: last,
            observed_generation: generation,
        });
    };
    let mut status = MeshInstallationStatus {
        observed_generation: generation,
        revision: Some(revision.to_string()),
        ..Default::default()
    };
    match outcome {
        Outcome::Applied { control_plane, webhooks, gateway } => {
            let mut waiting = Vec::new();
            let mut reason = "Installed";
            if !control_plane.ready {
                reason = "ControlPlaneNotReady";
                waiting.push(format!("control plane: {}", control_plane.message.clone().unwrap_or_default()));
            }
            if !webhooks.ready {
                if reason == "Installed" {
                    reason = "WebhooksNotConfigured";
                }
                waiting.push(format!("webhooks: {}", webhooks.message.clone().unwrap_or_default()));
            }
            if let Some(g) = gateway.as_ref().filter(|g| !g.ready) {
                if reason == "Installed" {
                    reason = "GatewayNotReady";
                }
                waiting.push(format!("ingress gateway: {}", g.message.clone().unwrap_or_default()));
            }
            let ready = waiting.is_empty();
            let summary = if ready {
                format!("revision {revision} ({version}) is installed and ready")
            } else {
                format!("waiting for {}", waiting.join("; "))
            };
            match not_implemented {
                [] => set("Accepted", true, "Accepted", "every field it sets is implemented".into()),
                fields => set(
                    "Accepted",
                    true,
                    "FieldsNotImplemented",
                    format!(
                        "installed, but these fields are not implemented yet and change nothing: {} (docs/reference/field-ledger.yaml)",
                        fields.join(", ")
                    ),
                ),
            }
            set("Ready", ready, reason, summary.clone());
            set("Progressing", !ready, if ready { "Installed" } else { "RollingOut" }, summary.clone());
            set("Degraded", false, "AsExpected", "the installation is valid".into());
            set("Reconciling", !ready, if ready { "Installed" } else { "RollingOut" }, summary);
            set("Stalled", false, "AsExpected", "the installation is valid".into());
            if control_plane.ready {
                status.version = Some(version.to_string());
            } else {
                status.version = previous.and_then(|p| p.version.clone());
            }
            status.components = Some(ComponentsStatus {
                control_plane: Some(control_plane.clone()),
                webhooks: Some(webhooks.clone()),
                gateway: gateway.clone(),
            });
        }
        Outcome::Invalid { reason, message } => {
            set("Accepted", false, reason, message.clone());
            set("Ready", false, reason, message.clone());
            set("Progressing", false, reason, "nothing is changed until the spec is fixed".into());
            set("Degraded", true, reason, message.clone());
            set("Reconciling", false, reason, "nothing is changed until the spec is fixed".into());
            set("Stalled", true, reason, message.clone());
            status.version = previous.and_then(|p| p.version.clone());
            status.components = previous.and_then(|p| p.components.clone());
        }
    }
    status.conditions = conds;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comp(ready: bool) -> ComponentStatus {
        ComponentStatus { ready, message: (!ready).then(|| "0/1 replicas available".into()) }
    }

    #[test]
    fn fields_not_implemented_yet_are_named_in_accepted() {
        let out = Outcome::Applied { control_plane: comp(true), webhooks: comp(true), gateway: None };
        let s = compute(
            None,
            Some(1),
            "default",
            "v1",
            &out,
            &["spec.telemetry.tracing.otlpEndpoint".to_string()],
        );
        let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!((accepted.status.as_str(), accepted.reason.as_str()), ("True", "FieldsNotImplemented"));
        assert!(accepted.message.contains("spec.telemetry.tracing.otlpEndpoint"), "{}", accepted.message);
        let s = compute(None, Some(1), "default", "v1", &out, &[]);
        let accepted = s.conditions.iter().find(|c| c.type_ == "Accepted").unwrap();
        assert_eq!(accepted.reason, "Accepted");
    }

    #[test]
    fn ready_only_when_every_component_is() {
        let out = Outcome::Applied { control_plane: comp(true), webhooks: comp(false), gateway: None };
        let s = compute(None, Some(1), "default", "v1", &out, &[]);
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "WebhooksNotConfigured"));
        let out =
            Outcome::Applied { control_plane: comp(true), webhooks: comp(true), gateway: Some(comp(true)) };
        let s2 = compute(Some(&s), Some(1), "default", "v1", &out, &[]);
        let ready = s2.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Installed"));
        assert_eq!(s2.version.as_deref(), Some("v1"));
    }

    #[test]
    fn transition_times_move_only_on_change() {
        let out = Outcome::Applied { control_plane: comp(true), webhooks: comp(true), gateway: None };
        let s1 = compute(None, Some(1), "default", "v1", &out, &[]);
        let s2 = compute(Some(&s1), Some(1), "default", "v1", &out, &[]);
        assert_eq!(s1, s2, "an unchanged outcome gives an identical status");
    }

    #[test]
    fn invalid_specs_are_degraded_and_stalled_and_keep_components() {
        let ok = Outcome::Applied { control_plane: comp(true), webhooks: comp(true), gateway: None };
        let s1 = compute(None, Some(1), "default", "v1", &ok, &[]);
        let bad = Outcome::Invalid { reason: "CASecretNotFound", message: "spec.ca.secretName: …".into() };
        let s2 = compute(Some(&s1), Some(2), "default", "v1", &bad, &[]);
        let get = |t: &str| s2.conditions.iter().find(|c| c.type_ == t).unwrap().status.clone();
        assert_eq!(
            (get("Ready"), get("Degraded"), get("Stalled")),
            ("False".into(), "True".into(), "True".into())
        );
        assert_eq!(s2.components, s1.components);
    }
}
