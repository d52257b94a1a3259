//! Command-line front ends that talk to the daemon.

pub mod catalog;
pub mod lb;
pub mod mirror;
pub mod nsp;
pub mod status;
