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
    let owner = cmb_domain::UserId::generate();
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

/// The wallets projection writes a batch set-based (one upsert of the wallets it moves, one
/// insert of the ledger lines): the same wallets, and ledger lines with the same balance after
/// each event, as applying the events one at a time.
#[tokio::test]
async fn wallet_events_in_one_batch_write_what_one_at_a_time_writes() {
    use cmb_domain::wallet::WalletEvent;
    use cqrs_es::DomainEvent as _;
    let env = TestEnv::new();
    let b = env.backbone().await;
    let wallets = cmb_projections::by_name("wallets").expect("the wallets projection");
    let story = |user: &str| {
        let hold = "hold-1".to_string();
        [
            WalletEvent::CreditsGranted {
                credits: 100,
                reason: "pack".into(),
                reference: "pi_1".into(),
                balance_after: 100,
            },
            WalletEvent::CreditsReserved {
                hold_id: hold.clone(),
                credits: 30,
                available_after: 70,
            },
            WalletEvent::CreditsSettled {
                hold_id: hold.clone(),
                used: 12,
                released: 18,
                balance_after: 88,
            },
            WalletEvent::CreditsRevoked {
                grant: "pi_1".into(),
                reversal: "re_1".into(),
                cause: "refund".into(),
                credits: 100,
                from_balance: 88,
                to_debt: 12,
                balance_after: 0,
                debt_after: 12,
            },
            WalletEvent::DebtPaid {
                credits: 12,
                balance_after: 0,
                debt_after: 0,
            },
        ]
        .into_iter()
        .enumerate()
        .map(|(n, event)| cmb_domain::EventEnvelope {
            aggregate_type: "wallet".into(),
            aggregate_id: user.to_string(),
            sequence: n as u64 + 1,
            event_type: event.event_type(),
            event_version: event.event_version(),
            occurred_at: chrono::Utc::now(),
            global_position: 0,
            commit_xid: 0,
            payload: serde_json::to_value(&event).unwrap(),
            metadata: Default::default(),
        })
        .collect::<Vec<_>>()
    };
    let (batched, alone) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    // Two users' stories interleaved in one batch (another user's wallet between them)…
    let (a, other) = (
        story(&batched.to_string()),
        story(&uuid::Uuid::now_v7().to_string()),
    );
    let mixed: Vec<_> = a
        .iter()
        .zip(other.iter())
        .flat_map(|(x, y)| [x, y])
        .collect();
    let batch: Vec<_> = mixed.iter().copied().zip(1u64..).collect();
    let outcomes = cmb_projections::apply_batch(&b.pool, wallets.as_ref(), &batch)
        .await
        .unwrap();
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Applied),
        "{outcomes:?}"
    );
    // …and the same story one event at a time.
    for (i, e) in story(&alone.to_string()).iter().enumerate() {
        let outcome = cmb_projections::apply(&b.pool, wallets.as_ref(), e, 100 + i as u64)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Applied);
    }
    let wallet = |user: uuid::Uuid| {
        let pool = b.pool.clone();
        async move {
            let row: (i64, i64, i64) =
                sqlx::query_as("SELECT balance, reserved, debt FROM rm_wallets WHERE user_id = $1")
                    .bind(user)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            let ledger: Vec<(i64, String, i64, String, String, i64)> = sqlx::query_as(
                "SELECT sequence, kind, credits, reason, reference, balance_after
                   FROM rm_credit_ledger WHERE user_id = $1 ORDER BY sequence",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap();
            (row, ledger)
        }
    };
    let (one_by_one, set_based) = (wallet(alone).await, wallet(batched).await);
    // 100 granted, 12 used, 88 taken back, 12 of debt paid; the hold's 30 released.
    assert_eq!(one_by_one.0, (-12, 0, 0));
    assert_eq!(
        one_by_one.1.iter().map(|l| l.5).collect::<Vec<_>>(),
        vec![100, 100, 88, 0, -12],
        "balance after each event, as the projection has always computed it"
    );
    assert_eq!(set_based, one_by_one);
    b.pool.close().await;
    env.cleanup().await;
}
