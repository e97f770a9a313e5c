//! Graceful shutdown: a drain signal that every long-lived task watches, and a set that holds
//! the background tasks a connection leaves behind (tunnels, upstream connections) so that they
//! are waited for, then ended, at shutdown instead of leaking.

use std::{future::Future, sync::Mutex, time::Duration};

use tokio::{sync::watch, task::JoinSet};

/// Fires once, when a listener (or the whole proxy) starts draining.
pub type Signal = watch::Sender<bool>;
/// What a connection holds: it finishes the exchange in flight and closes once this fires.
pub type Watch = watch::Receiver<bool>;

/// A new drain signal and its first watcher.
pub fn channel() -> (Signal, Watch) {
    watch::channel(false)
}

/// Background tasks that outlive the request that started them.
#[derive(Default)]
pub struct Tasks(Mutex<JoinSet<()>>);

impl Tasks {
    /// Runs `task` in the background, held here until it ends or the proxy shuts down.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        match self.0.lock() {
            Ok(mut set) => {
                // Reap what ended, so the set holds only live tasks.
                while set.try_join_next().is_some() {}
                set.spawn(task);
            }
            Err(_) => {
                tokio::spawn(task);
            }
        }
    }

    /// How many are still running.
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .map(|mut s| {
                while s.try_join_next().is_some() {}
                s.len()
            })
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits up to `deadline` for every task to end, then ends the rest.
    pub async fn drain(&self, deadline: Duration) {
        let mut set = match self.0.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return,
        };
        let _ = tokio::time::timeout(deadline, async { while set.join_next().await.is_some() {} }).await;
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
}
