//! The Postgres connection: creates the database when it is missing and applies migrations.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{Connection, Postgres};

/// How long one of our connections may sit idle inside a transaction.
const IDLE_IN_TRANSACTION_MS: &str = "60000";

/// A pooled connection idle for longer than this is pinged before it is handed out; one used
/// more recently is handed out as it is.
const PING_AFTER_IDLE: Duration = Duration::from_secs(5);

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
    let mut options = url.parse::<PgConnectOptions>()?.options([(
        "idle_in_transaction_session_timeout",
        IDLE_IN_TRANSACTION_MS,
    )]);
    if plaintext_is_as_safe(url, options.get_host()) {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings every connection before handing it out: a round trip per acquire, a
        // tenth of serve's Postgres work at 500 calls. A connection in steady use is alive;
        // one idle for a while (the server or a proxy may have closed it) is still checked,
        // and a dead one is dropped for a fresh connection as before.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_AFTER_IDLE {
                    return Ok(true);
                }
                match conn.ping().await {
                    Ok(()) => Ok(true),
                    Err(error) => {
                        tracing::info!(%error, "an idle Postgres connection was dead; replaced");
                        Ok(false)
                    }
                }
            })
        })
        .connect_with(options)
        .await
}

/// Whether a connection may skip TLS: it goes to this host (loopback or a Unix socket), where
/// encryption protects nothing and costs Postgres and us a tenth of the work per statement,
/// and the operator asked for no TLS mode (`sslmode` in the URL or `PGSSLMODE`); any asked
/// mode is kept as asked.
fn plaintext_is_as_safe(url: &str, host: &str) -> bool {
    let asked = url.contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    !asked && is_this_host(host)
}

fn is_this_host(host: &str) -> bool {
    host == "localhost"
        || host.starts_with('/')
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Applies pending migrations (sqlx serialises concurrent runs with an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_host_without_an_asked_mode_goes_without_tls() {
        assert!(is_this_host("localhost"));
        assert!(is_this_host("127.0.0.1"));
        assert!(is_this_host("127.0.0.2"));
        assert!(is_this_host("::1"));
        assert!(is_this_host("[::1]"));
        assert!(is_this_host("/var/run/postgresql"));
        assert!(!is_this_host("db.internal"));
        assert!(!is_this_host("10.0.0.5"));
        assert!(!is_this_host("localhost.example.com"));
        if std::env::var_os("PGSSLMODE").is_none() {
            assert!(plaintext_is_as_safe(
                "postgres://u@127.0.0.1/db",
                "127.0.0.1"
            ));
        }
        assert!(!plaintext_is_as_safe(
            "postgres://u@127.0.0.1/db?sslmode=require",
            "127.0.0.1"
        ));
        assert!(!plaintext_is_as_safe(
            "postgres://u@db.internal/db",
            "db.internal"
        ));
    }
}
