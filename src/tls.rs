//! TLS with rustls (ring provider): the `[tls]` config, the server's and the client's rustls
//! configs built from PEM files, and the names a client certificate offers as an identity.
//!
//! The engine's TLS listeners (`tls.listen` for the native protocol, `tls.mqtt_listen` for MQTT)
//! are driven by the reactor through the sans-IO wrapper in `engine/tls_link.rs`; the fan-out
//! core and the sessions never see ciphertext. The clients (`crate::client`, `lanpush pub/sub
//! --tls`) use rustls's blocking `StreamOwned`.
//!
//! **Identity from a certificate** (mTLS, `tls.client_ca_path`): once the handshake has
//! verified a client certificate against that CA, the names it carries are offered to the
//! authenticator in this order: the subject's Common Name(s), then each DNS name and e-mail
//! address of its subjectAltName. The first one that is the name of an `[[auth.users]]` entry
//! is the connection's identity: a HELLO (MQTT: CONNECT) without a token is admitted as that
//! user, with that user's roles and ACLs. A HELLO with a token is checked as usual, and must
//! name the same user. A certificate whose names match no user gives no identity: the token
//! (or anonymous access, where configured) decides, as on the plain listener.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

/// Errors building a TLS configuration; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} file {path} holds no certificate")]
    NoCertificate { what: &'static str, path: String },
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("{0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
}

/// `[tls]`: the optional TLS listeners (docs/SECURITY.md, "TLS").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the native protocol's TLS listener; empty turns it off.
    pub listen: String,
    /// Address of the MQTT-over-TLS listener; empty turns it off.
    pub mqtt_listen: String,
    /// PEM file with the server's certificate chain (leaf first).
    pub cert_path: String,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_path: String,
    /// PEM file with the CA certificates that sign client certificates; empty: no client
    /// certificates are asked for.
    pub client_ca_path: String,
    /// With `client_ca_path`: a client without a valid certificate is refused in the handshake.
    /// Otherwise a certificate is asked for but optional (one that is offered must verify).
    pub require_client_cert: bool,
}

impl TlsConfig {
    /// The native TLS listener's address, or `None` when it is off.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        addr(&self.listen)
    }

    /// The MQTT-over-TLS listener's address, or `None` when it is off.
    pub fn mqtt_listen_addr(&self) -> Option<SocketAddr> {
        addr(&self.mqtt_listen)
    }

    /// Whether any TLS listener is on.
    pub fn enabled(&self) -> bool {
        self.listen_addr().is_some() || self.mqtt_listen_addr().is_some()
    }

    /// Checks the keys that can be checked without reading files (the files are read at
    /// start, by [`server_config`], and a failure there stops the engine with the path).
    pub(crate) fn validate(&self) -> Result<(), String> {
        for (key, text) in [
            ("tls.listen", &self.listen),
            ("tls.mqtt_listen", &self.mqtt_listen),
        ] {
            crate::config::check_optional_addr(key, text, "0.0.0.0:7412")?;
        }
        if self.enabled() && (self.cert_path.trim().is_empty() || self.key_path.trim().is_empty()) {
            return Err("tls: a TLS listener needs tls.cert_path and tls.key_path".into());
        }
        if self.require_client_cert && self.client_ca_path.trim().is_empty() {
            return Err("tls.require_client_cert needs tls.client_ca_path (the CA that signs client certificates)".into());
        }
        Ok(())
    }
}

fn addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.parse().ok()).flatten()
}

/// rustls's ring provider: aws-lc-rs (rustls's default) needs cmake and nasm to build. The
/// price, and the reason rustls 0.23.48 marks this deprecated: no post-quantum key exchange
/// (X25519, P-256 and P-384 are offered).
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The server's rustls config for `[tls]`: its certificate and key, and client certificates
/// verified against `client_ca_path` when set (required or optional).
pub fn server_config(config: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(Path::new(config.cert_path.trim()), "server certificate")?;
    let key = load_key(Path::new(config.key_path.trim()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let ca = config.client_ca_path.trim();
    let builder = if ca.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(Path::new(ca))?),
            provider(),
        );
        let verifier = if config.require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(
            verifier
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?,
        )
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// A client's TLS settings: the CA that signs the engine's certificate, an optional client
/// certificate (mTLS), and the name to check the engine's certificate against.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// `None`: the host part of the server address.
    pub server_name: Option<String>,
}

/// The same settings: the same rustls config (by identity) and server name.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for ClientTls {}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_path`; presents `cert_key` (certificate chain file,
    /// key file) when given.
    pub fn from_files(
        ca_path: &Path,
        cert_key: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca_path)?);
        let config = match cert_key {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert, "client certificate")?, load_key(key)?)?,
        };
        if let Some(name) = &server_name {
            ServerName::try_from(name.as_str()).map_err(|_| TlsError::ServerName(name.clone()))?;
        }
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the engine's certificate must carry when connecting to `server`
    /// (`host:port`): the configured one, else the host.
    pub fn name_for(&self, server: &str) -> Result<ServerName<'static>, TlsError> {
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => host_of(server),
        };
        ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(server: &str) -> &str {
    if let Some(rest) = server.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    server.rsplit_once(':').map_or(server, |(host, _)| host)
}

/// The names a (verified) certificate offers as an identity, in the order they are tried:
/// subject Common Names, then subjectAltName DNS names and e-mail addresses. A certificate
/// that does not parse offers none.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(s)
                | x509_parser::extensions::GeneralName::RFC822Name(s) => {
                    names.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_split_from_their_port() {
        assert_eq!(host_of("127.0.0.1:7412"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7412"), "::1");
        assert_eq!(host_of("engine.plant:7412"), "engine.plant");
        assert_eq!(host_of("engine"), "engine");
    }

    #[test]
    fn names_come_from_cn_then_subject_alt_names() {
        let mut params =
            rcgen::CertificateParams::new(vec!["gw1.plant".into(), "gw1.example".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gateway1");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_names(cert.der()),
            ["gateway1", "gw1.plant", "gw1.example"]
        );
        assert!(certificate_names(b"not a certificate").is_empty());
    }

    #[test]
    fn a_listener_needs_its_files_and_mtls_needs_a_ca() {
        let off = TlsConfig {
            listen: String::new(),
            mqtt_listen: String::new(),
            cert_path: String::new(),
            key_path: String::new(),
            client_ca_path: String::new(),
            require_client_cert: false,
        };
        assert!(off.validate().is_ok());
        assert!(!off.enabled());
        let on = TlsConfig {
            listen: "127.0.0.1:0".into(),
            ..off.clone()
        };
        assert!(on.validate().unwrap_err().contains("cert_path"));
        let bad = TlsConfig {
            listen: "localhost:7412".into(),
            ..off.clone()
        };
        assert!(bad.validate().unwrap_err().contains("tls.listen"));
        let mtls = TlsConfig {
            require_client_cert: true,
            ..off
        };
        assert!(mtls.validate().unwrap_err().contains("client_ca_path"));
    }
}
