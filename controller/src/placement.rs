//! Where a mover pod may go: the Ready, schedulable nodes below the per-node limit of running movers.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::context::Context;
use crate::error::Result;
use crate::objects;

/// Nodes where a new mover pod may go under the per-node limit, restricted to `allowed` when given.
/// Pods not yet scheduled count against every node they may land on. Call under `ctx.placement`.
pub async fn free_nodes(ctx: &Context, allowed: Option<&[String]>) -> Result<Vec<String>> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut candidates: BTreeSet<String> = nodes
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|n| {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
            ready && !cordoned
        })
        .map(|n| n.name_any())
        .collect();
    if let Some(a) = allowed {
        candidates.retain(|n| a.contains(n));
    }
    // Mover pods run in the watched namespace only.
    let pods: Api<Pod> = ctx.watched();
    let selector = objects::mover_selector();
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        match p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            Some(n) => *load.entry(n).or_default() += 1,
            None => {
                for n in pod_nodes(&p).unwrap_or_else(|| candidates.iter().cloned().collect()) {
                    *load.entry(n).or_default() += 1;
                }
            }
        }
    }
    Ok(candidates
        .into_iter()
        .filter(|n| load.get(n).copied().unwrap_or(0) < ctx.config.per_node_limit)
        .collect())
}

/// The hostnames a pod's required node affinity allows, if it names any.
fn pod_nodes(p: &Pod) -> Option<Vec<String>> {
    let terms = &p
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    objects::hostnames(terms, |key| key == "kubernetes.io/hostname")
}
