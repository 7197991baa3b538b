//! The backend API: publish, read history and presence over HTTP with the API key.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{chunked, raw_exchange, token, Server, WsClient};
use serde_json::{json, Value};

const KEY: &str = "api-key-for-tests";

fn request(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(k) = key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b.as_bytes()).unwrap();
    }
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn publish_read_and_presence_with_the_api_key() {
    let server = Server::start(&[("CORELAY_API_KEY", KEY)]);
    let mut member = WsClient::connect(server.port, &token("ann", Some(&["*"])));
    assert_eq!(member.emit_ack("join", json!({"room": "news"}))["ok"], true);

    let (status, ack) = request(
        server.port,
        "POST",
        "/api/rooms/news/messages",
        Some(KEY),
        Some(r#"{"text":"from the backend"}"#),
    );
    assert_eq!(status, 201, "{ack}");
    assert_eq!(ack["ok"], true);
    assert_eq!(ack["offset"], 1);
    let ev = member.next_event(Duration::from_secs(2)).unwrap();
    assert_eq!(ev[0], "message");
    assert_eq!(ev[1]["user"], "server");
    assert_eq!(ev[1]["text"], "from the backend");

    for i in 2..=5 {
        let body = format!(r#"{{"text":"m{i}","user":"bot","cid":"k{i}"}}"#);
        let (status, ack) = request(
            server.port,
            "POST",
            "/api/rooms/news/messages",
            Some(KEY),
            Some(&body),
        );
        assert_eq!((status, ack["offset"].as_u64()), (201, Some(i)));
    }
    // Idempotent with cid.
    let (_, again) = request(
        server.port,
        "POST",
        "/api/rooms/news/messages",
        Some(KEY),
        Some(r#"{"text":"m3","user":"bot","cid":"k3"}"#),
    );
    assert_eq!(again["offset"], 3);

    let (status, page) = request(
        server.port,
        "GET",
        "/api/rooms/news/messages?before=5&limit=2",
        Some(KEY),
        None,
    );
    assert_eq!(status, 200);
    let offsets: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![3, 4]);
    let (_, page) = request(
        server.port,
        "GET",
        "/api/rooms/news/messages?after=3",
        Some(KEY),
        None,
    );
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);

    let (status, p) = request(
        server.port,
        "GET",
        "/api/rooms/news/presence",
        Some(KEY),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(p, json!({"users": [{"user": "ann"}]}));
}

#[test]
fn api_errors() {
    let server = Server::start(&[("CORELAY_API_KEY", KEY)]);
    let p = server.port;
    assert_eq!(
        request(p, "GET", "/api/rooms/a/messages", None, None).0,
        401
    );
    assert_eq!(
        request(p, "GET", "/api/rooms/a/messages", Some("wrong"), None).0,
        401
    );
    let (status, body) = request(p, "GET", "/api/rooms/bad%20room/messages", Some(KEY), None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    assert_eq!(
        request(
            p,
            "GET",
            "/api/rooms/a/messages?before=1&after=2",
            Some(KEY),
            None
        )
        .0,
        400
    );
    assert_eq!(
        request(p, "GET", "/api/rooms/a/messages?limit=0", Some(KEY), None).0,
        400
    );
    assert_eq!(
        request(p, "GET", "/api/rooms/a/nothing", Some(KEY), None).0,
        404
    );
    assert_eq!(
        request(
            p,
            "POST",
            "/api/rooms/a/messages",
            Some(KEY),
            Some("{not json")
        )
        .0,
        400
    );
    let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(5000));
    assert_eq!(
        request(p, "POST", "/api/rooms/a/messages", Some(KEY), Some(&long)).0,
        413
    );
    let huge = format!(r#"{{"text":"{}"}}"#, "x".repeat(70_000));
    assert_eq!(
        request(p, "POST", "/api/rooms/a/messages", Some(KEY), Some(&huge)).0,
        413
    );
    // Without a configured key the API is off.
    let off = Server::start(&[]);
    let (status, body) = request(off.port, "GET", "/api/rooms/a/messages", Some(KEY), None);
    assert_eq!(status, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("api_key"));
}

/// A chunked publish request: the head, then `body` as it is.
fn chunked_publish(body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST /api/rooms/chunked/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

#[test]
fn chunked_request_bodies() {
    let server = Server::start(&[("CORELAY_API_KEY", KEY)]);
    let port = server.port;
    let timeout = Duration::from_secs(5);
    let body = chunked(br#"{"text":"in chunks","cid":"c1"}"#, 5);
    let raw = chunked_publish(&body);
    let head_len = raw.len() - body.len();
    let answers = raw_exchange(
        port,
        &raw,
        &[head_len + 1, head_len + 9, raw.len() - 2],
        timeout,
    );
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status, 201, "{}", answers[0].text());
    let ack: Value = serde_json::from_slice(&answers[0].body).unwrap();
    assert_eq!(
        (ack["ok"].clone(), ack["offset"].clone()),
        (json!(true), json!(1))
    );
    let (_, history) = request(port, "GET", "/api/rooms/chunked/messages", Some(KEY), None);
    assert_eq!(history["messages"][0]["text"], "in chunks");

    // Malformed chunks: 400.
    for bad in [
        b"5\r\n{\"te\r\nxt\":\"a\"}\r\n0\r\n\r\n".as_slice(),
        b"1g\r\n{}\r\n0\r\n\r\n",
        b"2;\x01\r\n{}\r\n0\r\n\r\n",
    ] {
        let answers = raw_exchange(port, &chunked_publish(bad), &[], timeout);
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].status, 400, "{}", answers[0].text());
        let v: Value = serde_json::from_slice(&answers[0].body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request");
    }
    // A body cut short by the client: the request ends (an answer or none, no hang).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(&chunked_publish(b"20\r\n{\"text\":")).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .unwrap_or_else(|e| panic!("the server still waits for the body: {e}"));
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    // Over the 64 KiB limit: 413, as with Content-Length.
    let huge = format!(r#"{{"text":"{}"}}"#, "x".repeat(70 * 1024));
    let answers = raw_exchange(
        port,
        &chunked_publish(&chunked(huge.as_bytes(), 8192)),
        &[],
        timeout,
    );
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].status, 413);
    let (status, big) = request(
        port,
        "POST",
        "/api/rooms/chunked/messages",
        Some(KEY),
        Some(&huge),
    );
    assert_eq!(
        (status, big["error"]["code"].clone()),
        (413, json!("too_large"))
    );
    let (_, history) = request(port, "GET", "/api/rooms/chunked/messages", Some(KEY), None);
    assert_eq!(
        history["messages"].as_array().unwrap().len(),
        1,
        "{history}"
    );
}

/// Writes a request head and part of its body, then stalls: what the server sends back
/// before it closes, and how long it took to close.
fn stall_mid_body(port: u16, head: &str) -> (String, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(b"{\"te").unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[test]
fn a_body_that_stalls_is_not_waited_for_past_the_handshake_timeout() {
    let server = Server::start(&[
        ("CORELAY_API_KEY", KEY),
        ("CORELAY_LIMITS_HANDSHAKE_TIMEOUT", "1s"),
    ]);
    let head = format!(
        "POST /api/rooms/stall/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    );
    let (answer, took) = stall_mid_body(server.port, &head);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("\"code\":\"timeout\""), "{answer}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    // A polling POST that stalls mid-body loses its connection the same way.
    let (_poll, open) = common::PollClient::open(server.port);
    let sid = open["sid"].as_str().unwrap().to_string();
    let head = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: t\r\n\
         Content-Type: text/plain\r\nContent-Length: 40\r\n\r\n"
    );
    let (answer, took) = stall_mid_body(server.port, &head);
    assert!(answer.is_empty(), "{answer}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
}
