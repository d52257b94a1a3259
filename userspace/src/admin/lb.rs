//! The LB part of the admin API: wire messages to and from the model.

use tonic::Status;

use super::proto;
use crate::{
    dataplane::lb::{LbCounters, NamedCounter},
    lb::{
        flows::{FlowSpec, VipSpec},
        model::{LbSpec, StreamSpec, TargetSpec, TargetVia},
        service::LbServiceError,
    },
};

pub fn status_of(e: LbServiceError) -> Status {
    match e {
        LbServiceError::Invalid(e) => Status::invalid_argument(e.to_string()),
        e @ LbServiceError::NotFound { .. } => Status::not_found(e.to_string()),
        e @ (LbServiceError::OwnedElsewhere { .. }
        | LbServiceError::InUse { .. }
        | LbServiceError::RedirectTarget { .. }) => Status::failed_precondition(e.to_string()),
        e @ (LbServiceError::File { .. } | LbServiceError::UnworkableInterface { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        LbServiceError::Dataplane(crate::dataplane::DataplaneError::NotRunning) => {
            Status::unavailable("the dataplane is not running")
        }
        // The caller named an interface this node does not have.
        LbServiceError::Dataplane(e @ crate::dataplane::DataplaneError::Interface { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        // What this configuration asks of the node it cannot give.
        LbServiceError::Dataplane(e @ crate::dataplane::DataplaneError::Config(_)) => {
            Status::invalid_argument(e.to_string())
        }
        // The overlay holds the address.
        LbServiceError::Dataplane(e @ crate::dataplane::DataplaneError::Overlap(_)) => {
            Status::failed_precondition(e.to_string())
        }
        e @ LbServiceError::Dataplane(_) => Status::internal(e.to_string()),
    }
}

pub fn vip(v: proto::Vip) -> VipSpec {
    VipSpec {
        name: v.name,
        address: v.address,
    }
}

pub fn stream(s: proto::Stream) -> StreamSpec {
    StreamSpec {
        name: s.name,
        max_targets: s.max_targets,
        table_size: (s.table_size != 0).then_some(s.table_size),
        port_nats: Vec::new(),
    }
}

pub fn flow(f: proto::Flow) -> FlowSpec {
    FlowSpec {
        name: f.name,
        source_subnets: f.source_subnets,
        destination_port_ranges: f.destination_port_ranges,
        source_port_ranges: f.source_port_ranges,
        protocols: f.protocols,
        priority: f.priority,
        stream: f.stream,
        vips: f.vips,
        byte_matches: f.byte_matches,
    }
}

pub fn target(t: proto::Target) -> Result<TargetSpec, Status> {
    let via = match t.via {
        Some(proto::target::Via::Local(l)) => TargetVia::Local {
            interface: l.interface,
            mac: l.mac,
        },
        Some(proto::target::Via::Remote(r)) => TargetVia::Remote { node: r.node },
        None => {
            return Err(Status::invalid_argument(format!(
                "target {} of stream {:?}: say how to reach it (local or remote)",
                t.identifier, t.stream
            )))
        }
    };
    Ok(TargetSpec {
        stream: t.stream,
        identifier: t.identifier,
        via,
    })
}

pub fn spec(c: proto::LbConfig) -> Result<LbSpec, Status> {
    Ok(LbSpec {
        vips: c.vips.into_iter().map(vip).collect(),
        streams: c.streams.into_iter().map(stream).collect(),
        flows: c.flows.into_iter().map(flow).collect(),
        targets: c
            .targets
            .into_iter()
            .map(target)
            .collect::<Result<_, _>>()?,
    })
}

pub fn config(s: LbSpec) -> proto::LbConfig {
    proto::LbConfig {
        vips: s
            .vips
            .into_iter()
            .map(|v| proto::Vip {
                name: v.name,
                address: v.address,
            })
            .collect(),
        streams: s
            .streams
            .into_iter()
            .map(|s| proto::Stream {
                name: s.name,
                max_targets: s.max_targets,
                table_size: s.table_size.unwrap_or(0),
            })
            .collect(),
        flows: s
            .flows
            .into_iter()
            .map(|f| proto::Flow {
                name: f.name,
                source_subnets: f.source_subnets,
                destination_port_ranges: f.destination_port_ranges,
                source_port_ranges: f.source_port_ranges,
                protocols: f.protocols,
                priority: f.priority,
                stream: f.stream,
                vips: f.vips,
                byte_matches: f.byte_matches,
            })
            .collect(),
        targets: s
            .targets
            .into_iter()
            .map(|t| proto::Target {
                stream: t.stream,
                identifier: t.identifier,
                via: Some(match t.via {
                    TargetVia::Local { interface, mac } => {
                        proto::target::Via::Local(proto::LocalTarget { interface, mac })
                    }
                    TargetVia::Remote { node } => {
                        proto::target::Via::Remote(proto::RemoteTarget { node })
                    }
                }),
            })
            .collect(),
    }
}

pub fn counts(list: Vec<NamedCounter>) -> Vec<proto::Count> {
    list.into_iter()
        .map(|c| proto::Count {
            name: c.name,
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect()
}

pub fn counters(c: LbCounters) -> (Vec<proto::Count>, Vec<proto::Count>, Vec<proto::Count>) {
    (counts(c.vips), counts(c.flows), counts(c.targets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::DataplaneError;

    /// The CLI exits 2 for the caller's own mistakes (INVALID_ARGUMENT,
    /// FAILED_PRECONDITION…); a daemon whose dataplane is down is not one.
    #[test]
    fn a_dataplane_that_is_not_running_is_unavailable_not_the_callers_mistake() {
        let status = status_of(LbServiceError::Dataplane(DataplaneError::NotRunning));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let status = status_of(LbServiceError::Dataplane(DataplaneError::Overlap(
            "x".into(),
        )));
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    }
}
