//! Poison messages: an event a projection keeps failing on is set aside (with the aggregate's
//! later events behind it) while the other aggregates move on; an undecodable message is kept,
//! not acknowledged and forgotten; `callmeback dlq retry` puts letters back, in order.

use crate::common;

use std::time::Duration;

use cmb_domain::persona::{Owner, Persona, PersonaCommand, PersonaPatch};
use cmb_domain::{Actor, CommandContext};
use common::{eventually, persona_draft, TestEnv};

async fn letters(
    pool: &sqlx::PgPool,
    consumer: &str,
) -> Vec<(Option<i64>, Option<String>, String, String)> {
    sqlx::query_as(
        "SELECT sequence, aggregate_id, status, error FROM dead_letters
          WHERE consumer = $1 ORDER BY stream_sequence",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn dlq(env: &TestEnv, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_callmeback"))
        .arg("dlq")
        .args(args)
        .env_clear()
        .envs(&env.vars)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_set_aside_while_its_neighbours_move_on_and_goes_back_on_retry() {
    let env = TestEnv::new().set("CONSUMER_MAX_DELIVERIES", "2");
    let app = env.spawn_app().await;
    let pool = app.state.pool.clone();
    let store = app.state.store.clone();
    // As a bug would: the personas projection fails on one persona's row, and only on it.
    sqlx::query(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.name = 'Poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;
           RETURN NEW;
         END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON rm_personas
         FOR EACH ROW EXECUTE FUNCTION poison()",
    )
    .execute(&pool)
    .await
    .unwrap();

    let owner = cmb_domain::UserId::generate();
    let ctx = CommandContext::for_request("test", Actor::User(owner));
    let poison = uuid::Uuid::now_v7().to_string();
    store
        .execute::<Persona>(
            &poison,
            PersonaCommand::Create {
                owner: Owner::User(owner),
                draft: persona_draft("Poison"),
            },
            &ctx,
        )
        .await
        .unwrap();
    store
        .execute::<Persona>(
            &poison,
            PersonaCommand::Update {
                by: owner,
                patch: PersonaPatch {
                    description: Some("Updated after the poisoned creation.".into()),
                    ..Default::default()
                },
            },
            &ctx,
        )
        .await
        .unwrap();
    // Its neighbours, created after it, are projected.
    let healthy = uuid::Uuid::now_v7().to_string();
    store
        .execute::<Persona>(
            &healthy,
            PersonaCommand::Create {
                owner: Owner::User(owner),
                draft: persona_draft("Healthy"),
            },
            &ctx,
        )
        .await
        .unwrap();
    let moved_on = eventually(Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_personas WHERE id = $1")
            .bind(&healthy)
            .fetch_one(&pool)
            .await
            .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert!(moved_on.is_some(), "the neighbour was projected");

    // The poisoned event is set aside after two deliveries, its successor waits behind it.
    let parked = eventually(Duration::from_secs(60), || async {
        let l = letters(&pool, "projection:personas").await;
        (l.len() == 2).then_some(l)
    })
    .await
    .expect("both of the poisoned persona's events set aside");
    assert_eq!(parked[0].0, Some(1));
    assert_eq!(parked[0].1.as_deref(), Some(poison.as_str()));
    assert_eq!(parked[0].2, "parked");
    assert!(parked[0].3.contains("poisoned row"), "{:?}", parked[0]);
    assert_eq!(parked[1].0, Some(2));
    assert!(parked[1].3.contains("waiting behind"), "{:?}", parked[1]);

    // A message nobody can decode is kept, body and all, not acknowledged and forgotten.
    let config = env.config();
    let client = async_nats::connect(&config.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish(
        format!("{}.persona.garbage", config.stream.subject_prefix),
        "not an event".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let kept = eventually(Duration::from_secs(60), || async {
        let body: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM dead_letters WHERE consumer = 'projection:personas' AND body IS NOT NULL",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        body
    })
    .await
    .expect("the undecodable message is set aside");
    assert_eq!(kept, b"not an event");

    // Operators see them.
    let ready: serde_json::Value = reqwest::get(format!("http://{}/readyz", app.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["dead_letters"]["projection:personas"], 3);
    let listed = dlq(&env, &["list"]).await;
    assert!(listed.contains("poisoned row"), "{listed}");

    // The bug is fixed; the letters go back, in order, and the persona shows its update.
    sqlx::query("DROP TRIGGER poison ON rm_personas")
        .execute(&pool)
        .await
        .unwrap();
    let retried = dlq(&env, &["retry", "--consumer", "projection:personas"]).await;
    assert!(retried.starts_with("3 letter(s)"), "{retried}");
    let applied = eventually(Duration::from_secs(60), || async {
        let d: Option<String> =
            sqlx::query_scalar("SELECT description FROM rm_personas WHERE id = $1")
                .bind(&poison)
                .fetch_optional(&pool)
                .await
                .unwrap();
        d.filter(|d| d.starts_with("Updated"))
    })
    .await;
    assert!(
        applied.is_some(),
        "the set-aside events were applied in order"
    );
    let after = eventually(Duration::from_secs(30), || async {
        let l = letters(&pool, "projection:personas").await;
        l.iter().all(|l| l.2 != "retry").then_some(l)
    })
    .await
    .unwrap();
    let statuses: Vec<&str> = after.iter().map(|l| l.2.as_str()).collect();
    // The persona's two are resolved; the undecodable one cannot be and is set aside again.
    assert_eq!(
        statuses,
        vec!["resolved", "resolved", "parked"],
        "{after:?}"
    );
    app.stop().await;
    env.cleanup().await;
}
