//! The analysts' MCP server: Model Context Protocol tools over the event log, served on stdio
//! (`callmeback mcp`) and as streamable HTTP at `/mcp` on `serve` (behind an analyst token,
//! `serve::http::mcp`). Built on `rmcp`, the maintained Rust SDK: it speaks the protocol
//! (initialize, tools/list, tools/call, input and output schemas); this module says what the
//! tools are. Every tool reads; none writes (`--record` stays a CLI flag).
//!
//! - `log`: where the events are read (Postgres or JetStream, as `replay --source`);
//! - `answers`: ranges, paging, `reconcile` and `compare_bill`;
//! - `figures`: `costs` and `unit_economics`;
//! - `story`: `call_timeline` and `events`.

pub mod answers;
pub mod figures;
pub mod log;
pub mod story;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::{Json, Parameters};
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler};
use schemars::JsonSchema;
use serde::Deserialize;

use answers::{Paging, ToolError};
use log::Log;

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CallTimelineInput {
    /// The call's id (a UUID, as in `reconcile` rows or the API's `/api/calls/{id}`).
    pub call_id: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    #[default]
    Call,
    User,
    Provider,
    Day,
    Anomaly,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReconcileInput {
    /// Calls requested from this date (YYYY-MM-DD, UTC) or ISO 8601 time, inclusive.
    pub from: Option<String>,
    /// Up to this time, exclusive; a date includes its whole day.
    pub to: Option<String>,
    /// Rows per call (default), user, provider, day, or the anomalies found.
    #[serde(default)]
    pub group_by: GroupBy,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Rows per page, 1–1000 (default 100).
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareBillInput {
    /// The bill as CSV text: the generic `provider,call_id,usage_date,quantity,unit,billed_usd`
    /// (call_id: our call id or the provider's reference, e.g. Twilio's CallSid) or Twilio's
    /// call-records export (columns Sid, Duration, Price).
    pub csv_text: String,
    /// Differences larger than this many cents are listed (default 1).
    #[schemars(range(min = 0))]
    pub threshold_cents: Option<i64>,
    pub cursor: Option<String>,
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CostsBy {
    #[default]
    Provider,
    Day,
    User,
    Persona,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CostsInput {
    /// Calls requested from this date or time, inclusive.
    pub from: Option<String>,
    /// Up to this time, exclusive; a date includes its whole day.
    pub to: Option<String>,
    /// Group by provider (default), day, user or persona.
    #[serde(default)]
    pub by: CostsBy,
    pub cursor: Option<String>,
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitEconomicsInput {
    /// Calls requested from this date or time, inclusive.
    pub from: Option<String>,
    /// Up to this time, exclusive; a date includes its whole day.
    pub to: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsFilter {
    /// Only this call's events.
    pub call_id: Option<String>,
    /// Only this user's events: their own aggregates, their calls, what they did.
    pub user_id: Option<String>,
    /// Only this aggregate type: call, wallet, user, persona, memory, stripe_event, …
    #[serde(rename = "type")]
    pub aggregate_type: Option<String>,
    /// Only events of this type: CallRequested, CallSettled, CostRecorded, CreditsGranted, …
    pub event_type: Option<String>,
    /// Recorded from this date or time, inclusive.
    pub from: Option<String>,
    /// Recorded before this time; a date includes its whole day.
    pub to: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventsInput {
    #[serde(default)]
    pub filter: EventsFilter,
    /// Events per page, 1–1000 (default 100).
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn uuid_field(field: &str, raw: Option<String>) -> Result<Option<uuid::Uuid>, ToolError> {
    raw.map(|r| {
        uuid::Uuid::parse_str(r.trim())
            .map_err(|_| ToolError(format!("{field}: expected a UUID, got {r:?}")))
    })
    .transpose()
}

/// The tools, over one event log.
#[derive(Clone)]
pub struct AnalystTools {
    log: Log,
    tool_router: ToolRouter<Self>,
}

fn answer<T>(result: Result<T, ToolError>) -> Result<Json<T>, String> {
    result.map(Json).map_err(|e| e.0)
}

#[tool_router]
impl AnalystTools {
    pub fn new(log: Log) -> Self {
        AnalystTools {
            log,
            tool_router: Self::tool_router(),
        }
    }

    /// A call's story: every event with who caused it, how long each step took from the
    /// request (dial, placed, ringing, answered, ended, settled), the voice turns' latencies,
    /// every cost line and the cost per provider, the payment (hold, price, charge, release,
    /// refund, revenue, margin) and what reconcile finds wrong with it.
    #[tool(annotations(
        title = "Call timeline",
        read_only_hint = true,
        open_world_hint = false
    ))]
    async fn call_timeline(
        &self,
        Parameters(input): Parameters<CallTimelineInput>,
    ) -> Result<Json<story::Timeline>, String> {
        answer(story::call_timeline(&self.log, &input.call_id).await)
    }

    /// The reconcile report (as `callmeback replay reconcile`) of the calls requested in a
    /// range: revenue (captured minus refunded), provider cost and margin in cents, rows per
    /// call, user, provider or day, or the anomalies (a charge that differs from the price, a
    /// hold never settled, a capture without a completed call, costs without a call, a refund
    /// that pays for no call). Totals cover the whole range; rows come a page at a time.
    #[tool(annotations(title = "Reconcile", read_only_hint = true, open_world_hint = false))]
    async fn reconcile(
        &self,
        Parameters(input): Parameters<ReconcileInput>,
    ) -> Result<Json<answers::ReconcileAnswer>, String> {
        let group_by = match input.group_by {
            GroupBy::Call => "call",
            GroupBy::User => "user",
            GroupBy::Provider => "provider",
            GroupBy::Day => "day",
            GroupBy::Anomaly => "anomaly",
        };
        answer(
            async {
                let paging = Paging::new(input.cursor.as_deref(), input.limit)?;
                answers::reconcile(
                    &self.log,
                    input.from.as_deref(),
                    input.to.as_deref(),
                    group_by,
                    paging,
                )
                .await
            }
            .await,
        )
    }

    /// A provider's bill compared with our figures for every call (as `replay reconcile
    /// --billed FILE --threshold N`): every call × provider off by more than the threshold,
    /// calls missing from the bill, billed rows matching no call, and the total difference.
    /// Nothing is recorded.
    #[tool(annotations(
        title = "Compare a bill",
        read_only_hint = true,
        open_world_hint = false
    ))]
    async fn compare_bill(
        &self,
        Parameters(input): Parameters<CompareBillInput>,
    ) -> Result<Json<answers::CompareAnswer>, String> {
        answer(
            async {
                let paging = Paging::new(input.cursor.as_deref(), input.limit)?;
                answers::compare_bill(
                    &self.log,
                    &input.csv_text,
                    input.threshold_cents.unwrap_or(1),
                    paging,
                )
                .await
            }
            .await,
        )
    }

    /// What the calls requested in a range cost us, in cents, grouped by provider (with
    /// usage that belongs to no call), day, user or persona; with revenue and margin except
    /// by provider.
    #[tool(annotations(title = "Costs", read_only_hint = true, open_world_hint = false))]
    async fn costs(
        &self,
        Parameters(input): Parameters<CostsInput>,
    ) -> Result<Json<figures::CostsAnswer>, String> {
        let by = match input.by {
            CostsBy::Provider => "provider",
            CostsBy::Day => "day",
            CostsBy::User => "user",
            CostsBy::Persona => "persona",
        };
        answer(
            async {
                let paging = Paging::new(input.cursor.as_deref(), input.limit)?;
                figures::costs(
                    &self.log,
                    input.from.as_deref(),
                    input.to.as_deref(),
                    by,
                    paging,
                )
                .await
            }
            .await,
        )
    }

    /// Unit economics of the calls requested in a range: conversation minutes (answered
    /// time), revenue, cost and margin per conversation minute, margin percent, and each
    /// provider's cost per conversation minute and share of the cost.
    #[tool(annotations(
        title = "Unit economics",
        read_only_hint = true,
        open_world_hint = false
    ))]
    async fn unit_economics(
        &self,
        Parameters(input): Parameters<UnitEconomicsInput>,
    ) -> Result<Json<figures::UnitEconomics>, String> {
        answer(figures::unit_economics(&self.log, input.from.as_deref(), input.to.as_deref()).await)
    }

    /// Raw events (as on the stream: aggregate, sequence, type, time, payload, metadata) of a
    /// call, a user or an aggregate type, optionally in a time range, in log order, a page at
    /// a time (as `callmeback replay events --call/--user/--type`).
    #[tool(annotations(title = "Events", read_only_hint = true, open_world_hint = false))]
    async fn events(
        &self,
        Parameters(input): Parameters<EventsInput>,
    ) -> Result<Json<story::EventsAnswer>, String> {
        answer(
            async {
                let f = input.filter;
                let filter = crate::ops::reconcile::Filter {
                    aggregate_type: f.aggregate_type,
                    user: uuid_field("filter.user_id", f.user_id)?,
                    call: uuid_field("filter.call_id", f.call_id)?,
                };
                let paging = Paging::new(input.cursor.as_deref(), input.limit)?;
                story::events(
                    &self.log,
                    filter,
                    f.event_type,
                    f.from.as_deref(),
                    f.to.as_deref(),
                    paging,
                )
                .await
            }
            .await,
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for AnalystTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            "Call Me Back's event log for analysts (read only). Money is integer cents; \
             ranges take dates (YYYY-MM-DD, UTC; `to` includes its day) or ISO 8601 times and \
             select calls by when they were requested. Large results come in pages: pass \
             `next_cursor` back as `cursor`.",
        )
    }
}

/// Why the stdio MCP session ended other than by the client closing it.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("starting the MCP session")]
    Start(#[source] Box<rmcp::service::ServerInitializeError>),
    #[error("the MCP session")]
    Session(#[from] tokio::task::JoinError),
}

/// Serves the tools on stdin/stdout until the client closes them.
pub async fn serve_stdio(log: Log) -> Result<(), StdioError> {
    use rmcp::ServiceExt as _;
    let running = AnalystTools::new(log)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| StdioError::Start(Box::new(e)))?;
    running.waiting().await?;
    Ok(())
}
