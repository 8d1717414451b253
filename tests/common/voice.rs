//! The given of a voice test: the app with the simulated telephone network (a phone that
//! rings 100 ms, a call Twilio keeps up so long, a scripted caller), a user with 100 credits,
//! and their persona (its greeting and turn-taking, memory on or off). The test then asks for
//! the call (`request_call`) and checks what the session did.

use callmeback::app::Running;
use serde_json::{json, Value};

use super::{grant, Api, TestEnv, PASSWORD};

/// A voice test's running set-up: stop it with `app.stop()` and `env.cleanup()`.
pub struct Voice {
    pub env: TestEnv,
    pub app: Running,
    pub user: Api,
    pub persona_id: String,
}

/// What [`voice`] starts, set by its methods.
pub struct VoiceSetup {
    env: TestEnv,
    greeting: String,
    turn_taking: Value,
    memory: bool,
}

/// Given a call Twilio keeps up for `call_seconds`, the caller's turns as the Twilio simulator
/// takes them (`SIM_TWILIO_CALLER_TURNS`: `speak_ms:quiet_ms,…`), and by default a persona
/// greeting "Hi." that ends a turn after 300 ms of silence, reminds after 20 s and hangs up
/// after 40 s, with memory on.
pub fn voice(call_seconds: u32, caller_turns: &str) -> VoiceSetup {
    VoiceSetup {
        env: TestEnv::new()
            .set("SIM_TWILIO_RING_MS", "100")
            .set("SIM_TWILIO_CALL_SECONDS", &call_seconds.to_string())
            .set("SIM_TWILIO_CALLER_TURNS", caller_turns),
        greeting: "Hi.".into(),
        turn_taking: turn_taking(300, 20_000, 40_000),
        memory: true,
    }
}

/// The persona's turn-taking (milliseconds): end of a turn, silence reminder, silence hang-up.
pub fn turn_taking(endpointing: u32, reminder: u32, hangup: u32) -> Value {
    json!({ "endpointing_ms": endpointing, "silence_reminder_ms": reminder, "silence_hangup_ms": hangup })
}

impl VoiceSetup {
    /// A setting of the app or its simulators (`SIM_DEEPGRAM_SCRIPT`, …).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.env = self.env.set(key, value);
        self
    }

    pub fn greeting(mut self, greeting: &str) -> Self {
        self.greeting = greeting.into();
        self
    }

    /// See [`turn_taking`].
    pub fn turn_taking(mut self, endpointing: u32, reminder: u32, hangup: u32) -> Self {
        self.turn_taking = turn_taking(endpointing, reminder, hangup);
        self
    }

    /// The persona's memory off for the user, so no extraction request follows a call and the
    /// LLM simulators' counts are the call's replies alone.
    pub fn memory_off(mut self) -> Self {
        self.memory = false;
        self
    }

    /// Starts the app, registers the user, grants them 100 credits and creates the persona.
    pub async fn start(self) -> Voice {
        let app = self.env.spawn_app().await;
        let api = Api::new(app.addr);
        let (user, profile) = api.register(PASSWORD).await;
        grant(&app, &profile, 100).await;
        let persona_id = persona(&user, &self.greeting, self.turn_taking).await;
        if !self.memory {
            memory_off(&user, &persona_id).await;
        }
        Voice {
            env: self.env,
            app,
            user,
            persona_id,
        }
    }
}

/// A persona with `greeting` and `turn_taking`, owned by `user`: its id.
async fn persona(user: &Api, greeting: &str, turn_taking: Value) -> String {
    let reply = user
        .post(
            "/api/personas",
            json!({
                "name": "Test Buddy",
                "description": "A persona for voice tests.",
                "voice": "21m00Tcm4TlvDq8ikWAM",
                "system_prompt": "You are a test buddy. Answer in one short sentence.",
                "greeting": greeting,
                "turn_taking": turn_taking,
            }),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body["persona"]["id"].as_str().unwrap().to_string()
}

async fn memory_off(user: &Api, persona_id: &str) {
    let off = user
        .put(
            &format!("/api/personas/{persona_id}/customization"),
            json!({ "memory_enabled": false }),
        )
        .await;
    assert_eq!(off.status, 200, "{off:?}");
}
