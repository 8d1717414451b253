//! The answers that carry the signed-in user: shared by password sign-in (`api::accounts`)
//! and WorkOS sign-in (`api::workos`).

use chrono::{DateTime, Utc};
use cmb_domain::user::User;
use cmb_domain::wallet::Wallet;
use cmb_domain::UserId;
use cmb_projections::accounts::UserView;
use serde::Serialize;
use utoipa::ToSchema;

use crate::serve::http::auth;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::state::AppState;

/// The user right after a command of theirs committed: from the read model, or, when it has
/// not caught up in time, from the `user` and `wallet` aggregates (never an error for a
/// command that went through).
pub async fn user_after_write(
    state: &AppState,
    id: UserId,
    signed_in: Option<DateTime<Utc>>,
    caught_up: bool,
) -> ApiResult<UserView> {
    if caught_up {
        match cmb_projections::accounts::user_view(&state.pool, id).await {
            Ok(Some(view)) => return Ok(view),
            Ok(None) => {}
            Err(e) => tracing::warn!(user = %id, error = %e, "reading the user back"),
        }
    }
    let (user, _) = state.store.load::<User>(&id.to_string()).await?;
    if !user.registered {
        return Err(ApiError::unauthorized("no such account"));
    }
    metrics::counter!("cmb_answered_before_read_model_total", "resource" => "user").increment(1);
    let (wallet, _) = state.store.load::<Wallet>(&id.to_string()).await?;
    let since = user.registered_at.unwrap_or_else(|| state.clock.now());
    let mut methods = Vec::new();
    if user.has_password() {
        methods.push("password".to_string());
    }
    if user.workos_user_id.is_some() {
        methods.push("workos".to_string());
    }
    Ok(UserView {
        id,
        name: user.name,
        email: user
            .email
            .map(|e| e.as_str().to_string())
            .unwrap_or_default(),
        phone: user.phone.map(|p| p.as_str().to_string()),
        email_verified: user.email_verified,
        phone_verified: false,
        sign_in_methods: methods,
        credits: wallet.balance,
        last_sign_in: signed_in,
        created_at: since,
        updated_at: signed_in.unwrap_or(since),
    })
}

/// A signed-in user and their token.
#[derive(Serialize, ToSchema)]
pub struct TokenAnswer {
    pub user: UserView,
    /// Send as `Authorization: Bearer <token>`.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl TokenAnswer {
    pub fn new(user: UserView, token: String, claims: &auth::Claims) -> TokenAnswer {
        TokenAnswer {
            user,
            token,
            expires_at: claims.expires_at(),
        }
    }
}
