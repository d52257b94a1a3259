//! `tapmesh daemon`: the plugins wired together, run until a signal.

use std::{process::ExitCode, sync::Arc};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::AdminPlugin,
    catalog::{Catalog, CatalogPlugin},
    cluster::ClusterPlugin,
    config::{Config, Overrides},
    core::Core,
    dataplane::{DataplaneHandle, DataplanePlugin},
    lb::service::{LbPlugin, LbService},
    metrics::{MetricsPlugin, Sources},
    mirror::{MirrorPlugin, MirrorService},
    net::netns,
    nsp::NspPlugin,
    preflight,
};

/// Exit code for a configuration or an environment the daemon refuses.
pub const EXIT_CONFIG: u8 = 2;

/// The runtime every command and the daemon run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

/// Checks privileges, enters the namespace, loads the configuration, checks
/// the machine, sets up logging and runs. Every refusal before the run is
/// one line and exit 2, with nothing loaded or attached.
pub fn run(overrides: &Overrides, netns: Option<&str>, private_bpffs: bool) -> ExitCode {
    let refuse = |e: &dyn std::fmt::Display| {
        eprintln!("tapmesh: {e}");
        ExitCode::from(EXIT_CONFIG)
    };
    if let Err(e) = preflight::capabilities().and_then(|()| preflight::jit()) {
        return refuse(&e);
    }
    if let Some(name) = netns {
        if let Err(e) = netns::enter(name) {
            return refuse(&format!("--netns: {e}"));
        }
    }
    let config = match Config::load(overrides) {
        Ok(c) => c,
        Err(e) => return refuse(&e),
    };
    if let Err(e) = preflight::host_bpffs(&config.dataplane.bpffs_root, private_bpffs)
        .and_then(|()| preflight::pins_free(&config))
        .and_then(|()| preflight::uplinks_free(&config))
    {
        return refuse(&e);
    }
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.daemon.log_level))
        .with_writer(std::io::stderr);
    match config.daemon.log_format {
        crate::config::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        crate::config::LogFormat::Json => logs.json().init(),
    }
    // Backends and next hops are resolved against it instead of a dump each time.
    if let Err(e) = crate::net::neigh_table::keep() {
        tracing::warn!("the neighbour table is dumped for every resolution: {e}");
    }
    let runtime = runtime();
    let code = runtime.block_on(serve(config));
    // Every plugin has stopped: a blocking call still running (a netlink
    // read, a probe) is not waited for, or the exit would trail the stop by
    // seconds, the window a rolling update runs without a daemon.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// Registers the plugins in start order; each gets the services it uses.
fn wire(core: &mut Core) {
    let dataplane = DataplaneHandle::default();
    let lb = Arc::new(LbService::new(dataplane.clone()));
    core.register(Arc::new(DataplanePlugin::new(dataplane.clone())));
    core.register(Arc::new(LbPlugin::new(lb.clone())));
    let nsp = Arc::new(NspPlugin::new(lb.clone()));
    core.register(nsp.clone());
    let catalog = Catalog::new(lb.clone());
    core.register(Arc::new(ClusterPlugin::new(
        dataplane.clone(),
        nsp.clone(),
        catalog.clone(),
    )));
    let mirror = Arc::new(MirrorService::new(dataplane.clone()));
    core.register(Arc::new(MirrorPlugin::new(mirror.clone())));
    core.register(Arc::new(CatalogPlugin::new(catalog.clone())));
    core.register(Arc::new(crate::overlay::NetManagerPlugin::new(
        dataplane.clone(),
        catalog.clone(),
    )));
    core.register(Arc::new(AdminPlugin::new(
        core.view(),
        dataplane.clone(),
        lb.clone(),
        mirror.clone(),
        catalog.clone(),
    )));
    core.register(Arc::new(MetricsPlugin::new(Sources {
        core: core.view(),
        dataplane,
        lb,
        mirror,
        catalog,
        nsp,
    })));
}

/// Whether SIGHUP is ignored, as `nohup` leaves it.
fn hangup_ignored() -> bool {
    // SAFETY: with no new action, sigaction only reads the current one.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

async fn serve(config: Config) -> ExitCode {
    let global = CancellationToken::new();
    let mut core = Core::new(global.clone());
    wire(&mut core);

    // Signals are caught from here on, so one that arrives during start still stops cleanly.
    // SIGHUP (the terminal it ran in went away) stops it as cleanly: its
    // default action left the TC programs, pins and sockets behind. Under
    // `nohup` it is ignored, and stays so.
    let hup = match hangup_ignored() {
        true => Ok(None),
        false => signal(SignalKind::hangup()).map(Some),
    };
    let (mut term, mut int, mut hup) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        hup,
    ) {
        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
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
        _ = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        } => tracing::info!("SIGHUP: stopping"),
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
