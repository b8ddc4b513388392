//! Ferry's controller on the real local cluster: DataUploads and DataDownloads shaped exactly as Velero
//! creates them, driven to their terminal phases with real CSI snapshots, mover pods and S3.
//! Deploys Ferry with `scripts/deploy` (once per run). Fails, never skips, when the cluster is not up.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use ferry_e2e::ferry::{
    BSL, VELERO_NS, assert_cleaned_up, assert_no_leftovers, cr_field, data_download, data_upload,
    deploy, wait_phase, wait_terminal,
};
use ferry_e2e::{Cluster, DEFAULT_LOGS, MANIFEST, TestNs, script_pod};

fn setup() -> Cluster {
    let c = Cluster::connect().unwrap_or_else(|e| panic!("{e:#}"));
    deploy(&c).unwrap_or_else(|e| panic!("{e:#}"));
    c
}

const LOGS: &[&str] = &[
    "kubelet",
    "csi-hostpath",
    "csi-provisioner",
    "csi-snapshotter",
    "snapshot-controller",
];

fn logs() -> Vec<&'static str> {
    let mut v = LOGS.to_vec();
    v.extend(DEFAULT_LOGS.iter().filter(|c| !LOGS.contains(c)));
    v
}

/// A plain HTTP/1.0 GET (the controller's metrics endpoint).
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn pvc(name: &str, size: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  storageClassName: csi-hostpath-sc\n  \
         accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: {size}\n"
    )
}

fn snapshot(name: &str, pvc: &str) -> String {
    format!(
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: {name}\nspec:\n  \
         volumeSnapshotClassName: csi-hostpath-snapclass\n  source:\n    persistentVolumeClaimName: {pvc}\n"
    )
}

/// Takes VolumeSnapshots `names` of `pvc` and waits until all are ready to use.
fn take_snapshots(t: &TestNs, pvc: &str, names: &[&str]) -> Result<()> {
    for name in names {
        t.apply(&snapshot(name, pvc))?;
    }
    t.wait("VolumeSnapshots ready", Duration::from_secs(120), || {
        Ok(names
            .iter()
            .all(|n| t.jsonpath(&format!("volumesnapshot/{n}"), "{.status.readyToUse}") == "true"))
    })
}

/// Writes a tree with data and metadata worth checking; `mb` MiB of random data in one big file.
fn writer_script(mb: usize) -> String {
    format!(
        "set -e; cd /data; mkdir -p dir/sub empty; echo 'hello from ferry' > hello.txt; seq 1 50000 > dir/numbers.txt; \
         dd if=/dev/urandom of=dir/sub/random.bin bs=1M count={mb} 2>/dev/null; ln -s ../hello.txt dir/link; \
         ln hello.txt hard.txt; : > empty.txt; chmod 0640 dir/numbers.txt; chown 1234:5678 dir/numbers.txt; \
         touch -d '2020-01-02 03:04:05' hello.txt dir; sync; {MANIFEST}"
    )
}

/// Prepares a namespace with a PVC holding known data and a ready VolumeSnapshot of it; returns the
/// data manifest.
fn volume_with_snapshot(t: &TestNs, image: &str, mb: usize, snap: &str) -> Result<String> {
    t.apply(&pvc("data", "2Gi"))?;
    t.apply(&script_pod(
        "writer",
        image,
        &writer_script(mb),
        Some("data"),
        &[],
    ))?;
    t.wait_pod_succeeded("writer", Duration::from_secs(180))?;
    let manifest = t.logs("writer");
    ensure!(
        manifest.contains("hello.txt"),
        "writer printed no manifest: {manifest}"
    );
    take_snapshots(t, "data", &[snap])?;
    Ok(manifest)
}

fn events_of(c: &Cluster, kind: &str, name: &str) -> String {
    let uid = cr_field(c, kind, name, "{.metadata.uid}");
    c.kubectl_output(&[
        "-n",
        VELERO_NS,
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.uid={uid}"),
        "-o",
        "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
    ])
    .unwrap_or_default()
}

fn delete_cr(c: &Cluster, kind: &str, name: &str) {
    let _ = c.kubectl_output(&[
        "-n",
        VELERO_NS,
        "delete",
        kind,
        name,
        "--wait=true",
        "--timeout=60s",
    ]);
}

/// Backup via a hand-written DU → Completed with progress in events; restore via a DD into a new PVC
/// (bound the way Velero expects) → identical data and metadata; a second backup after a small change →
/// small incrementalBytes; the DU New→InProgress latency is printed.
#[test]
fn backup_restore_and_incremental() {
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-br").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        let manifest = volume_with_snapshot(t, &image, 768, "snap1")?;
        let du = format!("{}-b1", t.ns);
        let created = Instant::now();
        c.apply(&data_upload(&du, &t.ns, "data", "snap1", "ferry", BSL))?;
        let (p, latency) = wait_phase(&c, "dataupload", &du, "InProgress", Duration::from_secs(120))?;
        eprintln!("DU New -> {p}: {:.2}s", latency.as_secs_f64());
        // status.progress while running: seen, and never going backwards.
        let mut seen = Vec::new();
        while cr_field(&c, "dataupload", &du, "{.status.phase}") == "InProgress" {
            let done: u64 = cr_field(&c, "dataupload", &du, "{.status.progress.bytesDone}").parse().unwrap_or(0);
            if seen.last() != Some(&done) {
                seen.push(done);
            }
            ensure!(created.elapsed() < Duration::from_secs(300), "DU InProgress for 300s");
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("bytesDone seen while InProgress: {seen:?}");
        ensure!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went backwards: {seen:?}");
        ensure!(seen.iter().any(|d| *d > 0), "no progress seen while InProgress: {seen:?}");
        let (phase, msg, took) = wait_terminal(&c, "dataupload", &du, Duration::from_secs(300))?;
        ensure!(phase == "Completed", "DU ended {phase}: {msg}");
        eprintln!("DU completed in {:.1}s after creation", created.elapsed().as_secs_f64().max(took.as_secs_f64()));
        let sid = cr_field(&c, "dataupload", &du, "{.status.snapshotID}");
        let total: u64 = cr_field(&c, "dataupload", &du, "{.status.progress.totalBytes}").parse().unwrap_or(0);
        let done: u64 = cr_field(&c, "dataupload", &du, "{.status.progress.bytesDone}").parse().unwrap_or(0);
        ensure!(!sid.is_empty(), "no snapshotID");
        ensure!(total > 768 << 20 && done == total, "progress {done}/{total}");
        ensure!(cr_field(&c, "dataupload", &du, "{.status.nodeOS}") == "linux", "nodeOS");
        ensure!(!cr_field(&c, "dataupload", &du, "{.status.node}").is_empty(), "node");
        ensure!(!cr_field(&c, "dataupload", &du, "{.status.startTimestamp}").is_empty(), "startTimestamp");
        ensure!(!cr_field(&c, "dataupload", &du, "{.status.completionTimestamp}").is_empty(), "completionTimestamp");
        let ev = events_of(&c, "dataupload", &du);
        eprintln!("events:\n{ev}");
        ensure!(
            ev.contains("FerryStarted") && ev.contains("FerryProgress") && ev.contains("FerryCompleted"),
            "events missing: {ev}"
        );
        let described = c.kubectl_output(&["-n", VELERO_NS, "describe", "dataupload", &du])?;
        ensure!(described.contains("FerryProgress"), "kubectl describe shows no progress:\n{described}");
        assert_cleaned_up(&c, "dataupload", &du)?;
        ensure!(t.jsonpath("volumesnapshot/snap1", "{.metadata.name}").is_empty(), "source VolumeSnapshot not released");

        // Restore into a PVC shaped as Velero restores it: Pending, with a selector only our PV matches.
        let r = TestNs::new(&c, "e2e-rs")?;
        let restored = (|| -> Result<()> {
            r.apply(&format!(
                "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  storageClassName: csi-hostpath-sc\n  \
                 accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 2Gi\n  selector:\n    matchLabels:\n      \
                 velero.io/dynamic-pv-restore: {}.data.abcde\n", r.ns
            ))?;
            let dd = format!("{}-r1", r.ns);
            c.apply(&data_download(&dd, &r.ns, "data", &t.ns, &sid))?;
            let (phase, msg, took) = wait_terminal(&c, "datadownload", &dd, Duration::from_secs(300))?;
            ensure!(phase == "Completed", "DD ended {phase}: {msg}");
            eprintln!("DD completed in {:.1}s", took.as_secs_f64());
            ensure!(r.jsonpath("pvc/data", "{.status.phase}") == "Bound", "target PVC not bound");
            let pv = r.jsonpath("pvc/data", "{.spec.volumeName}");
            let pv_label = c.jsonpath("", &format!("pv/{pv}"), "{.metadata.labels.velero\\.io/dynamic-pv-restore}");
            ensure!(pv_label == format!("{}.data.abcde", r.ns), "PV lacks the selector label: {pv_label:?}");
            ensure!(
                c.jsonpath("", &format!("pv/{pv}"), "{.spec.persistentVolumeReclaimPolicy}") == "Delete",
                "reclaim policy not restored"
            );
            assert_cleaned_up(&c, "datadownload", &dd)?;
            r.apply(&script_pod("reader", &image, MANIFEST, Some("data"), &[]))?;
            r.wait_pod_succeeded("reader", Duration::from_secs(120))?;
            let got = r.logs("reader");
            ensure!(got == manifest, "restored tree differs:\n--- backup\n{manifest}\n--- restore\n{got}");
            delete_cr(&c, "datadownload", &dd);
            Ok(())
        })();
        if let Err(e) = restored {
            eprintln!("{}", r.diagnostics(&[]));
            return Err(e);
        }
        let _ = c.kubectl_output(&["delete", "namespace", &r.ns, "--wait=false"]);

        // Incremental: change one small file, back up again.
        t.apply(&script_pod("mutator", &image, "echo changed >> /data/dir/numbers.txt", Some("data"), &[]))?;
        t.wait_pod_succeeded("mutator", Duration::from_secs(120))?;
        take_snapshots(t, "data", &["snap2"])?;
        let du2 = format!("{}-b2", t.ns);
        c.apply(&data_upload(&du2, &t.ns, "data", "snap2", "ferry", BSL))?;
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &du2, Duration::from_secs(300))?;
        ensure!(phase == "Completed", "second DU ended {phase}: {msg}");
        // Velero 1.17's own DU CRD (installed when its e2e ran first) prunes status.incrementalBytes; Ferry
        // also puts the value into dataMoverResult.
        let inc: u64 = [".status.incrementalBytes", ".status.dataMoverResult.incrementalBytes"]
            .iter()
            .find_map(|f| cr_field(&c, "dataupload", &du2, &format!("{{{f}}}")).parse().ok())
            .unwrap_or(u64::MAX);
        let total2: u64 = cr_field(&c, "dataupload", &du2, "{.status.progress.totalBytes}").parse().unwrap_or(0);
        eprintln!("second backup: {inc} incremental of {total2} bytes");
        ensure!(inc < total2 / 20, "incremental bytes {inc} not small against {total2}");
        assert_cleaned_up(&c, "dataupload", &du2)?;
        delete_cr(&c, "dataupload", &du);
        delete_cr(&c, "dataupload", &du2);
        Ok(())
    });
}

/// A DU whose snapshot does not exist and one whose BSL does not exist fail with clear messages; one for
/// another vendor's mover is never touched.
#[test]
fn bad_and_foreign_data_uploads() {
    let c = setup();
    let t = TestNs::new(&c, "e2e-bad").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        let nosnap = format!("{}-nosnap", t.ns);
        let nobsl = format!("{}-nobsl", t.ns);
        let foreign = format!("{}-foreign", t.ns);
        c.apply(&data_upload(
            &nosnap,
            &t.ns,
            "data",
            "missing-snapshot",
            "ferry",
            BSL,
        ))?;
        c.apply(&data_upload(
            &foreign,
            &t.ns,
            "data",
            "missing-snapshot",
            "acme-mover",
            BSL,
        ))?;
        // A real, ready snapshot but a BSL that does not exist.
        let image = c.var("FERRY_TEST_IMAGE").to_string();
        volume_with_snapshot(t, &image, 1, "snap")?;
        c.apply(&data_upload(
            &nobsl,
            &t.ns,
            "data",
            "snap",
            "ferry",
            "no-such-bsl",
        ))?;
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &nosnap, Duration::from_secs(60))?;
        ensure!(
            phase == "Failed" && msg.contains("missing-snapshot") && msg.contains("not found"),
            "{phase}: {msg}"
        );
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &nobsl, Duration::from_secs(120))?;
        ensure!(
            phase == "Failed" && msg.contains("no-such-bsl") && msg.contains("not found"),
            "{phase}: {msg}"
        );
        assert_cleaned_up(&c, "dataupload", &nosnap)?;
        assert_cleaned_up(&c, "dataupload", &nobsl)?;
        ensure!(
            t.jsonpath("volumesnapshot/snap", "{.metadata.name}")
                .is_empty(),
            "handed-over snapshot not released"
        );
        let status = cr_field(&c, "dataupload", &foreign, "{.status}");
        let fin = cr_field(&c, "dataupload", &foreign, "{.metadata.finalizers}");
        ensure!(
            status.is_empty() && fin.is_empty(),
            "foreign DU touched: status {status:?} finalizers {fin:?}"
        );
        for n in [&nosnap, &nobsl, &foreign] {
            delete_cr(&c, "dataupload", n);
        }
        Ok(())
    });
}

/// Cancel while InProgress → Canceled within 30 s; a deleted mover pod → Failed with a clear message;
/// nothing left behind either way.
#[test]
fn cancel_and_deleted_pod() {
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-cancel").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        volume_with_snapshot(t, &image, 768, "snap1")?;
        take_snapshots(t, "data", &["snap2"])?;
        let du = format!("{}-c1", t.ns);
        c.apply(&data_upload(&du, &t.ns, "data", "snap1", "ferry", BSL))?;
        let (p, _) = wait_phase(
            &c,
            "dataupload",
            &du,
            "InProgress",
            Duration::from_secs(300),
        )?;
        ensure!(p == "InProgress", "DU went {p} before it could be canceled");
        std::thread::sleep(Duration::from_secs(2));
        let asked = Instant::now();
        c.kubectl_output(&[
            "-n",
            VELERO_NS,
            "patch",
            "dataupload",
            &du,
            "--type=merge",
            "-p",
            r#"{"spec":{"cancel":true}}"#,
        ])?;
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &du, Duration::from_secs(60))?;
        let took = asked.elapsed();
        eprintln!("cancel took {:.1}s", took.as_secs_f64());
        ensure!(phase == "Canceled", "canceled DU ended {phase}: {msg}");
        ensure!(took < Duration::from_secs(30), "cancel took {took:?}");
        assert_cleaned_up(&c, "dataupload", &du)?;

        let du2 = format!("{}-c2", t.ns);
        c.apply(&data_upload(&du2, &t.ns, "data", "snap2", "ferry", BSL))?;
        let (p, _) = wait_phase(
            &c,
            "dataupload",
            &du2,
            "InProgress",
            Duration::from_secs(300),
        )?;
        ensure!(p == "InProgress", "DU went {p}");
        std::thread::sleep(Duration::from_secs(2));
        c.kubectl_output(&[
            "-n",
            VELERO_NS,
            "delete",
            "pod",
            &format!("ferry-{du2}"),
            "--wait=false",
        ])?;
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &du2, Duration::from_secs(60))?;
        ensure!(
            phase == "Failed" && msg.contains("deleted"),
            "DU with deleted pod ended {phase}: {msg}"
        );
        assert_cleaned_up(&c, "dataupload", &du2)?;

        // A DU deleted while InProgress: the mover is stopped, everything is cleaned up, the DU goes away.
        // New content first, so that this backup has real work to do (the earlier ones may have indexed
        // or even finished the old content).
        t.apply(&script_pod(
            "rewriter",
            &image,
            "dd if=/dev/urandom of=/data/dir/sub/random.bin bs=1M count=768 2>/dev/null; sync",
            Some("data"),
            &[],
        ))?;
        t.wait_pod_succeeded("rewriter", Duration::from_secs(180))?;
        take_snapshots(t, "data", &["snap3"])?;
        let du3 = format!("{}-c3", t.ns);
        c.apply(&data_upload(&du3, &t.ns, "data", "snap3", "ferry", BSL))?;
        let (p, _) = wait_phase(
            &c,
            "dataupload",
            &du3,
            "InProgress",
            Duration::from_secs(300),
        )?;
        ensure!(p == "InProgress", "DU went {p}");
        let uid = cr_field(&c, "dataupload", &du3, "{.metadata.uid}");
        let asked = Instant::now();
        c.kubectl_output(&[
            "-n",
            VELERO_NS,
            "delete",
            "dataupload",
            &du3,
            "--wait=false",
        ])?;
        t.wait("deleted DU gone", Duration::from_secs(60), || {
            Ok(
                c.kubectl_output(&["-n", VELERO_NS, "get", "dataupload", &du3])
                    .is_err(),
            )
        })?;
        eprintln!(
            "deleting an InProgress DU took {:.1}s",
            asked.elapsed().as_secs_f64()
        );
        assert_no_leftovers(&c, "dataupload", &du3, &uid)?;
        delete_cr(&c, "dataupload", &du);
        delete_cr(&c, "dataupload", &du2);
        Ok(())
    });
}

/// Three DUs at once: at most one mover pod runs at a time (perNodeLimit 1), all complete; the controller
/// is killed mid-flight and every DU still reaches Completed with nothing left behind.
#[test]
fn concurrent_limit_and_controller_restart() {
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-many").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        volume_with_snapshot(t, &image, 32, "s0")?;
        take_snapshots(t, "data", &["s1", "s2"])?;
        let names: Vec<String> = (0..3).map(|i| format!("{}-m{i}", t.ns)).collect();
        for (i, n) in names.iter().enumerate() {
            c.apply(&data_upload(
                n,
                &t.ns,
                "data",
                &format!("s{i}"),
                "ferry",
                BSL,
            ))?;
        }
        let start = Instant::now();
        let mut max_running = 0;
        let mut killed = false;
        loop {
            let running = c
                .kubectl_output(&[
                    "get",
                    "pods",
                    "-A",
                    "-l",
                    "app.kubernetes.io/component=mover",
                    "--field-selector=status.phase=Running",
                    "-o",
                    "name",
                ])?
                .lines()
                .count();
            max_running = max_running.max(running);
            let phases: Vec<String> = names
                .iter()
                .map(|n| cr_field(&c, "dataupload", n, "{.status.phase}"))
                .collect();
            if !killed && phases.iter().any(|p| p == "InProgress") {
                c.kubectl_output(&[
                    "-n",
                    "ferry-system",
                    "delete",
                    "pods",
                    "-l",
                    "app.kubernetes.io/name=ferry-controller",
                    "--grace-period=0",
                    "--force",
                ])?;
                killed = true;
                eprintln!(
                    "[{:>5.1}s] killed the controller pods ({phases:?})",
                    start.elapsed().as_secs_f32()
                );
            }
            if phases
                .iter()
                .all(|p| matches!(p.as_str(), "Completed" | "Failed" | "Canceled"))
            {
                for n in &names {
                    let (phase, msg, _) =
                        wait_terminal(&c, "dataupload", n, Duration::from_secs(1))?;
                    ensure!(phase == "Completed", "{n} ended {phase}: {msg}");
                }
                break;
            }
            ensure!(
                start.elapsed() < Duration::from_secs(600),
                "DUs not done after 600s: {phases:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        ensure!(killed, "the controller was never killed mid-flight");
        ensure!(
            max_running <= 1,
            "{max_running} mover pods ran at once with perNodeLimit 1"
        );
        // The metrics endpoint of the leading replica counts them (from its watch caches).
        let leader = c.kubectl_output(&[
            "-n",
            "ferry-system",
            "get",
            "lease",
            "ferry-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])?;
        let ip = c.kubectl_output(&[
            "-n",
            "ferry-system",
            "get",
            "pod",
            leader.trim(),
            "-o",
            "jsonpath={.status.podIP}",
        ])?;
        let metrics = http_get(&format!("{}:8080", ip.trim()), "/metrics")?;
        let completed: usize = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ferry_crs{kind=\"DataUpload\",phase=\"Completed\"} "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        ensure!(
            completed >= names.len()
                && metrics.contains("ferry_active_mover_pods ")
                && metrics.contains("ferry_leader 1")
                && metrics.contains(
                    "ferry_phase_transitions_total{kind=\"DataUpload\",phase=\"Completed\"}"
                ),
            "metrics lack the CR gauges:\n{metrics}"
        );
        for n in &names {
            assert_cleaned_up(&c, "dataupload", n)?;
            delete_cr(&c, "dataupload", n);
        }
        Ok(())
    });
}

/// A PVC in `class`, raw block mode, optionally with Velero's restore selector.
fn block_pvc(name: &str, class: &str, selector: Option<&str>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  storageClassName: {class}\n  \
         volumeMode: Block\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 64Mi\n"
    );
    if let Some(s) = selector {
        y += &format!("  selector:\n    matchLabels:\n      velero.io/dynamic-pv-restore: {s}\n");
    }
    y
}

/// A pod that runs `script` with the block PVC `pvc` attached at /dev/xvda.
fn device_pod(name: &str, image: &str, pvc: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    \
         imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", {script:?}]\n    volumeDevices:\n    - {{name: dev, devicePath: /dev/xvda}}\n  volumes:\n  \
         - {{name: dev, persistentVolumeClaim: {{claimName: {pvc}}}}}\n"
    )
}

/// Raw block volumes: a block PVC is backed up through a DU and restored through a DD into a block PVC of
/// a WaitForFirstConsumer class whose consumer pod is already waiting (so the restore must land on the node
/// the scheduler picked). The device bytes are identical; nothing is left behind.
#[test]
fn block_volume_and_wait_for_first_consumer() {
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let wffc = c.var("FERRY_STORAGECLASS_WFFC").to_string();
    let t = TestNs::new(&c, "e2e-block").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        const SUM: &str = "md5sum < /dev/xvda | cut -c1-32";
        t.apply(&block_pvc("raw", "csi-hostpath-sc", None))?;
        t.apply(&device_pod(
            "writer",
            &image,
            "raw",
            &format!(
                "set -e; dd if=/dev/urandom of=/dev/xvda bs=1M count=8 seek=3 conv=notrunc 2>/dev/null; \
                 printf ferry | dd of=/dev/xvda bs=1 seek=60000000 conv=notrunc 2>/dev/null; sync; {SUM}"
            ),
        ))?;
        t.wait_pod_succeeded("writer", Duration::from_secs(180))?;
        let sum = t.logs("writer").trim().to_string();
        ensure!(sum.len() == 32, "writer printed no checksum: {sum:?}");
        take_snapshots(t, "raw", &["bsnap"])?;

        let du = format!("{}-b", t.ns);
        c.apply(&data_upload(&du, &t.ns, "raw", "bsnap", "ferry", BSL))?;
        let (phase, msg, _) = wait_terminal(&c, "dataupload", &du, Duration::from_secs(300))?;
        ensure!(phase == "Completed", "block DU ended {phase}: {msg}");
        let sid = cr_field(&c, "dataupload", &du, "{.status.snapshotID}");
        let total: u64 = cr_field(&c, "dataupload", &du, "{.status.progress.totalBytes}")
            .parse()
            .unwrap_or(0);
        ensure!(total == 64 << 20, "block DU moved {total} bytes, not the device size");
        assert_cleaned_up(&c, "dataupload", &du)?;

        // The consumer exists before the restore: the scheduler picks its node and the PVC waits for it.
        let sel = format!("{}.raw2.xyz12", t.ns);
        t.apply(&block_pvc("raw2", &wffc, Some(&sel)))?;
        t.apply(&device_pod("reader", &image, "raw2", SUM))?;
        t.wait("scheduler selected a node for the WFFC PVC", Duration::from_secs(120), || {
            Ok(!t
                .jsonpath("pvc/raw2", "{.metadata.annotations.volume\\.kubernetes\\.io/selected-node}")
                .is_empty())
        })?;
        let dd = format!("{}-b", t.ns);
        c.apply(&data_download(&dd, &t.ns, "raw2", &t.ns, &sid))?;
        let (phase, msg, _) = wait_terminal(&c, "datadownload", &dd, Duration::from_secs(300))?;
        ensure!(phase == "Completed", "block DD ended {phase}: {msg}");
        t.wait_pod_succeeded("reader", Duration::from_secs(180))?;
        let got = t.logs("reader").trim().to_string();
        ensure!(got == sum, "restored device differs: {got} != {sum}");
        assert_cleaned_up(&c, "datadownload", &dd)?;
        delete_cr(&c, "dataupload", &du);
        delete_cr(&c, "datadownload", &dd);
        Ok(())
    });
}

/// A second S3 server on the cluster's S3 data, over HTTPS with a certificate from a throwaway CA.
struct TlsS3 {
    child: std::process::Child,
    endpoint: String,
    ca_pem: String,
    _dir: std::path::PathBuf,
}

impl Drop for TlsS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl TlsS3 {
    fn start(c: &Cluster) -> Result<TlsS3> {
        let plain = &c.s3["FERRY_S3_ENDPOINT"];
        let host = plain
            .trim_start_matches("http://")
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ferry e2e CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![host.clone()])?.signed_by(&key, &ca)?;
        let dir = std::env::temp_dir().join(format!("ferry-e2e-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), cert.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
        let port = std::net::TcpListener::bind((host.as_str(), 0))?
            .local_addr()?
            .port();
        let log = std::fs::File::create(dir.join("versitygw.log"))?;
        let child = std::process::Command::new(c.bin.join("versitygw"))
            .args(["--port", &format!("{host}:{port}")])
            .args(["--access", &c.s3["AWS_ACCESS_KEY_ID"]])
            .args(["--secret", &c.s3["AWS_SECRET_ACCESS_KEY"]])
            .args(["--region", "us-east-1", "--cert"])
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .arg("posix")
            .arg(c.home.join("s3"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let s = TlsS3 {
            child,
            endpoint: format!("https://{host}:{port}"),
            ca_pem: ca.pem(),
            _dir: dir,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect((host.as_str(), port)).is_err() {
            ensure!(
                start.elapsed() < Duration::from_secs(20),
                "TLS versitygw did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }
}

/// A BackupStorageLocation whose S3 endpoint speaks HTTPS with a private CA: without the CA the DU fails
/// with a message naming caCert; with `caCert` (inline), with `caCertRef` (a Secret key) and with
/// `insecureSkipTLSVerify` it completes.
#[test]
fn tls_endpoint_with_private_ca() {
    use base64::Engine as _;
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-tls").expect("namespace");
    t.run(&logs(), |t| -> Result<()> {
        let s3 = TlsS3::start(&c)?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&s3.ca_pem);
        let mut yaml = format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ferry-e2e-ca\n  namespace: {VELERO_NS}\nstringData:\n  \
             bundle.pem: {:?}\n",
            s3.ca_pem
        );
        let cases = [
            ("none", String::new(), String::new()),
            ("ca", format!("    caCert: {b64}\n"), String::new()),
            (
                "ref",
                "    caCertRef:\n      name: ferry-e2e-ca\n      key: bundle.pem\n".to_string(),
                String::new(),
            ),
            ("insecure", String::new(), "    insecureSkipTLSVerify: \"true\"\n".to_string()),
        ];
        for (name, storage, config) in &cases {
            yaml += &format!(
                "---\napiVersion: velero.io/v1\nkind: BackupStorageLocation\nmetadata:\n  name: {}-tls-{name}\n  \
                 namespace: {VELERO_NS}\nspec:\n  provider: aws\n  objectStorage:\n    bucket: {}\n    prefix: e2e-tls\n\
                 {storage}  credential:\n    name: ferry-e2e-s3\n    key: cloud\n  config:\n    region: us-east-1\n    \
                 s3ForcePathStyle: \"true\"\n    s3Url: {}\n{config}",
                t.ns, c.s3["FERRY_S3_BUCKET"], s3.endpoint
            );
        }
        c.apply(&yaml)?;
        volume_with_snapshot(t, &image, 4, "tls-none")?;
        let snaps: Vec<String> = cases[1..].iter().map(|(n, _, _)| format!("tls-{n}")).collect();
        take_snapshots(t, "data", &snaps.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut dus = Vec::new();
        for (name, _, _) in &cases {
            let du = format!("{}-{name}", t.ns);
            let bsl = format!("{}-tls-{name}", t.ns);
            c.apply(&data_upload(&du, &t.ns, "data", &format!("tls-{name}"), "ferry", &bsl))?;
            dus.push((name, du));
        }
        for (name, du) in &dus {
            let (phase, msg, _) = wait_terminal(&c, "dataupload", du, Duration::from_secs(300))?;
            eprintln!("TLS case {name}: {phase}: {msg}");
            if **name == "none" {
                ensure!(
                    phase == "Failed" && msg.contains("caCert"),
                    "untrusted endpoint: {phase}: {msg}"
                );
            } else {
                ensure!(phase == "Completed", "TLS case {name} ended {phase}: {msg}");
            }
            assert_cleaned_up(&c, "dataupload", du)?;
        }
        for (name, du) in &dus {
            delete_cr(&c, "dataupload", du);
            let _ = c.kubectl_output(&["-n", VELERO_NS, "delete", "backupstoragelocation", &format!("{}-tls-{name}", t.ns)]);
        }
        let _ = c.kubectl_output(&["-n", VELERO_NS, "delete", "secret", "ferry-e2e-ca"]);
        drop(s3);
        Ok(())
    });
}
