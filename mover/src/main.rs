//! The `ferry` binary: argument parsing and printing ([`cli`]) around the engine library (`ferry_engine`)
//! and the mover pod's library (`ferry_mover::pod`).

mod cli;

fn main() -> std::process::ExitCode {
    tune_malloc();
    raise_open_files_limit();
    // The S3 client and the Kubernetes client share rustls; pin one crypto provider for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::main()
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for every Go program (kopia,
/// restic): a restore keeps files open across its writer threads and downloads, and shells and container
/// runtimes often start processes with a soft limit of 1024 under a far higher hard one. Where it cannot be
/// raised, the soft limit stays, and the restore keeps its own descriptors within it
/// (`ferry_engine::pagecache`).
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The pipeline allocates and frees multi-MiB buffers (chunks, a restore's pack ranges of up to 8 MiB) from
/// many threads. glibc's defaults (one arena per thread) keep freed memory in every thread's arena; two arenas
/// bound that. The mmap threshold is fixed at 12 MiB, above a restore's ranges and below a pack: a range freed
/// stays in the heap (up to 16 MiB free at its top before it is trimmed) and the next one reuses its pages,
/// where a buffer of its own mapping would fault in and zero every page again and unmap them when freed (a
/// quarter of a restore's CPU went to that; with these settings its system time fell from 19 to 14 s). Pack
/// buffers keep their own mappings, pooled by the backup (`ferry_engine::backup`).
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 12 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
