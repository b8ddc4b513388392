//! The exposers: what makes a volume mountable by the mover pod. [`snapshot`] clones the CSI snapshot
//! Velero hands over into a PVC (backup); [`rebind`] restores into a PVC of our own and hands its volume
//! to the target PVC (restore). Both only create and delete objects labelled with the CR's uid; neither
//! writes the CR.

pub mod rebind;
pub mod snapshot;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::Api;

use crate::context::Context;
use crate::error::Result;
use crate::objects;

/// What expose found.
#[derive(Debug)]
pub enum Exposed {
    /// Not ready; the reason goes to `status.message` while waiting.
    Waiting(String),
    /// Ready: mount this PVC (block or filesystem), on one of `nodes` (any when empty).
    Ready {
        /// PVC to mount.
        pvc: String,
        /// Block mode.
        block: bool,
        /// Allowed nodes.
        nodes: Vec<String>,
        /// Mover arguments after `pod backup|restore` (the pod adds `--block` itself).
        args: Vec<String>,
    },
    /// Cannot work; fail with this message.
    Failed(String),
}

/// For an Immediate-binding class: wait until the PVC is bound and return the nodes its PV is pinned to.
/// For WaitForFirstConsumer: the pod's placement decides, no restriction.
pub async fn bound_pv_nodes(
    ctx: &Context,
    pvcs: &Api<PersistentVolumeClaim>,
    name: &str,
    class: &str,
) -> Result<std::result::Result<Vec<String>, String>> {
    let scs: Api<StorageClass> = Api::all(ctx.client.clone());
    let wffc = objects::get_opt(&scs, class)
        .await?
        .and_then(|s| s.volume_binding_mode)
        .as_deref()
        == Some("WaitForFirstConsumer");
    if wffc {
        return Ok(Ok(Vec::new()));
    }
    let Some(pvc) = objects::get_opt(pvcs, name).await? else {
        return Ok(Err(format!("PVC {name} not created yet")));
    };
    let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Err(format!("PVC {name} is not bound yet")));
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = objects::get_opt(&pvs, &pv_name).await?;
    Ok(Ok(pv.as_ref().and_then(pv_nodes).unwrap_or_default()))
}
/// The hostnames a PV's node affinity pins it to, if any (node-local storage).
pub fn pv_nodes(pv: &k8s_openapi::api::core::v1::PersistentVolume) -> Option<Vec<String>> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let mut out = Vec::new();
    for t in terms {
        for e in t.match_expressions.iter().flatten() {
            if (e.key == "kubernetes.io/hostname"
                || e.key.ends_with("/hostname")
                || e.key.ends_with("topology.hostpath.csi/node"))
                && e.operator == "In"
            {
                out.extend(e.values.iter().flatten().cloned());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}
