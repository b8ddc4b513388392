//! The controllers' watch caches (reflector stores) of what the steps count: DataUploads, DataDownloads and
//! mover pods. Read by the prepare queue (`admission.rs`) and the metrics gauges, so neither costs an
//! API request however many CRs there are. Set once this replica leads and its controllers run.

use ferry_proto::velero::{DataDownload, DataUpload};
use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
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
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("uploads", &self.uploads.len())
            .field("downloads", &self.downloads.len())
            .field("pods", &self.pods.len())
            .finish()
    }
}

impl Caches {
    /// Whether both CR caches hold a complete first listing (before that, a count would be short).
    pub fn crs_filled(&self) -> bool {
        let filled = |ready: Option<Result<(), _>>| matches!(ready, Some(Ok(())));
        filled(self.uploads.wait_until_ready().now_or_never())
            && filled(self.downloads.wait_until_ready().now_or_never())
    }
}
