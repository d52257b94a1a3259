//! The network module against the kernel: the LB's next hops follow the
//! kernel's notifications (no polling), one neighbour rule for the catalog
//! and the LB, and nftables tables written and read back through netlink.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use tapmesh::{
    lb::model::{LbSpec, TargetSpec, TargetVia},
    net::{
        neigh::{OnLinkCache, Resolver, Unresolved},
        nft,
    },
    overlay::ports::{self, PortMapping, Protocol},
};
use tapmesh_common::lb::Target;
use tapmesh_tests::{
    daemon::Daemon,
    eds::{backend, backends_netns},
    fmt_mac, kernel_tests_enabled, link,
    net::{lb_toml, one_target_spec},
    unique, Netns,
};

/// Runs `f` on a thread inside namespace `netns`.
fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            tapmesh::net::netns::enter(&netns.name).expect("entering the namespace");
            f()
        })
        .join()
        .expect("the namespace thread")
    })
}

/// `tm_targets[0]` of a daemon: (ifindex, dst_mac, src_mac).
fn hop(daemon: &Daemon) -> (u32, [u8; 6], [u8; 6]) {
    let path = daemon
        .bpffs_root
        .join(format!("v{}/tm_targets", tapmesh_common::SCHEMA_VERSION));
    let map = MapData::from_pin(&path).expect("the pinned targets map");
    let targets: Array<MapData, Target> = Array::try_from(Map::Array(map)).expect("an array");
    let t = targets.get(&0, 0).expect("target 0");
    (t.ifindex, t.dst_mac, t.src_mac)
}

/// The `lb` plugin's status line.
fn lb_status(daemon: &Daemon) -> String {
    daemon
        .status()
        .plugins
        .into_iter()
        .find(|p| p.name == "lb")
        .map(|p| p.detail)
        .unwrap_or_default()
}

/// How often the daemon resolved the next hops so far.
fn resolutions(daemon: &Daemon) -> u64 {
    let line = lb_status(daemon);
    line.split('(')
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resolution count in {line:?}"))
}

/// Waits until the hop is `want`; returns how long that took.
fn until_hop(daemon: &Daemon, want: (u32, [u8; 6], [u8; 6]), what: &str) -> Duration {
    let start = Instant::now();
    while hop(daemon) != want {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what}: the hop is {:?}, not {want:?}, after 1 s\n{}",
            hop(daemon),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

#[test]
fn next_hops_follow_neighbours_and_routes_without_polling() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = Netns::new("hn");
    let remote = Netns::new("hr");
    let other = Netns::new("ho");
    // No IPv6 on the node's links: duplicate address detection ends with an
    // address change a second or more after a link is up (later on a busy
    // machine), which the daemon rightly follows, inside the quiet window
    // below.
    node.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    let (up, remote_end) = link(&node, "198.18.40.1/24", &remote, "198.18.40.2/24");
    let (up2, other_end) = link(&node, "198.18.41.1/24", &other, "198.18.41.2/24");
    // The remote node's neighbour starts unknown: the daemon must have it resolved.
    node.ip(&["neigh", "del", "198.18.40.2", "dev", &up.interface]);

    let dir = std::env::temp_dir().join(unique("tmhops"));
    std::fs::create_dir_all(&dir).unwrap();
    let lb = dir.join("lb.toml");
    let via = TargetVia::Remote {
        node: "198.18.40.2".into(),
    };
    let spec = one_target_spec("203.0.113.40", "s", 1, &[], via);
    std::fs::write(&lb, lb_toml(&spec)).unwrap();
    let daemon = Daemon::start(
        &node.name,
        &[
            "--uplink",
            &up.interface,
            "--node-address",
            "198.18.40.1",
            "--lb-config",
            lb.to_str().unwrap(),
        ],
    );
    let up_index = node.interface_index(&up.interface);
    let up2_index = node.interface_index(&up2.interface);
    let up_mac = node.mac(&up.interface);
    let up2_mac = node.mac(&up2.interface);
    let mut took = Vec::new();

    // 1. The daemon adds a managed entry, the kernel resolves it by ARP with
    //    the real remote node, and the hop follows.
    let start = Instant::now();
    until_hop(
        &daemon,
        (up_index, remote.mac(&remote_end.interface), up_mac),
        "resolved by ARP",
    );
    eprintln!("first hop after {:?}", start.elapsed());
    let entry = String::from_utf8_lossy(
        &node
            .ip(&["-d", "neigh", "show", "198.18.40.2", "dev", &up.interface])
            .stdout,
    )
    .to_string();
    assert!(entry.contains("managed"), "{entry}");

    // 2. The neighbour's MAC changes.
    let m1 = [2, 0, 0, 0, 0x40, 1];
    node.ip(&[
        "neigh",
        "replace",
        "198.18.40.2",
        "lladdr",
        &fmt_mac(m1),
        "dev",
        &up.interface,
        "nud",
        "permanent",
    ]);
    took.push(until_hop(&daemon, (up_index, m1, up_mac), "new MAC"));

    // Nothing changes for 3 s: the daemon does not resolve again (no polling).
    let before = resolutions(&daemon);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(resolutions(&daemon), before, "{}", lb_status(&daemon));
    assert_eq!(hop(&daemon), (up_index, m1, up_mac));

    // 3. A route through the other link, via a gateway.
    node.ip(&["route", "add", "198.18.40.2/32", "via", "198.18.41.2"]);
    let via = (up2_index, other.mac(&other_end.interface), up2_mac);
    took.push(until_hop(&daemon, via, "a route via a gateway"));
    node.ip(&["route", "del", "198.18.40.2/32"]);
    took.push(until_hop(
        &daemon,
        (up_index, m1, up_mac),
        "the route removed",
    ));

    // 4. A NOARP entry counts (the one neighbour rule).
    let m3 = [2, 0, 0, 0, 0x40, 3];
    node.ip(&[
        "neigh",
        "replace",
        "198.18.40.2",
        "lladdr",
        &fmt_mac(m3),
        "dev",
        &up.interface,
        "nud",
        "noarp",
    ]);
    took.push(until_hop(&daemon, (up_index, m3, up_mac), "a NOARP entry"));

    // 5. The egress link's MAC changes: the kernel flushes the link's
    //    neighbours with it, the daemon adds a managed entry again, ARP
    //    resolves the real remote node, and the hop has both new MACs.
    let m4 = [2, 0, 0, 0, 0x40, 4];
    node.ip(&["link", "set", &up.interface, "address", &fmt_mac(m4)]);
    let resolved = (up_index, remote.mac(&remote_end.interface), m4);
    took.push(until_hop(&daemon, resolved, "our MAC"));

    eprintln!("the hop followed each change within {took:?}");
    assert!(
        lb_status(&daemon).contains("next hops of 1/1 remote nodes"),
        "{}",
        lb_status(&daemon)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_neighbour_rule_for_the_catalog_and_the_lb() {
    if !kernel_tests_enabled() {
        return;
    }
    let ns = Netns::new("nr");
    ns.ip(&["link", "add", "tna", "type", "veth", "peer", "name", "tnb"]);
    ns.ip(&["addr", "add", "198.18.50.1/24", "dev", "tna"]);
    ns.ip(&["link", "set", "tna", "up"]);
    ns.ip(&["link", "set", "tnb", "up"]);
    let mac = [2, 0, 0, 0, 0x50, 1];
    let states = [
        (11, "permanent", true),
        (12, "noarp", true),
        (13, "stale", true),
        (14, "reachable", true),
        (15, "incomplete", false),
        (16, "failed", false),
        (17, "none", false),
    ];
    for (host, state, _) in states {
        ns.ip(&[
            "neigh",
            "replace",
            &format!("198.18.50.{host}"),
            "lladdr",
            &fmt_mac(mac),
            "dev",
            "tna",
            "nud",
            state,
        ]);
    }
    let address = |host: u8| IpAddr::V4(Ipv4Addr::new(198, 18, 50, host));
    let mut hosts: Vec<u8> = states.iter().map(|(h, _, _)| *h).collect();
    hosts.push(20); // no entry at all
    let addresses: Vec<IpAddr> = hosts.iter().map(|&h| address(h)).collect();
    let index = ns.interface_index("tna");

    let (on_link, hops, catalog) = in_netns(&ns, || {
        let mut resolver = Resolver::new().expect("a resolver");
        let on_link = resolver.on_link(&addresses).expect("on-link");
        let hops = resolver.next_hops(&addresses).expect("next hops");
        // The catalog's path: backend placeholders become local targets.
        let mut spec = LbSpec {
            targets: hosts
                .iter()
                .map(|&h| TargetSpec {
                    stream: "s".into(),
                    identifier: u32::from(h),
                    via: TargetVia::Remote {
                        node: address(h).to_string(),
                    },
                })
                .collect(),
            ..Default::default()
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(tapmesh::catalog::resolve::targets(&mut spec, &[]));
        (on_link, hops, spec.targets)
    });

    for (i, (host, state, usable)) in states.iter().enumerate() {
        let want = usable.then_some(("tna".to_string(), mac));
        assert_eq!(on_link[i].clone().ok(), want, "catalog rule, {state}");
        match &hops[i] {
            Ok((hop, neighbour)) => {
                assert!(usable, "LB took a {state} neighbour");
                assert_eq!(
                    (hop.ifindex, hop.dst_mac, *neighbour),
                    (index, mac, address(*host))
                );
            }
            Err(Unresolved::Waiting { state: s, .. }) => {
                assert!(!usable, "LB refused a {state} neighbour ({s:#x})")
            }
            Err(e) => panic!("{state}: {e}"),
        }
    }
    assert!(matches!(
        hops[states.len()],
        Err(Unresolved::NoEntry { ifindex, address: a }) if ifindex == index && a == address(20)
    ));
    assert!(on_link[states.len()].is_err());
    let local: Vec<u32> = catalog
        .iter()
        .map(|t| {
            assert_eq!(
                t.via,
                TargetVia::Local {
                    interface: "tna".into(),
                    mac: fmt_mac(mac)
                }
            );
            t.identifier
        })
        .collect();
    assert_eq!(local, [11, 12, 13, 14], "the catalog keeps the usable ones");
}

#[test]
fn kept_resolutions_follow_neighbour_and_route_changes() {
    if !kernel_tests_enabled() {
        return;
    }
    let ns = Netns::new("nk");
    ns.ip(&["link", "add", "tka", "type", "veth", "peer", "name", "tkb"]);
    ns.ip(&["addr", "add", "198.18.60.1/24", "dev", "tka"]);
    ns.ip(&["link", "set", "tka", "up"]);
    ns.ip(&["link", "set", "tkb", "up"]);
    let mac = |last: u8| [2, 0, 0, 0, 0x60, last];
    let neigh = |host: u8, lladdr: [u8; 6], nud: &str| {
        ns.ip(&[
            "neigh",
            "replace",
            &format!("198.18.60.{host}"),
            "lladdr",
            &fmt_mac(lladdr),
            "dev",
            "tka",
            "nud",
            nud,
        ])
    };
    for host in 10..20 {
        neigh(host, mac(host), "permanent");
    }
    let address = |host: u8| IpAddr::V4(Ipv4Addr::new(198, 18, 60, host));
    let ten: Vec<IpAddr> = (10..20).map(address).collect();
    let resolved = |host: u8| Some(mac(host));
    in_netns(&ns, || {
        tapmesh::net::neigh_table::keep().expect("keeping the neighbour table");
        let mut cache = OnLinkCache::default();
        // Each address's MAC (none: not a local target) and how many were asked.
        let mut call = |addresses: &[IpAddr]| {
            let got = Resolver::new()
                .and_then(|mut r| r.on_link_cached(addresses, &mut cache))
                .expect("on-link");
            let macs: Vec<Option<[u8; 6]>> =
                got.into_iter().map(|r| r.ok().map(|(_, m)| m)).collect();
            (macs, cache.asked())
        };
        let all: Vec<_> = (10..20).map(resolved).collect();
        assert_eq!(call(&ten), (all.clone(), 10), "first: every address asked");
        assert_eq!(call(&ten), (all.clone(), 0), "nothing changed: none asked");
        let mut eleven = ten.clone();
        eleven.push(address(30));
        let mut with_missing = all.clone();
        with_missing.push(None);
        assert_eq!(call(&eleven), (with_missing.clone(), 1), "only the new one");
        assert_eq!(call(&eleven), (with_missing, 1), "a miss is asked again");

        // A state change that keeps the MAC usable keeps what was resolved.
        neigh(12, mac(12), "stale");
        assert_eq!(call(&ten), (all.clone(), 0), "stale keeps its MAC");
        // A new MAC, a neighbour gone, an address routed elsewhere: each is
        // seen at the next call.
        neigh(13, mac(99), "permanent");
        let mut changed = all.clone();
        changed[3] = Some(mac(99));
        assert_eq!(call(&ten), (changed.clone(), 10), "the new MAC");
        ns.ip(&["neigh", "del", "198.18.60.14", "dev", "tka"]);
        changed[4] = None;
        assert_eq!(call(&ten), (changed.clone(), 10), "the neighbour gone");
        ns.ip(&["route", "add", "198.18.60.15/32", "via", "198.18.60.10"]);
        changed[5] = None;
        assert_eq!(call(&ten), (changed.clone(), 10), "a gateway's now");
        assert_eq!(
            call(&ten),
            (changed, 2),
            "and kept again, but the two misses"
        );
    });
}

fn mapping(protocol: Protocol, host_port: u16, container_port: u16) -> PortMapping {
    PortMapping {
        protocol,
        host_port,
        container_port,
    }
}

#[test]
fn port_mappings_are_one_nftables_table_read_back_through_netlink() {
    if !kernel_tests_enabled() {
        return;
    }
    use nft::Expr::*;
    let ns = Netns::new("nf");
    let a = Ipv4Addr::new(192, 0, 2, 2);
    let b = Ipv4Addr::new(192, 0, 2, 3);
    let mappings = [
        (a, mapping(Protocol::Udp, 8080, 7000)),
        (b, mapping(Protocol::Tcp, 8081, 7001)),
    ];
    let rule = |l4: u8, port: u16, addr: Ipv4Addr, to: u16| {
        vec![
            Fib {
                flags: 2,
                result: 3,
                dreg: 1,
            },
            Cmp {
                sreg: 1,
                op: 0,
                data: 2u32.to_ne_bytes().to_vec(),
            },
            Meta { key: 16, dreg: 1 },
            Cmp {
                sreg: 1,
                op: 0,
                data: vec![l4],
            },
            Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: 1,
            },
            Cmp {
                sreg: 1,
                op: 0,
                data: port.to_be_bytes().to_vec(),
            },
            Immediate {
                dreg: 1,
                data: addr.octets().to_vec(),
            },
            Immediate {
                dreg: 2,
                data: to.to_be_bytes().to_vec(),
            },
            // DNAT, IPv4, address and port registers (the kernel adds the
            // max registers equal to the min ones, and the range flags).
            Nat {
                attributes: vec![(1, 1), (2, 2), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3)],
            },
        ]
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };

    in_netns(&ns, || {
        assert_eq!(nft::read(ports::TABLE).unwrap(), None, "no table at first");
        runtime()
            .block_on(ports::apply(&mappings))
            .expect("written");
        let chains = nft::read(ports::TABLE).unwrap().expect("the table");
        assert_eq!(chains.len(), 2);
        let rules = vec![rule(17, 8080, a, 7000), rule(6, 8081, b, 7001)];
        for (chain, hook) in [("prerouting", 0), ("output", 3)] {
            let c = chains.iter().find(|c| c.name == chain).expect(chain);
            assert_eq!(
                (c.hook, c.priority, c.kind.as_str(), c.policy),
                (Some(hook), Some(-100), "nat", Some(1)),
                "{chain}"
            );
            assert_eq!(c.rules, rules, "{chain}");
        }

        // A refused transaction changes nothing: a chain name the kernel
        // does not take makes the whole table write fail.
        let mut bad = ports::table(&mappings[..1]);
        bad.chains[0].name = "x".repeat(300);
        let e = nft::write(&bad).expect_err("a 300-byte chain name");
        assert!(e.to_string().contains("creating chain"), "{e}");
        let again = nft::read(ports::TABLE).unwrap().expect("the table");
        assert_eq!(again, chains, "the table as it was");

        // One mapping less: the table is rewritten whole.
        runtime()
            .block_on(ports::apply(&mappings[1..]))
            .expect("written");
        let chains = nft::read(ports::TABLE).unwrap().expect("the table");
        assert!(chains.iter().all(|c| c.rules == [rule(6, 8081, b, 7001)]));

        // None: the table goes.
        runtime().block_on(ports::apply(&[])).expect("written");
        assert_eq!(nft::read(ports::TABLE).unwrap(), None);
    });
}

/// The daemon's kept neighbour table (`net::neigh_table`) answers as a dump
/// would: an entry added, changed or removed just before a lookup is seen,
/// and after the notification queue overflowed (12 000 entries added at
/// once) a new dump makes the table whole again.
#[test]
fn the_kept_neighbour_table_sees_every_change_before_a_lookup() {
    if !kernel_tests_enabled() {
        return;
    }
    let ns = backends_netns("kn", 0);
    let a = IpAddr::V4(backend(1));
    let (m1, m2) = ([2, 0, 0, 0, 0x61, 1], [2, 0, 0, 0, 0x61, 2]);
    let neigh = |verb: &str, mac: Option<[u8; 6]>| {
        let mut args = vec!["neigh".to_string(), verb.into(), a.to_string()];
        if let Some(m) = mac {
            args.extend([
                "lladdr".into(),
                fmt_mac(m),
                "nud".into(),
                "permanent".into(),
            ]);
        }
        args.extend(["dev".into(), "eb0".into()]);
        ns.ip(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    const MANY: usize = 12_000;
    let batch = std::env::temp_dir().join(unique("tmknbatch"));
    let lines: String = (0..MANY)
        .map(|i| {
            format!(
                "neigh replace {} lladdr 02:00:00:01:{:02x}:{:02x} dev eb0 nud permanent\n",
                backend(i),
                (i >> 8) & 0xff,
                i & 0xff
            )
        })
        .collect();
    std::fs::write(&batch, lines).unwrap();
    let batch_arg = batch.display().to_string();
    let all: Vec<IpAddr> = (0..MANY).map(|i| IpAddr::V4(backend(i))).collect();

    let (steps, many) = in_netns(&ns, || {
        tapmesh::net::neigh_table::keep().expect("keeping the neighbour table");
        let mut resolver = Resolver::new().expect("a resolver");
        let mut look = |addresses: &[IpAddr]| resolver.on_link(addresses).expect("on-link");
        let mut steps = vec![look(&[a])[0].clone()];
        neigh("replace", Some(m1));
        steps.push(look(&[a])[0].clone());
        neigh("replace", Some(m2));
        steps.push(look(&[a])[0].clone());
        neigh("del", None);
        steps.push(look(&[a])[0].clone());
        let redumps = tapmesh::net::neigh_table::redumps();
        ns.ip(&["-batch", &batch_arg]);
        let many = look(&all);
        assert!(
            tapmesh::net::neigh_table::redumps() > redumps,
            "12 000 notifications fit the socket: the overflow path was not taken"
        );
        (steps, many)
    });
    let _ = std::fs::remove_file(&batch);
    assert!(steps[0].is_err(), "{steps:?}");
    assert_eq!(steps[1], Ok(("eb0".to_string(), m1)));
    assert_eq!(steps[2], Ok(("eb0".to_string(), m2)));
    assert!(steps[3].is_err(), "{steps:?}");
    for (i, found) in many.iter().enumerate() {
        let mac = [2, 0, 0, 1, (i >> 8) as u8, i as u8];
        assert_eq!(found, &Ok(("eb0".to_string(), mac)), "backend {i}");
    }
}
