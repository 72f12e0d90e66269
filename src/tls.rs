//! TLS for both sides: the listeners' certificate (STARTTLS and implicit TLS) and the
//! client configuration used towards the next hop. One provider (aws-lc-rs) for all.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TCP stream that may have been upgraded to TLS. `Detached` only exists for the
/// instant of a STARTTLS upgrade, while the stream is handed to the handshake.
///
/// `Memory` is one end of an in-process pipe: the transcript tests run a real session
/// over it without sockets (`crate::testing`). A concrete type, not a boxed trait
/// object, so the hot path pays one more arm in a match and nothing else. It never
/// offers TLS: STARTTLS needs a TCP stream.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    Memory(tokio::io::DuplexStream),
    Detached,
}

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream detached for TLS upgrade",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            MaybeTls::Memory(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            MaybeTls::Memory(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
    /// Forwarded so a header block, the message and the final dot go out in one
    /// `writev` (plain TCP) or one TLS record batch, not one system call per piece (the
    /// default would write only the first slice).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            MaybeTls::Memory(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
            MaybeTls::Memory(s) => s.is_write_vectored(),
            MaybeTls::Detached => false,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            MaybeTls::Memory(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            MaybeTls::Memory(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Detached => Poll::Ready(Err(detached())),
        }
    }
}

/// The client side of a proxy session.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// The connection to the next hop.
pub type RelayStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the acceptor for a listener from PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not match or are unusable: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The TLS client towards one next hop, and whether it verifies the certificate: a
/// session over an unverified connector is encrypted but not authenticated.
#[derive(Clone)]
pub struct RelayTlsClient {
    pub connector: tokio_rustls::TlsConnector,
    pub verifies: bool,
}

/// The connector towards the next hop. With `verify = false` the session is encrypted but
/// the certificate is not checked (a self-signed certificate on a loopback or private
/// link; opportunistic STARTTLS, RFC 3207 §4.1, is not authentication anyway). With
/// `verify = true` the certificate must chain to `ca_file` when one is given (a private
/// CA; the system roots are then not trusted, so a certificate from any public CA for
/// the same name is refused), else to the system roots, and name the configured host.
pub fn connector(verify: bool, ca_file: Option<&Path>) -> Result<RelayTlsClient, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        let certs = match ca_file {
            Some(path) => load_ca_file(path)?,
            None => system_roots()?,
        };
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err("no usable CA certificate to verify the next hop with".into());
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(NoVerify::new())
            .with_no_client_auth()
    };
    Ok(RelayTlsClient {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        verifies: verify,
    })
}

/// The CA certificates in a PEM file (`tls_ca_file`); an error names the file and says
/// why when it cannot be read or holds no certificate.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// The operating system's trusted roots (rustls-native-certs: the distribution's bundle
/// wherever it lives, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured).
fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "no system CA certificates found ({}): set tls_ca_file or install the CA bundle",
            why.join("; ")
        ));
    }
    Ok(found.certs)
}

/// The name presented in SNI and checked (when verifying) against the certificate.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))
}

/// Accepts any certificate but still checks the handshake signatures, so the channel is
/// at least bound to the key the peer holds. The next hop's `tls_verify = false`, and the
/// relay benchmark's client (as MTAs doing opportunistic STARTTLS).
#[derive(Debug)]
pub struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    /// With the crypto provider the proxy uses (aws-lc-rs).
    pub fn new() -> Arc<NoVerify> {
        Arc::new(NoVerify(provider()))
    }
}

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Writes a self-signed certificate and key for `name` into `dir` (for trials; use a real
/// certificate in production).
pub fn make_self_signed(
    dir: &Path,
    name: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let mut names = vec![name.to_string()];
    if name != "localhost" {
        names.push("localhost".into());
    }
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cert_path = dir.join("server.crt");
    let key_path = dir.join("server.key");
    std::fs::write(&cert_path, certified.cert.pem())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    Ok((cert_path, key_path))
}

/// Creates a file readable by its owner only (0600).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes)
        .map_err(|e| format!("{}: {e}", path.display()))
}
