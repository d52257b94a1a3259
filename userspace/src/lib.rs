//! tapmesh: a node dataplane in XDP and TC, driven by a plugin daemon.

/// The version and the commit it was built from, as `--version` and `status` show it.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TAPMESH_GIT_COMMIT"),
    ")"
);

pub mod admin;
pub mod ambassador;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod core;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod lb;
pub mod metrics;
pub mod mirror;
pub mod names;
pub mod net;
pub mod nsp;
pub mod overlay;
pub mod preflight;
pub mod proto;
pub mod repeats;
pub mod statefile;
pub mod uds;
pub mod xds;

/// An error and its sources on one line: some say only "transport error" or
/// "`bpf_link_create` failed" at the top, and the cause is below.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The old path of the flow model, for code not moved yet (use `lb::flows`).
#[doc(hidden)]
pub use lb::flows;

#[cfg(test)]
mod structure;
