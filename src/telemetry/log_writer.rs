//! Where log lines go: stderr, written by a thread of its own in batches.
//!
//! A line costs its request a copy into a shared buffer, not a `write(2)`: one write per
//! access-log line was 6% of a manifest `HEAD` hit, and a writer thread woken per line (a
//! futex wake each) cost as much again. An idle writer is woken by the first line and
//! writes it at once (a lone line is not held back); after each write it lets lines
//! gather for [`GATHER`] without being woken, then writes them in one go. Under load it
//! writes at most 1/GATHER times a second whatever the request rate, and a line waits at
//! most about GATHER.
//!
//! Nothing is dropped: past [`MAX_BUFFERED`] bytes a logging thread waits for the writer
//! (stderr blocked on a full pipe slows requests as it did before, but never loses lines).
//! The [`Guard`] writes out what is buffered when it is dropped.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long the writer lets lines gather after a write before the next.
const GATHER: Duration = Duration::from_millis(2);
/// Past this many buffered bytes, wake the writer at once.
const FLUSH_AT: usize = 256 << 10;
/// Past this many, a logging thread waits until the writer has taken the buffer.
const MAX_BUFFERED: usize = 8 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    closing: bool,
    /// The writer is waiting for a first line (not gathering): the next line wakes it.
    idle: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for lines.
    lines: Condvar,
    /// Logging threads wait here when the buffer is full.
    taken: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The `MakeWriter` for tracing-subscriber: each event is one `write_all` of its line.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread after it has written out every buffered line.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A writer of batches to `out` on a thread named `stowage-log`.
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(LogWriter, Guard)> {
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("stowage-log".into())
        .spawn(move || run(&s, out))?;
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        Guard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    let mut wrote = false;
    loop {
        let mut st = shared.lock();
        if wrote && !st.closing && st.buf.len() < FLUSH_AT {
            // Let lines gather after a write (only a full buffer wakes this early).
            st = shared
                .lines
                .wait_timeout(st, GATHER)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        while st.buf.is_empty() && !st.closing {
            st.idle = true;
            st = shared.lines.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.idle = false;
        let closing = st.closing;
        std::mem::swap(&mut st.buf, &mut spare);
        drop(st);
        shared.taken.notify_all();
        // A write error (stderr closed) has nowhere to be reported: the lines are dropped.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        wrote = true;
        if closing && shared.lock().buf.is_empty() {
            return;
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut st = self.shared.lock();
        while st.buf.len() >= MAX_BUFFERED && !st.closing {
            st = self
                .shared
                .taken
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        // One wake per idle spell; a gathering writer is not woken but for a full buffer.
        let wake = std::mem::replace(&mut st.idle, false);
        st.buf.extend_from_slice(line);
        let full = st.buf.len() >= FLUSH_AT;
        drop(st);
        if wake || full {
            self.shared.lines.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.lines.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `out` the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_the_guard_writes_out_the_rest() {
        let sink = Sink::default();
        let (w, guard) = spawn(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        w.write_all(format!("t{t} line {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 20_000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5000).collect::<Vec<_>>(), "thread {t}'s lines");
        }
    }

    #[test]
    fn a_line_is_written_soon_without_more_lines_or_a_flush() {
        let sink = Sink::default();
        let (mut w, _guard) = spawn(sink.clone()).unwrap();
        w.write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never came out"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"alone\n");
    }
}
