//! Reading the configuration: TOML text, then the `CORELAY_<SECTION>_<KEY>` environment
//! variables written over it.

use std::collections::BTreeMap;

use super::{Config, ConfigError};

/// The sections an environment variable may name.
const SECTIONS: &[&str] = &[
    "server", "engineio", "auth", "limits", "history", "redis", "emitter", "presence", "store",
    "scylla", "log", "hooks", "feed",
];

impl Config {
    /// Parses TOML text and applies `CORELAY_*` variables from `env` (testable without a process environment).
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        let mut overrides: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("CORELAY_") else {
                continue;
            };
            let key = match rest {
                "JWT_SECRET" => "AUTH_JWT_SECRET",
                "API_KEY" => "AUTH_API_KEY",
                other => other,
            }
            .to_ascii_lowercase();
            overrides.insert(key, value);
        }
        for (key, raw) in overrides {
            let Some((section, field)) = key.split_once('_') else {
                continue;
            };
            if !SECTIONS.contains(&section) || field.is_empty() {
                continue; // Not ours (e.g. CORELAY_BIN, CORELAY_TEST_SCYLLA).
            }
            let value = env_value(&raw);
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(field.to_string(), value);
                }
                _ => return Err(ConfigError::Invalid(format!("[{section}] must be a table"))),
            }
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }
}

/// An environment value as TOML when it parses as a scalar TOML value, else as a string.
fn env_value(raw: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = format!("v = {raw}").parse();
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_))) => v,
        _ => toml::Value::String(raw.to_string()),
    }
}
