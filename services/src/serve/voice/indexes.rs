//! The knowledge indexes of the personas in calls now, shared by their calls (see
//! `super::knowledge`, which loads and uses them; `super::shared` holds one per process).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use cmb_domain::knowledge::rank::KnowledgeIndex;

/// The indexes of the personas in calls now, by persona. A persona's slot is locked while its
/// index is loaded, so calls starting together load it once.
#[derive(Default)]
pub struct SharedIndexes {
    by_persona: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

#[derive(Default)]
pub(super) struct Slot {
    /// What the index was built from (`index_key`).
    pub(super) key: String,
    pub(super) index: Weak<KnowledgeIndex>,
}

impl SharedIndexes {
    pub(super) fn slot(&self, persona_id: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut map = self.by_persona.lock().expect("knowledge indexes");
        // Forget the personas no call uses any more (a slot someone waits for or is loading
        // is kept).
        map.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || match slot.try_lock() {
                    Ok(s) => s.index.strong_count() > 0,
                    Err(_) => true,
                }
        });
        map.entry(persona_id.to_string()).or_default().clone()
    }
}
