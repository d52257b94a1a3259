//! Routes and policy rules: a container's routes behind its veth, and the
//! source routing of an application's VIPs (Meridio's conduits).

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt;
use netlink_packet_route::{
    address::{AddressMessage, AddressScope},
    route::{RouteAttribute, RouteMessage, RouteScope},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use rtnetlink::{IpVersion, RouteMessageBuilder};

use super::{
    addr, check_ifname, describe, errno, link, netlink_here, netlink_in, At, NetError, Prefix,
};

/// The table of a rule (the 32-bit attribute when there is one).
fn rule_table(rule: &RuleMessage) -> u32 {
    rule.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table))
}

/// The `from` prefix of a rule that `set_vips` made for `table`, if it is one.
fn our_rule_source(rule: &RuleMessage, table: u32) -> Option<Prefix> {
    let priority = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    if priority != Some(table) || rule_table(rule) != table {
        return None;
    }
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(addr) => Some(Prefix::new(*addr, rule.header.src_len)),
        _ => None,
    })
}

/// Makes the peer interface in `netns` carry exactly `vips` (besides its
/// `local` addresses): IPv4 without a connected route, IPv6 also without DAD.
/// For each VIP a rule `from <vip> lookup <table>` (priority `table`), and in
/// `table` a default route via the gateway of each family that has VIPs.
/// VIPs, rules and routes no longer wanted are removed. Idempotent.
pub async fn set_vips(
    netns: &File,
    peer_ifname: &str,
    local: &[Prefix],
    vips: &[Prefix],
    gateways: &[IpAddr],
    table: u32,
) -> Result<(), NetError> {
    check_ifname(peer_ifname)?;
    // 0 is no table; 253..=255 are default, main and local.
    if table == 0 || (253..=255).contains(&table) {
        return Err(NetError::Invalid(format!("table {table} is reserved")));
    }
    let gateway_v4 = gateways.iter().find_map(|g| match g {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let gateway_v6 = gateways.iter().find_map(|g| match g {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    for vip in vips {
        vip.check()
            .map_err(|e| NetError::Invalid(format!("VIP {vip}: {e}")))?;
        let has_gateway = if vip.is_ipv4() {
            gateway_v4.is_some()
        } else {
            gateway_v6.is_some()
        };
        if !has_gateway {
            return Err(NetError::Invalid(format!(
                "VIP {vip}: no gateway of its address family"
            )));
        }
    }

    let ns_name = describe(netns);
    let at = At {
        ifname: peer_ifname,
        netns: &ns_name,
    };
    let index = link::find(Some(netns), at)?.index;
    let handle = netlink_in(netns)?;

    // Current addresses: universe scope only (link-local ones are the kernel's).
    let present: Vec<(Prefix, AddressMessage)> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(at.nl("listing addresses"))?
        .into_iter()
        .filter(|m| m.header.scope == AddressScope::Universe)
        .filter_map(|m| addr::of_message(&m).map(|c| (c, m)))
        .collect();

    // Current rules of ours.
    let mut rules = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let dumped: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(at.nl("listing rules"))?;
        rules.extend(
            dumped
                .into_iter()
                .filter_map(|r| our_rule_source(&r, table).map(|s| (s, r))),
        );
    }
    // The rule key of a VIP: its prefix with host bits cleared.
    let wanted_rules: Vec<Prefix> = vips.iter().map(Prefix::network).collect();

    // Remove what is no longer wanted: rules first, then addresses.
    for (source, rule) in &rules {
        if !wanted_rules.contains(source) {
            match handle.rule().del(rule.clone()).execute().await {
                Err(e) if errno(&e) != Some(libc::ENOENT) => {
                    return Err(at.nl(format!("deleting rule from {source}"))(e))
                }
                _ => {}
            }
        }
    }
    for (prefix, message) in &present {
        if !local.contains(prefix) && !vips.contains(prefix) {
            match handle.address().del(message.clone()).execute().await {
                Err(e) if errno(&e) != Some(libc::EADDRNOTAVAIL) => {
                    return Err(at.nl(format!("deleting {prefix}"))(e))
                }
                _ => {}
            }
        }
    }

    // Add what is missing: addresses, routes, then rules.
    for vip in vips {
        if !present.iter().any(|(c, _)| c == vip) {
            addr::add(&handle, index, *vip, true, at).await?;
        }
    }
    // Per family: a default route via its gateway while it has VIPs, else none.
    for (v4, gateway) in [
        (true, gateway_v4.map(IpAddr::V4)),
        (false, gateway_v6.map(IpAddr::V6)),
    ] {
        let mut route = if v4 {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(table)
                .build()
        } else {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(table)
                .build()
        };
        match gateway {
            Some(gw) if vips.iter().any(|v| v.is_ipv4() == v4) => {
                route.attributes.push(RouteAttribute::Gateway(gw.into()));
                route.attributes.push(RouteAttribute::Oif(index));
                let op = format!("adding default via {gw} to table {table}");
                let added = handle.route().add(route).replace().execute().await;
                added.map_err(at.nl(op))?;
            }
            _ => match handle.route().del(route).execute().await {
                Err(e) if !matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => {
                    let op = format!("deleting the default route of table {table}");
                    return Err(at.nl(op)(e));
                }
                _ => {}
            },
        }
    }
    for source in &wanted_rules {
        if rules.iter().any(|(s, _)| s == source) {
            continue;
        }
        let request = handle
            .rule()
            .add()
            .table_id(table)
            .priority(table)
            .action(RuleAction::ToTable);
        let result = match source.addr {
            IpAddr::V4(a) => request.v4().source_prefix(a, source.len).execute().await,
            IpAddr::V6(a) => request.v6().source_prefix(a, source.len).execute().await,
        };
        match result {
            Err(e) if errno(&e) != Some(libc::EEXIST) => {
                let op = format!("adding rule from {source} lookup {table}");
                return Err(at.nl(op)(e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Routes of a container behind a point-to-point veth: in `netns` each
/// gateway on-link through `peer_ifname` and the default route of its family
/// via it; in the current namespace each of `local` through `host_ifindex`.
pub async fn add_container_routes(
    netns: &File,
    peer_ifname: &str,
    host_ifindex: u32,
    gateways: &[IpAddr],
    local: &[IpAddr],
) -> Result<(), NetError> {
    let ns_name = describe(netns);
    let peer_at = At {
        ifname: peer_ifname,
        netns: &ns_name,
    };
    let peer_index = link::find(Some(netns), peer_at)?.index;
    let peer = netlink_in(netns)?;
    for gw in gateways {
        let (on_link, default) = match gw {
            IpAddr::V4(a) => (
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(*a, 32)
                    .output_interface(peer_index)
                    .scope(RouteScope::Link)
                    .build(),
                RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(*a)
                    .output_interface(peer_index)
                    .build(),
            ),
            IpAddr::V6(a) => (
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(*a, 128)
                    .output_interface(peer_index)
                    .build(),
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(*a)
                    .output_interface(peer_index)
                    .build(),
            ),
        };
        peer.route()
            .add(on_link)
            .replace()
            .execute()
            .await
            .map_err(peer_at.nl(format!("adding the route to {gw}")))?;
        peer.route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(peer_at.nl(format!("adding the default route via {gw}")))?;
    }
    let host = netlink_here()?;
    for addr in local {
        let route = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(*a, 32)
                .output_interface(host_ifindex)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(*a, 128)
                .output_interface(host_ifindex)
                .build(),
        };
        // Exclusive: a route of the node's own to this address is refused,
        // never replaced (the host is not the container's to change).
        host.route()
            .add(route)
            .execute()
            .await
            .map_err(At::here("host side").nl(format!("adding the route to {addr}")))?;
    }
    Ok(())
}

/// The main table's default routes in `netns`, both families: what
/// [`add_container_routes`] replaces, kept to be put back by a rollback.
pub async fn default_routes(netns: &File) -> Result<Vec<RouteMessage>, NetError> {
    let handle = netlink_in(netns)?;
    let ns = describe(netns);
    let at = At {
        ifname: "default route",
        netns: &ns,
    };
    let mut found = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(at.nl("listing routes"))?;
        found.extend(routes.into_iter().filter(|r| {
            r.header.destination_prefix_length == 0
                && route_table(r) == u32::from(libc::RT_TABLE_MAIN)
        }));
    }
    for r in &mut found {
        r.attributes
            .retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
    }
    Ok(found)
}

/// Puts back routes taken by [`default_routes`] (after the link that
/// replaced them is gone). Best effort: a failure is logged.
pub async fn restore_routes(netns: &File, routes: Vec<RouteMessage>) {
    if routes.is_empty() {
        return;
    }
    let handle = match netlink_in(netns) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("restoring default routes in {}: {e}", describe(netns));
            return;
        }
    };
    for route in routes {
        if let Err(e) = handle.route().add(route).replace().execute().await {
            tracing::warn!("restoring a default route in {}: {e}", describe(netns));
        }
    }
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}
