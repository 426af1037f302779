//! Coalesced fills: one upstream download per digest, any number of readers.
//!
//! The first request for a missing digest becomes the `Leader`: it owns the `BlobWriter`
//! and publishes progress on a watch channel. Later requests for the same digest are
//! followers: they read the growing temp file with positioned reads and wake on progress,
//! so each gets bytes as soon as they are on disk. No reader ever delivers the last byte of
//! a blob before the digest is verified, so a corrupt fill can never look complete to a
//! client. A leader dropped before it finishes marks the fill failed and removes it.
//!
//! When the disk gives out part-way (full, or failing), the fill does not fail its readers:
//! the temp file is dropped from the cache (readers keep it open for the bytes already in
//! it), and the rest of the same upstream body reaches them through the fill's relay, a
//! bounded window in memory that the leader fills no faster than the slowest reader
//! empties it (a reader that stops reading for the idle timeout is cut off). The last
//! frame is still held back until the digest verifies; nothing of such a fill is stored.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::{watch, Notify};

use crate::cache::{BlobStore, BlobWriter, StoreError};
use crate::http_util::BoxError;
use crate::oci::Digest;

/// Bytes read from disk per body frame.
const CHUNK: usize = 256 * 1024;
/// Most bytes of already-received upstream frames written in one go: h2 delivers 16 KiB
/// frames, and one blocking section and one reader wake-up per frame cost more than the
/// write itself.
const WRITE_BATCH: usize = 1 << 20;
/// Most relayed bytes held in memory for readers of a fill the disk could not take (one
/// upstream batch may come on top).
const RELAY_WINDOW: usize = 4 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillState {
    /// Upstream response headers not in yet.
    Waiting,
    Streaming {
        written: u64,
        total: Option<u64>,
    },
    /// Every byte written and the digest verified; being made durable and moved into place.
    /// Readers may deliver the final byte from here on: it no longer waits for the fsync.
    Verified {
        len: u64,
    },
    Complete {
        len: u64,
    },
    /// The cache could not take more after `on_disk` bytes: those stay readable in the
    /// (unlinked) file, the rest comes through the relay. `relayed` counts bytes relayed
    /// so far; each change wakes the readers.
    Relaying {
        on_disk: u64,
        relayed: u64,
        total: Option<u64>,
    },
    /// A relayed fill verified and sent whole: `len` bytes, none of them stored.
    Relayed {
        on_disk: u64,
        len: u64,
    },
    /// `streaming` tells whether any bytes were published before the failure.
    Failed {
        streaming: bool,
        reason: String,
    },
}

pub struct Fill {
    file: Arc<File>,
    state: watch::Sender<FillState>,
    relay: Mutex<Relay>,
    /// Woken when a reader moves on (or leaves), for a leader waiting on a full window.
    drained: Notify,
    started: std::time::Instant,
    /// What the fill is for (registry label, repository), for the status page.
    origin: std::sync::OnceLock<(String, String)>,
}

/// A fill in flight as the status page shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FillView {
    pub digest: String,
    pub registry: String,
    pub repository: String,
    /// Bytes received from upstream so far (on disk and relayed).
    pub bytes_done: u64,
    /// The announced length, when upstream announced one.
    pub total: Option<u64>,
    pub elapsed_seconds: f64,
    /// bytes_done / elapsed_seconds.
    pub bytes_per_second: f64,
    /// Clients reading this fill now.
    pub readers: usize,
}

/// Bytes past `on_disk` of a fill the disk could not take, and where each reader is.
#[derive(Default)]
struct Relay {
    /// Relayed frames (offset, bytes) some reader has yet to take, in order.
    frames: VecDeque<(u64, Bytes)>,
    buffered: usize,
    /// Reader id → the offset of its next byte. A reader missing here was cut off.
    readers: HashMap<u64, u64>,
    next_id: u64,
}

impl Relay {
    /// Drops frames every reader is past.
    fn trim(&mut self) {
        let min = self.readers.values().copied().min().unwrap_or(u64::MAX);
        while let Some((off, b)) = self.frames.front() {
            if off + b.len() as u64 > min {
                break;
            }
            self.buffered -= b.len();
            self.frames.pop_front();
        }
    }
}

/// A reader's place in a fill's relay; leaving it (drop) lets the relay forget the reader.
struct Seat {
    fill: Arc<Fill>,
    id: u64,
}

/// What a reader found in the relay at its offset.
enum Take {
    Frame(Bytes),
    NotYet,
    /// Cut off for not reading, or its bytes are gone.
    Lost,
}

impl Seat {
    fn new(fill: Arc<Fill>, start: u64) -> Seat {
        let id = {
            let mut r = fill.relay.lock().expect("relay lock");
            let id = r.next_id;
            r.next_id += 1;
            r.readers.insert(id, start);
            id
        };
        Seat { fill, id }
    }

    /// Records progress (only while relaying: before that nobody is waiting on it).
    fn moved_to(&self, pos: u64) {
        if let Some(p) = self
            .fill
            .relay
            .lock()
            .expect("relay lock")
            .readers
            .get_mut(&self.id)
        {
            *p = pos;
        }
        self.fill.drained.notify_one();
    }

    fn take(&self, pos: u64) -> Take {
        let mut r = self.fill.relay.lock().expect("relay lock");
        if !r.readers.contains_key(&self.id) {
            return Take::Lost;
        }
        let first = r.frames.front().map(|(off, _)| *off);
        if first.is_some_and(|off| off > pos) {
            return Take::Lost;
        }
        let found = r
            .frames
            .iter()
            .find(|(off, b)| *off <= pos && pos < off + b.len() as u64)
            .map(|(off, b)| b.slice((pos - off) as usize..));
        match found {
            Some(b) => {
                r.readers.insert(self.id, pos + b.len() as u64);
                r.trim();
                drop(r);
                self.fill.drained.notify_one();
                Take::Frame(b)
            }
            None => Take::NotYet,
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut r = self.fill.relay.lock().expect("relay lock");
        r.readers.remove(&self.id);
        r.trim();
        drop(r);
        self.fill.drained.notify_one();
    }
}

impl Fill {
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }
}

#[derive(Default)]
pub struct Fills {
    inflight: Mutex<HashMap<Digest, Arc<Fill>>>,
}

/// Returned once per miss and matched at once: boxing the leader would cost an allocation
/// per fill for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Join {
    /// The content is already stored.
    Stored,
    Leader(Leader),
    Follower(Arc<Fill>),
}

impl Fills {
    pub fn join(
        self: &Arc<Self>,
        store: &Arc<BlobStore>,
        digest: &Digest,
    ) -> Result<Join, StoreError> {
        let mut map = self.inflight.lock().expect("fills lock");
        if let Some(fill) = map.get(digest) {
            return Ok(Join::Follower(fill.clone()));
        }
        // A fill may have finished between the caller's store lookup and this lock.
        if store.contains(digest) {
            return Ok(Join::Stored);
        }
        let writer = store.writer(digest)?;
        let (tx, _) = watch::channel(FillState::Waiting);
        let fill = Arc::new(Fill {
            file: writer.file(),
            state: tx,
            relay: Mutex::new(Relay::default()),
            drained: Notify::new(),
            started: std::time::Instant::now(),
            origin: std::sync::OnceLock::new(),
        });
        map.insert(digest.clone(), fill.clone());
        Ok(Join::Leader(Leader {
            fills: self.clone(),
            digest: digest.clone(),
            fill,
            writer: Some(writer),
            on_verified: None,
        }))
    }

    pub fn is_filling(&self, digest: &Digest) -> bool {
        self.inflight
            .lock()
            .expect("fills lock")
            .contains_key(digest)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.lock().expect("fills lock").len()
    }

    /// Every fill in flight now, longest running first (at most `max`).
    pub fn snapshot(&self, max: usize) -> Vec<FillView> {
        let fills: Vec<(Digest, Arc<Fill>)> = {
            let map = self.inflight.lock().expect("fills lock");
            map.iter().map(|(d, f)| (d.clone(), f.clone())).collect()
        };
        let mut out: Vec<FillView> = fills
            .into_iter()
            .map(|(digest, f)| {
                let (done, total) = match &*f.state.borrow() {
                    FillState::Waiting => (0, None),
                    FillState::Streaming { written, total } => (*written, *total),
                    FillState::Verified { len } | FillState::Complete { len } => (*len, Some(*len)),
                    FillState::Relaying {
                        on_disk,
                        relayed,
                        total,
                    } => (on_disk + relayed, *total),
                    FillState::Relayed { len, .. } => (*len, Some(*len)),
                    FillState::Failed { .. } => (0, None),
                };
                let elapsed = f.started.elapsed().as_secs_f64();
                let (registry, repository) = f.origin.get().cloned().unwrap_or_default();
                FillView {
                    digest: digest.to_string(),
                    registry,
                    repository,
                    bytes_done: done,
                    total,
                    elapsed_seconds: elapsed,
                    bytes_per_second: if elapsed > 0.0 {
                        done as f64 / elapsed
                    } else {
                        0.0
                    },
                    readers: f.relay.lock().expect("relay lock").readers.len(),
                }
            })
            .collect();
        out.sort_by(|a, b| b.elapsed_seconds.total_cmp(&a.elapsed_seconds));
        out.truncate(max);
        out
    }
}

pub struct Leader {
    fills: Arc<Fills>,
    digest: Digest,
    fill: Arc<Fill>,
    writer: Option<BlobWriter>,
    /// Runs once the content has verified, before it becomes visible in the store.
    on_verified: Option<Box<dyn FnOnce() + Send + Sync>>,
}

/// Why a fill did not produce stored content.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("upstream sent {got} bytes, announced {announced}")]
    Truncated { got: u64, announced: u64 },
    #[error("upstream sent more than the announced {announced} bytes")]
    TooLong { announced: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Upstream(String),
    /// The cache could not take the content (`cause`); its readers got all `len` bytes,
    /// verified, from upstream instead. Nothing was stored.
    #[error("not stored ({cause}); {len} bytes relayed from upstream")]
    Relayed { len: u64, cause: StoreError },
    #[error("the cache could not take the content ({0}) and no reader is left")]
    NoReaders(String),
}

impl FillError {
    pub fn is_mismatch(&self) -> bool {
        matches!(self, FillError::Store(StoreError::Mismatch { .. }))
    }
}

impl Leader {
    /// `f` runs once the content has verified and before it becomes visible in the store,
    /// so whatever it records (a grant) is in place when the first reader finds the blob
    /// stored. It does not run for a fill that fails or is relayed uncached.
    pub fn on_verified(&mut self, f: impl FnOnce() + Send + Sync + 'static) {
        self.on_verified = Some(Box::new(f));
    }

    pub fn fill(&self) -> Arc<Fill> {
        self.fill.clone()
    }

    /// Names what the fill is for (registry label, repository) on the status page.
    pub fn set_origin(&self, registry: String, repository: String) {
        let _ = self.fill.origin.set((registry, repository));
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Fails the fill before any byte was published (upstream refused, unreachable, ...).
    pub fn abandon(mut self, reason: &str) {
        self.fail(false, reason);
    }

    fn fail(&mut self, streaming: bool, reason: &str) {
        // Drop the writer (removing the temp file), and leave the map before the readers
        // hear of it: whoever saw the failure and asks again starts afresh, and the
        // in-flight count is already right.
        self.writer = None;
        self.remove();
        self.fill.state.send_replace(FillState::Failed {
            streaming,
            reason: reason.to_owned(),
        });
    }

    fn remove(&self) {
        let mut map = self.fills.inflight.lock().expect("fills lock");
        if map
            .get(&self.digest)
            .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
        {
            map.remove(&self.digest);
        }
    }

    /// Streams `body` into the store, publishing progress, then verifies and publishes the
    /// outcome. Runs to completion even when every client has gone, so the cache still fills.
    ///
    /// When the cache cannot take more (`on_store_error` hears why, once), the readers get
    /// the rest through the relay and the result is `FillError::Relayed`.
    pub async fn run<B>(
        mut self,
        mut body: B,
        total: Option<u64>,
        idle: Duration,
        on_store_error: impl FnOnce(&StoreError),
    ) -> Result<u64, FillError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        self.fill
            .state
            .send_replace(FillState::Streaming { written: 0, total });
        // Set once the content is known to match its digest: from then on, a failure to
        // store it must not cost the readers their (correct) bytes.
        let mut verified = None;
        let result = async {
            loop {
                let frame = match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        return Err(FillError::Upstream(format!(
                            "upstream body stalled for {idle:?}"
                        )))
                    }
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        return Err(FillError::Upstream(format!("upstream body: {e}")))
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                // Frames already received go to disk together (see WRITE_BATCH); this never
                // waits for more, so readers see bytes as soon as they arrive.
                let mut batch = vec![data];
                let mut batched = batch[0].len();
                let mut ended = false;
                while batched < WRITE_BATCH {
                    match body.frame().now_or_never() {
                        Some(Some(Ok(frame))) => {
                            if let Ok(data) = frame.into_data() {
                                batched += data.len();
                                batch.push(data);
                            }
                        }
                        Some(Some(Err(e))) => {
                            return Err(FillError::Upstream(format!("upstream body: {e}")))
                        }
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                let writer = self.writer.as_mut().expect("writer present until finish");
                if let Some(t) = total {
                    if writer.written() + batched as u64 > t {
                        return Err(FillError::TooLong { announced: t });
                    }
                }
                let failed = blocking(|| {
                    for (i, data) in batch.iter().enumerate() {
                        if let Err(e) = writer.write(data) {
                            return Some((i, e));
                        }
                    }
                    None
                });
                if let Some((i, cause)) = failed {
                    return Ok(Step::DiskGaveOut {
                        cause,
                        rest: batch.split_off(i),
                        ended,
                    });
                }
                let written = writer.written();
                self.fill
                    .state
                    .send_modify(|s| *s = FillState::Streaming { written, total });
                if ended {
                    break;
                }
            }
            let writer = self.writer.take().expect("writer present until finish");
            let written = writer.written();
            if let Some(t) = total {
                if written != t {
                    return Err(FillError::Truncated {
                        got: written,
                        announced: t,
                    });
                }
            }
            blocking(|| writer.verify())?;
            verified = Some(written);
            if let Some(f) = self.on_verified.take() {
                f();
            }
            // The readers' last byte goes out now; the fsyncs below only matter to the cache.
            self.fill
                .state
                .send_replace(FillState::Verified { len: written });
            let dir = blocking(|| writer.publish())?;
            Ok(Step::Stored(written, dir))
        }
        .await;
        match (result, verified) {
            (Ok(Step::DiskGaveOut { cause, rest, ended }), _) => {
                on_store_error(&cause);
                self.relay(&mut body, cause, rest, ended, total, idle).await
            }
            (Ok(Step::Stored(len, dir)), _) => {
                self.fill.state.send_replace(FillState::Complete { len });
                self.remove();
                // Only after the fill is out of the map, so "stored" is seen as soon as the
                // file is in place; a crash before this fsync costs a refetch, nothing else.
                if let Err(e) = blocking(|| crate::cache::writer::sync_dir(&dir)) {
                    tracing::warn!(error = %e, "could not make the cache directory durable");
                }
                Ok(len)
            }
            // Verified but not stored (fsync or rename failed): readers hold the file open
            // and get the whole blob; only the cache misses out.
            (Err(e), Some(len)) => {
                self.writer = None;
                self.fill.state.send_replace(FillState::Complete { len });
                self.remove();
                Err(e)
            }
            (Err(e), None) => {
                self.fail(true, &e.to_string());
                Err(e)
            }
        }
    }
}

/// How the streaming part of a fill ended.
enum Step {
    /// Verified and in place (the directory still to be fsynced).
    Stored(u64, std::path::PathBuf),
    /// A write failed with `cause`; `rest` was received but is not on disk.
    DiskGaveOut {
        cause: StoreError,
        rest: Vec<Bytes>,
        ended: bool,
    },
}

impl Leader {
    /// The rest of `body` to the readers through the relay, after the disk failed with
    /// `cause`: hashed as it passes, the last frame sent only once the digest matches.
    async fn relay<B>(
        &mut self,
        body: &mut B,
        cause: StoreError,
        pending: Vec<Bytes>,
        mut ended: bool,
        total: Option<u64>,
        idle: Duration,
    ) -> Result<u64, FillError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let writer = self.writer.take().expect("writer present until finish");
        let on_disk = writer.written();
        // The temp file leaves the cache now; readers keep it open for its first bytes.
        let mut hasher = writer.abandon();
        // Whoever asks from now on could not have the bytes relayed so far: they go
        // upstream themselves (caching is paused).
        self.remove();
        self.fill.state.send_replace(FillState::Relaying {
            on_disk,
            relayed: 0,
            total,
        });
        let mut pending: VecDeque<Bytes> = pending.into();
        let result = async {
            let mut pos = on_disk;
            let mut held: Option<(u64, Bytes)> = None;
            loop {
                while let Some(data) = pending.pop_front() {
                    if data.is_empty() {
                        continue;
                    }
                    if let Some(t) = total {
                        if pos + data.len() as u64 > t {
                            return Err(FillError::TooLong { announced: t });
                        }
                    }
                    hasher.update(&data);
                    let off = pos;
                    pos += data.len() as u64;
                    if let Some(frame) = held.replace((off, data)) {
                        self.push_relayed(frame, idle).await?;
                    }
                }
                if ended {
                    break;
                }
                match tokio::time::timeout(idle, body.frame()).await {
                    Err(_) => {
                        return Err(FillError::Upstream(format!(
                            "upstream body stalled for {idle:?}"
                        )))
                    }
                    Ok(None) => ended = true,
                    Ok(Some(Err(e))) => {
                        return Err(FillError::Upstream(format!("upstream body: {e}")))
                    }
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            pending.push_back(data);
                        }
                    }
                }
            }
            if let Some(t) = total {
                if pos != t {
                    return Err(FillError::Truncated {
                        got: pos,
                        announced: t,
                    });
                }
            }
            let actual = Digest::from_bytes(self.digest.algorithm(), hasher.finish().as_ref());
            if actual != self.digest {
                return Err(FillError::Store(StoreError::Mismatch {
                    expected: self.digest.clone(),
                    actual,
                }));
            }
            if let Some(frame) = held.take() {
                self.push_relayed(frame, idle).await?;
            }
            Ok(pos)
        }
        .await;
        match result {
            Ok(len) => {
                self.fill
                    .state
                    .send_replace(FillState::Relayed { on_disk, len });
                Err(FillError::Relayed { len, cause })
            }
            Err(FillError::NoReaders(_)) => {
                let e = FillError::NoReaders(cause.to_string());
                self.fail(true, &e.to_string());
                Err(e)
            }
            Err(e) => {
                self.fail(true, &e.to_string());
                Err(e)
            }
        }
    }

    /// Hands one frame to the relay once the window has room: the leader goes no faster
    /// than its slowest reader, and a reader that takes nothing for `idle` is cut off.
    async fn push_relayed(
        &self,
        (off, data): (u64, Bytes),
        idle: Duration,
    ) -> Result<(), FillError> {
        loop {
            let drained = self.fill.drained.notified();
            let before = {
                let mut r = self.fill.relay.lock().expect("relay lock");
                r.trim();
                if r.readers.is_empty() {
                    return Err(FillError::NoReaders(String::new()));
                }
                if r.buffered < RELAY_WINDOW {
                    break;
                }
                r.readers.clone()
            };
            if tokio::time::timeout(idle, drained).await.is_err() {
                // Cut off whoever has not moved though bytes were there for it; a reader
                // that took everything there is is waiting on us, not stalled.
                let mut r = self.fill.relay.lock().expect("relay lock");
                let end = r.frames.back().map(|(o, b)| o + b.len() as u64);
                let cut = r.readers.len();
                r.readers.retain(|id, pos| {
                    before.get(id) != Some(pos) || end.is_none_or(|end| *pos >= end)
                });
                tracing::debug!(
                    readers = cut - r.readers.len(),
                    "cutting off readers that took nothing from the relay for {idle:?}"
                );
                r.trim();
            }
        }
        let len = data.len() as u64;
        {
            let mut r = self.fill.relay.lock().expect("relay lock");
            r.buffered += data.len();
            r.frames.push_back((off, data));
        }
        self.fill.state.send_modify(|s| {
            if let FillState::Relaying { relayed, .. } = s {
                *relayed += len;
            }
        });
        Ok(())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        let terminal = matches!(
            *self.fill.state.borrow(),
            FillState::Complete { .. } | FillState::Relayed { .. } | FillState::Failed { .. }
        );
        if !terminal {
            let streaming = !matches!(*self.fill.state.borrow(), FillState::Waiting);
            self.fail(streaming, "fill abandoned");
        }
    }
}

/// Runs short blocking file work without stalling other tasks on this worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Reads `min(max, CHUNK)` bytes at `pos` into a fresh buffer. The buffer is not zeroed
/// first (that cost 3% of a warm GET): `pread` writes into the spare capacity through a raw
/// pointer and the length only ever covers bytes the kernel wrote.
fn read_chunk(file: &File, pos: u64, max: u64) -> std::io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let n = max.min(CHUNK as u64) as usize;
    let mut buf = BytesMut::with_capacity(n);
    while buf.len() < n {
        let filled = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = (n - filled).min(spare.len());
        let offset = libc::off_t::try_from(pos + filled as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `spare` is writable memory of at least `want` bytes owned by `buf`; the
        // kernel writes at most `want` bytes into it and reports how many.
        let r = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, offset) };
        match r {
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "cached file shorter than expected",
                ))
            }
            r if r < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: the kernel initialised exactly `r` (<= `want`) bytes after `filled`.
            r => unsafe { buf.set_len(filled + r as usize) },
        }
    }
    Ok(buf.freeze())
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

/// The bytes `start..end` of a complete, verified file.
pub fn file_stream(
    file: Arc<File>,
    start: u64,
    end: u64,
) -> impl Stream<Item = FrameResult> + Send {
    futures_util::stream::try_unfold(start, move |pos| {
        let file = file.clone();
        async move {
            if pos >= end {
                return Ok(None);
            }
            let chunk = read_chunk(&file, pos, end - pos)?;
            let next = pos + chunk.len() as u64;
            Ok::<_, BoxError>(Some((Frame::data(chunk), next)))
        }
    })
}

/// The bytes of a fill from `start`, following it as it grows. The final byte is held back
/// until the fill is verified; a failed fill ends the stream with an error.
pub fn fill_stream(fill: Arc<Fill>, start: u64) -> impl Stream<Item = FrameResult> + Send {
    let rx = fill.subscribe();
    // Taken now, not on first poll: a relay that starts before this reader reads must keep
    // its bytes. The seat carries the Fill itself: it owns the watch sender and the file.
    let seat = Seat::new(fill, start);
    futures_util::stream::try_unfold((rx, start, seat), move |(mut rx, pos, seat)| async move {
        let file = seat.fill.file();
        loop {
            let state = rx.borrow_and_update().clone();
            let limit =
                match state {
                    FillState::Waiting => None,
                    FillState::Streaming { written, total } => Some(match total {
                        Some(t) => written.min(t.saturating_sub(1)),
                        None => written.saturating_sub(1),
                    }),
                    FillState::Verified { len } | FillState::Complete { len } => {
                        if pos >= len {
                            return Ok(None);
                        }
                        Some(len)
                    }
                    FillState::Failed { reason, .. } => {
                        return Err(BoxError::from(format!("fill failed: {reason}")))
                    }
                    FillState::Relaying { on_disk, .. } | FillState::Relayed { on_disk, .. } => {
                        if pos < on_disk {
                            let chunk = read_chunk(&file, pos, on_disk - pos)?;
                            let next = pos + chunk.len() as u64;
                            seat.moved_to(next);
                            return Ok(Some((Frame::data(chunk), (rx, next, seat))));
                        }
                        match seat.take(pos) {
                            Take::Frame(b) => {
                                let next = pos + b.len() as u64;
                                return Ok(Some((Frame::data(b), (rx, next, seat))));
                            }
                            Take::Lost => return Err(BoxError::from(
                                "fell behind the upstream relay of a fill the cache could not take",
                            )),
                            Take::NotYet => {}
                        }
                        if let FillState::Relayed { len, .. } = state {
                            if pos >= len {
                                return Ok(None);
                            }
                        }
                        None
                    }
                };
            if let Some(limit) = limit {
                if pos < limit {
                    let chunk = read_chunk(&file, pos, limit - pos)?;
                    let next = pos + chunk.len() as u64;
                    return Ok(Some((Frame::data(chunk), (rx, next, seat))));
                }
            }
            if rx.changed().await.is_err() {
                // Unreachable while the seat holds the fill (it owns the sender); stay safe.
                return Err(BoxError::from("fill ended without a result"));
            }
        }
    })
}

/// A body relayed from upstream without a fill, verified on the way: hashed as it passes,
/// its last frame held back until the end of the stream shows the digest matches. On a
/// mismatch the body ends in an error, so the client never sees it complete.
pub struct Verified<B> {
    inner: B,
    expected: Digest,
    hasher: Option<aws_lc_rs::digest::Context>,
    held: Option<Bytes>,
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
}

impl<B> Verified<B> {
    pub fn new(
        inner: B,
        expected: Digest,
        metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
    ) -> Verified<B> {
        let alg = match expected.algorithm() {
            crate::oci::Algorithm::Sha256 => &aws_lc_rs::digest::SHA256,
            crate::oci::Algorithm::Sha512 => &aws_lc_rs::digest::SHA512,
        };
        Verified {
            inner,
            expected,
            hasher: Some(aws_lc_rs::digest::Context::new(alg)),
            held: None,
            metrics,
        }
    }
}

impl<B> http_body::Body for Verified<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            let Some(hasher) = this.hasher.as_mut() else {
                // Verified: the held frame goes out, then the end.
                return Poll::Ready(this.held.take().map(|b| Ok(Frame::data(b))));
            };
            match std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    hasher.update(&data);
                    if let Some(previous) = this.held.replace(data) {
                        return Poll::Ready(Some(Ok(Frame::data(previous))));
                    }
                }
                Some(Err(e)) => {
                    this.held = None;
                    this.hasher = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let hasher = this.hasher.take().expect("checked above");
                    let actual =
                        Digest::from_bytes(this.expected.algorithm(), hasher.finish().as_ref());
                    if actual != this.expected {
                        this.held = None;
                        if let Some(m) = &this.metrics {
                            m.digest_mismatches.inc();
                        }
                        tracing::error!(expected = %this.expected, %actual, "digest mismatch on a pass-through: response cut short");
                        return Poll::Ready(Some(Err(BoxError::from(format!(
                            "upstream content does not match {}",
                            this.expected
                        )))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.hasher.is_none() && self.held.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use futures_util::StreamExt;
    use http_body_util::StreamBody;

    fn sha256(b: &[u8]) -> Digest {
        Digest::from_bytes(
            Algorithm::Sha256,
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref(),
        )
    }

    async fn collect(s: impl Stream<Item = FrameResult>) -> Result<Vec<u8>, BoxError> {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(s);
        while let Some(f) = s.next().await {
            out.extend_from_slice(&f?.into_data().unwrap());
        }
        Ok(out)
    }

    fn chunked(
        data: &[u8],
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, String>>,
        impl http_body::Body<Data = Bytes, Error = String> + Unpin,
    ) {
        let _ = data;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = StreamBody::new(tokio_stream_from(rx));
        (tx, body)
    }

    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn followers_get_bytes_as_they_arrive_and_the_fill_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let data: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i * 7 % 251) as u8).collect();
        let d = sha256(&data);
        let Join::Leader(leader) = fills.join(&store, &d).unwrap() else {
            panic!()
        };
        let Join::Follower(f) = fills.join(&store, &d).unwrap() else {
            panic!()
        };
        let (tx, body) = chunked(&data);
        let reader = tokio::spawn(collect(fill_stream(f.clone(), 0)));
        let run = tokio::spawn(leader.run(
            body,
            Some(data.len() as u64),
            Duration::from_secs(5),
            |_| {},
        ));
        // The follower has seen a first piece before the upstream finished sending.
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(&data[..1000]))))
            .await
            .unwrap();
        let mut rx = f.subscribe();
        rx.wait_for(|s| matches!(s, FillState::Streaming { written: 1000, .. }))
            .await
            .unwrap();
        for c in data[1000..].chunks(50_000) {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(c))))
                .await
                .unwrap();
        }
        drop(tx);
        assert_eq!(run.await.unwrap().unwrap(), data.len() as u64);
        assert_eq!(reader.await.unwrap().unwrap(), data);
        assert!(store.contains(&d));
        assert_eq!(fills.in_flight(), 0);
        assert!(matches!(fills.join(&store, &d).unwrap(), Join::Stored));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_fill_never_delivers_the_last_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let good = vec![1u8; 5000];
        let bad = vec![2u8; 5000];
        let d = sha256(&good);
        let Join::Leader(leader) = fills.join(&store, &d).unwrap() else {
            panic!()
        };
        let f = leader.fill();
        let (tx, body) = chunked(&bad);
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut s = std::pin::pin!(fill_stream(f, 0));
            while let Some(frame) = s.next().await {
                match frame {
                    Ok(fr) => got += fr.into_data().unwrap().len(),
                    Err(_) => return (got, true),
                }
            }
            (got, false)
        });
        let run = tokio::spawn(leader.run(body, Some(5000), Duration::from_secs(5), |_| {}));
        tx.send(Ok(Frame::data(Bytes::from(bad)))).await.unwrap();
        drop(tx);
        let err = run.await.unwrap().unwrap_err();
        assert!(err.is_mismatch(), "{err}");
        let (got, errored) = reader.await.unwrap();
        assert!(errored);
        assert!(got < 5000, "delivered {got}");
        assert!(!store.contains(&d));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn truncated_and_abandoned_fills_fail_their_followers() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let d = sha256(b"abc");
        let Join::Leader(leader) = fills.join(&store, &d).unwrap() else {
            panic!()
        };
        let f = leader.fill();
        let (tx, body) = chunked(b"");
        let run = tokio::spawn(leader.run(body, Some(3), Duration::from_secs(5), |_| {}));
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
            .await
            .unwrap();
        drop(tx);
        assert!(matches!(
            run.await.unwrap(),
            Err(FillError::Truncated {
                got: 2,
                announced: 3
            })
        ));
        assert!(collect(fill_stream(f, 0)).await.is_err());

        let Join::Leader(leader) = fills.join(&store, &d).unwrap() else {
            panic!()
        };
        let f = leader.fill();
        drop(leader);
        assert!(matches!(
            *f.subscribe().borrow(),
            FillState::Failed {
                streaming: false,
                ..
            }
        ));
        assert_eq!(fills.in_flight(), 0);
    }

    /// A leader whose disk is full from the first byte (its writes go to `/dev/full`; the
    /// readers' file stays the empty temp file), or `None` where there is no `/dev/full`.
    fn leader_on_a_full_disk(
        fills: &Arc<Fills>,
        store: &Arc<BlobStore>,
        d: &Digest,
    ) -> Option<Leader> {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .ok()?;
        let Join::Leader(mut leader) = fills.join(store, d).unwrap() else {
            panic!()
        };
        leader.writer.as_mut().unwrap().file = Arc::new(full);
        Some(leader)
    }

    /// Reads a fill stream to its end: the bytes, and whether it ended in an error.
    async fn drain(s: impl Stream<Item = FrameResult>) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut s = std::pin::pin!(s);
        while let Some(f) = s.next().await {
            match f {
                Ok(f) => out.extend_from_slice(&f.into_data().unwrap()),
                Err(_) => return (out, true),
            }
        }
        (out, false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_disk_relays_the_rest_to_every_reader_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let data: Vec<u8> = (0..6_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let d = sha256(&data);
        let Some(leader) = leader_on_a_full_disk(&fills, &store, &d) else {
            eprintln!("SKIPPED: no /dev/full");
            return;
        };
        let (a, b) = (leader.fill(), leader.fill());
        let readers = [
            tokio::spawn(drain(fill_stream(a, 0))),
            tokio::spawn(drain(fill_stream(b, 0))),
        ];
        let (tx, body) = chunked(&data);
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = heard.clone();
        let run = tokio::spawn(leader.run(body, None, Duration::from_secs(5), move |e| {
            assert!(e.is_disk_full(), "{e}");
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        for c in data.chunks(100_000) {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(c))))
                .await
                .unwrap();
        }
        drop(tx);
        match run.await.unwrap() {
            Err(FillError::Relayed { len, cause }) => {
                assert_eq!(len, data.len() as u64);
                assert!(cause.is_disk_full());
            }
            other => panic!("{other:?}"),
        }
        for r in readers {
            let (got, errored) = r.await.unwrap();
            assert!(!errored);
            assert!(
                got == data,
                "a reader got {} of {} bytes",
                got.len(),
                data.len()
            );
        }
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(!store.contains(&d));
        assert_eq!(fills.in_flight(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relayed_fill_with_wrong_bytes_never_delivers_its_last_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        let good = vec![7u8; 300_000];
        let mut bad = good.clone();
        bad[299_000] = 8;
        let d = sha256(&good);
        let Some(leader) = leader_on_a_full_disk(&fills, &store, &d) else {
            return;
        };
        let reader = tokio::spawn(drain(fill_stream(leader.fill(), 0)));
        let (tx, body) = chunked(&bad);
        let run = tokio::spawn(leader.run(body, Some(300_000), Duration::from_secs(5), |_| {}));
        for c in bad.chunks(50_000) {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(c))))
                .await
                .unwrap();
        }
        drop(tx);
        assert!(run.await.unwrap().unwrap_err().is_mismatch());
        let (got, errored) = reader.await.unwrap();
        assert!(errored && got.len() < 300_000, "delivered {}", got.len());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_stops_is_cut_off_and_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let fills = Arc::new(Fills::default());
        // More than the relay window, so a reader that takes nothing fills it.
        let data: Vec<u8> = (0..(RELAY_WINDOW * 3) as u32)
            .map(|i| (i % 241) as u8)
            .collect();
        let d = sha256(&data);
        let Some(leader) = leader_on_a_full_disk(&fills, &store, &d) else {
            return;
        };
        let reading = tokio::spawn(drain(fill_stream(leader.fill(), 0)));
        let sleeping = fill_stream(leader.fill(), 0);
        let (tx, body) = chunked(&data);
        let idle = Duration::from_millis(300);
        let run = tokio::spawn(leader.run(body, None, idle, |_| {}));
        let feed = data.clone();
        tokio::spawn(async move {
            for c in feed.chunks(256 * 1024) {
                if tx
                    .send(Ok(Frame::data(Bytes::copy_from_slice(c))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let started = std::time::Instant::now();
        let (got, errored) = tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("the reading reader was held up")
            .unwrap();
        assert!(!errored && got == data, "got {} bytes", got.len());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(run.await.unwrap(), Err(FillError::Relayed { .. })));
        let (got, errored) = drain(sleeping).await;
        assert!(
            errored && got.len() < data.len(),
            "the sleeper got {} bytes",
            got.len()
        );
    }
}
