//! The NetManager's side of Oakestra's cluster service manager, over MQTT
//! (oakestra-net's topics, payloads and QoS 1): the subnet request at
//! registration, deployment notices, table queries by job name and by
//! service IP, and `jobs/<job>/updates_available` subscriptions (interests)
//! with their removal. Messages are handled in arrival order by one worker
//! so that a later table never loses to an earlier one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::manager::{NetManager, RemoteSpec};

/// Oakestra's cluster MQTT port (`ClusterMqttPort`).
pub const DEFAULT_PORT: u16 = 10003;
/// A job neither deployed here nor used for this long loses its interest.
pub const INTEREST_IDLE: Duration = Duration::from_secs(10);
/// How much of a peer's bad message a log line quotes: anyone who may
/// publish to the broker chooses its size.
const LOG_LIMIT: usize = 1024;
/// The same table query is not sent again within this time.
const QUERY_AGAIN_AFTER: Duration = Duration::from_secs(2);
/// How long an answer is awaited (Oakestra's table query timeout): a
/// table that answers no query sent within it is not applied.
const ANSWER_WAIT: Duration = Duration::from_secs(5);
/// Table queries by address open at once (answered or not within
/// [`QUERY_AGAIN_AFTER`]).
const MAX_OPEN_IP_QUERIES: usize = 256;
/// Table queries about strangers' inner sources open at once: anyone can
/// send such a packet, and they must not take the budget above.
const MAX_OPEN_STRANGER_QUERIES: usize = 16;
/// The largest message taken from the broker: a job's table answer is
/// about 400 bytes per instance (rumqttc's default of 10 KiB refused
/// tables of about 27 instances and dropped the connection).
const MAX_INCOMING_BYTES: usize = 16 << 20;
/// The largest message sent (notices and queries are small).
const MAX_OUTGOING_BYTES: usize = 1 << 20;
/// How long a notice waits for room in the request queue (the broker
/// away) before it is given up: an API call must not hang on it.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// `nodes/<id>/net/subnet`.
#[derive(Serialize)]
struct SubnetRequest {
    #[serde(rename = "METHOD")]
    method: &'static str,
}

/// `nodes/<id>/net/subnetwork/result`: the node's subnet's first address
/// (a /26, and a /120 for IPv6).
#[derive(Debug, Deserialize)]
pub struct SubnetReply {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub addressv6: String,
}

/// `nodes/<id>/net/service/deployed` (and `…/undeployed`).
#[derive(Serialize)]
pub struct DeployNotice {
    pub appname: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    pub instance_number: u32,
    pub nsip: String,
    pub nsipv6: String,
    pub host_port: String,
    pub host_ip: String,
}

/// `nodes/<id>/net/service/address-changed`: Oakestra sends its deploy
/// notice's shape with only these set (`status`, `nsip`, `nsipv6` empty).
#[derive(Serialize)]
pub struct AddressChange {
    pub appname: String,
    pub status: &'static str,
    pub instance_number: u32,
    pub nsip: &'static str,
    pub nsipv6: &'static str,
    pub host_port: String,
    pub host_ip: String,
}

/// `nodes/<id>/net/tablequery/request`: by job name or by service IP.
#[derive(Serialize)]
struct TableQuery<'a> {
    sname: &'a str,
    sip: &'a str,
}

#[derive(Serialize)]
struct InterestRemove<'a> {
    appname: &'a str,
}

enum Incoming {
    Subnet(Vec<u8>),
    /// A table answer, and when it came.
    Table(Vec<u8>, Instant),
    Updates(String),
}

/// One interest: subscribed to the job's updates since, last used at.
struct Interest {
    used: Instant,
    /// The job's packet count when last looked at.
    packets: u64,
}

pub struct Cluster {
    client: AsyncClient,
    client_id: String,
    interests: Mutex<BTreeMap<String, Interest>>,
    /// Query keys (job or service IP) sent and when.
    queried: Mutex<BTreeMap<String, Instant>>,
    /// Query keys and when each was last asked, for [`ANSWER_WAIT`].
    awaiting: Mutex<BTreeMap<String, Instant>>,
    /// The same for queries about strangers' inner sources.
    asked_for_strangers: Mutex<BTreeMap<String, Instant>>,
    /// The node's own topics are subscribed (a result published before
    /// that would be lost).
    subscribed: tokio::sync::watch::Sender<bool>,
    /// Asks the event loop to drop its connection and connect again.
    reconnect: tokio::sync::Notify,
    /// Connections made (ConnAcks), to wait for a newer one than now.
    connections: std::sync::atomic::AtomicU64,
    /// Connected to the broker now: table queries are only sent then
    /// (queued while it is away, they would be stale when it is back, and
    /// fill the queue that notices and subscriptions need).
    connected: std::sync::atomic::AtomicBool,
    /// Whose tables are held (weak: the manager holds this).
    manager: std::sync::Weak<NetManager>,
    stop: CancellationToken,
}

fn topic_of_updates(job: &str) -> String {
    format!("jobs/{job}/updates_available")
}

impl Cluster {
    /// Connects to `host:port` as `client_id` (in the background; MQTT
    /// keeps reconnecting) and handles what arrives for `manager`.
    pub fn start(
        manager: Arc<NetManager>,
        client_id: &str,
        host: &str,
        port: u16,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut options = MqttOptions::new(client_id, host, port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(true);
        options.set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES);
        let (client, mut events) = AsyncClient::new(options, 256);
        let cluster = Arc::new(Self {
            client,
            client_id: client_id.to_string(),
            interests: Mutex::new(BTreeMap::new()),
            queried: Mutex::new(BTreeMap::new()),
            awaiting: Mutex::new(BTreeMap::new()),
            asked_for_strangers: Mutex::new(BTreeMap::new()),
            subscribed: tokio::sync::watch::channel(false).0,
            reconnect: tokio::sync::Notify::new(),
            connections: std::sync::atomic::AtomicU64::new(0),
            connected: std::sync::atomic::AtomicBool::new(false),
            manager: Arc::downgrade(&manager),
            stop: stop.clone(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let c = cluster.clone();
        let stop2 = stop.clone();
        tokio::spawn(async move {
            let prefix = format!("nodes/{}/net/", c.client_id);
            // Retried every second while the broker is away: each reason
            // logged once, then summarised.
            let mut repeats = crate::repeats::Repeats::default();
            loop {
                let event = tokio::select! {
                    _ = stop2.cancelled() => break,
                    () = c.reconnect.notified() => {
                        // The next poll connects anew (a clean session:
                        // what was in flight on the old one is dropped).
                        events.clean();
                        continue;
                    }
                    e = events.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!("netmanager: connected to the cluster's MQTT broker");
                        repeats.clear();
                        c.connections
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        c.connected.store(true, std::sync::atomic::Ordering::SeqCst);
                        c.subscribed.send_replace(false);
                        // Not awaited here: this loop is what empties the
                        // request queue the subscription may wait for.
                        tokio::spawn(c.clone().subscribe_all());
                    }
                    // The broker answers in order: the first SubAck covers
                    // the node's topics, sent first in one SUBSCRIBE.
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        c.subscribed.send_replace(true);
                    }
                    // A retained message is an old one the broker kept: a
                    // table or subnet that answers no query of this
                    // connection (Oakestra takes answers to its open
                    // queries only). Re-applied at each reconnect, it
                    // overwrote newer tables.
                    Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {
                        tracing::debug!(topic = %p.topic, "netmanager: a retained MQTT message ignored");
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let payload = p.payload.to_vec();
                        let message = match p.topic.strip_prefix(&prefix) {
                            Some("subnetwork/result") => Some(Incoming::Subnet(payload)),
                            Some("tablequery/result") => {
                                Some(Incoming::Table(payload, Instant::now()))
                            }
                            _ => p
                                .topic
                                .strip_prefix("jobs/")
                                .and_then(|t| t.strip_suffix("/updates_available"))
                                .map(|job| Incoming::Updates(job.to_string())),
                        };
                        if let Some(m) = message {
                            let _ = tx.send(m);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        c.connected
                            .store(false, std::sync::atomic::Ordering::SeqCst);
                        let reason = format!("netmanager: MQTT broker {e}; retrying every second");
                        if let Some(line) = repeats.note(&reason, std::time::Instant::now()) {
                            tracing::warn!("{line}");
                        }
                        tokio::select! {
                            _ = stop2.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        tokio::spawn(work(cluster.clone(), manager.clone(), rx, stop.clone()));
        tokio::spawn(expire_interests(cluster.clone(), manager, stop));
        cluster
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Connects again now (the connection is bound to an address the node
    /// no longer has, and would take a keep-alive timeout to be found dead)
    /// and waits until the node's topics are subscribed again. Messages
    /// queued meanwhile would be lost: a clean session drops them.
    /// Whether the new connection came (and subscribed) within 5 s.
    pub async fn reconnect(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let before = self.connections.load(SeqCst);
        let mut rx = self.subscribed.subscribe();
        self.reconnect.notify_one();
        let newer = rx.wait_for(|s| *s && self.connections.load(SeqCst) > before);
        let came = tokio::time::timeout(Duration::from_secs(5), newer)
            .await
            .is_ok_and(|r| r.is_ok());
        came
    }

    /// The node's topics and its interests, after every connection (a
    /// clean session starts with none). Every job whose table is held
    /// (deployed here, or restored at a start) is an interest, so it hears
    /// of updates and expires when idle; each is asked for again once
    /// subscribed, as the table may have changed while this node was not
    /// listening (queries are not sent while the broker is away).
    async fn subscribe_all(self: Arc<Self>) {
        let held = match self.manager.upgrade() {
            Some(m) => m.held_jobs().await,
            None => Vec::new(),
        };
        {
            let now = Instant::now();
            let mut interests = self.interests.lock().expect("lock");
            for job in held {
                interests.entry(job).or_insert(Interest {
                    used: now,
                    packets: 0,
                });
            }
        }
        let mut topics = vec![
            format!("nodes/{}/net/tablequery/result", self.client_id),
            format!("nodes/{}/net/subnetwork/result", self.client_id),
        ];
        topics.extend(
            self.interests
                .lock()
                .expect("lock")
                .keys()
                .map(|j| topic_of_updates(j)),
        );
        let filters = topics
            .into_iter()
            .map(|t| rumqttc::SubscribeFilter::new(t, QoS::AtLeastOnce));
        if let Err(e) = self.client.subscribe_many(filters).await {
            tracing::warn!("netmanager: MQTT subscribe: {e}");
            return;
        }
        self.wait_subscribed().await;
        // Waiting for room in the request queue: hundreds of jobs would
        // overflow it, and a query dropped here is not asked again.
        let topic = format!("nodes/{}/net/tablequery/request", self.client_id);
        for job in self.interests() {
            if !self.should_query(&job, true) {
                continue;
            }
            let query = Self::json(&TableQuery {
                sname: &job,
                sip: "",
            });
            let before = self.await_answer(&job);
            let queued = self
                .client
                .publish(topic.clone(), QoS::AtLeastOnce, false, query);
            if !matches!(tokio::time::timeout(PUBLISH_WAIT, queued).await, Ok(Ok(()))) {
                tracing::warn!(%job, "netmanager: table query after connecting not sent: the request queue stayed full (is the broker reachable?)");
                self.queried.lock().expect("lock").remove(&job);
                self.not_sent(&job, before);
            } else {
                // Its window starts when it leaves (the queue may have waited).
                self.await_answer(&job);
            }
        }
    }

    /// Waits (a while) until the node's own topics are subscribed.
    async fn wait_subscribed(&self) {
        let mut rx = self.subscribed.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| *s)).await;
    }

    /// Queues a notice (sent once the broker is reachable), waiting at most
    /// [`PUBLISH_WAIT`] for room in the queue.
    async fn publish(&self, topic: &str, payload: String) {
        let topic = format!("nodes/{}/net/{topic}", self.client_id);
        tracing::debug!(%topic, %payload, "netmanager: MQTT publish");
        let queued = self
            .client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload);
        match tokio::time::timeout(PUBLISH_WAIT, queued).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("netmanager: MQTT publish to {topic}: {e}"),
            Err(_) => tracing::warn!(
                "netmanager: MQTT publish to {topic} given up: no room in the request queue for {PUBLISH_WAIT:?} (is the broker reachable?)"
            ),
        }
    }

    /// Sends a table query now if connected and the queue has room; else
    /// drops it (and forgets it was asked: the next miss asks again).
    fn query(&self, key: &str, query: &TableQuery) {
        use std::sync::atomic::Ordering::SeqCst;
        let topic = format!("nodes/{}/net/tablequery/request", self.client_id);
        let before = self.await_answer(key);
        let sent = self.connected.load(SeqCst)
            && self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, Self::json(query))
                .is_ok();
        if !sent {
            match self.connected.load(SeqCst) {
                true => tracing::debug!(key, "table query not sent: the request queue is full"),
                false => tracing::debug!(key, "table query not sent: not connected to the broker"),
            }
            self.queried.lock().expect("lock").remove(key);
            self.not_sent(key, before);
        }
    }

    /// A query noted by [`Cluster::await_answer`] was not sent: an earlier
    /// one's window (`before`) stays as it was, and none opens.
    fn not_sent(&self, key: &str, before: Option<Instant>) {
        let mut awaiting = self.awaiting.lock().expect("lock");
        match before {
            Some(at) => awaiting.insert(key.to_string(), at),
            None => awaiting.remove(key),
        };
    }

    /// Notes a query about to be sent: answers are taken for a while.
    /// Returns the earlier query's time, for a send that fails.
    fn await_answer(&self, key: &str) -> Option<Instant> {
        let mut awaiting = self.awaiting.lock().expect("lock");
        let now = Instant::now();
        awaiting.retain(|_, at| now.duration_since(*at) < ANSWER_WAIT);
        awaiting.insert(key.to_string(), now)
    }

    /// Whether a table that `arrived` answers a query asked less than
    /// [`ANSWER_WAIT`] before (each answer to repeated queries is taken),
    /// matched as Oakestra does: by its query key, its job name or any of
    /// its instances' service IPs.
    fn answered(&self, key: &str, job: &str, instances: &[RemoteSpec], arrived: Instant) -> bool {
        let awaiting = self.awaiting.lock().expect("lock");
        let open = |k: &str| {
            awaiting
                .get(k)
                .and_then(|at| arrived.checked_duration_since(*at))
                .is_some_and(|waited| waited < ANSWER_WAIT)
        };
        (!key.is_empty() && open(key))
            || open(job)
            || instances.iter().flat_map(|i| &i.service_ips).any(|s| {
                open(&s.address.to_string()) || s.address_v6.is_some_and(|a| open(&a.to_string()))
            })
    }

    fn json(value: &impl Serialize) -> String {
        serde_json::to_string(value).unwrap_or_default()
    }

    pub async fn request_subnet(&self) {
        self.wait_subscribed().await;
        self.publish("subnet", Self::json(&SubnetRequest { method: "GET" }))
            .await;
    }

    pub async fn deployed(&self, notice: DeployNotice) {
        self.publish("service/deployed", Self::json(&notice)).await;
    }

    pub async fn address_changed(&self, notice: AddressChange) {
        self.publish("service/address-changed", Self::json(&notice))
            .await;
    }

    pub async fn undeployed(&self, notice: DeployNotice) {
        self.publish("service/undeployed", Self::json(&notice))
            .await;
    }

    /// Asks for a job's table (`force`: even if asked a moment ago).
    pub async fn query_job(&self, job: &str, force: bool) {
        if self.should_query(job, force) {
            self.query(
                job,
                &TableQuery {
                    sname: job,
                    sip: "",
                },
            );
        }
    }

    /// Asks which job a service IP belongs to, with its table.
    pub async fn query_ip(&self, ip: std::net::IpAddr) {
        let key = ip.to_string();
        // Misses come from packets, some of them a remote node's: at most
        // this many open queries (the address asks again after its retry).
        if self.should_query_within(&key, false, Some(MAX_OPEN_IP_QUERIES)) {
            self.query(
                &key,
                &TableQuery {
                    sname: "",
                    sip: &key,
                },
            );
        }
    }

    /// [`Cluster::query_ip`] for the inner source of a packet from a node
    /// no table names, on its own budget.
    pub async fn query_stranger(&self, ip: std::net::IpAddr) {
        let key = ip.to_string();
        {
            let mut asked = self.asked_for_strangers.lock().expect("lock");
            let now = Instant::now();
            asked.retain(|_, at| now.duration_since(*at) < QUERY_AGAIN_AFTER);
            if asked.contains_key(&key) || asked.len() >= MAX_OPEN_STRANGER_QUERIES {
                return;
            }
            asked.insert(key.clone(), now);
        }
        self.query(
            &key,
            &TableQuery {
                sname: "",
                sip: &key,
            },
        );
    }

    fn should_query(&self, key: &str, force: bool) -> bool {
        self.should_query_within(key, force, None)
    }

    /// Whether to send a query for `key` now (recorded if so): not when one
    /// went out within [`QUERY_AGAIN_AFTER`] (unless `force`), nor when
    /// `limit` queries are open (asked within that time, answered or not).
    fn should_query_within(&self, key: &str, force: bool, limit: Option<usize>) -> bool {
        let mut queried = self.queried.lock().expect("lock");
        let now = Instant::now();
        queried.retain(|_, at| now.duration_since(*at) < QUERY_AGAIN_AFTER);
        if !force && queried.contains_key(key) {
            return false;
        }
        if limit.is_some_and(|l| queried.len() >= l) {
            tracing::debug!(key, "not asked: {} table queries open", queried.len());
            return false;
        }
        queried.insert(key.to_string(), now);
        true
    }

    /// Subscribes to a job's updates unless already interested.
    pub async fn add_interest(&self, job: &str) {
        {
            let mut interests = self.interests.lock().expect("lock");
            if let Some(i) = interests.get_mut(job) {
                i.used = Instant::now();
                return;
            }
            interests.insert(
                job.to_string(),
                Interest {
                    used: Instant::now(),
                    packets: 0,
                },
            );
        }
        if let Err(e) = self
            .client
            .subscribe(topic_of_updates(job), QoS::AtLeastOnce)
            .await
        {
            tracing::warn!("netmanager: MQTT subscribe: {e}");
        }
    }

    pub fn interests(&self) -> Vec<String> {
        self.interests
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect()
    }

    async fn remove_interest(&self, job: &str) {
        self.interests.lock().expect("lock").remove(job);
        let _ = self.client.unsubscribe(topic_of_updates(job)).await;
        self.withdraw_interest(job).await;
    }

    /// Tells the cluster the node has no interest in `job`.
    async fn withdraw_interest(&self, job: &str) {
        self.publish(
            "interest/remove",
            Self::json(&InterestRemove { appname: job }),
        )
        .await;
    }
}

async fn work(
    cluster: Arc<Cluster>,
    manager: Arc<NetManager>,
    mut rx: mpsc::UnboundedReceiver<Incoming>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        match message {
            Incoming::Subnet(bytes) => match serde_json::from_slice::<SubnetReply>(&bytes) {
                Ok(reply) => {
                    if let Err(e) = manager.assign_subnet(reply).await {
                        tracing::error!("netmanager: the cluster's subnet: {e}");
                    }
                }
                Err(e) => tracing::warn!(
                    "netmanager: subnet reply is not readable: {}",
                    crate::names::cut(&e.to_string(), LOG_LIMIT)
                ),
            },
            // Oakestra's answer for an address no job holds: nothing to do
            // (the address is asked again at its next miss, not sooner).
            Incoming::Table(bytes, _) if no_job(&bytes) => {
                tracing::debug!("netmanager: the cluster knows no job for a query");
            }
            Incoming::Table(bytes, arrived) => match super::api::parse_table(&bytes) {
                // As Oakestra: only an answer to an open query is taken,
                // and only a table taken makes an interest.
                Ok((job, instances, key)) => {
                    cluster.queried.lock().expect("lock").remove(&key);
                    if !cluster.answered(&key, &job, &instances, arrived) {
                        tracing::info!(
                            job = %crate::names::cut(&job, LOG_LIMIT),
                            query_key = %crate::names::cut(&key, LOG_LIMIT),
                            "netmanager: a table that answers no open query (asked in the last 5 s) ignored"
                        );
                        continue;
                    }
                    match manager.update_table(job.clone(), instances).await {
                        Ok(()) => cluster.add_interest(&job).await,
                        Err(e) => {
                            tracing::warn!(
                                job = %crate::names::cut(&job, LOG_LIMIT),
                                "netmanager: the cluster's table: {}",
                                crate::names::cut(&e.to_string(), LOG_LIMIT)
                            );
                            // The cluster noted an interest with the query:
                            // withdrawn, unless the node holds one of its
                            // own or the job runs here (a deploy adds its
                            // interest just after; the local one is untouched).
                            if !cluster.interests().contains(&job)
                                && !manager.held_jobs().await.contains(&job)
                            {
                                cluster.withdraw_interest(&job).await;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    "netmanager: table query result: {}",
                    crate::names::cut(&e.to_string(), LOG_LIMIT)
                ),
            },
            // Not while the same query is open (sent and not answered in
            // the last 2 s), as Oakestra: a burst of updates asks once.
            Incoming::Updates(job) => cluster.query_job(&job, false).await,
        }
    }
}

/// Oakestra keeps an interest while the job runs here or its entries are
/// used; after [`INTEREST_IDLE`] of neither it is removed: unsubscribed,
/// `interest/remove` sent and the job's entries dropped.
async fn expire_interests(
    cluster: Arc<Cluster>,
    manager: Arc<NetManager>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let usage = manager.job_usage().await;
        let now = Instant::now();
        let idle: Vec<String> = {
            let mut interests = cluster.interests.lock().expect("lock");
            for (job, i) in interests.iter_mut() {
                let (deployed, packets) = usage.get(job).copied().unwrap_or((false, 0));
                if deployed || packets != i.packets {
                    i.used = now;
                    i.packets = packets;
                }
            }
            interests
                .iter()
                .filter(|(_, i)| now.duration_since(i.used) >= INTEREST_IDLE)
                .map(|(j, _)| j.clone())
                .collect()
        };
        for job in idle {
            tracing::info!(%job, "netmanager: interest removed (not deployed here, unused)");
            cluster.remove_interest(&job).await;
            if let Err(e) = manager.update_table(job.clone(), Vec::new()).await {
                tracing::warn!(%job, "netmanager: dropping the job's entries: {e}");
            }
        }
    }
}

/// A table answer naming no job and no instance: Oakestra's "unknown".
fn no_job(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        app_name: Option<String>,
        #[serde(default)]
        instance_list: Vec<serde_json::Value>,
    }
    serde_json::from_slice::<Answer>(bytes)
        .is_ok_and(|a| a.app_name.is_none_or(|n| n.is_empty()) && a.instance_list.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_answer_without_a_job_is_told_apart() {
        assert!(super::no_job(
            br#"{"app_name":"","instance_list":[],"query_key":"203.0.113.9"}"#
        ));
        assert!(!super::no_job(
            br#"{"app_name":"a.b.c.d","instance_list":[],"query_key":"203.0.113.9"}"#
        ));
        assert!(!super::no_job(br#"{"app_name":"","instance_list":[{}]}"#));
        assert!(!super::no_job(b"not json"));
    }
}
