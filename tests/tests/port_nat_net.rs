//! Meridio's destination port NAT with real traffic (the TAPA lab): the
//! conduit translates TCP 7000 → 7070 and UDP 5000 → 6000 on VIP A; the
//! application listens on the target ports only, the client dials the VIP's
//! ports and must see every answer come from them. A refused NAT edit
//! leaves every pinned map byte for byte as it was.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};
use std::time::Duration;

use tapmesh_tests::{
    daemon::{named, packets},
    kernel_tests_enabled,
    maps::{differences, dump_pinned},
    net::{run_in, spawn_in, tcp_echo, TcpEchoServer, CLIENT},
    tapa::{TapaLab, NSP_CONFIG, VIP_A},
};

const UDP_PORT: u16 = 5000;
const UDP_TARGET: u16 = 6000;
const TCP_PORT: u16 = 7000;
const TCP_TARGET: u16 = 7070;
const DATAGRAMS: usize = 50;

/// The lab's configuration with the conduit's port NATs.
fn with_nats(nats: &str) -> String {
    NSP_CONFIG.replacen(
        "name = \"conduit-a\"\n",
        &format!("name = \"conduit-a\"\ndestination_port_nats = [{nats}]\n"),
        1,
    )
}

fn nats() -> String {
    format!(
        "{{ port = {TCP_PORT}, target_port = {TCP_TARGET}, protocol = \"tcp\", vips = [\"vip-a\"] }}, \
         {{ port = {UDP_PORT}, target_port = {UDP_TARGET}, protocol = \"udp\", vips = [\"vip-a\"] }}"
    )
}

/// Echoes datagrams on `bind` in namespace `netns` until stopped; returns the
/// senders it saw.
fn udp_echo(
    netns: &str,
    bind: SocketAddrV4,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<SocketAddr>> {
    spawn_in(netns, move || {
        let socket = UdpSocket::bind(bind).expect("binding the UDP echo");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                seen.push(from);
                let _ = socket.send_to(&buf[..n], from);
            }
        }
        seen
    })
}

#[test]
fn clients_dial_the_vip_port_targets_answer_from_the_target_port() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    lab.stop_daemon();
    lab.write_config(&with_nats(&nats()));
    lab.start_daemon();
    let (a, _tap) = lab.open_stream_a(0, "30s");

    // The conduit program sits on the node side of the application's conduit.
    let status = lab.daemon().status();
    assert!(
        status
            .attachments
            .iter()
            .any(|x| x.program == "tm_tc_conduit" && x.interface.starts_with("tmc")),
        "{:?}",
        status.attachments
    );

    // UDP: the application answers on VIP:6000, the client sees VIP:5000.
    let stop = Arc::new(AtomicBool::new(false));
    let echo = udp_echo(
        &lab.apps[0].name,
        SocketAddrV4::new(VIP_A, UDP_TARGET),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let answers = run_in(&lab.client.name, || {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let port = socket.local_addr().unwrap().port();
        let mut answers = Vec::new();
        let mut buf = [0u8; 64];
        for i in 0..DATAGRAMS {
            let msg = format!("q{i}");
            socket
                .send_to(msg.as_bytes(), SocketAddrV4::new(VIP_A, UDP_PORT))
                .unwrap();
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => answers.push((from, buf[..n].to_vec(), msg.into_bytes())),
                Err(e) => panic!("datagram {i}: no answer: {e}"),
            }
        }
        (port, answers)
    });
    stop.store(true, Ordering::SeqCst);
    let seen = echo.join().unwrap();
    let (client_port, answers) = answers;
    assert_eq!(answers.len(), DATAGRAMS);
    for (from, got, sent) in &answers {
        assert_eq!(*from, SocketAddr::from(SocketAddrV4::new(VIP_A, UDP_PORT)));
        assert_eq!(got, sent);
    }
    // The application saw the client as it is (only the destination port changed).
    assert_eq!(seen.len(), DATAGRAMS);
    assert!(
        seen.iter()
            .all(|s| *s == SocketAddr::from(SocketAddrV4::new(CLIENT, client_port))),
        "{seen:?}"
    );

    // TCP: connections to VIP:7000 complete with the server on 7070 only
    // (a SYN-ACK from any other port would not be the client's connection).
    let server = TcpEchoServer::start(
        &lab.apps[0].name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, TCP_TARGET),
    );
    let messages: Vec<Vec<u8>> = (0..10).map(|i| format!("hello {i}").into_bytes()).collect();
    for (got, want) in tcp_echo(
        &lab.client.name,
        SocketAddrV4::new(VIP_A, TCP_PORT),
        &messages,
    )
    .into_iter()
    .zip(&messages)
    {
        assert_eq!(&got.unwrap(), want, "{}", lab.ambassadors[a].log_text());
    }
    assert_eq!(server.echoed(), messages.len() as u64);

    // The same through the NAT from a client that leaves its checksums to
    // its veth: the NAT keeps the unfinished sum, the uplink detours it.
    lab.client
        .exec(&["ethtool", "-K", &lab.client_if, "tx", "on"]);
    let long: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("offloaded {i} ").repeat(1 + 400 * i).into_bytes())
        .collect();
    let got = tcp_echo(&lab.client.name, SocketAddrV4::new(VIP_A, TCP_PORT), &long);
    for (i, (got, want)) in got.into_iter().zip(&long).enumerate() {
        assert_eq!(
            got.as_ref(),
            Ok(want),
            "connection {i} with offloaded checksums"
        );
    }
    lab.client
        .exec(&["ethtool", "-K", &lab.client_if, "tx", "off"]);
    drop(server);
    let status = lab.daemon().status();
    let replies = packets(&status, "tc_conduit", "pass");
    assert!(
        replies >= DATAGRAMS as u64 + 10 * 3,
        "tc_conduit passed {replies}"
    );

    // A colliding edit (Meridio refuses it too) is refused: every map stays.
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let before = dump_pinned(&pins);
    let colliding = format!(
        "{}, {{ port = 7001, target_port = {TCP_TARGET}, protocol = \"tcp\", vips = [\"vip-a\"] }}",
        nats()
    );
    lab.write_config(&with_nats(&colliding));
    let refused = lab.daemon().status_when(|s| {
        s.plugins
            .iter()
            .any(|p| p.name == "nsp" && p.detail.contains("config not reloaded"))
    });
    let nsp = refused.plugins.iter().find(|p| p.name == "nsp").unwrap();
    assert!(nsp.detail.contains("collide on VIP \"vip-a\""), "{nsp:?}");
    let diff = differences(&before, &dump_pinned(&pins));
    assert!(diff.is_empty(), "a refused change wrote: {diff:?}");
    let zero = named(&refused, "xdp_uplink", "no_flow_match");

    // Without the NATs the application's port is the VIP's port again.
    lab.write_config(NSP_CONFIG);
    let _direct = TcpEchoServer::start(
        &lab.apps[0].name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, TCP_PORT),
    );
    let mut ok = false;
    for _ in 0..50 {
        let got = tcp_echo(
            &lab.client.name,
            SocketAddrV4::new(VIP_A, TCP_PORT),
            &messages[..1],
        );
        if got[0].as_ref().is_ok_and(|b| *b == messages[0]) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "port 7000 served directly once the NAT is gone");
    assert_eq!(
        named(&lab.daemon().status(), "xdp_uplink", "no_flow_match"),
        zero
    );
}

/// The conduit program is attached to the conduit; a colliding NAT edit
/// (Meridio refuses it too) is refused with every pinned map as it was.
#[test]
fn a_refused_nat_edit_leaves_every_map_as_it_was() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let (_a, _tap) = lab.open_stream_a(0, "30s");
    let status = lab.daemon().status();
    assert!(
        status
            .attachments
            .iter()
            .any(|x| x.program == "tm_tc_conduit" && x.interface.starts_with("tmc")),
        "{:?}",
        status.attachments
    );
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let before = dump_pinned(&pins);
    let refused_with = |config: String, why: &str| {
        lab.write_config(&config);
        let refused = lab.daemon().status_when(|s| {
            s.plugins.iter().any(|p| {
                p.name == "nsp"
                    && p.detail.contains("config not reloaded")
                    && p.detail.contains(why)
            })
        });
        let nsp = refused.plugins.iter().find(|p| p.name == "nsp").unwrap();
        assert!(nsp.detail.contains(why), "{nsp:?}");
        let diff = differences(&before, &dump_pinned(&pins));
        assert!(diff.is_empty(), "a refused change wrote: {diff:?}");
    };
    let colliding = format!(
        "{}, {{ port = 7001, target_port = {TCP_TARGET}, protocol = \"tcp\", vips = [\"vip-a\"] }}",
        nats()
    );
    refused_with(with_nats(&colliding), "collide on VIP \"vip-a\"");
}
