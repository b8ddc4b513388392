//! What a CR's earlier steps found, kept in memory by CR uid so a CR waiting its turn does not redo them.
//!
//! An Accepted CR exposes its volume and reads its repository once, ahead of a free mover slot (as
//! Velero's prepare queue does); then it waits, and when a slot frees only its pod remains to create. The
//! memo is lost on a restart or a change of leader: the steps are idempotent and run once more then.
//! Entries are dropped when the pod is created and when the CR is finished, so the memo holds at most the
//! CRs in the prepare queue.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Per-CR values of any type, by uid.
#[derive(Debug, Default)]
pub struct Memo {
    entries: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
}

impl Memo {
    /// What was kept for `uid`, if it is a `T`.
    pub fn get<T: Clone + Send + Sync + 'static>(&self, uid: &str) -> Option<T> {
        let entries = self.entries.lock().expect("memo lock");
        entries.get(uid)?.downcast_ref::<T>().cloned()
    }

    /// Keeps `value` for `uid`, replacing what was there.
    pub fn put<T: Send + Sync + 'static>(&self, uid: &str, value: T) {
        let mut entries = self.entries.lock().expect("memo lock");
        entries.insert(uid.to_string(), Arc::new(value));
    }

    /// Drops what was kept for `uid`.
    pub fn forget(&self, uid: &str) {
        self.entries.lock().expect("memo lock").remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_comes_back_by_uid_and_type_until_forgotten() {
        let m = Memo::default();
        m.put("u1", (String::from("pvc"), 3u8));
        assert_eq!(m.get::<(String, u8)>("u1"), Some(("pvc".into(), 3)));
        assert_eq!(m.get::<String>("u1"), None, "another type is not there");
        assert_eq!(m.get::<(String, u8)>("u2"), None);
        m.forget("u1");
        assert_eq!(m.get::<(String, u8)>("u1"), None, "forgotten");
    }
}
