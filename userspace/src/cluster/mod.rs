//! Cluster mode on etcd: every node publishes its node record and its
//! registry's targets under its lease and watches everyone else's, so each
//! node's LB maps hold every ENABLED target of its trenches (other nodes'
//! through the tunnel) and identifiers stay unique per stream cluster-wide.

pub mod agent;
pub mod plugin;
pub mod record;
pub mod view;

pub use plugin::{status, ClusterPlugin, NodeState};
