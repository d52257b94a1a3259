//! The daemon's EDS server (`[xds] serve`): a Python control plane feeds the
//! catalog (as in eds.rs), and an independent Python grpcio EDS client (a
//! stand-in for an Envoy on the node) subscribes to the daemon on the
//! node's loopback and must read the endpoints the catalog accepted, one
//! new version per real change of what it subscribed to, and nothing else.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tapmesh_tests::{
    eds::{self, udp_vip_cluster, wait_ack, weighted},
    kernel_tests_enabled,
    net::wait_until,
    xds_peer::{python, Cla, Ep, Loc},
};

const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 31);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 32);
const SERVE: &str = "127.0.0.1:18001";

/// A SotW EDS client: subscribes to argv[2] (comma-separated) on argv[1],
/// prints every response on one line and ACKs it.
const CLIENT: &str = r#"
import sys, queue
import grpc
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc

TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
address, names = sys.argv[1], sys.argv[2].split(",")
q = queue.Queue()


def requests():
    while True:
        r = q.get()
        if r is None:
            return
        yield r


def describe(cla):
    locs = []
    for l in cla.endpoints:
        eps = []
        for e in l.lb_endpoints:
            sa = e.endpoint.address.socket_address
            w = e.load_balancing_weight.value if e.HasField("load_balancing_weight") else "-"
            eps.append("%s:%d*%s:%s" % (sa.address, sa.port_value, w,
                                        health_check_pb2.HealthStatus.Name(e.health_status)))
        lw = l.load_balancing_weight.value if l.HasField("load_balancing_weight") else "-"
        locs.append("%s/p%d/w%s[%s]" % (l.locality.zone, l.priority, lw, ",".join(eps)))
    return "%s{%s}" % (cla.cluster_name, " ".join(locs))


first = discovery_pb2.DiscoveryRequest(type_url=TYPE, resource_names=names)
first.node.id = "python-proxy"
first.node.cluster = "eds-server-test"
q.put(first)
channel = grpc.insecure_channel(address)
stub = eds_pb2_grpc.EndpointDiscoveryServiceStub(channel)
print("subscribed", flush=True)
try:
    for resp in stub.StreamEndpoints(requests()):
        clas = []
        for a in resp.resources:
            cla = endpoint_pb2.ClusterLoadAssignment()
            if a.type_url != TYPE or not a.Unpack(cla):
                clas.append("BAD(%s)" % a.type_url)
                continue
            clas.append(describe(cla))
        print("response version=%s nonce=%s type_ok=%s resources=%s" % (
            resp.version_info, resp.nonce, resp.type_url == TYPE, ";".join(clas)), flush=True)
        q.put(discovery_pb2.DiscoveryRequest(type_url=TYPE, resource_names=names,
                                             version_info=resp.version_info,
                                             response_nonce=resp.nonce))
        print("ack version=%s nonce=%s" % (resp.version_info, resp.nonce), flush=True)
except grpc.RpcError as e:
    print("error %s" % e.code(), flush=True)
"#;

/// The Python EDS client inside the node's namespace; killed on drop.
struct EdsClient {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl EdsClient {
    fn start(netns: &str, address: &str, names: &[&str]) -> Self {
        let python = python();
        // The script as an argument: no file to share between parallel tests or to leave behind.
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&python)
            .args(["-u", "-c", CLIENT])
            .arg(address)
            .arg(names.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the EDS client");
        let stdout = child.stdout.take().expect("stdout");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("eds client: {line}");
                sink.lock().unwrap().push(line);
            }
        });
        EdsClient { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn responses(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with("response "))
            .collect()
    }

    /// Waits for the `n`th response (1-based): it must be version `n` with
    /// nonce `n`, of the EDS type, holding `resources` (as `describe` prints them).
    fn expect_response(&self, n: usize, timeout: Duration, resources: &str) {
        assert!(
            wait_until(timeout, || self.responses().len() >= n),
            "no response #{n} within {timeout:?}; the client printed {:#?}",
            self.lines()
        );
        assert_eq!(
            self.responses()[n - 1],
            format!("response version={n} nonce={n} type_ok=True resources={resources}")
        );
    }
}

impl Drop for EdsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn eds_server_serves_the_catalog_to_a_proxy() {
    if !kernel_tests_enabled() {
        return;
    }
    let clusters = udp_vip_cluster("svc", VIP) + &udp_vip_cluster("other", OTHER_VIP);
    let (lab, mut cp) = eds::lab(
        &[VIP, OTHER_VIP],
        &format!("serve = \"{SERVE}\"\n{clusters}"),
    );
    let (a, b) = (
        lab.targets[0].address.to_string(),
        lab.targets[1].address.to_string(),
    );
    let svc = || weighted(&[(&a, 5000, 3), (&b, 5000, 1)]);
    cp.set(
        "1",
        &[
            ("svc", svc()),
            ("other", Cla::single(vec![Ep::new(&a, 6000)])),
        ],
    );
    // The catalog accepted both clusters (the ACK follows the map write).
    wait_ack(&cp, "1");

    // A proxy subscribing to "svc" and a name nobody knows gets svc only,
    // with the control plane's endpoints and weights.
    let client = EdsClient::start(&lab.node.name, SERVE, &["svc", "nosuch"]);
    client.expect_response(
        1,
        Duration::from_secs(20),
        &format!("svc{{z/p0/w4[{a}:5000*3:HEALTHY,{b}:5000*1:HEALTHY]}}"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || client
            .lines()
            .contains(&"ack version=1 nonce=1".to_string())),
        "{:#?}",
        client.lines()
    );

    // A change to another cluster, and an update that leaves svc as it is:
    // the daemon accepts both, the proxy is sent nothing.
    cp.set("2", &[("other", Cla::single(vec![Ep::new(&b, 6000)]))]);
    wait_ack(&cp, "2");
    cp.set("3", &[("svc", svc())]);
    wait_ack(&cp, "3");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(client.responses().len(), 1, "{:#?}", client.lines());

    // A real change of svc: exactly one new version with the new set.
    cp.set("4", &[("svc", weighted(&[(&b, 5000, 2), (&a, 5001, 1)]))]);
    wait_ack(&cp, "4");
    client.expect_response(
        2,
        Duration::from_secs(30),
        &format!("svc{{z/p0/w3[{b}:5000*2:HEALTHY,{a}:5001*1:HEALTHY]}}"),
    );
    wait_until(Duration::from_secs(30), || {
        client
            .lines()
            .contains(&"ack version=2 nonce=2".to_string())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(client.responses().len(), 2, "{:#?}", client.lines());
    assert!(
        client
            .lines()
            .contains(&"ack version=2 nonce=2".to_string()),
        "{:#?}",
        client.lines()
    );
    assert!(
        !client.lines().iter().any(|l| l.starts_with("error ")),
        "{:#?}",
        client.lines()
    );
    drop(client);
}

/// What the proxy reads is what the maps hold: every priority with its
/// health, and a chosen backend this node cannot reach (not in the maps)
/// UNHEALTHY; `tapmesh catalog list` says why each backend has no slots.
#[test]
fn eds_server_serves_priorities_health_and_unreachable_backends_as_the_maps_hold_them() {
    if !kernel_tests_enabled() {
        return;
    }
    let (lab, mut cp) = eds::lab(
        &[VIP],
        &format!("serve = \"{SERVE}\"\n{}", udp_vip_cluster("svc", VIP)),
    );
    let (a, b) = (
        lab.targets[0].address.to_string(),
        lab.targets[1].address.to_string(),
    );
    // 198.51.100.77 has no route from the node: left out of the maps.
    let cla = Cla {
        name: None,
        localities: vec![
            Loc::new(
                "near",
                0,
                vec![
                    Ep::new(&a, 5000).weight(3),
                    Ep::new("198.51.100.77", 5000),
                    Ep::new("198.51.100.78", 5000).weight(2).health("DRAINING"),
                ],
            ),
            Loc::new("far", 1, vec![Ep::new(&b, 5000)]),
        ],
        drops: vec![],
    };
    cp.set("1", &[("svc", cla)]);
    wait_ack(&cp, "1");

    // The locality weighs its usable endpoints only (3), as the maps split
    // (it said 4, counting the unreachable one).
    let client = EdsClient::start(&lab.node.name, SERVE, &["svc"]);
    client.expect_response(
        1,
        Duration::from_secs(20),
        &format!(
            "svc{{near/p0/w3[{a}:5000*3:HEALTHY,198.51.100.77:5000*1:UNHEALTHY,\
             198.51.100.78:5000*2:DRAINING] far/p1/w1[{b}:5000*1:HEALTHY]}}"
        ),
    );

    let listing = lab.daemon().cli(&["catalog", "list"]);
    assert_eq!(
        listing,
        format!(
            "svc (from eds) vip {VIP}\n  \
             {a}:5000 weight 3 priority 0 slots 3 locality near\n  \
             198.51.100.77:5000 weight 1 priority 0 unreachable locality near\n  \
             198.51.100.78:5000 weight 2 priority 0 DRAINING locality near\n  \
             {b}:5000 weight 1 priority 1 standby locality far\n"
        )
    );
    drop(client);
}
