//! `callmeback privacy migrate`: the cut-over of events written in clear (by a build before
//! sealing, README "Privacy") to sealed ones.
//!
//! Events are facts and stay the same facts: same aggregate, sequence, type, version, time and
//! every non-personal field. Only the personal fields the domain lists
//! ([`cmb_domain::privacy`]) change form, sealed under their owner's key in place (or
//! written `[erased]` for a user already erased). Each rewritten payload is checked before
//! it is written: opened again it is the original, and with its personal fields blanked it
//! equals the original blanked (so no money or cost fact can change). It is repeatable: a
//! sealed field is left as it is.
//!
//! The stream's messages cannot be edited, so when anything was sealed the stream is rebuilt
//! from the store, as for an unrepairable loss: the stream and the publisher's checkpoint are
//! deleted, and the next `serve` republishes the whole log, sealed, in commit order (its
//! durable consumers start over: projections find every event applied, workers find every
//! command carried out). That needs every instance stopped: the migration refuses while the
//! publisher lease is held, and holds it while it works.

use std::time::Duration;

use clap::Subcommand;
use cmb_domain::privacy;
use serde_json::Value;
use sqlx::PgPool;

use crate::backbone::keys::Keyring;
use crate::backbone::lease::Lease;
use crate::backbone::outbox::PUBLISHER;
use crate::config::Config;

#[derive(Subcommand)]
pub enum PrivacyCommand {
    /// Seal the personal fields of events written in clear, then (when any was) delete the
    /// stream and the publisher's checkpoint so the next `serve` republishes the log sealed.
    /// Every instance must be stopped.
    Migrate {
        /// Seal in Postgres only; leave the stream (and its clear copies) alone.
        #[arg(long)]
        keep_stream: bool,
    },
}

/// What a migration did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Events of the types with personal fields, read.
    pub examined: u64,
    /// Of those, rewritten with their clear fields sealed.
    pub sealed: u64,
    /// Of those, rewritten `[erased]` (their owner was erased before the migration).
    pub erased: u64,
    /// Whether the stream was deleted for the next `serve` to republish.
    pub stream_deleted: bool,
}

/// Whether a personal field of `payload` is still in clear (neither sealed nor erased).
fn has_clear(aggregate_type: &str, event_type: &str, payload: &mut Value) -> bool {
    let mut clear = false;
    privacy::each_field(aggregate_type, event_type, payload, |field, v| {
        clear |= privacy::sealed(v).is_none() && *v != field.erased.value();
    });
    clear
}

/// Seals one stored payload; `None` when nothing in it was in clear. Checked as the module
/// says before it is returned.
async fn reseal(
    keys: &Keyring,
    (aggregate_type, aggregate_id, event_type): (&str, &str, &str),
    payload: &Value,
) -> anyhow::Result<Option<(Value, bool)>> {
    let mut original = payload.clone();
    if !has_clear(aggregate_type, event_type, &mut original) {
        return Ok(None);
    }
    let mut sealed = original.clone();
    keys.seal(aggregate_type, aggregate_id, event_type, &mut sealed)
        .await?;
    let erased = !privacy::has_sealed(aggregate_type, event_type, &mut sealed);
    let mut opened = sealed.clone();
    keys.open(aggregate_type, aggregate_id, event_type, &mut opened)
        .await?;
    let mut facts_before = original.clone();
    privacy::erase(aggregate_type, event_type, &mut facts_before);
    let mut facts_after = sealed.clone();
    privacy::erase(aggregate_type, event_type, &mut facts_after);
    anyhow::ensure!(
        facts_before == facts_after,
        "{aggregate_type}:{aggregate_id} {event_type}: sealing would change a fact"
    );
    // Opened (owner not erased) it is the original; bring the already-sealed fields of a
    // half-migrated original to their clear form before comparing.
    if !erased {
        let mut expected = original;
        keys.open(aggregate_type, aggregate_id, event_type, &mut expected)
            .await?;
        anyhow::ensure!(
            opened == expected,
            "{aggregate_type}:{aggregate_id} {event_type}: the sealed payload does not open to the original"
        );
    }
    Ok(Some((sealed, erased)))
}

/// Seals every clear personal field in `events` (see the module).
pub async fn seal_log(pool: &PgPool) -> anyhow::Result<Migrated> {
    let keys = Keyring::new(pool.clone());
    let mut report = Migrated::default();
    let types: Vec<String> = privacy::personal_events()
        .map(|(a, e)| format!("{a}/{e}"))
        .collect();
    let mut after = i64::MIN;
    loop {
        let rows: Vec<(i64, String, String, i64, String, Value)> = sqlx::query_as(
            "SELECT global_position, aggregate_type, aggregate_id, sequence, event_type, payload
               FROM events
              WHERE global_position > $1 AND aggregate_type || '/' || event_type = ANY($2)
              ORDER BY global_position LIMIT 1000",
        )
        .bind(after)
        .bind(&types)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (_, aggregate_type, aggregate_id, sequence, event_type, payload) in rows {
            report.examined += 1;
            let id = (
                aggregate_type.as_str(),
                aggregate_id.as_str(),
                event_type.as_str(),
            );
            let Some((sealed, erased)) = reseal(&keys, id, &payload).await? else {
                continue;
            };
            sqlx::query(
                "UPDATE events SET payload = $4
                  WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
            )
            .bind(&aggregate_type)
            .bind(&aggregate_id)
            .bind(sequence)
            .bind(&sealed)
            .execute(pool)
            .await?;
            if erased {
                report.erased += 1;
            } else {
                report.sealed += 1;
            }
        }
    }
    Ok(report)
}

/// `callmeback privacy …`.
pub async fn run(config: Config, command: PrivacyCommand) -> anyhow::Result<()> {
    let PrivacyCommand::Migrate { keep_stream } = command;
    let b = crate::backbone::connect(&config, 2).await?;
    let mut lease = Lease::new(
        PUBLISHER,
        format!("privacy-migrate-{}", config.instance_id),
        Duration::from_secs(600),
    );
    if !lease.ensure(&b.pool).await? {
        anyhow::bail!(
            "an instance holds the publisher lease: stop every `callmeback serve` first \
             (the stream is rebuilt from the store when anything is sealed)"
        );
    }
    let result = async {
        let mut report = seal_log(&b.pool).await?;
        if report.sealed + report.erased > 0 && !keep_stream {
            b.js.delete_stream(&config.stream.stream)
                .await
                .map_err(|e| anyhow::anyhow!("deleting the stream: {e}"))?;
            sqlx::query("DELETE FROM publisher_checkpoints")
                .execute(&b.pool)
                .await?;
            report.stream_deleted = true;
        }
        anyhow::Ok(report)
    }
    .await;
    lease.release(&b.pool).await;
    let report = result?;
    println!(
        "examined {} events with personal fields: {} sealed, {} erased (owner already erased)",
        report.examined, report.sealed, report.erased
    );
    if report.stream_deleted {
        println!(
            "the stream was deleted: start one `callmeback serve`; its publisher republishes \
             the whole log, sealed, in commit order"
        );
    }
    Ok(())
}
