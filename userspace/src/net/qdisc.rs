//! Queueing disciplines: what the dataplane needs beyond what aya does.

use netlink_packet_route::{
    tc::{TcHandle, TcMessage},
    RouteNetlinkMessage,
};

use super::socket::Netlink;
use super::NetError;

/// Deletes the clsact qdisc of `interface` (and with it every TC filter on it).
pub fn delete_clsact(interface: &str) -> Result<(), NetError> {
    let index = super::link::by_name(interface)?.index;
    let mut message = TcMessage::default();
    message.header.index = index as i32;
    message.header.parent = TcHandle::CLSACT;
    message.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    socket
        .request(RouteNetlinkMessage::DelQueueDiscipline(message), 0)
        .map(|_| ())
        .map_err(NetError::kernel(format!(
            "deleting the clsact qdisc of {interface}"
        )))
}

/// A BPF filter on a clsact hook: its program's name, priority and handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub name: String,
    pub priority: u16,
    pub handle: u32,
    /// The program's id, when the kernel says.
    pub program: Option<u32>,
}

/// The BPF filters on `interface`'s clsact ingress (or egress) hook, in the
/// kernel's order (none without a clsact qdisc).
pub fn bpf_filters(interface: &str, egress: bool) -> Result<Vec<BpfFilter>, NetError> {
    use netlink_packet_route::tc::{TcAttribute, TcFilterBpfOption, TcOption};

    let mut found = Vec::new();
    dump_filters(interface, egress, |m| {
        // The kernel lists each priority's chain head too (no handle, no options).
        let options: Vec<&TcFilterBpfOption> = m
            .attributes
            .iter()
            .filter_map(|a| match a {
                TcAttribute::Options(options) => Some(options),
                _ => None,
            })
            .flatten()
            .filter_map(|o| match o {
                TcOption::Bpf(b) => Some(b),
                _ => None,
            })
            .collect();
        let name = options.iter().find_map(|o| match o {
            TcFilterBpfOption::ProgName(n) => Some(n.clone()),
            _ => None,
        });
        if let Some(name) = name {
            found.push(BpfFilter {
                name,
                priority: (m.header.info >> 16) as u16,
                handle: u32::from(m.header.handle.major) << 16 | u32::from(m.header.handle.minor),
                program: options.iter().find_map(|o| match o {
                    TcFilterBpfOption::ProgId(id) => Some(*id),
                    _ => None,
                }),
            });
        }
    })?;
    Ok(found)
}

/// Whether any filter, of any kind and anyone's, is on `interface`'s
/// clsact hooks.
pub fn has_filters(interface: &str) -> Result<bool, NetError> {
    let mut any = false;
    for egress in [false, true] {
        dump_filters(interface, egress, |_| any = true)?;
    }
    Ok(any)
}

/// Deletes the clsact qdisc of `interface` only if no filter is left on
/// it: another tool's filters added since go with it otherwise. Whether
/// it was deleted.
pub fn delete_clsact_if_empty(interface: &str) -> Result<bool, NetError> {
    if has_filters(interface)? {
        return Ok(false);
    }
    delete_clsact(interface).map(|()| true)
}

/// Calls `each` with every filter message of one clsact hook.
fn dump_filters(
    interface: &str,
    egress: bool,
    mut each: impl FnMut(&TcMessage),
) -> Result<(), NetError> {
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};

    let index = super::link::by_name(interface)?.index;
    let mut request = TcMessage::default();
    request.header.index = index as i32;
    request.header.parent = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: if egress {
            TcHandle::MIN_EGRESS
        } else {
            TcHandle::MIN_INGRESS
        },
    };
    let mut socket = Netlink::route().map_err(NetError::kernel("opening a netlink socket"))?;
    let dumped = socket.dump(
        RouteNetlinkMessage::GetTrafficFilter(request),
        |_, whole| {
            if let Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)),
                ..
            }) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(whole)
            {
                each(&m);
            }
        },
    );
    // Without a clsact qdisc the dump is empty.
    dumped.map_err(NetError::kernel(format!(
        "listing the TC filters of {interface}"
    )))
}
