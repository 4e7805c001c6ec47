//! TLS and mTLS on the gRPC port, with certificates made here: calls over TLS, refusals, and certificates
//! rotated on disk while the server runs (as Kubernetes does with a mounted Secret).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allowance::app::Allowance;
use allowance::clock::ManualClock;
use allowance::grpc::pb::Window;
use allowance::grpc::pb::spending_limits_client::SpendingLimitsClient;
use allowance::grpc::{Authentication, Server};
use allowance::storage::memory::MemoryStore;
use allowance::tls::{ServerTls, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::call::{set_limit, usage};
use crate::helpers::{defaults, epoch, lifecycle};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> Pair {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }

    /// A server certificate for "localhost".
    fn server(&self) -> Pair {
        self.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, name: &str) -> Pair {
        self.issue(name, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A directory laid out as the kubelet lays out a mounted Secret: `tls.crt` -> `..data/tls.crt`, `..data` ->
/// `..v<n>`, and a new version published by swapping the `..data` symlink in one rename.
struct SecretDir {
    dir: tempfile::TempDir,
    version: std::cell::Cell<u32>,
}

impl SecretDir {
    fn new(files: &[(&str, &str)]) -> Self {
        let s = Self { dir: tempfile::tempdir().unwrap(), version: 0.into() };
        s.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), s.dir.path().join(name)).unwrap();
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn publish(&self, files: &[(&str, &str)]) {
        let n = self.version.get() + 1;
        self.version.set(n);
        let version = format!("..v{n}");
        std::fs::create_dir(self.dir.path().join(&version)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.path().join(&version).join(name), content).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

/// A TLS server on 127.0.0.1:0 over the in-memory store; stops when dropped.
struct TlsServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TlsServer {
    async fn start(files: TlsFiles, reload_interval: Duration) -> Self {
        let tls = ServerTls::load(files, reload_interval).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Allowance::new(Arc::new(MemoryStore::new()), Arc::new(ManualClock::new(epoch())));
        let server = Server {
            app,
            defaults: defaults(),
            lifecycle: lifecycle(),
            auth: Authentication::Off,
            tls: Some(tls),
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.run(listener, shutdown.clone()));
        Self { addr, shutdown, handle }
    }

    /// Stops the server gracefully and returns how its run ended.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.handle).await?
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How a client connects: which CA it trusts, and which certificate it presents.
struct Client<'a> {
    trusts: &'a Ca,
    presents: Option<&'a Pair>,
}

impl Client<'_> {
    /// A new connection over TLS.
    async fn connect(&self, addr: SocketAddr) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.trusts.pem()))
            .domain_name("localhost");
        if let Some(pair) = self.presents {
            tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
        }
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        endpoint.connect().await.map_err(|e| format!("connect: {e:?}"))
    }

    /// A health check on a new connection: Ok when the whole exchange succeeds. Under TLS 1.3 the client
    /// finishes its handshake before the server has checked the client's certificate, so a refusal may
    /// show only at the first call.
    async fn check(&self, addr: SocketAddr) -> Result<(), String> {
        check_on(self.connect(addr).await?).await
    }
}

async fn check_on(channel: Channel) -> Result<(), String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: "liveness".into() })
        .await
        .map(drop)
        .map_err(|e| format!("call: {e:?}"))
}

/// Retries `check` until it passes, for at most 10 s.
async fn eventually(client: &Client<'_>, addr: SocketAddr) {
    let mut last = Err(String::new());
    for _ in 0..200 {
        last = client.check(addr).await;
        if last.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still refused after 10s: {last:?}");
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn tls_serves_grpc_and_refuses_plaintext_and_untrusted_clients() {
    let ca = Ca::new("server CA");
    let server_pair = ca.server();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &server_pair.cert),
        key: write(dir.path(), "tls.key", &server_pair.key),
        client_ca: None,
    };
    let server = TlsServer::start(files, LONG).await;

    let trusting = Client { trusts: &ca, presents: None };
    eventually(&trusting, server.addr).await;
    let mut c = SpendingLimitsClient::new(trusting.connect(server.addr).await.unwrap());
    set_limit(&mut c, "k", Window::Daily, 1000).await;
    assert_eq!(usage(&mut c, "k", Window::Daily).await, (0, 0, Some(1000)));

    let plaintext = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let r = check_on(channel).await;
        assert!(r.is_err(), "a plaintext call to the TLS port succeeded");
    }

    let other = Ca::new("another CA");
    let r = Client { trusts: &other, presents: None }.check(server.addr).await;
    assert!(r.is_err(), "a client that does not trust the server's CA got through");

    // Shutdown closes the TLS listener as it closes a plaintext one.
    let addr = server.addr;
    server.stop().await.unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is still open after shutdown");
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_signed_by_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let stranger_ca = Ca::new("a stranger's CA");
    let server_pair = server_ca.server();
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &server_pair.cert),
        key: write(dir.path(), "tls.key", &server_pair.key),
        client_ca: Some(write(dir.path(), "client-ca.crt", &client_ca.pem())),
    };
    let server = TlsServer::start(files, LONG).await;
    let good = client_ca.client("payments");
    let stranger = stranger_ca.client("payments");

    eventually(&Client { trusts: &server_ca, presents: Some(&good) }, server.addr).await;
    let r = Client { trusts: &server_ca, presents: None }.check(server.addr).await;
    assert!(r.is_err(), "a client without a certificate got through");
    let r = Client { trusts: &server_ca, presents: Some(&stranger) }.check(server.addr).await;
    assert!(r.is_err(), "a client certificate from another CA got through");
    // A server certificate of the client CA is no client certificate.
    let wrong_usage = client_ca.issue("payments", ExtendedKeyUsagePurpose::ServerAuth);
    let r = Client { trusts: &server_ca, presents: Some(&wrong_usage) }.check(server.addr).await;
    assert!(r.is_err(), "a certificate not issued for client authentication got through");
}

#[tokio::test]
async fn tls_reload_serves_a_rotated_certificate_and_keeps_serving_through_a_bad_one() {
    let old_ca = Ca::new("old CA");
    let old = old_ca.server();
    let secret = SecretDir::new(&[("tls.crt", &old.cert), ("tls.key", &old.key)]);
    let files = TlsFiles { cert: secret.path("tls.crt"), key: secret.path("tls.key"), client_ca: None };
    let interval = Duration::from_millis(100);
    let server = TlsServer::start(files, interval).await;
    let trusts_old = Client { trusts: &old_ca, presents: None };
    eventually(&trusts_old, server.addr).await;
    let established = trusts_old.connect(server.addr).await.unwrap();

    // A rotation gone wrong: the previous certificate keeps being served.
    secret.publish(&[("tls.crt", "-----BEGIN CERTIFICATE-----\ngarbage\n"), ("tls.key", &old.key)]);
    tokio::time::sleep(interval * 10).await;
    trusts_old.check(server.addr).await.expect("the old certificate should still be served");

    let new_ca = Ca::new("new CA");
    let new = new_ca.server();
    secret.publish(&[("tls.crt", &new.cert), ("tls.key", &new.key)]);
    eventually(&Client { trusts: &new_ca, presents: None }, server.addr).await;
    let r = trusts_old.check(server.addr).await;
    assert!(r.is_err(), "a new connection still got the old certificate");
    check_on(established).await.expect("a connection made before the rotation keeps working");
}

#[tokio::test]
async fn mtls_reload_follows_a_rotated_client_ca() {
    let server_ca = Ca::new("server CA");
    let server_pair = server_ca.server();
    let old_clients = Ca::new("old client CA");
    let new_clients = Ca::new("new client CA");
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles {
        cert: write(dir.path(), "tls.crt", &server_pair.cert),
        key: write(dir.path(), "tls.key", &server_pair.key),
        client_ca: Some(write(dir.path(), "client-ca.crt", &old_clients.pem())),
    };
    let server = TlsServer::start(files, Duration::from_millis(100)).await;
    let old_pair = old_clients.client("payments");
    let new_pair = new_clients.client("payments");
    eventually(&Client { trusts: &server_ca, presents: Some(&old_pair) }, server.addr).await;

    // Replaced in place, by rename, as configuration tools do.
    write(dir.path(), "client-ca.tmp", &new_clients.pem());
    std::fs::rename(dir.path().join("client-ca.tmp"), dir.path().join("client-ca.crt")).unwrap();
    eventually(&Client { trusts: &server_ca, presents: Some(&new_pair) }, server.addr).await;
    let r = Client { trusts: &server_ca, presents: Some(&old_pair) }.check(server.addr).await;
    assert!(r.is_err(), "a client certificate of the replaced CA still got through");
}
