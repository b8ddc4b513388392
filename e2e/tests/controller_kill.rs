//! Controller replicas killed in every phase of DataUploads and DataDownloads (issue 10, fault suite): the
//! leader (every other kill, both replicas) is force-deleted — no graceful shutdown — whenever the test
//! sees a CR change phase: just created, Accepted, Prepared, InProgress, and just terminal (while its
//! objects are being cleaned up). Every CR must still reach the right terminal state (Completed; Canceled
//! for the one canceled as it started moving data), the restored data must be identical, and nothing Ferry
//! created may be left.
//! Runs alone (its own test binary): every kill stalls all reconciles until a replica takes the Lease.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use ferry_e2e::ferry::{
    BSL, VELERO_NS, assert_cleaned_up, cr_field, data_download, data_upload, deploy, wait_terminal,
};
use ferry_e2e::{Cluster, DEFAULT_LOGS, MANIFEST, TestNs, script_pod};

/// A CR's terminal phase and message.
type Ending = (String, String);

struct Killer<'a> {
    c: &'a Cluster,
    kills: usize,
    start: Instant,
    /// (kind, phase) of every kill.
    hit: Vec<(String, String)>,
}

impl Killer<'_> {
    /// Force-deletes the Lease holder if it still runs, otherwise (and every second time) both replicas.
    fn kill(&mut self, kind: &str, name: &str, phase: &str) -> Result<()> {
        let pods = self.c.kubectl_output(&[
            "-n",
            "ferry-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=ferry-controller",
            "-o",
            "name",
        ])?;
        let holder = self.c.jsonpath(
            "ferry-system",
            "lease/ferry-controller",
            "{.spec.holderIdentity}",
        );
        let leader_runs = !holder.is_empty() && pods.lines().any(|p| p == format!("pod/{holder}"));
        let both = self.kills % 2 == 1 || !leader_runs;
        let mut args = vec![
            "-n",
            "ferry-system",
            "delete",
            "pods",
            "--grace-period=0",
            "--force",
            "--wait=false",
            "--ignore-not-found",
        ];
        if both {
            args.extend(["-l", "app.kubernetes.io/name=ferry-controller"]);
        } else {
            args.push(&holder);
        }
        self.c.kubectl_output(&args)?;
        self.kills += 1;
        self.hit.push((kind.to_string(), phase.to_string()));
        eprintln!(
            "[{:>6.1}s] kill {}: {} ({kind}/{name} {phase})",
            self.start.elapsed().as_secs_f32(),
            self.kills,
            if both {
                "both replicas".to_string()
            } else {
                format!("leader {holder}")
            }
        );
        Ok(())
    }

    /// The phase of every CR of `kind` in Velero's namespace, by name, in one request (a request per CR made
    /// the loop slow enough to miss a phase of a few seconds).
    fn phases(&self, kind: &str) -> Result<std::collections::HashMap<String, String>> {
        let out = self.c.kubectl_output(&[
            "-n",
            VELERO_NS,
            "get",
            kind,
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}{" "}{.status.phase}{"\n"}{end}"#,
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, p)| (n.to_string(), p.trim().to_string()))
            .collect())
    }

    /// Creates the CRs, then follows their phases and kills the controller at every phase change it sees
    /// (the next change is only seen once a replica leads again), at most twice per phase and kind (once in
    /// Prepared) and `max_kills` in all. `cancel` is canceled in the first phase it is seen in. Returns each
    /// CR's terminal phase and message, and the phase `cancel` was canceled in.
    fn drive(
        &mut self,
        kind: &str,
        crs: &[(String, String)],
        cancel: Option<&str>,
        max_kills: usize,
    ) -> Result<(Vec<Ending>, Option<String>)> {
        let budget = self.kills + max_kills;
        let terminal = |p: &str| matches!(p, "Completed" | "Failed" | "Canceled");
        let mut last: Vec<String> = vec![String::new(); crs.len()];
        let mut canceled_in: Option<String> = None;
        for (i, (name, yaml)) in crs.iter().enumerate() {
            self.c.apply(yaml)?;
            if i == 0 && self.kills < budget {
                self.kill(kind, name, "created")?;
            }
        }
        let started = Instant::now();
        loop {
            let mut all_terminal = true;
            let phases = self.phases(kind)?;
            for (i, (name, _)) in crs.iter().enumerate() {
                let p = phases.get(name).cloned().unwrap_or_default();
                all_terminal &= terminal(&p);
                if p == last[i] {
                    continue;
                }
                last[i] = p.clone();
                if cancel == Some(name.as_str())
                    && !p.is_empty()
                    && !terminal(&p)
                    && canceled_in.is_none()
                {
                    self.c.kubectl_output(&[
                        "-n",
                        VELERO_NS,
                        "patch",
                        kind,
                        name,
                        "--type=merge",
                        "-p",
                        r#"{"spec":{"cancel":true}}"#,
                    ])?;
                    canceled_in = Some(p.clone());
                }
                let phase = if terminal(&p) { "terminal" } else { &p };
                // At most two kills per phase and kind (one in Prepared: a kill there lets the mover run
                // while no replica leads, so that CR is never seen InProgress), so the controller also gets
                // to the later phases.
                let hits = self
                    .hit
                    .iter()
                    .filter(|h| h.0 == kind && h.1 == phase)
                    .count();
                let cap = if phase == "Prepared" { 1 } else { 2 };
                // Until this kind's CR is seen InProgress, one kill at most after "created": each kill stalls the
                // controller for a lease while a mover may run, and a mover that runs to its end unseen leaves no
                // InProgress to kill in (the data path takes a few seconds).
                let in_progress_hit = self.hit.iter().any(|h| h.0 == kind && h.1 == "InProgress");
                let held_back = !in_progress_hit
                    && !matches!(phase, "created" | "InProgress")
                    && self.hit.iter().any(|h| h.0 == kind && h.1 != "created");
                if !p.is_empty() && self.kills < budget && hits < cap && !held_back {
                    self.kill(kind, name, phase)?;
                }
            }
            if all_terminal {
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(900),
                "{kind}s not terminal after 900s: {last:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let ends = crs
            .iter()
            .map(|(name, _)| {
                wait_terminal(self.c, kind, name, Duration::from_secs(1)).map(|(p, m, _)| (p, m))
            })
            .collect::<Result<_>>()?;
        Ok((ends, canceled_in))
    }
}

fn pvc(name: &str, selector: Option<&str>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  storageClassName: csi-hostpath-sc\n  \
         accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n"
    );
    if let Some(s) = selector {
        y += &format!("  selector:\n    matchLabels:\n      velero.io/dynamic-pv-restore: {s}\n");
    }
    y
}

fn snapshot(name: &str) -> String {
    format!(
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata:\n  name: {name}\nspec:\n  \
         volumeSnapshotClassName: csi-hostpath-snapclass\n  source:\n    persistentVolumeClaimName: data\n"
    )
}

#[test]
fn controller_killed_in_every_phase() {
    let c = Cluster::connect().unwrap_or_else(|e| panic!("{e:#}"));
    deploy(&c).unwrap_or_else(|e| panic!("{e:#}"));
    let image = c.var("FERRY_TEST_IMAGE").to_string();
    let t = TestNs::new(&c, "e2e-kill").expect("namespace");
    t.run(DEFAULT_LOGS, |t| -> Result<()> {
        // A volume big enough that the mover runs for a few seconds, and one snapshot per DataUpload.
        t.apply(&pvc("data", None))?;
        let write = format!(
            "set -e; cd /data; mkdir -p d/e; seq 1 100000 > d/numbers.txt; dd if=/dev/urandom of=d/e/r.bin bs=1M count=200 2>/dev/null; \
             ln -s ../numbers.txt d/e/link; chmod 0640 d/numbers.txt; chown 42:43 d/numbers.txt; sync; {MANIFEST}"
        );
        t.apply(&script_pod("writer", &image, &write, Some("data"), &[]))?;
        t.wait_pod_succeeded("writer", Duration::from_secs(180))?;
        let manifest = t.logs("writer");
        let snaps = ["k1", "k2", "k3"];
        for s in snaps {
            t.apply(&snapshot(s))?;
        }
        t.wait("VolumeSnapshots ready", Duration::from_secs(120), || {
            Ok(snaps.iter().all(|n| t.jsonpath(&format!("volumesnapshot/{n}"), "{.status.readyToUse}") == "true"))
        })?;
        let mut k = Killer { c: &c, kills: 0, start: Instant::now(), hit: Vec::new() };

        // Backups (one canceled in the first phase it is seen in); perNodeLimit 1 runs their movers one after another, so
        // the kills fall into every phase of one or another.
        let dus: Vec<(String, String)> = snaps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let du = format!("{}-u{i}", t.ns);
                let yaml = data_upload(&du, &t.ns, "data", s, "ferry", BSL);
                (du, yaml)
            })
            .collect();
        let canceled = dus[1].0.clone();
        let (ends, canceled_in) = k.drive("dataupload", &dus, Some(&canceled), 9)?;
        eprintln!("{canceled} canceled while {canceled_in:?}");
        let mut sid = String::new();
        for ((du, _), (phase, msg)) in dus.iter().zip(&ends) {
            if *du == canceled {
                // Canceled while InProgress, the mover may finish first and the DU end Completed; both are right.
                let may_complete = canceled_in.as_deref() == Some("InProgress");
                ensure!(
                    phase == "Canceled" || (may_complete && phase == "Completed"),
                    "{du}: {phase} ({msg}), want Canceled"
                );
            } else {
                ensure!(phase == "Completed", "{du}: {phase} ({msg})");
                sid = cr_field(&c, "dataupload", du, "{.status.snapshotID}");
            }
            assert_cleaned_up(&c, "dataupload", du)?;
        }

        // Restores into PVCs shaped as Velero restores them; each restores identical data.
        let mut dds = Vec::new();
        for i in 0..2 {
            let r = format!("r{i}");
            t.apply(&pvc(&r, Some(&format!("{}.{r}.kill", t.ns))))?;
            let dd = format!("{}-d{i}", t.ns);
            let yaml = data_download(&dd, &t.ns, &r, &t.ns, &sid);
            dds.push((dd, yaml));
        }
        let (ends, _) = k.drive("datadownload", &dds, None, 7)?;
        for (i, ((dd, _), (phase, msg))) in dds.iter().zip(&ends).enumerate() {
            ensure!(phase == "Completed", "{dd}: {phase} ({msg})");
            assert_cleaned_up(&c, "datadownload", dd)?;
            let reader = format!("reader{i}");
            t.apply(&script_pod(&reader, &image, MANIFEST, Some(&format!("r{i}")), &[]))?;
            t.wait_pod_succeeded(&reader, Duration::from_secs(120))?;
            let got = t.logs(&reader);
            ensure!(got == manifest, "{dd} restored a different tree:\n--- backup\n{manifest}\n--- restore\n{got}");
        }
        eprintln!(
            "controller killed {} times in {:.0}s, in {:?}; every CR ended right, nothing left",
            k.kills,
            k.start.elapsed().as_secs_f32(),
            k.hit
        );
        ensure!(k.kills >= 10, "only {} kills", k.kills);
        for phase in ["created", "Accepted", "InProgress", "terminal"] {
            ensure!(k.hit.iter().any(|(_, p)| p == phase), "no kill while a CR was {phase}: {:?}", k.hit);
        }
        for kind in ["dataupload", "datadownload"] {
            let names = c.kubectl_output(&["-n", VELERO_NS, "get", kind, "-o", "name"])?;
            for n in names.lines().filter(|n| n.contains(&t.ns)) {
                c.kubectl_output(&["-n", VELERO_NS, "delete", n, "--wait=true", "--timeout=60s"])?;
            }
        }
        if !c.kubectl_output(&["-n", "ferry-system", "get", "pods", "-o", "name"])?.contains("ferry-controller") {
            bail!("no controller pod came back");
        }
        Ok(())
    });
}
