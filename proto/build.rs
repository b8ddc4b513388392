//! Generates the data-path API (`proto/ferry/datapath/v1/datapath.proto`) and the agent job
//! (`proto/ferry/agent/v1/agent.proto`) with protox (a pure-Rust protobuf
//! compiler, pinned by Cargo.lock: no system protoc) and tonic-prost-build: messages, client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/ferry/datapath/v1/datapath.proto",
        "proto/ferry/agent/v1/agent.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
