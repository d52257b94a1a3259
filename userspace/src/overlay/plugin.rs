//! The `netmanager` plugin: serves the REST API on a unix socket (and
//! optionally TCP), reads the kernel's miss reports, keeps a status line
//! with per-service and per-instance counters.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::manager::{ManagerSettings, NetManager};
use crate::config::Config;
use crate::core::{Plugin, PluginError};
use crate::dataplane::DataplaneHandle;
use crate::net::{self, Prefix};

/// Told when the NetManager starts and stops. The catalog is one (wired in
/// `main`): it feeds the NetManager the EDS members of service IPs and lists
/// its service IPs. Defined here so that the overlay does not know the catalog.
#[async_trait]
pub trait ManagerObserver: Send + Sync {
    async fn set_manager(&self, manager: Option<Arc<NetManager>>);
}

/// Oakestra's NetManager socket.
pub const OAKESTRA_SOCKET: &str = "/etc/netmanager/netmanager.sock";

/// A miss is reported again after this long if it is still unknown.
const MISS_RETRY: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Settings {
    socket: Option<std::path::PathBuf>,
    listen: Option<std::net::SocketAddr>,
    manager: Option<ManagerSettings>,
}

pub struct NetManagerPlugin {
    dataplane: DataplaneHandle,
    observer: Arc<dyn ManagerObserver>,
    settings: Mutex<Settings>,
    manager: Mutex<Option<Arc<NetManager>>>,
    status: Arc<Mutex<String>>,
    /// The API socket's file, removed at stop.
    bound: Mutex<Option<crate::uds::Bound>>,
}

impl NetManagerPlugin {
    pub fn new(dataplane: DataplaneHandle, observer: Arc<dyn ManagerObserver>) -> Self {
        Self {
            dataplane,
            observer,
            settings: Mutex::new(Settings::default()),
            manager: Mutex::new(None),
            status: Arc::new(Mutex::new("off".into())),
            bound: Mutex::new(None),
        }
    }
}

fn summary(snapshot: &super::manager::Snapshot) -> String {
    let Some(r) = &snapshot.registration else {
        return "waiting for /register".into();
    };
    let mut out = format!(
        "registered as {} (subnet {}); {} instances, {} service IPs, {} misses",
        r.client_id,
        r.subnetwork,
        snapshot.instances.len(),
        snapshot.services.len(),
        snapshot.misses
    );
    if !snapshot.unresolved.is_empty() {
        out += &format!(" (unresolved: {})", snapshot.unresolved.join(", "));
    }
    for s in &snapshot.services {
        out += &format!(
            "\n    service {} {} ({} instances): {} packets, {} bytes",
            s.address, s.ip_type, s.instances, s.packets, s.bytes
        );
    }
    for i in &snapshot.instances {
        out += &format!(
            "\n    instance {}#{} {} at {}: {} packets, {} bytes",
            i.job, i.number, i.ns_address, i.location, i.packets, i.bytes
        );
    }
    out
}

#[async_trait]
impl Plugin for NetManagerPlugin {
    fn name(&self) -> &'static str {
        "netmanager"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        let nm = &config.netmanager;
        // Checked here, before the dataplane attaches anything.
        if let Some(path) = &nm.socket {
            crate::uds::check_free(path)
                .map_err(|e| PluginError::new(format!("netmanager.socket: {e}")))?;
        }
        let mut settings = self.settings.lock().expect("lock");
        settings.socket = nm.socket.clone();
        settings.listen = nm.listen;
        if nm.oakestra && nm.socket.is_none() && nm.listen.is_none() {
            // Where Oakestra's Node Engine looks for it.
            settings.socket = Some(OAKESTRA_SOCKET.into());
        }
        if settings.socket.is_none() && settings.listen.is_none() {
            settings.manager = None;
            return Ok(());
        }
        let cidr = |text: &str| {
            text.parse::<Prefix>()
                .map_err(|e| PluginError::new(format!("netmanager: {text:?}: {e}")))
        };
        let prefix = cidr(&nm.service_prefix)?;
        let std::net::IpAddr::V4(prefix_addr) = prefix.addr else {
            return Err(PluginError::new("netmanager.service_prefix must be IPv4"));
        };
        let prefix6 = cidr(&nm.service_prefix_v6)?;
        let std::net::IpAddr::V6(prefix6_addr) = prefix6.addr else {
            return Err(PluginError::new(
                "netmanager.service_prefix_v6 must be IPv6",
            ));
        };
        let uplink = config.dataplane.uplinks.first();
        let mtu = match nm.mtu {
            // Oakestra's containers and tunnel use 1450 whatever the uplink.
            0 if nm.oakestra => 1450,
            0 => uplink
                .and_then(|u| net::link::by_name(u).ok())
                .map(|l| l.mtu.saturating_sub(28))
                .unwrap_or(1450),
            m => m,
        };
        settings.manager = Some(ManagerSettings {
            container_ifname: nm.container_ifname.clone(),
            mtu,
            service_prefix: (prefix_addr, prefix.len),
            service_prefix_v6: (prefix6_addr, prefix6.len),
            subnetwork: nm.subnetwork.as_deref().map(cidr).transpose()?,
            subnetwork_v6: nm.subnetwork_v6.as_deref().map(cidr).transpose()?,
            node_costs: nm.node_costs.clone(),
            default_node_cost: nm.default_node_cost,
            state_file: Some(config.daemon.state_dir.join("netmanager-state.json")),
            keep_links: config.dataplane.keep_dataplane,
            oakestra: nm.oakestra,
            mqtt_broker: nm.mqtt_broker.clone(),
            mqtt_port: nm.mqtt_port,
            node_port: config.lb.tunnel_port,
            masquerade: nm.masquerade.unwrap_or(nm.oakestra),
        });
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let (socket, listen, settings) = {
            let s = self.settings.lock().expect("lock");
            (s.socket.clone(), s.listen, s.manager.clone())
        };
        let Some(settings) = settings else {
            return Ok(());
        };
        if self.dataplane.tunnel().address.is_none() {
            tracing::warn!("netmanager: no node address (set lb.node_address or an uplink with an IPv4 address): instances on other nodes are unreachable");
        }
        let manager = Arc::new(NetManager::new(self.dataplane.clone(), settings));
        manager.restore().await;
        manager.resume_cluster().await;
        // The node's address moves with its uplink's (no `lb.node_address`).
        let mut moved = self.dataplane.watch_tunnel();
        moved.mark_unchanged();
        let (m, stop) = (manager.clone(), scope.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = moved.changed() => if changed.is_err() { return },
                }
                m.address_moved().await;
            }
        });
        let router = super::api::router(manager.clone());
        if let Some(path) = &socket {
            let (listener, bound) = crate::uds::bind(path, 0o660)
                .map_err(|e| PluginError::new(format!("netmanager.socket: {e}")))?;
            *self.bound.lock().expect("lock") = Some(bound);
            let (router, stop) = (router.clone(), scope.clone());
            tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!("netmanager API: {e}");
                }
            });
        }
        if let Some(addr) = listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| PluginError::new(format!("netmanager listen {addr}: {e}")))?;
            let stop = scope.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!("netmanager API: {e}");
                }
            });
        }
        let misses = self
            .dataplane
            .take_overlay_misses()
            .await
            .map_err(|e| PluginError::new(e.to_string()))?;
        // A kept dataplane's pending misses: the daemon that read them is
        // gone, and so is its timer that would have cleared them. Notices
        // still in the ring are read below and cleared as usual.
        let left = self.dataplane.clear_all_overlay_pending().await;
        if left > 0 {
            tracing::info!(
                left,
                "netmanager: pending misses of the previous daemon cleared"
            );
        }
        tokio::spawn(read_misses(
            misses,
            manager.clone(),
            self.dataplane.clone(),
            scope.clone(),
        ));
        let held = self
            .dataplane
            .take_overlay_held()
            .await
            .map_err(|e| PluginError::new(e.to_string()))?;
        tokio::spawn(read_held(held, manager.clone(), scope.clone()));
        let (status, m, stop) = (self.status.clone(), manager.clone(), scope.clone());
        tokio::spawn(async move {
            loop {
                let line = summary(&m.snapshot().await);
                *status.lock().expect("lock") = line;
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        self.observer.set_manager(Some(manager.clone())).await;
        *self.manager.lock().expect("lock") = Some(manager);
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        let manager = self.manager.lock().expect("lock").take();
        if let Some(m) = manager {
            self.observer.set_manager(None).await;
            m.shutdown().await;
        }
        if let Some(bound) = self.bound.lock().expect("lock").take() {
            bound.remove();
        }
        Ok(())
    }

    fn status(&self) -> String {
        self.status.lock().expect("lock").clone()
    }
}

/// A ring buffer the kernel fills, read as its records arrive.
struct RingReader {
    fd: tokio::io::unix::AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    what: &'static str,
}

impl RingReader {
    fn new(ring: aya::maps::RingBuf<aya::maps::MapData>, what: &'static str) -> Option<Self> {
        use tokio::io::unix::AsyncFd;
        // SAFETY: the ring owns its descriptor and stays inside the AsyncFd
        // until both are dropped together.
        match unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
            Ok(fd) => Some(Self { fd, what }),
            Err(e) => {
                tracing::error!("netmanager: watching the {}: {e}", what);
                None
            }
        }
    }

    /// The records that came since the last call, each read by `parse`;
    /// None once `stop` is cancelled or the ring fails.
    async fn next<T>(
        &mut self,
        stop: &CancellationToken,
        mut parse: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<Vec<T>> {
        let mut guard = tokio::select! {
            _ = stop.cancelled() => return None,
            g = self.fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!("netmanager: {}: {e}", self.what);
                    return None;
                }
            },
        };
        let mut found = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            found.extend(parse(&item));
        }
        guard.clear_ready();
        Some(found)
    }
}

/// Reads the packets the kernel held for unknown service IPs into the
/// manager, which sends them again once their address is known.
async fn read_held(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    manager: Arc<NetManager>,
    stop: CancellationToken,
) {
    let Some(mut reader) = RingReader::new(ring, "held-packet ring") else {
        return;
    };
    // `Held`: when, the veth's index, the frame's length, the frame.
    let parse = |item: &[u8]| {
        let bytes = |at: usize, n: usize| item.get(at..at + n);
        let ts = bytes(0, 8)?.try_into().ok().map(u64::from_ne_bytes)?;
        let word = |at| bytes(at, 4)?.try_into().ok().map(u32::from_ne_bytes);
        let (ifindex, len) = (word(8)?, word(12)?);
        Some((ts, ifindex, bytes(16, len as usize)?.to_vec()))
    };
    while let Some(records) = reader.next(&stop, parse).await {
        let now = crate::overlay::held::monotonic_ns();
        for (ts, ifindex, frame) in records {
            let age = Duration::from_nanos(now.saturating_sub(ts));
            manager.hold(ifindex, &frame, age).await;
        }
    }
}

/// Reads the kernel's miss reports: each is recorded, and after
/// [`MISS_RETRY`] the service IP may be reported again.
async fn read_misses(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    manager: Arc<NetManager>,
    dataplane: DataplaneHandle,
    stop: CancellationToken,
) {
    use tapmesh_common::overlay::{Miss, Miss6, MISS_FROM_STRANGER};

    let Some(mut reader) = RingReader::new(ring, "miss ring") else {
        return;
    };
    // Told apart by length: an IPv6 report is the longer one.
    let parse = |item: &[u8]| -> Option<(std::net::IpAddr, bool)> {
        if item.len() >= std::mem::size_of::<Miss6>() {
            // SAFETY: the kernel wrote a `Miss6` (size checked); read unaligned.
            let miss: Miss6 = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss6) };
            Some((
                miss.service_addr.into(),
                miss.flags & MISS_FROM_STRANGER != 0,
            ))
        } else if item.len() >= std::mem::size_of::<Miss>() {
            // SAFETY: the kernel wrote a `Miss` (size checked); read unaligned.
            let miss: Miss = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Miss) };
            let service = Ipv4Addr::from(miss.service_addr).into();
            Some((service, miss.flags & MISS_FROM_STRANGER != 0))
        } else {
            None
        }
    };
    while let Some(found) = reader.next(&stop, parse).await {
        if found.is_empty() {
            continue;
        }
        for &(service, stranger) in &found {
            manager.miss(service, stranger).await;
        }
        // One timer per read, not per report: a flood of addresses (a node
        // sending from many) costs one task per wake-up.
        let dp = dataplane.clone();
        tokio::spawn(async move {
            tokio::time::sleep(MISS_RETRY).await;
            for (service, _) in found {
                dp.clear_overlay_pending(service).await;
            }
        });
    }
}
