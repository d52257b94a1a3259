//! The command line: every command, its arguments and their defaults.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::json::Output;
use crate::config::{Overrides, DEFAULT_ADMIN_SOCKET, DEFAULT_NODE_SOCKET};

const EXAMPLES: &str = "\
Examples:
  tapmesh daemon --uplink eth0 --tc-interface veth1234
  tapmesh status
  tapmesh status -o json
  tapmesh lb apply /etc/tapmesh/lb.toml
  tapmesh tap-flow create f1 --tap-service s1 --source veth1234 --direction both
  tapmesh completions bash > /etc/bash_completion.d/tapmesh";

const DAEMON_EXAMPLES: &str = "\
Examples:
  tapmesh daemon --config /etc/tapmesh/daemon.toml
  tapmesh daemon --uplink eth0 --xdp-mode native --log-format json
  tapmesh daemon --netns node1 --uplink veth0 --keep-dataplane";

const LB_EXAMPLES: &str = "\
Examples:
  tapmesh lb apply lb.toml
  tapmesh lb list -o json
  tapmesh lb delete vip vip-a
  tapmesh lb delete target stream-a 3
  tapmesh lb delete target stream-a/3";

#[derive(Parser)]
#[command(
    name = "tapmesh",
    version = crate::VERSION,
    about = "A node dataplane in XDP and TC: VIP load balancing, service IPs, tunnels, mirroring",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Output of `status` and the `list` commands.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long a call to the daemon's admin API may wait for its answer (e.g. 5s, 2m).
    #[arg(long, global = true, env = "TAPMESH_TIMEOUT", default_value = "60s", value_parser = call_timeout)]
    pub timeout: std::time::Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// A call timeout: a humantime duration above zero.
fn call_timeout(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be more than 0".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (e.g. 5s, 500ms, 2m)")),
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node daemon (needs root).
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon {
        #[command(flatten)]
        overrides: Box<Overrides>,
        /// Run inside this network namespace (a name under /run/netns or a path).
        #[arg(long, env = "TAPMESH_NETNS")]
        netns: Option<String>,
        /// Mount a bpffs of its own where the host's is not visible (pins vanish with the process).
        #[arg(long, env = "TAPMESH_PRIVATE_BPFFS")]
        private_bpffs: bool,
    },
    /// VIP load balancing: apply a configuration, list it, delete parts.
    #[command(after_help = LB_EXAMPLES)]
    Lb {
        /// Admin API socket of the daemon.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
        admin_socket: PathBuf,
        #[command(subcommand)]
        command: LbCommand,
    },
    /// Meridio's TAPA: serve ambassador.v1.Tap in the application's namespace (no root needed).
    Ambassador {
        #[command(flatten)]
        settings: crate::ambassador::AmbassadorSettings,
    },
    /// Open, close or watch streams through an ambassador.
    Stream {
        /// The ambassador's socket.
        #[arg(
            long,
            env = "MERIDIO_SOCKET",
            default_value = "/ambassador.sock",
            global = true
        )]
        socket: PathBuf,
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// The target registry of the node daemon.
    Registry {
        /// The node daemon's socket.
        #[arg(long, env = "TAPMESH_NODE_SOCKET", default_value = DEFAULT_NODE_SOCKET, global = true)]
        node_socket: PathBuf,
        #[command(subcommand)]
        command: RegistryCommand,
    },
    /// Tap services: where mirrored copies go (an interface or an AF_XDP ring).
    TapService {
        /// Admin API socket of the daemon.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
        admin_socket: PathBuf,
        #[command(subcommand)]
        command: TapServiceCommand,
    },
    /// Tap flows: which port's traffic is mirrored, in which direction, which VLANs.
    TapFlow {
        /// Admin API socket of the daemon.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
        admin_socket: PathBuf,
        #[command(subcommand)]
        command: TapFlowCommand,
    },
    /// The service catalog: services and backends of every endpoint source.
    Catalog {
        /// Admin API socket of the daemon.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET, global = true)]
        admin_socket: PathBuf,
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Show every plugin's state and the dataplane counters.
    Status {
        /// Admin API socket of the daemon.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// Print the raw response as JSON-like debug output.
        #[arg(long)]
        raw: bool,
    },
    /// Offline checks of configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Example:\n  tapmesh completions bash > /etc/bash_completion.d/tapmesh"
    )]
    Completions {
        #[arg(value_enum, ignore_case = true)]
        shell: clap_complete::Shell,
    },
    /// Remove a kept dataplane (keep_dataplane) with no daemon running: the pinned
    /// XDP links, tapmesh's TC filters, the clsact qdiscs they leave empty, the pins.
    #[command(after_help = "Example:\n  tapmesh cleanup --bpffs-root /sys/fs/bpf/tapmesh")]
    Cleanup {
        /// The daemon's `dataplane.bpffs_root`.
        #[arg(long, env = "TAPMESH_BPFFS_ROOT", default_value = crate::config::DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// If a daemon answers here it is running, and nothing is removed.
        #[arg(long, env = "TAPMESH_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// The network namespace of the dataplane's interfaces (`ip netns` name or path).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Print the manual page (roff), or write one page per command.
    #[command(
        after_help = "Examples:\n  tapmesh man > /usr/local/share/man/man1/tapmesh.1\n  tapmesh man --dir /usr/local/share/man/man1   # tapmesh.1, tapmesh-lb.1, tapmesh-lb-apply.1, …"
    )]
    Man {
        /// Write tapmesh.1 and a page for every command and subcommand here.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Decode the pinned BPF maps for people (no daemon needed, as bpftool).
    #[command(after_help = BPF_EXAMPLES)]
    Bpf {
        /// The daemon's `dataplane.bpffs_root` (pins are under <root>/v<schema>/).
        #[arg(long, env = "TAPMESH_BPFFS_ROOT", default_value = crate::config::DEFAULT_BPFFS_ROOT, global = true)]
        bpffs_root: PathBuf,
        /// Name interfaces as this network namespace sees them (the daemon's `--netns`).
        #[arg(long, global = true)]
        netns: Option<String>,
        #[command(subcommand)]
        command: BpfCommand,
    },
}

const BPF_EXAMPLES: &str = "\
Examples:
  tapmesh bpf lb list                # VIPs, flows, streams with Maglev shares, targets
  tapmesh bpf overlay list -o json   # service IPs and their instances
  tapmesh bpf mirror list            # tap rules per source port, rings
  tapmesh bpf maps --cpus 64         # kernel memory per map, and the total on 64 CPUs";

#[derive(Subcommand)]
pub enum BpfCommand {
    /// The LB maps: VIPs and their flows, streams with each target's Maglev entries, targets.
    Lb {
        #[command(subcommand)]
        command: BpfList,
    },
    /// The overlay maps: service IPs with their instances, instances.
    Overlay {
        #[command(subcommand)]
        command: BpfList,
    },
    /// The mirror maps: tap rules per source interface with their counters, rings.
    Mirror {
        #[command(subcommand)]
        command: BpfList,
    },
    /// Every pinned map with its size and the kernel memory it takes.
    Maps {
        /// Also estimate the total on a machine with this many CPUs (per-CPU maps scaled).
        #[arg(long, default_value_t = 0)]
        cpus: u32,
    },
}

#[derive(Subcommand, Clone, Copy)]
pub enum BpfList {
    /// Print the decoded entries.
    List,
}

#[derive(Subcommand)]
pub enum LbCommand {
    /// Replace the whole configuration with a TOML file (vips, streams, flows, targets).
    Apply { file: PathBuf },
    /// Show the configuration and its counters.
    List,
    /// Delete a VIP, stream or flow by name, or a target by stream and identifier.
    Delete {
        #[arg(value_parser = ["vip", "stream", "flow", "target"], ignore_case = true)]
        kind: String,
        name: String,
        identifier: Option<u32>,
    },
}

#[derive(Clone, Debug, clap::Args)]
pub struct StreamName {
    #[arg(long)]
    pub trench: String,
    #[arg(long)]
    pub conduit: String,
    /// The stream's name.
    pub stream: String,
}

#[derive(Subcommand)]
pub enum StreamCommand {
    /// Open a stream (returns at once; `watch` tells when it is OPEN).
    Open(StreamName),
    /// Close a stream.
    Close(StreamName),
    /// Print the streams' states now and on every change.
    Watch {
        /// Exit after this many updates.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand)]
pub enum TapServiceCommand {
    /// Create a tap service with an interface or a ring (pcap file and/or forward interface).
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Send copies out of this interface.
        #[arg(long, conflicts_with_all = ["pcap", "forward"])]
        interface: Option<String>,
        /// Ring: write copies to this pcap file.
        #[arg(long)]
        pcap: Option<String>,
        /// Ring: send copies out of this interface.
        #[arg(long)]
        forward: Option<String>,
    },
    Delete {
        id: String,
    },
    List,
}

#[derive(Subcommand)]
pub enum TapFlowCommand {
    /// Mirror a source port's traffic to a tap service.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        tap_service: String,
        /// The source port's interface.
        #[arg(long)]
        source: String,
        /// IN (to the port), OUT (from it) or BOTH (any case).
        #[arg(long, value_enum, ignore_case = true)]
        direction: Direction,
        /// VLAN ids and ranges, e.g. "10,20-30" (omit it for every VLAN; "" is refused, as TaaS does).
        #[arg(long, value_parser = vlan_filter)]
        vlan_filter: Option<String>,
    },
    Delete {
        id: String,
    },
    List,
}

/// Which of a port's traffic a tap flow mirrors.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum Direction {
    /// To the port.
    In,
    /// From the port.
    Out,
    Both,
}

impl Direction {
    /// The admin API's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "IN",
            Direction::Out => "OUT",
            Direction::Both => "BOTH",
        }
    }
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate daemon, LB and Meridio files as the daemon would (exit 2 if any is refused).
    #[command(
        after_help = "Examples:\n  tapmesh config check /etc/tapmesh/daemon.toml /etc/tapmesh/lb.toml /etc/tapmesh/nsp.toml\n  tapmesh config check --kind lb vips.toml\n  tapmesh config check --netns node1 daemon.toml   # the interfaces of the daemon's namespace"
    )]
    Check {
        /// The files' kind; by default guessed from each file's top-level keys.
        #[arg(long, value_enum, ignore_case = true)]
        kind: Option<super::check::Kind>,
        /// Look the named interfaces (uplinks, local targets) up in this
        /// network namespace, as `tapmesh daemon --netns` would (an `ip
        /// netns` name or a path); by default this process's.
        #[arg(long, env = "TAPMESH_NETNS")]
        netns: Option<String>,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Services, their backends and where each came from.
    List,
}

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// List the registered targets of every stream.
    List,
}

/// A VLAN filter checked as the daemon checks it (an empty one is refused).
fn vlan_filter(text: &str) -> Result<String, String> {
    crate::mirror::model::parse_vlan_filter(text)
        .map(|_| text.to_string())
        .map_err(|e| e.to_string())
}

impl Cli {
    /// The command line with the daemon's defaults in its help. An option
    /// left out keeps the configuration file's value, so clap cannot give
    /// it a default itself; the help names `Config::default()`'s instead.
    pub fn command_with_defaults() -> clap::Command {
        use clap::CommandFactory;
        let d = crate::config::Config::default();
        let path = |p: &std::path::Path| p.display().to_string();
        let shown = [
            ("admin_socket", path(&d.daemon.admin_socket)),
            ("log_level", d.daemon.log_level.clone()),
            ("log_format", "text".to_string()),
            ("bpffs_root", path(&d.dataplane.bpffs_root)),
            ("xdp_mode", "auto".to_string()),
            ("tunnel_port", d.lb.tunnel_port.to_string()),
            ("node_socket", path(&d.nsp.socket)),
            (
                "entry_timeout",
                format!("{}s", d.nsp.entry_timeout.as_secs()),
            ),
            ("state_dir", path(&d.daemon.state_dir)),
            ("keep_dataplane", d.dataplane.keep_dataplane.to_string()),
            ("metrics_listen", d.metrics.listen.clone()),
        ];
        Cli::command().mut_subcommand("daemon", |daemon| {
            shown.into_iter().fold(daemon, |daemon, (id, value)| {
                daemon.mut_arg(id, |arg| {
                    let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                    arg.help(format!("{help} [default: {value}]"))
                })
            })
        })
    }

    /// Parses the process's arguments against [`Cli::command_with_defaults`].
    pub fn parse_with_defaults() -> Self {
        use clap::FromArgMatches;
        let matches = Self::command_with_defaults().get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}
