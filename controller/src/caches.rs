//! The controllers' watch caches (reflector stores) of what the steps count: DataUploads, DataDownloads,
//! mover pods and nodes. Read by the prepare queue (`admission.rs`), the look of a CR waiting for a mover
//! slot (`placement.rs`) and the metrics gauges, so none costs an API request however many CRs there are.
//! Set once this replica leads and its controllers run.

use ferry_proto::velero::{DataDownload, DataUpload};
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;

/// The watch caches of the running controllers.
#[derive(Clone)]
pub struct Caches {
    /// The DataUpload controller's cache.
    pub uploads: Store<DataUpload>,
    /// The DataDownload controller's cache.
    pub downloads: Store<DataDownload>,
    /// Mover pods in the watched namespace.
    pub pods: Store<Pod>,
    /// Nodes, stripped to what placement reads (name, labels, cordon, the Ready condition).
    pub nodes: Store<Node>,
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("uploads", &self.uploads.len())
            .field("downloads", &self.downloads.len())
            .field("pods", &self.pods.len())
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Caches {
    /// Whether both CR caches hold a complete first listing (before that, a count would be short).
    pub fn crs_filled(&self) -> bool {
        filled(&self.uploads) && filled(&self.downloads)
    }

    /// Whether the mover-pod and node caches hold a complete first listing.
    pub fn placement_filled(&self) -> bool {
        filled(&self.pods) && filled(&self.nodes)
    }
}

fn filled<K>(store: &Store<K>) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// Whether a mover pod holds a slot on its node (and counts as active): until it has ended.
pub fn holds_slot(p: &Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}
