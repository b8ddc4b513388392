//! Unmodified Velero (v1.17.2, built from the Go module proxy by `e2e/velero/build`) drives Ferry on the
//! local cluster: `velero backup create --snapshot-move-data --data-mover ferry`, restore after the
//! namespace is gone, an incremental second backup. Velero runs as a host process (`e2e/velero/up`).
//! Fails, never skips, when the cluster is not up.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ferry_e2e::ferry::{VELERO_NS, deploy};
use ferry_e2e::{Cluster, DEFAULT_LOGS, TestNs, script_pod};

/// Velero first, with its own CRDs (as for a user who had Velero before adding Ferry), then Ferry: its
/// deploy must bring the BSL schema Ferry reads (`caCertRef` is newer than Velero v1.17's CRD), or the
/// apiserver rejects BSLs that use it (a cluster left with Velero's CRDs failed CI that way).
fn setup() -> Cluster {
    let c = Cluster::connect().unwrap_or_else(|e| panic!("{e:#}"));
    const BSL_CRD: &str = "crd/backupstoragelocations.velero.io";
    // A Velero server left running would keep e2e/velero/up from installing its CRDs.
    let down = ferry_e2e::manifest_dir().join("velero/down");
    assert!(
        Command::new(&down)
            .status()
            .expect("running e2e/velero/down")
            .success()
    );
    c.kubectl_output(&["delete", BSL_CRD, "--ignore-not-found", "--wait"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let script = ferry_e2e::manifest_dir().join("velero/up");
    let out = Command::new(&script)
        .output()
        .expect("running e2e/velero/up");
    assert!(
        out.status.success(),
        "e2e/velero/up failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    deploy(&c).unwrap_or_else(|e| panic!("{e:#}"));
    let schema = c
        .kubectl_output(&["get", BSL_CRD, "-o", "jsonpath={.spec.versions[0].schema}"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        schema.contains("caCertRef"),
        "after scripts/deploy the BSL CRD is still Velero v1.17's, without caCertRef"
    );
    c
}

fn velero(c: &Cluster, args: &[&str]) -> Result<String> {
    let out = Command::new(c.home.join("velero/velero"))
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-n", VELERO_NS])
        .args(args)
        .output()
        .context("running velero")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("velero {} failed: {text}", args.join(" "));
    }
    Ok(text)
}

/// Whether Velero's last validation of the BSL `default` found it Available.
fn bsl_available(c: &Cluster) -> bool {
    c.jsonpath(VELERO_NS, "bsl/default", "{.status.phase}") == "Available"
}

/// `velero backup create <name> --include-namespaces <ns> --snapshot-move-data --data-mover <mover>` as a
/// careful user runs it. Velero fails a backup at once (FailedValidation) when its periodic validation of
/// the BSL last said Unavailable (seen under CI load, before Ferry is involved): wait until the BSL is
/// Available, and when a backup still failed validation for that reason, print the BSL's message (why it
/// was Unavailable) and create the backup again, up to three times. Returns once the backup has passed
/// validation; with `wait`, once it has ended, with its phase.
fn backup_create(t: &TestNs, name: &str, mover: &str, wait: bool) -> Result<String> {
    let c = &t.cluster;
    let phase = || c.jsonpath(VELERO_NS, &format!("backup/{name}"), "{.status.phase}");
    for attempt in 1..=3 {
        t.wait("BSL default Available", Duration::from_secs(120), || {
            Ok(bsl_available(c))
        })?;
        let args = [
            "backup",
            "create",
            name,
            "--include-namespaces",
            &t.ns,
            "--snapshot-move-data",
            "--data-mover",
            mover,
        ];
        velero(c, &args)?;
        t.wait(
            &format!("backup {name} validated"),
            Duration::from_secs(60),
            || Ok(!matches!(phase().as_str(), "" | "New")),
        )?;
        if phase() != "FailedValidation" {
            break;
        }
        let errors = c.jsonpath(
            VELERO_NS,
            &format!("backup/{name}"),
            "{.status.validationErrors}",
        );
        ensure!(
            errors.contains("Unavailable") && attempt < 3,
            "backup {name} failed validation: {errors}"
        );
        let why = c.jsonpath(VELERO_NS, "bsl/default", "{.status.message}");
        eprintln!(
            "backup {name} failed validation ({errors}); the BSL said: {why:?}; creating it again"
        );
        velero(c, &["backup", "delete", name, "--confirm"])?;
        t.wait(
            &format!("failed backup {name} gone"),
            Duration::from_secs(120),
            || {
                Ok(c.kubectl_output(&["-n", VELERO_NS, "get", "backup", name])
                    .is_err())
            },
        )?;
    }
    if wait {
        t.wait(
            &format!("backup {name} ended"),
            Duration::from_secs(600),
            || {
                Ok(matches!(
                    phase().as_str(),
                    "Completed" | "PartiallyFailed" | "Failed"
                ))
            },
        )?;
    }
    Ok(phase())
}

/// Where a backup deletion stands: the Backup, Velero's DeleteBackupRequests, Ferry's maintenance pod and its
/// log, and what Velero and Ferry logged about the backup.
fn deletion_state(c: &Cluster, backup: &str) -> String {
    let k = |args: &[&str]| c.kubectl_output(args).unwrap_or_else(|e| format!("{e:#}"));
    let maintenance = format!("ferry-prune-{backup}");
    let ferry_log = k(&[
        "-n",
        "ferry-system",
        "logs",
        "-l",
        "app.kubernetes.io/name=ferry-controller",
        "--tail=-1",
        "--prefix",
    ]);
    let mentions = |log: &str| -> String {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(backup)).collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    format!(
        "state of the deletion of {backup}:\n==== backup\n{}\n==== deletebackuprequests\n{}\n==== pods in {VELERO_NS}\n{}\n\
         ==== maintenance pod\n{}\n==== its log\n{}\n==== ferry-controller lines naming {backup}\n{}\n\
         ==== velero.log lines naming {backup}\n{}",
        k(&["-n", VELERO_NS, "get", "backup", backup, "-o", "yaml"]),
        k(&["-n", VELERO_NS, "get", "deletebackuprequests", "-o", "yaml"]),
        k(&[
            "-n",
            VELERO_NS,
            "get",
            "pods",
            "-o",
            "wide",
            "--show-labels"
        ]),
        k(&["-n", VELERO_NS, "describe", "pod", &maintenance]),
        k(&["-n", VELERO_NS, "logs", &maintenance]),
        mentions(&ferry_log),
        mentions(&std::fs::read_to_string(c.home.join("logs/velero.log")).unwrap_or_default()),
    )
}

/// Two pods, three PVCs (p1 mounts a and b, p2 mounts c), known data in each.
fn app(image: &str) -> String {
    let mut y = String::new();
    for p in ["a", "b", "c"] {
        y += &format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {p}\nspec:\n  storageClassName: csi-hostpath-sc\n  \
             accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n---\n"
        );
    }
    let seed = |d: &str, mb: u32| {
        format!(
            "[ -f {d}/.seeded ] || {{ mkdir -p {d}/sub/deep {d}/empty; dd if=/dev/urandom of={d}/data.bin bs=1M count={mb} 2>/dev/null; \
             seq 1 100000 > {d}/sub/numbers.txt; echo hi > {d}/sub/deep/x; ln -s ../data.bin {d}/sub/link; chmod 0600 {d}/sub/deep/x; \
             chown 1000:1000 {d}/sub/numbers.txt; touch -d '2021-05-06 07:08:09' {d}/sub/deep/x; touch {d}/.seeded; }}; "
        )
    };
    y += &format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p1\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    \
         image: {image}\n    imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", {cmd:?}]\n    volumeMounts:\n    \
         - {{name: a, mountPath: /a}}\n    - {{name: b, mountPath: /b}}\n  volumes:\n  - {{name: a, persistentVolumeClaim: {{claimName: a}}}}\n  \
         - {{name: b, persistentVolumeClaim: {{claimName: b}}}}\n---\n",
        cmd = format!(
            "{}{}sync; touch /tmp/ready; sleep 100000",
            seed("/a", 24),
            seed("/b", 16)
        )
    );
    y += &format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p2\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    \
         image: {image}\n    imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", {cmd:?}]\n    volumeMounts:\n    \
         - {{name: c, mountPath: /c}}\n  volumes:\n  - {{name: c, persistentVolumeClaim: {{claimName: c}}}}\n",
        cmd = format!("{}sync; sleep 100000", seed("/c", 40))
    );
    y
}

/// Content and metadata of every entry of the three volumes, from a pod mounting all of them.
fn manifest(t: &TestNs, image: &str, pod: &str) -> Result<String> {
    let script = "for v in /a /b /c; do cd $v && find . -mindepth 1 | sort | while read f; do \
        if [ -L \"$f\" ]; then echo \"$v/$f link $(readlink \"$f\")\"; \
        elif [ -f \"$f\" ]; then echo \"$v/$f $(stat -c '%a %u %g %s %Y' \"$f\") $(md5sum < \"$f\" | cut -c1-32)\"; \
        else echo \"$v/$f $(stat -c '%F %a %u %g %Y' \"$f\")\"; fi; done; done";
    let mut y = script_pod(pod, image, script, None, &[]);
    y += "    volumeMounts:\n    - {name: a, mountPath: /a}\n    - {name: b, mountPath: /b}\n    - {name: c, mountPath: /c}\n  volumes:\n";
    for v in ["a", "b", "c"] {
        y += &format!("  - {{name: {v}, persistentVolumeClaim: {{claimName: {v}}}}}\n");
    }
    t.apply(&y)?;
    t.wait_pod_succeeded(pod, Duration::from_secs(180))?;
    let m = t.logs(pod);
    ensure!(m.lines().count() >= 21, "short manifest:\n{m}");
    Ok(m)
}

/// A DataUpload of a backup: name, phase, total bytes, incremental bytes, data mover.
type DuRow = (String, String, u64, u64, String);

fn data_uploads(c: &Cluster, backup: &str) -> Result<Vec<DuRow>> {
    let out = c.kubectl_output(&[
        "-n", VELERO_NS, "get", "datauploads", "-l", &format!("velero.io/backup-name={backup}"), "-o",
        "jsonpath={range .items[*]}{.metadata.name}|{.status.phase}|{.status.progress.totalBytes}|{.status.dataMoverResult.incrementalBytes}|{.spec.datamover}{\"\\n\"}{end}",
    ])?;
    Ok(out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
            (
                f.first().unwrap_or(&"").to_string(),
                f.get(1).unwrap_or(&"").to_string(),
                num(2),
                num(3),
                f.get(4).unwrap_or(&"").to_string(),
            )
        })
        .collect())
}

fn assert_nothing_left(c: &Cluster) -> Result<()> {
    let start = Instant::now();
    loop {
        let left = c.kubectl_output(&[
            "get",
            "pods,pvc,volumesnapshot",
            "-A",
            "-l",
            "app.kubernetes.io/managed-by=ferry-controller",
            "-o",
            "name",
        ])? + &c.kubectl_output(&[
            "get",
            "volumesnapshotcontent,pv",
            "-l",
            "app.kubernetes.io/managed-by=ferry-controller",
            "-o",
            "name",
        ])?;
        if left.trim().is_empty() {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "left behind by Ferry: {left}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Scenarios 1-3 of issue 5: backup of a namespace with two pods and three CSI PVCs through Velero, restore
/// after deleting the namespace (pods run on the restored volumes, every file identical), and an
/// incremental second backup after a small change.
#[test]
fn velero_backup_restore_incremental() {
    let c = setup();
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "app").expect("namespace");
    let ns = t.ns.clone();
    // Velero's own log too: a failure before Ferry is involved is read there.
    let logs: Vec<&str> = DEFAULT_LOGS.iter().copied().chain(["velero"]).collect();
    t.run(&logs, |t| -> Result<()> {
        t.apply(&app(&image))?;
        t.wait("app pods running", Duration::from_secs(180), || {
            Ok(t.jsonpath("pod/p1", "{.status.phase}") == "Running" && t.jsonpath("pod/p2", "{.status.phase}") == "Running")
        })?;
        std::thread::sleep(Duration::from_secs(3));
        let before = manifest(t, &image, "check1")?;

        // 1. Backup.
        let b1 = format!("{ns}-b1");
        let start = Instant::now();
        let phase = backup_create(t, &b1, "ferry", true)?;
        let backup_time = start.elapsed();
        ensure!(phase == "Completed", "backup {b1} {phase}");
        let dus = data_uploads(&c, &b1)?;
        eprintln!("scenario 1: backup {b1} in {:.1}s, DataUploads {dus:?}", backup_time.as_secs_f64());
        ensure!(dus.len() == 3, "expected 3 DataUploads: {dus:?}");
        ensure!(dus.iter().all(|d| d.1 == "Completed" && d.4 == "ferry" && d.2 > 0), "{dus:?}");
        let moved: u64 = dus.iter().map(|d| d.2).sum();
        let details = velero(&c, &["backup", "describe", &b1, "--details"])?;
        ensure!(details.contains("Data Mover: ferry") && details.contains("Moved data Size (bytes)"), "{details}");
        let columns = c.kubectl_output(&["-n", VELERO_NS, "get", "datauploads", "-l", &format!("velero.io/backup-name={b1}")])?;
        eprintln!("{columns}");
        ensure!(columns.contains("ferry-node") && columns.contains("Completed"), "kubectl get columns empty:\n{columns}");
        assert_nothing_left(&c)?;

        // 2. Delete the namespace, restore.
        c.kubectl_output(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"])?;
        let r1 = format!("{ns}-r1");
        let start = Instant::now();
        let out = velero(&c, &["restore", "create", &r1, "--from-backup", &b1, "--wait"])?;
        let restore_time = start.elapsed();
        ensure!(out.contains("Completed"), "restore not Completed:\n{out}");
        eprintln!("scenario 2: restore {r1} in {:.1}s ({moved} bytes)", restore_time.as_secs_f64());
        t.wait("restored pods running", Duration::from_secs(180), || {
            Ok(t.jsonpath("pod/p1", "{.status.phase}") == "Running" && t.jsonpath("pod/p2", "{.status.phase}") == "Running")
        })?;
        let after = manifest(t, &image, "check2")?;
        ensure!(after == before, "restored data differs:\n--- before\n{before}\n--- after\n{after}");
        assert_nothing_left(&c)?;

        // 3. Change about 1%, back up again.
        t.apply(&script_pod(
            "mutate",
            &image,
            "echo changed >> /data/sub/numbers.txt; dd if=/dev/urandom of=/data/new.bin bs=64k count=8 2>/dev/null; sync",
            Some("a"),
            &[],
        ))?;
        t.wait_pod_succeeded("mutate", Duration::from_secs(120))?;
        let b2 = format!("{ns}-b2");
        let phase = backup_create(t, &b2, "ferry", true)?;
        ensure!(phase == "Completed", "second backup {b2} {phase}");
        let dus2 = data_uploads(&c, &b2)?;
        let total: u64 = dus2.iter().map(|d| d.2).sum();
        let inc: u64 = dus2.iter().map(|d| d.3).sum();
        eprintln!("scenario 3: {inc} incremental of {total} bytes: {dus2:?}");
        ensure!(dus2.len() == 3 && inc < total / 10, "incremental {inc} not much smaller than {total}");
        assert_nothing_left(&c)?;
        let at_b2 = manifest(t, &image, "check3")?;

        // 4. Delete b1: Ferry forgets its snapshots and prunes what only b1 used; b2 still restores.
        let repo_dir = c.home.join("s3").join(&c.s3["FERRY_S3_BUCKET"]).join("velero/plugins/ferry").join(&ns);
        let count = |d: &str| std::fs::read_dir(repo_dir.join(d)).map(|r| r.count()).unwrap_or(0);
        let data_bytes = || -> u64 {
            fn walk(p: &std::path::Path) -> u64 {
                std::fs::read_dir(p)
                    .map(|r| {
                        r.flatten()
                            .map(|e| if e.path().is_dir() { walk(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) })
                            .sum()
                    })
                    .unwrap_or(0)
            }
            walk(&repo_dir.join("data"))
        };
        let (snaps_before, bytes_before) = (count("snapshots"), data_bytes());
        ensure!(snaps_before == 6, "expected 6 snapshots (b1, b2) in {}: {snaps_before}", repo_dir.display());
        ensure!(
            c.jsonpath(VELERO_NS, &format!("backup/{b1}"), "{.metadata.finalizers}").contains("ferry.dev/backup-data"),
            "Ferry holds no finalizer on {b1}"
        );
        velero(&c, &["backup", "delete", &b1, "--confirm"])?;
        t.wait("backup b1 deleted and released by Ferry", Duration::from_secs(240), || {
            // Velero refuses a deletion while its BSL validation says Unavailable (seen under CI load: the
            // request ends Processed with that error and nothing is deleted). As a user would, ask again
            // once the BSL is Available: this test is about Ferry's part of the deletion.
            let refused = c
                .jsonpath(VELERO_NS, "deletebackuprequests", "{.items[*].status.errors}")
                .contains("Unavailable state");
            if refused && bsl_available(&c) {
                eprintln!("scenario 4: Velero refused the deletion while its BSL was Unavailable; asking again");
                c.kubectl_output(&["-n", VELERO_NS, "delete", "deletebackuprequests", "-l", &format!("velero.io/backup-name={b1}")])?;
                velero(&c, &["backup", "delete", &b1, "--confirm"])?;
            }
            Ok(c.kubectl_output(&["-n", VELERO_NS, "get", "backup", &b1]).is_err())
        })
        .map_err(|e| e.context(deletion_state(&c, &b1)))?;
        let (snaps_after, bytes_after) = (count("snapshots"), data_bytes());
        eprintln!(
            "scenario 4: snapshots {snaps_before} -> {snaps_after}, pack bytes {bytes_before} -> {bytes_after}"
        );
        ensure!(snaps_after == 3, "b1's snapshots not forgotten: {snaps_after} left");
        ensure!(bytes_after < bytes_before, "nothing pruned: {bytes_before} -> {bytes_after}");
        c.kubectl_output(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"])?;
        let r2 = format!("{ns}-r2");
        let out = velero(&c, &["restore", "create", &r2, "--from-backup", &b2, "--wait"])?;
        ensure!(out.contains("Completed"), "restore of b2 not Completed:\n{out}");
        t.wait("pods of b2 running", Duration::from_secs(180), || {
            Ok(t.jsonpath("pod/p1", "{.status.phase}") == "Running" && t.jsonpath("pod/p2", "{.status.phase}") == "Running")
        })?;
        let restored = manifest(t, &image, "check4")?;
        let at_b2: String = at_b2.lines().filter(|l| !l.contains("check")).collect::<Vec<_>>().join("\n");
        let restored: String = restored.lines().filter(|l| !l.contains("check")).collect::<Vec<_>>().join("\n");
        ensure!(restored == at_b2, "b2 restored differently:\n--- b2\n{at_b2}\n--- restored\n{restored}");
        assert_nothing_left(&c)?;

        // 5. Velero killed during a backup and restarted: its DUs end canceled (or done), nothing is left,
        // the next backup succeeds.
        let b3 = format!("{ns}-b3");
        backup_create(t, &b3, "ferry", false)?;
        let start = Instant::now();
        while data_uploads(&c, &b3)?.is_empty() {
            ensure!(start.elapsed() < Duration::from_secs(120), "b3 created no DataUpload");
            std::thread::sleep(Duration::from_millis(100));
        }
        let down = ferry_e2e::manifest_dir().join("velero/down");
        let up = ferry_e2e::manifest_dir().join("velero/up");
        ensure!(Command::new(&down).arg("--kill").status()?.success(), "velero/down failed");
        eprintln!("scenario 5: Velero killed with DataUploads {:?}", data_uploads(&c, &b3)?);
        ensure!(Command::new(&up).status()?.success(), "velero/up failed");
        t.wait("b3's DataUploads terminal", Duration::from_secs(180), || {
            let dus = data_uploads(&c, &b3)?;
            Ok(!dus.is_empty() && dus.iter().all(|d| matches!(d.1.as_str(), "Completed" | "Canceled" | "Failed")))
        })?;
        let dus3 = data_uploads(&c, &b3)?;
        eprintln!("scenario 5: DataUploads of b3 after the Velero restart: {dus3:?}");
        ensure!(dus3.iter().all(|d| d.1 != "Failed"), "{dus3:?}");
        let backup_phase = c.jsonpath(VELERO_NS, &format!("backup/{b3}"), "{.status.phase}");
        eprintln!("scenario 5: backup b3 after the restart: {backup_phase}");
        assert_nothing_left(&c)?;
        let b4 = format!("{ns}-b4");
        let phase = backup_create(t, &b4, "ferry", true)?;
        ensure!(phase == "Completed", "backup {b4} after the Velero restart {phase}");
        assert_nothing_left(&c)?;

        // 6. A second data path through the same controller: the Go example (examples/tar-datapath,
        // registered as the mover "tar-example"), driven by unmodified Velero over the data-path API.
        let at_b5 = contents(&manifest(t, &image, "check5")?);
        let b5 = format!("{ns}-b5");
        let phase = backup_create(t, &b5, "tar-example", true)?;
        ensure!(phase == "Completed", "tar-example backup {b5} {phase}");
        let dus5 = data_uploads(&c, &b5)?;
        eprintln!("scenario 6: tar-example DataUploads {dus5:?}");
        ensure!(dus5.len() == 3 && dus5.iter().all(|d| d.1 == "Completed" && d.4 == "tar-example" && d.2 > 0), "{dus5:?}");
        let described = c.kubectl_output(&["-n", VELERO_NS, "describe", "dataupload", &dus5[0].0])?;
        ensure!(described.contains("FerryCompleted"), "no progress events in kubectl describe:\n{described}");
        // The data path's own result entries reach the DataUpload (the example names its tar object).
        let object = c.kubectl_output(&["-n", VELERO_NS, "get", "dataupload", &dus5[0].0, "-o", "jsonpath={.status.dataMoverResult.object}"])?;
        ensure!(object.contains("/plugins/tar-example/") && object.ends_with(".tar.gz"), "dataMoverResult.object: {object:?}");
        assert_nothing_left(&c)?;
        c.kubectl_output(&["delete", "namespace", &ns, "--wait=true", "--timeout=180s"])?;
        let r5 = format!("{ns}-r5");
        let out = velero(&c, &["restore", "create", &r5, "--from-backup", &b5, "--wait"])?;
        ensure!(out.contains("Completed"), "tar-example restore not Completed:\n{out}");
        t.wait("pods of b5 running", Duration::from_secs(180), || {
            Ok(t.jsonpath("pod/p1", "{.status.phase}") == "Running" && t.jsonpath("pod/p2", "{.status.phase}") == "Running")
        })?;
        let restored = contents(&manifest(t, &image, "check6")?);
        ensure!(restored == at_b5, "tar-example restored differently:\n--- b5\n{at_b5}\n--- restored\n{restored}");
        assert_nothing_left(&c)?;
        Ok(())
    });
}

/// A manifest reduced to what every data path must keep: paths, file contents (md5) and link targets, without
/// the manifest pods' own files.
fn contents(m: &str) -> String {
    m.lines()
        .filter(|l| !l.contains("check"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [path, "link", target] => format!("{path} -> {target}"),
                [path, .., md5] if md5.len() == 32 => format!("{path} {md5}"),
                [path, ..] => path.to_string(),
                [] => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
