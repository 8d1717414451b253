//! What can end a voice session early: the call or persona could not be loaded, the stream
//! broke, a record could not be written. Each keeps its cause.

use cmb_domain::call::CallError;
use cmb_domain::persona::preference::PreferenceError;
use cmb_domain::persona::PersonaError;

use crate::backbone::store::CommandError;
use crate::usecases::budget;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("loading the call: {0}")]
    Call(#[from] CommandError<CallError>),
    #[error("loading the persona: {0}")]
    Persona(#[from] CommandError<PersonaError>),
    #[error("loading the customisation: {0}")]
    Preference(#[from] CommandError<PreferenceError>),
    #[error("no call {0}")]
    NoCall(String),
    #[error("call {0} has no persona")]
    NoPersona(String),
    #[error("not a call id: {0}")]
    CallId(#[from] uuid::Error),
    #[error("the media stream: {0}")]
    Stream(#[from] axum::Error),
    #[error("the budget: {0}")]
    Budget(#[from] budget::ReadError),
    #[error("media stream refused: {0}")]
    Refused(super::tokens::Refusal),
    #[error("reading or recording: {0}")]
    Db(#[from] sqlx::Error),
    #[error("indexing the persona's knowledge: {0}")]
    Knowledge(String),
}
