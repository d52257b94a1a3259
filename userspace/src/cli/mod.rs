//! Command-line front ends that talk to the daemon.

pub mod status;
