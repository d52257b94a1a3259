//! Admin calls for tap services and tap flows: proto ↔ model.

use tonic::Status;

use super::proto;
use crate::mirror::model::{Destination, Direction, MirrorError, RingSpec, TapFlow, TapService};
use crate::mirror::service::{FlowListing, ServiceListing};

pub fn status_of(e: MirrorError) -> Status {
    let message = e.to_string();
    match e {
        MirrorError::NotFound { .. } => Status::not_found(message),
        // An interface this node does not have is refused (the CLI exits
        // 2, as for `lb apply`); "not found" is for tap objects.
        MirrorError::NoInterface(_) => Status::invalid_argument(message),
        MirrorError::Exists { .. } => Status::already_exists(message),
        MirrorError::Dataplane(_) => Status::internal(message),
        MirrorError::PluggedBySpp { .. } => Status::failed_precondition(message),
        _ => Status::invalid_argument(message),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

pub fn service(p: proto::TapService) -> Result<TapService, MirrorError> {
    let destination = match p.destination {
        Some(proto::tap_service::Destination::Interface(i)) => Destination::Interface(i),
        Some(proto::tap_service::Destination::Ring(r)) => Destination::Ring(RingSpec {
            pcap: non_empty(r.pcap),
            forward: non_empty(r.forward),
        }),
        None => {
            return Err(MirrorError::Invalid(
                "a tap service needs a destination: an interface or a ring".into(),
            ))
        }
    };
    Ok(TapService {
        name: if p.name.is_empty() {
            p.id.clone()
        } else {
            p.name
        },
        id: p.id,
        destination,
    })
}

pub fn flow(p: proto::TapFlow) -> Result<TapFlow, MirrorError> {
    Ok(TapFlow {
        name: if p.name.is_empty() {
            p.id.clone()
        } else {
            p.name
        },
        id: p.id,
        tap_service: p.tap_service,
        source: p.source,
        direction: Direction::parse(&p.direction)?,
        vlan_filter: non_empty(p.vlan_filter),
    })
}

fn status_name(s: crate::mirror::model::Status) -> String {
    match s {
        crate::mirror::model::Status::Down => "DOWN",
        crate::mirror::model::Status::Active => "ACTIVE",
        crate::mirror::model::Status::Error => "ERROR",
    }
    .into()
}

pub fn listing(services: Vec<ServiceListing>, flows: Vec<FlowListing>) -> proto::TapListing {
    let ring_drops: std::collections::HashMap<String, u64> = services
        .iter()
        .filter_map(|s| Some((s.spec.id.clone(), s.ring.as_ref()?.drops())))
        .collect();
    proto::TapListing {
        services: services
            .into_iter()
            .map(|s| proto::TapService {
                id: s.spec.id,
                name: s.spec.name,
                destination: Some(match s.spec.destination {
                    Destination::Interface(i) => proto::tap_service::Destination::Interface(i),
                    Destination::Ring(r) => proto::tap_service::Destination::Ring(proto::Ring {
                        pcap: r.pcap.unwrap_or_default(),
                        forward: r.forward.unwrap_or_default(),
                    }),
                }),
                status: status_name(s.status),
                error: s.error,
                ring_counters: s.ring.map(|r| proto::RingCounters {
                    received: r.received,
                    socket_dropped: r.socket_dropped,
                    ring_full: r.ring_full,
                    consumers: r
                        .consumers
                        .into_iter()
                        .map(|c| proto::ConsumerCounters {
                            name: c.name,
                            delivered: c.delivered,
                            lost: c.lost,
                        })
                        .collect(),
                }),
            })
            .collect(),
        flows: flows
            .into_iter()
            .map(|f| proto::TapFlow {
                ring_drops: ring_drops.get(&f.state.spec.tap_service).copied(),
                id: f.state.spec.id,
                name: f.state.spec.name,
                tap_service: f.state.spec.tap_service,
                source: f.state.spec.source,
                direction: f.state.spec.direction.as_str().into(),
                vlan_filter: f.state.spec.vlan_filter.unwrap_or_default(),
                status: status_name(f.state.status),
                error: f.state.error,
                mirrored_packets: f.packets,
                mirrored_bytes: f.bytes,
                failed: f.failed,
            })
            .collect(),
    }
}
