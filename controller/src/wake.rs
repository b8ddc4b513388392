//! Waking the CRs that wait for a place in the prepare queue or for a mover slot on a node, the moment one
//! frees, instead of at their next poll: the oldest waiting CR of that kind of slot is reconciled at once
//! (through the controllers' `reconcile_on` streams). The poll stays as the fallback (a woken CR may find
//! the slot taken, or may be gone), so a lost wake-up costs time, never progress.

use std::collections::VecDeque;
use std::sync::Mutex;

use ferry_proto::velero::{DataDownload, DataUpload};
use futures::StreamExt;
use futures::stream::BoxStream;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::cr::{Direction, MoverCr};

/// What a CR waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A place in the prepare queue (New → Accepted).
    Prepare,
    /// A node below `perNodeLimit` for its mover pod (Accepted).
    Mover,
}

/// A waiting CR: its kind (by direction), namespace and name.
type Waiter = (Direction, String, String);

/// The waiting lines and the streams that wake their CRs.
#[derive(Debug)]
pub struct Wake {
    lines: Mutex<[VecDeque<Waiter>; 2]>,
    uploads: UnboundedSender<ObjectRef<DataUpload>>,
    downloads: UnboundedSender<ObjectRef<DataDownload>>,
    triggers: Mutex<Option<Triggers>>,
}

/// The receiving ends, for the two controllers' `reconcile_on`.
#[derive(Debug)]
pub struct Triggers {
    uploads: UnboundedReceiver<ObjectRef<DataUpload>>,
    downloads: UnboundedReceiver<ObjectRef<DataDownload>>,
}

impl Triggers {
    /// The DataUploads to reconcile now, and the DataDownloads.
    pub fn into_streams(
        self,
    ) -> (
        BoxStream<'static, ObjectRef<DataUpload>>,
        BoxStream<'static, ObjectRef<DataDownload>>,
    ) {
        (stream(self.uploads), stream(self.downloads))
    }
}

fn stream<T: Send + 'static>(rx: UnboundedReceiver<T>) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) }).boxed()
}

impl Default for Wake {
    fn default() -> Self {
        let (uploads, up_rx) = unbounded_channel();
        let (downloads, down_rx) = unbounded_channel();
        Wake {
            lines: Mutex::default(),
            uploads,
            downloads,
            triggers: Mutex::new(Some(Triggers {
                uploads: up_rx,
                downloads: down_rx,
            })),
        }
    }
}

impl Wake {
    /// The wake-up streams; `None` after the first call (one set of controllers runs per process).
    pub fn triggers(&self) -> Option<Triggers> {
        self.triggers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// `cr` waits for `slot` (once in the line however often it asks).
    pub fn wait<K: MoverCr>(&self, slot: Slot, cr: &K) {
        let w = (
            K::DIRECTION,
            cr.namespace().unwrap_or_default(),
            cr.name_any(),
        );
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let line = &mut lines[slot as usize];
        if !line.contains(&w) {
            line.push_back(w);
        }
    }

    /// A `slot` freed: the CR waiting longest for one is reconciled now.
    pub fn freed(&self, slot: Slot) {
        let next = self.lines.lock().unwrap_or_else(|p| p.into_inner())[slot as usize].pop_front();
        let Some((direction, ns, name)) = next else {
            return;
        };
        // A closed channel means the controllers stopped: nothing to wake.
        match direction {
            Direction::Backup => drop(self.uploads.send(ObjectRef::new(&name).within(&ns))),
            Direction::Restore => drop(self.downloads.send(ObjectRef::new(&name).within(&ns))),
        }
    }

    /// How many CRs wait for `slot`.
    pub fn waiting(&self, slot: Slot) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())[slot as usize].len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{dd, du};
    use serde_json::json;

    /// The longest-waiting CR is woken first, each once however often it asked, by the stream of its kind.
    #[tokio::test]
    async fn a_freed_slot_wakes_the_longest_waiting_cr_of_that_line() {
        let wake = Wake::default();
        let (mut uploads, mut downloads) = wake.triggers().expect("triggers").into_streams();
        assert!(wake.triggers().is_none());
        let first = du(json!(null), |v| v["metadata"]["name"] = json!("first"));
        let second = dd(json!(null), |_| {});
        wake.wait(Slot::Prepare, &first);
        wake.wait(Slot::Prepare, &second);
        wake.wait(Slot::Prepare, &first);
        wake.wait(Slot::Mover, &du(json!(null), |_| {}));
        assert_eq!(wake.waiting(Slot::Prepare), 2);

        wake.freed(Slot::Prepare);
        assert_eq!(
            uploads.next().await,
            Some(ObjectRef::new("first").within("velero"))
        );
        wake.freed(Slot::Prepare);
        assert_eq!(
            downloads.next().await,
            Some(ObjectRef::new("r1-x").within("velero"))
        );
        wake.freed(Slot::Prepare); // nobody waits: nothing sent
        assert_eq!(wake.waiting(Slot::Prepare), 0);
        assert_eq!(wake.waiting(Slot::Mover), 1);
    }
}
