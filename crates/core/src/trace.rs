//! The trace context a job carries from its enqueue to its last webhook: a W3C Trace Context
//! `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>).
//!
//! A job's `traceparent` names the span that enqueued it. Every attempt of the job, and every
//! webhook delivery of its events, is a child of that span, so the job is one trace however
//! many processes, retries and recoveries it passes through.

use std::fmt;
use std::str::FromStr;

/// A `traceparent`: version `00`, a 16-byte trace id, the 8-byte id of the parent span and the
/// trace flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

/// Why a `traceparent` was refused; the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traceparent: {0}")]
pub struct TraceParentError(&'static str);

const SAMPLED: u8 = 0x01;

impl TraceParent {
    /// A new trace: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        loop {
            let candidate = Self {
                trace_id: rand::random(),
                span_id: rand::random(),
                flags: SAMPLED,
            };
            if candidate.is_valid() {
                return candidate;
            }
        }
    }

    /// From the ids of a span, as a tracer hands them out. None when either id is all zeros.
    pub fn from_ids(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Option<Self> {
        let parent = Self {
            trace_id,
            span_id,
            flags: if sampled { SAMPLED } else { 0 },
        };
        parent.is_valid().then_some(parent)
    }

    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    pub fn span_id(&self) -> [u8; 8] {
        self.span_id
    }

    /// The trace id as 32 lowercase hex digits: what tracing backends search by.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written into one buffer: a batch formats one per job.
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        let filled = hex::encode_to_slice(self.trace_id, &mut out[3..35])
            .and(hex::encode_to_slice(self.span_id, &mut out[36..52]))
            .and(hex::encode_to_slice([self.flags], &mut out[53..55]));
        filled.map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    /// Parses as the W3C specification says: version `00` exactly 55 characters; a higher
    /// version may carry more fields after a `-`, of which the first four are read; version
    /// `ff`, upper-case hex and all-zero ids are invalid.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        let bytes = value.as_bytes();
        if !value.is_ascii() {
            return Err(TraceParentError(
                "must be ASCII: 00-<32 hex>-<16 hex>-<2 hex>",
            ));
        }
        if bytes.len() < 55 {
            return Err(TraceParentError(
                "must be 55 characters: 00-<32 hex>-<16 hex>-<2 hex>",
            ));
        }
        let version = parse_hex::<1>(&value[0..2]).ok_or(TraceParentError(
            "the version must be two lower-case hex digits",
        ))?[0];
        if version == 0xff {
            return Err(TraceParentError("version ff is invalid"));
        }
        if version == 0 && bytes.len() != 55 {
            return Err(TraceParentError("version 00 must be exactly 55 characters"));
        }
        if version != 0 && bytes.len() > 55 && bytes[55] != b'-' {
            return Err(TraceParentError("fields after the flags must follow a '-'"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceParentError("fields must be separated by '-'"));
        }
        let trace_id = parse_hex::<16>(&value[3..35]).ok_or(TraceParentError(
            "the trace id must be 32 lower-case hex digits",
        ))?;
        let span_id = parse_hex::<8>(&value[36..52]).ok_or(TraceParentError(
            "the parent id must be 16 lower-case hex digits",
        ))?;
        let flags = parse_hex::<1>(&value[53..55]).ok_or(TraceParentError(
            "the flags must be two lower-case hex digits",
        ))?[0];
        if trace_id == [0; 16] {
            return Err(TraceParentError("the trace id must not be all zeros"));
        }
        if span_id == [0; 8] {
            return Err(TraceParentError("the parent id must not be all zeros"));
        }
        // Only the sampled flag is defined for version 00; unknown flags are not passed on.
        Ok(Self {
            trace_id,
            span_id,
            flags: flags & SAMPLED,
        })
    }
}

impl serde::Serialize for TraceParent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TraceParent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `text` as N bytes of lower-case hex (the specification refuses upper case; `hex` takes both).
fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specification_example_round_trips() {
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            parent.span_id(),
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(parent.is_sampled());
        assert_eq!(parent.to_string(), EXAMPLE);
        let json = serde_json::to_string(&parent).unwrap();
        assert_eq!(json, format!("\"{EXAMPLE}\""));
        assert_eq!(serde_json::from_str::<TraceParent>(&json).unwrap(), parent);
    }

    #[test]
    fn invalid_values_name_the_rule() {
        let cases = [
            ("", "55 characters"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "exactly 55",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "parent id",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "flags",
            ),
            (
                "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "ASCII",
            ),
        ];
        for (value, rule) in cases {
            let error = value.parse::<TraceParent>().unwrap_err().to_string();
            assert!(error.contains(rule), "{value:?}: {error}");
        }
    }

    #[test]
    fn a_future_version_is_read_for_its_first_four_fields() {
        let parent: TraceParent = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-extra"
            .parse()
            .unwrap();
        // Re-emitted as version 00, with only the flags version 00 defines.
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn roots_differ_and_round_trip() {
        let root = TraceParent::new_root();
        assert_ne!(TraceParent::new_root().trace_id(), root.trace_id());
        assert_eq!(root.to_string().parse::<TraceParent>().unwrap(), root);
        assert!(TraceParent::from_ids([0; 16], [1; 8], true).is_none());
        let unsampled = TraceParent::from_ids([1; 16], [1; 8], false).unwrap();
        assert!(!unsampled.is_sampled());
        assert!(unsampled.to_string().ends_with("-00"));
    }
}
