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
