//! Makes cargo rebuild the eBPF object when `bpf-linker` changes (it is the
//! linker of the bpf target, invisible to cargo otherwise), and says how to
//! get it when it is missing.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found ({err}); run `cargo xtask setup`"),
    }
}
