//! Global limits: the request's hits ([`super::ratelimit::Hit`]) are counted by the mesh's
//! rate-limit service (`mycel-ratelimit`), one counter per key shared by every proxy of the
//! policy. The proxy asks once per request, over one HTTP/2 connection of mutual TLS with its
//! workload certificate (the service must prove the identity the control plane names); a
//! decision that does not come within the service's timeout, or an error, applies each
//! limit's failure mode: Open admits, Closed refuses with 503.

use std::{sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use mycel_api::v1alpha1 as pb;
use pb::rate_limits_client::RateLimitsClient;
use tonic::transport::{Channel, Endpoint};

use super::ratelimit::Hit;
use crate::{
    config::ratelimit::{Service, Window},
    tls::mtls::{Dialed, Inner, MeshTls},
};

/// A client of one rate-limit service (replaced when the control plane names another).
pub struct Client {
    pub service: Service,
    grpc: RateLimitsClient<Channel>,
}

impl Client {
    /// A client that connects on first use, and again after a failure.
    pub fn new(service: &Service, mesh: Arc<MeshTls>) -> Result<Client, String> {
        let timeout = Duration::from_millis(service.timeout_ms);
        let (address, identity) = (service.address.clone(), service.identity.clone());
        let connector = tower::service_fn(move |_: http::Uri| {
            let (mesh, address, identity) = (mesh.clone(), address.clone(), identity.clone());
            async move {
                let addr = tokio::time::timeout(timeout, tokio::net::lookup_host(&address))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "resolving timed out"))??
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("{address} resolves to no address")))?;
                match mesh.dial(addr, timeout, Inner::Http2, Some(&identity)).await? {
                    Dialed::Tls(tls) => Ok::<_, std::io::Error>(TokioIo::new(*tls)),
                    Dialed::Plain(_) => Err(std::io::Error::other("the rate-limit service needs mutual TLS")),
                }
            }
        });
        let channel = Endpoint::from_shared(format!("http://{}", service.address))
            .map_err(|e| format!("rateLimitService.address: {e}"))?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_with_connector_lazy(connector);
        Ok(Client { service: service.clone(), grpc: RateLimitsClient::new(channel) })
    }

    /// The service's verdicts on `hits`, in order; `Err` when it cannot decide in time.
    pub async fn check(&self, hits: &[Hit]) -> Result<Vec<pb::Verdict>, String> {
        let request = pb::CheckRequest { hits: hits.iter().map(hit).collect() };
        let verdicts = self.ask(request).await.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        if verdicts.len() != hits.len() {
            return Err(format!("{} verdicts for {} hits", verdicts.len(), hits.len()));
        }
        Ok(verdicts)
    }

    /// One `Check` call as it is, within the service's timeout (then `DeadlineExceeded`).
    pub async fn ask(&self, request: pb::CheckRequest) -> Result<Vec<pb::Verdict>, tonic::Status> {
        let timeout = Duration::from_millis(self.service.timeout_ms);
        let mut grpc = self.grpc.clone();
        let mut req = tonic::Request::new(request);
        req.set_timeout(timeout);
        let resp = tokio::time::timeout(timeout, grpc.check(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded(format!("no decision within {timeout:?}")))??;
        Ok(resp.into_inner().verdicts)
    }
}

/// A hit as the service is asked it.
fn hit(h: &Hit) -> pb::Hit {
    let c = &h.limit.config;
    let g = c.global.as_ref();
    pb::Hit {
        policy: c.policy.clone(),
        limit: c.name.clone(),
        key: key(&h.key),
        requests: h.rate.requests,
        per_seconds: h.rate.per_seconds,
        burst: h.rate.burst(),
        window: match g.and_then(|g| g.window) {
            None => pb::QuotaWindow::None,
            Some(Window::Hour) => pb::QuotaWindow::Hour,
            Some(Window::Day) => pb::QuotaWindow::Day,
            Some(Window::Month) => pb::QuotaWindow::Month,
        } as i32,
        time_zone: g.and_then(|g| g.time_zone.clone()).unwrap_or_default(),
        shadow: c.shadow,
    }
}

pub use mycel_api::ratelimit::{MAX_KEY_AS_IS, counter_key as key};
