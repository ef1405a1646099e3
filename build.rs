//! Records the target triple so `ferry --version` can say what it was built for.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=FERRY_TARGET={target}");
}
