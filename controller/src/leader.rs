//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas never reconcile at once. Every
//! write is conflict-checked on the Lease's resourceVersion; a replica that cannot renew within the lease
//! duration gives up leadership (and the binary exits, to be restarted as a follower). A leader that shuts
//! down on a signal (a rolling update, a drained node) releases the lease, so a follower takes over within
//! its next attempt instead of waiting for the lease to expire (as client-go's `ReleaseOnCancel`).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::clock;
use crate::context::FIELD_MANAGER;
use crate::error::Result;

/// A Lease to hold.
#[derive(Debug, Clone)]
pub struct Election {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// Our identity.
    pub holder: String,
    /// Lease duration.
    pub duration: Duration,
}

fn pp() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

impl Election {
    fn expired(&self, l: &Lease) -> bool {
        let Some(spec) = &l.spec else { return true };
        let Some(renew) = spec.renew_time.as_ref() else {
            return true;
        };
        let dur = spec.lease_duration_seconds.unwrap_or(15) as i64;
        clock::since(renew.0).as_secs() as i64 > dur
    }

    /// One attempt to take or renew the lease; true if we hold it afterwards.
    pub async fn try_hold(&self, client: &Client) -> Result<bool> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let now = MicroTime(Timestamp::now());
        let mine = LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(now.clone()),
            acquire_time: Some(now.clone()),
            ..Default::default()
        };
        match api.get_opt(&self.name).await? {
            None => {
                let l = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(mine),
                };
                match api.create(&pp(), &l).await {
                    Ok(_) => Ok(true),
                    Err(e) if crate::error::is_conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Some(mut l) => {
                let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone());
                let ours = holder.as_deref() == Some(self.holder.as_str());
                if !ours && !self.expired(&l) && holder.is_some_and(|h| !h.is_empty()) {
                    return Ok(false);
                }
                let spec = l.spec.get_or_insert_with(Default::default);
                if !ours {
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(self.holder.clone());
                spec.lease_duration_seconds = Some(self.duration.as_secs() as i32);
                spec.renew_time = Some(now);
                match api.replace(&self.name, &pp(), &l).await {
                    Ok(_) => Ok(true),
                    Err(e) if crate::error::is_conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Waits until we hold the lease.
    pub async fn acquire(&self, client: &Client) {
        loop {
            match self.try_hold(client).await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, holder = %self.holder, "became leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 5).await;
        }
    }

    /// Gives the lease up if we hold it: no holder, and a renew time a whole duration ago, so a follower
    /// sees it free at once. Best effort: if it fails, the lease expires as it would have.
    pub async fn release(&self, client: &Client) {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let mut l = match api.get_opt(&self.name).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "releasing the lease");
                return;
            }
        };
        let spec = l.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(
            Timestamp::now() - SignedDuration::from_secs(self.duration.as_secs() as i64 + 1),
        ));
        match api.replace(&self.name, &pp(), &l).await {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the lease"),
        }
    }

    /// Keeps renewing; returns when leadership is lost (not renewed within the lease duration).
    pub async fn hold(&self, client: &Client) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_hold(client).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("another replica took the lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the lease"),
            }
            if last_ok.elapsed() > self.duration {
                tracing::error!("could not renew the lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Lease handling against kube's mock service.
    use super::*;
    use crate::testing::{Handle, Seen, ctx, echo_or, ok, serve};
    use http::Method;
    use serde_json::json;

    fn election() -> Election {
        Election {
            namespace: "ferry-system".into(),
            name: "ferry-controller".into(),
            holder: "ctrl-0".into(),
            duration: Duration::from_secs(15),
        }
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_and_held() {
        let (ctx, handle) = ctx();
        let server = serve(
            handle,
            echo_or(|s| (s.method == Method::POST).then(|| ok(s.body.clone()))),
        );
        assert!(election().try_hold(&ctx.client).await.expect("hold"));
        drop(ctx);
        let seen = server.await.expect("server");
        let created = seen
            .iter()
            .find(|s| s.is(&Method::POST, "/namespaces/ferry-system/leases"))
            .unwrap_or_else(|| panic!("no lease created: {seen:#?}"));
        assert_eq!(created.body["spec"]["holderIdentity"], "ctrl-0");
        assert_eq!(created.body["spec"]["leaseDurationSeconds"], 15);
    }

    /// The lease as the API holds it: `holder` renewed it just now.
    fn lease(holder: &str) -> serde_json::Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "ferry-controller", "namespace": "ferry-system", "resourceVersion": "5"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                "renewTime": MicroTime(Timestamp::now())}})
    }

    /// The mock API server: a GET returns `lease`, writes are echoed.
    fn serve_lease(handle: Handle, lease: serde_json::Value) -> tokio::task::JoinHandle<Vec<Seen>> {
        serve(
            handle,
            echo_or(move |s| (s.method == Method::GET).then(|| ok(lease.clone()))),
        )
    }

    #[tokio::test]
    async fn a_lease_another_replica_renews_is_left_alone() {
        let (ctx, handle) = ctx();
        let server = serve_lease(handle, lease("ctrl-1"));
        assert!(!election().try_hold(&ctx.client).await.expect("hold"));
        drop(ctx);
        let seen = server.await.expect("server");
        assert!(seen.iter().all(|s| s.method == Method::GET), "{seen:#?}");
    }

    #[tokio::test]
    async fn a_leader_shutting_down_releases_the_lease_and_a_follower_takes_it_at_once() {
        let (ctx, handle) = ctx();
        let server = serve_lease(handle, lease("ctrl-0"));
        election().release(&ctx.client).await;
        drop(ctx);
        let seen = server.await.expect("server");
        let put = seen
            .iter()
            .find(|s| s.method == Method::PUT)
            .unwrap_or_else(|| panic!("the lease was not released: {seen:#?}"));
        assert!(put.body["spec"]["holderIdentity"].is_null(), "{put:#?}");

        // The released lease, as a follower reads it next: free, taken on the first attempt.
        let (ctx, handle) = crate::testing::ctx();
        let server = serve_lease(handle, put.body.clone());
        let follower = Election {
            holder: "ctrl-1".into(),
            ..election()
        };
        assert!(follower.try_hold(&ctx.client).await.expect("hold"));
        drop(ctx);
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_lease_another_replica_holds_is_not_released() {
        let (ctx, handle) = ctx();
        let server = serve_lease(handle, lease("ctrl-1"));
        election().release(&ctx.client).await;
        drop(ctx);
        let seen = server.await.expect("server");
        assert!(seen.iter().all(|s| s.method == Method::GET), "{seen:#?}");
    }
}
