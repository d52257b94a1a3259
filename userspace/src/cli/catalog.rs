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
                // An IPv6 address in brackets, as in a socket address.
                let address = match b.address.parse::<std::net::IpAddr>() {
                    Ok(ip) => std::net::SocketAddr::new(ip, b.port as u16).to_string(),
                    Err(_) => format!("{}:{}", b.address, b.port),
                };
                let _ = writeln!(
                    out,
                    "  {address} weight {} priority {} {held}{}",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::proto::{CatalogBackend, CatalogService};

    #[test]
    fn an_ipv6_backend_is_written_in_brackets() {
        let backend = |address: &str| CatalogBackend {
            address: address.into(),
            port: 7000,
            weight: 1,
            slots: 1,
            ..Default::default()
        };
        let listing = CatalogListing {
            services: vec![CatalogService {
                name: "web".into(),
                source: "eds".into(),
                vip: "203.0.113.20".into(),
                backends: vec![
                    backend("2001:db8:9::1"),
                    backend("::ffff:192.0.2.6"),
                    backend("192.0.2.7"),
                ],
            }],
        };
        let text = render(&listing);
        assert!(text.contains("  [2001:db8:9::1]:7000 weight 1"), "{text}");
        assert!(
            text.contains("  [::ffff:192.0.2.6]:7000 weight 1"),
            "{text}"
        );
        assert!(text.contains("  192.0.2.7:7000 weight 1"), "{text}");
    }
}
