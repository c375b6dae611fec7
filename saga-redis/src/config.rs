//! Addresses and options, with defaults and environment overrides.

use std::time::Duration;

/// Where Redis is and how the transport and the idempotency store use it.
/// Its `Debug` output masks the password of [`url`](Self::url).
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prepended to every key this crate writes (streams, records, locks).
    pub prefix: String,
    /// Approximate `MAXLEN ~` for every `XADD`; `None` keeps every entry.
    /// Trimming drops entries a slow group has not read yet: size it above the
    /// largest backlog you accept.
    pub max_len: Option<usize>,
    /// How long one `XREADGROUP` blocks waiting for new entries.
    pub block: Duration,
    /// Entries read per `XREADGROUP` and per `XAUTOCLAIM`.
    pub batch: usize,
    /// How long an entry stays pending with a consumer before another member
    /// of the group takes it over (`XAUTOCLAIM` min-idle-time): the time after
    /// which a dead consumer's work moves on. Keep it above your slowest handler.
    pub reclaim_idle: Duration,
    /// Deliveries after which a message goes to the dead-letter stream.
    pub max_deliveries: u32,
    /// A group member idle this long with nothing pending is removed from
    /// the group (`XGROUP DELCONSUMER`), so restarts do not pile up members.
    pub forget_idle: Duration,
    /// How long one command may take before it fails as retryable.
    pub response_timeout: Duration,
    /// How long the idempotency store keeps a record (Redis expiry).
    pub retention: Duration,
    /// How long an idempotency lock protects an open transaction; a
    /// transaction that runs longer fails at commit, and is retried.
    pub lock_timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &saga_core::redact::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("max_len", &self.max_len)
            .field("block", &self.block)
            .field("batch", &self.batch)
            .field("reclaim_idle", &self.reclaim_idle)
            .field("max_deliveries", &self.max_deliveries)
            .field("forget_idle", &self.forget_idle)
            .field("response_timeout", &self.response_timeout)
            .field("retention", &self.retention)
            .field("lock_timeout", &self.lock_timeout)
            .finish()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: String::new(),
            max_len: None,
            block: Duration::from_secs(1),
            batch: 32,
            reclaim_idle: Duration::from_secs(30),
            max_deliveries: 5,
            forget_idle: Duration::from_secs(3600),
            response_timeout: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            lock_timeout: Duration::from_secs(30),
        }
    }
}

impl RedisConfig {
    /// The defaults with the address from `REDIS_URL` when it is set.
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Ok(url) = std::env::var("REDIS_URL") {
            config.url = url;
        }
        config
    }

    /// Sets the address.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sets the key prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Trims every stream to about `max_len` entries.
    #[must_use]
    pub fn max_len(mut self, max_len: usize) -> Self {
        self.max_len = Some(max_len);
        self
    }

    /// Sets how long one read blocks.
    #[must_use]
    pub fn block(mut self, block: Duration) -> Self {
        self.block = block;
        self
    }

    /// Sets how many entries one read returns at most.
    #[must_use]
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sets the idle time after which a pending entry is taken over.
    #[must_use]
    pub fn reclaim_idle(mut self, idle: Duration) -> Self {
        self.reclaim_idle = idle;
        self
    }

    /// Sets the deliveries after which a message is dead-lettered.
    #[must_use]
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Sets the idle time after which a member with nothing pending is removed.
    #[must_use]
    pub fn forget_idle(mut self, idle: Duration) -> Self {
        self.forget_idle = idle;
        self
    }

    /// Sets how long the idempotency store keeps a record.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sets how long an idempotency lock lives.
    #[must_use]
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}
