//! Helpers shared by the integration tests: repositories, source trees, and a real S3 server.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use ferry_engine::backend::Backend;
use ferry_engine::backend::local::LocalBackend;
use ferry_engine::backup::{BackupOptions, BackupOutcome};
use ferry_engine::crypto::KdfParams;
use ferry_engine::progress::Progress;
use ferry_engine::repo::{OpenOptions, Repository};
use ferry_engine::restore::{RestoreOptions, RestoreSummary};

pub const PASSWORD: &[u8] = b"correct horse battery staple";
/// Cheap key derivation so tests stay fast (the default is 64 MiB).
pub const FAST_KDF: KdfParams = KdfParams {
    m_kib: 1024,
    t: 1,
    p: 1,
};

pub fn no_cache() -> OpenOptions {
    OpenOptions {
        cache_dir: None,
        cache_limit: 0,
        ..Default::default()
    }
}

pub async fn new_repo(backend: Arc<dyn Backend>) -> Arc<Repository> {
    Repository::init(backend.clone(), PASSWORD, FAST_KDF)
        .await
        .unwrap();
    Arc::new(
        Repository::open(backend, PASSWORD, &no_cache())
            .await
            .unwrap(),
    )
}

pub async fn reopen(backend: &Arc<dyn Backend>) -> Arc<Repository> {
    Arc::new(
        Repository::open(backend.clone(), PASSWORD, &no_cache())
            .await
            .unwrap(),
    )
}

pub fn local(dir: &Path) -> Arc<dyn Backend> {
    Arc::new(LocalBackend::new(dir))
}

pub async fn backup(repo: &Arc<Repository>, src: &Path) -> BackupOutcome {
    ferry_engine::backup::backup(
        repo.clone(),
        BackupOptions::new(src),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap()
}

pub async fn restore_latest(
    repo: &Arc<Repository>,
    target: &Path,
) -> ferry_engine::Result<RestoreSummary> {
    let (_, snap) = repo.find_snapshot("latest").await?;
    let mut o = RestoreOptions::new(target);
    o.verify = true;
    ferry_engine::restore::restore(repo.clone(), &snap, &o, Arc::new(Progress::default())).await
}

pub use ferry_engine::testdata::pseudo_random;

/// A tree with every kind of entry and metadata Ferry records.
pub fn rich_tree(root: &Path) {
    use std::os::unix::ffi::OsStrExt;
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("a/small.txt"), b"hello ferry\n").unwrap();
    std::fs::write(root.join("a/b/random.bin"), pseudo_random(5 << 20, 1)).unwrap();
    std::fs::write(
        root.join("a/b/c/text.log"),
        "level=info msg=\"snapshot ready\"\n".repeat(50_000),
    )
    .unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9")),
        b"non-utf8 name",
    )
    .unwrap();
    std::os::unix::fs::symlink("a/small.txt", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling-link")).unwrap();
    std::fs::hard_link(root.join("a/small.txt"), root.join("hardlink")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.set_len(20 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"data in the middle", 10 << 20).unwrap();
    std::fs::set_permissions(
        root.join("a/small.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o750)).unwrap();
    xattr::set(
        root.join("a/b/random.bin"),
        "user.ferry.test",
        b"xattr value",
    )
    .unwrap();
    // A small file (one chunk) with all its metadata: restored through its open descriptor.
    std::fs::write(root.join("a/read-only.txt"), b"read only\n").unwrap();
    xattr::set(root.join("a/read-only.txt"), "user.ferry.small", b"v").unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_symlink_file_times(root.join("a/b/c/text.log"), t, t).unwrap();
    filetime::set_symlink_file_times(root.join("a/read-only.txt"), t, t).unwrap();
    std::fs::set_permissions(
        root.join("a/read-only.txt"),
        std::fs::Permissions::from_mode(0o400),
    )
    .unwrap();
    filetime::set_symlink_file_times(root.join("rel-link"), t, t).unwrap();
}

/// Every regular file below `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p))
        } else {
            out.push(p)
        }
    }
    out.sort();
    out
}

/// `cp -a SRC/. DST`: a copy with new inodes and ctimes but the same metadata otherwise.
pub fn copy_tree(src: &Path, dst: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success());
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn repo_root() -> PathBuf {
    // At run time: the compile-time value may name another checkout (cargo does not rebuild on a moved tree).
    Path::new(
        &std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string()),
    )
    .parent()
    .unwrap()
    .to_path_buf()
}

/// A real S3 server (versitygw, built from the Go module proxy on first use) on a free loopback port.
pub struct S3Server {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
    pub access: String,
    pub secret: String,
    /// PEM of the CA that signed the server's certificate, when it serves HTTPS.
    pub ca_pem: Option<String>,
}

/// A throwaway CA and a server certificate it signs for 127.0.0.1: (CA PEM, server cert PEM, key PEM).
fn test_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferry test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// A plain-HTTP server.
    pub async fn start() -> S3Server {
        Self::start_with(false).await
    }

    /// An HTTPS server with a certificate from a throwaway CA ([`S3Server::ca_pem`]).
    pub async fn start_tls() -> S3Server {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> S3Server {
        let out = Command::new(repo_root().join("scripts/ensure-versitygw"))
            .output()
            .expect("running scripts/ensure-versitygw (needs Go)");
        assert!(
            out.status.success(),
            "building versitygw failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let dir = tempdir();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (access, secret) = ("ferrytest".to_string(), "ferrytestsecret123".to_string());
        let log = std::fs::File::create(dir.path().join("versitygw.log")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args([
            "--access",
            &access,
            "--secret",
            &secret,
            "--port",
            &format!("127.0.0.1:{port}"),
        ]);
        let ca_pem = tls.then(|| {
            let (ca, cert, key) = test_pki();
            std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
            std::fs::write(dir.path().join("key.pem"), key).unwrap();
            cmd.arg("--cert")
                .arg(dir.path().join("cert.pem"))
                .arg("--key")
                .arg(dir.path().join("key.pem"));
            ca
        });
        let child = cmd
            .arg("posix")
            .arg(dir.path().join("root"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting versitygw");
        let log = dir.path().join("versitygw.log");
        let server = S3Server {
            child,
            _dir: dir,
            endpoint: format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" }),
            access,
            secret,
            ca_pem,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(log).unwrap_or_default();
        drop(server);
        panic!("versitygw did not start; log: {log}");
    }

    pub fn options(&self, bucket: &str, prefix: &str) -> ferry_engine::backend::s3::S3Options {
        ferry_engine::backend::s3::S3Options {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            path_style: true,
            credentials: Some((self.access.clone(), self.secret.clone(), None)),
            ca_pem: self.ca_pem.clone().map(String::into_bytes),
            ..Default::default()
        }
    }

    /// Creates a bucket through the S3 API.
    pub async fn create_bucket(&self, name: &str) {
        let creds =
            aws_sdk_s3::config::Credentials::new(&self.access, &self.secret, None, None, "test");
        let http =
            ferry_engine::backend::s3::https_client(self.ca_pem.as_deref().map(str::as_bytes))
                .unwrap();
        let conf = aws_sdk_s3::Config::builder().http_client(http);
        let conf = conf
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(creds)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
            .create_bucket()
            .bucket(name)
            .send()
            .await
            .unwrap();
    }

    /// The directory holding a bucket's objects, to tamper with them.
    pub fn bucket_dir(&self, name: &str) -> PathBuf {
        self._dir.path().join("root").join(name)
    }
}

/// A backend that holds every `put` of a key under `prefix` until released: a test can stop an operation
/// just before it commits (a backup's snapshot, say) and run something else meanwhile. It also records
/// the prefixes listed and the keys read.
#[derive(Debug)]
pub struct Gate {
    inner: Arc<dyn Backend>,
    prefix: String,
    entered: tokio::sync::Notify,
    open: tokio::sync::watch::Sender<bool>,
    listed: std::sync::Mutex<Vec<String>>,
    read: std::sync::Mutex<Vec<String>>,
}

impl Gate {
    pub fn new(inner: Arc<dyn Backend>, prefix: &str) -> Arc<Gate> {
        Arc::new(Gate {
            inner,
            prefix: prefix.into(),
            entered: tokio::sync::Notify::new(),
            open: tokio::sync::watch::channel(false).0,
            listed: Default::default(),
            read: Default::default(),
        })
    }

    /// How many times `prefix` was listed.
    pub fn listings(&self, prefix: &str) -> usize {
        let listed = self.listed.lock().unwrap();
        listed.iter().filter(|p| *p == prefix).count()
    }

    /// How many whole objects under `prefix` were read.
    pub fn reads(&self, prefix: &str) -> usize {
        let read = self.read.lock().unwrap();
        read.iter().filter(|k| k.starts_with(prefix)).count()
    }

    /// Waits until some `put` under the prefix is being held.
    pub async fn entered(&self) {
        self.entered.notified().await
    }

    /// Lets every held and future `put` through.
    pub fn release(&self) {
        self.open.send_replace(true);
    }
}

#[async_trait::async_trait]
impl Backend for Gate {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: bytes::Bytes) -> ferry_engine::Result<()> {
        if key.starts_with(&self.prefix) {
            let mut rx = self.open.subscribe();
            if !*rx.borrow() {
                self.entered.notify_one();
                while !*rx.borrow_and_update() {
                    rx.changed().await.unwrap();
                }
            }
        }
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> ferry_engine::Result<bool> {
        self.inner.put_if_absent(key, data).await
    }
    fn settle_delay(&self) -> std::time::Duration {
        self.inner.settle_delay()
    }
    async fn get(&self, key: &str) -> ferry_engine::Result<bytes::Bytes> {
        self.read.lock().unwrap().push(key.into());
        self.inner.get(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> ferry_engine::Result<bytes::Bytes> {
        self.inner.get_range(key, offset, len).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> ferry_engine::Result<Vec<ferry_engine::backend::ObjectInfo>> {
        self.listed.lock().unwrap().push(prefix.into());
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> ferry_engine::Result<()> {
        self.inner.delete(key).await
    }
}

pub mod faulty_s3;

/// A loop device over an image file of its own, detached on drop (needs root and util-linux, as the e2e
/// cluster does).
pub struct LoopDev {
    pub device: String,
    pub dir: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl LoopDev {
    /// A device of `size` bytes over an image `init` prepares (given its path).
    pub fn new(size: u64, init: impl FnOnce(&str)) -> LoopDev {
        // Not under /tmp: the image's own writes must not be a tmpfs's.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("dev.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        init(img.to_str().unwrap());
        let device = run("losetup", &["--find", "--show", img.to_str().unwrap()]);
        LoopDev { device, dir }
    }

    /// Bytes written to the device so far (`/sys/block/<dev>/stat`, sectors written).
    pub fn written(&self) -> u64 {
        let name = self.device.trim_start_matches("/dev/");
        let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        let sectors: u64 = stat.split_whitespace().nth(6).unwrap().parse().unwrap();
        sectors * 512
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

/// A scratch ext4 filesystem on a loop device, mounted for one test and unmounted on drop (also needs
/// e2fsprogs).
pub struct LoopFs {
    pub mount: PathBuf,
    pub dev: LoopDev,
}

impl LoopFs {
    pub fn new(size: u64) -> LoopFs {
        // Inode tables and journal initialised now, so no background initialisation writes to the device later.
        let dev = LoopDev::new(size, |img| {
            run(
                "mkfs.ext4",
                &["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", img],
            );
        });
        let mount = dev.dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run("mount", &[&dev.device, mount.to_str().unwrap()]);
        LoopFs { mount, dev }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}
