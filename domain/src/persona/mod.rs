//! Personas: the characters that call. System personas (Brad, Sarah, Alex) are owned by
//! `system` and read-only; users create their own.

mod aggregate;
mod command;
mod event;
mod rules;

pub use aggregate::{Persona, PersonaError};
pub use command::{PersonaCommand, PersonaDraft, PersonaPatch};
pub use event::PersonaEvent;
pub use rules::{parse_tags, Owner, PersonaLimits, TurnTaking, PERSONA_LIMITS};
