//! `[feed]`: where the backend's feed goes (PROTOCOL.md, "Feed"). Off unless `feed.url`
//! is set. The feed signs with `hooks.secret`, like the hooks.

use std::time::Duration;

use serde::Deserialize;

use super::{BackendUrl, HumanDuration};

/// The `[feed]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Where the batches are POSTed, `http://…` or `https://…` (unset: no feed).
    pub url: Option<String>,
    /// Which events the feed carries. `message` (every acked message, at least once, in
    /// order per room) is the only kind so far, and the default.
    pub events: Vec<String>,
    /// Limit on one batch's whole POST; past it the batch is tried again.
    pub timeout: HumanDuration,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            url: None,
            events: vec!["message".into()],
            timeout: HumanDuration(Duration::from_secs(5)),
        }
    }
}

impl FeedConfig {
    /// Whether the feed is on.
    pub fn enabled(&self) -> bool {
        self.url.is_some()
    }

    /// The checks serde cannot make.
    pub(super) fn validate(&self) -> Result<(), String> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        BackendUrl::parse(url).map_err(|e| format!("feed.url {url:?}: {e}"))?;
        if self.timeout.0.is_zero() {
            return Err("feed.timeout must be positive".into());
        }
        if let Some(other) = self.events.iter().find(|e| e.as_str() != "message") {
            return Err(format!(
                "feed.events: {other:?} is not a feed event; the feed carries \"message\" events"
            ));
        }
        Ok(())
    }
}
