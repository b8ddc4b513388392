//! The Helm chart (`manifests/helm/ferry`) renders into what the controller accepts: `helm lint` passes, the
//! rendered ConfigMap parses with the controller's own [`Config`] parser, its defaults are the code's
//! defaults, values reach the objects they name, and a mistyped field is refused by name. The install itself
//! is exercised by every cluster e2e (`scripts/deploy` installs the chart). helm comes from
//! `scripts/ensure-helm` (built once from the Go module proxy); it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};
use ferry_controller::config::Config;
use serde_yaml::Value;

fn root() -> PathBuf {
    // At run time: cargo does not rebuild a test when only the checkout moved.
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .join("..")
}

fn helm() -> Result<PathBuf> {
    let out = Command::new(root().join("scripts/ensure-helm"))
        .output()
        .context("running scripts/ensure-helm")?;
    ensure!(
        out.status.success(),
        "scripts/ensure-helm failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// `helm <verb> … manifests/helm/ferry` with `sets`; stdout.
fn run_helm(verb: &[&str], sets: &[&str]) -> Result<String> {
    let mut cmd = Command::new(helm()?);
    cmd.args(verb)
        .arg(root().join("manifests/helm/ferry"))
        .args(["--namespace", "ferry-ops", "--kube-version", "1.34.0"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running helm")?;
    if !out.status.success() {
        bail!(
            "helm {verb:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn render(sets: &[&str]) -> Result<Vec<Value>> {
    let text = run_helm(&["template", "ferry"], sets)?;
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v = serde::Deserialize::deserialize(d)?;
        if v != Value::Null {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn config_text(docs: &[Value]) -> Result<String> {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "ferry-controller")
        .context("no ConfigMap ferry-controller")?;
    Ok(cm["data"]["config.yaml"]
        .as_str()
        .context("no config.yaml")?
        .to_string())
}

#[test]
fn the_chart_lints_and_its_defaults_are_the_controllers() -> Result<()> {
    run_helm(&["lint", "--strict"], &[])?;
    let mut config = Config::from_yaml(&config_text(&render(&[])?)?)?;
    // The one deliberate difference: the chart gives mover pods requests and a memory limit.
    assert!(
        config.pod_resources.take().is_some(),
        "the chart sets no mover pod resources"
    );
    let mut want = Config::default();
    let ferry = want.movers.get_mut("ferry").context("default mover")?;
    ferry.image = "localhost/ferry-mover:0.1.0".into();
    // One image: Ferry's data path and the pod agent.
    want.agent.image = "localhost/ferry-mover:0.1.0".into();
    assert_eq!(
        config, want,
        "values.yaml defaults differ from controller/src/config.rs"
    );
    Ok(())
}

#[test]
fn values_reach_the_config_and_the_rbac() -> Result<()> {
    let docs = render(&[
        "veleroNamespace=backup-ns",
        "movers.acme.image=registry.example/acme:1.2",
        "config.perNodeLimit=3",
        "image.controller.repository=registry.example/ferry-controller",
        "image.controller.tag=v9",
        "image.mover.repository=registry.example/ferry-mover",
        "image.mover.tag=v8",
        "replicas=1",
    ])?;
    let config = Config::from_yaml(&config_text(&docs)?)?;
    assert_eq!(config.watch_namespace, "backup-ns");
    assert_eq!(config.per_node_limit, 3);
    assert_eq!(
        config.mover(Some("acme")).map(|m| m.image.as_str()),
        Some("registry.example/acme:1.2")
    );
    assert!(
        config
            .mover(Some("acme"))
            .is_some_and(|m| m.args.is_empty())
    );
    assert_eq!(
        config.mover(Some("ferry")).map(|m| m.args.clone()),
        Some(vec!["datapath".to_string()])
    );
    assert_eq!(config.agent.image, "registry.example/ferry-mover:v8");
    // `compression` becomes an argument of Ferry's data path.
    let zstd = Config::from_yaml(&config_text(&render(&[
        "veleroNamespace=v",
        "compression=zstd:7",
    ])?)?)?;
    assert_eq!(
        zstd.mover(Some("ferry")).map(|m| m.args.clone()),
        Some(vec![
            "datapath".to_string(),
            "--compression=zstd:7".to_string()
        ])
    );
    for d in &docs {
        let (kind, name) = (&d["kind"], &d["metadata"]["name"]);
        match d["metadata"]["namespace"].as_str() {
            // Cluster-scoped.
            None => assert!(
                kind == "ClusterRole" || kind == "ClusterRoleBinding",
                "{kind:?} {name:?} has no namespace"
            ),
            Some(ns) => assert!(
                ns == "ferry-ops" || ns == "backup-ns",
                "{kind:?} {name:?} in {ns}"
            ),
        }
        if let Some(subjects) = d["subjects"].as_sequence() {
            for s in subjects {
                let want = if s["name"] == "ferry-mover" {
                    "backup-ns"
                } else {
                    "ferry-ops"
                };
                assert_eq!(s["namespace"], want, "{kind:?} {name:?}");
            }
        }
        if kind == "Deployment" {
            let pod = &d["spec"]["template"];
            assert_eq!(
                pod["spec"]["containers"][0]["image"],
                "registry.example/ferry-controller:v9"
            );
            assert_eq!(d["spec"]["replicas"], 1);
            assert!(pod["metadata"]["annotations"]["checksum/config"].is_string());
        }
    }
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == "backup-ns"),
        "no Role in Velero's namespace"
    );
    Ok(())
}

#[test]
fn a_mistyped_config_value_is_refused_by_name() -> Result<()> {
    let text = config_text(&render(&["config.perNodeLimt=2"])?)?;
    let err = Config::from_yaml(&text).expect_err("unknown field accepted");
    assert!(err.to_string().contains("perNodeLimt"), "{err}");
    Ok(())
}
