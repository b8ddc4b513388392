//! Controller configuration: one YAML document (a ConfigMap in the manifests), every field optional.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use serde::Deserialize;

use crate::error::{Error, Result};

/// One data-mover name this controller answers to: the data path of its mover pods.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mover {
    /// Image of the data path (serves `ferry.datapath.v1` on `$FERRY_DATAPATH_SOCKET`; see
    /// `ferry_proto::datapath`). It runs as the mover pod's native sidecar `datapath`.
    pub image: String,
    /// Pull policy of that image.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// Arguments of the data-path container (empty: the image's entrypoint serves the API as it is).
    #[serde(default)]
    pub args: Vec<String>,
}

/// The pod agent: the container of every mover pod that calls the data path and reports (`ferry agent`,
/// from Ferry's mover image).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Agent {
    /// Image holding `ferry agent`.
    pub image: String,
    /// Pull policy of that image.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
}

fn default_pull_policy() -> String {
    "IfNotPresent".into()
}

/// Controller configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// `spec.datamover` values handled, and the mover image for each. Everything else is ignored.
    pub movers: BTreeMap<String, Mover>,
    /// The pod agent's image (Ferry's mover image), the same for every mover.
    pub agent: Agent,
    /// Velero's namespace: the only one whose DU/DD (and Backups) the controller sees, and where it runs
    /// mover pods. DU/DD elsewhere are ignored; the RBAC in `manifests/` grants nothing more.
    pub watch_namespace: String,
    /// Mover pods per node at once.
    pub per_node_limit: usize,
    /// CRs being prepared (Accepted or Prepared) at once, cluster-wide; New CRs wait beyond that.
    pub prepare_queue_length: usize,
    /// Longest time from Accepted to a running mover pod before the CR fails.
    pub prepare_timeout_seconds: u64,
    /// Grace period a canceled mover gets to stop cleanly before it is killed.
    pub cancel_grace_seconds: i64,
    /// Secret (in the CR's namespace) holding the repository password under key `password`.
    pub repository_password_secret: String,
    /// Service account of mover pods.
    pub mover_service_account: String,
    /// Resources of the mover container.
    pub pod_resources: Option<ResourceRequirements>,
    /// Node selector for mover pods.
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for mover pods.
    pub tolerations: Vec<Toleration>,
    /// Size limit of the mover's scratch (cache) volume, a quantity.
    pub cache_size_limit: String,
    /// Priority class of mover pods.
    pub priority_class_name: Option<String>,
    /// Seconds between progress events from the mover.
    pub report_interval_seconds: u64,
    /// An InProgress CR whose progress has not moved for this long (since the last progress seen, or the
    /// mover pod's start) is failed with "no progress for N m" and its mover stopped. 0 disables it.
    pub no_progress_timeout_seconds: u64,
    /// On a Velero DeleteBackupRequest, forget the backup's snapshots and prune the repositories.
    pub prune_on_backup_deletion: bool,
    /// Prune grace period: unreferenced data is deleted once it has been unreferenced this long, which
    /// keeps backups running at the same time safe (`design/0003-backup-deletion.md`). 0 deletes at once.
    pub prune_grace_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            movers: BTreeMap::from([(
                "ferry".to_string(),
                Mover {
                    image: "localhost/ferry-mover:dev".into(),
                    image_pull_policy: default_pull_policy(),
                    // The image's entrypoint is `ferry`; `ferry datapath` serves the API.
                    args: vec!["datapath".into()],
                },
            )]),
            agent: Agent {
                image: "localhost/ferry-mover:dev".into(),
                image_pull_policy: default_pull_policy(),
            },
            watch_namespace: "velero".into(),
            per_node_limit: 1,
            prepare_queue_length: 16,
            prepare_timeout_seconds: 30 * 60,
            cancel_grace_seconds: 10,
            repository_password_secret: "ferry-repository".into(),
            mover_service_account: "ferry-mover".into(),
            pod_resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            cache_size_limit: "2Gi".into(),
            priority_class_name: None,
            report_interval_seconds: 5,
            no_progress_timeout_seconds: 30 * 60,
            prune_on_backup_deletion: true,
            prune_grace_seconds: 6 * 3600,
        }
    }
}

impl Config {
    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let c: Config = serde_yaml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        if self.movers.is_empty() {
            return Err(Error::Config("`movers` names no data mover".into()));
        }
        for (name, m) in &self.movers {
            if name.is_empty() || name == "velero" || name.starts_with("velero-") {
                return Err(Error::Config(format!(
                    "mover name {name:?} is reserved for Velero's built-in data mover"
                )));
            }
            if m.image.is_empty() {
                return Err(Error::Config(format!("mover {name:?} has no image")));
            }
        }
        if self.agent.image.is_empty() || self.agent.image_pull_policy.is_empty() {
            return Err(Error::Config(
                "agent needs an image and an imagePullPolicy".into(),
            ));
        }
        if let Err(why) = crate::validate::dns1123_label(&self.watch_namespace) {
            return Err(Error::Config(format!(
                "watchNamespace {:?}: {why}",
                self.watch_namespace
            )));
        }
        if self.per_node_limit == 0 || self.prepare_queue_length == 0 {
            return Err(Error::Config(
                "perNodeLimit and prepareQueueLength must be at least 1".into(),
            ));
        }
        match crate::validate::quantity(&self.cache_size_limit) {
            Ok(v) if v > 0.0 => Ok(()),
            Ok(_) => Err(Error::Config("cacheSizeLimit must be positive".into())),
            Err(why) => Err(Error::Config(format!(
                "cacheSizeLimit {:?}: {why}",
                self.cache_size_limit
            ))),
        }
    }

    /// The mover for a CR's `spec.datamover`, if it is one of ours.
    pub fn mover(&self, datamover: Option<&str>) -> Option<&Mover> {
        self.movers.get(datamover?)
    }

    /// The prepare timeout.
    pub fn prepare_timeout(&self) -> Duration {
        Duration::from_secs(self.prepare_timeout_seconds)
    }

    /// How long an InProgress CR may go without progress; `None` when disabled.
    pub fn no_progress_timeout(&self) -> Option<Duration> {
        (self.no_progress_timeout_seconds > 0)
            .then(|| Duration::from_secs(self.no_progress_timeout_seconds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = Config::from_yaml("perNodeLimit: 2\n").expect("valid");
        assert_eq!(c.per_node_limit, 2);
        assert!(c.mover(Some("ferry")).is_some());
        assert!(c.mover(Some("velero")).is_none());
        assert!(c.mover(None).is_none());
        assert!(Config::from_yaml("movers: {velero: {image: x}}").is_err());
        assert!(Config::from_yaml("perNodeLimit: 0").is_err());
        assert!(Config::from_yaml("bogus: 1").is_err());
        assert!(Config::from_yaml("cacheSizeLimit: 2GB").is_err());
        assert!(Config::from_yaml("cacheSizeLimit: 0").is_err());
        assert!(Config::from_yaml("agent: {image: \"\"}").is_err());
        assert!(Config::from_yaml("agent: {image: a, bogus: 1}").is_err());
        assert_eq!(c.agent.image, "localhost/ferry-mover:dev");
        assert_eq!(c.movers["ferry"].args, ["datapath"]);
        let third = Config::from_yaml("movers: {acme: {image: a}}").expect("valid");
        assert!(third.movers["acme"].args.is_empty());
        assert_eq!(c.no_progress_timeout(), Some(Duration::from_secs(30 * 60)));
        let off = Config::from_yaml("noProgressTimeoutSeconds: 0").expect("valid");
        assert_eq!(off.no_progress_timeout(), None);
    }

    #[test]
    fn the_watched_namespace_is_required_and_checked() {
        assert_eq!(Config::default().watch_namespace, "velero");
        let base = "movers: {ferry: {image: i}}\n";
        assert_eq!(
            Config::from_yaml(&format!("{base}watchNamespace: backups\n"))
                .expect("valid")
                .watch_namespace,
            "backups"
        );
        for bad in ["\"\"", "Velero", "a/b", "-x"] {
            assert!(
                Config::from_yaml(&format!("{base}watchNamespace: {bad}\n")).is_err(),
                "{bad} accepted"
            );
        }
    }
}
