//! Addresses and options, with defaults and environment overrides.

use std::time::Duration;

/// Where Kafka is and how the transport uses it. Its `Debug` output masks
/// the secrets among [`extra`](Self::extra) (`sasl.password`, ...).
#[derive(Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Prepended to every topic name.
    pub prefix: String,
    /// Partitions of the topics this transport creates.
    pub partitions: i32,
    /// Replication factor of the topics this transport creates.
    pub replication: i32,
    /// Deliveries to one member after which a message goes to the dead-letter
    /// topic. Kafka keeps no delivery count: the count lives in the member
    /// and starts again when another member takes the partition over.
    pub max_deliveries: u32,
    /// How long a publish may wait for the broker's acknowledgement
    /// (`message.timeout.ms`).
    pub publish_timeout: Duration,
    /// `session.timeout.ms`: after this long without a heartbeat a member
    /// leaves its group and its partitions move to the others.
    pub session_timeout: Duration,
    /// How often a member commits the offsets its acks stored
    /// (`auto.commit.interval.ms`); it also commits them when a partition
    /// is taken away from it or it stops. A member that dies without
    /// stopping has the acks of at most this long delivered again to the
    /// partition's next owner. Committing on every ack instead flooded the
    /// group coordinator: its heartbeats queued behind thousands of
    /// commits, the member's session timed out, and it spent minutes out of
    /// its group. Default 1 s.
    pub commit_interval: Duration,
    /// Extra librdkafka properties for producers and consumers alike.
    pub extra: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(key, value)| (key.as_str(), saga_core::redact::redact_property(key, value)))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &saga_core::redact::redact_url(&self.brokers))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("max_deliveries", &self.max_deliveries)
            .field("publish_timeout", &self.publish_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("extra", &extra)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            prefix: String::new(),
            partitions: 8,
            replication: 1,
            max_deliveries: 5,
            publish_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            extra: Vec::new(),
        }
    }
}

impl KafkaConfig {
    /// The defaults with the brokers from `KAFKA_BROKERS` when it is set.
    pub fn from_env() -> Self {
        let mut config = Self::default();
        if let Ok(brokers) = std::env::var("KAFKA_BROKERS") {
            config.brokers = brokers;
        }
        config
    }

    /// Sets the bootstrap servers.
    #[must_use]
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = brokers.into();
        self
    }

    /// Sets the topic prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the partitions of created topics.
    #[must_use]
    pub fn partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// Sets the replication factor of created topics.
    #[must_use]
    pub fn replication(mut self, replication: i32) -> Self {
        self.replication = replication.max(1);
        self
    }

    /// Sets the deliveries after which a message is dead-lettered.
    #[must_use]
    pub fn max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// Sets the session timeout.
    #[must_use]
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Sets how often a member commits what its acks stored.
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Adds a librdkafka property.
    #[must_use]
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), value.into()));
        self
    }

    /// The topic of `channel`.
    pub(crate) fn topic(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}
