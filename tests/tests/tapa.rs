//! The ambassador (TAPA) and the node's target registry with real traffic:
//! an unprivileged ambassador in each application namespace, the daemon on
//! the node, VIP traffic from a client namespace.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tapmesh::proto::ambassador::stream_status::Status as S;
use tapmesh_tests::{
    daemon::named,
    kernel_tests_enabled,
    net::{send_udp_flows, tcp_echo, wait_until, TcpEchoServer, UdpReceiver, CLIENT},
    tapa::{status_of, stream, TapaLab, NSP_CONFIG, OPEN_WITHIN, VIP_A, VIP_B},
};

const PORTS: std::ops::Range<u16> = 40000..40050;

fn send(lab: &TapaLab, vip: Ipv4Addr, rounds: u32) -> u64 {
    let ports: Vec<u16> = PORTS.collect();
    send_udp_flows(
        &lab.client.name,
        CLIENT,
        &ports,
        SocketAddrV4::new(vip, 5000),
        rounds,
        b"tapa",
    )
}

fn receiver(lab: &TapaLab, app: usize) -> UdpReceiver {
    UdpReceiver::start(
        &lab.apps[app].name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 5000),
    )
}

/// What to look at when traffic went missing: the LB listing and the uplink counters.
fn diagnose(lab: &TapaLab) -> String {
    let lb = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["lb", "list", "--admin-socket"])
        .arg(&lab.daemon().socket)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let status = lab.daemon().status();
    let xdp = status.programs.iter().find(|p| p.program == "xdp_uplink");
    format!("{lb}\n{xdp:?}\n{}", lab.registry_list())
}

fn links_in(lab: &TapaLab, app: usize) -> String {
    String::from_utf8_lossy(&lab.apps[app].ip(&["-o", "addr", "show"]).stdout).into_owned()
}

#[test]
fn an_opened_stream_gets_the_vip_traffic_and_close_stops_it() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let (a, mut tap) = lab.open_stream_a(0, "30s");
    // Open again: idempotent.
    tap.open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    assert!(
        tap.wait_status("stream-a", S::Open, OPEN_WITHIN),
        "not OPEN: {}",
        lab.ambassadors[a].log_text()
    );
    // The daemon put the conduit's VIPs on the application's interface.
    let addrs = links_in(&lab, 0);
    assert!(
        addrs.contains("conduit0") && addrs.contains("203.0.113.10/32"),
        "{addrs}"
    );
    assert!(
        addrs.contains("203.0.113.11/32"),
        "every VIP of the conduit's flows: {addrs}"
    );
    let registered = lab.registered("stream-a");
    assert_eq!(registered.len(), 1, "{}", lab.registry_list());
    assert_eq!(registered[0].1, "ENABLED");
    let rules = || String::from_utf8_lossy(&lab.apps[0].ip(&["rule"]).stdout).into_owned();
    let vip_rules = |text: &str| text.lines().filter(|l| l.contains("lookup 100")).count();
    assert_eq!(vip_rules(&rules()), 2, "a rule per VIP: {}", rules());

    let rx = receiver(&lab, 0);
    let sent = send(&lab, VIP_A, 4);
    assert!(
        wait_until(Duration::from_secs(30), || rx.count() == sent),
        "{} of {sent}: {}",
        rx.count(),
        diagnose(&lab)
    );
    // TCP connections complete end to end (the reply leaves from the VIP).
    let echo = TcpEchoServer::start(
        &lab.apps[0].name,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000),
    );
    let messages: Vec<Vec<u8>> = (0..5).map(|i| format!("hello {i}").into_bytes()).collect();
    for (got, want) in tcp_echo(&lab.client.name, SocketAddrV4::new(VIP_A, 7000), &messages)
        .into_iter()
        .zip(&messages)
    {
        assert_eq!(&got.unwrap(), want);
    }
    drop(echo);

    // Close: unregistered, the conduit interface removed, the VIP traffic dropped.
    tap.close(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    assert!(tap
        .watch_until(Duration::from_secs(30), |m| status_of(m, "stream-a")
            .is_none())
        .last()
        .is_some_and(|m| m.stream_status.is_empty()));
    assert!(
        lab.registered("stream-a").is_empty(),
        "{}",
        lab.registry_list()
    );
    assert!(!links_in(&lab, 0).contains("conduit0"));
    // The VIPs' policy rules went with it (they stayed in the namespace).
    assert_eq!(vip_rules(&rules()), 0, "{}", rules());
    let before = named(&lab.daemon().status(), "xdp_uplink", "no_target");
    let dropped = send(&lab, VIP_A, 2);
    let s = lab
        .daemon()
        .status_when(|s| named(s, "xdp_uplink", "no_target") - before >= dropped);
    assert_eq!(named(&s, "xdp_uplink", "no_target") - before, dropped);
    assert_eq!(rx.count(), sent, "nothing more reached the application");
}

/// Found by a tester: when an application's namespace was deleted, the
/// daemon forgot the conduit but kept listing its two TC programs as "gone"
/// (in `tapmesh status` and as `tapmesh_attached 0`), one pair per pod, forever.
#[test]
fn a_deleted_application_namespace_takes_its_conduit_and_its_programs_along() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let before: Vec<String> = lab
        .daemon()
        .status()
        .attachments
        .iter()
        .map(|a| a.interface.clone())
        .collect();
    let (a, _tap) = lab.open_stream_a(0, "30s");
    let mut conduit: Vec<(String, String)> = lab
        .daemon()
        .status()
        .attachments
        .iter()
        .filter(|a| !before.contains(&a.interface))
        .map(|a| (a.interface.clone(), a.hook.clone()))
        .collect();
    conduit.sort();
    let host = conduit.first().map(|c| c.0.clone()).unwrap_or_default();
    assert_eq!(
        conduit,
        [
            (host.clone(), "tc-egress".to_string()),
            (host.clone(), "tc-ingress".to_string())
        ],
        "the conduit's programs"
    );
    assert_eq!(
        lab.registered("stream-a").len(),
        1,
        "{}",
        lab.registry_list()
    );
    // Gone without a word: the ambassador killed, then its namespace deleted.
    lab.ambassadors[a].kill();
    let out = std::process::Command::new("ip")
        .args(["netns", "del", &lab.apps[0].name])
        .output()
        .expect("ip netns del");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon looks at its conduits' links every 2 s.
    let forgotten = || {
        !lab.daemon()
            .status()
            .attachments
            .iter()
            .any(|a| a.interface == host)
    };
    assert!(
        wait_until(Duration::from_secs(20), forgotten),
        "{:?}",
        lab.daemon().status().attachments
    );
    // Published after the programs are forgotten: waited for too.
    assert!(
        wait_until(Duration::from_secs(30), || lab
            .registered("stream-a")
            .is_empty()),
        "{}",
        lab.registry_list()
    );
}

#[test]
fn two_applications_on_two_streams_of_one_conduit_and_a_second_trench_refused() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(3, "60s");
    let mut taps = lab.start_ambassadors("30s");
    taps[0]
        .open(stream("stream-a", "conduit-a", "trench-a"))
        .unwrap();
    taps[1]
        .open(stream("stream-b", "conduit-a", "trench-a"))
        .unwrap();
    assert!(taps[0].wait_status("stream-a", S::Open, OPEN_WITHIN));
    assert!(taps[1].wait_status("stream-b", S::Open, OPEN_WITHIN));

    let (rx0, rx1) = (receiver(&lab, 0), receiver(&lab, 1));
    let to_a = send(&lab, VIP_A, 2);
    let to_b = send(&lab, VIP_B, 3);
    assert!(wait_until(Duration::from_secs(30), || rx0.count() == to_a
        && rx1.count() == to_b));
    assert_eq!(
        (rx0.count(), rx1.count()),
        (to_a, to_b),
        "each VIP to its stream's application"
    );

    // One trench per application.
    let e = taps[0]
        .open(stream("stream-x", "conduit-x", "trench-b"))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("another trench is already connected"),
        "{e}"
    );

    // stream-b takes one target: a second application cannot get an identifier.
    taps[2]
        .open(stream("stream-b", "conduit-a", "trench-a"))
        .unwrap();
    assert!(
        wait_until(OPEN_WITHIN, || lab.ambassadors[2]
            .log_text()
            .contains("no identifier available to register the target")),
        "{}",
        lab.ambassadors[2].log_text()
    );
    assert!(taps[2].wait_status("stream-b", S::Unavailable, Duration::from_secs(30)));
    assert_eq!(
        lab.registered("stream-b").len(),
        1,
        "{}",
        lab.registry_list()
    );

    // A stream the configuration does not define is UNDEFINED.
    taps[2]
        .open(stream("stream-z", "conduit-a", "trench-a"))
        .unwrap();
    assert!(taps[2].wait_status("stream-z", S::Undefined, OPEN_WITHIN));

    // Bad requests get a clear status and register nothing.
    let mut nil_conduit = stream("stream-a", "conduit-a", "trench-a");
    nil_conduit.conduit = None;
    let e = taps[2].open(nil_conduit).unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::InvalidArgument, "conduit cannot be nil")
    );
    let mut nil_trench = stream("stream-a", "conduit-a", "trench-a");
    nil_trench.conduit.as_mut().unwrap().trench = None;
    let e = taps[2].open(nil_trench).unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::InvalidArgument, "trench cannot be nil")
    );
    let e = taps[2]
        .open(stream("bad/name", "conduit-a", "trench-a"))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("invalid character"), "{e}");
    let long = "s".repeat(254);
    let e = taps[2]
        .open(stream(&long, "conduit-a", "trench-a"))
        .unwrap_err();
    assert!(e.message().contains("longer than 253 bytes"), "{e}");
    assert_eq!(lab.registered("stream-a").len(), 1);
}

#[test]
fn identifiers_are_unique_per_stream_and_a_killed_ambassador_expires() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(3, "3s");
    let mut taps = lab.start_ambassadors("1s");
    for tap in &mut taps {
        tap.open(stream("stream-a", "conduit-a", "trench-a"))
            .unwrap();
    }
    for tap in &mut taps {
        assert!(tap.wait_status("stream-a", S::Open, OPEN_WITHIN));
    }
    let mut ids: Vec<String> = lab
        .registered("stream-a")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        3,
        "three distinct identifiers: {}",
        lab.registry_list()
    );

    let receivers: Vec<UdpReceiver> = (0..3).map(|i| receiver(&lab, i)).collect();
    let sent = send(&lab, VIP_A, 4);
    assert!(wait_until(Duration::from_secs(30), || receivers
        .iter()
        .map(UdpReceiver::count)
        .sum::<u64>()
        == sent));
    assert!(
        receivers.iter().all(|r| r.count() > 0),
        "every target gets a share"
    );

    // Killed without Close: its entry expires (3 s) and the others keep all the traffic.
    lab.ambassadors[0].kill();
    assert!(wait_until(Duration::from_secs(30), || lab
        .registered("stream-a")
        .len()
        == 2));
    let before: Vec<u64> = receivers.iter().map(UdpReceiver::count).collect();
    let sent = send(&lab, VIP_A, 4);
    assert!(wait_until(Duration::from_secs(30), || {
        receivers[1].count() + receivers[2].count() - before[1] - before[2] == sent
    }));
    assert_eq!(
        receivers[0].count(),
        before[0],
        "the killed application gets nothing"
    );
}

/// A stream whose only identifier another application holds flapped in
/// Watch between PENDING and UNAVAILABLE every second, with a warning each
/// time. It now stays UNAVAILABLE (one warning) and opens once the
/// identifier is free.
#[test]
fn a_stream_without_a_free_identifier_stays_unavailable_until_one_frees() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(2, "3s");
    let mut taps = lab.start_ambassadors("1s");
    let b = || stream("stream-b", "conduit-a", "trench-a");
    taps[0].open(b()).unwrap();
    assert!(taps[0].wait_status("stream-b", S::Open, OPEN_WITHIN));
    taps[1].open(b()).unwrap();
    // Refused once (UNAVAILABLE before that may be its conduit's connect).
    assert!(wait_until(Duration::from_secs(30), || lab.ambassadors[1]
        .log_text()
        .contains("no identifier available")));
    // Three retries' time: the snapshot, and no change after it.
    let seen = taps[1].watch_until(Duration::from_millis(3500), |_| false);
    let statuses: Vec<S> = seen
        .iter()
        .filter_map(|m| status_of(m, "stream-b"))
        .collect();
    assert_eq!(statuses, [S::Unavailable], "{seen:?}");
    taps[0].close(b()).unwrap();
    assert!(taps[1].wait_status("stream-b", S::Open, Duration::from_secs(30)));
    let log = lab.ambassadors[1].log_text();
    assert_eq!(log.matches("no identifier available").count(), 1, "{log}");
}

/// A reload that lowered a stream's max_targets left the targets above it
/// ENABLED in the registry (and its Watch) while the maps gave them no
/// traffic. They are now DISABLED.
#[test]
fn a_lower_max_targets_disables_the_targets_above_it() {
    if !kernel_tests_enabled() {
        return;
    }
    // Ambassadors that refresh rarely: only the daemon acts within the test.
    let mut lab = TapaLab::new(3, "60s");
    let mut taps = lab.start_ambassadors("30s");
    for tap in &mut taps {
        tap.open(stream("stream-a", "conduit-a", "trench-a"))
            .unwrap();
        assert!(tap.wait_status("stream-a", S::Open, OPEN_WITHIN));
    }
    let enabled = |lab: &TapaLab| {
        let mut ids: Vec<u32> = lab
            .registered("stream-a")
            .into_iter()
            .filter(|(_, status)| status == "ENABLED")
            .map(|(id, _)| id.parse().unwrap())
            .collect();
        ids.sort();
        ids
    };
    // Three of 1..=4, picked at random as TAPA does.
    let before = enabled(&lab);
    assert_eq!(before.len(), 3, "{}", lab.registry_list());
    let kept: Vec<u32> = before.iter().copied().filter(|&id| id <= 2).collect();
    lab.write_config(&tapmesh_tests::tapa::NSP_CONFIG.replacen(
        "max_targets = 4",
        "max_targets = 2",
        1,
    ));
    assert!(
        wait_until(Duration::from_secs(30), || enabled(&lab) == kept),
        "{}",
        lab.registry_list()
    );
    // DISABLED, not gone: their ambassadors decide at their next refresh.
    assert_eq!(
        lab.registered("stream-a").len(),
        3,
        "{}",
        lab.registry_list()
    );
}

#[test]
fn re_registration_after_expiry_keeps_the_identifier_and_a_restart_keeps_the_registry() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "2s");
    let (a, _tap) = lab.open_stream_a(0, "1s");
    let first = lab.registered("stream-a");
    assert_eq!(first.len(), 1);

    // Frozen past the expiry: the entry goes; thawed, it comes back with its identifier.
    lab.ambassadors[a].signal(libc::SIGSTOP);
    assert!(wait_until(Duration::from_secs(30), || lab
        .registered("stream-a")
        .is_empty()));
    lab.ambassadors[a].signal(libc::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(30), || {
            lab.registered("stream-a") == vec![(first[0].0.clone(), "ENABLED".to_string())]
        }),
        "{}",
        lab.registry_list()
    );

    // A daemon restart keeps the registration (persisted), and the traffic flows.
    lab.stop_daemon();
    lab.start_daemon();
    assert_eq!(
        lab.registered("stream-a"),
        vec![(first[0].0.clone(), "ENABLED".to_string())]
    );
    let rx = receiver(&lab, 0);
    let sent = send(&lab, VIP_A, 2);
    assert!(wait_until(Duration::from_secs(30), || rx.count() == sent));
}

/// A stream closed while the daemon is away is unregistered once it is
/// back. Before, the close was acknowledged, its unregister failed, and the
/// registry restored the entry from its state: it took traffic until it
/// expired (60 s here), found by an operator tester in a rolling update.
#[test]
fn a_close_while_the_daemon_is_away_unregisters_once_it_is_back() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let (_a, mut tap) = lab.open_stream_a(0, "30s");
    let b = stream("stream-b", "conduit-a", "trench-a");
    tap.open(b.clone()).unwrap();
    assert!(tap.wait_status("stream-b", S::Open, OPEN_WITHIN));
    assert_eq!(
        lab.registered("stream-b").len(),
        1,
        "{}",
        lab.registry_list()
    );
    lab.stop_daemon();
    tap.close(b).unwrap();
    lab.start_daemon();
    assert!(
        wait_until(Duration::from_secs(30), || lab
            .registered("stream-b")
            .is_empty()),
        "{}",
        lab.registry_list()
    );
    assert_eq!(
        lab.registered("stream-a").len(),
        1,
        "the other stream stays"
    );
}

/// A rolling update on a kept dataplane loses no datagram to a registered
/// target: the new daemon's first LB write holds the registry's part with
/// the admin/file one. Before, that write swept the stream's VIP out of the
/// kept maps until the registry was restored (2-7 datagrams at 1 kpps, seen
/// by an operator tester).
#[test]
fn a_kept_restart_loses_no_datagram_to_a_registered_target() {
    if !kernel_tests_enabled() {
        return;
    }
    const GAP: Duration = Duration::from_micros(500);
    let mut lab = TapaLab::new(1, "60s");
    lab.stop_daemon();
    lab.start_daemon_at(None, &["--keep-dataplane"]);
    let (_a, _tap) = lab.open_stream_a(0, "30s");
    let rx = receiver(&lab, 0);
    assert_eq!(send(&lab, VIP_A, 1), 50);
    assert!(
        wait_until(Duration::from_secs(30), || rx.count() == 50),
        "{}",
        diagnose(&lab)
    );
    let sender =
        tapmesh_tests::net::steady_udp(&lab.client.name, SocketAddrV4::new(VIP_A, 5000), GAP);
    std::thread::sleep(Duration::from_secs(1));
    let before = sender.sent();
    lab.restart_daemon_kept();
    assert_eq!(
        lab.daemon().status().attachments[0].mode,
        "native, kept link replaced"
    );
    // The flow goes on under the new daemon's first write and after it.
    std::thread::sleep(Duration::from_secs(1));
    let sent = sender.finish();
    assert!(
        sent > before + 1000,
        "{before} then {sent}: the flow stalled"
    );
    let all = wait_until(Duration::from_secs(30), || rx.count() == 50 + sent);
    assert!(
        all,
        "{} of {sent} datagrams arrived across the restart; {}",
        rx.count() - 50,
        diagnose(&lab)
    );
}

#[test]
fn a_stream_removed_from_the_configuration_becomes_undefined_and_returns() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let (a, mut tap) = lab.open_stream_a(0, "30s");

    // The CLI is a client of the same ambassador.
    let watch = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args(["stream", "watch", "--count", "1", "--socket"])
        .arg(&lab.ambassadors[a].socket)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&watch.stdout),
        "stream-a.conduit-a.trench-a OPEN\n--\n"
    );
    let open_b = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
        .args([
            "stream",
            "open",
            "--trench",
            "trench-b",
            "--conduit",
            "conduit-a",
            "stream-b",
            "--socket",
        ])
        .arg(&lab.ambassadors[a].socket)
        .output()
        .unwrap();
    assert!(!open_b.status.success());
    assert!(String::from_utf8_lossy(&open_b.stderr).contains("another trench is already connected"));

    // Only real changes reach a watcher: no repeated event while nothing changes.
    let quiet = tap.watch_until(Duration::from_millis(1500), |_| false);
    assert_eq!(quiet.len(), 1, "only the snapshot: {quiet:?}");

    let without_a = NSP_CONFIG
        .replace("stream = \"stream-a\"", "stream = \"stream-b\"")
        .replace(
            "name = \"stream-a\"\nconduit = \"conduit-a\"\nmax_targets = 4\n",
            "name = \"stream-c\"\nconduit = \"conduit-a\"\nmax_targets = 4\n",
        );
    lab.write_config(&without_a);
    assert!(tap.wait_status("stream-a", S::Undefined, OPEN_WITHIN));
    assert!(
        lab.registered("stream-a").is_empty(),
        "{}",
        lab.registry_list()
    );

    // A broken edit is refused and the previous configuration stays.
    lab.write_config("[[streams]]\nname = \"x\"\n");
    std::thread::sleep(Duration::from_secs(1));
    let status = lab.daemon().status_when(|s| {
        s.plugins
            .iter()
            .any(|p| p.name == "nsp" && p.detail.contains("config not reloaded"))
    });
    let nsp = status.plugins.iter().find(|p| p.name == "nsp").unwrap();
    assert!(nsp.detail.contains("config not reloaded"), "{nsp:?}");

    lab.write_config(NSP_CONFIG);
    assert!(tap.wait_status("stream-a", S::Open, OPEN_WITHIN));
}

/// Meridio's tap.proto as a Meridio application would compile it: the same
/// package, services, messages and field numbers, written here independently.
const MERIDIO_TAP_PROTO: &str = r#"
syntax = "proto3";
package ambassador.v1;
import "google/protobuf/empty.proto";
service Tap {
  rpc Open(Stream) returns (google.protobuf.Empty) {}
  rpc Close(Stream) returns (google.protobuf.Empty) {}
  rpc Watch(Stream) returns (stream StreamResponse) {}
}
message StreamResponse { repeated StreamStatus streamStatus = 1; }
message StreamStatus {
  enum Status { OPEN = 0; PENDING = 1; UNAVAILABLE = 2; UNDEFINED = 3; }
  Status status = 1;
  Stream stream = 2;
}
message Trench { string name = 1; }
message Conduit { string name = 1; Trench trench = 2; }
message Stream { string name = 1; Conduit conduit = 2; }
"#;

/// A grpcio client: `open` waits for OPEN and prints the milliseconds it
/// took; `close` waits until the stream leaves the Watch list.
const MERIDIO_CLIENT: &str = r#"
import sys, time, grpc
import tap_pb2, tap_pb2_grpc
socket, mode, trench, conduit, name = sys.argv[1:6]
# No channel options: grpcio >= 1.57 sends the %-encoded socket path as
# :authority (grpc/grpc#38142), and the ambassador must answer it.
channel = grpc.insecure_channel("unix:" + socket)
stub = tap_pb2_grpc.TapStub(channel)
stream = tap_pb2.Stream(name=name, conduit=tap_pb2.Conduit(name=conduit, trench=tap_pb2.Trench(name=trench)))
start = time.monotonic()
if mode == "open":
    stub.Open(stream)
    for response in stub.Watch(stream, timeout=20):
        if any(s.stream.name == name and s.status == tap_pb2.StreamStatus.OPEN for s in response.streamStatus):
            print("OPEN %.1f" % ((time.monotonic() - start) * 1000))
            sys.exit(0)
else:
    stub.Close(stream)
    for response in stub.Watch(tap_pb2.Stream(), timeout=20):
        if not any(s.stream.name == name for s in response.streamStatus):
            print("CLOSED")
            sys.exit(0)
sys.exit("watch ended")
"#;

#[test]
fn a_client_generated_from_meridios_tap_proto_opens_and_closes_a_stream() {
    if !kernel_tests_enabled() {
        return;
    }
    let python = tapmesh_tests::python::python();
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let dir = lab.dir.0.join("python");
    std::fs::create_dir_all(&dir).unwrap();
    tapmesh_tests::python::generate(&python, &dir, "tap.proto", MERIDIO_TAP_PROTO);
    let socket = lab.ambassadors[a].socket.display().to_string();
    let call = |mode: &str| {
        tapmesh_tests::python::script(
            &python,
            &dir,
            MERIDIO_CLIENT,
            &[&socket, mode, "trench-a", "conduit-a", "stream-a"],
        )
    };
    let opened = call("open");
    assert!(opened.starts_with("OPEN "), "{opened}");

    let rx = receiver(&lab, 0);
    let sent = send(&lab, VIP_A, 2);
    assert!(
        wait_until(Duration::from_secs(30), || rx.count() == sent),
        "{}",
        diagnose(&lab)
    );

    assert_eq!(call("close").trim(), "CLOSED");
    assert!(lab.registered("stream-a").is_empty());
    send(&lab, VIP_A, 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rx.count(), sent, "after Close the application gets nothing");
}

#[test]
fn only_a_targets_own_namespace_may_register_it() {
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(2, "60s");
    let (_, _tap) = lab.open_stream_a(0, "30s");
    let victim: Vec<String> = lab
        .registry_list()
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();

    // Root in another application's namespace is not root on the node.
    let socket = lab.node_socket();
    let attempt = tapmesh_tests::net::run_in(&lab.apps[1].name, move || {
        use tapmesh::proto::nsp::{target, target_registry_client::TargetRegistryClient, Target};
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut client = TargetRegistryClient::new(tapmesh::uds::lazy_channel(&socket));
                let t = Target {
                    ips: victim,
                    context: [("identifier".to_string(), "1".to_string())].into(),
                    status: target::Status::Disabled as i32,
                    r#type: target::Type::Default as i32,
                    stream: Some(tapmesh::proto::nsp::Stream {
                        name: "stream-a".into(),
                        conduit: Some(tapmesh::proto::nsp::Conduit {
                            name: "conduit-a".into(),
                            trench: Some(tapmesh::proto::nsp::Trench {
                                name: "trench-a".into(),
                            }),
                            destination_port_nats: vec![],
                        }),
                        max_targets: 0,
                    }),
                };
                (client.unregister(t.clone()).await, client.register(t).await)
            })
    });
    for result in [attempt.0.map(|_| ()), attempt.1.map(|_| ())] {
        let e = result.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    }
    assert_eq!(
        lab.registered("stream-a").len(),
        1,
        "{}",
        lab.registry_list()
    );
}

/// grpcio with no channel options on the node socket (Meridio's
/// TargetRegistry and ConfigurationManager) and on the admin socket: each
/// call's answer printed on one line.
const NODE_AND_ADMIN_CLIENT: &str = r#"
import sys, grpc
from api.nsp.v1 import model_pb2, targetregistry_pb2, targetregistry_pb2_grpc
from api.nsp.v1 import configurationmanager_pb2_grpc
from tapmesh.admin.v1 import admin_pb2, admin_pb2_grpc
node, admin = sys.argv[1:3]
trench = model_pb2.Trench(name="trench-a")

node_channel = grpc.insecure_channel("unix:" + node)
registry = targetregistry_pb2_grpc.TargetRegistryStub(node_channel)
T = targetregistry_pb2.Target
for response in registry.Watch(T(status=T.ANY, type=T.DEFAULT), timeout=10):
    print("targets " + " ".join(sorted("%s:%s:%s" % (t.stream.name, T.Status.Name(t.status),
                                                      t.context["identifier"])
                                       for t in response.targets)))
    break
config = configurationmanager_pb2_grpc.ConfigurationManagerStub(node_channel)
for response in config.WatchTrench(trench, timeout=10):
    print("trench " + response.trench.name)
    break
for response in config.WatchStream(model_pb2.Stream(conduit=model_pb2.Conduit(trench=trench)),
                                   timeout=10):
    print("streams " + " ".join(sorted(s.name for s in response.streams)))
    break
for response in config.WatchVip(model_pb2.Vip(trench=trench), timeout=10):
    print("vips " + " ".join(sorted(v.address for v in response.vips)))
    break

admin_stub = admin_pb2_grpc.AdminStub(grpc.insecure_channel("unix:" + admin))
status = admin_stub.Status(admin_pb2.StatusRequest(), timeout=10)
print("status %s %s" % (status.version, " ".join(
    "%s=%s" % (p.name, admin_pb2.PluginState.Name(p.state)) for p in status.plugins)))
listing = admin_stub.ListLb(admin_pb2.ListLbRequest(), timeout=10)
print("lb streams " + " ".join(sorted(s.name for s in listing.config.streams)))
"#;

#[test]
fn grpcio_without_options_reaches_the_node_socket_and_the_admin_api() {
    if !kernel_tests_enabled() {
        return;
    }
    let python = tapmesh_tests::python::python();
    let mut lab = TapaLab::new(1, "60s");
    let (_, _tap) = lab.open_stream_a(0, "30s");
    let registered = lab.registered("stream-a");
    assert_eq!(registered.len(), 1, "{}", lab.registry_list());

    let dir = lab.dir.0.join("python-node");
    std::fs::create_dir_all(&dir).unwrap();
    tapmesh_tests::python::generate_from(
        &python,
        &tapmesh_tests::python::repo_protos(),
        &[
            "api/nsp/v1/model.proto",
            "api/nsp/v1/targetregistry.proto",
            "api/nsp/v1/configurationmanager.proto",
            "tapmesh/admin/v1/admin.proto",
        ],
        &dir,
    );
    let node = lab.node_socket().display().to_string();
    let admin = lab.daemon().socket.display().to_string();
    let out = tapmesh_tests::python::script(&python, &dir, NODE_AND_ADMIN_CLIENT, &[&node, &admin]);
    let status = lab.daemon().status();
    let plugins: Vec<String> = status
        .plugins
        .iter()
        .map(|p| format!("{}=PLUGIN_STATE_RUNNING", p.name))
        .collect();
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            format!("targets stream-a:ENABLED:{}", registered[0].0),
            "trench trench-a".to_string(),
            "streams stream-a stream-b".to_string(),
            "vips 203.0.113.10/32 203.0.113.11/32".to_string(),
            format!("status {} {}", status.version, plugins.join(" ")),
            "lb streams stream-a.conduit-a.trench-a stream-b.conduit-a.trench-a".to_string(),
        ],
        "{out}"
    );
}

/// The targets of a stream the Meridio configuration owns are its
/// registrations': the admin API refuses to set one there (it would take
/// an identifier a registration then could not have, and the application
/// would never see OPEN), and nothing changes.
#[test]
fn the_admin_api_sets_no_target_on_a_meridio_stream() {
    use tapmesh::admin::proto::{target::Via, RemoteTarget, Target};
    if !kernel_tests_enabled() {
        return;
    }
    let lab = TapaLab::new(1, "60s");
    let lb_list = || {
        let out = std::process::Command::new(tapmesh_tests::daemon::tapmesh_bin())
            .args(["lb", "list", "--admin-socket"])
            .arg(&lab.daemon().socket)
            .output()
            .expect("tapmesh lb list");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = lb_list();
    assert!(before.contains("stream-a.conduit-a.trench-a"), "{before}");
    let pins = lab
        .daemon()
        .bpffs_root
        .join(format!("v{}", tapmesh_common::SCHEMA_VERSION));
    let every_map = tapmesh_tests::maps::dump_pinned(&pins);
    let target = Target {
        stream: "stream-a.conduit-a.trench-a".into(),
        identifier: 1,
        via: Some(Via::Remote(RemoteTarget {
            node: "198.18.0.9".into(),
        })),
    };
    let refused = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = tapmesh::admin::connect(&lab.daemon().socket)
                .await
                .expect("admin socket");
            let one = c
                .set_target(target.clone())
                .await
                .expect_err("a target on a Meridio stream");
            // The same through a whole configuration.
            let whole = c
                .apply_lb(tapmesh::admin::proto::LbConfig {
                    targets: vec![target],
                    ..Default::default()
                })
                .await
                .expect_err("a configuration with a target on a Meridio stream");
            [one, whole]
        });
    for refused in refused {
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains("comes from the Meridio configuration (nsp)"),
            "{refused:?}"
        );
    }
    assert_eq!(lb_list(), before, "the refusal changed the configuration");
    let diff =
        tapmesh_tests::maps::differences(&every_map, &tapmesh_tests::maps::dump_pinned(&pins));
    assert!(diff.is_empty(), "the refusal changed maps: {diff:?}");
}

/// An error quoting a very long input reaches a client as that error: the
/// status message is cut to 1 KiB (gRPC clients refuse received metadata
/// past 16 KiB by default, and would report RESOURCE_EXHAUSTED instead).
#[test]
fn an_error_quoting_a_long_input_keeps_its_code() {
    use tapmesh::admin::proto::Vip;
    if !kernel_tests_enabled() {
        return;
    }
    let mut lab = TapaLab::new(1, "60s");
    let mut taps = lab.start_ambassadors("30s");
    let long = "s".repeat(20_000);
    let check = |e: tonic::Status, what: &str| {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().len() <= 1024 + 3,
            "{what}: {} bytes",
            e.message().len()
        );
        assert!(e.message().ends_with('\u{2026}'), "{what}: {}", e.message());
    };
    check(
        taps[0]
            .open(stream(&long, "conduit-a", "trench-a"))
            .unwrap_err(),
        "Tap.Open",
    );
    let refused = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = tapmesh::admin::connect(&lab.daemon().socket)
                .await
                .expect("admin socket");
            c.set_vip(Vip {
                name: long.clone(),
                address: "not an address".into(),
            })
            .await
            .expect_err("a VIP with a bad address")
        });
    check(refused, "Admin.SetVip");
}

/// grpc.health.v1 as a stock client asks it (Meridio's readiness probes run
/// grpc_health_probe against the ambassador's socket): raw calls from
/// grpcio, no generated stubs. The server and its services are SERVING;
/// a service the socket does not serve is NOT_FOUND.
const HEALTH_CLIENT: &str = r#"
import sys, grpc
for kind, path, services in [("ambassador", sys.argv[1], ["", "ambassador.v1.Tap", "nope.v1.X"]),
                             ("node", sys.argv[2], ["", "nsp.v1.TargetRegistry"])]:
    check = grpc.insecure_channel("unix:" + path).unary_unary("/grpc.health.v1.Health/Check")
    for service in services:
        request = b"" if not service else b"\x0a" + bytes([len(service)]) + service.encode()
        try:
            print(kind, repr(service), check(request, timeout=10).hex())
        except grpc.RpcError as e:
            print(kind, repr(service), e.code().name)
"#;

#[test]
fn a_stock_client_finds_the_ambassador_and_the_node_socket_serving() {
    if !kernel_tests_enabled() {
        return;
    }
    let python = tapmesh_tests::python::python();
    let mut lab = TapaLab::new(1, "60s");
    let a = lab.start_ambassador(0, "30s");
    let ambassador = lab.ambassadors[a].socket.display().to_string();
    let node = lab.node_socket().display().to_string();
    let dir = lab.dir.0.join("python-health");
    std::fs::create_dir_all(&dir).unwrap();
    let out = tapmesh_tests::python::script(&python, &dir, HEALTH_CLIENT, &[&ambassador, &node]);
    // HealthCheckResponse { status: SERVING (1) } is the two bytes 08 01.
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "ambassador '' 0801",
            "ambassador 'ambassador.v1.Tap' 0801",
            "ambassador 'nope.v1.X' NOT_FOUND",
            "node '' 0801",
            "node 'nsp.v1.TargetRegistry' 0801",
        ]
    );
}
