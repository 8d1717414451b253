//! Persona knowledge, end to end through the simulators: the owner uploads documents (JSON
//! Markdown, multipart PDF and HTML), the indexing worker splits, embeds (the LLM simulator's
//! `/embeddings`) and indexes them in Postgres, the embeddings are billed to the persona's
//! owner; strangers see titles of public personas only and change nothing; bad input gets a
//! clear 4xx; removal takes the passages away; the system personas ship libraries.

use crate::common;

use std::time::Duration;

use callmeback::app::Running;
use common::{eventually, persona_body, request_call, wait_for_event, Api, TestEnv, PASSWORD};
use serde_json::{json, Value};

async fn persona(user: &Api, name: &str, public: bool) -> String {
    let reply = user.post("/api/personas", persona_body(name, public)).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    reply.body["persona"]["id"].as_str().unwrap().to_string()
}

/// The document `doc` of the list, once its status is no longer `indexing` (asked every
/// 1.5 s: reads are rate-limited to 60 a minute).
async fn settled(user: &Api, persona_id: &str, doc: &str) -> Value {
    eventually(Duration::from_secs(120), || async {
        let list = user
            .get(&format!("/api/personas/{persona_id}/knowledge"))
            .await;
        assert_eq!(list.status, 200, "{list:?}");
        let found = list.body["documents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == doc && d["status"] != "indexing")
            .cloned();
        if found.is_none() {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        found
    })
    .await
    .unwrap_or_else(|| panic!("document {doc} was never indexed"))
}

/// A one-page PDF whose page shows `lines` in Helvetica.
pub fn pdf(lines: &[&str]) -> Vec<u8> {
    let mut content = String::from("BT /F1 12 Tf 72 720 Td 14 TL\n");
    for line in lines {
        content.push_str(&format!("({line}) Tj T*\n"));
    }
    content.push_str("ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>".to_string(),
        format!("<< /Length {} >>\nstream\n{content}\nendstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_string(),
    ];
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend(format!("{} 0 obj\n{o}\nendobj\n", i + 1).as_bytes());
    }
    let xref = out.len();
    out.extend(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for o in offsets {
        out.extend(format!("{o:010} 00000 n \n").as_bytes());
    }
    out.extend(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// Posts a multipart form with a `file` part (and a `title` part when given).
pub async fn upload(
    user: &Api,
    persona_id: &str,
    file_name: &str,
    media: &str,
    bytes: &[u8],
    title: Option<&str>,
) -> common::Reply {
    let boundary = "----cmbtestboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    if let Some(t) = title {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\n{t}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\nContent-Type: {media}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend(bytes);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    user.send(
        user.request(
            reqwest::Method::POST,
            &format!("/api/personas/{persona_id}/knowledge"),
        )
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body),
    )
    .await
}

async fn passages(app: &Running, persona_id: &str, doc: &str) -> Vec<(String, i32)> {
    sqlx::query_as(
        "SELECT text, cardinality(embedding) FROM knowledge_passages
          WHERE persona_id = $1 AND document_id = $2 ORDER BY ord",
    )
    .bind(persona_id)
    .bind(doc)
    .fetch_all(&app.state.pool)
    .await
    .unwrap()
}

const PHILOSOPHY: &str = "# My coaching philosophy\n\nI believe in small daily wins.\n\n\
## The marmalade rule\n\nEvery Sunday my clients eat one spoonful of quince marmalade as a \
reward for a week of training. It is called the marmalade rule.\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_adds_lists_and_removes_documents_that_are_indexed_and_billed() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (owner, profile) = api.register(PASSWORD).await;
    let (stranger, _) = api.register(PASSWORD).await;
    let public = persona(&owner, "Know Coach", true).await;
    let private = persona(&owner, "Secret Coach", false).await;
    let path = format!("/api/personas/{public}/knowledge");

    // JSON Markdown.
    let added = owner
        .post(
            &path,
            json!({ "title": "Philosophy", "content": PHILOSOPHY }),
        )
        .await;
    assert_eq!(added.status, 202, "{added:?}");
    assert_eq!(added.body["document"]["status"], "indexing");
    let md = added.body["document"]["id"].as_str().unwrap().to_string();
    let doc = settled(&owner, &public, &md).await;
    assert_eq!(doc["status"], "indexed", "{doc}");
    assert_eq!(doc["title"], "Philosophy");
    assert_eq!(doc["format"], "markdown");
    assert_eq!(doc["embedded"], true);
    let stored = passages(&app, &public, &md).await;
    assert_eq!(doc["passages"], stored.len() as i64);
    assert!(stored.iter().any(|(t, _)| t.contains("quince marmalade")));
    assert!(stored.iter().all(|(_, dims)| *dims == 256), "{stored:?}");
    // Full-text indexed in Postgres, stemmed.
    let found: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM knowledge_passages
          WHERE persona_id = $1 AND tsv @@ plainto_tsquery('english', 'marmalades rules')",
    )
    .bind(&public)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert_eq!(found, 1);
    // The text is not in any event; the embeddings are billed to the persona's owner.
    let payloads: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM events WHERE aggregate_type = 'persona' AND aggregate_id = $1",
    )
    .bind(&public)
    .fetch_all(&app.state.pool)
    .await
    .unwrap();
    assert!(payloads.iter().all(|p| !p.to_string().contains("quince")));
    let indexed = payloads
        .iter()
        .find_map(|p| p.get("KnowledgeDocumentIndexed"))
        .expect("an indexed event");
    assert_eq!(
        indexed["costs"][0]["operation"],
        "knowledge-embedding-tokens"
    );
    assert_eq!(indexed["costs"][0]["service"], "openai");
    assert!(indexed["costs"][0]["quantity"].as_i64().unwrap() > 0);

    // Multipart PDF, its text extracted; HTML with its headings.
    let pdf_doc = upload(
        &owner,
        &public,
        "faq.pdf",
        "application/pdf",
        &pdf(&["Frequently asked questions", "The gym opens at six thirty."]),
        None,
    )
    .await;
    assert_eq!(pdf_doc.status, 202, "{pdf_doc:?}");
    assert_eq!(pdf_doc.body["document"]["title"], "faq");
    assert_eq!(pdf_doc.body["document"]["format"], "pdf");
    let pdf_id = pdf_doc.body["document"]["id"].as_str().unwrap().to_string();
    assert_eq!(settled(&owner, &public, &pdf_id).await["status"], "indexed");
    let text = passages(&app, &public, &pdf_id).await;
    assert!(text[0].0.contains("gym opens at six thirty"), "{text:?}");
    let html = upload(
        &owner,
        &public,
        "examples.html",
        "text/html",
        b"<html><body><h1>Examples</h1><p>Caller: I skipped leg day.</p><script>x()</script></body></html>",
        Some("Conversation examples"),
    )
    .await;
    assert_eq!(html.status, 202, "{html:?}");
    let html_id = html.body["document"]["id"].as_str().unwrap().to_string();
    settled(&owner, &public, &html_id).await;
    let text = passages(&app, &public, &html_id).await;
    assert_eq!(text[0].0, "Caller: I skipped leg day.");

    // Bad input: a clear 4xx, nothing stored.
    let cases = [
        (json!({ "content": "   " }), 400, "file"),
        (json!({ "format": "docx", "content": "x" }), 400, "format"),
        (json!({ "title": "No body" }), 400, "content"),
        (
            json!({ "format": "pdf", "content_base64": "aGVsbG8=" }),
            400,
            "file",
        ),
        (json!({ "content": PHILOSOPHY }), 409, ""),
    ];
    for (body, status, field) in cases {
        let r = owner.post(&path, body.clone()).await;
        assert_eq!(r.status, status, "{body}: {r:?}");
        if !field.is_empty() {
            assert_eq!(r.field(), field, "{body}: {r:?}");
        }
    }
    let big = "word ".repeat(2 * 1024 * 1024);
    let r = upload(
        &owner,
        &public,
        "big.txt",
        "text/plain",
        big.as_bytes(),
        None,
    )
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    let r = upload(
        &owner,
        &public,
        "sheet.xlsx",
        "application/vnd.ms-excel",
        b"x",
        None,
    )
    .await;
    assert_eq!(r.status, 415, "{r:?}");
    let r = upload(
        &owner,
        &public,
        "broken.pdf",
        "application/pdf",
        b"%PDF-1.4 garbage",
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");

    // Strangers: titles of a public persona's indexed documents; nothing of a private one;
    // no changes anywhere.
    let seen = stranger.get(&path).await;
    assert_eq!(seen.status, 200);
    let docs = seen.body["documents"].as_array().unwrap();
    assert_eq!(docs.len(), 3);
    assert!(
        docs.iter().all(|d| d.as_object().unwrap().len() == 2),
        "{docs:?}"
    );
    let r = stranger
        .get(&format!("/api/personas/{private}/knowledge"))
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = stranger
        .post(&path, json!({ "content": "Stranger's text here" }))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = stranger
        .post(
            &format!("/api/personas/{private}/knowledge"),
            json!({ "content": "Stranger's text here" }),
        )
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = stranger.delete(&format!("{path}/{md}")).await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = owner.delete(&format!("{path}/no-such-doc")).await;
    assert_eq!(r.status, 404, "{r:?}");

    // Removal: gone from the list, its passages and text deleted.
    let r = owner.delete(&format!("{path}/{md}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let list = owner.get(&path).await;
    assert!(list.body["documents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["id"] != md.as_str()));
    assert!(passages(&app, &public, &md).await.is_empty());
    // Then the same text may come back.
    let again = owner
        .post(
            &path,
            json!({ "title": "Philosophy", "content": PHILOSOPHY }),
        )
        .await;
    assert_eq!(again.status, 202, "{again:?}");

    // At most 20 documents per persona (3 so far; the rest added by the use case, since
    // uploads are rate-limited to 30 an hour).
    let owner_id: cmb_domain::UserId = profile["id"].as_str().unwrap().parse().unwrap();
    for i in 3..20 {
        let upload = callmeback::usecases::knowledge::Upload {
            title: None,
            file_name: None,
            format: cmb_domain::knowledge::DocumentFormat::Text,
            bytes: format!("Note number {i}: rest day.").into_bytes(),
        };
        let ctx = cmb_domain::CommandContext::system("test-fill");
        callmeback::usecases::knowledge::add(
            &app.state.store,
            owner_id,
            &public.as_str().into(),
            upload,
            &ctx,
        )
        .await
        .unwrap_or_else(|e| panic!("{i}: {e}"));
    }
    let r = owner
        .post(&path, json!({ "content": "One note too many." }))
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.code(), "too_many_documents", "{r:?}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_is_embedded_in_batches_a_failure_says_why_and_indexing_again_changes_nothing() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (owner, _) = api.register(PASSWORD).await;
    let (stranger, _) = api.register(PASSWORD).await;
    let id = persona(&owner, "Batch Coach", true).await;
    let path = format!("/api/personas/{id}/knowledge");
    // The system libraries are indexed: the embeddings counted from here are this test's.
    common::knowledge_embedding_tokens(&app).await;
    let sim = app.sims.openai.as_ref().unwrap();

    // Headings and nothing under them: nothing to index, and the owner is told why.
    let r = owner
        .post(
            &path,
            json!({ "title": "Headings only", "content": "# Only a heading\n\n## And another" }),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let empty: cmb_domain::DocumentId = r.body["document"]["id"].as_str().unwrap().into();
    let failed = settled(&owner, &id, empty.as_str()).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no text")),
        "{failed}"
    );

    // A long document: its passages embedded 64 to a request, each with its vector.
    let requests = sim.embedding_requests();
    let content: Vec<String> = (0..400)
        .map(|i| {
            format!(
                "Lesson {i}. Warm up for ten minutes, then run at an easy pace and keep \
                 breathing through the nose; finish with a few strides and a long stretch \
                 of the calves, the hamstrings and the hips before you sit down."
            )
        })
        .collect();
    let r = owner
        .post(
            &path,
            json!({ "title": "Lessons", "content": content.join("\n\n") }),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let long: cmb_domain::DocumentId = r.body["document"]["id"].as_str().unwrap().into();
    let doc = settled(&owner, &id, long.as_str()).await;
    assert_eq!(doc["status"], "indexed", "{doc}");
    let n = doc["passages"].as_u64().unwrap();
    assert!(n > 64, "{doc}");
    assert_eq!(sim.embedding_requests() - requests, n.div_ceil(64), "{doc}");
    let stored = passages(&app, &id, long.as_str()).await;
    assert_eq!(stored.len() as u64, n);
    assert!(stored.iter().all(|(_, dims)| *dims == 256));
    // Strangers see the indexed document's title only, not the failed one.
    let seen = stranger.get(&path).await;
    assert_eq!(
        seen.body["documents"],
        json!([{ "id": long, "title": "Lessons" }]),
        "{seen:?}"
    );

    // Indexing again (a redelivered message) changes nothing: no provider call, the same
    // passages, no new event.
    let events = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_type = 'persona' AND aggregate_id = $1",
        )
        .bind(&id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap()
    };
    let before = events().await;
    let unreachable = cmb_providers::embeddings::Embeddings::new(
        cmb_providers::http_client(),
        "http://127.0.0.1:9/v1",
        "key",
        "text-embedding-3-small",
    );
    let ctx = cmb_domain::CommandContext::system("test-reindex");
    for doc in [&long, &empty, &long] {
        let outcome = callmeback::usecases::knowledge::index_document(
            &app.state.store,
            &unreachable,
            &id,
            doc,
            &ctx,
        )
        .await
        .unwrap();
        assert_eq!(
            outcome,
            callmeback::usecases::knowledge::IndexOutcome::Settled
        );
    }
    assert_eq!(passages(&app, &id, long.as_str()).await, stored);
    assert_eq!(events().await, before);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_personas_ship_a_library_in_their_voice_and_it_is_read_only() {
    let env = TestEnv::new();
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (user, _) = api.register(PASSWORD).await;
    let docs = eventually(Duration::from_secs(60), || async {
        let r = user.get("/api/personas/brad_001/knowledge").await;
        assert_eq!(r.status, 200, "{r:?}");
        let docs = r.body["documents"].as_array().unwrap().clone();
        if docs.len() < 2 {
            // Reads are rate-limited to 60 a minute.
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        (docs.len() >= 2).then_some(docs)
    })
    .await
    .expect("Brad's library is indexed");
    assert!(docs
        .iter()
        .any(|d| d["title"] == "Brad's accountability playbook"));
    let r = user
        .post(
            "/api/personas/brad_001/knowledge",
            json!({ "content": "Brad likes cats." }),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = user
        .delete(&format!(
            "/api/personas/brad_001/knowledge/{}",
            docs[0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    // Defining the libraries again (another instance starting) changes nothing.
    let before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'persona' AND event_type NOT LIKE 'KnowledgeDocumentIndex%'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    callmeback::usecases::personas::define_system_personas(&app.state.store)
        .await
        .unwrap();
    callmeback::usecases::knowledge::define_system_libraries(&app.state.store)
        .await
        .unwrap();
    let after: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_type = 'persona' AND event_type NOT LIKE 'KnowledgeDocumentIndex%'")
            .fetch_one(&app.state.pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    env.cleanup().await;
}

/// Calls `persona_id`; returns the call once its voice session ended (transcript saved).
async fn call(app: &Running, user: &Api, persona_id: &str) -> Value {
    let id = request_call(user, persona_id, 2).await;
    assert!(
        wait_for_event(&app.state.pool, &id, "VoiceSessionEnded").await,
        "the voice session of {id} never ended"
    );
    user.get(&format!("/api/calls/{id}")).await.body
}

/// The voice requests (not memory extractions) the LLM simulator received since `from`, each
/// as its messages joined.
fn voice_requests(app: &Running, from: usize) -> Vec<String> {
    app.sims.cerebras.as_ref().unwrap().requests_log()[from..]
        .iter()
        .filter(|m| !cmb_sims::llm::is_extraction(m))
        .map(|m| {
            m.iter()
                .map(|(r, c)| format!("[{r}] {c}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_draws_on_the_personas_documents_and_only_its_own() {
    let env = TestEnv::new()
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "7")
        .set("SIM_TWILIO_CALLER_TURNS", "1000:2500,1000:2500")
        .set(
            "SIM_DEEPGRAM_SCRIPT",
            "what is the secret ingredient of the Sunday training|and how many bananas go in the zebra pudding",
        )
        .set("SIM_ELEVENLABS_TTS_SPEED", "20");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (owner, profile) = api.register(PASSWORD).await;
    common::grant(&app, &profile, 300).await;
    let (stranger, _) = api.register(PASSWORD).await;
    let mine = persona(&owner, "Marmalade Coach", true).await;
    let theirs = persona(&stranger, "Pudding Chef", true).await;
    let add = |user: &Api, id: &str, content: &str| {
        let (user, path, content) = (
            user.clone(),
            format!("/api/personas/{id}/knowledge"),
            content.to_string(),
        );
        async move {
            let r = user.post(&path, json!({ "content": content })).await;
            assert_eq!(r.status, 202, "{r:?}");
            r.body["document"]["id"].as_str().unwrap().to_string()
        }
    };
    let doc = add(
        &owner,
        &mine,
        "# Sunday training\n\nThe secret ingredient of the Sunday training is a spoonful of quince marmalade.\n\n# Other\n\nStretch after every run.",
    )
    .await;
    let other = add(
        &stranger,
        &theirs,
        "The zebra pudding takes exactly seven bananas and a pinch of cardamom.",
    )
    .await;
    assert_eq!(settled(&owner, &mine, &doc).await["status"], "indexed");
    assert_eq!(
        settled(&stranger, &theirs, &other).await["status"],
        "indexed"
    );

    // The caller's question → that turn's LLM request carries the passage, the reply uses it,
    // and the transcript names the passage; the other persona's document never appears.
    let call1 = call(&app, &owner, &mine).await;
    let requests = voice_requests(&app, 0);
    let asked = requests
        .iter()
        .find(|r| r.contains("[user] what is the secret ingredient"))
        .expect("the question reached the LLM");
    assert!(asked.contains("quince marmalade"), "{asked}");
    assert!(requests.iter().all(|r| !r.contains("cardamom")));
    let lines = call1["transcript"].as_array().unwrap();
    let question = lines
        .iter()
        .position(|l| {
            l["speaker"] == "caller" && l["text"].as_str().unwrap().contains("secret ingredient")
        })
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(
        lines[question]["passages"]
            .as_array()
            .is_some_and(|p| p.iter().any(|id| id.as_str().unwrap().starts_with(&doc))),
        "{:?}",
        lines[question]
    );
    // The reply drew on it (the simulator answers from the turn's context); the transcript
    // holds what the caller heard of it, which may be cut short by their next turn.
    let request = app
        .sims
        .cerebras
        .as_ref()
        .unwrap()
        .requests_log()
        .into_iter()
        .find(|m| {
            m.iter()
                .any(|(r, c)| r == "user" && c.contains("secret ingredient"))
        })
        .unwrap();
    let said = cmb_sims::llm::reply_for(&request);
    assert!(said.contains("quince marmalade"), "{said}");
    let answer = &lines[question + 1];
    assert_eq!(answer["speaker"], "persona");
    let heard = answer["text"].as_str().unwrap();
    assert!(
        said.starts_with(heard.trim_end_matches('—')),
        "{said} / {heard}"
    );

    // Removed → the next call no longer has it.
    let r = owner
        .delete(&format!("/api/personas/{mine}/knowledge/{doc}"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let from = app.sims.cerebras.as_ref().unwrap().requests_log().len();
    let call2 = call(&app, &owner, &mine).await;
    let requests = voice_requests(&app, from);
    assert!(requests
        .iter()
        .any(|r| r.contains("[user] what is the secret ingredient")));
    assert!(
        requests
            .iter()
            .all(|r| !r.contains("marmalade") && !r.contains("cardamom")),
        "{requests:?}"
    );
    assert!(call2["transcript"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.get("passages").is_none()));
    env.cleanup().await;
}

/// The timings serve recorded for the caller turns of call `id` that drew on knowledge.
async fn knowledge_turns(app: &Running, id: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "SELECT payload -> 'TurnCompleted' -> 'timings' FROM events
          WHERE aggregate_id = $1 AND event_type = 'TurnCompleted'
            AND payload -> 'TurnCompleted' -> 'timings' ->> 'knowledge_us' IS NOT NULL
          ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&app.state.pool)
    .await
    .unwrap()
}

/// A persona with the Sunday-training document, and a call to it in which the caller asks about
/// it in one turn of 2.2 s. The Deepgram simulator's interim transcripts grow a word every
/// 250 ms, one every 300 ms, so they never repeat: the last (at 2.1 s) holds the nine words
/// once, then the final comes after the persona's endpointing (500 ms). Returns the call and
/// the LLM request of the question.
async fn ask_about_sunday(env: TestEnv) -> (TestEnv, Running, Value, String) {
    let env = env
        .set("SIM_TWILIO_RING_MS", "100")
        .set("SIM_TWILIO_CALL_SECONDS", "8")
        .set("SIM_TWILIO_CALLER_TURNS", "2200:3500")
        .set(
            "SIM_DEEPGRAM_SCRIPT",
            "what is the secret ingredient of the Sunday training",
        )
        .set("SIM_ELEVENLABS_TTS_SPEED", "20");
    let app = env.spawn_app().await;
    let api = Api::new(app.addr);
    let (owner, profile) = api.register(PASSWORD).await;
    common::grant(&app, &profile, 300).await;
    let id = persona(&owner, "Sunday Coach", false).await;
    let r = owner
        .post(
            &format!("/api/personas/{id}/knowledge"),
            json!({ "content": "# Sunday training\n\nThe secret ingredient of the Sunday training is a spoonful of quince marmalade." }),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    // Slow embeddings (one test) index slowly, after the system libraries: watched in the
    // event log, not by reads, which are rate-limited.
    let indexed = eventually(Duration::from_secs(180), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE aggregate_id = $1
                AND event_type = 'KnowledgeDocumentIndexed'",
        )
        .bind(&id)
        .fetch_one(&app.state.pool)
        .await
        .unwrap();
        (n == 1).then_some(())
    })
    .await;
    assert!(indexed.is_some(), "the document was never indexed");
    let call = call(&app, &owner, &id).await;
    let asked = voice_requests(&app, 0)
        .into_iter()
        .find(|r| r.contains("[user] what is the secret ingredient"))
        .expect("the question reached the LLM");
    (env, app, call, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_words_embedded_in_time_rank_the_passages_too() {
    let (env, app, call, asked) = ask_about_sunday(TestEnv::new()).await;
    assert!(asked.contains("quince marmalade"), "{asked}");
    let id = call["call"]["id"].as_str().unwrap().to_string();
    let turns = knowledge_turns(&app, &id).await;
    // A growing interim, embedded once it held still while the caller finished: ready by the
    // final, which ends the turn at once.
    assert!(!turns.is_empty(), "{call}");
    assert_eq!(turns[0]["knowledge_vector"], true, "{turns:?}");
    assert!(turns[0]["knowledge_us"].as_u64().is_some(), "{turns:?}");
    // Its words held still 600 ms before the final (endpointing 500 ms): ranked ahead then,
    // and the final, the same nine words, took that ranking.
    assert_eq!(turns[0]["knowledge_preranked"], true, "{turns:?}");
    // Billed to the call, with the session's other costs.
    let billed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type = 'CostRecorded'
            AND payload::text LIKE '%knowledge-embedding-tokens%'",
    )
    .bind(&id)
    .fetch_one(&app.state.pool)
    .await
    .unwrap();
    assert!(billed >= 1);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_embedding_never_delays_the_reply_and_the_words_still_find_the_passage() {
    let (env, app, call, asked) =
        ask_about_sunday(TestEnv::new().set("SIM_OPENAI_LATENCY_MS", "4000")).await;
    // Found by its words alone.
    assert!(asked.contains("quince marmalade"), "{asked}");
    let id = call["call"]["id"].as_str().unwrap().to_string();
    let turns = knowledge_turns(&app, &id).await;
    assert!(!turns.is_empty(), "{call}");
    assert_eq!(turns[0]["knowledge_vector"], false, "{turns:?}");
    // Nothing to rank ahead with: ranked on the turn's path, by its words.
    assert_eq!(turns[0]["knowledge_preranked"], false, "{turns:?}");
    // The reply started long before the embedding (4 s) could have come back.
    let first_token = turns[0]["llm_first_token_ms"].as_u64().unwrap();
    assert!(first_token < 3000, "{turns:?}");
    env.cleanup().await;
}
