// The sessions service's gRPC contract, compiled with protoc like sightline-proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/chat/v1/sessions.proto"], &["proto"])?;
    Ok(())
}
