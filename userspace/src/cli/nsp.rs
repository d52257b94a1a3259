//! `tapmesh stream …` (a client of the ambassador) and `tapmesh registry list`
//! (a client of the node daemon's target registry).

use std::{fmt::Write, path::PathBuf, process::ExitCode};

use super::args::{StreamCommand, StreamName};

use crate::proto::ambassador as tap;
use crate::proto::nsp;

pub fn stream_request(trench: &str, conduit: &str, stream: &str) -> tap::Stream {
    tap::Stream {
        name: stream.into(),
        conduit: Some(tap::Conduit {
            name: conduit.into(),
            trench: Some(tap::Trench {
                name: trench.into(),
            }),
        }),
    }
}

/// One line per stream: `stream.conduit.trench STATUS`.
pub fn render_statuses(response: &tap::StreamResponse) -> String {
    if response.stream_status.is_empty() {
        return "(no streams)\n".into();
    }
    let mut out = String::new();
    for s in &response.stream_status {
        let status = tap::stream_status::Status::try_from(s.status)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        let (name, conduit, trench) = match &s.stream {
            Some(st) => {
                let c = st.conduit.clone().unwrap_or_default();
                (st.name.clone(), c.name, c.trench.unwrap_or_default().name)
            }
            None => Default::default(),
        };
        let _ = writeln!(out, "{name}.{conduit}.{trench} {status}");
    }
    out
}

/// A table of registered targets.
pub fn render_targets(response: &nsp::TargetResponse) -> String {
    let mut out = String::from(
        "STREAM                          IDENTIFIER  STATUS    TYPE      NODE        IPS\n",
    );
    let mut rows: Vec<_> = response.targets.iter().collect();
    rows.sort_by_key(|t| {
        let s = t.stream.clone().unwrap_or_default();
        (s.name, t.context.get("identifier").cloned())
    });
    for t in rows {
        let stream = t.stream.as_ref().map_or(String::from("-"), |s| {
            let c = s.conduit.clone().unwrap_or_default();
            format!(
                "{}.{}.{}",
                s.name,
                c.name,
                c.trench.unwrap_or_default().name
            )
        });
        let status = nsp::target::Status::try_from(t.status).map_or("?", |s| s.as_str_name());
        let kind = nsp::target::Type::try_from(t.r#type).map_or("?", |s| s.as_str_name());
        let id = t.context.get("identifier").map_or("-", String::as_str);
        let node = t
            .context
            .get(crate::nsp::server::NODE)
            .map_or("-", String::as_str);
        let _ = writeln!(
            out,
            "{stream:<31} {id:<11} {status:<9} {kind:<9} {node:<11} {}",
            t.ips.join(",")
        );
    }
    out
}

/// `tapmesh stream open|close|watch`, through the ambassador.
pub async fn stream(socket: PathBuf, command: StreamCommand) -> ExitCode {
    use tap::tap_client::TapClient;
    let mut client = TapClient::new(crate::uds::lazy_channel(&socket));
    let request = |n: &StreamName| stream_request(&n.trench, &n.conduit, &n.stream);
    let result = match command {
        StreamCommand::Open(n) => client.open(request(&n)).await.map(|_| ()),
        StreamCommand::Close(n) => client.close(request(&n)).await.map(|_| ()),
        StreamCommand::Watch { count } => match client.watch(tap::Stream::default()).await {
            Ok(r) => watch(r.into_inner(), count).await,
            Err(e) => Err(e),
        },
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

/// Prints each update until the stream ends, `count` were printed or nobody reads.
async fn watch(
    mut updates: tonic::Streaming<tap::StreamResponse>,
    count: Option<usize>,
) -> Result<(), tonic::Status> {
    let mut seen = 0;
    while let Some(m) = updates.message().await? {
        if super::print(&format!("{}--\n", render_statuses(&m))).is_err() {
            break;
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            break;
        }
    }
    Ok(())
}

/// `tapmesh registry list`: the first answer of a watch per target type.
pub async fn registry_list(socket: PathBuf, output: super::json::Output) -> ExitCode {
    use nsp::{target, target_registry_client::TargetRegistryClient, Target};
    let mut client = TargetRegistryClient::new(crate::uds::lazy_channel(&socket));
    let mut all = nsp::TargetResponse::default();
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
    all.targets.sort_by_key(|t| {
        let s = t.stream.clone().unwrap_or_default();
        (s.name, t.context.get("identifier").cloned())
    });
    let _ = super::print(&super::json::show(output, &all, render_targets));
    ExitCode::SUCCESS
}
