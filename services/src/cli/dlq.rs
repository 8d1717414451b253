//! `callmeback dlq …`: the dead letters (`backbone::deadletter`) listed and put back.

use std::process::ExitCode;

use sqlx::PgPool;

use crate::backbone::deadletter::{list, mark_retry};

/// `callmeback dlq …`
#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// The events set aside and why (open ones; `--all` with those resolved since).
    List {
        #[arg(long)]
        all: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put set-aside events back: running instances handle them again, in stream order, within
    /// a few seconds (what fails again is set aside again).
    Retry {
        /// Letter ids (from `list`); none means every parked letter.
        ids: Vec<i64>,
        /// Only this consumer's (`projection:calls`, `worker:dialer`, …).
        #[arg(long)]
        consumer: Option<String>,
    },
}

/// Runs a `dlq` command.
pub async fn run(pool: &PgPool, command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List { all, json } => {
            let letters = list(pool, all).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                println!(
                    "{:>6}  {:<24} {:>8}  {:<40} {:>4}  {:<8}  error",
                    "id", "consumer", "stream", "event", "tries", "status"
                );
                for l in &letters {
                    let event = format!(
                        "{}:{}:{} {}",
                        l.aggregate_type.as_deref().unwrap_or("?"),
                        l.aggregate_id.as_deref().unwrap_or("?"),
                        l.sequence.unwrap_or_default(),
                        l.event_type.as_deref().unwrap_or("")
                    );
                    println!(
                        "{:>6}  {:<24} {:>8}  {:<40} {:>4}  {:<8}  {}",
                        l.id, l.consumer, l.stream_sequence, event, l.deliveries, l.status, l.error
                    );
                }
                println!("{} letter(s)", letters.len());
            }
        }
        DlqCommand::Retry { ids, consumer } => {
            let n = mark_retry(pool, &ids, consumer.as_deref()).await?;
            println!(
                "{n} letter(s) marked for retry; running instances handle them within a few \
                 seconds (`callmeback dlq list` shows what is left)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
