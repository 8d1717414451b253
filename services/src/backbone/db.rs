//! The Postgres connection: creates the database when it is missing and applies migrations.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// How long one of our connections may sit idle inside a transaction.
const IDLE_IN_TRANSACTION_MS: &str = "60000";
use sqlx::Postgres;

/// The migrations in `migrations/`, compiled in.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Connects, creating the database first if it does not exist.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        // Two instances starting at once may both try: the loser's "already exists" is fine.
        if let Err(e) = Postgres::create_database(url).await {
            if !Postgres::database_exists(url).await? {
                return Err(e);
            }
        }
        tracing::info!("created the database");
    }
    // A transaction of ours left open (a stuck task, a bug) is ended by the server instead of
    // holding locks and vacuum back. Ours are all short; the longest, a projection swap, is
    // busy between its statements.
    let options = url.parse::<PgConnectOptions>()?.options([(
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_MS,
    )]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Applies pending migrations (sqlx serialises concurrent runs with an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
