//! The server API for backend services: publish to a room, read its history, list who
//! is present. Bearer-authorized with `auth.api_key`; JSON in and out.

use std::sync::Arc;

use bytes::Bytes;
use futures::io::AsyncRead;
use serde::Deserialize;

use super::events::{history_ack_json, validate_room};
use super::layer::Chat;
use super::mesh::{home_of, HomeCmd, ReplyTo};
use crate::protocol::socketio::write_json_str;
use crate::store::{HistoryQuery, HistoryStore};
use crate::transport::http::{self, HttpError, Request};

/// The largest API request body.
const MAX_BODY: usize = 64 * 1024;

/// An API answer: status and JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

fn error(status: u16, code: &str, message: &str) -> Answer {
    let mut body = format!("{{\"error\":{{\"code\":\"{code}\",\"message\":").into_bytes();
    write_json_str(&mut body, message);
    body.extend_from_slice(b"}}");
    Answer { status, body }
}

/// Compares secrets without leaking where they differ through timing.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries `Authorization: Bearer <key>`; shared with the console's
/// endpoint so that both check the API key the same way.
pub fn bearer_matches(req: &Request, key: &str) -> bool {
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    given.is_some_and(|g| same_secret(g.as_bytes(), key.as_bytes()))
}

/// Handles a request under `/api/`. Reads the body from `io` when the route takes one.
pub async fn handle<R: AsyncRead + Unpin>(
    chat: &Chat,
    req: &Request,
    io: &mut R,
    buf: &mut Vec<u8>,
) -> Answer {
    let Some(key) = chat.ctx.config.auth.api_key.as_deref() else {
        return error(
            401,
            "unauthorized",
            "the API is disabled: set auth.api_key (CORELAY_API_KEY)",
        );
    };
    if !bearer_matches(req, key) {
        return error(401, "unauthorized", "missing or wrong bearer API key");
    }
    let rest = req.path.strip_prefix("/api/rooms/").unwrap_or("");
    let Some((room, what)) = rest.split_once('/') else {
        return error(404, "not_found", "no such API route");
    };
    let room = http::percent_decode(room);
    if let Err(e) = validate_room(&room) {
        return error(400, "bad_request", &e.message);
    }
    match (req.method.as_str(), what) {
        ("GET", "messages") => read_messages(chat, req, &room).await,
        ("POST", "messages") => {
            let framing = match req.body_framing() {
                Ok(http::BodyFraming::None) => {
                    return error(
                        400,
                        "bad_request",
                        "Content-Length or Transfer-Encoding: chunked is required",
                    )
                }
                Ok(f) => f,
                Err(e) => return error(400, "bad_request", &e.to_string()),
            };
            let limit = chat.ctx.config.limits.handshake_timeout.0;
            match http::read_framed_body_within(io, buf, framing, MAX_BODY, limit).await {
                Ok(body) => publish(chat, &room, &body).await,
                Err(HttpError::BodyTooLarge) => error(413, "too_large", "request body over 64 KiB"),
                Err(e @ HttpError::TimedOut(_)) => error(408, "timeout", &e.to_string()),
                Err(e) => error(400, "bad_request", &e.to_string()),
            }
        }
        ("GET", "presence") => presence(chat, &room).await,
        (_, "messages" | "presence") => error(405, "bad_request", "method not allowed"),
        _ => error(404, "not_found", "no such API route"),
    }
}

fn query_u64(req: &Request, key: &str) -> Result<Option<u64>, Answer> {
    match req.query_param(key) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            error(
                400,
                "bad_request",
                &format!("{key} must be a non-negative integer"),
            )
        }),
    }
}

async fn read_messages(chat: &Chat, req: &Request, room: &str) -> Answer {
    let parsed = (|| {
        let before = query_u64(req, "before")?;
        let after = query_u64(req, "after")?;
        let limit = match req.query_param("limit").filter(|v| !v.is_empty()) {
            None => 50,
            Some(v) => match v.parse::<i64>() {
                Ok(n) if n >= 1 => n.min(100) as usize,
                _ => return Err(error(400, "bad_request", "limit must be an integer >= 1")),
            },
        };
        let query = match (before, after) {
            (Some(_), Some(_)) => {
                return Err(error(400, "bad_request", "give before or after, not both"))
            }
            (Some(b), None) => HistoryQuery::Before(b),
            (None, Some(a)) => HistoryQuery::After(a),
            (None, None) => HistoryQuery::Latest,
        };
        Ok((query, limit))
    })();
    let (query, limit) = match parsed {
        Ok(q) => q,
        Err(answer) => return answer,
    };
    match chat.store.read(room, query, limit).await {
        Ok(messages) => {
            // The `history` ack minus its `ok`: {"messages":[…]}.
            let ack = history_ack_json(&messages);
            let mut body = b"{".to_vec();
            body.extend_from_slice(&ack[b"{\"ok\":true,".len()..]);
            Answer { status: 200, body }
        }
        Err(e) => error(503, "unavailable", &format!("history store: {e}")),
    }
}

/// The POST body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    text: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    cid: Option<String>,
}

async fn publish(chat: &Chat, room: &str, body: &[u8]) -> Answer {
    let body: PublishBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => return error(400, "bad_request", &format!("invalid body: {e}")),
    };
    let limits = &chat.ctx.config.limits;
    if body.text.len() > limits.max_text_bytes {
        return error(
            413,
            "too_large",
            &format!("text is over {} bytes", limits.max_text_bytes),
        );
    }
    let user = body.user.unwrap_or_else(|| "server".to_string());
    if user.is_empty() || user.len() > 128 {
        return error(400, "bad_request", "user must be 1 to 128 bytes");
    }
    if body
        .cid
        .as_ref()
        .is_some_and(|c| c.is_empty() || c.len() > 64)
    {
        return error(400, "bad_request", "cid must be 1 to 64 bytes");
    }
    if chat.ctx.is_draining() {
        let e = super::handler::shutting_down();
        return error(503, e.code.as_str(), &e.message);
    }
    if let Some(answer) = overloaded(chat, room) {
        return answer;
    }
    let room: Arc<str> = Arc::from(room);
    let ack = ask_home(chat, &room, |reply| HomeCmd::Publish {
        room: room.clone(),
        user: Arc::from(user.as_str()),
        text: body.text,
        cid: body.cid,
        reply,
    });
    match ack.await {
        Some(ack) => from_ack(&ack, 201),
        None => no_answer(),
    }
}

/// Sends a request to the room's home shard and waits for its ack body (`None` if the
/// home dropped the request unanswered).
async fn ask_home(
    chat: &Chat,
    room: &Arc<str>,
    cmd: impl FnOnce(ReplyTo) -> HomeCmd,
) -> Option<Bytes> {
    let (tx, rx) = futures::channel::oneshot::channel::<Bytes>();
    chat.to_home(room, cmd(ReplyTo::Api(tx)));
    rx.await.ok()
}

/// The 500 when the home shard dropped a request unanswered.
fn no_answer() -> Answer {
    error(500, "internal", "the room's home shard did not answer")
}

/// The 503 for a request while the queue toward the room's home shard is full, or this
/// shard or the home is past its part of `limits.memory_budget`.
fn overloaded(chat: &Chat, room: &str) -> Option<Answer> {
    let home = home_of(room, chat.count);
    if !chat.mesh_congested(home) && !chat.memory_pressured(home) {
        return None;
    }
    let e = super::handler::overloaded();
    Some(error(503, e.code.as_str(), &e.message))
}

async fn presence(chat: &Chat, room: &str) -> Answer {
    if let Some(answer) = overloaded(chat, room) {
        return answer;
    }
    let room: Arc<str> = Arc::from(room);
    let ack = ask_home(chat, &room, |reply| HomeCmd::Presence {
        room: room.clone(),
        reply,
    });
    match ack.await {
        Some(ack) => {
            let mut answer = from_ack(&ack, 200);
            if answer.status == 200 {
                // {"ok":true,"users":[…]} → {"users":[…]}
                let mut body = b"{".to_vec();
                body.extend_from_slice(&answer.body[b"{\"ok\":true,".len()..]);
                answer.body = body;
            }
            answer
        }
        None => no_answer(),
    }
}

/// Turns a chat ack body into an HTTP answer: `ok` acks with `status`, errors by code.
fn from_ack(ack: &[u8], status: u16) -> Answer {
    if ack.starts_with(b"{\"ok\":true") {
        return Answer {
            status,
            body: ack.to_vec(),
        };
    }
    let v: serde_json::Value = serde_json::from_slice(ack).unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or("internal");
    let message = v["error"]["message"].as_str().unwrap_or("request failed");
    let status = match code {
        "bad_request" => 400,
        "unauthorized" => 401,
        "forbidden" => 403,
        "too_large" => 413,
        "unavailable" => 503,
        _ => 500,
    };
    error(status, code, message)
}
