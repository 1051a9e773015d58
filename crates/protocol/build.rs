//! Generates the tonic/prost code from `proto/dask.proto` with the vendored `protoc`,
//! so a build needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = proto_dir.join("dask.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure().bytes(".").compile_protos(&[file], &[proto_dir])?;
    Ok(())
}

#[expect(unsafe_code, reason = "set_var is unsafe in edition 2024; build scripts are single threaded")]
fn unsafe_set_protoc(path: &std::path::Path) {
    unsafe { std::env::set_var("PROTOC", path) };
}
