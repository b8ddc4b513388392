//! Command-line interface: argument parsing, progress display and output formatting. The work is the
//! engine's (`ferry_engine`: repository targets, backup, restore, forget, prune, check, demo) and, for
//! `ferry agent` and `ferry datapath`, the mover library's ([`ferry_mover::agent`], [`ferry_mover::datapath`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::{Parser, Subcommand};
use ferry_engine::backend::s3::{self, S3Options};
use ferry_engine::backup::{BackupOptions, ParentSpec};
use ferry_engine::cancel::CancelOnSignals;
use ferry_engine::demo::Step;
use ferry_engine::forget::Selection;
use ferry_engine::listing::ReadAhead;
use ferry_engine::open::Target;
use ferry_engine::progress::Progress;
use ferry_engine::prune::{DEFAULT_GRACE_SECONDS, PruneOptions};
use ferry_engine::repo::Repository;
use ferry_engine::restore::RestoreOptions;
use ferry_engine::tree::NodeKind;
use ferry_proto::result::{BackupResult, RestoreResult};

/// Ferry: deduplicated, compressed, encrypted backups to a directory or S3.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Repository: a path, file://PATH or s3://BUCKET/PREFIX.
    #[arg(long, short = 'r', env = "FERRY_REPO", global = true)]
    pub repo: Option<String>,
    /// File holding the repository password (else $FERRY_PASSWORD).
    #[arg(long, env = "FERRY_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// S3 endpoint URL for S3-compatible servers.
    #[arg(long, env = "FERRY_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: from the AWS chain, else us-east-1).
    #[arg(long, env = "FERRY_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Use path-style S3 addressing.
    #[arg(long, env = "FERRY_S3_PATH_STYLE", global = true)]
    pub s3_path_style: bool,
    /// AWS profile to take S3 credentials from.
    #[arg(long, env = "FERRY_S3_PROFILE", global = true)]
    pub s3_profile: Option<String>,
    /// PEM file of CA certificates to trust for the S3 endpoint, besides the system roots
    /// ($FERRY_S3_CA_PEM may hold the PEM text itself).
    #[arg(long, env = "FERRY_S3_CA_FILE", global = true)]
    pub s3_ca_file: Option<PathBuf>,
    /// Do not verify the S3 server's TLS certificate (self-signed test servers only).
    #[arg(long, env = "FERRY_S3_INSECURE_SKIP_TLS_VERIFY", global = true)]
    pub s3_insecure_skip_tls_verify: bool,
    /// Longest wait for a connection to the S3 endpoint, in seconds.
    #[arg(long, env = "FERRY_S3_CONNECT_TIMEOUT", global = true, value_name = "SECONDS",
          default_value_t = s3::DEFAULT_CONNECT_TIMEOUT.as_secs())]
    pub s3_connect_timeout: u64,
    /// Longest single S3 request attempt (sending a pack included), in seconds.
    #[arg(long, env = "FERRY_S3_ATTEMPT_TIMEOUT", global = true, value_name = "SECONDS",
          default_value_t = s3::DEFAULT_ATTEMPT_TIMEOUT.as_secs())]
    pub s3_attempt_timeout: u64,
    /// Longest silence while an S3 download streams in, in seconds (the read is then retried).
    #[arg(long, env = "FERRY_S3_READ_TIMEOUT", global = true, value_name = "SECONDS",
          default_value_t = s3::DEFAULT_READ_TIMEOUT.as_secs())]
    pub s3_read_timeout: u64,
    /// Longest S3 call, retries included, in seconds (at most 120).
    #[arg(long, env = "FERRY_S3_OPERATION_TIMEOUT", global = true, value_name = "SECONDS",
          default_value_t = s3::DEFAULT_OPERATION_TIMEOUT.as_secs())]
    pub s3_operation_timeout: u64,
    /// Attempts per S3 call, the first included.
    #[arg(long, env = "FERRY_S3_MAX_ATTEMPTS", global = true,
          default_value_t = s3::DEFAULT_MAX_ATTEMPTS)]
    pub s3_max_attempts: u32,
    /// Directory of the local metadata cache.
    #[arg(long, env = "FERRY_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Hard size limit of the cache, in MiB.
    #[arg(long, default_value_t = 256, global = true)]
    pub cache_limit_mib: u64,
    /// Run without the local cache.
    #[arg(long, global = true)]
    pub no_cache: bool,
    /// How a repository created now compresses: lz4 (fastest), zstd or zstd:LEVEL (1-19, smaller), or
    /// auto (zstd for text-like data, lz4 for the rest); an existing repository keeps its own.
    #[arg(long, env = "FERRY_COMPRESSION", global = true, default_value = "lz4")]
    pub compression: ferry_engine::pack::Compression,
    /// Machine-readable output: JSON on stdout, JSON progress lines on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress display.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new repository.
    Init,
    /// Back up a directory, file, or (with --block-device) a raw device; prints the snapshot id.
    Backup {
        /// What to back up.
        path: PathBuf,
        /// Parent snapshot (`latest`, an id, or `none`); default: the latest of the same path, host and tags.
        #[arg(long)]
        parent: Option<String>,
        /// Tag to record, K=V (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Back up the raw content of a block device or image file.
        #[arg(long)]
        block_device: bool,
        /// Host name to record and match parents by.
        #[arg(long)]
        host: Option<String>,
        /// Concurrent pack uploads (default: 2 for a local repository, 4 for S3).
        #[arg(long)]
        uploads: Option<usize>,
        /// Files read at once (default: 4 per core, 4 to 16).
        #[arg(long)]
        readers: Option<usize>,
        /// Drop what was read from the page cache as the backup goes: for a snapshot or an unmounted copy
        /// that nothing else reads (it drops other readers' cached pages of the same files too).
        #[arg(long)]
        drop_cache: bool,
    },
    /// Restore a snapshot (`latest` or an id) into TARGET.
    Restore {
        /// Snapshot id, id prefix, or `latest`.
        snapshot: String,
        /// Directory to restore into (device or image file for block snapshots).
        target: PathBuf,
        /// Leave runs of zeros as holes.
        #[arg(long)]
        sparse: bool,
        /// Read the restored files back and check them.
        #[arg(long)]
        verify: bool,
        /// Concurrent downloads.
        #[arg(long, default_value_t = 4)]
        downloads: usize,
        /// Drop large files' written pages from the page cache once they are on disk: for a new volume
        /// nothing else reads yet.
        #[arg(long)]
        drop_cache: bool,
    },
    /// List snapshots.
    Snapshots,
    /// List the files of a snapshot, optionally under PATH.
    Ls {
        /// Snapshot id, id prefix, or `latest`.
        snapshot: String,
        /// Path inside the snapshot.
        path: Option<String>,
    },
    /// Delete snapshots: the given ids, or every snapshot carrying all the given tags.
    Forget {
        /// Snapshot ids or id prefixes.
        ids: Vec<String>,
        /// Select snapshots by tag, K=V (repeatable; all must match).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Prune afterwards.
        #[arg(long)]
        prune: bool,
        /// Grace period of the prune, in seconds (see `prune`).
        #[arg(long, default_value_t = DEFAULT_GRACE_SECONDS)]
        grace_seconds: u64,
        /// How long the prune waits for another maintenance run to finish.
        #[arg(long, default_value_t = 0)]
        lock_wait_seconds: u64,
    },
    /// Delete data no snapshot references. Backups running meanwhile are safe: data they may use waits
    /// until they end. Packs are deleted once unreferenced for the grace period (default 6 h: time to
    /// notice a mistaken forget); 0 deletes at once. One prune per repository at a time.
    Prune {
        /// Grace period in seconds.
        #[arg(long, default_value_t = DEFAULT_GRACE_SECONDS)]
        grace_seconds: u64,
        /// How long to wait for another maintenance run to finish.
        #[arg(long, default_value_t = 0)]
        lock_wait_seconds: u64,
    },
    /// Verify the repository.
    Check {
        /// Also download and verify every pack.
        #[arg(long)]
        read_data: bool,
    },
    /// The mover pod's agent (run by the Ferry controller inside a pod): the job from $FERRY_AGENT_JOB,
    /// the data path on its socket, Events on the CR, the termination message.
    #[command(hide = true)]
    Agent {
        /// The data path's socket.
        #[arg(long, env = "FERRY_DATAPATH_SOCKET", default_value = ferry_proto::datapath::SOCKET_PATH)]
        socket: PathBuf,
        /// The job (base64 protobuf ferry.agent.v1.AgentJob).
        #[arg(long, env = "FERRY_AGENT_JOB", hide_env_values = true)]
        job: String,
        /// Where the result goes.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
        /// Emit no Events (outside a cluster).
        #[arg(long)]
        no_events: bool,
        /// Seconds the data path may take to start answering.
        #[arg(long, default_value_t = 120)]
        connect_timeout: u64,
    },
    /// Serve Ferry's engine as a data path (gRPC `ferry.datapath.v1` on a unix socket) until SIGTERM.
    Datapath {
        /// The socket (a stale one is replaced).
        #[arg(long, env = "FERRY_DATAPATH_SOCKET", default_value = ferry_proto::datapath::SOCKET_PATH)]
        socket: PathBuf,
    },
    /// Demonstrate Ferry end to end in a temporary directory.
    Demo {
        /// Work directory (default: a new temporary directory, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Parses `K=V`.
pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("tag {s:?} is not K=V"))?;
    if k.is_empty() {
        return Err(format!("tag {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<ferry_engine::Error>()
                .is_some_and(ferry_engine::Error::is_canceled)
            {
                eprintln!("ferry: canceled");
                return ExitCode::from(130);
            }
            eprintln!("ferry: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Global {
    /// The repository target the options name.
    fn target(&self) -> Target {
        Target {
            repo: self.repo.clone(),
            password_file: self.password_file.clone(),
            s3: S3Options {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                profile: self.s3_profile.clone(),
                insecure_skip_tls_verify: self.s3_insecure_skip_tls_verify,
                ..s3_limits(self)
            },
            s3_ca_file: self.s3_ca_file.clone(),
            cache_dir: self.cache_dir.clone(),
            no_cache: self.no_cache,
            cache_limit: self.cache_limit_mib * 1024 * 1024,
            compression: self.compression,
        }
    }
}

/// The global options and the repository target they name.
struct Ctx {
    global: Global,
    target: Target,
}

impl Ctx {
    /// Opens the repository.
    async fn open(&self) -> Result<Arc<Repository>> {
        Ok(self.target.open().await?)
    }

    /// Creates the repository.
    async fn init(&self) -> Result<()> {
        let cfg = self.target.init().await?;
        if self.global.json {
            println!("{}", serde_json::json!({ "repositoryId": cfg.id }));
        } else {
            println!(
                "created repository {} at {}",
                cfg.id,
                self.global.repo.as_deref().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Runs `fut` while showing progress, canceling on Ctrl-C / SIGTERM.
    async fn with_progress<T>(
        &self,
        what: &str,
        progress: Arc<Progress>,
        fut: impl Future<Output = ferry_engine::Result<T>>,
    ) -> Result<T> {
        let show = !self.global.quiet && (self.global.json || std::io::stderr().is_terminal());
        let json = self.global.json;
        let p = progress.clone();
        let what = what.to_string();
        let display = tokio::spawn(async move {
            if !show {
                return;
            }
            let bar = (!json).then(|| {
                let b = indicatif::ProgressBar::new(0);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                    )
                    .expect("template"),
                );
                b.set_prefix(what.clone());
                b
            });
            let tick = if json {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(150)
            };
            loop {
                tokio::time::sleep(tick).await;
                let r = p.report();
                match &bar {
                    Some(b) => {
                        b.set_length(if r.totals_known {
                            r.bytes_total.max(r.bytes_done)
                        } else {
                            r.bytes_done
                        });
                        b.set_position(r.bytes_done);
                        b.set_message(format!(
                            "{}/{} files",
                            r.files_done,
                            if r.totals_known {
                                r.files_total.to_string()
                            } else {
                                "?".into()
                            }
                        ));
                    }
                    None => eprintln!("{}", serde_json::json!({ "progress": what, "report": r })),
                }
            }
        });
        let signals = CancelOnSignals::new(progress);
        let out = fut.await;
        display.abort();
        drop(signals);
        let _ = display.await;
        Ok(out?)
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Ctx {
        target: cli.global.target(),
        global: cli.global,
    };
    match cli.cmd {
        Command::Init => ctx.init().await?,
        Command::Backup {
            path,
            parent,
            tags,
            block_device,
            host,
            uploads,
            readers,
            drop_cache,
        } => {
            let progress = Arc::new(Progress::default());
            // Both run while the repository opens (the password's key derivation takes a core meanwhile).
            let read_ahead = (!block_device).then(|| ReadAhead::start(&path));
            ferry_engine::backup::start_scan(&path, block_device, &progress, read_ahead.as_ref());
            let repo = ctx.open().await?;
            let mut opts = BackupOptions::new(path);
            opts.block_device = block_device;
            opts.read_ahead = read_ahead;
            opts.parent = match parent.as_deref() {
                None => ParentSpec::Auto,
                Some("none") => ParentSpec::None,
                Some(s) => ParentSpec::Snapshot(s.to_string()),
            };
            opts.tags = tags.into_iter().collect::<BTreeMap<_, _>>();
            opts.hostname = host;
            opts.uploads = uploads.unwrap_or(if ctx.target.is_remote()? { 4 } else { 2 });
            opts.readers = readers.unwrap_or(opts.readers);
            opts.drop_cache = drop_cache;
            let r = backup(&ctx, repo, opts, progress).await?;
            if ctx.global.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", r.snapshot_id);
            }
        }
        Command::Restore {
            snapshot,
            target,
            sparse,
            verify,
            downloads,
            drop_cache,
        } => {
            let repo = ctx.open().await?;
            let opts = RestoreOptions {
                sparse,
                verify,
                downloads,
                drop_cache,
                ..RestoreOptions::new(target)
            };
            let r = restore(&ctx, repo, &snapshot, &opts).await?;
            if ctx.global.json {
                println!("{}", serde_json::to_string(&r)?);
            }
        }
        Command::Snapshots => snapshots(&ctx).await?,
        Command::Ls { snapshot, path } => ls(&ctx, &snapshot, path.as_deref()).await?,
        Command::Check { read_data } => {
            let repo = ctx.open().await?;
            let progress = Arc::new(Progress::default());
            let r = ctx
                .with_progress(
                    "check",
                    progress.clone(),
                    ferry_engine::check::check(repo, read_data, progress),
                )
                .await?;
            if ctx.global.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} packs, {} blobs, {} snapshots, {} trees checked{}",
                    r.packs,
                    r.blobs,
                    r.snapshots,
                    r.trees,
                    if r.read_data {
                        ", all pack data read and verified"
                    } else {
                        ""
                    }
                );
                for w in &r.warnings {
                    println!("warning: {w}");
                }
                for e in &r.errors {
                    println!("error: {e}");
                }
            }
            if !r.ok() {
                eprintln!("ferry: check found {} error(s)", r.errors.len());
                return Ok(ExitCode::FAILURE);
            }
            if !ctx.global.json {
                println!("no errors found");
            }
        }
        Command::Forget {
            ids,
            tags,
            prune,
            grace_seconds,
            lock_wait_seconds,
        } => {
            let selection = Selection::new(ids, tags)?;
            let repo = ctx.open().await?;
            let gone = ferry_engine::forget::forget(&repo, &selection).await?;
            let report = if prune {
                Some(
                    ferry_engine::prune::prune_with(
                        repo,
                        &PruneOptions::from_secs(grace_seconds, lock_wait_seconds),
                        Arc::new(Progress::default()),
                    )
                    .await?,
                )
            } else {
                None
            };
            if ctx.global.json {
                let ids: Vec<String> = gone.iter().map(|i| i.to_hex()).collect();
                println!("{}", serde_json::json!({"forgotten": ids, "prune": report}));
            } else {
                println!("forgot {} snapshot(s)", gone.len());
                if let Some(r) = report {
                    print_prune(&r);
                }
            }
        }
        Command::Prune {
            grace_seconds,
            lock_wait_seconds,
        } => {
            let repo = ctx.open().await?;
            let r = ferry_engine::prune::prune_with(
                repo,
                &PruneOptions::from_secs(grace_seconds, lock_wait_seconds),
                Arc::new(Progress::default()),
            )
            .await?;
            if ctx.global.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print_prune(&r);
            }
        }
        Command::Agent {
            socket,
            job,
            termination_log,
            no_events,
            connect_timeout,
        } => {
            let job = ferry_mover::agent::decode_job(&job)?;
            let settings = ferry_mover::agent::Settings {
                socket,
                termination_log,
                events: !no_events,
                connect_timeout: Duration::from_secs(connect_timeout),
                ..Default::default()
            };
            return Ok(ferry_mover::agent::run(job, &settings).await);
        }
        Command::Datapath { socket } => {
            let svc = ferry_mover::datapath::EngineDataPath {
                cache_dir: ctx.target.cache_dir.clone(),
                cache_limit: ctx.target.cache_limit,
                compression: ctx.target.compression,
            };
            ferry_mover::datapath::serve(svc, &socket, async {
                ferry_engine::cancel::terminated().await;
            })
            .await?;
        }
        Command::Demo { dir } => {
            ferry_engine::demo::run(dir, print_demo_step).await?;
            println!("demo passed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Backs up and returns the result document.
async fn backup(
    ctx: &Ctx,
    repo: Arc<Repository>,
    opts: BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupResult> {
    let _trim = ferry_mover::memory::TrimWhileBackingUp::start();
    let out = ctx
        .with_progress(
            "backup",
            progress.clone(),
            ferry_engine::backup::backup(repo, opts, progress),
        )
        .await?;
    let s = &out.snapshot.summary;
    if !ctx.global.json && !ctx.global.quiet {
        eprintln!(
            "snapshot {} saved: {} files, {} dirs, {} total, {} read, {} new, {} stored, {:.1}s",
            out.id.short(),
            s.files,
            s.dirs,
            human(s.total_bytes),
            human(s.read_bytes),
            human(s.new_bytes),
            human(s.stored_bytes),
            s.seconds
        );
    }
    Ok(s.result(&out.id))
}

/// Restores and returns the result document.
async fn restore(
    ctx: &Ctx,
    repo: Arc<Repository>,
    snapshot: &str,
    opts: &RestoreOptions,
) -> Result<RestoreResult> {
    let (id, snap) = repo.find_snapshot(snapshot).await?;
    let progress = Arc::new(Progress::default());
    let s = ctx
        .with_progress(
            "restore",
            progress.clone(),
            ferry_engine::restore::restore(repo, &snap, opts, progress),
        )
        .await?;
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if !ctx.global.json && !ctx.global.quiet {
        eprintln!(
            "restored snapshot {} to {}: {} files, {} dirs, {}{}",
            id.short(),
            opts.target.display(),
            s.files,
            s.dirs,
            human(s.bytes),
            if opts.verify { ", verified" } else { "" }
        );
    }
    Ok(s.result(&id))
}

async fn snapshots(ctx: &Ctx) -> Result<()> {
    let repo = ctx.open().await?;
    // The snapshots that read are listed; one that does not is named on stderr, and stops nothing.
    let (all, failed) = repo.each_snapshot().await?;
    for (name, e) in &failed {
        eprintln!("warning: snapshots/{name} does not read as a snapshot ({e}); run `ferry check`");
    }
    if ctx.global.json {
        let v: Vec<_> = all
            .iter()
            .map(|(id, s)| {
                let mut j = serde_json::to_value(s).expect("snapshot serialises");
                j["id"] = serde_json::Value::String(id.to_hex());
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:<16} {:>10} {:>10}  {:<5} PATH",
        "ID", "TIME", "HOST", "SIZE", "NEW", "KIND"
    );
    for (id, s) in &all {
        println!(
            "{:<10} {:<20} {:<16} {:>10} {:>10}  {:<5} {}{}",
            id.short(),
            s.time.get(..19).unwrap_or(&s.time).replace('T', " "),
            s.hostname,
            human(s.summary.total_bytes),
            human(s.summary.new_bytes),
            match s.source {
                ferry_engine::snapshot::SourceKind::Filesystem => "fs",
                ferry_engine::snapshot::SourceKind::Block => "block",
            },
            s.path,
            if s.tags.is_empty() {
                String::new()
            } else {
                format!(
                    "  {}",
                    s.tags
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        );
    }
    println!("{} snapshot(s)", all.len());
    Ok(())
}

async fn ls(ctx: &Ctx, snapshot: &str, sub: Option<&str>) -> Result<()> {
    let repo = ctx.open().await?;
    let (_, snap) = repo.find_snapshot(snapshot).await?;
    let mut tree = repo.read_tree(&snap.tree).await?;
    let mut prefix = PathBuf::from("/");
    for comp in sub.unwrap_or("").split('/').filter(|c| !c.is_empty()) {
        let node = tree
            .find(comp.as_bytes())
            .ok_or_else(|| anyhow!("{comp:?} not found in snapshot"))?;
        match &node.kind {
            NodeKind::Dir { subtree } => tree = repo.read_tree(subtree).await?,
            _ => bail!("{comp:?} is not a directory"),
        }
        prefix.push(comp);
    }
    let mut stack = vec![(prefix, tree)];
    while let Some((dir, tree)) = stack.pop() {
        for n in &tree.nodes {
            let path = dir.join(OsStr::from_bytes(&n.name));
            print_node(ctx.global.json, &path, n);
            if let NodeKind::Dir { subtree } = &n.kind {
                stack.push((path, repo.read_tree(subtree).await?));
            }
        }
    }
    Ok(())
}

fn print_node(json: bool, path: &Path, n: &ferry_engine::tree::Node) {
    let (t, extra) = match &n.kind {
        NodeKind::File { .. } => ('-', String::new()),
        NodeKind::Dir { .. } => ('d', String::new()),
        NodeKind::Symlink { target } => ('l', format!(" -> {}", String::from_utf8_lossy(target))),
        NodeKind::Fifo => ('p', String::new()),
        NodeKind::CharDevice { .. } => ('c', String::new()),
        NodeKind::BlockDevice { .. } => ('b', String::new()),
        NodeKind::Socket => ('s', String::new()),
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"path": path.to_string_lossy(), "type": t.to_string(), "mode": n.mode, "uid": n.uid,
                "gid": n.gid, "size": n.size, "mtime": n.mtime_sec, "mtimeNsec": n.mtime_nsec})
        );
    } else {
        println!(
            "{t}{:04o} {:>6} {:>6} {:>12} {}{}",
            n.mode,
            n.uid,
            n.gid,
            n.size,
            path.display(),
            extra
        );
    }
}

fn print_prune(r: &ferry_engine::prune::PruneReport) {
    println!(
        "{} snapshot(s) kept; {} pack(s) deleted ({}), {} repacked, {} in use, {} unreferenced pack(s) \
         pending (grace period, or {} running backup(s)); {} index segment(s) merged",
        r.snapshots,
        r.packs_deleted,
        human(r.bytes_deleted),
        r.packs_repacked,
        r.packs_kept,
        r.packs_pending,
        r.backups_running,
        r.index_segments_merged
    );
}

/// Prints a step of `ferry demo`.
fn print_demo_step(step: Step<'_>) {
    match step {
        Step::Started { work } => println!("== Ferry demo in {}", work.display()),
        Step::Created { id, repo } => println!(
            "1. created an encrypted repository {id} at {}",
            repo.display()
        ),
        Step::FirstBackup(b) => {
            let s = &b.snapshot.summary;
            println!(
                "2. first backup {}: {} files, {} logical, {} new, {} stored (dedup + lz4), {:.2}s",
                b.id.short(),
                s.files,
                human(s.total_bytes),
                human(s.new_bytes),
                human(s.stored_bytes),
                s.seconds
            );
        }
        Step::Changed => {
            println!("3. changed 64 KiB inside a 24 MiB file, added one file, removed one")
        }
        Step::SecondBackup(b) => {
            let s = &b.snapshot.summary;
            println!(
                "4. second backup {} (parent {}): read {} of {}, {} new, {} stored, {:.2}s",
                b.id.short(),
                b.snapshot.parent.map(|p| p.short()).unwrap_or_default(),
                human(s.read_bytes),
                human(s.total_bytes),
                human(s.new_bytes),
                human(s.stored_bytes),
                s.seconds
            );
        }
        Step::Restored { target, summary } => println!(
            "5. restored latest to {}: {} files, {} (sparse, every chunk verified)",
            target.display(),
            summary.files,
            human(summary.bytes)
        ),
        Step::Compared { entries } => println!(
            "6. compared source and restore: {entries} entries identical (content, type, mode, mtime, links)"
        ),
        Step::Checked(r) => println!(
            "7. check --read-data: {} packs, {} blobs, {} snapshots: no errors",
            r.packs, r.blobs, r.snapshots
        ),
    }
}

/// Bytes in binary units.
fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The S3 limits given on the command line (the rest of the options at their defaults).
fn s3_limits(g: &Global) -> S3Options {
    S3Options {
        connect_timeout: Duration::from_secs(g.s3_connect_timeout),
        attempt_timeout: Duration::from_secs(g.s3_attempt_timeout),
        read_timeout: Duration::from_secs(g.s3_read_timeout),
        operation_timeout: Duration::from_secs(g.s3_operation_timeout),
        max_attempts: g.s3_max_attempts,
        ..Default::default()
    }
}

#[cfg(test)]
mod s3_flag_tests {
    use super::*;

    fn global(args: &[&str]) -> Global {
        let mut argv = vec!["ferry", "snapshots"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses").global
    }

    #[test]
    fn s3_limit_flags() {
        // Defaults are the library's.
        let d = s3_limits(&global(&[]));
        let lib = S3Options::default();
        assert_eq!(
            (
                d.connect_timeout,
                d.attempt_timeout,
                d.read_timeout,
                d.operation_timeout,
                d.max_attempts
            ),
            (
                lib.connect_timeout,
                lib.attempt_timeout,
                lib.read_timeout,
                lib.operation_timeout,
                lib.max_attempts
            )
        );
        d.validate_limits().expect("defaults are valid");

        let o = s3_limits(&global(&[
            "--s3-connect-timeout",
            "3",
            "--s3-attempt-timeout",
            "20",
            "--s3-read-timeout",
            "5",
            "--s3-operation-timeout",
            "90",
            "--s3-max-attempts",
            "2",
        ]));
        assert_eq!(o.connect_timeout, Duration::from_secs(3));
        assert_eq!(o.attempt_timeout, Duration::from_secs(20));
        assert_eq!(o.read_timeout, Duration::from_secs(5));
        assert_eq!(o.operation_timeout, Duration::from_secs(90));
        assert_eq!(o.max_attempts, 2);
        o.validate_limits().expect("valid");

        // Refused: unbounded or too loose for leases.
        for bad in [
            vec!["--s3-operation-timeout", "200"],
            vec!["--s3-connect-timeout", "0"],
            vec!["--s3-max-attempts", "0"],
            vec![
                "--s3-attempt-timeout",
                "100",
                "--s3-operation-timeout",
                "50",
            ],
        ] {
            let err = s3_limits(&global(&bad))
                .validate_limits()
                .expect_err("refused")
                .to_string();
            assert!(err.contains("S3 limits"), "{bad:?}: {err}");
        }
        assert!(Cli::try_parse_from(["ferry", "snapshots", "--s3-max-attempts", "x"]).is_err());
    }
}
