//! Backend addresses to LB targets: a backend on a directly connected
//! network with a resolved neighbour is a local target (its interface and
//! MAC); else a backend inside prefixes another node of the cluster
//! publishes is a remote target through the tunnel to that node (the
//! longest prefix wins, this node's own prefixes included; two nodes tied:
//! neither); anything else cannot be reached from this node's XDP and is
//! left out. The neighbour resolver ([`crate::net::neigh`]) does one dump of the
//! routes per update, whatever the number of backends, and reads the
//! neighbours from the daemon's kept table ([`crate::net::neigh_table`]), on
//! a blocking socket off the async workers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use crate::lb::model::{LbSpec, TargetVia};
use std::sync::Mutex;

use crate::net::neigh::{OnLinkCache, Resolver};
use crate::net::{mac_text, Prefix};

/// A node of the cluster: where its tunnel ends and the prefixes
/// (conduits, containers, pods) whose addresses it serves. The list holds
/// this node too (`this`): an address its own prefixes claim as well as
/// another node's is not sent away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    pub name: String,
    pub tunnel: Ipv4Addr,
    pub prefixes: Vec<Prefix>,
    pub this: bool,
}

/// The one node serving `address`: the longest of the nodes' prefixes that
/// holds it; none when two nodes publish that prefix length (a node mid-move
/// would otherwise take traffic the other one serves).
/// Asks the kernel to resolve each backend on a directly connected
/// network whose neighbour is missing or failed, once, as a packet for it
/// would ([`crate::net::neigh::solicit`]): nothing else would ask (XDP
/// cannot hand the kernel a packet to resolve, and this node may never
/// have sent the backend one). At most [`ASK_AT_ONCE`] addresses a call.
/// Blocking.
pub fn ask_neighbours(addresses: &[IpAddr]) {
    let addresses = &addresses[..addresses.len().min(ASK_AT_ONCE)];
    let hops = match Resolver::new().and_then(|mut r| r.next_hops(addresses)) {
        Ok(hops) => hops,
        Err(e) => {
            tracing::debug!("backends' neighbours: {e}");
            return;
        }
    };
    for (&backend, hop) in addresses.iter().zip(hops) {
        use crate::net::neigh::Unresolved;
        let (ifindex, address) = match hop {
            Err(Unresolved::NoEntry { ifindex, address })
            | Err(Unresolved::Waiting {
                ifindex, address, ..
            }) => (ifindex, address),
            _ => continue,
        };
        if address != backend {
            continue;
        }
        match crate::net::neigh::solicit(ifindex, address) {
            Ok(()) => tracing::info!(%backend, ifindex, "asked the kernel to resolve a backend"),
            Err(e) => tracing::debug!(%backend, "{e}"),
        }
    }
}

/// Backends [`ask_neighbours`] asks about in one call.
pub const ASK_AT_ONCE: usize = 256;

/// Those of `addresses` with a usable neighbour entry in the kept table
/// now (none without the kept table: the daemon's own namespace has it).
pub fn usable(addresses: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    crate::net::neigh_table::with(|entries| {
        entries
            .iter()
            .filter(|((_, address), (state, lladdr))| {
                addresses.contains(address) && crate::net::neigh::usable(*state, lladdr).is_some()
            })
            .map(|((_, address), _)| *address)
            .collect()
    })
    .unwrap_or_default()
}

/// The one node serving `address`: the longest of the nodes' prefixes that
/// holds it; none when two nodes publish that prefix length (a node mid-move
/// would otherwise take traffic the other one serves).
pub fn serving(nodes: &[RemoteNode], address: IpAddr) -> Option<&RemoteNode> {
    let mut best: Option<(u8, &RemoteNode)> = None;
    let mut tied = false;
    for n in nodes {
        let Some(len) = n
            .prefixes
            .iter()
            .filter(|p| p.contains(address))
            .map(|p| p.len)
            .max()
        else {
            continue;
        };
        match best {
            Some((b, _)) if len < b => {}
            Some((b, other)) if len == b => tied |= other.name != n.name,
            _ => {
                best = Some((len, n));
                tied = false;
            }
        }
    }
    best.filter(|_| !tied).map(|(_, n)| n)
}

/// Each backend address's (interface, MAC) as a local target, or why it
/// cannot be one, in the order of the addresses asked.
type OnLink = Vec<Result<(String, String), String>>;

/// (interface, MAC) of each address, or why it cannot be a local target.
fn resolve_all(addresses: &[IpAddr]) -> Result<OnLink, String> {
    // Kept across updates: a change of one backend in 10 000 resolves one.
    static CACHE: Mutex<Option<OnLinkCache>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let found = Resolver::new()
        .and_then(|mut r| r.on_link_cached(addresses, cache.get_or_insert_default()))
        .map_err(|e| e.to_string())?;
    Ok(found
        .into_iter()
        .map(|r| r.map(|(name, mac)| (name, mac_text(mac))))
        .collect())
}

/// What [`targets`] did with the backends it did not make local.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Sent to other nodes: the backend and the node's name.
    pub remote: BTreeMap<IpAddr, String>,
    /// Left out, by EDS cluster (streams `eds.<cluster>`).
    pub unreachable: BTreeMap<String, BTreeSet<IpAddr>>,
}

/// Turns the placeholder targets (`Remote { node: <backend address> }`) into
/// local ones, or remote ones through the node serving them (`nodes`: the
/// cluster's other nodes), dropping those that cannot be reached. Returns
/// the backends sent to other nodes and those left out.
pub async fn targets(spec: &mut LbSpec, nodes: &[RemoteNode]) -> Resolved {
    // Each placeholder's address, parsed once (outer `None`: a local target).
    let parsed: Vec<Option<Option<IpAddr>>> = spec
        .targets
        .iter()
        .map(|t| match &t.via {
            TargetVia::Remote { node } => Some(node.parse().ok()),
            TargetVia::Local { .. } => None,
        })
        .collect();
    let mut out = Resolved::default();
    if parsed.iter().all(Option::is_none) {
        return out;
    }
    let mut addresses: Vec<IpAddr> = parsed.iter().flatten().flatten().copied().collect();
    addresses.sort_unstable();
    addresses.dedup();
    let addresses = std::sync::Arc::new(addresses);
    let resolved = if addresses.is_empty() {
        Ok(OnLink::new())
    } else {
        let wanted = addresses.clone();
        tokio::task::spawn_blocking(move || resolve_all(&wanted))
            .await
            .unwrap_or_else(|e| Err(format!("the resolver failed: {e}")))
    };
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("backends cannot be resolved: {e}");
            vec![Err(e); addresses.len()]
        }
    };
    let not_an_address = Err("not an IP address".to_string());
    let mut parsed = parsed.into_iter();
    spec.targets.retain_mut(|t| {
        let Some(address) = parsed.next().flatten() else {
            return true;
        };
        let TargetVia::Remote { node } = &t.via else {
            return true;
        };
        let local = match address.and_then(|a| addresses.binary_search(&a).ok()) {
            Some(i) => &resolved[i],
            None => &not_an_address,
        };
        match local {
            Ok((interface, mac)) => {
                t.via = TargetVia::Local {
                    interface: interface.clone(),
                    mac: mac.clone(),
                };
                true
            }
            Err(why) => match address.and_then(|a| Some((a, serving(nodes, a)?))) {
                Some((address, n)) if !n.this => {
                    out.remote.insert(address, n.name.clone());
                    t.via = TargetVia::Remote {
                        node: n.tunnel.to_string(),
                    };
                    true
                }
                _ => {
                    tracing::debug!(backend = %node, "left out: {why}");
                    if let (Some(cluster), Some(address)) = (t.stream.strip_prefix("eds."), address)
                    {
                        out.unreachable
                            .entry(cluster.to_string())
                            .or_default()
                            .insert(address);
                    }
                    false
                }
            },
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, last: u8, prefixes: &[&str]) -> RemoteNode {
        RemoteNode {
            name: name.into(),
            tunnel: Ipv4Addr::new(198, 51, 100, last),
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            this: name == "n1",
        }
    }

    #[test]
    fn the_longest_prefix_names_the_node_and_a_tie_names_none() {
        let nodes = [
            node("n1", 1, &["169.254.100.0/22"]),
            node(
                "n2",
                2,
                &["198.18.0.0/16", "2001:db8:2::/64", "169.254.100.0/22"],
            ),
            node("n3", 3, &["198.18.3.0/24"]),
            node("n4", 4, &["198.18.3.0/24", "198.18.4.0/24"]),
        ];
        let at = |a: &str| serving(&nodes, a.parse().unwrap()).map(|n| n.name.as_str());
        assert_eq!(at("198.18.9.9"), Some("n2"));
        assert_eq!(at("198.18.4.1"), Some("n4"));
        assert_eq!(at("198.18.3.1"), None, "n3 and n4 both publish it");
        assert_eq!(at("2001:db8:2::7"), Some("n2"));
        assert_eq!(at("192.0.2.1"), None);
        assert_eq!(at("::ffff:198.18.9.9"), None, "no family crossing");
        // A pool every node publishes (Meridio's default conduit pool): a
        // tie with this node (n1), so never another node's.
        assert_eq!(at("169.254.100.7"), None);
    }
}
