//! Frame values. Control frames are bincode-encoded structs; PUBLISH and DATA are borrowed views
//! over the receive buffer so that decoding them allocates nothing.

use bincode::{Decode, Encode};

/// DATA flag: this value comes from the retained snapshot sent after SUBSCRIBE.
pub const DATA_FLAG_SNAPSHOT: u8 = 0b0000_0001;
/// DATA flag: this retained value was loaded from the engine's snapshot file at start: it was
/// published before the engine restarted, and its `seq` is 0 (not part of this run's numbering).
/// Always sent together with [`DATA_FLAG_SNAPSHOT`].
pub const DATA_FLAG_RESTORED: u8 = 0b0000_0100;

/// Numeric codes carried by ERROR frames. Stable: clients match on them.
pub mod error_code {
    /// The frame could not be decoded (bad kind, truncated body, bad UTF-8, ...).
    pub const MALFORMED: u16 = 1;
    /// The frame's length prefix exceeds the engine's `max_frame_bytes`.
    pub const FRAME_TOO_LARGE: u16 = 2;
    /// The first frame was not HELLO, or HELLO came twice.
    pub const HANDSHAKE: u16 = 3;
    /// The client's protocol version is not supported.
    pub const VERSION: u16 = 4;
    /// No HELLO within the handshake timeout.
    pub const HANDSHAKE_TIMEOUT: u16 = 5;
    /// Nothing heard from the peer for 1.5x its keep-alive.
    pub const KEEPALIVE_TIMEOUT: u16 = 6;
    /// Invalid topic or pattern.
    pub const BAD_TOPIC: u16 = 7;
    /// Too many subscriptions on this connection.
    pub const TOO_MANY_SUBSCRIPTIONS: u16 = 8;
    /// The engine is at `max_connections`.
    pub const TOO_MANY_CONNECTIONS: u16 = 9;
    /// The subscriber fell too far behind and its policy is `disconnect`.
    pub const SLOW_CONSUMER: u16 = 10;
    /// UNSUBSCRIBE named a subscription id that does not exist, or SUBSCRIBE reused one.
    pub const UNKNOWN_SUBSCRIPTION: u16 = 11;
    /// The engine is shutting down.
    pub const SHUTTING_DOWN: u16 = 12;
    /// The frame kind is valid but not allowed from a client (e.g. DATA, WELCOME).
    pub const UNEXPECTED_FRAME: u16 = 13;
    /// The engine cannot answer this request now (e.g. too many STATS requests queued); the
    /// connection stays open and may ask again.
    pub const BUSY: u16 = 14;
    /// A PUBLISH to a new topic while the engine holds `limits.max_topics`; the connection
    /// stays open and known topics go on.
    pub const TOO_MANY_TOPICS: u16 = 15;
    /// HELLO's credentials are missing, unknown or wrong, or this engine cannot check more of
    /// them now; the connection is closed.
    pub const UNAUTHENTICATED: u16 = 16;
    /// The identity may not PUBLISH to this topic or SUBSCRIBE to this pattern; the connection
    /// stays open.
    pub const FORBIDDEN: u16 = 17;
    /// HELLO's client id is held by a connection of another identity (refused, closed), or a
    /// newer connection of the same identity took it over (the older one is closed).
    pub const CLIENT_ID_IN_USE: u16 = 18;
    /// The connection publishes faster than `limits.max_publish_rate_per_s`: PUBLISHes are
    /// dropped until it slows down; the connection stays open.
    pub const RATE_LIMITED: u16 = 19;

    /// The symbolic name of a code, for logs.
    pub fn name(code: u16) -> &'static str {
        match code {
            MALFORMED => "MALFORMED",
            FRAME_TOO_LARGE => "FRAME_TOO_LARGE",
            HANDSHAKE => "HANDSHAKE",
            VERSION => "VERSION",
            HANDSHAKE_TIMEOUT => "HANDSHAKE_TIMEOUT",
            KEEPALIVE_TIMEOUT => "KEEPALIVE_TIMEOUT",
            BAD_TOPIC => "BAD_TOPIC",
            TOO_MANY_SUBSCRIPTIONS => "TOO_MANY_SUBSCRIPTIONS",
            TOO_MANY_CONNECTIONS => "TOO_MANY_CONNECTIONS",
            SLOW_CONSUMER => "SLOW_CONSUMER",
            UNKNOWN_SUBSCRIPTION => "UNKNOWN_SUBSCRIPTION",
            SHUTTING_DOWN => "SHUTTING_DOWN",
            UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
            BUSY => "BUSY",
            TOO_MANY_TOPICS => "TOO_MANY_TOPICS",
            UNAUTHENTICATED => "UNAUTHENTICATED",
            FORBIDDEN => "FORBIDDEN",
            CLIENT_ID_IN_USE => "CLIENT_ID_IN_USE",
            RATE_LIMITED => "RATE_LIMITED",
            _ => "UNKNOWN",
        }
    }
}

/// HELLO feature bits (docs/PROTOCOL.md §4): what a client asks the engine to add to its
/// answers. Unknown bits are ignored, so a client may ask for more than an engine knows.
pub mod hello_features {
    /// Append the engine's software version to WELCOME ([`super::Welcome::engine_version`]).
    pub const ENGINE_VERSION: u32 = 1;
}

/// First frame from a client.
///
/// `token` and `features` are optional trailing fields (docs/PROTOCOL.md §4): an empty token
/// and no features are not written, so a HELLO without credentials is byte for byte what
/// version 1 clients always sent, and a HELLO that ends after `keepalive_ms` decodes with an
/// empty token and no features. Features follow the token, which is then written even when
/// empty. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Hello {
    pub version: u16,
    /// Free-form name used in logs and stats (e.g. `plc-gw-7`).
    pub client_id: String,
    /// How often the client promises to send something (a PING at least); 0 asks for the
    /// engine's default.
    pub keepalive_ms: u32,
    /// Credentials, `user:secret`; empty for none (anonymous).
    pub token: String,
    /// [`hello_features`] bits; 0 for none.
    pub features: u32,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("keepalive_ms", &self.keepalive_ms)
            .field(
                "token",
                &if self.token.is_empty() {
                    "<none>"
                } else {
                    "<redacted>"
                },
            )
            .field("features", &self.features)
            .finish()
    }
}

impl Encode for Hello {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.version.encode(encoder)?;
        self.client_id.encode(encoder)?;
        self.keepalive_ms.encode(encoder)?;
        if !self.token.is_empty() || self.features != 0 {
            self.token.encode(encoder)?;
        }
        if self.features != 0 {
            self.features.encode(encoder)?;
        }
        Ok(())
    }
}

impl<Context> Decode<Context> for Hello {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        use bincode::de::read::Reader;
        let version = u16::decode(decoder)?;
        let client_id = String::decode(decoder)?;
        let keepalive_ms = u32::decode(decoder)?;
        // The optional trailing token, then features: present when the body goes on. Frames
        // are decoded from a slice, whose reader can tell; a reader that cannot peek sees none.
        let token = if decoder.reader().peek_read(1).is_some() {
            String::decode(decoder)?
        } else {
            String::new()
        };
        let features = if decoder.reader().peek_read(1).is_some() {
            u32::decode(decoder)?
        } else {
            0
        };
        Ok(Hello {
            version,
            client_id,
            keepalive_ms,
            token,
            features,
        })
    }
}
bincode::impl_borrow_decode!(Hello);

/// The engine's answer to HELLO: what it accepted and its limits.
///
/// `engine_version` is an optional trailing field, written only when HELLO asked for it
/// ([`hello_features::ENGINE_VERSION`]): a version-1 client that never asks refuses trailing
/// bytes, so it never gets any.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Welcome {
    pub version: u16,
    /// The keep-alive in force; the engine closes the connection after 1.5x this of silence.
    pub keepalive_ms: u32,
    pub max_frame_bytes: u32,
    pub max_subscriptions: u32,
    /// Index of the reactor thread that owns this connection (diagnostics and tests).
    pub reactor: u16,
    /// Engine-wide connection id.
    pub connection_id: u64,
    /// Identifies this run of the engine (it changes at every start). Sequence numbers, the
    /// retained values and the replay ring belong to one run: a client that reconnects and sees
    /// another `engine_id` must not resume from its old positions.
    pub engine_id: u64,
    /// The engine's software version (`0.1.0`); empty when HELLO did not ask for it.
    pub engine_version: String,
}

impl Encode for Welcome {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.version.encode(encoder)?;
        self.keepalive_ms.encode(encoder)?;
        self.max_frame_bytes.encode(encoder)?;
        self.max_subscriptions.encode(encoder)?;
        self.reactor.encode(encoder)?;
        self.connection_id.encode(encoder)?;
        self.engine_id.encode(encoder)?;
        if !self.engine_version.is_empty() {
            self.engine_version.encode(encoder)?;
        }
        Ok(())
    }
}

impl<Context> Decode<Context> for Welcome {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        use bincode::de::read::Reader;
        let mut welcome = Welcome {
            version: u16::decode(decoder)?,
            keepalive_ms: u32::decode(decoder)?,
            max_frame_bytes: u32::decode(decoder)?,
            max_subscriptions: u32::decode(decoder)?,
            reactor: u16::decode(decoder)?,
            connection_id: u64::decode(decoder)?,
            engine_id: u64::decode(decoder)?,
            engine_version: String::new(),
        };
        if decoder.reader().peek_read(1).is_some() {
            welcome.engine_version = String::decode(decoder)?;
        }
        Ok(welcome)
    }
}
bincode::impl_borrow_decode!(Welcome);

/// How a subscription wants its messages when it cannot keep up.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// The engine's configured default.
    Default,
    /// Every message in per-topic order; on overflow catch up from the replay ring or get a GAP.
    All,
    /// Per-topic conflation: the newest value always arrives, superseded ones may be skipped.
    Latest,
    /// Cut the connection with SLOW_CONSUMER on overflow.
    Disconnect,
}

/// A resume position: the last sequence number the client saw on a topic.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TopicPosition {
    pub topic: String,
    pub last_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Subscribe {
    /// Client-chosen id, unique on the connection; UNSUBSCRIBE and SUBACK name it.
    pub sub_id: u32,
    pub pattern: String,
    pub mode: DeliveryMode,
    /// Positions to resume from. Empty: send the retained snapshot, then live.
    pub resume: Vec<TopicPosition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Unsubscribe {
    pub sub_id: u32,
}

/// Sent once a subscription is in the index: every later publish that matches will arrive.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SubAck {
    pub sub_id: u32,
    pub mode: DeliveryMode,
}

/// Messages `from_seq ..= to_seq` of `topic` are lost for this subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Gap {
    pub topic: String,
    pub from_seq: u64,
    pub to_seq: u64,
}

/// ERROR: a numeric code from [`error_code`] and a reason for humans.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct WireError {
    pub code: u16,
    pub reason: String,
}

/// A PUBLISH frame, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRef<'a> {
    pub topic: &'a str,
    /// Source timestamp, ns since the UNIX epoch (0 if the source has no clock).
    pub source_ts_ns: u64,
    /// Quality flag as the source reports it (OPC-style: 0 bad .. 192 good); opaque to the engine.
    pub quality: u8,
    pub payload: &'a [u8],
}

/// The fixed header of a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataHeader {
    /// Per-topic sequence number, 1 for the first message the engine saw on the topic.
    pub seq: u64,
    pub source_ts_ns: u64,
    /// When the engine took the message in, ns since the UNIX epoch.
    pub ingest_ts_ns: u64,
    pub quality: u8,
    /// `DATA_FLAG_*` bits.
    pub flags: u8,
}

/// One decoded frame. Hot-path frames borrow from the input; control frames own their fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello(Hello),
    Welcome(Welcome),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    SubAck(SubAck),
    Publish(PublishRef<'a>),
    Data {
        header: DataHeader,
        topic: &'a str,
        payload: &'a [u8],
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Publisher acknowledgements on (docs/PROTOCOL.md §5.8): the connection's next PUBLISH is
    /// message `next_seq` of publisher `publisher_id`, and every later one the next number.
    AckRequest {
        publisher_id: u64,
        next_seq: u64,
    },
    /// Every PUBLISH of the connection numbered up to `seq` has been handled: taken by the
    /// engine, or refused with an ERROR sent before this frame, or dropped as a duplicate.
    Ack {
        seq: u64,
    },
    Error(WireError),
    Gap(Gap),
    StatsRequest,
    /// Engine counters as a JSON document (UTF-8).
    Stats(String),
    /// The multicast frames (docs/PROTOCOL.md §12).
    Multicast(Mcast<'a>),
}

/// The multicast frames: a receiver's requests and the engine's answers over the TCP session
/// (docs/PROTOCOL.md §12). One variant of [`Frame`], so older code matches them in one arm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mcast<'a> {
    /// Client: "I receive by multicast": the engine answers CHANNELS, and from then on this
    /// connection's subscriptions get carried topics' live messages by multicast only.
    ChannelsRequest,
    /// Engine: the configured channels.
    Channels(Channels),
    /// Engine, before SUBACK: from which datagram on the stream continues the snapshot.
    StreamPos(StreamPos),
    /// Client: datagrams `from_seq .. from_seq + count` of a stream did not arrive.
    Nak(Nak),
    /// Engine: one datagram of a stream, as it was (or would have been) multicast.
    Repair(&'a [u8]),
    /// Engine: these datagrams are no longer held; their messages are lost for this receiver.
    RepairGone(Nak),
}

/// One multicast channel as the engine announces it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ChannelInfo {
    pub id: u16,
    /// IPv4 group address, e.g. `239.192.0.1`.
    pub group: String,
    pub port: u16,
    /// The topic patterns the channel carries.
    pub patterns: Vec<String>,
    /// Largest datagram the engine sends on it (bytes of UDP payload).
    pub datagram_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Channels {
    pub channels: Vec<ChannelInfo>,
}

/// Stream `(channel, stream)` continues the snapshot from datagram `next_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct StreamPos {
    pub channel: u16,
    /// The owner reactor whose datagram sequence this is.
    pub stream: u16,
    pub next_seq: u64,
}

/// A range of datagrams of one stream (NAK, REPAIR_GONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Nak {
    pub channel: u16,
    pub stream: u16,
    pub from_seq: u64,
    pub count: u32,
}

/// Why a topic or pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {len} bytes, more than the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("topic contains a NUL byte")]
    Nul,
    #[error("wildcards '+' and '#' are not allowed in a published topic")]
    WildcardInTopic,
    #[error("'{0}' must occupy a whole level (e.g. 'a/+/b', 'a/#')")]
    WildcardNotWholeLevel(char),
    #[error("'#' may only be the last level")]
    HashNotLast,
    #[error("topic has {levels} levels, more than the limit of {max}")]
    TooDeep { levels: usize, max: usize },
}

fn validate_common(s: &str, max_bytes: usize) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > max_bytes {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: max_bytes,
        });
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// A topic a message is published on: `/`-separated levels, no wildcards.
pub fn validate_topic(topic: &str, max_bytes: usize) -> Result<(), TopicError> {
    validate_common(topic, max_bytes)?;
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// A topic or pattern of at most `max_levels` `/`-separated levels (`limits.max_topic_levels`):
/// the engine's tries hold one node per level.
pub fn check_depth(s: &str, max_levels: usize) -> Result<(), TopicError> {
    // Counting separators stops early: a 64 KiB topic of slashes costs no more than the limit.
    let mut levels = 1;
    for b in s.bytes() {
        if b == b'/' {
            levels += 1;
            if levels > max_levels {
                return Err(TopicError::TooDeep {
                    levels: s.bytes().filter(|&b| b == b'/').count() + 1,
                    max: max_levels,
                });
            }
        }
    }
    Ok(())
}

/// A subscription pattern: `+` matches exactly one level, `#` (last level only) the rest,
/// including nothing (`a/#` matches `a`).
pub fn validate_pattern(pattern: &str, max_bytes: usize) -> Result<(), TopicError> {
    validate_common(pattern, max_bytes)?;
    let mut levels = pattern.split('/').peekable();
    while let Some(level) = levels.next() {
        for wildcard in ['+', '#'] {
            if level.contains(wildcard) && level.len() != 1 {
                return Err(TopicError::WildcardNotWholeLevel(wildcard));
            }
        }
        if level == "#" && levels.peek().is_some() {
            return Err(TopicError::HashNotLast);
        }
    }
    Ok(())
}
