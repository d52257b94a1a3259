//! Delta (incremental) xDS: a response carries only the assignments that
//! changed, each with its own version, and the names of removed ones; the
//! ACK is the response's nonce alone. On a new stream the client names the
//! versions it holds (`initial_resource_versions`), so the server sends only
//! what changed meanwhile.

use std::collections::HashSet;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
use futures::future::BoxFuture;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use super::client::{nack_status, Client, Reply, Variant};
use super::{ClusterEndpoints, EDS_TYPE_URL};

pub(super) struct Delta;

/// What an accepted response changes.
struct Changes {
    /// Updated assignments with their resource versions.
    updated: Vec<(ClusterEndpoints, String)>,
    /// Subscribed clusters the server removed.
    removed: Vec<String>,
}

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn first(client: &Client) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(client.node.clone()),
            type_url: EDS_TYPE_URL.into(),
            resource_names_subscribe: client.settings.clusters.clone(),
            initial_resource_versions: client.versions.clone(),
            ..Default::default()
        }
    }

    fn nonce(response: &DeltaDiscoveryResponse) -> &str {
        &response.nonce
    }

    fn call(
        channel: Channel,
        ads: bool,
        outbound: ReceiverStream<DeltaDiscoveryRequest>,
    ) -> BoxFuture<'static, Result<tonic::Response<Streaming<DeltaDiscoveryResponse>>, tonic::Status>>
    {
        if ads {
            Box::pin(async move {
                AggregatedDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(super::MAX_RESPONSE_BYTES)
                    .delta_aggregated_resources(outbound)
                    .await
            })
        } else {
            Box::pin(async move {
                EndpointDiscoveryServiceClient::new(channel)
                    .max_decoding_message_size(super::MAX_RESPONSE_BYTES)
                    .delta_endpoints(outbound)
                    .await
            })
        }
    }

    async fn handle(
        client: &mut Client,
        response: DeltaDiscoveryResponse,
    ) -> Vec<Reply<DeltaDiscoveryRequest>> {
        let version = version_of(&response);
        if response.type_url != EDS_TYPE_URL {
            let reason = format!(
                "unexpected resource type {:?} (subscribed to {EDS_TYPE_URL})",
                response.type_url
            );
            return vec![nack(client, &response, &version, reason)];
        }
        for error in &response.resource_errors {
            let name = error.resource_name.as_ref().map_or("", |n| n.name.as_str());
            let detail = error
                .error_detail
                .as_ref()
                .map_or("", |s| s.message.as_str());
            tracing::warn!(resource = %name, "the server reports an error: {detail}");
        }
        let changes = match decode(client, &response) {
            Ok(changes) => changes,
            Err(reason) => return vec![nack(client, &response, &version, reason)],
        };
        let mut updates: Vec<ClusterEndpoints> = Vec::new();
        for name in &changes.removed {
            tracing::info!(cluster = %name, %version, "the server removed the cluster");
            updates.push(ClusterEndpoints::empty(name));
        }
        let versions: Vec<(String, String)> = changes
            .updated
            .iter()
            .map(|(u, v)| (u.cluster.clone(), v.clone()))
            .collect();
        updates.extend(changes.updated.into_iter().map(|(u, _)| u));
        if let Err(reason) = client.apply_all(updates, &version).await {
            return vec![nack(client, &response, &version, reason)];
        }
        for name in &changes.removed {
            client.versions.remove(name);
        }
        client.versions.extend(versions);
        // A later SotW stream must not claim a version this content replaced.
        client.version.clear();
        client.rejected = None;
        client.report_synced(Some(&version));
        tracing::debug!(%version, nonce = %response.nonce, "ACK");
        vec![Reply {
            delay: Duration::ZERO,
            request: DeltaDiscoveryRequest {
                type_url: EDS_TYPE_URL.into(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            },
        }]
    }
}

/// What identifies a response's content for logs and repeated rejections:
/// `system_version_info`, else the resources' versions.
fn version_of(response: &DeltaDiscoveryResponse) -> String {
    if !response.system_version_info.is_empty() {
        return response.system_version_info.clone();
    }
    let mut parts: Vec<String> = response
        .resources
        .iter()
        .map(|r| format!("{}@{}", r.name, r.version))
        .chain(response.removed_resources.iter().map(|n| format!("-{n}")))
        .collect();
    parts.sort();
    parts.join(",")
}

fn nack(
    client: &mut Client,
    response: &DeltaDiscoveryResponse,
    version: &str,
    reason: String,
) -> Reply<DeltaDiscoveryRequest> {
    let delay = client.rejection(&response.type_url, version, &response.nonce, &reason);
    Reply {
        delay,
        request: DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(nack_status(reason)),
            ..Default::default()
        },
    }
}

/// The changes of a response, or why it is rejected as a whole. A resource
/// without a body is a TTL heartbeat and changes nothing (TTLs themselves
/// are not tracked: a resource stays until the server removes it).
fn decode(client: &Client, response: &DeltaDiscoveryResponse) -> Result<Changes, String> {
    let mut names = HashSet::new();
    let mut updated = Vec::new();
    for (i, resource) in response.resources.iter().enumerate() {
        if resource.name.is_empty() {
            return Err(format!("resources[{i}]: the resource has no name"));
        }
        if !names.insert(resource.name.as_str()) {
            return Err(format!("resource {:?} appears twice", resource.name));
        }
        let Some(any) = &resource.resource else {
            continue;
        };
        let (cluster, update) = client.decode_one(i, any)?;
        if cluster != resource.name {
            return Err(format!(
                "resource {:?} holds the ClusterLoadAssignment of {cluster:?}",
                resource.name
            ));
        }
        updated.extend(update.map(|u| (u, resource.version.clone())));
    }
    let mut removed = Vec::new();
    let removed_names = response
        .removed_resources
        .iter()
        .chain(response.removed_resource_names.iter().map(|n| &n.name));
    for name in removed_names {
        if names.contains(name.as_str()) {
            return Err(format!("resource {name:?} is both sent and removed"));
        }
        if client.subscribed(name) && !removed.contains(name) {
            removed.push(name.clone());
        }
    }
    Ok(Changes { updated, removed })
}
