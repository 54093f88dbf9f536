//! Generates the gRPC code with the vendored `protoc`, so no system compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("callfleet_descriptor.bin");
    tonic_prost_build::configure()
        // Servers mount the generated services on their own axum/hyper stack.
        .build_transport(false)
        // For gRPC server reflection.
        .file_descriptor_set_path(descriptors)
        .compile_with_config(
            config,
            &[
                "proto/callfleet/fleet/v1/fleet.proto",
                "proto/callfleet/lock/v1/lock.proto",
                "proto/callfleet/control/v1/control.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
