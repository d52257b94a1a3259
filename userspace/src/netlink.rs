//! Small rtnetlink operations the dataplane needs beyond what aya does.

use netlink_packet_route::tc::TcHandle;
use thiserror::Error;

use crate::config::interface_index;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("{0}")]
    Request(#[from] rtnetlink::Error),
}

/// Runs a netlink future from blocking code inside the daemon's runtime, or
/// on a private runtime when there is none.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(future),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(future),
    }
}

/// Deletes the clsact qdisc of `interface` (and with it every TC filter on it).
pub fn delete_clsact(interface: &str) -> Result<(), NetlinkError> {
    let index =
        interface_index(interface).ok_or_else(|| NetlinkError::NoInterface(interface.into()))?;
    block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let mut request = handle.qdisc().del(index as i32);
        let header = &mut request.message_mut().header;
        header.parent = TcHandle::CLSACT;
        header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        let result = request.execute().await;
        task.abort();
        Ok(result?)
    })
}

/// The index and MAC address of an interface in the daemon's namespace
/// (asked over netlink: /sys may belong to another namespace).
pub fn interface_mac(interface: &str) -> Result<(u32, [u8; 6]), NetlinkError> {
    use futures::TryStreamExt;
    use netlink_packet_route::link::LinkAttribute;

    let index =
        interface_index(interface).ok_or_else(|| NetlinkError::NoInterface(interface.into()))?;
    block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let mut links = handle.link().get().match_index(index).execute();
        let found = links.try_next().await;
        task.abort();
        let message = found?.ok_or_else(|| NetlinkError::NoInterface(interface.into()))?;
        let mac = message.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(bytes);
                Some(mac)
            }
            _ => None,
        });
        mac.map(|m| (index, m))
            .ok_or_else(|| NetlinkError::NoInterface(format!("{interface} (no Ethernet address)")))
    })
}
