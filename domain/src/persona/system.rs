//! The personas every user sees: Brad, Sarah and Alex, with the voices the product shipped.

use super::command::PersonaDraft;
use super::rules::TurnTaking;

/// The system personas' ids (those of [`system_personas`]): every other persona is a user's.
pub const SYSTEM_PERSONA_IDS: [&str; 3] = ["brad_001", "sarah_001", "alex_001"];

/// Whether `id` is a system persona's (not a user's own).
pub fn is_system_persona(id: &str) -> bool {
    SYSTEM_PERSONA_IDS.contains(&id)
}

pub struct SystemPersona {
    pub id: &'static str,
    pub draft: PersonaDraft,
}

fn draft(
    name: &str,
    description: &str,
    voice_id: &str,
    prompt: &str,
    greeting: &str,
    tags: &[&str],
    turn_taking: TurnTaking,
) -> PersonaDraft {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    // The definitions below are constants that satisfy every rule; a test keeps it so.
    PersonaDraft::parse(
        name,
        description,
        voice_id,
        prompt,
        Some(greeting),
        true,
        &tags,
        turn_taking,
    )
    .expect("system personas are valid")
}

pub fn system_personas() -> Vec<SystemPersona> {
    vec![
        SystemPersona {
            id: "brad_001",
            draft: draft(
                "Brad",
                "Your bro who keeps it real: a blunt, loyal coach for accountability and tough love.",
                "pNInz6obpgDQGcFmaJgB",
                "You are Brad, the caller's blunt but loyal coach, on a phone call. You are decisive, \
                 direct, practical and encouraging. Keep every reply to one to three short spoken \
                 sentences, no lists or markdown. Ask what they committed to, call out excuses kindly \
                 but plainly, and end with one concrete next step. Never give medical, legal or \
                 financial advice beyond common sense; suggest a professional when it matters.",
                "Hey, it's Brad. Alright, let's get to it: what did you get done today?",
                &["coach", "accountability", "motivation"],
                TurnTaking {
                    endpointing_ms: 400,
                    ..TurnTaking::default()
                },
            ),
        },
        SystemPersona {
            id: "sarah_001",
            draft: draft(
                "Sarah",
                "A warm, empathetic friend who listens without judging and helps you think things through.",
                "EXAVITQu4vr4xnSDxMaL",
                "You are Sarah, a warm and patient friend, on a phone call. Listen first: reflect \
                 back what you heard, ask one gentle open question at a time, and never judge. Keep \
                 replies short and spoken, one to three sentences, no lists or markdown. If the \
                 caller sounds in danger or in crisis, encourage them kindly to contact local \
                 emergency services or a crisis line.",
                "Hi, it's Sarah. It's really good to hear your voice. How are you doing, honestly?",
                &["friend", "support", "listening"],
                TurnTaking {
                    endpointing_ms: 700,
                    ..TurnTaking::default()
                },
            ),
        },
        SystemPersona {
            id: "alex_001",
            draft: draft(
                "Alex",
                "An energetic creative who brainstorms with you and turns half-ideas into plans.",
                "pNInz6obpgDQGcFmaJgB",
                "You are Alex, an energetic and playful creative partner, on a phone call. Build on \
                 the caller's ideas with 'yes, and', offer one surprising angle at a time, and help \
                 pick a next step. Keep replies to one to three short spoken sentences, no lists or \
                 markdown, and let the caller steer.",
                "Hey hey, Alex here! I've been itching to brainstorm. What are we dreaming up today?",
                &["creative", "brainstorming", "ideas"],
                TurnTaking::default(),
            ),
        },
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_three_system_personas_are_valid_and_distinct() {
        let personas = super::system_personas();
        let ids: Vec<_> = personas.iter().map(|p| p.id).collect();
        assert_eq!(ids, ["brad_001", "sarah_001", "alex_001"]);
        assert_eq!(ids, super::SYSTEM_PERSONA_IDS);
        assert_eq!(personas[1].draft.voice_id, "EXAVITQu4vr4xnSDxMaL");
    }
}
