//! `callmeback simulate`: a realistic history through the real command path (the event store
//! executing commands on the real aggregates), fast — calls do not take their real length.
//! Users register and are granted credits; calls hold their maximum price, are requested,
//! dialled, placed, ring, are answered for varied lengths or end busy, unanswered or failed,
//! are priced, costed per provider and settled; some are paid by card and a few refunded.
//!
//! It runs with no `serve` running (it refuses otherwise: a running instance's dialer and
//! settlement workers would act on the simulated calls while they are being written). Its
//! events reach the stream when `serve` next runs, or at once with `--publish`.
//!
//! Dates: the event store dates an event when it is written (`recorded_at`, the database
//! clock). To spread the history over `--days`, simulate backdates the rows it wrote, right
//! after writing them — and only while it holds the publisher's lease, so no publisher can
//! put a row on the stream before it is backdated (the stream and the store then agree). If
//! the lease were lost midway, the rest is dated when written (`backdated: false` in the
//! summary), the simulated times then living only in the events' own fields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use cmb_domain::billing::{RecordStripeEvent, StripeEvent};
use cmb_domain::call::{Call, CallCommand, CallRequest, Outcome, Payment, Status};
use cmb_domain::cost::{CostKind, LlmProvider};
use cmb_domain::pricing::{credits_for, PriceTable};
use cmb_domain::values::{Email, Password, PhoneNumber};
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use cmb_domain::{Actor, CommandContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backbone::store::{CommandError, EventStore};
use crate::config::Config;
use crate::usecases::billing::{reverse, ChargeReversal};

#[derive(Debug, Clone)]
pub struct Options {
    pub days: u32,
    pub calls_per_day: u32,
    pub seed: u64,
    /// Run the publisher until every event is on the stream.
    pub publish: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub users: usize,
    pub calls: u64,
    pub completed: u64,
    pub busy: u64,
    pub no_answer: u64,
    pub failed: u64,
    pub card_calls: u64,
    pub refunds: u64,
    pub events: i64,
    pub backdated: bool,
    pub published: bool,
}

const WORKERS: usize = 4;

/// Why a simulation stopped (what it wrote stays: events are facts).
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Backbone(#[from] crate::backbone::ConnectError),
    #[error("the database")]
    Db(#[from] sqlx::Error),
    #[error("another instance holds the publisher's lease (is `serve` running?): stop it first — its workers would act on the simulated calls while they are written")]
    PublisherBusy,
    #[error("the publisher did not drain within 10 minutes (is another instance publishing?)")]
    NotDrained,
    #[error("a simulated user's details")]
    Invalid(#[from] cmb_domain::values::Invalid),
    #[error("registering a simulated user")]
    Register(#[from] crate::usecases::accounts::Error),
    #[error("{0} (wallet)")]
    Wallet(&'static str, #[source] CommandError<WalletError>),
    #[error("a call command")]
    Call(#[from] CommandError<cmb_domain::call::CallError>),
    #[error("a refund")]
    Refund(#[from] CommandError<cmb_domain::billing::StripeEventError>),
    #[error("a refund taken back")]
    Reversal(#[from] crate::usecases::billing::Error),
    #[error("a simulation worker died")]
    Worker(#[from] tokio::task::JoinError),
}

pub async fn run(config: Config, options: Options) -> Result<Summary, SimulateError> {
    let b = crate::backbone::connect(&config, (WORKERS as u32 + 2).max(8)).await?;
    let pool = b.pool.clone();
    let store = EventStore::new(pool.clone());
    let events_before: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?;

    // Hold the publisher's lease while writing, so rows can be backdated before publication.
    let holder = format!("simulate-{}", Uuid::new_v4());
    let mut lease = crate::backbone::lease::Lease::new(
        crate::backbone::outbox::PUBLISHER,
        &holder,
        config.publisher.lease_ttl,
    );
    // A running `serve` holds it: its dialer and settlement workers would then act on the
    // simulated calls as they are written (dial them for real, settle them twice). Wait out a
    // dead instance's lease, then refuse.
    let deadline =
        tokio::time::Instant::now() + config.publisher.lease_ttl + StdDuration::from_secs(1);
    while !lease.ensure(&pool).await? {
        if tokio::time::Instant::now() > deadline {
            return Err(SimulateError::PublisherBusy);
        }
        tokio::time::sleep(StdDuration::from_millis(250)).await;
    }
    let backdate = Arc::new(AtomicBool::new(true));
    let stop_renewing = CancellationToken::new();
    let renewer = {
        let pool = pool.clone();
        let backdate = backdate.clone();
        let stop = stop_renewing.clone();
        let every = config.publisher.lease_ttl / 4;
        tokio::spawn(async move {
            while backdate.load(Ordering::SeqCst) {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                if !matches!(lease.ensure(&pool).await, Ok(true)) {
                    // Lost: from now on, rows are dated when written.
                    backdate.store(false, Ordering::SeqCst);
                }
            }
            lease
        })
    };

    let mut rng = StdRng::seed_from_u64(options.seed);
    let run_id = Uuid::new_v4().simple().to_string()[..8].to_string();
    let today = Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let start = today - Duration::days(options.days as i64);
    let total_calls = options.days as u64 * options.calls_per_day as u64;
    let n_users = (options.calls_per_day as usize / 2).clamp(3, 200);
    let password = Password::parse("Simulated-user-1!")?;
    let mut users = Vec::new();
    for i in 0..n_users {
        let id = Uuid::from_u128(rng.gen());
        let email = Email::parse(&format!("sim-{run_id}-{i}@example.com"))?;
        let phone = PhoneNumber::parse(
            "phone",
            &format!("+1555{:07}", rng.gen_range(0..10_000_000)),
        )?;
        let ctx = CommandContext::system("simulate");
        crate::usecases::accounts::create(
            &store,
            id.into(),
            format!("Simulated {i}"),
            &email,
            &phone,
            &password,
            &ctx,
        )
        .await?;
        grant(&store, id, &format!("sim-grant-{id}")).await?;
        if backdate.load(Ordering::SeqCst) {
            sqlx::query(
                "UPDATE events SET recorded_at = $2
                  WHERE aggregate_type IN ('user', 'wallet') AND aggregate_id = $1",
            )
            .bind(id.to_string())
            .bind(start)
            .execute(&pool)
            .await?;
        }
        users.push((id, phone));
    }

    // Calls in time order, each user's on one worker (its wallet is contended by nothing else).
    let mut plans: Vec<Vec<Plan>> = (0..WORKERS).map(|_| Vec::new()).collect();
    for n in 0..total_calls {
        let day = n / options.calls_per_day.max(1) as u64;
        let at = start
            + Duration::days(day as i64)
            + Duration::seconds(rng.gen_range(7 * 3600..22 * 3600));
        let u = rng.gen_range(0..users.len());
        plans[u % WORKERS].push(Plan {
            user: users[u].0,
            phone: users[u].1.clone(),
            at,
            seed: rng.gen(),
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut plan in plans {
        plan.sort_by_key(|p| p.at);
        let store = store.clone();
        let pool = pool.clone();
        let backdate = backdate.clone();
        tasks.spawn(async move {
            let mut summary = Summary::default();
            for p in plan {
                one_call(&store, &pool, &backdate, p, &mut summary).await?;
            }
            Ok::<Summary, SimulateError>(summary)
        });
    }
    let mut summary = Summary {
        users: users.len(),
        ..Default::default()
    };
    while let Some(done) = tasks.join_next().await {
        let s = done??;
        summary.calls += s.calls;
        summary.completed += s.completed;
        summary.busy += s.busy;
        summary.no_answer += s.no_answer;
        summary.failed += s.failed;
        summary.card_calls += s.card_calls;
        summary.refunds += s.refunds;
    }
    stop_renewing.cancel();
    let mut lease = renewer.await?;
    summary.backdated = backdate.load(Ordering::SeqCst);
    lease.release(&pool).await;
    summary.events = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await?
        - events_before;

    if options.publish {
        publish_all(&config, &b).await?;
        summary.published = true;
    }
    Ok(summary)
}

async fn grant(store: &EventStore, user: Uuid, reference: &str) -> Result<(), SimulateError> {
    store
        .execute::<Wallet>(
            &user.to_string(),
            WalletCommand::Grant {
                credits: 2_000,
                reason: "simulation".into(),
                reference: reference.into(),
            },
            &CommandContext::system("simulate"),
        )
        .await
        .map_err(|e| SimulateError::Wallet("granting credits", e))?;
    Ok(())
}

struct Plan {
    user: Uuid,
    phone: PhoneNumber,
    at: DateTime<Utc>,
    seed: u64,
}

async fn one_call(
    store: &EventStore,
    pool: &PgPool,
    backdate: &AtomicBool,
    plan: Plan,
    summary: &mut Summary,
) -> Result<(), SimulateError> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let prices = PriceTable::LAUNCH;
    let call_id = Uuid::now_v7().to_string();
    let user = plan.user.to_string();
    let ctx =
        CommandContext::for_request(format!("simulate-{call_id}"), Actor::User(plan.user.into()));
    let t = plan.at;
    let max_minutes = rng.gen_range(1..=10u32);
    let max_price = prices.max_price(max_minutes);
    let by_card = rng.gen_range(0..100) < 15;
    let call = |command: CallCommand| {
        let ctx = ctx.clone();
        let call_id = call_id.clone();
        async move { store.execute::<Call>(&call_id, command, &ctx).await }
    };

    let payment = if by_card {
        summary.card_calls += 1;
        Payment::Card {
            payment_intent_id: format!("pi_sim_{}", Uuid::new_v4().simple()),
        }
    } else {
        let credits = credits_for(max_price);
        let reserve = WalletCommand::Reserve {
            hold_id: call_id.clone(),
            credits,
        };
        match store.execute::<Wallet>(&user, reserve.clone(), &ctx).await {
            Err(CommandError::Rejected(WalletError::Insufficient { .. })) => {
                grant(store, plan.user, &format!("sim-topup-{call_id}")).await?;
                store
                    .execute::<Wallet>(&user, reserve, &ctx)
                    .await
                    .map_err(|e| SimulateError::Wallet("holding credits", e))?;
            }
            other => {
                other.map_err(|e| SimulateError::Wallet("holding credits", e))?;
            }
        }
        Payment::Credits { credits }
    };
    call(CallCommand::Request(CallRequest {
        user_id: plan.user.into(),
        persona_id: "brad_001".into(),
        persona_name: "Brad".into(),
        phone: plan.phone.clone(),
        max_minutes,
        payment: payment.clone(),
        prices,
        scheduled_for: None,
        timezone: None,
    }))
    .await?;
    call(CallCommand::StartDial { attempt: 1, at: t }).await?;
    summary.calls += 1;
    let roll = rng.gen_range(0..100);
    let mut end = t + Duration::seconds(30);
    if roll < 3 {
        call(CallCommand::DialFailed {
            reason: "twilio answered 503".into(),
            give_up: true,
            at: end,
        })
        .await?;
        summary.failed += 1;
    } else {
        let sid = format!("CA{}", Uuid::new_v4().simple());
        call(CallCommand::RecordPlaced {
            call_sid: sid.clone(),
        })
        .await?;
        let status = |status: Status, n: u32, at: DateTime<Utc>, secs: Option<u32>| {
            CallCommand::RecordStatus {
                call_sid: sid.clone(),
                status,
                sequence: Some(n),
                duration_secs: secs,
                at,
            }
        };
        call(status(Status::Ringing, 1, t + Duration::seconds(3), None)).await?;
        let outcome = match roll {
            3..=77 => Outcome::Completed,
            78..=89 => Outcome::NoAnswer,
            90..=97 => Outcome::Busy,
            _ => Outcome::Failed,
        };
        if outcome == Outcome::Completed {
            let answered = t + Duration::seconds(8);
            // Mostly short calls, some that run to the end of what was paid.
            let secs = if rng.gen_range(0..10) == 0 {
                max_minutes * 60 + 5
            } else {
                rng.gen_range(10..=max_minutes * 60)
            };
            end = answered + Duration::seconds(secs as i64);
            call(status(Status::InProgress, 2, answered, None)).await?;
            call(status(Status::Ended(outcome), 3, end, Some(secs))).await?;
            let secs = secs.min(max_minutes * 60) as i64;
            let minutes = PriceTable::billed_minutes(secs as u32) as i64;
            let costs = [
                prices.cost(CostKind::DeepgramStreamingStt, secs, true),
                prices.cost(
                    CostKind::ChatTokens(LlmProvider::Cerebras),
                    rng.gen_range(800..4_000) * minutes,
                    true,
                ),
                prices.cost(
                    CostKind::TtsCharacters,
                    rng.gen_range(300..1_200) * minutes,
                    true,
                ),
            ];
            for cost in costs {
                call(CallCommand::RecordCost(cost)).await?;
            }
            summary.completed += 1;
        } else {
            call(status(Status::Ended(outcome), 2, end, None)).await?;
            match outcome {
                Outcome::Busy => summary.busy += 1,
                Outcome::NoAnswer => summary.no_answer += 1,
                _ => summary.failed += 1,
            }
        }
    }

    // Settlement, as the settlement worker does it.
    let (state, _) = store.load::<Call>(&call_id).await?;
    let price = state.price_cents.unwrap_or(0);
    let settlement = payment.settle(price, state.max_price_cents);
    if let Payment::Credits { .. } = &payment {
        let command = if settlement.credits_used > 0 {
            WalletCommand::Settle {
                hold_id: call_id.clone(),
                credits: settlement.credits_used,
            }
        } else {
            WalletCommand::Release {
                hold_id: call_id.clone(),
            }
        };
        store
            .execute::<Wallet>(&user, command, &ctx)
            .await
            .map_err(|e| SimulateError::Wallet("settling a hold", e))?;
    }
    call(CallCommand::RecordSettlement {
        charged_cents: settlement.charged_cents,
        released_cents: settlement.released_cents,
    })
    .await?;
    let mut refund_event = None;
    if let Payment::Card { payment_intent_id } = &payment {
        if price > 0 && rng.gen_range(0..5) == 0 {
            // As the webhook handles it: the event recorded, then taken back from the call.
            let event_id = format!("evt_sim_{}", Uuid::new_v4().simple());
            let charge = format!("ch_sim_{}", Uuid::new_v4().simple());
            let created = (end + Duration::days(1)).timestamp();
            let object = serde_json::json!({
                "id": charge,
                "payment_intent": payment_intent_id,
                "amount_refunded": price,
            });
            let ctx = CommandContext::system("simulate");
            store
                .execute::<StripeEvent>(
                    &event_id,
                    RecordStripeEvent {
                        kind: "charge.refunded".into(),
                        object_id: charge,
                        created,
                        summary: object.clone(),
                    },
                    &ctx,
                )
                .await?;
            if let Some(reversal) = ChargeReversal::of("charge.refunded", &object, created) {
                reverse(store, &reversal, &ctx).await?;
            }
            summary.refunds += 1;
            refund_event = Some(event_id);
        }
    }

    if backdate.load(Ordering::SeqCst) {
        // Each event at the simulated time it carries, else when its call began or ended.
        sqlx::query(
            "UPDATE events
                SET recorded_at = COALESCE((payload -> event_type ->> 'at')::timestamptz,
                    CASE WHEN event_type IN ('CallRequested', 'CallPlaced') THEN $2 ELSE $3 END)
              WHERE aggregate_type = 'call' AND aggregate_id = $1",
        )
        .bind(&call_id)
        .bind(t)
        .bind(end)
        .execute(pool)
        .await?;
        sqlx::query(
            "UPDATE events
                SET recorded_at = CASE WHEN event_type = 'CreditsSettled' OR event_type = 'CreditsReleased'
                                       THEN $4 ELSE $3 END
              WHERE aggregate_type = 'wallet' AND aggregate_id = $1
                AND (payload -> event_type ->> 'hold_id' = $2
                     OR payload -> event_type ->> 'reference' = 'sim-topup-' || $2)",
        )
        .bind(&user)
        .bind(&call_id)
        .bind(t)
        .bind(end)
        .execute(pool)
        .await?;
        if let Some(event_id) = refund_event {
            sqlx::query(
                "UPDATE events SET recorded_at = $2
                  WHERE aggregate_type = 'stripe_event' AND aggregate_id = $1",
            )
            .bind(event_id)
            .bind(end + Duration::days(1))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// Runs the publisher until the stream holds every committed event.
async fn publish_all(config: &Config, b: &crate::backbone::Backbone) -> Result<(), SimulateError> {
    if crate::backbone::outbox::unpublished(&b.pool).await? == 0 {
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let publisher = crate::backbone::outbox::Publisher {
        pool: b.pool.clone(),
        js: b.js.clone(),
        stream: config.stream.clone(),
        settings: config.publisher.clone(),
        instance_id: config.instance_id.clone(),
        lag_samples: None,
        after_wave: None,
    };
    let running = tokio::spawn(publisher.run(shutdown.clone()));
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(600);
    loop {
        if crate::backbone::outbox::unpublished(&b.pool).await? == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return Err(SimulateError::NotDrained);
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    shutdown.cancel();
    let _ = running.await;
    Ok(())
}
