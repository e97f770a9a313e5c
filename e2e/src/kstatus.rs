//! The status that Flux's kstatus (sigs.k8s.io/cli-utils/pkg/kstatus) computes for a resource
//! with standard conditions, re-stated in Rust so tests can assert what GitOps tools will show.

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KStatus {
    InProgress,
    Failed,
    Current,
    Terminating,
}

/// kstatus's generic rules: a deletion in progress is Terminating; a status older than the spec
/// (`observedGeneration` < `generation`) is InProgress; `Stalled=True` is Failed;
/// `Reconciling=True` is InProgress; otherwise Current.
pub fn compute(obj: &Value) -> KStatus {
    if !obj["metadata"]["deletionTimestamp"].is_null() {
        return KStatus::Terminating;
    }
    let generation = obj["metadata"]["generation"].as_i64();
    if let (Some(g), Some(observed)) = (generation, obj["status"]["observedGeneration"].as_i64())
        && observed < g
    {
        return KStatus::InProgress;
    }
    let cond = |t: &str| {
        obj["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .and_then(|c| c["status"].as_str())
            == Some("True")
    };
    if cond("Stalled") {
        return KStatus::Failed;
    }
    if cond("Reconciling") {
        return KStatus::InProgress;
    }
    KStatus::Current
}
