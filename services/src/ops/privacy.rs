//! `callmeback privacy migrate`: the cut-over of events written in clear (by a build before
//! sealing, README "Privacy") to sealed ones. `callmeback privacy rewrap`: every data key
//! wrapped by the current master key ([`crate::backbone::keys::rewrap`]).
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
    /// Wrap every user's data key by DATA_KEYS_MASTER_KEY: those under the old master
    /// (DATA_KEYS_MASTER_KEY_OLD) and those stored in clear by a build before wrapping.
    /// Runs beside serving instances (given both keys); repeatable and resumable.
    Rewrap {
        /// Keys moved per transaction.
        #[arg(long, default_value_t = 500)]
        batch: i64,
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
    /// Of the sealed ones, what a call taught moved from its user's key to the call's.
    pub rekeyed: u64,
    /// Whether the stream was deleted for the next `serve` to republish.
    pub stream_deleted: bool,
    /// Dead letters whose copy of an event (`dead_letters.body`) was sealed (or erased) the
    /// same way.
    pub dead_letters_sealed: u64,
    /// Dead letters whose body is not an event at all (kept as it is, counted to be looked at).
    pub dead_letters_unreadable: u64,
}

/// Whether a personal field of `payload` is still in clear (neither sealed nor erased).
fn has_clear(aggregate_type: &str, event_type: &str, payload: &mut Value) -> bool {
    let mut clear = false;
    privacy::each_field(aggregate_type, event_type, payload, |field, v| {
        clear |= privacy::sealed(v).is_none() && *v != field.erased.value();
    });
    clear
}

/// Why `privacy migrate` or `privacy rewrap` stopped: nothing is half-written (each event
/// is updated in one statement, after its checks), so it can be run again.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    #[error(transparent)]
    Backbone(#[from] crate::backbone::ConnectError),
    #[error("the database")]
    Db(#[from] sqlx::Error),
    #[error("sealing or opening personal fields")]
    Keys(#[from] crate::backbone::keys::KeyError),
    #[error("an instance holds the publisher lease: stop every `callmeback serve` first (the stream is rebuilt from the store when anything is sealed)")]
    PublisherBusy,
    /// A sealed payload failed its check: nothing of it was written.
    #[error("{event}: {problem}")]
    Check {
        event: String,
        problem: &'static str,
    },
    #[error("writing a dead letter's body")]
    Body(#[from] serde_json::Error),
    #[error("deleting the stream")]
    Stream(#[source] async_nats::Error),
}

/// The owner a persona event recorded before events carried it (`PersonaUpdated`,
/// `KnowledgeDocumentAdded`), from the persona's `PersonaCreated`, added to `payload`; so
/// that its texts can be sealed under the owner's key. Other events are left as they are.
async fn add_owner(
    pool: &PgPool,
    (aggregate_type, aggregate_id, event_type): (&str, &str, &str),
    payload: &mut Value,
) -> Result<(), PrivacyError> {
    if aggregate_type != "persona"
        || !matches!(event_type, "PersonaUpdated" | "KnowledgeDocumentAdded")
    {
        return Ok(());
    }
    let Some(body) = payload.get_mut(event_type).and_then(Value::as_object_mut) else {
        return Ok(());
    };
    if body.contains_key("owner") {
        return Ok(());
    }
    let owner: Option<Value> = sqlx::query_scalar(
        "SELECT payload -> 'PersonaCreated' -> 'owner' FROM events
          WHERE aggregate_type = 'persona' AND aggregate_id = $1
            AND event_type = 'PersonaCreated'",
    )
    .bind(aggregate_id)
    .fetch_optional(pool)
    .await?
    .flatten();
    if let Some(owner) = owner {
        body.insert("owner".into(), owner);
    }
    Ok(())
}

/// Seals one stored payload; `None` when nothing in it was in clear. Checked as the module
/// says before it is returned.
async fn reseal(
    keys: &Keyring,
    (aggregate_type, aggregate_id, event_type): (&str, &str, &str),
    payload: &Value,
) -> Result<Option<(Value, bool)>, PrivacyError> {
    let mut original = payload.clone();
    let rekey = Keyring::needs_call_key(aggregate_type, event_type, &mut original);
    if !(rekey || has_clear(aggregate_type, event_type, &mut original))
        || privacy::subject(aggregate_type, aggregate_id, event_type, &original).is_none()
    {
        // Nothing in clear (or to move to its call's key), or nobody's (a system persona's).
        return Ok(None);
    }
    let mut sealed = original.clone();
    if rekey {
        // Opened under the user's key, to be sealed again under the call's.
        keys.open(aggregate_type, aggregate_id, event_type, &mut sealed)
            .await?;
    }
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
    let event = || format!("{aggregate_type}:{aggregate_id} {event_type}");
    if facts_before != facts_after {
        return Err(PrivacyError::Check {
            event: event(),
            problem: "sealing would change a fact",
        });
    }
    // Opened (owner not erased) it is the original; bring the already-sealed fields of a
    // half-migrated original to their clear form before comparing.
    if !erased {
        let mut expected = original;
        keys.open(aggregate_type, aggregate_id, event_type, &mut expected)
            .await?;
        if opened != expected {
            return Err(PrivacyError::Check {
                event: event(),
                problem: "the sealed payload does not open to the original",
            });
        }
    }
    Ok(Some((sealed, erased)))
}

/// Seals every clear personal field in `events` (see the module).
pub async fn seal_log(pool: &PgPool) -> Result<Migrated, PrivacyError> {
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
            let mut payload = payload;
            add_owner(pool, id, &mut payload).await?;
            let rekey = Keyring::needs_call_key(id.0, id.2, &mut payload);
            let Some((sealed, erased)) = reseal(&keys, id, &payload).await? else {
                continue;
            };
            report.rekeyed += u64::from(rekey && !erased);
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
    seal_dead_letters(pool, &keys, &mut report).await?;
    Ok(report)
}

/// Seals the copies of events kept in `dead_letters.body` (a message body, the envelope as
/// published) like those in `events`.
async fn seal_dead_letters(
    pool: &PgPool,
    keys: &Keyring,
    report: &mut Migrated,
) -> Result<(), PrivacyError> {
    let mut after = i64::MIN;
    loop {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT id, body FROM dead_letters WHERE id > $1 AND body IS NOT NULL
              ORDER BY id LIMIT 500",
        )
        .bind(after)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (id, body) in rows {
            let Ok(mut envelope) = serde_json::from_slice::<Value>(&body) else {
                report.dead_letters_unreadable += 1;
                continue;
            };
            let text = |k: &str| envelope.get(k).and_then(Value::as_str).map(str::to_string);
            let (Some(aggregate_type), Some(aggregate_id), Some(event_type)) = (
                text("aggregate_type"),
                text("aggregate_id"),
                text("event_type"),
            ) else {
                report.dead_letters_unreadable += 1;
                continue;
            };
            if !privacy::is_personal(&aggregate_type, &event_type) {
                continue;
            }
            let Some(payload) = envelope.get_mut("payload") else {
                report.dead_letters_unreadable += 1;
                continue;
            };
            let which = (
                aggregate_type.as_str(),
                aggregate_id.as_str(),
                event_type.as_str(),
            );
            add_owner(pool, which, payload).await?;
            let Some((sealed, _)) = reseal(keys, which, payload).await? else {
                continue;
            };
            *payload = sealed;
            sqlx::query("UPDATE dead_letters SET body = $2, updated_at = now() WHERE id = $1")
                .bind(id)
                .bind(serde_json::to_vec(&envelope)?)
                .execute(pool)
                .await?;
            report.dead_letters_sealed += 1;
        }
    }
    Ok(())
}

/// `callmeback privacy …`.
pub async fn run(config: Config, command: PrivacyCommand) -> Result<(), PrivacyError> {
    let keep_stream = match command {
        PrivacyCommand::Migrate { keep_stream } => keep_stream,
        PrivacyCommand::Rewrap { batch } => return rewrap(&config, batch).await,
    };
    let b = crate::backbone::connect(&config, 2).await?;
    let mut lease = Lease::new(
        PUBLISHER,
        format!("privacy-migrate-{}", config.instance_id),
        Duration::from_secs(600),
    );
    if !lease.ensure(&b.pool).await? {
        return Err(PrivacyError::PublisherBusy);
    }
    let result = async {
        let mut report = seal_log(&b.pool).await?;
        if report.sealed + report.erased > 0 && !keep_stream {
            b.js.delete_stream(&config.stream.stream)
                .await
                .map_err(|e| PrivacyError::Stream(e.into()))?;
            sqlx::query("DELETE FROM publisher_checkpoints")
                .execute(&b.pool)
                .await?;
            report.stream_deleted = true;
        }
        Ok::<_, PrivacyError>(report)
    }
    .await;
    lease.release(&b.pool).await;
    let report = result?;
    println!(
        "examined {} events with personal fields: {} sealed, {} erased (owner already erased)",
        report.examined, report.sealed, report.erased
    );
    println!(
        "of those sealed, {} moved from the user's key to their call's (what personas learned)",
        report.rekeyed
    );
    println!(
        "dead letters: {} copies of events sealed, {} bodies that are not events left as they are",
        report.dead_letters_sealed, report.dead_letters_unreadable
    );
    if report.stream_deleted {
        println!(
            "the stream was deleted: start one `callmeback serve`; its publisher republishes \
             the whole log, sealed, in commit order"
        );
    }
    Ok(())
}

async fn rewrap(config: &Config, batch: i64) -> Result<(), PrivacyError> {
    if config.data_keys_master_key.is_none() {
        tracing::warn!("DATA_KEYS_MASTER_KEY is not set: wrapping by the development master key");
    }
    let b = crate::backbone::connect(config, 2).await?;
    let masters = crate::backbone::keys::masters();
    let done = crate::backbone::keys::rewrap(&b.pool, &masters, batch.max(1)).await?;
    println!(
        "{} data keys rewrapped by the current master key, {} already under it",
        done.rewrapped, done.already
    );
    Ok(())
}
