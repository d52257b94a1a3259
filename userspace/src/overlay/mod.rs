//! Oakestra's NetManager with ProxyTUN moved into the kernel: the REST API,
//! container networking (veth, addresses, routes), the service tables and
//! the miss reports of the service-IP overlay.

pub mod api;
pub mod cluster;
pub mod egress;
pub mod held;
pub mod ipam;
pub mod manager;
pub mod model;
pub mod plugin;
pub mod ports;
pub mod tables;

pub use plugin::{ManagerObserver, NetManagerPlugin};
