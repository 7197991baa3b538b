//! A small HTTP/1.1 backend for the hooks tests: each request is recorded and answered by
//! the test's rule (JSON, raw bytes, a delay, a dropped connection), over plain TCP or
//! TLS, with keep-alive like a real backend.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// A request the backend got.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The path, e.g. `/hooks/publish`.
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub raw_body: Vec<u8>,
    pub body: Value,
}

impl Seen {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The hook's name (the path's last segment).
    pub fn hook(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }

    /// Whether the signature headers match `secret`, checked the way a backend does.
    pub fn signed_with(&self, secret: &str) -> bool {
        let (Some(ts), Some(sig)) = (
            self.header("x-corelay-timestamp"),
            self.header("x-corelay-signature"),
        ) else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&self.raw_body);
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        sig == format!("sha256={hex}")
    }
}

/// How the backend answers one request.
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// These bytes as the whole answer (head and body).
    Raw(Vec<u8>),
    /// Waits, then answers.
    After(Duration, Box<Reply>),
    /// Closes the connection without answering.
    Drop,
    /// Answers (as a keep-alive answer), then closes the connection as an idle
    /// backend does.
    ThenClose(Box<Reply>),
}

/// The test's rule: the answer to a request.
pub type Rule = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A running backend (its threads end with the test process).
pub struct Backend {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Backend {
    /// A plain HTTP backend on a free port answering by `rule`.
    pub fn start(rule: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Backend {
        Backend::start_with(Arc::new(rule), None)
    }

    /// An HTTPS backend with this certificate chain and key (PEM files).
    pub fn start_tls(
        rule: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Backend {
        use rustls::pki_types::pem::PemObject as _;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Backend::start_with(Arc::new(rule), Some(Arc::new(config)))
    }

    fn start_with(rule: Rule, tls: Option<Arc<rustls::ServerConfig>>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (rule, log, tls) = (rule.clone(), log.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(stream, &rule, &log),
                    Some(config) => {
                        let conn = rustls::ServerConnection::new(config).unwrap();
                        serve(rustls::StreamOwned::new(conn, stream), &rule, &log)
                    }
                });
            }
        });
        Backend { port, seen }
    }

    /// `http://127.0.0.1:{port}/hooks`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks", self.port)
    }

    /// The requests so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves one connection's requests until it ends.
fn serve<S: Read + Write>(mut stream: S, rule: &Rule, log: &Mutex<Vec<Seen>>) {
    let mut buf = Vec::new();
    loop {
        let Some(seen) = read_request(&mut stream, &mut buf) else {
            return;
        };
        log.lock().unwrap().push(seen.clone());
        let mut reply = rule(&seen);
        let mut close = false;
        loop {
            match reply {
                Reply::ThenClose(then) => {
                    close = true;
                    reply = *then;
                }
                Reply::After(d, then) => {
                    std::thread::sleep(d);
                    reply = *then;
                }
                Reply::Drop => return,
                Reply::Json(v) => {
                    let body = v.to_string();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(format!("{head}{body}").as_bytes());
                    break;
                }
                Reply::Raw(bytes) => {
                    let _ = stream.write_all(&bytes);
                    break;
                }
            }
        }
        let _ = stream.flush();
        if close {
            return;
        }
    }
}

/// Reads one request (head and Content-Length body); `None` at the connection's end.
fn read_request<S: Read>(stream: &mut S, buf: &mut Vec<u8>) -> Option<Seen> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = req.parse(buf) {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let path = req.path.unwrap_or("").to_string();
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < n + len {
                let got = stream.read(&mut chunk).ok().filter(|&g| g > 0)?;
                buf.extend_from_slice(&chunk[..got]);
            }
            let raw_body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            let body = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
            return Some(Seen {
                path,
                headers,
                raw_body,
                body,
            });
        }
        let got = stream.read(&mut chunk).ok().filter(|&g| g > 0)?;
        buf.extend_from_slice(&chunk[..got]);
    }
}
