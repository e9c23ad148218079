//! Shared helpers for codegen tests: naga validation of WGSL.
#![allow(dead_code)]

/// Parses and validates a WGSL module with naga (subgroups and f16 enabled, as on lavapipe);
/// panics with the source and naga's message on failure.
pub fn validate_wgsl(src: &str) {
    let module = match naga::front::wgsl::parse_str(src) {
        Ok(m) => m,
        Err(e) => panic!(
            "WGSL parse error:\n{}\n--- source ---\n{src}",
            e.emit_to_string(src)
        ),
    };
    let caps = naga::valid::Capabilities::SUBGROUP | naga::valid::Capabilities::SHADER_FLOAT16;
    let mut v = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    if let Err(e) = v.validate(&module) {
        panic!(
            "WGSL validation error:\n{}\n--- source ---\n{src}",
            e.emit_to_string(src)
        );
    }
}
