//! The shard's answers outside Engine.IO: the chat API, `/healthz`, `/metrics`, the
//! console's figures (`console`) and the static pages (`pages`).

use futures::future::LocalBoxFuture;
use glommio::net::TcpStream;

use super::{console, pages, Shard};
use crate::chat::api;
use crate::transport::host::Routed;
use crate::transport::http::Request;

impl Shard {
    /// Answers `/api/…`, `/healthz`, `/metrics`, the pages, or 404.
    pub(super) fn serve_route<'a>(
        &'a self,
        req: &'a Request,
        io: &'a mut TcpStream,
        buf: &'a mut Vec<u8>,
    ) -> LocalBoxFuture<'a, Routed> {
        Box::pin(async move {
            if req.path == "/api/console" {
                return console::answer(self, req);
            }
            if req.path.starts_with("/api/") {
                let answer = api::handle(&self.chat, req, io, buf).await;
                let consumed = req.method == "GET" || answer.status == 201;
                return Routed::dynamic(answer.status, "application/json", answer.body, consumed);
            }
            if req.method == "GET" {
                if let Some(page) = pages::serve(&self.ctx, &req.path, !has_body(req)) {
                    return page;
                }
            }
            let (status, content_type, body) = match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/healthz") => {
                    let (status, body) = health(self);
                    (status, "application/json", body)
                }
                ("GET", "/metrics") => (
                    200,
                    "text/plain; version=0.0.4",
                    self.ctx
                        .metrics
                        .render_prometheus(self.store.health().is_ok())
                        .into_bytes(),
                ),
                _ => (
                    404,
                    "application/json",
                    br#"{"error":{"code":"not_found","message":"no such route"}}"#.to_vec(),
                ),
            };
            Routed::dynamic(status, content_type, body, !has_body(req))
        })
    }
}

/// Whether a request announces a body (a route that does not read it must close after).
pub(super) fn has_body(req: &Request) -> bool {
    req.header("content-length")
        .is_some_and(|v| v.trim() != "0")
        || req.header("transfer-encoding").is_some()
}

/// The `/healthz` body: per-shard counts from the shared counters.
fn health(shard: &Shard) -> (u16, Vec<u8>) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &shard.ctx.metrics;
    let shards: Vec<serde_json::Value> = m
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({
                "shard": i,
                "connections": s.connections.load(Relaxed),
                "rooms": s.home_rooms.load(Relaxed),
            })
        })
        .collect();
    let store_ok = shard.store.health().is_ok();
    // 503 only when this process no longer serves (draining): load balancers take it out.
    // With Redis down it still serves (reads, local typing) and says "degraded".
    let (code, status) = if shard
        .ctx
        .draining
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        (503, "draining")
    } else if m.redis_down() || m.memory_pressured_shards() > 0 {
        (200, "degraded")
    } else {
        (200, "ok")
    };
    let body = serde_json::json!({
        // Redis down in cluster mode: still serving (reads, typing), sends refused.
        "status": status,
        "shards": shards,
        "connections": m.connections(),
        "rooms": m.rooms(),
        "redis": m.redis_json(),
        "store": {"ok": store_ok},
        // Past half its part of limits.memory_budget a shard refuses sends: "degraded".
        "memory": m.memory_json(),
    });
    (code, body.to_string().into_bytes())
}
