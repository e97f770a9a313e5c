//! Compiles the protobuf contract with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mycel/v1alpha1/config.proto",
        "proto/mycel/v1alpha1/ca.proto",
        "proto/mycel/v1alpha1/ratelimit.proto",
        "proto/envoy/service/auth/v3/external_auth.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        // Small per-stream buffers (see src/codec.rs).
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
