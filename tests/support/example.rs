//! The e-commerce example's binary, as `cargo test` builds it.

use std::path::PathBuf;

/// `target/<profile>/examples/ecommerce`, next to the test's own `deps`;
/// panics with what to run when it is missing.
pub(crate) fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let binary = profile_dir.join("examples").join("ecommerce");
    assert!(
        binary.exists(),
        "{} is missing: run through `cargo test`, which builds the examples",
        binary.display()
    );
    binary
}
