//! State of the World: every response carries the subscribed assignments
//! (or the changed ones), ACKed with the response's `version_info`.

use std::collections::HashSet;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use futures::future::BoxFuture;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use super::client::{nack_status, Client, Reply, Variant};
use super::{ClusterEndpoints, EDS_TYPE_URL};

pub(super) struct Sotw;

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn first(client: &Client) -> DiscoveryRequest {
        request(client, "", true)
    }

    fn nonce(response: &DiscoveryResponse) -> &str {
        &response.nonce
    }

    fn call(
        channel: Channel,
        ads: bool,
        outbound: ReceiverStream<DiscoveryRequest>,
    ) -> BoxFuture<'static, Result<tonic::Response<Streaming<DiscoveryResponse>>, tonic::Status>>
    {
        if ads {
            Box::pin(async move {
                AggregatedDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(super::MAX_RESPONSE_BYTES)
                    .stream_aggregated_resources(outbound)
                    .await
            })
        } else {
            Box::pin(async move {
                EndpointDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(super::MAX_RESPONSE_BYTES)
                    .stream_endpoints(outbound)
                    .await
            })
        }
    }

    /// Returns the ACK or NACK (and, after a response of another type, the
    /// EDS request again, so the subscription does not wait for a reconnect).
    async fn handle(
        client: &mut Client,
        response: DiscoveryResponse,
    ) -> Vec<Reply<DiscoveryRequest>> {
        if response.type_url != EDS_TYPE_URL {
            let reason = format!(
                "unexpected resource type {:?} (subscribed to {EDS_TYPE_URL})",
                response.type_url
            );
            let delay = client.rejection(
                &response.type_url,
                &response.version_info,
                &response.nonce,
                &reason,
            );
            let nack = DiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: Some(nack_status(reason)),
                ..Default::default()
            };
            // The last EDS reply again, a NACK if it was one: the same
            // version and nonce without the error would read as an ACK.
            let again = client
                .eds_reply
                .clone()
                .unwrap_or_else(|| request(client, &client.eds_nonce, false));
            return vec![
                Reply {
                    delay,
                    request: nack,
                },
                Reply {
                    delay,
                    request: again,
                },
            ];
        }
        client.eds_nonce = response.nonce.clone();
        let updates = match decode(client, &response) {
            Ok(updates) => updates,
            Err(reason) => return vec![eds_nack(client, &response, reason)],
        };
        if let Err(reason) = client.apply_all(updates, &response.version_info).await {
            return vec![eds_nack(client, &response, reason)];
        }
        client.version = response.version_info.clone();
        // A later Delta stream must not claim versions this content replaced.
        client.versions.clear();
        client.rejected = None;
        client.report_synced(Some(&response.version_info));
        tracing::debug!(version = %client.version, nonce = %response.nonce, "ACK");
        let ack = request(client, &response.nonce, false);
        client.eds_reply = Some(ack.clone());
        vec![Reply {
            delay: Duration::ZERO,
            request: ack,
        }]
    }
}

/// [`nack`] of an EDS response, kept as the last EDS reply.
fn eds_nack(
    client: &mut Client,
    response: &DiscoveryResponse,
    reason: String,
) -> Reply<DiscoveryRequest> {
    let reply = nack(client, response, reason);
    client.eds_reply = Some(reply.request.clone());
    reply
}

fn request(client: &Client, nonce: &str, node: bool) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: client.version.clone(),
        node: node.then(|| client.node.clone()),
        resource_names: client.settings.clusters.clone(),
        type_url: EDS_TYPE_URL.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// The NACK of `response`: the last accepted version, its nonce, the reason.
fn nack(
    client: &mut Client,
    response: &DiscoveryResponse,
    reason: String,
) -> Reply<DiscoveryRequest> {
    let delay = client.rejection(
        &response.type_url,
        &response.version_info,
        &response.nonce,
        &reason,
    );
    Reply {
        delay,
        request: DiscoveryRequest {
            error_detail: Some(nack_status(reason)),
            ..request(client, &response.nonce, false)
        },
    }
}

/// The selected assignments of a response, or why it is rejected.
fn decode(client: &Client, response: &DiscoveryResponse) -> Result<Vec<ClusterEndpoints>, String> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, any) in response.resources.iter().enumerate() {
        let (name, update) = client.decode_one(i, any)?;
        if !names.insert(name.clone()) {
            return Err(format!("ClusterLoadAssignment {name:?} appears twice"));
        }
        out.extend(update);
    }
    Ok(out)
}
