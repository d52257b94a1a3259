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
    let index = interface_index(interface).ok_or_else(|| NetlinkError::NoInterface(interface.into()))?;
    block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let mut request = handle.qdisc().del(index as i32);
        let header = &mut request.message_mut().header;
        header.parent = TcHandle::CLSACT;
        header.handle = TcHandle { major: 0xffff, minor: 0 };
        let result = request.execute().await;
        task.abort();
        Ok(result?)
    })
}
