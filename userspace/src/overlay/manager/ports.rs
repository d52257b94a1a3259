//! The nftables port mappings kept matching the deployments.

use std::net::Ipv4Addr;

use super::{NetManager, NmError, State};
use crate::overlay::ports::{self, PortMapping};

impl State {
    pub(super) fn port_table(&self) -> Vec<(Ipv4Addr, PortMapping)> {
        self.local
            .values()
            .flat_map(|d| d.ports.iter().map(|p| (d.lease.v4, *p)))
            .collect()
    }
}

impl NetManager {
    /// Makes the nftables port mappings match the deployments (nft is only
    /// run when some deployment has, or had, mappings).
    pub(super) async fn sync_ports(&self, state: &mut State) -> Result<(), NmError> {
        let table = state.port_table();
        if table.is_empty() && !state.ports_written {
            return Ok(());
        }
        ports::apply(&table).await.map_err(NmError::Ports)?;
        state.ports_written = !table.is_empty();
        Ok(())
    }
}
