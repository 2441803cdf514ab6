//! Attempt timeouts learnt from an endpoint's observed latency.

use std::{collections::HashMap, fmt, sync::Mutex, time::Duration};

use hdrhistogram::Histogram;

/// An attempt timeout learnt from each endpoint's latency, for
/// [`RetryLayer::with_learnt_timeout`](super::RetryLayer::with_learnt_timeout).
///
/// Per endpoint (host and path, the query left out), the layer keeps the
/// latency of the attempts that got a final answer, and of the attempts that
/// timed out at the full attempt timeout (at that timeout: they took at
/// least that long). Once an endpoint has [`min_samples`](Self::with_min_samples)
/// of them, its attempt timeout is the [`quantile`](Self::with_quantile) of
/// those latencies times the [`margin`](Self::with_margin), clamped to the
/// [`floor`](Self::with_floor) and [`ceiling`](Self::with_ceiling); until
/// then it is the layer's attempt timeout. So a 3 s timeout in front of an
/// endpoint whose p95 is 4.2 s stretches to about 6.3 s after a few calls,
/// and one in front of a 200 ms endpoint shrinks to the floor.
///
/// Defaults: the 0.95 quantile, a margin of 1.5, a floor of 1 s, a ceiling
/// of 30 s, 5 samples. The latencies are kept in an HDR histogram (2
/// significant digits) over a sliding window of the last 512 to 1024
/// samples, for at most 256 endpoints (the least recently used is
/// forgotten first). An endpoint that stops answering at all is learnt as
/// slow: its timeouts grow by the margin each time, up to the ceiling.
/// Answers that ask for another attempt (a 503, a 409 in flight) and
/// failed connections are not latency and are left out.
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct LearntTimeout {
    quantile: f64,
    margin: f64,
    floor: Duration,
    ceiling: Duration,
    min_samples: u64,
}

impl Default for LearntTimeout {
    fn default() -> Self {
        Self::new()
    }
}

impl LearntTimeout {
    /// The defaults above.
    pub fn new() -> Self {
        LearntTimeout {
            quantile: 0.95,
            margin: 1.5,
            floor: Duration::from_secs(1),
            ceiling: Duration::from_secs(30),
            min_samples: 5,
        }
    }

    /// The quantile of observed latency the timeout is built on (default
    /// 0.95; kept within 0.5 to 1).
    pub fn with_quantile(mut self, quantile: f64) -> Self {
        self.quantile = if quantile.is_nan() {
            0.95
        } else {
            quantile.clamp(0.5, 1.0)
        };
        self
    }

    /// What the quantile is multiplied by (default 1.5; at least 1).
    pub fn with_margin(mut self, margin: f64) -> Self {
        self.margin = if margin.is_nan() {
            1.5
        } else {
            margin.max(1.0)
        };
        self
    }

    /// The shortest timeout learnt (default 1 s).
    pub fn with_floor(mut self, floor: Duration) -> Self {
        self.floor = floor;
        self.ceiling = self.ceiling.max(floor);
        self
    }

    /// The longest timeout learnt (default 30 s; at least the floor).
    pub fn with_ceiling(mut self, ceiling: Duration) -> Self {
        self.ceiling = ceiling.max(self.floor);
        self
    }

    /// How many samples an endpoint needs before its timeout is learnt
    /// (default 5; at least 1).
    pub fn with_min_samples(mut self, samples: u64) -> Self {
        self.min_samples = samples.max(1);
        self
    }
}

/// The endpoints tracked at most.
const ENDPOINTS: usize = 256;
/// Samples per window: the sketch covers the last one to two windows.
const WINDOW: u64 = 512;
/// The largest latency recorded, in microseconds (one hour).
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// One endpoint's latencies.
struct Endpoint {
    current: Histogram<u64>,
    /// The current window and the one before it together.
    both: Histogram<u64>,
    /// The timeout learnt from both windows, once there are enough.
    learnt: Option<Duration>,
    /// When it was last used, on the book's own count.
    used: u64,
}

/// The latencies of every endpoint a layer talks to; shared by its clones.
pub(crate) struct Latencies {
    rule: LearntTimeout,
    endpoints: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    by_endpoint: HashMap<String, Endpoint>,
    clock: u64,
}

impl fmt::Debug for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Latencies")
            .field("rule", &self.rule)
            .finish_non_exhaustive()
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_MICROS, 2).expect("valid histogram bounds")
}

impl Latencies {
    pub(crate) fn new(rule: LearntTimeout) -> Self {
        Latencies {
            rule,
            endpoints: Mutex::default(),
        }
    }

    /// The timeout learnt for `endpoint`, if it has enough samples.
    pub(crate) fn timeout(&self, endpoint: &str) -> Option<Duration> {
        let mut book = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        book.clock += 1;
        let clock = book.clock;
        let entry = book.by_endpoint.get_mut(endpoint)?;
        entry.used = clock;
        entry.learnt
    }

    /// Records an attempt to `endpoint` that took `latency` (or at least
    /// that, for one that timed out).
    pub(crate) fn record(&self, endpoint: &str, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut book = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        book.clock += 1;
        let clock = book.clock;
        if !book.by_endpoint.contains_key(endpoint) && book.by_endpoint.len() >= ENDPOINTS {
            let oldest = book
                .by_endpoint
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                book.by_endpoint.remove(&oldest);
            }
        }
        let entry = book
            .by_endpoint
            .entry(endpoint.to_owned())
            .or_insert_with(|| Endpoint {
                current: histogram(),
                both: histogram(),
                learnt: None,
                used: clock,
            });
        entry.used = clock;
        if entry.current.len() >= WINDOW {
            // The window before the current one leaves the sketch.
            entry.both = std::mem::replace(&mut entry.current, histogram());
        }
        entry.current.saturating_record(micros);
        entry.both.saturating_record(micros);
        let samples = entry.both.len();
        // The quantile walks the sketch: read it on every sample while
        // there are few, then on every eighth.
        if samples >= self.rule.min_samples && (samples < 64 || samples.is_multiple_of(8)) {
            let at = Duration::from_micros(entry.both.value_at_quantile(self.rule.quantile));
            // A margin too large for the clock is the ceiling.
            let stretched = Duration::try_from_secs_f64(at.as_secs_f64() * self.rule.margin)
                .unwrap_or(Duration::MAX);
            entry.learnt = Some(stretched.clamp(self.rule.floor, self.rule.ceiling));
        }
    }
}

/// The endpoint a request is to: its host, port and path, the query left
/// out.
pub(crate) fn endpoint(scheme: &str, authority: &str, path: &str) -> String {
    let mut name = String::with_capacity(scheme.len() + authority.len() + path.len() + 3);
    name.push_str(scheme);
    name.push_str("://");
    name.push_str(&authority.to_ascii_lowercase());
    name.push_str(path);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantile_times_the_margin_clamped() {
        let book = Latencies::new(LearntTimeout::new());
        let ms = Duration::from_millis;
        for _ in 0..4 {
            book.record("a", ms(4200));
        }
        assert_eq!(book.timeout("a"), None, "four samples are not enough");
        book.record("a", ms(4200));
        let learnt = book.timeout("a").unwrap();
        assert!((ms(6250)..ms(6400)).contains(&learnt), "{learnt:?}");
        for _ in 0..200 {
            book.record("b", ms(20));
        }
        assert_eq!(book.timeout("b"), Some(Duration::from_secs(1)), "the floor");
        for _ in 0..10 {
            book.record("c", Duration::from_secs(600));
        }
        assert_eq!(
            book.timeout("c"),
            Some(Duration::from_secs(30)),
            "the ceiling"
        );
    }

    #[test]
    fn old_samples_leave_the_window_and_endpoints_are_bounded() {
        let book = Latencies::new(LearntTimeout::new());
        let ms = Duration::from_millis;
        for _ in 0..WINDOW {
            book.record("a", ms(8000));
        }
        assert!(book.timeout("a").unwrap() > Duration::from_secs(11));
        for _ in 0..2 * WINDOW {
            book.record("a", ms(2000));
        }
        let learnt = book.timeout("a").unwrap();
        assert!(learnt < Duration::from_millis(3100), "{learnt:?}");

        for n in 0..2 * ENDPOINTS {
            book.record(&format!("e{n}"), ms(2000));
        }
        let book = book.endpoints.lock().unwrap();
        assert_eq!(book.by_endpoint.len(), ENDPOINTS);
        assert!(
            book.by_endpoint
                .contains_key(&format!("e{}", 2 * ENDPOINTS - 1))
        );
        assert!(
            !book.by_endpoint.contains_key("e0"),
            "the oldest went first"
        );
    }

    #[test]
    fn settings_are_kept_in_range() {
        let rule = LearntTimeout::new()
            .with_quantile(7.0)
            .with_margin(0.1)
            .with_ceiling(Duration::from_millis(10))
            .with_min_samples(0);
        assert_eq!(rule.quantile, 1.0);
        assert_eq!(rule.margin, 1.0);
        assert_eq!(rule.ceiling, rule.floor);
        assert_eq!(rule.min_samples, 1);
        assert_eq!(LearntTimeout::new().with_quantile(f64::NAN).quantile, 0.95);
    }
}
