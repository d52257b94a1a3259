//! tapmesh: a node dataplane in XDP and TC, driven by a plugin daemon.

pub mod admin;
pub mod ambassador;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod nsp;
pub mod overlay;
pub mod proto;
pub mod statefile;
pub mod uds;
pub mod xds;
