//! Deterministic MP4 generation: a well-formed `ftyp`/`moov`/`mdat` header padded by a `free` box,
//! produced chunk by chunk so that any size streams with bounded memory.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Size of one generated chunk.
const CHUNK_BYTES: usize = 64 * 1024;

/// The byte layout of one run's video; cheap to build, immutable, and shared by a stream.
#[derive(Debug, Clone)]
pub(crate) struct VideoLayout {
    /// Everything up to and including the `free` box header.
    prefix: Vec<u8>,
    /// Total file size in bytes.
    size: u64,
    /// Seed of the padding generator, derived from the run id.
    seed: u64,
}

fn push_box(out: &mut Vec<u8>, kind: &[u8; 4], payload: &[u8]) {
    let size = u32::try_from(payload.len() + 8).unwrap_or(u32::MAX);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(payload);
}

/// An `mvhd` (version 0) payload with a 1 kHz timescale and the clip's duration.
fn mvhd_payload(duration_secs: u32) -> Vec<u8> {
    let mut payload = Vec::with_capacity(100);
    payload.extend_from_slice(&[0, 0, 0, 0]); // Version 0 and no flags.
    payload.extend_from_slice(&0u32.to_be_bytes()); // Creation time.
    payload.extend_from_slice(&0u32.to_be_bytes()); // Modification time.
    payload.extend_from_slice(&1000u32.to_be_bytes()); // Timescale.
    payload.extend_from_slice(&duration_secs.saturating_mul(1000).to_be_bytes());
    payload.extend_from_slice(&0x0001_0000u32.to_be_bytes()); // Rate 1.0.
    payload.extend_from_slice(&0x0100u16.to_be_bytes()); // Volume 1.0.
    payload.extend_from_slice(&[0; 10]); // Reserved.
    for value in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
        payload.extend_from_slice(&value.to_be_bytes()); // Unity matrix.
    }
    payload.extend_from_slice(&[0; 24]); // Pre-defined.
    payload.extend_from_slice(&1u32.to_be_bytes()); // Next track id.
    payload
}

fn splitmix64(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl VideoLayout {
    /// Lays out the video of `run_id`: `bytes_per_second × duration`, at least the bare header.
    pub(crate) fn new(run_id: Uuid, duration_secs: u32, bytes_per_second: u64) -> Self {
        let mut head = Vec::with_capacity(256);
        let mut ftyp = Vec::new();
        ftyp.extend_from_slice(b"isom");
        ftyp.extend_from_slice(&0x200u32.to_be_bytes());
        for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
            ftyp.extend_from_slice(brand);
        }
        push_box(&mut head, b"ftyp", &ftyp);
        let mut moov = Vec::new();
        push_box(&mut moov, b"mvhd", &mvhd_payload(duration_secs));
        push_box(&mut head, b"moov", &moov);
        push_box(&mut head, b"mdat", run_id.as_bytes());

        let head_len = head.len() as u64;
        let wanted = bytes_per_second.saturating_mul(u64::from(duration_secs));
        let size = wanted.max(head_len + 8);
        let free_total = size - head_len;
        let mut prefix = head;
        match u32::try_from(free_total) {
            Ok(free_size) => {
                prefix.extend_from_slice(&free_size.to_be_bytes());
                prefix.extend_from_slice(b"free");
            }
            Err(_) => {
                prefix.extend_from_slice(&1u32.to_be_bytes());
                prefix.extend_from_slice(b"free");
                prefix.extend_from_slice(&free_total.to_be_bytes());
            }
        }
        let (high, low) = run_id.as_u64_pair();
        Self {
            prefix,
            size,
            seed: high ^ low.rotate_left(17),
        }
    }

    /// Total size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Fills `out` with the bytes at `offset..offset + out.len()`; the range must be in bounds.
    pub(crate) fn read_at(&self, offset: u64, out: &mut [u8]) {
        let prefix_len = self.prefix.len() as u64;
        let mut written = 0usize;
        if offset < prefix_len {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let count = (self.prefix.len() - start).min(out.len());
            out[..count].copy_from_slice(&self.prefix[start..start + count]);
            written = count;
        }
        while written < out.len() {
            let padding_offset = offset + written as u64 - prefix_len;
            let word_index = padding_offset / 8;
            let within = usize::try_from(padding_offset % 8).unwrap_or(0);
            let word = splitmix64(self.seed, word_index).to_le_bytes();
            let count = (8 - within).min(out.len() - written);
            out[written..written + count].copy_from_slice(&word[within..within + count]);
            written += count;
        }
    }

    /// Hex SHA-256 of the whole file, computed in chunks.
    pub(crate) fn sha256_hex(&self) -> String {
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 4 * CHUNK_BYTES];
        let mut offset = 0;
        while offset < self.size {
            let count = usize::try_from((self.size - offset).min(buffer.len() as u64)).unwrap_or(0);
            self.read_at(offset, &mut buffer[..count]);
            hasher.update(&buffer[..count]);
            offset += count as u64;
        }
        hex::encode(hasher.finalize())
    }
}

/// How a body stream ends once it reaches its end offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// The stream ends; it has sent everything the headers announced.
    Complete,
    /// The stream ends early, so fewer bytes arrive than `Content-Length` announced.
    Short,
    /// The stream fails, so the server aborts the connection mid-body.
    Reset,
}

/// Pause before a faulty end, so that hyper flushes the headers and the bytes sent so far.
const FLUSH_PAUSE: Duration = Duration::from_millis(20);

/// Streams bytes `start..end` of a video, optionally paced to `bytes_per_sec`.
pub(crate) fn stream(
    layout: Arc<VideoLayout>,
    start: u64,
    end: u64,
    ending: StreamEnd,
    bytes_per_sec: Option<u64>,
) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
    let chunk_bytes = match bytes_per_sec {
        Some(rate) => usize::try_from(rate / 10)
            .unwrap_or(CHUNK_BYTES)
            .clamp(1, CHUNK_BYTES),
        None => CHUNK_BYTES,
    };
    futures::stream::unfold(Some(start), move |state| {
        let layout = Arc::clone(&layout);
        async move {
            let offset = state?;
            if offset >= end {
                if ending != StreamEnd::Complete {
                    tokio::time::sleep(FLUSH_PAUSE).await;
                }
                return match ending {
                    StreamEnd::Complete | StreamEnd::Short => None,
                    StreamEnd::Reset => Some((
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "simulated reset",
                        )),
                        None,
                    )),
                };
            }
            let count =
                usize::try_from((end - offset).min(chunk_bytes as u64)).unwrap_or(chunk_bytes);
            if let Some(rate) = bytes_per_sec {
                tokio::time::sleep(Duration::from_secs_f64(count as f64 / rate.max(1) as f64))
                    .await;
            }
            let mut chunk = vec![0u8; count];
            layout.read_at(offset, &mut chunk);
            Some((Ok(Bytes::from(chunk)), Some(offset + count as u64)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(layout: &VideoLayout) -> Vec<u8> {
        let mut bytes = vec![0u8; usize::try_from(layout.size()).unwrap()];
        layout.read_at(0, &mut bytes);
        bytes
    }

    #[test]
    fn starts_with_ftyp_and_boxes_cover_the_file_exactly() {
        let layout = VideoLayout::new(Uuid::now_v7(), 5, 1000);
        let bytes = whole(&layout);
        assert_eq!(bytes.len(), 5000);
        assert_eq!(&bytes[4..8], b"ftyp");
        assert_eq!(&bytes[8..12], b"isom");
        let mut offset = 0usize;
        let mut kinds = Vec::new();
        while offset < bytes.len() {
            let size = u32::from_be_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
            kinds.push(String::from_utf8(bytes[offset + 4..offset + 8].to_vec()).unwrap());
            assert!(size >= 8);
            offset += size;
        }
        assert_eq!(offset, bytes.len());
        assert_eq!(kinds, ["ftyp", "moov", "mdat", "free"]);
    }

    #[test]
    fn deterministic_per_run_and_different_across_runs() {
        let id = Uuid::now_v7();
        let first = VideoLayout::new(id, 3, 4096);
        let again = VideoLayout::new(id, 3, 4096);
        let other = VideoLayout::new(Uuid::now_v7(), 3, 4096);
        assert_eq!(whole(&first), whole(&again));
        assert_ne!(whole(&first), whole(&other));
        assert_eq!(first.sha256_hex(), again.sha256_hex());
    }

    #[test]
    fn random_access_matches_sequential_reads() {
        let layout = VideoLayout::new(Uuid::now_v7(), 4, 10_000);
        let bytes = whole(&layout);
        for (start, len) in [(0, 7), (3, 300), (201, 13), (1000, 999), (39_990, 10)] {
            let mut part = vec![0u8; len];
            layout.read_at(start as u64, &mut part);
            assert_eq!(part, bytes[start..start + len]);
        }
    }

    #[test]
    fn tiny_rates_still_produce_a_valid_header() {
        let layout = VideoLayout::new(Uuid::now_v7(), 3, 0);
        let bytes = whole(&layout);
        assert_eq!(&bytes[bytes.len() - 4..], b"free");
    }

    #[test]
    fn huge_sizes_use_a_64_bit_free_box() {
        let layout = VideoLayout::new(Uuid::now_v7(), 15, 400_000_000);
        assert_eq!(layout.size(), 6_000_000_000);
        let mut head = vec![0u8; layout.prefix.len()];
        layout.read_at(0, &mut head);
        let free_at = head.len() - 16;
        assert_eq!(
            &head[free_at..free_at + 8],
            &[0, 0, 0, 1, b'f', b'r', b'e', b'e']
        );
        let free_size = u64::from_be_bytes(head[free_at + 8..].try_into().unwrap());
        assert_eq!(free_size + free_at as u64, layout.size());
    }
}
