//! Writes the LB's map entries ([`LbTables`], built by `lb::tables` from a
//! validated configuration), publishing each VIP's flow tables and each
//! stream's Maglev table with one update, and keeps the ids (VIP, config,
//! stream, counters) stable across changes.
//!
//! An apply has three stages: [`LbWriter::plan`] resolves every local
//! interface, checks every target and takes every id and table region on
//! copies of the writer's books, touching no map; only then are the maps
//! written, in an order where the kernel never sees an entry pointing at
//! something not yet written; what is gone is removed last. A refused
//! change therefore leaves every map as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray},
    Ebpf,
};
use tapmesh_common::{
    lb::{
        FlowEntry, FlowMask, LbConfig, NatReplyData, PortData, PortKey, PortNatKey, PortNatValue,
        SourceData, SourceKey, StreamValue, Target, VipAddr, VipConfig, VipKey, VipSender,
        VipValue, MAGLEV_CAPACITY, MAX_FLOWS_PER_VIP, MAX_STREAMS, MAX_VIPS, MAX_VIP_SENDERS,
        NO_TARGET, TARGET_LOCAL, TARGET_REMOTE,
    },
    map_names as n,
    tunnel::PEER_LB,
    PacketCounter,
};

use super::{batch, map_err, map_mut, mapped::MappedArray, tunnel::write_peers, DataplaneError};

/// Map entries of one VIP configuration (under one config id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipTables {
    /// Value of `tm_vip_configs[config_id]`.
    pub config: VipConfig,
    pub dst_ports: Vec<(PortKey, FlowMask)>,
    pub src_ports: Vec<(PortKey, FlowMask)>,
    pub sources: Vec<(SourceKey, FlowMask)>,
    /// `flows[bit]` is `tm_flows[config_id * MAX_FLOWS_PER_VIP + bit]`.
    pub flows: Vec<FlowEntry>,
    /// `tm_port_nats` entries of this configuration.
    pub port_nats: Vec<(PortNatKey, PortNatValue)>,
}

/// A `tm_port_nat_rev` key (`{prefix_len, data}` in the trie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatReplyKey {
    pub prefix_len: u32,
    pub data: NatReplyData,
}

/// What the LB maps should hold, in `common` types and by name: the ids
/// (VIP, config, stream, flow and target indices), table regions and local
/// interfaces are the writer's to fill in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbTables {
    /// How many VIPs are prefixes (`tm_lb_config`: the LPM trie is searched only then).
    pub vip_prefixes: u16,
    /// `tm_port_nat_rev`, sorted by key.
    pub port_nat_replies: Vec<(NatReplyKey, PortNatValue)>,
    pub vips: Vec<VipEntry>,
    pub streams: Vec<StreamEntry>,
    /// Flow names; each has a counter.
    pub flows: Vec<String>,
    pub targets: Vec<TargetEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipEntry {
    pub name: String,
    pub key: VipKey,
    /// Under config id 0; the writer moves them to the VIP's config id.
    pub tables: VipTables,
    /// For each of `tables.flows`: the stream and flow whose ids go in it.
    pub flows: Vec<FlowRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub stream: String,
    pub flow: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamEntry {
    pub name: String,
    /// Maglev table over the slots (identifier − 1) of the stream's targets.
    pub table: Arc<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetEntry {
    pub stream: String,
    pub identifier: u32,
    /// As written, but for what the writer fills in: `stats_index`, and
    /// `ifindex` and `src_mac` (a local target's interface, a remote one's hop).
    pub value: Target,
    /// A local target's interface.
    pub interface: Option<String>,
}

/// What the writer can apply: its tables, or what gives them (the LB
/// model's validated configuration, see `lb::tables`).
pub trait LbInput {
    fn lb_tables(&self) -> std::borrow::Cow<'_, LbTables>;
}

impl LbInput for LbTables {
    fn lb_tables(&self) -> std::borrow::Cow<'_, LbTables> {
        std::borrow::Cow::Borrowed(self)
    }
}

fn array<'a, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<Array<&'a mut MapData, V>, DataplaneError> {
    Array::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

fn trie<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<LpmTrie<&'a mut MapData, K, V>, DataplaneError> {
    LpmTrie::try_from(map_mut(ebpf, name)?).map_err(map_err(name))
}

/// Removes every key of the trie `name` that `wanted` does not accept.
fn sweep_trie<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: impl Fn(&Key<K>) -> bool,
) -> Result<(), DataplaneError> {
    let mut map: LpmTrie<_, K, V> = trie(ebpf, name)?;
    let stale: Vec<Key<K>> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !wanted(k))
        .collect();
    for k in &stale {
        let _ = map.remove(k);
    }
    Ok(())
}

/// Hands out the lowest free index below a limit, and takes it back.
#[derive(Clone, Debug, Default)]
struct Ids {
    used: BTreeSet<u32>,
    /// Every index below this is used: the search starts here, so taking
    /// n indices in a row costs O(n log n), not O(n²).
    first_free: u32,
}

impl Ids {
    fn take(&mut self, limit: u32, what: &'static str) -> Result<u32, DataplaneError> {
        let id = (self.first_free..limit)
            .find(|i| !self.used.contains(i))
            .ok_or(DataplaneError::Full(what))?;
        self.used.insert(id);
        self.first_free = id + 1;
        Ok(id)
    }

    fn give(&mut self, id: u32) {
        self.used.remove(&id);
        self.first_free = self.first_free.min(id);
    }
}

#[cfg(test)]
mod ids_tests {
    use super::Ids;

    #[test]
    fn the_lowest_free_index_is_taken_and_a_given_back_one_first() {
        let mut ids = Ids::default();
        let taken: Vec<u32> = (0..5).map(|_| ids.take(5, "ids").unwrap()).collect();
        assert_eq!(taken, [0, 1, 2, 3, 4]);
        assert!(ids.take(5, "ids").is_err(), "full");
        ids.give(3);
        ids.give(1);
        assert_eq!(ids.take(5, "ids").unwrap(), 1);
        assert_eq!(ids.take(5, "ids").unwrap(), 3);
        assert!(ids.take(5, "ids").is_err());
        ids.give(4);
        assert_eq!(ids.take(5, "ids").unwrap(), 4);
        // 20 000 in a row stay cheap (one pass, not one per index).
        let mut many = Ids::default();
        for want in 0..20_000 {
            assert_eq!(many.take(20_000, "ids").unwrap(), want);
        }
    }
}

/// First-fit regions of `tm_maglev`, which has `capacity` entries.
#[derive(Clone, Debug)]
struct Regions {
    capacity: u32,
    taken: BTreeMap<u32, u32>,
}

impl Default for Regions {
    fn default() -> Self {
        Self {
            capacity: MAGLEV_CAPACITY,
            taken: BTreeMap::new(),
        }
    }
}

impl Regions {
    fn take(&mut self, size: u32) -> Result<u32, DataplaneError> {
        let mut at = 0u32;
        for (&base, &len) in &self.taken {
            if base - at >= size {
                break;
            }
            at = base + len;
        }
        if at.checked_add(size).is_none_or(|end| end > self.capacity) {
            return Err(DataplaneError::Full(
                "Maglev table space (raise dataplane.maglev_entries)",
            ));
        }
        self.taken.insert(at, size);
        Ok(at)
    }

    fn give(&mut self, base: u32) {
        self.taken.remove(&base);
    }
}

#[derive(Debug)]
struct VipSlot {
    index: u32,
    key: VipKey,
    config_id: u32,
    tables: VipTables,
}

#[derive(Debug)]
struct StreamSlot {
    id: u32,
    base: u32,
    table: Arc<Vec<u32>>,
    /// The Maglev table (slots) `table` was made from.
    slots: Arc<Vec<u32>>,
    /// The region published before `base` and its size: the next table of
    /// that size goes there.
    spare: Option<(u32, usize)>,
}

pub use super::tunnel::TunnelSettings;

/// The resolved next hop towards a remote node (from the neighbour resolver).
pub use crate::net::Hop;

/// Where a changed stream table goes.
#[derive(Clone, Copy, Debug)]
struct Placement {
    base: u32,
    /// `base` is the stream's spare region.
    reuse_spare: bool,
}

/// Targets by stream, then identifier.
type TargetBook = BTreeMap<String, BTreeMap<u32, Target>>;

/// The planned targets that differ from the written ones, and the written
/// ones (stream, identifier, index) not planned: one walk of each stream's
/// two sorted maps.
#[allow(clippy::type_complexity)]
fn target_changes<'a>(
    written: &TargetBook,
    planned: &'a TargetBook,
) -> (Vec<(&'a str, u32, Target)>, Vec<(String, u32, u32)>) {
    let empty = BTreeMap::new();
    let mut changed = Vec::new();
    let mut gone = Vec::new();
    let only_written = written
        .iter()
        .filter(|(stream, _)| !planned.contains_key(*stream))
        .flat_map(|(stream, old)| {
            old.iter()
                .map(move |(&id, t)| (stream.clone(), id, t.stats_index))
        });
    gone.extend(only_written);
    for (stream, new) in planned {
        let old = written.get(stream).unwrap_or(&empty);
        let (mut old, mut new) = (old.iter().peekable(), new.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (Some((o, _)), n) if n.is_none_or(|(n, _)| o < n) => {
                    let (&id, t) = old.next().expect("peeked");
                    gone.push((stream.clone(), id, t.stats_index));
                }
                (Some((o, ov)), Some((n, nv))) if o == n => {
                    if ov != nv {
                        changed.push((stream.as_str(), **n, **nv));
                    }
                    old.next();
                    new.next();
                }
                (_, Some(_)) => {
                    let (&id, &t) = new.next().expect("peeked");
                    changed.push((stream.as_str(), id, t));
                }
                (_, None) => break,
            }
        }
    }
    (changed, gone)
}

/// What an apply writes, decided before the first write.
#[derive(Debug)]
struct Plan {
    /// Every target as `tm_targets` will hold it.
    targets: TargetBook,
    /// Ids of what is new.
    new_streams: BTreeMap<String, u32>,
    new_flows: Vec<(String, u32)>,
    new_targets: Vec<u32>,
    new_vips: BTreeMap<String, u32>,
    /// Each stream's table as target indices, and where the changed ones go.
    tables: BTreeMap<String, Arc<Vec<u32>>>,
    placements: BTreeMap<String, Placement>,
    /// Every stream's spare region (base, size) once the tables are
    /// published: given up ones are `None`.
    spares: BTreeMap<String, Option<(u32, usize)>>,
    /// Every `tm_vip_senders` key.
    vip_senders: BTreeSet<VipSender>,
    /// The books after the change.
    vip_ids: Ids,
    stream_ids: Ids,
    flow_ids: Ids,
    target_ids: Ids,
    regions: Regions,
}

/// Finds a local interface's index and MAC.
pub type Resolver<'a> = &'a dyn Fn(&str) -> Result<(u32, [u8; 6]), String>;

/// Counters of one LB object, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedCounter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbCounters {
    pub vips: Vec<NamedCounter>,
    pub flows: Vec<NamedCounter>,
    /// Named `<stream>/<identifier>`.
    pub targets: Vec<NamedCounter>,
}

/// The writer's memory of what is in the maps.
#[derive(Debug, Default)]
pub struct LbWriter {
    vip_ids: Ids,
    stream_ids: Ids,
    flow_ids: Ids,
    target_ids: Ids,
    /// Entries of `tm_targets` and `tm_flow_stats`: the ids there are.
    capacity: IdSpace,
    regions: Regions,
    vips: BTreeMap<String, VipSlot>,
    streams: BTreeMap<String, StreamSlot>,
    flows: BTreeMap<String, u32>,
    /// The targets as written at their indices (`stats_index`).
    targets: TargetBook,
    /// Resolved next hops of remote nodes (copied into their targets).
    hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    /// `tm_vip_slots` as written (non-empty slots only).
    slots: BTreeMap<u32, tapmesh_common::lb::VipSlot>,
    /// Nodes of remote targets, as named in `tm_tunnel_peers` (`PEER_LB`).
    peers: BTreeSet<std::net::Ipv4Addr>,
    /// `tm_port_nat_rev` as written.
    replies: Vec<(NatReplyKey, PortNatValue)>,
    /// `tm_vip_senders` as written.
    vip_senders: BTreeSet<VipSender>,
    /// `tm_maglev` mapped, once a table was written.
    maglev: Option<MappedArray>,
    /// Whether what an earlier daemon left in the maps was swept (after
    /// this writer's first apply).
    swept: bool,
}

/// Entries of `tm_targets` and `tm_flow_stats`, the object's own unless
/// configured.
#[derive(Debug, Clone, Copy, Default)]
struct IdSpace(crate::config::LbCapacity);

fn vip_senders_map(
    ebpf: &mut Ebpf,
) -> Result<BpfHashMap<&mut MapData, VipSender, u8>, DataplaneError> {
    BpfHashMap::try_from(map_mut(ebpf, n::VIP_SENDERS)?).map_err(map_err(n::VIP_SENDERS))
}

/// Each local target's interface with each VIP whose flows go to its
/// stream: the containers there may send from that VIP (their answers).
fn vip_senders(
    tables: &LbTables,
    targets: &TargetBook,
    vip_index: impl Fn(&str) -> Option<u32>,
) -> Result<BTreeSet<VipSender>, DataplaneError> {
    let mut interfaces: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
    for (stream, book) in targets {
        let local = book.values().filter(|t| t.kind == TARGET_LOCAL);
        interfaces.insert(stream, local.map(|t| t.ifindex).collect());
    }
    let mut pairs = BTreeSet::new();
    for vip in &tables.vips {
        let Some(index) = vip_index(&vip.name) else {
            continue;
        };
        for f in &vip.flows {
            for &ifindex in interfaces.get(f.stream.as_str()).into_iter().flatten() {
                pairs.insert(VipSender {
                    ifindex,
                    vip_index: index,
                });
            }
        }
    }
    if pairs.len() > MAX_VIP_SENDERS as usize {
        return Err(DataplaneError::Config(format!(
            "{} pairs of a VIP and a local target's interface serving it, at most {MAX_VIP_SENDERS}: spread the local targets over fewer interfaces or VIPs",
            pairs.len()
        )));
    }
    Ok(pairs)
}

/// The nodes of the remote targets: the ones that may send this node
/// tunnel packets for the load balancer.
fn remote_nodes(targets: &TargetBook) -> BTreeSet<std::net::Ipv4Addr> {
    targets
        .values()
        .flat_map(BTreeMap::values)
        .filter(|t| t.kind == TARGET_REMOTE)
        .map(|t| {
            let [.., a, b, c, d] = t.node_addr;
            std::net::Ipv4Addr::new(a, b, c, d)
        })
        .collect()
}

/// Sets counter `index` of per-CPU array `name` to zero on every CPU: a
/// new entry under a reused index starts from nothing.
pub(super) fn zero_counter(
    ebpf: &mut Ebpf,
    name: &'static str,
    index: u32,
) -> Result<(), DataplaneError> {
    let mut map: PerCpuArray<&mut MapData, PacketCounter> =
        PerCpuArray::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        name,
        message: e.to_string(),
    })?;
    let zeros =
        aya::maps::PerCpuValues::try_from(vec![PacketCounter::default(); cpus]).map_err(|e| {
            DataplaneError::Map {
                name,
                message: e.to_string(),
            }
        })?;
    map.set(index, zeros, 0).map_err(map_err(name))
}

fn read_counter(
    ebpf: &Ebpf,
    name: &'static str,
    index: u32,
) -> Result<PacketCounter, DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::Map {
        name,
        message: "missing from the object".into(),
    })?;
    let map: PerCpuArray<&MapData, PacketCounter> =
        PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut total = PacketCounter::default();
    for cpu in map.get(&index, 0).map_err(map_err(name))?.iter() {
        total.merge(cpu);
    }
    Ok(total)
}

impl LbWriter {
    /// A writer for maps of `capacity`'s sizes (`[dataplane]`).
    pub fn with_capacity(capacity: crate::config::LbCapacity) -> Self {
        let mut writer = Self::default();
        writer.regions.capacity = capacity.maglev_entries;
        writer.capacity = IdSpace(capacity);
        writer
    }

    /// The VIPs written, by name.
    pub fn vip_keys(&self) -> impl Iterator<Item = (&str, &VipKey)> + Clone {
        self.vips
            .iter()
            .map(|(name, slot)| (name.as_str(), &slot.key))
    }

    /// `tm_maglev` mapped into this process (mapped on first use): tables
    /// are written by memory copy, not by syscalls.
    fn mapped_maglev(&mut self, ebpf: &Ebpf) -> Result<&mut MappedArray, DataplaneError> {
        let mapped = match self.maglev.take() {
            Some(mapped) => mapped,
            None => {
                let err = |message: String| DataplaneError::Map {
                    name: n::MAGLEV,
                    message,
                };
                match ebpf.map(n::MAGLEV) {
                    Some(aya::maps::Map::Array(data)) => MappedArray::new(data).map_err(err)?,
                    _ => return Err(err("missing from the object, or not an array".into())),
                }
            }
        };
        Ok(self.maglev.insert(mapped))
    }

    /// Makes the maps hold `input`'s tables. Nothing is written unless all of
    /// it can be: unknown interfaces, remote targets without a tunnel
    /// address and full id spaces are refused first. Each local interface is
    /// resolved once per call.
    pub fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        input: &impl LbInput,
        tunnel: TunnelSettings,
        resolve: Resolver,
    ) -> Result<(), DataplaneError> {
        let tables = input.lb_tables();
        // Mapped before anything is written: a failure here changes nothing.
        self.mapped_maglev(ebpf)?;
        let plan = self.plan(&tables, tunnel, resolve)?;
        self.write(ebpf, &tables, plan)?;
        if !self.swept {
            self.sweep(ebpf)?;
            self.swept = true;
        }
        Ok(())
    }

    /// Removes what maps kept from an earlier daemon (`keep_dataplane`) hold
    /// beyond this writer's first apply: VIP addresses, their slots, reply
    /// translations and the tunnel peers of its remote targets. Made before
    /// broken: the new entries are in place first, so kept VIPs that stay
    /// lose no packet. Without it, a kept VIP gone from the configuration
    /// would still match, and through a reused VIP index reach another
    /// VIP's targets. The other maps are reached only through these.
    fn sweep(&mut self, ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
        use tapmesh_common::lb::{vip_slot, VipSlot};
        let written: Vec<VipKey> = self.vips.values().map(|v| v.key).collect();
        let mut hosts: BpfHashMap<_, VipAddr, VipValue> =
            BpfHashMap::try_from(map_mut(ebpf, n::VIP_HOSTS)?).map_err(map_err(n::VIP_HOSTS))?;
        let stale_hosts: Vec<VipAddr> = hosts
            .keys()
            .filter_map(Result::ok)
            .filter(|a| {
                !written
                    .iter()
                    .any(|k| k.prefix_len == 128 && VipAddr::from(k) == *a)
            })
            .collect();
        for a in &stale_hosts {
            let _ = hosts.remove(a);
        }
        let mut slots = array::<VipSlot>(ebpf, n::VIP_SLOTS)?;
        for a in &stale_hosts {
            let slot = vip_slot(&a.addr);
            if !self.slots.contains_key(&slot) {
                slots
                    .set(slot, VipSlot::default(), 0)
                    .map_err(map_err(n::VIP_SLOTS))?;
            }
        }
        sweep_trie::<VipAddr, VipValue>(ebpf, n::VIPS, |k| {
            written
                .iter()
                .any(|w| w.prefix_len == k.prefix_len() && VipAddr::from(w) == k.data())
        })?;
        let replies = &self.replies;
        sweep_trie::<NatReplyData, PortNatValue>(ebpf, n::PORT_NAT_REPLIES, |k| {
            replies
                .iter()
                .any(|(r, _)| r.prefix_len == k.prefix_len() && r.data == k.data())
        })?;
        let mut vip_senders = vip_senders_map(ebpf)?;
        let stale: Vec<VipSender> = (vip_senders.keys().filter_map(Result::ok))
            .filter(|a| !self.vip_senders.contains(a))
            .collect();
        for a in &stale {
            let _ = vip_senders.remove(a);
        }
        let peers: BpfHashMap<_, [u8; 4], u8> =
            BpfHashMap::try_from(map_mut(ebpf, n::TUNNEL_PEERS)?)
                .map_err(map_err(n::TUNNEL_PEERS))?;
        let mut had: BTreeSet<std::net::Ipv4Addr> = peers
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, bits)| bits & PEER_LB != 0)
            .map(|(a, _)| a.into())
            .collect();
        had.extend(self.peers.iter().copied());
        write_peers(ebpf, PEER_LB, &had, &self.peers.clone())
    }

    /// Resolves, checks and allocates everything `tables` needs, on copies
    /// of the writer's books; touches no map.
    fn plan(
        &self,
        tables: &LbTables,
        tunnel: TunnelSettings,
        resolve: Resolver,
    ) -> Result<Plan, DataplaneError> {
        let mut interfaces: HashMap<&str, (u32, [u8; 6])> = HashMap::new();
        let mut last: Option<(&str, (u32, [u8; 6]))> = None;
        let mut target_ids = self.target_ids.clone();
        let mut new_targets = Vec::new();
        let mut targets = TargetBook::new();
        // In (stream, identifier) order, which sets the ids new targets take.
        let mut sorted: BTreeMap<&str, Vec<&TargetEntry>> = BTreeMap::new();
        for t in &tables.targets {
            sorted.entry(t.stream.as_str()).or_default().push(t);
        }
        for (stream, mut list) in sorted {
            list.sort_by_key(|t| t.identifier);
            // The last of a repeated identifier counts, as in a map.
            list.dedup_by(|later, earlier| {
                let same = later.identifier == earlier.identifier;
                if same {
                    std::mem::swap(later, earlier);
                }
                same
            });
            let written = self.targets.get(stream);
            // In identifier order: the map is built at once, not entry by entry.
            let mut planned = Vec::with_capacity(list.len());
            for t in list {
                let mut value = t.value;
                match &t.interface {
                    Some(interface) => {
                        let known = match last {
                            Some((name, found)) if name == interface => Some(found),
                            _ => interfaces.get(interface.as_str()).copied(),
                        };
                        let (ifindex, our_mac) = match known {
                            Some(found) => found,
                            None => {
                                let found = resolve(interface).map_err(|message| {
                                    DataplaneError::Interface {
                                        stream: t.stream.clone(),
                                        identifier: t.identifier,
                                        interface: interface.clone(),
                                        // Named once: most causes name it.
                                        message: match message.contains(&format!("{interface:?}")) {
                                            true => message,
                                            false => format!("interface {interface:?}: {message}"),
                                        },
                                    }
                                })?;
                                interfaces.insert(interface, found);
                                found
                            }
                        };
                        // Targets share a few interfaces, usually in runs.
                        last = Some((interface.as_str(), (ifindex, our_mac)));
                        value.ifindex = ifindex;
                        value.src_mac = our_mac;
                    }
                    None => {
                        if tunnel.address.is_none() {
                            return Err(DataplaneError::Config(format!(
                                "target {} of stream {:?} is on another node, but this node has no tunnel address (set lb.node_address)",
                                t.identifier, t.stream
                            )));
                        }
                        self.with_hop(&mut value);
                    }
                }
                value.stats_index = match written.and_then(|w| w.get(&t.identifier)) {
                    Some(old) => old.stats_index,
                    None => {
                        let id = target_ids.take(
                            self.capacity.0.target_entries,
                            "targets (raise dataplane.target_entries: a change needs room for its new targets beside the ones it replaces)",
                        )?;
                        new_targets.push(id);
                        id
                    }
                };
                planned.push((t.identifier, value));
            }
            targets.insert(stream.to_string(), planned.into_iter().collect());
        }

        let mut stream_ids = self.stream_ids.clone();
        let mut new_streams = BTreeMap::new();
        for s in &tables.streams {
            if !self.streams.contains_key(&s.name) && !new_streams.contains_key(&s.name) {
                new_streams.insert(s.name.clone(), stream_ids.take(MAX_STREAMS, "stream ids")?);
            }
        }
        let mut flow_ids = self.flow_ids.clone();
        let mut new_flows = Vec::new();
        for f in &tables.flows {
            if !self.flows.contains_key(f) && !new_flows.iter().any(|(n, _)| n == f) {
                new_flows.push((
                    f.clone(),
                    flow_ids.take(
                    self.capacity.0.flow_entries,
                    "flows (raise dataplane.flow_entries: a change needs room for its new flows beside the ones it replaces)",
                )?,
                ));
            }
        }
        let mut vip_ids = self.vip_ids.clone();
        let mut new_vips = BTreeMap::new();
        for v in &tables.vips {
            if !self.vips.contains_key(&v.name) && !new_vips.contains_key(&v.name) {
                new_vips.insert(v.name.clone(), vip_ids.take(MAX_VIPS, "VIP ids")?);
            }
        }

        // Slots (identifier − 1) become target indices.
        let mut stream_tables = BTreeMap::new();
        for s in &tables.streams {
            // Sized by the highest identifier, not by a pass over the table:
            // a slot past it has no target either way.
            let of_stream = targets.get(&s.name);
            let highest = of_stream.and_then(|m| m.keys().next_back()).copied();
            let mut index = vec![NO_TARGET; highest.map_or(0, |h| h as usize)];
            for (identifier, t) in of_stream.into_iter().flatten() {
                let slot = identifier.checked_sub(1).map(|i| i as usize);
                if let Some(i) = slot.and_then(|i| index.get_mut(i)) {
                    *i = t.stats_index;
                }
            }
            let target = |slot: u32| index.get(slot as usize).copied().unwrap_or(NO_TARGET);
            // A target kept keeps its index, so only the entries whose slot
            // changed since the published table need a lookup. This holds
            // because every slot of a validated table has a target (`lb::tables`):
            // a target added or gone changes the slots.
            let table: Arc<Vec<u32>> = match self.streams.get(&s.name) {
                Some(cur) if Arc::ptr_eq(&cur.slots, &s.table) => cur.table.clone(),
                Some(cur)
                    if cur.slots.len() == s.table.len() && cur.table.len() == s.table.len() =>
                {
                    let unchanged = (cur.slots.iter().zip(cur.table.iter()))
                        .zip(s.table.iter())
                        .map(|((&old, &at), &new)| if old == new { at } else { target(new) });
                    Arc::new(unchanged.collect())
                }
                _ => Arc::new(s.table.iter().map(|&slot| target(slot)).collect()),
            };
            stream_tables.insert(s.name.clone(), table);
        }
        let (placements, regions, spares) = self.place(tables, &stream_tables)?;
        let vip_index = |name: &str| match self.vips.get(name) {
            Some(v) => Some(v.index),
            None => new_vips.get(name).copied(),
        };
        let vip_senders = vip_senders(tables, &targets, vip_index)?;
        Ok(Plan {
            vip_senders,
            targets,
            new_streams,
            new_flows,
            new_targets,
            new_vips,
            tables: stream_tables,
            placements,
            spares,
            vip_ids,
            stream_ids,
            flow_ids,
            target_ids,
            regions,
        })
    }

    /// Regions for the changed stream tables, in stream order: the stream's
    /// spare when it has the size, else a new region (giving up every spare
    /// when none is free). After a stream's table is published, the region
    /// it replaces becomes its spare.
    #[allow(clippy::type_complexity)]
    fn place(
        &self,
        tables: &LbTables,
        stream_tables: &BTreeMap<String, Arc<Vec<u32>>>,
    ) -> Result<
        (
            BTreeMap<String, Placement>,
            Regions,
            BTreeMap<String, Option<(u32, usize)>>,
        ),
        DataplaneError,
    > {
        let mut regions = self.regions.clone();
        let mut spares: BTreeMap<String, Option<(u32, usize)>> = self
            .streams
            .iter()
            .map(|(name, s)| (name.clone(), s.spare))
            .collect();
        let mut placements = BTreeMap::new();
        for s in &tables.streams {
            let table = &stream_tables[&s.name];
            let current = self.streams.get(&s.name);
            if current.is_some_and(|c| c.table == *table) || placements.contains_key(&s.name) {
                continue;
            }
            let size = table.len() as u32;
            let placement = match spares.get_mut(&s.name).and_then(Option::take) {
                Some((base, len)) if len == table.len() => Placement {
                    base,
                    reuse_spare: true,
                },
                other => {
                    if let Some((base, _)) = other {
                        regions.give(base);
                    }
                    let base = match regions.take(size) {
                        Err(DataplaneError::Full(_)) => {
                            for spare in spares.values_mut() {
                                if let Some((base, _)) = spare.take() {
                                    regions.give(base);
                                }
                            }
                            regions.take(size)?
                        }
                        other => other?,
                    };
                    Placement {
                        base,
                        reuse_spare: false,
                    }
                }
            };
            placements.insert(s.name.clone(), placement);
            let replaced = current
                .filter(|c| !c.table.is_empty())
                .map(|c| (c.base, c.table.len()));
            spares.insert(s.name.clone(), replaced);
        }
        Ok((placements, regions, spares))
    }

    /// Writes what `plan` decided: counters of new objects, targets, stream
    /// tables, VIP tables and entries, slots and `tm_lb_config`; then removes what
    /// is gone, tables first, targets last. Ids of what did not get written
    /// are given back if a write fails.
    fn write(
        &mut self,
        ebpf: &mut Ebpf,
        tables: &LbTables,
        plan: Plan,
    ) -> Result<(), DataplaneError> {
        self.vip_ids = plan.vip_ids.clone();
        self.stream_ids = plan.stream_ids.clone();
        self.flow_ids = plan.flow_ids.clone();
        self.target_ids = plan.target_ids.clone();
        self.regions = plan.regions.clone();
        for (name, &id) in &plan.new_streams {
            self.streams.insert(
                name.clone(),
                StreamSlot {
                    id,
                    base: 0,
                    table: Arc::default(),
                    slots: Arc::default(),
                    spare: None,
                },
            );
        }
        let mut published = BTreeSet::new();
        let result = self.write_planned(ebpf, tables, &plan, &mut published);
        // Spares the plan gave up are free; a table planned but not
        // published gives its region back (and a spare it was to reuse).
        for (name, slot) in self.streams.iter_mut() {
            match plan.placements.get(name) {
                Some(p) if !published.contains(name) => {
                    self.regions.give(p.base);
                    slot.spare = None;
                }
                _ if plan.spares.get(name).is_some_and(Option::is_none) => slot.spare = None,
                _ => {}
            }
        }
        if result.is_err() {
            for (name, id) in &plan.new_flows {
                if self.flows.get(name) != Some(id) {
                    self.flow_ids.give(*id);
                }
            }
            let written: BTreeSet<u32> = self
                .targets
                .values()
                .flat_map(BTreeMap::values)
                .map(|t| t.stats_index)
                .collect();
            for id in &plan.new_targets {
                if !written.contains(id) {
                    self.target_ids.give(*id);
                }
            }
            for (name, id) in &plan.new_vips {
                if !self.vips.contains_key(name) {
                    self.vip_ids.give(*id);
                }
            }
        }
        result
    }

    fn write_planned(
        &mut self,
        ebpf: &mut Ebpf,
        tables: &LbTables,
        plan: &Plan,
        published: &mut BTreeSet<String>,
    ) -> Result<(), DataplaneError> {
        // New nodes may use the tunnel before targets name them; gone ones
        // lose it once their targets are gone (at the end).
        let peers = remote_nodes(&plan.targets);
        let during: BTreeSet<_> = self.peers.union(&peers).copied().collect();
        write_peers(ebpf, PEER_LB, &self.peers, &during)?;
        self.peers = during;
        for (name, id) in &plan.new_flows {
            zero_counter(ebpf, n::FLOW_STATS, *id)?;
            self.flows.insert(name.clone(), *id);
        }

        // Targets before the tables that point at them; a target's index is
        // also its counters' index and what Maglev entries hold. Changed and
        // new targets are written in one batch.
        for id in &plan.new_targets {
            zero_counter(ebpf, n::TARGET_STATS, *id)?;
        }
        let (changed, gone) = target_changes(&self.targets, &plan.targets);
        let (indices, values): (Vec<u32>, Vec<Target>) =
            changed.iter().map(|(_, _, v)| (v.stats_index, *v)).unzip();
        let mut map = array::<Target>(ebpf, n::TARGETS)?;
        batch::set_many(&mut map, &indices, &values).map_err(|e| DataplaneError::Map {
            name: n::TARGETS,
            message: e.to_string(),
        })?;
        for (stream, id, value) in changed {
            match self.targets.get_mut(stream) {
                Some(written) => written.insert(id, value),
                None => self
                    .targets
                    .entry(stream.to_string())
                    .or_default()
                    .insert(id, value),
            };
        }

        // Containers may answer from a VIP before it sends them anything.
        self.write_vip_senders(ebpf, &plan.vip_senders)?;
        for s in &tables.streams {
            if let Some(&placement) = plan.placements.get(&s.name) {
                if !published.contains(&s.name) {
                    let table = &plan.tables[&s.name];
                    self.write_stream(ebpf, &s.name, table, &s.table, placement)?;
                    published.insert(s.name.clone());
                }
            }
        }
        // Reply translations before the VIPs that make them needed; gone
        // ones after the VIPs stopped translating (at the end).
        self.write_replies(ebpf, &tables.port_nat_replies)?;
        for vip in &tables.vips {
            self.write_vip(ebpf, vip, plan.new_vips.get(&vip.name).copied())?;
        }
        self.write_slots(ebpf, tables)?;
        self.write_lb_config(
            ebpf,
            LbConfig {
                vip_prefixes: u32::from(tables.vip_prefixes),
                port_nat_replies: tables.port_nat_replies.len() as u32,
            },
        )?;

        // Then remove what is gone, tables first, targets last.
        let vips: BTreeSet<&str> = tables.vips.iter().map(|v| v.name.as_str()).collect();
        for name in self
            .vips
            .keys()
            .filter(|k| !vips.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            self.remove_vip(ebpf, &name)?;
        }
        let streams: BTreeSet<&str> = tables.streams.iter().map(|s| s.name.as_str()).collect();
        for name in self
            .streams
            .keys()
            .filter(|k| !streams.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            array::<StreamValue>(ebpf, n::STREAMS)?
                .set(self.streams[&name].id, StreamValue::default(), 0)
                .map_err(map_err(n::STREAMS))?;
            let slot = self.streams.remove(&name).expect("listed");
            if !slot.table.is_empty() {
                self.regions.give(slot.base);
            }
            if let Some((base, _)) = slot.spare {
                self.regions.give(base);
            }
            self.stream_ids.give(slot.id);
        }
        for (stream, id, index) in gone {
            array::<Target>(ebpf, n::TARGETS)?
                .set(index, Target::default(), 0)
                .map_err(map_err(n::TARGETS))?;
            if let Some(written) = self.targets.get_mut(&stream) {
                written.remove(&id);
                if written.is_empty() {
                    self.targets.remove(&stream);
                }
            }
            self.target_ids.give(index);
        }
        let flows: BTreeSet<&str> = tables.flows.iter().map(String::as_str).collect();
        for name in self
            .flows
            .keys()
            .filter(|k| !flows.contains(k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
        {
            let id = self.flows.remove(&name).expect("listed");
            self.flow_ids.give(id);
        }
        self.remove_replies(ebpf, &tables.port_nat_replies)?;
        self.remove_vip_senders(ebpf, &plan.vip_senders)?;
        write_peers(ebpf, PEER_LB, &self.peers, &peers)?;
        self.peers = peers;
        Ok(())
    }

    fn write_lb_config(&mut self, ebpf: &mut Ebpf, config: LbConfig) -> Result<(), DataplaneError> {
        array::<LbConfig>(ebpf, n::LB_CONFIG)?
            .set(0, config, 0)
            .map_err(map_err(n::LB_CONFIG))
    }

    /// Adds or changes the reply translations of `wanted` that differ.
    fn write_replies(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &[(NatReplyKey, PortNatValue)],
    ) -> Result<(), DataplaneError> {
        let mut map: LpmTrie<_, NatReplyData, PortNatValue> = trie(ebpf, n::PORT_NAT_REPLIES)?;
        for (k, v) in wanted {
            if self.replies.iter().any(|(ok, ov)| ok == k && ov == v) {
                continue;
            }
            map.insert(&Key::new(k.prefix_len, k.data), *v, 0)
                .map_err(map_err(n::PORT_NAT_REPLIES))?;
            self.replies.retain(|(ok, _)| ok != k);
            self.replies.push((*k, *v));
        }
        Ok(())
    }

    /// Removes the reply translations not in `wanted`.
    fn remove_replies(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &[(NatReplyKey, PortNatValue)],
    ) -> Result<(), DataplaneError> {
        let mut map: LpmTrie<_, NatReplyData, PortNatValue> = trie(ebpf, n::PORT_NAT_REPLIES)?;
        let gone: Vec<NatReplyKey> = self
            .replies
            .iter()
            .filter(|(k, _)| !wanted.iter().any(|(w, _)| w == k))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            let _ = map.remove(&Key::new(k.prefix_len, k.data));
            self.replies.retain(|(ok, _)| *ok != k);
        }
        Ok(())
    }

    fn write_vip_senders(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &BTreeSet<VipSender>,
    ) -> Result<(), DataplaneError> {
        let mut map = vip_senders_map(ebpf)?;
        let new: Vec<VipSender> = wanted.difference(&self.vip_senders).copied().collect();
        for a in new {
            map.insert(a, 1, 0).map_err(map_err(n::VIP_SENDERS))?;
            self.vip_senders.insert(a);
        }
        Ok(())
    }

    fn remove_vip_senders(
        &mut self,
        ebpf: &mut Ebpf,
        wanted: &BTreeSet<VipSender>,
    ) -> Result<(), DataplaneError> {
        let mut map = vip_senders_map(ebpf)?;
        for a in self
            .vip_senders
            .difference(wanted)
            .copied()
            .collect::<Vec<_>>()
        {
            let _ = map.remove(&a);
            self.vip_senders.remove(&a);
        }
        Ok(())
    }

    /// Points each host VIP's slot at it (several in one slot: the hash map
    /// decides). VIPs being removed lose their slot first.
    fn write_slots(&mut self, ebpf: &mut Ebpf, tables: &LbTables) -> Result<(), DataplaneError> {
        use tapmesh_common::lb::{vip_slot, VipSlot, SLOT_ONE, SLOT_SHARED};
        let mut slots: BTreeMap<u32, VipSlot> = BTreeMap::new();
        for vip in &tables.vips {
            let key = vip.key;
            if key.prefix_len != 128 {
                continue;
            }
            let index = self.vips[&vip.name].index;
            slots
                .entry(vip_slot(&key.addr))
                .and_modify(|s| s.state = SLOT_SHARED)
                .or_insert(VipSlot {
                    addr: key.addr,
                    vip_index: index,
                    state: SLOT_ONE,
                });
        }
        let mut map = array::<VipSlot>(ebpf, n::VIP_SLOTS)?;
        for (slot, value) in &slots {
            if self.slots.get(slot) != Some(value) {
                map.set(*slot, *value, 0).map_err(map_err(n::VIP_SLOTS))?;
            }
        }
        for slot in self.slots.keys().filter(|k| !slots.contains_key(k)) {
            map.set(*slot, VipSlot::default(), 0)
                .map_err(map_err(n::VIP_SLOTS))?;
        }
        self.slots = slots;
        Ok(())
    }

    /// Writes a changed table where the plan put it (into the spare region
    /// when it has the size); one write of the stream entry publishes it,
    /// and the region it replaces becomes the spare.
    fn write_stream(
        &mut self,
        ebpf: &mut Ebpf,
        name: &str,
        table: &Arc<Vec<u32>>,
        slots: &Arc<Vec<u32>>,
        placement: Placement,
    ) -> Result<(), DataplaneError> {
        let slot = self.streams.get_mut(name).expect("stream id assigned");
        let id = slot.id;
        let base = placement.base;
        if placement.reuse_spare {
            slot.spare = None;
        }
        // The whole table: a pass over memory costs less than comparing.
        self.mapped_maglev(ebpf)?
            .write(base, table)
            .map_err(|message| DataplaneError::Map {
                name: n::MAGLEV,
                message,
            })?;
        let value = StreamValue {
            table_base: base,
            table_size: table.len() as u32,
        };
        array::<StreamValue>(ebpf, n::STREAMS)?
            .set(id, value, 0)
            .map_err(map_err(n::STREAMS))?;
        let slot = self.streams.get_mut(name).expect("stream id assigned");
        if !slot.table.is_empty() {
            slot.spare = Some((slot.base, slot.table.len()));
        }
        slot.base = base;
        slot.table = table.clone();
        slot.slots = slots.clone();
        Ok(())
    }

    /// Writes the VIP's tables under its other config id, then flips the VIP
    /// entry; a new VIP gets `new_index` (from the plan).
    fn write_vip(
        &mut self,
        ebpf: &mut Ebpf,
        vip: &VipEntry,
        new_index: Option<u32>,
    ) -> Result<(), DataplaneError> {
        let key = vip.key;
        let (index, config_id) = match (self.vips.get(&vip.name), new_index) {
            (Some(slot), _) => (slot.index, slot.config_id ^ 1),
            (None, Some(index)) => {
                zero_counter(ebpf, n::VIP_STATS, index)?;
                (index, 2 * index)
            }
            (None, None) => return Err(DataplaneError::Full("VIP ids")),
        };
        let mut tables = vip.tables.clone();
        retarget(&mut tables, config_id);
        for (entry, r) in tables.flows.iter_mut().zip(&vip.flows) {
            entry.stream_id = self.streams.get(&r.stream).map_or(u32::MAX, |s| s.id);
            entry.stats_index = self.flows.get(&r.flow).copied().unwrap_or(0);
        }
        if let Some(slot) = self.vips.get(&vip.name) {
            let mut old = slot.tables.clone();
            retarget(&mut old, config_id);
            if old == tables && slot.key == key {
                return Ok(());
            }
        }
        write_tables(ebpf, config_id, &tables)?;
        set_vip(
            ebpf,
            &key,
            VipValue {
                vip_index: index,
                config_id,
            },
        )?;
        if let Some(old) = self.vips.remove(&vip.name) {
            // Its old address may be another VIP's now (taken over, or swapped).
            if old.key != key && !self.vips.values().any(|v| v.key == old.key) {
                remove_vip_key(ebpf, &old.key)?;
            }
            clear_tables(ebpf, &old.tables)?;
        }
        self.vips.insert(
            vip.name.clone(),
            VipSlot {
                index,
                key,
                config_id,
                tables,
            },
        );
        Ok(())
    }

    fn remove_vip(&mut self, ebpf: &mut Ebpf, name: &str) -> Result<(), DataplaneError> {
        let Some(slot) = self.vips.remove(name) else {
            return Ok(());
        };
        // A VIP renamed keeps its address: the new name's entry is there.
        if !self.vips.values().any(|v| v.key == slot.key) {
            remove_vip_key(ebpf, &slot.key)?;
        }
        clear_tables(ebpf, &slot.tables)?;
        self.vip_ids.give(slot.index);
        Ok(())
    }

    /// Copies the next hop of a remote target's node (none: a FIB lookup per packet).
    fn with_hop(&self, target: &mut Target) {
        let a = &target.node_addr;
        let node = std::net::Ipv4Addr::new(a[12], a[13], a[14], a[15]);
        let hop = self.hops.get(&node);
        (target.ifindex, target.dst_mac, target.src_mac) = Hop::entry(hop);
        target.mtu = hop.map_or(0, |h| h.mtu);
        target.hop_flags = match hop {
            Some(h) if !h.veth => tapmesh_common::lb::HOP_TX,
            _ => 0,
        };
    }

    /// Replaces the known next hops and rewrites the remote targets whose hop
    /// changed (a node without one goes back to a FIB lookup per packet).
    pub fn set_hops(
        &mut self,
        ebpf: &mut Ebpf,
        hops: BTreeMap<std::net::Ipv4Addr, Hop>,
    ) -> Result<(), DataplaneError> {
        self.hops = hops;
        let mut targets = std::mem::take(&mut self.targets);
        let result = targets
            .values_mut()
            .flat_map(BTreeMap::values_mut)
            .filter(|t| t.kind == TARGET_REMOTE)
            .try_for_each(|written| {
                let mut value = *written;
                self.with_hop(&mut value);
                if *written != value {
                    array::<Target>(ebpf, n::TARGETS)?
                        .set(value.stats_index, value, 0)
                        .map_err(map_err(n::TARGETS))?;
                    *written = value;
                }
                Ok(())
            });
        self.targets = targets;
        result
    }

    /// Per-VIP, per-flow and per-target counters, summed over CPUs.
    pub fn counters(&self, ebpf: &Ebpf) -> Result<LbCounters, DataplaneError> {
        let mut out = LbCounters::default();
        let named = |name: String, c: PacketCounter| NamedCounter {
            name,
            packets: c.packets,
            bytes: c.bytes,
        };
        for (name, slot) in &self.vips {
            out.vips.push(named(
                name.clone(),
                read_counter(ebpf, n::VIP_STATS, slot.index)?,
            ));
        }
        for (name, id) in &self.flows {
            out.flows
                .push(named(name.clone(), read_counter(ebpf, n::FLOW_STATS, *id)?));
        }
        let all = self
            .targets
            .iter()
            .flat_map(|(s, t)| t.iter().map(move |(id, t)| (s, id, t)));
        for (stream, identifier, target) in all {
            let c = read_counter(ebpf, n::TARGET_STATS, target.stats_index)?;
            out.targets.push(named(format!("{stream}/{identifier}"), c));
        }
        Ok(out)
    }
}

/// Host VIPs go to the hash map and `tm_vip_values` (where their slot leads),
/// prefixes to the LPM trie; each is one write, so a new config is published at once.
fn set_vip(ebpf: &mut Ebpf, key: &VipKey, value: VipValue) -> Result<(), DataplaneError> {
    if key.prefix_len == 128 {
        array::<VipValue>(ebpf, n::VIP_VALUES)?
            .set(value.vip_index, value, 0)
            .map_err(map_err(n::VIP_VALUES))?;
        let mut hosts: BpfHashMap<_, VipAddr, VipValue> =
            BpfHashMap::try_from(map_mut(ebpf, n::VIP_HOSTS)?).map_err(map_err(n::VIP_HOSTS))?;
        hosts
            .insert(VipAddr::from(key), value, 0)
            .map_err(map_err(n::VIP_HOSTS))
    } else {
        let mut vips: LpmTrie<_, VipAddr, VipValue> = trie(ebpf, n::VIPS)?;
        vips.insert(&Key::new(key.prefix_len, VipAddr::from(key)), value, 0)
            .map_err(map_err(n::VIPS))
    }
}

fn remove_vip_key(ebpf: &mut Ebpf, key: &VipKey) -> Result<(), DataplaneError> {
    if key.prefix_len == 128 {
        let mut hosts: BpfHashMap<_, VipAddr, VipValue> =
            BpfHashMap::try_from(map_mut(ebpf, n::VIP_HOSTS)?).map_err(map_err(n::VIP_HOSTS))?;
        hosts
            .remove(&VipAddr::from(key))
            .map_err(map_err(n::VIP_HOSTS))
    } else {
        let mut vips: LpmTrie<_, VipAddr, VipValue> = trie(ebpf, n::VIPS)?;
        vips.remove(&Key::new(key.prefix_len, VipAddr::from(key)))
            .map_err(map_err(n::VIPS))
    }
}

/// The same tables as if written under `config_id` (to compare configurations).
fn retarget(t: &mut VipTables, config_id: u32) {
    let id = config_id.to_be_bytes();
    for (k, _) in t.dst_ports.iter_mut().chain(t.src_ports.iter_mut()) {
        k.config_id = id;
    }
    for (k, _) in t.sources.iter_mut() {
        k.config_id = id;
    }
    // A flow's `tm_flows` index is config id * 64 + bit.
    let base = config_id * MAX_FLOWS_PER_VIP;
    for (k, _) in t.port_nats.iter_mut() {
        k.flow = base + k.flow % MAX_FLOWS_PER_VIP;
    }
    for (bit, f) in t.flows.iter_mut().enumerate() {
        if f.port_nat != 0 {
            f.port_nat = base + bit as u32 + 1;
        }
    }
}

fn port_key(k: &PortKey) -> Key<PortData> {
    Key::new(k.prefix_len, PortData::from(k))
}

fn source_key(k: &SourceKey) -> Key<SourceData> {
    Key::new(k.prefix_len, SourceData::from(k))
}

fn write_tables(ebpf: &mut Ebpf, config_id: u32, t: &VipTables) -> Result<(), DataplaneError> {
    use tapmesh_common::lb::{LOOKUP_DST_PORTS, LOOKUP_SOURCES, LOOKUP_SRC_PORTS};
    let searched = |bit: u32| t.config.lookups & bit != 0;
    for (name, entries, bit) in [
        (n::DST_PORTS, &t.dst_ports, LOOKUP_DST_PORTS),
        (n::SRC_PORTS, &t.src_ports, LOOKUP_SRC_PORTS),
    ] {
        if !searched(bit) {
            continue;
        }
        let mut map: LpmTrie<_, PortData, FlowMask> = trie(ebpf, name)?;
        for (k, v) in entries {
            map.insert(&port_key(k), *v, 0).map_err(map_err(name))?;
        }
    }
    if searched(LOOKUP_SOURCES) {
        let mut sources: LpmTrie<_, SourceData, FlowMask> = trie(ebpf, n::SOURCES)?;
        for (k, v) in &t.sources {
            sources
                .insert(&source_key(k), *v, 0)
                .map_err(map_err(n::SOURCES))?;
        }
    }
    let mut nats: BpfHashMap<_, PortNatKey, PortNatValue> =
        BpfHashMap::try_from(map_mut(ebpf, n::PORT_NATS)?).map_err(map_err(n::PORT_NATS))?;
    for (k, v) in &t.port_nats {
        nats.insert(k, v, 0).map_err(map_err(n::PORT_NATS))?;
    }
    let mut flows = array::<FlowEntry>(ebpf, n::FLOWS)?;
    for (bit, f) in t.flows.iter().enumerate() {
        flows
            .set(config_id * MAX_FLOWS_PER_VIP + bit as u32, *f, 0)
            .map_err(map_err(n::FLOWS))?;
    }
    array::<VipConfig>(ebpf, n::VIP_CONFIGS)?
        .set(config_id, t.config, 0)
        .map_err(map_err(n::VIP_CONFIGS))
}

/// Removes a configuration no VIP entry points at any more.
fn clear_tables(ebpf: &mut Ebpf, t: &VipTables) -> Result<(), DataplaneError> {
    for (name, entries) in [(n::DST_PORTS, &t.dst_ports), (n::SRC_PORTS, &t.src_ports)] {
        let mut map: LpmTrie<_, PortData, FlowMask> = trie(ebpf, name)?;
        for (k, _) in entries {
            let _ = map.remove(&port_key(k));
        }
    }
    let mut sources: LpmTrie<_, SourceData, FlowMask> = trie(ebpf, n::SOURCES)?;
    for (k, _) in &t.sources {
        let _ = sources.remove(&source_key(k));
    }
    let mut nats: BpfHashMap<_, PortNatKey, PortNatValue> =
        BpfHashMap::try_from(map_mut(ebpf, n::PORT_NATS)?).map_err(map_err(n::PORT_NATS))?;
    for (k, _) in &t.port_nats {
        let _ = nats.remove(k);
    }
    Ok(())
}
