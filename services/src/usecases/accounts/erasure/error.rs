//! Why a clean-up step of an erasure failed (the erasure is finished later).

use cmb_providers::stripe::StripeError;

use crate::backbone::store::CommandError;

/// A clean-up step that failed; the erasure is finished later.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{0}")]
    Db(#[from] sqlx::Error),
    /// A command of the clean-up refused or failed (its error as it is).
    #[error(transparent)]
    Command(Box<dyn std::error::Error + Send + Sync>),
    #[error("deleting the Stripe customer: {0}")]
    Stripe(#[from] StripeError),
}

impl<E: std::error::Error + Send + Sync + 'static> From<CommandError<E>> for StepError {
    fn from(e: CommandError<E>) -> Self {
        StepError::Command(Box::new(e))
    }
}

impl From<crate::backbone::keys::KeyError> for StepError {
    fn from(e: crate::backbone::keys::KeyError) -> Self {
        StepError::Db(e.into())
    }
}
