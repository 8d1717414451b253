//! `callmeback seed`: the system personas and a demo account with 100 credits, idempotently.

use cmb_domain::values::{Email, Password, PhoneNumber};
use cmb_domain::wallet::{Wallet, WalletCommand};
use cmb_domain::{Actor, CommandContext};
use uuid::Uuid;

use crate::backbone::store::EventStore;

pub const DEMO_EMAIL: &str = "demo@callmeback.app";
pub const DEMO_PASSWORD: &str = "CallMeBack!2026";
pub const DEMO_PHONE: &str = "+15555550100";
pub const DEMO_CREDITS: i64 = 100;

pub struct Demo {
    pub user_id: Uuid,
    pub email: String,
    pub credits: i64,
}

pub async fn demo(store: &EventStore) -> anyhow::Result<Demo> {
    crate::usecases::personas::define_system_personas(store).await?;
    crate::usecases::knowledge::define_system_libraries(store).await?;
    let email = Email::parse(DEMO_EMAIL)?;
    let pool = store.pool();
    let user_id = match crate::usecases::accounts::claims::user_by_email(pool, &email).await? {
        Some(id) => id,
        None => {
            let id = Uuid::now_v7();
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
            .await
            .map_err(|e| anyhow::anyhow!("creating the demo user: {e}"))?;
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
        .await
        .map_err(|e| anyhow::anyhow!("granting the demo credits: {e}"))?;
    let (wallet, _) = store
        .load::<Wallet>(&user_id.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Demo {
        user_id,
        email: email.to_string(),
        credits: wallet.balance,
    })
}
