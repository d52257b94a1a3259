//! Port mirroring (tap-as-a-service): tap services and tap flows, kernel
//! copies in TC, AF_XDP mirror rings with userspace consumers, and the
//! networking-spp etcd contract.

pub mod model;
pub mod pcap;
pub mod plugin;
pub mod ring;
pub mod service;
pub mod spp;
pub mod tables;

pub use plugin::MirrorPlugin;
pub use service::MirrorService;
