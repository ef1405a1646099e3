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

impl Secret {
    /// Reads a secret file; trailing whitespace (the newline `echo` adds) is not part of it.
    pub fn load(path: &Path) -> anyhow::Result<Secret> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read secret file {}: create one with `head -c 32 /dev/urandom | base64 > {}`",
                path.display(),
                path.display()
            )
        })?;
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end < MIN_SECRET {
            bail!(
                "secret file {} holds {end} bytes; it needs at least {MIN_SECRET} \
                 (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
                path.display(),
                path.display()
            );
        }
        Ok(Secret(bytes[..end].to_vec()))
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

    #[test]
    fn short_or_missing_secret_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "tooshort\n").unwrap();
        let err = Secret::load(&short).unwrap_err().to_string();
        assert!(err.contains("at least 16"), "{err}");
        let err = Secret::load(&dir.join("missing")).unwrap_err().to_string();
        assert!(err.contains("cannot read secret file"), "{err}");
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef\n").unwrap();
        assert!(Secret::load(&good).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
