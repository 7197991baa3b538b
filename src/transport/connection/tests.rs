//! Connections served over real loopback TCP by a test host: the Engine.IO polling
//! handshake and requests, errors, hand-overs and routes.

use std::io::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};

use super::*;
use crate::transport::testing::{on_glommio, HandedOver, Seen, TestHost};
use crate::transport::websocket::text_frame;

/// Serves every connection to a new listener on loopback with `host`; its address.
fn listen(host: &Rc<TestHost>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let host = host.clone();
    glommio::spawn_local(async move {
        while let Ok(stream) = listener.accept().await {
            glommio::spawn_local(serve(host.clone(), stream)).detach();
        }
    })
    .detach();
    addr
}

/// An HTTP answer: status and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

/// Parses a whole response read up to the server's close.
fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {head}"));
    Answer {
        status,
        body: body.to_string(),
    }
}

/// Sends `request` (which should ask for `Connection: close`) and reads the answer
/// until the server closes.
async fn exchange(addr: SocketAddr, request: &str) -> Answer {
    let mut client = TcpStream::connect(addr).await.expect("connected");
    client
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut raw = Vec::new();
    glommio::timer::timeout(Duration::from_secs(5), async {
        Ok(client.read_to_end(&mut raw).await)
    })
    .await
    .expect("an answer within 5 s")
    .expect("read");
    parse(&raw)
}

/// A GET with `Connection: close`.
fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
}

/// A polling POST of `body` for session `sid`, with `Connection: close`.
fn post(sid: &str, body: &str) -> String {
    format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: test\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Opens a polling session; its sid.
async fn handshake(addr: SocketAddr) -> String {
    let a = exchange(addr, &get("/socket.io/?EIO=4&transport=polling")).await;
    assert_eq!(a.status, 200, "{a:?}");
    let open: serde_json::Value =
        serde_json::from_str(a.body.strip_prefix('0').expect("an open packet")).expect("json");
    open["sid"].as_str().expect("a sid").to_string()
}

#[test]
fn the_polling_handshake_answers_with_the_open_packet() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let a = exchange(addr, &get("/socket.io/?EIO=4&transport=polling")).await;
        assert_eq!(a.status, 200);
        let open: serde_json::Value =
            serde_json::from_str(a.body.strip_prefix('0').expect("an open packet")).unwrap();
        let sid = open["sid"].as_str().expect("a sid");
        assert_eq!(crate::ids::shard_of_sid(sid), Some(0));
        assert_eq!(open["upgrades"], serde_json::json!(["websocket"]));
        assert_eq!(open["pingInterval"], 25_000);
        assert_eq!(open["pingTimeout"], 20_000);
        assert_eq!(open["maxPayload"], 1_000_000);
        let session = host
            .session_by_sid(sid)
            .expect("the host keeps the session");
        assert_eq!(session.transport(), Transport::Polling);
        assert_eq!(
            host.seen(),
            [Seen::Open {
                session: session.id,
                path: "/socket.io/".into()
            }]
        );
    });
}

#[test]
fn a_chunked_post_reaches_the_handler() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let sid = handshake(addr).await;
        let id = host.session_by_sid(&sid).unwrap().id;
        host.seen();
        // Two packets, `4hello` and `4world`, cut across three chunks.
        let request = format!(
            "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: test\r\n\
             Connection: close\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
             3\r\n4he\r\n6\r\nllo\x1e4w\r\n4\r\norld\r\n0\r\n\r\n"
        );
        let a = exchange(addr, &request).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "{a:?}");
        assert_eq!(
            host.seen(),
            [
                Seen::Message {
                    session: id,
                    data: b"hello".to_vec()
                },
                Seen::Message {
                    session: id,
                    data: b"world".to_vec()
                },
            ]
        );
    });
}

#[test]
fn a_post_with_a_bad_packet_ends_the_session() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let sid = handshake(addr).await;
        let id = host.session_by_sid(&sid).unwrap().id;
        host.seen();
        let a = exchange(addr, &post(&sid, "4close")).await;
        assert_eq!(a.status, 400, "{a:?}");
        assert!(host.session_by_sid(&sid).is_none());
        assert_eq!(
            host.seen(),
            [
                Seen::Message {
                    session: id,
                    data: b"close".to_vec()
                },
                Seen::Close { session: id },
            ]
        );
    });
}

#[test]
fn a_client_close_is_told_above_once_though_the_sid_outlives_it() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let sid = handshake(addr).await;
        let id = host.session_by_sid(&sid).unwrap().id;
        host.seen();
        // The close comes with no GET waiting: the sid stays known for a grace, so that
        // a GET still on its way gets the noop.
        let a = exchange(addr, &post(&sid, "1")).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(host.session_by_sid(&sid).is_some(), "known for the grace");
        assert_eq!(host.seen(), [Seen::Close { session: id }]);
        let target = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let a = exchange(addr, &get(&target)).await;
        assert_eq!((a.status, a.body.as_str()), (200, "6"), "{a:?}");
        assert!(host.session_by_sid(&sid).is_none(), "forgotten by that GET");
        assert_eq!(host.seen(), [], "the end is told above once");
    });
}

#[test]
fn a_polling_get_waits_for_a_packet() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let sid = handshake(addr).await;
        let session = host.session_by_sid(&sid).unwrap();
        let target = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let waiting = glommio::spawn_local(async move { exchange(addr, &get(&target)).await });
        glommio::timer::sleep(Duration::from_millis(50)).await;
        assert!(session.get_waiting(), "the GET waits for a packet");
        session.push(text_frame(b"42[\"a\"]"), false);
        session.push(text_frame(b"2"), false);
        let a = waiting.await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (200, "42[\"a\"]\x1e2"),
            "{a:?}"
        );
        assert!(!session.get_waiting());
    });
}

#[test]
fn an_unknown_sid_gets_session_id_unknown() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        // One this shard would own, and one naming a shard the process does not have.
        for sid in [crate::ids::new_sid(0), crate::ids::new_sid(9), "zz".into()] {
            let a = exchange(
                addr,
                &get(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}")),
            )
            .await;
            assert_eq!(a.status, 400, "{sid}: {a:?}");
            assert_eq!(a.body, r#"{"code":1,"message":"Session ID unknown"}"#);
        }
        assert!(host.handed.borrow().is_empty());
    });
}

#[test]
fn a_sid_of_another_shard_is_handed_over_with_its_request() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let sid = crate::ids::new_sid(1);
        let target = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
        let mut client = TcpStream::connect(addr).await.expect("connected");
        client
            .write_all(get(&target).as_bytes())
            .await
            .expect("request sent");
        for _ in 0..500 {
            if !host.handed.borrow().is_empty() {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        let HandedOver { owner, handoff, fd } =
            host.handed.borrow_mut().pop().expect("handed over");
        assert_eq!(owner, 1);
        assert_eq!(handoff.request.method, "GET");
        assert_eq!(handoff.request.path, "/socket.io/");
        assert_eq!(
            handoff.request.query_param("sid").as_deref(),
            Some(sid.as_str())
        );
        assert!(handoff.leftover.is_empty());
        assert!(
            host.seen().is_empty(),
            "this shard does not touch the request"
        );
        // The descriptor is the client's own connection: the owner answers through it.
        let mut owner_side = std::net::TcpStream::from(fd);
        owner_side
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nowner")
            .expect("written");
        drop(owner_side);
        let mut raw = Vec::new();
        client.read_to_end(&mut raw).await.expect("read");
        let a = parse(&raw);
        assert_eq!((a.status, a.body.as_str()), (200, "owner"));
    });
}

#[test]
fn other_paths_go_to_the_host_routes() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        let a = exchange(addr, &get("/healthz")).await;
        assert_eq!((a.status, a.body.as_str()), (200, "routed /healthz"));
        let a = exchange(addr, &get("/api/rooms/x?EIO=4&transport=polling")).await;
        assert_eq!(a.body, "routed /api/rooms/x");
        // `/socket.io` without its slash is Engine.IO's.
        let a = exchange(addr, &get("/socket.io?EIO=4&transport=polling")).await;
        assert!(a.body.starts_with("0{"), "{a:?}");
        assert_eq!(*host.routed.borrow(), ["/healthz", "/api/rooms/x"]);
    });
}

#[test]
fn an_unsupported_protocol_version_is_refused() {
    on_glommio(|| async {
        let host = TestHost::new();
        let addr = listen(&host);
        for query in [
            "EIO=3&transport=polling",
            "transport=polling",
            "EIO=5&transport=websocket",
        ] {
            let a = exchange(addr, &get(&format!("/socket.io/?{query}"))).await;
            assert_eq!(a.status, 400, "{query}");
            assert_eq!(
                a.body, r#"{"code":5,"message":"Unsupported protocol version"}"#,
                "{query}"
            );
        }
        let a = exchange(addr, &get("/socket.io/?EIO=4&transport=carrier-pigeon")).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (400, r#"{"code":0,"message":"Transport unknown"}"#)
        );
        assert!(host.sessions.borrow().is_empty());
        assert!(host.seen().is_empty());
    });
}
