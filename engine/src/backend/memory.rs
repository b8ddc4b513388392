//! An in-memory backend whose modification times come from a [`Clock`]: for tests that need many
//! repositories fast, or control over time (lease staleness, prune grace). Passes the conformance suite.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, ObjectInfo};
use crate::clock::Clock;
use crate::error::{Error, Result};

/// Objects in a map, each with the time it was written.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    objects: Arc<Mutex<BTreeMap<String, (Bytes, SystemTime)>>>,
    clock: Arc<dyn Clock>,
}

impl MemoryBackend {
    /// An empty backend stamping writes with `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryBackend {
            objects: Default::default(),
            clock,
        }
    }

    fn objects(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, SystemTime)>> {
        self.objects.lock().expect("memory backend lock")
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn location(&self) -> String {
        "memory".into()
    }

    fn settle_delay(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let now = self.clock.now();
        // A copy, as a store makes: the caller's buffer may be pooled (`Backend::put`).
        let data = Bytes::copy_from_slice(&data);
        self.objects().insert(key.to_string(), (data, now));
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool> {
        let now = self.clock.now();
        let mut o = self.objects();
        if o.contains_key(key) {
            return Ok(false);
        }
        o.insert(key.to_string(), (Bytes::copy_from_slice(&data), now));
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.objects()
            .get(key)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| Error::NotFound(key.to_string()))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        let b = self.get(key).await?;
        let end = offset.checked_add(len).filter(|&e| e <= b.len() as u64);
        match end {
            Some(end) => Ok(b.slice(offset as usize..end as usize)),
            None => Err(Error::Integrity(format!(
                "{key}: range {offset}+{len} beyond its {} bytes",
                b.len()
            ))),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .objects()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (b, t))| ObjectInfo {
                key: k.clone(),
                size: b.len() as u64,
                modified: Some(*t),
            })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.objects().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_backend_conformance() {
        let b = MemoryBackend::new(crate::clock::system());
        crate::backend::conformance::run(&b).await;
    }
}
