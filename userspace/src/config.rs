//! Daemon configuration: a TOML file, overridden by environment and flags.
//!
//! Precedence: flag > environment variable > file > default. Every problem is
//! a [`ConfigError`] that names the setting and what to do about it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/tapmesh/admin.sock";
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/tapmesh";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tapmesh";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{setting}: interface {name:?} does not exist")]
    UnknownInterface { setting: &'static str, name: String },
    #[error("{setting}: {message}")]
    BadValue {
        setting: &'static str,
        message: String,
    },
}

/// How XDP is attached to an uplink.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode where the driver allows it, generic otherwise.
    #[default]
    Auto,
    /// Native mode only; fail if the driver cannot.
    Native,
    /// Generic (skb) mode.
    Generic,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// The admin gRPC socket (root only).
    pub admin_socket: PathBuf,
    /// A tracing filter such as "info" or "tapmesh=debug".
    pub log_level: String,
    /// Where every plugin keeps what survives a restart: the registry and
    /// conduits, tap services and flows, NetManager deployments, EDS
    /// backend identities.
    pub state_dir: PathBuf,
    /// "text" (one readable line per event) or "json" (one object per line).
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A TOML error as one line that names where it is: "line N: message".
pub fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            admin_socket: DEFAULT_ADMIN_SOCKET.into(),
            log_level: "info".into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            log_format: LogFormat::Text,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneConfig {
    /// Maps and links are pinned under `<bpffs_root>/v<schema>/`.
    pub bpffs_root: PathBuf,
    /// Interfaces that get the uplink XDP program.
    pub uplinks: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Interfaces that get the TC ingress and egress programs.
    pub tc_interfaces: Vec<String>,
    /// Leave programs attached and maps pinned when the daemon stops.
    pub keep_dataplane: bool,
    /// Maglev table space shared by every stream (`tm_maglev`; 8 bytes of
    /// kernel memory each): a stream needs its table size, twice while
    /// its table is replaced.
    pub maglev_entries: u32,
    /// Overlay connections remembered, IPv4 (`tm_ov_ct`, LRU; a flow takes two).
    pub conntrack_entries: u32,
    /// The same for IPv6 (`tm_ov_ct6`).
    pub conntrack6_entries: u32,
    /// Bytes of the ring buffer that carries copies to mirror rings
    /// (`tm_mirror_copy`): a power of two, in whole pages. A small copy
    /// takes its length + 32 bytes, rounded up to 8, so 16 MiB hold about
    /// 170 ms of 64-byte copies at 1 Mpps.
    pub mirror_copy_bytes: u32,
    /// LB targets over all streams (`tm_targets`, 48 bytes each, and the
    /// per-CPU `tm_target_stats`, 16 bytes per CPU each: the bulk on a
    /// node with many CPUs).
    pub target_entries: u32,
    /// LB flows over all VIPs: the per-CPU `tm_flow_stats`, 16 bytes per
    /// CPU each.
    pub flow_entries: u32,
    /// Overlay instances, local and remote (`tm_ov_instances` and
    /// `tm_ov_inst6`, and the per-CPU `tm_ov_ins_stats`, 16 bytes per CPU each).
    pub instance_entries: u32,
}

/// The map space the LB's tables must fit in (`[dataplane]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbCapacity {
    /// Entries of `tm_maglev`, which every table must fit in together.
    pub maglev_entries: u32,
    /// Entries of `tm_targets`: targets over all streams.
    pub target_entries: u32,
    /// Entries of `tm_flow_stats`: flows over all VIPs.
    pub flow_entries: u32,
}

impl Default for LbCapacity {
    /// The object's own sizes.
    fn default() -> Self {
        Self {
            maglev_entries: tapmesh_common::lb::MAGLEV_CAPACITY,
            target_entries: tapmesh_common::lb::MAX_TARGETS,
            flow_entries: tapmesh_common::lb::MAX_FLOWS,
        }
    }
}

impl LbCapacity {
    /// The most any `[dataplane]` allows: for files checked away from the daemon.
    pub const MAX: Self = Self {
        maglev_entries: MAX_MAGLEV_ENTRIES,
        target_entries: MAX_TARGET_ENTRIES,
        flow_entries: tapmesh_common::lb::MAX_FLOWS,
    };

    pub fn of(config: &DataplaneConfig) -> Self {
        Self {
            maglev_entries: config.maglev_entries,
            target_entries: config.target_entries,
            flow_entries: config.flow_entries,
        }
    }
}

/// The most `dataplane.target_entries` may be.
pub const MAX_TARGET_ENTRIES: u32 = 1 << 17;

/// The most `dataplane.maglev_entries` may be: what a file checked away
/// from the daemon (`tapmesh lb apply`, `config check`) may need at most.
pub const MAX_MAGLEV_ENTRIES: u32 = 1 << 26;

/// Bounds of the map sizes: below, a lone stream or a few hundred
/// connections do not fit; above, one map would lock gigabytes.
pub const MAP_SIZE_BOUNDS: [(&str, u32, u32); 7] = [
    ("dataplane.maglev_entries", 1024, MAX_MAGLEV_ENTRIES),
    ("dataplane.conntrack_entries", 1024, 1 << 24),
    ("dataplane.conntrack6_entries", 1024, 1 << 24),
    // Above the largest copy (64 KiB); at most 1 GiB.
    ("dataplane.mirror_copy_bytes", 1 << 18, 1 << 30),
    ("dataplane.target_entries", 64, MAX_TARGET_ENTRIES),
    // At most every VIP's 64 flows.
    ("dataplane.flow_entries", 64, tapmesh_common::lb::MAX_FLOWS),
    // At most the object's: the owner maps (`tm_ov_owners`) are sized for it.
    (
        "dataplane.instance_entries",
        64,
        tapmesh_common::overlay::MAX_INSTANCES,
    ),
];

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            bpffs_root: DEFAULT_BPFFS_ROOT.into(),
            uplinks: Vec::new(),
            xdp_mode: XdpMode::Auto,
            tc_interfaces: Vec::new(),
            keep_dataplane: false,
            maglev_entries: tapmesh_common::lb::MAGLEV_CAPACITY,
            conntrack_entries: tapmesh_common::overlay::CONNTRACK_ENTRIES,
            conntrack6_entries: tapmesh_common::overlay::CONNTRACK_ENTRIES6,
            mirror_copy_bytes: tapmesh_common::mirror::COPY_RING_BYTES,
            target_entries: tapmesh_common::lb::MAX_TARGETS,
            flow_entries: tapmesh_common::lb::MAX_FLOWS,
            instance_entries: tapmesh_common::overlay::MAX_INSTANCES,
        }
    }
}

impl DataplaneConfig {
    /// Each map size checked against [`MAP_SIZE_BOUNDS`].
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let values = [
            self.maglev_entries,
            self.conntrack_entries,
            self.conntrack6_entries,
            self.mirror_copy_bytes,
            self.target_entries,
            self.flow_entries,
            self.instance_entries,
        ];
        for ((setting, min, max), value) in MAP_SIZE_BOUNDS.into_iter().zip(values) {
            if !(min..=max).contains(&value) {
                return Err(ConfigError::BadValue {
                    setting,
                    message: format!("{value} is out of range; use {min} to {max}"),
                });
            }
        }
        if !self.mirror_copy_bytes.is_power_of_two() {
            return Err(ConfigError::BadValue {
                setting: "dataplane.mirror_copy_bytes",
                message: format!(
                    "{} is not a power of two (the kernel's ring buffers are), e.g. {}",
                    self.mirror_copy_bytes,
                    self.mirror_copy_bytes.next_power_of_two()
                ),
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LbConfig {
    /// This node's IPv4 address on the underlay: the tunnel's outer source,
    /// and where other nodes send tunnel traffic for this node's targets.
    pub node_address: Option<std::net::Ipv4Addr>,
    /// UDP port of the node-to-node tunnel.
    pub tunnel_port: u16,
    /// Nodes whose tunnel packets this node takes though none of its
    /// targets or overlay instances is there (e.g. load-balancing ingress
    /// nodes); those nodes are taken anyway.
    pub tunnel_peers: Vec<std::net::Ipv4Addr>,
    /// VIPs, streams, flows and targets to apply at start (TOML).
    pub config_file: Option<PathBuf>,
}

impl Default for LbConfig {
    fn default() -> Self {
        Self {
            node_address: None,
            tunnel_port: tapmesh_common::DEFAULT_TUNNEL_PORT,
            tunnel_peers: Vec::new(),
            config_file: None,
        }
    }
}

pub const DEFAULT_NODE_SOCKET: &str = "/run/tapmesh/node.sock";

/// The Meridio-compatible registry, configuration manager and conduits.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NspSettings {
    /// Socket of the node API (registry, configuration, conduits); any local
    /// user may call it, the daemon acts only on the caller's own namespace.
    pub socket: PathBuf,
    /// Trenches, conduits, streams, flows and VIPs (TOML); reloaded when it changes.
    pub config_file: Option<PathBuf>,
    /// A registered target not refreshed within this time is removed.
    #[serde(with = "humantime_serde")]
    pub entry_timeout: std::time::Duration,
    /// Deprecated alias of `[daemon] state_dir` (read at load, warned about once).
    pub state_dir: Option<PathBuf>,
    /// Address pools of conduit interfaces ("" turns a family off).
    pub conduit_prefix_v4: String,
    pub conduit_prefix_v6: String,
    pub conduit_mtu: u32,
    /// `[nsp.limits]`: what one caller may take.
    pub limits: NspLimits,
}

/// Per-caller limits of the node socket. A call past one is refused with
/// RESOURCE_EXHAUSTED naming the limit and its value.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NspLimits {
    /// Conduit connections of all the namespaces of one uid.
    pub conduits_per_uid: u32,
    /// Conduit connections of one network namespace.
    pub conduits_per_netns: u32,
    /// Registered targets on one conduit connection (its addresses).
    pub targets_per_conduit: u32,
    /// IPs of one target.
    pub ips_per_target: u32,
    /// Bytes of one target's context (keys and values).
    pub context_bytes: u32,
    /// Largest request message (also the ambassador's).
    pub message_bytes: u32,
    /// Concurrent calls and streams on one connection (HTTP/2).
    pub streams_per_connection: u32,
    /// Open connections of one uid, idle ones included (root not counted);
    /// also the ambassador's.
    pub connections_per_uid: u32,
}

impl Default for NspLimits {
    fn default() -> Self {
        Self {
            conduits_per_uid: 16,
            conduits_per_netns: 8,
            targets_per_conduit: 32,
            ips_per_target: 8,
            context_bytes: 4096,
            message_bytes: 64 * 1024,
            streams_per_connection: 64,
            connections_per_uid: 32,
        }
    }
}

impl Default for NspSettings {
    fn default() -> Self {
        Self {
            socket: DEFAULT_NODE_SOCKET.into(),
            config_file: None,
            entry_timeout: std::time::Duration::from_secs(60),
            state_dir: None,
            conduit_prefix_v4: "169.254.100.0/22".into(),
            conduit_prefix_v6: "fd74:6170:6d65::/64".into(),
            conduit_mtu: 1500,
            limits: NspLimits::default(),
        }
    }
}

/// Port mirroring; the networking-spp etcd agent runs when endpoints are given.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorSettings {
    /// etcd client URLs, e.g. ["http://127.0.0.1:2379"]; empty: no agent.
    pub etcd_endpoints: Vec<String>,
    /// The `<host>` of the networking-spp keys (default: this machine's hostname).
    pub host: String,
    pub etcd_prefix: String,
    /// How mirror rings get their copies: "bpf_ringbuf" (straight from TC
    /// through a BPF ring buffer, one copy of the bytes) or "af_xdp" (a
    /// clone out of a veth pair, read by an AF_XDP socket on its peer).
    pub ring_transport: RingTransport,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self {
            etcd_endpoints: Vec::new(),
            host: hostname(),
            etcd_prefix: "/spp/openstack".into(),
            ring_transport: RingTransport::default(),
        }
    }
}

/// See [`MirrorSettings::ring_transport`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RingTransport {
    #[default]
    #[value(name = "bpf_ringbuf")]
    BpfRingbuf,
    #[value(name = "af_xdp")]
    AfXdp,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The xDS client: EDS (or ADS) clusters that feed VIPs through the catalog.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct XdsConfig {
    /// The management server, e.g. "http://127.0.0.1:18000"; empty: no client.
    pub server: String,
    /// The node id sent to the server (default: the hostname).
    pub node_id: String,
    pub node_cluster: String,
    /// StreamAggregatedResources instead of StreamEndpoints.
    pub ads: bool,
    /// "auto" (Delta xDS when the server implements it, else State of the
    /// World), "delta" or "sotw".
    pub protocol: crate::xds::Protocol,
    /// A cluster that never arrives is applied as empty after this.
    #[serde(with = "humantime_serde")]
    pub missing_after: std::time::Duration,
    pub clusters: Vec<ClusterBinding>,
    /// Serve the catalog's EDS clusters to proxies on this node
    /// (`EndpointDiscoveryService.StreamEndpoints` on this TCP address, e.g.
    /// "127.0.0.1:18001"); empty: no server.
    pub serve: String,
}

/// `[[xds.clusters]]`: which VIP a cluster's endpoints serve.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterBinding {
    pub name: String,
    /// The VIP (address or prefix) the cluster's endpoints are the targets of.
    #[serde(default)]
    pub vip: String,
    /// Or: the overlay service IP (NetManager) whose round-robin members
    /// are the instances with the endpoints' addresses.
    #[serde(default)]
    pub service_ip: String,
    #[serde(default = "default_protocols")]
    pub protocols: Vec<String>,
    /// Destination ports ("80", "8000-8080"); empty: any.
    #[serde(default)]
    pub ports: Vec<String>,
}

fn default_protocols() -> Vec<String> {
    vec!["tcp".into(), "udp".into()]
}

impl Default for XdsConfig {
    fn default() -> Self {
        Self {
            server: String::new(),
            node_id: hostname(),
            node_cluster: "tapmesh".into(),
            ads: false,
            protocol: crate::xds::Protocol::Auto,
            missing_after: std::time::Duration::from_secs(15),
            clusters: Vec::new(),
            serve: String::new(),
        }
    }
}

/// The Oakestra-compatible NetManager: REST API, container networking and
/// the service-IP overlay. Off unless `socket` or `listen` is set.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetManagerConfig {
    /// Unix socket of the REST API (Oakestra: /etc/netmanager/netmanager.sock).
    pub socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (keep it on loopback).
    pub listen: Option<std::net::SocketAddr>,
    /// Container subnet used when `/register` does not carry one.
    pub subnetwork: Option<String>,
    pub subnetwork_v6: Option<String>,
    /// Destinations in this prefix that are not known service IPs are
    /// reported to userspace once (Oakestra: 10.30.0.0/16).
    pub service_prefix: String,
    /// The IPv6 service IPs' prefix: an address in it that is not a known
    /// service IP is dropped and counted (Oakestra: fdff::/16).
    pub service_prefix_v6: String,
    /// Containers' MTU and the largest packet the tunnel carries; 0: the
    /// first uplink's MTU minus the 28 bytes of outer IPv4 + UDP.
    pub mtu: u32,
    /// Name of the veth end inside a container.
    pub container_ifname: String,
    /// Cost of reaching an instance on another node (by node address) for
    /// Closest service IPs; instances on this node cost 0.
    pub node_costs: std::collections::BTreeMap<std::net::Ipv4Addr, u32>,
    /// Cost of a node missing from `node_costs`.
    pub default_node_cost: u32,
    /// Oakestra mode: the cluster service manager assigns the subnet and
    /// the tables over MQTT; turns the NetManager on (socket default
    /// /etc/netmanager/netmanager.sock) and makes the MTU default 1450.
    pub oakestra: bool,
    /// The cluster's MQTT broker as "host:port"; default: the
    /// registration's cluster_address and `mqtt_port`.
    pub mqtt_broker: Option<String>,
    pub mqtt_port: u16,
    /// Masquerade the containers' subnet on its way out of the node and
    /// turn IPv4 forwarding on while containers are deployed, as Oakestra
    /// does; default: on in Oakestra mode.
    pub masquerade: Option<bool>,
}

impl Default for NetManagerConfig {
    fn default() -> Self {
        Self {
            socket: None,
            listen: None,
            subnetwork: None,
            subnetwork_v6: None,
            service_prefix: "10.30.0.0/16".into(),
            service_prefix_v6: "fdff::/16".into(),
            mtu: 0,
            container_ifname: "tmsvc0".into(),
            node_costs: Default::default(),
            default_node_cost: 100,
            oakestra: false,
            mqtt_broker: None,
            mqtt_port: 10003,
            masquerade: None,
        }
    }
}

pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9842";

pub const DEFAULT_CLUSTER_PREFIX: &str = "/tapmesh/v1/";

/// Cluster mode: node records and the target registry shared through etcd.
/// Off (a single node) unless `etcd_endpoints` is given.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd client URLs, e.g. ["http://192.0.2.10:2379"]; empty: single node.
    pub etcd_endpoints: Vec<String>,
    /// This node's name in the cluster (default: the hostname).
    pub node_name: String,
    /// The node's lease: its records go this long after it stops refreshing
    /// (whole seconds).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: std::time::Duration,
    /// TLS to etcd: the CA that signed its certificate, and this node's
    /// client certificate and key (both or neither).
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Every key the cluster writes starts with this.
    pub prefix: String,
    /// Pod networks this node serves (published in its node record, so
    /// other nodes send EDS endpoints there through the tunnel).
    pub pod_cidrs: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd_endpoints: Vec::new(),
            node_name: hostname(),
            lease_ttl: std::time::Duration::from_secs(10),
            ca_file: None,
            cert_file: None,
            key_file: None,
            prefix: DEFAULT_CLUSTER_PREFIX.into(),
            pod_cidrs: Vec::new(),
        }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |setting: &'static str, message: String| ConfigError::BadValue { setting, message };
        for e in &self.etcd_endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"));
            let port = rest.and_then(|r| r.rsplit_once(':')).map(|(_, p)| p);
            if port
                .and_then(|p| p.parse::<u16>().ok())
                .is_none_or(|p| p == 0)
            {
                return Err(bad(
                    "cluster.etcd_endpoints",
                    format!("{e:?} is not a URL like http://192.0.2.10:2379"),
                ));
            }
        }
        for text in &self.pod_cidrs {
            match text.parse::<crate::net::Prefix>() {
                Ok(p) if p.is_network() => {}
                Ok(p) => {
                    return Err(bad(
                        "cluster.pod_cidrs",
                        format!("{text:?} has host bits set; the network is {}", p.network()),
                    ))
                }
                Err(e) => {
                    return Err(bad(
                        "cluster.pod_cidrs",
                        format!(
                            "{text:?} is not a prefix like 10.244.1.0/24: {}",
                            e.reason()
                        ),
                    ))
                }
            }
        }
        if !self.enabled() {
            return Ok(());
        }
        crate::names::validate_name("cluster.node_name", &self.node_name).map_err(|e| {
            bad(
                "cluster.node_name",
                format!(
                    "bad name {:?}: {}; use 1-253 characters from [A-Za-z0-9-+_.]",
                    e.value, e.reason
                ),
            )
        })?;
        let ttl = self.lease_ttl;
        if ttl.subsec_nanos() != 0 || !(1..=3600).contains(&ttl.as_secs()) {
            return Err(bad(
                "cluster.lease_ttl",
                format!("{ttl:?}: use whole seconds in 1s..=3600s (default 10s)"),
            ));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(bad(
                "cluster.prefix",
                format!(
                    "{:?} must start and end with '/', like {DEFAULT_CLUSTER_PREFIX}",
                    self.prefix
                ),
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(bad(
                "cluster.cert_file",
                "give cert_file and key_file together, or neither".into(),
            ));
        }
        // Read now: a file that is not what it is named for would otherwise
        // fail only at the first connection, as a TLS error.
        for (setting, file, holds) in [
            ("cluster.ca_file", &self.ca_file, "CERTIFICATE-----"),
            ("cluster.cert_file", &self.cert_file, "CERTIFICATE-----"),
            ("cluster.key_file", &self.key_file, "PRIVATE KEY-----"),
        ] {
            let Some(path) = file else { continue };
            let text = std::fs::read(path)
                .map_err(|e| bad(setting, format!("{}: {e}", path.display())))?;
            if !pem_holds(&text, holds) {
                return Err(bad(
                    setting,
                    format!(
                        "{}: no PEM block \"-----BEGIN …{holds}\" in it",
                        path.display()
                    ),
                ));
            }
        }
        let tls = self.ca_file.is_some() || self.cert_file.is_some();
        let https = self
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        if tls != https {
            return Err(bad(
                "cluster.etcd_endpoints",
                "https:// endpoints need ca_file (and http:// ones none); use one scheme with its settings".into(),
            ));
        }
        Ok(())
    }
}

/// Whether `text` has a PEM block whose label ends with `label_end`
/// ("CERTIFICATE-----", "PRIVATE KEY-----"), begun and ended.
fn pem_holds(text: &[u8], label_end: &str) -> bool {
    let text = String::from_utf8_lossy(text);
    text.lines().any(|line| {
        line.trim_end().starts_with("-----BEGIN ")
            && line.trim_end().ends_with(label_end)
            && text.contains(&line.trim_end().replacen("BEGIN", "END", 1))
    })
}

/// The HTTP listener of `/healthz`, `/readyz` and `/metrics`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// TCP address, loopback by default; "" turns the listener off.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub dataplane: DataplaneConfig,
    pub lb: LbConfig,
    pub nsp: NspSettings,
    pub mirror: MirrorSettings,
    pub xds: XdsConfig,
    pub netmanager: NetManagerConfig,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
}

/// Values given on the command line or in the environment; `None` keeps the file's value.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "TAPMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API socket.
    #[arg(long, env = "TAPMESH_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, env = "TAPMESH_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "TAPMESH_LOG_FORMAT", value_enum, ignore_case = true)]
    pub log_format: Option<LogFormat>,
    /// bpffs directory for pins (a schema subdirectory is added).
    #[arg(long, env = "TAPMESH_BPFFS_ROOT")]
    pub bpffs_root: Option<PathBuf>,
    /// Uplink interface for XDP (repeat, or comma-separate in the environment).
    #[arg(long = "uplink", env = "TAPMESH_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,
    /// XDP attach mode.
    #[arg(long, env = "TAPMESH_XDP_MODE", value_enum)]
    pub xdp_mode: Option<XdpMode>,
    /// Interface for the TC programs (repeat, or comma-separate in the environment).
    #[arg(
        long = "tc-interface",
        env = "TAPMESH_TC_INTERFACES",
        value_delimiter = ','
    )]
    pub tc_interfaces: Vec<String>,
    /// This node's IPv4 underlay address (tunnel endpoint for VIP targets).
    #[arg(long, env = "TAPMESH_NODE_ADDRESS")]
    pub node_address: Option<std::net::Ipv4Addr>,
    /// UDP port of the node-to-node tunnel.
    #[arg(long, env = "TAPMESH_TUNNEL_PORT")]
    pub tunnel_port: Option<u16>,
    /// A node whose tunnel packets are taken though no target or instance
    /// is there (repeat, or comma-separate in the environment).
    #[arg(
        long = "tunnel-peer",
        env = "TAPMESH_TUNNEL_PEERS",
        value_delimiter = ','
    )]
    pub tunnel_peers: Vec<std::net::Ipv4Addr>,
    /// LB configuration (VIPs, streams, flows, targets) applied at start.
    #[arg(long, env = "TAPMESH_LB_CONFIG")]
    pub lb_config: Option<PathBuf>,
    /// Node API socket (target registry, configuration manager, conduits).
    #[arg(long, env = "TAPMESH_NODE_SOCKET")]
    pub node_socket: Option<PathBuf>,
    /// Meridio-style configuration: trenches, conduits, streams, flows, VIPs.
    #[arg(long, env = "TAPMESH_NSP_CONFIG")]
    pub nsp_config: Option<PathBuf>,
    /// Registry keep-alive expiry, e.g. "60s".
    #[arg(long, env = "TAPMESH_ENTRY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub entry_timeout: Option<std::time::Duration>,
    /// Directory for state kept across restarts (every plugin's).
    #[arg(long, env = "TAPMESH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// etcd endpoints of the networking-spp contract (repeat, or comma-separate).
    #[arg(
        long = "etcd-endpoint",
        env = "TAPMESH_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// The networking-spp host name (default: the hostname).
    #[arg(long, env = "TAPMESH_SPP_HOST")]
    pub spp_host: Option<String>,
    /// How mirror rings get their copies ([mirror] ring_transport).
    #[arg(long, env = "TAPMESH_MIRROR_RING_TRANSPORT", value_enum)]
    pub mirror_ring_transport: Option<RingTransport>,
    /// NetManager REST API socket (turns the NetManager on).
    #[arg(long, env = "TAPMESH_NETMANAGER_SOCKET")]
    pub netmanager_socket: Option<PathBuf>,
    /// Leave the dataplane attached when the daemon stops (`--keep-dataplane=false` overrides the file).
    #[arg(long, env = "TAPMESH_KEEP_DATAPLANE", num_args = 0..=1, default_missing_value = "true")]
    pub keep_dataplane: Option<bool>,
    /// Address of the health and metrics listener ("" = off).
    #[arg(long, env = "TAPMESH_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// etcd endpoints of cluster mode (repeat, or comma-separate; none: single node).
    #[arg(
        long = "cluster-etcd",
        env = "TAPMESH_CLUSTER_ETCD",
        value_delimiter = ','
    )]
    pub cluster_etcd: Vec<String>,
    /// This node's name in the cluster (default: the hostname).
    #[arg(long, env = "TAPMESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Cluster lease, e.g. "10s": a node silent this long is gone.
    #[arg(long, env = "TAPMESH_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<std::time::Duration>,
}

impl Config {
    /// Reads the file (if any), applies overrides and validates the result.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match &overrides.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })
    }

    /// Parses TOML; the error is one line naming the key and the problem.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let mut config: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        config.take_aliases()?;
        Ok(config)
    }

    /// Moves deprecated settings to their new place; both given and
    /// different is refused.
    fn take_aliases(&mut self) -> Result<(), String> {
        if let Some(dir) = &self.nsp.state_dir {
            let default = PathBuf::from(DEFAULT_STATE_DIR);
            if self.daemon.state_dir != default && self.daemon.state_dir != *dir {
                return Err(format!(
                    "nsp.state_dir ({}) is a deprecated alias of daemon.state_dir ({}); keep daemon.state_dir only",
                    dir.display(),
                    self.daemon.state_dir.display()
                ));
            }
            self.daemon.state_dir = dir.clone();
        }
        Ok(())
    }

    /// One line per deprecated setting in use, for the log.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.nsp.state_dir.is_some() {
            out.push("[nsp] state_dir is deprecated: use [daemon] state_dir (it holds every plugin's state)".into());
        }
        out
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.admin_socket {
            self.daemon.admin_socket = v.clone();
        }
        if let Some(v) = &o.log_level {
            self.daemon.log_level = v.clone();
        }
        if let Some(v) = o.log_format {
            self.daemon.log_format = v;
        }
        if let Some(v) = &o.bpffs_root {
            self.dataplane.bpffs_root = v.clone();
        }
        if !o.uplinks.is_empty() {
            self.dataplane.uplinks = o.uplinks.clone();
        }
        if let Some(v) = o.xdp_mode {
            self.dataplane.xdp_mode = v;
        }
        if !o.tc_interfaces.is_empty() {
            self.dataplane.tc_interfaces = o.tc_interfaces.clone();
        }
        if let Some(v) = o.node_address {
            self.lb.node_address = Some(v);
        }
        if let Some(v) = o.tunnel_port {
            self.lb.tunnel_port = v;
        }
        if !o.tunnel_peers.is_empty() {
            self.lb.tunnel_peers = o.tunnel_peers.clone();
        }
        if let Some(v) = &o.lb_config {
            self.lb.config_file = Some(v.clone());
        }
        if let Some(v) = o.keep_dataplane {
            self.dataplane.keep_dataplane = v;
        }
        if let Some(v) = &o.node_socket {
            self.nsp.socket = v.clone();
        }
        if let Some(v) = &o.nsp_config {
            self.nsp.config_file = Some(v.clone());
        }
        if let Some(v) = o.entry_timeout {
            self.nsp.entry_timeout = v;
        }
        if let Some(v) = &o.state_dir {
            self.daemon.state_dir = v.clone();
        }
        if !o.etcd_endpoints.is_empty() {
            self.mirror.etcd_endpoints = o.etcd_endpoints.clone();
        }
        if let Some(v) = &o.spp_host {
            self.mirror.host = v.clone();
        }
        if let Some(v) = o.mirror_ring_transport {
            self.mirror.ring_transport = v;
        }
        if let Some(v) = &o.netmanager_socket {
            self.netmanager.socket = Some(v.clone());
        }
        if let Some(v) = &o.metrics_listen {
            self.metrics.listen = v.clone();
        }
        if !o.cluster_etcd.is_empty() {
            self.cluster.etcd_endpoints = o.cluster_etcd.clone();
        }
        if let Some(v) = &o.node_name {
            self.cluster.node_name = v.clone();
        }
        if let Some(v) = o.lease_ttl {
            self.cluster.lease_ttl = v;
        }
    }

    /// Two of the daemon's own listeners on one socket or TCP port: the
    /// second would fail once the dataplane is attached, blamed on
    /// "another process".
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let mut sockets = vec![
            ("daemon.admin_socket", self.daemon.admin_socket.as_path()),
            ("nsp.socket", self.nsp.socket.as_path()),
        ];
        if let Some(s) = &self.netmanager.socket {
            sockets.push(("netmanager.socket", s.as_path()));
        }
        sockets.retain(|(_, p)| !p.as_os_str().is_empty());
        for (i, (first, path)) in sockets.iter().enumerate() {
            if let Some((second, _)) = sockets[i + 1..].iter().find(|(_, p)| p == path) {
                return Err(ConfigError::BadValue {
                    setting: second,
                    message: format!(
                        "{path:?} is {first} too; each of the daemon's APIs needs a socket of its own"
                    ),
                });
            }
        }
        let mut ports: Vec<(&'static str, std::net::SocketAddr)> = Vec::new();
        for (setting, text) in [
            ("metrics.listen", self.metrics.listen.as_str()),
            ("xds.serve", self.xds.serve.as_str()),
        ] {
            if let Ok(a) = text.parse() {
                ports.push((setting, a));
            }
        }
        if let Some(a) = self.netmanager.listen {
            ports.push(("netmanager.listen", a));
        }
        for (i, (first, a)) in ports.iter().enumerate() {
            // Port 0 is any free port; the two families bind apart.
            let clash = |b: &std::net::SocketAddr| {
                a.port() != 0
                    && a.port() == b.port()
                    && a.is_ipv4() == b.is_ipv4()
                    && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
            };
            if let Some((second, b)) = ports[i + 1..].iter().find(|(_, b)| clash(b)) {
                return Err(ConfigError::BadValue {
                    setting: second,
                    message: format!(
                        "{b} takes the port of {first} ({a}); give each listener a port of its own"
                    ),
                });
            }
        }
        Ok(())
    }

    fn validate_netmanager(&self) -> Result<(), ConfigError> {
        let nm = &self.netmanager;
        let bad =
            |setting: &'static str, message: String| ConfigError::BadValue { setting, message };
        if let Some(socket) = &nm.socket {
            if !socket.is_absolute() {
                return Err(bad(
                    "netmanager.socket",
                    format!("{socket:?} must be an absolute path"),
                ));
            }
        }
        // Read as the cluster client reads it: host, a colon, a port.
        if let Some(broker) = &nm.mqtt_broker {
            let usable = broker.rsplit_once(':').is_some_and(|(host, port)| {
                !host.trim_matches(['[', ']']).is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !usable {
                return Err(bad(
                    "netmanager.mqtt_broker",
                    format!("{broker:?} is not host:port, such as \"192.0.2.10:10003\""),
                ));
            }
        }
        let v4 = |setting: &'static str, text: &str| -> Result<(), ConfigError> {
            match text.parse::<crate::net::Prefix>() {
                Ok(c) if c.addr.is_ipv4() => Ok(()),
                _ => Err(bad(
                    setting,
                    format!("{text:?} is not an IPv4 prefix like 10.30.0.0/16"),
                )),
            }
        };
        v4("netmanager.service_prefix", &nm.service_prefix)?;
        if let Some(s) = &nm.subnetwork {
            v4("netmanager.subnetwork", s)?;
        }
        match nm.service_prefix_v6.parse::<crate::net::Prefix>() {
            Ok(c) if c.addr.is_ipv6() => {}
            _ => {
                return Err(bad(
                    "netmanager.service_prefix_v6",
                    format!(
                        "{:?} is not an IPv6 prefix like fdff::/16",
                        nm.service_prefix_v6
                    ),
                ))
            }
        }
        if let Some(s) = &nm.subnetwork_v6 {
            match s.parse::<crate::net::Prefix>() {
                Ok(c) if c.addr.is_ipv6() => {}
                _ => {
                    return Err(bad(
                        "netmanager.subnetwork_v6",
                        format!("{s:?} is not an IPv6 prefix like fc00::/120"),
                    ))
                }
            }
        }
        if nm.mtu != 0 && !(576..=9000).contains(&nm.mtu) {
            return Err(bad(
                "netmanager.mtu",
                format!("{} is outside 576-9000 (0: from the uplink)", nm.mtu),
            ));
        }
        if nm.container_ifname.is_empty() || nm.container_ifname.len() > 15 {
            return Err(bad(
                "netmanager.container_ifname",
                format!("{:?} must be 1-15 bytes", nm.container_ifname),
            ));
        }
        Ok(())
    }

    /// Checks what can be checked before anything is attached.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let dp = &self.dataplane;
        if !dp.bpffs_root.is_absolute() {
            return Err(ConfigError::BadValue {
                setting: "dataplane.bpffs_root",
                message: format!("{:?} must be an absolute path", dp.bpffs_root),
            });
        }
        if !self.daemon.admin_socket.is_absolute() {
            return Err(ConfigError::BadValue {
                setting: "daemon.admin_socket",
                message: format!("{:?} must be an absolute path", self.daemon.admin_socket),
            });
        }
        for (setting, names) in [
            ("dataplane.uplinks", &dp.uplinks),
            ("dataplane.tc_interfaces", &dp.tc_interfaces),
        ] {
            let mut seen = std::collections::BTreeSet::new();
            for name in names {
                if !seen.insert(name) {
                    return Err(ConfigError::BadValue {
                        setting,
                        message: format!("interface {name:?} is listed twice"),
                    });
                }
                if crate::net::link::index(name).is_none() {
                    return Err(ConfigError::UnknownInterface {
                        setting,
                        name: name.clone(),
                    });
                }
            }
        }
        dp.validate_sizes()?;
        self.validate_netmanager()?;
        self.cluster.validate()?;
        let xds = &self.xds;
        if xds.server.is_empty() && !xds.clusters.is_empty() {
            return Err(ConfigError::BadValue {
                setting: "xds.server",
                message: "is empty, but [[xds.clusters]] are set: name the management server, or remove them".into(),
            });
        }
        if !xds.server.is_empty() && xds.clusters.is_empty() {
            // Subscribing to no name is xDS's wildcard: the server would
            // send every cluster it has, for nothing bound to use.
            return Err(ConfigError::BadValue {
                setting: "xds.clusters",
                message: "none is set, but xds.server is: add a [[xds.clusters]] (name and vip or service_ip), or leave xds.server empty".into(),
            });
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::BadValue {
                setting: "metrics.listen",
                message: format!(
                    "{:?} is not an address:port like {DEFAULT_METRICS_LISTEN} (\"\" turns it off)",
                    self.metrics.listen
                ),
            });
        }
        if self.lb.tunnel_port == 0 {
            return Err(ConfigError::BadValue {
                setting: "lb.tunnel_port",
                message: "0 is not a port; use 1-65535 (default 50103)".into(),
            });
        }
        for (setting, path) in [
            ("nsp.socket", &self.nsp.socket),
            ("daemon.state_dir", &self.daemon.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(ConfigError::BadValue {
                    setting,
                    message: format!("{path:?} must be an absolute path"),
                });
            }
        }
        if self.nsp.entry_timeout < std::time::Duration::from_millis(100) {
            return Err(ConfigError::BadValue {
                setting: "nsp.entry_timeout",
                message: "must be at least 100ms (default 60s)".into(),
            });
        }
        for (setting, pool, v4) in [
            ("nsp.conduit_prefix_v4", &self.nsp.conduit_prefix_v4, true),
            ("nsp.conduit_prefix_v6", &self.nsp.conduit_prefix_v6, false),
        ] {
            if pool.is_empty() {
                continue;
            }
            let cidr = crate::net::prefix::parse_pool(pool)
                .map_err(|message| ConfigError::BadValue { setting, message })?;
            if cidr.addr.is_ipv4() != v4 {
                return Err(ConfigError::BadValue {
                    setting,
                    message: format!("{pool:?} is of the other address family"),
                });
            }
        }
        if !(1280..=65535).contains(&self.nsp.conduit_mtu) {
            return Err(ConfigError::BadValue {
                setting: "nsp.conduit_mtu",
                message: "use 1280..=65535".into(),
            });
        }
        let l = &self.nsp.limits;
        for (setting, value) in [
            ("nsp.limits.conduits_per_uid", l.conduits_per_uid),
            ("nsp.limits.conduits_per_netns", l.conduits_per_netns),
            ("nsp.limits.targets_per_conduit", l.targets_per_conduit),
            ("nsp.limits.ips_per_target", l.ips_per_target),
            ("nsp.limits.context_bytes", l.context_bytes),
            ("nsp.limits.message_bytes", l.message_bytes),
            (
                "nsp.limits.streams_per_connection",
                l.streams_per_connection,
            ),
            ("nsp.limits.connections_per_uid", l.connections_per_uid),
        ] {
            if value == 0 {
                return Err(ConfigError::BadValue {
                    setting,
                    message: "0 would refuse every caller; use 1 or more".into(),
                });
            }
        }
        self.validate_listeners()?;
        // A bare word is a target to EnvFilter, so a misspelt level
        // ("warning") would silently log nothing at all.
        let levels = ["trace", "debug", "info", "warn", "error", "off"];
        for directive in self.daemon.log_level.split(',').map(str::trim) {
            if !directive.is_empty()
                && !directive.contains('=')
                && !levels.contains(&directive.to_ascii_lowercase().as_str())
            {
                return Err(ConfigError::BadValue {
                    setting: "daemon.log_level",
                    message: format!(
                        "{directive:?} is not a level; use one of {} (or target=level, such as tapmesh::lb=debug)",
                        levels.join(", ")
                    ),
                });
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.daemon.log_level).map_err(|e| {
            ConfigError::BadValue {
                setting: "daemon.log_level",
                message: format!("{:?}: {e}", self.daemon.log_level),
            }
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_on_one_socket_or_port_are_refused() {
        for (text, setting, part) in [
            (
                "[daemon]\nadmin_socket = \"/run/a.sock\"\n[netmanager]\nsocket = \"/run/a.sock\"\n",
                "netmanager.socket",
                "is daemon.admin_socket too",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:9843\"\n[netmanager]\nlisten = \"0.0.0.0:9843\"\n",
                "netmanager.listen",
                "takes the port of metrics.listen (127.0.0.1:9843)",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:9843\"\n[xds]\nserve = \"127.0.0.1:9843\"\n",
                "xds.serve",
                "takes the port of metrics.listen",
            ),
        ] {
            match Config::from_toml(text).unwrap().validate_listeners() {
                Err(ConfigError::BadValue { setting: s, message }) => {
                    assert_eq!(s, setting);
                    assert!(message.contains(part), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        for apart in [
            "[metrics]\nlisten = \"127.0.0.1:9843\"\n[netmanager]\nlisten = \"127.0.0.2:9843\"\n",
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[netmanager]\nlisten = \"127.0.0.1:0\"\n",
            "[metrics]\nlisten = \"0.0.0.0:9843\"\n[netmanager]\nlisten = \"[::1]:9843\"\n",
        ] {
            Config::from_toml(apart)
                .unwrap()
                .validate_listeners()
                .unwrap_or_else(|e| panic!("{apart}: {e}"));
        }
    }

    #[test]
    fn a_broker_that_is_not_host_and_port_is_refused() {
        for broker in [
            "nohostport",
            "127.0.0.1:99999",
            "[::1]:1883x",
            ":1883",
            "h:0",
        ] {
            let text = format!("[netmanager]\nmqtt_broker = \"{broker}\"\n");
            match Config::from_toml(&text).unwrap().validate_netmanager() {
                Err(ConfigError::BadValue { setting, .. }) => {
                    assert_eq!(setting, "netmanager.mqtt_broker", "{broker}")
                }
                other => panic!("{broker}: {other:?}"),
            }
        }
        for broker in [
            "192.0.2.10:10003",
            "broker.example:1883",
            "[2001:db8::1]:10003",
        ] {
            let text = format!("[netmanager]\nmqtt_broker = \"{broker}\"\n");
            Config::from_toml(&text)
                .unwrap()
                .validate_netmanager()
                .unwrap();
        }
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.dataplane.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
    }

    #[test]
    fn reads_every_setting() {
        let c = Config::from_toml(
            r#"
            [daemon]
            admin_socket = "/tmp/a.sock"
            log_level = "debug"
            [dataplane]
            bpffs_root = "/sys/fs/bpf/x"
            uplinks = ["lo"]
            xdp_mode = "generic"
            tc_interfaces = ["lo"]
            keep_dataplane = true
            "#,
        )
        .unwrap();
        assert_eq!(c.daemon.admin_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Generic);
        assert_eq!(c.dataplane.uplinks, vec!["lo".to_string()]);
        assert!(c.dataplane.keep_dataplane);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let e = Config::from_toml("[dataplane]\nuplinkz = [\"eth0\"]\n").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("uplinkz"), "{e}");
        let e = Config::from_toml("[dataplane]\nxdp_mode = \"turbo\"\n").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("turbo"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn tunnel_peers_come_from_the_file_or_the_flags() {
        let mut c = Config::from_toml("[lb]\ntunnel_peers = [\"198.18.2.1\"]\n").unwrap();
        assert_eq!(
            c.lb.tunnel_peers,
            vec![std::net::Ipv4Addr::new(198, 18, 2, 1)]
        );
        c.apply(&Overrides {
            tunnel_peers: vec![std::net::Ipv4Addr::new(198, 18, 2, 9)],
            ..Default::default()
        });
        assert_eq!(
            c.lb.tunnel_peers,
            vec![std::net::Ipv4Addr::new(198, 18, 2, 9)]
        );
        assert!(Config::from_toml("[lb]\ntunnel_peers = [\"node1\"]\n").is_err());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let mut c =
            Config::from_toml("[dataplane]\nuplinks = [\"a\"]\nxdp_mode = \"native\"\n").unwrap();
        c.apply(&Overrides {
            uplinks: vec!["b".into()],
            keep_dataplane: Some(true),
            ..Default::default()
        });
        assert_eq!(c.dataplane.uplinks, vec!["b".to_string()]);
        assert_eq!(c.dataplane.xdp_mode, XdpMode::Native);
        assert!(c.dataplane.keep_dataplane);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = Config::default();
        c.dataplane.uplinks = vec!["no-such-if0".into()];
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "dataplane.uplinks: interface \"no-such-if0\" does not exist"
        );

        let mut c = Config::default();
        c.dataplane.tc_interfaces = vec!["lo".into(), "lo".into()];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listed twice"));

        let mut c = Config::default();
        c.dataplane.bpffs_root = "relative".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("dataplane.bpffs_root"));
    }

    #[test]
    fn nsp_state_dir_is_a_deprecated_alias() {
        let c = Config::from_toml("[nsp]\nstate_dir = \"/srv/tm\"\n").unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/tm"));
        assert_eq!(c.deprecations().len(), 1);
        assert!(c.deprecations()[0].contains("[daemon] state_dir"));

        let c = Config::from_toml("[daemon]\nstate_dir = \"/srv/tm\"\n").unwrap();
        assert_eq!(c.daemon.state_dir, PathBuf::from("/srv/tm"));
        assert!(c.deprecations().is_empty());
        assert_eq!(
            Config::default().daemon.state_dir,
            PathBuf::from(DEFAULT_STATE_DIR)
        );

        let same = "[daemon]\nstate_dir = \"/srv/tm\"\n[nsp]\nstate_dir = \"/srv/tm\"\n";
        assert_eq!(
            Config::from_toml(same).unwrap().daemon.state_dir,
            PathBuf::from("/srv/tm")
        );
        let e = Config::from_toml("[daemon]\nstate_dir = \"/a\"\n[nsp]\nstate_dir = \"/b\"\n")
            .unwrap_err();
        assert!(
            e.contains("deprecated alias") && e.contains("/a") && e.contains("/b"),
            "{e}"
        );

        let mut c = Config::from_toml("[nsp]\nstate_dir = \"/srv/tm\"\n").unwrap();
        c.apply(&Overrides {
            state_dir: Some("/flag".into()),
            ..Default::default()
        });
        assert_eq!(c.daemon.state_dir, PathBuf::from("/flag"));
    }

    #[test]
    fn map_sizes_default_to_the_objects_and_are_bounded() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.dataplane.maglev_entries, 1 << 22);
        assert_eq!(c.dataplane.conntrack_entries, 131_072);
        assert_eq!(c.dataplane.conntrack6_entries, 65_536);
        c.dataplane.validate_sizes().unwrap();

        let refused = |toml: &str| {
            Config::from_toml(&format!("[dataplane]\n{toml}"))
                .unwrap()
                .dataplane
                .validate_sizes()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refused("conntrack_entries = 100"),
            "dataplane.conntrack_entries: 100 is out of range; use 1024 to 16777216"
        );
        assert_eq!(
            refused("maglev_entries = 67108865"),
            "dataplane.maglev_entries: 67108865 is out of range; use 1024 to 67108864"
        );
        assert!(refused("conntrack6_entries = 0").starts_with("dataplane.conntrack6_entries: "));
        assert_eq!(c.dataplane.mirror_copy_bytes, 16 << 20);
        assert_eq!(
            refused("mirror_copy_bytes = 3000000"),
            "dataplane.mirror_copy_bytes: 3000000 is not a power of two (the kernel's ring buffers are), e.g. 4194304"
        );
        assert!(refused("mirror_copy_bytes = 4096").starts_with("dataplane.mirror_copy_bytes: "));
        assert_eq!(c.dataplane.target_entries, 16_384);
        assert_eq!(
            refused("target_entries = 63"),
            "dataplane.target_entries: 63 is out of range; use 64 to 131072"
        );
        assert_eq!(c.dataplane.flow_entries, 16_384);
        assert_eq!(
            refused("flow_entries = 16385"),
            "dataplane.flow_entries: 16385 is out of range; use 64 to 16384"
        );
        assert_eq!(c.dataplane.instance_entries, 16_384);
        assert!(refused("instance_entries = 1").starts_with("dataplane.instance_entries: "));
        let c = Config::from_toml(
            "[dataplane]\nmaglev_entries = 1024\nconntrack6_entries = 16777216\n",
        )
        .unwrap();
        c.dataplane.validate_sizes().unwrap();
        assert!(Config::from_toml("[dataplane]\nmaglev_entries = -1\n").is_err());
    }

    #[test]
    fn cluster_is_off_unless_endpoints_are_given_and_checked_when_on() {
        let c = Config::from_toml("").unwrap();
        assert!(!c.cluster.enabled());
        assert_eq!(c.cluster.lease_ttl, std::time::Duration::from_secs(10));
        assert_eq!(c.cluster.prefix, DEFAULT_CLUSTER_PREFIX);

        let c = Config::from_toml(
            "[cluster]\netcd_endpoints = [\"http://192.0.2.10:2379\"]\nnode_name = \"n1\"\nlease_ttl = \"3s\"\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.lease_ttl, std::time::Duration::from_secs(3));
        c.cluster.validate().unwrap();

        let refused = |toml: &str| {
            Config::from_toml(&format!(
                "[cluster]\netcd_endpoints = [\"http://192.0.2.10:2379\"]\n{toml}"
            ))
            .unwrap()
            .cluster
            .validate()
            .unwrap_err()
            .to_string()
        };
        assert!(refused("lease_ttl = \"1500ms\"").starts_with("cluster.lease_ttl: "));
        assert!(refused("node_name = \"a b\"").starts_with("cluster.node_name: bad name \"a b\""));
        assert!(refused("prefix = \"tapmesh\"").starts_with("cluster.prefix: "));
        assert_eq!(
            refused("pod_cidrs = [\"10.244.1.0/24\", \"10.244.2.1/24\"]"),
            "cluster.pod_cidrs: \"10.244.2.1/24\" has host bits set; the network is 10.244.2.0/24"
        );
        assert!(refused("pod_cidrs = [\"pods\"]")
            .starts_with("cluster.pod_cidrs: \"pods\" is not a prefix"));
        assert!(refused("cert_file = \"/etc/hostname\"").contains("key_file together"));
        assert!(refused("ca_file = \"/no/such/ca.pem\"")
            .starts_with("cluster.ca_file: /no/such/ca.pem"));
        assert_eq!(
            refused("ca_file = \"/etc/hostname\""),
            "cluster.ca_file: /etc/hostname: no PEM block \"-----BEGIN …CERTIFICATE-----\" in it"
        );
        assert!(pem_holds(
            b"x\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "CERTIFICATE-----"
        ));
        assert!(pem_holds(
            b"-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----",
            "PRIVATE KEY-----"
        ));
        assert!(!pem_holds(
            b"-----BEGIN CERTIFICATE-----\nMIIB\n",
            "CERTIFICATE-----"
        ));
        assert!(!pem_holds(
            b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----",
            "PRIVATE KEY-----"
        ));
        let e = Config::from_toml("[cluster]\netcd_endpoints = [\"192.0.2.10\"]\n")
            .unwrap()
            .cluster
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a URL like http://"), "{e}");

        let mut c = Config::default();
        c.apply(&Overrides {
            cluster_etcd: vec!["http://127.0.0.1:2379".into()],
            node_name: Some("n9".into()),
            lease_ttl: Some(std::time::Duration::from_secs(2)),
            ..Default::default()
        });
        assert_eq!(c.cluster.node_name, "n9");
        assert_eq!(c.cluster.etcd_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(c.cluster.lease_ttl, std::time::Duration::from_secs(2));
    }
}
