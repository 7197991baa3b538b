//! `GET /api/console`: every shard's figures in one JSON document, for the live console
//! page (`/console`, `assets/console.js`), which polls it every second.
//!
//! Each shard answers HTTP on its own, so the figures come from the shared counters of
//! every shard (`Metrics`), as `/healthz` and `/metrics` read them. They are raw counters,
//! not rates: the page divides the difference of two samples by the time between their
//! `ts_ms`, so every rate shown was measured, and this endpoint keeps no state.
//!
//! Access: with `auth.api_key` set, the same bearer key as `/api/…`; without one, open in
//! dev mode (no JWT secret) and refused otherwise.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::routes::has_body;
use super::Shard;
use crate::chat::api::bearer_matches;
use crate::context::Context;
use crate::metrics::{ShardMetrics, LATENCY_BUCKETS};
use crate::transport::host::Routed;
use crate::transport::http::Request;

/// Whether the console is served at all: with an API key to guard it, or in dev mode.
pub(super) fn enabled(ctx: &Context) -> bool {
    ctx.config.auth.api_key.is_some() || ctx.auth.is_dev_mode()
}

/// Answers `/api/console`: 401 without the key (when one is configured), else the figures.
pub(super) fn answer(shard: &Shard, req: &Request) -> Routed {
    let consumed = !has_body(req);
    let refuse = |status: u16, code: &str, message: &str| {
        let body = json!({"error": {"code": code, "message": message}});
        Routed::dynamic(
            status,
            "application/json",
            body.to_string().into_bytes(),
            consumed,
        )
    };
    match shard.ctx.config.auth.api_key.as_deref() {
        Some(key) if !bearer_matches(req, key) => {
            return refuse(401, "unauthorized", "missing or wrong bearer API key");
        }
        Some(_) => {}
        None if shard.ctx.auth.is_dev_mode() => {}
        None => {
            return refuse(
                401,
                "unauthorized",
                "the console is disabled: set auth.api_key (CORELAY_API_KEY)",
            );
        }
    }
    if req.method != "GET" {
        return refuse(405, "bad_request", "method not allowed");
    }
    let body = figures(shard).to_string().into_bytes();
    Routed::dynamic(200, "application/json", body, consumed)
}

/// The document: a timestamp, per-shard counters, Redis, the store, the backend's hooks
/// and the feed (each `null` when not configured).
fn figures(shard: &Shard) -> Value {
    let m = &shard.ctx.metrics;
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let shards: Vec<Value> = m.shards.iter().enumerate().map(shard_figures).collect();
    let store_error = shard.store.health().err().map(|e| e.to_string());
    let config = &shard.ctx.config;
    json!({
        "ts_ms": ts_ms,
        "draining": shard.ctx.is_draining(),
        "dev_mode": shard.ctx.auth.is_dev_mode(),
        "fanout_bounds_s": LATENCY_BUCKETS,
        "shards": shards,
        "redis": m.redis_json(),
        "store": {
            "kind": format!("{:?}", config.store.kind).to_lowercase(),
            "durability": format!("{:?}", config.store.durability).to_lowercase(),
            "ok": store_error.is_none(),
            "error": store_error,
        },
        // The backend in the loop (PROTOCOL.md "Hooks", "Feed"); `null` when not configured.
        "hooks": if config.hooks.any() { m.hooks_json() } else { Value::Null },
        "feed": if config.feed.enabled() { m.feed_json() } else { Value::Null },
    })
}

/// One shard's counters and its cumulative fan-out histogram.
fn shard_figures((i, s): (usize, &ShardMetrics)) -> Value {
    let (buckets, count) = s.fanout_snapshot();
    json!({
        "shard": i,
        "connections": s.connections.load(Relaxed),
        "rooms": s.home_rooms.load(Relaxed),
        "messages_in": s.messages_in.load(Relaxed),
        "messages_out": s.messages_out.load(Relaxed),
        "queue_drops": s.typing_dropped.load(Relaxed),
        "slow_consumer_closes": s.slow_consumer_closes.load(Relaxed),
        "mesh_refusals": s.mesh_refusals.load(Relaxed),
        "redis_link_down": s.redis_link_down.load(Relaxed) > 0,
        "fanout": {"count": count, "buckets": buckets},
    })
}
