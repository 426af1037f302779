//! Client connections are served on one single-threaded runtime per core, each connection
//! on one thread from accept to close, as nginx's workers do. Background work (fills,
//! probes, eviction, accept loops) stays on the shared multi-threaded runtime
//! ([`crate::registry_api::RegistryApi::spawn_background`]).
//!
//! Why: on the shared runtime a connection's task wakes on whichever thread polled the
//! socket, and the buffers a request allocates are freed on another, so glibc's arena locks
//! and the scheduler's wake-ups cost a futex call for every second or third request. Here a
//! manifest `HEAD` hit makes almost none (0.39–0.48 → 0.025 futex calls a request, 10–18%
//! less CPU a request, 10–23% more requests a second in the same run; bench/README.md).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The connection threads. Dropping it (or [`Workers::stop`]) ends them; what they still
/// run then gets a second to finish.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
}

/// How long a stopping worker gives the tasks it still runs.
const STOP_GRACE: Duration = Duration::from_secs(1);

impl Workers {
    /// `n` threads (`stowage-conn-0`...); with `n == 0`, connections stay on the runtime
    /// that accepted them.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let started = std::thread::Builder::new()
                .name(format!("stowage-conn-{i}"))
                .spawn(move || {
                    runtime.block_on(stopped.cancelled());
                    runtime.shutdown_timeout(STOP_GRACE);
                });
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// One thread per core the process may use.
    pub fn per_core() -> std::io::Result<Workers> {
        Workers::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Serves `stream` with `serve` on the next worker in turn, tracked by `tracker`.
    pub fn spawn<F, Fut>(&self, tracker: &TaskTracker, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() || self.stop.is_cancelled() {
            tracker.spawn(serve(stream));
            return;
        }
        let handle = &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()];
        // A socket belongs to the reactor that registered it: it moves as a plain socket
        // (still non-blocking) and is registered again by the worker.
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to a worker: closed");
                return;
            }
        };
        tracker.spawn_on(
            async move {
                match TcpStream::from_std(socket) {
                    Ok(stream) => serve(stream).await,
                    Err(e) => tracing::warn!(error = %e, "worker cannot register a connection"),
                }
            },
            handle,
        );
    }

    /// Ends the worker threads; each gives what it still runs [`STOP_GRACE`].
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_served_on_the_workers_in_turn_and_stop_with_them() {
        let workers = Workers::start(2).unwrap();
        let tracker = TaskTracker::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..4 {
            let client = tokio::spawn(TcpStream::connect(addr));
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            workers.spawn(&tracker, stream, move |mut stream| async move {
                use tokio::io::AsyncWriteExt;
                let name = std::thread::current().name().unwrap_or("").to_owned();
                // The socket works on the worker's reactor.
                stream.write_all(name.as_bytes()).await.unwrap();
                tx.send(name).unwrap();
            });
            let mut client = client.await.unwrap().unwrap();
            let mut got = String::new();
            use tokio::io::AsyncReadExt;
            client.read_to_string(&mut got).await.unwrap();
            assert!(got.starts_with("stowage-conn-"), "{got}");
        }
        let mut names: Vec<String> = (0..4).map(|_| rx.try_recv().unwrap()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "stowage-conn-0",
                "stowage-conn-0",
                "stowage-conn-1",
                "stowage-conn-1"
            ]
        );
        tracker.close();
        tracker.wait().await;

        // A task still running when the workers stop is cut after the grace.
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_client, server) = (client.unwrap(), accepted.unwrap().0);
        let tracker = TaskTracker::new();
        workers.spawn(&tracker, server, |_s| std::future::pending::<()>());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(tracker.len(), 1);
        workers.stop();
        tracker.close();
        tokio::time::timeout(STOP_GRACE * 3, tracker.wait())
            .await
            .expect("a stopped worker drops what it still runs");
    }
}
