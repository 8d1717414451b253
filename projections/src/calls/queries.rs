//! What the API, the workers and the use cases ask of the calls read model (`rm_calls`). A
//! read model may lag: decisions load the `call` aggregate; these answer queries, and the
//! few checks that are made under a lock of their own (scheduled calls per user).

use chrono::{DateTime, Utc};
use cmb_domain::call::{CallRequest, Payment, Status};
use cmb_domain::{CallId, PersonaId, UserId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

/// A call as the front end shows it.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct CallView {
    #[sqlx(try_from = "Uuid")]
    #[schema(value_type = Uuid)]
    pub id: CallId,
    #[sqlx(try_from = "String")]
    #[schema(value_type = String)]
    pub persona_id: PersonaId,
    pub persona_name: String,
    pub phone_number: String,
    pub status: String,
    pub duration_minutes: i32,
    pub max_price_cents: i64,
    pub payment_method: String,
    pub scheduled_for: Option<DateTime<Utc>>,
    pub timezone: Option<String>,
    pub call_sid: Option<String>,
    pub answered_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_secs: i32,
    pub billed_minutes: i32,
    /// What the call costs the user.
    pub cost_cents: i64,
    pub charged_cents: Option<i64>,
    /// Of what was charged, what was given back since (refunds and disputes); shown in the
    /// call's payment.
    #[serde(skip)]
    pub reversed_cents: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl CallView {
    /// The call as the projection will show it once it applies `CallRequested`: what a
    /// handler answers when the read model has not caught up yet.
    pub fn requested(id: CallId, request: &CallRequest, at: DateTime<Utc>) -> CallView {
        let status = if request.scheduled_for.is_some() {
            Status::Scheduled
        } else {
            Status::Initiated
        };
        let method = match request.payment {
            Payment::Credits { .. } => "credits",
            Payment::Card { .. } => "card",
        };
        CallView {
            id,
            persona_id: PersonaId::new(request.persona_id.clone()),
            persona_name: request.persona_name.clone(),
            phone_number: request.phone.as_str().to_string(),
            status: status.as_str().to_string(),
            duration_minutes: request.max_minutes as i32,
            max_price_cents: request.prices.max_price(request.max_minutes).0,
            payment_method: method.to_string(),
            scheduled_for: request.scheduled_for,
            timezone: request.timezone.clone(),
            call_sid: None,
            answered_at: None,
            ended_at: None,
            duration_secs: 0,
            billed_minutes: 0,
            cost_cents: 0,
            charged_cents: None,
            reversed_cents: 0,
            created_at: at,
            updated_at: at,
        }
    }
}

const CALL_COLUMNS: &str = "id, persona_id, persona_name, phone AS phone_number, status,
    max_minutes AS duration_minutes, max_price_cents, payment_method, scheduled_for, timezone,
    call_sid, answered_at, ended_at, duration_secs, billed_minutes, price_cents AS cost_cents,
    charged_cents, reversed_cents, created_at, updated_at";

/// Call `id` of `user`.
pub async fn view(
    pool: &PgPool,
    id: CallId,
    user: UserId,
) -> Result<Option<CallView>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM rm_calls WHERE id = $1 AND user_id = $2"
    ))
    .bind(id.uuid())
    .bind(user.uuid())
    .fetch_optional(pool)
    .await
}

/// The statuses a call can show.
pub const STATUSES: &[&str] = &[
    "scheduled",
    "initiated",
    "ringing",
    "in-progress",
    "completed",
    "busy",
    "no-answer",
    "failed",
    "canceled",
];

/// The order of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Newest,
    Oldest,
    Longest,
    Costliest,
}

impl Sort {
    fn order_by(self) -> &'static str {
        match self {
            Sort::Newest => "created_at DESC, id DESC",
            Sort::Oldest => "created_at ASC, id ASC",
            Sort::Longest => "duration_secs DESC, created_at DESC",
            Sort::Costliest => "price_cents DESC, created_at DESC",
        }
    }
}

/// Which of a user's calls, in what order, which page.
#[derive(Debug, Clone)]
pub struct ListFilter {
    pub user: UserId,
    /// One of [`STATUSES`].
    pub status: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub sort: Sort,
    pub page: i64,
    pub per_page: i64,
}

/// One page of a user's calls, and how many match in all.
pub async fn list(pool: &PgPool, f: &ListFilter) -> Result<(Vec<CallView>, i64), sqlx::Error> {
    let build = |select: &str| {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(select);
        q.push(" FROM rm_calls WHERE user_id = ")
            .push_bind(f.user.uuid());
        if let Some(s) = f.status.clone() {
            q.push(" AND status = ").push_bind(s);
        }
        if let Some(from) = f.from {
            q.push(" AND created_at >= ").push_bind(from);
        }
        if let Some(to) = f.to {
            q.push(" AND created_at < ").push_bind(to);
        }
        q
    };
    let total: i64 = build("SELECT count(*)")
        .build_query_scalar()
        .fetch_one(pool)
        .await?;
    let mut rows = build(&format!("SELECT {CALL_COLUMNS}"));
    rows.push(format!(
        " ORDER BY {} LIMIT {} OFFSET {}",
        f.sort.order_by(),
        f.per_page,
        (f.page - 1) * f.per_page
    ));
    let calls = rows.build_query_as().fetch_all(pool).await?;
    Ok((calls, total))
}

/// Where the call's money is.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PaymentView {
    /// `credits` or `card`.
    pub method: String,
    /// `held` (until the call is settled), `captured` (charged; the rest released),
    /// `released` (nothing charged) or `refunded` (charged, then some or all of it given back
    /// by a refund or a dispute: `refunded_cents`).
    pub state: &'static str,
    pub held_cents: i64,
    pub captured_cents: i64,
    pub released_cents: i64,
    pub refunded_cents: i64,
}

impl CallView {
    /// Where the call's money is.
    pub fn payment(&self) -> PaymentView {
        let call = self;
        let held = call.max_price_cents;
        let (state, captured) = match call.charged_cents {
            Some(0) => ("released", 0),
            Some(charged) if call.reversed_cents > 0 => ("refunded", charged),
            Some(charged) => ("captured", charged),
            None if call.status == "canceled" => ("released", 0),
            None => ("held", 0),
        };
        PaymentView {
            method: call.payment_method.clone(),
            state,
            held_cents: held,
            captured_cents: captured,
            released_cents: if state == "held" { 0 } else { held - captured },
            refunded_cents: call.reversed_cents,
        }
    }
}

/// A provider's usage on a call, as its owner sees it: what and how much, not what it cost us.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct UsageLine {
    /// `twilio`, `deepgram`, `cerebras`, `openai`, `elevenlabs`.
    pub service: String,
    pub operation: String,
    pub quantity: i64,
    pub unit: String,
    /// Counted by us rather than reported by the provider.
    pub estimated: bool,
}

/// The usage lines of call `id` of `user` (the ones a provider's bill replaced left out).
pub async fn usage_lines(
    pool: &PgPool,
    id: CallId,
    user: UserId,
) -> Result<Vec<UsageLine>, sqlx::Error> {
    sqlx::query_as(
        "SELECT service, operation, quantity, unit, estimated FROM rm_call_costs
          WHERE call_id = $1 AND user_id = $2 AND NOT superseded ORDER BY sequence",
    )
    .bind(id.uuid())
    .bind(user.uuid())
    .fetch_all(pool)
    .await
}

/// A user's scheduled (or cancelled scheduled) calls by time.
pub async fn scheduled(
    pool: &PgPool,
    user: UserId,
    cancelled: bool,
    ascending: bool,
) -> Result<Vec<CallView>, sqlx::Error> {
    let status = if cancelled { "canceled" } else { "scheduled" };
    let order = if ascending { "ASC" } else { "DESC" };
    sqlx::query_as(&format!(
        "SELECT {CALL_COLUMNS} FROM rm_calls
          WHERE user_id = $1 AND status = $2 AND scheduled_for IS NOT NULL
          ORDER BY scheduled_for {order}, id"
    ))
    .bind(user.uuid())
    .bind(status)
    .fetch_all(pool)
    .await
}

/// One month of a user's usage.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Month {
    pub month: String,
    pub calls: i64,
    pub minutes: i64,
    pub spent_cents: i64,
}

/// The user's completed calls by the month (UTC) they were made: the `months` months up to
/// the one of `now`, newest first, months without calls included.
pub async fn usage(
    pool: &PgPool,
    user: UserId,
    now: DateTime<Utc>,
    months: i64,
) -> Result<Vec<Month>, sqlx::Error> {
    sqlx::query_as(
        "WITH months AS (
             SELECT generate_series(date_trunc('month', $2::timestamptz) - make_interval(months => ($3 - 1)::int),
                                    date_trunc('month', $2::timestamptz), interval '1 month') AS m)
         SELECT to_char(m, 'YYYY-MM') AS month,
                count(c.id) AS calls,
                COALESCE(sum(c.billed_minutes), 0)::bigint AS minutes,
                COALESCE(sum(COALESCE(c.charged_cents, c.price_cents)), 0)::bigint AS spent_cents
           FROM months
           LEFT JOIN rm_calls c ON c.user_id = $1 AND c.status = 'completed'
                AND c.created_at >= m AND c.created_at < m + interval '1 month'
          GROUP BY m ORDER BY m DESC",
    )
    .bind(user.uuid())
    .bind(now)
    .bind(months)
    .fetch_all(pool)
    .await
}

/// Placed calls not yet ended whose last change is older than `quiet_since`, longest quiet
/// first, at most `limit`: (call id, Twilio's CallSid).
pub async fn unfinished(
    pool: &PgPool,
    quiet_since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(CallId, String)>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, call_sid FROM rm_calls
          WHERE status IN ('initiated', 'queued', 'ringing', 'in-progress')
            AND call_sid IS NOT NULL AND updated_at < $1
          ORDER BY updated_at LIMIT $2",
    )
    .bind(quiet_since)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, sid)| (CallId::from(id), sid))
        .collect())
}

/// An erased user's calls keep their money and times but no longer their destination, nor
/// the name of a persona of their own: those read as [`cmb_domain::privacy::ERASED`], as a
/// rebuild (the key destroyed) would write them. Returns the calls changed.
pub async fn forget_phones(pool: &PgPool, user: UserId) -> Result<u64, sqlx::Error> {
    let system = &cmb_domain::persona::system::SYSTEM_PERSONA_IDS[..];
    let done = sqlx::query(
        "UPDATE rm_calls
            SET phone = $2,
                persona_name = CASE WHEN persona_id = ANY($3) THEN persona_name ELSE $2 END
          WHERE user_id = $1
            AND (phone <> $2 OR (persona_id <> ALL($3) AND persona_name <> $2))",
    )
    .bind(user.uuid())
    .bind(cmb_domain::privacy::ERASED)
    .bind(system)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
