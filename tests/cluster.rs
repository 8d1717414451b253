//! Scale-out, for real: a three-node NATS cluster (three `nats-server` processes on loopback,
//! configured by `deploy/nats-cluster/node.conf`), the stream and consumers on 3 replicas, the
//! simulators as one shared process (`callmeback sim all`), and two `callmeback serve`
//! processes on one database behind a small TCP load balancer. Under load (calls placed,
//! answered, settled on credits and on cards; scheduled calls falling due; API reads), one NATS
//! node is killed -9 and restarted, the stream leader is moved, and one instance is killed -9
//! in the middle of live calls. Then: every event of the store is on the stream exactly once
//! and in per-aggregate order, every call settled exactly once, every scheduled call fired
//! once, the leases moved within their TTL, no card hold left open, no 5xx outside the seconds
//! the killed instance was serving.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three `nats-server` processes with routes between them and JetStream, on the repository's
/// node configuration.
struct NatsCluster {
    dir: PathBuf,
    /// (client, cluster, monitoring) ports of each node.
    ports: Vec<(u16, u16, u16)>,
    nodes: Vec<Option<Child>>,
}

impl NatsCluster {
    async fn start(id: &str) -> NatsCluster {
        let dir = std::env::temp_dir().join(format!("cmb-cluster-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut cluster = NatsCluster {
            dir,
            ports,
            nodes: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    fn name(i: usize) -> String {
        format!("cmb-n{}", i + 1)
    }

    fn spawn(&mut self, i: usize) {
        let conf = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/nats-cluster/node.conf"
        );
        let (client, cluster, http) = self.ports[i];
        let store = self.dir.join(Self::name(i));
        std::fs::create_dir_all(&store).unwrap();
        let log = std::fs::File::create(self.dir.join(format!("{}.log", Self::name(i)))).unwrap();
        let mut cmd = Command::new("nats-server");
        cmd.arg("-c")
            .arg(conf)
            .env("NODE_NAME", Self::name(i))
            .env("CLIENT_PORT", client.to_string())
            .env("CLUSTER_PORT", cluster.to_string())
            .env("HTTP_PORT", http.to_string())
            .env("STORE_DIR", &store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        for (n, (_, route, _)) in self.ports.iter().enumerate() {
            cmd.env(
                format!("ROUTE_{}", n + 1),
                format!("nats-route://127.0.0.1:{route}"),
            );
        }
        self.nodes[i] = Some(cmd.spawn().expect("nats-server starts (is it installed?)"));
    }

    /// The node answers `/healthz` (JetStream current with its peers).
    async fn wait_healthy(&self, i: usize) {
        let url = format!("http://127.0.0.1:{}/healthz", self.ports[i].2);
        let http = reqwest::Client::new();
        let ok = eventually(Duration::from_secs(60), || async {
            let r = http.get(&url).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        assert!(ok.is_some(), "NATS node {} never became healthy", i + 1);
    }

    async fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            child.start_kill().unwrap();
            let _ = child.wait().await;
        }
    }

    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|(c, _, _)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn node_of(&self, name: &str) -> usize {
        (0..3)
            .find(|&i| Self::name(i) == name)
            .expect("a node of ours")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().flatten() {
            let _ = child.start_kill();
        }
        if std::env::var_os("CMB_TEST_KEEP_DATABASES").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A TCP load balancer: each connection to the next backend that accepts it (round robin), for
/// its whole life — as a layer-4 balancer does, so a media WebSocket stays on the instance it
/// reached.
/// The balancer's backends, set once the instances' ports are chosen.
type Backends = Arc<std::sync::RwLock<Vec<SocketAddr>>>;

async fn balancer(backends: Backends) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backends = backends.read().unwrap().clone();
            let start = next.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                for k in 0..backends.len() {
                    let to = backends[(start + k) % backends.len()];
                    let connect = tokio::net::TcpStream::connect(to);
                    if let Ok(Ok(mut outbound)) =
                        tokio::time::timeout(Duration::from_secs(2), connect).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// `callmeback sim all` on free ports; returns the process and the settings it printed.
async fn shared_simulators(lb: SocketAddr) -> (Child, Vec<(String, String)>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .args([
            "sim",
            "all",
            "--addr",
            "127.0.0.1:0",
            "--stripe-webhook-url",
        ])
        .arg(format!("http://{lb}/api/stripe/webhook"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("PUBLIC_BASE_URL", format!("http://{lb}"))
        // Short calls, quick rings: many calls in the test's minute.
        .env("SIM_TWILIO_RING_MS", "300")
        .env("SIM_TWILIO_CALL_SECONDS", "8")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("callmeback sim starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut settings = Vec::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with('#') {
                break;
            }
            let (k, v) = line.split_once('=').expect("VARIABLE=url");
            settings.push((k.to_string(), v.to_string()));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the simulators start");
    // Keep draining stdout so the process never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert_eq!(
        settings
            .iter()
            .filter(|(k, _)| k.ends_with("_BASE_URL"))
            .count(),
        // Twilio, Stripe, Deepgram, Cerebras, OpenAI, ElevenLabs, WorkOS.
        7,
        "{settings:?}"
    );
    (child, settings)
}

/// One `callmeback serve` process.
struct Instance {
    id: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
}

async fn wait_ready(addr: SocketAddr) -> Value {
    let http = reqwest::Client::new();
    let body = eventually(Duration::from_secs(90), || async {
        let r = http
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json::<Value>().await.ok()
    })
    .await;
    body.unwrap_or_else(|| panic!("instance at {addr} never became ready"))
}

/// Requests through the balancer, with the 5xx answers and failed connections they met and
/// when.
#[derive(Default)]
struct Traffic {
    ok: AtomicUsize,
    failures: Mutex<Vec<(Instant, String)>>,
}

impl Traffic {
    fn record(&self, reply: Result<u16, String>) {
        match reply {
            Ok(s) if s < 500 => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(s) => self
                .failures
                .lock()
                .unwrap()
                .push((Instant::now(), format!("HTTP {s}"))),
            Err(e) => self.failures.lock().unwrap().push((Instant::now(), e)),
        }
    }
}

async fn stream_leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let mut s = js.get_stream(stream).await.ok()?;
    let info = s.info().await.ok()?;
    info.cluster.as_ref().and_then(|c| c.leader.clone())
}

/// Waits for the stream to have a leader other than `not`; returns it.
async fn new_leader(js: &async_nats::jetstream::Context, stream: &str, not: &str) -> String {
    eventually(Duration::from_secs(60), || async {
        stream_leader(js, stream).await.filter(|l| l != not)
    })
    .await
    .unwrap_or_else(|| panic!("no new stream leader after {not}"))
}

async fn lease_holder(pool: &sqlx::PgPool, name: &str) -> Option<String> {
    sqlx::query_scalar("SELECT holder FROM leases WHERE name = $1 AND expires_at > now()")
        .bind(name)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
}

async fn grant(store: &callmeback::backbone::store::EventStore, profile: &Value, credits: i64) {
    use cmb_domain::wallet::{Wallet, WalletCommand};
    store
        .execute::<Wallet>(
            profile["id"].as_str().unwrap(),
            WalletCommand::Grant {
                credits,
                reason: "test".into(),
                reference: format!("test-{}", uuid::Uuid::new_v4()),
            },
            &cmb_domain::CommandContext::system("test"),
        )
        .await
        .unwrap();
}

/// A table's rows, as JSON, in a stable order.
async fn table_rows(pool: &sqlx::PgPool, table: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT to_jsonb(t)::text AS row FROM {table} t ORDER BY 1"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_a_three_node_nats_cluster_lose_nothing_through_node_and_instance_kills() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start(&uuid::Uuid::new_v4().simple().to_string()[..8]).await;
    let backends = Backends::default();
    let lb = balancer(backends.clone()).await;
    let (_sims, sim_settings) = shared_simulators(lb).await;
    let lease_ttl_ms = 3_000u64;
    let mut env = TestEnv::new()
        .set("NATS_URL", &cluster.url())
        .set("NATS_REPLICAS", "3")
        .set("PUBLIC_BASE_URL", &format!("http://{lb}"))
        .set("LEASE_TTL_MS", &lease_ttl_ms.to_string())
        // A dead instance's unacknowledged messages come back within seconds.
        .set("WORKER_ACK_WAIT_MS", "5000")
        .set("READ_YOUR_WRITES_MS", "5000");
    for (k, v) in &sim_settings {
        env = env.set(k, v);
    }
    // The database, migrated, and the stream on three replicas, before the instances race.
    let backbone = env.backbone().await;
    let pool = backbone.pool.clone();
    let js = backbone.js.clone();
    let stream = env.config().stream.stream;
    assert_eq!(
        backbone.stream.cached_info().config.num_replicas,
        3,
        "NATS_REPLICAS=3"
    );

    // Ports chosen just before the instances bind them (chosen at the start, another process
    // on a busy machine could take one in the minute the cluster takes to come up).
    let ports = [free_port(), free_port()];
    *backends.write().unwrap() = ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let mut instances: Vec<Instance> = ["a", "b"]
        .iter()
        .zip(ports)
        .map(|(id, port)| {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let child = env.spawn_process(&[
                ("HTTP_ADDR", &addr.to_string()),
                ("INSTANCE_ID", &format!("instance-{id}")),
            ]);
            Instance {
                id,
                addr,
                child: Some(child),
            }
        })
        .collect();
    for instance in &instances {
        let ready = wait_ready(instance.addr).await;
        let cluster_view = &ready["checks"]["cluster"];
        assert_eq!(cluster_view["stream"]["replicas"], 3, "{ready}");
        assert_eq!(
            cluster_view["instance"],
            format!("instance-{}", instance.id)
        );
        assert!(cluster_view["connected_server"]["name"]
            .as_str()
            .unwrap()
            .starts_with("cmb-n"));
    }
    // Both see all three replicas current.
    let ready = eventually(Duration::from_secs(60), || async {
        let r = wait_ready(instances[0].addr).await;
        (r["checks"]["cluster"]["stream"]["replicas_current"] == 3).then_some(r)
    })
    .await;
    assert!(ready.is_some(), "three current replicas");
    let setup = started.elapsed();

    // Users: half pay with credits, half with a card (a Stripe hold through the shared
    // simulator, settled by whichever instance gets the call's end).
    let api = Api::new(lb);
    let store = callmeback::backbone::store::EventStore::new(pool.clone());
    let mut users = Vec::new();
    for n in 0..8 {
        let (user, profile) = api.register(PASSWORD).await;
        let by_card = n % 2 == 1;
        if by_card {
            let r = user
                .post(
                    "/api/user/payment-method",
                    json!({ "payment_method_id": "pm_card_visa" }),
                )
                .await;
            assert_eq!(r.status, 201, "{r:?}");
        } else {
            grant(&store, &profile, 1_000).await;
        }
        users.push((user, profile, by_card));
    }

    // Scheduled calls falling due during the kills (through the real use case, with its
    // five-minute notice satisfied by the clock it is given).
    let stripe = cmb_providers::stripe::Stripe::new(
        cmb_providers::http_client(),
        &env.config().stripe.base_url.clone().unwrap(),
        env.config().stripe.secret_key.expose(),
    );
    let mut scheduled = Vec::new();
    for k in 0..4 {
        // Users of their own, so a call they place cannot stand in the way of one falling due.
        let (_, profile) = api.register(PASSWORD).await;
        grant(&store, &profile, 100).await;
        let due = chrono::Utc::now() + chrono::Duration::seconds(12 + 8 * k as i64);
        let requested = callmeback::usecases::calls::schedule::schedule(
            &store,
            &stripe,
            &env.config().limits.calls,
            due - chrono::Duration::minutes(10),
            callmeback::usecases::calls::request::Request {
                user_id: profile["id"].as_str().unwrap().parse().unwrap(),
                phone: None,
                persona_id: "sarah_001".into(),
                minutes: Some(1),
                pay_with: callmeback::usecases::calls::request::PayWith::Credits,
                scheduled: None,
            },
            due,
            None,
            &cmb_domain::CommandContext::system("test"),
        )
        .await
        .expect("scheduled");
        scheduled.push(requested.call_id.to_string());
    }

    // Load: every user places calls one after another; readers poll the API.
    let traffic = Arc::new(Traffic::default());
    let placed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for (user, _, by_card) in users.clone() {
        let (traffic, placed, stop) = (traffic.clone(), placed.clone(), stop.clone());
        let pool = pool.clone();
        load.spawn(async move {
            while !stop.is_cancelled() {
                let body = if by_card {
                    // A hold on the card first (an intent the other instance may settle).
                    let intent = user
                        .request(reqwest::Method::POST, "/api/user/create-payment-intent")
                        .json(&json!({ "estimated_duration": 1 }))
                        .send()
                        .await;
                    let intent = match intent {
                        Err(e) => {
                            traffic.record(Err(e.to_string()));
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        Ok(r) => r,
                    };
                    let status = intent.status().as_u16();
                    traffic.record(Ok(status));
                    let intent: Value = intent.json().await.unwrap_or_default();
                    assert_eq!(status, 201, "a payment intent: {intent}");
                    json!({ "persona_id": "brad_001", "duration": 1,
                            "payment_intent_id": intent["payment_intent_id"] })
                } else {
                    json!({ "persona_id": "brad_001", "use_credits": true, "duration": 1 })
                };
                let reply = user
                    .request(reqwest::Method::POST, "/api/call")
                    .json(&body)
                    .send()
                    .await;
                let reply = match reply {
                    Err(e) => {
                        traffic.record(Err(e.to_string()));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Ok(r) => r,
                };
                let status = reply.status().as_u16();
                traffic.record(Ok(status));
                let body: Value = reply.json().await.unwrap_or_default();
                if status == 429 && body["error"]["code"] == "call_in_progress" {
                    // A scheduled call of this user is on the line; wait for it.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                assert_eq!(status, 201, "a call request: {body}");
                let id = body["call"]["id"].as_str().unwrap().to_string();
                placed.lock().unwrap().push(id.clone());
                // Until the call is over (watching the read model, not the rate-limited API).
                eventually(Duration::from_secs(120), || async {
                    let s: Option<Option<i64>> = sqlx::query_scalar(
                        "SELECT charged_cents FROM rm_calls WHERE id = $1::uuid",
                    )
                    .bind(&id)
                    .fetch_optional(&pool)
                    .await
                    .ok()?;
                    s.flatten().map(|_| ())
                })
                .await;
            }
        });
    }
    for (user, _, _) in users.clone() {
        let (traffic, stop) = (traffic.clone(), stop.clone());
        load.spawn(async move {
            while !stop.is_cancelled() {
                for path in ["/api/calls", "/api/user/profile", "/api/personas"] {
                    let r = user.request(reqwest::Method::GET, path).send().await;
                    traffic.record(r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        });
    }

    // Let calls get going, with voice sessions on both instances.
    let warm = eventually(Duration::from_secs(60), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM rm_calls WHERE status = 'in-progress'")
                .fetch_one(&pool)
                .await
                .ok()?;
        (n >= 3).then_some(())
    })
    .await;
    assert!(warm.is_some(), "calls in progress under load");

    let mut figures = BTreeMap::<&str, String>::new();

    // 1. kill -9 the NATS node that leads the stream; the stream elects another leader.
    let leader = stream_leader(&js, &stream).await.expect("a stream leader");
    let killed_node = cluster.node_of(&leader);
    let t = Instant::now();
    cluster.kill(killed_node).await;
    let after = new_leader(&js, &stream, &leader).await;
    figures.insert(
        "NATS node kill: new stream leader after",
        format!("{:?} ({leader} → {after})", t.elapsed()),
    );
    // Publication carries on through the loss.
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let carried_on = eventually(Duration::from_secs(60), || async {
        let mut s = js.get_stream(&stream).await.ok()?;
        let on_stream = s.info().await.ok()?.state.messages as i64;
        (on_stream > events_before).then_some(())
    })
    .await;
    assert!(carried_on.is_some(), "events published with a node down");
    figures.insert(
        "NATS node kill: publishing again after",
        format!("{:?}", t.elapsed()),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 2. The node comes back on its own files and catches up.
    let t = Instant::now();
    cluster.spawn(killed_node);
    cluster.wait_healthy(killed_node).await;
    let current = eventually(Duration::from_secs(90), || async {
        let r = reqwest::get(format!("http://{}/readyz", instances[1].addr))
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()?;
        (r["checks"]["cluster"]["stream"]["replicas_current"] == 3).then_some(())
    })
    .await;
    assert!(current.is_some(), "the restarted node caught up");
    figures.insert(
        "NATS node restart: replica current after",
        format!("{:?}", t.elapsed()),
    );

    // 3. Move the stream leader.
    let leader = stream_leader(&js, &stream).await.expect("a stream leader");
    let t = Instant::now();
    let answer = backbone
        .nats
        .request(
            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
            "".into(),
        )
        .await
        .expect("step-down answered");
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["success"], true, "{answer}");
    let after = new_leader(&js, &stream, &leader).await;
    figures.insert(
        "stream leader step-down: new leader after",
        format!("{:?} ({leader} → {after})", t.elapsed()),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 4. kill -9 the instance holding the publisher lease, in the middle of live calls.
    let holder = lease_holder(&pool, "publisher").await.expect("a publisher");
    let victim = instances
        .iter()
        .position(|i| holder == format!("instance-{}", i.id))
        .expect("the publisher is one of ours");
    let survivor = format!("instance-{}", instances[1 - victim].id);
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rm_calls WHERE status = 'in-progress'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let t = Instant::now();
    let killed_at = Instant::now();
    if let Some(mut child) = instances[victim].child.take() {
        child.start_kill().unwrap();
        let _ = child.wait().await;
    }
    for lease in ["publisher", "scheduler"] {
        let moved = eventually(Duration::from_secs(60), || async {
            (lease_holder(&pool, lease).await.as_deref() == Some(survivor.as_str())).then_some(())
        })
        .await;
        assert!(moved.is_some(), "the {lease} lease moved to {survivor}");
        let took = t.elapsed();
        figures.insert(
            if lease == "publisher" {
                "instance kill: publisher lease moved after"
            } else {
                "instance kill: scheduler lease moved after"
            },
            format!("{took:?} (TTL {lease_ttl_ms} ms, {live} calls in progress at the kill)"),
        );
        // Within the TTL, plus a tick of the survivor's renewal loop and a loaded machine.
        assert!(
            took < Duration::from_millis(lease_ttl_ms * 3),
            "{lease} lease took {took:?}"
        );
    }

    // Load carries on through the survivor for a while, then stops.
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(150), async {
        while let Some(r) = load.join_next().await {
            r.expect("a load task");
        }
    })
    .await;
    assert!(drained.is_ok(), "load tasks finished");

    // Everything settles: every call requested (placed or scheduled) reaches an end and is
    // settled exactly once.
    let t = Instant::now();
    let settled = eventually(Duration::from_secs(120), || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events r WHERE r.event_type = 'CallRequested'
             AND NOT EXISTS (SELECT 1 FROM events s WHERE s.aggregate_type = r.aggregate_type
                 AND s.aggregate_id = r.aggregate_id AND s.event_type = 'CallSettled')",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (open == 0).then_some(())
    })
    .await;
    let unsettled: Vec<(String, String)> = sqlx::query_as(
        "SELECT r.aggregate_id, (SELECT string_agg(event_type, ',' ORDER BY sequence) FROM events e
             WHERE e.aggregate_id = r.aggregate_id) FROM events r WHERE r.event_type = 'CallRequested'
         AND NOT EXISTS (SELECT 1 FROM events s WHERE s.aggregate_id = r.aggregate_id
             AND s.event_type = 'CallSettled')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(settled.is_some(), "calls never settled: {unsettled:?}");
    figures.insert(
        "all calls settled after the load",
        format!("{:?}", t.elapsed()),
    );
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, count(*) FROM events WHERE event_type = 'CallSettled'
         GROUP BY aggregate_id HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "settled twice: {twice:?}");
    let calls: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'CallRequested'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(calls >= 12, "enough calls under load: {calls}");
    figures.insert(
        "calls",
        format!(
            "{calls} requested ({} placed, {} scheduled), all settled once",
            placed.lock().unwrap().len(),
            scheduled.len()
        ),
    );

    // Every scheduled call fired exactly once.
    for id in &scheduled {
        let fired: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'ScheduledCallFired'",
        )
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(fired, 1, "scheduled call {id} fired {fired} times");
    }

    // No card hold left open on the shared Stripe simulator: each call's intent was captured
    // or cancelled, by whichever instance settled it.
    let stripe_url = env.config().stripe.base_url.unwrap();
    let intents: Vec<String> = sqlx::query_scalar(
        "SELECT substring(payload::text from '\"(pi_[A-Za-z0-9_]+)\"') FROM events
         WHERE event_type = 'CallRequested' AND payload::text LIKE '%\"pi\\_%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let http = reqwest::Client::new();
    for id in &intents {
        let pi: Value = http
            .get(format!("{stripe_url}/v1/payment_intents/{id}"))
            .bearer_auth(env.config().stripe.secret_key.expose())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            pi["status"] == "succeeded" || pi["status"] == "canceled",
            "card hold left open: {pi}"
        );
    }

    // Every event of the store is on the stream exactly once, in per-aggregate order.
    // The instances write events of their own too (a start defines the system personas'
    // knowledge, which the indexing worker marks indexed a little later): compare once the
    // log is quiet, the store counted before and after reading the stream.
    let t = Instant::now();
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let (in_store, on_stream) = eventually(Duration::from_secs(90), || async {
        let before = stored().await;
        let events = common::read_stream(&env).await;
        if (events.len() as i64) < before {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        (stored().await == before).then_some((before, events))
    })
    .await
    .unwrap_or_else(|| panic!("the stream never caught up with the store while it was quiet"));
    let mut seen = HashMap::<String, u32>::new();
    let mut last = HashMap::<(String, String), u64>::new();
    for e in &on_stream {
        *seen.entry(e.event_id()).or_default() += 1;
        let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
        if let Some(prev) = last.insert(key, e.sequence) {
            assert!(
                e.sequence > prev,
                "{} after sequence {prev} on the stream",
                e.event_id()
            );
        }
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "on the stream twice: {doubled:?}");
    assert_eq!(
        seen.len() as i64,
        in_store,
        "every stored event on the stream, once"
    );
    figures.insert(
        "events",
        format!(
            "{in_store} in the store = {} on the stream; {} card holds all captured or released",
            on_stream.len(),
            intents.len()
        ),
    );
    let _ = t;

    // The read models caught up with the log: each projection's offset for every aggregate
    // is the aggregate's last sequence.
    let behind = eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM rm_calls c JOIN (SELECT aggregate_id, max(sequence) AS last
             FROM events WHERE aggregate_type = 'call' GROUP BY aggregate_id) e
             ON e.aggregate_id = c.id::text WHERE c.charged_cents IS NULL",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (n == 0).then_some(())
    })
    .await;
    assert!(behind.is_some(), "every call's read model shows it settled");

    // The read models equal a rebuild from the stream: every projection rebuilt aside and
    // swapped in, its tables the same before and after.
    for projection in cmb_projections::all() {
        // First the live projection has applied every stored event it wants (an instance
        // started late may still be recording, e.g. its greetings' system costs).
        let types: Vec<String> = projection
            .aggregate_types()
            .iter()
            .map(|t| t.to_string())
            .collect();
        let caught_up = eventually(Duration::from_secs(90), || async {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT aggregate_type, aggregate_id, max(sequence) AS last
                                         FROM events
                                        WHERE cardinality($2::text[]) = 0
                                           OR aggregate_type = ANY($2)
                                        GROUP BY 1, 2) e
                   LEFT JOIN projection_offsets o
                     ON o.projection = $1 AND o.aggregate_type = e.aggregate_type
                    AND o.aggregate_id = e.aggregate_id
                  WHERE o.sequence IS DISTINCT FROM e.last",
            )
            .bind(projection.name())
            .bind(&types)
            .fetch_one(&pool)
            .await
            .ok()?;
            if behind != 0 {
                return None;
            }
            // And the log is quiet (the workers of the surviving instance may still be
            // recording, e.g. what memory learnt from the last calls): nothing new for 3 s, so
            // the rebuild reads what the live tables were made of.
            let count = || async {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
                    .fetch_one(&pool)
                    .await
                    .ok()
            };
            let before = count().await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            (count().await? == before).then_some(())
        })
        .await;
        assert!(
            caught_up.is_some(),
            "{}: the live projection never caught up with the store",
            projection.name()
        );
        let mut before = Vec::new();
        for table in projection.tables() {
            before.push(table_rows(&pool, table).await);
        }
        callmeback::ops::rebuild::rebuild_and_swap(
            &pool,
            &js,
            &env.config().stream,
            projection.as_ref(),
            false,
        )
        .await
        .expect("rebuilt");
        for (table, rows) in projection.tables().iter().zip(before) {
            let rebuilt = table_rows(&pool, table).await;
            assert!(
                rows == rebuilt,
                "{table}: the live read model differs from its rebuild ({} rows live, {} rebuilt)",
                rows.len(),
                rebuilt.len()
            );
        }
    }

    // No 5xx and no refused connection outside the seconds the killed instance was serving.
    let failures = traffic.failures.lock().unwrap().clone();
    let window = Duration::from_secs(5);
    let outside: Vec<_> = failures
        .iter()
        .filter(|(at, _)| !(at.saturating_duration_since(killed_at) <= window && *at >= killed_at))
        .collect();
    assert!(
        outside.is_empty(),
        "API failures outside the kill window: {outside:?}"
    );
    figures.insert(
        "API requests",
        format!(
            "{} answered below 500; {} failed, all within {window:?} of the instance kill",
            traffic.ok.load(Ordering::Relaxed),
            failures.len()
        ),
    );
    figures.insert("setup", format!("{setup:?}"));
    figures.insert("whole test", format!("{:?}", started.elapsed()));
    for (k, v) in &figures {
        eprintln!("cluster figure: {k}: {v}");
    }

    drop(instances);
    cluster.kill(0).await;
    env.cleanup().await;
}
