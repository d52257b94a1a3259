//! Container egress (masquerade + IPv4 forwarding) held while containers
//! are deployed here, and put back as found with the last one.

use serde::{Deserialize, Serialize};

use super::{NetManager, NmError, State};
use crate::net::sysctl;
use crate::overlay::egress;

/// The egress set-up is in place; `forwarding_ours`: forwarding was off and
/// the daemon turned it on (so it turns it off again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct EgressHeld {
    pub forwarding_ours: bool,
}

impl NetManager {
    /// Makes the egress set-up match the deployments: in place while a
    /// container is deployed (and `masquerade` is on), gone otherwise.
    /// `rewrite` writes the table again even when held (a restart). A
    /// failure leaves things as they were.
    pub(super) async fn sync_egress(
        &self,
        state: &mut State,
        rewrite: bool,
    ) -> Result<(), NmError> {
        let subnet = state.ipam.as_ref().map(|i| i.subnet());
        let wanted = self.settings.masquerade && !state.local.is_empty() && subnet.is_some();
        match (wanted, state.egress) {
            (true, Some(_)) if !rewrite => Ok(()),
            (true, held) => {
                let forwarding_ours = match held {
                    Some(h) => h.forwarding_ours,
                    None => enable_forwarding()?,
                };
                if let Err(e) = egress::apply(subnet, self.settings.node_port).await {
                    if held.is_none() && forwarding_ours {
                        let _ = sysctl::set_ipv4_forwarding(false);
                    }
                    return Err(NmError::Egress(format!(
                        "{e}; or set netmanager.masquerade = false"
                    )));
                }
                if held.is_none() {
                    tracing::info!(subnet = ?subnet.map(|s| s.to_string()), forwarding_ours, "container egress: masquerade on");
                }
                state.egress = Some(EgressHeld { forwarding_ours });
                Ok(())
            }
            (false, Some(held)) => {
                let removed = egress::apply(None, self.settings.node_port).await;
                if held.forwarding_ours {
                    if let Err(e) = sysctl::set_ipv4_forwarding(false) {
                        tracing::warn!("putting IPv4 forwarding back off: {e}");
                    }
                }
                state.egress = None;
                tracing::info!("container egress: masquerade off");
                removed.map_err(NmError::Egress)
            }
            (false, None) => Ok(()),
        }
    }
}

/// Turns IPv4 forwarding on; true when it was off.
fn enable_forwarding() -> Result<bool, NmError> {
    let refused = |e| {
        NmError::Egress(format!(
            "container egress needs IPv4 forwarding: {e}; turn it on for the node \
             (net.ipv4.ip_forward = 1) or set netmanager.masquerade = false"
        ))
    };
    if sysctl::ipv4_forwarding().map_err(refused)? {
        return Ok(false);
    }
    sysctl::set_ipv4_forwarding(true).map_err(refused)?;
    Ok(true)
}
