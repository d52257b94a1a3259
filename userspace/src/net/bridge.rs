//! Bridges inside a namespace (a unikernel's: the VM's TAP device behind
//! an address the namespace routes to).

use std::fs::File;

use rtnetlink::{LinkBridge, LinkUnspec};

use super::{addr, describe, link, netlink_in, At, NetError, Prefix};

/// Creates bridge `name` in `netns` with `address`, enslaves `members`
/// (links of that namespace) and sets them all up.
pub async fn add_in(
    netns: &File,
    name: &str,
    address: Prefix,
    members: &[&str],
) -> Result<(), NetError> {
    super::check_ifname(name)?;
    let ns_name = describe(netns);
    let at = At {
        ifname: name,
        netns: &ns_name,
    };
    let handle = netlink_in(netns)?;
    handle
        .link()
        .add(LinkBridge::new(name).build())
        .execute()
        .await
        .map_err(at.nl("creating bridge"))?;
    let bridge = link::find(Some(netns), at)?;
    addr::add(&handle, bridge.index, address, false, at).await?;
    link::set_up(&handle, at).await?;
    for member in members {
        let member_at = At {
            ifname: member,
            netns: &ns_name,
        };
        let message = LinkUnspec::new_with_name(member)
            .controller(bridge.index)
            .up()
            .build();
        handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(member_at.nl(format!("adding to bridge {name}")))?;
    }
    Ok(())
}
