//! Who is on the call and how the persona behaves: loaded once when the stream starts, from the
//! call and persona aggregates, the user's customisation, and what the persona remembers.

use std::time::Duration;

use cmb_domain::call::Call;
use cmb_domain::persona::preference::{preference_id, Preference};
use cmb_domain::persona::Persona;
use cmb_domain::pricing::PriceTable;
use cmb_domain::{CallId, PersonaId, UserId};

use super::error::SessionError;
use super::shared::Voice;

/// Who is on the call and how the persona behaves.
pub(super) struct Context {
    pub(super) call_id: CallId,
    pub(super) call_sid: String,
    pub(super) user_id: UserId,
    pub(super) prices: PriceTable,
    pub(super) max_minutes: u32,
    pub(super) voice_id: String,
    pub(super) system_prompt: String,
    pub(super) greeting: String,
    /// The greeting that follows up on an open item (synthesised per call).
    pub(super) follow_up: Option<String>,
    /// Remembered facts not already in the prompt, with their local vectors, for each turn.
    pub(super) recall: Vec<(String, Vec<f32>)>,
    /// The persona's knowledge passages, for each turn.
    pub(super) knowledge: Option<super::knowledge::CallKnowledge>,
    pub(super) endpointing_ms: u32,
    pub(super) silence_reminder: Duration,
    pub(super) silence_hangup: Duration,
}

pub(super) async fn load_context(
    voice: &Voice,
    call_id: CallId,
    call_sid: &str,
) -> Result<Context, SessionError> {
    let (call, _) = voice.store.load::<Call>(&call_id.to_string()).await?;
    let user_id = call
        .user_id
        .ok_or_else(|| SessionError::NoCall(call_id.to_string()))?;
    let persona_id = call
        .persona_id
        .clone()
        .ok_or_else(|| SessionError::NoPersona(call_id.to_string()))?;
    let (persona, _) = voice.store.load::<Persona>(&persona_id).await?;
    let (pref, _) = voice
        .store
        .load::<Preference>(&preference_id(user_id, &persona_id))
        .await?;
    let custom = pref.customization.unwrap_or_default();
    let mut system_prompt = format!(
        "{}\n\nYou are on a phone call. Speak naturally in short sentences, one or two at a time; \
         no lists, no markdown, no emoji.",
        persona.system_prompt
    );
    if let Some(extra) = custom.custom_prompt {
        system_prompt.push_str(&format!(
            "\n\nThe caller asked you to keep in mind: {extra}"
        ));
    }
    let (follow_up, recall) = if custom.memory_enabled {
        let memory = load_memory(voice, user_id.into(), &persona_id.as_str().into()).await?;
        if let Some(section) = &memory.section {
            system_prompt.push_str("\n\n");
            system_prompt.push_str(section);
        }
        let follow_up = memory.open_items.last().map(|item| {
            format!(
                "{} Last time you mentioned {}. How did it go?",
                persona.greeting.trim_end(),
                item.trim_end_matches('.')
            )
        });
        (follow_up, memory.recall)
    } else {
        (None, Vec::new())
    };
    let knowledge = super::knowledge::load(voice, &persona_id, &persona).await?;
    let tt = persona.turn_taking;
    Ok(Context {
        call_id,
        call_sid: call_sid.to_string(),
        user_id: user_id.into(),
        prices: call.prices.unwrap_or(PriceTable::LAUNCH),
        max_minutes: call.max_minutes.max(1),
        voice_id: custom.voice_override.unwrap_or(persona.voice_id),
        system_prompt,
        greeting: persona.greeting,
        follow_up,
        recall,
        knowledge,
        endpointing_ms: tt.endpointing_ms,
        silence_reminder: Duration::from_millis(tt.silence_reminder_ms as u64),
        silence_hangup: Duration::from_millis(tt.silence_hangup_ms as u64),
    })
}

struct LoadedMemory {
    section: Option<String>,
    open_items: Vec<String>,
    recall: Vec<(String, Vec<f32>)>,
}

/// What this persona remembers of this user, from the read models: the prompt's memory section
/// (within the token budget) and the facts left out of it, with vectors for per-turn recall.
async fn load_memory(
    voice: &Voice,
    user_id: UserId,
    persona_id: &PersonaId,
) -> Result<LoadedMemory, SessionError> {
    let cmb_projections::memory::ForPrompt {
        summary,
        open_items,
        facts,
    } = cmb_projections::memory::for_prompt(voice.store.pool(), user_id, persona_id).await?;
    let section = cmb_domain::memory::prompt::memory_section(
        summary.as_deref(),
        &open_items,
        &facts,
        voice.memory_prompt_tokens,
    );
    let carried = section.as_ref().map(|(_, c)| c.clone()).unwrap_or_default();
    // Ranked per turn with the local hashed vectors: microseconds, no network call.
    let recall = facts
        .into_iter()
        .filter(|(id, _)| !carried.contains(id))
        .map(|(_, text)| {
            let v = cmb_domain::memory::embed::embed(&text);
            (text, v)
        })
        .collect();
    Ok(LoadedMemory {
        section: section.map(|(s, _)| s),
        open_items,
        recall,
    })
}
