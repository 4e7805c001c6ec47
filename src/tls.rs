//! TLS on the gRPC port: rustls with the ring provider, client certificates when a client CA is set (mTLS),
//! and certificate, key and client CA re-read while serving.
//!
//! Kubernetes rotates a mounted Secret by writing the new files into a fresh directory and swapping a symlink,
//! so a file's path stays the same while what it resolves to changes. The files are therefore polled by
//! content (read through the symlinks) every reload interval, not watched. A new configuration applies to
//! connections accepted from then on; established connections keep the one they were made with. A reload
//! that fails (a half-written file, bad PEM, a key that does not match the certificate) keeps the previous
//! configuration, logs a warning once per distinct bad content and counts `allowance_tls_reloads_total`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use metrics::{counter, describe_counter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use crate::config::parse_duration;

/// The most time a client gets to complete the TLS handshake, so that connections that never speak do not
/// pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not the client's (e.g. out of file descriptors), so the loop does
/// not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const RELOADS: &str = "allowance_tls_reloads_total";

/// The server's TLS settings (part of `allowance serve`'s configuration).
#[derive(Debug, Clone, Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain to serve gRPC over TLS with (leaf first); needs --tls-key.
    #[arg(long, env = "ALLOWANCE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "ALLOWANCE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by one of them (mTLS).
    #[arg(long, env = "ALLOWANCE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes, e.g. 10s.
    #[arg(long, env = "ALLOWANCE_TLS_RELOAD_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

impl ServerTlsArgs {
    /// Checks that the TLS settings go together.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(
                    "ALLOWANCE_TLS_CERT (--tls-cert) is set but ALLOWANCE_TLS_KEY (--tls-key) is not: \
                            TLS needs both"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "ALLOWANCE_TLS_KEY (--tls-key) is set but ALLOWANCE_TLS_CERT (--tls-cert) is not: \
                            TLS needs both"
                        .into(),
                );
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return Err("ALLOWANCE_TLS_CLIENT_CA (--tls-client-ca) needs ALLOWANCE_TLS_CERT and \
                            ALLOWANCE_TLS_KEY: client certificates are checked only over TLS"
                    .into());
            }
            _ => {}
        }
        if self.tls_reload_interval.is_zero() {
            return Err("ALLOWANCE_TLS_RELOAD_INTERVAL must be positive".into());
        }
        Ok(())
    }

    /// The files to serve TLS from, or `None` for plaintext.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

/// A TLS file that could not be used. Names the setting and the file; never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} {}: {reason}", path.display())]
pub struct TlsError {
    pub setting: &'static str,
    pub path: PathBuf,
    pub reason: String,
}

impl TlsError {
    fn new(setting: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        Self { setting, path: path.to_owned(), reason: reason.into() }
    }
}

/// Reads a PEM file.
pub fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::new(setting, path, format!("cannot read: {e}")))
}

/// Every certificate of a PEM file; at least one.
pub fn parse_certificates(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(setting, path, pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(TlsError::new(setting, path, "no PEM certificate (BEGIN CERTIFICATE) found"));
    }
    Ok(certs)
}

/// The first private key of a PEM file.
pub fn parse_private_key(
    setting: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::new(setting, path, "no PEM private key found"),
        e => TlsError::new(setting, path, pem_problem(&e)),
    })
}

/// What is wrong with a PEM file, in words that never quote it (it may be a key).
fn pem_problem(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::MissingSectionEnd { .. } => "not valid PEM: a section has no END line (truncated?)",
        pem::Error::IllegalSectionStart { .. } => "not valid PEM: a malformed BEGIN line",
        pem::Error::Base64Decode(_) => "not valid PEM: bad base64",
        pem::Error::SectionTooLarge => "not valid PEM: a section is too large",
        _ => "not valid PEM",
    }
}

/// Where the server's certificate, key and (for mTLS) client CA are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// The raw contents of the files, compared between polls to notice a change.
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        Ok(Contents {
            cert: read_pem("--tls-cert", &self.cert)?,
            key: read_pem("--tls-key", &self.key)?,
            client_ca: self.client_ca.as_deref().map(|p| read_pem("--tls-client-ca", p)).transpose()?,
        })
    }

    fn server_config(&self, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
        let certs = parse_certificates("--tls-cert", &self.cert, &contents.cert)?;
        let key = parse_private_key("--tls-key", &self.key, &contents.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::new("--tls-cert", &self.cert, e.to_string()))?;
        let builder = match (&self.client_ca, &contents.client_ca) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for cert in parse_certificates("--tls-client-ca", path, pem)? {
                    roots.add(cert).map_err(|e| {
                        TlsError::new("--tls-client-ca", path, format!("not a usable CA certificate: {e}"))
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::new("--tls-client-ca", path, e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::new(
                "--tls-key",
                &self.key,
                format!("does not match the certificate in {}", self.cert.display()),
            ),
            e => TlsError::new("--tls-key", &self.key, e.to_string()),
        })?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// TLS for the gRPC server: the current configuration, and the files it follows.
pub struct ServerTls {
    files: TlsFiles,
    reload_interval: Duration,
    loaded: Contents,
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("reload_interval", &self.reload_interval)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files: an error names the setting and the file.
    pub fn load(files: TlsFiles, reload_interval: Duration) -> Result<Self, TlsError> {
        let loaded = files.read()?;
        let config = files.server_config(&loaded)?;
        Ok(Self { files, reload_interval, loaded, config })
    }

    /// From `allowance serve`'s settings: `None` when TLS is off.
    pub fn from_args(args: &ServerTlsArgs) -> Result<Option<Self>, TlsError> {
        args.files().map(|files| Self::load(files, args.tls_reload_interval)).transpose()
    }

    /// Accepts TLS connections on `listener` (TCP_NODELAY set on each), with handshakes in their own tasks so a
    /// slow client does not hold up the others, and starts following the files. Everything stops, and the
    /// listener closes, when the returned stream is dropped (the server drops it when it stops accepting).
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
        for result in ["ok", "error"] {
            counter!(RELOADS, "result" => result).absolute(0);
        }
        tracing::info!(
            cert = %self.files.cert.display(),
            client_ca = self.files.client_ca.as_ref().map(|p| p.display().to_string()),
            reload_interval = ?self.reload_interval,
            "serving TLS{}",
            if self.files.client_ca.is_some() { " and requiring client certificates (mTLS)" } else { "" }
        );
        let (config_tx, config_rx) = watch::channel(self.config);
        let (conn_tx, conn_rx) = mpsc::channel(64);
        tokio::spawn(follow_files(self.files, self.reload_interval, self.loaded, config_tx));
        tokio::spawn(accept(listener, config_rx, conn_tx));
        ReceiverStream::new(conn_rx)
    }
}

async fn accept(
    listener: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
    connections: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    loop {
        let accepted = tokio::select! {
            () = connections.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // See grpc/server.rs: without it a response written in two pieces waits for the client's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
        let acceptor = TlsAcceptor::from(config.borrow().clone());
        let connections = connections.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = connections.send(Ok(tls)).await;
                }
                // A client's mistake (plaintext, an untrusted certificate, no client certificate): not the
                // server's trouble.
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

/// Polls the files and publishes a new configuration when their content changes and makes a good one.
/// Stops when nobody accepts with the configuration any more.
async fn follow_files(
    files: TlsFiles,
    interval: Duration,
    loaded: Contents,
    config: watch::Sender<Arc<ServerConfig>>,
) {
    // What was last tried, good or bad: the same bad content is reported once, not at every poll.
    let mut last: Result<Contents, TlsError> = Ok(loaded);
    loop {
        tokio::select! {
            () = config.closed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let read = {
            let files = files.clone();
            match tokio::task::spawn_blocking(move || files.read()).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the TLS files failed");
                    continue;
                }
            }
        };
        if read == last {
            continue;
        }
        match read.clone().and_then(|contents| files.server_config(&contents)) {
            Ok(new) => {
                config.send_replace(new);
                counter!(RELOADS, "result" => "ok").increment(1);
                tracing::info!(cert = %files.cert.display(), "TLS files changed: new connections use them");
            }
            Err(e) => {
                counter!(RELOADS, "result" => "error").increment(1);
                tracing::warn!(error = %e, "TLS files changed but cannot be used: keeping the previous ones");
            }
        }
        last = read;
    }
}

/// Describes the TLS metrics (see telemetry.rs).
pub fn describe_metrics() {
    describe_counter!(
        RELOADS,
        "TLS certificate, key and client CA reloads after their files changed, by result (ok, or error: the \
         previous ones are kept)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cert: bool, key: bool, ca: bool) -> ServerTlsArgs {
        ServerTlsArgs {
            tls_cert: cert.then(|| "c.pem".into()),
            tls_key: key.then(|| "k.pem".into()),
            tls_client_ca: ca.then(|| "ca.pem".into()),
            tls_reload_interval: Duration::from_secs(10),
        }
    }

    #[test]
    fn tls_settings_must_go_together() {
        assert!(args(false, false, false).validate().is_ok());
        assert!(args(true, true, false).validate().is_ok());
        assert!(args(true, true, true).validate().is_ok());
        assert!(args(true, false, false).validate().unwrap_err().contains("ALLOWANCE_TLS_KEY"));
        assert!(args(false, true, false).validate().unwrap_err().contains("ALLOWANCE_TLS_CERT"));
        assert!(args(false, false, true).validate().unwrap_err().contains("ALLOWANCE_TLS_CLIENT_CA"));
        let mut zero = args(true, true, false);
        zero.tls_reload_interval = Duration::ZERO;
        assert!(zero.validate().unwrap_err().contains("ALLOWANCE_TLS_RELOAD_INTERVAL"));
        assert_eq!(args(false, false, false).files(), None);
    }

    struct Dir(tempfile::TempDir);

    impl Dir {
        fn write(&self, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.path().join(name);
            std::fs::write(&path, content).unwrap();
            path
        }
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn tls_files_that_cannot_be_used_are_named() {
        let dir = Dir(tempfile::tempdir().unwrap());
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let cert = dir.write("cert.pem", cert);
        let key = dir.write("key.pem", &key);
        let garbage = dir.write("garbage.pem", "not a certificate\n");
        let truncated = dir.write("truncated.pem", "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n");
        let other_key = dir.write("other.pem", other_key);
        let missing = dir.0.path().join("missing.pem");
        let files = |cert: &PathBuf, key: &PathBuf, ca: Option<&PathBuf>| TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: ca.cloned(),
        };
        let load = |f: TlsFiles| ServerTls::load(f, Duration::from_secs(1)).map(|_| ()).unwrap_err();

        assert!(ServerTls::load(files(&cert, &key, None), Duration::from_secs(1)).is_ok());
        assert!(ServerTls::load(files(&cert, &key, Some(&cert)), Duration::from_secs(1)).is_ok());

        let e = load(files(&missing, &key, None));
        assert_eq!((e.setting, e.path.as_path()), ("--tls-cert", missing.as_path()));
        assert!(e.to_string().contains("missing.pem: cannot read"), "{e}");

        let e = load(files(&garbage, &key, None));
        assert_eq!((e.setting, e.path.as_path()), ("--tls-cert", garbage.as_path()));
        assert!(e.reason.contains("no PEM certificate"), "{e}");

        let e = load(files(&cert, &cert, None));
        assert_eq!((e.setting, e.reason.as_str()), ("--tls-key", "no PEM private key found"));

        let e = load(files(&cert, &truncated, None));
        assert_eq!(e.setting, "--tls-key");
        assert!(!e.to_string().contains("MIGHAgEA"), "key material in the error: {e}");

        let e = load(files(&cert, &other_key, None));
        assert_eq!((e.setting, e.path.as_path()), ("--tls-key", other_key.as_path()));
        assert!(e.reason.contains("does not match the certificate"), "{e}");

        let e = load(files(&cert, &key, Some(&garbage)));
        assert_eq!((e.setting, e.path.as_path()), ("--tls-client-ca", garbage.as_path()));
    }
}
