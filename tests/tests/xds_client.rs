//! The xDS client (`tapmesh::xds`) against an independent control plane in
//! Python (grpcio + xds-protos, see `tapmesh_tests::xds_peer`), on loopback.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tapmesh::xds::{
    self, CancellationToken, ClusterEndpoints, EndpointSink, Locality, SelectedEndpoint,
    XdsSettings, EDS_TYPE_URL,
};
use tapmesh_tests::xds_peer::{Cla, ControlPlane, Ep, Loc, SeenRequest};

const WAIT: Duration = Duration::from_secs(15);

/// Records every update; can hold `apply` (gate) or fail the next one.
struct Recorder {
    updates: Mutex<Vec<(Instant, ClusterEndpoints)>>,
    cv: Condvar,
    entered: AtomicBool,
    open: AtomicBool,
    fail_next: Mutex<Option<String>>,
}

impl Recorder {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(Recorder {
            updates: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            entered: AtomicBool::new(false),
            open: AtomicBool::new(open),
            fail_next: Mutex::new(None),
        })
    }

    fn updates(&self) -> Vec<ClusterEndpoints> {
        self.updates
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// Waits until `n` updates were recorded; returns the n-th.
    fn wait_count(&self, n: usize) -> ClusterEndpoints {
        let deadline = Instant::now() + WAIT;
        let mut updates = self.updates.lock().unwrap();
        while updates.len() < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("only {} updates: {:#?}", updates.len(), *updates));
            updates = self.cv.wait_timeout(updates, left).unwrap().0;
        }
        updates[n - 1].1.clone()
    }
}

#[tonic::async_trait]
impl EndpointSink for Recorder {
    async fn apply(&self, update: ClusterEndpoints) -> Result<(), String> {
        self.entered.store(true, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(e) = self.fail_next.lock().unwrap().take() {
            return Err(e);
        }
        self.updates.lock().unwrap().push((Instant::now(), update));
        self.cv.notify_all();
        Ok(())
    }
}

/// A client running on its own runtime; stopped on drop.
struct Client {
    runtime: Option<tokio::runtime::Runtime>,
    cancel: CancellationToken,
    started: Instant,
}

impl Client {
    fn start(settings: XdsSettings, sink: Arc<Recorder>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cancel = CancellationToken::new();
        let started = Instant::now();
        runtime.spawn(xds::run(settings, sink, cancel.clone()));
        Client {
            runtime: Some(runtime),
            cancel,
            started,
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn settings(cp: &ControlPlane, clusters: &[&str]) -> XdsSettings {
    XdsSettings {
        server: cp.address(),
        node_id: "node-1".into(),
        node_cluster: "tapmesh-test".into(),
        clusters: clusters.iter().map(|c| c.to_string()).collect(),
        ads: false,
        missing_after: Duration::from_secs(60),
        max_backoff: Duration::from_millis(500),
    }
}

fn selected(ip: &str, port: u16, weight: u32, zone: &str, priority: u32) -> SelectedEndpoint {
    SelectedEndpoint {
        address: ip.parse::<IpAddr>().unwrap(),
        port,
        weight,
        locality: Locality {
            zone: zone.into(),
            ..Default::default()
        },
        priority,
    }
}

fn endpoints(update: &ClusterEndpoints) -> Vec<(String, u16, u32)> {
    update
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.port, e.weight))
        .collect()
}

fn is_ack(version: &str, nonce: &str) -> impl Fn(&SeenRequest) -> bool {
    let (version, nonce) = (version.to_string(), nonce.to_string());
    move |r| r.version_info == version && r.response_nonce == nonce && r.error_detail.is_none()
}

fn is_nack(nonce: &str) -> impl Fn(&SeenRequest) -> bool {
    let nonce = nonce.to_string();
    move |r| r.response_nonce == nonce && r.error_detail.is_some()
}

fn two_endpoints() -> Cla {
    Cla::single(vec![
        Ep::new("198.18.0.1", 8080),
        Ep::new("198.18.0.2", 8080),
    ])
}

/// (1) Subscribe, apply, then ACK; the node is on the first request only.
#[test]
fn eds_subscribe_applies_before_ack() {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(false);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());

    let first = cp.wait_request(WAIT, "initial", |r| r.response_nonce.is_empty());
    assert_eq!(first.method, "eds");
    assert_eq!(first.node_id.as_deref(), Some("node-1"));
    assert_eq!(first.node_cluster.as_deref(), Some("tapmesh-test"));
    assert!(first
        .client_features
        .contains(&"envoy.lb.does_not_support_overprovisioning".to_string()));
    assert_eq!(first.version_info, "");
    assert_eq!(first.resource_names, vec!["svc-a"]);
    assert_eq!(first.type_url, EDS_TYPE_URL);

    // The sink holds the update: no ACK may arrive meanwhile.
    let deadline = Instant::now() + WAIT;
    while !sink.entered.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the sink was never called");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cp.requests().len(), 1, "{:#?}", cp.requests());
    sink.open.store(true, Ordering::SeqCst);

    let ack = cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    assert_eq!(ack.node_id, None, "the node is only on the first request");
    assert_eq!(ack.resource_names, vec!["svc-a"]);
    assert_eq!(ack.type_url, EDS_TYPE_URL);
    assert_eq!(
        sink.updates(),
        vec![ClusterEndpoints {
            cluster: "svc-a".into(),
            endpoints: vec![
                selected("198.18.0.1", 8080, 1, "z", 0),
                selected("198.18.0.2", 8080, 1, "z", 0),
            ],
            drop_overloads: vec![],
        }]
    );
    assert!(cp.requests().iter().all(|r| !r.stale));
}

/// (2) Updates are applied and ACKed; a replayed response (same nonce) is ignored.
#[test]
fn eds_update_is_applied_and_acked() {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    sink.wait_count(1);

    let mut v2 = Cla::single(vec![
        Ep::new("198.18.0.1", 8080).weight(3),
        Ep::new("198.18.0.3", 9090),
        Ep::new("198.18.0.4", 9090).health("DRAINING"),
    ]);
    v2.drops = vec![("lb".into(), 25_000)];
    cp.set("2", &[("svc-a", v2)]);
    let update = sink.wait_count(2);
    assert_eq!(
        endpoints(&update),
        vec![
            ("198.18.0.1".into(), 8080, 3),
            ("198.18.0.3".into(), 9090, 1)
        ]
    );
    assert_eq!(update.drop_overloads.len(), 1);
    assert_eq!(update.drop_overloads[0].category, "lb");
    assert_eq!(update.drop_overloads[0].parts_per_million, 25_000);
    cp.wait_request(WAIT, "ACK v2", is_ack("2", "2"));

    // The same response again (nonce 2): not applied, not answered.
    let before = cp.requests().len();
    cp.replay();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(cp.requests().len(), before, "{:#?}", cp.requests());
    assert_eq!(sink.updates().len(), 2);

    cp.set("3", &[("svc-a", two_endpoints())]);
    assert_eq!(sink.wait_count(3).endpoints.len(), 2);
    cp.wait_request(WAIT, "ACK v3", is_ack("3", "3"));
}

/// (3) Invalid assignments and sink errors are NACKed; the last good state stays.
#[test]
fn invalid_assignment_is_nacked_and_state_kept() {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));

    cp.set(
        "2",
        &[("svc-a", Cla::single(vec![Ep::new("not-an-ip", 80)]))],
    );
    let nack = cp.wait_request(WAIT, "NACK of v2", is_nack("2"));
    assert_eq!(nack.version_info, "1", "a NACK keeps the accepted version");
    assert!(
        nack.error_detail
            .as_deref()
            .unwrap()
            .contains("not an IP address"),
        "{nack:?}"
    );

    cp.set(
        "3",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.9", 0)]))],
    );
    let nack = cp.wait_request(WAIT, "NACK of v3", is_nack("3"));
    assert_eq!(nack.version_info, "1");
    assert!(nack.error_detail.as_deref().unwrap().contains("port 0"));

    let mut no_address = Ep::new("198.18.0.9", 80);
    no_address.no_address = true;
    cp.set("4", &[("svc-a", Cla::single(vec![no_address]))]);
    let nack = cp.wait_request(WAIT, "NACK of v4", is_nack("4"));
    assert_eq!(nack.version_info, "1");
    assert!(nack
        .error_detail
        .as_deref()
        .unwrap()
        .contains("no socket address"));

    // Priorities with a gap.
    let gap = Cla {
        localities: vec![
            Loc::new("a", 0, vec![Ep::new("198.18.0.1", 80)]),
            Loc::new("b", 2, vec![Ep::new("198.18.0.2", 80)]),
        ],
        drops: vec![],
    };
    cp.set("5", &[("svc-a", gap)]);
    let nack = cp.wait_request(WAIT, "NACK of v5", is_nack("5"));
    assert!(nack
        .error_detail
        .as_deref()
        .unwrap()
        .contains("priority 1 is missing"));
    assert_eq!(
        sink.updates().len(),
        1,
        "the sink saw an invalid assignment"
    );

    // A valid one applies again.
    cp.set(
        "6",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.6", 80)]))],
    );
    assert_eq!(
        endpoints(&sink.wait_count(2)),
        vec![("198.18.0.6".into(), 80, 1)]
    );
    cp.wait_request(WAIT, "ACK v6", is_ack("6", "6"));

    // A sink error is a NACK too, with the sink's message.
    *sink.fail_next.lock().unwrap() = Some("the backend map is full".into());
    cp.set(
        "7",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.7", 80)]))],
    );
    let nack = cp.wait_request(WAIT, "NACK of v7", is_nack("7"));
    assert_eq!(nack.version_info, "6");
    assert!(nack
        .error_detail
        .as_deref()
        .unwrap()
        .contains("the backend map is full"));
    assert_eq!(sink.updates().len(), 2);
    cp.set(
        "8",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.8", 80)]))],
    );
    assert_eq!(
        endpoints(&sink.wait_count(3)),
        vec![("198.18.0.8".into(), 80, 1)]
    );
    cp.wait_request(WAIT, "ACK v8", is_ack("8", "8"));
}

/// (4) The server restarts: the client keeps what it has, reconnects with the
/// last accepted version and converges on the new server's data.
#[test]
fn reconnects_after_server_restart() {
    let mut cp = ControlPlane::start();
    let port = cp.port;
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    sink.wait_count(1);

    cp.kill();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        sink.updates().len(),
        1,
        "nothing is cleared while disconnected"
    );

    let mut cp = ControlPlane::start_on(port);
    cp.set(
        "7",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.7", 80)]))],
    );
    let first = cp.wait_request(WAIT, "initial after restart", |r| {
        r.response_nonce.is_empty()
    });
    assert_eq!(
        first.version_info, "1",
        "resubscribes with the last ACKed version"
    );
    assert_eq!(first.node_id.as_deref(), Some("node-1"));
    assert_eq!(
        endpoints(&sink.wait_count(2)),
        vec![("198.18.0.7".into(), 80, 1)]
    );
    cp.wait_request(WAIT, "ACK v7", is_ack("7", "1"));
    assert_eq!(sink.updates().len(), 2);
}

/// (5) Priority 0 has no usable endpoint: priority 1 is used, and back.
#[test]
fn priority_failover() {
    let mut cp = ControlPlane::start();
    let failing = Cla {
        localities: vec![
            Loc::new(
                "near",
                0,
                vec![
                    Ep::new("198.18.0.1", 80).health("UNHEALTHY"),
                    Ep::new("198.18.0.2", 80).health("DRAINING"),
                ],
            ),
            Loc::new("far", 1, vec![Ep::new("198.18.1.1", 80)]),
        ],
        drops: vec![],
    };
    cp.set("1", &[("svc-a", failing)]);
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    let update = sink.wait_count(1);
    assert_eq!(
        update.endpoints,
        vec![selected("198.18.1.1", 80, 1, "far", 1)]
    );
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));

    let recovered = Cla {
        localities: vec![
            Loc::new(
                "near",
                0,
                vec![
                    Ep::new("198.18.0.1", 80).health("UNHEALTHY"),
                    Ep::new("198.18.0.2", 80).health("UNKNOWN"),
                ],
            ),
            Loc::new("far", 1, vec![Ep::new("198.18.1.1", 80)]),
        ],
        drops: vec![],
    };
    cp.set("2", &[("svc-a", recovered)]);
    let update = sink.wait_count(2);
    assert_eq!(
        update.endpoints,
        vec![selected("198.18.0.2", 80, 1, "near", 0)]
    );
    cp.wait_request(WAIT, "ACK v2", is_ack("2", "2"));
}

/// (6) The same over ADS: subscribe, ACK, NACK, update.
#[test]
fn ads_subscribe_ack_nack_update() {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(true);
    let mut s = settings(&cp, &["svc-a"]);
    s.ads = true;
    let _client = Client::start(s, sink.clone());

    let first = cp.wait_request(WAIT, "initial", |r| r.response_nonce.is_empty());
    assert_eq!(first.method, "ads");
    assert_eq!(first.type_url, EDS_TYPE_URL);
    assert_eq!(first.node_id.as_deref(), Some("node-1"));
    assert_eq!(sink.wait_count(1).endpoints.len(), 2);
    let ack = cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    assert_eq!(ack.method, "ads");
    assert_eq!(ack.type_url, EDS_TYPE_URL);

    cp.set(
        "2",
        &[(
            "svc-a",
            Cla::single(vec![Ep::new("198.18.0.1", 80).weight(0)]),
        )],
    );
    let nack = cp.wait_request(WAIT, "NACK of v2", is_nack("2"));
    assert_eq!(nack.version_info, "1");
    assert!(nack
        .error_detail
        .as_deref()
        .unwrap()
        .contains("load_balancing_weight is 0"));
    assert_eq!(nack.type_url, EDS_TYPE_URL);

    cp.set(
        "3",
        &[("svc-a", Cla::single(vec![Ep::new("2001:db8::3", 443)]))],
    );
    assert_eq!(
        endpoints(&sink.wait_count(2)),
        vec![("2001:db8::3".into(), 443, 1)]
    );
    cp.wait_request(WAIT, "ACK v3", is_ack("3", "3"));
    assert_eq!(sink.updates().len(), 2);
}

/// (7) A cluster the server never sends is applied as empty, once, after
/// `missing_after`.
#[test]
fn missing_cluster_is_applied_empty_once() {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    let sink = Recorder::new(true);
    let mut s = settings(&cp, &["svc-a", "ghost"]);
    s.missing_after = Duration::from_secs(1);
    let client = Client::start(s, sink.clone());

    assert_eq!(sink.wait_count(1).cluster, "svc-a");
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    let ghost = sink.wait_count(2);
    assert_eq!(ghost, ClusterEndpoints::empty("ghost"));
    let at = sink.updates.lock().unwrap()[1].0;
    assert!(
        at.duration_since(client.started) >= Duration::from_millis(950),
        "applied after {:?}",
        at.duration_since(client.started)
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(sink.updates().len(), 2, "{:#?}", sink.updates());

    // When it appears later it is applied.
    cp.set(
        "2",
        &[("ghost", Cla::single(vec![Ep::new("198.18.2.1", 80)]))],
    );
    let update = sink.wait_count(3);
    assert_eq!(update.cluster, "ghost");
    assert_eq!(endpoints(&update), vec![("198.18.2.1".into(), 80, 1)]);
}

/// A response carrying only some subscribed clusters leaves the others alone.
#[test]
fn absent_cluster_keeps_its_state() {
    let mut cp = ControlPlane::start();
    cp.set(
        "1",
        &[
            ("svc-a", two_endpoints()),
            ("svc-b", Cla::single(vec![Ep::new("198.18.3.1", 80)])),
        ],
    );
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a", "svc-b"]), sink.clone());
    sink.wait_count(2);
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));

    cp.set_only(
        "2",
        &[("svc-a", Cla::single(vec![Ep::new("198.18.0.5", 80)]))],
        &["svc-a"],
    );
    cp.wait_request(WAIT, "ACK v2", is_ack("2", "2"));
    let updates = sink.updates();
    assert_eq!(updates.len(), 3, "{updates:#?}");
    assert_eq!(updates[2].cluster, "svc-a");
    assert!(updates.iter().filter(|u| u.cluster == "svc-b").count() == 1);
}
