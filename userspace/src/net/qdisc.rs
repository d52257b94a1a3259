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
