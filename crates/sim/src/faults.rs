//! Fault tokens (`[[sim:NAME]]` or `[[sim:NAME:COUNT]]` in a prompt, or `X-Sim-Fault`) and their scopes.

/// Every fault the simulator can inject, named as in prompt tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum FaultKind {
    RateLimited,
    RateLimitedDate,
    RateLimitedBare,
    InsufficientCredit,
    Conflict,
    ServerError,
    ServerErrorHtml,
    BadGateway,
    Unavailable,
    UnavailableHtml,
    GatewayTimeout,
    GatewayTimeoutAfterCreate,
    LostResponse,
    SlowCreate,
    EchoAuth,
    Moderation,
    OutputModeration,
    ProviderTimeout,
    Stuck,
    NoUrl,
    FlakyPoll,
    Poll5xx,
    PollReset,
    Poll404,
    DownloadExpired,
    Download404,
    Download5xx,
    DownloadReset,
    DownloadShort,
    DownloadWrongType,
    DownloadNotMp4,
    DownloadSlow,
    CallbackDrop,
    CallbackDuplicate,
}

/// When a token takes effect, which decides what its optional count counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FaultScope {
    /// Rejects or disturbs the create request itself; counted per distinct prompt.
    Create,
    /// Decides how the created run ends; counted per distinct prompt, unlimited by default.
    Outcome,
    /// Disturbs the first polls of the run.
    Poll,
    /// Disturbs the first downloads of the run.
    Download,
    /// Disturbs the run's callback; counted per distinct prompt, unlimited by default.
    Callback,
}

const ALL: &[(&str, FaultKind)] = &[
    ("429", FaultKind::RateLimited),
    ("429-date", FaultKind::RateLimitedDate),
    ("429-none", FaultKind::RateLimitedBare),
    ("402", FaultKind::InsufficientCredit),
    ("409", FaultKind::Conflict),
    ("500", FaultKind::ServerError),
    ("500-html", FaultKind::ServerErrorHtml),
    ("502", FaultKind::BadGateway),
    ("503", FaultKind::Unavailable),
    ("503-html", FaultKind::UnavailableHtml),
    ("504", FaultKind::GatewayTimeout),
    ("504-after-create", FaultKind::GatewayTimeoutAfterCreate),
    ("lost-response", FaultKind::LostResponse),
    ("slow-create", FaultKind::SlowCreate),
    ("echo-auth", FaultKind::EchoAuth),
    ("moderation", FaultKind::Moderation),
    ("output-moderation", FaultKind::OutputModeration),
    ("provider-timeout", FaultKind::ProviderTimeout),
    ("stuck", FaultKind::Stuck),
    ("no-url", FaultKind::NoUrl),
    ("flaky-poll", FaultKind::FlakyPoll),
    ("poll-5xx", FaultKind::Poll5xx),
    ("poll-reset", FaultKind::PollReset),
    ("poll-404", FaultKind::Poll404),
    ("download-expired", FaultKind::DownloadExpired),
    ("download-404", FaultKind::Download404),
    ("download-5xx", FaultKind::Download5xx),
    ("download-reset", FaultKind::DownloadReset),
    ("download-short", FaultKind::DownloadShort),
    ("download-wrong-type", FaultKind::DownloadWrongType),
    ("download-not-mp4", FaultKind::DownloadNotMp4),
    ("download-slow", FaultKind::DownloadSlow),
    ("callback-drop", FaultKind::CallbackDrop),
    ("callback-duplicate", FaultKind::CallbackDuplicate),
];

impl FaultKind {
    /// The token name, also used in `/__sim/runs` (`faults`) and `/__sim/stats` (`faults_injected`).
    pub(crate) fn name(self) -> &'static str {
        ALL.iter()
            .find(|(_, kind)| *kind == self)
            .map(|(name, _)| *name)
            .unwrap_or("unknown")
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        ALL.iter()
            .find(|(candidate, _)| *candidate == name)
            .map(|(_, kind)| *kind)
    }

    pub(crate) fn scope(self) -> FaultScope {
        use FaultKind::*;
        match self {
            RateLimited
            | RateLimitedDate
            | RateLimitedBare
            | InsufficientCredit
            | Conflict
            | ServerError
            | ServerErrorHtml
            | BadGateway
            | Unavailable
            | UnavailableHtml
            | GatewayTimeout
            | GatewayTimeoutAfterCreate
            | LostResponse
            | SlowCreate
            | EchoAuth => FaultScope::Create,
            Moderation | OutputModeration | ProviderTimeout | Stuck | NoUrl => FaultScope::Outcome,
            FlakyPoll | Poll5xx | PollReset | Poll404 => FaultScope::Poll,
            DownloadExpired | Download404 | Download5xx | DownloadReset | DownloadShort
            | DownloadWrongType | DownloadNotMp4 | DownloadSlow => FaultScope::Download,
            CallbackDrop | CallbackDuplicate => FaultScope::Callback,
        }
    }
}

/// A parsed token: the fault and, when written as `NAME:COUNT`, how many times it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FaultToken {
    pub(crate) kind: FaultKind,
    pub(crate) count: Option<u32>,
}

fn parse_one(raw: &str) -> Result<FaultToken, String> {
    let raw = raw.trim();
    let (name, count) = match raw.rsplit_once(':') {
        Some((name, count)) => {
            let count = count
                .parse::<u32>()
                .map_err(|_| format!("invalid count in sim fault token: {raw}"))?;
            (name, Some(count))
        }
        None => (raw, None),
    };
    let kind =
        FaultKind::from_name(name).ok_or_else(|| format!("unknown sim fault token: {name}"))?;
    Ok(FaultToken { kind, count })
}

/// Finds every `[[sim:...]]` token in a text.
pub(crate) fn parse_prompt_tokens(text: &str) -> Result<Vec<FaultToken>, String> {
    let mut tokens = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("[[sim:") {
        let after = &rest[start + "[[sim:".len()..];
        let Some(end) = after.find("]]") else {
            return Err("unterminated sim fault token".to_owned());
        };
        tokens.push(parse_one(&after[..end])?);
        rest = &after[end + 2..];
    }
    Ok(tokens)
}

/// Parses the `X-Sim-Fault` header: comma-separated token bodies such as `429,download-reset:2`.
pub(crate) fn parse_header_tokens(value: &str) -> Result<Vec<FaultToken>, String> {
    value
        .split(',')
        .filter(|part| !part.trim().is_empty())
        .map(parse_one)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_with_and_without_counts() {
        let tokens =
            parse_prompt_tokens("a cat [[sim:429]] jumps [[sim:download-reset:3]]").unwrap();
        assert_eq!(
            tokens,
            vec![
                FaultToken {
                    kind: FaultKind::RateLimited,
                    count: None
                },
                FaultToken {
                    kind: FaultKind::DownloadReset,
                    count: Some(3)
                },
            ]
        );
        assert!(parse_prompt_tokens("plain prompt").unwrap().is_empty());
    }

    #[test]
    fn rejects_unknown_and_malformed_tokens() {
        assert!(parse_prompt_tokens("[[sim:bogus]]").is_err());
        assert!(parse_prompt_tokens("[[sim:429").is_err());
        assert!(parse_prompt_tokens("[[sim:429:x]]").is_err());
    }

    #[test]
    fn every_name_round_trips() {
        for (name, kind) in ALL {
            assert_eq!(kind.name(), *name);
            assert_eq!(FaultKind::from_name(name), Some(*kind));
        }
    }

    #[test]
    fn header_tokens_split_on_commas() {
        let tokens = parse_header_tokens("429-date, lost-response:2").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens[1],
            FaultToken {
                kind: FaultKind::LostResponse,
                count: Some(2)
            }
        );
    }
}
