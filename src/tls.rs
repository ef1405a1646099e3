//! TLS for the control channel and the FTP data plane (rustls with ring).
//!
//! There is no certificate authority. The server makes its own key and self-signed certificate
//! on first start (`<root>/.ferry/tls/`), and a client trusts it by the SHA-256 fingerprint of
//! that certificate: given with `--server-fingerprint`, or learned on first contact and kept
//! in the client's state directory (trust on first use). A certificate that differs from the
//! pinned one is refused. The shared-secret proofs also cover the fingerprint the client saw
//! (`proto::auth`), so a relay in the middle fails authentication even on first contact
//! unless it knows the secret.
//!
//! `--insecure-plaintext` turns all of this off, for tests and old FTP servers.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use smol::io::{AsyncRead, AsyncWrite};
use smol::Async;

/// The name a client asks for. Certificates are checked by fingerprint, never by name.
pub const SERVER_NAME: &str = "ferry";

/// The SHA-256 of a certificate (DER), which is what a client pins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert).into())
    }

    /// What plaintext connections bind the handshake to: no certificate at all.
    pub const PLAINTEXT: Fingerprint = Fingerprint([0; 32]);
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::agent::hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;

    /// Accepts what the server prints (`sha256:` and 64 hex digits), with or without the
    /// prefix, in either case, with or without `:` between bytes.
    fn from_str(s: &str) -> Result<Fingerprint, String> {
        let t = s.trim();
        let t = t
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("sha256:"))
            .map_or(t, |_| &t[7..]);
        let digits: Vec<u8> = t.bytes().filter(|b| *b != b':').collect();
        let bad = || {
            format!("{s:?} is not a certificate fingerprint: expected `sha256:` and 64 hex digits, as the server logs at start and `ferry status` shows")
        };
        if digits.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let pair = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// ring, the one crypto provider ferry links.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the server's certificate against a pinned fingerprint (or, on first use, accepts
/// it), and remembers the fingerprint it saw so the handshake can be bound to it.
#[derive(Debug)]
pub struct Pinned {
    expected: Option<Fingerprint>,
    seen: Mutex<Option<Fingerprint>>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    /// The fingerprint of the certificate the last handshake presented.
    pub fn seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
        match self.expected {
            Some(pinned) if pinned != got => Err(rustls::Error::General(format!(
                "the server's certificate {got} is not the pinned {pinned}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A client configuration that trusts exactly `expected` (or, when `None`, whatever the
/// server shows, to be pinned after it has proved it knows the secret).
pub fn client_config(expected: Option<Fingerprint>) -> (Arc<ClientConfig>, Arc<Pinned>) {
    let provider = provider();
    let pin = Arc::new(Pinned {
        expected,
        seen: Mutex::new(None),
        algs: provider.signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(pin.clone())
        .with_no_client_auth();
    (Arc::new(config), pin)
}

/// A TCP socket shared by a TLS stream (or the plaintext halves) and the code that shuts
/// it down to end a session.
#[derive(Clone, Debug)]
struct Shared(Arc<Async<TcpStream>>);

impl AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut &*self.0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut &*self.0).poll_close(cx)
    }
}

/// The reading half of a control connection.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a control connection.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// A control connection, encrypted or not, split so one task reads while another writes.
pub struct Link {
    /// Frames in.
    pub reader: Reader,
    /// Frames out.
    pub writer: Writer,
    /// The socket underneath: shutting it down ends both halves.
    pub socket: Arc<Async<TcpStream>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("socket", &self.socket)
            .finish()
    }
}

impl Link {
    /// A plaintext link (`--insecure-plaintext`).
    pub fn plain(socket: Async<TcpStream>) -> Link {
        let socket = Arc::new(socket);
        Link {
            reader: Box::new(Shared(socket.clone())),
            writer: Box::new(Shared(socket.clone())),
            socket,
        }
    }

    fn split<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        stream: S,
        socket: Arc<Async<TcpStream>>,
    ) -> Link {
        let (reader, writer) = smol::io::split(stream);
        Link {
            reader: Box::new(reader),
            writer: Box::new(writer),
            socket,
        }
    }

    /// The client's side of a TLS link.
    pub async fn connect(socket: Async<TcpStream>, config: Arc<ClientConfig>) -> io::Result<Link> {
        let socket = Arc::new(socket);
        let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
        let tls = futures_rustls::TlsConnector::from(config)
            .connect(name, Shared(socket.clone()))
            .await?;
        Ok(Link::split(tls, socket))
    }

    /// The server's side of a TLS link.
    pub async fn accept(
        socket: Async<TcpStream>,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<Link> {
        let socket = Arc::new(socket);
        let tls = futures_rustls::TlsAcceptor::from(config)
            .accept(Shared(socket.clone()))
            .await?;
        Ok(Link::split(tls, socket))
    }
}

#[cfg(feature = "server")]
pub use identity::{load_or_create, Identity};

#[cfg(feature = "server")]
mod identity {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::Path;
    use std::sync::Arc;

    use anyhow::{bail, Context};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::{provider, Fingerprint};

    /// The server's certificate and what serves it.
    #[derive(Debug)]
    pub struct Identity {
        /// What clients pin.
        pub fingerprint: Fingerprint,
        /// For the control channel and the embedded FTP server alike.
        pub config: Arc<rustls::ServerConfig>,
    }

    /// Loads the server's key and certificate from `dir` (`<root>/.ferry/tls`), making them
    /// on first start. The key must not be readable by other users.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Identity> {
        let (key_path, cert_path) = (dir.join("key.pem"), dir.join("cert.pem"));
        if !key_path.exists() {
            create(dir).with_context(|| {
                format!("cannot create the server's TLS key in {}", dir.display())
            })?;
            log::info!(
                "made a new TLS key and self-signed certificate in {}",
                dir.display()
            );
        }
        let mode = fs::metadata(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
                key_path.display(),
                mode & 0o777,
                key_path.display()
            );
        }
        let bad = |what: &Path, e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "cannot load {}: {e} (to make a new key and certificate, delete {} and {}; \
                 clients that pinned the old one must then be told the new fingerprint)",
                what.display(),
                key_path.display(),
                cert_path.display()
            )
        };
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, &e))?;
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| bad(&cert_path, &e))?;
        let fingerprint = Fingerprint::of(&cert);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| bad(&key_path, &e))?;
        // FTP opens a TLS data connection per file: let them resume the control session's.
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
        Ok(Identity {
            fingerprint,
            config: Arc::new(config),
        })
    }

    fn create(dir: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let made = rcgen::generate_simple_self_signed(vec![super::SERVER_NAME.to_string()])?;
        // Written under temporary names and renamed: a crash never leaves half a key.
        let write = |name: &str, text: &str, mode: u32| -> std::io::Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, dir.join(name))
        };
        write("cert.pem", &made.cert.pem(), 0o644)?;
        write("key.pem", &made.signing_key.serialize_pem(), 0o600)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_forms_people_paste() {
        let fp = Fingerprint([0xab; 32]);
        let shown = fp.to_string();
        assert!(shown.starts_with("sha256:abab"), "{shown}");
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(shown[7..].parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(shown.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), fp);
        for bad in [
            "",
            "sha256:",
            "abab",
            &shown[..70],
            &format!("{}zz", &shown[..69]),
        ] {
            let err = bad.parse::<Fingerprint>().unwrap_err();
            assert!(err.contains("not a certificate fingerprint"), "{err}");
        }
    }

    #[cfg(feature = "server")]
    #[test]
    fn identity_is_made_once_and_kept() {
        let dir = std::env::temp_dir().join(format!("ferry-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        let again = load_or_create(&dir).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "the key is kept");
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("key.pem");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
