//! Rebuild when a migration is added or changed: `sqlx::migrate!` (backbone::db::MIGRATOR)
//! embeds the migrations at compile time, and cargo does not watch that folder by itself, so
//! an incremental build after a new migration file would ship without it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
