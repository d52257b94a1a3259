//! The NetManager REST API (JSON over HTTP), with Oakestra's paths and field
//! names. Errors are `{"message": ...}` with a status that says what kind.

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::{
    extract::{
        rejection::{BytesRejection, JsonRejection},
        State,
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;

use super::manager::{DeploySpec, NetManager, NetnsRef, NmError, RemoteSpec};
use super::model::{IpType, ServiceIp};

/// The largest request body taken; a larger one is answered 413.
pub const BODY_LIMIT: usize = 1 << 20;

/// The longest message answered: a message that quotes a client's value
/// (serde's "invalid type: string ...", a bad name) must not send megabytes back.
const MESSAGE_LIMIT: usize = 300;
/// A file name's limit (NAME_MAX), which a named network namespace is.
const NETNS_NAME_MAX: usize = 255;

pub struct ApiError(StatusCode, String);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The caller sees a cut message; the log keeps what the daemon failed at.
        if self.0.is_server_error() {
            tracing::warn!(
                "netmanager API: {}: {}",
                self.0,
                crate::names::cut(&self.1, 4096)
            );
        }
        let message = crate::names::cut(&self.1, MESSAGE_LIMIT);
        (self.0, Json(serde_json::json!({ "message": message }))).into_response()
    }
}

impl From<NmError> for ApiError {
    fn from(e: NmError) -> Self {
        let status = match &e {
            NmError::Conflict(_)
            | NmError::Dataplane(crate::dataplane::DataplaneError::Overlap(_)) => {
                StatusCode::CONFLICT
            }
            // Oakestra's NetManager answers 400 to a call before /register.
            NmError::NotRegistered | NmError::AlreadyRegistered(_) | NmError::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            NmError::NotANamespace(_) => StatusCode::BAD_REQUEST,
            NmError::HostNamespace(_) => StatusCode::FORBIDDEN,
            NmError::NoSubnet | NmError::SubnetRefused(_) => StatusCode::INTERNAL_SERVER_ERROR,
            NmError::NoNamespace(_) | NmError::NotDeployed(_) => StatusCode::NOT_FOUND,
            NmError::Ipam(super::ipam::IpamError::Exhausted(_)) | NmError::Model(_) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            NmError::Ipam(_) => StatusCode::BAD_REQUEST,
            NmError::Network(_)
            | NmError::Dataplane(_)
            | NmError::Ports(_)
            | NmError::Egress(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // A body over the limit keeps its 413; every other rejection is the client's 400.
        let status = match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, format!("bad request body: {}", e.body_text()))
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

#[derive(Deserialize)]
struct RegisterRequest {
    client_id: String,
    #[serde(default)]
    cluster_address: String,
    /// The seed API's field; the node's container subnet.
    subnetwork: Option<String>,
    subnetwork_v6: Option<String>,
}

#[derive(Deserialize)]
struct ServiceIpJson {
    #[serde(rename = "IpType")]
    ip_type: String,
    #[serde(rename = "Address")]
    address: String,
    #[serde(rename = "Address_v6", default)]
    address_v6: Option<String>,
}

#[derive(Deserialize)]
struct DeployRequest {
    pid: Option<i64>,
    /// A network namespace path (the seed's containerId, for /docker/deploy).
    netns: Option<String>,
    #[serde(rename = "serviceName", alias = "appName")]
    service_name: String,
    #[serde(rename = "instanceNumber")]
    instance_number: i64,
    #[serde(rename = "portMappings", default)]
    port_mappings: String,
    #[serde(rename = "serviceIp", alias = "serviceIP", default)]
    service_ip: Vec<ServiceIpJson>,
    #[serde(default)]
    weight: Option<u32>,
}

#[derive(Deserialize)]
struct UndeployRequest {
    #[serde(rename = "serviceName", alias = "appName")]
    service_name: String,
    /// Optional as in the seed's `/docker/undeploy` (a service name alone):
    /// then the job's one instance on this node.
    #[serde(rename = "instanceNumber", default)]
    instance_number: Option<i64>,
}

/// The instance an undeploy names: its number, or without one the job's
/// only instance here (`None`: none here). Several: refused, none removed.
async fn undeploy_target(
    nm: &NetManager,
    job: &str,
    number: Option<i64>,
) -> Result<Option<u32>, ApiError> {
    if let Some(number) = number {
        return instance_number(number).map(Some);
    }
    match nm.local_instances(job).await?.as_slice() {
        [] => Ok(None),
        [only] => Ok(Some(*only)),
        several => Err(bad(format!(
            "instanceNumber is missing and {job} has instances {} on this node: name the one to undeploy",
            several.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// One instance of a table. The cluster lists instances scheduled but not
/// yet deployed without addresses: those are skipped.
#[derive(Deserialize)]
struct TableInstance {
    instance_number: i64,
    #[serde(default)]
    namespace_ip: Option<String>,
    #[serde(default)]
    namespace_ip_v6: Option<String>,
    #[serde(default)]
    host_ip: Option<String>,
    #[serde(default)]
    host_port: serde_json::Value,
    #[serde(default)]
    service_ip: Vec<ServiceIpJson>,
    #[serde(default)]
    weight: Option<u32>,
}

/// The cluster's table-query result for one job (its MQTT payload).
#[derive(Deserialize)]
struct TableUpdate {
    app_name: String,
    #[serde(default)]
    instance_list: Vec<TableInstance>,
    /// What the query asked for (job name or service IP).
    #[serde(default)]
    query_key: String,
}

fn job_name(name: &str) -> Result<String, ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(name.to_string())
    } else {
        Err(bad(format!(
            "serviceName {name:?} must be 1-253 letters, digits, '.', '-' or '_' (like app.appns.svc.svcns)"
        )))
    }
}

/// A job to deploy: in Oakestra mode four non-empty parts
/// (app.appns.svc.svcns), as Oakestra's NetManager refuses any other
/// ("invalid app name"). Undeploys take any name, so a job deployed before
/// can always go.
fn deployed_job_name(nm: &NetManager, name: &str) -> Result<String, ApiError> {
    let job = job_name(name)?;
    let parts = || job.split('.');
    if nm.oakestra() && (parts().count() != 4 || parts().any(str::is_empty)) {
        return Err(bad(format!(
            "serviceName {name:?} must be four non-empty parts joined by '.' (app.appns.svc.svcns), as Oakestra's"
        )));
    }
    Ok(job)
}

fn instance_number(n: i64) -> Result<u32, ApiError> {
    u32::try_from(n).map_err(|_| {
        bad(format!(
            "instanceNumber {n} must be in 0..={} (an unsigned 32-bit number)",
            u32::MAX
        ))
    })
}

fn service_ips(list: Vec<ServiceIpJson>) -> Result<Vec<ServiceIp>, ApiError> {
    list.into_iter()
        .filter(|s| !s.address.is_empty())
        .map(|s| {
            let ip_type = IpType::parse(&s.ip_type).ok_or_else(|| {
                bad(format!(
                    "IpType {:?} is not RR, Closest or InstanceNumber",
                    s.ip_type
                ))
            })?;
            let address: Ipv4Addr = s
                .address
                .parse()
                .map_err(|_| bad(format!("Address {:?} is not an IPv4 address", s.address)))?;
            let address_v6: Option<std::net::Ipv6Addr> = match s.address_v6.as_deref() {
                None | Some("") => None,
                Some(t) => Some(
                    t.parse()
                        .map_err(|_| bad(format!("Address_v6 {t:?} is not an IPv6 address")))?,
                ),
            };
            // A service IP stands for instances: never this host, a whole
            // network, a group or a link.
            let v4_ok = !(address.is_unspecified()
                || address.is_broadcast()
                || address.is_loopback()
                || address.is_multicast()
                || address.is_link_local());
            let v6_ok = address_v6.is_none_or(|a| {
                !(a.is_unspecified()
                    || a.is_loopback()
                    || a.is_multicast()
                    || a.is_unicast_link_local())
            });
            if !v4_ok || !v6_ok {
                return Err(bad(format!(
                    "service IP {} is not a unicast address an instance can stand behind",
                    if v4_ok {
                        s.address_v6.as_deref().unwrap_or_default()
                    } else {
                        s.address.as_str()
                    }
                )));
            }
            Ok(ServiceIp {
                ip_type,
                address,
                address_v6,
                weight: 0,
            })
        })
        .collect()
}

/// Runs an operation to its end even if the client goes away (a dropped
/// handler future must not cut a deploy in half).
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, NmError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn register(
    State(nm): State<Arc<NetManager>>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body?;
    detached(async move {
        nm.register(
            r.client_id,
            r.cluster_address,
            r.subnetwork,
            r.subnetwork_v6,
        )
        .await
    })
    .await?;
    Ok(Json(serde_json::json!({})))
}

async fn deploy(
    State(nm): State<Arc<NetManager>>,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> Result<Json<super::manager::Deployed>, ApiError> {
    let Json(r) = body?;
    let netns = match (r.pid, r.netns) {
        (Some(pid), None) if pid > 0 && pid <= i64::from(u32::MAX) => NetnsRef::Pid(pid as u32),
        (Some(pid), None) => return Err(bad(format!("pid {pid} is not a process id"))),
        (None, Some(path)) if path.starts_with('/') => NetnsRef::Path(path),
        (None, Some(path)) => return Err(bad(format!("netns {path:?} must be an absolute path"))),
        (Some(_), Some(_)) => return Err(bad("give pid or netns, not both")),
        (None, None) => return Err(bad("pid (or netns) is missing")),
    };
    let ports = super::ports::parse(&r.port_mappings).map_err(|e| bad(e.to_string()))?;
    let spec = DeploySpec {
        netns,
        job: deployed_job_name(&nm, &r.service_name)?,
        number: instance_number(r.instance_number)?,
        service_ips: service_ips(r.service_ip)?,
        weight: r.weight.unwrap_or(1).max(1),
        ports,
        made_netns: false,
    };
    Ok(Json(detached(async move { nm.deploy(spec).await }).await?))
}

async fn undeploy(
    State(nm): State<Arc<NetManager>>,
    body: Result<Json<UndeployRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body?;
    let job = job_name(&r.service_name)?;
    let Some(number) = undeploy_target(&nm, &job, r.instance_number).await? else {
        tracing::info!("undeploy: {job} has no instance on this node");
        return Ok(Json(serde_json::json!({})));
    };
    match detached(async move { nm.undeploy(&job, number).await }).await {
        // Oakestra answers 200 whether or not the instance was deployed.
        Err(ApiError(StatusCode::NOT_FOUND, message)) => {
            tracing::info!("undeploy: {message}");
            Ok(Json(serde_json::json!({})))
        }
        other => other.map(|()| Json(serde_json::json!({}))),
    }
}

/// The Node Engine's unikernel call: the deploy body with pid 0 (the VM
/// does not run yet); the namespace is made here.
async fn unikernel_deploy(
    State(nm): State<Arc<NetManager>>,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> Result<Json<super::manager::Deployed>, ApiError> {
    let Json(r) = body?;
    let job = deployed_job_name(&nm, &r.service_name)?;
    let number = instance_number(r.instance_number)?;
    // The namespace is a file under /run/netns: its name has the file system's limit.
    let netns = super::manager::unikernel::netns_name(&job, number);
    if netns.len() > NETNS_NAME_MAX {
        return Err(bad(format!(
            "serviceName is too long for a unikernel: its network namespace {} would be {} bytes, over {NETNS_NAME_MAX}",
            crate::names::cut(&netns, 80),
            netns.len()
        )));
    }
    let ports = super::ports::parse(&r.port_mappings).map_err(|e| bad(e.to_string()))?;
    let service_ips = service_ips(r.service_ip)?;
    let weight = r.weight.unwrap_or(1).max(1);
    Ok(Json(
        detached(async move {
            nm.deploy_unikernel(job, number, service_ips, weight, ports)
                .await
        })
        .await?,
    ))
}

async fn unikernel_undeploy(
    State(nm): State<Arc<NetManager>>,
    body: Result<Json<UndeployRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(r) = body?;
    let job = job_name(&r.service_name)?;
    let Some(number) = undeploy_target(&nm, &job, r.instance_number).await? else {
        tracing::info!("unikernel undeploy: {job} has no instance on this node");
        return Ok(Json(serde_json::json!({})));
    };
    match detached(async move { nm.undeploy_unikernel(&job, number).await }).await {
        // Oakestra answers 200 whether or not the instance was deployed.
        Err(ApiError(StatusCode::NOT_FOUND, message)) => {
            tracing::info!("unikernel undeploy: {message}");
            Ok(Json(serde_json::json!({})))
        }
        other => other.map(|()| Json(serde_json::json!({}))),
    }
}

fn port_of(value: &serde_json::Value) -> Result<u16, ApiError> {
    let port = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    };
    port.and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| bad(format!("host_port {value} is not a port")))
}

/// A table (HTTP `/tablequery/result` or the cluster's MQTT result): the
/// job, its deployed instances and the query key.
pub(super) fn parse_table(bytes: &[u8]) -> Result<(String, Vec<RemoteSpec>, String), ApiError> {
    let t: TableUpdate =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("bad request body: {e}")))?;
    let job = job_name(&t.app_name)?;
    let mut instances = Vec::new();
    for i in t.instance_list {
        // Both are where packets are sent: a group, a broadcast, loopback
        // or "any" would go into the tunnel peers and conntrack as one host.
        let ip = |text: &str, what: &str| {
            let a = text
                .parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("{what} {text:?} is not an IPv4 address")))?;
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast() {
                return Err(bad(format!(
                    "{what} {text:?} is not a unicast address a host can have"
                )));
            }
            Ok(a)
        };
        let (Some(ns), Some(node)) = (
            i.namespace_ip.as_deref().filter(|t| !t.is_empty()),
            i.host_ip.as_deref().filter(|t| !t.is_empty()),
        ) else {
            continue;
        };
        instances.push(RemoteSpec {
            number: instance_number(i.instance_number)?,
            ns_addr: ip(ns, "namespace_ip")?,
            ns_addr_v6: i
                .namespace_ip_v6
                .as_deref()
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse()
                        .map_err(|_| bad(format!("namespace_ip_v6 {t:?} is not an IPv6 address")))
                })
                .transpose()?,
            node: ip(node, "host_ip")?,
            port: port_of(&i.host_port)?,
            service_ips: service_ips(i.service_ip)?,
            weight: i.weight.unwrap_or(1).max(1),
        });
    }
    Ok((job, instances, t.query_key))
}

async fn table(
    State(nm): State<Arc<NetManager>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body =
        body.map_err(|e| ApiError(e.status(), format!("bad request body: {}", e.body_text())))?;
    let (job, instances, _) = parse_table(&body)?;
    detached(async move { nm.update_table(job, instances).await }).await?;
    Ok(Json(serde_json::json!({})))
}

async fn status(State(nm): State<Arc<NetManager>>) -> Json<super::manager::Snapshot> {
    Json(nm.snapshot().await)
}

pub fn router(nm: Arc<NetManager>) -> Router {
    Router::new()
        .route("/register", post(register))
        .route("/container/deploy", post(deploy))
        .route("/docker/deploy", post(deploy))
        .route("/container/undeploy", post(undeploy))
        .route("/docker/undeploy", post(undeploy))
        .route("/unikernel/deploy", post(unikernel_deploy))
        .route("/unikernel/undeploy", post(unikernel_undeploy))
        .route("/tablequery/result", post(table))
        .route("/status", get(status))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no such path: {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not taken here (POST, or GET /status)"),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(nm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cluster lists instances scheduled but not deployed without
    /// addresses (and `host_port` as the node sent it, a string): the table
    /// is taken without them.
    #[test]
    fn a_partial_table_keeps_the_deployed_instances() {
        let text = br#"{"app_name": "app.ns.web.ns", "query_key": "203.0.113.10", "instance_list": [
            {"instance_number": 0, "instance_ip": "203.0.113.101", "namespace_ip": "192.0.2.2",
             "namespace_ip_v6": "", "host_ip": "198.18.2.1", "host_port": "50103",
             "service_ip": [{"IpType": "RR", "Address": "203.0.113.10", "Address_v6": ""},
                            {"IpType": "instance_ip", "Address": "203.0.113.101", "Address_v6": ""}]},
            {"instance_number": 1, "instance_ip": "203.0.113.102",
             "service_ip": [{"IpType": "instance_ip", "Address": "203.0.113.102"}]},
            {"instance_number": 2, "namespace_ip": null, "host_ip": null, "host_port": null}]}"#;
        let (job, instances, key) = parse_table(text).map_err(|e| e.to_string()).unwrap();
        assert_eq!(
            (job.as_str(), key.as_str()),
            ("app.ns.web.ns", "203.0.113.10")
        );
        assert_eq!(instances.len(), 1);
        let i = &instances[0];
        assert_eq!(
            (i.number, i.ns_addr, i.node, i.port),
            (
                0,
                Ipv4Addr::new(192, 0, 2, 2),
                Ipv4Addr::new(198, 18, 2, 1),
                50103
            )
        );
        assert_eq!(i.ns_addr_v6, None);
        let sips: Vec<(IpType, Ipv4Addr)> = i
            .service_ips
            .iter()
            .map(|s| (s.ip_type, s.address))
            .collect();
        assert_eq!(
            sips,
            [
                (IpType::RoundRobin, Ipv4Addr::new(203, 0, 113, 10)),
                (IpType::InstanceNumber, Ipv4Addr::new(203, 0, 113, 101))
            ]
        );
        // No service IP for this host, a network, a group or a link; a
        // malformed IPv6 namespace address is not dropped silently.
        for (address, v6) in [
            ("0.0.0.0", ""),
            ("255.255.255.255", ""),
            ("127.0.0.1", ""),
            ("224.0.0.5", ""),
            ("169.254.1.1", ""),
            ("203.0.113.10", "ff02::1"),
            ("203.0.113.10", "::1"),
        ] {
            let text = format!(
                r#"{{"app_name": "a.b.c.d", "instance_list": [{{"instance_number": 0, "namespace_ip": "192.0.2.2", "host_ip": "198.18.2.1", "host_port": 1, "service_ip": [{{"IpType": "RR", "Address": "{address}", "Address_v6": "{v6}"}}]}}]}}"#
            );
            match parse_table(text.as_bytes()) {
                Err(e) => assert!(e.to_string().contains("not a unicast address"), "{e}"),
                Ok(_) => panic!("service IP {address} / {v6:?} was taken"),
            }
        }
        let v6ns = br#"{"app_name": "a.b.c.d", "instance_list": [{"instance_number": 0, "namespace_ip": "192.0.2.2", "namespace_ip_v6": "2001:db8::zz", "host_ip": "198.18.2.1", "host_port": 1}]}"#;
        match parse_table(v6ns) {
            Err(e) => assert!(e.to_string().contains("namespace_ip_v6"), "{e}"),
            Ok(_) => panic!("a malformed namespace_ip_v6 was dropped silently"),
        }
        // A present but malformed address is still refused.
        let bad = br#"{"app_name": "a.b.c.d", "instance_list": [{"instance_number": 0, "namespace_ip": "x", "host_ip": "198.18.2.1", "host_port": 1}]}"#;
        match parse_table(bad) {
            Err(e) => assert!(e.to_string().contains("namespace_ip"), "{e}"),
            Ok(_) => panic!("a malformed namespace_ip was taken"),
        }
    }

    #[test]
    fn a_table_names_unicast_hosts_only() {
        for (ns, host, what) in [
            ("192.0.2.2", "255.255.255.255", "host_ip"),
            ("192.0.2.2", "0.0.0.0", "host_ip"),
            ("192.0.2.2", "224.0.0.1", "host_ip"),
            ("192.0.2.2", "127.0.0.1", "host_ip"),
            ("224.1.1.1", "198.18.2.1", "namespace_ip"),
        ] {
            let body = format!(
                r#"{{"app_name": "a.b.c.d", "instance_list": [{{"instance_number": 0, "namespace_ip": "{ns}", "host_ip": "{host}", "host_port": 50103}}]}}"#
            );
            match parse_table(body.as_bytes()) {
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(what) && e.contains("not a unicast address"),
                        "{ns} {host}: {e}"
                    );
                }
                Ok(_) => panic!("{ns} on {host} was taken"),
            }
        }
    }
}
