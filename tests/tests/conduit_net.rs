//! Conduit plumbing for an application namespace (tapmesh::net): the
//! veth pair with addresses, GRO and MTU, the VIPs with their source routing
//! (proven by pings from a source the application has no route to), removal,
//! and failures that leave nothing behind.

use std::{fs::File, future::Future, net::IpAddr, process::Command};

use tapmesh::net::{link, route, veth, NetError, Prefix};
use tapmesh_tests::{kernel_tests_enabled, unique, Netns};

const TABLE: u32 = 100;
const MTU: u32 = 1400;

fn cidr(s: &str) -> Prefix {
    s.parse().expect("a CIDR")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an address")
}

fn gateways() -> Vec<Prefix> {
    vec![cidr("198.18.0.1/24"), cidr("2001:db8:1::1/64")]
}

fn local() -> Vec<Prefix> {
    vec![cidr("198.18.0.2/24"), cidr("2001:db8:1::2/64")]
}

fn gateway_ips() -> Vec<IpAddr> {
    vec![ip("198.18.0.1"), ip("2001:db8:1::1")]
}

/// A namespace with IPv6 on (the harness switches it off by default).
fn netns_v6(label: &str) -> Netns {
    let ns = Netns::new(label);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"]);
    ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=0"]);
    ns
}

fn open(ns: &Netns) -> File {
    File::open(format!("/run/netns/{}", ns.name)).expect("opening the namespace")
}

/// Runs `future` as the daemon would: on a thread in `node`, on its own runtime.
fn in_node<F>(node: &Netns, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tapmesh::net::netns::enter(&node.name).expect("entering the node namespace");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(future)
        })
        .join()
        .expect("the node thread")
    })
}

/// `ip -n <ns> <args>` output as text (panics when it fails).
fn show(ns: &Netns, args: &[&str]) -> String {
    String::from_utf8_lossy(&ns.ip(args).stdout).into_owned()
}

/// Like [`show`], empty when the command fails (e.g. a table that does not exist).
fn try_show(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", &ns.name])
        .args(args)
        .output()
        .expect("running ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when `ip -n <ns> link show <name>` finds the link.
fn has_link(ns: &Netns, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", &ns.name, "link", "show", name])
        .output()
        .expect("running ip")
        .status
        .success()
}

/// Link names in a namespace.
fn links(ns: &Netns) -> Vec<String> {
    show(ns, &["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// `ping -c1` from `ns` with extra arguments; with `expect` true it tries up
/// to three times (the first may wait for neighbour resolution).
fn ping(ns: &Netns, args: &[&str], expect: bool) -> bool {
    let mut all = vec!["ping", "-c1", "-W1"];
    all.extend_from_slice(args);
    let tries = if expect { 3 } else { 1 };
    (0..tries).any(|_| ns.try_exec(&all).status.success())
}

/// Addresses, rules and table routes of the application namespace.
fn app_state(app: &Netns) -> String {
    let table = TABLE.to_string();
    [
        show(app, &["-o", "addr", "show"]),
        show(app, &["-4", "rule"]),
        show(app, &["-6", "rule"]),
        try_show(app, &["-4", "route", "show", "table", &table]),
        try_show(app, &["-6", "route", "show", "table", &table]),
    ]
    .join("\n")
    // The kernel's own duplicate address detection on the link-local address
    // may finish between two looks; that flag is not ours.
    .replace(" tentative", "")
}

#[test]
fn cidr_parses_and_prints() {
    for s in ["198.18.0.2/24", "2001:db8:1::2/64", "192.0.2.10/32", "::/0"] {
        assert_eq!(cidr(s).to_string(), s);
    }
    assert_eq!(
        cidr("198.18.0.2/24"),
        Prefix {
            addr: ip("198.18.0.2"),
            len: 24
        }
    );
    for bad in [
        "198.18.0.2/33",
        "2001:db8::1/129",
        "198.18.0.2",
        "198.18.0.2/",
        "x/8",
        "198.18.0.2/-1",
        "",
    ] {
        assert!(bad.parse::<Prefix>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn conduit_lifecycle() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = netns_v6("n");
    let app = netns_v6("a");
    let app_ns = open(&app);
    let host = unique("tmh");
    let peer = unique("tmp");
    // create() must bring the application's loopback up.
    app.ip(&["link", "set", "lo", "down"]);

    // 1. The veth pair.
    let link = in_node(
        &node,
        veth::create(&app_ns, &host, &peer, &gateways(), &local(), MTU, None),
    )
    .expect("create");
    assert_eq!(link.host_ifname, host);
    assert_eq!(link.peer_ifname, peer);
    assert_eq!(link.host_ifindex, node.interface_index(&host));
    assert_eq!(link.host_mac, node.mac(&host));
    assert_eq!(link.peer_mac, app.mac(&peer));
    assert!(
        !has_link(&node, &peer),
        "the peer is not in the node namespace"
    );
    assert!(in_node(&node, link::exists(&host)).unwrap());
    assert!(!in_node(&node, link::exists(&peer)).unwrap());

    let node_link = show(&node, &["-o", "link", "show", &host]);
    let app_link = show(&app, &["-o", "link", "show", &peer]);
    for text in [&node_link, &app_link] {
        assert!(text.contains("state UP"), "{text}");
        assert!(text.contains(&format!("mtu {MTU}")), "{text}");
    }
    let lo = show(&app, &["-o", "link", "show", "lo"]);
    assert!(lo.contains(",UP"), "lo is up: {lo}");
    let node_addr = show(&node, &["-o", "addr", "show", "dev", &host]);
    assert!(node_addr.contains("inet 198.18.0.1/24"), "{node_addr}");
    assert!(node_addr.contains("inet6 2001:db8:1::1/64"), "{node_addr}");
    let app_addr = show(&app, &["-o", "addr", "show", "dev", &peer]);
    assert!(app_addr.contains("inet 198.18.0.2/24"), "{app_addr}");
    assert!(app_addr.contains("inet6 2001:db8:1::2/64"), "{app_addr}");
    for text in [&node_addr, &app_addr] {
        let global = text
            .lines()
            .find(|l| l.contains("2001:db8:1::"))
            .unwrap_or("");
        assert!(
            global.contains("nodad") && !global.contains("tentative"),
            "IPv6 usable at once: {global}"
        );
    }
    let features =
        String::from_utf8_lossy(&app.exec(&["ethtool", "-k", &peer]).stdout).into_owned();
    assert!(
        features.contains("generic-receive-offload: on"),
        "GRO on the peer: {features}"
    );
    assert!(ping(&node, &["198.18.0.2"], true), "ping 198.18.0.2");
    assert!(
        ping(&node, &["-6", "2001:db8:1::2"], true),
        "ping 2001:db8:1::2"
    );

    // 2. VIPs. A VIP without a gateway of its family is refused, changing nothing.
    let before = app_state(&app);
    let refused = in_node(
        &node,
        route::set_vips(
            &app_ns,
            &peer,
            &local(),
            &[cidr("2001:db8:ff::10/128")],
            &[ip("198.18.0.1")],
            TABLE,
        ),
    );
    assert!(matches!(refused, Err(NetError::Invalid(_))), "{refused:?}");
    assert_eq!(app_state(&app), before);

    let vips = [cidr("192.0.2.10/32"), cidr("2001:db8:ff::10/128")];
    in_node(
        &node,
        route::set_vips(&app_ns, &peer, &local(), &vips, &gateway_ips(), TABLE),
    )
    .expect("set_vips");
    let addr = show(&app, &["-o", "addr", "show", "dev", &peer]);
    assert!(addr.contains("inet 192.0.2.10/32"), "{addr}");
    assert!(addr.contains("inet6 2001:db8:ff::10/128"), "{addr}");
    for line in addr
        .lines()
        .filter(|l| l.contains("192.0.2.10") || l.contains("ff::10"))
    {
        assert!(line.contains("noprefixroute"), "{line}");
    }
    let rules4 = show(&app, &["-4", "rule"]);
    assert!(
        rules4.contains("100:\tfrom 192.0.2.10 lookup 100"),
        "{rules4}"
    );
    let rules6 = show(&app, &["-6", "rule"]);
    assert!(
        rules6.contains("100:\tfrom 2001:db8:ff::10 lookup 100"),
        "{rules6}"
    );
    let routes4 = show(&app, &["-4", "route", "show", "table", "100"]);
    assert!(routes4.contains("default via 198.18.0.1"), "{routes4}");
    let routes6 = show(&app, &["-6", "route", "show", "table", "100"]);
    assert!(routes6.contains("default via 2001:db8:1::1"), "{routes6}");

    // The node reaches the VIPs; from a source the application has no route
    // to (198.19.0.1, 2001:db8:99::1) only the rule and table 100 bring the
    // reply back, and the same source to a non-VIP address gets none.
    node.ip(&["route", "add", "192.0.2.10/32", "via", "198.18.0.2"]);
    node.ip(&["route", "add", "192.0.2.11/32", "via", "198.18.0.2"]);
    node.ip(&[
        "-6",
        "route",
        "add",
        "2001:db8:ff::10/128",
        "via",
        "2001:db8:1::2",
    ]);
    node.ip(&["addr", "add", "198.19.0.1/32", "dev", "lo"]);
    node.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:99::1/128",
        "dev",
        "lo",
        "nodad",
    ]);
    assert!(ping(&node, &["192.0.2.10"], true), "ping 192.0.2.10");
    assert!(
        ping(&node, &["-I", "198.19.0.1", "192.0.2.10"], true),
        "ping 192.0.2.10 from 198.19.0.1 (source route)"
    );
    assert!(
        ping(
            &node,
            &["-6", "-I", "2001:db8:99::1", "2001:db8:ff::10"],
            true
        ),
        "ping 2001:db8:ff::10 from 2001:db8:99::1 (source route)"
    );
    assert!(
        !ping(&node, &["-I", "198.19.0.1", "198.18.0.2"], false),
        "no reply without a VIP rule"
    );

    // Replacing the VIPs removes the old ones with their rules and IPv6 route.
    let vips = [cidr("192.0.2.11/32")];
    in_node(
        &node,
        route::set_vips(&app_ns, &peer, &local(), &vips, &gateway_ips(), TABLE),
    )
    .expect("set_vips again");
    let addr = show(&app, &["-o", "addr", "show", "dev", &peer]);
    assert!(addr.contains("inet 192.0.2.11/32"), "{addr}");
    assert!(!addr.contains("192.0.2.10"), "{addr}");
    assert!(!addr.contains("2001:db8:ff::10"), "{addr}");
    assert!(addr.contains("inet 198.18.0.2/24"), "local kept: {addr}");
    assert!(
        addr.contains("inet6 2001:db8:1::2/64"),
        "local kept: {addr}"
    );
    assert!(addr.contains("inet6 fe80::"), "link-local kept: {addr}");
    let rules4 = show(&app, &["-4", "rule"]);
    assert!(rules4.contains("from 192.0.2.11 lookup 100"), "{rules4}");
    assert!(!rules4.contains("192.0.2.10"), "{rules4}");
    assert_eq!(rules4.matches("lookup 100").count(), 1, "{rules4}");
    let rules6 = show(&app, &["-6", "rule"]);
    assert!(!rules6.contains("lookup 100"), "{rules6}");
    let routes6 = try_show(&app, &["-6", "route", "show", "table", "100"]);
    assert!(routes6.trim().is_empty(), "{routes6}");
    assert!(
        ping(&node, &["-I", "198.19.0.1", "192.0.2.11"], true),
        "ping 192.0.2.11 from 198.19.0.1"
    );

    // The same call again changes nothing and does not fail.
    let before = app_state(&app);
    in_node(
        &node,
        route::set_vips(&app_ns, &peer, &local(), &vips, &gateway_ips(), TABLE),
    )
    .expect("identical set_vips");
    assert_eq!(app_state(&app), before);

    // 3. Delete: both ends go; deleting again is fine.
    in_node(&node, link::delete(&host)).expect("delete");
    assert!(!has_link(&node, &host));
    assert!(!has_link(&app, &peer));
    assert!(!in_node(&node, link::exists(&host)).unwrap());
    in_node(&node, link::delete(&host)).expect("a second delete");
}

#[test]
fn failed_create_leaves_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let node = netns_v6("n");
    let app = netns_v6("a");
    let app_ns = open(&app);

    // The host name is taken in the node namespace.
    let taken = unique("tmd");
    node.ip(&[
        "link",
        "add",
        &taken,
        "type",
        "veth",
        "peer",
        "name",
        &unique("tmd"),
    ]);
    let peer = unique("tmp");
    let (node_before, app_before) = (links(&node), links(&app));
    let err = in_node(
        &node,
        veth::create(&app_ns, &taken, &peer, &gateways(), &local(), MTU, None),
    )
    .expect_err("a taken host name");
    eprintln!("taken host name: {err}");
    assert!(err.to_string().contains(&taken), "{err}");
    assert_eq!(links(&node), node_before);
    assert_eq!(links(&app), app_before);

    // The peer name is taken in the application namespace.
    let host = unique("tmh");
    let taken_peer = unique("tmq");
    app.ip(&[
        "link",
        "add",
        &taken_peer,
        "type",
        "veth",
        "peer",
        "name",
        &unique("tmq"),
    ]);
    let (node_before, app_before) = (links(&node), links(&app));
    let err = in_node(
        &node,
        veth::create(
            &app_ns,
            &host,
            &taken_peer,
            &gateways(),
            &local(),
            MTU,
            None,
        ),
    )
    .expect_err("a taken peer name");
    eprintln!("taken peer name: {err}");
    assert_eq!(links(&node), node_before);
    assert_eq!(links(&app), app_before);

    // A failure after the pair exists (IPv6 is off in this application
    // namespace, so its IPv6 address is refused): the pair is deleted again.
    let app_v4 = Netns::new("b");
    let app_v4_ns = open(&app_v4);
    let (node_before, app_before) = (links(&node), links(&app_v4));
    let err = in_node(
        &node,
        veth::create(&app_v4_ns, &host, &peer, &gateways(), &local(), MTU, None),
    )
    .expect_err("IPv6 refused in the application namespace");
    eprintln!("IPv6 refused: {err}");
    assert!(err.to_string().contains("2001:db8:1::2/64"), "{err}");
    assert_eq!(links(&node), node_before);
    assert_eq!(links(&app_v4), app_before);
    assert!(!in_node(&node, link::exists(&host)).unwrap());
}
