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

/// Background tasks that outlive the request that started them. Once drained, it takes no more:
/// a task spawned after shutdown began is dropped unstarted.
#[derive(Default)]
pub struct Tasks(Mutex<(JoinSet<()>, bool)>);

impl Tasks {
    /// Runs `task` in the background, held here until it ends or the proxy shuts down.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut guard) = self.0.lock() {
            let (set, closed) = &mut *guard;
            if *closed {
                return;
            }
            // Reap what ended, so the set holds only live tasks.
            while set.try_join_next().is_some() {}
            set.spawn(task);
        }
    }

    /// Waits up to `deadline` for every task to end, then ends the rest.
    pub async fn drain(&self, deadline: Duration) {
        let mut set = match self.0.lock() {
            Ok(mut g) => {
                g.1 = true;
                std::mem::take(&mut g.0)
            }
            Err(_) => return,
        };
        let _ = tokio::time::timeout(deadline, async { while set.join_next().await.is_some() {} }).await;
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
}
