//! A persona's knowledge: the documents it draws on in calls. The owner adds them (JSON with
//! the text, or multipart with a file: text, Markdown, HTML or PDF), lists them with their
//! indexing status and removes them; anyone who may see a public or system persona lists its
//! documents' titles.

use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use base64::Engine;
use cmb_domain::knowledge::{DocumentFormat, MAX_DOCUMENTS, MAX_DOCUMENT_CHARS, MAX_UPLOAD_BYTES};
use cmb_domain::persona::Owner;
use cmb_domain::PersonaId;
use serde::Deserialize;
use serde_json::json;

use crate::serve::http::answer::Done;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::Json;
use crate::serve::http::state::AppState;
use crate::usecases::{knowledge, personas};

/// The request body limit of an upload: the largest document and the multipart framing.
pub const BODY_LIMIT: usize = MAX_UPLOAD_BYTES * 4 / 3 + 64 * 1024;

#[derive(Deserialize, utoipa::ToSchema)]
#[schema(example = json!({"title": "Training plan", "format": "markdown", "content": "# Week 1\nRun 3 km twice."}))]
pub struct JsonUpload {
    #[schema(max_length = 120)]
    title: Option<String>,
    /// `text`, `markdown` (the default), `html` or `pdf`.
    format: Option<String>,
    /// The document's text (text, Markdown, HTML).
    content: Option<String>,
    /// The document's bytes in base64 (any format; a PDF must come this way in JSON).
    content_base64: Option<String>,
}

fn parse_format(raw: &str) -> Result<DocumentFormat, ApiError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "text" | "txt" | "text/plain" => Ok(DocumentFormat::Text),
        "markdown" | "md" | "text/markdown" => Ok(DocumentFormat::Markdown),
        "html" | "text/html" => Ok(DocumentFormat::Html),
        "pdf" | "application/pdf" => Ok(DocumentFormat::Pdf),
        _ => Err(ApiError::validation(
            "format",
            "format: one of text, markdown, html, pdf",
        )),
    }
}

async fn from_json(state: &AppState, req: Request) -> ApiResult<knowledge::Upload> {
    let Json(body) = Json::<JsonUpload>::from_request(req, state).await?;
    let format = parse_format(body.format.as_deref().unwrap_or("markdown"))?;
    // An empty field counts as left out (forms send both).
    let given = |s: Option<String>| s.filter(|s| !s.is_empty());
    let bytes = match (given(body.content), given(body.content_base64)) {
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| ApiError::validation("content_base64", "content_base64: not base64"))?,
        _ => {
            return Err(ApiError::validation(
                "content",
                "content: give the text as content, or the file as content_base64",
            ))
        }
    };
    Ok(knowledge::Upload {
        title: body.title,
        file_name: None,
        format,
        bytes,
    })
}

async fn from_multipart(state: &AppState, req: Request) -> ApiResult<knowledge::Upload> {
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::new(e.status(), "bad_request", e.body_text()))?;
    let mut title = None;
    let mut format = None;
    let mut file: Option<(Option<String>, Option<String>, Vec<u8>)> = None;
    let too_large = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("a document is at most {MAX_UPLOAD_BYTES} bytes"),
            )
            .with_field("file")
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
        }
    };
    while let Some(field) = form.next_field().await.map_err(too_large)? {
        match field.name().unwrap_or("") {
            "title" => title = Some(field.text().await.map_err(too_large)?),
            "format" => format = Some(parse_format(&field.text().await.map_err(too_large)?)?),
            "file" => {
                let name = field.file_name().map(str::to_string);
                let media = field.content_type().map(str::to_string);
                let bytes = field.bytes().await.map_err(too_large)?;
                if bytes.len() > MAX_UPLOAD_BYTES {
                    return Err(knowledge::Error::TooLarge {
                        max: MAX_UPLOAD_BYTES,
                    }
                    .into());
                }
                file = Some((name, media, bytes.to_vec()));
            }
            _ => {}
        }
    }
    let Some((file_name, media, bytes)) = file else {
        return Err(ApiError::validation(
            "file",
            "file: the document is missing",
        ));
    };
    let format = match format {
        Some(f) => f,
        None => {
            DocumentFormat::detect(media.as_deref(), file_name.as_deref()).ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "a document is text, Markdown, HTML or PDF",
                )
                .with_field("file")
            })?
        }
    };
    Ok(knowledge::Upload {
        title,
        file_name,
        format,
        bytes,
    })
}

/// Add a document your persona draws on in calls: JSON `{title?, format?, content |
/// content_base64}` or multipart (`file`: text, Markdown, HTML, PDF; optional `title` and
/// `format`); 5 MiB, 20 per persona. Indexed in the background.
#[utoipa::path(post, path = "/personas/{id}/knowledge", operation_id = "add_knowledge", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "Your persona's id")),
    request_body(content = JsonUpload, content_type = "application/json",
        description = "Or `multipart/form-data` with a `file` part (and optional `title`, `format`)"),
    responses(
        (status = 202, description = "Accepted; `status` is `indexing`", body = Object),
        (status = 403, description = "Not your persona", body = ErrorBody),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
        (status = 409, description = "The persona has its 20 documents", body = ErrorBody),
    ))]
pub async fn add(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
    req: Request,
) -> ApiResult<impl IntoResponse> {
    // The owner is checked before the body is read, so a stranger learns nothing from it.
    personas::owned(&state.store, &id, user.id).await?;
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let upload = if multipart {
        from_multipart(&state, req).await?
    } else {
        from_json(&state, req).await?
    };
    let (document, committed) =
        knowledge::add(&state.store, user.id, &id, upload, &user.context()).await?;
    state.read_your_writes("personas", &committed).await;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({
            "document": {
                "id": document.document_id,
                "title": document.title,
                "format": document.format.as_str(),
                "chars": document.chars,
                "status": "indexing",
            }
        })),
    ))
}

/// A persona's documents: the owner sees every document with its indexing status; anyone else
/// who may see the persona (public or system), the titles only.
#[utoipa::path(get, path = "/personas/{id}/knowledge", operation_id = "list_knowledge", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "The persona's id")),
    responses(
        (status = 200, description = "The documents and the limits", body = Object),
        (status = 404, description = "No persona you can see has this id", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<PersonaId>,
) -> ApiResult<impl IntoResponse> {
    let persona = personas::accessible(&state.store, &id, user.id).await?;
    let documents = cmb_projections::personas::knowledge(&state.pool, &id).await?;
    let owner = persona.owner == Some(Owner::User(user.id));
    let documents: Vec<serde_json::Value> = if owner {
        documents.into_iter().map(|d| json!(d)).collect()
    } else {
        documents
            .into_iter()
            .filter(|d| d.status == "indexed")
            .map(|d| json!({ "id": d.id, "title": d.title }))
            .collect()
    };
    Ok(axum::Json(json!({
        "persona_id": id,
        "documents": documents,
        "limits": {
            "max_documents": MAX_DOCUMENTS,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_document_chars": MAX_DOCUMENT_CHARS,
        },
    })))
}

/// Remove a document from your persona; the next call no longer has it.
#[utoipa::path(delete, path = "/personas/{id}/knowledge/{doc}", operation_id = "remove_knowledge", tag = "personas", security(("bearer" = [])),
    params(("id" = String, Path, description = "Your persona's id"),
           ("doc" = String, Path, description = "The document's id")),
    responses(
        (status = 200, description = "Removed", body = Done),
        (status = 403, description = "Not your persona", body = ErrorBody),
        (status = 404, description = "No such persona or document", body = ErrorBody),
    ))]
pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path((id, doc)): Path<(PersonaId, cmb_domain::DocumentId)>,
) -> ApiResult<impl IntoResponse> {
    let committed = knowledge::remove(&state.store, user.id, &id, &doc, &user.context()).await?;
    state.read_your_writes("personas", &committed).await;
    Ok(axum::Json(Done::new("document removed")))
}
