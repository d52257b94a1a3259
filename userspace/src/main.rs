use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use tapmesh::{
    admin::{self, AdminPlugin},
    catalog::{Catalog, CatalogPlugin},
    cli,
    config::{Config, Overrides, DEFAULT_ADMIN_SOCKET, DEFAULT_NODE_SOCKET},
    core::Core,
    dataplane::{DataplaneHandle, DataplanePlugin},
    lb::service::{LbPlugin, LbService},
    mirror::{MirrorPlugin, MirrorService},
    net::netns,
    nsp::NspPlugin,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tapmesh",
    version,
    about = "A node dataplane in XDP and TC: VIP load balancing, service IPs, tunnels, mirroring"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon (needs root).
    Daemon {
        #[command(flatten)]
        overrides: Overrides,
        /// Run inside this network namespace (a name under /run/netns or a path).
        #[arg(long, env = "TAPMESH_NETNS")]
        netns: Option<String>,
    },
    /// VIP load balancing: apply a configuration, list it, delete parts.
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
        settings: tapmesh::ambassador::AmbassadorSettings,
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
}

#[derive(Subcommand)]
enum LbCommand {
    /// Replace the whole configuration with a TOML file (vips, streams, flows, targets).
    Apply { file: PathBuf },
    /// Show the configuration and its counters.
    List,
    /// Delete a VIP, stream or flow by name, or a target by stream and identifier.
    Delete {
        #[arg(value_parser = ["vip", "stream", "flow", "target"])]
        kind: String,
        name: String,
        identifier: Option<u32>,
    },
}

#[derive(Clone, Debug, clap::Args)]
struct StreamName {
    #[arg(long)]
    trench: String,
    #[arg(long)]
    conduit: String,
    /// The stream's name.
    stream: String,
}

#[derive(Subcommand)]
enum StreamCommand {
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
enum TapServiceCommand {
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
enum TapFlowCommand {
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
        /// IN (to the port), OUT (from it) or BOTH.
        #[arg(long)]
        direction: String,
        /// VLAN ids and ranges, e.g. "10,20-30".
        #[arg(long)]
        vlan_filter: Option<String>,
    },
    Delete {
        id: String,
    },
    List,
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Services, their backends and where each came from.
    List,
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// List the registered targets of every stream.
    List,
}

/// Exit code for a configuration the daemon refuses.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon { overrides, netns } => {
            if let Some(name) = &netns {
                if let Err(e) = netns::enter(name) {
                    eprintln!("tapmesh: --netns: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            let config = match Config::load(&overrides) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tapmesh: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(&config.daemon.log_level))
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            runtime().block_on(daemon(config))
        }
        Command::Ambassador { settings } => tapmesh::ambassador::run(settings),
        Command::Stream { socket, command } => runtime().block_on(stream(socket, command)),
        Command::Registry {
            node_socket,
            command: RegistryCommand::List,
        } => runtime().block_on(registry_list(node_socket)),
        Command::TapService {
            admin_socket,
            command,
        } => runtime().block_on(tap_service(admin_socket, command)),
        Command::TapFlow {
            admin_socket,
            command,
        } => runtime().block_on(tap_flow(admin_socket, command)),
        Command::Catalog {
            admin_socket,
            command: CatalogCommand::List,
        } => runtime().block_on(catalog_list(admin_socket)),
        Command::Status { admin_socket, raw } => runtime().block_on(status(admin_socket, raw)),
        Command::Lb {
            admin_socket,
            command,
        } => runtime().block_on(lb(admin_socket, command)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

async fn daemon(config: Config) -> ExitCode {
    let global = CancellationToken::new();
    let mut core = Core::new(global.clone());
    let dataplane = DataplaneHandle::default();
    let lb = Arc::new(LbService::new(dataplane.clone()));
    core.register(Arc::new(DataplanePlugin::new(dataplane.clone())));
    core.register(Arc::new(LbPlugin::new(lb.clone())));
    core.register(Arc::new(NspPlugin::new(lb.clone())));
    let mirror = Arc::new(MirrorService::new(dataplane.clone()));
    core.register(Arc::new(MirrorPlugin::new(mirror.clone())));
    let catalog = Catalog::new(lb.clone());
    core.register(Arc::new(CatalogPlugin::new(catalog.clone())));
    core.register(Arc::new(tapmesh::overlay::NetManagerPlugin::new(
        dataplane.clone(),
        catalog.clone(),
    )));
    core.register(Arc::new(AdminPlugin::new(
        core.view(),
        dataplane,
        lb,
        mirror,
        catalog,
    )));

    // Signals are caught from here on, so one that arrives during start still stops cleanly.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tapmesh: installing signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = core.configure(&config).await {
        eprintln!("tapmesh: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Err(e) = core.start().await {
        eprintln!("tapmesh: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!("tapmesh daemon running");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
        _ = global.cancelled() => tracing::info!("cancelled: stopping"),
    }
    global.cancel();
    if !core.stop().await {
        eprintln!("tapmesh: some plugins failed to stop (see the log above)");
        return ExitCode::FAILURE;
    }
    tracing::info!("tapmesh daemon stopped");
    ExitCode::SUCCESS
}

async fn status(socket: PathBuf, raw: bool) -> ExitCode {
    let mut client = match admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.status(admin::proto::StatusRequest {}).await {
        Ok(response) => {
            let status = response.into_inner();
            let text = if raw {
                format!("{status:#?}\n")
            } else {
                cli::status::render(&status)
            };
            let _ = cli::print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: status: {}", e.message());
            ExitCode::FAILURE
        }
    }
}

async fn lb(socket: PathBuf, command: LbCommand) -> ExitCode {
    use admin::proto::{ListLbRequest, Name, TargetId};

    let mut client = match admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        LbCommand::Apply { file } => {
            let spec = match tapmesh::lb::service::read_spec(&file) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tapmesh: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            client
                .apply_lb(admin::lb_config(spec))
                .await
                .map(|_| String::new())
        }
        LbCommand::List => client
            .list_lb(ListLbRequest {})
            .await
            .map(|r| cli::lb::render(&r.into_inner())),
        LbCommand::Delete {
            kind,
            name,
            identifier,
        } => match kind.as_str() {
            "vip" => client
                .delete_vip(Name { name })
                .await
                .map(|_| String::new()),
            "stream" => client
                .delete_stream(Name { name })
                .await
                .map(|_| String::new()),
            "flow" => client
                .delete_flow(Name { name })
                .await
                .map(|_| String::new()),
            _ => match identifier {
                Some(identifier) => client
                    .delete_target(TargetId {
                        stream: name,
                        identifier,
                    })
                    .await
                    .map(|_| String::new()),
                None => {
                    eprintln!("tapmesh: lb delete target needs the stream and the identifier");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
        },
    };
    match result {
        Ok(text) => {
            let _ = cli::print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: {}", e.message());
            ExitCode::FAILURE
        }
    }
}

async fn stream(socket: PathBuf, command: StreamCommand) -> ExitCode {
    use tapmesh::proto::ambassador::tap_client::TapClient;
    let mut client = TapClient::new(tapmesh::uds::lazy_channel(&socket));
    let request = |n: &StreamName| cli::nsp::stream_request(&n.trench, &n.conduit, &n.stream);
    let result = match command {
        StreamCommand::Open(n) => client.open(request(&n)).await.map(|_| ()),
        StreamCommand::Close(n) => client.close(request(&n)).await.map(|_| ()),
        StreamCommand::Watch { count } => {
            let all = tapmesh::proto::ambassador::Stream::default();
            match client.watch(all).await {
                Ok(r) => {
                    let mut updates = r.into_inner();
                    let mut seen = 0;
                    loop {
                        match updates.message().await {
                            Ok(Some(m)) => {
                                let text = format!("{}--\n", cli::nsp::render_statuses(&m));
                                if cli::print(&text).is_err() {
                                    break Ok(());
                                }
                                seen += 1;
                                if count.is_some_and(|c| seen >= c) {
                                    break Ok(());
                                }
                            }
                            Ok(None) => break Ok(()),
                            Err(e) => break Err(e),
                        }
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "tapmesh: {} (ambassador at {})",
                e.message(),
                socket.display()
            );
            ExitCode::FAILURE
        }
    }
}

async fn registry_list(socket: PathBuf) -> ExitCode {
    use tapmesh::proto::nsp::{target, target_registry_client::TargetRegistryClient, Target};
    let mut client = TargetRegistryClient::new(tapmesh::uds::lazy_channel(&socket));
    let mut all = tapmesh::proto::nsp::TargetResponse::default();
    for kind in [target::Type::Default, target::Type::Frontend] {
        let filter = Target {
            status: target::Status::Any as i32,
            r#type: kind as i32,
            ..Default::default()
        };
        let first = async { client.watch(filter).await?.into_inner().message().await };
        match first.await {
            Ok(Some(list)) => all.targets.extend(list.targets),
            Ok(None) => {}
            Err(e) => {
                eprintln!("tapmesh: registry at {}: {}", socket.display(), e.message());
                return ExitCode::FAILURE;
            }
        }
    }
    let _ = cli::print(&cli::nsp::render_targets(&all));
    ExitCode::SUCCESS
}

async fn tap_service(socket: PathBuf, command: TapServiceCommand) -> ExitCode {
    use admin::proto::{tap_service::Destination, ListTapsRequest, Ring, TapId, TapService};
    let mut client = match admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        TapServiceCommand::Create {
            id,
            name,
            interface,
            pcap,
            forward,
        } => {
            let destination = match interface {
                Some(i) => Some(Destination::Interface(i)),
                None if pcap.is_some() || forward.is_some() => Some(Destination::Ring(Ring {
                    pcap: pcap.unwrap_or_default(),
                    forward: forward.unwrap_or_default(),
                })),
                None => None,
            };
            client
                .create_tap_service(TapService {
                    id,
                    name: name.unwrap_or_default(),
                    destination,
                    ..Default::default()
                })
                .await
                .map(|_| String::new())
        }
        TapServiceCommand::Delete { id } => client
            .delete_tap_service(TapId { id })
            .await
            .map(|_| String::new()),
        TapServiceCommand::List => client
            .list_taps(ListTapsRequest {})
            .await
            .map(|r| cli::mirror::render_services(&r.into_inner())),
    };
    print_result(result)
}

async fn tap_flow(socket: PathBuf, command: TapFlowCommand) -> ExitCode {
    use admin::proto::{ListTapsRequest, TapFlow, TapId};
    let mut client = match admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match command {
        TapFlowCommand::Create {
            id,
            name,
            tap_service,
            source,
            direction,
            vlan_filter,
        } => client
            .create_tap_flow(TapFlow {
                id,
                name: name.unwrap_or_default(),
                tap_service,
                source,
                direction,
                vlan_filter: vlan_filter.unwrap_or_default(),
                ..Default::default()
            })
            .await
            .map(|_| String::new()),
        TapFlowCommand::Delete { id } => client
            .delete_tap_flow(TapId { id })
            .await
            .map(|_| String::new()),
        TapFlowCommand::List => client
            .list_taps(ListTapsRequest {})
            .await
            .map(|r| cli::mirror::render_flows(&r.into_inner())),
    };
    print_result(result)
}

fn print_result(result: Result<String, tonic::Status>) -> ExitCode {
    match result {
        Ok(text) => {
            let _ = cli::print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: {}", e.message());
            ExitCode::FAILURE
        }
    }
}

async fn catalog_list(socket: PathBuf) -> ExitCode {
    let mut client = match admin_client(&socket).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = client
        .list_catalog(admin::proto::ListCatalogRequest {})
        .await
        .map(|r| cli::catalog::render(&r.into_inner()));
    print_result(result)
}

/// The daemon's admin client, or the exit code after saying why it is unreachable.
async fn admin_client(
    socket: &std::path::Path,
) -> Result<admin::proto::admin_client::AdminClient<tonic::transport::Channel>, ExitCode> {
    admin::connect(socket).await.map_err(|e| {
        eprintln!("tapmesh: {e}");
        ExitCode::FAILURE
    })
}
