//! An independent xDS control plane for the client tests: a Python grpcio
//! server built on PyPI `xds-protos` (Envoy's generated stubs), serving
//! `EndpointDiscoveryService.StreamEndpoints` and
//! `AggregatedDiscoveryService.StreamAggregatedResources` (SotW, EDS only) on
//! loopback.
//!
//! Control channel: the harness writes one JSON command a line on the
//! server's stdin (`set`, `replay`, `mode`, `wrong_type`); the server writes one event a line on
//! stdout, `kind key=value …` with percent-encoded values (`listening`,
//! `request`, `response`, `closed`, `done`). Every request and response is
//! recorded here.
//!
//! Server behaviour (like go-control-plane's SotW server): a request whose
//! `response_nonce` is not the last nonce sent for its type on its stream is
//! stale and ignored; a NACK (`error_detail` set) is not answered, unless
//! `resend_nacked` is on: then it is answered like any request whose version
//! differs, with the same (rejected) version at once, as go-control-plane's
//! snapshot cache does (go-control-plane#962); otherwise the server answers
//! when the request's version differs from its own or names were added on
//! the stream, with every known subscribed cluster. `set` pushes the new
//! version to every stream subscribed to a changed cluster. `wrong_type`
//! makes the next response carry another type URL.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Pinned like `python::PACKAGES` (installed here too when the shared venv
/// predates it).
const XDS_PROTOS: &str = "xds-protos==1.85.0";

const SERVER: &str = r#"
import json, queue, sys, threading, time, urllib.parse
from concurrent import futures

import grpc
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc

TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
lock = threading.RLock()
out_lock = threading.Lock()
version = ""
clusters = {}
versions = {}
delta_on = [len(sys.argv) > 2 and sys.argv[2] == "delta"]
resend_nacked = [False]
wrong_next = []
# The next response keeps the stream's last nonce (a server bug xDS clients meet).
reuse_nonce = [False]
streams = {}
next_stream = [0]


def emit(kind, **fields):
    parts = [kind, "t=%d" % time.monotonic_ns()]
    for k, v in fields.items():
        if v is None:
            continue
        parts.append("%s=%s" % (k, urllib.parse.quote(str(v), safe="")))
    with out_lock:
        sys.stdout.write(" ".join(parts) + "\n")
        sys.stdout.flush()


def build(name, spec):
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=spec.get("name", name))
    for loc in spec.get("localities", []):
        lle = cla.endpoints.add()
        lle.locality.zone = loc.get("zone", "")
        lle.priority = loc.get("priority", 0)
        if loc.get("weight") is not None:
            lle.load_balancing_weight.value = loc["weight"]
        for ep in loc.get("endpoints", []):
            lbe = lle.lb_endpoints.add()
            lbe.health_status = health_check_pb2.HealthStatus.Value(ep.get("health", "HEALTHY"))
            if ep.get("weight") is not None:
                lbe.load_balancing_weight.value = ep["weight"]
            if ep.get("no_address"):
                lbe.endpoint.hostname = "no-address"
            else:
                sa = lbe.endpoint.address.socket_address
                sa.address = ep["ip"]
                sa.port_value = ep["port"]
    for d in spec.get("drops", []):
        drop = cla.policy.drop_overloads.add()
        drop.category = d["category"]
        drop.drop_percentage.numerator = d["per_million"]
        drop.drop_percentage.denominator = 2  # MILLION
    return cla


class Stream:
    def __init__(self, method):
        next_stream[0] += 1
        self.id = next_stream[0]
        self.method = method
        self.q = queue.Queue()
        self.names = []
        self.nonce = 0
        self.last_nonce = {}
        self.last = None

    def send(self, only=None):
        names = [n for n in self.names if n in clusters and (only is None or n in only)]
        if not names:
            return
        if reuse_nonce[0] and self.nonce:
            reuse_nonce[0] = False
        else:
            self.nonce += 1
        type_url = wrong_next.pop(0) if wrong_next else TYPE
        resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=str(self.nonce))
        for n in names:
            resp.resources.add().Pack(clusters[n])
        self.last_nonce[type_url] = resp.nonce
        self.last = resp
        emit("response", stream=self.id, method=self.method, version=version, nonce=resp.nonce,
             clusters=",".join(names), type_url=type_url)
        self.q.put(resp)


def on_request(st, req):
    with lock:
        nack = req.HasField("error_detail")
        stale = bool(req.response_nonce) and \
            req.response_nonce != st.last_nonce.get(req.type_url or TYPE)
        node = req.node if req.HasField("node") else None
        emit("request", stream=st.id, method=st.method, version=req.version_info,
             nonce=req.response_nonce, type_url=req.type_url, names=",".join(req.resource_names),
             node_id=node.id if node else None, node_cluster=node.cluster if node else None,
             features=",".join(node.client_features) if node else None,
             error=req.error_detail.message if nack else None, stale=int(stale))
        if stale or req.type_url not in ("", TYPE):
            return
        added = set(req.resource_names) - set(st.names)
        st.names = list(req.resource_names)
        if nack and not resend_nacked[0]:
            return
        if req.version_info != version or added:
            st.send()


class DeltaStream:
    """A Delta stream: like go-control-plane's delta server, it tracks the
    version of each resource the client holds (from initial_resource_versions,
    then from what it sent) and sends only what differs, and the names of
    subscribed resources that are gone."""

    def __init__(self, method):
        next_stream[0] += 1
        self.id = next_stream[0]
        self.method = method
        self.q = queue.Queue()
        self.names = set()
        self.known = {}
        self.first = True
        self.nonce = 0
        self.last_nonce = None
        self.last = None

    def send(self, only=None):
        changed = [n for n in sorted(self.names) if n in clusters
                   and self.known.get(n) != versions[n] and (only is None or n in only)]
        removed = [n for n in sorted(self.names) if n not in clusters and n in self.known]
        if not changed and not removed:
            return
        if reuse_nonce[0] and self.nonce:
            reuse_nonce[0] = False
        else:
            self.nonce += 1
        type_url = wrong_next.pop(0) if wrong_next else TYPE
        resp = discovery_pb2.DeltaDiscoveryResponse(system_version_info=version, type_url=type_url,
                                                    nonce=str(self.nonce))
        for n in changed:
            r = resp.resources.add()
            r.name = n
            r.version = versions[n]
            r.resource.Pack(clusters[n])
            self.known[n] = versions[n]
        for n in removed:
            resp.removed_resources.append(n)
            del self.known[n]
        self.last_nonce = resp.nonce
        self.last = resp
        emit("response", stream=self.id, method=self.method, version=version, nonce=resp.nonce,
             clusters=",".join(changed), removed=",".join(removed), type_url=type_url)
        self.q.put(resp)


def on_delta_request(st, req):
    with lock:
        nack = req.HasField("error_detail")
        stale = bool(req.response_nonce) and req.response_nonce != st.last_nonce
        node = req.node if req.HasField("node") else None
        initial = ",".join("%s:%s" % kv for kv in sorted(req.initial_resource_versions.items()))
        emit("request", stream=st.id, method=st.method, nonce=req.response_nonce,
             type_url=req.type_url, names=",".join(req.resource_names_subscribe),
             unsubscribe=",".join(req.resource_names_unsubscribe), initial=initial,
             node_id=node.id if node else None, node_cluster=node.cluster if node else None,
             features=",".join(node.client_features) if node else None,
             error=req.error_detail.message if nack else None, stale=int(stale))
        if stale or req.type_url not in ("", TYPE):
            return
        if st.first:
            st.first = False
            st.known = dict(req.initial_resource_versions)
        st.names |= set(req.resource_names_subscribe)
        for n in req.resource_names_unsubscribe:
            st.names.discard(n)
            st.known.pop(n, None)
        if nack:
            return
        st.send()


def serve_stream(request_iterator, st, on_req):
    with lock:
        streams[st.id] = st

    def reader():
        try:
            for req in request_iterator:
                on_req(st, req)
        except Exception as e:  # the stream was cancelled
            emit("reader", stream=st.id, error=repr(e))
        finally:
            st.q.put(None)

    threading.Thread(target=reader, daemon=True).start()
    try:
        while True:
            item = st.q.get()
            if item is None:
                break
            yield item
    finally:
        with lock:
            streams.pop(st.id, None)
        emit("closed", stream=st.id)


def delta_offered(context):
    if not delta_on[0]:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


class Eds(eds_pb2_grpc.EndpointDiscoveryServiceServicer):
    def StreamEndpoints(self, request_iterator, context):
        return serve_stream(request_iterator, Stream("eds"), on_request)

    def DeltaEndpoints(self, request_iterator, context):
        delta_offered(context)
        return serve_stream(request_iterator, DeltaStream("delta_eds"), on_delta_request)


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def StreamAggregatedResources(self, request_iterator, context):
        return serve_stream(request_iterator, Stream("ads"), on_request)

    def DeltaAggregatedResources(self, request_iterator, context):
        delta_offered(context)
        return serve_stream(request_iterator, DeltaStream("delta_ads"), on_delta_request)


def set_clusters(cmd):
    global version
    version = cmd["version"]
    changed = set()
    for name, spec in cmd["clusters"].items():
        clusters[name] = build(name, spec)
        versions[name] = version
        changed.add(name)
    return changed


def main():
    global version
    if len(sys.argv) > 3:
        set_clusters(json.loads(sys.argv[3]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(Eds(), server)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(), server)
    port = server.add_insecure_port("127.0.0.1:%d" % int(sys.argv[1]))
    server.start()
    emit("listening", port=port)
    seq = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        seq += 1
        with lock:
            if cmd["cmd"] == "set":
                changed = set_clusters(cmd)
                only = cmd.get("only")
                for st in list(streams.values()):
                    if changed & set(st.names):
                        st.send(only=set(only) if only is not None else None)
            elif cmd["cmd"] == "remove":
                version = cmd["version"]
                for name in cmd["names"]:
                    clusters.pop(name, None)
                    versions.pop(name, None)
                for st in list(streams.values()):
                    if isinstance(st, DeltaStream):
                        st.send()
                    elif set(cmd["names"]) & set(st.names):
                        st.send()
            elif cmd["cmd"] == "mode":
                resend_nacked[0] = cmd["resend_nacked"]
            elif cmd["cmd"] == "wrong_type":
                wrong_next.append(cmd["type"])
            elif cmd["cmd"] == "reuse_nonce":
                reuse_nonce[0] = True
            elif cmd["cmd"] == "replay":
                for st in list(streams.values()):
                    if st.last is not None:
                        last_version = getattr(st.last, "version_info", None)
                        if last_version is None:
                            last_version = st.last.system_version_info
                        emit("response", stream=st.id, method=st.method, version=last_version,
                             nonce=st.last.nonce, replay=1, type_url=st.last.type_url)
                        st.q.put(st.last)
        emit("done", seq=seq)
    server.stop(0)


main()
"#;

/// An endpoint of a [`Cla`].
#[derive(Clone, Debug)]
pub struct Ep {
    pub ip: String,
    pub port: u32,
    /// An `envoy.config.core.v3.HealthStatus` name.
    pub health: String,
    pub weight: Option<u32>,
    /// Sends an `Endpoint` without an address (invalid).
    pub no_address: bool,
}

impl Ep {
    pub fn new(ip: &str, port: u32) -> Self {
        Ep {
            ip: ip.into(),
            port,
            health: "HEALTHY".into(),
            weight: None,
            no_address: false,
        }
    }
    pub fn health(mut self, health: &str) -> Self {
        self.health = health.into();
        self
    }
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }
}

/// A `LocalityLbEndpoints`.
#[derive(Clone, Debug)]
pub struct Loc {
    pub zone: String,
    pub priority: u32,
    pub weight: Option<u32>,
    pub endpoints: Vec<Ep>,
}

impl Loc {
    pub fn new(zone: &str, priority: u32, endpoints: Vec<Ep>) -> Self {
        Loc {
            zone: zone.into(),
            priority,
            weight: None,
            endpoints,
        }
    }
}

/// A `ClusterLoadAssignment` (the cluster name is the key it is set under,
/// unless `name` says otherwise).
#[derive(Clone, Debug, Default)]
pub struct Cla {
    /// `cluster_name` in the resource, when not the key.
    pub name: Option<String>,
    pub localities: Vec<Loc>,
    /// (category, parts per million)
    pub drops: Vec<(String, u32)>,
}

impl Cla {
    /// One locality "z" at priority 0.
    pub fn single(endpoints: Vec<Ep>) -> Self {
        Cla {
            name: None,
            localities: vec![Loc::new("z", 0, endpoints)],
            drops: Vec::new(),
        }
    }

    fn json(&self) -> String {
        let eps = |l: &Loc| {
            l.endpoints
                .iter()
                .map(|e| {
                    format!(
                        r#"{{"ip":{},"port":{},"health":{},"weight":{},"no_address":{}}}"#,
                        json_str(&e.ip),
                        e.port,
                        json_str(&e.health),
                        json_opt(e.weight),
                        e.no_address
                    )
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let locs = self
            .localities
            .iter()
            .map(|l| {
                format!(
                    r#"{{"zone":{},"priority":{},"weight":{},"endpoints":[{}]}}"#,
                    json_str(&l.zone),
                    l.priority,
                    json_opt(l.weight),
                    eps(l)
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let drops = self
            .drops
            .iter()
            .map(|(c, ppm)| format!(r#"{{"category":{},"per_million":{ppm}}}"#, json_str(c)))
            .collect::<Vec<_>>()
            .join(",");
        let name = self
            .name
            .as_ref()
            .map_or(String::new(), |n| format!(r#""name":{},"#, json_str(n)));
        format!(r#"{{{name}"localities":[{locs}],"drops":[{drops}]}}"#)
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `set` command's JSON.
fn set_command(version: &str, clusters: &[(&str, Cla)], only: Option<&[&str]>) -> String {
    let map = clusters
        .iter()
        .map(|(name, cla)| format!("{}:{}", json_str(name), cla.json()))
        .collect::<Vec<_>>()
        .join(",");
    let only = only.map_or(String::new(), |o| {
        format!(
            r#","only":[{}]"#,
            o.iter().map(|n| json_str(n)).collect::<Vec<_>>().join(",")
        )
    });
    format!(
        r#"{{"cmd":"set","version":{},"clusters":{{{map}}}{only}}}"#,
        json_str(version)
    )
}

fn json_opt(v: Option<u32>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

/// A `DiscoveryRequest` the server received.
#[derive(Clone, Debug)]
pub struct SeenRequest {
    pub stream: u32,
    /// "eds", "ads", "delta_eds" or "delta_ads"
    pub method: String,
    pub version_info: String,
    pub response_nonce: String,
    pub type_url: String,
    /// SotW: `resource_names`; Delta: `resource_names_subscribe`.
    pub resource_names: Vec<String>,
    /// Delta: `resource_names_unsubscribe`.
    pub unsubscribe: Vec<String>,
    /// Delta: `initial_resource_versions` as "name:version", sorted.
    pub initial_versions: Vec<String>,
    /// Set when the request carried a `Node`.
    pub node_id: Option<String>,
    pub node_cluster: Option<String>,
    pub client_features: Vec<String>,
    /// `error_detail.message` of a NACK.
    pub error_detail: Option<String>,
    /// The server judged the nonce stale and ignored the request.
    pub stale: bool,
    pub at: Instant,
    /// When the server read it (its monotonic clock, ns).
    pub server_ns: u64,
}

/// A `DiscoveryResponse` the server sent.
#[derive(Clone, Debug)]
pub struct SentResponse {
    pub stream: u32,
    pub type_url: String,
    pub version_info: String,
    pub nonce: String,
    pub clusters: Vec<String>,
    /// Delta: `removed_resources`.
    pub removed: Vec<String>,
    pub replay: bool,
    /// When the server queued it for its stream (its monotonic clock, ns).
    pub server_ns: u64,
}

#[derive(Default)]
struct Log {
    requests: Vec<SeenRequest>,
    responses: Vec<SentResponse>,
    port: Option<u16>,
    done: u64,
    exited: bool,
}

type Shared = Arc<(Mutex<Log>, Condvar)>;

/// The running Python control plane; killed on drop.
pub struct ControlPlane {
    child: Child,
    stdin: Option<ChildStdin>,
    log: Shared,
    sent: u64,
    pub port: u16,
}

/// The venv's python with `xds-protos` importable.
pub fn python() -> PathBuf {
    let python = crate::python::python();
    let probe = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import envoy.service.endpoint.v3.eds_pb2_grpc"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !probe(&python) {
        // A venv made before xds-protos joined the package list.
        let venv = python.parent().and_then(|b| b.parent()).expect("venv dir");
        let lock = std::fs::File::create(venv.with_extension("lock")).expect("venv lock file");
        // SAFETY: flock on a file we hold open; released when it is closed.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
        if !probe(&python) {
            let out = Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .arg(XDS_PROTOS)
                .output()
                .expect("running pip");
            assert!(
                out.status.success(),
                "pip install {XDS_PROTOS}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    python
}

fn script() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tapmesh-xds-peer");
    std::fs::create_dir_all(&dir).expect("script dir");
    // Named by its content (FNV-1a), so runs share one file instead of
    // leaving one per test process behind.
    let hash = SERVER.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let path = dir.join(format!("xds_server_{hash:016x}.py"));
    // Once per process, and atomically: parallel tests and processes start
    // servers at once, and a rename never shows a half-written file.
    static WRITTEN: std::sync::Once = std::sync::Once::new();
    WRITTEN.call_once(|| {
        if std::fs::read_to_string(&path).is_ok_and(|s| s == SERVER) {
            return;
        }
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, SERVER).expect("writing the server script");
        std::fs::rename(&tmp, &path).expect("placing the server script");
    });
    path
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list(s: Option<&String>) -> Vec<String> {
    match s {
        Some(s) if !s.is_empty() => s.split(',').map(String::from).collect(),
        _ => Vec::new(),
    }
}

fn record(log: &mut Log, line: &str) {
    let mut words = line.split(' ');
    let kind = words.next().unwrap_or_default();
    let f: HashMap<&str, String> = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k, decode(v)))
        .collect();
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    match kind {
        "listening" => log.port = get("port").parse().ok(),
        "done" => log.done = get("seq").parse().unwrap_or(0),
        "request" => log.requests.push(SeenRequest {
            stream: get("stream").parse().unwrap_or(0),
            method: get("method"),
            version_info: get("version"),
            response_nonce: get("nonce"),
            type_url: get("type_url"),
            resource_names: list(f.get("names")),
            unsubscribe: list(f.get("unsubscribe")),
            initial_versions: list(f.get("initial")),
            node_id: f.get("node_id").cloned(),
            node_cluster: f.get("node_cluster").cloned(),
            client_features: list(f.get("features")),
            error_detail: f.get("error").cloned(),
            stale: get("stale") == "1",
            at: Instant::now(),
            server_ns: get("t").parse().unwrap_or(0),
        }),
        "response" => log.responses.push(SentResponse {
            stream: get("stream").parse().unwrap_or(0),
            type_url: get("type_url"),
            version_info: get("version"),
            nonce: get("nonce"),
            clusters: list(f.get("clusters")),
            removed: list(f.get("removed")),
            replay: get("replay") == "1",
            server_ns: get("t").parse().unwrap_or(0),
        }),
        _ => {}
    }
}

impl ControlPlane {
    /// Starts a server on a free loopback port.
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// Starts a server on `port` (0: any free port), retrying briefly while
    /// the port is still held by a server just killed.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, None, false)
    }

    /// Starts a server that also implements Delta xDS (`DeltaEndpoints`,
    /// `DeltaAggregatedResources`) on `port` (0: any free port); the others
    /// answer Delta calls UNIMPLEMENTED, as a SotW-only server does.
    pub fn start_delta_on(port: u16) -> Self {
        Self::start_with(port, None, true)
    }

    /// [`Self::start_delta_on`] already holding `clusters` as `version`
    /// before it listens (a client reconnecting at once finds them).
    pub fn start_delta_serving(port: u16, version: &str, clusters: &[(&str, Cla)]) -> Self {
        let set = set_command(version, clusters, None);
        Self::start_full(port, None, true, Some(set))
    }

    /// Starts a server on a free port of network namespace `netns`'s loopback
    /// (for a daemon that runs there); `delta`: it implements Delta xDS too.
    pub fn start_in(netns: &str, delta: bool) -> Self {
        Self::start_with(0, Some(netns), delta)
    }

    /// [`Self::start_in`] on `port` (a server started again where the
    /// daemon looks for it).
    pub fn start_in_on(netns: &str, port: u16, delta: bool) -> Self {
        Self::start_with(port, Some(netns), delta)
    }

    fn start_with(port: u16, netns: Option<&str>, delta: bool) -> Self {
        Self::start_full(port, netns, delta, None)
    }

    fn start_full(port: u16, netns: Option<&str>, delta: bool, initial: Option<String>) -> Self {
        let python = python();
        let script = script();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Self::spawn(&python, &script, port, netns, delta, initial.as_deref()) {
                Ok(cp) => return cp,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("xds peer did not start ({e}); retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("the xds peer did not start: {e}"),
            }
        }
    }

    fn spawn(
        python: &PathBuf,
        script: &PathBuf,
        port: u16,
        netns: Option<&str>,
        delta: bool,
        initial: Option<&str>,
    ) -> Result<Self, String> {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(python);
                c
            }
            None => Command::new(python),
        };
        let mut child = command
            .arg("-u")
            .arg(script)
            .arg(port.to_string())
            .arg(if delta { "delta" } else { "sotw" })
            .args(initial)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawning python: {e}"))?;
        let stdout = child.stdout.take().expect("stdout");
        let log: Shared = Arc::default();
        let reader_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TAPMESH_XDS_PEER_TRACE").is_some() {
                    eprintln!("xds peer: {line}");
                }
                let (lock, cv) = &*reader_log;
                record(&mut lock.lock().unwrap(), &line);
                cv.notify_all();
            }
            let (lock, cv) = &*reader_log;
            lock.lock().unwrap().exited = true;
            cv.notify_all();
        });
        let stdin = child.stdin.take();
        let mut cp = ControlPlane {
            child,
            stdin,
            log,
            sent: 0,
            port: 0,
        };
        let started = cp.wait(Duration::from_secs(30), |l| l.port.is_some() || l.exited);
        match started.and_then(|_| cp.log.0.lock().unwrap().port) {
            Some(p) => {
                cp.port = p;
                Ok(cp)
            }
            None => {
                let _ = cp.child.kill();
                let _ = cp.child.wait();
                Err("no listening port reported".into())
            }
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait(&self, timeout: Duration, mut done: impl FnMut(&Log) -> bool) -> Option<()> {
        let (lock, cv) = &*self.log;
        let deadline = Instant::now() + timeout;
        let mut log = lock.lock().unwrap();
        while !done(&log) {
            let left = deadline.checked_duration_since(Instant::now())?;
            log = cv.wait_timeout(log, left).unwrap().0;
        }
        Some(())
    }

    fn command(&mut self, json: String) {
        let stdin = self.stdin.as_mut().expect("server stdin");
        writeln!(stdin, "{json}").expect("writing to the xds peer");
        stdin.flush().expect("flushing the xds peer's stdin");
        self.sent += 1;
        let seq = self.sent;
        self.wait(Duration::from_secs(30), |l| l.done >= seq)
            .expect("the xds peer did not acknowledge the command");
    }

    /// Sets `clusters` and the server's version, and pushes to every stream
    /// subscribed to one of them all the known clusters it subscribed to.
    pub fn set(&mut self, version: &str, clusters: &[(&str, Cla)]) {
        self.set_inner(version, clusters, None)
    }

    /// Like [`Self::set`], but the pushed responses carry only `only`.
    pub fn set_only(&mut self, version: &str, clusters: &[(&str, Cla)], only: &[&str]) {
        self.set_inner(version, clusters, Some(only))
    }

    fn set_inner(&mut self, version: &str, clusters: &[(&str, Cla)], only: Option<&[&str]>) {
        self.command(set_command(version, clusters, only));
    }

    /// Removes `names` (version `version`): Delta streams get them in
    /// `removed_resources`; SotW streams subscribed to one get the rest.
    pub fn remove(&mut self, version: &str, names: &[&str]) {
        let names = names
            .iter()
            .map(|n| json_str(n))
            .collect::<Vec<_>>()
            .join(",");
        self.command(format!(
            r#"{{"cmd":"remove","version":{},"names":[{names}]}}"#,
            json_str(version)
        ));
    }

    /// Answers NACKs at once with the version they rejected (on), or not at all (off).
    pub fn resend_nacked(&mut self, on: bool) {
        self.command(format!(r#"{{"cmd":"mode","resend_nacked":{on}}}"#));
    }

    /// The next response (on any stream) carries `type_url` instead of EDS's.
    pub fn wrong_type(&mut self, type_url: &str) {
        self.command(format!(
            r#"{{"cmd":"wrong_type","type":{}}}"#,
            json_str(type_url)
        ));
    }

    /// The next response carries its stream's last nonce again.
    pub fn reuse_nonce(&mut self) {
        self.command(r#"{"cmd":"reuse_nonce"}"#.into());
    }

    /// Resends the last response of every stream unchanged (same nonce).
    pub fn replay(&mut self) {
        self.command(r#"{"cmd":"replay"}"#.into());
    }

    pub fn requests(&self) -> Vec<SeenRequest> {
        self.log.0.lock().unwrap().requests.clone()
    }

    pub fn responses(&self) -> Vec<SentResponse> {
        self.log.0.lock().unwrap().responses.clone()
    }

    /// The first request (in arrival order) matching `pred`, waiting for it.
    pub fn wait_request(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&SeenRequest) -> bool,
    ) -> SeenRequest {
        let mut found = None;
        self.wait(timeout, |l| {
            found = l.requests.iter().find(|r| pred(r)).cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no request {what} within {timeout:?}; got {:#?}",
                self.requests()
            )
        })
    }

    /// Kills the server process (no goodbye on the streams).
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}
