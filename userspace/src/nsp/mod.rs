//! Meridio's NSP on the node: the operator's configuration (trenches,
//! conduits, streams, flows, VIPs), the target registry with keep-alive, and
//! conduit connections for ambassadors; registered targets become LB targets.

pub mod conduits;
pub mod config;
pub mod plugin;
pub mod registry;
pub mod server;
pub mod state;

pub use plugin::NspPlugin;
