//! Addresses and options, with defaults and environment overrides.

use saga_core::redact::redact_url;

/// Where RabbitMQ is and how the transport uses it. Its `Debug` output masks
/// the password of [`url`](Self::url).
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost`. Default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Prepended to every exchange and queue this transport declares.
    pub prefix: String,
    /// Unacknowledged deliveries a member holds at once (`basic.qos`).
    pub prefetch: u16,
    /// Deliveries after which a message goes to the dead-letter exchange.
    pub max_deliveries: u32,
    /// One active member per group, the others on hot standby
    /// (`x-single-active-consumer`): keeps the order per ordering key, at the
    /// price of not sharing a group's work. Off by default.
    pub single_active_consumer: bool,
}

impl std::fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("prefetch", &self.prefetch)
            .field("max_deliveries", &self.max_deliveries)
            .field("single_active_consumer", &self.single_active_consumer)
            .finish()
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: String::new(),
            prefetch: 32,
            max_deliveries: 5,
            single_active_consumer: false,
        }
    }
}

impl AmqpConfig {
    /// The defaults with the address from `AMQP_URL` when it is set.
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Ok(url) = std::env::var("AMQP_URL") {
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

    /// Sets the name prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the prefetch count.
    #[must_use]
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Sets the deliveries after which a message is dead-lettered.
    #[must_use]
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Turns single active consumer on or off.
    #[must_use]
    pub fn single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// The exchange of `channel`.
    pub(crate) fn exchange(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }

    /// The queue of `group` on `channel`.
    pub(crate) fn group_queue(&self, channel: &str, group: &str) -> String {
        format!("{}{channel}/{group}", self.prefix)
    }
}
