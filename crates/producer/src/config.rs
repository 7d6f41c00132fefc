//! The HTTP API's settings. Every field has a default; `config/default.toml` documents them.

use klingq_core::Secret;
use serde::{Deserialize, Deserializer, Serialize};

/// How `klingq serve` and the producer commands behave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API listens on, `host:port`.
    pub bind: String,
    /// Bearer tokens accepted by the API. Empty: no authentication, which the server allows
    /// only on a loopback address.
    #[serde(deserialize_with = "tokens")]
    pub tokens: Vec<Secret>,
    /// Largest body `POST /v1/jobs` accepts, in bytes.
    pub max_job_body_bytes: usize,
    /// Largest body `POST /v1/batches` accepts, in bytes.
    pub max_batch_body_bytes: usize,
    /// Most jobs one batch may have.
    pub max_batch_jobs: usize,
    /// One `GET /v1/events` response ends after this many seconds; clients reconnect with
    /// `Last-Event-ID` and lose nothing.
    pub events_stream_max_secs: u64,
    /// Most `GET /v1/events` streams open at once; each holds one Redis connection. Beyond it
    /// the API answers 503 with `Retry-After`.
    pub max_event_streams: usize,
    /// Secrets Runflow signs its per-run callbacks with (`whsec_…`, each used whole as the
    /// HMAC-SHA256 key); any one verifying is enough, so a rotation lists the old and the new.
    /// Empty: `POST /v1/provider/callbacks/runflow` answers 404 `callbacks_not_configured`.
    /// Filled from the `provider.callback_secret` setting.
    #[serde(deserialize_with = "callback_secrets")]
    pub callback_secrets: Vec<Secret>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".to_owned(),
            tokens: Vec::new(),
            max_job_body_bytes: 1024 * 1024,
            max_batch_body_bytes: 64 * 1024 * 1024,
            max_batch_jobs: 200_000,
            events_stream_max_secs: 300,
            max_event_streams: 64,
            callback_secrets: Vec::new(),
        }
    }
}

/// Tokens as a list, or as one comma-separated string (as `KLINGQ_API_TOKENS` gives them).
fn tokens<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Tokens {
        List(Vec<String>),
        Text(String),
    }
    let list = match Tokens::deserialize(deserializer)? {
        Tokens::List(list) => list,
        Tokens::Text(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(list
        .into_iter()
        .map(|token| token.trim().to_owned())
        .filter(|token| !token.is_empty())
        .map(Secret::new)
        .collect())
}

/// Callback secrets as a list, or as one whitespace-separated string (as
/// `KLINGQ_PROVIDER_CALLBACK_SECRET` gives them during a rotation).
fn callback_secrets<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Secrets {
        List(Vec<String>),
        Text(String),
    }
    let list = match Secrets::deserialize(deserializer)? {
        Secrets::List(list) => list,
        Secrets::Text(text) => vec![text],
    };
    Ok(list
        .iter()
        .flat_map(|secrets| secrets.split_whitespace())
        .map(Secret::new)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_read_from_a_list_or_a_comma_separated_string() {
        let from_text: ApiConfig = serde_json::from_str(r#"{"tokens": " a, b ,,"}"#).unwrap();
        let from_list: ApiConfig = serde_json::from_str(r#"{"tokens": ["a", "b"]}"#).unwrap();
        assert_eq!(from_text.tokens, vec![Secret::new("a"), Secret::new("b")]);
        assert_eq!(from_text, from_list);
        assert_eq!(
            serde_json::from_str::<ApiConfig>("{}").unwrap(),
            ApiConfig::default()
        );
    }

    #[test]
    fn callback_secrets_read_from_a_list_or_a_space_separated_string() {
        let from_text: ApiConfig =
            serde_json::from_str(r#"{"callback_secrets": " whsec_old  whsec_new "}"#).unwrap();
        let from_list: ApiConfig =
            serde_json::from_str(r#"{"callback_secrets": ["whsec_old", "", "whsec_new"]}"#)
                .unwrap();
        assert_eq!(
            from_text.callback_secrets,
            vec![Secret::new("whsec_old"), Secret::new("whsec_new")]
        );
        assert_eq!(from_text, from_list);
        assert!(!format!("{from_text:?}").contains("whsec_"));
        assert!(
            !serde_json::to_string(&from_text)
                .unwrap()
                .contains("whsec_")
        );
    }
}
