//! Configuration: one registry of settings (key, environment variable, default, meaning) from
//! which `config/default.toml` and the README's reference are generated. Values load in
//! layers: the registry's defaults, then a file given with `--config`, then environment
//! variables. A variable named `<VAR>_FILE` reads a secret from a file (Kubernetes secrets).

use std::path::Path;

use anyhow::{Context, bail};
use klingq_queue::QueueConfig;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// One setting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Setting {
    /// Dotted path in the TOML file, e.g. `queue.lease_timeout_secs`.
    pub(crate) key: &'static str,
    /// Environment variable that overrides it.
    pub(crate) env: &'static str,
    /// Default, as a TOML literal.
    pub(crate) default: &'static str,
    /// What it means, one or two sentences.
    pub(crate) doc: &'static str,
    /// Secrets are never printed.
    pub(crate) secret: bool,
}

const fn setting(
    key: &'static str,
    env: &'static str,
    default: &'static str,
    doc: &'static str,
) -> Setting {
    Setting {
        key,
        env,
        default,
        doc,
        secret: false,
    }
}

/// Every setting klingq reads. `config/default.toml` is rendered from this list
/// (`klingq config default`) and a test fails when the two drift.
pub(crate) const SETTINGS: &[Setting] = &[
    setting(
        "queue.redis_url",
        "KLINGQ_REDIS_URL",
        "\"redis://127.0.0.1:6379\"",
        "Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS). May hold a password: it is never logged.",
    ),
    setting(
        "queue.namespace",
        "KLINGQ_NAMESPACE",
        "\"klingq\"",
        "Prefix of every Redis key, used as the Cluster hash tag `{namespace}`. Separate deployments sharing a Redis use separate namespaces.",
    ),
    setting(
        "queue.queue",
        "KLINGQ_QUEUE",
        "\"videos\"",
        "Name of the video job queue inside the namespace.",
    ),
    setting(
        "queue.lease_timeout_secs",
        "KLINGQ_LEASE_TIMEOUT_SECS",
        "60",
        "A job whose worker stops renewing its lease for this long (crash, kill -9, partition) is handed to another worker.",
    ),
    setting(
        "queue.reclaim_interval_secs",
        "KLINGQ_RECLAIM_INTERVAL_SECS",
        "5",
        "How often each worker looks for jobs whose lease expired.",
    ),
    setting(
        "queue.promote_interval_ms",
        "KLINGQ_PROMOTE_INTERVAL_MS",
        "250",
        "How often due jobs (retries, not-before times) move from the delayed set to the ready streams.",
    ),
    setting(
        "queue.promote_batch",
        "KLINGQ_PROMOTE_BATCH",
        "500",
        "At most this many due jobs move per script call, so a large delayed set never stalls Redis.",
    ),
    setting(
        "queue.block_timeout_ms",
        "KLINGQ_BLOCK_TIMEOUT_MS",
        "2000",
        "How long one blocking read waits for new jobs.",
    ),
    setting(
        "queue.fetch_batch",
        "KLINGQ_FETCH_BATCH",
        "256",
        "At most this many jobs per read; never more than the worker's free slots.",
    ),
    setting(
        "queue.max_attempts",
        "KLINGQ_MAX_ATTEMPTS",
        "20",
        "Deliveries per job (crashed ones count) before it goes to the dead letters.",
    ),
    setting(
        "queue.retention_secs",
        "KLINGQ_RETENTION_SECS",
        "604800",
        "Finished job records, dead letters and finished batches expire after this long (default 7 days).",
    ),
    setting(
        "queue.idempotency_ttl_secs",
        "KLINGQ_IDEMPOTENCY_TTL_SECS",
        "86400",
        "An idempotency key returns its first job's id for this long.",
    ),
    setting(
        "queue.completion_events",
        "KLINGQ_COMPLETION_EVENTS",
        "true",
        "Whether finishing a job appends a completion event to the events stream `{namespace}:events`.",
    ),
    setting(
        "queue.events_max_len",
        "KLINGQ_EVENTS_MAX_LEN",
        "100000",
        "The events stream is trimmed to about this many entries.",
    ),
    setting(
        "queue.command_timeout_ms",
        "KLINGQ_REDIS_COMMAND_TIMEOUT_MS",
        "10000",
        "Timeout of one Redis command.",
    ),
    setting(
        "queue.enqueue_chunk",
        "KLINGQ_ENQUEUE_CHUNK",
        "1000",
        "Jobs per pipelined round trip when enqueueing a batch.",
    ),
];

/// All of klingq's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) queue: QueueConfig,
}

/// Renders `config/default.toml` from the registry: every setting, commented.
pub(crate) fn render_default_toml() -> String {
    let mut out = String::from(
        "# klingq configuration: every setting with its default.\n\
         # Generated from the settings registry (`klingq config default`); a test checks it.\n\
         # Load order: these defaults, then the file given with --config, then environment\n\
         # variables (named on each setting). `<VAR>_FILE` reads a value from a file.\n",
    );
    let mut section = "";
    for setting in SETTINGS {
        let (table, name) = setting.key.split_once('.').expect("settings are table.key");
        if table != section {
            out.push_str(&format!("\n[{table}]\n"));
            section = table;
        }
        out.push_str(&format!("# {} (env: {})\n", setting.doc, setting.env));
        out.push_str(&format!("{name} = {}\n", setting.default));
    }
    out
}

/// Loads the settings: defaults, then `file`, then the environment.
pub(crate) fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
    load_with(file, |name| std::env::var(name).ok())
}

pub(crate) fn load_with(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Settings> {
    let mut table: Table =
        toml::from_str(&render_default_toml()).expect("registry renders valid TOML");
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let overrides: Table = toml::from_str(&text)
            .with_context(|| format!("parsing config file {}", path.display()))?;
        merge(&mut table, overrides, "")?;
    }
    for setting in SETTINGS {
        let raw = match env(setting.env) {
            Some(value) => value,
            None => match env(&format!("{}_FILE", setting.env)) {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}_FILE ({path})", setting.env))?
                    .trim_end()
                    .to_owned(),
                None => continue,
            },
        };
        let current = lookup(&table, setting.key)
            .cloned()
            .unwrap_or(Value::String(String::new()));
        let value = parse_like(&current, &raw).with_context(|| {
            format!(
                "{}: {} is not a valid value for {}",
                setting.env,
                if setting.secret { "[redacted]" } else { &raw },
                setting.key
            )
        })?;
        set(&mut table, setting.key, value);
    }
    Value::Table(table)
        .try_into()
        .context("invalid configuration")
}

fn merge(base: &mut Table, overrides: Table, prefix: &str) -> anyhow::Result<()> {
    for (key, value) in overrides {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(table)) => {
                merge(base_table, table, &path)?
            }
            (Some(_), value) => {
                base.insert(key, value);
            }
            (None, _) => bail!("unknown setting {path} in the config file"),
        }
    }
    Ok(())
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let (section, name) = key.split_once('.')?;
    table.get(section)?.as_table()?.get(name)
}

fn set(table: &mut Table, key: &str, value: Value) {
    let (section, name) = key.split_once('.').expect("settings are table.key");
    if let Some(Value::Table(section)) = table.get_mut(section) {
        section.insert(name.to_owned(), value);
    }
}

/// Parses an environment value as the type of the setting's current value.
fn parse_like(current: &Value, raw: &str) -> anyhow::Result<Value> {
    Ok(match current {
        Value::Integer(_) => Value::Integer(raw.trim().parse()?),
        Value::Float(_) => Value::Float(raw.trim().parse()?),
        Value::Boolean(_) => Value::Boolean(match raw.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            other => bail!("expected true or false, got {other:?}"),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        _ => Value::String(raw.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_matches_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/default.toml");
        let on_disk = std::fs::read_to_string(path).expect("config/default.toml exists");
        assert_eq!(
            on_disk,
            render_default_toml(),
            "config/default.toml drifted from the settings registry: run `cargo run -p klingq -- config default > config/default.toml`"
        );
    }

    #[test]
    fn defaults_deserialize_and_match_the_structs() {
        let settings = load_with(None, |_| None).unwrap();
        assert_eq!(settings.queue, QueueConfig::default());
    }

    #[test]
    fn every_setting_is_overridable_from_the_environment_and_unique() {
        let mut envs = std::collections::HashSet::new();
        for setting in SETTINGS {
            assert!(envs.insert(setting.env), "{} used twice", setting.env);
            assert!(
                lookup(
                    &toml::from_str(&render_default_toml()).unwrap(),
                    setting.key
                )
                .is_some()
            );
        }
        let settings = load_with(None, |name| match name {
            "KLINGQ_NAMESPACE" => Some("prod".into()),
            "KLINGQ_LEASE_TIMEOUT_SECS" => Some("90".into()),
            "KLINGQ_COMPLETION_EVENTS" => Some("false".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(settings.queue.namespace, "prod");
        assert_eq!(settings.queue.lease_timeout_secs, 90);
        assert!(!settings.queue.completion_events);
    }

    #[test]
    fn bad_values_name_the_variable_and_the_setting() {
        let error = load_with(None, |name| {
            (name == "KLINGQ_MAX_ATTEMPTS").then(|| "many".into())
        })
        .unwrap_err();
        assert!(
            format!("{error:#}")
                .contains("KLINGQ_MAX_ATTEMPTS: many is not a valid value for queue.max_attempts")
        );
    }

    #[test]
    fn config_files_override_defaults_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("klingq-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[queue]\nmax_attempts = 5\n").unwrap();
        assert_eq!(
            load_with(Some(&good), |_| None).unwrap().queue.max_attempts,
            5
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[queue]\nmax_atempts = 5\n").unwrap();
        let error = load_with(Some(&bad), |_| None).unwrap_err();
        assert!(format!("{error:#}").contains("unknown setting queue.max_atempts"));
    }
}
