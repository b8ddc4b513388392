//! Proof that the local e2e cluster gives what Ferry needs: CSI volumes, snapshots and restores,
//! S3 from pods, and in-pod access to the apiserver through the `kubernetes` Service.
//! Needs a running cluster (`e2e/cluster/up`); fails, never skips, when it is not there.

use anyhow::{Result, ensure};
use ferry_e2e::{Cluster, DEFAULT_LOGS, TestNs, script_pod};
use std::time::Duration;

fn cluster() -> Cluster {
    match Cluster::connect() {
        Ok(c) => c,
        Err(e) => panic!("{e:#}"),
    }
}

fn pvc(name: &str, sc: &str, source_snapshot: Option<&str>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  \
         storageClassName: {sc}\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 64Mi\n"
    );
    if let Some(snap) = source_snapshot {
        y += &format!(
            "  dataSource:\n    apiGroup: snapshot.storage.k8s.io\n    kind: VolumeSnapshot\n    name: {snap}\n"
        );
    }
    y
}

/// (1) a pod writes into a CSI PVC and succeeds; (2) a VolumeSnapshot of it becomes readyToUse;
/// (3) a PVC restored from the snapshot shows identical data to a second pod.
#[test]
fn csi_volume_snapshot_and_restore() {
    let c = cluster();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let sc_wffc = c.var("FERRY_STORAGECLASS_WFFC").to_string();
    let sc_default = c.var("FERRY_STORAGECLASS").to_string();
    let vsc = c.var("FERRY_VOLUMESNAPSHOTCLASS").to_string();
    let t = TestNs::new(&c, "e2e-csi").expect("namespace");
    t.run(DEFAULT_LOGS, |t| -> Result<()> {
        // 1. writer pod on a WaitForFirstConsumer PVC
        t.apply(&pvc("src", &sc_wffc, None))?;
        let write = "set -e; mkdir -p /data/dir; echo 'hello from ferry e2e' > /data/hello.txt; \
                     seq 1 20000 > /data/dir/numbers.txt; dd if=/dev/urandom of=/data/dir/random.bin bs=1k count=512 2>/dev/null; \
                     cd /data && find . -type f | sort | xargs md5sum > /tmp/sums && cat /tmp/sums && cp /tmp/sums /data/.sums; sync";
        t.apply(&script_pod("writer", &image, write, Some("src"), &[]))?;
        t.wait_pod_succeeded("writer", Duration::from_secs(120))?;
        let written = t.cluster.kubectl_output(&["-n", &t.ns, "logs", "writer"])?;
        ensure!(written.contains("hello.txt"), "writer printed no checksums: {written}");
        ensure!(t.jsonpath("pvc/src", "{.status.phase}") == "Bound", "source PVC not Bound");

        // 2. snapshot
        t.apply(&format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: snap\nspec:\n  \
             volumeSnapshotClassName: {vsc}\n  source:\n    persistentVolumeClaimName: src\n"
        ))?;
        t.wait("VolumeSnapshot readyToUse", Duration::from_secs(120), || {
            Ok(t.jsonpath("volumesnapshot/snap", "{.status.readyToUse}") == "true")
        })?;
        let content = t.jsonpath("volumesnapshot/snap", "{.status.boundVolumeSnapshotContentName}");
        let handle = t.cluster.jsonpath("", &format!("volumesnapshotcontent/{content}"), "{.status.snapshotHandle}");
        ensure!(!handle.is_empty(), "VolumeSnapshotContent {content} has no snapshotHandle");
        eprintln!("snapshot content {content}, handle {handle}");

        // change the source after the snapshot: the restore must show the old data
        t.apply(&script_pod("mutator", &image, "echo changed > /data/hello.txt", Some("src"), &[]))?;
        t.wait_pod_succeeded("mutator", Duration::from_secs(120))?;

        // 3. restore into a new PVC (default, Immediate class) and compare from a second pod
        t.apply(&pvc("restored", &sc_default, Some("snap")))?;
        let read = "set -e; cd /data && find . -type f ! -name .sums | sort | xargs md5sum > /tmp/sums; cat /tmp/sums; \
                    diff /tmp/sums /data/.sums && echo IDENTICAL; cat /data/hello.txt";
        t.apply(&script_pod("reader", &image, read, Some("restored"), &[]))?;
        t.wait_pod_succeeded("reader", Duration::from_secs(120))?;
        let out = t.logs("reader");
        ensure!(out.contains("IDENTICAL"), "restored data differs:\n{out}");
        ensure!(out.contains("hello from ferry e2e"), "restored volume shows post-snapshot data:\n{out}");
        ensure!(
            t.jsonpath("pvc/restored", "{.spec.dataSource.kind}") == "VolumeSnapshot",
            "restored PVC has no snapshot dataSource"
        );
        Ok(())
    });
}

/// (4) a pod writes and reads an object in the S3 bucket; the host reads the pod's object and vice versa.
#[test]
fn pod_reads_and_writes_s3() {
    let c = cluster();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-s3").expect("namespace");
    let s3: Vec<(String, String)> = c.s3.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    t.run(&["s3", "kubelet", "containerd"], |t| -> Result<()> {
        let key_pod = format!("{}/from-pod.txt", t.ns);
        let key_host = format!("{}/from-host.txt", t.ns);
        t.cluster.s3probe(&["put", &key_host, "written by the host"])?;
        let script = format!(
            "set -e; s3probe roundtrip {key_pod} 'written by a pod'; s3probe get {key_host}; echo; s3probe ls {}/",
            t.ns
        );
        let env: Vec<(&str, &str)> = s3
            .iter()
            .filter(|(k, _)| k.starts_with("FERRY_S3_") || k.starts_with("AWS_") && k != "AWS_SHARED_CREDENTIALS_FILE")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        t.apply(&script_pod("s3client", &image, &script, None, &env))?;
        t.wait_pod_succeeded("s3client", Duration::from_secs(120))?;
        let out = t.logs("s3client");
        ensure!(out.contains("roundtrip ok"), "pod roundtrip failed:\n{out}");
        ensure!(out.contains("written by the host"), "pod did not read the host's object:\n{out}");
        let got = t.cluster.s3probe(&["get", &key_pod])?;
        ensure!(got == "written by a pod", "host read {got:?} for the pod's object");
        Ok(())
    });
}

/// Pods reach the apiserver through the `kubernetes` Service (kube-proxy, iptables mode) with their
/// service-account token, and cannot reach anything outside the machine.
#[test]
fn pod_reaches_apiserver_via_service() {
    let c = cluster();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-net").expect("namespace");
    t.run(&["kube-proxy", "kubelet", "kube-apiserver"], |t| -> Result<()> {
        // kubeprobe POSTs a SelfSubjectReview with the pod's token, verifying TLS with the SA's ca.crt.
        let script = "set -e; echo host=$KUBERNETES_SERVICE_HOST port=$KUBERNETES_SERVICE_PORT; kubeprobe; \
            if ip route | grep -q '^default'; then echo HAS-DEFAULT-ROUTE; fi; ip route";
        t.apply(&script_pod("net", &image, script, None, &[]))?;
        t.wait_pod_succeeded("net", Duration::from_secs(120))?;
        let out = t.logs("net");
        let me = format!("system:serviceaccount:{}:default", t.ns);
        ensure!(out.contains(&me), "pod was not authenticated as {me} through the kubernetes Service:\n{out}");
        ensure!(!out.contains("HAS-DEFAULT-ROUTE"), "pod has a default route out:\n{out}");
        Ok(())
    });
}
