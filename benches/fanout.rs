//! Fan-out microbenchmark: delivering one encoded frame to every member of a room, in
//! process (no sockets), at 10 / 1,000 / 10,000 members.
//!
//! Setup builds N `Session`s (WebSocket transport, default `LimitsConfig`, one shard's
//! budget of the default `limits.memory_budget`, so its accounting is measured too). Each
//! iteration then does, per recipient, what the member shard does — `Session::push` of a
//! `Bytes` clone (a refcount bump, no copy) of one ~200-byte text frame — and then what
//! each connection's writer does — `Outbound::drain_into` into a reused `Vec`, then
//! `written` — so the
//! queues never fill. Throughput is `Elements(N)`, so criterion reports recipients per
//! second and the time per iteration divided by N is the cost per recipient.
//!
//! Run: `cargo bench -p corelay --bench fanout` (add `-- --warm-up-time 1
//! --measurement-time 3` for a shorter run).

use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corelay::config::LimitsConfig;
use corelay::transport::budget::ShardBudget;
use corelay::transport::conn::{Queued, Timers, Transport};
use corelay::transport::session::Session;
use corelay::transport::websocket::text_frame;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// The writer's batch limit (`WRITE_BATCH` in `transport::connection`).
const WRITE_BATCH: usize = 256 * 1024;

/// A ~200-byte delivered `message` frame.
fn frame() -> Bytes {
    let payload = concat!(
        r#"42["message",{"room":"lobby","id":"01J9ZQ3K7X4M2N8PQRSTVWXYZ0","offset":123456,"#,
        r#""user":"user-4711","text":"the quick brown fox jumps over the lazy dog, twice over","#,
        r#""ts":1760000000000,"cid":"c-01J9ZQ3K7X4M2N8P"}]"#
    );
    text_frame(payload.as_bytes())
}

fn sessions(n: usize) -> Vec<Session> {
    let limits = LimitsConfig::default();
    let budget = Rc::new(ShardBudget::new(limits.memory_budget));
    let now = Instant::now();
    let timers = Timers {
        next_ping: now + Duration::from_secs(25),
        pong_deadline: None,
        connect_deadline: None,
        close_deadline: None,
    };
    (0..n as u64)
        .map(|id| {
            Session::new(
                id,
                format!("sid-{id}"),
                Transport::WebSocket,
                (&limits, budget.clone()),
                timers,
                tracing::Span::none(),
            )
        })
        .collect()
}

fn bench_fanout(c: &mut Criterion) {
    let frame = frame();
    let mut group = c.benchmark_group("fanout");
    for n in [10usize, 1_000, 10_000] {
        let members = sessions(n);
        let mut buf = Vec::with_capacity(WRITE_BATCH);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("push_and_drain", n),
            &members,
            |b, members| {
                b.iter(|| {
                    // Member shard: one shared frame queued for each recipient.
                    for s in members {
                        let q = s.push(frame.clone(), false);
                        assert_eq!(q, Queued::Yes);
                    }
                    // Writers: each connection drains its queue into its write buffer.
                    for s in members {
                        buf.clear();
                        let mut queue = s.queue();
                        queue.drain_into(&mut buf, WRITE_BATCH);
                        black_box(buf.len());
                        queue.written();
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_fanout);
criterion_main!(benches);
