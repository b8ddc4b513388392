//! What users write, checked before the controller acts on it. [`Spec::validate`] checks every DataUpload /
//! DataDownload field the controller uses, once per reconcile and before anything is created; a bad one ends
//! the CR `Failed` with an [`Invalid`] naming the field and the value. The small parsers here (names,
//! snapshot ids, tags, booleans, quantities, durations) are total: bad input is an error, never a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry_proto::velero::{DataDownload, DataUpload};
use kube::ResourceExt;

/// The longest `spec.operationTimeout` accepted (a year and a day); anything longer is a mistake.
pub const MAX_OPERATION_TIMEOUT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Prefix of the names of the objects made for a CR (`ferry-<cr name>`).
const CHILD_PREFIX: &str = "ferry-";

/// A field that cannot be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {why}")]
pub struct Invalid {
    /// The field, as written in the object (`spec.sourceNamespace`).
    pub field: String,
    /// Its value (cut to 100 characters).
    pub value: String,
    /// What is wrong.
    pub why: &'static str,
}

impl Invalid {
    fn new(field: impl Into<String>, value: &str, why: &'static str) -> Self {
        let value = match value.char_indices().nth(100) {
            Some((cut, _)) => format!("{}...", &value[..cut]),
            None => value.to_string(),
        };
        Invalid {
            field: field.into(),
            value,
            why,
        }
    }
}

/// What a rule says about a value: `Err(why)` when it breaks it.
type Rule = fn(&str) -> Result<(), &'static str>;

fn check(field: &str, value: &str, rule: Rule) -> Result<(), Invalid> {
    rule(value).map_err(|why| Invalid::new(field, value, why))
}

fn dns_label_ok(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 label (namespaces): lower-case alphanumerics and '-', at most 63, alphanumeric at both ends.
pub fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.len() <= 63 && dns_label_ok(s) {
        Ok(())
    } else {
        Err("not a DNS-1123 label (lower-case letters, digits and '-', at most 63 characters)")
    }
}

/// A DNS-1123 subdomain (most object names): dot-separated labels, at most 253 characters.
pub fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() <= 253 && s.split('.').all(dns_label_ok) {
        Ok(())
    } else {
        Err(
            "not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', at most 253 characters)",
        )
    }
}

/// A label value, as snapshot tags are: empty, or at most 63 of `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn label_value(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    let ok = b.is_empty()
        || (b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err("not a label value (at most 63 letters, digits, '-', '_' or '.')")
    }
}

/// A snapshot id as a DataUpload recorded it. Its form is the data path's (Ferry's engine: 64 hex digits;
/// another data path: its own), so the controller only bounds it: 1 to 512 visible ASCII characters. The
/// data path checks the form (Ferry's refuses `latest` or a prefix: design 0004).
pub fn snapshot_id(s: &str) -> Result<(), &'static str> {
    if !s.is_empty() && s.len() <= 512 && s.bytes().all(|c| c.is_ascii_graphic()) {
        Ok(())
    } else {
        Err("not a snapshot id (1 to 512 visible ASCII characters, as the DataUpload recorded it)")
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it (what Velero accepts in BSL config and mover config).
pub fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn go_bool_rule(s: &str) -> Result<(), &'static str> {
    go_bool(s)
        .map(|_| ())
        .ok_or("not a boolean (true or false)")
}

/// `spec.operationTimeout`: `None` for the default (empty or zero), else a Go duration of at most
/// [`MAX_OPERATION_TIMEOUT`].
pub fn operation_timeout(s: &str) -> Result<Option<Duration>, &'static str> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    match parse_go_duration(s) {
        None => Err("not a Go duration such as 10m0s or 1h30m"),
        Some(d) if d > MAX_OPERATION_TIMEOUT => Err("longer than 366 days"),
        Some(d) if d.is_zero() => Ok(None),
        Some(d) => Ok(Some(d)),
    }
}

fn operation_timeout_rule(s: &str) -> Result<(), &'static str> {
    operation_timeout(s).map(|_| ())
}

/// A Kubernetes quantity (`2Gi`, `500M`, `1.5`, `1e3`): its value, or why not.
pub fn quantity(s: &str) -> Result<f64, &'static str> {
    const WHY: &str = "not a quantity such as 2Gi or 500M";
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let digits = num.trim_start_matches(['+', '-']);
    if num.len() - digits.len() > 1
        || digits.is_empty()
        || digits.matches('.').count() > 1
        || !digits.bytes().any(|c| c.is_ascii_digit())
        || !digits.bytes().all(|c| c.is_ascii_digit() || c == b'.')
    {
        return Err(WHY);
    }
    let value: f64 = num.parse().map_err(|_| WHY)?;
    let scale = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        e => decimal_exponent(e).ok_or(WHY)?,
    };
    Some(value * scale).filter(|v| v.is_finite()).ok_or(WHY)
}

/// `e3`, `E-2`: 10 to that power.
fn decimal_exponent(s: &str) -> Option<f64> {
    let exp = s.strip_prefix(['e', 'E'])?;
    let digits = exp.trim_start_matches(['+', '-']);
    if exp.len() - digits.len() > 1 || digits.is_empty() || digits.len() > 4 {
        return None;
    }
    Some(10f64.powi(exp.parse().ok()?))
}

/// An `http(s)://host[...]` endpoint (`s3Url`).
pub fn endpoint_url(s: &str) -> Result<(), &'static str> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(r)
            if !r.is_empty()
                && !r.starts_with(['/', ':'])
                && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(())
        }
        _ => Err("not an http:// or https:// URL"),
    }
}

fn bounded_child_name(name: &str) -> Result<(), &'static str> {
    dns1123_subdomain(&format!("{CHILD_PREFIX}{name}"))
        .map_err(|_| "too long or not a DNS-1123 subdomain once prefixed with \"ferry-\" for the objects made for it")
}

fn optional(field: &str, value: Option<&str>, rule: Rule) -> Result<(), Invalid> {
    match value {
        Some(v) if !v.is_empty() => check(field, v, rule),
        _ => Ok(()),
    }
}

/// The Velero labels that become snapshot tags.
const TAG_LABELS: [&str; 2] = ["velero.io/backup-name", "velero.io/backup-uid"];

fn tags(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    for key in TAG_LABELS {
        if let Some(v) = labels.get(key) {
            check(&format!("metadata.labels[{key}]"), v, label_value)?;
        }
    }
    Ok(())
}

/// Checks a CR's spec before anything is acted on.
pub trait Spec {
    /// `Err` names the first field that cannot be acted on.
    fn validate(&self) -> Result<(), Invalid>;
}

impl Spec for DataUpload {
    fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        check("metadata.name", &self.name_any(), bounded_child_name)?;
        if s.snapshot_type != "CSI" {
            return Err(Invalid::new(
                "spec.snapshotType",
                &s.snapshot_type,
                "not supported (only CSI)",
            ));
        }
        let Some(csi) = &s.csi_snapshot else {
            return Err(Invalid::new("spec.csiSnapshot", "", "missing"));
        };
        check(
            "spec.csiSnapshot.volumeSnapshot",
            &csi.volume_snapshot,
            dns1123_subdomain,
        )?;
        check(
            "spec.csiSnapshot.storageClass",
            &csi.storage_class,
            dns1123_subdomain,
        )?;
        optional(
            "spec.csiSnapshot.snapshotClass",
            csi.snapshot_class.as_deref(),
            dns1123_subdomain,
        )?;
        check("spec.sourcePVC", &s.source_pvc, dns1123_subdomain)?;
        check("spec.sourceNamespace", &s.source_namespace, dns1123_label)?;
        check(
            "spec.backupStorageLocation",
            &s.backup_storage_location,
            dns1123_subdomain,
        )?;
        check(
            "spec.operationTimeout",
            &s.operation_timeout,
            operation_timeout_rule,
        )?;
        tags(self.labels())
    }
}

impl Spec for DataDownload {
    fn validate(&self) -> Result<(), Invalid> {
        let s = &self.spec;
        let t = &s.target_volume;
        check("metadata.name", &self.name_any(), bounded_child_name)?;
        check("spec.targetVolume.pvc", &t.pvc, dns1123_subdomain)?;
        check("spec.targetVolume.namespace", &t.namespace, dns1123_label)?;
        optional(
            "spec.targetVolume.pv",
            Some(t.pv.as_str()),
            dns1123_subdomain,
        )?;
        check("spec.snapshotID", &s.snapshot_id, snapshot_id)?;
        check("spec.sourceNamespace", &s.source_namespace, dns1123_label)?;
        check(
            "spec.backupStorageLocation",
            &s.backup_storage_location,
            dns1123_subdomain,
        )?;
        check(
            "spec.operationTimeout",
            &s.operation_timeout,
            operation_timeout_rule,
        )?;
        let sparse = s
            .data_mover_config
            .as_ref()
            .and_then(|c| c.get("WriteSparseFiles"));
        optional(
            "spec.dataMoverConfig.WriteSparseFiles",
            sparse.map(String::as_str),
            go_bool_rule,
        )?;
        if s.node_os.as_deref() == Some("windows") {
            return Err(Invalid::new(
                "spec.nodeOS",
                "windows",
                "Windows volumes are not supported",
            ));
        }
        Ok(())
    }
}

/// The BackupStorageLocation `config` keys Ferry reads, checked and parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BslConfig {
    /// `s3Url`.
    pub endpoint: Option<String>,
    /// `region`.
    pub region: Option<String>,
    /// `s3ForcePathStyle`.
    pub path_style: bool,
    /// `insecureSkipTLSVerify`.
    pub insecure_skip_tls_verify: bool,
    /// `profile` (none for `default`).
    pub profile: Option<String>,
}

/// Reads a BSL's `config`; `Err` names the key that cannot be used.
pub fn bsl_config(config: &BTreeMap<String, String>) -> Result<BslConfig, Invalid> {
    let text = |key: &str| config.get(key).filter(|v| !v.is_empty()).cloned();
    let flag = |key: &'static str| -> Result<bool, Invalid> {
        match text(key) {
            None => Ok(false),
            Some(v) => go_bool(&v).ok_or_else(|| {
                Invalid::new(format!("config.{key}"), &v, "not a boolean (true or false)")
            }),
        }
    };
    let endpoint = text("s3Url");
    optional("config.s3Url", endpoint.as_deref(), endpoint_url)?;
    Ok(BslConfig {
        endpoint,
        region: text("region"),
        path_style: flag("s3ForcePathStyle")?,
        insecure_skip_tls_verify: flag("insecureSkipTLSVerify")?,
        profile: text("profile").filter(|p| p != "default"),
    })
}

/// Longest duration [`parse_go_duration`] accepts: Go's own limit (`math.MaxInt64` nanoseconds, ~292 years).
/// Callers bound it further for what they use it for.
pub const GO_DURATION_MAX: Duration = Duration::from_nanos(i64::MAX as u64);

/// Parses a Go duration (`10m0s`, `1h30m`, `45s`, `1.5h`, `300ms`) as Velero writes `operationTimeout`.
/// `None` for anything else, negative durations, and durations beyond [`GO_DURATION_MAX`]; never panics.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let (secs, tail) = go_duration_segment(rest)?;
        total += secs;
        rest = tail;
    }
    Duration::try_from_secs_f64(total)
        .ok()
        .filter(|d| *d <= GO_DURATION_MAX)
}

/// One `<number><unit>` of a Go duration: its seconds and the rest of the text.
fn go_duration_segment(text: &str) -> Option<(f64, &str)> {
    let num_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let num: f64 = text[..num_end].parse().ok()?;
    let rest = &text[num_end..];
    let unit_end = rest
        .find(|c: char| c.is_ascii_digit() || c == '.')
        .unwrap_or(rest.len());
    let mult = match &rest[..unit_end] {
        "h" => 3600.0,
        "m" => 60.0,
        "s" => 1.0,
        "ms" => 1e-3,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some((num * mult, &rest[unit_end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10m0s"), Some(Duration::from_secs(600)));
        assert_eq!(parse_go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(
            parse_go_duration("4h0m0s"),
            Some(Duration::from_secs(14400))
        );
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("10x"), None);
        assert_eq!(parse_go_duration("m"), None);
    }

    #[test]
    fn absurd_durations_are_refused_not_a_panic() {
        assert_eq!(parse_go_duration("99999999999999999999h"), None);
    }

    #[test]
    fn names() {
        assert!(dns1123_label("app").is_ok());
        assert!(dns1123_label("Bad_NS").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_subdomain("a.b-c.d").is_ok());
        assert!(dns1123_subdomain("a..b").is_err());
        assert!(dns1123_subdomain("").is_err());
        assert!(dns1123_subdomain(&"a".repeat(254)).is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("b1_X.2").is_ok());
        assert!(label_value("a=b").is_err());
        assert!(snapshot_id(&"0a".repeat(32)).is_ok());
        // Another data path's ids (the Go example's: 32 hex digits) are its own business.
        assert!(snapshot_id("4ab12ad52a58f4c007daf97e67a2af60").is_ok());
        assert!(snapshot_id("").is_err());
        assert!(snapshot_id("a b").is_err());
        assert!(snapshot_id("a\nb").is_err());
        assert!(snapshot_id(&"a".repeat(513)).is_err());
    }

    #[test]
    fn operation_timeouts() {
        assert_eq!(operation_timeout(""), Ok(None));
        assert_eq!(operation_timeout("0s"), Ok(None));
        assert_eq!(
            operation_timeout("4h0m0s"),
            Ok(Some(Duration::from_secs(14400)))
        );
        assert!(operation_timeout("99999999999999999999h").is_err());
        assert!(operation_timeout("8785h").is_err());
        assert!(operation_timeout("-5m").is_err());
        assert!(operation_timeout("ten minutes").is_err());
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("2Gi"), Ok(2.0 * 1024f64.powi(3)));
        assert_eq!(quantity("500M"), Ok(5e8));
        assert_eq!(quantity("1e3"), Ok(1e3));
        assert_eq!(quantity("1.5"), Ok(1.5));
        for bad in ["", "Gi", "2GB", "1..2", "--1", "2 Gi", "1e", "1e99999"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bsl_config_keys() {
        let c = |pairs: &[(&str, &str)]| {
            bsl_config(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let ok = c(&[
            ("s3Url", "https://s3.example:9000"),
            ("s3ForcePathStyle", "True"),
            ("profile", "default"),
        ])
        .expect("valid");
        assert!(ok.path_style && ok.profile.is_none());
        let e = c(&[("s3ForcePathStyle", "yes")]).expect_err("not a bool");
        assert_eq!(e.field, "config.s3ForcePathStyle");
        assert!(c(&[("s3Url", "s3.example")]).is_err());
        assert!(c(&[("insecureSkipTLSVerify", "maybe")]).is_err());
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let e = check("spec.sourcePVC", &"X".repeat(10_000), dns1123_subdomain).expect_err("bad");
        assert!(e.to_string().len() < 400, "{e}");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in any::<String>()) {
            let _ = dns1123_label(&s);
            let _ = dns1123_subdomain(&s);
            let _ = label_value(&s);
            let _ = snapshot_id(&s);
            let _ = go_bool(&s);
            let _ = operation_timeout(&s);
            let _ = quantity(&s);
            let _ = endpoint_url(&s);
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn duration_like_text_never_panics(s in "[0-9.]{0,30}(h|m|s|ms|us|ns|x)?([0-9.]{0,30}(h|m|s))?") {
            let _ = parse_go_duration(&s);
            let _ = operation_timeout(&s);
        }

        #[test]
        fn go_durations_round_trip(h in 0u64..10_000, m in 0u64..60, s in 0u64..60) {
            let text = format!("{h}h{m}m{s}s");
            prop_assert_eq!(parse_go_duration(&text), Some(Duration::from_secs(h * 3600 + m * 60 + s)));
        }

        #[test]
        fn operation_timeouts_are_bounded(secs in any::<u64>()) {
            match operation_timeout(&format!("{secs}s")) {
                Ok(Some(d)) => prop_assert!(d <= MAX_OPERATION_TIMEOUT && d.as_secs() == secs),
                Ok(None) => prop_assert_eq!(secs, 0),
                Err(_) => prop_assert!(Duration::from_secs(secs) > MAX_OPERATION_TIMEOUT),
            }
        }

        #[test]
        fn valid_names_are_accepted(label in LABEL, parts in proptest::collection::vec(LABEL, 1..4)) {
            prop_assert!(dns1123_label(&label).is_ok());
            let sub = parts.join(".");
            prop_assume!(sub.len() <= 253);
            prop_assert!(dns1123_subdomain(&sub).is_ok());
        }

        #[test]
        fn accepted_labels_are_dns_labels(s in "[-a-zA-Z0-9_.]{0,70}") {
            if dns1123_label(&s).is_ok() {
                prop_assert!(s.len() <= 63 && !s.starts_with('-') && !s.ends_with('-'));
                prop_assert!(s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'));
            }
        }

        #[test]
        fn tags_and_snapshot_ids(tag in "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", id in "[!-~]{1,512}",
            other in "|[!-~]{0,20}[ \t\n][!-~]{0,20}|[!-~]{513,600}") {
            prop_assert!(label_value(&tag).is_ok());
            prop_assert!(snapshot_id(&id).is_ok());
            prop_assert!(snapshot_id(&other).is_err());
        }

        #[test]
        fn quantities_parse(n in 0u32..100_000, suffix in "|Ki|Mi|Gi|Ti|k|M|G|m|e[0-9]") {
            let q = format!("{n}{suffix}");
            prop_assert!(quantity(&q).is_ok(), "{}", q);
        }

        #[test]
        fn bsl_config_never_panics(k in "s3Url|region|s3ForcePathStyle|insecureSkipTLSVerify|profile|other",
            v in any::<String>()) {
            let _ = bsl_config(&BTreeMap::from([(k, v)]));
        }

        #[test]
        fn any_data_upload_field_is_validated_without_panic(field in 0usize..7, v in any::<String>()) {
            let mut du: DataUpload = serde_json::from_value(serde_json::json!({
                "apiVersion": "velero.io/v2alpha1", "kind": "DataUpload",
                "metadata": {"name": "b1-x", "namespace": "velero"},
                "spec": {"snapshotType": "CSI", "csiSnapshot": {"volumeSnapshot": "vs", "storageClass": "sc"},
                    "sourcePVC": "p", "datamover": "ferry", "backupStorageLocation": "default",
                    "sourceNamespace": "app", "operationTimeout": "10m0s"}})).expect("du");
            prop_assert!(du.validate().is_ok());
            let csi = du.spec.csi_snapshot.as_mut().expect("csi");
            match field {
                0 => csi.volume_snapshot = v.clone(),
                1 => csi.storage_class = v.clone(),
                2 => du.spec.source_pvc = v.clone(),
                3 => du.spec.source_namespace = v.clone(),
                4 => du.spec.backup_storage_location = v.clone(),
                5 => du.spec.operation_timeout = v.clone(),
                _ => du.spec.snapshot_type = v.clone(),
            }
            if let Err(e) = du.validate() {
                prop_assert!(e.field.starts_with("spec."), "{}", e);
                prop_assert!(e.to_string().contains(e.why));
            }
        }

        #[test]
        fn any_data_download_field_is_validated_without_panic(field in 0usize..6, v in any::<String>()) {
            let mut dd: DataDownload = serde_json::from_value(serde_json::json!({
                "apiVersion": "velero.io/v2alpha1", "kind": "DataDownload",
                "metadata": {"name": "r1-x", "namespace": "velero"},
                "spec": {"targetVolume": {"pvc": "data", "pv": "", "namespace": "app"},
                    "backupStorageLocation": "default", "datamover": "ferry",
                    "snapshotID": "ab".repeat(32), "sourceNamespace": "app",
                    "operationTimeout": "10m0s"}})).expect("dd");
            prop_assert!(dd.validate().is_ok());
            match field {
                0 => dd.spec.target_volume.pvc = v.clone(),
                1 => dd.spec.target_volume.namespace = v.clone(),
                2 => dd.spec.snapshot_id = v.clone(),
                3 => dd.spec.source_namespace = v.clone(),
                4 => dd.spec.operation_timeout = v.clone(),
                _ => { dd.spec.data_mover_config = Some(BTreeMap::from([("WriteSparseFiles".into(), v.clone())])); }
            }
            if let Err(e) = dd.validate() {
                prop_assert!(e.field.starts_with("spec."), "{}", e);
            }
        }
    }
}
