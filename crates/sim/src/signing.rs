//! Presigned download URLs (HMAC-SHA256 over the run id and the expiry, with a per-simulator
//! secret) and the `Runflow-Signature` of callbacks.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

type HmacSha256 = Hmac<Sha256>;

/// The signing key of one simulator instance; never logged.
#[derive(Clone)]
pub(crate) struct UrlSigner {
    secret: [u8; 32],
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("UrlSigner(<redacted>)")
    }
}

impl UrlSigner {
    pub(crate) fn random() -> Self {
        Self {
            secret: rand::random(),
        }
    }

    fn mac(&self, run_id: Uuid, exp: u64) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("hmac accepts any key length");
        mac.update(format!("{run_id}:{exp}").as_bytes());
        mac
    }

    /// The hex signature for a run id and expiry (unix seconds).
    pub(crate) fn sign(&self, run_id: Uuid, exp: u64) -> String {
        hex::encode(self.mac(run_id, exp).finalize().into_bytes())
    }

    /// Constant-time check of a hex signature.
    pub(crate) fn verify(&self, run_id: Uuid, exp: u64, signature_hex: &str) -> bool {
        match hex::decode(signature_hex) {
            Ok(signature) => self.mac(run_id, exp).verify_slice(&signature).is_ok(),
            Err(_) => false,
        }
    }

    /// The full download URL of a run's video.
    pub(crate) fn url(&self, base_url: &str, run_id: Uuid, exp: u64) -> String {
        format!(
            "{base_url}/files/{run_id}.mp4?exp={exp}&sig={}",
            self.sign(run_id, exp)
        )
    }
}

/// The `Runflow-Signature` of a callback: lowercase hex HMAC-SHA256 over the raw body, keyed with
/// the secret string's bytes exactly as issued (the whole `whsec_…`, no base64 decoding).
pub(crate) fn callback_signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("hmac accepts any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_signatures_are_lowercase_hex_hmac_sha256() {
        // The well-known vector: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
        assert_eq!(
            callback_signature("key", b"The quick brown fox jumps over the lazy dog"),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        let signature = callback_signature("whsec_abc", b"{}");
        assert_eq!(signature.len(), 64);
        assert!(
            signature
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn signatures_verify_only_for_the_same_id_and_expiry() {
        let signer = UrlSigner::random();
        let id = Uuid::now_v7();
        let signature = signer.sign(id, 100);
        assert!(signer.verify(id, 100, &signature));
        assert!(!signer.verify(id, 101, &signature));
        assert!(!signer.verify(Uuid::now_v7(), 100, &signature));
        assert!(!signer.verify(id, 100, "zz"));
        assert!(!UrlSigner::random().verify(id, 100, &signature));
    }
}
