//! `callmeback seed`: the system personas and a demo account with 100 credits, idempotently.

use cmb_domain::values::{Email, Password, PhoneNumber};
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use cmb_domain::{Actor, CommandContext, UserId};
use uuid::Uuid;

use crate::backbone::store::{CommandError, EventStore};

pub const DEMO_EMAIL: &str = "demo@callmeback.app";
pub const DEMO_PASSWORD: &str = "CallMeBack!2026";
pub const DEMO_PHONE: &str = "+15555550100";
pub const DEMO_CREDITS: i64 = 100;

pub struct Demo {
    pub user_id: UserId,
    pub email: String,
    pub credits: i64,
}

/// Why seeding stopped (it is repeatable: run it again).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("defining the system personas")]
    SystemPersonas(#[from] crate::usecases::personas::SystemError),
    #[error("defining the system personas' knowledge")]
    SystemLibraries(#[from] CommandError<cmb_domain::persona::PersonaError>),
    #[error("the demo account's details")]
    Invalid(#[from] cmb_domain::values::Invalid),
    #[error("looking the demo user up")]
    Lookup(#[from] sqlx::Error),
    #[error("creating the demo user")]
    Create(#[from] crate::usecases::accounts::Error),
    #[error("granting the demo credits")]
    Grant(#[from] CommandError<WalletError>),
}

pub async fn demo(store: &EventStore) -> Result<Demo, SeedError> {
    crate::usecases::personas::define_system_personas(store).await?;
    crate::usecases::knowledge::define_system_libraries(store).await?;
    let email = Email::parse(DEMO_EMAIL)?;
    let pool = store.pool();
    let user_id = match crate::usecases::accounts::claims::user_by_email(pool, &email).await? {
        Some(id) => id,
        None => {
            let id = UserId::generate();
            let ctx = CommandContext::system("seed");
            crate::usecases::accounts::create(
                store,
                id,
                "Demo User".into(),
                &email,
                &PhoneNumber::parse("phone", DEMO_PHONE)?,
                &Password::parse(DEMO_PASSWORD)?,
                &ctx,
            )
            .await?;
            id
        }
    };
    let ctx = CommandContext::for_request(Uuid::new_v4().to_string(), Actor::System);
    let grant = WalletCommand::Grant {
        credits: DEMO_CREDITS,
        reason: "demo account".into(),
        reference: "seed:demo".into(),
    };
    store
        .execute::<Wallet>(&user_id.to_string(), grant, &ctx)
        .await?;
    let (wallet, _) = store.load::<Wallet>(&user_id.to_string()).await?;
    Ok(Demo {
        user_id,
        email: email.to_string(),
        credits: wallet.balance,
    })
}
