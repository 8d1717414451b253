//! Confirming it is really the account's owner before a sensitive change (email, phone, a
//! card, buying credits): a recent sign-in, or the password again.

use chrono::{DateTime, Duration, Utc};
use cmb_domain::user::User;
use cmb_domain::UserId;

use super::{password, Error};
use crate::backbone::store::EventStore;

/// How recent a sign-in must be for a sensitive change without the password.
pub const FRESH_MINUTES: i64 = 15;

/// Whether a token issued at `issued_at` (unix seconds) is a fresh enough sign-in at `now`.
pub fn fresh(issued_at: i64, now: DateTime<Utc>) -> bool {
    let age = now.timestamp() - issued_at;
    (0..Duration::minutes(FRESH_MINUTES).num_seconds()).contains(&age)
}

/// Checks `given` against the user's password: [`Error::WrongPassword`] when it is not, and
/// [`Error::NoPassword`] for an account without one (it can only sign in again).
pub async fn confirm_password(
    store: &EventStore,
    user: UserId,
    given: String,
) -> Result<(), Error> {
    let (account, _) = store.load::<User>(&user.to_string()).await?;
    if !account.registered {
        return Err(Error::NoAccount);
    }
    if account.password_hash.is_empty() {
        return Err(Error::NoPassword);
    }
    if !password::verify(given, Some(account.password_hash.clone()))
        .await
        .map_err(password::HashError::from)?
    {
        return Err(Error::WrongPassword);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sign_in_is_fresh_for_fifteen_minutes() {
        let now = Utc::now();
        let ago = |m: i64| (now - Duration::minutes(m)).timestamp();
        assert!(fresh(ago(0), now));
        assert!(fresh(ago(14), now));
        assert!(!fresh(ago(15), now));
        assert!(!fresh(ago(60 * 24), now));
        // Issued in the future (a skewed clock elsewhere): not trusted as fresh.
        assert!(!fresh(ago(-5), now));
    }
}
