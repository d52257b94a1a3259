//! Writes the service-IP overlay maps and reads their counters. The caller
//! hands over the whole wanted state; only differences reach the kernel, in
//! an order no packet can trip over (see [`OverlayWriter::apply`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::Ebpf;
use tapmesh_common::{
    map_names as n,
    overlay::{
        local_slot, owner_slot, owner_slot6, Addr6, Instance, Instance6, Local, Local6, LocalSlot,
        OverlayConfig, OverlayConfig6, OwnerSlot, OwnerSlot6, Service,
        CONFIG_SERVICES_OUTSIDE_PREFIX, INSTANCE_REMOTE, LOCAL_SLOT_ONE, LOCAL_SLOT_SHARED,
        OWNER_SLOT_ONE, OWNER_SLOT_SHARED, OWNER_SLOT_STATE, OWNER_THIS_NODE, SERVICE_SLOTS,
    },
    tunnel::PEER_OVERLAY,
    PacketCounter,
};

use super::{map_err, map_mut, map_ref, tunnel::write_peers, DataplaneError};
use crate::net::Hop;

/// Packets and bytes by service or instance id, summed over CPUs.
pub type CountersById = BTreeMap<u32, PacketCounter>;

/// An IPv4 address as the maps hold it: its bytes.
pub fn addr_word(addr: std::net::Ipv4Addr) -> [u8; 4] {
    addr.octets()
}

/// An IPv6 address as the maps hold it: its bytes.
pub fn addr6_words(addr: std::net::Ipv6Addr) -> Addr6 {
    addr.octets()
}

/// The address a map holds.
fn addr6_of(bytes: Addr6) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(bytes)
}

/// One service IP: its id, policy and instance ids in slot order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTable {
    pub id: u32,
    pub policy: u8,
    pub slots: Vec<u32>,
}

/// Everything the overlay maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayTables {
    pub config: OverlayConfig,
    pub services: BTreeMap<std::net::Ipv4Addr, ServiceTable>,
    pub instances: BTreeMap<u32, Instance>,
    pub locals: BTreeMap<std::net::Ipv4Addr, Local>,
    pub config6: OverlayConfig6,
    /// IPv6 service IPs: services of their own (ids shared with IPv4's
    /// space), whose slots hold only instances with IPv6 addresses.
    pub services6: BTreeMap<std::net::Ipv6Addr, ServiceTable>,
    pub instances6: BTreeMap<u32, Instance6>,
    pub locals6: BTreeMap<std::net::Ipv6Addr, Local6>,
}

/// Remembers what it wrote.
#[derive(Default)]
pub struct OverlayWriter {
    written: OverlayTables,
    /// `tm_ov_loc_slots` as written (with `dialled` 0).
    slots: BTreeMap<u32, LocalSlot>,
    /// `tm_ov_config` as written.
    config: Option<OverlayConfig>,
    /// The maps' contents were read once (pins an earlier daemon kept).
    adopted: bool,
    /// Nodes of remote instances, as named in `tm_tunnel_peers` (`PEER_OVERLAY`).
    peers: BTreeSet<std::net::Ipv4Addr>,
    /// `tm_ov_owners` and `tm_ov_owners6` as written.
    owners: Owners,
    /// `tm_ov_own_slots` and `tm_ov_own_slot6` as written (non-empty slots
    /// only, without the kernel's seen marks), updated with every write.
    owner_slots: BTreeMap<u32, OwnerSlot>,
    owner_slots6: BTreeMap<u32, OwnerSlot6>,
    /// Resolved next hops of remote nodes, copied into their instances
    /// (a node without one: a FIB lookup per packet).
    hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    /// An apply failed part way: the maps may differ from `written` until
    /// the next one succeeds, so hops wait for it rather than write over.
    unsettled: bool,
    /// The addresses of this node's interfaces ([`owners`]).
    own: BTreeSet<std::net::IpAddr>,
}

/// Inner sources and the node that may send them through the tunnel
/// (`OWNER_THIS_NODE`: this one, so none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    pub v4: BTreeMap<std::net::Ipv4Addr, [u8; 4]>,
    pub v6: BTreeMap<std::net::Ipv6Addr, [u8; 4]>,
}

/// The owners of the tables' addresses: every instance's namespace address
/// and instance IP belong to its node (local ones and this node's
/// containers to this node). An address two nodes claim (tables caught
/// mid-move) is left out: it is not judged, rather than refused for one of
/// them. While containers live here, `own` (the addresses of this node's
/// interfaces) are this node's whatever the tables say: no other node may
/// pose as this one to its containers (the kernel drops an IPv4 packet
/// from outside with one of them as a martian; a tunnelled one skips that).
pub fn owners(t: &OverlayTables, own: &BTreeSet<std::net::IpAddr>) -> Owners {
    fn claim<A: Ord>(map: &mut BTreeMap<A, Option<[u8; 4]>>, addr: A, node: [u8; 4]) {
        let entry = map.entry(addr).or_insert(Some(node));
        if *entry != Some(node) {
            *entry = None;
        }
    }
    let node_of = |i: &Instance| match i.kind {
        INSTANCE_REMOTE => i.node_addr,
        _ => OWNER_THIS_NODE,
    };
    let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
    for (id, inst) in &t.instances {
        let node = node_of(inst);
        for addr in [inst.ns_addr, inst.reply_addr] {
            if addr != [0; 4] {
                claim(&mut v4, std::net::Ipv4Addr::from(addr), node);
            }
        }
        if let Some(inst6) = t.instances6.get(id) {
            for addr in [inst6.ns_addr, inst6.reply_addr] {
                if addr != [0; 16] {
                    claim(&mut v6, std::net::Ipv6Addr::from(addr), node);
                }
            }
        }
    }
    for (addr, local) in &t.locals {
        claim(&mut v4, *addr, OWNER_THIS_NODE);
        if local.instance_addr != [0; 4] {
            claim(&mut v4, local.instance_addr.into(), OWNER_THIS_NODE);
        }
    }
    for (addr, local) in &t.locals6 {
        claim(&mut v6, *addr, OWNER_THIS_NODE);
        if local.instance_addr != [0; 16] {
            claim(&mut v6, local.instance_addr.into(), OWNER_THIS_NODE);
        }
    }
    if !t.locals.is_empty() || !t.locals6.is_empty() {
        for addr in own {
            match addr {
                std::net::IpAddr::V4(a) => v4.insert(*a, Some(OWNER_THIS_NODE)),
                std::net::IpAddr::V6(a) => v6.insert(*a, Some(OWNER_THIS_NODE)),
            };
        }
    }
    Owners {
        v4: v4.into_iter().filter_map(|(a, n)| Some((a, n?))).collect(),
        v6: v6.into_iter().filter_map(|(a, n)| Some((a, n?))).collect(),
    }
}

/// A remote instance with its node's next hop (none: ifindex 0 and no MACs,
/// which the program takes as "ask the FIB"); others as they are.
fn hopped(inst: &Instance, hops: &BTreeMap<std::net::Ipv4Addr, Hop>) -> Instance {
    if inst.kind != INSTANCE_REMOTE {
        return *inst;
    }
    let (ifindex, dst_mac, src_mac) =
        Hop::entry(hops.get(&std::net::Ipv4Addr::from(inst.node_addr)));
    Instance {
        ifindex,
        dst_mac,
        src_mac,
        ..*inst
    }
}

/// `t` with every remote instance's next hop from `hops`. Kept out of the
/// compiled tables, so a moved hop is not a changed instance (its flows
/// keep their binding).
fn with_hops<'a>(
    t: &'a OverlayTables,
    hops: &BTreeMap<std::net::Ipv4Addr, Hop>,
) -> Cow<'a, OverlayTables> {
    if t.instances.values().all(|i| hopped(i, hops) == *i) {
        return Cow::Borrowed(t);
    }
    let mut t = t.clone();
    for inst in t.instances.values_mut() {
        *inst = hopped(inst, hops);
    }
    Cow::Owned(t)
}

/// The nodes of the remote instances (an IPv6 instance shares its IPv4
/// twin's node): the ones that may send this node tunnel packets for the
/// overlay.
pub(super) fn remote_nodes(t: &OverlayTables) -> BTreeSet<std::net::Ipv4Addr> {
    t.instances
        .values()
        .filter(|i| i.kind == INSTANCE_REMOTE)
        .map(|i| i.node_addr.into())
        .collect()
}

/// `tm_ov_loc_slots` for `locals`: each container in the slot of its
/// address, or the slot marked shared when several map to it.
pub fn local_slots(locals: &BTreeMap<std::net::Ipv4Addr, Local>) -> BTreeMap<u32, LocalSlot> {
    let mut slots = BTreeMap::new();
    for (addr, local) in locals {
        let addr = addr_word(*addr);
        slots
            .entry(local_slot(addr))
            .and_modify(|s: &mut LocalSlot| {
                *s = LocalSlot {
                    state: LOCAL_SLOT_SHARED,
                    ..LocalSlot::default()
                }
            })
            .or_insert(LocalSlot {
                addr,
                state: LOCAL_SLOT_ONE,
                dialled: 0,
                local: *local,
            });
    }
    slots
}

/// A value of `tm_ov_own_slots` or `tm_ov_own_slot6`.
pub trait OwnerSlotValue: Copy + Default + PartialEq + aya::Pod {
    fn state(&self) -> u32;
    fn with_state(self, state: u32) -> Self;
}

impl OwnerSlotValue for OwnerSlot {
    fn state(&self) -> u32 {
        self.state
    }
    fn with_state(self, state: u32) -> Self {
        Self { state, ..self }
    }
}

impl OwnerSlotValue for OwnerSlot6 {
    fn state(&self) -> u32 {
        self.state
    }
    fn with_state(self, state: u32) -> Self {
        Self { state, ..self }
    }
}

/// Each owner in the slot `index` gives its address (`one`), or the slot
/// marked shared when several map to it.
fn slots_of<A, S: OwnerSlotValue>(
    owners: &BTreeMap<A, [u8; 4]>,
    index: impl Fn(&A) -> u32,
    one: impl Fn(&A, [u8; 4]) -> S,
) -> BTreeMap<u32, S> {
    let mut slots = BTreeMap::new();
    for (addr, owner) in owners {
        slots
            .entry(index(addr))
            .and_modify(|s: &mut S| *s = S::default().with_state(OWNER_SLOT_SHARED))
            .or_insert(one(addr, *owner).with_state(OWNER_SLOT_ONE));
    }
    slots
}

/// `tm_ov_own_slots` for the IPv4 owners.
pub fn owner_slots(v4: &BTreeMap<std::net::Ipv4Addr, [u8; 4]>) -> BTreeMap<u32, OwnerSlot> {
    slots_of(
        v4,
        |a| owner_slot(addr_word(*a)),
        |a, owner| OwnerSlot {
            addr: addr_word(*a),
            owner,
            state: 0,
        },
    )
}

/// `tm_ov_own_slot6` for the IPv6 owners.
pub fn owner_slots6(v6: &BTreeMap<std::net::Ipv6Addr, [u8; 4]>) -> BTreeMap<u32, OwnerSlot6> {
    slots_of(
        v6,
        |a| owner_slot6(&addr6_words(*a)),
        |a, owner| OwnerSlot6 {
            addr: addr6_words(*a),
            owner,
            state: 0,
        },
    )
}

/// The values to write to take an owner slot from `before` to `after`
/// (`None`: empty): those written with the new owners, while packets must
/// ask the hash (the slot shared), and the one written after the gone
/// owners are removed. As with local slots, a write either changes the
/// state word alone or happens while the state is not "one", so no packet
/// reads half a slot.
pub fn owner_slot_writes<S: OwnerSlotValue>(
    before: Option<S>,
    after: Option<S>,
) -> (Vec<S>, Option<S>) {
    if before == after {
        return (Vec::new(), None);
    }
    let mut during = Vec::new();
    if let Some(b) = before.filter(|b| b.state() == OWNER_SLOT_ONE) {
        during.push(b.with_state(OWNER_SLOT_SHARED));
    }
    let after = after.unwrap_or_default();
    during.push(after.with_state(OWNER_SLOT_SHARED));
    let last = (after.state() != OWNER_SLOT_SHARED).then_some(after);
    (during, last)
}

/// Whether the kernel marked slot `index` seen; if so, the slot goes back
/// to `written` (what the writer holds there), which clears the mark. Only
/// the kernel sets the mark, and only this writer writes slots.
fn take_mark<S: OwnerSlotValue>(
    ebpf: &mut Ebpf,
    name: &'static str,
    index: u32,
    written: S,
) -> Result<bool, DataplaneError> {
    let mut slots: Array<&mut MapData, S> =
        Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let now = slots.get(&index, 0).map_err(map_err(name))?;
    if now.state() & !OWNER_SLOT_STATE == 0 {
        return Ok(false);
    }
    slots.set(index, written, 0).map_err(map_err(name))?;
    Ok(true)
}

/// Writes one step of [`owner_slot_writes`] for every slot that differs
/// between `written` (what the array holds, kept up to date write by write,
/// so a failed apply leaves it true) and `wanted` in the array `name`. Step
/// 0 marks every answering slot shared first, in one pass, and only then
/// writes new contents: the time between a slot's two writes, which a
/// packet would have to stall across to read a stale state with new
/// contents, is as long as it can be.
fn write_slots<S: OwnerSlotValue>(
    ebpf: &mut Ebpf,
    name: &'static str,
    written: &mut BTreeMap<u32, S>,
    wanted: &BTreeMap<u32, S>,
    step: usize,
) -> Result<(), DataplaneError> {
    let mut slots: Array<&mut MapData, S> =
        Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let indexes: BTreeSet<u32> = wanted.keys().chain(written.keys()).copied().collect();
    let mut passes: [Vec<(u32, S)>; 2] = [Vec::new(), Vec::new()];
    for index in indexes {
        let (during, last) =
            owner_slot_writes(written.get(&index).copied(), wanted.get(&index).copied());
        let values = if step == 0 {
            during
        } else {
            last.into_iter().collect()
        };
        let first_pass = values.len() - values.len().min(1);
        for (n, value) in values.into_iter().enumerate() {
            passes[usize::from(n >= first_pass)].push((index, value));
        }
    }
    for (index, value) in passes.into_iter().flatten() {
        slots.set(index, value, 0).map_err(map_err(name))?;
        if value == S::default() {
            written.remove(&index);
        } else {
            written.insert(index, value);
        }
    }
    Ok(())
}

/// The values to write, in order, to take a local slot from `before` to
/// `after` (`None`: empty) so that no packet reads a half-written slot it
/// would use: a slot a packet uses is in state "one", and a write either
/// changes the state word alone or happens while the state is not "one"
/// (packets then look in `tm_ov_locals`, which holds every container
/// during the change). `dialled` is that of the new container.
pub fn slot_writes(
    before: Option<LocalSlot>,
    after: Option<LocalSlot>,
    dialled: u32,
) -> Vec<LocalSlot> {
    let shared = |s: LocalSlot| LocalSlot {
        state: LOCAL_SLOT_SHARED,
        ..s
    };
    let mut out = Vec::new();
    if let Some(b) = before.filter(|b| b.state == LOCAL_SLOT_ONE) {
        // The kernel may have set `dialled`: 1 keeps its lookups on.
        out.push(shared(LocalSlot { dialled: 1, ..b }));
    }
    match after {
        Some(a) if a.state == LOCAL_SLOT_ONE => {
            let a = LocalSlot { dialled, ..a };
            out.push(shared(a));
            out.push(a);
        }
        Some(a) => out.push(a),
        None => out.push(LocalSlot::default()),
    }
    out
}

/// A config with a service prefix and the "services outside the prefix" flag.
trait Prefixed: Copy {
    type Addr;
    /// Whether a service IP lies outside the prefix (no prefix: all do).
    fn outside(&self, a: &Self::Addr) -> bool;
    fn flags(&self) -> u32;
    fn with_flags(&self, flags: u32) -> Self;

    /// `self` with the flag set when a service IP of `services` lies outside its prefix.
    fn flagged<'a>(&self, services: impl IntoIterator<Item = &'a Self::Addr>) -> Self
    where
        Self::Addr: 'a,
    {
        let raised = services.into_iter().any(|a| self.outside(a));
        self.with_flags(with_flag(self.flags(), raised))
    }
}

impl Prefixed for OverlayConfig {
    type Addr = std::net::Ipv4Addr;
    fn outside(&self, a: &Self::Addr) -> bool {
        let mask = u32::from_be_bytes(self.service_mask);
        mask == 0 || u32::from(*a) & mask != u32::from_be_bytes(self.service_prefix)
    }
    fn flags(&self) -> u32 {
        self.flags
    }
    fn with_flags(&self, flags: u32) -> Self {
        Self { flags, ..*self }
    }
}

impl Prefixed for OverlayConfig6 {
    type Addr = std::net::Ipv6Addr;
    fn outside(&self, a: &Self::Addr) -> bool {
        let mask = u128::from_be_bytes(self.service_mask);
        mask == 0 || u128::from(*a) & mask != u128::from_be_bytes(self.service_prefix)
    }
    fn flags(&self) -> u32 {
        self.flags
    }
    fn with_flags(&self, flags: u32) -> Self {
        Self { flags, ..*self }
    }
}

fn with_flag(flags: u32, raised: bool) -> u32 {
    if raised {
        flags | CONFIG_SERVICES_OUTSIDE_PREFIX
    } else {
        flags & !CONFIG_SERVICES_OUTSIDE_PREFIX
    }
}

/// The config to hold while an apply goes from `current` (in the kernel)
/// to `wanted`: `current` with the flag raised when a service IP of either
/// side lies outside either prefix (so no service IP is passed by the
/// prefix check in between); `None` when `current` already does.
fn config_during<'a, C: Prefixed>(
    current: &C,
    wanted: &C,
    services: impl IntoIterator<Item = &'a C::Addr>,
) -> Option<C>
where
    C::Addr: 'a,
{
    let raised = current.flags() & CONFIG_SERVICES_OUTSIDE_PREFIX != 0;
    let needed = services
        .into_iter()
        .any(|a| current.outside(a) || wanted.outside(a));
    (needed && !raised).then(|| current.with_flags(with_flag(current.flags(), true)))
}

fn service_value(table: &ServiceTable) -> Service {
    Service {
        id: table.id,
        policy: table.policy,
        slots: table.slots.len() as u8,
        _pad: [0; 2],
    }
}

/// Writes the entries of `wanted` that `written` does not hold as they are
/// into the hash map `name`.
fn insert_changed<A: Ord, T: PartialEq, K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: &BTreeMap<A, T>,
    written: &BTreeMap<A, T>,
    key: impl Fn(&A) -> K,
    value: impl Fn(&T) -> V,
) -> Result<(), DataplaneError> {
    let mut map: BpfHashMap<&mut MapData, K, V> =
        BpfHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    for (a, t) in wanted {
        if written.get(a) != Some(t) {
            map.insert(key(a), value(t), 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Removes from the hash map `name` the keys of `written` that `wanted` lacks.
fn remove_unwanted<A: Ord, T, V: aya::Pod, K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: &BTreeMap<A, T>,
    written: &BTreeMap<A, T>,
    key: impl Fn(&A) -> K,
) -> Result<(), DataplaneError> {
    let mut map: BpfHashMap<&mut MapData, K, V> =
        BpfHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    for a in written.keys() {
        if !wanted.contains_key(a) {
            let _ = map.remove(&key(a));
        }
    }
    Ok(())
}

impl OverlayWriter {
    /// Writes `wanted`. Order (each step leaves a state packets can use):
    /// the prefix flags are raised if either side needs them; instances and
    /// locals are added or changed; local slots go through "shared" (see
    /// [`slot_writes`]); service slot rows, then services; then removals
    /// (services, locals, then instances, emptied with a new generation);
    /// the final configs last. Ids freed here are not reused before the
    /// next apply (the model cools them), so no row names a changed id.
    pub fn apply(&mut self, ebpf: &mut Ebpf, wanted: &OverlayTables) -> Result<(), DataplaneError> {
        for service in wanted.services.values().chain(wanted.services6.values()) {
            if service.slots.len() > SERVICE_SLOTS as usize {
                return Err(DataplaneError::Config(format!(
                    "service {} has {} slots, at most {SERVICE_SLOTS}",
                    service.id,
                    service.slots.len()
                )));
            }
        }
        if !self.adopted {
            self.adopt(ebpf)?;
        }
        let hopped = with_hops(wanted, &self.hops);
        let wanted = &*hopped;
        self.unsettled = true;
        let current = self.config.unwrap_or_default();
        if let Some(during) = config_during(
            &current,
            &wanted.config,
            wanted.services.keys().chain(self.written.services.keys()),
        ) {
            self.write_config(ebpf, during)?;
        }
        if let Some(during) = config_during(
            &self.written.config6,
            &wanted.config6,
            wanted.services6.keys().chain(self.written.services6.keys()),
        ) {
            self.write_config6(ebpf, during)?;
        }
        // New nodes may use the tunnel before instances name them; gone
        // ones lose it once their instances are gone.
        let peers = remote_nodes(wanted);
        let during: BTreeSet<_> = self.peers.union(&peers).copied().collect();
        write_peers(ebpf, PEER_OVERLAY, &self.peers, &during)?;
        self.peers = during;
        let owners = owners(wanted, &self.own);
        self.add_owners(ebpf, &owners)?;
        self.add_instances(ebpf, wanted)?;
        self.add_locals(ebpf, wanted)?;
        self.write_local_slots(ebpf, wanted)?;
        self.add_services(ebpf, wanted)?;
        self.remove_services(ebpf, wanted)?;
        self.remove_locals(ebpf, wanted)?;
        self.remove_instances(ebpf, wanted)?;
        self.remove_owners(ebpf, &owners)?;
        write_peers(ebpf, PEER_OVERLAY, &self.peers, &peers)?;
        self.peers = peers;
        self.write_config6(ebpf, wanted.config6)?;
        self.write_config(ebpf, wanted.config.flagged(wanted.services.keys()))?;
        self.written = wanted.clone();
        self.unsettled = false;
        Ok(())
    }

    /// The tables as last written.
    pub fn written(&self) -> &OverlayTables {
        &self.written
    }

    /// The nodes of the remote instances written.
    pub fn remote_nodes(&self) -> &BTreeSet<std::net::Ipv4Addr> {
        &self.peers
    }

    /// Whether the next hop of `node` is known.
    pub fn has_hop(&self, node: &std::net::Ipv4Addr) -> bool {
        self.hops.contains_key(node)
    }

    /// Replaces the known next hops and rewrites the remote instances whose
    /// hop changed, in place (same generation: their flows stay bound).
    /// Each entry is one map write: a packet reading it meanwhile may see
    /// the new interface with the old MACs (one frame to a stale MAC), as
    /// with the LB's remote targets. After a failed apply only the next
    /// apply writes them (what `written` holds may be gone from the maps).
    pub fn set_hops(
        &mut self,
        ebpf: &mut Ebpf,
        hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    ) -> Result<(), DataplaneError> {
        self.hops = hops;
        if self.unsettled || self.written.instances.is_empty() {
            return Ok(());
        }
        let mut instances: Array<&mut MapData, Instance> =
            Array::try_from(map_mut(ebpf, n::OV_INSTANCES)?).map_err(map_err(n::OV_INSTANCES))?;
        for (&id, inst) in self.written.instances.iter_mut() {
            let new = hopped(inst, &self.hops);
            if new != *inst {
                instances
                    .set(id, new, 0)
                    .map_err(map_err(n::OV_INSTANCES))?;
                *inst = new;
            }
        }
        Ok(())
    }

    /// Replaces the addresses of this node's interfaces and rewrites the
    /// owners they change. After a failed apply only the next apply writes
    /// them, as with hops.
    pub fn set_own_addrs(
        &mut self,
        ebpf: &mut Ebpf,
        own: BTreeSet<std::net::IpAddr>,
    ) -> Result<(), DataplaneError> {
        self.own = own;
        if self.unsettled || !self.adopted {
            return Ok(());
        }
        let owners = owners(&self.written, &self.own);
        if owners == self.owners {
            return Ok(());
        }
        // A failure is tried again by the caller; entries a failure part
        // way wrote are not recorded (a full map is the case).
        self.add_owners(ebpf, &owners)?;
        self.remove_owners(ebpf, &owners)
    }

    /// Takes what the maps hold as written (pins an earlier daemon kept, or
    /// empty maps): what is not wanted is then removed like anything else.
    fn adopt(&mut self, ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
        let placeholder = ServiceTable {
            id: u32::MAX,
            policy: 0,
            slots: Vec::new(),
        };
        {
            let map: BpfHashMap<&MapData, [u8; 4], Service> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_SERVICES)?)
                    .map_err(map_err(n::OV_SERVICES))?;
            for addr in map.keys().flatten() {
                let addr = std::net::Ipv4Addr::from(addr);
                self.written.services.insert(addr, placeholder.clone());
            }
        }
        {
            let map: BpfHashMap<&MapData, Addr6, Service> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_SERVICES6)?)
                    .map_err(map_err(n::OV_SERVICES6))?;
            for addr in map.keys().flatten() {
                self.written
                    .services6
                    .insert(addr6_of(addr), placeholder.clone());
            }
        }
        {
            let map: BpfHashMap<&MapData, [u8; 4], Local> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_LOCALS)?)
                    .map_err(map_err(n::OV_LOCALS))?;
            for (addr, local) in map.iter().flatten() {
                self.written
                    .locals
                    .insert(std::net::Ipv4Addr::from(addr), local);
            }
        }
        {
            let map: BpfHashMap<&MapData, Addr6, Local6> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_LOCALS6)?)
                    .map_err(map_err(n::OV_LOCALS6))?;
            for (addr, local) in map.iter().flatten() {
                self.written.locals6.insert(addr6_of(addr), local);
            }
        }
        {
            let map: BpfHashMap<&MapData, [u8; 4], [u8; 4]> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_OWNERS)?)
                    .map_err(map_err(n::OV_OWNERS))?;
            for (addr, node) in map.iter().flatten() {
                self.owners.v4.insert(addr.into(), node);
            }
            let map: BpfHashMap<&MapData, Addr6, [u8; 4]> =
                BpfHashMap::try_from(map_ref(ebpf, n::OV_OWNERS6)?)
                    .map_err(map_err(n::OV_OWNERS6))?;
            for (addr, node) in map.iter().flatten() {
                self.owners.v6.insert(addr6_of(addr), node);
            }
            let map: Array<&MapData, OwnerSlot> =
                Array::try_from(map_ref(ebpf, n::OV_OWNER_SLOTS)?)
                    .map_err(map_err(n::OV_OWNER_SLOTS))?;
            for (index, slot) in map.iter().enumerate() {
                let slot = slot.map_err(map_err(n::OV_OWNER_SLOTS))?;
                // Recorded as written: without the kernel's seen mark.
                let slot = slot.with_state(slot.state & OWNER_SLOT_STATE);
                if slot.state != 0 {
                    self.owner_slots.insert(index as u32, slot);
                }
            }
            let map: Array<&MapData, OwnerSlot6> =
                Array::try_from(map_ref(ebpf, n::OV_OWNER_SLOTS6)?)
                    .map_err(map_err(n::OV_OWNER_SLOTS6))?;
            for (index, slot) in map.iter().enumerate() {
                let slot = slot.map_err(map_err(n::OV_OWNER_SLOTS6))?;
                let slot = slot.with_state(slot.state & OWNER_SLOT_STATE);
                if slot.state != 0 {
                    self.owner_slots6.insert(index as u32, slot);
                }
            }
        }
        {
            let map: Array<&MapData, Instance> = Array::try_from(map_ref(ebpf, n::OV_INSTANCES)?)
                .map_err(map_err(n::OV_INSTANCES))?;
            for (id, inst) in map.iter().enumerate() {
                let inst = inst.map_err(map_err(n::OV_INSTANCES))?;
                if inst.kind != 0 {
                    self.written.instances.insert(id as u32, inst);
                }
            }
        }
        {
            let map: Array<&MapData, Instance6> = Array::try_from(map_ref(ebpf, n::OV_INSTANCES6)?)
                .map_err(map_err(n::OV_INSTANCES6))?;
            for (id, inst) in map.iter().enumerate() {
                let inst = inst.map_err(map_err(n::OV_INSTANCES6))?;
                if inst != Instance6::default() {
                    self.written.instances6.insert(id as u32, inst);
                }
            }
        }
        {
            let map: Array<&MapData, LocalSlot> =
                Array::try_from(map_ref(ebpf, n::OV_LOCAL_SLOTS)?)
                    .map_err(map_err(n::OV_LOCAL_SLOTS))?;
            for (index, slot) in map.iter().enumerate() {
                let slot = slot.map_err(map_err(n::OV_LOCAL_SLOTS))?;
                if slot.state != 0 {
                    self.slots
                        .insert(index as u32, LocalSlot { dialled: 0, ..slot });
                }
            }
        }
        {
            let map: Array<&MapData, OverlayConfig> =
                Array::try_from(map_ref(ebpf, n::OV_CONFIG)?).map_err(map_err(n::OV_CONFIG))?;
            self.config = Some(map.get(&0, 0).map_err(map_err(n::OV_CONFIG))?);
        }
        {
            let map: Array<&MapData, OverlayConfig6> =
                Array::try_from(map_ref(ebpf, n::OV_CONFIG6)?).map_err(map_err(n::OV_CONFIG6))?;
            self.written.config6 = map.get(&0, 0).map_err(map_err(n::OV_CONFIG6))?;
        }
        self.adopted = true;
        Ok(())
    }

    /// New and changed owners come before the instances that carry them
    /// (a refusal can only be late, never wrong); gone ones after.
    fn add_owners(&mut self, ebpf: &mut Ebpf, wanted: &Owners) -> Result<(), DataplaneError> {
        self.write_owner_slots(ebpf, wanted, 0)?;
        let was = &self.owners;
        insert_changed(
            ebpf,
            n::OV_OWNERS,
            &wanted.v4,
            &was.v4,
            |a| addr_word(*a),
            |n| *n,
        )?;
        insert_changed(
            ebpf,
            n::OV_OWNERS6,
            &wanted.v6,
            &was.v6,
            |a| addr6_words(*a),
            |n| *n,
        )
    }

    fn remove_owners(&mut self, ebpf: &mut Ebpf, wanted: &Owners) -> Result<(), DataplaneError> {
        let was = &self.owners;
        remove_unwanted::<_, _, [u8; 4], _>(ebpf, n::OV_OWNERS, &wanted.v4, &was.v4, |a| {
            addr_word(*a)
        })?;
        remove_unwanted::<_, _, [u8; 4], _>(ebpf, n::OV_OWNERS6, &wanted.v6, &was.v6, |a| {
            addr6_words(*a)
        })?;
        self.write_owner_slots(ebpf, wanted, 1)?;
        self.owners = wanted.clone();
        Ok(())
    }

    /// Which of `addrs` the decapsulation path has let in since the last
    /// call (a mark above the state byte of their owner slot), clearing the
    /// marks: the daemon's sign that a remote job is in use when its packets
    /// only arrive. A shared slot's mark counts for every address asked
    /// about that maps there (a job kept a little longer at worst). Each
    /// slot is read once.
    pub fn take_seen(
        &mut self,
        ebpf: &mut Ebpf,
        addrs: &BTreeSet<std::net::IpAddr>,
    ) -> Result<BTreeSet<std::net::IpAddr>, DataplaneError> {
        let (mut by_slot, mut by_slot6) = (BTreeMap::new(), BTreeMap::new());
        for addr in addrs {
            match addr {
                std::net::IpAddr::V4(a) => by_slot
                    .entry(owner_slot(a.octets()))
                    .or_insert_with(Vec::new)
                    .push(*addr),
                std::net::IpAddr::V6(a) => by_slot6
                    .entry(owner_slot6(&a.octets()))
                    .or_insert_with(Vec::new)
                    .push(*addr),
            }
        }
        let mut seen = BTreeSet::new();
        for (index, asked) in by_slot {
            let Some(slot) = self.owner_slots.get(&index).copied() else {
                continue;
            };
            let holds = |a: &std::net::IpAddr| {
                slot.state == OWNER_SLOT_SHARED
                    || matches!(a, std::net::IpAddr::V4(v4) if v4.octets() == slot.addr)
            };
            if asked.iter().any(holds) && take_mark(ebpf, n::OV_OWNER_SLOTS, index, slot)? {
                seen.extend(asked.into_iter().filter(holds));
            }
        }
        for (index, asked) in by_slot6 {
            let Some(slot) = self.owner_slots6.get(&index).copied() else {
                continue;
            };
            let holds = |a: &std::net::IpAddr| {
                slot.state == OWNER_SLOT_SHARED
                    || matches!(a, std::net::IpAddr::V6(v6) if v6.octets() == slot.addr)
            };
            if asked.iter().any(holds) && take_mark(ebpf, n::OV_OWNER_SLOTS6, index, slot)? {
                seen.extend(asked.into_iter().filter(holds));
            }
        }
        Ok(seen)
    }

    /// Step 0 ([`owner_slot_writes`]' first part): every slot that changes
    /// sends packets to `tm_ov_owners`, before the new owners are written.
    /// Step 1: after the gone owners are removed, each such slot takes its
    /// final value.
    fn write_owner_slots(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &Owners,
        step: usize,
    ) -> Result<(), DataplaneError> {
        let (v4, v6) = (owner_slots(&wanted.v4), owner_slots6(&wanted.v6));
        write_slots(ebpf, n::OV_OWNER_SLOTS, &mut self.owner_slots, &v4, step)?;
        write_slots(ebpf, n::OV_OWNER_SLOTS6, &mut self.owner_slots6, &v6, step)
    }

    fn add_instances(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &OverlayTables,
    ) -> Result<(), DataplaneError> {
        // A new id may be a gone instance's: its counters start at zero.
        for id in wanted.instances.keys() {
            if !self.written.instances.contains_key(id) {
                super::lb::zero_counter(ebpf, n::OV_INSTANCE_STATS, *id)?;
            }
        }
        let mut instances: Array<&mut MapData, Instance> =
            Array::try_from(map_mut(ebpf, n::OV_INSTANCES)?).map_err(map_err(n::OV_INSTANCES))?;
        for (&id, inst) in &wanted.instances {
            if self.written.instances.get(&id) != Some(inst) {
                instances
                    .set(id, *inst, 0)
                    .map_err(map_err(n::OV_INSTANCES))?;
            }
        }
        let mut instances6: Array<&mut MapData, Instance6> =
            Array::try_from(map_mut(ebpf, n::OV_INSTANCES6)?).map_err(map_err(n::OV_INSTANCES6))?;
        for (&id, inst) in &wanted.instances6 {
            if self.written.instances6.get(&id) != Some(inst) {
                instances6
                    .set(id, *inst, 0)
                    .map_err(map_err(n::OV_INSTANCES6))?;
            }
        }
        Ok(())
    }

    fn add_locals(&self, ebpf: &mut Ebpf, wanted: &OverlayTables) -> Result<(), DataplaneError> {
        let (w, was) = (wanted, &self.written);
        insert_changed(
            ebpf,
            n::OV_LOCALS,
            &w.locals,
            &was.locals,
            |a| addr_word(*a),
            |l| *l,
        )?;
        insert_changed(
            ebpf,
            n::OV_LOCALS6,
            &w.locals6,
            &was.locals6,
            |a| addr6_words(*a),
            |l| *l,
        )
    }

    fn write_local_slots(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &OverlayTables,
    ) -> Result<(), DataplaneError> {
        let wanted_slots = local_slots(&wanted.locals);
        let mut slots: Array<&mut MapData, LocalSlot> =
            Array::try_from(map_mut(ebpf, n::OV_LOCAL_SLOTS)?)
                .map_err(map_err(n::OV_LOCAL_SLOTS))?;
        let indexes: std::collections::BTreeSet<u32> = wanted_slots
            .keys()
            .chain(self.slots.keys())
            .copied()
            .collect();
        for index in indexes {
            let (before, after) = (
                self.slots.get(&index).copied(),
                wanted_slots.get(&index).copied(),
            );
            if before == after {
                continue;
            }
            // Only a slot that was empty holds a container that cannot have
            // dialled yet; any other keeps the reverse lookup on (the kernel
            // sets the flag on new flows only).
            let dialled = u32::from(before.is_some());
            for value in slot_writes(before, after, dialled) {
                slots
                    .set(index, value, 0)
                    .map_err(map_err(n::OV_LOCAL_SLOTS))?;
            }
        }
        self.slots = wanted_slots;
        Ok(())
    }

    /// Slot rows first (a service is found only after its row is whole), then the services.
    fn add_services(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &OverlayTables,
    ) -> Result<(), DataplaneError> {
        let written: Vec<&ServiceTable> = self
            .written
            .services
            .values()
            .chain(self.written.services6.values())
            .collect();
        // As for instances: a new service id starts its counters at zero. A
        // service adopted at a restart (a placeholder, id unknown) is not new.
        let kept = |was: Option<&ServiceTable>, id: u32| {
            was.is_some_and(|w| w.id == id || w.id == u32::MAX)
        };
        let new_ids: Vec<u32> = (wanted.services.iter())
            .filter(|(a, s)| !kept(self.written.services.get(*a), s.id))
            .map(|(_, s)| s.id)
            .chain(
                (wanted.services6.iter())
                    .filter(|(a, s)| !kept(self.written.services6.get(*a), s.id))
                    .map(|(_, s)| s.id),
            )
            .collect();
        for id in new_ids {
            super::lb::zero_counter(ebpf, n::OV_SERVICE_STATS, id)?;
        }
        {
            let mut rows: Array<&mut MapData, u32> =
                Array::try_from(map_mut(ebpf, n::OV_SLOTS)?).map_err(map_err(n::OV_SLOTS))?;
            for service in wanted.services.values().chain(wanted.services6.values()) {
                let before = written.iter().find(|s| s.id == service.id);
                if before.map(|b| &b.slots) == Some(&service.slots) {
                    continue;
                }
                for (i, &instance) in service.slots.iter().enumerate() {
                    rows.set(service.id * SERVICE_SLOTS + i as u32, instance, 0)
                        .map_err(map_err(n::OV_SLOTS))?;
                }
            }
        }
        let (w, was) = (wanted, &self.written);
        insert_changed(
            ebpf,
            n::OV_SERVICES,
            &w.services,
            &was.services,
            |a| addr_word(*a),
            service_value,
        )?;
        insert_changed(
            ebpf,
            n::OV_SERVICES6,
            &w.services6,
            &was.services6,
            |a| addr6_words(*a),
            service_value,
        )
    }

    fn remove_services(
        &self,
        ebpf: &mut Ebpf,
        wanted: &OverlayTables,
    ) -> Result<(), DataplaneError> {
        let (w, was) = (wanted, &self.written);
        remove_unwanted::<_, _, Service, _>(
            ebpf,
            n::OV_SERVICES,
            &w.services,
            &was.services,
            |a| addr_word(*a),
        )?;
        remove_unwanted::<_, _, Service, _>(
            ebpf,
            n::OV_SERVICES6,
            &w.services6,
            &was.services6,
            |a| addr6_words(*a),
        )
    }

    fn remove_locals(&self, ebpf: &mut Ebpf, wanted: &OverlayTables) -> Result<(), DataplaneError> {
        let (w, was) = (wanted, &self.written);
        remove_unwanted::<_, _, Local6, _>(ebpf, n::OV_LOCALS6, &w.locals6, &was.locals6, |a| {
            addr6_words(*a)
        })?;
        remove_unwanted::<_, _, Local, _>(ebpf, n::OV_LOCALS, &w.locals, &was.locals, |a| {
            addr_word(*a)
        })
    }

    /// Removed instances: their slot is emptied with a new generation, so
    /// conntrack entries naming them pick again; their IPv6 addresses go
    /// after (no row names them any more).
    fn remove_instances(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &OverlayTables,
    ) -> Result<(), DataplaneError> {
        let mut instances: Array<&mut MapData, Instance> =
            Array::try_from(map_mut(ebpf, n::OV_INSTANCES)?).map_err(map_err(n::OV_INSTANCES))?;
        for (&id, old) in &self.written.instances {
            if !wanted.instances.contains_key(&id) {
                let empty = Instance {
                    generation: old.generation.wrapping_add(1),
                    ..Instance::default()
                };
                instances
                    .set(id, empty, 0)
                    .map_err(map_err(n::OV_INSTANCES))?;
            }
        }
        let mut instances6: Array<&mut MapData, Instance6> =
            Array::try_from(map_mut(ebpf, n::OV_INSTANCES6)?).map_err(map_err(n::OV_INSTANCES6))?;
        for &id in self.written.instances6.keys() {
            if !wanted.instances6.contains_key(&id) {
                instances6
                    .set(id, Instance6::default(), 0)
                    .map_err(map_err(n::OV_INSTANCES6))?;
            }
        }
        Ok(())
    }

    fn write_config(
        &mut self,
        ebpf: &mut Ebpf,
        value: OverlayConfig,
    ) -> Result<(), DataplaneError> {
        if self.config == Some(value) {
            return Ok(());
        }
        let mut config: Array<&mut MapData, OverlayConfig> =
            Array::try_from(map_mut(ebpf, n::OV_CONFIG)?).map_err(map_err(n::OV_CONFIG))?;
        config.set(0, value, 0).map_err(map_err(n::OV_CONFIG))?;
        self.config = Some(value);
        Ok(())
    }

    fn write_config6(
        &mut self,
        ebpf: &mut Ebpf,
        value: OverlayConfig6,
    ) -> Result<(), DataplaneError> {
        if self.written.config6 == value {
            return Ok(());
        }
        let mut config6: Array<&mut MapData, OverlayConfig6> =
            Array::try_from(map_mut(ebpf, n::OV_CONFIG6)?).map_err(map_err(n::OV_CONFIG6))?;
        config6.set(0, value, 0).map_err(map_err(n::OV_CONFIG6))?;
        self.written.config6 = value;
        Ok(())
    }

    /// Forgets an unknown service IP's pending miss, so its next packet signals again.
    pub fn clear_pending(&self, ebpf: &mut Ebpf, service: std::net::IpAddr) {
        match service {
            std::net::IpAddr::V4(v4) => {
                if let Some(map) = ebpf.map_mut(n::OV_PENDING) {
                    if let Ok(mut pending) = BpfHashMap::<&mut MapData, [u8; 4], u64>::try_from(map)
                    {
                        let _ = pending.remove(&addr_word(v4));
                    }
                }
            }
            std::net::IpAddr::V6(v6) => {
                if let Some(map) = ebpf.map_mut(n::OV_PENDING6) {
                    if let Ok(mut pending) = BpfHashMap::<&mut MapData, Addr6, u64>::try_from(map) {
                        let _ = pending.remove(&addr6_words(v6));
                    }
                }
            }
        }
    }

    /// Names a socket of the daemon that sends held packets again into
    /// host-side veth `on` (`tm_ov_resend`), or forgets it (`None`): a tap
    /// does not copy them twice. A full map is emptied first (what it holds
    /// is of sockets long closed, or a batch's copies go twice, as before
    /// this map).
    pub fn resend_socket(
        &self,
        ebpf: &mut Ebpf,
        cookie: u64,
        on: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let name = n::OV_RESEND;
        let mut map: BpfHashMap<&mut MapData, u64, u32> =
            BpfHashMap::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
        let Some(ifindex) = on else {
            return match map.remove(&cookie) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(name)(e)),
            };
        };
        if map.insert(cookie, ifindex, 0).is_ok() {
            return Ok(());
        }
        let keys: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = map.remove(&key);
        }
        map.insert(cookie, ifindex, 0).map_err(map_err(name))
    }

    /// Forgets every pending miss (a start's first step): an entry a daemon
    /// read but had no time to clear (it stopped within the second) would
    /// keep its address from ever being reported again. Returns how many
    /// went.
    pub fn clear_all_pending(&self, ebpf: &mut Ebpf) -> usize {
        let mut cleared = 0;
        if let Some(map) = ebpf.map_mut(n::OV_PENDING) {
            if let Ok(mut pending) = BpfHashMap::<&mut MapData, [u8; 4], u64>::try_from(map) {
                let keys: Vec<[u8; 4]> = pending.keys().filter_map(Result::ok).collect();
                cleared += keys.iter().filter(|k| pending.remove(k).is_ok()).count();
            }
        }
        if let Some(map) = ebpf.map_mut(n::OV_PENDING6) {
            if let Ok(mut pending) = BpfHashMap::<&mut MapData, Addr6, u64>::try_from(map) {
                let keys: Vec<Addr6> = pending.keys().filter_map(Result::ok).collect();
                cleared += keys.iter().filter(|k| pending.remove(k).is_ok()).count();
            }
        }
        cleared
    }

    /// Packets and bytes per service id and per instance id, summed over CPUs.
    pub fn counters(&self, ebpf: &Ebpf) -> Result<(CountersById, CountersById), DataplaneError> {
        let read = |name: &'static str, ids: Vec<u32>| {
            let map = ebpf.map(name).ok_or(DataplaneError::Map {
                name,
                message: "missing from the object".into(),
            })?;
            let stats: PerCpuArray<&MapData, PacketCounter> =
                PerCpuArray::try_from(map).map_err(map_err(name))?;
            let mut out = BTreeMap::new();
            for id in ids {
                let per_cpu = stats.get(&id, 0).map_err(map_err(name))?;
                let mut total = PacketCounter::default();
                for c in per_cpu.iter() {
                    total.merge(c);
                }
                out.insert(id, total);
            }
            Ok::<_, DataplaneError>(out)
        };
        let services = read(
            n::OV_SERVICE_STATS,
            self.written
                .services
                .values()
                .chain(self.written.services6.values())
                .map(|s| s.id)
                .filter(|id| *id != u32::MAX)
                .collect(),
        )?;
        let instances = read(
            n::OV_INSTANCE_STATS,
            self.written.instances.keys().copied().collect(),
        )?;
        Ok((services, instances))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn remote_instances_take_their_nodes_hop_and_nothing_else_changes() {
        use tapmesh_common::overlay::INSTANCE_LOCAL;
        let remote = |node: [u8; 4]| Instance {
            ns_addr: [192, 0, 2, 70],
            node_addr: node,
            node_port: 50103,
            kind: INSTANCE_REMOTE,
            generation: 7,
            ..Instance::default()
        };
        let local = Instance {
            kind: INSTANCE_LOCAL,
            ifindex: 9,
            dst_mac: [2, 0, 0, 0, 0, 9],
            src_mac: [2, 0, 0, 0, 0, 8],
            ..remote([0; 4])
        };
        let tables = OverlayTables {
            instances: BTreeMap::from([
                (1, remote([198, 18, 0, 2])),
                (2, remote([198, 18, 0, 3])),
                (3, local),
            ]),
            ..OverlayTables::default()
        };
        let hop = Hop {
            ifindex: 4,
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            veth: false,
        };
        let hops = BTreeMap::from([(Ipv4Addr::new(198, 18, 0, 2), hop)]);
        let with = with_hops(&tables, &hops);
        assert_eq!(
            with.instances[&1],
            Instance {
                ifindex: 4,
                dst_mac: hop.dst_mac,
                src_mac: hop.src_mac,
                ..remote([198, 18, 0, 2])
            }
        );
        // No hop for its node: the FIB is asked; a local instance keeps its own.
        assert_eq!(with.instances[&2], remote([198, 18, 0, 3]));
        assert_eq!(with.instances[&3], local);
        // The hop taken away again: back to the compiled entry.
        assert_eq!(
            with_hops(&with, &BTreeMap::new()).instances,
            tables.instances
        );
        // Nothing to add: the tables as given, not a copy.
        assert!(matches!(
            with_hops(&tables, &BTreeMap::new()),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn this_nodes_addresses_are_its_own_while_containers_live_here() {
        let remote = Instance {
            ns_addr: [192, 0, 2, 70],
            node_addr: [198, 18, 0, 2],
            kind: INSTANCE_REMOTE,
            ..Instance::default()
        };
        let mut tables = OverlayTables {
            instances: BTreeMap::from([(1, remote)]),
            ..OverlayTables::default()
        };
        let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        let own = BTreeSet::from([
            std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
            // A table that places this node's address on another node
            // does not make it that node's.
            std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 70)),
            std::net::IpAddr::V6(v6),
        ]);
        // No container here: nothing to judge, the maps stay as they were.
        assert_eq!(
            owners(&tables, &own),
            Owners {
                v4: BTreeMap::from([(Ipv4Addr::new(192, 0, 2, 70), [198, 18, 0, 2])]),
                v6: BTreeMap::new(),
            }
        );
        tables
            .locals
            .insert(Ipv4Addr::new(192, 0, 2, 10), Local::default());
        assert_eq!(
            owners(&tables, &own),
            Owners {
                v4: BTreeMap::from([
                    (Ipv4Addr::new(192, 0, 2, 10), OWNER_THIS_NODE),
                    (Ipv4Addr::new(192, 0, 2, 70), OWNER_THIS_NODE),
                    (Ipv4Addr::new(198, 51, 100, 7), OWNER_THIS_NODE),
                ]),
                v6: BTreeMap::from([(v6, OWNER_THIS_NODE)]),
            }
        );
    }

    #[test]
    fn owner_slots_share_a_slot_and_change_through_the_hash() {
        let (a, b) = ([198, 18, 0, 2], [198, 18, 0, 3]);
        // 10.0.0.5 and 10.0.16.5 have the same low 12 bits.
        let owners = BTreeMap::from([
            (Ipv4Addr::new(10, 0, 0, 5), a),
            (Ipv4Addr::new(10, 0, 16, 5), b),
            (Ipv4Addr::new(10, 0, 0, 6), b),
        ]);
        let one = |addr: [u8; 4], owner| OwnerSlot {
            addr,
            owner,
            state: OWNER_SLOT_ONE,
        };
        let shared = OwnerSlot {
            state: OWNER_SLOT_SHARED,
            ..OwnerSlot::default()
        };
        assert_eq!(
            owner_slots(&owners),
            BTreeMap::from([(5, shared), (6, one([10, 0, 0, 6], b))])
        );
        let (x, y) = (one([10, 0, 0, 5], a), one([10, 0, 0, 5], b));
        let as_shared = |s: OwnerSlot| OwnerSlot {
            state: OWNER_SLOT_SHARED,
            ..s
        };
        // A new owner: the slot asks the hash until the change is done.
        assert_eq!(
            owner_slot_writes(Some(x), Some(y)),
            (vec![as_shared(x), as_shared(y)], Some(y))
        );
        assert_eq!(
            owner_slot_writes(None, Some(x)),
            (vec![as_shared(x)], Some(x))
        );
        assert_eq!(
            owner_slot_writes(Some(x), None),
            (vec![as_shared(x), shared], Some(OwnerSlot::default()))
        );
        assert_eq!(
            owner_slot_writes(Some(x), Some(shared)),
            (vec![as_shared(x), shared], None)
        );
        assert_eq!(owner_slot_writes(Some(x), Some(x)), (vec![], None));
    }

    fn local(ifindex: u32) -> Local {
        Local {
            ifindex,
            ..Local::default()
        }
    }

    #[test]
    fn a_container_has_its_slot_and_colliding_ones_share() {
        let locals = BTreeMap::from([
            (Ipv4Addr::new(10, 19, 0, 2), local(2)),
            (Ipv4Addr::new(10, 19, 0, 3), local(3)),
            // 1024 addresses further: the slot of 10.19.0.3.
            (Ipv4Addr::new(10, 19, 4, 3), local(4)),
        ]);
        let slots = local_slots(&locals);
        assert_eq!(slots.len(), 2);
        let one = slots[&2];
        assert_eq!(
            (one.state, one.addr, one.local.ifindex, one.dialled),
            (LOCAL_SLOT_ONE, addr_word(Ipv4Addr::new(10, 19, 0, 2)), 2, 0)
        );
        assert_eq!(slots[&3].state, LOCAL_SLOT_SHARED);
        assert_eq!(slots[&3].addr, [0; 4]);
    }

    #[test]
    fn the_config_flag_says_whether_a_service_lies_outside_the_prefix() {
        let config = OverlayConfig {
            service_prefix: addr_word(Ipv4Addr::new(10, 30, 0, 0)),
            service_mask: addr_word(Ipv4Addr::new(255, 255, 0, 0)),
            ..OverlayConfig::default()
        };
        let inside = [Ipv4Addr::new(10, 30, 1, 1)];
        let outside = [Ipv4Addr::new(10, 30, 1, 1), Ipv4Addr::new(192, 0, 2, 9)];
        assert_eq!(config.flagged(&inside).flags, 0);
        assert_eq!(
            config.flagged(&outside).flags,
            CONFIG_SERVICES_OUTSIDE_PREFIX
        );
        // No prefix: every service is outside it.
        let none = OverlayConfig::default();
        assert_eq!(none.flagged(&inside).flags, CONFIG_SERVICES_OUTSIDE_PREFIX);
        assert_eq!(none.flagged(&[]).flags, 0);
    }

    /// A packet uses a slot in state "one" only: every write either changes
    /// the state word alone (and may raise `dialled`, which only adds a
    /// lookup), or is made while the state is not "one" before and after
    /// (packets then look in the hash map).
    fn no_packet_sees_a_half_written_slot(before: Option<LocalSlot>, writes: &[LocalSlot]) {
        let mut current = before.unwrap_or_default();
        for w in writes {
            let only_state = w.dialled >= current.dialled
                && LocalSlot {
                    state: current.state,
                    dialled: current.dialled,
                    ..*w
                } == current;
            let never_one = current.state != LOCAL_SLOT_ONE && w.state != LOCAL_SLOT_ONE;
            assert!(only_state || never_one, "{current:?} -> {w:?}");
            current = *w;
        }
    }

    #[test]
    fn slots_change_through_shared_so_no_packet_reads_half_a_slot() {
        const A: [u8; 4] = [10, 19, 0, 1];
        const B: [u8; 4] = [10, 19, 0, 9];
        let one = |addr: [u8; 4], ifindex: u32| LocalSlot {
            addr,
            state: LOCAL_SLOT_ONE,
            dialled: 0,
            local: local(ifindex),
        };
        let shared = LocalSlot {
            state: LOCAL_SLOT_SHARED,
            ..LocalSlot::default()
        };
        let cases = [
            (None, Some(one(A, 2))),            // a new container
            (Some(one(A, 2)), Some(one(B, 3))), // another container takes the slot
            (Some(one(A, 2)), Some(one(A, 4))), // the same one, relinked
            (Some(one(A, 2)), None),            // gone
            (Some(one(A, 2)), Some(shared)),    // a second one collides
            (Some(shared), Some(one(A, 2))),    // back to one
            (Some(shared), None),
        ];
        for (before, after) in cases {
            let writes = slot_writes(before, after, 1);
            no_packet_sees_a_half_written_slot(before, &writes);
            let last = *writes.last().unwrap();
            let expected = match after {
                Some(a) if a.state == LOCAL_SLOT_ONE => LocalSlot { dialled: 1, ..a },
                Some(a) => a,
                None => LocalSlot::default(),
            };
            assert_eq!(last, expected, "{before:?} -> {after:?}");
        }
        // A container in a slot that was empty has not dialled yet.
        assert_eq!(
            slot_writes(None, Some(one(A, 2)), 0)
                .last()
                .unwrap()
                .dialled,
            0
        );
    }

    #[test]
    fn the_flag_is_raised_for_the_apply_when_either_side_needs_it() {
        let prefix = |a: [u8; 4]| OverlayConfig {
            service_prefix: addr_word(Ipv4Addr::from(a)),
            service_mask: addr_word(Ipv4Addr::new(255, 255, 255, 0)),
            ..OverlayConfig::default()
        };
        let (old, new) = (prefix([10, 30, 1, 0]), prefix([10, 30, 2, 0]));
        let in_old = Ipv4Addr::new(10, 30, 1, 5);
        let in_new = Ipv4Addr::new(10, 30, 2, 5);
        // The prefix moves: a service of the new one is outside the old, which
        // is in the kernel until the end: raised meanwhile.
        let during = config_during(&old, &new, &[in_new]).expect("raised");
        assert_eq!(
            (during.flags, during.service_prefix),
            (CONFIG_SERVICES_OUTSIDE_PREFIX, old.service_prefix)
        );
        // A departing service outside the new prefix: raised until it is gone.
        assert!(config_during(&old, &new, &[in_old]).is_some());
        // Nothing outside either: no extra write; already raised: none either.
        assert_eq!(config_during(&old, &old, &[in_old]), None);
        let raised = OverlayConfig {
            flags: CONFIG_SERVICES_OUTSIDE_PREFIX,
            ..old
        };
        assert_eq!(config_during(&raised, &new, &[in_new]), None);
        // IPv6 likewise.
        let v6 = |p: &str| OverlayConfig6 {
            service_prefix: addr6_words(p.parse().unwrap()),
            service_mask: addr6_words("ffff:ffff:ffff::".parse().unwrap()),
            ..OverlayConfig6::default()
        };
        let leaving: std::net::Ipv6Addr = "2001:db8:9::1".parse().unwrap();
        assert!(config_during(&v6("2001:db8:ff::"), &v6("2001:db8:ff::"), &[leaving]).is_some());
        let inside: std::net::Ipv6Addr = "2001:db8:ff::1".parse().unwrap();
        assert_eq!(
            config_during(&v6("2001:db8:ff::"), &v6("2001:db8:ff::"), &[inside]),
            None
        );
    }
}
