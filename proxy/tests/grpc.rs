//! HTTP/2 and gRPC through the proxy with tonic on both ends: unary calls, a server stream that
//! delivers updates as they happen, a gRPC error carried in trailers, and many calls multiplexed
//! on one connection.

use std::time::Duration;

use mycel_proxy::config::Config;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_check_response::ServingStatus as Wire, health_client::HealthClient},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_trailers_and_multiplexing() {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("shop.Cart", ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let proxy = mycel_proxy::start(
        Config::parse(&format!(
            "admin: '127.0.0.1:0'\nlisteners:\n- {{name: grpc, address: '127.0.0.1:0', protocol: http, cluster: health}}\nclusters:\n- {{name: health, endpoints: ['{upstream}']}}\n"
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let front = proxy.listener("grpc").await.unwrap();
    let channel = Channel::from_shared(format!("http://{front}")).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel);

    // Unary.
    let r = client.check(HealthCheckRequest { service: "shop.Cart".into() }).await.unwrap();
    assert_eq!(r.into_inner().status, Wire::Serving as i32);

    // An error status travels in the trailers.
    let err = client.check(HealthCheckRequest { service: "no.Such".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // A server stream: updates arrive while the call stays open.
    let mut stream =
        client.watch(HealthCheckRequest { service: "shop.Cart".into() }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status, Wire::Serving as i32);
    reporter.set_service_status("shop.Cart", ServingStatus::NotServing).await;
    let second = tokio::time::timeout(Duration::from_secs(2), stream.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(
        second.status,
        Wire::NotServing as i32,
        "the update crossed the proxy while the stream was open"
    );

    // Many concurrent calls on the same HTTP/2 connection.
    let calls = (0..50).map(|_| {
        let mut c = client.clone();
        async move {
            c.check(HealthCheckRequest { service: "shop.Cart".into() }).await.map(|r| r.into_inner().status)
        }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|s| *s == Wire::NotServing as i32)), "{results:?}");
    drop(stream);
    proxy.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_the_proxy_answers_reaches_a_grpc_client_as_a_grpc_status() {
    // A cluster with no endpoints: the proxy's own 503, which a gRPC client reads as UNAVAILABLE.
    let proxy = mycel_proxy::start(
        Config::parse(
            "admin: '127.0.0.1:0'\nlisteners:\n- {name: grpc, address: '127.0.0.1:0', protocol: http, direction: outbound, cluster: none}\nclusters:\n- {name: none, endpoints: []}\n",
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let front = proxy.listener("grpc").await.unwrap();
    let channel = Channel::from_shared(format!("http://{front}")).unwrap().connect().await.unwrap();
    let err =
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no endpoints for cluster none"), "{err:?}");
    assert_eq!(
        err.metadata().get("x-mycel-error").and_then(|v| v.to_str().ok()),
        Some("UH no_healthy_upstream")
    );
    proxy.shutdown(Duration::from_secs(1)).await;
}
