//! The exposers: what makes a volume mountable by the mover pod. [`snapshot`] clones the CSI snapshot
//! Velero hands over into a PVC (backup); [`rebind`] restores into a PVC of our own and hands its volume
//! to the target PVC (restore). Both only create and delete objects labelled with the CR's uid; neither
//! writes the CR.

pub mod rebind;
pub mod snapshot;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;

use crate::context::Context;
use crate::error::Result;
use crate::objects;
use crate::step::Step;

/// How soon to look again while a volume is being exposed or handed over.
pub const EXPOSE_REQUEUE: Duration = Duration::from_millis(500);

/// A volume ready for the mover pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// PVC to mount.
    pub pvc: String,
    /// Block mode.
    pub block: bool,
    /// Nodes the pod may run on (any when empty).
    pub nodes: Vec<String>,
}

/// Whether `class` binds its volumes when the first pod uses them (WaitForFirstConsumer).
async fn waits_for_first_consumer(ctx: &Context, class: &str) -> Result<bool> {
    let scs: Api<StorageClass> = Api::all(ctx.client.clone());
    Ok(objects::get_opt(&scs, class)
        .await?
        .and_then(|s| s.volume_binding_mode)
        .as_deref()
        == Some("WaitForFirstConsumer"))
}

/// For an Immediate-binding class: wait until the PVC is bound and return the nodes its PV is pinned to.
/// For WaitForFirstConsumer: the pod's placement decides, no restriction.
pub async fn bound_pv_nodes(
    ctx: &Context,
    pvcs: &Api<PersistentVolumeClaim>,
    name: &str,
    class: &str,
) -> Result<Step<Vec<String>>> {
    if waits_for_first_consumer(ctx, class).await? {
        return Ok(Step::Done(Vec::new()));
    }
    let Some(pvc) = objects::get_opt(pvcs, name).await? else {
        return Ok(Step::wait(
            format!("PVC {name} not created yet"),
            EXPOSE_REQUEUE,
        ));
    };
    let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Step::wait(
            format!("PVC {name} is not bound yet"),
            EXPOSE_REQUEUE,
        ));
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = objects::get_opt(&pvs, &pv_name).await?;
    Ok(Step::Done(
        pv.as_ref().and_then(pv_nodes).unwrap_or_default(),
    ))
}

/// The hostnames a PV's node affinity pins it to, if any (node-local storage).
pub fn pv_nodes(pv: &PersistentVolume) -> Option<Vec<String>> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    objects::hostnames(terms, |key| {
        key == "kubernetes.io/hostname"
            || key.ends_with("/hostname")
            || key.ends_with("topology.hostpath.csi/node")
    })
}
