//! TLS with mutual authentication (dask's `Security` and `tls://` addresses), with rustls.
//!
//! A cluster has one certificate authority. Every process (scheduler, workers, nannies,
//! clients) presents a certificate the CA signed, and accepts only peers that do, on every
//! connection: the gRPC streams and the data connections between workers and clients. As in
//! dask, host names are not checked (a cluster's certificates seldom name every host): the CA's
//! signature is the credential.
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Credentials for a cluster's connections: its CA, and this process's certificate and key.
#[derive(Clone)]
pub struct Security {
    inner: Arc<Inner>,
}

struct Inner {
    pem: Pem,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    /// Where the credentials are on disk, if they came from (or were written to) files.
    files: Option<Files>,
}

/// The PEM text of a set of credentials.
#[derive(Clone)]
struct Pem {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The paths of `--tls-ca-file`, `--tls-cert` and `--tls-key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security").field("files", &self.inner.files).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {what} {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{what} holds no {kind} in PEM form (-----BEGIN {kind}-----)")]
    NoPem { what: String, kind: &'static str },
    #[error("the TLS credentials are not usable: {0}")]
    Invalid(String),
    #[error("failed to make temporary credentials: {0}")]
    Generate(String),
}

/// The bytes of a PEM file; `what` names it in the error.
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

/// The certificate chain in `cert` and the private key in `key` (PEM); `cert_what` and
/// `key_what` name them in the error when one holds none.
fn chain_and_key(
    cert: &[u8],
    key: &[u8],
    cert_what: impl FnOnce() -> String,
    key_what: impl FnOnce() -> String,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(TlsError::NoPem { what: cert_what(), kind: "CERTIFICATE" });
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoPem { what: key_what(), kind: "PRIVATE KEY" })?;
    Ok((chain, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Security {
    /// From `--tls-ca-file`, `--tls-cert` and `--tls-key` (dask's flags). `key` may be left
    /// out when the certificate file holds the key too, as dask allows.
    pub fn from_files(ca: &Path, cert: &Path, key: Option<&Path>) -> Result<Security, TlsError> {
        let key_path = key.unwrap_or(cert);
        let pem = Pem {
            ca: read_pem("--tls-ca-file", ca)?,
            cert: read_pem("--tls-cert", cert)?,
            key: read_pem("--tls-key", key_path)?,
        };
        let files = Files { ca: ca.to_path_buf(), cert: cert.to_path_buf(), key: key_path.to_path_buf() };
        Security::build(pem, Some(files))
    }

    /// Throw-away credentials for one cluster (dask's `Security.temporary()`): a new CA, and one
    /// certificate it signed that every process of the cluster presents.
    pub fn temporary() -> Result<Security, TlsError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let g = |e: rcgen::Error| TlsError::Generate(e.to_string());
        let ca_key = KeyPair::generate().map_err(g)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(g)?;
        ca.distinguished_name.push(DnType::CommonName, "dask-rs temporary CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).map_err(g)?;
        let key = KeyPair::generate().map_err(g)?;
        let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "dask".to_string()]).map_err(g)?;
        leaf.distinguished_name.push(DnType::CommonName, "dask-rs");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &Issuer::new(ca, &ca_key)).map_err(g)?;
        let pem = Pem {
            ca: ca_cert.pem().into_bytes(),
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        };
        Security::build(pem, None)
    }

    fn build(pem: Pem, files: Option<Files>) -> Result<Security, TlsError> {
        let what = |f: &Option<Files>, which: fn(&Files) -> &PathBuf, flag: &str| {
            f.as_ref().map_or_else(|| flag.to_string(), |f| format!("{flag} {}", which(f).display()))
        };
        let roots = {
            let mut roots = rustls::RootCertStore::empty();
            let cas: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&pem.ca).filter_map(Result::ok).collect();
            if cas.is_empty() {
                return Err(TlsError::NoPem { what: what(&files, |f| &f.ca, "--tls-ca-file"), kind: "CERTIFICATE" });
            }
            for ca in cas {
                roots.add(ca).map_err(|e| TlsError::Invalid(format!("the CA certificate: {e}")))?;
            }
            Arc::new(roots)
        };
        let (chain, key) = chain_and_key(
            &pem.cert,
            &pem.key,
            || what(&files, |f| &f.cert, "--tls-cert"),
            || what(&files, |f| &f.key, "--tls-key"),
        )?;

        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("the certificate and key do not go together: {e}")))?;
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let signed_by_ca =
            SignedByCa { roots, algorithms: provider().signature_verification_algorithms, signatures: server_verifier };
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(signed_by_ca))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("the certificate and key do not go together: {e}")))?;
        Ok(Security { inner: Arc::new(Inner { pem, client: Arc::new(client), server: Arc::new(server), files }) })
    }

    /// The files these credentials are in, writing them to `dir` first if they came from
    /// memory (worker processes of a cluster with temporary credentials read them there; the
    /// key is readable by its owner only).
    pub fn files(&self, dir: &Path) -> io::Result<Files> {
        if let Some(f) = &self.inner.files {
            return Ok(f.clone());
        }
        create_private_dir(dir)?;
        let f = Files { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&f.ca, &self.inner.pem.ca)?;
        std::fs::write(&f.cert, &self.inner.pem.cert)?;
        write_private(&f.key, &self.inner.pem.key)?;
        Ok(f)
    }

    /// Accepts a TLS connection for service `what`: the handshake happens as the connection is
    /// first read or written, so a slow peer holds up no other.
    pub fn accept(&self, tcp: TcpStream, what: &'static str) -> Stream {
        Stream::accepting(&self.inner.server, tcp, what)
    }

    /// Opens a TLS connection over `tcp` to `host` and completes the handshake.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string())
            .unwrap_or_else(|_| ServerName::try_from("dask".to_string()).expect("a valid name"));
        let mut s = tokio_rustls::TlsConnector::from(self.inner.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), explain(&e.to_string(), host, Side::Client)))?;
        let first = accepted(&mut s)
            .await
            .map_err(|e| io::Error::new(e.kind(), explain(&e.to_string(), host, Side::Client)))?;
        Ok(Stream::Client(Box::new(ClientTls { tls: s, first })))
    }
}

/// Waits until the server has taken this client's certificate. In TLS 1.3 the client's side
/// of the handshake ends before the server checks it: a refusal would only come as an alert on
/// the first read, deep inside whatever reads first. The server's session tickets or its first
/// byte (an HTTP/2 server speaks first), sent only once it has, say it did (one round trip); an
/// alert says it did not. Returns the byte read, if one was. Gives up waiting after a while (a
/// server that neither sends tickets nor speaks first) and goes on.
async fn accepted(s: &mut tokio_rustls::client::TlsStream<TcpStream>) -> io::Result<Option<u8>> {
    if s.get_ref().1.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Ok(None);
    }
    let wait = std::future::poll_fn(|cx| {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        match Pin::new(&mut *s).poll_read(cx, &mut buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection")))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(byte[0]))),
            Poll::Pending if s.get_ref().1.tls13_tickets_received() > 0 => Poll::Ready(Ok(None)),
            Poll::Pending => Poll::Pending,
        }
    });
    match tokio::time::timeout(std::time::Duration::from_secs(5), wait).await {
        Ok(r) => r,
        Err(_) => Ok(None),
    }
}

/// A client's TLS connection, and the server's first byte if [`accepted`] read it.
pub struct ClientTls {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    first: Option<u8>,
}

/// Writes a private key readable by its owner only, whatever the file's mode was before.
#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::write(path, bytes)
}

/// Creates `dir` (and its parents), readable by its owner only when this creates it.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Which end of a connection an error is told to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The end that connected: `peer` is the server it reached.
    Client,
    /// The end that accepted: `peer` is whoever connected.
    Server,
}

/// A TLS error's text, said so that the person reading it knows which side is wrong and what
/// to do. Text that is no TLS refusal comes back as it was.
pub fn explain(text: &str, peer: &str, side: Side) -> String {
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if has(&EXPLAINED) {
        return text.to_string();
    }
    let why = match side {
        Side::Client if has(&["UnknownIssuer", "BadSignature"]) => {
            format!("{peer}'s certificate is not signed by this cluster's CA (--tls-ca-file)")
        }
        Side::Client
            if has(&["UnknownCA", "BadCertificate", "CertificateRequired", "CertificateExpired", "DecryptError"]) =>
        {
            format!(
                "{peer} does not accept this process's certificate: it is not signed by the CA that {peer} trusts \
                 (pass the cluster's --tls-cert and --tls-key)"
            )
        }
        Side::Client if has(&["corrupt message", "InvalidContentType"]) => {
            format!("{peer} does not speak TLS: use its tcp:// address")
        }
        Side::Server if has(&["UnknownIssuer", "BadSignature"]) => {
            format!("{peer}'s certificate is not signed by this cluster's CA")
        }
        Side::Server if has(&["peer sent no certificates", "CertificateRequired", "NoCertificatesPresented"]) => {
            format!("{peer} sent no certificate (it has no credentials for this cluster)")
        }
        Side::Server if has(&["corrupt message", "InvalidContentType"]) => {
            format!(
                "{peer} does not speak TLS (plain HTTP to an HTTPS port, a client or worker given a tcp:// \
                 address, or a port probe)"
            )
        }
        _ => return text.to_string(),
    };
    format!("{why}: {text}")
}

/// Words of an error [`explain`] has already told.
const EXPLAINED: [&str; 4] = [
    "is not signed by this cluster's CA",
    "does not accept this process's certificate",
    "does not speak TLS",
    "sent no certificate",
];

/// Whether an error is a TLS refusal (a certificate the other side will not take, or one end
/// not speaking TLS): trying again cannot help.
pub fn is_refusal(text: &str) -> bool {
    EXPLAINED.iter().any(|w| text.contains(w)) || explain(text, "", Side::Client) != text
}

/// Checks that a server's certificate chains to the cluster's CA (and may serve as a
/// server's), not the host name it names: dask does not check it either.
#[derive(Debug)]
struct SignedByCa {
    roots: Arc<rustls::RootCertStore>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    /// For the handshake's signatures.
    signatures: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for SignedByCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// A TLS handshake not done by then is given up (the peer is logged as refused).
#[cfg(not(test))]
const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
#[cfg(test)]
const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_millis(300);

/// A connection, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    /// A server side still in its handshake.
    Accepting(Box<Accepting>),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<ClientTls>),
    /// A server side whose handshake failed: every use is an error.
    Refused,
}

/// A handshake under way, and who it is with, for the log if it fails.
pub struct Accepting {
    accept: tokio_rustls::Accept<TcpStream>,
    peer: String,
    what: &'static str,
    /// [`HANDSHAKE_DEADLINE`] from the connection's start.
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Stream {
    /// A server side whose handshake happens on first use, within [`HANDSHAKE_DEADLINE`].
    fn accepting(server: &Arc<rustls::ServerConfig>, tcp: TcpStream, what: &'static str) -> Stream {
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a peer".into());
        let accept = tokio_rustls::TlsAcceptor::from(server.clone()).accept(tcp);
        let deadline = Box::pin(tokio::time::sleep(HANDSHAKE_DEADLINE));
        Stream::Accepting(Box::new(Accepting { accept, peer, what, deadline }))
    }
}

impl Stream {
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Accepting(_) | Stream::Refused => None,
            Stream::Server(s) => Some(s.get_ref().0),
            Stream::Client(s) => Some(s.tls.get_ref().0),
        }
    }

    /// Finishes a server-side handshake, if one is under way. A refused peer is logged here,
    /// once, with the reason.
    fn poll_accepted(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Accepting(a) => match Pin::new(&mut a.accept).poll(cx) {
                Poll::Pending => {
                    if a.deadline.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let why = format!("{} did not finish the TLS handshake within {HANDSHAKE_DEADLINE:?}", a.peer);
                    log_refusal(a.what, &why);
                    *self = Stream::Refused;
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                }
                Poll::Ready(Ok(s)) => {
                    *self = Stream::Server(Box::new(s));
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => {
                    let why = explain(&e.to_string(), &a.peer, Side::Server);
                    log_refusal(a.what, &why);
                    *self = Stream::Refused;
                    Poll::Ready(Err(io::Error::new(e.kind(), why)))
                }
            },
            Stream::Refused => Poll::Ready(Err(refused())),
            _ => Poll::Ready(Ok(())),
        }
    }
}

use std::future::Future as _;

fn refused() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the TLS handshake failed")
}

/// Logs a refused connection: at most one line every 5 s (a port scan is not a flood of
/// warnings), with how many were refused since the last.
fn log_refusal(what: &'static str, why: &str) {
    // Per service: browsers at an HTTPS port hide no refused worker. (line logged at, refused since)
    static LAST: std::sync::Mutex<Vec<(&str, std::time::Instant, u64)>> = std::sync::Mutex::new(Vec::new());
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    let since = match last.iter_mut().find(|(w, ..)| *w == what) {
        Some((_, at, held)) if now.duration_since(*at) < std::time::Duration::from_secs(5) => {
            *held += 1;
            return;
        }
        Some((_, at, held)) => {
            *at = now;
            std::mem::take(held)
        }
        None => {
            last.push((what, now, 0));
            0
        }
    };
    tracing::warn!(service = what, refused_since_last_line = since, "{what}: refused a connection: {why}");
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_accepted(cx))?;
        match this {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Server(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Client(s) => match s.first.take() {
                Some(b) if buf.remaining() > 0 => {
                    buf.put_slice(&[b]);
                    Poll::Ready(Ok(()))
                }
                first => {
                    s.first = first;
                    Pin::new(&mut s.tls).poll_read(cx, buf)
                }
            },
            Stream::Accepting(_) | Stream::Refused => unreachable!("accepted above"),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_accepted(cx))?;
        match this {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Server(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Client(s) => Pin::new(&mut s.tls).poll_write(cx, buf),
            Stream::Accepting(_) | Stream::Refused => unreachable!("accepted above"),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_accepted(cx))?;
        match this {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Server(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Stream::Client(s) => Pin::new(&mut s.tls).poll_write_vectored(cx, bufs),
            Stream::Accepting(_) | Stream::Refused => unreachable!("accepted above"),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Server(s) => s.is_write_vectored(),
            Stream::Client(s) => s.tls.is_write_vectored(),
            Stream::Accepting(_) | Stream::Refused => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_accepted(cx))?;
        match this {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Server(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Client(s) => Pin::new(&mut s.tls).poll_flush(cx),
            Stream::Accepting(_) | Stream::Refused => unreachable!("accepted above"),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Server(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Client(s) => Pin::new(&mut s.tls).poll_shutdown(cx),
            Stream::Accepting(_) | Stream::Refused => Poll::Ready(Ok(())),
        }
    }
}

/// An HTTPS identity for the scheduler's HTTP side (dask's
/// `distributed.scheduler.dashboard.tls.cert` and `.key`): the server shows a certificate and
/// the traffic is encrypted; as in dask, browsers and Prometheus are not asked for one.
#[derive(Clone)]
pub struct Https {
    server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https").finish_non_exhaustive()
    }
}

impl Https {
    /// From a certificate file (PEM, the chain) and its key; `key` may be left out when the
    /// certificate file holds it too.
    pub fn from_files(cert: &Path, key: Option<&Path>) -> Result<Https, TlsError> {
        let key_path = key.unwrap_or(cert);
        let (chain, key) = chain_and_key(
            &read_pem("the dashboard's certificate", cert)?,
            &read_pem("the dashboard's key", key_path)?,
            || format!("the dashboard's certificate {}", cert.display()),
            || format!("the dashboard's key {}", key_path.display()),
        )?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("the dashboard's certificate and key do not go together: {e}")))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Https { server: Arc::new(server) })
    }

    /// From dask's `distributed.scheduler.dashboard.tls.cert` and `.key`; `None` when no
    /// certificate is set. (`.ca-file` is read by dask but, since clients are not asked for
    /// certificates, changes nothing; the same here.)
    pub fn from_config(settings: &crate::config::Config) -> Result<Option<Https>, String> {
        let get = |k: &str| settings.string(k).filter(|s| !s.is_empty()).map(PathBuf::from);
        let cert = get("distributed.scheduler.dashboard.tls.cert");
        let key = get("distributed.scheduler.dashboard.tls.key");
        match (cert, key) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err("distributed.scheduler.dashboard.tls.key is set but not .cert: HTTPS needs the \
                                    certificate too"
                .into()),
            (Some(cert), key) => Https::from_files(&cert, key.as_deref())
                .map(Some)
                .map_err(|e| format!("distributed.scheduler.dashboard.tls: {e}")),
        }
    }

    /// Accepts an HTTPS connection (the handshake happens on first use, as [`Security::accept`]).
    pub fn accept(&self, tcp: TcpStream, what: &'static str) -> Stream {
        Stream::accepting(&self.server, tcp, what)
    }
}

/// Which of dask's `distributed.comm.tls` sections a process reads its certificate from.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    Scheduler,
    Worker,
    Client,
}

impl Security {
    /// Credentials from flags (`--tls-ca-file`, `--tls-cert`, `--tls-key`), else from dask's
    /// configuration (`distributed.comm.tls.ca-file`, `distributed.comm.tls.ROLE.cert` and
    /// `.key`); `None` when neither names any. Naming some but not the CA and a certificate is
    /// an error that says what is missing.
    pub fn from_flags_or_config(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        settings: &crate::config::Config,
        role: Role,
    ) -> Result<Option<Security>, String> {
        let section = match role {
            Role::Scheduler => "scheduler",
            Role::Worker => "worker",
            Role::Client => "client",
        };
        let from_config = |k: &str| settings.string(k).filter(|s| !s.is_empty()).map(PathBuf::from);
        let ca = ca.map(Path::to_path_buf).or_else(|| from_config("distributed.comm.tls.ca-file"));
        let cert = cert.map(Path::to_path_buf).or_else(|| from_config(&format!("distributed.comm.tls.{section}.cert")));
        let key = key.map(Path::to_path_buf).or_else(|| from_config(&format!("distributed.comm.tls.{section}.key")));
        match (ca, cert) {
            (None, None) if key.is_none() => Ok(None),
            (Some(ca), Some(cert)) => {
                Security::from_files(&ca, &cert, key.as_deref()).map(Some).map_err(|e| e.to_string())
            }
            (None, _) => Err(format!(
                "TLS needs the cluster's CA: pass --tls-ca-file (or set distributed.comm.tls.ca-file) \
                 with --tls-cert and --tls-key (distributed.comm.tls.{section}.cert and .key)"
            )),
            (Some(_), None) => Err(format!(
                "TLS needs this {section}'s certificate: pass --tls-cert and --tls-key (or set \
                 distributed.comm.tls.{section}.cert and .key) with --tls-ca-file"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_never_finishes_its_handshake_is_let_go() {
        use tokio::io::AsyncReadExt;
        let ours = Security::temporary().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _silent = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = ours.accept(tcp, "test");
        let err = s.read(&mut [0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not finish the TLS handshake within 300ms"), "{err}");
        assert!(matches!(s, Stream::Refused));
    }

    #[tokio::test]
    async fn peers_with_the_clusters_certificates_talk_and_strangers_are_refused() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ours = Security::temporary().unwrap();
        let theirs = Security::temporary().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let server = ours.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut s = server.accept(tcp, "test");
                tokio::spawn(async move {
                    let mut buf = [0u8; 5];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                        let _ = s.flush().await;
                    }
                });
            }
        });
        // Ours: an echo over TLS.
        let tcp = TcpStream::connect(at).await.unwrap();
        let mut s = ours.connect(tcp, "127.0.0.1").await.unwrap();
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // A stranger's CA did not sign our server's certificate: the stranger says so.
        let tcp = TcpStream::connect(at).await.unwrap();
        let e = theirs.connect(tcp, "127.0.0.1").await.err().expect("refused");
        assert!(e.to_string().contains("not signed by this cluster's CA"), "{e}");

        // Without TLS, nothing comes back.
        let mut plain = TcpStream::connect(at).await.unwrap();
        plain.write_all(b"hello").await.unwrap();
        let mut back = Vec::new();
        let _ = plain.read_to_end(&mut back).await;
        assert!(!back.windows(5).any(|w| w == b"hello"), "a plain peer gets at most a TLS alert: {back:?}");
    }

    #[test]
    fn files_are_checked_and_missing_parts_named() {
        let dir = std::env::temp_dir().join(format!("dask-rs-tls-{}", std::process::id()));
        let f = Security::temporary().unwrap().files(&dir).unwrap();
        let settings = crate::config::Config::default();
        let s = Security::from_flags_or_config(Some(&f.ca), Some(&f.cert), Some(&f.key), &settings, Role::Worker);
        assert!(s.unwrap().is_some());
        let e = Security::from_flags_or_config(None, Some(&f.cert), Some(&f.key), &settings, Role::Worker).unwrap_err();
        assert!(e.contains("--tls-ca-file"), "{e}");
        let e = Security::from_flags_or_config(Some(&f.ca), None, None, &settings, Role::Worker).unwrap_err();
        assert!(e.contains("--tls-cert"), "{e}");
        // A key where the certificate should be.
        let e = Security::from_files(&f.ca, &f.key, Some(&f.key)).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("CERTIFICATE"), "{e}");
        assert!(Security::from_flags_or_config(None, None, None, &settings, Role::Client).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
