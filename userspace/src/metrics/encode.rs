//! One scrape: the daemon's state read once, written as OpenMetrics text.
//!
//! A registry is built per scrape from what the maps and services hold at
//! that moment, so every value is the map's (summed over CPUs), not a copy
//! kept beside it.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tapmesh_common::{DropReason, Protocol, Verdict};

use super::Sources;

type Labels = Vec<(&'static str, String)>;

/// Adds a counter family (`<name>_total`) with one sample per row.
fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).inc_by(value);
    }
    registry.register(name, help, family);
}

/// Adds a gauge family with one sample per row.
fn gauges(
    registry: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) {
    let family = Family::<Labels, Gauge>::default();
    for (labels, value) in rows {
        family.get_or_create(&labels).set(value);
    }
    registry.register(name, help, family);
}

fn label(key: &'static str, value: impl ToString) -> Labels {
    vec![(key, value.to_string())]
}

async fn dataplane(registry: &mut Registry, s: &Sources) {
    let programs = s.dataplane.counters().await.unwrap_or_default();
    let per = |f: &dyn Fn(&crate::dataplane::ProgramCounters) -> Vec<(Labels, u64)>| {
        programs.iter().flat_map(f).collect::<Vec<_>>()
    };
    let verdicts = |bytes: bool| {
        per(&|p| {
            Verdict::ALL
                .iter()
                .map(|&v| {
                    let c = p.stats.verdicts.get(v);
                    let labels = vec![
                        ("program", p.slot.name().into()),
                        ("verdict", v.name().into()),
                    ];
                    (labels, if bytes { c.bytes } else { c.packets })
                })
                .collect()
        })
    };
    counters(
        registry,
        "tapmesh_program_packets",
        "Packets each program handled, by verdict",
        verdicts(false),
    );
    counters(
        registry,
        "tapmesh_program_bytes",
        "Bytes each program handled, by verdict",
        verdicts(true),
    );
    counters(
        registry,
        "tapmesh_program_protocol_packets",
        "Packets each program parsed, by protocol",
        per(&|p| {
            Protocol::ALL
                .iter()
                .map(|&x| {
                    let labels = vec![
                        ("program", p.slot.name().into()),
                        ("protocol", x.name().into()),
                    ];
                    (labels, p.stats.protocols.get(x))
                })
                .collect()
        }),
    );
    counters(
        registry,
        "tapmesh_drop_packets",
        "Packets dropped, by program and reason (their bytes: tapmesh_program_bytes, verdict drop)",
        per(&|p| {
            DropReason::ALL
                .iter()
                .map(|&r| {
                    let labels = vec![
                        ("program", p.slot.name().into()),
                        ("reason", r.name().into()),
                    ];
                    (labels, p.stats.drops.get(r))
                })
                .collect()
        }),
    );
    gauges(
        registry,
        "tapmesh_attached",
        "Programs attached, by interface and hook (0: the kernel no longer has it)",
        s.dataplane
            .attachments_in_kernel(false)
            .await
            .into_iter()
            .map(|(a, there)| {
                let labels = vec![
                    ("interface", a.interface),
                    ("hook", a.hook.to_string()),
                    ("program", a.program.to_string()),
                ];
                (labels, i64::from(there))
            }),
    );
}

async fn load_balancing(registry: &mut Registry, s: &Sources) {
    let lb = s.dataplane.lb_counters().await.unwrap_or_default();
    // An EDS backend holds one target per Maglev identifier: the endpoint
    // label lets a query add up their rates (a freed identifier's counter
    // goes on under the backend that takes it).
    let endpoints = s.catalog.target_endpoints();
    let labels = |key: &'static str, name: &str| {
        let mut l = label(key, name);
        if let Some(endpoint) = endpoints.get(name).filter(|_| key == "target") {
            l.push(("endpoint", endpoint.clone()));
        }
        l
    };
    for (what, key, list) in [
        ("vip", "vip", &lb.vips),
        ("flow", "flow", &lb.flows),
        ("target", "target", &lb.targets),
    ] {
        counters(
            registry,
            &format!("tapmesh_{what}_packets"),
            &format!("Packets per {what}"),
            list.iter().map(|c| (labels(key, &c.name), c.packets)),
        );
        counters(
            registry,
            &format!("tapmesh_{what}_bytes"),
            &format!("Bytes per {what}"),
            list.iter().map(|c| (labels(key, &c.name), c.bytes)),
        );
    }
    let spec = s.lb.spec().await;
    gauges(
        registry,
        "tapmesh_lb_entries",
        "Entries of the load-balancing configuration, by kind",
        [
            (label("kind", "vips"), spec.vips.len() as i64),
            (label("kind", "streams"), spec.streams.len() as i64),
            (label("kind", "flows"), spec.flows.len() as i64),
            (label("kind", "targets"), spec.targets.len() as i64),
        ],
    );
}

async fn mirroring(registry: &mut Registry, s: &Sources) {
    let (services, flows) = s.mirror.list().await;
    let flow = |f: &crate::mirror::service::FlowListing| label("tap_flow", &f.state.spec.id);
    counters(
        registry,
        "tapmesh_mirror_packets",
        "Mirrored copies per tap flow",
        flows.iter().map(|f| (flow(f), f.packets)),
    );
    counters(
        registry,
        "tapmesh_mirror_bytes",
        "Bytes of mirrored copies per tap flow",
        flows.iter().map(|f| (flow(f), f.bytes)),
    );
    counters(
        registry,
        "tapmesh_mirror_failed",
        "Copies the kernel could not make, per tap flow",
        flows.iter().map(|f| (flow(f), f.failed)),
    );
    let rings: Vec<_> = services
        .iter()
        .filter_map(|s| Some((s.spec.id.clone(), s.ring.clone()?)))
        .collect();
    counters(
        registry,
        "tapmesh_ring_received",
        "Frames read from each tap service's AF_XDP ring",
        rings
            .iter()
            .map(|(id, r)| (label("tap_service", id), r.received)),
    );
    let consumers = |lost: bool| {
        rings
            .iter()
            .flat_map(|(id, r)| {
                r.consumers.iter().map(move |c| {
                    let labels = vec![("tap_service", id.clone()), ("consumer", c.name.clone())];
                    (labels, if lost { c.lost } else { c.delivered })
                })
            })
            .collect::<Vec<_>>()
    };
    counters(
        registry,
        "tapmesh_ring_delivered",
        "Ring frames each consumer delivered",
        consumers(false),
    );
    counters(
        registry,
        "tapmesh_ring_lost",
        "Ring frames each consumer dropped (queue full, write or send failed)",
        consumers(true),
    );
}

fn plugins_and_planes(registry: &mut Registry, s: &Sources) {
    gauges(
        registry,
        "tapmesh_plugin_state",
        "1 for each plugin's current state",
        s.core.statuses().into_iter().map(|p| {
            let labels = vec![
                ("plugin", p.name.to_string()),
                ("state", p.state.name().into()),
            ];
            (labels, 1)
        }),
    );
    let planes = crate::health::planes().snapshot();
    let flag = |f: fn(&crate::health::PlaneHealth) -> bool| {
        planes
            .iter()
            .map(move |(name, h)| (label("plane", name), i64::from(f(h))))
    };
    gauges(
        registry,
        "tapmesh_control_plane_connected",
        "1 while the control plane is connected (xds: the stream is open)",
        flag(|h| h.connected),
    );
    gauges(
        registry,
        "tapmesh_control_plane_synced",
        "1 once the control plane's first complete state was applied",
        flag(|h| h.synced),
    );
    gauges(
        registry,
        "tapmesh_control_plane_reload_failed",
        "1 while the last reload of the control plane's file failed",
        flag(|h| h.reload_error.is_some()),
    );
    let version = |nack: bool| {
        planes
            .iter()
            .filter_map(move |(name, h)| {
                let version = if nack {
                    h.last_nack.as_ref().map(|(v, _)| v.clone())
                } else {
                    h.last_ack.clone()
                }?;
                Some((vec![("plane", name.to_string()), ("version", version)], 1))
            })
            .collect::<Vec<_>>()
    };
    gauges(
        registry,
        "tapmesh_control_plane_last_ack",
        "1, labelled with the last version the control plane's updates were ACKed at",
        version(false),
    );
    gauges(
        registry,
        "tapmesh_control_plane_last_nack",
        "1, labelled with the last version that was NACKed",
        version(true),
    );
}

async fn registries(registry: &mut Registry, s: &Sources) {
    let (enabled, disabled) = s.nsp.registry_sizes().unwrap_or_default();
    gauges(
        registry,
        "tapmesh_registry_targets",
        "Targets in the NSP target registry, by status",
        [
            (label("status", "enabled"), enabled as i64),
            (label("status", "disabled"), disabled as i64),
        ],
    );
    let services = s.catalog.services().await;
    gauges(
        registry,
        "tapmesh_catalog_services",
        "Services in the catalog, by source",
        {
            let mut by_source = std::collections::BTreeMap::<String, i64>::new();
            for service in &services {
                *by_source.entry(service.source.to_string()).or_default() += 1;
            }
            by_source.into_iter().map(|(s, n)| (label("source", s), n))
        },
    );
}

/// The whole scrape.
pub async fn scrape(sources: &Sources) -> String {
    let mut registry = Registry::default();
    dataplane(&mut registry, sources).await;
    load_balancing(&mut registry, sources).await;
    mirroring(&mut registry, sources).await;
    plugins_and_planes(&mut registry, sources);
    registries(&mut registry, sources).await;
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}
