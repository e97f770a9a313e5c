//! The generated code carries the protocol over a real HTTP/2 connection: a subscribe, a
//! response with a nonce, and the proxy's acknowledgement and rejection of it.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use mycel_api::v1alpha1::{
    Cluster, DeltaRequest, DeltaResponse, Endpoint, Node, RejectReason, Resource,
    config_discovery_client::ConfigDiscoveryClient,
    config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer},
    resource::Kind,
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

/// A control plane that answers each subscription with one cluster, and reports every ACK or
/// NACK it receives on `seen`.
struct Fake {
    seen: mpsc::UnboundedSender<DeltaRequest>,
}

#[tonic::async_trait]
impl ConfigDiscovery for Fake {
    type StreamStream = Pin<Box<dyn Stream<Item = Result<DeltaResponse, Status>> + Send>>;

    async fn stream(
        &self,
        req: Request<Streaming<DeltaRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut incoming = req.into_inner();
        let seen = self.seen.clone();
        let out = async_stream(move |tx| async move {
            let mut n = 0;
            while let Some(Ok(r)) = incoming.next().await {
                let subscribing = !r.subscribe.is_empty();
                let _ = seen.send(r);
                if subscribing {
                    n += 1;
                    let resp = DeltaResponse {
                        type_url: mycel_api::CLUSTER_TYPE.into(),
                        system_version: format!("v{n}"),
                        nonce: format!("nonce-{n}"),
                        resources: vec![Resource {
                            name: "reviews.shop:9080".into(),
                            version: format!("{n}"),
                            kind: Some(Kind::Cluster(Cluster {
                                name: "reviews.shop:9080".into(),
                                endpoints: vec![Endpoint {
                                    address: "10.200.0.12:9080".into(),
                                    identity: "spiffe://cluster.local/ns/shop/sa/reviews".into(),
                                    ready: true,
                                    ..Default::default()
                                }],
                                mesh_tls: true,
                                ..Default::default()
                            })),
                        }],
                        removed: vec![],
                        partial: false,
                    };
                    if tx.send(Ok(resp)).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<DeltaResponse, Status>>
where
    F: FnOnce(mpsc::UnboundedSender<Result<DeltaResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(f(tx));
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
}

#[tokio::test]
async fn subscribe_receive_acknowledge_and_reject() {
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ConfigDiscoveryServer::new(Fake { seen: seen_tx }))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = ConfigDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(DeltaRequest {
        node: Some(Node {
            pod: "productpage-1".into(),
            namespace: "shop".into(),
            service_account: "productpage".into(),
            ..Default::default()
        }),
        type_url: mycel_api::CLUSTER_TYPE.into(),
        subscribe: vec!["*".into()],
        ..Default::default()
    })
    .unwrap();
    let mut responses =
        client.stream(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = responses.next().await.unwrap().unwrap();
    assert_eq!(first.nonce, "nonce-1");
    let Some(Kind::Cluster(c)) = &first.resources[0].kind else { panic!("a cluster") };
    assert_eq!(c.endpoints[0].identity, "spiffe://cluster.local/ns/shop/sa/reviews");
    // ACK, then a NACK naming the field.
    tx.send(DeltaRequest {
        type_url: mycel_api::CLUSTER_TYPE.into(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .unwrap();
    tx.send(DeltaRequest {
        type_url: mycel_api::CLUSTER_TYPE.into(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(RejectReason {
            field: "clusters[reviews.shop:9080].endpoints[0]".into(),
            message: "bad address".into(),
        }),
        ..Default::default()
    })
    .unwrap();
    let subscribe = seen.recv().await.unwrap();
    assert_eq!(subscribe.node.unwrap().pod, "productpage-1");
    let ack = seen.recv().await.unwrap();
    assert!(ack.error_detail.is_none() && ack.response_nonce == "nonce-1");
    let nack = seen.recv().await.unwrap();
    assert_eq!(nack.error_detail.unwrap().field, "clusters[reviews.shop:9080].endpoints[0]");
}
