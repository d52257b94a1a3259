//! The networking-spp etcd contract against a real etcd on loopback: the test
//! plays networking-spp's TaaS driver with etcdctl, `SppAgent` is the agent,
//! and a fake `TapBackend` records what the agent asked of the dataplane.
//!
//! No root needed. `/usr/bin/etcd` and `/usr/bin/etcdctl` must be installed
//! (`cargo xtask setup`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tapmesh::mirror::{
    model::{Destination, Direction, MirrorError, TapBackend, TapFlow, TapService},
    spp::{port_interface_name, CancellationToken, SppAgent, SppSettings},
};
use tapmesh_tests::etcd::Etcd;
use tokio::task::JoinHandle;

const HOST: &str = "compute1";
/// How long the agent gets to react to a key while etcd is up.
const REACT: Duration = Duration::from_secs(30);
/// How long it gets to come back after an outage (backoff ≤ 5 s, plus a request timeout).
const RECOVER: Duration = Duration::from_secs(25);

const SERVICE_PORT: &str = "5e5e5e5e-0000-4000-8000-000000000001";
const SOURCE_PORT: &str = "50505050-1111-4000-8000-000000000002";

fn key(kind: &str, id: &str) -> String {
    format!("/spp/openstack/{kind}/{HOST}/{id}")
}

#[derive(Clone, Debug, PartialEq)]
enum Call {
    EnsureService(TapService),
    EnsureFlow(TapFlow),
    DeleteFlow(String),
    DeleteService(String),
}

/// Records every call; `ensure_flow` fails while `fail_flows` is set.
#[derive(Default)]
struct FakeBackend {
    calls: Mutex<Vec<Call>>,
    fail_flows: Mutex<Option<MirrorError>>,
}

impl FakeBackend {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn deletes(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::DeleteFlow(_) | Call::DeleteService(_)))
            .collect()
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
}

#[tonic::async_trait]
impl TapBackend for FakeBackend {
    async fn ensure_service(&self, service: TapService) -> Result<(), MirrorError> {
        self.record(Call::EnsureService(service));
        Ok(())
    }

    async fn ensure_flow(&self, flow: TapFlow) -> Result<(), MirrorError> {
        self.record(Call::EnsureFlow(flow));
        match &*self.fail_flows.lock().unwrap() {
            Some(e) => Err(clone_error(e)),
            None => Ok(()),
        }
    }

    async fn delete_flow(&self, id: &str) -> Result<(), MirrorError> {
        self.record(Call::DeleteFlow(id.into()));
        Ok(())
    }

    async fn delete_service(&self, id: &str) -> Result<(), MirrorError> {
        self.record(Call::DeleteService(id.into()));
        Ok(())
    }
}

fn clone_error(e: &MirrorError) -> MirrorError {
    match e {
        MirrorError::NoInterface(name) => MirrorError::NoInterface(name.clone()),
        other => MirrorError::Dataplane(other.to_string()),
    }
}

/// A running agent.
struct Agent {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

fn start_agent(etcd: &Etcd, backend: &Arc<FakeBackend>) -> Agent {
    let settings = SppSettings::new(vec![etcd.endpoint.clone()], HOST);
    let cancel = CancellationToken::new();
    let backend: Arc<dyn TapBackend> = backend.clone();
    let task = tokio::spawn(SppAgent::run(settings, backend, cancel.clone()));
    Agent { cancel, task }
}

impl Agent {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the agent did not stop within 5 s of its cancel")
            .expect("the agent task panicked");
    }
}

/// Polls `probe` every 50 ms until it returns Ok; panics with its last Err.
async fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe() {
            Ok(value) => return value,
            Err(state) if Instant::now() > deadline => {
                panic!("not within {within:?}: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until `key` has `value` (`None`: until it is gone).
async fn wait_value(etcd: &Etcd, key: &str, value: Option<&str>) {
    wait_for(REACT, || {
        let now = etcd.get(key);
        if now.as_deref() == value {
            Ok(())
        } else {
            Err(format!("{key} is {now:?}, want {value:?}"))
        }
    })
    .await
}

/// Waits until the backend saw `call`.
async fn wait_call(backend: &FakeBackend, within: Duration, call: &Call) {
    wait_for(within, || {
        let calls = backend.calls();
        if calls.contains(call) {
            Ok(())
        } else {
            Err(format!(
                "the backend did not see {call:?}; it saw {calls:#?}"
            ))
        }
    })
    .await
}

/// `mirror/<host>/<id>` = "None" for each id, as devstack creates them.
fn create_slots(etcd: &Etcd, ids: &[u32]) {
    for id in ids {
        etcd.put(&key("mirror", &id.to_string()), "None");
    }
}

fn slot(etcd: &Etcd, id: u32) -> Option<String> {
    etcd.get(&key("mirror", &id.to_string()))
}

/// The mech driver's port bindings: the service port names its interface,
/// the source port does not (the agent falls back to "tap" + 11 characters).
fn bind_ports(etcd: &Etcd) {
    etcd.put(
        &key("bind_port", SERVICE_PORT),
        r#"{"mac_address": "fa:16:3e:00:00:01", "vhost_id": 0, "interface": "monitor0"}"#,
    );
    etcd.put(
        &key("bind_port", SOURCE_PORT),
        r#"{"mac_address": "fa:16:3e:00:00:02", "vhost_id": 1, "vlan_id": 100}"#,
    );
}

fn json_id(id: Option<u32>) -> String {
    id.map_or("null".into(), |id| id.to_string())
}

/// What the driver writes: tap_info, then tap_action "plug".
fn driver_plug(
    etcd: &Etcd,
    tf: &str,
    service: &str,
    mirror_in: Option<u32>,
    mirror_out: Option<u32>,
) {
    let info = format!(
        r#"{{"service_port": "{service}", "source_port": "{SOURCE_PORT}", "mirror_in": {}, "mirror_out": {}}}"#,
        json_id(mirror_in),
        json_id(mirror_out)
    );
    etcd.put(&key("tap_info", tf), &info);
    etcd.put(&key("tap_action", tf), "plug");
}

/// The driver's own compare-and-swap of a slot (networking-spp allocates before tap_info).
fn driver_take_slot(etcd: &Etcd, id: u32, tf: &str) {
    assert_eq!(
        slot(etcd, id).as_deref(),
        Some("None"),
        "slot {id} is not free"
    );
    etcd.put(&key("mirror", &id.to_string()), tf);
}

fn ensure_service(service: &str, interface: &str) -> Call {
    Call::EnsureService(TapService {
        id: service.into(),
        name: service.into(),
        destination: Destination::Interface(interface.into()),
    })
}

fn ensure_flow(tf: &str, service: &str, direction: Direction) -> Call {
    Call::EnsureFlow(TapFlow {
        id: tf.into(),
        name: tf.into(),
        tap_service: service.into(),
        source: port_interface_name(SOURCE_PORT),
        direction,
        vlan_filter: None,
    })
}

/// tap_info, tap_action and tap_status of `tf` are gone.
async fn wait_cleaned(etcd: &Etcd, tf: &str) {
    for kind in ["tap_info", "tap_action", "tap_status"] {
        wait_value(etcd, &key(kind, tf), None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_and_unplug_handshake() {
    let etcd = Etcd::new();
    let backend = Arc::new(FakeBackend::default());
    let agent = start_agent(&etcd, &backend);
    create_slots(&etcd, &[0, 1, 2, 3]);
    bind_ports(&etcd);
    assert_eq!(port_interface_name(SOURCE_PORT), "tap50505050-11");

    // BOTH, slots still free: the agent takes them.
    let tf = "7f000000-aaaa-4000-8000-000000000001";
    driver_plug(&etcd, tf, SERVICE_PORT, Some(0), Some(1));
    wait_value(&etcd, &key("tap_status", tf), Some("up")).await;
    assert_eq!(
        backend.calls(),
        vec![
            ensure_service(SERVICE_PORT, "monitor0"),
            ensure_flow(tf, SERVICE_PORT, Direction::Both),
        ]
    );
    assert_eq!(slot(&etcd, 0).as_deref(), Some(tf));
    assert_eq!(slot(&etcd, 1).as_deref(), Some(tf));
    assert_eq!(slot(&etcd, 2).as_deref(), Some("None"));

    // OUT, and the driver already took the slot, as networking-spp does.
    let tf2 = "7f000000-aaaa-4000-8000-000000000002";
    driver_take_slot(&etcd, 2, tf2);
    driver_plug(&etcd, tf2, SERVICE_PORT, None, Some(2));
    wait_value(&etcd, &key("tap_status", tf2), Some("up")).await;
    assert_eq!(
        backend.calls()[2..],
        [
            ensure_service(SERVICE_PORT, "monitor0"),
            ensure_flow(tf2, SERVICE_PORT, Direction::Out),
        ]
    );
    assert_eq!(slot(&etcd, 2).as_deref(), Some(tf2));

    // IN, both slots already held by the flow.
    let tf3 = "7f000000-aaaa-4000-8000-000000000003";
    driver_take_slot(&etcd, 3, tf3);
    driver_plug(&etcd, tf3, SERVICE_PORT, Some(3), None);
    wait_value(&etcd, &key("tap_status", tf3), Some("up")).await;
    assert_eq!(
        backend.calls()[5],
        ensure_flow(tf3, SERVICE_PORT, Direction::In)
    );

    // Unplug the first: its flow goes, the service stays (tf2 and tf3 use it).
    let before = backend.calls().len();
    etcd.put(&key("tap_action", tf), "unplug");
    wait_cleaned(&etcd, tf).await;
    assert_eq!(backend.calls()[before..], [Call::DeleteFlow(tf.into())]);
    assert_eq!(slot(&etcd, 0).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 1).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 2).as_deref(), Some(tf2));

    // Unplug the others: the last one takes the service with it.
    etcd.put(&key("tap_action", tf2), "unplug");
    wait_cleaned(&etcd, tf2).await;
    etcd.put(&key("tap_action", tf3), "unplug");
    wait_cleaned(&etcd, tf3).await;
    assert_eq!(
        backend.calls()[before + 1..],
        [
            Call::DeleteFlow(tf2.into()),
            Call::DeleteFlow(tf3.into()),
            Call::DeleteService(SERVICE_PORT.into()),
        ]
    );
    for id in 0..4 {
        assert_eq!(slot(&etcd, id).as_deref(), Some("None"), "slot {id}");
    }
    assert!(etcd.get_prefix("/spp/openstack/tap_").is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_failure_is_reported_and_frees_the_slots() {
    let etcd = Etcd::new();
    let backend = Arc::new(FakeBackend::default());
    let source = port_interface_name(SOURCE_PORT);
    *backend.fail_flows.lock().unwrap() = Some(MirrorError::NoInterface(source.clone()));
    let agent = start_agent(&etcd, &backend);
    create_slots(&etcd, &[0, 1]);
    bind_ports(&etcd);

    // The driver took both slots, then asked for the plug.
    let tf = "7f000000-bbbb-4000-8000-000000000001";
    driver_take_slot(&etcd, 0, tf);
    driver_take_slot(&etcd, 1, tf);
    driver_plug(&etcd, tf, SERVICE_PORT, Some(0), Some(1));
    let status = wait_for(REACT, || match etcd.get(&key("tap_status", tf)) {
        Some(status) if status.starts_with("error:") => Ok(status),
        other => Err(format!("tap_status is {other:?}")),
    })
    .await;
    assert_eq!(status, format!("error:interface {source:?} does not exist"));
    assert_eq!(slot(&etcd, 0).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 1).as_deref(), Some("None"));
    // The service made for this flow alone is removed again.
    assert_eq!(
        backend.calls(),
        vec![
            ensure_service(SERVICE_PORT, "monitor0"),
            ensure_flow(tf, SERVICE_PORT, Direction::Both),
            Call::DeleteService(SERVICE_PORT.into()),
        ]
    );
    // The driver's keys stay for the user's delete, which still cleans up.
    assert_eq!(etcd.get(&key("tap_action", tf)).as_deref(), Some("plug"));
    etcd.put(&key("tap_action", tf), "unplug");
    wait_cleaned(&etcd, tf).await;
    assert_eq!(slot(&etcd, 0).as_deref(), Some("None"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_conflicts_apply_nothing() {
    let etcd = Etcd::new();
    let backend = Arc::new(FakeBackend::default());
    let agent = start_agent(&etcd, &backend);
    create_slots(&etcd, &[0, 1]);
    bind_ports(&etcd);
    let other = "7f000000-ffff-4000-8000-00000000000f";
    etcd.put(&key("mirror", "1"), other);

    // mirror_in 0 is free (taken, then given back), mirror_out 1 belongs to another flow.
    let tf = "7f000000-cccc-4000-8000-000000000001";
    driver_plug(&etcd, tf, SERVICE_PORT, Some(0), Some(1));
    wait_value(
        &etcd,
        &key("tap_status", tf),
        Some(&format!("error:mirror slot 1 is held by tap flow {other}")),
    )
    .await;
    assert_eq!(slot(&etcd, 0).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 1).as_deref(), Some(other));

    // A slot that devstack never created.
    let tf2 = "7f000000-cccc-4000-8000-000000000002";
    driver_plug(&etcd, tf2, SERVICE_PORT, Some(7), None);
    wait_value(
        &etcd,
        &key("tap_status", tf2),
        Some("error:mirror slot 7 does not exist"),
    )
    .await;
    assert_eq!(slot(&etcd, 7), None);

    // No mirror at all.
    let tf3 = "7f000000-cccc-4000-8000-000000000003";
    driver_plug(&etcd, tf3, SERVICE_PORT, None, None);
    wait_value(
        &etcd,
        &key("tap_status", tf3),
        Some("error:tap_info has no mirror"),
    )
    .await;

    assert_eq!(backend.calls(), vec![], "nothing may reach the dataplane");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_replays_the_keys_written_while_no_agent_ran() {
    let etcd = Etcd::new();
    create_slots(&etcd, &[0, 1, 2, 3]);
    bind_ports(&etcd);
    let plug_a = "7f000000-dddd-4000-8000-00000000000a";
    let plug_b = "7f000000-dddd-4000-8000-00000000000b";
    let unplug_c = "7f000000-dddd-4000-8000-00000000000c";
    let gone_d = "7f000000-dddd-4000-8000-00000000000d";
    driver_plug(&etcd, plug_a, SERVICE_PORT, Some(0), Some(1));
    driver_take_slot(&etcd, 2, plug_b);
    driver_plug(&etcd, plug_b, SERVICE_PORT, Some(2), None);
    // Plugged by an earlier agent, then deleted by the user while none ran.
    driver_take_slot(&etcd, 3, unplug_c);
    driver_plug(&etcd, unplug_c, SERVICE_PORT, None, Some(3));
    etcd.put(&key("tap_status", unplug_c), "up");
    etcd.put(&key("tap_action", unplug_c), "unplug");
    // A tap_action without tap_info: "already deleted", nothing is written.
    etcd.put(&key("tap_action", gone_d), "plug");

    let backend = Arc::new(FakeBackend::default());
    let agent = start_agent(&etcd, &backend);
    wait_value(&etcd, &key("tap_status", plug_a), Some("up")).await;
    wait_value(&etcd, &key("tap_status", plug_b), Some("up")).await;
    wait_cleaned(&etcd, unplug_c).await;
    let calls = backend.calls();
    for call in [
        ensure_flow(plug_a, SERVICE_PORT, Direction::Both),
        ensure_flow(plug_b, SERVICE_PORT, Direction::In),
        Call::DeleteFlow(unplug_c.into()),
    ] {
        assert!(calls.contains(&call), "missing {call:?} in {calls:#?}");
    }
    assert_eq!(slot(&etcd, 0).as_deref(), Some(plug_a));
    assert_eq!(slot(&etcd, 1).as_deref(), Some(plug_a));
    assert_eq!(slot(&etcd, 2).as_deref(), Some(plug_b));
    assert_eq!(slot(&etcd, 3).as_deref(), Some("None"));
    assert_eq!(etcd.get(&key("tap_status", gone_d)), None);
    assert_eq!(
        etcd.get(&key("tap_action", gone_d)).as_deref(),
        Some("plug")
    );
    assert!(!calls
        .iter()
        .any(|c| matches!(c, Call::EnsureFlow(f) if f.id == gone_d)));
    agent.stop().await;

    // A restarted agent (a fresh dataplane) plugs them again and deletes nothing.
    let backend = Arc::new(FakeBackend::default());
    let agent = start_agent(&etcd, &backend);
    wait_call(
        &backend,
        REACT,
        &ensure_flow(plug_a, SERVICE_PORT, Direction::Both),
    )
    .await;
    wait_call(
        &backend,
        REACT,
        &ensure_flow(plug_b, SERVICE_PORT, Direction::In),
    )
    .await;
    assert_eq!(backend.deletes(), vec![]);
    assert_eq!(etcd.get(&key("tap_status", plug_a)).as_deref(), Some("up"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_the_taps_and_reconciles_after() {
    let mut etcd = Etcd::new();
    let backend = Arc::new(FakeBackend::default());
    let agent = start_agent(&etcd, &backend);
    create_slots(&etcd, &[0, 1, 2]);
    bind_ports(&etcd);
    let service_b = "5e5e5e5e-0000-4000-8000-00000000000b";
    etcd.put(
        &key("bind_port", service_b),
        r#"{"mac_address": "fa:16:3e:00:00:0b", "vhost_id": 2}"#,
    );
    let tf_a = "7f000000-eeee-4000-8000-00000000000a";
    let tf_b = "7f000000-eeee-4000-8000-00000000000b";
    driver_plug(&etcd, tf_a, SERVICE_PORT, Some(0), Some(1));
    driver_plug(&etcd, tf_b, service_b, None, Some(2));
    wait_value(&etcd, &key("tap_status", tf_a), Some("up")).await;
    wait_value(&etcd, &key("tap_status", tf_b), Some("up")).await;
    assert!(backend
        .calls()
        .contains(&ensure_service(service_b, &port_interface_name(service_b))));

    // Outage: the agent keeps everything.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        backend.deletes(),
        vec![],
        "the agent unplugged during the outage"
    );

    // Partition: etcd runs, but not where the agent looks; tf_a's tap_action goes away.
    etcd.start_partitioned();
    assert!(etcd.delete(&key("tap_action", tf_a)));
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        backend.deletes(),
        vec![],
        "the agent unplugged during the outage"
    );

    // Back: the reconcile unplugs tf_a and keeps tf_b.
    etcd.start();
    let back = Instant::now();
    wait_call(&backend, RECOVER, &Call::DeleteFlow(tf_a.into())).await;
    eprintln!(
        "the agent reconciled {:?} after etcd came back",
        back.elapsed()
    );
    wait_cleaned(&etcd, tf_a).await;
    assert_eq!(slot(&etcd, 0).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 1).as_deref(), Some("None"));
    assert_eq!(slot(&etcd, 2).as_deref(), Some(tf_b));
    assert_eq!(
        backend.deletes(),
        vec![
            Call::DeleteFlow(tf_a.into()),
            Call::DeleteService(SERVICE_PORT.into()),
        ]
    );
    assert_eq!(etcd.get(&key("tap_status", tf_b)).as_deref(), Some("up"));

    // The watch is back: an unplug written now is handled.
    etcd.put(&key("tap_action", tf_b), "unplug");
    wait_cleaned(&etcd, tf_b).await;
    assert_eq!(slot(&etcd, 2).as_deref(), Some("None"));
    assert_eq!(
        backend.deletes()[2..],
        [
            Call::DeleteFlow(tf_b.into()),
            Call::DeleteService(service_b.into()),
        ]
    );
    agent.stop().await;
}
