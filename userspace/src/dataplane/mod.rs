//! The dataplane plugin: the one owner of the BPF object, its maps and links.
//!
//! It loads the embedded object, pins maps under `<bpffs_root>/v<schema>/`,
//! attaches XDP to the uplinks and TC to the configured interfaces, and
//! detaches everything on stop unless told to keep it. Other plugins reach it
//! through a [`DataplaneHandle`] and never touch map handles themselves.

mod attach;
pub mod batch;
pub mod cleanup;
pub mod inspect;
pub mod lb;
pub mod mapped;
pub mod memory;
pub mod mirror;
pub mod overlay;
mod pins;
pub mod tunnel;
mod vip_overlap;

use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use aya::{maps::PerCpuArray, Ebpf};
use tapmesh_common::{map_names, tunnel::PEER_STATIC, ProgramSlot, ProgramStats};
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub use attach::{install_tails, Attachment, Hook};

use crate::{
    config::{Config, DataplaneConfig},
    core::{Plugin, PluginError},
};

/// The BPF object built by `cargo xtask build-ebpf`, embedded at compile time.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapmesh.bpf.o"));

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {hook} to {interface}: {message}")]
    Attach {
        hook: Hook,
        interface: String,
        message: String,
    },
    #[error("map {name}: {message}")]
    Map { name: &'static str, message: String },
    /// A local target's interface could not be looked up.
    /// `message` names the interface (the resolver's cause, or prefixed).
    #[error("target {identifier} of stream {stream:?}: {message}")]
    Interface {
        stream: String,
        identifier: u32,
        interface: String,
        message: String,
    },
    #[error("the dataplane is not running")]
    NotRunning,
    #[error("no room left for {0}")]
    Full(&'static str),
    #[error("{0}")]
    Config(String),
    /// A VIP and an overlay address overlap (`vip_overlap`): the other
    /// plugin holds the address.
    #[error("{0}")]
    Overlap(String),
}

/// A map error as a dataplane error naming the map.
fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        name,
        message: e.to_string(),
    }
}

/// A map of the object by name, for writing.
fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, DataplaneError> {
    ebpf.map(name).ok_or(DataplaneError::Map {
        name,
        message: "missing from the object".into(),
    })
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DataplaneError> {
    ebpf.map_mut(name).ok_or(DataplaneError::Map {
        name,
        message: "missing from the object".into(),
    })
}

/// Counters of one program, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramCounters {
    pub slot: ProgramSlot,
    pub stats: ProgramStats,
}

struct Running {
    ebpf: Ebpf,
    lb: lb::LbWriter,
    mirror: mirror::MirrorWriter,
    overlay: overlay::OverlayWriter,
    links: attach::Links,
    attachments: Vec<Attachment>,
    pin_dir: PathBuf,
    /// Nodes the cluster named in `tm_tunnel_peers`.
    cluster_peers: std::collections::BTreeSet<std::net::Ipv4Addr>,
    /// The maps were pinned by an earlier daemon (`keep_dataplane`).
    kept: bool,
}

/// Shared access to the running dataplane.
#[derive(Clone)]
pub struct DataplaneHandle {
    running: Arc<Mutex<Option<Running>>>,
    /// This node's tunnel endpoint as `tm_tunnel` holds it (it follows the
    /// uplink's address unless `lb.node_address` is set).
    tunnel: Arc<tokio::sync::watch::Sender<tunnel::TunnelSettings>>,
    /// The map sizes of `[dataplane]` (set when configured).
    sizes: Arc<std::sync::Mutex<pins::Sizes>>,
    /// Raised when the overlay's remote nodes changed (their next hops are
    /// resolved with the LB's, see [`DataplaneHandle::set_hops`]).
    overlay_nodes: Arc<tokio::sync::Notify>,
}

impl Default for DataplaneHandle {
    fn default() -> Self {
        Self {
            running: Arc::default(),
            tunnel: Arc::new(tokio::sync::watch::Sender::new(Default::default())),
            sizes: Arc::default(),
            overlay_nodes: Arc::default(),
        }
    }
}

impl DataplaneHandle {
    /// Bytes of `tm_mirror_copy` (`dataplane.mirror_copy_bytes`).
    pub fn mirror_copy_bytes(&self) -> u32 {
        self.sizes.lock().expect("sizes lock").mirror_copies
    }

    /// Entries of the overlay's instance maps (`dataplane.instance_entries`).
    pub fn instance_entries(&self) -> u32 {
        self.sizes.lock().expect("sizes lock").instances
    }

    /// The map space LB tables must fit in (`dataplane.maglev_entries`,
    /// `target_entries`, `flow_entries`).
    pub fn lb_capacity(&self) -> crate::config::LbCapacity {
        self.sizes.lock().expect("sizes lock").lb_capacity()
    }

    /// The node's tunnel endpoint now.
    pub fn tunnel(&self) -> tunnel::TunnelSettings {
        *self.tunnel.borrow()
    }

    /// Changes of the node's tunnel address (see [`tunnel::follow_uplink`]).
    pub fn watch_tunnel(&self) -> tokio::sync::watch::Receiver<tunnel::TunnelSettings> {
        self.tunnel.subscribe()
    }

    /// Moves the tunnel endpoint to `address`: `tm_tunnel` first (packets
    /// to the new address are taken), then whoever follows it is told.
    pub async fn move_tunnel(&self, address: std::net::Ipv4Addr) -> Result<(), DataplaneError> {
        let mut settings = self.tunnel();
        settings.address = Some(address);
        {
            let mut guard = self.running.lock().await;
            let running = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
            tunnel::write(&mut running.ebpf, settings)?;
        }
        self.tunnel.send_replace(settings);
        Ok(())
    }

    /// Per-program counters summed over CPUs.
    pub async fn counters(&self) -> Result<Vec<ProgramCounters>, DataplaneError> {
        let guard = self.running.lock().await;
        let running = guard.as_ref().ok_or(DataplaneError::NotRunning)?;
        read_counters(&running.ebpf)
    }

    pub async fn attachments(&self) -> Vec<Attachment> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|r| r.attachments.clone())
            .unwrap_or_default()
    }

    /// Every attachment (or only the start's) and whether the kernel still
    /// has it ([`attach::in_kernel`]).
    pub async fn attachments_in_kernel(&self, at_start: bool) -> Vec<(Attachment, bool)> {
        let mut list = self.attachments().await;
        list.retain(|a| a.at_start || !at_start);
        tokio::task::spawn_blocking(move || {
            list.into_iter()
                .map(|a| {
                    let there = attach::in_kernel(&a);
                    (a, there)
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Whether the running dataplane took over maps an earlier daemon kept.
    pub async fn kept(&self) -> bool {
        self.running.lock().await.as_ref().is_some_and(|r| r.kept)
    }

    /// Makes the load-balancing maps hold `tables` (see [`lb::LbWriter::apply`]).
    pub async fn apply_lb(
        &self,
        tables: &lb::LbTables,
        tunnel: lb::TunnelSettings,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let running = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let written: Vec<_> = running.lb.vip_keys().map(|(_, k)| *k).collect();
        vip_overlap::check(
            tables.vips.iter().map(|v| (v.name.as_str(), &v.key)),
            &vip_overlap::overlay_addresses(running.overlay.written()),
            |_, key, _| written.contains(key),
        )?;
        let resolve = |name: &str| crate::net::link::mac(name).map_err(|e| e.to_string());
        tokio::task::block_in_place(|| {
            running
                .lb
                .apply(&mut running.ebpf, tables, tunnel, &resolve)
        })
    }

    /// Makes `tm_tunnel_peers` name the cluster's other nodes (`PEER_CLUSTER`).
    pub async fn set_cluster_peers(
        &self,
        peers: std::collections::BTreeSet<std::net::Ipv4Addr>,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let running = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        tunnel::write_peers(
            &mut running.ebpf,
            tapmesh_common::tunnel::PEER_CLUSTER,
            &running.cluster_peers,
            &peers,
        )?;
        running.cluster_peers = peers;
        Ok(())
    }

    /// Replaces the resolved next hops of remote nodes: the LB's remote
    /// targets and the overlay's remote instances take them.
    pub async fn set_hops(
        &self,
        hops: std::collections::BTreeMap<std::net::Ipv4Addr, lb::Hop>,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let running = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        running.lb.set_hops(&mut running.ebpf, hops.clone())?;
        running.overlay.set_hops(&mut running.ebpf, hops)
    }

    /// Replaces the addresses of this node's interfaces, which no tunnel
    /// packet for a container here may carry as its inner source.
    pub async fn set_own_addrs(
        &self,
        own: std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let running = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        running.overlay.set_own_addrs(&mut running.ebpf, own)
    }

    /// The nodes of the overlay's remote instances as written.
    pub async fn overlay_remote_nodes(&self) -> Vec<std::net::Ipv4Addr> {
        let guard = self.running.lock().await;
        guard
            .as_ref()
            .map(|r| r.overlay.remote_nodes().iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether the next hops of all `nodes` are known (resolved by the
    /// follower and given with [`DataplaneHandle::set_hops`]).
    pub async fn overlay_hops_known(
        &self,
        nodes: &std::collections::BTreeSet<std::net::Ipv4Addr>,
    ) -> bool {
        let guard = self.running.lock().await;
        guard
            .as_ref()
            .is_some_and(|r| nodes.iter().all(|n| r.overlay.has_hop(n)))
    }

    /// Raised when [`DataplaneHandle::overlay_remote_nodes`] changed.
    pub fn overlay_nodes_changed(&self) -> Arc<tokio::sync::Notify> {
        self.overlay_nodes.clone()
    }

    /// Per-VIP, per-flow and per-target counters.
    pub async fn lb_counters(&self) -> Result<lb::LbCounters, DataplaneError> {
        let guard = self.running.lock().await;
        let running = guard.as_ref().ok_or(DataplaneError::NotRunning)?;
        running.lb.counters(&running.ebpf)
    }

    /// Makes `interface` copy packets for tap flows: nothing to do if it has
    /// both TC hooks of this interface (the full programs copy too), else the
    /// copy-only programs. Attachments of a re-created interface are replaced.
    pub async fn attach_tap(&self, interface: &str) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let ifindex = crate::net::link::index(interface);
        let has = |hook: Hook| {
            r.attachments
                .iter()
                .any(|a| a.interface == interface && a.hook == hook && a.ifindex == ifindex)
        };
        if has(Hook::TcIngress) && has(Hook::TcEgress) {
            return Ok(());
        }
        let uplink_ingress = is_uplink(&r.attachments, interface) && has(Hook::TcIngress);
        let (ebpf, links, attachments) = (&mut r.ebpf, &mut r.links, &mut r.attachments);
        tokio::task::block_in_place(|| {
            if uplink_ingress {
                // Its ingress program already copies; it must not go away, even briefly.
                return attach::uplink_tap_egress(ebpf, links, attachments, interface);
            }
            attach::detach_tc(ebpf, links, attachments, interface)?;
            attach::tc_programs(ebpf, links, attachments, interface, attach::TC_TAP)
        })
    }

    /// Detaches the copy-only TC programs from `interface` (a gone interface is fine).
    /// Only [`Self::attach_tap`]'s: a container's or conduit's port has
    /// `tm_tc_tap_in` too, beside the programs its traffic needs.
    pub async fn detach_tap(&self, interface: &str) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let ours = r.attachments.iter().any(|a| {
            a.interface == interface && a.program == tapmesh_common::program_names::TC_TAP_OUT
        });
        if !ours {
            return Ok(());
        }
        let uplink = is_uplink(&r.attachments, interface);
        let (ebpf, links, attachments) = (&mut r.ebpf, &mut r.links, &mut r.attachments);
        tokio::task::block_in_place(|| {
            if uplink {
                // Back to what every uplink carries: its ingress program stays.
                return attach::detach_tc_hook(ebpf, links, attachments, interface, Hook::TcEgress);
            }
            attach::detach_tc(ebpf, links, attachments, interface)
        })
    }

    /// Makes the mirror maps hold `tables`.
    pub async fn apply_mirror(&self, tables: &mirror::MirrorTables) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        r.mirror.apply(&mut r.ebpf, tables)
    }

    pub async fn reset_mirror_counter(&self, flow: u32) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        r.mirror.reset_counter(&mut r.ebpf, flow)
    }

    pub async fn mirror_counter(
        &self,
        flow: u32,
    ) -> Result<tapmesh_common::mirror::MirrorCounter, DataplaneError> {
        let guard = self.running.lock().await;
        let r = guard.as_ref().ok_or(DataplaneError::NotRunning)?;
        r.mirror.counter(&r.ebpf, flow)
    }

    /// Attaches `tm_xdp_mirror` to a ring interface and points it at socket `fd`.
    pub async fn attach_ring(
        &self,
        interface: &str,
        ifindex: u32,
        slot: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        r.mirror.set_ring(&mut r.ebpf, ifindex, slot, fd)?;
        match attach::xdp_mirror(&mut r.ebpf, &mut r.links, interface) {
            Ok(attachment) => {
                r.attachments.push(attachment);
                Ok(())
            }
            Err(e) => {
                r.mirror.remove_ring(&mut r.ebpf, ifindex, slot);
                Err(e)
            }
        }
    }

    pub async fn detach_ring(&self, interface: &str, ifindex: u32, slot: u32) {
        let mut guard = self.running.lock().await;
        if let Some(r) = guard.as_mut() {
            let _ =
                attach::detach_xdp_mirror(&mut r.ebpf, &mut r.links, &mut r.attachments, interface);
            r.mirror.remove_ring(&mut r.ebpf, ifindex, slot);
        }
    }

    /// Makes the overlay maps hold `tables`.
    pub async fn apply_overlay(
        &self,
        tables: &overlay::OverlayTables,
    ) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let written = vip_overlap::overlay_addresses(r.overlay.written());
        vip_overlap::check(
            r.lb.vip_keys(),
            &vip_overlap::overlay_addresses(tables),
            |_, _, addr| written.iter().any(|(a, _)| *a == addr),
        )?;
        let before = r.overlay.remote_nodes().clone();
        let result = r.overlay.apply(&mut r.ebpf, tables);
        if *r.overlay.remote_nodes() != before {
            self.overlay_nodes.notify_one();
        }
        result
    }

    /// Refuses `tables` as [`Self::apply_overlay`] would now (an address
    /// of theirs inside a VIP), writing nothing: a writer that feeds both
    /// the LB and the overlay asks before writing either.
    pub async fn check_overlay(
        &self,
        tables: &overlay::OverlayTables,
    ) -> Result<(), DataplaneError> {
        let guard = self.running.lock().await;
        let r = guard.as_ref().ok_or(DataplaneError::NotRunning)?;
        let written = vip_overlap::overlay_addresses(r.overlay.written());
        vip_overlap::check(
            r.lb.vip_keys(),
            &vip_overlap::overlay_addresses(tables),
            |_, _, addr| written.iter().any(|(a, _)| *a == addr),
        )
    }

    /// Which of `addrs` the tunnel let in since the last call, as inner
    /// sources from their owner ([`overlay::OverlayWriter::take_seen`]).
    pub async fn overlay_sources_seen(
        &self,
        addrs: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> Result<std::collections::BTreeSet<std::net::IpAddr>, DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        r.overlay.take_seen(&mut r.ebpf, addrs)
    }

    /// Per-service and per-instance counters of the overlay.
    pub async fn overlay_counters(
        &self,
    ) -> Result<
        (
            std::collections::BTreeMap<u32, tapmesh_common::PacketCounter>,
            std::collections::BTreeMap<u32, tapmesh_common::PacketCounter>,
        ),
        DataplaneError,
    > {
        let guard = self.running.lock().await;
        let r = guard.as_ref().ok_or(DataplaneError::NotRunning)?;
        r.overlay.counters(&r.ebpf)
    }

    /// Lets the next packet to `service` signal a miss again.
    pub async fn clear_overlay_pending(&self, service: std::net::IpAddr) {
        if let Some(r) = self.running.lock().await.as_mut() {
            r.overlay.clear_pending(&mut r.ebpf, service);
        }
    }

    /// Names a socket that sends held packets again into host-side veth
    /// `on`, or forgets it (`tm_ov_resend`).
    pub async fn resend_socket(&self, cookie: u64, on: Option<u32>) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        r.overlay.resend_socket(&mut r.ebpf, cookie, on)
    }

    /// Lets every address a previous daemon left pending signal a miss again.
    pub async fn clear_all_overlay_pending(&self) -> usize {
        match self.running.lock().await.as_mut() {
            Some(r) => r.overlay.clear_all_pending(&mut r.ebpf),
            None => 0,
        }
    }

    /// The ring buffer of overlay misses (taken once: its reader owns it).
    pub async fn take_overlay_misses(
        &self,
    ) -> Result<aya::maps::RingBuf<aya::maps::MapData>, DataplaneError> {
        self.take_ring(map_names::OV_MISSES).await
    }

    /// The ring buffer of packets held for unknown service IPs (taken once).
    pub async fn take_overlay_held(
        &self,
    ) -> Result<aya::maps::RingBuf<aya::maps::MapData>, DataplaneError> {
        self.take_ring(map_names::OV_HELD).await
    }

    async fn take_ring(
        &self,
        name: &'static str,
    ) -> Result<aya::maps::RingBuf<aya::maps::MapData>, DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let map = r.ebpf.take_map(name).ok_or(DataplaneError::Map {
            name,
            message: "already taken or missing from the object".into(),
        })?;
        aya::maps::RingBuf::try_from(map).map_err(|e| DataplaneError::Map {
            name,
            message: e.to_string(),
        })
    }

    /// The ring buffer of mirror copies (taken once: its reader owns it).
    pub async fn take_mirror_copies(
        &self,
    ) -> Result<aya::maps::RingBuf<aya::maps::MapData>, DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let name = map_names::MIRROR_COPIES;
        let map = r.ebpf.take_map(name).ok_or(DataplaneError::Map {
            name,
            message: "already taken or missing from the object".into(),
        })?;
        aya::maps::RingBuf::try_from(map).map_err(|e| DataplaneError::Map {
            name,
            message: e.to_string(),
        })
    }

    /// Attaches the container programs to a container's host-side veth.
    pub async fn attach_container(&self, interface: &str) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let (ebpf, links, attachments) = (&mut r.ebpf, &mut r.links, &mut r.attachments);
        tokio::task::block_in_place(|| {
            attach::tc_programs(ebpf, links, attachments, interface, attach::TC_CONTAINER)
        })
    }

    /// Attaches the conduit programs to a conduit's node-side veth.
    pub async fn attach_conduit(&self, interface: &str) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let ifindex = crate::net::link::index(interface);
        let attached = r.attachments.iter().any(|a| {
            a.interface == interface
                && a.program == tapmesh_common::program_names::TC_CONDUIT
                && a.ifindex == ifindex
        });
        if attached {
            return Ok(());
        }
        let (ebpf, links, attachments) = (&mut r.ebpf, &mut r.links, &mut r.attachments);
        tokio::task::block_in_place(|| {
            attach::detach_tc(ebpf, links, attachments, interface)?;
            attach::tc_programs(ebpf, links, attachments, interface, attach::TC_CONDUIT)
        })
    }

    /// Detaches them (a gone interface is fine).
    pub async fn detach_container(&self, interface: &str) -> Result<(), DataplaneError> {
        let mut guard = self.running.lock().await;
        let r = guard.as_mut().ok_or(DataplaneError::NotRunning)?;
        let (ebpf, links, attachments) = (&mut r.ebpf, &mut r.links, &mut r.attachments);
        tokio::task::block_in_place(|| attach::detach_tc(ebpf, links, attachments, interface))
    }

    pub async fn pin_dir(&self) -> Option<PathBuf> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|r| r.pin_dir.clone())
    }
}

/// Reads `tm_stats` and sums each slot over CPUs.
pub fn read_counters(ebpf: &Ebpf) -> Result<Vec<ProgramCounters>, DataplaneError> {
    let map = ebpf.map(map_names::STATS).ok_or(DataplaneError::Map {
        name: map_names::STATS,
        message: "missing from the object".into(),
    })?;
    let stats: PerCpuArray<_, ProgramStats> =
        PerCpuArray::try_from(map).map_err(|e| DataplaneError::Map {
            name: map_names::STATS,
            message: e.to_string(),
        })?;
    ProgramSlot::ALL
        .iter()
        .map(|&slot| {
            let per_cpu = stats
                .get(&(slot as u32), 0)
                .map_err(|e| DataplaneError::Map {
                    name: map_names::STATS,
                    message: e.to_string(),
                })?;
            let mut total = ProgramStats::default();
            for cpu in per_cpu.iter() {
                total.merge(cpu);
            }
            Ok(ProgramCounters { slot, stats: total })
        })
        .collect()
}

pub struct DataplanePlugin {
    handle: DataplaneHandle,
    config: std::sync::Mutex<DataplaneConfig>,
    /// The uplink whose address is the tunnel endpoint (no `lb.node_address`).
    follow: std::sync::Mutex<Option<String>>,
    /// `lb.tunnel_peers`, written at start (`PEER_STATIC`).
    peers: std::sync::Mutex<std::collections::BTreeSet<std::net::Ipv4Addr>>,
}

impl DataplanePlugin {
    pub fn new(handle: DataplaneHandle) -> Self {
        Self {
            handle,
            config: std::sync::Mutex::new(DataplaneConfig::default()),
            follow: Default::default(),
            peers: Default::default(),
        }
    }

    fn config(&self) -> DataplaneConfig {
        self.config.lock().expect("config lock").clone()
    }
}

#[async_trait]
impl Plugin for DataplanePlugin {
    fn name(&self) -> &'static str {
        "dataplane"
    }

    async fn configure(
        &self,
        _scope: CancellationToken,
        config: &Config,
    ) -> Result<(), PluginError> {
        *self.config.lock().expect("config lock") = config.dataplane.clone();
        *self.handle.sizes.lock().expect("sizes lock") = pins::Sizes::of(&config.dataplane);
        self.handle
            .tunnel
            .send_replace(tunnel::TunnelSettings::of(config));
        *self.follow.lock().expect("follow lock") = match config.lb.node_address {
            Some(_) => None,
            None => config.dataplane.uplinks.first().cloned(),
        };
        *self.peers.lock().expect("peers lock") = config.lb.tunnel_peers.iter().copied().collect();
        Ok(())
    }

    async fn start(&self, scope: CancellationToken) -> Result<(), PluginError> {
        let config = self.config();
        let tunnel = self.handle.tunnel();
        let peers = self.peers.lock().expect("peers lock").clone();
        let running = tokio::task::spawn_blocking(move || start_dataplane(&config, tunnel, &peers))
            .await
            .map_err(|e| PluginError::new(e.to_string()))?
            .map_err(|e| PluginError::new(e.to_string()))?;
        for a in &running.attachments {
            tracing::info!(interface = %a.interface, hook = %a.hook, program = a.program, mode = a.mode, "attached");
        }
        *self.handle.running.lock().await = Some(running);
        if let Some(uplink) = self.follow.lock().expect("follow lock").clone() {
            tokio::spawn(tunnel::follow_uplink(self.handle.clone(), uplink, scope));
        }
        Ok(())
    }

    async fn stop(&self, _scope: CancellationToken) -> Result<(), PluginError> {
        let config = self.config();
        let Some(running) = self.handle.running.lock().await.take() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || stop_dataplane(running, &config))
            .await
            .map_err(|e| PluginError::new(e.to_string()))?
            .map_err(|e| PluginError::new(e.to_string()))
    }

    fn status(&self) -> String {
        // Copied out: the kernel is asked below without holding the dataplane.
        let running = match self.handle.running.try_lock() {
            Ok(guard) => guard
                .as_ref()
                .map(|r| (r.pin_dir.clone(), r.attachments.clone())),
            Err(_) => return "busy".into(),
        };
        match running {
            Some((pin_dir, attachments)) => {
                let list: Vec<String> = attachments
                        .iter()
                        .map(|a| {
                            format!(
                                "{} {}{}{}",
                                a.interface,
                                a.hook,
                                if a.mode.is_empty() {
                                    String::new()
                                } else {
                                    format!(" ({})", a.mode)
                                },
                                if attach::in_kernel(a) {
                                    ""
                                } else {
                                    " (gone from the kernel: detached by something else, or the interface was removed)"
                                }
                            )
                        })
                        .collect();
                format!(
                    "pins in {}; attached: {}",
                    pin_dir.display(),
                    if list.is_empty() {
                        "nothing".into()
                    } else {
                        list.join(", ")
                    }
                )
            }
            None => "not loaded".into(),
        }
    }
}

/// Whether `interface` carries the uplink's XDP program.
fn is_uplink(attachments: &[Attachment], interface: &str) -> bool {
    attachments
        .iter()
        .any(|a| a.interface == interface && a.program == tapmesh_common::program_names::XDP_UPLINK)
}

/// A veth uplink would hand a container's pending (offloaded) checksum to
/// the other node's XDP program, which cannot carry it and, where it
/// translates a reply's source, cannot keep it either: the checksums are
/// finished here instead, as a NIC would (`docs/ARCHITECTURE.md`,
/// "Native XDP redirect into a veth"). Not fatal: logged.
fn veth_uplink_checksums(interface: &str) {
    let veth = crate::net::link::by_name(interface)
        .ok()
        .and_then(|l| crate::net::peer::facts(l.index).ok())
        .is_some_and(|f| f.veth);
    if !veth {
        return;
    }
    match crate::net::ethtool::tx_checksum_off(interface) {
        Ok(true) => tracing::info!(
            uplink = interface,
            "the uplink is a veth: its TX checksum offload is turned off, so packets leave it with \
             complete checksums (another node's XDP program cannot finish a pending one)"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            uplink = interface,
            "the uplink is a veth and its TX checksum offload stays on ({e}): replies through \
             RR or Closest service IPs from another node may arrive with bad checksums; turn it \
             off (ethtool -K {interface} tx off)"
        ),
    }
}

/// Loads, pins and attaches; on any failure nothing this start attached stays
/// attached, and pins stay only if an earlier (kept) dataplane owned them.
fn start_dataplane(
    config: &DataplaneConfig,
    tunnel: tunnel::TunnelSettings,
    peers: &std::collections::BTreeSet<std::net::Ipv4Addr>,
) -> Result<Running, DataplaneError> {
    let pin_dir = pins::prepare(&config.bpffs_root)?;
    let kept = pins::has_pins(&pin_dir);
    let sizes = pins::Sizes::of(config);
    let mut attachments = Vec::new();
    let mut links = attach::Links::default();
    let mut loaded = None;
    let result = (|| {
        let ebpf = loaded.insert(pins::load(BPF_OBJECT, &pin_dir, &sizes)?);
        attach::write_detour_key(ebpf)?;
        tunnel::write(ebpf, tunnel)?;
        // Every static peer, over any an earlier daemon named.
        tunnel::write_peers(ebpf, PEER_STATIC, peers, peers)?;
        // The uplinks' TC ingress before their XDP program, which may detour at once.
        // An uplink that is a TC interface gets `tm_tc_ingress`, which takes detours too.
        for interface in config
            .uplinks
            .iter()
            .filter(|u| !config.tc_interfaces.contains(u))
        {
            attach::uplink_tc(ebpf, &mut links, &mut attachments, interface)?;
        }
        // `ebpf` owns every link: dropping it detaches them.
        for interface in &config.uplinks {
            attachments.push(attach::xdp(
                ebpf,
                &mut links,
                interface,
                config.xdp_mode,
                &pin_dir,
                config.keep_dataplane,
            )?);
        }
        attach::redirect_failures(ebpf, &attachments);
        for interface in &config.uplinks {
            veth_uplink_checksums(interface);
        }
        for a in attachments.iter().filter(|a| a.mode.starts_with("native")) {
            if let Some(peer) = crate::net::peer::unready_peer(&a.interface) {
                tracing::warn!(
                    uplink = %a.interface,
                    peer,
                    "the uplink's veth peer has neither a native XDP program nor GRO on, so \
                     no NAPI: what XDP sends back out of the uplink (to remote targets, through \
                     the tunnel) is dropped there, counted as redirect_failed; turn GRO on at \
                     the peer (ethtool -K {peer} gro on) or use xdp_mode = \"generic\""
                );
            }
        }
        for interface in &config.tc_interfaces {
            attach::tc(ebpf, &mut links, &mut attachments, interface)?;
        }
        // Listed as before: the uplinks' XDP first.
        attachments.sort_by_key(|a| a.hook != Hook::Xdp);
        for a in &mut attachments {
            a.at_start = true;
        }
        if kept {
            for line in cleanup::unconfigured(&pin_dir, &config.uplinks, &config.tc_interfaces) {
                tracing::warn!("kept dataplane: {line}");
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        links.unpin_all();
        drop(loaded);
        attach::cleanup(&attachments);
        if !kept {
            pins::remove(&pin_dir);
        }
        return Err(e);
    }
    Ok(Running {
        kept,
        ebpf: loaded.expect("loaded when attaching succeeded"),
        lb: lb::LbWriter::with_capacity(sizes.lb_capacity()),
        mirror: mirror::MirrorWriter::default(),
        overlay: overlay::OverlayWriter::default(),
        links,
        attachments,
        pin_dir,
        cluster_peers: Default::default(),
    })
}

fn stop_dataplane(mut running: Running, config: &DataplaneConfig) -> Result<(), DataplaneError> {
    if config.keep_dataplane {
        let links = std::mem::take(&mut running.links);
        attach::keep(&mut running.ebpf, links, &running.pin_dir)?;
        tracing::info!(pins = %running.pin_dir.display(), "dataplane left attached (keep_dataplane)");
        return Ok(());
    }
    let Running {
        ebpf,
        attachments,
        pin_dir,
        ..
    } = running;
    drop(ebpf);
    attach::cleanup(&attachments);
    pins::remove(&pin_dir);
    tracing::info!("dataplane detached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::BPF_OBJECT;

    /// The kernel keeps 15 bytes of a map's or program's name
    /// (BPF_OBJ_NAME_LEN − 1): a longer name is cut, and names cut alike
    /// are one name to `bpftool`.
    const KERNEL_NAME_LEN: usize = 15;

    /// Every map of the object, and every program the daemon attaches (the
    /// bench's probes, never attached, keep their long names).
    #[test]
    fn map_and_program_names_fit_the_kernel_and_are_unique() {
        use tapmesh_common::program_names as p;
        let object = aya_obj::Object::parse(BPF_OBJECT).expect("parsing the embedded BPF object");
        let maps = object.maps.keys().map(String::as_str);
        let attached = [
            p::XDP_UPLINK,
            p::TC_INGRESS,
            p::TC_EGRESS,
            p::XDP_FLOOR,
            p::TC_FLOOR,
            p::XDP_MIRROR,
            p::TC_TAP_OUT,
            p::TC_TAP_IN,
            p::TC_SERVICE,
            p::TP_XMIT,
            p::TP_REDIRECT_ERR,
            p::TP_BULK_TX,
            p::TC_CONDUIT,
            p::XDP_PORT_NAT,
        ];
        for name in attached {
            assert!(object.programs.contains_key(name), "no program {name}");
        }
        let mut cut: BTreeMap<&str, &str> = BTreeMap::new();
        let mut count = 0;
        for name in maps.filter(|n| !n.starts_with('.')).chain(attached) {
            assert!(
                name.len() <= KERNEL_NAME_LEN,
                "{name} is {} bytes; the kernel keeps {KERNEL_NAME_LEN}",
                name.len()
            );
            if let Some(other) = cut.insert(&name[..name.len().min(KERNEL_NAME_LEN)], name) {
                panic!("{name} and {other} have the same name in the kernel");
            }
            count += 1;
        }
        assert!(count > 40, "only {count} names found in the object");
    }

    /// Every name in `map_names` is a map of the object (pins are named by them).
    #[test]
    fn map_names_are_the_objects() {
        let object = aya_obj::Object::parse(BPF_OBJECT).expect("parsing the embedded BPF object");
        use tapmesh_common::map_names as n;
        for name in [
            n::STATS,
            n::VIPS,
            n::VIP_HOSTS,
            n::VIP_SLOTS,
            n::VIP_VALUES,
            n::VIP_CONFIGS,
            n::DST_PORTS,
            n::SRC_PORTS,
            n::SOURCES,
            n::FLOWS,
            n::XDP_TAILS,
            n::PORT_NAT_PICK,
            n::STREAMS,
            n::MAGLEV,
            n::TARGETS,
            n::LB_CONFIG,
            n::TUNNEL,
            n::TUNNEL_PEERS,
            n::VIP_STATS,
            n::FLOW_STATS,
            n::TARGET_STATS,
            n::MIRROR_PORTS,
            n::MIRROR_FILTER,
            n::DETOUR_KEY,
            n::MIRROR_VLANS,
            n::MIRROR_STATS,
            n::MIRROR_RINGS,
            n::XSKS,
            n::MIRROR_COPIES,
            n::MIRROR_SCRATCH,
            n::OV_CONFIG,
            n::OV_SERVICES,
            n::OV_SLOTS,
            n::OV_ROUND_ROBIN,
            n::OV_INSTANCES,
            n::OV_LOCALS,
            n::OV_LOCAL_SLOTS,
            n::OV_OWNERS,
            n::OV_OWNER_SLOTS,
            n::OV_OWNER_SLOTS6,
            n::OV_OWNERS6,
            n::OV_CONFIG6,
            n::OV_SERVICES6,
            n::OV_INSTANCES6,
            n::OV_LOCALS6,
            n::OV_CONNTRACK6,
            n::OV_PENDING6,
            n::OV_FRAGMENTS,
            n::OV_FRAGMENTS6,
            n::OV_CONNTRACK,
            n::OV_PENDING,
            n::OV_MISSES,
            n::OV_HELD,
            n::OV_HOLD_ADDRS,
            n::OV_HOLD_VETHS,
            n::OV_RESEND,
            n::OV_SERVICE_STATS,
            n::OV_INSTANCE_STATS,
        ] {
            assert!(
                object.maps.contains_key(name),
                "{name} is not a map of the object"
            );
        }
    }
}
