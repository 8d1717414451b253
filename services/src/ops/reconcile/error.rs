//! What can fail in a reconcile, each failure with its cause kept (`#[source]`): reading the
//! event store or the stream, the store's binary `COPY` cut or malformed, a reader task lost;
//! and a provider's bill that does not read.

/// A reconcile (or a read of the log for one) that could not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the event store")]
    Database(#[from] sqlx::Error),
    #[error("connecting to NATS")]
    Connect(#[from] async_nats::ConnectError),
    #[error("reading the stream")]
    Stream(#[from] cmb_nats::replay::ReplayError),
    #[error("reading the stream's last sequence")]
    LastSequence(#[source] async_nats::Error),
    #[error("the event store's COPY")]
    Copy(#[from] CopyError),
    #[error("a snapshot id {0:?}")]
    SnapshotId(String),
    #[error("a call fact whose call id is not UTF-8")]
    CallId,
    #[error("a reader of the log stopped")]
    Reader(#[from] tokio::task::JoinError),
}

/// Postgres's binary `COPY` output not as the reconcile reads it.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("COPY: not the binary format")]
    NotBinary,
    #[error("COPY: {count} fields, expected {expected}")]
    Fields { count: i16, expected: usize },
    #[error("COPY: data after the trailer")]
    AfterTrailer,
    #[error("COPY: cut short")]
    CutShort,
}

/// A provider's bill (see [`super::billed::read_billed`]) that does not read.
#[derive(Debug, thiserror::Error)]
pub enum BilledError {
    #[error("{file}: unreadable")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: unreadable header")]
    Header {
        file: String,
        #[source]
        source: csv::Error,
    },
    #[error("{file}: expected a header `provider,call_id,usage_date,quantity,unit,billed_usd` or Twilio's export (Sid, Duration, Price)")]
    Columns { file: String },
    #[error("{file}: an unreadable row")]
    Row {
        file: String,
        #[source]
        source: csv::Error,
    },
    #[error("{file} line {line}: {column} {value:?} is not a decimal")]
    Amount {
        file: String,
        line: u64,
        column: &'static str,
        value: String,
    },
}
