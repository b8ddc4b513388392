//! Where a mover pod may go: the Ready, schedulable nodes below the per-node limit of running movers.
//!
//! Two looks. A CR waiting for a slot looks in the watch caches ([`any_free_cached`]): no request, and a
//! cache that trails by one watch event only delays it to the next look. The decision to create a pod
//! ([`free_nodes`], under `ctx.placement`) reads the mover pods fresh from the API, so the limit holds
//! whatever the caches trail; nodes come from the cache even there (a node's readiness a moment late
//! changes where a pod is sent, never how many run).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use k8s_openapi::api::core::v1::{Node, NodeSpec, NodeStatus, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;

use crate::caches::holds_slot;
use crate::context::Context;
use crate::error::Result;
use crate::objects;

/// Nodes where a new mover pod may go under the per-node limit, restricted to `allowed` when given.
/// Pods not yet scheduled count against every node they may land on. Call under `ctx.placement`.
pub async fn free_nodes(ctx: &Context, allowed: Option<&[String]>) -> Result<Vec<String>> {
    let mut candidates = schedulable_nodes(ctx).await?;
    if let Some(a) = allowed {
        candidates.retain(|n| a.contains(n));
    }
    // Mover pods run in the watched namespace only.
    let movers = ctx
        .watched::<Pod>()
        .list(&ListParams::default().labels(&objects::mover_selector()))
        .await?
        .items;
    Ok(below_limit(ctx, candidates, movers.iter()))
}

/// Whether the watch caches show a node below the per-node limit (the look of a CR waiting for a slot).
/// Asks the API, as [`free_nodes`] does, until the caches have listed once.
pub async fn any_free_cached(ctx: &Context) -> Result<bool> {
    let Some(caches) = ctx.caches().filter(|c| c.placement_filled()) else {
        return Ok(!free_nodes(ctx, None).await?.is_empty());
    };
    let candidates = schedulable_names(caches.nodes.state().iter().map(|n| &**n));
    let movers = caches.pods.state();
    Ok(!below_limit(ctx, candidates, movers.iter().map(|p| &**p)).is_empty())
}

/// The Ready, uncordoned nodes: from the node cache once it has listed, else listed.
async fn schedulable_nodes(ctx: &Context) -> Result<BTreeSet<String>> {
    if let Some(c) = ctx.caches().filter(|c| c.placement_filled()) {
        return Ok(schedulable_names(c.nodes.state().iter().map(|n| &**n)));
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let listed = nodes.list(&ListParams::default()).await?.items;
    Ok(schedulable_names(listed.iter()))
}

fn schedulable_names<'a>(nodes: impl Iterator<Item = &'a Node>) -> BTreeSet<String> {
    nodes
        .filter(|n| schedulable(n))
        .map(|n| n.name_any())
        .collect()
}

/// The `candidates` with fewer than `perNodeLimit` of `movers` on them.
fn below_limit<'a>(
    ctx: &Context,
    candidates: BTreeSet<String>,
    movers: impl Iterator<Item = &'a Pod>,
) -> Vec<String> {
    let load = mover_load(movers, &candidates);
    candidates
        .into_iter()
        .filter(|n| load.get(n).copied().unwrap_or(0) < ctx.config.per_node_limit)
        .collect()
}

/// What the node cache keeps of a node: its name, labels, whether it is cordoned and its Ready condition.
/// A node's status carries its image list and more (kilobytes each); dropping them keeps a large
/// cluster's nodes within the controller's memory budget.
pub fn keep_placement_fields(n: &mut Node) {
    n.managed_fields_mut().clear();
    n.annotations_mut().clear();
    let unschedulable = n.spec.as_ref().and_then(|s| s.unschedulable);
    n.spec = Some(NodeSpec {
        unschedulable,
        ..Default::default()
    });
    let ready = n
        .status
        .take()
        .and_then(|s| s.conditions)
        .map(|cs| cs.into_iter().filter(|c| c.type_ == "Ready").collect());
    n.status = Some(NodeStatus {
        conditions: ready,
        ..Default::default()
    });
}

/// Follows the mover-pod watch to tell when a slot frees: a pod seen holding one that has ended or is gone.
/// The CR waiting longest for a slot is woken then (`wake.rs`), by the same watch whose cache its look
/// reads, so the look finds the slot free.
#[derive(Debug, Default)]
pub struct SlotWatch {
    holding: HashSet<String>,
    relisted: Option<HashSet<String>>,
}

impl SlotWatch {
    /// How many slots `event` frees.
    pub fn frees(&mut self, event: &watcher::Event<Pod>) -> usize {
        match event {
            watcher::Event::Init => {
                self.relisted = Some(HashSet::new());
                0
            }
            watcher::Event::InitApply(p) | watcher::Event::Apply(p) => {
                let uid = p.uid().unwrap_or_default();
                if let Some(seen) = self.relisted.as_mut() {
                    seen.insert(uid.clone());
                }
                if holds_slot(p) {
                    self.holding.insert(uid);
                    0
                } else {
                    usize::from(self.holding.remove(&uid))
                }
            }
            watcher::Event::Delete(p) => {
                usize::from(self.holding.remove(&p.uid().unwrap_or_default()))
            }
            // Pods that held a slot and were not in the new listing are gone.
            watcher::Event::InitDone => {
                let seen = self.relisted.take().unwrap_or_default();
                let before = self.holding.len();
                self.holding.retain(|uid| seen.contains(uid));
                before - self.holding.len()
            }
        }
    }
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
fn mover_load<'a>(
    movers: impl Iterator<Item = &'a Pod>,
    candidates: &BTreeSet<String>,
) -> BTreeMap<String, usize> {
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for p in movers.filter(|p| holds_slot(p)) {
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
    fn the_node_cache_keeps_what_placement_reads_and_drops_the_rest() {
        let mut n: Node = serde_json::from_value(json!({
            "metadata": {"name": "a", "labels": {"zone": "z1"}, "annotations": {"big": "x"},
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"unschedulable": true, "podCIDR": "10.0.0.0/24"},
            "status": {
                "conditions": [{"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "True"}],
                "images": [{"names": ["registry/app:1"], "sizeBytes": 1}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
        }))
        .expect("node");
        let mut uncordoned = n.clone();
        uncordoned.spec = None;
        keep_placement_fields(&mut n);
        keep_placement_fields(&mut uncordoned);
        assert!(!schedulable(&n), "still cordoned");
        assert!(schedulable(&uncordoned), "still Ready");
        assert_eq!(n.name_any(), "a");
        assert_eq!(n.labels().get("zone").map(String::as_str), Some("z1"));
        assert!(n.annotations().is_empty() && n.managed_fields().is_empty());
        let status = n.status.as_ref().expect("status");
        assert!(status.images.is_none() && status.addresses.is_none());
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
        assert!(n.spec.as_ref().is_some_and(|s| s.pod_cidr.is_none()));
    }

    #[test]
    fn a_slot_frees_once_when_its_pod_ends_or_is_gone() {
        use watcher::Event;
        let with_uid = |phase: &str, uid: &str| {
            let mut p = pod(phase, Some("a"), &[]);
            p.metadata.uid = Some(uid.into());
            p
        };
        let mut w = SlotWatch::default();
        let events = [
            (Event::Init, 0),
            (Event::InitApply(with_uid("Running", "1")), 0),
            (Event::InitApply(with_uid("Succeeded", "old")), 0),
            (Event::InitApply(with_uid("Pending", "2")), 0),
            (Event::InitApply(with_uid("Running", "3")), 0),
            (Event::InitDone, 0),
            (Event::Apply(with_uid("Running", "2")), 0),
            (Event::Apply(with_uid("Succeeded", "1")), 1),
            (Event::Apply(with_uid("Succeeded", "1")), 0), // a later update of an ended pod
            (Event::Delete(with_uid("Succeeded", "1")), 0),
            (Event::Delete(with_uid("Running", "2")), 1), // deleted while running
            (Event::Delete(with_uid("Succeeded", "old")), 0),
            // After a break in the watch, a relisting without pod 3: it went while nobody watched.
            (Event::Init, 0),
            (Event::InitApply(with_uid("Running", "4")), 0),
            (Event::InitDone, 1),
            (Event::Apply(with_uid("Failed", "4")), 1),
        ];
        for (i, (e, want)) in events.iter().enumerate() {
            assert_eq!(w.frees(e), *want, "event {i}: {e:?}");
        }
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
        let load = mover_load(movers.iter(), &candidates);
        assert_eq!(
            load,
            BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 1)]),
            "a: running + unplaced; b: affinity + unplaced; finished pods free their node"
        );
    }
}
