//! Copies of what the uplink's XDP program redirects into a port: the load
//! balancer's packets to a local target, copied IN at the target's port
//! (`ebpf/src/detour.rs`). Exact counts at the target and the monitor, the
//! copies' bytes read back by tshark, and nothing copied once the flow goes.
//!
//! ```text
//!  client ──(uplink, XDP)── node ──(target's port, tapped IN)── target
//!                             └──(tap service interface)── monitor
//! ```

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use tapmesh::{
    admin::proto::{tap_service::Destination, ListTapsRequest, Ring, TapFlow, TapId, TapService},
    lb::model::LbSpec,
};
use tapmesh_tests::{
    daemon::packets,
    kernel_tests_enabled, link,
    net::{flow, send_udp_flows, stream, vip, wait_until, LbLab, UdpReceiver, CLIENT},
    tshark_fields, End, Netns, TempDir,
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const DST: SocketAddrV4 = SocketAddrV4::new(VIP, 7000);

fn call<T>(
    socket: &Path,
    f: impl AsyncFnOnce(
        &mut tapmesh::admin::proto::admin_client::AdminClient<tonic::transport::Channel>,
    ) -> T,
) -> T {
    let socket = socket.to_path_buf();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let mut c = tapmesh::admin::connect(&socket).await.expect("admin API");
            f(&mut c).await
        })
}

fn rx_packets(netns: &Netns, interface: &str) -> u64 {
    let path = format!("/sys/class/net/{interface}/statistics/rx_packets");
    let out = netns.exec(&["cat", &path]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("rx_packets")
}

/// The daemon balancing VIP to one local target, and a monitor namespace
/// linked to the node: the lab, the monitor, the tap service's interface
/// and the monitor's end, the admin socket.
fn tapped_lab() -> (LbLab, Netns, End, End, PathBuf) {
    let mut lab = LbLab::new(1, &[VIP]);
    let spec = LbSpec {
        vips: vec![vip("vip", &VIP.to_string())],
        streams: vec![stream("s", 10)],
        flows: vec![flow("all", &["vip"], "s", &["udp"])],
        targets: vec![lab.targets[0].local("s", 1)],
    };
    lab.start(Some(&spec));
    let monitor = Netns::new("m");
    let (tap_if, mon_if) = link(&lab.node, "198.18.200.1/24", &monitor, "198.18.200.2/24");
    let socket = lab.daemon().socket.clone();
    (lab, monitor, tap_if, mon_if, socket)
}

#[test]
fn lb_traffic_redirected_into_a_tapped_port_is_copied() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, monitor, tap_if, mon_if, socket) = tapped_lab();
    let dir = TempDir::new("mirror-xdp");
    let pcap: PathBuf = dir.0.join("in.pcap");
    let port = lab.targets[0].node_if.clone();
    let services = [
        ("mon", Destination::Interface(tap_if.interface.clone())),
        (
            "ring",
            Destination::Ring(Ring {
                pcap: pcap.display().to_string(),
                forward: String::new(),
            }),
        ),
    ];
    for (id, destination) in services {
        let s = TapService {
            id: id.into(),
            destination: Some(destination),
            ..Default::default()
        };
        call(&socket, async |c| c.create_tap_service(s).await).expect("tap service");
        let f = TapFlow {
            id: format!("{id}-in"),
            tap_service: id.into(),
            source: port.clone(),
            direction: "IN".into(),
            ..Default::default()
        };
        call(&socket, async |c| c.create_tap_flow(f).await).expect("tap flow");
    }

    let monitor_before = rx_packets(&monitor, &mon_if.interface);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, DST);
    let ports: Vec<u16> = (40_000..40_005).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 10, &[0x5a; 32]);
    assert_eq!(sent, 50);
    assert!(
        wait_until(Duration::from_secs(30), || receiver.count() >= sent
            && rx_packets(&monitor, &mon_if.interface) - monitor_before >= sent),
        "target {} of {sent}, monitor {}",
        receiver.count(),
        rx_packets(&monitor, &mon_if.interface) - monitor_before
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.count(), sent, "every datagram arrives once");
    assert_eq!(
        rx_packets(&monitor, &mon_if.interface) - monitor_before,
        sent,
        "one copy of each"
    );
    let s = lab.daemon().status();
    assert_eq!(packets(&s, "xdp_uplink", "pass"), sent, "{s:#?}");
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), 0, "{s:#?}");

    // The stop writes every copy out; the ring's copies are the frames as the target got them.
    let target_mac = lab.targets[0].mac;
    drop(lab);
    let macs = tshark_fields(&pcap, "eth.dst");
    let want_mac = target_mac.map(|b| format!("{b:02x}")).join(":");
    assert_eq!(macs, vec![want_mac; sent as usize], "{}", pcap.display());
    assert_eq!(
        tshark_fields(&pcap, "ip.dst"),
        vec![VIP.to_string(); sent as usize]
    );
    assert_eq!(tshark_fields(&pcap, "udp.srcport").len(), sent as usize);
    drop(receiver);
}

#[test]
fn without_in_copies_the_redirect_stays_in_xdp() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, monitor, tap_if, mon_if, socket) = tapped_lab();
    let port = lab.targets[0].node_if.clone();
    let s = TapService {
        id: "mon".into(),
        destination: Some(Destination::Interface(tap_if.interface.clone())),
        ..Default::default()
    };
    call(&socket, async |c| c.create_tap_service(s).await).expect("tap service");
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, DST);
    let ports: Vec<u16> = (41_000..41_005).collect();
    let mut delivered = 0;
    // An OUT flow on the port, then an IN flow deleted again: neither copies
    // what XDP sends into the port, which keeps the plain redirect.
    for (id, direction, delete) in [("out", "OUT", false), ("in", "IN", true)] {
        let f = TapFlow {
            id: id.into(),
            tap_service: "mon".into(),
            source: port.clone(),
            direction: direction.into(),
            ..Default::default()
        };
        call(&socket, async |c| c.create_tap_flow(f).await).expect("tap flow");
        if delete {
            let id = TapId { id: id.into() };
            call(&socket, async |c| c.delete_tap_flow(id).await).expect("delete flow");
        }
        let before = rx_packets(&monitor, &mon_if.interface);
        let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 4, &[0x5a; 32]);
        delivered += sent;
        assert!(
            wait_until(Duration::from_secs(30), || receiver.count() >= delivered),
            "target {} of {delivered}",
            receiver.count()
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(receiver.count(), delivered);
        assert_eq!(rx_packets(&monitor, &mon_if.interface) - before, 0, "{id}");
    }
    let s = lab.daemon().status();
    assert_eq!(packets(&s, "xdp_uplink", "redirect"), delivered, "{s:#?}");
}

/// The uplink keeps its TC ingress program through a tap flow of its own.
#[test]
fn a_tap_flow_on_the_uplink_leaves_the_detour_in_place() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, monitor, tap_if, mon_if, socket) = tapped_lab();
    let filters = || {
        ["ingress", "egress"].map(|hook| {
            let out = lab
                .node
                .exec(&["tc", "filter", "show", "dev", &lab.uplink, hook]);
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    let before = filters();
    assert!(
        before[0].contains("tm_tc_tap_out") && before[1].is_empty(),
        "{before:?}"
    );
    let s = TapService {
        id: "mon".into(),
        destination: Some(Destination::Interface(tap_if.interface.clone())),
        ..Default::default()
    };
    call(&socket, async |c| c.create_tap_service(s).await).expect("tap service");
    for (id, source) in [("up", &lab.uplink), ("in", &lab.targets[0].node_if)] {
        let f = TapFlow {
            id: id.into(),
            tap_service: "mon".into(),
            source: source.clone(),
            direction: if id == "up" { "BOTH" } else { "IN" }.into(),
            ..Default::default()
        };
        call(&socket, async |c| c.create_tap_flow(f).await).expect("tap flow");
    }
    let during = filters();
    assert!(
        during[0].contains("tm_tc_tap_out") && during[1].contains("tm_tc_tap_in"),
        "{during:?}"
    );
    let id = TapId { id: "up".into() };
    call(&socket, async |c| c.delete_tap_flow(id).await).expect("delete flow");
    assert_eq!(filters(), before, "the uplink's programs");

    // Flows on the uplink come and go under traffic: its ingress program
    // stays attached, so no detoured frame is lost in between.
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, DST);
    let copies_before = rx_packets(&monitor, &mon_if.interface);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (stop, client) = (stop.clone(), lab.client.name.clone());
        std::thread::spawn(move || {
            let ports: Vec<u16> = (43_000..43_010).collect();
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sent += send_udp_flows(&client, CLIENT, &ports, DST, 5, &[0x5a; 32]);
                std::thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };
    for round in 0..6 {
        let f = TapFlow {
            id: "up".into(),
            tap_service: "mon".into(),
            source: lab.uplink.clone(),
            direction: ["IN", "OUT", "BOTH"][round % 3].into(),
            ..Default::default()
        };
        call(&socket, async |c| c.create_tap_flow(f).await).expect("tap flow");
        std::thread::sleep(Duration::from_millis(30));
        let id = TapId { id: "up".into() };
        call(&socket, async |c| c.delete_tap_flow(id).await).expect("delete flow");
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    assert!(sent > 0);
    assert!(
        wait_until(Duration::from_secs(30), || receiver.count() >= sent),
        "target {} of {sent}",
        receiver.count()
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.count(), sent, "none lost, none twice");
    // The target port's IN flow copied each of them once (the uplink's own
    // flows may have copied other frames to the monitor meanwhile).
    let listing = call(&socket, async |c| c.list_taps(ListTapsRequest {}).await)
        .expect("list taps")
        .into_inner();
    let flow = listing
        .flows
        .iter()
        .find(|f| f.id == "in")
        .expect("flow in");
    assert_eq!(flow.mirrored_packets, sent, "{listing:?}");
    assert!(rx_packets(&monitor, &mon_if.interface) - copies_before >= sent);
    drop(receiver);

    let before = rx_packets(&monitor, &mon_if.interface);
    let receiver = UdpReceiver::start(&lab.targets[0].netns.name, DST);
    let ports: Vec<u16> = (42_000..42_005).collect();
    let sent = send_udp_flows(&lab.client.name, CLIENT, &ports, DST, 2, &[0x5a; 32]);
    assert!(
        wait_until(Duration::from_secs(30), || receiver.count() >= sent
            && rx_packets(&monitor, &mon_if.interface) - before >= sent),
        "target {} of {sent}, monitor {}",
        receiver.count(),
        rx_packets(&monitor, &mon_if.interface) - before
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(receiver.count(), sent);
    assert_eq!(rx_packets(&monitor, &mon_if.interface) - before, sent);
}
