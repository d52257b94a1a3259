//! Packets held for unknown service IPs (`overlay::held`): kept as the
//! kernel hands them over, sent again once the tables name their address.

use std::net::IpAddr;
use std::time::Instant;

use super::views::HeldView;
use super::{NetManager, State};
use crate::overlay::model::Placement;

impl NetManager {
    /// Keeps a packet the kernel held (it came in on host-side veth `ifindex`).
    pub fn hold(&self, ifindex: u32, frame: &[u8]) {
        self.held
            .lock()
            .expect("lock")
            .keep(ifindex, frame, Instant::now());
    }

    pub(super) fn held_view(&self) -> HeldView {
        let mut held = self.held.lock().expect("lock");
        held.expire(Instant::now());
        HeldView {
            waiting: held.waiting(),
            kept: held.kept,
            sent: held.sent,
            dropped: held.dropped,
        }
    }

    /// Sends again, from each container's side of its veth, the packets
    /// held for addresses `known` now says the tables name. A packet whose
    /// container is gone is dropped.
    pub(super) fn release_held(&self, state: &State, known: impl Fn(&IpAddr) -> bool) {
        let by_veth = {
            let mut held = self.held.lock().expect("lock");
            let ready: Vec<IpAddr> = held.addresses().into_iter().filter(|a| known(a)).collect();
            if ready.is_empty() {
                return;
            }
            held.take(&ready, Instant::now())
        };
        let mut sends = Vec::new();
        let mut lost = 0;
        for (ifindex, frames) in by_veth {
            let container = state.local.values().find(|d| {
                matches!(d.record.placement, Placement::Local { host_ifindex, .. } if host_ifindex == ifindex)
            });
            match container {
                Some(d) => sends.push((d.netns.clone(), frames)),
                None => lost += frames.len() as u64,
            }
        }
        self.held.lock().expect("lock").dropped += lost;
        let ifname = self.settings.container_ifname.clone();
        let held = self.held.clone();
        tokio::task::spawn_blocking(move || {
            for (netns, frames) in sends {
                let count = frames.len() as u64;
                let sent = std::fs::File::open(&netns)
                    .and_then(|file| crate::overlay::held::send_from(&file, &ifname, frames));
                let mut held = held.lock().expect("lock");
                match sent {
                    Ok(n) => {
                        held.sent += n as u64;
                        held.dropped += count - n as u64;
                    }
                    Err(e) => {
                        held.dropped += count;
                        tracing::warn!(
                            "netmanager: sending {count} held packets again in {netns}: {e}"
                        );
                    }
                }
            }
        });
    }
}
