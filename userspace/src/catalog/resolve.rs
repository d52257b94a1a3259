//! Backend addresses to LB targets: a backend on a directly connected
//! network with a resolved neighbour is a local target (its interface and
//! MAC); anything else cannot be reached from this node's XDP and is left
//! out. The neighbour resolver ([`crate::net::neigh`]) does one dump of the
//! routes and one of the neighbours per update, whatever the number of
//! backends, on a blocking socket off the async workers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::lb::model::{LbSpec, TargetVia};
use crate::net::neigh::Resolver;

type Resolved = BTreeMap<String, Result<(String, String), String>>;

fn format_mac(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// (interface, MAC) of each address, or why it cannot be a local target.
fn resolve_all(addresses: BTreeSet<String>) -> Result<Resolved, String> {
    let (parsed, bad): (Vec<_>, Vec<_>) = addresses
        .into_iter()
        .map(|a| {
            let ip = a.parse::<IpAddr>().ok();
            (a, ip)
        })
        .partition(|(_, ip)| ip.is_some());
    let ips: Vec<IpAddr> = parsed.iter().filter_map(|(_, ip)| *ip).collect();
    let found = Resolver::new()
        .and_then(|mut r| r.on_link(&ips))
        .map_err(|e| e.to_string())?;
    let mut out: Resolved = bad
        .into_iter()
        .map(|(text, _)| (text, Err("not an IP address".to_string())))
        .collect();
    for ((text, _), r) in parsed.into_iter().zip(found) {
        out.insert(text, r.map(|(name, mac)| (name, format_mac(mac))));
    }
    Ok(out)
}

/// Turns the placeholder targets (`Remote { node: <backend address> }`) into
/// local ones, dropping those that cannot be reached.
pub async fn targets(spec: &mut LbSpec) {
    let addresses: BTreeSet<String> = spec
        .targets
        .iter()
        .filter_map(|t| match &t.via {
            TargetVia::Remote { node } => Some(node.clone()),
            TargetVia::Local { .. } => None,
        })
        .collect();
    if addresses.is_empty() {
        return;
    }
    let wanted = addresses.clone();
    let resolved = tokio::task::spawn_blocking(move || resolve_all(wanted))
        .await
        .unwrap_or_else(|e| Err(format!("the resolver failed: {e}")));
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("backends cannot be resolved: {e}");
            addresses.into_iter().map(|a| (a, Err(e.clone()))).collect()
        }
    };
    spec.targets.retain_mut(|t| {
        let TargetVia::Remote { node } = &t.via else {
            return true;
        };
        match &resolved[node] {
            Ok((interface, mac)) => {
                t.via = TargetVia::Local {
                    interface: interface.clone(),
                    mac: mac.clone(),
                };
                true
            }
            Err(why) => {
                tracing::debug!(backend = %node, "left out: {why}");
                false
            }
        }
    });
}
