//! The tokio bridge: one small tokio runtime on its own OS thread, for the clients that
//! need tokio (the `scylla` driver, and the `redis` client for everything but the hot path,
//! which shards run themselves: see [`crate::cluster::shard_link`]).
//!
//! # Why it exists
//!
//! corelay's shards are glommio executors, one per core; tokio-based clients cannot run on
//! them (they need tokio's reactor and timers). Rather than give every shard a tokio
//! runtime of its own, the whole process has **one** single-threaded tokio runtime, the
//! bridge, on a thread of its own (`corelay-bridge`). A shard hands it a future with
//! [`Bridge::spawn`] and awaits the answer; the answer comes back over a
//! `futures::channel::oneshot`, whose waker wakes the glommio task from the bridge
//! thread. Nothing blocks a shard, and nothing on the shards' hot path is shared or locked:
//! handing a task over is one push onto tokio's injection queue.
//!
//! Keep this boundary one module wide: the store and cluster code only ever see
//! [`Bridge`] and [`BridgeError`], so a glommio-native client can replace the bridge later
//! without touching its callers.
//!
//! # Lifetime
//!
//! [`Bridge::global`] starts the process-wide bridge on first use and keeps it until the
//! process exits. [`Bridge::start`] starts a separate one (tests; or to stop it with
//! [`Bridge::shutdown`]). A future handed to [`Bridge::spawn`] runs to completion even if
//! the future returned by `spawn` is dropped: a write that was started is not cut in half
//! by a cancelled caller.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, ThreadId};

use futures::channel::oneshot;
use futures::FutureExt as _;

/// Why a future handed to the bridge produced no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// The bridge's runtime has stopped (or is stopping), so the future was dropped before
    /// it finished (or never ran).
    #[error("the tokio bridge has stopped")]
    Stopped,
    /// The future panicked on the bridge; the message is the panic's, when it had one.
    #[error("a task on the tokio bridge panicked: {0}")]
    Panicked(String),
    /// The bridge's thread or runtime could not be started.
    #[error("cannot start the tokio bridge: {0}")]
    Start(String),
    /// [`Bridge::block_on`] was called on the bridge's own thread, which would deadlock.
    #[error("Bridge::block_on called on the bridge thread itself")]
    OnBridgeThread,
}

/// What every clone of one bridge shares.
struct Inner {
    /// Spawns onto the runtime from any thread.
    handle: tokio::runtime::Handle,
    /// The bridge thread, to refuse `block_on` there.
    thread_id: ThreadId,
    /// Tells the bridge thread to stop; taken by the first `shutdown`.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// The bridge thread, joined by the first `shutdown`.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A handle to a tokio runtime running on its own thread: cheap to clone, `Send + Sync`.
///
/// See the module docs for why it exists and how it lives.
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("thread", &self.inner.thread_id)
            .finish()
    }
}

impl Bridge {
    /// The process-wide bridge, started on first use and kept until the process exits.
    ///
    /// Fails only if its thread cannot be started (then a later call tries again).
    pub fn global() -> Result<Bridge, BridgeError> {
        static GLOBAL: OnceLock<Bridge> = OnceLock::new();
        static STARTING: Mutex<()> = Mutex::new(());
        if let Some(b) = GLOBAL.get() {
            return Ok(b.clone());
        }
        // Serialize the first start, so two threads racing here start one runtime, not two.
        let _guard = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = GLOBAL.get() {
            return Ok(b.clone());
        }
        let bridge = Bridge::start()?;
        Ok(GLOBAL.get_or_init(|| bridge).clone())
    }

    /// Starts a new bridge: a current-thread tokio runtime (I/O and timers enabled) driven
    /// by a new OS thread named `corelay-bridge`.
    pub fn start() -> Result<Bridge, BridgeError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("corelay-bridge")
            .build()
            .map_err(|e| BridgeError::Start(e.to_string()))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("corelay-bridge".into())
            .spawn(move || {
                // Drives every spawned task until told to stop (or every handle is gone).
                let _ = runtime.block_on(stopped);
                // Dropping the runtime cancels what is left; give in-flight I/O a moment.
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .map_err(|e| BridgeError::Start(format!("cannot start its thread: {e}")))?;
        Ok(Bridge {
            inner: Arc::new(Inner {
                handle,
                thread_id: thread.thread().id(),
                stop: Mutex::new(Some(stop)),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Runs `fut` on the bridge and returns a future of its output that any executor can
    /// await (glommio included: it is woken from the bridge thread).
    ///
    /// The future is handed over at once, when `spawn` is called, and runs to completion
    /// even if the returned future is dropped. It fails with [`BridgeError::Stopped`] when
    /// the bridge stops before `fut` completes, and with [`BridgeError::Panicked`] when `fut`
    /// panics (the bridge itself keeps running).
    pub fn spawn<F, T>(&self, fut: F) -> impl Future<Output = Result<T, BridgeError>> + 'static
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        // A task spawned on a runtime that has shut down is dropped: `tx` goes with it and
        // the caller sees `Stopped`.
        drop(self.inner.handle.spawn(async move {
            let out = AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .map_err(|panic| BridgeError::Panicked(panic_message(panic.as_ref())));
            let _ = tx.send(out);
        }));
        async move { rx.await.unwrap_or(Err(BridgeError::Stopped)) }
    }

    /// Runs `fut` on the bridge and blocks the calling thread until it is done: for code
    /// that is not async (the main thread opening a store, the CLI). Never call it on a
    /// shard (it would stall the shard) nor on the bridge thread (refused with
    /// [`BridgeError::OnBridgeThread`]).
    pub fn block_on<F, T>(&self, fut: F) -> Result<T, BridgeError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        if std::thread::current().id() == self.inner.thread_id {
            return Err(BridgeError::OnBridgeThread);
        }
        futures::executor::block_on(self.spawn(fut))
    }

    /// Stops the runtime (tasks still running are dropped after at most a second) and
    /// joins its thread. Later [`Bridge::spawn`] calls fail with [`BridgeError::Stopped`].
    /// Calling it again, or from the bridge thread itself (then it does not join), is
    /// harmless. The process-wide [`Bridge::global`] is not meant to be shut down.
    pub fn shutdown(&self) {
        let stop = self
            .inner
            .stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        if std::thread::current().id() == self.inner.thread_id {
            return;
        }
        let thread = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The text of a panic payload (`&str` or `String`), or a placeholder.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn runs_on_the_bridge_thread_and_answers() {
        let bridge = Bridge::start().expect("start");
        let here = std::thread::current().id();
        let (value, there) = bridge
            .block_on(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                (42, std::thread::current().id())
            })
            .expect("run");
        assert_eq!(value, 42);
        assert_ne!(there, here);
        bridge.shutdown();
        bridge.shutdown();
        let after = futures::executor::block_on(bridge.spawn(async { 1 }));
        assert_eq!(after, Err(BridgeError::Stopped));
    }

    #[test]
    fn awaitable_from_glommio() {
        let bridge = Bridge::start().expect("start");
        let b = bridge.clone();
        let out = glommio::LocalExecutorBuilder::default()
            .io_memory(512 * 1024)
            .spawn(move || async move {
                let start = Instant::now();
                // Many in flight at once, all answered.
                let futs: Vec<_> = (0..100u64)
                    .map(|i| {
                        b.spawn(async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            i * 2
                        })
                    })
                    .collect();
                let mut sum = 0;
                for f in futs {
                    sum += f.await.expect("bridge");
                }
                (sum, start.elapsed())
            })
            .expect("executor")
            .join()
            .expect("join");
        assert_eq!(out.0, (0..100u64).map(|i| i * 2).sum::<u64>());
        assert!(
            out.1 < Duration::from_secs(2),
            "ran concurrently: {:?}",
            out.1
        );
        bridge.shutdown();
    }

    #[test]
    fn a_panic_is_an_error_and_the_bridge_goes_on() {
        let bridge = Bridge::start().expect("start");
        fn boom() {
            panic!("boom")
        }
        let err = bridge.block_on(async { boom() }).expect_err("panicked");
        assert_eq!(err, BridgeError::Panicked("boom".into()));
        assert_eq!(bridge.block_on(async { 7 }), Ok(7));
        bridge.shutdown();
    }

    #[test]
    fn global_is_one_bridge() {
        let a = Bridge::global().expect("global");
        let b = Bridge::global().expect("global");
        assert!(Arc::ptr_eq(&a.inner, &b.inner));
        assert_eq!(a.block_on(async { "ok" }), Ok("ok"));
    }
}
