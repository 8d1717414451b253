//! Personas: the characters that call. System personas (Brad, Sarah, Alex) are owned by
//! `system` and read-only; users create their own, and customise any they can see.

mod aggregate;
mod command;
mod event;
pub mod preference;
mod rules;
pub mod system;

pub use aggregate::{Persona, PersonaError};
pub use command::{parse_voice_id, PersonaCommand, PersonaDraft, PersonaPatch};
pub use event::PersonaEvent;
pub use rules::{parse_tags, Owner, PersonaLimits, TurnTaking, PERSONA_LIMITS};
