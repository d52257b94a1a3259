//! Command-line front ends that talk to the daemon.

pub mod args;
pub mod bpf;
pub mod catalog;
pub mod check;
pub mod json;
pub mod lb;
pub mod mirror;
pub mod nsp;
pub mod status;

use std::{io::Write, path::Path, process::ExitCode};

use crate::admin;
use args::{CatalogCommand, Cli, Command, RegistryCommand};

pub use crate::daemon::{runtime, EXIT_CONFIG};

/// Runs one parsed command line to its exit code.
pub fn run(cli: Cli) -> ExitCode {
    let output = cli.output;
    let _ = CALL_TIMEOUT.set(cli.timeout);
    match cli.command {
        Command::Daemon {
            overrides,
            netns,
            private_bpffs,
        } => crate::daemon::run(&overrides, netns.as_deref(), private_bpffs),
        Command::Ambassador { settings } => crate::ambassador::run(settings),
        Command::Stream { socket, command } => runtime().block_on(nsp::stream(socket, command)),
        Command::Registry {
            node_socket,
            command: RegistryCommand::List,
        } => runtime().block_on(nsp::registry_list(node_socket, output)),
        Command::TapService {
            admin_socket,
            command,
        } => runtime().block_on(mirror::tap_service(admin_socket, command, output)),
        Command::TapFlow {
            admin_socket,
            command,
        } => runtime().block_on(mirror::tap_flow(admin_socket, command, output)),
        Command::Catalog {
            admin_socket,
            command: CatalogCommand::List,
        } => runtime().block_on(catalog::list(admin_socket, output)),
        Command::Status { admin_socket, raw } => {
            runtime().block_on(status::run(admin_socket, raw, output))
        }
        Command::Lb {
            admin_socket,
            command,
        } => runtime().block_on(lb::run(admin_socket, command, output)),
        Command::Config {
            command: args::ConfigCommand::Check { kind, files, netns },
        } => {
            if let Some(name) = netns {
                if let Err(e) = crate::net::netns::enter(&name) {
                    eprintln!("tapmesh: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
            check::run(&files, kind, output)
        }
        Command::Cleanup {
            bpffs_root,
            admin_socket,
            netns,
        } => cleanup(&bpffs_root, &admin_socket, netns.as_deref()),
        Command::Bpf {
            bpffs_root,
            netns,
            command,
        } => bpf::run(&bpffs_root, netns.as_deref(), command, output),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(
                shell,
                &mut Cli::command_with_defaults(),
                "tapmesh",
                &mut out,
            );
            let _ = print(&String::from_utf8_lossy(&out));
            ExitCode::SUCCESS
        }
        Command::Man { dir: Some(dir) } => {
            // Each page's title carries the version, as the main page's does.
            let command = Cli::command_with_defaults().propagate_version(true);
            match clap_mangen::generate_to(command, &dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tapmesh: writing the man pages to {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Man { dir: None } => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command_with_defaults()).render(&mut out) {
                Ok(()) => {
                    let _ = print(&String::from_utf8_lossy(&out));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tapmesh: rendering the man page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `tapmesh cleanup`: one line per thing removed; exit 2 if a daemon runs.
fn cleanup(bpffs_root: &Path, admin_socket: &Path, netns: Option<&str>) -> ExitCode {
    // Without them nothing can be detached or unpinned (and a running
    // daemon's maps cannot be told apart).
    if let Err(e) = crate::preflight::capabilities() {
        eprintln!("tapmesh: cleanup: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Err(e) = crate::uds::check_free(admin_socket) {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            eprintln!("tapmesh: a daemon is running ({e}); stop it first");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    // Whatever socket it answers on, a daemon holds its maps.
    let pins = bpffs_root.join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    if let Some(pid) = crate::dataplane::cleanup::holders(&pins).first() {
        eprintln!(
            "tapmesh: process {pid} holds the maps pinned under {} (a daemon with another admin socket?); stop it first",
            pins.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    if let Some(name) = netns {
        if let Err(e) = crate::net::netns::enter(name) {
            eprintln!("tapmesh: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    match runtime().block_on(crate::dataplane::cleanup::remove_kept(bpffs_root)) {
        Ok(removed) if removed.is_empty() => {
            let _ = print("nothing to remove\n");
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            let _ = print(&(removed.join("\n") + "\n"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: cleanup: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Standard output was closed by its reader (`tapmesh … | head`).
#[derive(Debug)]
pub struct Closed;

/// Writes `text` to standard output, as `print!` would, but a reader that
/// went away (EPIPE) is [`Closed`] rather than a panic: every command
/// prints through this and ends quietly then. Other write errors are
/// reported on stderr and also end the command.
pub fn print(text: &str) -> Result<(), Closed> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Closed),
        Err(e) => {
            eprintln!("tapmesh: writing to stdout: {e}");
            Err(Closed)
        }
    }
}

/// Prints a call's output, or its error on stderr.
pub fn print_result(result: Result<String, tonic::Status>) -> ExitCode {
    match result {
        Ok(text) => {
            let _ = print(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tapmesh: {}", e.message());
            // What the daemon refused as given exits as a bad file or
            // argument the CLI itself refuses: 2. Anything else: 1.
            use tonic::Code;
            match e.code() {
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::OutOfRange => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `--timeout`, once the command line is parsed.
static CALL_TIMEOUT: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();

/// The daemon's admin client, or the exit code after saying why it is unreachable.
pub async fn admin_client(
    socket: &Path,
) -> Result<admin::proto::admin_client::AdminClient<tonic::transport::Channel>, ExitCode> {
    let timeout = CALL_TIMEOUT.get().copied().unwrap_or(admin::CALL_TIMEOUT);
    admin::connect_within(socket, timeout).await.map_err(|e| {
        eprintln!("tapmesh: {e}");
        ExitCode::FAILURE
    })
}
