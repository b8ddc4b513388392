//! The `ferry` binary: a thin shell around the engine library.

mod cli;
mod demo;

fn main() -> std::process::ExitCode {
    cli::main()
}
