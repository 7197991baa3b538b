//! A runtime of its own for the pacer and the sending members.
//!
//! A paced send is due at a set time, and the latency of its message counts from that time.
//! On the workers that also read every delivery, a sender that is due waits behind
//! hundreds of ready readers when the loadgen is busy, and that wait shows up as server
//! latency. On their own thread the pacer ([`super::pacer`]) and the senders run as soon
//! as the OS schedules that thread. The readers stay on the main runtime.

use std::future::Future;
use std::thread::JoinHandle;
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A single-threaded tokio runtime on its own OS thread, stopped when dropped.
pub struct SendRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SendRuntime {
    /// Starts the thread (named `lg-senders`) and its runtime.
    pub fn start() -> std::io::Result<SendRuntime> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lg-senders".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(SendRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Spawns a task on this runtime; its handle can be awaited from any runtime.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut)
    }
}

impl Drop for SendRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn runs_tasks_on_its_own_thread_and_stops() {
        let rt = SendRuntime::start().unwrap();
        let name = rt
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("lg-senders"));
        // A timer on that runtime fires (its time driver is on).
        rt.spawn(tokio::time::sleep(std::time::Duration::from_millis(5)))
            .await
            .unwrap();
        drop(rt);
    }
}
