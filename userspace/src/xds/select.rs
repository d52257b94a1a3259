//! gRPC A27 endpoint selection: a `ClusterLoadAssignment` becomes the flat
//! list of endpoints a dataplane should use, or an [`InvalidAssignment`]
//! (which the client NACKs).
//!
//! Rules (A27 with the choices of /work/shared/reference/xds.md §1.7, §1.8):
//! * Only endpoints whose `health_status` is `HEALTHY` or `UNKNOWN` are used
//!   (`DRAINING`, `TIMEOUT`, `UNHEALTHY` and unknown values never are).
//!   `DEGRADED` endpoints are used when no priority has a `HEALTHY` or
//!   `UNKNOWN` one: Envoy sends them traffic only when healthy hosts are
//!   short, and all of it when there are none.
//! * The highest priority (lowest number) with at least one usable endpoint
//!   wins; lower priorities are not used (no Envoy overprovisioning maths: the
//!   client advertises `envoy.lb.does_not_support_overprovisioning`). They,
//!   and every endpoint that is not usable, are kept as `standby` with their
//!   health, for the EDS server and the catalog listing.
//! * Locality weights: when no locality of the assignment has a
//!   `load_balancing_weight`, localities do not count and every endpoint of
//!   the priority shares by its own weight (Envoy without locality-weighted
//!   LB: one endpoint of weight 1 in a zone of its own gets no more than each
//!   of nine in another). When any has one, localities without one are
//!   skipped (A27). An explicit weight 0 is invalid (proto rule `>= 1`).
//! * Endpoint `load_balancing_weight` defaults to 1; 0 is invalid.
//! * An address and port may appear once in the whole assignment (a second
//!   listing is invalid, as in gRPC-Go; it would otherwise count twice).
//! * The effective weight of an endpoint is its share of the priority's
//!   traffic, `locality_weight / Σ locality_weights × endpoint_weight /
//!   Σ endpoint_weights_in_locality` (without locality weights, its
//!   endpoint weight), expressed as the smallest integers with
//!   exactly those ratios; only when those do not fit in a `u32` are they
//!   scaled (proportionally, at least 1 each).
//! * `drop_overloads` are carried with `drop_percentage` in parts per million.

use std::collections::HashSet;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address, HealthStatus, Locality as PbLocality,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, locality_lb_endpoints, ClusterLoadAssignment,
};
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;

use super::{ClusterEndpoints, DropOverload, Locality, SelectedEndpoint, StandbyEndpoint};

/// The highest priority number the Envoy API allows.
pub const MAX_PRIORITY: u32 = 128;

/// Why a `ClusterLoadAssignment` was rejected; the text becomes the NACK's
/// `error_detail.message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ClusterLoadAssignment {cluster:?}: {reason}")]
pub struct InvalidAssignment {
    pub cluster: String,
    pub reason: String,
}

impl From<&PbLocality> for Locality {
    fn from(l: &PbLocality) -> Self {
        Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            sub_zone: l.sub_zone.clone(),
        }
    }
}

fn usable(health: i32) -> bool {
    matches!(
        HealthStatus::try_from(health),
        Ok(HealthStatus::Healthy | HealthStatus::Unknown)
    )
}

/// One validated endpoint, before selection.
struct Candidate {
    address: IpAddr,
    port: u16,
    weight: u32,
    health: i32,
    usable: bool,
}

/// One validated locality, before selection.
struct Group {
    locality: Locality,
    priority: u32,
    weight: Option<u32>,
    endpoints: Vec<Candidate>,
}

/// Validates `cla` and selects its endpoints (see the module documentation).
pub fn select(cla: &ClusterLoadAssignment) -> Result<ClusterEndpoints, InvalidAssignment> {
    let invalid = |reason: String| InvalidAssignment {
        cluster: cla.cluster_name.clone(),
        reason,
    };
    if cla.cluster_name.is_empty() {
        return Err(invalid("cluster_name is empty".into()));
    }
    if !cla.named_endpoints.is_empty() {
        return Err(invalid("named_endpoints are not supported".into()));
    }

    let mut groups = Vec::with_capacity(cla.endpoints.len());
    let mut seen_localities = HashSet::new();
    // Where each address:port is listed: an endpoint listed twice would be
    // counted twice (gRPC-Go rejects such assignments too). Sorted after
    // the walk, not hashed one by one (10 000 endpoints come at each update).
    let mut listed: Vec<((IpAddr, u16), (usize, usize))> = Vec::new();
    for (li, lle) in cla.endpoints.iter().enumerate() {
        let at = |what: String| invalid(format!("endpoints[{li}]: {what}"));
        if lle.priority > MAX_PRIORITY {
            return Err(at(format!(
                "priority {} is above {MAX_PRIORITY}",
                lle.priority
            )));
        }
        if matches!(
            lle.lb_config,
            Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(
                _
            ))
        ) {
            return Err(at("LEDS localities are not supported".into()));
        }
        let locality = lle
            .locality
            .as_ref()
            .map(Locality::from)
            .unwrap_or_default();
        if !seen_localities.insert((lle.priority, locality.clone())) {
            return Err(at(format!(
                "locality {locality} appears twice at priority {}",
                lle.priority
            )));
        }
        let weight = lle.load_balancing_weight.map(|w| w.value);
        if weight == Some(0) {
            return Err(at("locality load_balancing_weight is 0".into()));
        }
        let mut endpoints = Vec::with_capacity(lle.lb_endpoints.len());
        let mut sum: u64 = 0;
        for (ei, lbe) in lle.lb_endpoints.iter().enumerate() {
            let at = |what: String| invalid(format!("endpoints[{li}].lb_endpoints[{ei}]: {what}"));
            let endpoint = match &lbe.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                Some(lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(at("endpoint_name is not supported".into()))
                }
                None => return Err(at("no endpoint".into())),
            };
            let socket = match endpoint.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(address::Address::SocketAddress(s)) => s,
                Some(_) => return Err(at("the address is not a socket address".into())),
                None => return Err(at("no socket address".into())),
            };
            let ip: IpAddr = socket
                .address
                .parse()
                .map_err(|_| at(format!("{:?} is not an IP address", socket.address)))?;
            let port = match socket.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) if (1..=65535).contains(&p) => {
                    p as u16
                }
                Some(socket_address::PortSpecifier::PortValue(p)) => {
                    return Err(at(format!("port {p} is out of range 1-65535")))
                }
                Some(socket_address::PortSpecifier::NamedPort(_)) => {
                    return Err(at("named ports are not supported".into()))
                }
                None => return Err(at("no port".into())),
            };
            listed.push(((ip, port), (li, ei)));
            let weight = lbe.load_balancing_weight.map_or(1, |w| w.value);
            if weight == 0 {
                return Err(at("load_balancing_weight is 0".into()));
            }
            sum += u64::from(weight);
            endpoints.push(Candidate {
                address: ip,
                port,
                weight,
                health: lbe.health_status,
                usable: usable(lbe.health_status),
            });
        }
        if sum > u64::from(u32::MAX) {
            return Err(at(format!(
                "the endpoint weights add up to {sum}, above {}",
                u32::MAX
            )));
        }
        groups.push(Group {
            locality,
            priority: lle.priority,
            weight,
            endpoints,
        });
    }

    // The repeat met first in listing order, named with its first listing.
    listed.sort_unstable();
    let repeat = listed
        .windows(2)
        .filter(|pair| pair[0].0 == pair[1].0)
        .map(|pair| (pair[1].1, pair[0].1, pair[1].0))
        .min();
    if let Some(((li, ei), (l, e), (ip, port))) = repeat {
        return Err(invalid(format!(
            "endpoints[{li}].lb_endpoints[{ei}]: {} is listed twice (also endpoints[{l}].lb_endpoints[{e}])",
            std::net::SocketAddr::new(ip, port)
        )));
    }

    // Priorities must run 0..N without gaps (A27).
    let priorities: HashSet<u32> = groups.iter().map(|g| g.priority).collect();
    if let Some(max) = priorities.iter().max() {
        if let Some(missing) = (0..*max).find(|p| !priorities.contains(p)) {
            return Err(invalid(format!(
                "priority {missing} is missing (priorities go up to {max})"
            )));
        }
    }
    for p in &priorities {
        let sum: u64 = groups
            .iter()
            .filter(|g| g.priority == *p)
            .filter_map(|g| g.weight)
            .map(u64::from)
            .sum();
        if sum > u64::from(u32::MAX) {
            return Err(invalid(format!(
                "the locality weights of priority {p} add up to {sum}, above {}",
                u32::MAX
            )));
        }
    }

    let drop_overloads = drop_overloads(cla).map_err(invalid)?;

    let weighted_localities = groups.iter().any(|g| g.weight.is_some());
    // No healthy endpoint in a locality that counts: the degraded ones take
    // the traffic.
    let counts = |g: &Group| !weighted_localities || g.weight.is_some();
    if !groups
        .iter()
        .filter(|g| counts(g))
        .flat_map(|g| &g.endpoints)
        .any(|e| e.usable)
    {
        for e in groups.iter_mut().flat_map(|g| &mut g.endpoints) {
            e.usable = e.health == HealthStatus::Degraded as i32;
        }
    }

    let locality_weight = |g: &Group| {
        if weighted_localities {
            g.weight
        } else {
            Some(1)
        }
    };
    let live = |g: &Group| locality_weight(g).is_some() && g.endpoints.iter().any(|e| e.usable);
    let chosen = groups.iter().filter(|g| live(g)).map(|g| g.priority).min();

    // Every priority's shares, as if it were chosen: the chosen one is what
    // the dataplane uses, the others are served to proxies for failover.
    let mut endpoints = Vec::new();
    let mut standby = Vec::new();
    let mut priorities: Vec<u32> = priorities.into_iter().collect();
    priorities.sort_unstable();
    for priority in priorities {
        // Exact shares as fractions num/den over a common denominator.
        let mut parts: Vec<(&Group, &Candidate, u64, u64)> = Vec::new();
        for g in groups.iter().filter(|g| g.priority == priority && live(g)) {
            // Without locality weights an endpoint's share is its own
            // weight over the priority's (one denominator for all).
            let (lw, total) = match weighted_localities {
                true => {
                    let total = g.endpoints.iter().filter(|e| e.usable);
                    let total: u64 = total.map(|e| u64::from(e.weight)).sum();
                    (u64::from(locality_weight(g).expect("live")), total)
                }
                false => (1, 1),
            };
            for e in g.endpoints.iter().filter(|e| e.usable) {
                parts.push((g, e, lw * u64::from(e.weight), total));
            }
        }
        let weights = normalise(
            &parts
                .iter()
                .map(|(_, _, n, d)| (*n, *d))
                .collect::<Vec<_>>(),
        );
        for ((g, e, _, _), weight) in parts.iter().zip(weights) {
            let selected = SelectedEndpoint {
                address: e.address,
                port: e.port,
                weight,
                locality: g.locality.clone(),
                priority,
                health: e.health,
            };
            if Some(priority) == chosen {
                endpoints.push(selected);
            } else {
                standby.push(StandbyEndpoint {
                    endpoint: selected,
                    usable: true,
                });
            }
        }
        for g in groups.iter().filter(|g| g.priority == priority) {
            let is_live = live(g);
            for e in g.endpoints.iter().filter(|e| !(is_live && e.usable)) {
                standby.push(StandbyEndpoint {
                    endpoint: SelectedEndpoint {
                        address: e.address,
                        port: e.port,
                        weight: e.weight,
                        locality: g.locality.clone(),
                        priority,
                        health: e.health,
                    },
                    usable: false,
                });
            }
        }
    }

    Ok(ClusterEndpoints {
        cluster: cla.cluster_name.clone(),
        endpoints,
        standby,
        drop_overloads,
    })
}

fn drop_overloads(cla: &ClusterLoadAssignment) -> Result<Vec<DropOverload>, String> {
    let Some(policy) = &cla.policy else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(policy.drop_overloads.len());
    for (i, d) in policy.drop_overloads.iter().enumerate() {
        if d.category.is_empty() {
            return Err(format!("policy.drop_overloads[{i}]: the category is empty"));
        }
        let ppm = match &d.drop_percentage {
            None => 0,
            Some(f) => {
                let scale: u64 = match DenominatorType::try_from(f.denominator) {
                    Ok(DenominatorType::Hundred) => 10_000,
                    Ok(DenominatorType::TenThousand) => 100,
                    Ok(DenominatorType::Million) => 1,
                    Err(_) => {
                        return Err(format!(
                            "policy.drop_overloads[{i}]: unknown denominator {}",
                            f.denominator
                        ))
                    }
                };
                (u64::from(f.numerator) * scale).min(1_000_000) as u32
            }
        };
        out.push(DropOverload {
            category: d.category.clone(),
            parts_per_million: ppm,
        });
    }
    Ok(out)
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Integer weights proportional to the fractions `num/den`: exact (reduced
/// to lowest terms) when they fit in a `u32`, otherwise scaled so the largest
/// is `u32::MAX`-bounded and every one is at least 1.
fn normalise(shares: &[(u64, u64)]) -> Vec<u32> {
    if shares.is_empty() {
        return Vec::new();
    }
    // Common denominator: the lcm of all denominators, if it fits.
    let mut lcm: Option<u128> = Some(1);
    for &(_, d) in shares {
        lcm = lcm.and_then(|l| {
            let d = u128::from(d.max(1));
            (l / gcd(l, d)).checked_mul(d)
        });
    }
    if let Some(lcm) = lcm {
        let exact: Option<Vec<u128>> = shares
            .iter()
            .map(|&(n, d)| u128::from(n).checked_mul(lcm / u128::from(d.max(1))))
            .collect();
        if let Some(exact) = exact {
            let g = exact.iter().copied().fold(0, gcd).max(1);
            let reduced: Vec<u128> = exact.iter().map(|v| v / g).collect();
            if reduced.iter().all(|v| *v <= u128::from(u32::MAX)) {
                return reduced.into_iter().map(|v| v as u32).collect();
            }
        }
    }
    // Approximate: scale the shares so the largest becomes 2^24.
    let real: Vec<f64> = shares
        .iter()
        .map(|&(n, d)| n as f64 / d.max(1) as f64)
        .collect();
    let max = real.iter().copied().fold(0.0, f64::max);
    real.iter()
        .map(|r| ((r / max) * f64::from(1u32 << 24)).round().max(1.0) as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        cluster_load_assignment::{policy, Policy},
        Endpoint, LbEndpoint, LocalityLbEndpoints,
    };
    use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
    use envoy_types::pb::google::protobuf::UInt32Value;

    fn ep(ip: &str, port: u32, health: HealthStatus, weight: Option<u32>) -> LbEndpoint {
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            health_status: health as i32,
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            ..Default::default()
        }
    }

    fn loc(
        zone: &str,
        priority: u32,
        weight: Option<u32>,
        eps: Vec<LbEndpoint>,
    ) -> LocalityLbEndpoints {
        LocalityLbEndpoints {
            locality: Some(PbLocality {
                zone: zone.into(),
                ..Default::default()
            }),
            lb_endpoints: eps,
            load_balancing_weight: weight.map(|value| UInt32Value { value }),
            priority,
            ..Default::default()
        }
    }

    /// Locality `zone` at `priority` with one healthy endpoint, `ip`:80.
    fn lone(zone: &str, priority: u32, ip: &str) -> LocalityLbEndpoints {
        loc(zone, priority, None, vec![ep(ip, 80, Healthy, None)])
    }

    fn cla(endpoints: Vec<LocalityLbEndpoints>) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "svc".into(),
            endpoints,
            ..Default::default()
        }
    }

    fn addrs(c: &ClusterEndpoints) -> Vec<(String, u16, u32, u32)> {
        c.endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.port, e.weight, e.priority))
            .collect()
    }

    use HealthStatus::*;

    #[test]
    fn keeps_only_healthy_and_unknown() {
        let c = select(&cla(vec![loc(
            "a",
            0,
            None,
            vec![
                ep("10.0.0.1", 80, Healthy, None),
                ep("10.0.0.2", 80, Unknown, None),
                ep("10.0.0.3", 80, Unhealthy, None),
                ep("10.0.0.4", 80, Draining, None),
                ep("10.0.0.5", 80, Timeout, None),
                ep("10.0.0.6", 80, Degraded, None),
                ep("2001:db8::7", 8080, Healthy, None),
            ],
        )]))
        .unwrap();
        assert_eq!(
            addrs(&c),
            vec![
                ("10.0.0.1".into(), 80, 1, 0),
                ("10.0.0.2".into(), 80, 1, 0),
                ("2001:db8::7".into(), 8080, 1, 0),
            ]
        );
        assert_eq!(c.cluster, "svc");
        assert_eq!(c.endpoints[0].locality.zone, "a");
    }

    #[test]
    fn unknown_health_value_is_not_used() {
        let mut e = ep("10.0.0.1", 80, Healthy, None);
        e.health_status = 42;
        let c = select(&cla(vec![loc("a", 0, None, vec![e])])).unwrap();
        assert!(c.endpoints.is_empty());
    }

    #[test]
    fn fails_over_to_the_next_priority_with_a_usable_endpoint() {
        // P0: 10.0.0.1 unhealthy, 10.0.0.2 of health `second`.
        let p0 = |second| {
            let eps = vec![
                ep("10.0.0.1", 80, Unhealthy, None),
                ep("10.0.0.2", 80, second, None),
            ];
            loc("p0", 0, None, eps)
        };
        let input = cla(vec![
            p0(Draining),
            lone("p1", 1, "10.0.1.1"),
            lone("p2", 2, "10.0.2.1"),
        ]);
        let c = select(&input).unwrap();
        assert_eq!(addrs(&c), vec![("10.0.1.1".into(), 80, 1, 1)]);
        assert_eq!(c.endpoints[0].locality.zone, "p1");

        // One usable endpoint in P0 is enough to keep all traffic there.
        let input = cla(vec![p0(Unknown), lone("p1", 1, "10.0.1.1")]);
        assert_eq!(
            addrs(&select(&input).unwrap()),
            vec![("10.0.0.2".into(), 80, 1, 0)]
        );
    }

    #[test]
    fn priorities_out_of_order_in_the_list() {
        let input = cla(vec![lone("p1", 1, "10.0.1.1"), lone("p0", 0, "10.0.0.1")]);
        assert_eq!(
            addrs(&select(&input).unwrap()),
            vec![("10.0.0.1".into(), 80, 1, 0)]
        );
    }

    #[test]
    fn nothing_usable_is_an_empty_set_not_an_error() {
        let c = select(&cla(vec![loc(
            "a",
            0,
            None,
            vec![ep("10.0.0.1", 80, Unhealthy, None)],
        )]))
        .unwrap();
        assert!(c.endpoints.is_empty());
        let c = select(&cla(vec![])).unwrap();
        assert!(c.endpoints.is_empty());
        assert!(c.drop_overloads.is_empty());
    }

    #[test]
    fn endpoint_weights_within_a_locality() {
        let c = select(&cla(vec![loc(
            "a",
            0,
            None,
            vec![
                ep("10.0.0.1", 80, Healthy, Some(2)),
                ep("10.0.0.2", 80, Healthy, Some(4)),
                ep("10.0.0.3", 80, Unhealthy, Some(100)),
                ep("10.0.0.4", 80, Healthy, None),
            ],
        )]))
        .unwrap();
        // 2:4:1, the unhealthy one does not count.
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(w, vec![2, 4, 1]);
    }

    #[test]
    fn locality_weights_times_endpoint_shares() {
        // Locality a (weight 1): two endpoints 1:1. Locality b (weight 3): one endpoint.
        // Shares: a1 = 1/4 * 1/2 = 1/8, a2 = 1/8, b1 = 3/4 = 6/8.
        let c = select(&cla(vec![
            loc(
                "a",
                0,
                Some(1),
                vec![
                    ep("10.0.0.1", 80, Healthy, None),
                    ep("10.0.0.2", 80, Healthy, None),
                ],
            ),
            loc("b", 0, Some(3), vec![ep("10.0.1.1", 80, Healthy, Some(7))]),
        ]))
        .unwrap();
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(w, vec![1, 1, 6]);
        assert_eq!(c.endpoints[2].locality.zone, "b");
    }

    #[test]
    fn degraded_endpoints_serve_only_when_nothing_is_healthy() {
        let p0 = loc(
            "p0",
            0,
            None,
            vec![
                ep("10.0.0.1", 80, Degraded, Some(3)),
                ep("10.0.0.2", 80, Unhealthy, None),
            ],
        );
        let p1 = |health| loc("p1", 1, None, vec![ep("10.0.1.1", 80, health, None)]);
        // A healthy endpoint in any priority keeps the degraded one idle.
        let c = select(&cla(vec![p0.clone(), p1(Healthy)])).unwrap();
        assert_eq!(addrs(&c), vec![("10.0.1.1".into(), 80, 1, 1)]);
        let idle: Vec<(String, bool)> = c
            .standby
            .iter()
            .map(|s| (s.endpoint.address.to_string(), s.usable))
            .collect();
        assert!(idle.contains(&("10.0.0.1".into(), false)), "{idle:?}");

        // None healthy: the highest priority with a degraded one takes all.
        let c = select(&cla(vec![p0, p1(Degraded)])).unwrap();
        assert_eq!(addrs(&c), vec![("10.0.0.1".into(), 80, 1, 0)]);
        assert_eq!(c.endpoints[0].health, Degraded as i32);
        let standby: Vec<(String, bool)> = c
            .standby
            .iter()
            .map(|s| (s.endpoint.address.to_string(), s.usable))
            .collect();
        assert_eq!(
            standby,
            vec![("10.0.0.2".into(), false), ("10.0.1.1".into(), true)]
        );
    }

    #[test]
    fn a_healthy_endpoint_in_a_skipped_locality_does_not_keep_degraded_ones_idle() {
        // Locality a counts (weighted) and has only a degraded endpoint;
        // b has no weight, so its healthy endpoint is skipped.
        let c = select(&cla(vec![
            loc("a", 0, Some(1), vec![ep("10.0.0.1", 80, Degraded, None)]),
            lone("b", 0, "10.0.1.1"),
        ]))
        .unwrap();
        assert_eq!(addrs(&c), vec![("10.0.0.1".into(), 80, 1, 0)]);
    }

    #[test]
    fn without_locality_weights_endpoints_share_by_their_own_weight() {
        // One endpoint alone in zone a, nine in zone b: a tenth each, not
        // half for a's (Envoy without locality-weighted LB).
        let nine = (1..=9)
            .map(|i| ep(&format!("10.0.1.{i}"), 80, Healthy, None))
            .collect();
        let c = select(&cla(vec![
            lone("a", 0, "10.0.0.1"),
            loc("b", 0, None, nine),
        ]))
        .unwrap();
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(w, vec![1; 10]);

        // Endpoint weights count across localities; unusable ones do not.
        let c = select(&cla(vec![
            loc("a", 0, None, vec![ep("10.0.0.1", 80, Healthy, Some(4))]),
            loc(
                "b",
                0,
                None,
                vec![
                    ep("10.0.1.1", 80, Healthy, Some(2)),
                    ep("10.0.1.2", 80, Unhealthy, Some(50)),
                    ep("10.0.1.3", 80, Healthy, Some(6)),
                ],
            ),
        ]))
        .unwrap();
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        assert_eq!(w, vec![2, 1, 3]);
    }

    #[test]
    fn unweighted_localities_are_skipped_when_others_have_weights() {
        let c = select(&cla(vec![
            lone("a", 0, "10.0.0.1"),
            loc("b", 0, Some(5), vec![ep("10.0.1.1", 80, Healthy, None)]),
        ]))
        .unwrap();
        assert_eq!(addrs(&c), vec![("10.0.1.1".into(), 80, 1, 0)]);

        // A weighted locality elsewhere in the assignment also switches the mode:
        // P0 has only an unweighted locality, so P1 is chosen.
        let c = select(&cla(vec![
            lone("a", 0, "10.0.0.1"),
            loc("b", 1, Some(5), vec![ep("10.0.1.1", 80, Healthy, None)]),
        ]))
        .unwrap();
        assert_eq!(addrs(&c), vec![("10.0.1.1".into(), 80, 1, 1)]);
    }

    #[test]
    fn large_weights_stay_exact_or_proportional() {
        let c = select(&cla(vec![
            loc(
                "a",
                0,
                Some(u32::MAX - 1),
                vec![
                    ep("10.0.0.1", 80, Healthy, Some(3)),
                    ep("10.0.0.2", 80, Healthy, Some(1)),
                ],
            ),
            loc("b", 0, Some(1), vec![ep("10.0.1.1", 80, Healthy, None)]),
        ]))
        .unwrap();
        let w: Vec<u32> = c.endpoints.iter().map(|e| e.weight).collect();
        assert!(w.iter().all(|w| *w >= 1));
        // a1 : a2 == 3 : 1 and b is tiny but present.
        let ratio = f64::from(w[0]) / f64::from(w[1]);
        assert!((ratio - 3.0).abs() < 0.001, "{w:?}");
        assert!(w[2] < w[1]);
    }

    #[test]
    fn drop_overloads_in_parts_per_million() {
        let mut input = cla(vec![lone("a", 0, "10.0.0.1")]);
        let frac = |numerator, d: DenominatorType| FractionalPercent {
            numerator,
            denominator: d as i32,
        };
        input.policy = Some(Policy {
            drop_overloads: vec![
                policy::DropOverload {
                    category: "lb".into(),
                    drop_percentage: Some(frac(5, DenominatorType::Hundred)),
                },
                policy::DropOverload {
                    category: "throttle".into(),
                    drop_percentage: Some(frac(25, DenominatorType::TenThousand)),
                },
                policy::DropOverload {
                    category: "all".into(),
                    drop_percentage: Some(frac(300, DenominatorType::Hundred)),
                },
            ],
            ..Default::default()
        });
        let c = select(&input).unwrap();
        assert_eq!(
            c.drop_overloads,
            vec![
                DropOverload {
                    category: "lb".into(),
                    parts_per_million: 50_000
                },
                DropOverload {
                    category: "throttle".into(),
                    parts_per_million: 2_500
                },
                DropOverload {
                    category: "all".into(),
                    parts_per_million: 1_000_000
                },
            ]
        );
    }

    fn rejected(input: ClusterLoadAssignment, needle: &str) {
        let e = select(&input).expect_err("must be rejected");
        assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
    }

    #[test]
    fn the_first_repeat_in_listing_order_is_named_with_its_first_listing() {
        let e = |a: &str| ep(a, 80, Healthy, None);
        // 10.0.0.3 repeats first (at [1][0]); 10.0.0.1 is listed three
        // times, its second listing later ([1][1]).
        let input = cla(vec![
            loc(
                "a",
                0,
                None,
                vec![e("10.0.0.1"), e("10.0.0.3"), e("10.0.0.2")],
            ),
            loc(
                "b",
                0,
                None,
                vec![e("10.0.0.3"), e("10.0.0.1"), e("10.0.0.1")],
            ),
        ]);
        let err = select(&input).unwrap_err();
        assert_eq!(
            err.reason,
            "endpoints[1].lb_endpoints[0]: 10.0.0.3:80 is listed twice (also endpoints[0].lb_endpoints[1])"
        );
        let input = cla(vec![loc(
            "a",
            0,
            None,
            vec![e("10.0.0.1"), e("10.0.0.2"), e("10.0.0.1"), e("10.0.0.1")],
        )]);
        assert_eq!(
            select(&input).unwrap_err().reason,
            "endpoints[0].lb_endpoints[2]: 10.0.0.1:80 is listed twice (also endpoints[0].lb_endpoints[0])"
        );
    }

    #[test]
    fn invalid_assignments() {
        let one = |e: LbEndpoint| cla(vec![loc("a", 0, None, vec![e])]);
        rejected(
            one(ep("not-an-ip", 80, Healthy, None)),
            "is not an IP address",
        );
        rejected(
            one(ep("example.com", 80, Healthy, None)),
            "is not an IP address",
        );
        rejected(one(ep("10.0.0.1", 0, Healthy, None)), "port 0");
        rejected(one(ep("10.0.0.1", 65536, Healthy, None)), "port 65536");
        rejected(
            one(ep("10.0.0.1", 80, Healthy, Some(0))),
            "load_balancing_weight is 0",
        );

        let mut no_address = ep("10.0.0.1", 80, Healthy, None);
        if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut no_address.host_identifier {
            e.address = None;
        }
        rejected(one(no_address), "no socket address");
        let mut pipe = ep("10.0.0.1", 80, Healthy, None);
        if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut pipe.host_identifier {
            e.address = Some(Address {
                address: Some(address::Address::Pipe(Default::default())),
            });
        }
        rejected(one(pipe), "not a socket address");
        let mut named = ep("10.0.0.1", 80, Healthy, None);
        named.host_identifier = Some(lb_endpoint::HostIdentifier::EndpointName("x".into()));
        rejected(one(named), "endpoint_name");
        let mut no_host = ep("10.0.0.1", 80, Healthy, None);
        no_host.host_identifier = None;
        rejected(one(no_host), "no endpoint");
        let mut named_port = ep("10.0.0.1", 80, Healthy, None);
        if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut named_port.host_identifier {
            if let Some(address::Address::SocketAddress(s)) =
                e.address.as_mut().and_then(|a| a.address.as_mut())
            {
                s.port_specifier = Some(socket_address::PortSpecifier::NamedPort("http".into()));
            }
        }
        rejected(one(named_port), "named ports");

        // Weights that overflow the per-locality and per-priority sums.
        rejected(
            cla(vec![loc(
                "a",
                0,
                None,
                vec![
                    ep("10.0.0.1", 80, Healthy, Some(u32::MAX)),
                    ep("10.0.0.2", 80, Unhealthy, Some(1)),
                ],
            )]),
            "endpoint weights add up",
        );
        rejected(
            cla(vec![
                loc(
                    "a",
                    0,
                    Some(u32::MAX),
                    vec![ep("10.0.0.1", 80, Healthy, None)],
                ),
                loc("b", 0, Some(1), vec![ep("10.0.0.2", 80, Healthy, None)]),
            ]),
            "locality weights of priority 0",
        );
        rejected(
            cla(vec![loc(
                "a",
                0,
                Some(0),
                vec![ep("10.0.0.1", 80, Healthy, None)],
            )]),
            "locality load_balancing_weight is 0",
        );
        rejected(
            cla(vec![lone("a", 0, "10.0.0.1"), lone("b", 2, "10.0.0.2")]),
            "priority 1 is missing",
        );
        rejected(cla(vec![lone("a", 129, "10.0.0.1")]), "priority 129");
        rejected(
            cla(vec![lone("a", 0, "10.0.0.1"), lone("a", 0, "10.0.0.2")]),
            "appears twice",
        );
        let mut nameless = cla(vec![]);
        nameless.cluster_name.clear();
        rejected(nameless, "cluster_name is empty");

        let mut bad_drop = cla(vec![]);
        bad_drop.policy = Some(Policy {
            drop_overloads: vec![policy::DropOverload {
                category: String::new(),
                drop_percentage: None,
            }],
            ..Default::default()
        });
        rejected(bad_drop, "category is empty");
    }

    #[test]
    fn normalise_reduces_to_lowest_terms() {
        assert_eq!(normalise(&[(1, 3), (1, 3), (1, 3)]), vec![1, 1, 1]);
        assert_eq!(normalise(&[(2, 5), (3, 5)]), vec![2, 3]);
        assert_eq!(normalise(&[(1, 2), (1, 3)]), vec![3, 2]);
        assert!(normalise(&[]).is_empty());
    }
}
