//! `tapmesh stream …` (a client of the ambassador) and `tapmesh registry list`
//! (a client of the node daemon's target registry).

use std::fmt::Write;

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
    let mut out =
        String::from("STREAM                          IDENTIFIER  STATUS    TYPE      IPS\n");
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
        let _ = writeln!(
            out,
            "{stream:<31} {id:<11} {status:<9} {kind:<9} {}",
            t.ips.join(",")
        );
    }
    out
}
