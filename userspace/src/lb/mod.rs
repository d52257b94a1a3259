//! VIP load balancing: flows, streams, Maglev.

pub mod maglev;
