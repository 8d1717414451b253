//! Indexes persona knowledge: on `KnowledgeDocumentAdded`, splits the document into passages,
//! embeds them and indexes them (`usecases::knowledge::index_document`), then records
//! `KnowledgeDocumentIndexed` (with the embeddings' cost, billed to the persona's owner) or
//! `…IndexingFailed` with the reason. Idempotent: a document already settled is left alone,
//! and passages are replaced, never added twice. On `KnowledgeDocumentRemoved` the passages go; on `PersonaDeleted` every
//! document's text and passages.

use cmb_domain::persona::PersonaEvent;
use cmb_domain::{Actor, CommandContext, EventEnvelope};
use cmb_providers::embeddings::Embeddings;

use super::runner::{decode, Failure};
use crate::backbone::store::EventStore;
use crate::usecases::knowledge;

pub const NAME: &str = "knowledge";

#[derive(Clone)]
pub struct KnowledgeWorker {
    pub store: EventStore,
    pub embeddings: Embeddings,
}

impl KnowledgeWorker {
    pub async fn handle(&self, event: EventEnvelope) -> Result<(), Failure> {
        let Some(decoded) = decode::<PersonaEvent>(&event)? else {
            return Ok(());
        };
        let persona_id = event.aggregate_id.clone();
        match decoded {
            PersonaEvent::KnowledgeDocumentAdded { document, .. } => {
                let ctx = CommandContext::caused_by(&event, Actor::Worker(NAME.into()));
                let outcome = knowledge::index_document(
                    &self.store,
                    &self.embeddings,
                    &persona_id,
                    &document.document_id,
                    &ctx,
                )
                .await?;
                tracing::debug!(persona = %persona_id, document = %document.document_id, ?outcome, "knowledge indexing");
            }
            PersonaEvent::KnowledgeDocumentRemoved { document_id } => {
                knowledge::drop_passages(self.store.pool(), &persona_id, &document_id).await?;
            }
            PersonaEvent::PersonaDeleted => {
                knowledge::forget_persona(self.store.pool(), &persona_id).await?;
            }
            PersonaEvent::PersonaCreated { .. }
            | PersonaEvent::PersonaUpdated { .. }
            | PersonaEvent::KnowledgeDocumentIndexed { .. }
            | PersonaEvent::KnowledgeDocumentIndexingFailed { .. } => {}
        }
        Ok(())
    }
}
