//! The TLS client settings of an `https://` backend: the CA file (`hooks.tls_ca_file`),
//! else the system's trust store, and the name to check the certificate against.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::SetupError;
use crate::config::BackendUrl;

/// A rustls client configuration and the backend's name.
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl Tls {
    /// The settings for `url` (as written: `raw`), trusting `ca_file` or the system's roots.
    pub fn new(url: &BackendUrl, raw: &str, ca_file: Option<&Path>) -> Result<Tls, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let bad = |e: String| {
                    SetupError::Tls(format!("hooks.tls_ca_file {}: {e}", path.display()))
                };
                for cert in crate::pem::certificates(path).map_err(bad)? {
                    roots.add(cert).map_err(|e| bad(e.to_string()))?;
                }
            }
            None => {
                // Unreadable entries of the system store are skipped, as for Redis.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name =
            ServerName::try_from(url.host.clone()).map_err(|_| SetupError::ServerName {
                url: raw.to_string(),
            })?;
        Ok(Tls {
            config: Arc::new(config),
            server_name,
        })
    }
}
