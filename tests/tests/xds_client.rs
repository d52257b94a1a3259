//! The xDS client (`tapmesh::xds`) against an independent control plane in
//! Python (grpcio + xds-protos, see `tapmesh_tests::xds_peer`), on loopback.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tapmesh::xds::{
    self, CancellationToken, ClusterEndpoints, EndpointSink, HealthStatus, Locality, Protocol,
    SelectedEndpoint, StandbyEndpoint, XdsSettings, EDS_TYPE_URL,
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
        protocol: Protocol::Auto,
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
        health: HealthStatus::Healthy as i32,
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

fn localities(localities: Vec<Loc>) -> Cla {
    Cla {
        localities,
        ..Cla::default()
    }
}

/// Sets "svc-a" to the one endpoint `ip`:`port` as `version`.
fn set_one(cp: &mut ControlPlane, version: &str, ip: &str, port: u32) {
    cp.set(version, &[("svc-a", Cla::single(vec![Ep::new(ip, port)]))]);
}

/// A control plane serving `two_endpoints()` as "svc-a" version 1.
fn serving_v1() -> ControlPlane {
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", two_endpoints())]);
    cp
}

/// `serving_v1`, and a client of "svc-a" (open sink) that has ACKed it.
fn acked_v1() -> (ControlPlane, Arc<Recorder>, Client) {
    let cp = serving_v1();
    let sink = Recorder::new(true);
    let client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));
    (cp, sink, client)
}

/// Waits for the NACK of `version`: it keeps version `kept` and its detail
/// names `problem`.
fn nacked(cp: &ControlPlane, version: &str, kept: &str, problem: &str) -> SeenRequest {
    let nack = cp.wait_request(WAIT, &format!("NACK of v{version}"), is_nack(version));
    assert_eq!(nack.version_info, kept, "a NACK keeps the accepted version");
    assert!(
        nack.error_detail.as_deref().unwrap().contains(problem),
        "{nack:?}"
    );
    nack
}

/// Waits for the `n`th update; it holds only `ip`:`port` with weight 1.
fn applied_only(sink: &Recorder, n: usize, ip: &str, port: u16) {
    assert_eq!(endpoints(&sink.wait_count(n)), vec![(ip.into(), port, 1)]);
}

/// (1) Subscribe, apply, then ACK; the node is on the first request only.
#[test]
fn eds_subscribe_applies_before_ack() {
    let cp = serving_v1();
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
            standby: vec![],
            drop_overloads: vec![],
        }]
    );
    assert!(cp.requests().iter().all(|r| !r.stale));
}

/// (2) Updates are applied and ACKed; a replayed response (same nonce) is ignored.
#[test]
fn eds_update_is_applied_and_acked() {
    let (mut cp, sink, _client) = acked_v1();
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
    let (mut cp, sink, _client) = acked_v1();

    set_one(&mut cp, "2", "not-an-ip", 80);
    nacked(&cp, "2", "1", "not an IP address");

    set_one(&mut cp, "3", "198.18.0.9", 0);
    nacked(&cp, "3", "1", "port 0");

    let mut no_address = Ep::new("198.18.0.9", 80);
    no_address.no_address = true;
    cp.set("4", &[("svc-a", Cla::single(vec![no_address]))]);
    nacked(&cp, "4", "1", "no socket address");

    // Priorities with a gap.
    let gap = localities(vec![
        Loc::new("a", 0, vec![Ep::new("198.18.0.1", 80)]),
        Loc::new("b", 2, vec![Ep::new("198.18.0.2", 80)]),
    ]);
    cp.set("5", &[("svc-a", gap)]);
    nacked(&cp, "5", "1", "priority 1 is missing");
    assert_eq!(
        sink.updates().len(),
        1,
        "the sink saw an invalid assignment"
    );

    // A valid one applies again.
    set_one(&mut cp, "6", "198.18.0.6", 80);
    applied_only(&sink, 2, "198.18.0.6", 80);
    cp.wait_request(WAIT, "ACK v6", is_ack("6", "6"));

    // A sink error is a NACK too, with the sink's message.
    *sink.fail_next.lock().unwrap() = Some("the backend map is full".into());
    set_one(&mut cp, "7", "198.18.0.7", 80);
    nacked(&cp, "7", "6", "the backend map is full");
    assert_eq!(sink.updates().len(), 2);
    set_one(&mut cp, "8", "198.18.0.8", 80);
    applied_only(&sink, 3, "198.18.0.8", 80);
    cp.wait_request(WAIT, "ACK v8", is_ack("8", "8"));
}

/// (4) The server restarts: the client keeps what it has, reconnects with the
/// last accepted version and converges on the new server's data.
#[test]
fn reconnects_after_server_restart() {
    let (cp, sink, _client) = acked_v1();
    let port = cp.port;
    sink.wait_count(1);

    cp.kill();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        sink.updates().len(),
        1,
        "nothing is cleared while disconnected"
    );

    let mut cp = ControlPlane::start_on(port);
    set_one(&mut cp, "7", "198.18.0.7", 80);
    let first = cp.wait_request(WAIT, "initial after restart", |r| {
        r.response_nonce.is_empty()
    });
    assert_eq!(
        first.version_info, "1",
        "resubscribes with the last ACKed version"
    );
    assert_eq!(first.node_id.as_deref(), Some("node-1"));
    applied_only(&sink, 2, "198.18.0.7", 80);
    cp.wait_request(WAIT, "ACK v7", is_ack("7", "1"));
    assert_eq!(sink.updates().len(), 2);
}

/// (5) Priority 0 has no usable endpoint: priority 1 is used, and back.
#[test]
fn priority_failover() {
    // "near" (priority 0) with two endpoints of the given health; "far" (1).
    let near_far = |second: &str| {
        localities(vec![
            Loc::new(
                "near",
                0,
                vec![
                    Ep::new("198.18.0.1", 80).health("UNHEALTHY"),
                    Ep::new("198.18.0.2", 80).health(second),
                ],
            ),
            Loc::new("far", 1, vec![Ep::new("198.18.1.1", 80)]),
        ])
    };
    let mut cp = ControlPlane::start();
    cp.set("1", &[("svc-a", near_far("DRAINING"))]);
    let sink = Recorder::new(true);
    let _client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    let update = sink.wait_count(1);
    assert_eq!(
        update.endpoints,
        vec![selected("198.18.1.1", 80, 1, "far", 1)]
    );
    cp.wait_request(WAIT, "ACK v1", is_ack("1", "1"));

    cp.set("2", &[("svc-a", near_far("UNKNOWN"))]);
    let update = sink.wait_count(2);
    assert_eq!(
        update.endpoints,
        vec![SelectedEndpoint {
            health: HealthStatus::Unknown as i32,
            ..selected("198.18.0.2", 80, 1, "near", 0)
        }]
    );
    // The rest is kept with its health, the other priority usable.
    assert_eq!(
        update.standby,
        vec![
            StandbyEndpoint {
                endpoint: SelectedEndpoint {
                    health: HealthStatus::Unhealthy as i32,
                    ..selected("198.18.0.1", 80, 1, "near", 0)
                },
                usable: false,
            },
            StandbyEndpoint {
                endpoint: selected("198.18.1.1", 80, 1, "far", 1),
                usable: true,
            },
        ]
    );
    cp.wait_request(WAIT, "ACK v2", is_ack("2", "2"));
}

/// (6) The same over ADS: subscribe, ACK, NACK, update.
#[test]
fn ads_subscribe_ack_nack_update() {
    let mut cp = serving_v1();
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
    let nack = nacked(&cp, "2", "1", "load_balancing_weight is 0");
    assert_eq!(nack.type_url, EDS_TYPE_URL);

    set_one(&mut cp, "3", "2001:db8::3", 443);
    applied_only(&sink, 2, "2001:db8::3", 443);
    cp.wait_request(WAIT, "ACK v3", is_ack("3", "3"));
    assert_eq!(sink.updates().len(), 2);
}

/// (7) A cluster the server never sends is applied as empty, once, after
/// `missing_after`.
#[test]
fn missing_cluster_is_applied_empty_once() {
    let mut cp = serving_v1();
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

/// A server reached after the start, before `missing_after` ran out, still
/// gets the whole wait before a cluster it did not send is applied as
/// empty (the wait ran from the client's start: a server reached just
/// before it ended had no time to send, and the cluster's traffic went).
#[test]
fn missing_after_runs_from_when_the_server_is_reached() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = Recorder::new(true);
    let mut s = settings(&serving_v1(), &["ghost"]);
    s.server = format!("http://127.0.0.1:{port}");
    s.missing_after = Duration::from_secs(10);
    let client = Client::start(s, sink.clone());
    std::thread::sleep(Duration::from_secs(1));
    // The stream opens after this: the wait must end 10 s after it at the
    // earliest (it ended 10 s after the client's start, 9 s after this).
    let starting = Instant::now();
    let cp = ControlPlane::start_on(port);
    cp.wait_request(WAIT, "the subscription", |r| r.response_nonce.is_empty());
    assert!(
        Instant::now().duration_since(client.started) < Duration::from_secs(10),
        "the server was reached only after the wait: nothing to test"
    );
    assert_eq!(sink.wait_count(1), ClusterEndpoints::empty("ghost"));
    let at = sink.updates.lock().unwrap()[0].0;
    assert!(
        at.duration_since(starting) >= Duration::from_secs(10),
        "applied {:?} after the server was started ({:?} after the client)",
        at.duration_since(starting),
        at.duration_since(client.started)
    );
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

/// WARN and above of every client in this process, as text (one global
/// subscriber: tests tell their lines apart by their server's port).
fn warnings() -> &'static Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<&'static Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Writer(&'static Mutex<Vec<u8>>);
        impl std::io::Write for Writer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Writer(log))
            .init();
        log
    })
}

fn warning_lines(port: u16, word: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&warnings().lock().unwrap()).into_owned();
    let server = format!("127.0.0.1:{port}");
    text.lines()
        .filter(|l| l.contains(&server) && l.contains(word))
        .map(String::from)
        .collect()
}

/// A server that answers every NACK with the rejected version at once (as
/// go-control-plane's snapshot cache does) is NACKed with growing delays,
/// and the rejection is logged once; a good version still applies at once.
#[test]
fn a_rejected_version_sent_again_is_nacked_with_backoff_and_logged_once() {
    warnings();
    let (mut cp, sink, _client) = acked_v1();
    cp.resend_nacked(true);

    set_one(&mut cp, "2", "not-an-ip", 80);
    let first = cp.wait_request(WAIT, "NACK of v2", |r| r.error_detail.is_some());
    std::thread::sleep(Duration::from_secs(4));
    let nacks: Vec<SeenRequest> = cp
        .requests()
        .into_iter()
        .filter(|r| r.error_detail.is_some())
        .collect();
    let resent = cp
        .responses()
        .iter()
        .filter(|r| r.version_info == "2")
        .count();
    // Each NACK was answered with version 2 again; without a backoff that
    // loop ran thousands of times in these 4 s. Delays 0.2, 0.4, 0.8, 1.6 s
    // after the first give 5 NACKs.
    assert!(
        (4..=6).contains(&nacks.len()),
        "{} NACKs in 4 s: {nacks:#?}",
        nacks.len()
    );
    assert!(
        resent >= nacks.len(),
        "the server resent version 2 {resent} times"
    );
    let gaps: Vec<Duration> = nacks
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    assert!(gaps[0] >= Duration::from_millis(150), "{gaps:?}");
    for w in gaps.windows(2) {
        assert!(w[1] >= w[0] + w[0] / 2, "delays must grow: {gaps:?}");
    }
    assert!(nacks
        .iter()
        .all(|n| n.version_info == "1" && n.error_detail == first.error_detail));
    let warned = warning_lines(cp.port, "NACK");
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(warned[0].contains("version=2"), "{warned:#?}");

    // A good version is applied at once, whatever NACK was waiting.
    set_one(&mut cp, "3", "198.18.0.3", 80);
    let set_at = Instant::now();
    applied_only(&sink, 2, "198.18.0.3", 80);
    assert!(set_at.elapsed() < Duration::from_secs(1));
    let ack = cp.wait_request(WAIT, "ACK v3", |r| {
        r.version_info == "3" && r.error_detail.is_none()
    });
    assert!(!ack.response_nonce.is_empty());
    // Another bad version is logged again, once.
    set_one(&mut cp, "4", "198.18.0.4", 0);
    cp.wait_request(WAIT, "NACK of v4", |r| {
        r.error_detail
            .as_deref()
            .is_some_and(|e| e.contains("port 0"))
    });
    tapmesh_tests::net::wait_until(Duration::from_secs(30), || {
        warning_lines(cp.port, "NACK").len() >= 2
    });
    std::thread::sleep(Duration::from_millis(700));
    let warned = warning_lines(cp.port, "NACK");
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(warned[1].contains("version=4"), "{warned:#?}");
}

const CDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// A response of another type is NACKed for that type, and the EDS
/// subscription is requested again at once (EDS and ADS), so the endpoints
/// arrive without waiting for a change or a reconnect.
#[test]
fn a_response_of_another_type_is_nacked_and_eds_is_requested_again() {
    for ads in [false, true] {
        let mut cp = serving_v1();
        cp.wrong_type(CDS_TYPE_URL);
        let sink = Recorder::new(true);
        let mut s = settings(&cp, &["svc-a"]);
        s.ads = ads;
        let _client = Client::start(s, sink.clone());

        let nack = cp.wait_request(WAIT, "NACK of the CDS response", |r| {
            r.type_url == CDS_TYPE_URL && r.error_detail.is_some()
        });
        assert_eq!(nack.response_nonce, "1");
        assert!(
            nack.error_detail
                .as_deref()
                .unwrap()
                .contains("unexpected resource type"),
            "{nack:?}"
        );
        let again = cp.wait_request(WAIT, "EDS requested again", |r| {
            r.type_url == EDS_TYPE_URL && r.node_id.is_none() && r.error_detail.is_none()
        });
        assert_eq!(
            (again.version_info.as_str(), again.response_nonce.as_str()),
            ("", ""),
            "nothing accepted yet, no EDS nonce yet"
        );
        assert_eq!(again.resource_names, vec!["svc-a"]);
        assert_eq!(sink.wait_count(1).endpoints.len(), 2, "ads={ads}");
        cp.wait_request(WAIT, "ACK v1", is_ack("1", "2"));
        let responses = cp.responses();
        assert_eq!(
            responses
                .iter()
                .map(|r| r.type_url.as_str())
                .collect::<Vec<_>>(),
            vec![CDS_TYPE_URL, EDS_TYPE_URL],
            "ads={ads}"
        );
    }
}

/// An endpoint listed twice (it would count twice) and an assignment
/// without a cluster name are NACKed, naming the problem; nothing applies.
#[test]
fn duplicate_endpoints_and_an_empty_cluster_name_are_nacked() {
    let (mut cp, sink, _client) = acked_v1();

    cp.set(
        "2",
        &[(
            "svc-a",
            Cla::single(vec![
                Ep::new("198.18.0.1", 8080),
                Ep::new("198.18.0.2", 8080),
                Ep::new("198.18.0.1", 8080).weight(5),
            ]),
        )],
    );
    let nack = cp.wait_request(WAIT, "NACK of v2", is_nack("2"));
    assert_eq!(nack.version_info, "1");
    assert_eq!(
        nack.error_detail.as_deref(),
        Some(
            "ClusterLoadAssignment \"svc-a\": endpoints[0].lb_endpoints[2]: \
             198.18.0.1:8080 is listed twice (also endpoints[0].lb_endpoints[0])"
        )
    );

    // The same address in another locality and priority is still one endpoint twice.
    let across = localities(vec![
        Loc::new("a", 0, vec![Ep::new("198.18.0.1", 8080)]),
        Loc::new("b", 1, vec![Ep::new("198.18.0.1", 8080)]),
    ]);
    cp.set("3", &[("svc-a", across)]);
    nacked(&cp, "3", "1", "198.18.0.1:8080 is listed twice");
    // A different port is another endpoint.
    cp.set(
        "4",
        &[(
            "svc-a",
            Cla::single(vec![
                Ep::new("198.18.0.1", 8080),
                Ep::new("198.18.0.1", 8081),
            ]),
        )],
    );
    assert_eq!(sink.wait_count(2).endpoints.len(), 2);
    cp.wait_request(WAIT, "ACK v4", is_ack("4", "4"));

    let mut nameless = two_endpoints();
    nameless.name = Some(String::new());
    cp.set("5", &[("svc-a", nameless)]);
    let nack = cp.wait_request(WAIT, "NACK of v5", is_nack("5"));
    assert_eq!(nack.version_info, "4");
    assert_eq!(
        nack.error_detail.as_deref(),
        Some("resources[0]: ClusterLoadAssignment.cluster_name is empty")
    );
    assert_eq!(sink.updates().len(), 2);
}

// Delta (incremental) xDS against the same peer with its Delta services on.

fn delta_settings(cp: &ControlPlane, clusters: &[&str], protocol: Protocol) -> XdsSettings {
    XdsSettings {
        protocol,
        ..settings(cp, clusters)
    }
}

/// The Delta ACK of response `nonce`: the nonce alone, no node, no names.
fn is_delta_ack(nonce: &str) -> impl Fn(&SeenRequest) -> bool {
    let nonce = nonce.to_string();
    move |r| r.method.starts_with("delta") && r.response_nonce == nonce && r.error_detail.is_none()
}

fn cluster_of(ip: &str, port: u32) -> Cla {
    Cla::single(vec![Ep::new(ip, port)])
}

/// A Delta server: the client subscribes on the Delta stream (node, names,
/// no versions held), a response carries only the changed cluster, a
/// removed cluster is applied as empty, and SotW is never used.
#[test]
fn delta_sends_only_changes_and_removals() {
    let mut cp = ControlPlane::start_delta_on(0);
    cp.set(
        "1",
        &[
            ("svc-a", cluster_of("198.18.0.1", 80)),
            ("svc-b", cluster_of("198.18.0.2", 80)),
        ],
    );
    let sink = Recorder::new(true);
    let _client = Client::start(
        delta_settings(&cp, &["svc-a", "svc-b"], Protocol::Auto),
        sink.clone(),
    );

    let first = cp.wait_request(WAIT, "the subscription", |r| r.response_nonce.is_empty());
    assert_eq!(first.method, "delta_eds");
    assert_eq!(first.node_id.as_deref(), Some("node-1"));
    assert_eq!(first.type_url, EDS_TYPE_URL);
    assert_eq!(first.resource_names, vec!["svc-a", "svc-b"]);
    assert!(first.initial_versions.is_empty(), "{first:?}");
    let ack = cp.wait_request(WAIT, "ACK of the first response", is_delta_ack("1"));
    assert_eq!(ack.node_id, None);
    assert!(ack.resource_names.is_empty() && ack.unsubscribe.is_empty());
    assert_eq!(ack.type_url, EDS_TYPE_URL);
    sink.wait_count(2);
    let mut first_two: Vec<_> = sink
        .updates()
        .iter()
        .map(|u| (u.cluster.clone(), endpoints(u)))
        .collect();
    first_two.sort();
    assert_eq!(
        first_two,
        vec![
            ("svc-a".to_string(), vec![("198.18.0.1".to_string(), 80, 1)]),
            ("svc-b".to_string(), vec![("198.18.0.2".to_string(), 80, 1)]),
        ]
    );

    // One cluster changes: the response and the sink see only that one.
    cp.set("2", &[("svc-b", cluster_of("198.18.0.3", 81))]);
    cp.wait_request(WAIT, "ACK of svc-b's change", is_delta_ack("2"));
    let sent = cp.responses();
    assert_eq!(sent.last().unwrap().clusters, vec!["svc-b"]);
    let update = sink.wait_count(3);
    assert_eq!(update.cluster, "svc-b");
    assert_eq!(endpoints(&update), vec![("198.18.0.3".into(), 81, 1)]);

    // The server removes svc-a: applied as no endpoints.
    cp.remove("3", &["svc-a"]);
    cp.wait_request(WAIT, "ACK of the removal", is_delta_ack("3"));
    assert_eq!(cp.responses().last().unwrap().removed, vec!["svc-a"]);
    assert_eq!(sink.wait_count(4), ClusterEndpoints::empty("svc-a"));

    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.updates().len(), 4, "{:#?}", sink.updates());
    let requests = cp.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.method == "delta_eds" && r.error_detail.is_none() && !r.stale),
        "{requests:#?}"
    );
    assert_eq!(
        requests.len(),
        4,
        "the subscription and three ACKs: {requests:#?}"
    );
}

/// An invalid Delta response (a resource named svc-a holding another
/// cluster's assignment; an endpoint without an address) is NACKed with the
/// reason and nothing is applied; the next valid one is applied.
#[test]
fn delta_invalid_response_is_nacked_and_nothing_applied() {
    let mut cp = ControlPlane::start_delta_on(0);
    cp.set("1", &[("svc-a", cluster_of("198.18.0.1", 80))]);
    let sink = Recorder::new(true);
    let _client = Client::start(
        delta_settings(&cp, &["svc-a"], Protocol::Delta),
        sink.clone(),
    );
    cp.wait_request(WAIT, "ACK 1", is_delta_ack("1"));
    sink.wait_count(1);

    let other = Cla {
        name: Some("svc-z".into()),
        ..cluster_of("198.18.0.9", 80)
    };
    cp.set("2", &[("svc-a", other)]);
    let nack = cp.wait_request(WAIT, "NACK 2", is_nack("2"));
    let detail = nack.error_detail.unwrap();
    assert!(
        detail.contains("\"svc-a\"") && detail.contains("\"svc-z\""),
        "{detail}"
    );

    let mut no_address = Ep::new("198.18.0.8", 80);
    no_address.no_address = true;
    cp.set("3", &[("svc-a", Cla::single(vec![no_address]))]);
    cp.wait_request(WAIT, "NACK 3", is_nack("3"));

    cp.set("4", &[("svc-a", cluster_of("198.18.0.4", 80))]);
    cp.wait_request(WAIT, "ACK 4", is_delta_ack("4"));
    assert_eq!(sink.updates().len(), 2, "{:#?}", sink.updates());
    applied_only(&sink, 2, "198.18.0.4", 80);
}

/// After a server restart the client names the version it holds; a server
/// with that same version sends nothing, and a change is applied.
#[test]
fn delta_resubscribes_with_the_versions_it_holds() {
    let mut cp = ControlPlane::start_delta_on(0);
    let port = cp.port;
    cp.set("1", &[("svc-a", cluster_of("198.18.0.1", 80))]);
    let sink = Recorder::new(true);
    let _client = Client::start(
        delta_settings(&cp, &["svc-a", "svc-b"], Protocol::Auto),
        sink.clone(),
    );
    cp.wait_request(WAIT, "ACK 1", is_delta_ack("1"));
    sink.wait_count(1);
    cp.kill();

    // It holds svc-a at version 1 before it listens: a subscription naming
    // svc-a:1 must get nothing (an empty server would remove svc-a).
    let mut cp =
        ControlPlane::start_delta_serving(port, "1", &[("svc-a", cluster_of("198.18.0.1", 80))]);
    let first = cp.wait_request(WAIT, "the subscription after the restart", |r| {
        r.response_nonce.is_empty()
    });
    assert_eq!(first.method, "delta_eds");
    assert_eq!(first.initial_versions, vec!["svc-a:1"]);
    assert_eq!(first.resource_names, vec!["svc-a", "svc-b"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(cp.responses().is_empty(), "{:#?}", cp.responses());
    assert_eq!(sink.updates().len(), 1);

    cp.set("2", &[("svc-b", cluster_of("198.18.0.2", 80))]);
    cp.wait_request(WAIT, "ACK of svc-b", is_delta_ack("1"));
    assert_eq!(cp.responses()[0].clusters, vec!["svc-b"]);
    assert_eq!(sink.wait_count(2).cluster, "svc-b");
}

/// Delta over ADS (`DeltaAggregatedResources`).
#[test]
fn delta_over_ads() {
    let mut cp = ControlPlane::start_delta_on(0);
    cp.set("1", &[("svc-a", cluster_of("198.18.0.1", 80))]);
    let sink = Recorder::new(true);
    let _client = Client::start(
        XdsSettings {
            ads: true,
            ..delta_settings(&cp, &["svc-a"], Protocol::Delta)
        },
        sink.clone(),
    );
    let ack = cp.wait_request(WAIT, "ACK 1", is_delta_ack("1"));
    assert_eq!(ack.method, "delta_ads");
    applied_only(&sink, 1, "198.18.0.1", 80);
}

/// A server without Delta: `auto` uses SotW on the same connection (no
/// failed stream, no backoff); `delta` refuses to, and says why.
#[test]
fn without_delta_auto_falls_back_and_delta_only_refuses() {
    warnings();
    let cp = serving_v1();
    let sink = Recorder::new(true);
    let started = Instant::now();
    let client = Client::start(settings(&cp, &["svc-a"]), sink.clone());
    cp.wait_request(WAIT, "ACK v1 over SotW", is_ack("1", "1"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(cp.requests()[0].method, "eds");
    assert!(
        warning_lines(cp.port, "stream ended").is_empty(),
        "the fall-back failed a stream first"
    );
    sink.wait_count(1);
    drop(client);

    let cp = serving_v1();
    let sink = Recorder::new(true);
    let _client = Client::start(
        delta_settings(&cp, &["svc-a"], Protocol::Delta),
        sink.clone(),
    );
    let deadline = Instant::now() + WAIT;
    while warning_lines(cp.port, "does not implement Delta xDS").is_empty() {
        assert!(Instant::now() < deadline, "no warning");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cp.requests().is_empty(), "{:#?}", cp.requests());
    assert!(sink.updates().is_empty());
}

/// After a response of another type, the EDS subscription is requested
/// again as it was last answered: when that answer was a NACK, as the same
/// NACK. Without its error, the last accepted version with the rejected
/// response's nonce reads as an ACK of that response.
#[test]
fn after_another_type_a_nacked_eds_response_stays_nacked() {
    let (mut cp, _sink, _client) = acked_v1();
    cp.set(
        "2",
        &[(
            "svc-a",
            Cla::single(vec![Ep::new("198.18.0.1", 80).weight(0)]),
        )],
    );
    nacked(&cp, "2", "1", "weight");
    cp.wrong_type(CDS_TYPE_URL);
    cp.set("3", &[("svc-a", two_endpoints())]);
    cp.wait_request(WAIT, "NACK of the CDS response", |r| {
        r.type_url == CDS_TYPE_URL && r.error_detail.is_some()
    });
    let replies_to_2 = || -> Vec<SeenRequest> {
        cp.requests()
            .into_iter()
            .filter(|r| r.type_url == EDS_TYPE_URL && r.response_nonce == "2")
            .collect()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while replies_to_2().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let replies = replies_to_2();
    assert_eq!(
        replies.len(),
        2,
        "the NACK, and the request after CDS's: {replies:#?}"
    );
    for r in &replies {
        assert_eq!(r.version_info, "1", "{r:?}");
        assert!(
            r.error_detail
                .as_deref()
                .is_some_and(|e| e.contains("weight")),
            "{r:?}"
        );
    }
}

/// A response past gRPC's usual 4 MiB limit (130 000 IPv6 endpoints, about
/// 6 MB) is decoded and ACKed: with the limit the stream failed, and the
/// client reconnected for the same response, forever, without a NACK.
#[test]
fn a_response_past_four_mebibytes_is_taken() {
    let (mut cp, sink, _client) = acked_v1();
    let many: Vec<Ep> = (0..130_000u32)
        .map(|i| {
            Ep::new(
                &format!("2001:db8:0:0:0:0:{:x}:{:x}", i >> 16, i & 0xffff),
                443,
            )
        })
        .collect();
    cp.set("2", &[("svc-a", Cla::single(many))]);
    cp.wait_request(Duration::from_secs(60), "ACK v2", is_ack("2", "2"));
    assert_eq!(sink.wait_count(2).endpoints.len(), 130_000);
}

/// A response that reuses the last nonce for new content is applied and
/// answered, over both variants (Envoy does not drop responses by nonce);
/// the same response again still is not.
#[test]
fn new_content_under_a_reused_nonce_is_applied_and_acked() {
    for delta in [false, true] {
        let mut cp = if delta {
            ControlPlane::start_delta_serving(0, "1", &[("svc-a", two_endpoints())])
        } else {
            serving_v1()
        };
        let sink = Recorder::new(true);
        let mut s = settings(&cp, &["svc-a"]);
        s.protocol = if delta {
            Protocol::Delta
        } else {
            Protocol::Sotw
        };
        let _client = Client::start(s, sink.clone());
        assert_eq!(sink.wait_count(1).endpoints.len(), 2, "delta={delta}");
        cp.wait_request(WAIT, "ACK of nonce 1", |r| {
            r.response_nonce == "1" && r.error_detail.is_none()
        });
        cp.reuse_nonce();
        cp.set(
            "2",
            &[("svc-a", Cla::single(vec![Ep::new("198.18.0.7", 80)]))],
        );
        applied_only(&sink, 2, "198.18.0.7", 80);
        let acks = || {
            cp.requests()
                .iter()
                .filter(|r| r.response_nonce == "1" && r.error_detail.is_none())
                .count()
        };
        let deadline = Instant::now() + WAIT;
        while acks() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(acks(), 2, "delta={delta}: {:#?}", cp.requests());
    }
}
