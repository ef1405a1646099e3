//! The shared-secret handshake: each side proves it knows the secret with an HMAC-SHA256 over
//! both nonces, so neither proof can be replayed and the client knows the server is genuine.
//! Both proofs also cover the fingerprint of the TLS certificate the client saw (`channel`):
//! a relay that terminates TLS with its own certificate cannot pass them on.

use std::path::Path;

use anyhow::{bail, Context};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::msg::{Nonce, Proof};

/// The SHA-256 of the server certificate the connection runs under (zeros in plaintext).
pub type Channel = [u8; 32];

/// The shortest secret we accept.
pub const MIN_SECRET: usize = 16;

/// The shared secret, read from `--secret-file`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The command that makes a good secret file at `path`, readable by its owner only.
pub fn create_command(path: &Path) -> String {
    format!(
        "(umask 077; head -c 32 /dev/urandom | base64 > {})",
        path.display()
    )
}

impl Secret {
    /// Reads a secret file; trailing whitespace (the newline `echo` adds) is not part of it.
    /// Refuses anything but a regular file (a symlink to one is followed), and a file whose
    /// mode gives other users any access: whoever can read the secret can join the sync.
    pub fn load(path: &Path) -> anyhow::Result<Secret> {
        use std::io::Read;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

        // Non-blocking, so that a FIFO is refused below instead of waiting for a writer; the
        // checks are made on what was opened, not on a name that could change meanwhile.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .with_context(|| {
                format!(
                    "cannot read secret file {}: create one with `{}`",
                    path.display(),
                    create_command(path)
                )
            })?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read secret file {}", path.display()))?;
        if !meta.is_file() {
            bail!(
                "secret file {} is not a regular file; give --secret-file a file made with `{}`",
                path.display(),
                create_command(path)
            );
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let what = if mode & 0o044 != 0 {
                "readable"
            } else if mode & 0o022 != 0 {
                "writable"
            } else {
                "accessible"
            };
            bail!(
                "secret file {} is {what} by other users (mode {mode:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("cannot read secret file {}", path.display()))?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < MIN_SECRET {
            bail!(
                "secret file {} holds {end} bytes; it needs at least {MIN_SECRET} \
                 (e.g. `{}`)",
                path.display(),
                create_command(path)
            );
        }
        Ok(Secret(bytes[..end].to_vec()))
    }

    /// Writes `bytes` to a new secret file at `path`, readable and writable by its owner only
    /// (the demo makes its secret this way).
    pub fn create(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    /// For tests and the demo.
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(bytes.to_vec())
    }

    fn mac(
        &self,
        label: &[u8],
        channel: &Channel,
        first: &Nonce,
        second: &Nonce,
        name: &str,
    ) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(channel);
        mac.update(first);
        mac.update(second);
        mac.update(name.as_bytes());
        mac
    }

    /// The client's proof: over the server's nonce, then the client's, then its name.
    pub fn client_proof(
        &self,
        channel: &Channel,
        server: &Nonce,
        client: &Nonce,
        name: &str,
    ) -> Proof {
        self.mac(b"ferry-v1 client", channel, server, client, name)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a client's proof in constant time.
    pub fn verify_client(
        &self,
        channel: &Channel,
        server: &Nonce,
        client: &Nonce,
        name: &str,
        proof: &Proof,
    ) -> bool {
        self.mac(b"ferry-v1 client", channel, server, client, name)
            .verify_slice(proof)
            .is_ok()
    }

    /// The server's proof: over the client's nonce, then its own.
    pub fn server_proof(&self, channel: &Channel, client: &Nonce, server: &Nonce) -> Proof {
        self.mac(b"ferry-v1 server", channel, client, server, "")
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks the server's proof in constant time.
    pub fn verify_server(
        &self,
        channel: &Channel,
        client: &Nonce,
        server: &Nonce,
        proof: &Proof,
    ) -> bool {
        self.mac(b"ferry-v1 server", channel, client, server, "")
            .verify_slice(proof)
            .is_ok()
    }
}

/// Fresh random bytes.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source works");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_nonces_and_name() {
        let s = Secret::from_bytes(b"0123456789abcdef");
        let other = Secret::from_bytes(b"0123456789abcdeX");
        let (sn, cn) = (random::<32>(), random::<32>());
        let (tls, relay) = ([1; 32], [2; 32]);
        let p = s.client_proof(&tls, &sn, &cn, "laptop");
        assert!(s.verify_client(&tls, &sn, &cn, "laptop", &p));
        assert!(!other.verify_client(&tls, &sn, &cn, "laptop", &p));
        assert!(!s.verify_client(&tls, &sn, &cn, "phone", &p));
        assert!(!s.verify_client(&tls, &cn, &sn, "laptop", &p));
        assert!(
            !s.verify_client(&relay, &sn, &cn, "laptop", &p),
            "bound to the certificate"
        );
        let sp = s.server_proof(&tls, &cn, &sn);
        assert!(s.verify_server(&tls, &cn, &sn, &sp));
        assert!(!other.verify_server(&tls, &cn, &sn, &sp));
        assert!(
            !s.verify_server(&relay, &cn, &sn, &sp),
            "bound to the certificate"
        );
        assert_ne!(sp, p, "client and server proofs differ");
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-secret-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn short_or_missing_secret_is_refused() {
        let dir = temp_dir("short");
        let short = dir.join("short");
        Secret::create(&short, b"tooshort\n").unwrap();
        let err = Secret::load(&short).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        let missing = dir.join("missing");
        let err = Secret::load(&missing).unwrap_err().to_string();
        assert!(err.contains("cannot read secret file"), "{err}");
        assert!(err.contains(&create_command(&missing)), "{err}");
        let good = dir.join("good");
        Secret::create(&good, b"0123456789abcdef\n").unwrap();
        assert!(Secret::load(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_others_can_access_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("mode");
        let path = dir.join("secret");
        Secret::create(&path, b"0123456789abcdef-secret\n").unwrap();
        let mode = |m: u32| std::fs::set_permissions(&path, PermissionsExt::from_mode(m)).unwrap();
        for (m, what) in [
            (0o644, "readable"),
            (0o640, "readable"),
            (0o604, "readable"),
            (0o620, "writable"),
            (0o601, "accessible"),
        ] {
            mode(m);
            let err = Secret::load(&path).unwrap_err().to_string();
            let want = format!(
                "secret file {} is {what} by other users (mode {m:04o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
            assert_eq!(err, want);
        }
        for ok in [0o600, 0o400, 0o700] {
            mode(ok);
            assert!(Secret::load(&path).is_ok(), "mode {ok:o}");
        }
        // A symlink is followed: what counts is the file it names.
        let link = dir.join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Secret::load(&link).is_ok());
        mode(0o644);
        assert!(Secret::load(&link)
            .unwrap_err()
            .to_string()
            .contains("mode 0644"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secret_that_is_not_a_regular_file_is_refused() {
        let dir = temp_dir("kind");
        let err = Secret::load(&dir).unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
        // A FIFO is refused at once, not read (which would wait for a writer).
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = Secret::load(&fifo).unwrap_err().to_string();
        assert!(err.contains("is not a regular file"), "{err}");
        let err = Secret::load(Path::new("/dev/null"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a regular file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn created_secret_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("create");
        let path = dir.join("secret");
        Secret::create(&path, b"0123456789abcdef").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(Secret::create(&path, b"again").is_err(), "never overwrites");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
