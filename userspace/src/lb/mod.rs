//! VIP load balancing: flows, streams, Maglev.

pub mod flows;
pub mod maglev;
pub mod model;
pub mod service;
pub mod tables;
