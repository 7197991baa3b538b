//! History store benchmarks (embedded fjall store, fsync on):
//!
//! - `append_fsync/batch/{1,16,256}`: one task appending batches back to back, each
//!   awaited; throughput is messages per second (one fdatasync per append).
//! - `append_fsync/concurrent_64_tasks/1`: 64 tasks each appending single messages at
//!   once, which the store's group commit merges into shared fsyncs.
//! - `read/newest_50_of_10k`: `read(room, Latest, 50)` on a room holding 10k messages.
//!
//! Run: `cargo bench --bench store` (add `-- --quick` for a shorter run). Everything runs
//! on a glommio executor, like a shard; the data directory is a fresh temporary one.

use std::cell::Cell;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use corelay::store::{Durability, HistoryQuery, HistoryStore, Store, StoredMessage};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder};

/// A message shaped like a chat line (ids, user, ~100 bytes of text, a cid).
fn message(room: &str, offset: u64) -> StoredMessage {
    StoredMessage {
        room: room.to_owned(),
        offset,
        id: format!("01J{offset:023}"),
        user: "user-4711".to_owned(),
        text: format!(
            "message number {offset}: the quick brown fox jumps over the lazy dog, twice over"
        ),
        ts: 1_760_000_000_000 + offset,
        cid: Some(format!("cid-{offset}")),
    }
}

fn executor() -> LocalExecutor {
    LocalExecutorBuilder::default()
        .io_memory(512 * 1024)
        .make()
        .expect("glommio executor")
}

fn bench_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_embedded(dir.path(), Durability::Fsync).expect("open store");
    let ex = executor();
    let mut group = c.benchmark_group("append_fsync");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));

    for batch in [1u64, 16, 256] {
        let room = format!("bench-batch-{batch}");
        let next = Cell::new(1u64);
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("batch/{batch}"), |b| {
            b.iter_custom(|iters| {
                ex.run(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let first = next.get();
                        next.set(first + batch);
                        let msgs = (first..first + batch).map(|o| message(&room, o)).collect();
                        store.append(msgs).await.expect("append");
                    }
                    start.elapsed()
                })
            })
        });
    }

    let tasks = 64u64;
    let store_rc = Rc::new(store.clone());
    let round = Rc::new(Cell::new(0u64));
    group.throughput(Throughput::Elements(tasks));
    group.bench_function("concurrent_64_tasks/1", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let offset = round.get() + 1;
                    round.set(offset);
                    let appends: Vec<_> = (0..tasks)
                        .map(|t| {
                            let store = store_rc.clone();
                            glommio::spawn_local(async move {
                                let room = format!("bench-conc-{t}");
                                store
                                    .append(vec![message(&room, offset)])
                                    .await
                                    .expect("append");
                            })
                        })
                        .collect();
                    for a in appends {
                        a.await;
                    }
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    ex.run(store.close()).expect("close");
}

fn bench_read(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_embedded(dir.path(), Durability::Fsync).expect("open store");
    let ex = executor();
    let room = "bench-read";
    ex.run(async {
        for start in (1..=10_000u64).step_by(1_000) {
            let msgs = (start..start + 1_000).map(|o| message(room, o)).collect();
            store.append(msgs).await.expect("fill");
        }
        // Other rooms around it, so the scan has neighbours to skip.
        for r in ["bench-rea", "bench-read-2", "bench-reae"] {
            let msgs = (1..=1_000).map(|o| message(r, o)).collect();
            store.append(msgs).await.expect("fill neighbours");
        }
    });

    let mut group = c.benchmark_group("read");
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("newest_50_of_10k", |b| {
        b.iter_custom(|iters| {
            ex.run(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let got = store
                        .read(room, HistoryQuery::Latest, 50)
                        .await
                        .expect("read");
                    black_box(got);
                }
                start.elapsed()
            })
        })
    });
    group.finish();
    ex.run(store.close()).expect("close");
}

criterion_group!(benches, bench_append, bench_read);
criterion_main!(benches);
