//! The mover pod: how it is built (the contract in `ferry_proto::pod`) and how its status is read. The pod
//! decides the outcome: phase, exit code and termination message, never events.

use std::collections::BTreeMap;

use ferry_proto::pod as contract;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerStateTerminated, ContainerStatus,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, PodStatus, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeDevice, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use crate::config::{Config, Mover};
use crate::cr::Direction;
use crate::repo::{CaSource, RepoTarget};

/// The capabilities of a mover container, after dropping ALL; each is allowed by the Pod Security
/// "baseline" level:
/// * `DAC_OVERRIDE`: read every file and search every directory of a volume whatever its modes (backup),
///   write into directories restored read-only (restore);
/// * `CHOWN`, `FOWNER`, `FSETID`: restore owners, modes, times and set-id bits as recorded;
/// * `MKNOD`: restore device nodes and FIFOs;
/// * `SETFCAP`: restore file capabilities (`security.capability` xattrs).
pub const MOVER_CAPABILITIES: [&str; 6] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "MKNOD",
    "SETFCAP",
];
/// Everything that goes into one mover pod.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// Pod name.
    pub name: String,
    /// Namespace (the CR's).
    pub namespace: String,
    /// Labels (owner labels included).
    pub labels: BTreeMap<String, String>,
    /// Owner reference to the CR.
    pub owner: OwnerReference,
    /// Backup or restore (maintenance pods: backup, which only matters for read-only mounts).
    pub direction: Direction,
    /// The `pod` operation: `backup`, `restore` or `maintain`.
    pub op: String,
    /// Mover image.
    pub mover: Mover,
    /// PVC to mount (none for maintenance).
    pub pvc: Option<String>,
    /// Block volume.
    pub block: bool,
    /// Nodes the pod may run on (empty = anywhere).
    pub nodes: Vec<String>,
    /// Repository.
    pub repo: RepoTarget,
    /// Password Secret name (key `password`).
    pub password_secret: String,
    /// Mover arguments after `pod backup|restore` (`--block` is added from `block`).
    pub args: Vec<String>,
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the pod.
pub fn build(plan: &PodPlan, cfg: &Config) -> Pod {
    let component = BTreeMap::from([(
        ferry_proto::labels::COMPONENT.to_string(),
        "mover".to_string(),
    )]);
    let mut labels = plan.labels.clone();
    labels.extend(component.clone());
    Pod {
        metadata: ObjectMeta {
            name: Some(plan.name.clone()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![plan.owner.clone()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            service_account_name: Some(cfg.mover_service_account.clone()),
            termination_grace_period_seconds: Some(cfg.cancel_grace_seconds),
            node_selector: (!cfg.node_selector.is_empty()).then(|| cfg.node_selector.clone()),
            tolerations: (!cfg.tolerations.is_empty()).then(|| cfg.tolerations.clone()),
            priority_class_name: cfg.priority_class_name.clone(),
            affinity: node_affinity(&plan.nodes),
            topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: "kubernetes.io/hostname".into(),
                when_unsatisfiable: "ScheduleAnyway".into(),
                label_selector: Some(LabelSelector {
                    match_labels: Some(component),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            security_context: Some(PodSecurityContext {
                // Root without privilege: reading every file of a volume (backup) and restoring owners,
                // modes and device nodes (restore) need the capabilities below and nothing more.
                run_as_user: Some(0),
                run_as_group: Some(0),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            containers: vec![container(plan, cfg)],
            volumes: Some(volumes(plan, cfg)),
            ..Default::default()
        }),
        status: None,
    }
}

/// The mover container: `ferry pod <op>` with the plan's arguments, least privilege.
fn container(plan: &PodPlan, cfg: &Config) -> Container {
    let mut args = vec!["pod".to_string(), plan.op.clone()];
    args.extend(plan.args.iter().cloned());
    if plan.block {
        args.push("--block".into());
    }
    args.push(format!("--report-interval={}", cfg.report_interval_seconds));
    let (mounts, devices) = mounts(plan);
    Container {
        name: "mover".into(),
        image: Some(plan.mover.image.clone()),
        image_pull_policy: Some(plan.mover.image_pull_policy.clone()),
        args: Some(args),
        env: Some(environment(&plan.repo)),
        volume_mounts: Some(mounts),
        volume_devices: (!devices.is_empty()).then_some(devices),
        resources: cfg.pod_resources.clone(),
        termination_message_policy: Some("File".into()),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(
                    // All within Pod Security "baseline" (design 0002, "Least privilege").
                    MOVER_CAPABILITIES.map(String::from).to_vec(),
                ),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The mover's environment: the repository, how to reach it, and where its secrets are mounted.
fn environment(repo: &RepoTarget) -> Vec<EnvVar> {
    let mut env = vec![
        self::env("FERRY_REPO", &repo.url),
        self::env("FERRY_PASSWORD_FILE", contract::PASSWORD_FILE),
        self::env("FERRY_CACHE_DIR", contract::CACHE_PATH),
        self::env("FERRY_LOG", "info"),
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
    ];
    if let Some(e) = &repo.endpoint {
        env.push(self::env("FERRY_S3_ENDPOINT", e));
    }
    if let Some(r) = &repo.region {
        env.push(self::env("FERRY_S3_REGION", r));
    }
    if repo.path_style {
        env.push(self::env("FERRY_S3_PATH_STYLE", "true"));
    }
    if let Some(p) = &repo.profile {
        env.push(self::env("FERRY_S3_PROFILE", p));
    }
    if repo.insecure_skip_tls_verify {
        env.push(self::env(contract::ENV_S3_INSECURE_SKIP_TLS_VERIFY, "true"));
    }
    match &repo.ca {
        Some(CaSource::Pem(pem)) => env.push(self::env(contract::ENV_S3_CA_PEM, pem)),
        Some(CaSource::Secret(name, key)) => env.push(EnvVar {
            name: contract::ENV_S3_CA_PEM.into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: name.clone(),
                    key: key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        None => {}
    }
    if repo.credentials.is_some() {
        env.push(self::env(
            "AWS_SHARED_CREDENTIALS_FILE",
            contract::CREDENTIALS_FILE,
        ));
        env.push(self::env("AWS_CONFIG_FILE", "/dev/null"));
        env.push(self::env("AWS_EC2_METADATA_DISABLED", "true"));
    }
    env
}

/// One key of a Secret as a read-only file.
fn secret_volume(name: &str, secret: &str, key: &str, path: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: path.into(),
                mode: None,
            }]),
            default_mode: Some(0o400),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

/// The data volume (read-only for a backup), the password, a scratch cache, /tmp, the credentials.
fn volumes(plan: &PodPlan, cfg: &Config) -> Vec<Volume> {
    let mut volumes: Vec<Volume> = plan
        .pvc
        .iter()
        .map(|pvc| Volume {
            name: "volume".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.clone(),
                read_only: Some(plan.direction == Direction::Backup),
            }),
            ..Default::default()
        })
        .collect();
    volumes.extend([
        secret_volume("password", &plan.password_secret, "password", "password"),
        Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity(cfg.cache_size_limit.clone())),
                medium: None,
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ]);
    if let Some((secret, key)) = &plan.repo.credentials {
        volumes.push(secret_volume("credentials", secret, key, "cloud"));
    }
    volumes
}

/// Where [`volumes`] go in the container: mounts, and the block device when the volume is one.
fn mounts(plan: &PodPlan) -> (Vec<VolumeMount>, Vec<VolumeDevice>) {
    let mount = |name: &str, path: &str, read_only: Option<bool>| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        ..Default::default()
    };
    let mut mounts = vec![
        mount("password", "/ferry/secrets/password", Some(true)),
        mount("cache", contract::CACHE_PATH, None),
        mount("tmp", "/tmp", None),
    ];
    let mut devices = Vec::new();
    if plan.pvc.is_some() && plan.block {
        devices.push(VolumeDevice {
            name: "volume".into(),
            device_path: contract::DEVICE_PATH.into(),
        });
    } else if plan.pvc.is_some() {
        let read_only = plan.direction == Direction::Backup;
        mounts.push(mount("volume", contract::VOLUME_PATH, Some(read_only)));
    }
    if plan.repo.credentials.is_some() {
        mounts.push(mount("credentials", contract::CREDENTIALS_DIR, Some(true)));
    }
    (mounts, devices)
}

/// Required node affinity to `nodes` by hostname; none when any node will do.
fn node_affinity(nodes: &[String]) -> Option<Affinity> {
    (!nodes.is_empty()).then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "kubernetes.io/hostname".into(),
                        operator: "In".into(),
                        values: Some(nodes.to_vec()),
                    }]),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// What a mover pod's status says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet; `waiting` says why, if known.
    Pending {
        /// Scheduler or kubelet reason.
        waiting: Option<String>,
        /// A reason that will not fix itself (image missing, bad config).
        fatal: Option<String>,
    },
    /// Running on `node`.
    Running {
        /// The node.
        node: String,
    },
    /// Exited 0; the termination message (the result JSON).
    Succeeded {
        /// Node it ran on.
        node: String,
        /// Termination message.
        message: String,
    },
    /// Ended unsuccessfully.
    Failed {
        /// What happened, for `status.message`.
        message: String,
        /// It exited with the cancel code.
        canceled: bool,
    },
}

const FATAL_WAITING: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Reads a pod's status.
pub fn state(pod: &Pod) -> PodState {
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let Some(status) = pod.status.as_ref() else {
        return PodState::Pending {
            waiting: None,
            fatal: None,
        };
    };
    let container = status
        .container_statuses
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.name == "mover"));
    let terminated = container.and_then(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.clone()))
    });
    match status.phase.as_deref() {
        Some("Succeeded") => PodState::Succeeded {
            node,
            message: terminated
                .and_then(|t| t.message)
                .unwrap_or_default()
                .trim()
                .to_string(),
        },
        Some("Failed") => failed(status, terminated, &node),
        Some("Running") => PodState::Running { node },
        _ => pending(status, container),
    }
}

/// A Failed pod: evicted, canceled, OOM-killed, or the mover's own message.
fn failed(
    status: &PodStatus,
    terminated: Option<ContainerStateTerminated>,
    node: &str,
) -> PodState {
    if status.reason.as_deref() == Some("Evicted") {
        return PodState::Failed {
            message: format!(
                "mover pod was evicted from {node}: {}",
                status.message.clone().unwrap_or_default()
            ),
            canceled: false,
        };
    }
    match terminated {
        Some(t) if t.exit_code == contract::EXIT_CANCELED => PodState::Failed {
            message: "data path canceled".into(),
            canceled: true,
        },
        Some(t) if t.reason.as_deref() == Some("OOMKilled") => PodState::Failed {
            message: format!(
                "mover pod was OOMKilled (exit code {}): raise podResources.limits.memory",
                t.exit_code
            ),
            canceled: false,
        },
        Some(t) => PodState::Failed {
            message: match t.message.as_deref().map(str::trim) {
                Some(m) if !m.is_empty() => m.to_string(),
                _ => format!(
                    "mover exited with code {} ({})",
                    t.exit_code,
                    t.reason.unwrap_or_else(|| "no reason".into())
                ),
            },
            canceled: false,
        },
        None => PodState::Failed {
            message: format!(
                "mover pod failed: {} {}",
                status.reason.clone().unwrap_or_default(),
                status.message.clone().unwrap_or_default()
            )
            .trim()
            .to_string(),
            canceled: false,
        },
    }
}

/// A pod not running yet: why it waits (unschedulable, pulling), and whether that will never fix itself.
fn pending(status: &PodStatus, container: Option<&ContainerStatus>) -> PodState {
    let waiting = container.and_then(|c| c.state.as_ref()?.waiting.clone());
    let fatal = waiting.as_ref().and_then(|w| {
        let reason = w.reason.as_deref()?;
        FATAL_WAITING.contains(&reason).then(|| {
            format!(
                "mover pod cannot start: {reason}: {}",
                w.message.clone().unwrap_or_default()
            )
        })
    });
    let unschedulable = status.conditions.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .map(|c| {
                format!(
                    "unschedulable: {}",
                    c.message
                        .clone()
                        .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
                )
            })
    });
    PodState::Pending {
        waiting: unschedulable.or_else(|| {
            waiting.map(|w| {
                format!(
                    "{} {}",
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                )
                .trim()
                .to_string()
            })
        }),
        fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": [{"name": "mover"}]},
            "status": status,
        }))
        .expect("pod")
    }

    fn plan(repo: RepoTarget) -> PodPlan {
        let cfg = Config::default();
        PodPlan {
            name: "ferry-x".into(),
            namespace: "velero".into(),
            labels: BTreeMap::new(),
            owner: OwnerReference::default(),
            direction: Direction::Backup,
            op: "backup".into(),
            mover: cfg.movers["ferry"].clone(),
            pvc: Some("ferry-x".into()),
            block: false,
            nodes: vec![],
            repo,
            password_secret: "ferry-repository".into(),
            args: vec![],
        }
    }

    fn env_of(p: &Pod) -> Vec<EnvVar> {
        p.spec.as_ref().expect("spec").containers[0]
            .env
            .clone()
            .expect("env")
    }

    #[test]
    fn passes_endpoint_tls_settings() {
        let repo = RepoTarget {
            url: "s3://b/velero/plugins/ferry/app".into(),
            endpoint: Some("https://minio:9000".into()),
            region: None,
            path_style: true,
            profile: None,
            credentials: None,
            ca: Some(CaSource::Secret("ca".into(), "bundle.pem".into())),
            insecure_skip_tls_verify: false,
        };
        let p = build(&plan(repo.clone()), &Config::default());
        let ca = env_of(&p)
            .into_iter()
            .find(|e| e.name == contract::ENV_S3_CA_PEM)
            .expect("CA env");
        let sel = ca
            .value_from
            .and_then(|v| v.secret_key_ref)
            .expect("secretKeyRef");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("ca", "bundle.pem"));

        let inline = RepoTarget {
            ca: Some(CaSource::Pem("-----BEGIN CERTIFICATE-----".into())),
            insecure_skip_tls_verify: true,
            ..repo
        };
        let env = env_of(&build(&plan(inline), &Config::default()));
        let get = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            get(contract::ENV_S3_CA_PEM).as_deref(),
            Some("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(
            get(contract::ENV_S3_INSECURE_SKIP_TLS_VERIFY).as_deref(),
            Some("true")
        );
    }

    #[test]
    fn reads_outcomes() {
        assert_eq!(
            state(&pod(
                json!({"phase": "Succeeded", "containerStatuses": [{"name": "mover", "image": "i",
                "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": "{\"a\":1}\n"}}}]})
            )),
            PodState::Succeeded {
                node: "n1".into(),
                message: "{\"a\":1}".into()
            }
        );
        let oom = state(&pod(
            json!({"phase": "Failed", "containerStatuses": [{"name": "mover", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
        ));
        assert!(
            matches!(oom, PodState::Failed { ref message, canceled: false } if message.contains("OOMKilled"))
        );
        let cancel = state(&pod(
            json!({"phase": "Failed", "containerStatuses": [{"name": "mover", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 2, "message": "data path canceled"}}}]}),
        ));
        assert!(matches!(cancel, PodState::Failed { canceled: true, .. }));
        let evicted = state(&pod(
            json!({"phase": "Failed", "reason": "Evicted", "message": "low disk"}),
        ));
        assert!(
            matches!(evicted, PodState::Failed { ref message, .. } if message.contains("evicted") && message.contains("low disk"))
        );
        let pull = state(&pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "mover", "image": "i",
            "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ErrImageNeverPull", "message": "image not present"}}}]}),
        ));
        assert!(
            matches!(pull, PodState::Pending { fatal: Some(ref f), .. } if f.contains("ErrImageNeverPull"))
        );
        let unsched = state(&pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]}),
        ));
        assert!(
            matches!(unsched, PodState::Pending { waiting: Some(ref w), fatal: None } if w.contains("0/1 nodes"))
        );
    }

    /// Pod Security "baseline" admits the mover pod: only capabilities it allows, nothing privileged,
    /// the runtime's seccomp profile (also checked for real by the e2e tests, whose Velero namespace enforces
    /// baseline).
    #[test]
    fn mover_pods_fit_pod_security_baseline() {
        const BASELINE: [&str; 13] = [
            "AUDIT_WRITE",
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "MKNOD",
            "NET_BIND_SERVICE",
            "SETFCAP",
            "SETGID",
            "SETPCAP",
            "SETUID",
            "SYS_CHROOT",
        ];
        let repo = RepoTarget {
            url: "s3://b/p".into(),
            endpoint: None,
            region: None,
            path_style: false,
            profile: None,
            credentials: None,
            ca: None,
            insecure_skip_tls_verify: false,
        };
        let spec = build(&plan(repo), &Config::default()).spec.expect("spec");
        let psc = spec.security_context.expect("pod security context");
        assert_eq!(
            psc.seccomp_profile.map(|p| p.type_),
            Some("RuntimeDefault".to_string())
        );
        assert!(spec.host_network != Some(true) && spec.host_pid != Some(true));
        for v in spec.volumes.unwrap_or_default() {
            assert!(v.host_path.is_none(), "hostPath volume {}", v.name);
        }
        for c in spec.containers {
            let sc = c.security_context.expect("container security context");
            assert_eq!(sc.privileged, Some(false));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let caps = sc.capabilities.expect("capabilities");
            assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
            for cap in caps.add.unwrap_or_default() {
                assert!(
                    BASELINE.contains(&cap.as_str()),
                    "{cap} is not allowed by baseline"
                );
            }
        }
    }
}
