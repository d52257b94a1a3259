//! The pin directory: bpffs checks, loading with pinned maps, removal.

use std::{
    ffi::CString,
    mem::size_of,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use aya::{maps::MapInfo, Ebpf, EbpfLoader};
use tapmesh_common::{
    lb::{
        FlowEntry, FlowMask, LbConfig, PortData, SourceData, StreamValue, Target, VipAddr,
        VipConfig, VipValue, FLOW_SLOTS, MAGLEV_CAPACITY, MAX_CONFIGS, MAX_FLOWS, MAX_PREFIXES,
        MAX_STREAMS, MAX_TARGETS, MAX_VIPS,
    },
    map_names as n,
    mirror::{
        MirrorCounter, MirrorPort, VlanSet, COPY_RING_BYTES, COPY_SCRATCH_BYTES, FILTER_WORDS,
        MAX_MIRROR_PORTS, MAX_RINGS, MAX_TAP_FLOWS,
    },
    overlay as ov, PacketCounter, ProgramSlot, ProgramStats, SCHEMA_VERSION,
};

use super::DataplaneError;

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// What each pinned map must look like; a pin that differs is from another build.
struct MapSpec {
    name: &'static str,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const fn spec(name: &'static str, key_size: usize, value_size: usize, max_entries: u32) -> MapSpec {
    MapSpec {
        name,
        key_size: key_size as u32,
        value_size: value_size as u32,
        max_entries,
    }
}

/// LPM keys carry a 4-byte prefix length before their data.
const LPM: usize = 4;

const MAPS: &[MapSpec] = &[
    spec(n::STATS, 4, size_of::<ProgramStats>(), ProgramSlot::COUNT),
    spec(
        n::VIPS,
        LPM + size_of::<VipAddr>(),
        size_of::<VipValue>(),
        MAX_VIPS,
    ),
    spec(
        n::VIP_HOSTS,
        size_of::<VipAddr>(),
        size_of::<VipValue>(),
        MAX_VIPS,
    ),
    spec(
        n::VIP_SLOTS,
        4,
        size_of::<tapmesh_common::lb::VipSlot>(),
        tapmesh_common::lb::VIP_SLOTS,
    ),
    spec(n::VIP_VALUES, 4, size_of::<VipValue>(), MAX_VIPS),
    spec(n::VIP_CONFIGS, 4, size_of::<VipConfig>(), MAX_CONFIGS),
    spec(
        n::DST_PORTS,
        LPM + size_of::<PortData>(),
        size_of::<FlowMask>(),
        MAX_PREFIXES,
    ),
    spec(
        n::SRC_PORTS,
        LPM + size_of::<PortData>(),
        size_of::<FlowMask>(),
        MAX_PREFIXES,
    ),
    spec(
        n::SOURCES,
        LPM + size_of::<SourceData>(),
        size_of::<FlowMask>(),
        MAX_PREFIXES,
    ),
    spec(n::FLOWS, 4, size_of::<FlowEntry>(), FLOW_SLOTS),
    spec(n::STREAMS, 4, size_of::<StreamValue>(), MAX_STREAMS),
    spec(n::MAGLEV, 4, 4, MAGLEV_CAPACITY),
    spec(n::TARGETS, 4, size_of::<Target>(), MAX_TARGETS),
    spec(n::LB_CONFIG, 4, size_of::<LbConfig>(), 1),
    spec(
        n::PORT_NATS,
        size_of::<tapmesh_common::lb::PortNatKey>(),
        size_of::<tapmesh_common::lb::PortNatValue>(),
        2 * tapmesh_common::lb::MAX_PORT_NATS,
    ),
    spec(
        n::PORT_NAT_REPLIES,
        LPM + size_of::<tapmesh_common::lb::NatReplyData>(),
        size_of::<tapmesh_common::lb::PortNatValue>(),
        2 * tapmesh_common::lb::MAX_PORT_NATS,
    ),
    spec(
        n::VIP_SENDERS,
        size_of::<tapmesh_common::lb::VipSender>(),
        1,
        2 * tapmesh_common::lb::MAX_VIP_SENDERS,
    ),
    spec(
        n::TUNNEL,
        4,
        size_of::<tapmesh_common::tunnel::TunnelConfig>(),
        1,
    ),
    spec(n::TUNNEL_PEERS, 4, 1, tapmesh_common::tunnel::MAX_PEERS),
    spec(n::XDP_TAILS, 4, 4, 1),
    spec(
        n::PORT_NAT_PICK,
        4,
        size_of::<tapmesh_common::lb::PortNatPick>(),
        1,
    ),
    spec(
        n::TUNNEL_SLOTS,
        4,
        size_of::<tapmesh_common::tunnel::PeerSlot>(),
        tapmesh_common::tunnel::PEER_SLOTS,
    ),
    spec(n::VIP_STATS, 4, size_of::<PacketCounter>(), MAX_VIPS),
    spec(n::FLOW_STATS, 4, size_of::<PacketCounter>(), MAX_FLOWS),
    spec(n::TARGET_STATS, 4, size_of::<PacketCounter>(), MAX_TARGETS),
    spec(
        n::MIRROR_PORTS,
        4,
        size_of::<MirrorPort>(),
        MAX_MIRROR_PORTS,
    ),
    spec(n::MIRROR_FILTER, 4, 8, FILTER_WORDS),
    spec(n::UPLINK_BITS, 4, 8, FILTER_WORDS),
    spec(n::DETOUR_KEY, 4, 8, 1),
    spec(n::MIRROR_VLANS, 4, size_of::<VlanSet>(), MAX_TAP_FLOWS),
    spec(
        n::MIRROR_STATS,
        4,
        size_of::<MirrorCounter>(),
        MAX_TAP_FLOWS,
    ),
    spec(n::MIRROR_RINGS, 4, 4, MAX_RINGS),
    spec(n::XSKS, 4, 4, MAX_RINGS),
    spec(n::MIRROR_COPIES, 0, 0, COPY_RING_BYTES),
    spec(n::MIRROR_SCRATCH, 4, COPY_SCRATCH_BYTES as usize, 1),
    spec(n::OV_CONFIG, 4, size_of::<ov::OverlayConfig>(), 1),
    spec(
        n::OV_SERVICES,
        4,
        size_of::<ov::Service>(),
        ov::MAX_SERVICES,
    ),
    spec(n::OV_SLOTS, 4, 4, ov::SLOT_ENTRIES),
    spec(n::OV_ROUND_ROBIN, 4, 4, ov::MAX_SERVICES),
    spec(
        n::OV_INSTANCES,
        4,
        size_of::<ov::Instance>(),
        ov::MAX_INSTANCES,
    ),
    spec(n::OV_LOCALS, 4, size_of::<ov::Local>(), ov::MAX_LOCALS),
    spec(
        n::OV_LOCAL_SLOTS,
        4,
        size_of::<ov::LocalSlot>(),
        ov::LOCAL_SLOTS,
    ),
    spec(n::OV_CONFIG6, 4, size_of::<ov::OverlayConfig6>(), 1),
    spec(n::OV_PENDING6, 16, 8, ov::PENDING_ENTRIES),
    spec(
        n::OV_FRAGMENTS,
        size_of::<ov::FragmentKey>(),
        size_of::<ov::ConntrackValue>(),
        ov::FRAGMENT_ENTRIES,
    ),
    spec(
        n::OV_FRAGMENTS6,
        size_of::<ov::FragmentKey6>(),
        size_of::<ov::ConntrackValue6>(),
        ov::FRAGMENT_ENTRIES,
    ),
    spec(
        n::OV_SERVICES6,
        16,
        size_of::<ov::Service>(),
        ov::MAX_SERVICES,
    ),
    spec(
        n::OV_INSTANCES6,
        4,
        size_of::<ov::Instance6>(),
        ov::MAX_INSTANCES,
    ),
    spec(n::OV_LOCALS6, 16, size_of::<ov::Local6>(), ov::MAX_LOCALS),
    spec(n::OV_OWNERS, 4, 4, ov::MAX_OWNERS),
    spec(
        n::OV_OWNER_SLOTS,
        4,
        size_of::<ov::OwnerSlot>(),
        ov::OWNER_SLOTS,
    ),
    spec(
        n::OV_OWNER_SLOTS6,
        4,
        size_of::<ov::OwnerSlot6>(),
        ov::OWNER_SLOTS,
    ),
    spec(n::OV_OWNERS6, 16, 4, ov::MAX_OWNERS),
    spec(
        n::OV_CONNTRACK6,
        size_of::<ov::ConntrackKey6>(),
        size_of::<ov::ConntrackValue6>(),
        ov::CONNTRACK_ENTRIES6,
    ),
    spec(
        n::OV_CONNTRACK,
        size_of::<ov::ConntrackKey>(),
        size_of::<ov::ConntrackValue>(),
        ov::CONNTRACK_ENTRIES,
    ),
    spec(n::OV_PENDING, 4, 8, ov::PENDING_ENTRIES),
    spec(n::OV_ASKS, 4, 8, 2),
    spec(n::OV_MISSES, 0, 0, ov::MISS_RING_BYTES),
    spec(n::OV_HELD, 0, 0, ov::HELD_RING_BYTES),
    spec(n::OV_HOLD_ADDRS, 16, 8, ov::HOLD_ADDRESSES),
    spec(n::OV_HOLD_VETHS, 4, 8, ov::HOLD_ADDRESSES),
    spec(n::OV_RESEND, 8, 4, ov::RESEND_SOCKETS),
    spec(
        n::OV_SERVICE_STATS,
        4,
        size_of::<PacketCounter>(),
        ov::MAX_SERVICES,
    ),
    spec(
        n::OV_INSTANCE_STATS,
        4,
        size_of::<PacketCounter>(),
        ov::MAX_INSTANCES,
    ),
];

fn fs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure `root` lies on a bpffs (mounting /sys/fs/bpf if nothing is
/// mounted there) and returns `<root>/v<schema>`, created.
pub fn prepare(root: &Path) -> Result<PathBuf, DataplaneError> {
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) != Some(BPF_FS_MAGIC) {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if root.starts_with(sys_bpf)
            && fs_type(sys_bpf).is_some()
            && fs_type(sys_bpf) != Some(BPF_FS_MAGIC)
        {
            mount_bpffs(sys_bpf)?;
            tracing::info!("mounted bpffs on /sys/fs/bpf");
        } else {
            return Err(DataplaneError::Bpffs(format!(
                "{} is not on a bpf filesystem: mount one (mount -t bpf bpf /sys/fs/bpf) or set dataplane.bpffs_root",
                root.display()
            )));
        }
    }
    let dir = root.join(format!("v{SCHEMA_VERSION}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| DataplaneError::Bpffs(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

fn mount_bpffs(target: &Path) -> Result<(), DataplaneError> {
    let src = CString::new("bpf").expect("no NUL");
    let dst = CString::new(target.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Bpffs(format!(
            "mounting bpffs on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The map sizes `[dataplane]` may change from the object's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub maglev: u32,
    pub conntrack: u32,
    pub conntrack6: u32,
    pub mirror_copies: u32,
    pub targets: u32,
    pub flows: u32,
    pub instances: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self::of(&crate::config::DataplaneConfig::default())
    }
}

impl Sizes {
    pub fn of(config: &crate::config::DataplaneConfig) -> Self {
        Self {
            maglev: config.maglev_entries,
            conntrack: config.conntrack_entries,
            conntrack6: config.conntrack6_entries,
            mirror_copies: config.mirror_copy_bytes,
            targets: config.target_entries,
            flows: config.flow_entries,
            instances: config.instance_entries,
        }
    }

    /// The LB's share of these sizes.
    pub fn lb_capacity(&self) -> crate::config::LbCapacity {
        crate::config::LbCapacity {
            maglev_entries: self.maglev,
            target_entries: self.targets,
            flow_entries: self.flows,
        }
    }

    /// (map, entries) for every sized map.
    fn entries(&self) -> [(&'static str, u32); 10] {
        [
            (n::MAGLEV, self.maglev),
            (n::OV_CONNTRACK, self.conntrack),
            (n::OV_CONNTRACK6, self.conntrack6),
            (n::MIRROR_COPIES, self.mirror_copies),
            (n::TARGETS, self.targets),
            (n::TARGET_STATS, self.targets),
            (n::FLOW_STATS, self.flows),
            (n::OV_INSTANCES, self.instances),
            (n::OV_INSTANCES6, self.instances),
            (n::OV_INSTANCE_STATS, self.instances),
        ]
    }

    /// The entries `spec` is to have.
    fn of_map(&self, spec: &MapSpec) -> u32 {
        self.entries()
            .into_iter()
            .find(|(name, _)| *name == spec.name)
            .map_or(spec.max_entries, |(_, entries)| entries)
    }
}

/// The creation flags a pinned map must have (a map made without them
/// cannot be reused); other flags are not compared.
fn required_flags(name: &str) -> u32 {
    if name == n::MAGLEV {
        tapmesh_common::lb::MAGLEV_MAP_FLAGS
    } else {
        0
    }
}

/// Removes pins whose layout differs from this build's (or whose size
/// differs from the configured one), so the loader creates fresh maps
/// instead of reusing incompatible ones. A fresh `tm_maglev` is all zeros,
/// which reads as target 0, so the kept `tm_streams` that point into it go
/// too: until the LB writes again, streams have no table and drop.
fn drop_stale_pins(dir: &Path, sizes: &Sizes) -> Result<(), DataplaneError> {
    let remove = |name: &str| {
        std::fs::remove_file(dir.join(name)).map_err(|e| {
            DataplaneError::Bpffs(format!(
                "removing the stale pin {}: {e}",
                dir.join(name).display()
            ))
        })
    };
    let mut stale = Vec::new();
    for spec in MAPS {
        let Ok(info) = MapInfo::from_pin(dir.join(spec.name)) else {
            continue;
        };
        let found = (
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags() & required_flags(spec.name),
        );
        let want = (
            spec.key_size,
            spec.value_size,
            sizes.of_map(spec),
            required_flags(spec.name),
        );
        if found != want {
            tracing::warn!(
                map = spec.name,
                ?found,
                ?want,
                "pinned map has another layout (key, value, entries, flags); replacing it"
            );
            stale.push(spec.name);
        }
    }
    // A fresh tm_maglev is all zeros, a fresh tm_targets all empty: the
    // kept streams' tables would pick nothing until the LB writes again.
    let fresh = [n::MAGLEV, n::TARGETS]
        .into_iter()
        .find(|m| stale.contains(m));
    if let (Some(fresh), false, true) = (
        fresh,
        stale.contains(&n::STREAMS),
        dir.join(n::STREAMS).exists(),
    ) {
        tracing::warn!(
            map = n::STREAMS,
            "replacing it with {fresh}: its streams point into the old tables"
        );
        stale.push(n::STREAMS);
    }
    for name in stale {
        remove(name)?;
    }
    Ok(())
}

/// Loads the object with the configured map sizes, reusing maps pinned in
/// `dir` or pinning new ones there, and loads every program into the kernel.
pub fn load(object: &[u8], dir: &Path, sizes: &Sizes) -> Result<Ebpf, DataplaneError> {
    drop_stale_pins(dir, sizes)?;
    let mut loader = EbpfLoader::new();
    for spec in MAPS {
        loader.map_pin_path(spec.name, dir.join(spec.name));
    }
    for (name, entries) in sizes.entries() {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader.load(object)?;
    super::attach::load_programs(&mut ebpf)?;
    Ok(ebpf)
}

/// The name of every map the dataplane pins.
pub fn names() -> impl Iterator<Item = &'static str> {
    MAPS.iter().map(|spec| spec.name)
}

/// True when maps of an earlier daemon are pinned in `dir` (kept dataplane).
pub fn has_pins(dir: &Path) -> bool {
    MAPS.iter().any(|spec| dir.join(spec.name).exists())
}

/// Removes the pin directory (maps and links); what is still attached by
/// others keeps its own references.
pub fn remove(dir: &Path) {
    for spec in MAPS {
        let _ = std::fs::remove_file(dir.join(spec.name));
    }
    let _ = std::fs::remove_dir_all(dir.join("links"));
    let _ = std::fs::remove_dir(dir);
    if let Some(root) = dir.parent() {
        let _ = std::fs::remove_dir(root);
    }
}
