//! Ferry on the local cluster: deploy it once per test process (`scripts/deploy`), give it a
//! BackupStorageLocation on the cluster's S3 server, and build DataUploads / DataDownloads shaped exactly
//! as Velero's CSI plugin and restore action create them.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::Cluster;

/// Namespace of the DU/DD, BSL and mover pods (Velero's).
pub const VELERO_NS: &str = "velero";
/// The BackupStorageLocation the tests use.
pub const BSL: &str = "ferry-e2e";

static DEPLOYED: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Deploys Ferry (once per process) and the test BSL with its credentials Secret.
pub fn deploy(c: &Cluster) -> Result<()> {
    let r = DEPLOYED.get_or_init(|| {
        let root = crate::manifest_dir().join("..");
        // A clean environment: what cargo test sets for test binaries (LD_LIBRARY_PATH, CARGO_*) would
        // change build-script fingerprints and make the build in scripts/deploy start over; what shapes the
        // build (CARGO_INCREMENTAL, the profile) is kept, so that build reuses what the tests built.
        let keep = [
            "PATH", "HOME", "USER", "TMPDIR", "CARGO_HOME", "RUSTUP_HOME", "CARGO_TARGET_DIR",
            "CARGO_BUILD_JOBS", "CARGO_INCREMENTAL", "FERRY_CACHE", "FERRY_E2E_HOME", "FERRY_PROFILE",
        ];
        let mut cmd = Command::new(root.join("scripts/deploy"));
        cmd.env_clear();
        for k in keep {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        let started = std::time::Instant::now();
        let out = cmd
            .env("VELERO_NAMESPACE", VELERO_NS)
            // The tests check that deleting a backup frees its data right away; no backup of the
            // same namespace runs during a prune in them.
            .env("FERRY_PRUNE_GRACE_SECONDS", "0")
            // The Go example data path, registered as the mover "tar-example" (issue 12).
            .env("FERRY_EXAMPLE_DATAPATH", "1")
            .output()
            .map_err(|e| format!("running scripts/deploy: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/deploy failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprintln!("scripts/deploy took {:.0}s", started.elapsed().as_secs_f64());
        let s3 = &c.s3;
        let creds = format!(
            "[default]\naws_access_key_id={}\naws_secret_access_key={}\n",
            s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]
        );
        // Velero's namespace at Pod Security "baseline", enforced: mover and maintenance pods must be admitted.
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {VELERO_NS}\n  labels:\n    \
             pod-security.kubernetes.io/enforce: baseline\n    \
             pod-security.kubernetes.io/enforce-version: latest\n---\n\
             apiVersion: v1\nkind: Secret\nmetadata:\n  name: ferry-e2e-s3\n  namespace: {VELERO_NS}\n\
             stringData:\n  cloud: {creds:?}\n---\n\
             apiVersion: velero.io/v1\nkind: BackupStorageLocation\nmetadata:\n  name: {BSL}\n  namespace: {VELERO_NS}\n\
             spec:\n  provider: aws\n  objectStorage:\n    bucket: {}\n    prefix: e2e\n  \
             credential:\n    name: ferry-e2e-s3\n    key: cloud\n  \
             config:\n    region: {}\n    s3ForcePathStyle: \"true\"\n    s3Url: {}\n",
            s3["FERRY_S3_BUCKET"], s3["FERRY_S3_REGION"], s3["FERRY_S3_ENDPOINT"]
        );
        c.apply(&yaml).map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

/// A DataUpload as Velero's CSI PVC action creates it (no status).
pub fn data_upload(
    name: &str,
    source_ns: &str,
    pvc: &str,
    snapshot: &str,
    datamover: &str,
    bsl: &str,
) -> String {
    format!(
        "apiVersion: velero.io/v2alpha1\nkind: DataUpload\nmetadata:\n  name: {name}\n  namespace: {VELERO_NS}\n  labels:\n    \
         velero.io/backup-name: {source_ns}\n    velero.io/backup-uid: 00000000-0000-0000-0000-{uid:0>12}\n    \
         velero.io/async-operation-id: du-{name}\nspec:\n  snapshotType: CSI\n  csiSnapshot:\n    volumeSnapshot: {snapshot}\n    \
         storageClass: csi-hostpath-sc\n    snapshotClass: csi-hostpath-snapclass\n    driver: hostpath.csi.k8s.io\n  \
         sourcePVC: {pvc}\n  datamover: {datamover}\n  backupStorageLocation: {bsl}\n  sourceNamespace: {source_ns}\n  \
         operationTimeout: 10m0s\n",
        uid = name.len()
    )
}

/// A DataDownload as Velero's restore creates it.
pub fn data_download(
    name: &str,
    target_ns: &str,
    pvc: &str,
    source_ns: &str,
    snapshot_id: &str,
) -> String {
    format!(
        "apiVersion: velero.io/v2alpha1\nkind: DataDownload\nmetadata:\n  name: {name}\n  namespace: {VELERO_NS}\n  labels:\n    \
         velero.io/restore-name: {target_ns}\n    velero.io/async-operation-id: dd-{name}\nspec:\n  targetVolume:\n    \
         pvc: {pvc}\n    pv: \"\"\n    namespace: {target_ns}\n  backupStorageLocation: {BSL}\n  datamover: ferry\n  \
         snapshotID: {snapshot_id}\n  sourceNamespace: {source_ns}\n  operationTimeout: 10m0s\n  nodeOS: linux\n"
    )
}

/// `kubectl get` of a DU/DD field in the Velero namespace.
pub fn cr_field(c: &Cluster, kind: &str, name: &str, path: &str) -> String {
    c.jsonpath(VELERO_NS, &format!("{kind}/{name}"), path)
}

/// Waits until a DU/DD is in a terminal phase; returns (phase, message, time taken).
pub fn wait_terminal(
    c: &Cluster,
    kind: &str,
    name: &str,
    timeout: Duration,
) -> Result<(String, String, Duration)> {
    let start = Instant::now();
    loop {
        let phase = cr_field(c, kind, name, "{.status.phase}");
        if matches!(phase.as_str(), "Completed" | "Failed" | "Canceled") {
            let msg = cr_field(c, kind, name, "{.status.message}");
            eprintln!(
                "[{:>5.1}s] {kind}/{name}: {phase} {msg}",
                start.elapsed().as_secs_f32()
            );
            return Ok((phase, msg, start.elapsed()));
        }
        if start.elapsed() > timeout {
            bail!(
                "{kind}/{name} still {phase:?} after {timeout:?}: {}",
                cr_field(c, kind, name, "{.status.message}")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until a DU/DD reaches `phase` (or any terminal phase); returns the phase seen and the time.
pub fn wait_phase(
    c: &Cluster,
    kind: &str,
    name: &str,
    phase: &str,
    timeout: Duration,
) -> Result<(String, Duration)> {
    let start = Instant::now();
    loop {
        let p = cr_field(c, kind, name, "{.status.phase}");
        if p == phase || matches!(p.as_str(), "Completed" | "Failed" | "Canceled") {
            return Ok((p, start.elapsed()));
        }
        if start.elapsed() > timeout {
            bail!("{kind}/{name} never reached {phase} (still {p:?}) within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until Ferry has released the CR (finalizer gone) and nothing it created for it is left.
pub fn assert_cleaned_up(c: &Cluster, kind: &str, name: &str) -> Result<()> {
    let uid = cr_field(c, kind, name, "{.metadata.uid}");
    assert_no_leftovers(c, kind, name, &uid)
}

/// Like [`assert_cleaned_up`] for the CR with `uid`, which may already be gone.
pub fn assert_no_leftovers(c: &Cluster, kind: &str, name: &str, uid: &str) -> Result<()> {
    ensure!(!uid.is_empty(), "{kind}/{name}: no uid");
    let start = Instant::now();
    loop {
        let fin = cr_field(c, kind, name, "{.metadata.finalizers}");
        let sel = format!("ferry.dev/owner-uid={uid}");
        let ns_left = c
            .kubectl_output(&[
                "-n",
                VELERO_NS,
                "get",
                "pods,pvc,volumesnapshot",
                "-l",
                &sel,
                "-o",
                "name",
            ])
            .context("listing leftovers")?;
        let cluster_left = c
            .kubectl_output(&["get", "volumesnapshotcontent,pv", "-l", &sel, "-o", "name"])
            .context("listing leftovers")?;
        if !fin.contains("ferry.dev/cleanup")
            && ns_left.trim().is_empty()
            && cluster_left.trim().is_empty()
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!(
                "{kind}/{name}: left behind after 120s: finalizers {fin} / {ns_left} {cluster_left}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
