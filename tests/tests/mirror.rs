//! Port mirroring with real packets: two "VMs" routed through the node, a
//! monitor namespace behind the tap service's interface, and the daemon's
//! tap API; exact copy counts per direction and VLAN, and the rings' pcap
//! files (copies through the BPF ring buffer, the default, and through
//! AF_XDP) read back by tshark.
//!
//! ```text
//!  vm1 198.18.1.2 ──(src port, TC)── node (daemon) ──── vm2 198.18.2.2
//!                                      └──(tap service interface)── monitor
//! ```

use std::{path::Path, time::Duration};

use tapmesh::admin::proto::{
    tap_service::Destination, ListTapsRequest, Ring, TapFlow, TapId, TapListing, TapService,
};
use tapmesh_tests::{
    dpdk::Testpmd,
    frames::{ethernet, ipv4, udp_v4, UDP},
    kernel_tests_enabled, link,
    net::wait_until,
    send_frames, tshark_fields, Daemon, End, Netns, TempDir,
};

struct Lab {
    // Drop order: the daemon before its namespace.
    daemon: Daemon,
    node: Netns,
    vm1: Netns,
    _vm2: Netns,
    monitor: Netns,
    /// vm1's port: the host side (source of the tap flows) and vm1's end.
    port: End,
    vm1_if: End,
    /// The tap service's interface on the node, and the monitor's end.
    tap_if: End,
    mon_if: End,
}

impl Lab {
    fn new() -> Self {
        Self::with(|_| Vec::new())
    }

    /// A lab whose daemon feeds mirror rings through AF_XDP.
    fn af_xdp() -> Self {
        Self::with(|_| {
            ["--mirror-ring-transport", "af_xdp"]
                .map(String::from)
                .to_vec()
        })
    }

    /// A lab with tap service "mon": copies out of the tap interface, to the monitor.
    fn monitored() -> Self {
        let lab = Lab::new();
        lab.service("mon", Destination::Interface(lab.tap_if.interface.clone()))
            .unwrap();
        lab
    }

    /// `daemon_args` gets the node namespace (to start what the daemon needs there).
    fn with(daemon_args: impl FnOnce(&Netns) -> Vec<String>) -> Self {
        let node = Netns::new("n");
        let vm1 = Netns::new("v1");
        let vm2 = Netns::new("v2");
        let monitor = Netns::new("m");
        let (port, vm1_if) = link(&node, "198.18.1.1/24", &vm1, "198.18.1.2/24");
        let (_, _) = link(&node, "198.18.2.1/24", &vm2, "198.18.2.2/24");
        let (tap_if, mon_if) = link(&node, "198.18.3.1/24", &monitor, "198.18.3.2/24");
        vm1.ip(&["route", "add", "default", "via", "198.18.1.1"]);
        vm2.ip(&["route", "add", "default", "via", "198.18.2.1"]);
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let args = daemon_args(&node);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start(&node.name, &args);
        Lab {
            daemon,
            node,
            vm1,
            _vm2: vm2,
            monitor,
            port,
            vm1_if,
            tap_if,
            mon_if,
        }
    }

    fn call<T>(
        &self,
        f: impl AsyncFnOnce(
            &mut tapmesh::admin::proto::admin_client::AdminClient<tonic::transport::Channel>,
        ) -> T,
    ) -> T {
        let socket = self.daemon.socket.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c = tapmesh::admin::connect(&socket).await.expect("admin API");
                f(&mut c).await
            })
    }

    fn service(&self, id: &str, destination: Destination) -> Result<(), tonic::Status> {
        let s = TapService {
            id: id.into(),
            destination: Some(destination),
            ..Default::default()
        };
        self.call(async |c| c.create_tap_service(s).await.map(|_| ()))
    }

    fn flow(
        &self,
        id: &str,
        service: &str,
        direction: &str,
        vlans: &str,
    ) -> Result<(), tonic::Status> {
        let f = TapFlow {
            id: id.into(),
            tap_service: service.into(),
            source: self.port.interface.clone(),
            direction: direction.into(),
            vlan_filter: vlans.into(),
            ..Default::default()
        };
        self.call(async |c| c.create_tap_flow(f).await.map(|_| ()))
    }

    /// Tap service `id`: copies through an AF_XDP ring into the file `pcap`.
    fn ring_service(&self, id: &str, pcap: &Path) {
        let ring = Ring {
            pcap: pcap.display().to_string(),
            forward: String::new(),
        };
        self.service(id, Destination::Ring(ring)).unwrap();
    }

    /// Waits until the first service's ring consumer delivered `copies`.
    fn wait_delivered(&self, copies: u64) {
        assert!(
            wait_until(Duration::from_secs(30), || {
                self.list().services[0]
                    .ring_counters
                    .as_ref()
                    .is_some_and(|c| c.consumers.first().is_some_and(|p| p.delivered == copies))
            }),
            "{:?}",
            self.list().services
        );
    }

    /// A UDP frame vm1 sends to vm2 through its port, VLAN-tagged with `tags`.
    fn vm1_frame(&self, tags: &[u16]) -> Vec<u8> {
        let (src, dst) = ("198.18.1.2".parse().unwrap(), "198.18.2.2".parse().unwrap());
        let payload = udp_v4(src, dst, 1000, 2000, b"vlan");
        ethernet(
            self.node.mac(&self.port.interface),
            self.vm1.mac(&self.vm1_if.interface),
            tags,
            0x0800,
            &ipv4(src, dst, UDP, &[], &payload),
        )
    }

    fn delete_flow(&self, id: &str) {
        let id = TapId { id: id.into() };
        self.call(async |c| c.delete_tap_flow(id).await)
            .expect("delete flow");
    }

    fn list(&self) -> TapListing {
        self.call(async |c| c.list_taps(ListTapsRequest {}).await)
            .expect("list taps")
            .into_inner()
    }

    /// Packets the monitor's interface received so far.
    fn monitor_rx(&self) -> u64 {
        let path = format!(
            "/sys/class/net/{}/statistics/rx_packets",
            self.mon_if.interface
        );
        let out = self.monitor.exec(&["cat", &path]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("rx_packets")
    }

    /// `count` pings vm1 → vm2: `count` packets from the port and `count` to it.
    fn ping(&self, count: u32) {
        let out = self.vm1.try_exec(&[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            "-q",
            "198.18.2.2",
        ]);
        assert!(
            out.status.success(),
            "ping: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    /// Waits until the monitor received exactly `want` more than `before`.
    fn expect_monitor(&self, before: u64, want: u64) {
        assert!(
            wait_until(Duration::from_secs(30), || self.monitor_rx() - before
                >= want),
            "monitor got {} of {want}",
            self.monitor_rx() - before
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.monitor_rx() - before, want, "exactly {want} copies");
    }
}

#[test]
fn both_in_and_out_copy_exactly_their_sides() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();

    lab.flow("both", "mon", "BOTH", "").unwrap();
    // A port without TC programs of its own gets the copy-only ones, which
    // always let the packet go on.
    let attached: Vec<(String, String)> = lab
        .daemon
        .status()
        .attachments
        .into_iter()
        .filter(|a| a.interface == lab.port.interface)
        .map(|a| (a.hook, a.program))
        .collect();
    assert_eq!(
        attached,
        [
            ("tc-ingress".to_string(), "tm_tc_tap_out".to_string()),
            ("tc-egress".to_string(), "tm_tc_tap_in".to_string())
        ]
    );
    let before = lab.monitor_rx();
    lab.ping(10);
    lab.expect_monitor(before, 20);
    let listing = lab.list();
    let both = &listing.flows[0];
    assert_eq!(
        (both.status.as_str(), both.mirrored_packets, both.failed),
        ("ACTIVE", 20, 0)
    );
    assert_eq!(both.mirrored_bytes, 20 * 98, "98-byte ping frames");
    lab.delete_flow("both");

    for (direction, id) in [("IN", "in"), ("OUT", "out")] {
        lab.flow(id, "mon", direction, "").unwrap();
        let before = lab.monitor_rx();
        lab.ping(7);
        lab.expect_monitor(before, 7);
        lab.delete_flow(id);
    }
    // Nothing mirrors once the flows are gone, and the TC programs left the port.
    let before = lab.monitor_rx();
    lab.ping(5);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.monitor_rx(), before);
    let filters = lab.node.ip(&["-d", "link", "show", &lab.port.interface]);
    assert!(!String::from_utf8_lossy(&filters.stdout).contains("clsact"));
}

#[test]
fn a_vlan_filter_passes_only_its_vlans() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();
    lab.flow("vlans", "mon", "OUT", "10,30-40").unwrap();
    // Frames from vm1 tagged 10, 20, 35 and untagged: only 10 and 35 are copied.
    let mut frames = Vec::new();
    frames.extend(std::iter::repeat_n(lab.vm1_frame(&[10]), 4));
    frames.extend(std::iter::repeat_n(lab.vm1_frame(&[20]), 5));
    frames.extend(std::iter::repeat_n(lab.vm1_frame(&[35]), 6));
    frames.extend(std::iter::repeat_n(lab.vm1_frame(&[]), 3));
    let before = lab.monitor_rx();
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &frames);
    lab.expect_monitor(before, 10);
    let flow = lab.list().flows[0].clone();
    assert_eq!(flow.mirrored_packets, 10);
    // The bytes on the wire, tags included (the kernel offloads them from the frame).
    let tagged = lab.vm1_frame(&[10]).len() as u64;
    assert_eq!(flow.mirrored_bytes, 10 * tagged, "{flow:?}");
}

/// Copies that would come back to a tapped port: through the veth peer of
/// the service's interface (refused at create, in either order), or
/// through a bridge the service sends into (not refused: the kernel takes
/// one copy per packet, since a copy carries `COPY_TC_INDEX` and is not
/// copied again). One frame made millions through a veth peer, and 24
/// through a bridge (found by an independent tester).
#[test]
fn a_copy_back_at_a_tapped_port_is_not_copied_again() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let flow_on = |id: &str, service: &str, source: &str, direction: &str| {
        let f = TapFlow {
            id: id.into(),
            tap_service: service.into(),
            source: source.into(),
            direction: direction.into(),
            ..Default::default()
        };
        lab.call(async |c| c.create_tap_flow(f).await.map(|_| ()))
    };
    let up = |i: &str| {
        lab.node.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{i}.disable_ipv6=1"),
        ]);
        lab.node.ip(&["link", "set", i, "up"]);
    };
    // A veth pair in the node: a flow on the far end of a service's veth.
    let (a, b) = (tapmesh_tests::unique("ta"), tapmesh_tests::unique("tb"));
    lab.node
        .ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    up(&a);
    up(&b);
    lab.service("peer", Destination::Interface(a.clone()))
        .unwrap();
    let e = flow_on("back", "peer", &b, "OUT").expect_err("a flow on the peer");
    assert!(
        e.message().contains("receives the copies of tap service"),
        "{e:?}"
    );

    // A bridge: the service sends into it, one of its ports is a source.
    let (br, port) = (tapmesh_tests::unique("tbr"), tapmesh_tests::unique("tp"));
    lab.node.ip(&["link", "add", &br, "type", "bridge"]);
    lab.node.ip(&[
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "far",
        "netns",
        &lab.monitor.name,
    ]);
    lab.node.ip(&["link", "set", &port, "master", &br]);
    lab.monitor.ip(&["link", "set", "far", "up"]);
    up(&br);
    up(&port);
    lab.service("bridge", Destination::Interface(br.clone()))
        .unwrap();
    let f = TapFlow {
        id: "in".into(),
        tap_service: "bridge".into(),
        source: port.clone(),
        direction: "IN".into(),
        vlan_filter: "10".into(),
        ..Default::default()
    };
    lab.call(async |c| c.create_tap_flow(f).await.map(|_| ()))
        .unwrap();
    let rx = || {
        let out = lab
            .monitor
            .exec(&["cat", "/sys/class/net/far/statistics/rx_packets"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u64>()
            .expect("rx_packets")
    };
    let before = rx();
    // One broadcast frame into the bridge: flooded out of the port. Tagged,
    // and the flow takes only its VLAN: the bridge's own IGMP reports go out
    // of the port too.
    let (src, dst) = ("192.0.2.5".parse().unwrap(), "192.0.2.6".parse().unwrap());
    let frame = ethernet(
        [0xff; 6],
        lab.node.mac(&br),
        &[10],
        0x0800,
        &ipv4(src, dst, UDP, &[], &udp_v4(src, dst, 1, 2, b"once")),
    );
    send_frames(&lab.node.name, &br, &[frame]);
    // The frame and its one copy, flooded back through the bridge.
    assert!(wait_until(Duration::from_secs(30), || rx() - before >= 2));
    std::thread::sleep(Duration::from_millis(300));
    let flow = lab
        .list()
        .flows
        .into_iter()
        .find(|f| f.id == "in")
        .expect("flow in");
    assert_eq!((flow.mirrored_packets, flow.failed), (1, 0), "{flow:?}");
}

/// A tap flow's delete takes the clsact qdisc the daemon added for it
/// only when nothing else is on it: a filter another tool added since
/// stays, with its qdisc (found by an independent tester: both went).
#[test]
fn a_flow_delete_leaves_another_tools_filter_and_its_qdisc() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();
    let port = lab.port.interface.clone();
    let tc = |args: &[&str]| {
        let out = tapmesh_tests::sh("tc", &[&["-n", &lab.node.name], args].concat());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let qdiscs = || tc(&["qdisc", "show", "dev", &port]);
    assert!(!qdiscs().contains("clsact"));
    // Alone, the qdisc the daemon added goes with the flow.
    lab.flow("g", "mon", "BOTH", "").unwrap();
    assert!(qdiscs().contains("clsact"));
    lab.delete_flow("g");
    assert!(!qdiscs().contains("clsact"), "{}", qdiscs());
    lab.flow("f", "mon", "BOTH", "").unwrap();
    assert!(qdiscs().contains("clsact"));
    // Another tool's classic BPF filter ("accept"), added after the flow's.
    tc(&[
        "filter",
        "add",
        "dev",
        &port,
        "egress",
        "pref",
        "10",
        "protocol",
        "all",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    lab.delete_flow("f");
    assert!(qdiscs().contains("clsact"), "{}", qdiscs());
    let egress = tc(&["filter", "show", "dev", &port, "egress"]);
    assert!(egress.contains("pref 10 bpf"), "{egress}");
    assert!(!egress.contains("tm_"), "{egress}");
    assert!(!tc(&["filter", "show", "dev", &port, "ingress"]).contains("tm_"));
}

#[test]
fn bad_requests_are_refused_and_a_gone_port_takes_its_taps() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();
    for (vlans, why) in [
        ("5000", "above 4095"),
        ("20-10", "reversed"),
        ("10,", "not a VLAN id"),
    ] {
        let e = lab.flow("f", "mon", "BOTH", vlans).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains(why), "{vlans}: {}", e.message());
    }
    let e = lab.flow("f", "mon", "SIDEWAYS", "").unwrap_err();
    assert!(e.message().contains("IN, OUT or BOTH"), "{}", e.message());
    let e = lab.flow("f", "nope", "BOTH", "").unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // The service's own interface as a source would send copies in circles.
    let looped = TapFlow {
        id: "loop".into(),
        tap_service: "mon".into(),
        source: lab.tap_if.interface.clone(),
        direction: "BOTH".into(),
        ..Default::default()
    };
    let e = lab
        .call(async |c| c.create_tap_flow(looped).await.map(|_| ()))
        .unwrap_err();
    assert!(
        e.message().contains("cannot be a source"),
        "{}",
        e.message()
    );
    let e = lab
        .service("x", Destination::Interface("tmnosuchif0".into()))
        .unwrap_err();
    // Refused, as `lb apply` refuses an unknown interface (the CLI exits 2).
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(lab.list().flows.is_empty());

    // Several flows on one source port (TaaS on OVS allows one).
    lab.flow("a", "mon", "IN", "").unwrap();
    lab.flow("b", "mon", "OUT", "").unwrap();
    let before = lab.monitor_rx();
    lab.ping(4);
    lab.expect_monitor(before, 8);

    // Deleting the port's interface removes its tap flows.
    lab.node.ip(&["link", "del", &lab.port.interface]);
    assert!(wait_until(Duration::from_secs(30), || lab
        .list()
        .flows
        .is_empty()));
    assert_eq!(lab.list().services.len(), 1, "the tap service stays");
    // Deleting the tap service's interface removes the service.
    lab.node.ip(&["link", "del", &lab.tap_if.interface]);
    assert!(wait_until(Duration::from_secs(30), || lab
        .list()
        .services
        .is_empty()));
}

#[test]
fn a_ring_writes_a_pcap_tshark_reads() {
    if !kernel_tests_enabled() {
        return;
    }
    ring_writes_a_pcap_tshark_reads(Lab::new());
}

#[test]
fn an_af_xdp_ring_writes_a_pcap_tshark_reads() {
    if !kernel_tests_enabled() {
        return;
    }
    ring_writes_a_pcap_tshark_reads(Lab::af_xdp());
}

fn ring_writes_a_pcap_tshark_reads(lab: Lab) {
    let dir = TempDir::new("tmpcap");
    let pcap = dir.0.join("mirror.pcap");
    lab.ring_service("ring", &pcap);
    lab.flow("both", "ring", "BOTH", "").unwrap();
    lab.ping(25);
    lab.wait_delivered(50);
    let counters = lab.list().services[0].ring_counters.clone().unwrap();
    assert_eq!((counters.received, counters.consumers[0].lost), (50, 0));
    let types = tshark_fields(&pcap, "icmp.type");
    assert_eq!(types.len(), 50, "{types:?}");
    assert_eq!(
        types.iter().filter(|t| *t == "8").count(),
        25,
        "echo requests"
    );
    assert_eq!(
        types.iter().filter(|t| *t == "0").count(),
        25,
        "echo replies"
    );
}

/// An AF_XDP ring's veth was taken as a tap flow's source: two rings
/// tapping each other's veth copied copies in a loop (the kernel logged a
/// dead loop). And a ring that could not start named its internal slot
/// ("ring1"), which may be another service's name, not the service.
#[test]
fn a_rings_own_veth_is_no_source_and_a_ring_error_names_its_service() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::af_xdp();
    let dir = TempDir::new("tmpcv");
    lab.ring_service("ax", &dir.0.join("ax.pcap"));
    lab.ring_service("ax2", &dir.0.join("ax2.pcap"));
    // Copies of ax's ring into ax2's (its own are refused as its destination).
    for source in ["tmr0", "tmr0p"] {
        let f = TapFlow {
            id: "loop".into(),
            tap_service: "ax2".into(),
            source: source.into(),
            direction: "BOTH".into(),
            ..Default::default()
        };
        let e = lab
            .call(async |c| c.create_tap_flow(f).await)
            .expect_err(source);
        assert!(
            e.message().contains(&format!(
                "\"{source}\" carries the copies of tap service \"ax\"'s ring"
            )),
            "{e:?}"
        );
    }
    assert!(lab.list().flows.is_empty());

    let missing = dir.0.join("gone").join("x.pcap");
    let ring = Ring {
        pcap: missing.display().to_string(),
        forward: String::new(),
    };
    let e = lab
        .service("bad", Destination::Ring(ring))
        .expect_err("a pcap in a missing directory");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("tap service \"bad\": consumer pcap:"),
        "{e:?}"
    );
    assert!(!e.message().contains("ring2"), "{e:?}");
    assert_eq!(lab.list().services.len(), 2);
}

#[test]
fn the_networking_spp_etcd_handshake_plugs_and_unplugs_a_real_mirror() {
    if !kernel_tests_enabled() {
        return;
    }
    const HOST: &str = "compute-1";
    let mut etcd = None;
    let lab = Lab::with(|node| {
        let e = tapmesh_tests::etcd::Etcd::new_in(&node.name);
        let args = vec![
            "--etcd-endpoint".to_string(),
            e.endpoint.clone(),
            "--spp-host".into(),
            HOST.into(),
        ];
        etcd = Some(e);
        args
    });
    let etcd = etcd.unwrap();
    let key = |kind: &str, id: &str| format!("/spp/openstack/{kind}/{HOST}/{id}");
    let (service_port, source_port, tf) = (
        "11111111-2222-3333-4444-555555555555",
        "66666666-7777-8888-9999-000000000000",
        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    );
    // What devstack and the mech driver left: free mirror slots and port bindings.
    etcd.put(&key("mirror", "0"), "None");
    etcd.put(&key("mirror", "1"), "None");
    for (port, interface) in [
        (service_port, &lab.tap_if.interface),
        (source_port, &lab.port.interface),
    ] {
        etcd.put(
            &key("bind_port", port),
            &format!(r#"{{"mac_address": "fa:16:3e:00:00:01", "vhost_id": 0, "interface": "{interface}"}}"#),
        );
    }
    // What the driver writes after taking the slots: tap_info, then "plug".
    let plug = |id: &str, mirror_in: &str, mirror_out: &str| {
        etcd.put(
            &key("tap_info", id),
            &format!(
                r#"{{"service_port": "{service_port}", "source_port": "{source_port}", "mirror_in": {mirror_in}, "mirror_out": {mirror_out}}}"#
            ),
        );
        etcd.put(&key("tap_action", id), "plug");
    };
    // The driver: take a slot per direction (compare-and-swap), tap_info, then "plug".
    etcd.put(&key("mirror", "0"), tf);
    etcd.put(&key("mirror", "1"), tf);
    plug(tf, "0", "1");
    assert!(
        wait_until(Duration::from_secs(30), || etcd
            .get(&key("tap_status", tf))
            .as_deref()
            == Some("up")),
        "tap_status: {:?}\n{}",
        etcd.get(&key("tap_status", tf)),
        lab.daemon.log_text()
    );
    let listing = lab.list();
    assert_eq!(listing.flows.len(), 1);
    assert_eq!(
        (
            listing.flows[0].direction.as_str(),
            listing.flows[0].status.as_str()
        ),
        ("BOTH", "ACTIVE")
    );
    let before = lab.monitor_rx();
    lab.ping(6);
    lab.expect_monitor(before, 12);

    // The admin API does not delete what the agent plugged (etcd would keep
    // saying "up"), nor its service with it; both stay as they were.
    let refused = lab
        .call(async |c| c.delete_tap_flow(TapId { id: tf.into() }).await)
        .expect_err("the agent's flow");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(
        refused.message(),
        format!("tap flow {tf:?} was plugged by the networking-spp agent; unplug it through Neutron (the driver writes tap_action \"unplug\"), which frees its mirror slots and etcd keys")
    );
    let refused = lab
        .call(async |c| {
            c.delete_tap_service(TapId {
                id: service_port.into(),
            })
            .await
        })
        .expect_err("the agent's service");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let listing = lab.list();
    assert_eq!(
        (listing.flows.len(), listing.services.len()),
        (1, 1),
        "{listing:?}"
    );
    assert_eq!(etcd.get(&key("tap_status", tf)).as_deref(), Some("up"));
    let before = lab.monitor_rx();
    lab.ping(2);
    lab.expect_monitor(before, 4);

    etcd.put(&key("tap_action", tf), "unplug");
    assert!(wait_until(Duration::from_secs(30), || etcd
        .get(&key("tap_info", tf))
        .is_none()
        && etcd.get(&key("tap_action", tf)).is_none()
        && etcd.get(&key("tap_status", tf)).is_none()));
    assert_eq!(etcd.get(&key("mirror", "0")).as_deref(), Some("None"));
    assert_eq!(etcd.get(&key("mirror", "1")).as_deref(), Some("None"));
    let listing = lab.list();
    assert!(
        listing.flows.is_empty() && listing.services.is_empty(),
        "{listing:?}"
    );
    let before = lab.monitor_rx();
    lab.ping(3);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.monitor_rx(), before, "no copies after unplug");

    // Plugged again, then the source port's interface is deleted: the tap
    // goes, and so do its keys, as networking-spp's agent does on port unplug.
    etcd.put(&key("mirror", "0"), tf);
    plug(tf, "0", "null");
    assert!(wait_until(Duration::from_secs(30), || etcd
        .get(&key("tap_status", tf))
        .as_deref()
        == Some("up")));

    // Plugged once more with other tap_info (OUT on slot 1 instead of IN on
    // slot 0): the new one replaces it, and slot 0 is given back. Before, the
    // "already exists" refusal deleted the working tap.
    let flow_of = |lab: &Lab| {
        lab.list()
            .flows
            .iter()
            .map(|f| (f.id.clone(), f.direction.clone(), f.status.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        flow_of(&lab),
        [(tf.to_string(), "IN".into(), "ACTIVE".into())]
    );
    etcd.put(&key("tap_status", tf), "");
    etcd.put(&key("mirror", "1"), tf);
    plug(tf, "null", "1");
    assert!(
        wait_until(Duration::from_secs(30), || etcd
            .get(&key("tap_status", tf))
            .as_deref()
            == Some("up")),
        "tap_status: {:?}",
        etcd.get(&key("tap_status", tf))
    );
    assert_eq!(
        flow_of(&lab),
        [(tf.to_string(), "OUT".into(), "ACTIVE".into())]
    );
    assert!(wait_until(Duration::from_secs(30), || etcd
        .get(&key("mirror", "0"))
        .as_deref()
        == Some("None")));
    assert_eq!(etcd.get(&key("mirror", "1")).as_deref(), Some(tf));

    // A flow made through the admin API is not the agent's to take: a plug
    // under its id is refused and the flow stays the operator's.
    let mine = "bbbbbbbb-bbbb-cccc-dddd-eeeeeeeeeeee";
    lab.flow(mine, service_port, "OUT", "").unwrap();
    etcd.put(&key("mirror", "0"), mine);
    plug(mine, "null", "0");
    assert!(
        wait_until(Duration::from_secs(30), || etcd
            .get(&key("tap_status", mine))
            .is_some_and(|s| s.starts_with("error:"))),
        "tap_status: {:?}",
        etcd.get(&key("tap_status", mine))
    );
    assert_eq!(
        etcd.get(&key("tap_status", mine)).unwrap(),
        format!("error:tap flow {mine:?} exists and was made through the admin API, not by the networking-spp agent; delete it there, or plug under another id")
    );
    lab.call(async |c| c.delete_tap_flow(TapId { id: mine.into() }).await)
        .expect("the operator's own flow is still the operator's to delete");
    lab.node.ip(&["link", "del", &lab.port.interface]);
    assert!(
        wait_until(Duration::from_secs(30), || etcd
            .get(&key("tap_info", tf))
            .is_none()
            && etcd.get(&key("mirror", "1")).as_deref() == Some("None")),
        "keys left: {:?} {:?}",
        etcd.get(&key("tap_info", tf)),
        etcd.get(&key("mirror", "1"))
    );
    assert!(lab.list().flows.is_empty());
}

#[test]
fn ring_copies_keep_their_vlan_tags() {
    if !kernel_tests_enabled() {
        return;
    }
    ring_copies_keep_vlan_tags(Lab::new());
}

#[test]
fn af_xdp_ring_copies_keep_their_vlan_tags() {
    if !kernel_tests_enabled() {
        return;
    }
    ring_copies_keep_vlan_tags(Lab::af_xdp());
}

/// An AF_XDP ring carries copies only: its veth pair has no IPv6, so the
/// kernel's own router solicitations, MLD reports and DAD probes (the
/// solicitations repeat 4 s apart) never reach the ring.
/// Found by an independent tester in the pcap of a ring with no flow.
#[test]
fn an_af_xdp_ring_with_no_flow_receives_nothing() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::af_xdp();
    // Test namespaces start without IPv6; a node has it.
    for key in ["all", "default"] {
        lab.node.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{key}.disable_ipv6=0"),
        ]);
    }
    let dir = TempDir::new("tmpcap");
    lab.ring_service("quiet", &dir.0.join("quiet.pcap"));
    // Past the second router solicitation (4 s apart).
    std::thread::sleep(Duration::from_secs(6));
    let counters = lab.list().services[0]
        .ring_counters
        .clone()
        .expect("a ring");
    assert_eq!(counters.received, 0, "{counters:?}");
    assert_eq!(
        tshark_fields(&dir.0.join("quiet.pcap"), "frame.number"),
        Vec::<String>::new()
    );
}

/// Found by a tester: an AF_XDP ring deleted whatever interface held its
/// name (an operator's tapped port), and another tap service could send its
/// copies into a ring's veth, where they landed in that ring's pcap.
#[test]
fn an_af_xdp_ring_keeps_to_its_own_interfaces() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::af_xdp();
    let dir = TempDir::new("tmpcap");
    let ring = |file: &str| {
        Destination::Ring(Ring {
            pcap: dir.0.join(file).display().to_string(),
            forward: String::new(),
        })
    };
    // The operator's veth, named as ring 0's would be.
    let out = lab.node.ip(&[
        "link",
        "add",
        "tmr0",
        "type",
        "veth",
        "peer",
        "name",
        "opx",
        "netns",
        &lab.vm1.name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = lab.service("r", ring("r.pcap")).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("\"tmr0\" exists and is not a mirror ring's pair"),
        "{}",
        refused.message()
    );
    assert!(lab.node.ip(&["link", "show", "tmr0"]).status.success());
    assert!(lab.vm1.ip(&["link", "show", "opx"]).status.success());
    assert!(lab.list().services.is_empty());
    // The operator's own pair under both names, each the other's peer, is
    // no leftover either: it lacks the ring's alias.
    assert!(lab.node.ip(&["link", "del", "tmr0"]).status.success());
    let out = lab.node.ip(&[
        "link", "add", "tmr0", "type", "veth", "peer", "name", "tmr0p",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refused = lab.service("r", ring("r.pcap")).unwrap_err();
    assert!(
        refused
            .message()
            .contains("\"tmr0\" exists and is not a mirror ring's pair"),
        "{}",
        refused.message()
    );
    let link = |name: &str| -> serde_json::Value {
        let out = lab.node.ip(&["-j", "link", "show", name]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0].clone()
    };
    let kept = (
        link("tmr0")["ifindex"].clone(),
        link("tmr0p")["ifindex"].clone(),
    );
    assert!(lab.list().services.is_empty());
    // With the alias, as a daemon killed mid-way leaves it: removed, and the
    // ring makes its pair again (new indices, the alias on both ends).
    for end in ["tmr0", "tmr0p"] {
        let out = lab
            .node
            .ip(&["link", "set", end, "alias", "tapmesh mirror ring"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    lab.service("r", ring("r.pcap")).unwrap();
    let (host, peer) = (link("tmr0"), link("tmr0p"));
    assert!(
        host["ifindex"] != kept.0 && peer["ifindex"] != kept.1,
        "{host} {peer}"
    );
    assert_eq!(
        (host["ifalias"].as_str(), peer["ifalias"].as_str()),
        (Some("tapmesh mirror ring"), Some("tapmesh mirror ring"))
    );
    // The ring's own pair: no other service may take it.
    for end in ["tmr0", "tmr0p"] {
        let refused = lab
            .service("s", Destination::Interface(end.into()))
            .unwrap_err();
        assert!(
            refused
                .message()
                .contains(&format!("\"{end}\" is the ring of tap service \"r\"")),
            "{}",
            refused.message()
        );
    }
    let listed: Vec<String> = lab.list().services.iter().map(|s| s.id.clone()).collect();
    assert_eq!(listed, ["r"]);
}

fn ring_copies_keep_vlan_tags(lab: Lab) {
    let dir = TempDir::new("tmpcap");
    let pcap = dir.0.join("vlan.pcap");
    lab.ring_service("ring", &pcap);
    lab.flow("vlans", "ring", "OUT", "10,30-40").unwrap();
    let mut frames = vec![lab.vm1_frame(&[10]); 2];
    frames.extend(vec![lab.vm1_frame(&[20]); 3]);
    frames.extend(vec![lab.vm1_frame(&[35]); 4]);
    // QinQ: the outer 802.1ad tag (offloaded on the port) is the one filtered and kept.
    frames.extend(vec![lab.vm1_frame(&[31, 7]); 2]);
    frames.push(lab.vm1_frame(&[20, 35]));
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &frames);
    lab.wait_delivered(8);
    assert_eq!(
        tshark_fields(&pcap, "vlan.id"),
        ["10", "10", "35", "35", "35", "35", "7", "7"]
    );
    assert_eq!(
        tshark_fields(&pcap, "ieee8021ad.id"),
        ["", "", "", "", "", "", "31", "31"]
    );
}

/// A DPDK application as a ring's consumer (networking-spp's mirror role):
/// the ring forwards its copies out of the tap interface and Debian's
/// `dpdk-testpmd` receives them on the monitor's end through DPDK's
/// AF_PACKET driver, counting exactly the copies.
#[test]
fn dpdk_testpmd_receives_a_rings_forwarded_copies() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let ring = Ring {
        pcap: String::new(),
        forward: lab.tap_if.interface.clone(),
    };
    lab.service("ring", Destination::Ring(ring)).unwrap();
    lab.flow("both", "ring", "BOTH", "").unwrap();
    let testpmd = Testpmd::start(&lab.monitor.name, &lab.mon_if.interface).unwrap();

    lab.ping(25);
    assert!(
        wait_until(Duration::from_secs(30), || {
            lab.list().services[0]
                .ring_counters
                .as_ref()
                .is_some_and(|c| c.consumers.first().is_some_and(|f| f.delivered == 50))
        }),
        "{:?}",
        lab.list().services
    );
    std::thread::sleep(Duration::from_millis(300));
    // Enter stops forwarding and prints the port's counters.
    let (received, output) = testpmd.stop();
    assert_eq!(received, Ok(50), "{output:#?}");
    let counters = lab.list().services[0].ring_counters.clone().unwrap();
    assert_eq!((counters.received, counters.consumers[0].lost), (50, 0));
}

/// Issue 20: a restart emptied the ring's pcap file (earlier captures lost),
/// the file was world-readable, a relative path was the daemon's working
/// directory's, and `--vlan-filter ""` meant every VLAN where TaaS refuses it.
#[test]
fn a_ring_capture_survives_a_restart_private_and_absolute() {
    use std::os::unix::fs::PermissionsExt;
    if !kernel_tests_enabled() {
        return;
    }
    let state = TempDir::new("tmmst");
    let state_args = vec!["--state-dir".to_string(), state.0.display().to_string()];
    let mut lab = Lab::with(|_| state_args.clone());
    let dir = TempDir::new("tmpcap");
    let pcap = dir.0.join("mirror.pcap");
    lab.ring_service("ring", &pcap);
    lab.flow("both", "ring", "BOTH", "").unwrap();
    lab.ping(10);
    lab.wait_delivered(20);
    assert_eq!(tshark_fields(&pcap, "icmp.type").len(), 20);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pcap), 0o600, "copies of other hosts' traffic");

    // The daemon restarts with its taps; the capture goes on in the same file.
    assert!(lab.daemon.stop().success());
    let args: Vec<&str> = state_args.iter().map(String::as_str).collect();
    lab.daemon = Daemon::start(&lab.node.name, &args);
    assert_eq!(lab.list().flows.len(), 1, "the tap flow is restored");
    lab.ping(10);
    lab.wait_delivered(20);
    let types = tshark_fields(&pcap, "icmp.type");
    assert_eq!(types.len(), 40, "both runs' copies: {types:?}");
    assert_eq!(types.iter().filter(|t| *t == "8").count(), 20);
    assert_eq!(mode(&pcap), 0o600);

    // A relative path: refused by the daemon, made absolute by the CLI.
    let relative = Ring {
        pcap: "relative.pcap".into(),
        forward: String::new(),
    };
    let e = lab
        .service("rel", Destination::Ring(relative))
        .expect_err("a relative pcap path");
    assert!(e.message().contains("use an absolute path"), "{e:?}");
    let cli = |args: &[&str]| {
        std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&lab.daemon.socket)
            .current_dir(&dir.0)
            .output()
            .expect("tapmesh")
    };
    let out = cli(&["tap-service", "create", "rel", "--pcap", "relative.pcap"]);
    assert!(out.status.success(), "{out:?}");
    let services = lab.list().services;
    let ring = services
        .iter()
        .find(|s| s.id == "rel")
        .expect("service rel");
    let Some(Destination::Ring(r)) = &ring.destination else {
        panic!("{ring:?}")
    };
    assert_eq!(r.pcap, dir.0.join("relative.pcap").display().to_string());
    assert_eq!(mode(&dir.0.join("relative.pcap")), 0o600);

    // An empty VLAN filter is refused before anything is asked.
    let out = cli(&[
        "tap-flow",
        "create",
        "empty",
        "--tap-service",
        "ring",
        "--source",
        &lab.port.interface,
        "--direction",
        "BOTH",
        "--vlan-filter",
        "",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vlan_filter \"\": empty"), "{err}");
    assert_eq!(lab.list().flows.len(), 1, "no flow made");
    // An interface the node does not have is refused (2), not "not found" (1).
    for args in [
        &[
            "tap-service",
            "create",
            "nosuch",
            "--interface",
            "tmnosuchif0",
        ][..],
        &[
            "tap-service",
            "create",
            "nosuch",
            "--forward",
            "tmnosuchif0",
        ],
        &[
            "tap-flow",
            "create",
            "nosuch",
            "--tap-service",
            "ring",
            "--source",
            "tmnosuchif0",
            "--direction",
            "IN",
        ],
    ] {
        let out = cli(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("interface \"tmnosuchif0\" does not exist"),
            "{err}"
        );
    }
    assert_eq!(lab.list().flows.len(), 1, "no flow made");
}

/// A ring whose pcap directory was gone at a restart was dropped with its
/// flows, and the next change saved the state without them: the operator's
/// capture was lost. It is now kept in ERROR with the reason, its flows too,
/// across changes and restarts, and creating it again starts it.
#[test]
fn a_ring_that_cannot_start_at_a_restart_is_kept_in_error_until_created_again() {
    if !kernel_tests_enabled() {
        return;
    }
    let state = TempDir::new("tmmse");
    let state_args = vec!["--state-dir".to_string(), state.0.display().to_string()];
    let args: Vec<&str> = state_args.iter().map(String::as_str).collect();
    let mut lab = Lab::with(|_| state_args.clone());
    let dir = TempDir::new("tmpce");
    let captures = dir.0.join("captures");
    std::fs::create_dir(&captures).unwrap();
    let pcap = captures.join("mirror.pcap");
    lab.ring_service("ring", &pcap);
    lab.flow("both", "ring", "BOTH", "").unwrap();
    assert!(lab.daemon.stop().success());
    std::fs::remove_dir_all(&captures).unwrap();

    lab.daemon = Daemon::start(&lab.node.name, &args);
    let in_error = |lab: &Lab, flows: usize| {
        let listing = lab.list();
        assert_eq!(listing.services.len(), 1, "{listing:?}");
        let ring = &listing.services[0];
        assert_eq!((ring.id.as_str(), ring.status.as_str()), ("ring", "ERROR"));
        assert!(ring.error.contains(&pcap.display().to_string()), "{ring:?}");
        assert_eq!(listing.flows.len(), flows, "{listing:?}");
        for f in &listing.flows {
            assert_eq!(f.status, "ERROR", "{f:?}");
            assert!(f.error.contains("\"ring\" is in ERROR"), "{f:?}");
        }
        listing
    };
    in_error(&lab, 1);
    // A change saves the state; the ring stays in it.
    lab.flow("out", "ring", "OUT", "").unwrap();
    lab.ping(5);
    let listing = in_error(&lab, 2);
    assert!(listing.flows.iter().all(|f| f.mirrored_packets == 0));
    assert!(!captures.exists());
    assert!(lab.daemon.stop().success());
    lab.daemon = Daemon::start(&lab.node.name, &args);
    in_error(&lab, 2);

    // Fixed and created again: it starts, and both flows copy.
    std::fs::create_dir(&captures).unwrap();
    lab.ring_service("ring", &pcap);
    let listing = lab.list();
    assert_eq!(listing.services[0].status, "ACTIVE", "{listing:?}");
    assert!(listing.services[0].error.is_empty(), "{listing:?}");
    assert!(
        listing
            .flows
            .iter()
            .all(|f| f.status == "ACTIVE" && f.error.is_empty()),
        "{listing:?}"
    );
    lab.ping(10);
    // 20 for BOTH, 10 for OUT.
    lab.wait_delivered(30);
    assert_eq!(tshark_fields(&pcap, "icmp.type").len(), 30);
}

/// Found by a tester: renaming a tap service's interface deleted the
/// service and its flows for good, as a port delete does. A rename now
/// leaves them DOWN until the name is back, as a restart without it does.
#[test]
fn a_renamed_interface_is_no_port_delete() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();
    lab.flow("both", "mon", "BOTH", "").unwrap();
    let before = lab.monitor_rx();
    lab.ping(3);
    lab.expect_monitor(before, 6);
    let tap = lab.tap_if.interface.as_str();
    let rename = |from: &str, to: &str| {
        let out = lab.node.ip(&["link", "set", "dev", from, "name", to]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // A renamed interface must be down; up again after it, it could still take copies.
    lab.node.ip(&["link", "set", "dev", tap, "down"]);
    rename(tap, "tmrenamed");
    lab.node.ip(&["link", "set", "dev", "tmrenamed", "up"]);
    assert!(
        wait_until(Duration::from_secs(20), || lab.list().services[0].status
            == "DOWN"),
        "{:?}",
        lab.list()
    );
    let listing = lab.list();
    assert!(
        listing.services[0].error.contains("tmrenamed"),
        "{listing:?}"
    );
    assert_eq!(listing.flows.len(), 1, "{listing:?}");
    assert_eq!(listing.flows[0].status, "DOWN", "{listing:?}");
    let before = lab.monitor_rx();
    lab.ping(3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        lab.monitor_rx(),
        before,
        "no copy into the renamed interface"
    );
    // Another interface under the old name is another port: not taken.
    let out = lab.node.ip(&[
        "link", "add", tap, "type", "veth", "peer", "name", "tmother",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.list().services[0].status, "DOWN", "{:?}", lab.list());
    assert!(lab.node.ip(&["link", "del", tap]).status.success());
    // Its name back: the same service and flow copy again.
    lab.node.ip(&["link", "set", "dev", "tmrenamed", "down"]);
    rename("tmrenamed", tap);
    lab.node.ip(&["link", "set", "dev", tap, "up"]);
    let active = || {
        let l = lab.list();
        l.services[0].status == "ACTIVE" && l.flows[0].status == "ACTIVE"
    };
    assert!(
        wait_until(Duration::from_secs(20), active),
        "{:?}",
        lab.list()
    );
    let before = lab.monitor_rx();
    lab.ping(3);
    lab.expect_monitor(before, 6);
    // The flow's source renamed: DOWN, naming the new name; back: copies again.
    let port = lab.port.interface.as_str();
    lab.node.ip(&["link", "set", "dev", port, "down"]);
    rename(port, "tmrenport");
    assert!(
        wait_until(Duration::from_secs(20), || lab.list().flows[0].status
            == "DOWN"),
        "{:?}",
        lab.list()
    );
    assert!(
        lab.list().flows[0].error.contains("\"tmrenport\""),
        "{:?}",
        lab.list()
    );
    rename("tmrenport", port);
    lab.node.ip(&["link", "set", "dev", port, "up"]);
    assert!(
        wait_until(Duration::from_secs(20), active),
        "{:?}",
        lab.list()
    );
    // The port's neighbours went with its carrier: one ping resolves them again
    // (their ARP frames are copied too), then the count starts.
    lab.ping(1);
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.monitor_rx();
    lab.ping(3);
    lab.expect_monitor(before, 6);
}

/// A restart is no port delete: a tap flow whose source port did not exist
/// at the start (a VM's port at boot) was dropped and lost from the saved
/// state, and so was a tap service whose interface did not. Both now wait
/// DOWN, stay saved, and start when their interfaces appear.
#[test]
fn taps_whose_interfaces_are_missing_at_a_restart_wait_and_start_when_they_appear() {
    if !kernel_tests_enabled() {
        return;
    }
    let state = TempDir::new("tmmsw");
    let state_args = vec!["--state-dir".to_string(), state.0.display().to_string()];
    let args: Vec<&str> = state_args.iter().map(String::as_str).collect();
    let mut lab = Lab::with(|_| state_args.clone());
    lab.service("mon", Destination::Interface(lab.tap_if.interface.clone()))
        .unwrap();
    lab.flow("both", "mon", "BOTH", "").unwrap();
    let before = lab.monitor_rx();
    lab.ping(5);
    lab.expect_monitor(before, 10);
    assert!(lab.daemon.stop().success());
    // Both ports are gone while the daemon is down.
    lab.node.ip(&["link", "del", &lab.port.interface]);
    lab.node.ip(&["link", "del", &lab.tap_if.interface]);

    let waiting = |lab: &Lab, services: usize| {
        let listing = lab.list();
        assert_eq!(listing.services.len(), services, "{listing:?}");
        let mon = &listing.services[0];
        assert_eq!((mon.id.as_str(), mon.status.as_str()), ("mon", "DOWN"));
        assert!(mon.error.contains("waiting for its interface"), "{mon:?}");
        assert_eq!(listing.flows.len(), 1, "{listing:?}");
        assert_eq!(listing.flows[0].status, "DOWN", "{listing:?}");
        let port = format!("waiting for its interface {:?}", lab.port.interface);
        assert!(listing.flows[0].error.contains(&port), "{listing:?}");
    };
    lab.daemon = Daemon::start(&lab.node.name, &args);
    waiting(&lab, 1);
    // A change saves the state; they stay in it.
    let dir = TempDir::new("tmpcw");
    lab.ring_service("ring", &dir.0.join("ring.pcap"));
    assert!(lab.daemon.stop().success());
    lab.daemon = Daemon::start(&lab.node.name, &args);
    waiting(&lab, 2);

    // The ports come back (as a VM's would), and the taps start.
    let sh = |args: &[&str]| assert!(tapmesh_tests::sh("ip", args).status.success(), "{args:?}");
    for (node_if, far, far_if, node_ip, far_ip) in [
        (
            &lab.port.interface,
            &lab.vm1,
            &lab.vm1_if.interface,
            "198.18.1.1/24",
            "198.18.1.2/24",
        ),
        (
            &lab.tap_if.interface,
            &lab.monitor,
            &lab.mon_if.interface,
            "198.18.3.1/24",
            "198.18.3.2/24",
        ),
    ] {
        sh(&[
            "link",
            "add",
            node_if,
            "netns",
            &lab.node.name,
            "type",
            "veth",
            "peer",
            "name",
            far_if,
            "netns",
            &far.name,
        ]);
        for (ns, interface, ip) in [(&lab.node, node_if, node_ip), (far, far_if, far_ip)] {
            ns.ip(&["addr", "add", ip, "dev", interface]);
            ns.ip(&["link", "set", interface, "up"]);
        }
    }
    lab.vm1
        .ip(&["route", "add", "default", "via", "198.18.1.1"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let l = lab.list();
            l.services.iter().all(|s| s.status == "ACTIVE")
                && l.flows
                    .iter()
                    .all(|f| f.status == "ACTIVE" && f.error.is_empty())
        }),
        "{:?}",
        lab.list()
    );
    // The new links' neighbours are resolved first (their ARP is copied too).
    lab.ping(1);
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.monitor_rx();
    lab.ping(5);
    lab.expect_monitor(before, 10);
}

/// A ring forwarding to an interface that went away stayed ACTIVE, losing
/// every copy ("No such device"), and never used the interface again when it
/// was re-created. Its interface is its destination: it goes with it, as an
/// interface service does. A rename is no delete (it once was).
#[test]
fn a_forward_rings_gone_interface_takes_the_service_and_its_flows() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let ring = Ring {
        pcap: String::new(),
        forward: lab.tap_if.interface.clone(),
    };
    lab.service("fwd", Destination::Ring(ring)).unwrap();
    lab.flow("both", "fwd", "BOTH", "").unwrap();
    let before = lab.monitor_rx();
    lab.ping(2);
    lab.expect_monitor(before, 4);
    // The pinned rule names the ring, not interface 0.
    let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["bpf", "mirror", "list", "-o", "json", "--bpffs-root"])
        .arg(&lab.daemon.bpffs_root)
        .output()
        .unwrap();
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(maps["rules"][0]["ring"], 0, "{maps}");
    let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["bpf", "mirror", "list", "--bpffs-root"])
        .arg(&lab.daemon.bpffs_root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ring slot 0"), "{text}");
    // Renamed, it is the same port (the ring sends by its index): the
    // service stays and its copies still go there, past the daemon's
    // one-second interface check.
    let tap = lab.tap_if.interface.clone();
    lab.node.ip(&["link", "set", "dev", &tap, "down"]);
    let out = lab
        .node
        .ip(&["link", "set", "dev", &tap, "name", "tmfwdren"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.node.ip(&["link", "set", "dev", "tmfwdren", "up"]);
    std::thread::sleep(Duration::from_millis(2500));
    let listing = lab.list();
    assert_eq!(
        (listing.services.len(), listing.flows.len()),
        (1, 1),
        "{listing:?}"
    );
    let before = lab.monitor_rx();
    lab.ping(2);
    lab.expect_monitor(before, 4);
    lab.node.ip(&["link", "del", "tmfwdren"]);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let l = lab.list();
            l.services.is_empty() && l.flows.is_empty()
        }),
        "{:?}",
        lab.list()
    );
}

/// A stop right after the traffic lost the copies of the ring reader's last
/// pause (up to 20 ms of them): the rings stopped without reading the ring
/// buffer once more.
#[test]
fn a_stop_right_after_the_traffic_leaves_every_copy_in_the_pcap() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = Lab::new();
    let dir = TempDir::new("tmpcst");
    let pcap = dir.0.join("stop.pcap");
    lab.ring_service("ring", &pcap);
    lab.flow("both", "ring", "BOTH", "").unwrap();
    lab.ping(20);
    assert!(lab.daemon.stop().success());
    let types = tshark_fields(&pcap, "icmp.type");
    assert_eq!(types.len(), 40, "{types:?}");
}

/// Deleting a ring's tap service right after the traffic leaves every copy
/// the kernel took in its pcap (they were still in the ring buffer).
#[test]
fn a_ring_deleted_right_after_the_traffic_leaves_every_copy_in_the_pcap() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new("tmpcdl");
    for round in 0..3 {
        let pcap = dir.0.join(format!("delete{round}.pcap"));
        lab.ring_service("ring", &pcap);
        lab.flow("both", "ring", "BOTH", "").unwrap();
        lab.ping(10);
        let id = TapId { id: "ring".into() };
        lab.call(async |c| c.delete_tap_service(id).await)
            .expect("delete service");
        let types = tshark_fields(&pcap, "icmp.type");
        assert_eq!(types.len(), 20, "round {round}: {types:?}");
    }
}

/// Issue 20: the networking-spp agent kept what it owned in memory only.
/// Unplugging its last flow on a tap service deleted the service with every
/// flow on it, a CLI-made one included; and a flow whose etcd keys were
/// deleted while the daemon was down came back and kept copying. It now
/// deletes only what it created, and reconciles its persisted taps at start.
#[test]
fn the_spp_agent_touches_only_its_own_taps_and_reconciles_after_a_restart() {
    if !kernel_tests_enabled() {
        return;
    }
    const HOST: &str = "compute-2";
    let state = TempDir::new("tmspp");
    let mut etcd = None;
    let mut daemon_args = Vec::new();
    let mut lab = Lab::with(|node| {
        let e = tapmesh_tests::etcd::Etcd::new_in(&node.name);
        daemon_args = vec![
            "--etcd-endpoint".to_string(),
            e.endpoint.clone(),
            "--spp-host".into(),
            HOST.into(),
            "--state-dir".into(),
            state.0.display().to_string(),
        ];
        etcd = Some(e);
        daemon_args.clone()
    });
    let etcd = etcd.unwrap();
    let key = |kind: &str, id: &str| format!("/spp/openstack/{kind}/{HOST}/{id}");
    let (service_port, source_port) = (
        "11111111-2222-3333-4444-555555555555",
        "66666666-7777-8888-9999-000000000000",
    );
    let (tf1, tf2) = (
        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeee1",
        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeee2",
    );
    etcd.put(&key("mirror", "0"), "None");
    for (port, interface) in [
        (service_port, &lab.tap_if.interface),
        (source_port, &lab.port.interface),
    ] {
        etcd.put(
            &key("bind_port", port),
            &format!(r#"{{"mac_address": "fa:16:3e:00:00:01", "vhost_id": 0, "interface": "{interface}"}}"#),
        );
    }
    let plug = |tf: &str| {
        etcd.put(&key("mirror", "0"), tf);
        etcd.put(
            &key("tap_info", tf),
            &format!(r#"{{"service_port": "{service_port}", "source_port": "{source_port}", "mirror_in": 0, "mirror_out": null}}"#),
        );
        etcd.put(&key("tap_action", tf), "plug");
    };
    let ids = |lab: &Lab| {
        let l = lab.list();
        let flows: Vec<String> = l.flows.iter().map(|f| f.id.clone()).collect();
        let services: Vec<String> = l.services.iter().map(|s| s.id.clone()).collect();
        (flows, services)
    };
    plug(tf1);
    assert!(
        wait_until(Duration::from_secs(30), || etcd
            .get(&key("tap_status", tf1))
            .as_deref()
            == Some("up")),
        "{}",
        lab.daemon.log_text()
    );
    // An operator's flow on the agent's tap service.
    lab.flow("by-hand", service_port, "OUT", "").unwrap();
    etcd.put(&key("tap_action", tf1), "unplug");
    assert!(wait_until(Duration::from_secs(30), || etcd
        .get(&key("tap_info", tf1))
        .is_none()));
    assert!(wait_until(Duration::from_secs(30), || ids(&lab).0
        == vec!["by-hand".to_string()]));
    assert_eq!(
        ids(&lab),
        (vec!["by-hand".into()], vec![service_port.into()]),
        "the operator's flow and the service it needs stay"
    );
    let before = lab.monitor_rx();
    lab.ping(5);
    lab.expect_monitor(before, 5);
    lab.delete_flow("by-hand");

    // Plugged, then its keys deleted while the daemon is down.
    plug(tf2);
    assert!(wait_until(Duration::from_secs(30), || etcd
        .get(&key("tap_status", tf2))
        .as_deref()
        == Some("up")));
    assert_eq!(ids(&lab).0, vec![tf2.to_string()]);
    assert!(lab.daemon.stop().success());
    for kind in ["tap_info", "tap_action", "tap_status"] {
        assert!(etcd.delete(&key(kind, tf2)), "{kind}");
    }
    etcd.put(&key("mirror", "0"), "None");
    let args: Vec<&str> = daemon_args.iter().map(String::as_str).collect();
    lab.daemon = Daemon::start(&lab.node.name, &args);
    assert!(
        wait_until(Duration::from_secs(30), || ids(&lab)
            == (Vec::new(), Vec::new())),
        "{:?}\n{}",
        ids(&lab),
        lab.daemon.log_text()
    );
    let before = lab.monitor_rx();
    lab.ping(3);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.monitor_rx(), before, "no copies of the deleted tap");
}

/// Issue 20: with the monitor's end of the tap interface down, every copy is
/// dropped by the kernel; each is counted as failed, none as mirrored.
#[test]
fn copies_to_a_monitor_whose_far_end_is_down_count_as_failed() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::monitored();
    lab.flow("out", "mon", "OUT", "").unwrap();
    lab.monitor
        .ip(&["link", "set", &lab.mon_if.interface, "down"]);
    let frames = vec![lab.vm1_frame(&[]); 100];
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &frames);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let f = &lab.list().flows[0];
            f.failed + f.mirrored_packets >= 100
        }),
        "{:?}",
        lab.list().flows
    );
    std::thread::sleep(Duration::from_millis(100));
    let f = &lab.list().flows[0];
    assert_eq!((f.mirrored_packets, f.failed), (0, 100), "{f:?}");

    // The far end back up: copies are delivered and counted as mirrored again.
    lab.monitor
        .ip(&["link", "set", &lab.mon_if.interface, "up"]);
    let before = lab.monitor_rx();
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &frames[..10]);
    lab.expect_monitor(before, 10);
    let f = &lab.list().flows[0];
    assert_eq!((f.mirrored_packets, f.failed), (10, 100), "{f:?}");
}

/// Issue 20: an AF_XDP ring whose receive loop falls behind (the daemon
/// frozen with SIGSTOP while 10000 copies arrive) loses what its socket
/// cannot hold; the kernel's count of those drops shows in the tap-flow
/// list, and every copy is either received or dropped there.
#[test]
fn a_ring_that_falls_behind_shows_its_drops_in_tap_flow_list() {
    if !kernel_tests_enabled() {
        return;
    }
    const SENT: u64 = 10_000;
    let dir = TempDir::new("ringdrops");
    let lab = Lab::af_xdp();
    lab.ring_service("ring", &dir.0.join("drops.pcap"));
    lab.flow("out", "ring", "OUT", "").unwrap();
    let pid = lab.daemon.pid() as i32;
    freeze(pid);
    let frames = vec![lab.vm1_frame(&[]); SENT as usize];
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &frames);
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let settled = wait_until(Duration::from_secs(30), || {
        let l = lab.list();
        let c = l.services[0].ring_counters.clone().unwrap_or_default();
        c.received + c.socket_dropped + c.ring_full >= SENT
    });
    let l = lab.list();
    let c = l.services[0].ring_counters.clone().expect("ring counters");
    let f = &l.flows[0];
    assert!(settled, "{c:?} {f:?}");
    assert_eq!((f.mirrored_packets, f.failed), (SENT, 0), "{f:?}");
    let drops = c.socket_dropped + c.ring_full;
    assert!(c.received > 0 && drops > 0, "{c:?}");
    assert_eq!(c.received + drops, SENT, "{c:?}");
    assert_eq!(f.ring_drops, Some(drops));
    let text = lab.daemon.cli(&["tap-flow", "list"]);
    let row = text.lines().nth(1).expect("a flow row");
    assert!(
        row.starts_with("out ") && row.ends_with(&format!(" {drops}")),
        "{text}"
    );
}

/// The ring buffer holds the copies while its reader is frozen (SIGSTOP),
/// exactly as many as fit; the rest are the flow's failed copies, and every
/// copy the buffer held reaches the ring's consumer once the reader runs
/// again.
/// SIGSTOP, then waits until every thread of `pid` is stopped (the signal
/// is delivered asynchronously). SIGCONT is the caller's.
fn freeze(pid: i32) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                    .unwrap_or(true)
            })
    };
    assert!(
        wait_until(Duration::from_secs(30), stopped),
        "the daemon did not stop"
    );
}

#[test]
fn a_full_ring_buffer_counts_the_copies_it_had_no_room_for() {
    if !kernel_tests_enabled() {
        return;
    }
    use tapmesh_common::mirror::CopyHead;
    // A small buffer (`dataplane.mirror_copy_bytes`), so that few copies fill it.
    const BYTES: u64 = 1 << 20;
    const SENT: u64 = 20_000;
    let dir = TempDir::new("ringfull");
    let pcap = dir.0.join("full.pcap");
    let config = dir.0.join("tapmesh.toml");
    std::fs::write(
        &config,
        format!("[dataplane]\nmirror_copy_bytes = {BYTES}\n"),
    )
    .unwrap();
    let lab = Lab::with(|_| vec!["--config".into(), config.display().to_string()]);
    lab.ring_service("ring", &pcap);
    lab.flow("out", "ring", "OUT", "").unwrap();
    let frame = lab.vm1_frame(&[]);
    // A record: the kernel's 8-byte header, then the copy's head and the
    // frame rounded up to 8 bytes.
    let record = 8 + (size_of::<CopyHead>() + frame.len()).next_multiple_of(8) as u64;
    let room = BYTES / record;
    assert!(room < SENT, "{room} copies fit");
    let pid = lab.daemon.pid() as i32;
    freeze(pid);
    send_frames(
        &lab.vm1.name,
        &lab.vm1_if.interface,
        &vec![frame; SENT as usize],
    );
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let settled = wait_until(Duration::from_secs(30), || {
        let l = lab.list();
        let c = l.services[0].ring_counters.clone().unwrap_or_default();
        c.consumers
            .first()
            .is_some_and(|p| p.delivered + p.lost >= room)
    });
    let l = lab.list();
    let c = l.services[0].ring_counters.clone().expect("ring counters");
    let f = &l.flows[0];
    assert!(settled, "{c:?} {f:?}");
    assert_eq!((f.mirrored_packets, f.failed), (room, SENT - room), "{f:?}");
    assert_eq!(c.received, room, "{c:?}");
    // A consumer queue without room loses a batch (a slow consumer never
    // slows the ring); what it got is in the file.
    let delivered = c.consumers[0].delivered;
    assert_eq!(delivered + c.consumers[0].lost, room, "{c:?}");
    assert!(delivered > 0, "{c:?}");
    assert_eq!(tshark_fields(&pcap, "udp.dstport").len() as u64, delivered);
}

/// A FIFO with no reader as the pcap path is refused at once (the open
/// blocked the mirror service, every later call, the stop and the next
/// start); a second service writing the same file is refused (two global
/// headers and interleaved records made it unreadable). Both are the
/// caller's to fix: INVALID_ARGUMENT, and the first service's capture
/// stays whole.
#[test]
fn a_fifo_without_a_reader_and_a_shared_pcap_are_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let lab = Lab::new();
    let dir = TempDir::new("tmpcap");
    let fifo = dir.0.join("live");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a path of our own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let e = lab
        .service(
            "ff",
            Destination::Ring(Ring {
                pcap: fifo.display().to_string(),
                forward: String::new(),
            }),
        )
        .expect_err("a FIFO with no reader");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("a FIFO with no reader"), "{e:?}");
    assert!(lab.list().services.is_empty());

    let pcap = dir.0.join("shared.pcap");
    lab.ring_service("one", &pcap);
    // The same file spelt otherwise: `.`, `..` (found by an independent
    // tester, with the symlink), a symlink to it, a symlinked directory.
    std::fs::create_dir(dir.0.join("sub")).unwrap();
    std::os::unix::fs::symlink(&pcap, dir.0.join("link.pcap")).unwrap();
    std::os::unix::fs::symlink(&dir.0, dir.0.join("again")).unwrap();
    for spelling in [
        format!("{}/./shared.pcap", dir.0.display()),
        format!("{}/sub/../shared.pcap", dir.0.display()),
        format!("{}/link.pcap", dir.0.display()),
        format!("{}/again/shared.pcap", dir.0.display()),
    ] {
        let e = lab
            .service(
                "two",
                Destination::Ring(Ring {
                    pcap: spelling.clone(),
                    forward: String::new(),
                }),
            )
            .expect_err(&spelling);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .contains("is written by tap service \"one\" already"),
            "{spelling}: {e:?}"
        );
    }
    lab.flow("both", "one", "BOTH", "").unwrap();
    lab.ping(10);
    lab.wait_delivered(20);
    assert_eq!(tshark_fields(&pcap, "icmp.type").len(), 20);
}

/// A pcap file on a full disk: the failed write is cut back, so the file
/// ends in a whole record, and the consumer's counts are the file's
/// (delivered = records in it, delivered + lost = frames received); with
/// room again, capture goes on and nothing counted lost turns up later.
/// Before, the file ended in half a record and 4300 copies counted lost
/// were written once there was room.
#[test]
fn a_full_disk_leaves_whole_records_and_exact_counts() {
    if !kernel_tests_enabled() {
        return;
    }
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let dir = TempDir::new("tmfull");
    let mount = |options: &str| {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {options}");
    };
    mount("size=256k");
    let _mounted = Mounted(dir.0.clone());
    let pcap = dir.0.join("full.pcap");
    let lab = Lab::new();
    lab.ring_service("ring", &pcap);
    lab.flow("out", "ring", "OUT", "").unwrap();
    let frame = lab.vm1_frame(&[]);
    let counts = || {
        let c = lab.list().services[0]
            .ring_counters
            .clone()
            .unwrap_or_default();
        (
            c.received,
            c.consumers
                .first()
                .map_or((0, 0), |p| (p.delivered, p.lost)),
        )
    };
    let settle = |want: u64| {
        let done = wait_until(Duration::from_secs(30), || {
            let (received, (delivered, lost)) = counts();
            received == want && delivered + lost == want
        });
        assert!(done, "{:?}", counts());
    };
    // In rounds apart, so that several writes fit before one fails (a
    // failed write loses what it held, at most a MiB).
    for _ in 0..10 {
        send_frames(
            &lab.vm1.name,
            &lab.vm1_if.interface,
            &vec![frame.clone(); 500],
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    settle(5000);
    let (_, (delivered, lost)) = counts();
    assert!(lost > 0 && delivered > 0, "the disk filled: {:?}", counts());
    // tshark reads every record to the end: no record was cut.
    assert_eq!(tshark_fields(&pcap, "udp.dstport").len() as u64, delivered);

    // Room again: the capture goes on after the whole records.
    let ok = std::process::Command::new("mount")
        .args(["-o", "remount,size=8m"])
        .arg(&dir.0)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    send_frames(&lab.vm1.name, &lab.vm1_if.interface, &vec![frame; 1000]);
    settle(6000);
    let (_, (after, lost_after)) = counts();
    assert_eq!(
        (after, lost_after),
        (delivered + 1000, lost),
        "{:?}",
        counts()
    );
    assert_eq!(tshark_fields(&pcap, "udp.dstport").len() as u64, after);
}
