//! The mover pod: how it is built and how its status is read. The pod decides the outcome: phase, exit
//! code and termination message of its `mover` container, never events.
//!
//! Two containers share the run directory ([`ferry_proto::datapath::SOCKET_DIR`]): the data path (the CR's
//! mover image) runs as a native sidecar, the init container `datapath` with `restartPolicy: Always`, and
//! serves `ferry.datapath.v1` on the unix socket; the pod agent (`ferry agent`), the regular container
//! `mover`, reads its one typed request (the protobuf [`AgentJob`], base64 in `FERRY_AGENT_JOB`), makes the
//! call, reports Events and ends the pod with the exit code and termination message of the contract in
//! `ferry_proto::pod`. The kubelet stops the sidecar once the agent has exited.

use std::collections::BTreeMap;

use base64::Engine as _;
use ferry_proto::datapath::agent::{AgentJob, CrRef, ENV_JOB, agent_job::Call};
use ferry_proto::datapath::{self, ENV_SOCKET, SOCKET_DIR, SOCKET_PATH, VolumeMode};
use ferry_proto::pod as contract;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath, NodeAffinity,
    NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, PodStatus,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext,
    TopologySpreadConstraint, Volume, VolumeDevice, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use prost::Message as _;

use crate::config::{Config, Mover};
use crate::cr::Direction;
use crate::repo::{CaSource, RepoTarget};

/// The capabilities of the data-path container, after dropping ALL; each is allowed by the Pod Security
/// "baseline" level:
/// * `DAC_OVERRIDE`: read every file and search every directory of a volume whatever its modes (backup),
///   write into directories restored read-only (restore);
/// * `CHOWN`, `FOWNER`, `FSETID`: restore owners, modes, times and set-id bits as recorded;
/// * `MKNOD`: restore device nodes and FIFOs;
/// * `SETFCAP`: restore file capabilities (`security.capability` xattrs).
///
/// The agent container gets none.
pub const MOVER_CAPABILITIES: [&str; 6] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "MKNOD",
    "SETFCAP",
];

/// Name of the agent container, whose exit code and termination message are the pod's outcome.
pub const AGENT_CONTAINER: &str = "mover";
/// Name of the data-path container (a native sidecar).
pub const DATAPATH_CONTAINER: &str = "datapath";

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
    /// The data path: image, pull policy, arguments.
    pub mover: Mover,
    /// PVC to mount (none for maintenance).
    pub pvc: Option<String>,
    /// Block volume.
    pub block: bool,
    /// Nodes the pod may run on (empty = anywhere).
    pub nodes: Vec<String>,
    /// Repository: the Secrets to mount and the CA the agent writes (the call names the rest).
    pub repo: RepoTarget,
    /// Password Secret name (key `password`).
    pub password_secret: String,
    /// The object the agent reports on.
    pub cr: CrRef,
    /// The data-path call the agent makes.
    pub call: Call,
}

/// The volume of a mover pod as the data-path API names it: where [`build`] mounts or attaches it.
pub fn request_volume(block: bool) -> datapath::Volume {
    if block {
        datapath::Volume {
            mode: VolumeMode::Block.into(),
            path: contract::DEVICE_PATH.into(),
        }
    } else {
        datapath::Volume {
            mode: VolumeMode::Filesystem.into(),
            path: contract::VOLUME_PATH.into(),
        }
    }
}

/// The agent's job, as its `FERRY_AGENT_JOB` holds it: the protobuf [`AgentJob`], base64 (standard).
pub fn agent_job(plan: &PodPlan, cfg: &Config) -> String {
    let job = AgentJob {
        cr: Some(plan.cr.clone()),
        report_interval_seconds: u32::try_from(cfg.report_interval_seconds)
            .unwrap_or(u32::MAX)
            .max(1),
        call: Some(plan.call.clone()),
    };
    base64::engine::general_purpose::STANDARD.encode(job.encode_to_vec())
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
                // modes and device nodes (restore) need the data path's capabilities and nothing more.
                // The agent is root too (to use the socket the data path creates) but has none.
                run_as_user: Some(0),
                run_as_group: Some(0),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            init_containers: Some(vec![datapath_container(plan, cfg)]),
            containers: vec![agent_container(plan, cfg)],
            volumes: Some(volumes(plan, cfg)),
            ..Default::default()
        }),
        status: None,
    }
}

/// The security context of both containers: nothing privileged, a read-only root, ALL dropped, `add` back.
fn security_context(add: &[&str]) -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: (!add.is_empty()).then(|| add.iter().map(|c| c.to_string()).collect()),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: Option<bool>) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        ..Default::default()
    }
}

/// The data path, a native sidecar (an init container that keeps running): the mover image with the
/// mover's arguments, serving on [`SOCKET_PATH`]; the volume, the Secrets, the cache, least privilege.
fn datapath_container(plan: &PodPlan, cfg: &Config) -> Container {
    let (mut mounts, devices) = mounts(plan);
    mounts.push(mount("run", SOCKET_DIR, None));
    Container {
        name: DATAPATH_CONTAINER.into(),
        image: Some(plan.mover.image.clone()),
        image_pull_policy: Some(plan.mover.image_pull_policy.clone()),
        args: (!plan.mover.args.is_empty()).then(|| plan.mover.args.clone()),
        restart_policy: Some("Always".into()),
        env: Some(datapath_environment(&plan.repo)),
        volume_mounts: Some(mounts),
        volume_devices: (!devices.is_empty()).then_some(devices),
        resources: cfg.pod_resources.clone(),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // All within Pod Security "baseline" (design 0002, "Least privilege").
        security_context: Some(security_context(&MOVER_CAPABILITIES)),
        ..Default::default()
    }
}

/// The agent: `ferry agent` with its job, the socket and the CA it writes for the data path; no
/// capabilities, no volume but the run directory and its own /tmp.
fn agent_container(plan: &PodPlan, cfg: &Config) -> Container {
    let mut env = vec![
        self::env(ENV_JOB, &agent_job(plan, cfg)),
        self::env(ENV_SOCKET, SOCKET_PATH),
        self::env("FERRY_LOG", "info"),
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("POD_NAME", "metadata.name"),
    ];
    // The agent writes it to `ferry_proto::datapath::CA_FILE`, which the request names.
    match &plan.repo.ca {
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
    let quantity = |q: &str| Quantity(q.into());
    Container {
        name: AGENT_CONTAINER.into(),
        image: Some(cfg.agent.image.clone()),
        image_pull_policy: Some(cfg.agent.image_pull_policy.clone()),
        args: Some(vec!["agent".into()]),
        env: Some(env),
        volume_mounts: Some(vec![
            mount("run", SOCKET_DIR, None),
            mount("agent-tmp", "/tmp", None),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("10m")),
                ("memory".to_string(), quantity("32Mi")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), quantity("128Mi"))])),
            ..Default::default()
        }),
        termination_message_policy: Some("File".into()),
        security_context: Some(security_context(&[])),
        ..Default::default()
    }
}

/// The data path's environment: its socket, its cache, and how the AWS SDK finds the mounted credentials.
/// The repository itself is in the request.
fn datapath_environment(repo: &RepoTarget) -> Vec<EnvVar> {
    let mut env = vec![
        self::env(ENV_SOCKET, SOCKET_PATH),
        self::env("FERRY_CACHE_DIR", contract::CACHE_PATH),
        self::env("FERRY_LOG", "info"),
        field_env("NODE_NAME", "spec.nodeName"),
    ];
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

fn empty_dir(name: &str, size_limit: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: size_limit.map(|s| Quantity(s.into())),
            medium: None,
        }),
        ..Default::default()
    }
}

/// The data volume (read-only for a backup), the password, a scratch cache, /tmp, the credentials; the
/// run directory both containers share and the agent's /tmp.
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
        empty_dir("cache", Some(&cfg.cache_size_limit)),
        empty_dir("tmp", None),
        empty_dir("run", None),
        empty_dir("agent-tmp", None),
    ]);
    if let Some((secret, key)) = &plan.repo.credentials {
        volumes.push(secret_volume("credentials", secret, key, "cloud"));
    }
    volumes
}

/// Where [`volumes`] go in the data-path container: mounts, and the block device when the volume is one.
fn mounts(plan: &PodPlan) -> (Vec<VolumeMount>, Vec<VolumeDevice>) {
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
        .and_then(|c| c.iter().find(|c| c.name == AGENT_CONTAINER));
    let terminated = container.and_then(|c| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .or_else(|| c.last_state.as_ref().and_then(|s| s.terminated.clone()))
    });
    // The agent's exit 0 is final (`restartPolicy: Never`) and carries the result; the kubelet marks the
    // pod Succeeded only after it has also stopped the data-path sidecar, about 3 s later. Any other exit
    // waits for the phase, which brings an eviction's reason with it.
    let agent_succeeded = container
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .is_some_and(|t| t.exit_code == 0);
    match status.phase.as_deref() {
        Some("Succeeded") => succeeded(node, terminated),
        Some("Failed") => failed(status, terminated, &node),
        _ if agent_succeeded => succeeded(node, terminated),
        Some("Running") => PodState::Running { node },
        _ => {
            let sidecar = status
                .init_container_statuses
                .as_ref()
                .and_then(|c| c.iter().find(|c| c.name == DATAPATH_CONTAINER));
            pending(status, sidecar, container)
        }
    }
}

/// The agent's exit 0: the result is its termination message.
fn succeeded(node: String, terminated: Option<ContainerStateTerminated>) -> PodState {
    PodState::Succeeded {
        node,
        message: terminated
            .and_then(|t| t.message)
            .unwrap_or_default()
            .trim()
            .to_string(),
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
/// The data-path sidecar starts first (the agent waits in PodInitializing meanwhile): its reason counts
/// as much as the agent's.
fn pending(
    status: &PodStatus,
    sidecar: Option<&ContainerStatus>,
    container: Option<&ContainerStatus>,
) -> PodState {
    let waiting_of =
        |c: Option<&ContainerStatus>| c.and_then(|c| c.state.as_ref()?.waiting.clone());
    let is_fatal = |w: &ContainerStateWaiting| {
        w.reason
            .as_deref()
            .is_some_and(|r| FATAL_WAITING.contains(&r))
    };
    let waiting = [waiting_of(sidecar), waiting_of(container)]
        .into_iter()
        .flatten()
        .find(is_fatal)
        .or_else(|| waiting_of(sidecar))
        .or_else(|| waiting_of(container));
    let fatal = waiting.as_ref().filter(|w| is_fatal(w)).map(|w| {
        format!(
            "mover pod cannot start: {}: {}",
            w.reason.as_deref().unwrap_or_default(),
            w.message.as_deref().unwrap_or_default()
        )
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
pub(crate) mod tests {
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
            mover: cfg.movers["ferry"].clone(),
            pvc: Some("ferry-x".into()),
            block: false,
            nodes: vec![],
            cr: CrRef {
                kind: "DataUpload".into(),
                name: "x".into(),
                namespace: "velero".into(),
                uid: "u1".into(),
            },
            call: Call::Backup(datapath::BackupRequest {
                operation_id: "x".into(),
                repository: Some(repo.repository()),
                volume: Some(request_volume(false)),
                ..Default::default()
            }),
            repo,
            password_secret: "ferry-repository".into(),
        }
    }

    fn spec_of(p: &Pod) -> &PodSpec {
        p.spec.as_ref().expect("spec")
    }

    /// The agent container (`mover`).
    fn agent_of(p: &Pod) -> &Container {
        let c = &spec_of(p).containers;
        assert_eq!(c.len(), 1, "one regular container");
        assert_eq!(c[0].name, AGENT_CONTAINER);
        &c[0]
    }

    /// The data-path sidecar.
    fn sidecar_of(p: &Pod) -> &Container {
        let c = spec_of(p)
            .init_containers
            .as_ref()
            .expect("init containers");
        assert_eq!(c.len(), 1, "one init container");
        assert_eq!(c[0].name, DATAPATH_CONTAINER);
        &c[0]
    }

    fn env_of(c: &Container) -> Vec<EnvVar> {
        c.env.clone().expect("env")
    }

    fn value(env: &[EnvVar], name: &str) -> Option<String> {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    /// The agent's job, decoded from a built pod the way the agent reads it.
    pub(crate) fn job_of(p: &Pod) -> AgentJob {
        let text = value(&env_of(agent_of(p)), ENV_JOB).expect("FERRY_AGENT_JOB");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64");
        AgentJob::decode(bytes.as_slice()).expect("AgentJob")
    }

    #[test]
    fn the_data_path_is_a_native_sidecar_and_the_agent_has_no_capabilities() {
        let repo = RepoTarget {
            credentials: Some(("cloud-credentials".into(), "cloud".into())),
            ..Default::default()
        };
        let p = build(&plan(repo), &Config::default());
        let sidecar = sidecar_of(&p);
        assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
        assert_eq!(sidecar.image.as_deref(), Some("localhost/ferry-mover:dev"));
        assert_eq!(sidecar.args, Some(vec!["datapath".to_string()]));
        let env = env_of(sidecar);
        assert_eq!(value(&env, ENV_SOCKET).as_deref(), Some(SOCKET_PATH));
        assert_eq!(
            value(&env, "AWS_SHARED_CREDENTIALS_FILE").as_deref(),
            Some(contract::CREDENTIALS_FILE)
        );
        assert!(
            env.iter()
                .all(|e| !e.name.starts_with("FERRY_REPO") && !e.name.starts_with("FERRY_S3")),
            "{env:?}"
        );
        let mounts: Vec<_> = sidecar
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.mount_path.as_str(), m.read_only))
            .collect();
        for want in [
            (contract::VOLUME_PATH, Some(true)),
            (SOCKET_DIR, None),
            (contract::CREDENTIALS_DIR, Some(true)),
            (contract::CACHE_PATH, None),
        ] {
            assert!(mounts.contains(&want), "{want:?} not in {mounts:?}");
        }
        let caps = sidecar
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.clone())
            .expect("capabilities");
        assert_eq!(
            caps.add,
            Some(MOVER_CAPABILITIES.map(String::from).to_vec())
        );

        let agent = agent_of(&p);
        assert_eq!(agent.args, Some(vec!["agent".to_string()]));
        assert_eq!(agent.termination_message_policy.as_deref(), Some("File"));
        assert_eq!(agent.restart_policy, None);
        let sc = agent.security_context.as_ref().expect("security context");
        let caps = sc.capabilities.clone().expect("capabilities");
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(caps.add, None);
        let paths: Vec<_> = agent
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(paths, [SOCKET_DIR, "/tmp"]);
        let env = env_of(agent);
        assert_eq!(value(&env, ENV_SOCKET).as_deref(), Some(SOCKET_PATH));
        assert!(env.iter().any(|e| e.name == "POD_NAME"));
        assert!(env.iter().all(|e| !e.name.starts_with("AWS_")), "{env:?}");
        let limits = agent
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .expect("limits");
        assert_eq!(limits["memory"], Quantity("128Mi".into()));

        let job = job_of(&p);
        assert_eq!(job.cr.expect("cr").uid, "u1");
        assert_eq!(job.report_interval_seconds, 5);
        let Some(Call::Backup(r)) = job.call else {
            panic!("not a backup: {:?}", job.call)
        };
        let repo = r.repository.expect("repository");
        assert_eq!(repo.credentials_file, contract::CREDENTIALS_FILE);
        assert_eq!(repo.ca_file, "");
    }

    #[test]
    fn a_block_volume_is_attached_to_the_data_path_only() {
        let mut plan = plan(RepoTarget::default());
        plan.block = true;
        plan.direction = Direction::Restore;
        let p = build(&plan, &Config::default());
        let devices = sidecar_of(&p).volume_devices.clone().expect("devices");
        assert_eq!(devices[0].device_path, contract::DEVICE_PATH);
        assert_eq!(agent_of(&p).volume_devices, None);
        // A third-party mover without args runs its image's entrypoint.
        plan.mover.args.clear();
        assert_eq!(sidecar_of(&build(&plan, &Config::default())).args, None);
    }

    #[test]
    fn passes_endpoint_tls_settings() {
        let repo = RepoTarget {
            url: "s3://b/velero/plugins/ferry/app".into(),
            bucket: "b".into(),
            prefix: "velero/plugins/ferry/app".into(),
            endpoint: Some("https://minio:9000".into()),
            path_style: true,
            ca: Some(CaSource::Secret("ca".into(), "bundle.pem".into())),
            ..Default::default()
        };
        let p = build(&plan(repo.clone()), &Config::default());
        let ca = env_of(agent_of(&p))
            .into_iter()
            .find(|e| e.name == contract::ENV_S3_CA_PEM)
            .expect("CA env");
        let sel = ca
            .value_from
            .and_then(|v| v.secret_key_ref)
            .expect("secretKeyRef");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("ca", "bundle.pem"));
        assert!(
            env_of(sidecar_of(&p))
                .iter()
                .all(|e| e.name != contract::ENV_S3_CA_PEM)
        );
        let Some(Call::Backup(r)) = job_of(&p).call else {
            panic!("not a backup")
        };
        let r = r.repository.expect("repository");
        assert_eq!(r.ca_file, datapath::CA_FILE);
        assert_eq!(r.endpoint, "https://minio:9000");
        assert!(r.path_style && !r.insecure_skip_tls_verify);

        let inline = RepoTarget {
            ca: Some(CaSource::Pem("-----BEGIN CERTIFICATE-----".into())),
            insecure_skip_tls_verify: true,
            ..repo
        };
        let p = build(&plan(inline), &Config::default());
        assert_eq!(
            value(&env_of(agent_of(&p)), contract::ENV_S3_CA_PEM).as_deref(),
            Some("-----BEGIN CERTIFICATE-----")
        );
        let Some(Call::Backup(r)) = job_of(&p).call else {
            panic!("not a backup")
        };
        assert!(r.repository.expect("repository").insecure_skip_tls_verify);
    }

    #[test]
    fn a_data_path_that_cannot_start_is_fatal() {
        let p = pod(json!({"phase": "Pending",
            "initContainerStatuses": [{"name": "datapath", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ErrImagePull", "message": "no such image"}}}],
            "containerStatuses": [{"name": "mover", "image": "a", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}]}));
        assert!(
            matches!(state(&p), PodState::Pending { fatal: Some(ref f), .. } if f.contains("no such image")),
            "{:?}",
            state(&p)
        );
        let starting = pod(json!({"phase": "Pending",
            "initContainerStatuses": [{"name": "datapath", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(
            state(&starting),
            PodState::Pending {
                waiting: Some("ContainerCreating".into()),
                fatal: None
            }
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

    /// The agent's exit 0 is final (`restartPolicy: Never`): the outcome is read from it at once, not
    /// seconds later when the kubelet has also stopped the data-path sidecar and marks the pod Succeeded.
    /// Any other exit still waits for the pod's phase (an eviction's reason comes with it).
    #[test]
    fn the_agents_exit_0_decides_before_the_sidecar_is_stopped() {
        let agent = |terminated: serde_json::Value| {
            json!({"phase": "Running",
                "initContainerStatuses": [{"name": "datapath", "image": "i", "imageID": "",
                    "ready": true, "restartCount": 0, "state": {"running": {}}}],
                "containerStatuses": [{"name": "mover", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"terminated": terminated}}]})
        };
        assert_eq!(
            state(&pod(agent(
                json!({"exitCode": 0, "message": "{\"a\":1}\n"})
            ))),
            PodState::Succeeded {
                node: "n1".into(),
                message: "{\"a\":1}".into()
            }
        );
        assert_eq!(
            state(&pod(agent(json!({"exitCode": 1, "message": "boom"})))),
            PodState::Running { node: "n1".into() }
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
        let repo = RepoTarget::default();
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
        let sidecars = spec.init_containers.unwrap_or_default();
        assert_eq!(sidecars.len() + spec.containers.len(), 2);
        for c in sidecars.into_iter().chain(spec.containers) {
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
