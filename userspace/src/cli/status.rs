//! `tapmesh status`: every plugin's state and the dataplane counters.

use std::fmt::Write as _;

use crate::admin::proto::{PluginState, StatusResponse};

/// "running", "failed", … from the wire enum.
pub fn state_name(state: i32) -> String {
    let state = PluginState::try_from(state).unwrap_or(PluginState::Unspecified);
    state
        .as_str_name()
        .trim_start_matches("PLUGIN_STATE_")
        .to_lowercase()
}

/// Renders the status as readable text; zero counters are left out.
pub fn render(status: &StatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "tapmesh {}", status.version);
    let _ = writeln!(out, "\nplugins:");
    for p in &status.plugins {
        let _ = writeln!(
            out,
            "  {:<12} {:<10} {}",
            p.name,
            state_name(p.state),
            p.detail
        );
    }
    if !status.control_planes.is_empty() {
        let _ = writeln!(out, "\ncontrol planes:");
    }
    for c in &status.control_planes {
        let state = match (c.connected, c.synced) {
            (_, true) => "synced",
            (true, false) => "connected",
            (false, false) => "down",
        };
        let _ = writeln!(out, "  {:<12} {:<10} {}", c.name, state, c.detail);
        if !c.last_ack.is_empty() {
            let _ = writeln!(out, "    last ack   {}", c.last_ack);
        }
        if !c.last_nack.is_empty() {
            let _ = writeln!(
                out,
                "    last nack  {}: {}",
                c.last_nack, c.last_nack_reason
            );
        }
        if !c.reload_error.is_empty() {
            let _ = writeln!(out, "    reload     {}", c.reload_error);
        }
    }
    if let Some(c) = &status.cluster {
        let etcd = if c.etcd_connected {
            "connected".to_string()
        } else {
            format!("unreachable: {}", c.etcd_error)
        };
        let _ = writeln!(out, "\ncluster:");
        let _ = writeln!(
            out,
            "  node {}, etcd {etcd}, revision {}, lease {:x}, bad values {}, re-lists {}",
            c.node, c.revision, c.lease, c.bad_values, c.relists
        );
        for n in &c.nodes {
            let _ = writeln!(
                out,
                "    {:<16} {:<5} {} targets",
                n.name, n.state, n.targets
            );
        }
    }
    let _ = writeln!(out, "\nattachments:");
    if status.attachments.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for a in &status.attachments {
        let mode = if a.mode.is_empty() {
            String::new()
        } else {
            format!(" ({})", a.mode)
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<11} {}{}",
            a.interface, a.hook, a.program, mode
        );
    }
    if !status.pin_directory.is_empty() {
        let _ = writeln!(out, "\npins: {}", status.pin_directory);
    }
    let _ = writeln!(out, "\ncounters (all CPUs):");
    for p in &status.programs {
        let _ = writeln!(out, "  {}", p.program);
        for v in &p.verdicts {
            let _ = writeln!(
                out,
                "    {:<10} {:>12} packets {:>14} bytes",
                v.name, v.packets, v.bytes
            );
        }
        let seen: Vec<String> = p
            .protocols
            .iter()
            .filter(|c| c.packets > 0)
            .map(|c| format!("{}={}", c.name, c.packets))
            .collect();
        if !seen.is_empty() {
            let _ = writeln!(out, "    protocols  {}", seen.join(" "));
        }
        let drops: Vec<String> = p
            .drops
            .iter()
            .filter(|c| c.packets > 0)
            .map(|c| format!("{}={}", c.name, c.packets))
            .collect();
        if !drops.is_empty() {
            let _ = writeln!(out, "    drops      {}", drops.join(" "));
        }
    }
    if !(status.vips.is_empty() && status.flows.is_empty() && status.targets.is_empty()) {
        let _ = writeln!(out, "\nload balancing:");
        super::lb::render_counters(&mut out, &status.vips, &status.flows, &status.targets);
    }
    out
}

/// `tapmesh status`.
pub async fn run(
    socket: std::path::PathBuf,
    raw: bool,
    output: super::json::Output,
) -> std::process::ExitCode {
    let mut client = match super::admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = client
        .status(crate::admin::proto::StatusRequest {})
        .await
        .map(|response| {
            let status = response.into_inner();
            if raw {
                format!("{status:#?}\n")
            } else {
                super::json::show(output, &status, render)
            }
        })
        .map_err(|e| tonic::Status::new(e.code(), format!("status: {}", e.message())));
    super::print_result(result)
}
