//! An xDS client for endpoint discovery: EDS
//! (`EndpointDiscoveryService`) or the same over ADS
//! (`AggregatedDiscoveryService`), Delta (incremental) when the server
//! implements it, else State of the World, subscribing to
//! an explicit list of clusters and handing each accepted
//! `ClusterLoadAssignment`, after gRPC A27 endpoint selection ([`select`]),
//! to an [`EndpointSink`] (the daemon's is the service catalog); and an EDS
//! server ([`server`]) serving what the catalog holds to Envoy proxies.
//!
//! Protocol behaviour (the xDS protocol rules):
//! * The first request of every stream carries the `Node` (id, cluster,
//!   user agent, client feature `envoy.lb.does_not_support_overprovisioning`),
//!   the cluster names, the type URL and the last accepted `version_info`
//!   (empty before the first one).
//! * A response is validated as a whole (resource type, decoding, duplicate
//!   names, [`select`]); when valid, every changed assignment is handed to the
//!   sink and only then is the response ACKed (`version_info` and `nonce` of
//!   the response). An invalid response, or a sink error, is NACKed: the
//!   previous accepted version, the response's nonce and `error_detail`
//!   (code INVALID_ARGUMENT, the reason as message). The sink is not called
//!   for an invalid response.
//! * A rejected (type, version) is logged once and NACKed at once; when the
//!   server sends it again, each further NACK waits longer (0.2 s doubling up
//!   to 5 s); a newer response replaces a waiting NACK.
//! * A response of another type is NACKed for that type, and the EDS
//!   request is sent again (last accepted version, last EDS nonce).
//! * An assignment without `cluster_name`, or listing an address:port twice,
//!   is invalid.
//! * A response repeating the nonce of the previous one on the stream is
//!   ignored (not answered).
//! * Clusters absent from a response keep their state (EDS responses may carry
//!   only the changed assignments, §1.4 rule 6); names we did not subscribe
//!   to are ignored.
//! * A subscribed cluster that has not arrived `missing_after` after [`run`]
//!   started is applied once as empty (no endpoints).
//! * When the stream fails the client reconnects with jittered, capped
//!   exponential backoff and resubscribes with the last accepted version;
//!   nothing is removed from the sink meanwhile.
//! * Delta ([`Protocol`]): `DeltaEndpoints` or `DeltaAggregatedResources`
//!   is tried first on every connection; an UNIMPLEMENTED answer before any
//!   response means State of the World on the same connection (`auto`), or a
//!   failed connection (`delta`). The first request subscribes the clusters
//!   and names the version of each one held (`initial_resource_versions`);
//!   a response carries changed assignments (resource name = `cluster_name`,
//!   each applied only when it differs from what the sink holds) and removed
//!   names (applied as empty); the ACK is the nonce alone, a NACK adds
//!   `error_detail`. A resource without a body (a TTL heartbeat) changes
//!   nothing; a name sent twice, or both sent and removed, is invalid.

mod client;
mod delta;
mod select;
pub mod server;
mod sotw;

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

pub use client::run;
pub use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
pub use select::{select, InvalidAssignment, MAX_PRIORITY};

/// `HealthStatus` values (envoy.config.core.v3).
pub use envoy_types::pb::envoy::config::core::v3::HealthStatus;
pub use server::{assignment, Assignments, EdsServer};
/// The stop signal [`run`] takes (re-exported for callers without tokio-util).
pub use tokio_util::sync::CancellationToken;

/// The type URL of EDS resources.
/// The largest response the client decodes. gRPC's usual 4 MiB is about
/// 130 000 IPv6 endpoints, which a control plane may send in one
/// assignment; Envoy's client sets no limit. Past this the stream fails
/// (a response that cannot be decoded cannot be NACKed).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
pub const EDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Client feature sent in the `Node`: we do not apply Envoy's overprovisioning.
pub const CLIENT_FEATURE_NO_OVERPROVISIONING: &str = "envoy.lb.does_not_support_overprovisioning";

/// Where and how to subscribe.
#[derive(Clone, Debug)]
pub struct XdsSettings {
    /// The management server, e.g. "http://127.0.0.1:18000".
    pub server: String,
    pub node_id: String,
    pub node_cluster: String,
    /// Cluster names (EDS service names) to subscribe to.
    pub clusters: Vec<String>,
    /// Use the aggregated service (ADS) instead of the EDS one.
    pub ads: bool,
    /// State of the World, Delta (incremental) xDS, or Delta when the server offers it.
    pub protocol: Protocol,
    /// A cluster that never arrives is applied as empty after this.
    pub missing_after: Duration,
    /// Cap of the reconnect backoff.
    pub max_backoff: Duration,
}

impl Default for XdsSettings {
    fn default() -> Self {
        XdsSettings {
            server: "http://127.0.0.1:18000".into(),
            node_id: String::new(),
            node_cluster: String::new(),
            clusters: Vec::new(),
            ads: false,
            protocol: Protocol::Auto,
            missing_after: Duration::from_secs(15),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Which xDS protocol variant the client speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Delta when the server implements it (the first call is not
    /// UNIMPLEMENTED), else State of the World on the same connection;
    /// tried again on every new connection.
    #[default]
    Auto,
    /// Delta only: a server without it is an error (retried with backoff).
    Delta,
    /// State of the World only.
    Sotw,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Auto => "auto",
            Protocol::Delta => "delta",
            Protocol::Sotw => "sotw",
        })
    }
}

/// `envoy.config.core.v3.Locality`.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.sub_zone)
    }
}

/// One endpoint chosen by [`select`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SelectedEndpoint {
    pub address: IpAddr,
    pub port: u16,
    /// Relative weight within the cluster (≥ 1): proportional to the
    /// endpoint's share of traffic, locality weight × endpoint weight / the
    /// locality's total endpoint weight, as the smallest exact integers.
    pub weight: u32,
    pub locality: Locality,
    pub priority: u32,
    /// `envoy.config.core.v3.HealthStatus` as received.
    pub health: i32,
}

/// An endpoint of the assignment that [`select`] did not choose: another
/// priority, a health that is not usable, or a locality A27 skips.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StandbyEndpoint {
    /// Its weight is its share within its priority when `usable`, else its
    /// own `load_balancing_weight`.
    pub endpoint: SelectedEndpoint,
    /// It would be used if its priority were chosen.
    pub usable: bool,
}

/// A drop category of `ClusterLoadAssignment.policy.drop_overloads`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DropOverload {
    pub category: String,
    /// `drop_percentage` in parts per million (0..=1_000_000).
    pub parts_per_million: u32,
}

/// A `ClusterLoadAssignment` after gRPC A27 endpoint selection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterEndpoints {
    pub cluster: String,
    /// Empty: the cluster has no usable backend (or does not exist).
    pub endpoints: Vec<SelectedEndpoint>,
    /// Every other endpoint of the assignment.
    pub standby: Vec<StandbyEndpoint>,
    pub drop_overloads: Vec<DropOverload>,
}

impl ClusterEndpoints {
    /// No backends (a cluster that never arrived).
    pub fn empty(cluster: &str) -> Self {
        ClusterEndpoints {
            cluster: cluster.into(),
            endpoints: Vec::new(),
            standby: Vec::new(),
            drop_overloads: Vec::new(),
        }
    }
}

/// Where accepted assignments go. Called before the ACK; an `Err` makes the
/// client NACK the response (`error_detail` = the message) and keep its last
/// accepted version.
#[async_trait::async_trait]
pub trait EndpointSink: Send + Sync {
    async fn apply(&self, update: ClusterEndpoints) -> Result<(), String>;

    /// What the sink holds when the client starts (kept from before a
    /// restart): a cluster of these is not applied as empty when the server
    /// does not send it within `missing_after`; it stays until the server
    /// sends it.
    async fn held(&self) -> Vec<ClusterEndpoints> {
        Vec::new()
    }

    /// The changed assignments of one response, as one change: an `Err`
    /// must leave none of them applied (the NACK says the previous version
    /// holds). By default one at a time, stopping at the first error.
    async fn apply_all(&self, updates: Vec<ClusterEndpoints>) -> Result<(), String> {
        for update in updates {
            self.apply(update).await?;
        }
        Ok(())
    }
}
