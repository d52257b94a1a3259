use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use tapmesh::{
    admin::{self, AdminPlugin},
    cli,
    config::{Config, Overrides, DEFAULT_ADMIN_SOCKET},
    core::Core,
    dataplane::{DataplaneHandle, DataplanePlugin},
    lb::service::{LbPlugin, LbService},
    netns,
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
    core.register(Arc::new(AdminPlugin::new(core.view(), dataplane, lb)));

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
    let mut client = match admin::connect(&socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tapmesh: {e}");
            return ExitCode::FAILURE;
        }
    };
    match client.status(admin::proto::StatusRequest {}).await {
        Ok(response) => {
            let status = response.into_inner();
            if raw {
                println!("{status:#?}");
            } else {
                print!("{}", cli::status::render(&status));
            }
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

    let mut client = match admin::connect(&socket).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tapmesh: {e}");
            return ExitCode::FAILURE;
        }
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
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: {}", e.message());
            ExitCode::FAILURE
        }
    }
}
