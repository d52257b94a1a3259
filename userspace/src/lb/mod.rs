//! VIP load balancing: flows, streams, Maglev.

pub mod checks;
pub mod flows;
pub mod maglev;
pub mod model;
pub mod persist;
pub mod port_nat;
pub mod service;
pub mod tables;
