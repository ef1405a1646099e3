//! Clients built for other architectures, run under qemu-user, keep a tree identical with a
//! native server: an armv7 client with inotify and a static aarch64-musl client (the Termux
//! binary) with polling. `scripts/cross-test.sh` builds them and runs this test with
//! `FERRY_CROSS_CLIENTS` naming them; without cross binaries there is nothing to run.

use std::fs;

use super::util::*;

#[test]
#[ignore = "needs cross-built clients: run scripts/cross-test.sh"]
fn cross_arch_clients_keep_a_tree_identical() {
    let spec = std::env::var("FERRY_CROSS_CLIENTS").expect(
        "FERRY_CROSS_CLIENTS=name=inotify|poll=command ...;... (see scripts/cross-test.sh)",
    );
    let mut cl = Cluster::start("cross", &[("native", Watch::Auto)]);
    let mut names = Vec::new();
    for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
        let mut parts = item.trim().splitn(3, '=');
        let (name, watch, command) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let watch = if watch == "poll" {
            Watch::Poll
        } else {
            Watch::Auto
        };
        cl.add_client(
            name,
            watch,
            command.split_whitespace().map(String::from).collect(),
        );
        names.push(name.to_string());
    }
    assert!(!names.is_empty(), "FERRY_CROSS_CLIENTS names no client");

    // Every replica changes something: files, a nested dir, a rename and a delete.
    let native = cl.root("native");
    write(&native, "from-native.txt", "x86_64");
    write(&cl.server_root(), "nas/readme.txt", "from the server");
    for (i, n) in names.iter().enumerate() {
        write(
            &cl.root(n),
            &format!("{n}/data.bin"),
            noise(200_000, i as u64 + 1),
        );
        write(
            &cl.root(n),
            &format!("{n}/note.txt"),
            format!("written on {n}"),
        );
    }
    cl.wait_converged("every architecture's files are everywhere", |cl| {
        names.iter().enumerate().all(|(i, n)| {
            cl.roots().iter().all(|r| {
                has(r, &format!("{n}/data.bin"), &noise(200_000, i as u64 + 1))
                    && has(r, "from-native.txt", b"x86_64")
                    && has(r, "nas/readme.txt", b"from the server")
            })
        })
    });

    for n in &names {
        let r = cl.root(n);
        fs::rename(
            r.join(format!("{n}/note.txt")),
            r.join(format!("{n}/renamed.txt")),
        )
        .unwrap();
    }
    fs::remove_file(native.join("from-native.txt")).unwrap();
    cl.wait_converged("renames and deletes from every architecture", |cl| {
        cl.roots().iter().all(|r| {
            !r.join("from-native.txt").exists()
                && names.iter().all(|n| {
                    has(
                        r,
                        &format!("{n}/renamed.txt"),
                        format!("written on {n}").as_bytes(),
                    )
                })
        })
    });
}
