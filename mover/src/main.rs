//! The `ferry` binary: argument parsing and printing ([`cli`]) around the engine library (`ferry_engine`)
//! and the mover pod's library (`ferry_mover::pod`).

mod cli;

fn main() -> std::process::ExitCode {
    tune_malloc();
    // The S3 client and the Kubernetes client share rustls; pin one crypto provider for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    cli::main()
}

/// The pipeline allocates and frees multi-MiB buffers (chunks, packs) from many threads. glibc's defaults
/// (one arena per thread, an mmap threshold that grows to 32 MiB) keep such freed memory in the process.
/// Two arenas and a fixed 4 MiB mmap threshold (above the largest chunk, below a pack) hand pack buffers
/// back to the OS as soon as they are freed,
/// which keeps peak RSS close to the live data the pipeline's bounds allow.
#[allow(unsafe_code)]
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}
