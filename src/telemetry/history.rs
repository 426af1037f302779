//! The status page's memory: what happened over the last 24 hours, kept in process.
//!
//! Recorded from the same hooks as the metrics (the access-log body's end, upstream
//! failures, write errors, refusals), under one short mutex per event that nothing else
//! holds for long (a status render copies what it needs and lets go).
//!
//! Everything here is bounded, whatever clients and upstreams send:
//! - [`SLOTS`] one-minute slots of fixed size ([`Slot`]), a ring indexed by minute;
//! - per registry label (configured registries and `other`, so bounded by the config): totals
//!   since start and a 60-minute ring of upstream errors by kind;
//! - per hour of the last 24, at most [`TOP_PER_HOUR`] repositories with their bytes (the
//!   rest are summed under "other repositories");
//! - the last [`LAST_ERRORS`] errors, each reason cut to [`REASON_MAX`] bytes with URL
//!   queries, user info and bearer tokens removed.
//!
//! [`History::memory_bound`] states the bound; [`History::approx_bytes`] measures the real
//! use, and a test holds one under the other.
//!
//! Time is passed in (milliseconds since the epoch) rather than read here, so tests can
//! move it: a minute is `ms / 60_000`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;

use super::access_log::CacheStatus;
use super::metrics::UPSTREAM_ERROR_KINDS;

/// One-minute slots kept: 24 hours.
pub const SLOTS: usize = 1440;
/// Repositories tracked per hour for the top tables; beyond it, bytes are counted but not
/// attributed.
pub const TOP_PER_HOUR: usize = 100;
/// Hours of repository tables kept.
pub const HOURS: usize = 24;
/// Errors kept for the page.
pub const LAST_ERRORS: usize = 50;
/// Longest error reason (and repository name) kept, in bytes.
pub const REASON_MAX: usize = 300;
/// Longest repository name kept, in bytes (names longer than this are cut).
pub const REPO_MAX: usize = 256;
/// Upstream error kinds counted per registry: [`UPSTREAM_ERROR_KINDS`] and one for any other.
pub const ERROR_KINDS: usize = UPSTREAM_ERROR_KINDS.len() + 1;

/// What one minute saw. Fixed size: no allocation per slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// The minute (since the epoch) this slot holds; another minute's data is stale.
    #[serde(skip)]
    pub minute: u64,
    pub hit: u64,
    pub miss: u64,
    pub coalesced: u64,
    pub stale: u64,
    pub pass: u64,
    pub denied: u64,
    pub bytes_cache: u64,
    pub bytes_upstream: u64,
    pub upstream_errors: u64,
}

impl Slot {
    fn add(&mut self, o: &Slot) {
        self.hit += o.hit;
        self.miss += o.miss;
        self.coalesced += o.coalesced;
        self.stale += o.stale;
        self.pass += o.pass;
        self.denied += o.denied;
        self.bytes_cache += o.bytes_cache;
        self.bytes_upstream += o.bytes_upstream;
        self.upstream_errors += o.upstream_errors;
    }

    fn count(&mut self, outcome: CacheStatus, bytes: u64) {
        match outcome {
            CacheStatus::Hit => self.hit += 1,
            CacheStatus::Miss => self.miss += 1,
            CacheStatus::Coalesced => self.coalesced += 1,
            CacheStatus::Stale => self.stale += 1,
            CacheStatus::Pass => self.pass += 1,
            CacheStatus::Denied => self.denied += 1,
        }
        if from_cache(outcome) {
            self.bytes_cache += bytes;
        } else {
            self.bytes_upstream += bytes;
        }
    }

    /// The figures as a [`Window`] summary.
    pub fn window(&self) -> Window {
        let served = self.hit + self.coalesced + self.stale;
        let cacheable = served + self.miss;
        Window {
            hits: self.hit,
            misses: self.miss,
            coalesced: self.coalesced,
            stale: self.stale,
            passed: self.pass,
            denied: self.denied,
            hit_ratio: (cacheable > 0).then(|| served as f64 / cacheable as f64),
            bytes_saved: self.bytes_cache,
            bytes_from_upstream: self.bytes_upstream,
            upstream_errors: self.upstream_errors,
        }
    }
}

/// Whether bytes of this outcome came from the cache (as `stowage_served_bytes_total`
/// counts them).
pub fn from_cache(outcome: CacheStatus) -> bool {
    !matches!(outcome, CacheStatus::Miss | CacheStatus::Pass)
}

/// Requests and bytes over a period (`/status.json` `traffic.*`, `registries[].since_start`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Window {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub stale: u64,
    pub passed: u64,
    pub denied: u64,
    /// (hits + coalesced + stale) / (those + misses); `null` before any such request.
    pub hit_ratio: Option<f64>,
    /// Bytes sent to clients from the cache.
    pub bytes_saved: u64,
    pub bytes_from_upstream: u64,
    pub upstream_errors: u64,
}

/// Upstream errors of one registry over the last hour, one ring slot per minute.
#[derive(Clone)]
struct ErrorRing {
    minutes: [u64; 60],
    counts: [[u32; ERROR_KINDS]; 60],
}

impl ErrorRing {
    fn new() -> ErrorRing {
        ErrorRing {
            minutes: [u64::MAX; 60],
            counts: [[0; ERROR_KINDS]; 60],
        }
    }
}

#[derive(Clone, Default)]
struct RegistryState {
    since_start: Slot,
    errors: Option<Box<ErrorRing>>,
}

/// Bytes per repository in one hour.
#[derive(Default)]
struct HourTop {
    hour: u64,
    /// Hash of (registry label, repository) → its bytes. Keyed by a hash so a lookup on the
    /// hot path allocates nothing; the entry keeps the names, and a colliding pair (which
    /// only a crafted name could cause) is counted as unattributed.
    repos: HashMap<u64, RepoEntry>,
    /// Bytes of repositories past [`TOP_PER_HOUR`] (served from cache, from upstream).
    unattributed: (u64, u64),
}

struct RepoEntry {
    registry: String,
    repository: String,
    cache: u64,
    upstream: u64,
}

fn repo_key(registry: &str, repo: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same pair hashes the same in every hour.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    registry.hash(&mut h);
    repo.hash(&mut h);
    h.finish()
}

/// One entry of the error list (`/status.json` `errors[]`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorEntry {
    /// When it last happened (ms since the epoch).
    pub time_ms: u64,
    /// When the first of a run of identical errors happened.
    pub first_ms: u64,
    /// How many identical errors in a row this entry stands for.
    pub count: u64,
    /// `upstream`, `storage`, `digest` or `refusal`.
    pub kind: &'static str,
    /// The registry label (`other` for unconfigured hosts), empty when none applies.
    pub registry: String,
    pub repository: String,
    /// What went wrong, secrets removed.
    pub reason: String,
}

struct Inner {
    started_ms: u64,
    slots: Vec<Slot>,
    since_start: Slot,
    registries: BTreeMap<String, RegistryState>,
    hours: Vec<HourTop>,
    errors: VecDeque<ErrorEntry>,
}

impl Inner {
    /// Minute `m`'s slot, emptied first when it still holds the minute a day earlier.
    fn slot(&mut self, m: u64) -> &mut Slot {
        let slot = &mut self.slots[(m % SLOTS as u64) as usize];
        if slot.minute != m {
            *slot = Slot {
                minute: m,
                ..Slot::default()
            };
        }
        slot
    }
}

pub struct History {
    inner: Mutex<Inner>,
    /// Most registry labels tracked (configured ones plus `other`); more are folded into
    /// `other`, so a misconfigured caller cannot grow the map.
    max_registries: usize,
}

/// A repository's bytes over the last 24 hours (`/status.json` `top_repositories`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RepoBytes {
    pub registry: String,
    pub repository: String,
    pub bytes_served: u64,
    pub bytes_upstream: u64,
}

/// Per-registry figures (`/status.json` `registries[]`, the history's part).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RegistryFigures {
    pub registry: String,
    pub since_start: Window,
    /// Upstream errors by kind in the last 60 minutes (every kind, zeros included).
    pub upstream_errors_last_hour: BTreeMap<&'static str, u64>,
}

/// The history as `/status.json` `history` shows it: [`SLOTS`] one-minute points, oldest
/// first, the last one the current minute.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Series {
    pub slot_seconds: u64,
    /// The minute (ms since the epoch) of the first point.
    pub first_minute_ms: u64,
    pub requests_hit: Vec<u64>,
    pub requests_miss: Vec<u64>,
    pub requests_coalesced: Vec<u64>,
    pub requests_stale: Vec<u64>,
    pub requests_pass: Vec<u64>,
    pub requests_denied: Vec<u64>,
    pub bytes_cache: Vec<u64>,
    pub bytes_upstream: Vec<u64>,
    pub upstream_errors: Vec<u64>,
}

/// Everything the history holds, copied out at `now_ms`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub started_ms: u64,
    pub since_start: Window,
    pub last_hour: Window,
    pub last_24h: Window,
    pub registries: Vec<RegistryFigures>,
    pub top_by_bytes_served: Vec<RepoBytes>,
    pub top_by_upstream_bytes: Vec<RepoBytes>,
    /// Bytes of repositories past the per-hour table bound, (served, upstream).
    pub unattributed: (u64, u64),
    /// Newest first.
    pub errors: Vec<ErrorEntry>,
    pub series: Series,
}

fn minute(ms: u64) -> u64 {
    ms / 60_000
}

fn error_kind_index(kind: &str) -> usize {
    UPSTREAM_ERROR_KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(UPSTREAM_ERROR_KINDS.len())
}

/// The name of error kind `i` ([`UPSTREAM_ERROR_KINDS`], then `other`).
pub fn error_kind_name(i: usize) -> &'static str {
    UPSTREAM_ERROR_KINDS.get(i).copied().unwrap_or("other")
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + '…'.len_utf8());
    out.push_str(&s[..end]);
    out.push('…');
    out
}

/// An error text with what could be a secret removed: URL queries (presigned URLs carry
/// signatures there), user info in URLs, and anything after `Bearer` / `Basic` / `token=`.
pub fn redact(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len().min(REASON_MAX + 8));
    let mut hide_next = false;
    for (i, word) in reason.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if hide_next {
            out.push_str("[redacted]");
            hide_next = false;
            continue;
        }
        let lower = word.to_ascii_lowercase();
        if lower == "bearer" || lower == "basic" {
            hide_next = true;
            out.push_str(word);
            continue;
        }
        let mut w = word.to_owned();
        if let Some(q) = w.find('?') {
            w.truncate(q);
            w.push_str("?[redacted]");
        }
        if let Some(scheme) = w.find("://") {
            let rest = &w[scheme + 3..];
            let auth_end = rest.find('/').unwrap_or(rest.len());
            if let Some(at) = rest[..auth_end].rfind('@') {
                w = format!("{}[redacted]@{}", &w[..scheme + 3], &rest[at + 1..]);
            }
        }
        for key in ["token=", "password=", "secret="] {
            if let Some(p) = w.to_ascii_lowercase().find(key) {
                w.truncate(p + key.len());
                w.push_str("[redacted]");
            }
        }
        out.push_str(&w);
        if out.len() > REASON_MAX {
            break;
        }
    }
    cut(&out, REASON_MAX)
}

impl Default for History {
    fn default() -> Self {
        History::new(crate::clock::now_ms(), 64)
    }
}

impl History {
    /// An empty history started at `now_ms`, tracking at most `max_registries` labels.
    pub fn new(now_ms: u64, max_registries: usize) -> History {
        History {
            inner: Mutex::new(Inner {
                started_ms: now_ms,
                slots: vec![Slot::default(); SLOTS],
                since_start: Slot::default(),
                registries: BTreeMap::new(),
                hours: (0..HOURS).map(|_| HourTop::default()).collect(),
                errors: VecDeque::with_capacity(LAST_ERRORS),
            }),
            max_registries: max_registries.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves counters, never broken invariants.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request ended: `bytes` sent with `outcome`, for `repo` (empty: none) of the
    /// registry labelled `registry`.
    pub fn request(
        &self,
        now_ms: u64,
        registry: &str,
        repo: &str,
        outcome: CacheStatus,
        bytes: u64,
    ) {
        let m = minute(now_ms);
        let mut g = self.lock();
        let inner = &mut *g;
        let slot = inner.slot(m);
        slot.count(outcome, bytes);
        inner.since_start.count(outcome, bytes);
        if let Some(r) = registry_state(&mut inner.registries, registry, self.max_registries) {
            r.since_start.count(outcome, bytes);
        }
        if repo.is_empty() || bytes == 0 {
            return;
        }
        let hour = m / 60;
        let top = &mut inner.hours[(hour % HOURS as u64) as usize];
        if top.hour != hour || top.repos.is_empty() {
            *top = HourTop {
                hour,
                ..HourTop::default()
            };
        }
        let cached = from_cache(outcome);
        let key = repo_key(registry, repo);
        let room = top.repos.len() < TOP_PER_HOUR;
        match top.repos.get_mut(&key) {
            Some(e) if e.registry == registry && e.repository == repo => {
                if cached {
                    e.cache += bytes;
                } else {
                    e.upstream += bytes;
                }
            }
            None if room => {
                if top.repos.capacity() == 0 {
                    top.repos.reserve(TOP_PER_HOUR);
                }
                top.repos.insert(
                    key,
                    RepoEntry {
                        registry: cut(registry, REPO_MAX),
                        repository: cut(repo, REPO_MAX),
                        cache: if cached { bytes } else { 0 },
                        upstream: if cached { 0 } else { bytes },
                    },
                );
            }
            _ => {
                if cached {
                    top.unattributed.0 += bytes;
                } else {
                    top.unattributed.1 += bytes;
                }
            }
        }
    }

    /// An upstream failure or error status of kind `kind` (one of [`UPSTREAM_ERROR_KINDS`],
    /// else counted as `other`), with what went wrong for the error list.
    pub fn upstream_error(
        &self,
        now_ms: u64,
        registry: &str,
        repo: &str,
        kind: &str,
        reason: &str,
    ) {
        let m = minute(now_ms);
        let reason = redact(reason);
        let mut g = self.lock();
        let inner = &mut *g;
        let slot = inner.slot(m);
        slot.upstream_errors += 1;
        inner.since_start.upstream_errors += 1;
        if let Some(r) = registry_state(&mut inner.registries, registry, self.max_registries) {
            r.since_start.upstream_errors += 1;
            let ring = r.errors.get_or_insert_with(|| Box::new(ErrorRing::new()));
            let i = (m % 60) as usize;
            if ring.minutes[i] != m {
                ring.minutes[i] = m;
                ring.counts[i] = [0; ERROR_KINDS];
            }
            let k = &mut ring.counts[i][error_kind_index(kind)];
            *k = k.saturating_add(1);
        }
        let listed = if kind == "digest" {
            "digest"
        } else {
            "upstream"
        };
        push_error(&mut inner.errors, now_ms, listed, registry, repo, reason);
    }

    /// A storage error, a digest mismatch or a refusal, for the error list only (their
    /// counts are the metrics').
    pub fn error(&self, now_ms: u64, kind: &'static str, registry: &str, repo: &str, reason: &str) {
        let reason = redact(reason);
        let mut g = self.lock();
        push_error(&mut g.errors, now_ms, kind, registry, repo, reason);
    }

    /// Copies everything out as of `now_ms`.
    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        let m = minute(now_ms);
        let g = self.lock();
        let first = m.saturating_sub(SLOTS as u64 - 1);
        let mut series = Series {
            slot_seconds: 60,
            first_minute_ms: first * 60_000,
            requests_hit: Vec::with_capacity(SLOTS),
            requests_miss: Vec::with_capacity(SLOTS),
            requests_coalesced: Vec::with_capacity(SLOTS),
            requests_stale: Vec::with_capacity(SLOTS),
            requests_pass: Vec::with_capacity(SLOTS),
            requests_denied: Vec::with_capacity(SLOTS),
            bytes_cache: Vec::with_capacity(SLOTS),
            bytes_upstream: Vec::with_capacity(SLOTS),
            upstream_errors: Vec::with_capacity(SLOTS),
        };
        let (mut hour, mut day) = (Slot::default(), Slot::default());
        for k in 0..SLOTS as u64 {
            let at = first + k;
            let s = g.slots[(at % SLOTS as u64) as usize];
            let s = if s.minute == at && at <= m {
                s
            } else {
                Slot::default()
            };
            if at + 60 > m {
                hour.add(&s);
            }
            day.add(&s);
            series.requests_hit.push(s.hit);
            series.requests_miss.push(s.miss);
            series.requests_coalesced.push(s.coalesced);
            series.requests_stale.push(s.stale);
            series.requests_pass.push(s.pass);
            series.requests_denied.push(s.denied);
            series.bytes_cache.push(s.bytes_cache);
            series.bytes_upstream.push(s.bytes_upstream);
            series.upstream_errors.push(s.upstream_errors);
        }
        let registries = g
            .registries
            .iter()
            .map(|(name, r)| {
                let mut last_hour: BTreeMap<&'static str, u64> =
                    (0..ERROR_KINDS).map(|i| (error_kind_name(i), 0)).collect();
                if let Some(ring) = &r.errors {
                    for i in 0..60 {
                        let at = ring.minutes[i];
                        if at <= m && at + 60 > m {
                            for (k, n) in ring.counts[i].iter().enumerate() {
                                *last_hour.entry(error_kind_name(k)).or_default() += u64::from(*n);
                            }
                        }
                    }
                }
                RegistryFigures {
                    registry: name.clone(),
                    since_start: r.since_start.window(),
                    upstream_errors_last_hour: last_hour,
                }
            })
            .collect();
        let hour_now = m / 60;
        let mut repos: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
        let mut unattributed = (0, 0);
        for top in &g.hours {
            if top.repos.is_empty() || top.hour > hour_now || top.hour + HOURS as u64 <= hour_now {
                continue;
            }
            unattributed.0 += top.unattributed.0;
            unattributed.1 += top.unattributed.1;
            for e in top.repos.values() {
                let t = repos
                    .entry((e.registry.as_str(), e.repository.as_str()))
                    .or_default();
                t.0 += e.cache;
                t.1 += e.upstream;
            }
        }
        let mut all: Vec<RepoBytes> = repos
            .into_iter()
            .map(|((registry, repository), (c, u))| RepoBytes {
                registry: registry.to_owned(),
                repository: repository.to_owned(),
                bytes_served: c + u,
                bytes_upstream: u,
            })
            .collect();
        let key = |r: &RepoBytes| (r.registry.clone(), r.repository.clone());
        all.sort_by(|a, b| {
            b.bytes_served
                .cmp(&a.bytes_served)
                .then(key(a).cmp(&key(b)))
        });
        let by_served: Vec<RepoBytes> = all.iter().take(TOP_LISTED).cloned().collect();
        all.retain(|r| r.bytes_upstream > 0);
        all.sort_by(|a, b| {
            b.bytes_upstream
                .cmp(&a.bytes_upstream)
                .then(key(a).cmp(&key(b)))
        });
        all.truncate(TOP_LISTED);
        Snapshot {
            started_ms: g.started_ms,
            since_start: g.since_start.window(),
            last_hour: hour.window(),
            last_24h: day.window(),
            registries,
            top_by_bytes_served: by_served,
            top_by_upstream_bytes: all,
            unattributed,
            errors: g.errors.iter().rev().cloned().collect(),
            series,
        }
    }

    /// What the history may hold at most, in bytes, with `registries` labels: the figure
    /// the README states. Repository names and error texts are counted at their bounds.
    pub fn memory_bound(registries: usize) -> usize {
        use std::mem::size_of;
        // Labels past the limit share `other`, which may come on top.
        let registries = registries + 1;
        let slots = SLOTS * size_of::<Slot>();
        let per_registry = size_of::<String>()
            + REPO_MAX
            + size_of::<RegistryState>()
            + size_of::<ErrorRing>()
            + MAP_ENTRY_OVERHEAD;
        // An hour's table: reserved once for TOP_PER_HOUR entries (a hash table of at most
        // twice as many buckets, a control byte each), and two names per entry.
        let hour = size_of::<HourTop>()
            + 2 * TOP_PER_HOUR * (size_of::<(u64, RepoEntry)>() + 1)
            + TOP_PER_HOUR * 2 * (REPO_MAX + 4);
        let error = size_of::<ErrorEntry>() + 3 * (REASON_MAX + 4);
        size_of::<Inner>() + slots + registries * per_registry + HOURS * hour + LAST_ERRORS * error
    }

    /// The bytes the history holds now (heap and inline), counted as
    /// [`History::memory_bound`] counts them.
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        let g = self.lock();
        let mut n = size_of::<Inner>() + g.slots.capacity() * size_of::<Slot>();
        for (name, r) in &g.registries {
            n += size_of::<String>() + name.capacity() + size_of::<RegistryState>();
            n += MAP_ENTRY_OVERHEAD;
            if r.errors.is_some() {
                n += size_of::<ErrorRing>();
            }
        }
        for top in &g.hours {
            n += size_of::<HourTop>();
            // hashbrown keeps buckets for 8/7 of its capacity, rounded to a power of two.
            let buckets = if top.repos.capacity() == 0 {
                0
            } else {
                (top.repos.capacity() * 8 / 7).next_power_of_two()
            };
            n += buckets * (size_of::<(u64, RepoEntry)>() + 1);
            for e in top.repos.values() {
                n += e.registry.capacity() + e.repository.capacity();
            }
        }
        n += g.errors.capacity() * size_of::<ErrorEntry>();
        for e in &g.errors {
            n += e.registry.capacity() + e.repository.capacity() + e.reason.capacity();
        }
        n
    }
}

/// Rows of each top table in a snapshot.
pub const TOP_LISTED: usize = 10;
/// What a map entry costs beyond its key and value (tree nodes, control bytes, slack).
const MAP_ENTRY_OVERHEAD: usize = 32;

fn registry_state<'a>(
    map: &'a mut BTreeMap<String, RegistryState>,
    registry: &str,
    max: usize,
) -> Option<&'a mut RegistryState> {
    if registry.is_empty() {
        return None;
    }
    if !map.contains_key(registry) {
        let name = if map.len() < max {
            cut(registry, REPO_MAX)
        } else {
            super::metrics::OTHER_REGISTRY.to_owned()
        };
        return Some(map.entry(name).or_default());
    }
    map.get_mut(registry)
}

fn push_error(
    errors: &mut VecDeque<ErrorEntry>,
    now_ms: u64,
    kind: &'static str,
    registry: &str,
    repo: &str,
    reason: String,
) {
    if let Some(last) = errors.back_mut() {
        if last.kind == kind
            && last.registry == registry
            && last.repository == repo
            && last.reason == reason
        {
            last.count += 1;
            last.time_ms = now_ms;
            return;
        }
    }
    if errors.len() == LAST_ERRORS {
        errors.pop_front();
    }
    errors.push_back(ErrorEntry {
        time_ms: now_ms,
        first_ms: now_ms,
        count: 1,
        kind,
        registry: cut(registry, REPO_MAX),
        repository: cut(repo, REPO_MAX),
        reason,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn counts_land_in_their_minute_and_windows() {
        let h = History::new(T0, 8);
        h.request(T0, "quay.io", "a/b", CacheStatus::Miss, 100);
        h.request(T0 + 1000, "quay.io", "a/b", CacheStatus::Hit, 100);
        h.request(T0 + 2 * 3_600_000, "quay.io", "a/b", CacheStatus::Hit, 5);
        let s = h.snapshot(T0 + 2 * 3_600_000);
        assert_eq!(s.since_start.hits, 2);
        assert_eq!(s.since_start.misses, 1);
        assert_eq!(s.last_hour.hits, 1);
        assert_eq!(s.last_hour.misses, 0);
        assert_eq!(s.last_24h.hits, 2);
        assert_eq!(s.last_24h.bytes_saved, 105);
        assert_eq!(*s.series.requests_hit.last().unwrap(), 1);
        assert_eq!(s.series.requests_hit.iter().sum::<u64>(), 2);
        assert_eq!(s.top_by_bytes_served[0].bytes_served, 205);
        assert_eq!(s.top_by_upstream_bytes[0].bytes_upstream, 100);
    }

    #[test]
    fn secrets_are_redacted() {
        let r = redact(
            "GET https://u:pw@s3.example/x?X-Amz-Signature=abc failed: Bearer eyJ token=xyz",
        );
        assert!(!r.contains("pw"), "{r}");
        assert!(!r.contains("abc"), "{r}");
        assert!(!r.contains("eyJ"), "{r}");
        assert!(!r.contains("xyz"), "{r}");
        assert!(r.contains("s3.example/x"), "{r}");
        assert!(redact(&"x".repeat(5000)).len() <= REASON_MAX + 3);
    }

    #[test]
    fn identical_errors_fold_and_the_list_is_bounded() {
        let h = History::new(T0, 8);
        for i in 0..5 {
            h.error(T0 + i, "refusal", "", "", "allow_list");
        }
        for i in 0..200 {
            h.error(T0 + i, "storage", "", "", &format!("write {i}"));
        }
        let s = h.snapshot(T0 + 1000);
        assert_eq!(s.errors.len(), LAST_ERRORS);
        assert_eq!(s.errors[0].reason, "write 199");
        let h = History::new(T0, 8);
        for i in 0..5 {
            h.error(T0 + i, "refusal", "", "", "allow_list");
        }
        let s = h.snapshot(T0 + 1000);
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].count, 5);
        assert_eq!((s.errors[0].first_ms, s.errors[0].time_ms), (T0, T0 + 4));
    }
}
