//! Standard Webhooks signatures: secrets (`whsec_…`), signing what we send, and verifying
//! what a receiver got.
//!
//! The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 with the
//! decoded secret, base64, prefixed `v1,`. Several active secrets (a rotation) give several
//! space-separated signatures; a receiver accepts the request if any of them verifies.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use klingq_core::Secret;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a presented secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Header carrying the event id, constant across retries.
pub const HEADER_ID: &str = "webhook-id";
/// The W3C Trace Context header of a delivery (not signed): the delivery's span in the trace
/// of the job the event is about.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// Header carrying this attempt's time, in Unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// How far a request's timestamp may be from the receiver's clock, either way.
pub const TIMESTAMP_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Fewest bytes a secret decodes to (192 bits), as Standard Webhooks requires.
pub const MIN_SECRET_BYTES: usize = 24;
/// Most bytes a secret decodes to (512 bits).
pub const MAX_SECRET_BYTES: usize = 64;

/// A secret's text is not a usable signing key. Never carries the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret is not base64 (expected whsec_<base64>)")]
    NotBase64,
    #[error("secret decodes to {0} bytes; it needs at least {MIN_SECRET_BYTES}")]
    TooShort(usize),
    #[error("secret decodes to {0} bytes; at most {MAX_SECRET_BYTES} are allowed")]
    TooLong(usize),
}

/// A decoded signing key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

impl WebhookSecret {
    /// Parses `whsec_<base64>` (the prefix is optional), 24 to 64 bytes once decoded.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = STANDARD
            .decode(encoded)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
            .map_err(|_| SecretError::NotBase64)?;
        Self::from_bytes(key)
    }

    pub fn from_bytes(key: Vec<u8>) -> Result<Self, SecretError> {
        match key.len() {
            n if n < MIN_SECRET_BYTES => Err(SecretError::TooShort(n)),
            n if n > MAX_SECRET_BYTES => Err(SecretError::TooLong(n)),
            _ => Ok(Self { key }),
        }
    }

    /// A new random 32-byte secret.
    pub fn generate() -> Self {
        let key: [u8; 32] = rand::random();
        Self { key: key.to_vec() }
    }

    /// The secret as it is presented to a receiver: `whsec_<base64>`, wrapped so it does not
    /// print by accident.
    pub fn to_whsec(&self) -> Secret {
        Secret::new(format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.key)))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("hmac takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// Parses a list of secrets separated by spaces or commas (a rotation: all sign, any
/// verifies). Empty text gives an empty list.
pub fn parse_secrets(text: &str) -> Result<Vec<WebhookSecret>, SecretError> {
    text.split([' ', ',', '\n', '\t'])
        .filter(|part| !part.trim().is_empty())
        .map(WebhookSecret::parse)
        .collect()
}

/// One signature: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", STANDARD.encode(secret.mac(id, timestamp, body)))
}

/// The `webhook-signature` header value: one signature per secret, space-separated.
pub fn signature_header(
    secrets: &[WebhookSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    secrets
        .iter()
        .map(|secret| sign(secret, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a request did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is not valid text")]
    InvalidHeader(&'static str),
    #[error("webhook-timestamp is not an integer number of seconds")]
    InvalidTimestamp,
    #[error("timestamp too old: {0} s before now (tolerance 300 s)")]
    TimestampTooOld(i64),
    #[error("timestamp too new: {0} s after now (tolerance 300 s)")]
    TimestampTooNew(i64),
    #[error("no secret to verify with")]
    NoSecrets,
    #[error("invalid secret: {0}")]
    InvalidSecret(#[from] SecretError),
    #[error("webhook-signature has no v1 signature")]
    NoSignature,
    #[error("no signature matches")]
    NoMatch,
}

/// The three Standard Webhooks headers of a request, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedHeaders<'a> {
    pub id: &'a str,
    pub timestamp: &'a str,
    pub signature: &'a str,
}

impl<'a> SignedHeaders<'a> {
    /// Reads `webhook-id`, `webhook-timestamp` and `webhook-signature` from a header map.
    pub fn from_headers(headers: &'a http::HeaderMap) -> Result<Self, VerifyError> {
        let get = |name: &'static str| -> Result<&'a str, VerifyError> {
            headers
                .get(name)
                .ok_or(VerifyError::MissingHeader(name))?
                .to_str()
                .map_err(|_| VerifyError::InvalidHeader(name))
        };
        Ok(Self {
            id: get(HEADER_ID)?,
            timestamp: get(HEADER_TIMESTAMP)?,
            signature: get(HEADER_SIGNATURE)?,
        })
    }
}

/// Verifies a received webhook: the timestamp is within five minutes of `now_unix` (either
/// way), and some `v1,` signature of the header matches some secret, compared in constant
/// time. `body` must be the raw bytes received, not a re-serialization.
pub fn verify(
    secrets: &[WebhookSecret],
    headers: &SignedHeaders<'_>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    if secrets.is_empty() {
        return Err(VerifyError::NoSecrets);
    }
    let timestamp: i64 = headers
        .timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::InvalidTimestamp)?;
    let tolerance = TIMESTAMP_TOLERANCE.as_secs() as i64;
    if now_unix.saturating_sub(timestamp) > tolerance {
        return Err(VerifyError::TimestampTooOld(now_unix - timestamp));
    }
    if timestamp.saturating_sub(now_unix) > tolerance {
        return Err(VerifyError::TimestampTooNew(timestamp - now_unix));
    }
    let candidates: Vec<Vec<u8>> = headers
        .signature
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, encoded)| STANDARD.decode(encoded).ok())
        .collect();
    if candidates.is_empty() {
        return Err(VerifyError::NoSignature);
    }
    let mut matched = subtle::Choice::from(0);
    for secret in secrets {
        let expected = secret.mac(headers.id, timestamp, body);
        for candidate in &candidates {
            matched |= expected.as_slice().ct_eq(candidate.as_slice());
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

/// [`verify`] with secrets as text (`whsec_…`, as a user types them), for the CLI.
pub fn verify_with_text_secrets(
    secrets: &[String],
    headers: &SignedHeaders<'_>,
    body: &[u8],
    now_unix: i64,
) -> Result<(), VerifyError> {
    let mut parsed = Vec::new();
    for text in secrets {
        parsed.extend(parse_secrets(text)?);
    }
    verify(&parsed, headers, body, now_unix)
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from the Standard Webhooks specification's reference libraries.
    const VECTORS: [(&str, &str, i64, &str, &str); 2] = [
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
    ];

    fn headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id,
            timestamp,
            signature,
        }
    }

    #[test]
    fn specification_vectors_sign_and_verify() {
        for (secret, id, timestamp, body, signature) in VECTORS {
            let secret = WebhookSecret::parse(secret).unwrap();
            assert_eq!(sign(&secret, id, timestamp, body.as_bytes()), signature);
            let ts = timestamp.to_string();
            verify(
                std::slice::from_ref(&secret),
                &headers(id, &ts, signature),
                body.as_bytes(),
                timestamp,
            )
            .unwrap();
            // Within the tolerance both ways, and not a second past it.
            for now in [timestamp - 300, timestamp + 300] {
                verify(
                    std::slice::from_ref(&secret),
                    &headers(id, &ts, signature),
                    body.as_bytes(),
                    now,
                )
                .unwrap();
            }
            assert_eq!(
                verify(
                    std::slice::from_ref(&secret),
                    &headers(id, &ts, signature),
                    body.as_bytes(),
                    timestamp + 301
                ),
                Err(VerifyError::TimestampTooOld(301))
            );
            assert_eq!(
                verify(
                    std::slice::from_ref(&secret),
                    &headers(id, &ts, signature),
                    body.as_bytes(),
                    timestamp - 301
                ),
                Err(VerifyError::TimestampTooNew(301))
            );
        }
    }

    #[test]
    fn tampering_fails_and_any_of_several_signatures_passes() {
        let (secret, id, timestamp, body, signature) = VECTORS[0];
        let secret = WebhookSecret::parse(secret).unwrap();
        let ts = timestamp.to_string();
        let secrets = [secret];
        let check = |id: &str, ts: &str, sig: &str, body: &str| {
            verify(&secrets, &headers(id, ts, sig), body.as_bytes(), timestamp)
        };
        assert_eq!(
            check(id, &ts, signature, r#"{"test": 2432232315}"#),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check("msg_other", &ts, signature, body),
            Err(VerifyError::NoMatch)
        );
        let later = (timestamp + 1).to_string();
        assert_eq!(
            check(id, &later, signature, body),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            check(
                id,
                &ts,
                "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                body
            ),
            Err(VerifyError::NoSignature)
        );
        assert_eq!(
            check(id, "soon", signature, body),
            Err(VerifyError::InvalidTimestamp)
        );
        let several = format!(
            "v1,tFtCZ5RDCPxzWQRWXWPgrCgE2frDBe9gjpbWQxnVfsQ= v1a,abc {signature} v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q="
        );
        check(id, &ts, &several, body).unwrap();
        assert_eq!(
            verify(
                &[],
                &headers(id, &ts, signature),
                body.as_bytes(),
                timestamp
            ),
            Err(VerifyError::NoSecrets)
        );
    }

    #[test]
    fn rotation_signs_with_every_secret_and_either_verifies() {
        let old = WebhookSecret::generate();
        let new = WebhookSecret::generate();
        let header = signature_header(&[old.clone(), new.clone()], "evt_1", 1_700_000_000, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        for secret in [old, new] {
            verify(
                &[secret],
                &headers("evt_1", "1700000000", &header),
                b"{}",
                1_700_000_000,
            )
            .unwrap();
        }
        assert_eq!(
            verify(
                &[WebhookSecret::generate()],
                &headers("evt_1", "1700000000", &header),
                b"{}",
                1_700_000_000
            ),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ="),
            Err(SecretError::TooShort(5))
        );
        assert_eq!(
            WebhookSecret::parse("whsec_!!"),
            Err(SecretError::NotBase64)
        );
        let long = base64::engine::general_purpose::STANDARD.encode([7u8; 65]);
        assert_eq!(
            WebhookSecret::parse(&format!("whsec_{long}")),
            Err(SecretError::TooLong(65))
        );
        let secret = WebhookSecret::generate();
        let text = secret.to_whsec();
        assert!(text.expose().starts_with("whsec_"));
        assert_eq!(WebhookSecret::parse(text.expose()).unwrap(), secret);
        assert_eq!(
            format!("{secret:?} {text:?}"),
            "WebhookSecret([redacted]) [redacted]"
        );
        let both = format!(
            "{} {}",
            text.expose(),
            WebhookSecret::generate().to_whsec().expose()
        );
        assert_eq!(parse_secrets(&both).unwrap().len(), 2);
        assert!(parse_secrets("  ").unwrap().is_empty());
    }

    #[test]
    fn headers_are_read_from_a_header_map() {
        let mut map = http::HeaderMap::new();
        map.insert(HEADER_ID, "evt_1".parse().unwrap());
        map.insert(HEADER_TIMESTAMP, "1".parse().unwrap());
        assert_eq!(
            SignedHeaders::from_headers(&map),
            Err(VerifyError::MissingHeader(HEADER_SIGNATURE))
        );
        map.insert(HEADER_SIGNATURE, "v1,x".parse().unwrap());
        let read = SignedHeaders::from_headers(&map).unwrap();
        assert_eq!(
            (read.id, read.timestamp, read.signature),
            ("evt_1", "1", "v1,x")
        );
    }
}
