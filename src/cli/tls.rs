//! TLS for the client commands: an `https://` address speaks TLS, trusting the web PKI roots built into the
//! binary or the CA of `--tls-ca`, and presents a client certificate for mTLS when given one.

use std::path::PathBuf;

use clap::Args;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::tls::{parse_certificates, parse_private_key, read_pem};

#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate(s) to trust for an https:// server, instead of the public web PKI roots.
    #[arg(long, env = "ALLOWANCE_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present (mTLS); needs --tls-key.
    #[arg(long, env = "ALLOWANCE_TLS_CLIENT_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ALLOWANCE_TLS_CLIENT_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the host of the address).
    #[arg(long, env = "ALLOWANCE_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsArgs {
    fn any(&self) -> bool {
        self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_server_name.is_some()
    }

    /// The TLS configuration; every file is read and checked here, so a bad one is named before any dialing.
    fn config(&self) -> Result<ClientTlsConfig, String> {
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(path) => {
                let pem = read_pem("--tls-ca", path).map_err(|e| e.to_string())?;
                parse_certificates("--tls-ca", path, &pem).map_err(|e| e.to_string())?;
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_webpki_roots(),
        };
        if let (Some(cert_path), Some(key_path)) = (&self.tls_cert, &self.tls_key) {
            let cert = read_pem("--tls-cert", cert_path).map_err(|e| e.to_string())?;
            parse_certificates("--tls-cert", cert_path, &cert).map_err(|e| e.to_string())?;
            let key = read_pem("--tls-key", key_path).map_err(|e| e.to_string())?;
            parse_private_key("--tls-key", key_path, &key).map_err(|e| e.to_string())?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// The endpoint for `addr` (`http://`, `https://`, or `host:port` for plaintext), with TLS for `https://`.
/// TLS options with a plaintext address are refused rather than ignored: the caller meant TLS.
pub fn endpoint(addr: &str, tls: &ClientTlsArgs) -> Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(super::client::endpoint_uri(addr))
        .map_err(|e| format!("--addr {addr}: {e}"))?;
    if endpoint.uri().scheme_str() != Some("https") {
        if tls.any() {
            return Err(format!(
                "--tls-ca, --tls-cert, --tls-key and --tls-server-name need an https:// address, not {addr}"
            ));
        }
        return Ok(endpoint);
    }
    endpoint.tls_config(tls.config()?).map_err(|e| format!("TLS: {e}"))
}
