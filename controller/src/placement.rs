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
        .iter()
        .filter(|n| schedulable(n))
        .map(|n| n.name_any())
        .collect();
    if let Some(a) = allowed {
        candidates.retain(|n| a.contains(n));
    }
    // Mover pods run in the watched namespace only.
    let pods: Api<Pod> = ctx.watched();
    let movers = pods
        .list(&ListParams::default().labels(&objects::mover_selector()))
        .await?
        .items;
    let load = mover_load(&movers, &candidates);
    Ok(candidates
        .into_iter()
        .filter(|n| load.get(n).copied().unwrap_or(0) < ctx.config.per_node_limit)
        .collect())
}

/// Ready and not cordoned.
fn schedulable(n: &Node) -> bool {
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    ready && !cordoned
}

/// Running (or pending) mover pods per node. A pod not yet scheduled counts against every node its
/// affinity allows, or every candidate when it names none.
fn mover_load(movers: &[Pod], candidates: &BTreeSet<String>) -> BTreeMap<String, usize> {
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in movers {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let nodes = match p.spec.as_ref().and_then(|s| s.node_name.clone()) {
            Some(n) => vec![n],
            None => pod_nodes(p).unwrap_or_else(|| candidates.iter().cloned().collect()),
        };
        for n in nodes {
            *load.entry(n).or_default() += 1;
        }
    }
    load
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ready: &str, unschedulable: bool) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .expect("node")
    }

    fn pod(phase: &str, node: Option<&str>, affinity: &[&str]) -> Pod {
        let mut p = json!({"metadata": {"name": "m"}, "spec": {"containers": []}, "status": {"phase": phase}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        if !affinity.is_empty() {
            p["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": affinity}]}]}}});
        }
        serde_json::from_value(p).expect("pod")
    }

    #[test]
    fn only_ready_uncordoned_nodes_are_schedulable() {
        assert!(schedulable(&node("a", "True", false)));
        assert!(!schedulable(&node("b", "False", false)));
        assert!(!schedulable(&node("c", "True", true)));
        assert!(
            !schedulable(&Node::default()),
            "no status: not known to be ready"
        );
    }

    #[test]
    fn unscheduled_movers_count_where_they_may_land() {
        let candidates: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let movers = [
            pod("Running", Some("a"), &[]),
            pod("Succeeded", Some("a"), &[]),
            pod("Failed", Some("b"), &[]),
            pod("Pending", None, &["b"]),
            pod("Pending", None, &[]),
        ];
        let load = mover_load(&movers, &candidates);
        assert_eq!(
            load,
            BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 1)]),
            "a: running + unplaced; b: affinity + unplaced; finished pods free their node"
        );
    }
}
