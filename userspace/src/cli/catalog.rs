//! `tapmesh catalog list` output.

use std::fmt::Write;

use crate::admin::proto::CatalogListing;

pub fn render(l: &CatalogListing) -> String {
    let mut out = String::new();
    if l.services.is_empty() {
        return "(no services)\n".into();
    }
    for s in &l.services {
        let _ = writeln!(out, "{} (from {}) vip {}", s.name, s.source, s.vip);
        for b in &s.backends {
            if s.source == "eds" {
                let held = match (b.slots, b.note.is_empty()) {
                    (n, true) => format!("slots {n}"),
                    (0, false) => b.note.clone(),
                    (n, false) => format!("slots {n} {}", b.note),
                };
                let _ = writeln!(
                    out,
                    "  {}:{} weight {} priority {} {held}{}",
                    b.address,
                    b.port,
                    b.weight,
                    b.priority,
                    if b.locality.is_empty() {
                        String::new()
                    } else {
                        format!(" locality {}", b.locality)
                    }
                );
            } else if s.source == "netmanager" {
                let _ = writeln!(out, "  {} weight {} at {}", b.address, b.weight, b.locality);
            } else {
                let _ = writeln!(out, "  {}", b.note);
            }
        }
    }
    out
}

/// `tapmesh catalog list`.
pub async fn list(
    socket: std::path::PathBuf,
    output: super::json::Output,
) -> std::process::ExitCode {
    let mut client = match super::admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = client
        .list_catalog(crate::admin::proto::ListCatalogRequest {})
        .await
        .map(|r| super::json::show(output, &r.into_inner(), render));
    super::print_result(result)
}
