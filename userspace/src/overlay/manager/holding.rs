//! Packets held for unknown service IPs (`overlay::held`): kept as the
//! kernel hands them over, sent again once the tables name their address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use super::views::HeldView;
use super::{NetManager, State};
use crate::net::netns::NetnsId;
use crate::overlay::model::Placement;

/// One container's held packets: its host-side veth, its namespace's path
/// and identity at deploy, the frames.
type Send = (u32, String, Option<NetnsId>, Vec<Vec<u8>>);

/// How long a release waits for the next hop of a node the same table
/// write brought (its neighbour entry is being resolved): sent before,
/// the packet would drop as `no_neighbour`.
const HOP_WAIT: Duration = Duration::from_secs(1);

/// How long a resending socket stays in `tm_ov_resend` after its batch.
const RESEND_FORGET: Duration = Duration::from_secs(2);

impl NetManager {
    /// Keeps a packet the kernel held `age` ago (it came in on host-side
    /// veth `ifindex`); sends it on at once if its address is named by now.
    pub async fn hold(&self, ifindex: u32, frame: &[u8], age: Duration) {
        let now = Instant::now();
        let at = now.checked_sub(age).unwrap_or(now);
        let ready = {
            let mut held = self.held.lock().expect("lock");
            held.keep(ifindex, frame, at, now)
                .map(|to| held.take(&[to], now))
        };
        if let Some(by_veth) = ready {
            let state = self.state.lock().await;
            self.send_held(&state, by_veth, BTreeSet::new());
        }
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

    /// After a table write naming `named`: the packets held for those
    /// addresses go on (after the next hops of `new_nodes` are known).
    pub(super) fn tables_written(
        &self,
        state: &State,
        named: BTreeSet<IpAddr>,
        new_nodes: BTreeSet<Ipv4Addr>,
    ) {
        let by_veth = {
            let mut held = self.held.lock().expect("lock");
            let ready: Vec<IpAddr> = held
                .addresses()
                .into_iter()
                .filter(|a| named.contains(a))
                .collect();
            held.set_named(named);
            if ready.is_empty() {
                return;
            }
            held.take(&ready, Instant::now())
        };
        self.send_held(state, by_veth, new_nodes);
    }

    /// Sends each veth's packets from its container's side. A packet whose
    /// container is gone (or whose namespace path now names another
    /// namespace) is dropped.
    fn send_held(
        &self,
        state: &State,
        by_veth: BTreeMap<u32, Vec<Vec<u8>>>,
        wait_for: BTreeSet<Ipv4Addr>,
    ) {
        let mut sends: Vec<Send> = Vec::new();
        let mut lost = 0;
        for (ifindex, frames) in by_veth {
            let container = state.local.values().find(|d| {
                matches!(d.record.placement, Placement::Local { host_ifindex, .. } if host_ifindex == ifindex)
            });
            let Some(d) = container else {
                lost += frames.len() as u64;
                continue;
            };
            // Only from the container's own address: the kernel drops a
            // service packet from any other (a link-local one, say) once
            // its service IP is known, so it would not be sent.
            let own = [
                Some(IpAddr::V4(d.record.ns_addr)),
                d.record.ns_addr_v6.map(IpAddr::V6),
            ];
            let count = frames.len();
            let frames: Vec<Vec<u8>> = frames
                .into_iter()
                .filter(|f| crate::overlay::held::source(f).is_some_and(|a| own.contains(&Some(a))))
                .collect();
            lost += (count - frames.len()) as u64;
            if !frames.is_empty() {
                sends.push((ifindex, d.netns.clone(), d.netns_id, frames));
            }
        }
        self.held.lock().expect("lock").dropped += lost;
        if sends.is_empty() {
            return;
        }
        let held = self.held.clone();
        let dataplane = self.dataplane.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + HOP_WAIT;
            while !wait_for.is_empty() && Instant::now() < deadline {
                if dataplane.overlay_hops_known(&wait_for).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let runtime = tokio::runtime::Handle::current();
            let marks = dataplane.clone();
            let cookies = tokio::task::spawn_blocking(move || {
                let mut cookies = Vec::new();
                for (ifindex, netns, id, frames) in sends {
                    let count = frames.len() as u64;
                    // The container's end of this veth, by the index its
                    // host side names (not by a name).
                    let peer = crate::net::peer::facts(ifindex)
                        .ok()
                        .and_then(|f| f.peer_index);
                    let sent = std::fs::File::open(&netns).and_then(|file| {
                        if id.is_some_and(|id| NetnsId::of_namespace(&file).ok() != Some(id)) {
                            return Err(std::io::Error::other("it names another namespace now"));
                        }
                        let peer = peer.ok_or_else(|| {
                            std::io::Error::other(format!("its veth (index {ifindex}) is gone"))
                        })?;
                        // Named before the first frame goes: a tap of the
                        // port copied these when they were held.
                        let announce = |cookie: u64| {
                            if cookie == 0 {
                                return;
                            }
                            if let Err(e) =
                                runtime.block_on(marks.resend_socket(cookie, Some(ifindex)))
                            {
                                tracing::warn!(
                                    "netmanager: a tap may copy held packets twice in {netns}: {e}"
                                );
                            }
                        };
                        crate::overlay::held::send_from(&file, peer, frames, announce)
                    });
                    let mut held = held.lock().expect("lock");
                    match sent {
                        Ok((n, cookie)) => {
                            cookies.push(cookie);
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
                cookies
            })
            .await
            .unwrap_or_default();
            // The kernel has long seen the frames of a closed socket; its
            // cookie is never given again, so a late removal harms nothing.
            tokio::time::sleep(RESEND_FORGET).await;
            for cookie in cookies.into_iter().filter(|&c| c != 0) {
                let _ = dataplane.resend_socket(cookie, None).await;
            }
        });
    }
}
