//! `--ftp-external`: the server hands clients a NAS's own FTP server (Debian's vsftpd here,
//! rooted at the server's tree) instead of its embedded one, and a tree still syncs in both
//! directions. vsftpd needs root and a local account: `scripts/vsftpd-test.sh` prepares them
//! and runs this test with `FERRY_VSFTPD_USER`, `FERRY_VSFTPD_PASSWORD_FILE` and
//! `FERRY_VSFTPD_PAM` set.

use std::fs;
use std::path::Path;

use super::util::*;

/// vsftpd in the foreground on `port`, rooted at `tree`, killed with the test.
fn vsftpd(dir: &Path, tree: &Path, port: u16, user: &str, pam: &str) -> std::process::Child {
    let empty = dir.join("vsftpd-empty");
    fs::create_dir_all(&empty).unwrap();
    let conf = dir.join("vsftpd.conf");
    fs::write(
        &conf,
        format!(
            "listen=YES\nlisten_ipv6=NO\nlisten_address=127.0.0.1\nlisten_port={port}\n\
             background=NO\nanonymous_enable=NO\nlocal_enable=YES\nwrite_enable=YES\n\
             local_umask=022\nlocal_root={}\nchroot_local_user=YES\nallow_writeable_chroot=YES\n\
             pasv_enable=YES\npasv_address=127.0.0.1\nseccomp_sandbox=NO\n\
             secure_chroot_dir={}\npam_service_name={pam}\ncheck_shell=NO\nuserlist_enable=YES\n\
             userlist_deny=NO\nuserlist_file={}\n",
            tree.display(),
            empty.display(),
            dir.join("vsftpd.users").display(),
        ),
    )
    .unwrap();
    // Only the test account may log in.
    fs::write(dir.join("vsftpd.users"), format!("{user}\n")).unwrap();
    let log = fs::File::create(dir.join("vsftpd.log")).unwrap();
    std::process::Command::new("/usr/sbin/vsftpd")
        .arg(&conf)
        .stderr(log)
        .spawn()
        .expect("vsftpd starts (apt install vsftpd)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
#[ignore = "needs root, vsftpd and a local FTP account: run scripts/vsftpd-test.sh"]
fn syncs_through_an_external_vsftpd() {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set (see scripts/vsftpd-test.sh)"))
    };
    let (user, pass_file, pam) = (
        var("FERRY_VSFTPD_USER"),
        var("FERRY_VSFTPD_PASSWORD_FILE"),
        var("FERRY_VSFTPD_PAM"),
    );
    // The port is free now; another process could in rare cases take it before vsftpd does.
    let port = free_port();
    let mut vsftpd_proc = None;
    let cl = Cluster::start_custom(
        "external",
        &[("a", Watch::Auto), ("b", Watch::Poll)],
        Some(vec![
            "--ftp-external".into(),
            format!("127.0.0.1:{port}"),
            "--ftp-user".into(),
            user.clone(),
            "--ftp-password-file".into(),
            pass_file,
            // vsftpd is set up without TLS, like the old NAS servers this mode is for.
            "--insecure-plaintext".into(),
        ]),
        |dir| {
            let tree = dir.join("server");
            write(&tree, "on-the-nas.txt", "already on the NAS");
            vsftpd_proc = Some(KillOnDrop(vsftpd(dir, &tree, port, &user, &pam)));
        },
    );
    let _vsftpd = vsftpd_proc;
    let (a, b, s) = (cl.root("a"), cl.root("b"), cl.server_root());
    write(&a, "from-a/big.bin", noise(3 << 20, 3));
    write(&b, "from-b.txt", "poll client, through vsftpd");
    write(&s, "nas-edit.txt", "written on the NAS");
    // A burst of small files: packs go up and come down through vsftpd too.
    let outside = cl.dir.0.join("outside");
    for i in 0..40 {
        write(&outside, &format!("burst/f{i}"), noise(100 + i, i as u64));
    }
    fs::rename(outside.join("burst"), a.join("burst")).unwrap();
    cl.wait_converged("files travel both ways through vsftpd", |cl| {
        cl.roots().iter().all(|r| {
            (0..40).all(|i| has(r, &format!("burst/f{i}"), &noise(100 + i, i as u64)))
                && has(r, "on-the-nas.txt", b"already on the NAS")
                && has(r, "from-a/big.bin", &noise(3 << 20, 3))
                && has(r, "from-b.txt", b"poll client, through vsftpd")
                && has(r, "nas-edit.txt", b"written on the NAS")
        })
    });
    assert!(
        cl.log("a").contains("uploaded a pack of"),
        "{}",
        cl.log("a")
    );
    assert!(cl.log("b").contains("fetched a pack of"), "{}", cl.log("b"));
    let log = fs::read_to_string(cl.dir.0.join("server.log")).unwrap();
    assert!(log.contains("using the external FTP server"), "{log}");
    assert!(
        log.contains("--insecure-plaintext: the control channel and FTP run unencrypted"),
        "{log}"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
