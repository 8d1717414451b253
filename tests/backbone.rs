//! The event backbone: every event committed in Postgres reaches JetStream exactly once and in
//! per-aggregate order, through `kill -9` of the publishing process and with two instances.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use callmeback::backbone::store::EventStore;
use cmb_domain::persona::{Owner, Persona, PersonaCommand, PersonaPatch};
use cmb_domain::{Actor, CommandContext};
use common::{eventually, persona_draft, read_stream, TestEnv};

async fn events_in_store(pool: &sqlx::PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence FROM events ORDER BY global_position",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn stream_count(env: &TestEnv) -> u64 {
    let config = env.config();
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&config.stream.stream).await.unwrap();
    stream.info().await.unwrap().state.messages
}

/// Drives `commands` persona commands from `tasks` concurrent writers over `aggregates`
/// personas, straight through the command path.
async fn write_commands(store: EventStore, tasks: usize, aggregates: usize, commands: usize) {
    let owner = cmb_domain::UserId::generate();
    let ids: Arc<Vec<String>> = Arc::new(
        (0..aggregates)
            .map(|_| uuid::Uuid::now_v7().to_string())
            .collect(),
    );
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let ids = ids.clone();
        handles.push(tokio::spawn(async move {
            let mut created = HashSet::new();
            for i in 0..commands / tasks {
                // Writers share aggregates, so optimistic-concurrency conflicts happen too.
                let id = &ids[(i * 7 + t * 13) % ids.len()];
                let ctx = CommandContext::for_request(format!("t{t}-{i}"), Actor::User(owner));
                let (state, _) = store.load::<Persona>(id).await.unwrap();
                let command = if !state.created && !created.contains(id) {
                    PersonaCommand::Create {
                        owner: Owner::User(owner),
                        draft: persona_draft("Crash test"),
                    }
                } else {
                    PersonaCommand::Update {
                        by: owner,
                        patch: PersonaPatch {
                            description: Some(format!("Revision {t}-{i} of this persona.")),
                            ..Default::default()
                        },
                    }
                };
                match store.execute::<Persona>(id, command, &ctx).await {
                    Ok(_) => {
                        created.insert(id.clone());
                    }
                    // Another writer created it first: fine, the next command updates it.
                    Err(callmeback::backbone::store::CommandError::Rejected(_)) => {}
                    Err(e) => panic!("command failed: {e}"),
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

fn assert_exactly_once_in_order(
    stored: &[(String, String, i64)],
    published: &[cmb_domain::EventEnvelope],
) {
    let stored_ids: HashSet<String> = stored
        .iter()
        .map(|(t, id, s)| format!("{t}:{id}:{s}"))
        .collect();
    let mut seen = HashSet::new();
    for e in published {
        assert!(
            seen.insert(e.event_id()),
            "{} published twice",
            e.event_id()
        );
    }
    let missing: Vec<_> = stored_ids.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} events never published, e.g. {:?}",
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        seen.is_subset(&stored_ids),
        "the stream holds events the store does not"
    );
    let mut last: HashMap<(&str, &str), u64> = HashMap::new();
    for e in published {
        let prev = last
            .insert((&e.aggregate_type, &e.aggregate_id), e.sequence)
            .unwrap_or(0);
        assert_eq!(
            e.sequence,
            prev + 1,
            "{} published out of order (after {prev})",
            e.event_id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_published_exactly_once_in_order_while_publishers_are_killed() {
    let env = TestEnv::new();
    let backbone = env.backbone().await;
    let store = EventStore::new(backbone.pool.clone());

    // Two instances; small batches and a short lease make for many crash windows.
    let extra = [("PUBLISHER_BATCH", "20"), ("LEASE_TTL_MS", "800")];
    let mut procs = vec![env.spawn_process(&extra), env.spawn_process(&extra)];
    let done = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_commands(store.clone(), 16, 150, 2_400));

    // Kill -9 one instance or the other every few hundred milliseconds, and restart it.
    let mut kills = 0;
    while !writer.is_finished() || kills < 6 {
        tokio::time::sleep(Duration::from_millis(250 + rand::random::<u64>() % 400)).await;
        let victim = kills % 2;
        procs[victim].start_kill().unwrap();
        procs[victim].wait().await.unwrap();
        procs[victim] = env.spawn_process(&extra);
        kills += 1;
        if kills > 40 {
            break;
        }
    }
    writer.await.unwrap();
    done.store(true, Ordering::SeqCst);

    let written = events_in_store(&backbone.pool).await.len();
    assert!(written >= 2_000, "only {written} events written");
    // The instances write events of their own as well (a start defines the system personas'
    // knowledge, which the indexing worker then marks indexed), some after the writer ends:
    // wait until the log is quiet and the stream holds as many messages as the store events.
    let pool = backbone.pool.clone();
    let caught_up = eventually(Duration::from_secs(90), || async {
        let before = events_in_store(&pool).await.len() as u64;
        if stream_count(&env).await != before {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let after = events_in_store(&pool).await.len() as u64;
        (after == before && stream_count(&env).await == after).then_some(())
    })
    .await;
    let stored = events_in_store(&backbone.pool).await;
    // Give a late duplicate, if the design let one through, the chance to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for p in &mut procs {
        p.start_kill().ok();
        p.wait().await.ok();
    }
    assert!(
        caught_up.is_some(),
        "the stream never caught up with the store"
    );
    let published = read_stream(&env).await;
    assert_eq!(
        published.len(),
        stored.len(),
        "stream and store disagree in size"
    );
    assert_exactly_once_in_order(&stored, &published);
    eprintln!(
        "{} events, {kills} kills: exactly once, in order",
        stored.len()
    );
    env.cleanup().await;
}

#[tokio::test]
async fn verify_republishes_what_the_stream_lost() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let store = EventStore::new(b.pool.clone());
    write_commands(store, 4, 20, 200).await;
    let stored = events_in_store(&b.pool).await;

    // As after a host crash that lost acknowledged JetStream writes: the publisher's
    // checkpoint says everything went out, the stream has none of it.
    sqlx::query(
        "INSERT INTO publisher_checkpoints (name, commit_xid, global_position, snapshot)
         VALUES ('publisher', 0, 0, pg_current_snapshot())",
    )
    .execute(&b.pool)
    .await
    .unwrap();
    let config = env.config();
    let dry = callmeback::backbone::verify::verify(&b.pool, &b.js, &config.stream, false)
        .await
        .unwrap();
    assert_eq!(
        dry.missing.len(),
        stored.len(),
        "every stored event is reported missing"
    );
    assert_eq!(dry.republished, 0);
    assert_eq!(stream_count(&env).await, 0, "a dry run publishes nothing");

    let repaired = callmeback::backbone::verify::verify(&b.pool, &b.js, &config.stream, true)
        .await
        .unwrap();
    assert_eq!(repaired.republished as usize, stored.len());
    assert_exactly_once_in_order(&stored, &read_stream(&env).await);

    // Running it again finds nothing to do and publishes nothing twice.
    let again = callmeback::backbone::verify::verify(&b.pool, &b.js, &config.stream, true)
        .await
        .unwrap();
    assert!(again.missing.is_empty());
    assert_eq!(stream_count(&env).await as usize, stored.len());
    env.cleanup().await;
}

#[tokio::test]
async fn a_publisher_restarted_after_the_duplicate_window_publishes_nothing_twice() {
    let env = TestEnv::new().set("NATS_DUPLICATE_WINDOW_SECS", "1");
    let b = env.backbone().await;
    let config = env.config();
    write_commands(EventStore::new(b.pool.clone()), 4, 30, 300).await;
    let stored = events_in_store(&b.pool).await;
    let publish_for = |d: Duration| {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let publisher = plain_publisher(&b, &config);
        let stop = shutdown.clone();
        async move {
            let run = tokio::spawn(publisher.run(shutdown));
            tokio::time::sleep(d).await;
            stop.cancel();
            run.await.unwrap();
        }
    };
    publish_for(Duration::from_secs(2)).await;
    assert_eq!(stream_count(&env).await as usize, stored.len());

    // As if it died after publishing but before checkpointing, and came back much later.
    sqlx::query("DELETE FROM publisher_checkpoints")
        .execute(&b.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_for(Duration::from_secs(2)).await;
    assert_exactly_once_in_order(&stored, &read_stream(&env).await);
    env.cleanup().await;
}

/// A publisher that stalls mid-batch past a third of its lease's TTL while another instance
/// takes the lease publishes no further wave: it checks the lease before every wave, finds it
/// lost, and leaves the rest of the batch to the new holder, which publishes it exactly once
/// and in order.
#[tokio::test]
async fn a_publisher_that_lost_its_lease_stops_within_one_wave() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let config = env.config();
    // Ten personas with six events each: one batch of six waves of ten.
    write_commands(EventStore::new(b.pool.clone()), 1, 10, 60).await;
    let stored = events_in_store(&b.pool).await;
    assert_eq!(stored.len(), 60);
    let ttl = Duration::from_millis(600);
    let stalled = Arc::new(AtomicBool::new(false));
    let after_wave: callmeback::backbone::outbox::AfterWave = {
        let pool = b.pool.clone();
        let stalled = stalled.clone();
        Arc::new(move |waves| {
            let pool = pool.clone();
            let stalled = stalled.clone();
            Box::pin(async move {
                if waves == 2 && !stalled.swap(true, Ordering::SeqCst) {
                    // Another instance takes the lease while this one stalls.
                    sqlx::query(
                        "UPDATE leases SET holder = 'another', expires_at = now() + interval '1 hour'
                          WHERE name = 'publisher'",
                    )
                    .execute(&pool)
                    .await
                    .unwrap();
                    tokio::time::sleep(ttl / 2).await;
                }
            })
        })
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let publisher = callmeback::backbone::outbox::Publisher {
        pool: b.pool.clone(),
        js: b.js.clone(),
        stream: config.stream.clone(),
        settings: callmeback::config::PublisherSettings {
            lease_ttl: ttl,
            ..config.publisher.clone()
        },
        instance_id: "stalling".into(),
        lag_samples: None,
        after_wave: Some(after_wave),
    };
    let running = tokio::spawn(publisher.run(shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(10), || async {
            stalled.load(Ordering::SeqCst).then_some(())
        })
        .await
        .is_some(),
        "the publisher published two waves and stalled"
    );
    // Long enough for several more waves and retries, had it gone on.
    tokio::time::sleep(ttl * 3).await;
    assert_eq!(
        stream_count(&env).await,
        20,
        "two waves of ten out, none after the lease was lost"
    );
    // The other holder goes away: this instance takes the lease back and publishes the rest.
    sqlx::query("DELETE FROM leases WHERE name = 'publisher' AND holder = 'another'")
        .execute(&b.pool)
        .await
        .unwrap();
    let all = eventually(Duration::from_secs(10), || async {
        (stream_count(&env).await == 60).then_some(())
    })
    .await;
    assert!(all.is_some(), "the rest published once the lease was back");
    assert_exactly_once_in_order(&stored, &read_stream(&env).await);
    shutdown.cancel();
    running.await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn verify_never_repairs_an_event_behind_a_later_one_of_its_aggregate() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let config = env.config();
    let store = EventStore::new(b.pool.clone());
    write_commands(store, 1, 2, 6).await;
    let stored = events_in_store(&b.pool).await;
    // The stream lost an aggregate's first event but has its later ones.
    let events: Vec<cmb_domain::EventEnvelope> = {
        let rows = sqlx::query(&format!(
            "{} ORDER BY xact_id, global_position",
            callmeback::backbone::outbox::SELECT_ENVELOPE
        ))
        .fetch_all(&b.pool)
        .await
        .unwrap();
        rows.iter()
            .map(|r| callmeback::backbone::outbox::envelope_from_row(r).unwrap())
            .collect()
    };
    let lost = events.iter().find(|e| e.sequence == 1).unwrap().clone();
    let kept: Vec<_> = events
        .iter()
        .filter(|e| e.event_id() != lost.event_id())
        .map(cmb_nats::contract::Outgoing::of)
        .collect();
    cmb_nats::publish::publish_in_order(&b.js, &config.stream, &kept)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO publisher_checkpoints (name, commit_xid, global_position, snapshot)
         VALUES ('publisher', 0, 0, pg_current_snapshot())",
    )
    .execute(&b.pool)
    .await
    .unwrap();
    let report = callmeback::backbone::verify::verify(&b.pool, &b.js, &config.stream, true)
        .await
        .unwrap();
    assert_eq!(report.missing, vec![lost.event_id()]);
    assert_eq!(report.unrepairable, vec![lost.event_id()]);
    assert_eq!(
        report.republished, 0,
        "nothing appended behind a later event"
    );
    assert_eq!(stream_count(&env).await as usize, stored.len() - 1);
    env.cleanup().await;
}

/// A transaction left open in another database (an analyst's psql session, another
/// application) must not hold publication back: only its own events may wait for it.
#[tokio::test]
async fn a_transaction_open_elsewhere_does_not_stall_publication() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    // Another database on the same server, with a transaction that has written and stays open.
    let other = TestEnv::new();
    let other_pool = {
        let o = other.backbone().await;
        o.pool
    };
    let mut open = other_pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE held (x int)")
        .execute(&mut *open)
        .await
        .unwrap();
    // And one in our own database that has written an event and not committed.
    let mut ours = b.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('held', 'h1', 1, 'Held', '1', '{}', '{}')",
    )
    .execute(&mut *ours)
    .await
    .unwrap();

    let config = env.config();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let publisher = plain_publisher(&b, &config);
    let running = tokio::spawn(publisher.run(shutdown.clone()));
    write_commands(EventStore::new(b.pool.clone()), 2, 10, 40).await;
    let written = events_in_store(&b.pool).await.len() as u64;
    let published = eventually(Duration::from_secs(30), || async {
        (stream_count(&env).await >= written).then_some(())
    })
    .await;
    assert!(
        published.is_some(),
        "{written} events committed behind open transactions were published"
    );
    // The held event goes out once its transaction commits, after the others.
    ours.commit().await.unwrap();
    let all = eventually(Duration::from_secs(30), || async {
        (stream_count(&env).await == written + 1).then_some(())
    })
    .await;
    assert!(all.is_some(), "the late commit is published too");
    let stream = read_stream(&env).await;
    assert_eq!(stream.last().unwrap().aggregate_type, "held");
    open.rollback().await.unwrap();
    shutdown.cancel();
    running.await.unwrap();
    other_pool.close().await;
    other.cleanup().await;
    env.cleanup().await;
}

/// A long transaction elsewhere on the Postgres server does not hold publication back, but an
/// operator sees it: `/readyz` names the oldest open transaction and its age, and
/// `cmb_oldest_transaction_age_seconds` has it. Our own connections cannot sit idle in a
/// transaction for long (`idle_in_transaction_session_timeout`).
#[tokio::test]
async fn the_oldest_open_transaction_shows_in_readyz_and_ours_cannot_idle_in_one() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let other = TestEnv::new();
    let other_pool = other.backbone().await.pool;
    let mut open = other_pool.begin().await.unwrap();
    sqlx::query("CREATE TABLE held (x int)")
        .execute(&mut *open)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *open)
        .await
        .unwrap();
    let age_of_ours = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT extract(epoch FROM now() - xact_start)::float8
               FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid)
        .fetch_one(&app.state.pool)
        .await
        .unwrap()
    };
    // The oldest is ours or older (other tests share the server): never younger than ours.
    let seen = eventually(Duration::from_secs(60), || async {
        let ours = age_of_ours().await;
        if ours < 1.0 {
            return None;
        }
        let ready: serde_json::Value = reqwest::get(format!("http://{}/readyz", app.addr))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let oldest = ready["checks"]["oldest_transaction"].clone();
        (oldest["age_seconds"].as_f64()? >= ours).then_some((ours, oldest))
    })
    .await;
    let (ours, oldest) = seen.expect("/readyz names a transaction at least as old as ours");
    assert!(oldest["pid"].as_i64().is_some(), "{oldest}");
    let metrics = reqwest::get(format!("http://{}/metrics", app.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let age: f64 = metrics
        .lines()
        .find(|l| l.starts_with("cmb_oldest_transaction_age_seconds"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .expect("the oldest transaction's age is a metric");
    assert!(age >= ours, "metric {age} s, our transaction {ours} s old");

    let timeout: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
    assert_eq!(
        timeout, "1min",
        "our connections end a transaction left idle"
    );

    open.rollback().await.unwrap();
    other_pool.close().await;
    app.stop().await;
    other.cleanup().await;
    env.cleanup().await;
}

/// A durable consumer made under other settings follows the configured ones at start (the
/// same path applies a raised `NATS_REPLICAS` to consumers made before the cluster grew; a
/// single local server can only show it with the settings a one-node stream allows).
#[tokio::test]
async fn an_existing_durable_consumer_follows_changed_settings() {
    let env = TestEnv::new();
    let config = env.config();
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = cmb_nats::stream::ensure_stream(&js, &config.stream)
        .await
        .unwrap();
    let mut spec = cmb_nats::consume::DurableSpec::all_events(&config.stream, "follows-settings");
    spec.ack_wait = Duration::from_secs(30);
    spec.max_ack_pending = 1_000;
    cmb_nats::consume::durable(&stream, &spec).await.unwrap();

    spec.ack_wait = Duration::from_secs(7);
    spec.max_ack_pending = 250;
    // A projection that now reads one aggregate type only.
    spec.filter_subject = config.stream.type_subjects("wallet");
    let mut consumer = cmb_nats::consume::durable(&stream, &spec).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(info.config.max_ack_pending, 250);
    assert_eq!(info.config.filter_subject, spec.filter_subject);
    // And what the server keeps, read afresh.
    let mut again: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("follows-settings").await.unwrap();
    assert_eq!(
        again.info().await.unwrap().config.ack_wait,
        Duration::from_secs(7)
    );
    env.cleanup().await;
}

/// The publisher and the projectors run on the pipeline's own runtime: with the service's
/// runtime stalled (this test's one thread blocked), events committed just before still reach
/// JetStream and their read model.
#[tokio::test]
async fn the_read_models_move_while_the_services_runtime_is_stalled() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let b = env.backbone().await;
    // Five personas created (one writer: ids 0, 2, 4, 1, 3).
    write_commands(EventStore::new(b.pool.clone()), 1, 5, 5).await;
    let url = env.config().database_url;
    // Watched from a thread of its own while this one — the service's runtime — is blocked.
    let projected = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            // Every persona in the store (the five, and the system's) in the read model.
            eventually(Duration::from_secs(30), || async {
                let caught_up: bool = sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM projection_offsets
                              WHERE projection = 'personas' AND aggregate_type = 'persona')
                          = (SELECT count(DISTINCT aggregate_id) FROM events
                              WHERE aggregate_type = 'persona')",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                caught_up.then_some(())
            })
            .await
        })
    })
    .join()
    .unwrap();
    assert!(
        projected.is_some(),
        "the personas projection did not apply the five events while the service's runtime was stalled"
    );
    app.stop().await;
    env.cleanup().await;
}

/// The publisher's checkpoint is written by its next read, and by itself when it stops: once
/// it has published everything and stopped, the checkpoint covers every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_covers_what_was_published_once_the_publisher_stops() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let config = env.config();
    write_commands(EventStore::new(b.pool.clone()), 2, 10, 40).await;
    let stored = events_in_store(&b.pool).await.len() as u64;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let publisher = plain_publisher(&b, &config);
    let running = tokio::spawn(publisher.run(shutdown.clone()));
    assert!(
        eventually(Duration::from_secs(30), || async {
            (stream_count(&env).await == stored).then_some(())
        })
        .await
        .is_some(),
        "every event published"
    );
    shutdown.cancel();
    running.await.unwrap();
    assert_eq!(
        callmeback::backbone::outbox::unpublished(&b.pool)
            .await
            .unwrap(),
        0,
        "the checkpoint covers every published event"
    );
    assert_exactly_once_in_order(&events_in_store(&b.pool).await, &read_stream(&env).await);
    env.cleanup().await;
}

/// A publisher with the test's settings, no lag samples and no hook after its waves.
fn plain_publisher(
    b: &callmeback::backbone::Backbone,
    config: &callmeback::config::Config,
) -> callmeback::backbone::outbox::Publisher {
    callmeback::backbone::outbox::Publisher {
        pool: b.pool.clone(),
        js: b.js.clone(),
        stream: config.stream.clone(),
        settings: config.publisher.clone(),
        instance_id: "test".into(),
        lag_samples: None,
        after_wave: None,
    }
}

/// An idle publisher reads every few milliseconds, and after each snapshot it finishes its
/// position is the snapshot alone: that read must cost the events after the snapshot, not the
/// whole log, whatever plan Postgres caches for the statement. A generic plan applied the
/// snapshot's `xmax` as a filter to every event from the start (at 500 calls in `bench voice`,
/// ~200,000 events read a second and half a core of Postgres: README "Benchmarks").
#[tokio::test]
async fn a_publishers_read_after_a_finished_snapshot_does_not_scan_the_log() {
    use callmeback::backbone::outbox::{read_due, Checkpoint, CommitPosition};
    let env = TestEnv::new();
    let b = env.backbone().await;
    for i in 0..300 {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT 'scan', $1, n, 'Scanned', '1', '{}', '{}' FROM generate_series(1, 10) n",
        )
        .bind(format!("s{i}"))
        .execute(&b.pool)
        .await
        .unwrap();
    }
    // As autovacuum leaves a log of some size: its statistics known.
    sqlx::query("ANALYZE events")
        .execute(&b.pool)
        .await
        .unwrap();
    let done: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
        .fetch_one(&b.pool)
        .await
        .unwrap();
    // Where the publisher stands once every event visible in `done` is out.
    let checkpoint = Checkpoint {
        done,
        pending: None,
        at: CommitPosition::default(),
    };
    let mut tx = b.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .unwrap();
    for save in [false, true] {
        let (_, due) = read_due(&mut *tx, &checkpoint, 1000, save).await.unwrap();
        assert!(due.is_empty(), "nothing after the snapshot");
    }
    let read: i64 = sqlx::query_scalar(
        "SELECT (coalesce(sum(idx_tup_fetch), 0) + coalesce(sum(seq_tup_read), 0))::bigint
           FROM pg_stat_xact_user_tables WHERE relname = 'events'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        read < 100,
        "two reads after a finished snapshot read {read} of the log's 3,000 events"
    );
    env.cleanup().await;
}

/// The call facts the reconcile reads (`fact_*`) are worked out by a trigger on call events,
/// not by generation expressions: Postgres prepares those again for every INSERT statement,
/// inlining each SQL function they call — the most of a command's cost in Postgres, whatever
/// its event (`bench events`). A call event still gets its facts, on insert and on a payload
/// rewritten in place; any other event none.
#[tokio::test]
async fn call_facts_are_worked_out_for_call_events_only_and_without_generation_expressions() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let generated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_attribute
          WHERE attrelid = 'events'::regclass AND attgenerated <> ''",
    )
    .fetch_one(&b.pool)
    .await
    .unwrap();
    assert_eq!(generated, 0, "events has generation expressions");
    let insert = |aggregate_type: &'static str, event_type: &'static str, payload: &'static str| {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata)
             VALUES ($1, $2, 1, $2, '1', $3::jsonb, '{}')",
        )
        .bind(aggregate_type)
        .bind(event_type)
        .bind(payload)
    };
    insert(
        "call",
        "CostRecorded",
        r#"{"CostRecorded": {"service": "twilio", "total_micros": 1234, "billed_reference": "r"}}"#,
    )
    .execute(&b.pool)
    .await
    .unwrap();
    insert("persona", "PersonaUpdated", r#"{"PersonaUpdated": {}}"#)
        .execute(&b.pool)
        .await
        .unwrap();
    type Facts = (Option<i16>, Option<String>, Option<i64>, Option<i64>);
    let facts = |id: &'static str| {
        sqlx::query_as::<_, Facts>(
            "SELECT fact_kind, fact_text, fact_int, fact_int2 FROM events WHERE aggregate_id = $1",
        )
        .bind(id)
        .fetch_one(&b.pool)
    };
    assert_eq!(
        facts("CostRecorded").await.unwrap(),
        (Some(4), Some("twilio".into()), Some(1234), Some(1))
    );
    assert_eq!(
        facts("PersonaUpdated").await.unwrap(),
        (None, None, None, None)
    );
    sqlx::query(
        r#"UPDATE events SET payload = '{"CostRecorded": {"service": "deepgram", "total_micros": 5}}'
            WHERE aggregate_id = 'CostRecorded'"#,
    )
    .execute(&b.pool)
    .await
    .unwrap();
    assert_eq!(
        facts("CostRecorded").await.unwrap(),
        (Some(4), Some("deepgram".into()), Some(5), Some(0))
    );
    env.cleanup().await;
}

/// A command decides on the state this store's last command left (one statement per command,
/// no read of the aggregate's events), and only a commit proves that state current: written
/// behind its back — by another instance, or anything else — the command is decided again on
/// the stored events, and a refusal on a kept state is checked against them too.
#[tokio::test]
async fn a_kept_aggregate_state_is_used_and_decided_again_once_the_store_moved_past_it() {
    use cmb_domain::knowledge::{DocumentFormat, NewDocument};
    use cmb_domain::persona::PersonaError;
    use cmb_domain::DocumentId;
    let env = TestEnv::new();
    let b = env.backbone().await;
    // Two instances' stores on the same event store.
    let here = EventStore::new(b.pool.clone());
    let there = EventStore::new(b.pool.clone());
    let owner = cmb_domain::UserId::generate();
    let ctx = CommandContext::for_request("kept", Actor::User(owner));
    let update = |description: &str| PersonaCommand::Update {
        by: owner,
        patch: PersonaPatch {
            description: Some(description.into()),
            ..Default::default()
        },
    };
    let id = uuid::Uuid::now_v7().to_string();
    let create = PersonaCommand::Create {
        owner: Owner::User(owner),
        draft: persona_draft("Kept state"),
    };
    here.execute::<Persona>(&id, create, &ctx).await.unwrap();

    // Used: the stored creation changed behind the store's back (a fresh read would find the
    // description already there, and nothing to do); the kept state still has the old one.
    sqlx::query(
        "UPDATE events SET payload = jsonb_set(payload, '{PersonaCreated,description}',
                                               '\"Changed in the store only.\"')
          WHERE aggregate_type = 'persona' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(&id)
    .execute(&b.pool)
    .await
    .unwrap();
    let done = here
        .execute::<Persona>(&id, update("Changed in the store only."), &ctx)
        .await
        .unwrap();
    assert_eq!(
        (done.events, done.sequence),
        (1, 2),
        "decided on the kept state, not on a read of the events"
    );

    // Moved past by another writer: the kept state (sequence 2) is behind; the command is
    // decided again on the stored events, which already say what it asks for.
    there
        .execute::<Persona>(&id, update("Written by the other instance."), &ctx)
        .await
        .unwrap();
    let done = here
        .execute::<Persona>(&id, update("Written by the other instance."), &ctx)
        .await
        .unwrap();
    assert_eq!((done.events, done.sequence), (0, 3), "nothing left to do");

    // A refusal on a kept state is checked against the stored events: the other instance
    // added a document this store's state has never seen; removing it is accepted.
    let document_id = DocumentId::new(uuid::Uuid::now_v7().to_string());
    let document = NewDocument {
        document_id: document_id.clone(),
        title: "Added elsewhere".into(),
        format: DocumentFormat::Text,
        chars: 10,
        sha256: "0".repeat(64),
    };
    here.execute::<Persona>(&id, update("Kept at sequence 4."), &ctx)
        .await
        .unwrap();
    there
        .execute::<Persona>(
            &id,
            PersonaCommand::AddKnowledge {
                by: owner,
                document,
                at: chrono::Utc::now(),
            },
            &ctx,
        )
        .await
        .unwrap();
    let removed = here
        .execute::<Persona>(
            &id,
            PersonaCommand::RemoveKnowledge {
                by: owner,
                document_id: document_id.clone(),
            },
            &ctx,
        )
        .await
        .unwrap();
    assert_eq!((removed.events, removed.sequence), (1, 6));
    // And a refusal that holds on the stored events is still one.
    let again = here
        .execute::<Persona>(
            &id,
            PersonaCommand::RemoveKnowledge {
                by: owner,
                document_id,
            },
            &ctx,
        )
        .await;
    assert!(
        matches!(
            again,
            Err(callmeback::backbone::store::CommandError::Rejected(
                PersonaError::DocumentNotFound
            ))
        ),
        "{again:?}"
    );
    env.cleanup().await;
}

/// Commands committing at the same time share a statement and a transaction (the store's
/// group commit), and a command in such a statement that lost its race does not fail the
/// others: the statement wrote nothing, each command is written again on its own, and only
/// the loser is decided again.
#[tokio::test]
async fn concurrent_commands_commit_together_and_a_loser_does_not_fail_the_others() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    let store = EventStore::new(b.pool.clone());
    let owner = cmb_domain::UserId::generate();
    let ids: Vec<String> = (0..40).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let ctx = CommandContext::for_request("together", Actor::User(owner));
    for id in &ids {
        let create = PersonaCommand::Create {
            owner: Owner::User(owner),
            draft: persona_draft("Together"),
        };
        store.execute::<Persona>(id, create, &ctx).await.unwrap();
    }
    // Every aggregate updated at once; returns each command's new sequence.
    let update_all = |round: u32| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| {
                let (store, id, ctx) = (store.clone(), id.clone(), ctx.clone());
                tokio::spawn(async move {
                    let update = PersonaCommand::Update {
                        by: owner,
                        patch: PersonaPatch {
                            description: Some(format!("Round {round} of this persona.")),
                            ..Default::default()
                        },
                    };
                    store.execute::<Persona>(&id, update, &ctx).await.unwrap()
                })
            })
            .collect();
        async move {
            let mut sequences = Vec::new();
            for h in handles {
                let done = h.await.unwrap();
                assert_eq!(done.events, 1);
                sequences.push(done.sequence);
            }
            sequences
        }
    };
    assert_eq!(update_all(1).await, vec![2; 40]);
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT xact_id) FROM events WHERE aggregate_type = 'persona' AND sequence = 2",
    )
    .fetch_one(&b.pool)
    .await
    .unwrap();
    assert!(
        transactions < 40,
        "40 concurrent commands took {transactions} transactions: none committed together"
    );

    // Another writer appends to the first aggregate behind the store's back: its kept state
    // (sequence 2) is stale, and its command conflicts inside whatever statement it joins.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         SELECT aggregate_type, aggregate_id, 3, event_type, event_version, payload, metadata
           FROM events WHERE aggregate_type = 'persona' AND aggregate_id = $1 AND sequence = 2",
    )
    .bind(&ids[0])
    .execute(&b.pool)
    .await
    .unwrap();
    let mut expected = vec![3; 40];
    expected[0] = 4;
    assert_eq!(
        update_all(2).await,
        expected,
        "every command committed; the loser after the other writer's event"
    );
    let stored = events_in_store(&b.pool).await;
    assert_eq!(stored.len(), 40 * 3 + 1);
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (_, id, sequence) in &stored {
        let before = last.insert(id, *sequence).unwrap_or(0);
        assert_eq!(*sequence, before + 1, "{id}: a gap or a copy in the store");
    }
    env.cleanup().await;
}
