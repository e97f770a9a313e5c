//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas
//! exactly one reconciles. The holder renews the lease every `renew`; a candidate takes it over
//! once it has not been renewed for `duration`. Updates carry the lease's resourceVersion, so two
//! candidates can never both win the same round. A leader that cannot renew in time stops
//! leading (the process exits and is restarted), as controller-runtime's leaders do.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
}

/// Why a leader stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    #[error("another replica took the lease")]
    TakenOver,
    #[error("the lease could not be renewed in time: {0}")]
    RenewFailed(kube::Error),
}

/// Campaigns until leadership, once held, is lost. `leading` turns true when this replica
/// holds the lease.
pub async fn campaign(client: Client, cfg: Config, leading: watch::Sender<bool>) -> Lost {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<std::time::Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &cfg).await {
            Ok(true) => {
                if !*leading.borrow() {
                    info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
                    let _ = leading.send(true);
                }
                last_renewed = Some(std::time::Instant::now());
            }
            Ok(false) => {
                if *leading.borrow() {
                    warn!(lease = %cfg.name, "another replica holds the lease now");
                    let _ = leading.send(false);
                    return Lost::TakenOver;
                }
            }
            Err(e) => {
                warn!(error = %e, "lease update failed");
                if let Some(t) = last_renewed
                    && t.elapsed() > cfg.duration
                {
                    let _ = leading.send(false);
                    return Lost::RenewFailed(e);
                }
            }
        }
        tokio::time::sleep(cfg.renew).await;
    }
}

/// Gives the lease up (on shutdown), so a standby takes over at once.
/// The caller stops campaigning first. A write that raced another (409) is tried again on a
/// fresh read, a few times.
pub async fn release(client: Client, cfg: &Config) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    for _ in 0..3 {
        let Ok(mut lease) = api.get(&cfg.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match api.replace(&cfg.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                info!(lease = %cfg.name, "released the lease");
                return;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                tracing::warn!(lease = %cfg.name, error = %e, "could not release the lease; it runs out instead");
                return;
            }
        }
    }
}

async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &Config) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let secs = cfg.duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(cfg.name.clone()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(t)), Some(d)) => *t + SignedDuration::from_secs(i64::from(d)) < now,
        _ => true,
    };
    if !mine && !expired && spec.holder_identity.is_some() {
        return Ok(false);
    }
    if !mine {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(secs);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        // Someone else updated it first: they won this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
