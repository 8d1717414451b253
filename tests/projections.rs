//! Projections: a read model rebuilt from scratch equals the one built incrementally, and
//! delivering every message again changes nothing.

use crate::common;

use std::time::Duration;

use callmeback::backbone::store::EventStore;
use cmb_domain::persona::{Owner, Persona, PersonaCommand, PersonaPatch};
use cmb_domain::{Actor, CommandContext};
use cmb_projections::Outcome;
use common::{eventually, persona_draft, read_stream, TestEnv};

async fn timeline_dump(pool: &sqlx::PgPool) -> Vec<(String, String, i64, String, String)> {
    sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, sequence, event_type, actor FROM rm_timeline
          ORDER BY aggregate_type, aggregate_id, sequence",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilt_projections_equal_live_ones_and_redelivery_changes_nothing() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let store = EventStore::new(pool.clone());
    let owner = uuid::Uuid::now_v7();
    let ctx = CommandContext::for_request("projection-test", Actor::User(owner));

    // A history with creations, updates and deletions, after the three system personas and
    // their libraries (once the knowledge worker has indexed them).
    let documents: usize = cmb_domain::persona::system::system_personas()
        .iter()
        .map(|p| cmb_domain::knowledge::library::library(p.id).len())
        .sum();
    let system_events = eventually(Duration::from_secs(60), || async {
        let indexed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_type = 'persona'
               AND event_type = 'KnowledgeDocumentIndexed'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if indexed < documents as i64 {
            return None;
        }
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events WHERE aggregate_type = 'persona'")
            .fetch_one(&pool)
            .await
            .ok()
    })
    .await
    .expect("the system libraries are indexed");
    let mut total = system_events as u64;
    for i in 0..30 {
        let id = format!("p{i:02}");
        store
            .execute::<Persona>(
                &id,
                PersonaCommand::Create {
                    owner: Owner::User(owner),
                    draft: persona_draft(&format!("Persona {i}")),
                },
                &ctx,
            )
            .await
            .unwrap();
        total += 1;
        for r in 0..(i % 4) {
            let patch = PersonaPatch {
                description: Some(format!("Revision {r} of persona {i}.")),
                tags: Some(vec![format!("t{r}")]),
                ..Default::default()
            };
            store
                .execute::<Persona>(&id, PersonaCommand::Update { by: owner, patch }, &ctx)
                .await
                .unwrap();
            total += 1;
        }
        if i % 5 == 0 {
            store
                .execute::<Persona>(&id, PersonaCommand::Delete { by: owner }, &ctx)
                .await
                .unwrap();
            total += 1;
        }
    }
    let caught_up = eventually(Duration::from_secs(30), || async {
        // Persona events only: the timeline also has the price table's.
        let applied: Vec<i64> = sqlx::query_scalar(
            "SELECT COALESCE(sum(sequence), 0)::bigint FROM projection_offsets
              WHERE projection IN ('personas', 'timeline') AND aggregate_type = 'persona'
              GROUP BY projection",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        // And the greetings the instance pre-synthesised at start-up, one system cost each.
        let greetings: i64 =
            sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'system_cost'")
                .fetch_one(&pool)
                .await
                .unwrap();
        let in_timeline: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_timeline")
            .fetch_one(&pool)
            .await
            .unwrap();
        (applied.len() == 2
            && applied.iter().all(|&n| n as u64 == total)
            && greetings == 3
            && in_timeline as u64 == total + 1 + 3)
            .then_some(())
    })
    .await;
    assert!(caught_up.is_some(), "the live projections never caught up");
    let personas = cmb_projections::personas::dump(&pool).await.unwrap();
    let timeline = timeline_dump(&pool).await;
    assert_eq!(personas.len(), 27, "3 system, 30 created, 6 deleted");
    assert_eq!(
        timeline.len() as u64,
        total + 1 + 3,
        "and the launch price table and the three greetings' system costs"
    );

    // Redeliver every message to every projection: all are recognised as applied.
    let events = read_stream(&env).await;
    for (i, event) in events.iter().enumerate() {
        for projection in cmb_projections::all() {
            let outcome = cmb_projections::apply(&pool, projection.as_ref(), event, i as u64 + 1)
                .await
                .unwrap();
            assert!(
                matches!(outcome, Outcome::AlreadyApplied | Outcome::Ignored),
                "{outcome:?}"
            );
        }
    }
    assert_eq!(
        cmb_projections::personas::dump(&pool).await.unwrap(),
        personas
    );
    assert_eq!(timeline_dump(&pool).await, timeline);

    // An event delivered before its predecessor is held back, not applied.
    let late = events.iter().find(|e| e.sequence == 2).unwrap().clone();
    let mut ahead = late.clone();
    ahead.aggregate_id = "not-yet-seen".into();
    let outcome = cmb_projections::apply(&pool, &cmb_projections::timeline::Timeline, &ahead, 0)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Gap { expected: 1 });

    // Rebuild from scratch, with the live projectors still running: same read models.
    let config = env.config();
    for projection in cmb_projections::all() {
        callmeback::backbone::projector::rebuild(
            &pool,
            &app.state.js,
            &config.stream,
            projection.as_ref(),
            false,
        )
        .await
        .unwrap();
    }
    assert_eq!(
        cmb_projections::personas::dump(&pool).await.unwrap(),
        personas
    );
    assert_eq!(timeline_dump(&pool).await, timeline);

    app.stop().await;
    env.cleanup().await;
}

/// One batch, one transaction: each event's outcome is what applying it alone would give, an
/// aggregate's events later in the batch see the earlier ones applied, and a gap holds only
/// its own aggregate back.
#[tokio::test]
async fn a_batch_applies_each_event_once_in_aggregate_order() {
    let env = TestEnv::new();
    let b = env.backbone().await;
    // A type this build does not know: applied as `Unknown` (offset moved, nothing written),
    // so the batch's bookkeeping is all that is tested here.
    let event = |aggregate_type: &str, id: &str, sequence: u64| cmb_domain::EventEnvelope {
        aggregate_type: aggregate_type.into(),
        aggregate_id: id.into(),
        sequence,
        event_type: "SomethingFromTheFuture".into(),
        event_version: "1".into(),
        occurred_at: chrono::Utc::now(),
        global_position: 0,
        commit_xid: 0,
        payload: serde_json::json!({}),
        metadata: Default::default(),
    };
    let wallets = cmb_projections::by_name("wallets").expect("the wallets projection");
    let first = [
        event("wallet", "a", 1),
        event("wallet", "a", 2),
        event("wallet", "b", 2),
        event("wallet", "a", 2),
        event("persona", "p", 1),
        event("wallet", "c", 1),
    ];
    let batch: Vec<_> = first.iter().zip(1u64..).collect();
    let outcomes = cmb_projections::apply_batch(&b.pool, wallets.as_ref(), &batch)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Unknown,
            Outcome::Unknown,
            Outcome::Gap { expected: 1 },
            Outcome::AlreadyApplied,
            Outcome::Ignored,
            Outcome::Unknown,
        ]
    );
    let second = [
        event("wallet", "b", 1),
        event("wallet", "b", 2),
        event("wallet", "a", 1),
    ];
    let batch: Vec<_> = second.iter().zip(7u64..).collect();
    let outcomes = cmb_projections::apply_batch(&b.pool, wallets.as_ref(), &batch)
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![Outcome::Unknown, Outcome::Unknown, Outcome::AlreadyApplied]
    );
    // The one-at-a-time path agrees with the batches' offsets.
    let next = event("wallet", "a", 3);
    assert_eq!(
        cmb_projections::apply(&b.pool, wallets.as_ref(), &next, 10)
            .await
            .unwrap(),
        Outcome::Unknown
    );
    let offsets: Vec<(String, i64)> = sqlx::query_as(
        "SELECT aggregate_id, sequence FROM projection_offsets
          WHERE projection = 'wallets' ORDER BY aggregate_id",
    )
    .fetch_all(&b.pool)
    .await
    .unwrap();
    assert_eq!(
        offsets,
        vec![("a".into(), 3), ("b".into(), 2), ("c".into(), 1)]
    );
    let (sequence, applied): (i64, i64) = sqlx::query_as(
        "SELECT stream_sequence, events_applied FROM projection_status WHERE projection = 'wallets'",
    )
    .fetch_one(&b.pool)
    .await
    .unwrap();
    assert_eq!((sequence, applied), (10, 6));
    b.pool.close().await;
    env.cleanup().await;
}
