//! ElevenLabs simulator: `GET /v1/voices/{voice_id}` over the premade voices.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::Faults;

/// ElevenLabs' premade voices (id, name, gender, accent).
pub const VOICES: &[(&str, &str, &str, &str)] = &[
    ("21m00Tcm4TlvDq8ikWAM", "Rachel", "female", "american"),
    ("AZnzlk1XvdvUeBnXmlld", "Domi", "female", "american"),
    ("EXAVITQu4vr4xnSDxMaL", "Sarah", "female", "american"),
    ("ErXwobaYiN019PkySvjV", "Antoni", "male", "american"),
    ("MF3mGyEYCl7XYWbV9V6O", "Elli", "female", "american"),
    ("TxGEqnHWrfWFTfGW9XjX", "Josh", "male", "american"),
    ("VR6AewLTigWG4xSOukaG", "Arnold", "male", "american"),
    ("pNInz6obpgDQGcFmaJgB", "Adam", "male", "american"),
    ("yoZ06aMxZJJ28mfd3POQ", "Sam", "male", "american"),
];

#[derive(Clone)]
struct Sim {
    faults: Arc<Faults>,
}

pub fn router(faults: Faults) -> Router {
    Router::new()
        .route("/v1/voices/{voice_id}", get(voice))
        .with_state(Sim {
            faults: Arc::new(faults),
        })
}

fn detail(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "detail": { "status": code, "message": message } })),
    )
        .into_response()
}

async fn voice(State(sim): State<Sim>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if sim.faults.apply().await {
        return detail(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "injected failure",
        );
    }
    let key = headers
        .get("xi-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if key.is_empty() {
        return detail(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing xi-api-key header",
        );
    }
    match VOICES.iter().find(|v| v.0 == id) {
        Some((voice_id, name, gender, accent)) => Json(json!({
            "voice_id": voice_id,
            "name": name,
            "category": "premade",
            "labels": { "gender": gender, "accent": accent },
            "description": null,
            "preview_url": format!("https://storage.googleapis.com/eleven-public-prod/premade/voices/{voice_id}/preview.mp3"),
            "samples": null,
            "settings": { "stability": 0.5, "similarity_boost": 0.75, "style": 0.0, "use_speaker_boost": true, "speed": 1.0 },
            "available_for_tiers": [],
        }))
        .into_response(),
        None => detail(
            StatusCode::BAD_REQUEST,
            "voice_not_found",
            &format!("A voice with the voice_id {id} was not found."),
        ),
    }
}
