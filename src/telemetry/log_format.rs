//! The text log's field formatter and clock: the same bytes as tracing-subscriber's
//! `DefaultFields` and `SystemTime`, for a fraction of their instructions.
//!
//! Every request writes an access line, and on a manifest `HEAD` hit those two were a fifth
//! of the request's instructions (callgrind; bench/README.md): the default visitor paints
//! every field name through `nu_ansi_term` even with colours off, escapes the message one
//! `char` at a time, and the clock works out the calendar date on every line. Here a field
//! name is written as it is, a message is checked for control characters once and copied
//! whole when it has none, and the date and time to the second are kept per thread.
//! Tests hold the output equal to the defaults'.

use std::cell::RefCell;
use std::fmt::{self, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// Formats event and span fields as `DefaultFields` does: `message name=value ...`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fields;

impl<'a> MakeVisitor<Writer<'a>> for Fields {
    type Visitor = Visitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> Visitor<'a> {
        Visitor {
            writer,
            is_empty: true,
            result: Ok(()),
        }
    }
}

pub struct Visitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

/// The escape codes `nu_ansi_term` writes for italic and dimmed text.
const ITALIC: &str = "\x1b[3m";
const DIMMED: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Visitor<'_> {
    fn pad(&mut self) {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.result = self.writer.write_char(' ');
        }
    }

    fn name(&mut self, name: &str) -> fmt::Result {
        if self.writer.has_ansi_escapes() {
            write!(self.writer, "{ITALIC}{name}{RESET}{DIMMED}={RESET}")
        } else {
            self.writer.write_str(name)?;
            self.writer.write_char('=')
        }
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // `value`, then (when it has sources) ` NAME.sources=[source, source of that, ...]`.
        let mut out = String::new();
        let _ = escape_into(&mut out, &value.to_string());
        if let Some(source) = value.source() {
            if self.writer.has_ansi_escapes() {
                let _ = write!(
                    out,
                    " {ITALIC}{}{RESET}{ITALIC}.sources{RESET}{DIMMED}={RESET}[",
                    field.name()
                );
            } else {
                let _ = write!(out, " {}.sources=[", field.name());
            }
            let mut next = Some(source);
            while let Some(e) = next {
                if !out.ends_with('[') {
                    out.push_str(", ");
                }
                let _ = escape_into(&mut out, &e.to_string());
                next = e.source();
            }
            out.push(']');
        }
        self.record_debug(field, &format_args!("{out}"))
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        // Metadata of events from the `log` crate, which the formatter has printed already.
        if name.starts_with("log.") {
            return;
        }
        self.pad();
        if self.result.is_err() {
            return;
        }
        self.result = if name == "message" {
            let mut text = String::with_capacity(64);
            match write!(text, "{value:?}") {
                Ok(()) => escape_into(&mut self.writer, &text),
                Err(e) => Err(e),
            }
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.name(name)
                .and_then(|()| write!(self.writer, "{value:?}"))
        };
    }
}

impl VisitOutput<fmt::Result> for Visitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for Visitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Whether `c` is a character tracing-subscriber escapes in messages: the C0 controls that
/// start or end terminal sequences, DEL, and the C1 controls.
fn escaped(c: char) -> bool {
    matches!(
        c,
        '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
    )
}

/// Writes `s` with terminal control characters escaped as tracing-subscriber escapes them:
/// in one piece when it has none, which is nearly always.
fn escape_into(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // All of them are single bytes, or (C1) a two-byte sequence led by 0xC2.
    let clean = !s
        .bytes()
        .any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2));
    if clean || !s.chars().any(escaped) {
        return out.write_str(s);
    }
    for c in s.chars() {
        match c {
            '\x1b' => out.write_str("\\x1b")?,
            '\x07' => out.write_str("\\x07")?,
            '\x08' => out.write_str("\\x08")?,
            '\x0c' => out.write_str("\\x0c")?,
            '\x7f' => out.write_str("\\x7f")?,
            c if escaped(c) => write!(out, "\\u{{{:x}}}", c as u32)?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

/// The wall clock as `SystemTime` prints it (`2026-12-03T13:51:00.123456Z`), with the part
/// to the second worked out once a second per thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock;

thread_local! {
    /// The second last formatted, and its `YYYY-MM-DDTHH:MM:SS.` text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now();
        let Ok(since) = now.duration_since(std::time::UNIX_EPOCH) else {
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let (secs, micros) = (since.as_secs(), since.subsec_micros());
        SECOND.with(|cell| {
            let Ok(mut cached) = cell.try_borrow_mut() else {
                return tracing_subscriber::fmt::time::SystemTime.format_time(w);
            };
            if cached.0 != secs {
                cached.1.clear();
                write_second(&mut cached.1, secs)?;
                cached.0 = secs;
            }
            w.write_str(&cached.1)?;
            write!(w, "{micros:06}Z")
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of `secs` after the Unix epoch (UTC), as `SystemTime` writes it.
fn write_second(out: &mut String, secs: u64) -> fmt::Result {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    if year > 9999 {
        write!(out, "+{year}")?;
    } else {
        write!(out, "{year:04}")?;
    }
    write!(
        out,
        "-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("upstream said \x1b[31mno\x1b[0m")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection \u{85}reset")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    /// A variety of events, inside spans with fields.
    fn events() {
        let registry = "quay.io:5000";
        let span = tracing::info_span!("mirror", peer = %"127.0.0.1:4000", n = 3);
        let _g = span.enter();
        tracing::info!(
            target: "stowage::access",
            registry = %registry,
            repo = %"org/app",
            kind = "manifest",
            method = %"HEAD",
            outcome = "hit",
            status = 200u16,
            bytes = 1234u64,
            complete = true,
            duration_ms = 0.129,
            "request"
        );
        tracing::warn!(
            duration_ms = 1500.0,
            "a \x1b[2J clear, a bell \x07, C1 \u{9b}, ünïcödé"
        );
        tracing::error!(
            error = &Outer(Inner) as &(dyn std::error::Error + 'static),
            "fill failed"
        );
        tracing::error!(error = &Inner as &(dyn std::error::Error + 'static));
        tracing::info!(
            r#type = "x",
            quoted = "a \"b\" \x1b c",
            "{} and {:?}",
            1,
            "two"
        );
        let inner = tracing::debug_span!("fill", digest = %"sha256:ab");
        let _i = inner.enter();
        tracing::info!(message = %"as a field", extra = ?Some(1));
        tracing::info!("");
    }

    fn both(ansi: bool, timer: bool) -> (String, String) {
        let (ours, default) = (Buf::default(), Buf::default());
        let (o, d) = (ours.clone(), default.clone());
        let ours_sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || o.clone())
            .with_ansi(ansi)
            .fmt_fields(Fields)
            .without_time()
            .finish();
        let default_sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || d.clone())
            .with_ansi(ansi)
            .without_time()
            .finish();
        if timer {
            let (o, d) = (ours.clone(), default.clone());
            let ours_t = tracing_subscriber::fmt()
                .with_writer(move || o.clone())
                .with_ansi(false)
                .with_timer(Clock)
                .finish();
            let default_t = tracing_subscriber::fmt()
                .with_writer(move || d.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(ours_t, || tracing::info!("tick"));
            tracing::subscriber::with_default(default_t, || tracing::info!("tick"));
            return (ours.take(), default.take());
        }
        tracing::subscriber::with_default(ours_sub, events);
        tracing::subscriber::with_default(default_sub, events);
        (ours.take(), default.take())
    }

    #[test]
    fn fields_print_what_the_default_formatter_prints() {
        for ansi in [false, true] {
            let (ours, default) = both(ansi, false);
            assert_eq!(ours.lines().count(), 7, "{ours}");
            for (o, d) in ours.lines().zip(default.lines()) {
                assert_eq!(o, d, "ansi {ansi}");
            }
            assert_eq!(ours, default);
        }
        let (plain, _) = both(false, false);
        assert!(
            plain.contains("\\x1b[2J clear, a bell \\x07, C1 \\u{9b}, ünïcödé"),
            "{plain}"
        );
        assert!(plain.contains("kind=\"manifest\""), "{plain}");
    }

    #[test]
    fn the_clock_prints_what_system_time_prints() {
        // The two lines are formatted microseconds apart: retry across a second boundary.
        for _ in 0..5 {
            let (ours, default) = both(false, true);
            let (o, d) = (&ours[..20], &default[..20]);
            if o == d {
                assert_eq!(ours.as_bytes()[26], b'Z', "{ours}");
                assert_eq!(ours.len(), default.len());
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the clock's second never matched SystemTime's");
    }

    #[test]
    fn calendar_dates() {
        let s = |secs| {
            let mut out = String::new();
            write_second(&mut out, secs).unwrap();
            out
        };
        assert_eq!(s(0), "1970-01-01T00:00:00.");
        assert_eq!(s(951_782_400), "2000-02-29T00:00:00.");
        assert_eq!(s(951_868_799), "2000-02-29T23:59:59.");
        assert_eq!(s(951_868_800), "2000-03-01T00:00:00.");
        assert_eq!(s(1_796_305_860), "2026-12-03T13:51:00.");
        assert_eq!(s(4_102_444_800), "2100-01-01T00:00:00.");
        assert_eq!(s(253_402_300_799), "9999-12-31T23:59:59.");
        assert_eq!(s(253_402_300_800), "+10000-01-01T00:00:00.");
    }
}
