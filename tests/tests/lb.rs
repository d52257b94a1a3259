//! VIP load balancing with real traffic: a client namespace sends to a VIP
//! through the node's XDP uplink, which classifies each packet into a flow,
//! picks the flow's stream target by Maglev and redirects it to a target
//! namespace (local targets). Every packet is accounted for: what each target
//! received, the per-VIP/flow/target counters and the xdp_uplink verdicts.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use tapmesh::{
    admin::proto::StatusResponse,
    lb::{flows::FlowSpec, model::LbSpec},
};
use tapmesh_tests::{
    daemon::{named, packets},
    frames::{ethernet, ipv4, udp_v4, ICMP, UDP},
    kernel_tests_enabled,
    net::{
        flow, icmp_frag_needed, lb_bytes, lb_packets, send_udp_flows, stream, tcp_echo, vip,
        wait_until, IcmpReceiver, LbLab, Received, TcpEchoServer, UdpReceiver, CLIENT,
    },
    send_frames,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 7000;
const DST: SocketAddrV4 = SocketAddrV4::new(VIP, PORT);

/// Sum of what the receivers counted so far.
fn received(receivers: &[UdpReceiver]) -> u64 {
    receivers.iter().map(UdpReceiver::count).sum()
}

/// Waits (at most 30 s) until the receivers counted `n` datagrams in all.
fn wait_received(receivers: &[UdpReceiver], n: u64) {
    let ok = wait_until(Duration::from_secs(30), || received(receivers) >= n);
    assert!(ok, "receivers got {} of {n} datagrams", received(receivers));
}

/// Source port -> index of the one target that got its datagrams, checking
/// that each flow went to exactly one target and that it got `per_flow` datagrams there.
fn flow_map(got: &[Received], per_flow: u64) -> HashMap<u16, usize> {
    let mut map = HashMap::new();
    for (i, r) in got.iter().enumerate() {
        for (port, n) in r.by_port() {
            assert_eq!(
                n,
                per_flow,
                "flow from port {port}: {n} datagrams on target {}, want {per_flow}",
                i + 1
            );
            if let Some(other) = map.insert(port, i) {
                panic!(
                    "flow from port {port} landed on targets {} and {}",
                    other + 1,
                    i + 1
                );
            }
        }
    }
    map
}

/// Flows per target index.
fn shares(map: &HashMap<u16, usize>, targets: usize) -> Vec<usize> {
    let mut n = vec![0; targets];
    for &t in map.values() {
        n[t] += 1;
    }
    n
}

/// Three targets behind VIP, the daemon started with one stream `s` of
/// `max_targets` over them (identifiers 1 to 3) and one flow `all` of
/// `protocols`; and a UDP receiver on DST in each target.
fn three_targets(max_targets: u32, protocols: &[&str]) -> (LbLab, Vec<UdpReceiver>) {
    let mut lab = LbLab::new(3, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("s", max_targets)],
        flows: vec![flow("all", &["vip"], "s", protocols)],
        targets: lab
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| t.local("s", i as u32 + 1))
            .collect(),
    };
    lab.start(Some(&spec));
    let receivers = lab
        .targets
        .iter()
        .map(|t| UdpReceiver::start(&t.netns.name, DST))
        .collect();
    (lab, receivers)
}

/// Sends `n` datagrams on one flow (source port `port`) to `to`, all of
/// which xdp_uplink must drop as `reason`; returns the status saying so.
fn dropped_as(
    lab: &LbLab,
    reason: &str,
    port: u16,
    to: SocketAddrV4,
    n: u32,
    payload: &[u8],
) -> StatusResponse {
    send_udp_flows(&lab.client.name, CLIENT, &[port], to, n, payload);
    let s = lab
        .daemon()
        .status_when(|s| named(s, "xdp_uplink", reason) >= u64::from(n));
    assert_eq!(named(&s, "xdp_uplink", reason), u64::from(n), "{s:#?}");
    s
}

#[test]
fn udp_and_tcp_flows_spread_over_three_targets() {
    if !kernel_tests_enabled() {
        return;
    }
    let began = Instant::now();
    let (lab, receivers) = three_targets(10, &["tcp", "udp"]);
    let daemon = lab.daemon();
    let s = daemon.status();
    assert_eq!(s.attachments[0].mode, "native", "{:?}", s.attachments);
    let names: Vec<_> = s.targets.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["s/1", "s/2", "s/3"]);

    // 3000 UDP flows (distinct source ports), 2 datagrams each.
    let ports: Vec<u16> = (20_000..23_000).collect();
    let payload = [0x5a; 32];
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 2, &payload);
    assert_eq!(sent, 6000);
    wait_received(&receivers, sent);
    let got: Vec<Received> = receivers.into_iter().map(UdpReceiver::stop).collect();
    let total: u64 = got.iter().map(Received::total).sum();
    assert_eq!(total, sent, "every datagram arrives once");
    let map = flow_map(&got, 2);
    assert_eq!(map.len(), ports.len(), "every flow arrived");
    let share = shares(&map, 3);
    let percent: Vec<String> = share
        .iter()
        .map(|&n| format!("{:.1} %", 100.0 * n as f64 / ports.len() as f64))
        .collect();
    eprintln!(
        "UDP flows per target: {share:?} of {} ({})",
        ports.len(),
        percent.join(" / ")
    );
    for (i, &n) in share.iter().enumerate() {
        let fraction = n as f64 / ports.len() as f64;
        assert!(
            (fraction - 1.0 / 3.0).abs() <= 0.15 / 3.0,
            "target {} got {n} flows ({fraction:.3}), want 1/3 ± 15 %",
            i + 1
        );
    }

    // The counters agree with the receivers, packet for packet.
    let frame_len = (14 + 20 + 8 + payload.len()) as u64;
    let s = daemon.status_when(|s| s.targets.iter().map(|c| c.packets).sum::<u64>() >= sent);
    assert_eq!(
        s.targets.iter().map(|c| c.packets).sum::<u64>(),
        sent,
        "target counters add up to what was sent"
    );
    for (i, r) in got.iter().enumerate() {
        let name = format!("s/{}", i + 1);
        assert_eq!(
            lb_packets(&s.targets, &name),
            r.total(),
            "{name} counter vs what target {} received",
            i + 1
        );
        assert_eq!(
            lb_bytes(&s.targets, &name),
            r.total() * frame_len,
            "{name} bytes"
        );
    }
    assert_eq!(lb_packets(&s.vips, "vip"), sent);
    assert_eq!(lb_bytes(&s.vips, "vip"), sent * frame_len);
    assert_eq!(lb_packets(&s.flows, "all"), sent);
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), sent);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 0);
    assert_eq!(packets(&s, "xdp_uplink", "pass"), 0);

    // 30 TCP connections to the VIP, each echoed end to end by one target.
    let servers: Vec<_> = lab
        .targets
        .iter()
        .map(|t| TcpEchoServer::start(&t.netns.name, DST))
        .collect();
    let messages: Vec<Vec<u8>> = (0..30)
        .map(|i| format!("hello from connection {i}").repeat(20).into_bytes())
        .collect();
    let answers = tcp_echo(&lab.client.name, DST, &messages);
    for (i, (m, a)) in messages.iter().zip(&answers).enumerate() {
        match a {
            Ok(back) => assert_eq!(back, m, "connection {i}: wrong echo"),
            Err(e) => panic!("connection {i}: {e}"),
        }
    }
    assert!(wait_until(Duration::from_secs(30), || servers
        .iter()
        .map(TcpEchoServer::echoed)
        .sum::<u64>()
        == 30));
    let per_target: Vec<u64> = servers.iter().map(TcpEchoServer::echoed).collect();
    eprintln!("TCP connections per target: {per_target:?}");
    assert_eq!(per_target.iter().sum::<u64>(), 30);
    // Counters are read one map after the other: wait for a quiet moment where they agree.
    let s =
        daemon.status_when(|s| lb_packets(&s.flows, "all") == packets(s, "xdp_uplink", "redirect"));
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 0, "{s:#?}");
    assert_eq!(
        packets(&s, "xdp_uplink", "pass"),
        0,
        "every client packet is for the VIP"
    );
    assert_eq!(
        lb_packets(&s.flows, "all"),
        packets(&s, "xdp_uplink", "redirect"),
        "every TCP packet was redirected"
    );
    assert_eq!(
        lb_packets(&s.targets, "s/1")
            + lb_packets(&s.targets, "s/2")
            + lb_packets(&s.targets, "s/3"),
        lb_packets(&s.flows, "all")
    );
    eprintln!("run time {:.1} s", began.elapsed().as_secs_f64());
}

/// A client that leaves its checksums to its veth (CHECKSUM_PARTIAL, a
/// veth's default) gets its datagrams and connections through: the uplink
/// detours frames whose checksum holds only the pseudo header's sum (an XDP
/// redirect would drop the skb's note that it is unfinished, and the
/// target's stack would drop them as UdpInCsumErrors), and only those.
#[test]
fn a_veth_clients_offloaded_checksums_reach_local_targets() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, receivers) = three_targets(3, &["tcp", "udp"]);
    lab.client
        .exec(&["ethtool", "-K", &lab.client_if, "tx", "on"]);
    // 50 flows per payload length: empty, odd, around the 256-byte blocks
    // the TC side would sum in, and near the MTU.
    let mut sent = 0;
    for (k, len) in [0usize, 1, 7, 255, 256, 257, 1000, 1472]
        .into_iter()
        .enumerate()
    {
        let first = 30_000 + 100 * k as u16;
        let ports: Vec<u16> = (first..first + 50).collect();
        sent += send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 1, &vec![0xa5; len]);
    }
    wait_received(&receivers, sent);
    let daemon = lab.daemon();
    let s = daemon.status_when(|s| packets(s, "xdp_uplink", "pass") >= sent);
    assert_eq!(packets(&s, "xdp_uplink", "pass"), sent, "all detoured");
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), 0);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 0);

    // TCP: every segment's checksum is unfinished too.
    let _servers: Vec<_> = lab
        .targets
        .iter()
        .map(|t| TcpEchoServer::start(&t.netns.name, DST))
        .collect();
    let messages: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            format!("offloaded {i:>3} ")
                .repeat(1 + 300 * i)
                .into_bytes()
        })
        .collect();
    for (i, (m, a)) in messages
        .iter()
        .zip(tcp_echo(&lab.client.name, DST, &messages))
        .enumerate()
    {
        assert_eq!(a.as_ref(), Ok(m), "connection {i}");
    }

    // A complete checksum keeps the plain redirect. The connections' last
    // segments may still cross: counted from a quiet moment.
    lab.client
        .exec(&["ethtool", "-K", &lab.client_if, "tx", "off"]);
    let mut last = u64::MAX;
    let before = loop {
        std::thread::sleep(Duration::from_millis(300));
        let s = daemon.status();
        let now = packets(&s, "xdp_uplink", "pass") + packets(&s, "xdp_uplink", "redirect");
        if now == last {
            break s;
        }
        last = now;
    };
    let ports: Vec<u16> = (40_000..40_100).collect();
    let plain = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 1, &[0x5a; 100]);
    wait_received(&receivers, sent + plain);
    let redirected = packets(&before, "xdp_uplink", "redirect") + plain;
    let s = daemon.status_when(|s| packets(s, "xdp_uplink", "redirect") >= redirected);
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), redirected);
    assert_eq!(
        packets(&s, "xdp_uplink", "pass"),
        packets(&before, "xdp_uplink", "pass"),
        "no detour"
    );
    assert_eq!(received(&receivers), sent + plain);
}

/// Datagrams on one flow and where they must go.
struct Case {
    src: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &'static [u8],
    datagrams: u64,
    /// Index of the target that must receive them.
    target: usize,
    /// The flow that must classify them.
    flow: &'static str,
}

#[test]
fn priority_ports_sources_and_byte_matches_choose_the_flow() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(3, &[VIP]);
    let other_client = Ipv4Addr::new(198, 18, 0, 3);
    lab.add_client_address(other_client);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // Streams a, b, c: one target each (targets 1, 2, 3).
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("a", 2), stream("b", 2), stream("c", 2)],
        flows: vec![
            FlowSpec {
                priority: 100,
                destination_port_ranges: s(&["5000-5009"]),
                ..flow("b-ports", &["vip"], "b", &["udp"])
            },
            FlowSpec {
                priority: 60,
                byte_matches: s(&["udp[8:4] = 0x54415031"]),
                ..flow("b-bytes", &["vip"], "b", &["udp"])
            },
            FlowSpec {
                priority: 50,
                source_subnets: s(&["198.18.0.3/32"]),
                ..flow("c-source", &["vip"], "c", &["udp"])
            },
            FlowSpec {
                priority: 1,
                ..flow("a-any", &["vip"], "a", &["udp"])
            },
        ],
        targets: vec![
            lab.targets[0].local("a", 1),
            lab.targets[1].local("b", 1),
            lab.targets[2].local("c", 1),
        ],
    };
    lab.start(Some(&spec));
    let daemon = lab.daemon();

    let dports = [5005u16, 5010, 6000];
    // receivers[target][dport index]
    let receivers: Vec<Vec<UdpReceiver>> = lab
        .targets
        .iter()
        .map(|t| {
            dports
                .iter()
                .map(|&p| UdpReceiver::start(&t.netns.name, SocketAddrV4::new(VIP, p)))
                .collect()
        })
        .collect();

    let case = |src, sport, dport, payload: &'static [u8], datagrams, target, flow| Case {
        src,
        sport,
        dport,
        payload,
        datagrams,
        target,
        flow,
    };
    let cases = [
        case(CLIENT, 40_001, 5005, b"hello", 3, 1, "b-ports"),
        case(CLIENT, 40_002, 6000, b"hello", 4, 0, "a-any"),
        case(other_client, 40_003, 6000, b"hello", 5, 2, "c-source"),
        case(CLIENT, 40_004, 6000, b"TAP1 hello", 6, 1, "b-bytes"),
        // The byte match fails: the next flow by priority that matches.
        case(CLIENT, 40_005, 6000, b"TAP2 hello", 7, 0, "a-any"),
        // Both b-ports (100) and c-source (50) match: the higher priority wins.
        case(other_client, 40_006, 5005, b"hello", 2, 1, "b-ports"),
        // Both b-bytes (60) and c-source (50) match.
        case(other_client, 40_007, 6000, b"TAP1", 1, 1, "b-bytes"),
        // Just outside 5000-5009.
        case(CLIENT, 40_008, 5010, b"hello", 3, 0, "a-any"),
    ];
    let mut sent = 0;
    for c in &cases {
        sent += send_udp_flows(
            &lab.client.name,
            c.src,
            &[c.sport],
            SocketAddrV4::new(VIP, c.dport),
            c.datagrams as u32,
            c.payload,
        );
    }
    let all: Vec<UdpReceiver> = receivers.into_iter().flatten().collect();
    wait_received(&all, sent);
    let got: Vec<Received> = all.into_iter().map(UdpReceiver::stop).collect();
    let got = |target: usize, dport: u16| {
        &got[target * dports.len() + dports.iter().position(|&p| p == dport).unwrap()]
    };

    let mut flow_want: HashMap<&str, u64> = HashMap::new();
    let mut target_want = [0u64; 3];
    for c in &cases {
        let from = SocketAddrV4::new(c.src, c.sport);
        for t in 0..3 {
            let want = if t == c.target { c.datagrams } else { 0 };
            let payload = String::from_utf8_lossy(c.payload);
            assert_eq!(
                got(t, c.dport).of(from),
                want,
                "{from} -> :{} {payload:?}: target {} ({})",
                c.dport,
                t + 1,
                c.flow
            );
        }
        *flow_want.entry(c.flow).or_default() += c.datagrams;
        target_want[c.target] += c.datagrams;
    }
    for (t, &want) in target_want.iter().enumerate() {
        let total: u64 = dports.iter().map(|&p| got(t, p).total()).sum();
        assert_eq!(total, want, "target {} received nothing else", t + 1);
    }

    let s = daemon.status_when(|s| s.flows.iter().map(|c| c.packets).sum::<u64>() >= sent);
    for name in ["b-ports", "b-bytes", "c-source", "a-any"] {
        assert_eq!(
            lb_packets(&s.flows, name),
            flow_want.get(name).copied().unwrap_or(0),
            "flow {name}: {:?}",
            s.flows
        );
    }
    for (name, want) in [
        ("a/1", target_want[0]),
        ("b/1", target_want[1]),
        ("c/1", target_want[2]),
    ] {
        assert_eq!(lb_packets(&s.targets, name), want, "target {name}");
    }
    assert_eq!(lb_packets(&s.vips, "vip"), sent);
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), sent);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 0);
    eprintln!("flows {:?}; targets {target_want:?}", flow_want);

    // An ICMP error about the b-bytes flow quotes the target's reply, whose
    // bytes say nothing of the request's: the flow is the best one by its
    // tuple alone (found by a tester: it went to a-any).
    let before = s;
    let reply = ipv4(
        VIP,
        CLIENT,
        UDP,
        &[],
        &udp_v4(VIP, CLIENT, 6000, 40_004, b"reply"),
    );
    let error = ipv4(CLIENT, VIP, ICMP, &[], &icmp_frag_needed(1400, &reply));
    let frame = ethernet(lab.uplink_mac(), lab.client_mac(), &[], 0x0800, &error);
    send_frames(&lab.client.name, &lab.client_if, &[frame]);
    let s = daemon.status_when(|s| lb_packets(&s.vips, "vip") > lb_packets(&before.vips, "vip"));
    for (name, want) in [
        ("b-bytes", 1),
        ("a-any", 0),
        ("c-source", 0),
        ("b-ports", 0),
    ] {
        let moved = lb_packets(&s.flows, name) - lb_packets(&before.flows, name);
        assert_eq!(moved, want, "the error counted under flow {name}");
    }
    assert_eq!(
        lb_packets(&s.targets, "b/1") - lb_packets(&before.targets, "b/1"),
        1
    );
}

#[test]
fn no_flow_match_and_no_target_are_dropped_and_counted() {
    if !kernel_tests_enabled() {
        return;
    }
    let vip_empty = Ipv4Addr::new(203, 0, 113, 11);
    let mut lab = LbLab::new(1, &[VIP, vip_empty]);
    let spec = LbSpec {
        vips: vec![
            vip("vip-tcp", &VIP.to_string()),
            vip("vip-empty", &vip_empty.to_string()),
        ],
        streams: vec![stream("s", 4), stream("empty", 4)],
        flows: vec![
            flow("tcp-only", &["vip-tcp"], "s", &["tcp"]),
            flow("udp-any", &["vip-empty"], "empty", &["udp"]),
        ],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&spec));
    let daemon = lab.daemon();
    let target = &lab.targets[0];
    let to_tcp_vip = UdpReceiver::start(&target.netns.name, DST);
    let to_empty = UdpReceiver::start(&target.netns.name, SocketAddrV4::new(vip_empty, PORT));
    let plain_dst = SocketAddrV4::new(target.address, PORT);
    let plain = UdpReceiver::start(&target.netns.name, plain_dst);

    // UDP to a VIP with only a TCP flow: no flow matches.
    let s = dropped_as(&lab, "no_flow_match", 41_000, DST, 5, b"udp to tcp-only");
    assert_eq!(named(&s, "xdp_uplink", "no_target"), 0);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 5);
    assert_eq!(
        lb_packets(&s.vips, "vip-tcp"),
        5,
        "the VIP counts what reaches it"
    );
    assert_eq!(lb_packets(&s.flows, "tcp-only"), 0);
    assert_eq!(lb_packets(&s.targets, "s/1"), 0);

    // A flow whose stream has no target.
    let empty = SocketAddrV4::new(vip_empty, PORT);
    let s = dropped_as(&lab, "no_target", 41_001, empty, 4, b"to an empty stream");
    assert_eq!(named(&s, "xdp_uplink", "no_flow_match"), 5);
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 9);
    assert_eq!(lb_packets(&s.vips, "vip-empty"), 4);
    assert_eq!(
        lb_packets(&s.flows, "udp-any"),
        4,
        "classified, then no target"
    );

    // Not a VIP: passed to the node's stack, routed to the target's own address.
    send_udp_flows(
        &lab.client.name,
        CLIENT,
        &[41_002],
        plain_dst,
        3,
        b"not for a VIP",
    );
    assert!(
        wait_until(Duration::from_secs(30), || plain.count() >= 3),
        "routed datagrams: {}",
        plain.count()
    );
    let s = daemon.status_when(|s| packets(s, "xdp_uplink", "pass") >= 3);
    assert_eq!(packets(&s, "xdp_uplink", "pass"), 3, "{s:#?}");
    assert_eq!(packets(&s, "xdp_uplink", "drop"), 9);
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), 0);
    assert_eq!(lb_packets(&s.targets, "s/1"), 0);

    // The dropped datagrams never arrived (the routed ones did: the path works).
    assert_eq!(to_tcp_vip.stop().total(), 0);
    assert_eq!(to_empty.stop().total(), 0);
    assert_eq!(plain.stop().of(SocketAddrV4::new(CLIENT, 41_002)), 3);

    // The TCP flow of the same VIP does work.
    let server = TcpEchoServer::start(&target.netns.name, DST);
    let answers = tcp_echo(&lab.client.name, DST, &[b"tcp is fine".to_vec()]);
    assert_eq!(answers, [Ok(b"tcp is fine".to_vec())]);
    assert!(wait_until(Duration::from_secs(30), || server.echoed() == 1));
    let s =
        daemon.status_when(|s| lb_packets(&s.targets, "s/1") == lb_packets(&s.flows, "tcp-only"));
    assert_eq!(
        named(&s, "xdp_uplink", "no_flow_match"),
        5,
        "TCP matched its flow"
    );
    assert!(lb_packets(&s.flows, "tcp-only") > 0);
    assert_eq!(
        lb_packets(&s.targets, "s/1"),
        lb_packets(&s.flows, "tcp-only")
    );
}

#[test]
fn a_removed_target_only_moves_its_flows_and_comes_back() {
    if !kernel_tests_enabled() {
        return;
    }
    // Every identifier present (max_targets = 3): removing one moves only its entries.
    let (lab, receivers) = three_targets(3, &["udp"]);
    let daemon = lab.daemon();
    let ports: Vec<u16> = (30_000..30_600).collect();

    let round = |expected_total: u64| -> HashMap<u16, usize> {
        let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 1, b"which target?");
        wait_received(&receivers, expected_total + sent);
        let got: Vec<Received> = receivers.iter().map(UdpReceiver::take).collect();
        let map = flow_map(&got, 1);
        assert_eq!(map.len(), ports.len());
        map
    };

    let before = round(0);
    let share = shares(&before, 3);
    eprintln!("flows per target before: {share:?}");
    assert!(share.iter().all(|&n| n > 100), "{share:?}");

    lab.delete_target("s", 2).expect("DeleteTarget s/2");
    let names: Vec<_> = daemon
        .status()
        .targets
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["s/1", "s/3"]);
    let without = round(600);
    let mut moved = 0;
    for (port, &was) in &before {
        let now = without[port];
        if was == 1 {
            assert_ne!(now, 1, "flow {port} still on the deleted target");
            moved += 1;
        } else {
            assert_eq!(
                now,
                was,
                "flow {port} of target {} moved to target {}",
                was + 1,
                now + 1
            );
        }
    }
    let after_delete = shares(&without, 3);
    eprintln!("target 2 deleted: {moved} flows moved (all of its {}), none of the others; now {after_delete:?}", share[1]);
    assert_eq!(moved, share[1]);
    assert_eq!(after_delete[1], 0);

    lab.set_target(&lab.targets[1].local("s", 2))
        .expect("SetTarget s/2");
    let again = round(1200);
    assert_eq!(
        again, before,
        "re-adding identifier 2 restores the original mapping exactly"
    );
    let s = daemon.status_when(|s| lb_packets(&s.targets, "s/2") >= share[1] as u64);
    assert_eq!(
        lb_packets(&s.targets, "s/2"),
        share[1] as u64,
        "the re-added target's counter starts from 0"
    );
    assert_eq!(lb_packets(&s.flows, "all"), 1800);
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), 1800);
}

#[test]
fn icmp_fragmentation_needed_reaches_the_flows_target() {
    if !kernel_tests_enabled() {
        return;
    }
    // A UDP-only flow: an ICMP error is classified by its inner packet (UDP, ports swapped).
    let (lab, receivers) = three_targets(3, &["udp"]);
    let daemon = lab.daemon();
    let icmp: Vec<_> = lab
        .targets
        .iter()
        .map(|t| IcmpReceiver::start(&t.netns.name))
        .collect();

    // Which target each of 12 flows goes to.
    let ports: Vec<u16> = (42_000..42_012).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 1, b"data");
    wait_received(&receivers, sent);
    let got: Vec<Received> = receivers.iter().map(UdpReceiver::take).collect();
    let map = flow_map(&got, 1);
    eprintln!("ICMP test flows per target: {:?}", shares(&map, 3));

    let (uplink_mac, client_mac) = (lab.uplink_mac(), lab.client_mac());
    let mut want_icmp = [0usize; 3];
    for &port in &ports {
        let target = map[&port];
        let before = daemon.status();
        // The reply direction of the flow, as a router on the way would quote it.
        let reply = ipv4(
            VIP,
            CLIENT,
            UDP,
            &[],
            &udp_v4(VIP, CLIENT, PORT, port, &[0u8; 64]),
        );
        let frame = ethernet(
            uplink_mac,
            client_mac,
            &[],
            0x0800,
            &ipv4(CLIENT, VIP, ICMP, &[], &icmp_frag_needed(1400, &reply)),
        );
        send_frames(&lab.client.name, &lab.client_if, &[frame]);
        let s = daemon.status_when(|s| {
            packets(s, "xdp_uplink", "redirect") > packets(&before, "xdp_uplink", "redirect")
        });
        for t in 0..3 {
            let name = format!("s/{}", t + 1);
            let delta = lb_packets(&s.targets, &name) - lb_packets(&before.targets, &name);
            assert_eq!(delta, u64::from(t == target), "ICMP error for flow {port}: target {} counter moved {delta}, want the flow's target {}", t + 1, target + 1);
        }
        assert_eq!(
            lb_packets(&s.flows, "all") - lb_packets(&before.flows, "all"),
            1
        );
        assert_eq!(packets(&s, "xdp_uplink", "drop"), 0, "{s:#?}");
        want_icmp[target] += 1;
    }

    // An error that quotes a flow of the VIP but is sent to another address
    // is not the load balancer's: it passes to the kernel, no target gets it.
    let before = daemon.status();
    let reply = ipv4(
        VIP,
        CLIENT,
        UDP,
        &[],
        &udp_v4(VIP, CLIENT, PORT, ports[0], &[0u8; 64]),
    );
    let elsewhere = std::net::Ipv4Addr::new(198, 51, 100, 99);
    let frame = ethernet(
        uplink_mac,
        client_mac,
        &[],
        0x0800,
        &ipv4(
            CLIENT,
            elsewhere,
            ICMP,
            &[],
            &icmp_frag_needed(1400, &reply),
        ),
    );
    send_frames(&lab.client.name, &lab.client_if, &[frame]);
    daemon
        .status_when(|s| packets(s, "xdp_uplink", "pass") > packets(&before, "xdp_uplink", "pass"));
    std::thread::sleep(Duration::from_millis(200));
    let s = daemon.status();
    assert_eq!(
        packets(&s, "xdp_uplink", "redirect"),
        packets(&before, "xdp_uplink", "redirect"),
        "an error sent elsewhere was redirected"
    );
    assert_eq!(
        lb_packets(&s.flows, "all"),
        lb_packets(&before.flows, "all")
    );

    // And the targets' kernels got them: each its own flows' errors, quoting the flow.
    let frag_needed = |p: &Vec<u8>| {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        p.len() >= ihl + 8 && p[ihl] == 3 && p[ihl + 1] == 4
    };
    let ok = wait_until(Duration::from_secs(30), || {
        icmp.iter()
            .zip(want_icmp)
            .all(|(r, want)| r.packets().iter().filter(|p| frag_needed(p)).count() >= want)
    });
    for (t, r) in icmp.iter().enumerate() {
        let quoted: Vec<u16> = r
            .packets()
            .iter()
            .filter(|p| frag_needed(p))
            .map(|p| {
                let ihl = usize::from(p[0] & 0x0f) * 4;
                // ICMP header 8, quoted IPv4 header 20, then the quoted UDP destination port.
                u16::from_be_bytes([p[ihl + 8 + 20 + 2], p[ihl + 8 + 20 + 3]])
            })
            .collect();
        let mut want: Vec<u16> = ports.iter().copied().filter(|p| map[p] == t).collect();
        let mut quoted_sorted = quoted.clone();
        quoted_sorted.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            quoted_sorted,
            want,
            "target {} received ICMP errors for these flows (ok={ok})",
            t + 1
        );
    }
    assert_eq!(received(&receivers), sent, "no ICMP reached a UDP socket");
}

/// A VIP renamed with its address kept stays in the maps: the old name's
/// removal, after the new name was written, took the address's entry with
/// it (a host VIP went on through its slot but was no longer listed, a
/// prefix VIP stopped; found by an independent tester).
#[test]
fn a_vip_renamed_with_its_address_kept_stays_in_the_maps_and_forwards() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = LbLab::new(1, &[VIP]);
    let target = lab.targets[0].local("s", 1);
    let spec = move |name: &str, address: &str| LbSpec {
        vips: vec![vip(name, address)],
        streams: vec![stream("s", 4)],
        flows: vec![flow("udp", &[name], "s", &["udp"])],
        targets: vec![target.clone()],
    };
    lab.start(Some(&spec("a", "203.0.113.10")));
    assert_eq!(lab.spread(VIP), vec![200]);
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let entries = |map: &str| match &tapmesh_tests::maps::dump_pinned(&pins)[map] {
        tapmesh_tests::maps::Dump::Entries(e) => e.len(),
        other => panic!("{map}: {other:?}"),
    };
    for (name, address, hosts, prefixes) in [
        ("b", "203.0.113.10", 1, 0),
        ("p", "203.0.113.0/28", 0, 1),
        ("q", "203.0.113.0/28", 0, 1),
    ] {
        lab.apply(&spec(name, address)).unwrap();
        assert_eq!(
            (entries("tm_vip_hosts"), entries("tm_vips")),
            (hosts, prefixes),
            "renamed to {name}"
        );
        assert_eq!(lab.spread(VIP), vec![200], "renamed to {name}");
        let s = lab.daemon().status();
        assert_eq!(lb_packets(&s.vips, name), 200, "renamed to {name}");
    }
    // Two VIPs swap addresses in one change (the first written took the
    // second's old address, whose removal then took the entry with it).
    let t = lab.targets[0].local("s", 1);
    let two = |x: &str, y: &str| LbSpec {
        vips: vec![vip("x", x), vip("y", y)],
        streams: vec![stream("s", 4)],
        flows: vec![flow("udp", &["x", "y"], "s", &["udp"])],
        targets: vec![t.clone()],
    };
    lab.apply(&two("203.0.113.10", "203.0.113.11")).unwrap();
    lab.apply(&two("203.0.113.11", "203.0.113.10")).unwrap();
    assert_eq!(entries("tm_vip_hosts"), 2);
    assert_eq!(lab.spread(VIP), vec![200], "after the swap");
    let s = lab.daemon().status();
    assert_eq!(lb_packets(&s.vips, "y"), 200);
}
