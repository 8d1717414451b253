//! Every failure below the handlers, mapped once to what the client reads: a status, a code,
//! a message and maybe a field. Handlers use `?`; a new error type gets its `From` here.

use axum::http::StatusCode;
use cmb_domain::billing::{BillingError, StripeEventError};
use cmb_domain::budget::BudgetError;
use cmb_domain::call::CallError;
use cmb_domain::contacts::{ContactsError, MAX_CONTACTS};
use cmb_domain::memory::MemoryError;
use cmb_domain::persona::preference::PreferenceError;
use cmb_domain::persona::PersonaError;
use cmb_domain::pricing::PricingError;
use cmb_domain::user::{UserError, LOCKOUT_MINUTES};
use cmb_domain::wallet::WalletError;
use cmb_providers::stripe::StripeError;

use crate::backbone::store::CommandError;
use crate::serve::http::error::ApiError;
use crate::usecases::calls::dials::DialRefusal;
use crate::usecases::calls::request::RequestError;
use crate::usecases::calls::schedule::ScheduleError;
use crate::usecases::personas::names::NameError;
use crate::usecases::{accounts, billing, budget, contacts, knowledge, memory, personas};

/// A store failure is ours (500); contention and overload are worth a retry (503); a rejection says what
/// the aggregate refused.
impl<E: std::error::Error + Into<ApiError>> From<CommandError<E>> for ApiError {
    fn from(e: CommandError<E>) -> Self {
        match e {
            CommandError::Rejected(e) => e.into(),
            CommandError::Contended(what) => ApiError {
                retry_after: Some(1),
                ..ApiError::unavailable(format!("the {what} is busy; try again"))
            },
            CommandError::Busy(detail) => ApiError::busy(detail),
            CommandError::Store(e) => ApiError::internal(crate::telemetry::Causes(&e)),
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound => ApiError::not_found("call"),
            CallError::NotOwner => ApiError::forbidden("this call is someone else's"),
            CallError::TooLate(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "too_late", e.to_string())
            }
            CallError::NotScheduled => {
                ApiError::new(StatusCode::BAD_REQUEST, "not_scheduled", e.to_string())
            }
            other => ApiError::conflict("call_conflict", other.to_string()),
        }
    }
}

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::UnknownCard => ApiError::not_found("payment method"),
            BillingError::DefaultCard => ApiError::new(
                StatusCode::BAD_REQUEST,
                "default_payment_method",
                e.to_string(),
            ),
            BillingError::UnknownAuthorization => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_intent_invalid",
                e.to_string(),
            )
            .with_field("payment_intent_id"),
            BillingError::AuthorizationUsed | BillingError::AuthorizationTooSmall { .. } => {
                ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "payment_intent_insufficient",
                    e.to_string(),
                )
                .with_field("payment_intent_id")
            }
        }
    }
}

impl From<PersonaError> for ApiError {
    fn from(e: PersonaError) -> Self {
        match e {
            PersonaError::NotFound => ApiError::not_found("persona"),
            PersonaError::SystemPersona => ApiError::forbidden("system personas are read-only"),
            PersonaError::NotOwner { visible: true } => {
                ApiError::forbidden("this persona belongs to someone else")
            }
            PersonaError::NotOwner { visible: false } => ApiError::not_found("persona"),
            PersonaError::AlreadyExists => ApiError::conflict("persona_exists", e.to_string()),
            PersonaError::TooManyDocuments { .. } => {
                ApiError::conflict("too_many_documents", e.to_string())
            }
            PersonaError::DuplicateDocument { .. } => {
                ApiError::conflict("duplicate_document", e.to_string())
            }
            PersonaError::DocumentNotFound => ApiError::not_found("document"),
        }
    }
}

impl From<ContactsError> for ApiError {
    fn from(e: ContactsError) -> Self {
        match e {
            ContactsError::AlreadyAdded => ApiError::new(
                StatusCode::BAD_REQUEST,
                "already_a_contact",
                "this persona is already in your contacts",
            )
            .with_field("persona_id"),
            ContactsError::Full => ApiError::new(
                StatusCode::BAD_REQUEST,
                "contacts_full",
                format!("you can keep at most {MAX_CONTACTS} contacts; remove one first"),
            ),
            ContactsError::NotAContact => ApiError::not_found("contact"),
        }
    }
}

impl From<MemoryError> for ApiError {
    fn from(e: MemoryError) -> Self {
        match e {
            MemoryError::NoSuchItem => ApiError::not_found("memory item"),
        }
    }
}

/// A user command refused where the handler expected none: the account is not usable.
impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        match e {
            UserError::Locked { until } => locked(until),
            other => ApiError::internal(other),
        }
    }
}

/// Refusals no request can cause (the handler checked first): ours.
macro_rules! internal {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                ApiError::internal(e)
            }
        }
    )*};
}
internal!(PricingError, PreferenceError);

/// A wallet refusal the handler did not check for: only debt is the user's to fix.
impl From<WalletError> for ApiError {
    fn from(e: WalletError) -> Self {
        match e {
            WalletError::InDebt { .. } => debt(e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

/// Credits owed after a refunded or disputed purchase: no new call until paid.
pub fn debt(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYMENT_REQUIRED, "debt_outstanding", message)
}

/// Aggregates that refuse nothing.
macro_rules! never {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                match e {}
            }
        }
    )*};
}
never!(BudgetError, StripeEventError);

impl From<StripeError> for ApiError {
    fn from(e: StripeError) -> Self {
        match e {
            StripeError::Card(card) => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "card_declined",
                format!(
                    "the card was declined: {}",
                    card.decline_code.as_deref().unwrap_or(&card.code)
                ),
            ),
            StripeError::InvalidRequest {
                status, message, ..
            } if status == 404 || status == 400 => {
                ApiError::validation("payment_method_id", message)
            }
            StripeError::InvalidRequest { message, .. } => ApiError::internal(message),
            StripeError::Unreachable(detail) => {
                tracing::warn!(%detail, "Stripe unreachable");
                ApiError {
                    retry_after: Some(5),
                    ..ApiError::unavailable("payments are unavailable for a moment; try again")
                }
            }
        }
    }
}

/// Too many failed sign-ins.
pub fn locked(until: chrono::DateTime<chrono::Utc>) -> ApiError {
    let secs = (until - chrono::Utc::now()).num_seconds().max(1) as u64;
    ApiError::too_many(
        "account_locked",
        format!(
            "too many failed sign-ins: the account is locked for {LOCKOUT_MINUTES} minutes; try again in {secs} s"
        ),
        secs,
    )
}

impl From<accounts::claims::ClaimError> for ApiError {
    fn from(e: accounts::claims::ClaimError) -> Self {
        use accounts::claims::ClaimError;
        match e {
            ClaimError::EmailTaken => {
                ApiError::conflict("email_taken", e.to_string()).with_field("email")
            }
            ClaimError::PhoneTaken => {
                ApiError::conflict("phone_taken", e.to_string()).with_field("phone")
            }
            ClaimError::WorkosTaken => ApiError::conflict("workos_linked_elsewhere", e.to_string()),
            ClaimError::Db(e) => e.into(),
        }
    }
}

impl From<accounts::password::Busy> for ApiError {
    fn from(e: accounts::password::Busy) -> Self {
        ApiError {
            retry_after: Some(e.retry_after_secs),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", e.to_string())
        }
    }
}

impl From<accounts::Error> for ApiError {
    fn from(e: accounts::Error) -> Self {
        use accounts::Error;
        match e {
            Error::Claim(e) => e.into(),
            Error::Hash(accounts::password::HashError::Busy(busy)) => busy.into(),
            Error::Hash(e) => ApiError::internal(e),
            Error::AlreadyRegistered(e) => match e {
                CommandError::Rejected(e) => {
                    ApiError::conflict("already_registered", e.to_string())
                }
                other => other.into(),
            },
            Error::InvalidCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "invalid email or password",
            ),
            Error::Locked(until) => locked(until),
            Error::NoAccount => ApiError::unauthorized("no such account"),
            Error::WrongPassword => ApiError::new(
                StatusCode::FORBIDDEN,
                "wrong_password",
                "the current password is wrong",
            )
            .with_field("current_password"),
            Error::NoPassword => ApiError::new(
                StatusCode::BAD_REQUEST,
                "no_password",
                "this account has no password yet: set one with a reset link",
            )
            .with_field("current_password"),
            Error::Store(e) => e.into(),
            Error::Db(e) => e.into(),
        }
    }
}

impl From<accounts::recovery::ResetError> for ApiError {
    fn from(e: accounts::recovery::ResetError) -> Self {
        use accounts::recovery::ResetError;
        match e {
            ResetError::InvalidToken => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_reset_token",
                e.to_string(),
            )
            .with_field("token"),
            ResetError::Accounts(e) => e.into(),
        }
    }
}

impl From<billing::Error> for ApiError {
    fn from(e: billing::Error) -> Self {
        use billing::Error;
        match e {
            Error::Rejected(e) => e.into(),
            Error::Stripe(e) => e.into(),
            Error::NoPaymentMethod => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "no_payment_method",
                e.to_string(),
            ),
            Error::NotAuthorised(_) | Error::NotPaid(_) => {
                ApiError::new(StatusCode::PAYMENT_REQUIRED, "card_declined", e.to_string())
            }
            Error::User(e) => e.into(),
            Error::Wallet(e) => e.into(),
            Error::Call(e) => e.into(),
            Error::Db(e) => e.into(),
        }
    }
}

impl From<budget::ReadError> for ApiError {
    fn from(e: budget::ReadError) -> Self {
        match e {
            budget::ReadError::Store(e) => e.into(),
            budget::ReadError::Spend(e) => e.into(),
        }
    }
}

impl From<budget::CheckError> for ApiError {
    fn from(e: budget::CheckError) -> Self {
        match e {
            budget::CheckError::Exceeded { ref breach, .. } => {
                let field = breach.limit;
                ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "budget_exceeded",
                    e.to_string(),
                )
                .with_field(field)
            }
            budget::CheckError::Read(e) => e.into(),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::LimitReached => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "persona_limit_reached",
                e.to_string(),
            ),
            NameError::Taken => ApiError::conflict("name_taken", e.to_string()).with_field("name"),
            NameError::Db(e) => e.into(),
        }
    }
}

impl From<personas::Error> for ApiError {
    fn from(e: personas::Error) -> Self {
        use personas::Error;
        match e {
            Error::Invalid(e) => e.into(),
            Error::Rejected(e) => e.into(),
            Error::Name(e) => e.into(),
            Error::UnknownVoice { field, .. } => ApiError::validation(field, e.to_string()),
            Error::VoiceUnchecked(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::unavailable(e.to_string())
            },
            Error::Scheduled(_) => ApiError::conflict("persona_scheduled", e.to_string()),
            Error::Preference(e) => e.into(),
            Error::Db(e) => e.into(),
        }
    }
}

impl From<contacts::Error> for ApiError {
    fn from(e: contacts::Error) -> Self {
        match e {
            contacts::Error::Persona(e) => e.into(),
            contacts::Error::Rejected(e) => e.into(),
        }
    }
}

impl From<knowledge::Error> for ApiError {
    fn from(e: knowledge::Error) -> Self {
        match e {
            knowledge::Error::Invalid(e) => e.into(),
            knowledge::Error::Persona(e) => e.into(),
            knowledge::Error::Rejected(e) => e.into(),
            knowledge::Error::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            )
            .with_field("file"),
            knowledge::Error::Db(e) => e.into(),
        }
    }
}

impl From<memory::Error> for ApiError {
    fn from(e: memory::Error) -> Self {
        match e {
            memory::Error::Persona(e) => e.into(),
            memory::Error::Rejected(e) => e.into(),
            memory::Error::ReadModel(e) => e.into(),
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Invalid(e) => e.into(),
            RequestError::NoAccount => ApiError::unauthorized(e.to_string()),
            RequestError::Persona(e) => e.into(),
            RequestError::Budget(e) => e.into(),
            RequestError::UnknownIntent => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_intent_invalid",
                e.to_string(),
            )
            .with_field("payment_intent_id"),
            RequestError::IntentTooSmall { .. } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_intent_insufficient",
                e.to_string(),
            )
            .with_field("payment_intent_id"),
            RequestError::Stripe(e) => e.into(),
            RequestError::CallInProgress => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "call_in_progress",
                e.to_string(),
            ),
            RequestError::InDebt { .. } => debt(e.to_string()),
            RequestError::Refused(refused) => refused.into(),
            RequestError::InsufficientCredits { .. } => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_credits",
                e.to_string(),
            ),
            RequestError::Wallet(e) => e.into(),
            RequestError::Billing(e) => e.into(),
            RequestError::Call(e) => e.into(),
            RequestError::User(e) => e.into(),
            RequestError::Prices(e) => e.into(),
            RequestError::Claim(e) => e.into(),
        }
    }
}

impl From<DialRefusal> for ApiError {
    fn from(e: DialRefusal) -> Self {
        let message = e.to_string();
        match e {
            DialRefusal::Destination(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "destination_not_allowed", message)
                    .with_field("phone_number")
            }
            DialRefusal::NumberDaily {
                retry_after_secs, ..
            } => ApiError::too_many("number_daily_limit", message, retry_after_secs),
            DialRefusal::UserDaily {
                retry_after_secs, ..
            } => ApiError::too_many("daily_call_limit", message, retry_after_secs),
        }
    }
}

impl From<ScheduleError> for ApiError {
    fn from(e: ScheduleError) -> Self {
        match e {
            ScheduleError::Invalid(e) => e.into(),
            ScheduleError::TooMany => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_scheduled",
                e.to_string(),
            ),
            ScheduleError::Request(e) => e.into(),
            ScheduleError::Db(e) => e.into(),
        }
    }
}

impl From<accounts::workos::SignInError> for ApiError {
    fn from(e: accounts::workos::SignInError) -> Self {
        use accounts::workos::SignInError;
        let message = e.to_string();
        match e {
            SignInError::BadState => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_state", message).with_field("state")
            }
            SignInError::InvalidCode(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_code", message).with_field("code")
            }
            SignInError::UnverifiedEmail => ApiError::conflict("email_unverified", message),
            SignInError::OtherWorkosUser => ApiError::conflict("workos_linked_elsewhere", message),
            SignInError::BadEmail(_) | SignInError::Refused(_) => {
                tracing::error!(error = %message, "WorkOS sign-in");
                ApiError::new(StatusCode::BAD_GATEWAY, "workos_refused", message)
            }
            SignInError::Unavailable(_) => {
                tracing::warn!(error = %message, "WorkOS sign-in");
                ApiError::unavailable("WorkOS is unavailable for a moment; try again")
            }
            SignInError::Claim(e) => e.into(),
            SignInError::Store(e) => e.into(),
            SignInError::Db(e) => e.into(),
        }
    }
}
