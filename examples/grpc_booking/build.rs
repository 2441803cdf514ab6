//! Generates the `booking.v1` messages and service from `proto/` with a
//! protobuf compiler written in Rust (`protox`): no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/booking.proto");
    let descriptors = protox::compile(["booking.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
