//! The voice session: one Twilio media stream, from `start` to `stop`.
//!
//! Caller audio goes to speech-to-text; a finished caller turn goes, with the persona's prompt,
//! the user's customisation and the conversation so far, to the LLM (fallback on error or a
//! late first token); the reply streams sentence by sentence into text-to-speech, whose audio
//! the outbound writer paces back to Twilio with marks. The caller can barge in: `clear`,
//! the reply's tasks are cancelled, late audio is dropped by turn id, and the conversation keeps
//! only what the caller heard (from the marks Twilio echoed). Silence gets a reminder, then a
//! goodbye; the paid duration and the budget are hard caps. Every turn's timings, the costs and
//! the transcript are recorded when the session ends.
//!
//! `start` takes a stream from the upgrade to its session; `tokens` are the stream tokens;
//! `admission` decides who may have a session (the token's one use, the call's state, one
//! live session per call); `guard` ends it from outside its loop (the call ended, the paid
//! duration, a silent socket); `session` holds a stream's state and loop; `context` loads who is on the call; `turns`,
//! `reply` and `text` make the conversation; `limits` ends it; `record` writes it down;
//! `outbound` paces audio back to Twilio; `shared` is what every session of the instance uses;
//! `knowledge` adds the persona's documents to each reply.

mod admission;
mod context;
mod error;
mod guard;
mod indexes;
mod knowledge;
mod limits;
pub mod outbound;
mod record;
mod reply;
mod session;
mod shared;
mod start;
mod text;
mod tokens;
mod turns;

pub use error::SessionError;
pub use guard::{CallEnds, SOCKET_SILENCE};
pub use shared::{KnowledgeSettings, Voice, VoiceSettings};
pub use start::{run, START_WAIT};
pub use tokens::{plausible_call_sid, Refusal, StreamTokens, TokenClaims, TOKEN_LIFETIME};
