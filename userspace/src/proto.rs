//! Generated gRPC code for the wire-compatible Meridio APIs and the node API.

/// Meridio's NSP: model, target registry, configuration manager.
pub mod nsp {
    tonic::include_proto!("nsp.v1");
}

/// Meridio's TAPA API.
pub mod ambassador {
    tonic::include_proto!("ambassador.v1");
}

/// What an ambassador asks of its node daemon.
pub mod node {
    tonic::include_proto!("tapmesh.node.v1");
}
