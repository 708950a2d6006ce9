// Generates the sightline.v1 messages and gRPC service with protoc (Debian's
// protobuf-compiler). PROTOC may point at another protoc binary.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/sightline/v1/agent.proto"], &["proto"])?;
    Ok(())
}
