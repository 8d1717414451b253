//! Personas: who may see one, create, edit, delete, each user's customisation, and the system
//! personas (with the launch prices) every instance brings to their shipped definitions.

pub mod names;

use cmb_domain::persona::preference::{preference_id, Customization, Customize, Preference};
use cmb_domain::persona::{
    Owner, Persona, PersonaCommand, PersonaDraft, PersonaError, PersonaPatch,
};
use cmb_domain::pricing::{PriceTable, Pricing, PricingCommand, PRICING_ID};
use cmb_domain::values::Invalid;
use cmb_domain::{CommandContext, PersonaId, UserId};
use cmb_providers::elevenlabs::ElevenLabs;

use crate::backbone::store::{CommandError, Committed, EventStore};
use names::NameError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Rejected(#[from] CommandError<PersonaError>),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{field}: ElevenLabs has no voice {voice_id}")]
    UnknownVoice {
        field: &'static str,
        voice_id: String,
    },
    #[error("the voice could not be checked with ElevenLabs; try again")]
    VoiceUnchecked(#[source] cmb_providers::ProviderError),
    #[error("this persona has {0} scheduled call(s) to come; cancel them first")]
    Scheduled(i64),
    #[error(transparent)]
    Preference(#[from] CommandError<cmb_domain::persona::preference::PreferenceError>),
    #[error("personas: {0}")]
    Db(#[from] sqlx::Error),
}

impl Error {
    fn rejected(e: PersonaError) -> Self {
        Error::Rejected(CommandError::Rejected(e))
    }
}

/// The persona, if it exists and `user` may see it: public, system, or theirs. From the event
/// store, so a persona deleted a moment ago is already gone.
pub async fn accessible(
    store: &EventStore,
    id: &PersonaId,
    user: UserId,
) -> Result<Persona, Error> {
    let (persona, _) = store.load::<Persona>(id.as_str()).await?;
    let visible = persona.exists()
        && (persona.is_public
            || matches!(persona.owner, Some(Owner::System))
            || persona.owner == Some(Owner::User(user)));
    if visible {
        Ok(persona)
    } else {
        Err(Error::rejected(PersonaError::NotFound))
    }
}

/// The persona, if `user` may change it (owner, not system).
pub async fn owned(store: &EventStore, id: &PersonaId, user: UserId) -> Result<Persona, Error> {
    let (persona, _) = store.load::<Persona>(id.as_str()).await?;
    match persona.owner {
        _ if !persona.exists() => Err(Error::rejected(PersonaError::NotFound)),
        Some(Owner::System) => Err(Error::rejected(PersonaError::SystemPersona)),
        Some(Owner::User(owner)) if owner == user => Ok(persona),
        _ => Err(Error::rejected(PersonaError::NotOwner {
            visible: persona.is_public,
        })),
    }
}

/// Asks ElevenLabs whether the voice exists.
async fn check_voice(
    elevenlabs: &ElevenLabs,
    field: &'static str,
    voice_id: &str,
) -> Result<(), Error> {
    match elevenlabs.voice(voice_id).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::UnknownVoice {
            field,
            voice_id: voice_id.to_string(),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "voice check failed");
            Err(Error::VoiceUnchecked(e))
        }
    }
}

/// Creates `user`'s persona from `draft`; returns its id.
pub async fn create(
    store: &EventStore,
    elevenlabs: &ElevenLabs,
    user: UserId,
    draft: PersonaDraft,
    ctx: &CommandContext,
) -> Result<(PersonaId, Committed), Error> {
    check_voice(elevenlabs, "voice", &draft.voice_id).await?;
    // A user's persona is named by a UUID (v7: ordered by creation time).
    let id = PersonaId::new(uuid::Uuid::now_v7().to_string());
    names::claim(store.pool(), user, &id, &draft.name).await?;
    let name = draft.name.clone();
    let command = PersonaCommand::Create {
        owner: Owner::User(user),
        draft,
    };
    match store.execute::<Persona>(id.as_str(), command, ctx).await {
        Ok(c) => Ok((id, c)),
        Err(e) => {
            names::release(store.pool(), user, &name, &id).await;
            Err(e.into())
        }
    }
}

/// Changes `user`'s persona `id` by `patch` (parsed by `patch`, after the ownership check, so
/// a stranger learns nothing from a validation error).
pub async fn update(
    store: &EventStore,
    elevenlabs: &ElevenLabs,
    user: UserId,
    id: &PersonaId,
    patch: impl FnOnce() -> Result<PersonaPatch, Invalid>,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    let current = owned(store, id, user).await?;
    let patch = patch()?;
    if let Some(voice) = patch.voice_id.as_deref().filter(|v| *v != current.voice_id) {
        check_voice(elevenlabs, "voice", voice).await?;
    }
    let renamed = patch
        .name
        .clone()
        .filter(|n| n.to_lowercase() != current.name.to_lowercase());
    if let Some(name) = &renamed {
        names::rename(store.pool(), user, id, name).await?;
    }
    let command = PersonaCommand::Update { by: user, patch };
    let result = store.execute::<Persona>(id.as_str(), command, ctx).await;
    if renamed.is_some() && result.is_err() {
        // Put the claim back under the name the persona still has.
        if let Err(e) = names::rename(store.pool(), user, id, &current.name).await {
            tracing::error!(persona = %id, error = %e, "could not restore a persona name claim");
        }
    }
    Ok(result?)
}

/// Deletes `user`'s persona `id`, unless anyone's scheduled call with it is still to come.
pub async fn remove(
    store: &EventStore,
    user: UserId,
    id: &PersonaId,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    let current = owned(store, id, user).await?;
    let scheduled = crate::usecases::calls::ledger::waiting_with_persona(store.pool(), id).await?;
    if scheduled > 0 {
        return Err(Error::Scheduled(scheduled));
    }
    let command = PersonaCommand::Delete { by: user };
    let committed = store.execute::<Persona>(id.as_str(), command, ctx).await?;
    names::release(store.pool(), user, &current.name, id).await;
    Ok(committed)
}

/// A customisation change; `None` keeps a value, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct CustomizationChange {
    pub custom_prompt: Option<Option<String>>,
    pub voice_override: Option<Option<String>>,
    pub favorite: Option<bool>,
    pub memory_enabled: Option<bool>,
}

/// Changes `user`'s customisation of persona `id` (one they can see; `change` is parsed after
/// that check).
pub async fn customize(
    store: &EventStore,
    elevenlabs: &ElevenLabs,
    user: UserId,
    id: &PersonaId,
    change: impl FnOnce() -> Result<CustomizationChange, Invalid>,
    ctx: &CommandContext,
) -> Result<Committed, Error> {
    accessible(store, id, user).await?;
    let aggregate_id = preference_id(user.uuid(), id.as_str());
    let (current, _) = store.load::<Preference>(&aggregate_id).await?;
    let change = change()?;
    let mut next: Customization = current.customization.unwrap_or_default();
    if let Some(prompt) = change.custom_prompt {
        next.custom_prompt = prompt;
    }
    if let Some(voice) = change.voice_override {
        if let Some(voice) = &voice {
            check_voice(elevenlabs, "voice_override", voice).await?;
        }
        next.voice_override = voice;
    }
    if let Some(favorite) = change.favorite {
        next.favorite = favorite;
    }
    if let Some(memory) = change.memory_enabled {
        next.memory_enabled = memory;
    }
    let command = Customize {
        user_id: user.uuid(),
        persona_id: id.to_string(),
        customization: next,
    };
    Ok(store
        .execute::<Preference>(&aggregate_id, command, ctx)
        .await?)
}

/// Brings Brad, Sarah and Alex to their shipped definitions, and publishes the launch prices
/// if none were (idempotent; safe from any number of instances at once).
pub async fn define_system_personas(store: &EventStore) -> Result<Vec<Committed>, SystemError> {
    let ctx = CommandContext::system("define-system-personas");
    let mut committed = Vec::new();
    // The launch prices, as the first version of the price table.
    let (pricing, _) = store
        .load::<Pricing>(PRICING_ID)
        .await
        .map_err(SystemError::Prices)?;
    if pricing.tables.is_empty() {
        let launch = PricingCommand::Publish {
            table: PriceTable::LAUNCH,
            effective_from: chrono::DateTime::UNIX_EPOCH,
        };
        store
            .execute::<Pricing>(PRICING_ID, launch, &ctx)
            .await
            .map_err(SystemError::Prices)?;
    }
    for p in cmb_domain::persona::system::system_personas() {
        let c = store
            .execute::<Persona>(
                p.id,
                PersonaCommand::DefineSystemPersona { draft: p.draft },
                &ctx,
            )
            .await
            .map_err(|e| SystemError::Persona(p.id, e))?;
        committed.push(c);
    }
    Ok(committed)
}

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("publishing the launch prices: {0}")]
    Prices(CommandError<cmb_domain::pricing::PricingError>),
    #[error("defining system persona {0}: {1}")]
    Persona(&'static str, CommandError<PersonaError>),
}
