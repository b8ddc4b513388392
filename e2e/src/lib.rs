//! Harness for Ferry's end-to-end tests: locates the local cluster started by `e2e/cluster/up`
//! and drives it with `kubectl` subprocesses.
//!
//! `up` writes `$FERRY_E2E_HOME/cluster.env` (default `/var/lib/ferry-e2e`) with the kubeconfig,
//! the binaries directory, the node name, the storage/snapshot class names and the test image;
//! `$FERRY_E2E_HOME/s3.env` holds the S3 endpoint, bucket and credentials.
//! Tests fail loudly when the cluster is not up, and print the tail of the components' logs on failure.

pub mod ferry;

use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Reads a `KEY=VALUE` file (comments and blank lines ignored, no shell quoting).
pub fn read_env_file(path: &Path) -> Result<BTreeMap<String, String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect())
}

/// The running local cluster, as described by `cluster.env` and `s3.env`.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `$FERRY_E2E_HOME`.
    pub home: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Directory with kubectl, s3probe and the other cluster binaries.
    pub bin: PathBuf,
    /// Everything from `cluster.env`.
    pub env: BTreeMap<String, String>,
    /// Everything from `s3.env`.
    pub s3: BTreeMap<String, String>,
}

/// Content and metadata of every entry under /data (the root itself excluded), one line each: run
/// in a pod that mounts a volume at /data, it prints what a restore must reproduce.
pub const MANIFEST: &str = "cd /data && find . -mindepth 1 ! -name lost+found | sort | while read f; do \
    if [ -L \"$f\" ]; then echo \"$f link $(readlink \"$f\")\"; \
    elif [ -f \"$f\" ]; then echo \"$f $(stat -c '%a %u %g %s %Y' \"$f\") $(md5sum < \"$f\" | cut -c1-32)\"; \
    else echo \"$f $(stat -c '%F %a %u %g %Y' \"$f\")\"; fi; done";

/// Component logs worth showing when a test fails.
pub const DEFAULT_LOGS: &[&str] = &[
    "kubelet",
    "csi-hostpath",
    "csi-provisioner",
    "csi-snapshotter",
    "snapshot-controller",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "s3",
];

impl Cluster {
    /// Finds the cluster or fails with a clear message (never skips).
    pub fn connect() -> Result<Self> {
        let home = PathBuf::from(
            std::env::var("FERRY_E2E_HOME").unwrap_or_else(|_| "/var/lib/ferry-e2e".to_string()),
        );
        let env_file = home.join("cluster.env");
        if !env_file.exists() {
            bail!(
                "the e2e cluster is not up: {} is missing. Run `e2e/cluster/build && e2e/cluster/up` first \
                 (or `e2e/cluster/test` for everything)",
                env_file.display()
            );
        }
        let env = read_env_file(&env_file)?;
        let s3 = read_env_file(&home.join("s3.env"))?;
        let get = |k: &str| {
            env.get(k)
                .cloned()
                .ok_or_else(|| anyhow!("{k} missing in {}", env_file.display()))
        };
        let c = Cluster {
            kubeconfig: PathBuf::from(get("KUBECONFIG")?),
            bin: PathBuf::from(get("FERRY_E2E_BIN")?),
            home,
            env,
            s3,
        };
        let out = c.kubectl_output(&["get", "--raw", "/readyz"]);
        match out {
            Ok(s) if s.trim() == "ok" => Ok(c),
            other => {
                let status = Command::new(c.script("status")).output();
                let status = status
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                bail!(
                    "the e2e cluster is not ready (apiserver /readyz: {other:?}).\n`e2e/cluster/status`:\n{status}"
                )
            }
        }
    }

    /// Path of one of the `e2e/cluster/*` scripts.
    pub fn script(&self, name: &str) -> PathBuf {
        manifest_dir().join("cluster").join(name)
    }

    /// A value from `cluster.env`.
    pub fn var(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or_default()
    }

    /// Node name of the single node.
    pub fn node(&self) -> &str {
        self.var("FERRY_NODE_NAME")
    }

    /// `kubectl` with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// Runs kubectl and returns stdout, or an error with stderr.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .kubectl()
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` with the given manifest.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.apply_in(&[], yaml)
    }

    /// `kubectl <pre> apply -f -` with the given manifest (`pre`: e.g. `-n ns`).
    pub fn apply_in(&self, pre: &[&str], yaml: &str) -> Result<()> {
        let mut child = self
            .kubectl()
            .args(pre)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl apply")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply failed: {}\n{yaml}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `kubectl get` of one jsonpath expression ("" when the object or field is absent).
    pub fn jsonpath(&self, ns: &str, obj: &str, path: &str) -> String {
        self.kubectl_output(&["-n", ns, "get", obj, "-o", &format!("jsonpath={path}")])
            .unwrap_or_default()
    }

    /// Runs `s3probe` on the host with the S3 settings from `s3.env`.
    pub fn s3probe(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.bin.join("s3probe"))
            .args(args)
            .envs(&self.s3)
            .output()?;
        if !out.status.success() {
            bail!(
                "s3probe {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Builds an image from a static binary or a root-filesystem directory and imports it into the
    /// cluster's containerd (`e2e/cluster/load-image`). Returns the normalised image reference.
    pub fn load_image(&self, name_tag: &str, source: &Path) -> Result<String> {
        let out = Command::new(self.script("load-image"))
            .arg(name_tag)
            .arg(source)
            .output()?;
        if !out.status.success() {
            bail!(
                "load-image {name_tag} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The last `n` lines of a component's log under `$FERRY_E2E_HOME/logs/`.
    pub fn log_tail(&self, component: &str, n: usize) -> String {
        let p = self.home.join("logs").join(format!("{component}.log"));
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("({}: {e})", p.display()),
        }
    }
}

/// A test namespace with diagnostics on failure. Deleted on drop when the test passed.
pub struct TestNs {
    /// The cluster.
    pub cluster: Cluster,
    /// Namespace name.
    pub ns: String,
}

impl TestNs {
    /// Creates a fresh namespace `<prefix>-<unique>`.
    pub fn new(cluster: &Cluster, prefix: &str) -> Result<Self> {
        let uniq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            % 1_000_000_000;
        let ns = format!("{prefix}-{uniq}-{}", std::process::id() % 10_000);
        cluster.kubectl_output(&["create", "namespace", &ns])?;
        // The namespace's default ServiceAccount appears asynchronously; pods are rejected until then.
        let t = TestNs {
            cluster: cluster.clone(),
            ns,
        };
        t.wait("default service account", Duration::from_secs(60), || {
            Ok(t.cluster
                .kubectl_output(&["-n", &t.ns, "get", "serviceaccount", "default"])
                .is_ok())
        })?;
        Ok(t)
    }

    /// `kubectl apply` in this namespace (the manifest should not set a namespace).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.cluster.apply_in(&["-n", &self.ns], yaml)
    }

    /// jsonpath of an object in this namespace.
    pub fn jsonpath(&self, obj: &str, path: &str) -> String {
        self.cluster.jsonpath(&self.ns, obj, path)
    }

    /// Polls `f` every second until it returns true, up to `timeout`.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            match f() {
                Ok(true) => {
                    eprintln!("[{:>5.1}s] {what}: ok", start.elapsed().as_secs_f32());
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => eprintln!("[{:>5.1}s] {what}: {e:#}", start.elapsed().as_secs_f32()),
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until a pod reaches Succeeded; fails early if it reaches Failed.
    pub fn wait_pod_succeeded(&self, pod: &str, timeout: Duration) -> Result<()> {
        self.wait(&format!("pod {pod} Succeeded"), timeout, || {
            match self
                .jsonpath(&format!("pod/{pod}"), "{.status.phase}")
                .as_str()
            {
                "Succeeded" => Ok(true),
                "Failed" => bail!("pod {pod} Failed: {}", self.logs(pod)),
                _ => Ok(false),
            }
        })
    }

    /// Logs of a pod's (single) container.
    pub fn logs(&self, pod: &str) -> String {
        self.cluster
            .kubectl_output(&["-n", &self.ns, "logs", pod])
            .unwrap_or_else(|e| format!("(no logs: {e:#})"))
    }

    /// Prints everything useful for a failure: objects, events, pod logs, component log tails.
    pub fn diagnostics(&self, components: &[&str]) -> String {
        let mut s = String::new();
        let k = |args: &[&str]| {
            self.cluster
                .kubectl_output(args)
                .unwrap_or_else(|e| format!("{e:#}"))
        };
        // Disk or memory pressure makes the kubelet evict and refuse pods: say so first.
        s += "==== node conditions\n";
        s += &k(&[
            "get",
            "nodes",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}:{range .status.conditions[*]} {.type}={.status}{end}{\"\\n\"}{end}",
        ]);
        s += &format!(
            "==== disk\n{}\n",
            std::process::Command::new("df")
                .args(["-h", "/", &self.cluster.home.display().to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_else(|e| format!("df: {e}"))
        );
        s += &format!("==== namespace {} objects\n", self.ns);
        s += &k(&[
            "-n",
            &self.ns,
            "get",
            "pods,pvc,volumesnapshot",
            "-o",
            "wide",
        ]);
        s += "==== volumesnapshotcontents / pvs\n";
        s += &k(&["get", "volumesnapshotcontent,pv", "-o", "wide"]);
        s += "==== events\n";
        s += &k(&["-n", &self.ns, "get", "events", "--sort-by=.lastTimestamp"]);
        s += "==== pods described\n";
        s += &k(&["-n", &self.ns, "describe", "pods"]);
        for pod in k(&[
            "-n",
            &self.ns,
            "get",
            "pods",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        {
            s += &format!("==== logs of pod {pod}\n{}\n", self.logs(pod));
        }
        for c in components {
            s += &format!("==== tail of {c}.log\n{}\n", self.cluster.log_tail(c, 40));
        }
        // Ferry's own objects wherever they are (absent when Ferry is not deployed).
        s += "==== objects made by ferry-controller, all namespaces\n";
        s += &k(&[
            "get",
            "pods,pvc,volumesnapshot,volumesnapshotcontent,pv",
            "-A",
            "-l",
            "app.kubernetes.io/managed-by=ferry-controller",
            "-o",
            "wide",
        ]);
        s += "==== datauploads / datadownloads\n";
        s += &k(&["get", "datauploads,datadownloads", "-A", "-o", "wide"]);
        s += "==== ferry-controller logs\n";
        s += &k(&[
            "-n",
            "ferry-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=ferry-controller",
            "--tail=60",
            "--prefix",
        ]);
        s
    }

    /// Runs a test body; on error prints diagnostics and panics; on success deletes the namespace.
    pub fn run(self, components: &[&str], body: impl FnOnce(&TestNs) -> Result<()>) {
        match body(&self) {
            Ok(()) => {
                let _ = self
                    .cluster
                    .kubectl()
                    .args(["delete", "namespace", &self.ns, "--wait=false"])
                    .output();
            }
            Err(e) => {
                eprintln!("==== FAILED: {e:#}");
                eprintln!("{}", self.diagnostics(components));
                panic!(
                    "e2e test failed in namespace {} (kept for inspection): {e:#}",
                    self.ns
                );
            }
        }
    }
}

/// A pod that runs one shell script in the busybox test image and mounts `pvc` (if any) at /data.
pub fn script_pod(
    name: &str,
    image: &str,
    script: &str,
    pvc: Option<&str>,
    env: &[(&str, &str)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: Never\n  \
         terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    image: {image}\n    \
         imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", {script:?}]\n"
    );
    if !env.is_empty() {
        y += "    env:\n";
        for (k, v) in env {
            y += &format!("    - name: {k}\n      value: {v:?}\n");
        }
    }
    if let Some(pvc) = pvc {
        y += &format!(
            "    volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    \
             persistentVolumeClaim:\n      claimName: {pvc}\n"
        );
    }
    y
}

/// The e2e package's directory in the checkout under test. Read at run time (cargo sets it for test
/// binaries): cargo does not rebuild a test when only the checkout's path changes, so the compile-time value
/// can name another checkout (CI's clone would run the scripts of the tree the binary was first built in).
pub fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
