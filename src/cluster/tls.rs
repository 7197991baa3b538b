//! The TLS client settings of a shard's own connections to Redis ([`super::resp`]), from
//! the same options as the bridge's client: the CA file (else the system's trust store),
//! and the client certificate and key when the server asks for one.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{ClusterError, RedisOptions};

/// A rustls client configuration for `opts` (ring, the safe default protocol versions).
pub(crate) fn client_config(
    opts: &RedisOptions,
) -> Result<Arc<rustls::ClientConfig>, ClusterError> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.tls_ca_file {
        Some(path) => {
            for cert in certificates(path, "redis.tls_ca_file")? {
                roots.add(cert).map_err(|e| {
                    ClusterError::Config(format!("redis.tls_ca_file {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            // Unreadable entries of the system store are skipped, as the bridge's client does.
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&opts.tls_cert_file, &opts.tls_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "redis.tls_cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                ClusterError::Config(format!("redis.tls_key_file {}: {e}", key.display()))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClusterError::Config(format!("redis.tls_cert_file: {e}")))?
        }
        _ => {
            return Err(ClusterError::Config(
                "redis.tls_cert_file and redis.tls_key_file go together".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file (at least one); `what` names the setting in errors.
fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, ClusterError> {
    crate::pem::certificates(path)
        .map_err(|e| ClusterError::Config(format!("{what} {}: {e}", path.display())))
}
