//! The Lowtide wire protocol, version 1.
//!
//! # Participants
//!
//! A **fetcher** wants a piece of content and asks one or more **servers**
//! (peers or rendezvous points that hold some or all of it) for ranges of
//! blocks. Each (fetcher, server) pair runs one **session**, named by a 32-bit
//! id the fetcher picks. Every packet is one UDP datagram.
//!
//! # Packet layout
//!
//! ```text
//! +--------+------------------+---------+-----------------------------+
//! | common | kind-fixed part  | tag(16) | body (ranges, or data)      |
//! |  8 B   | per kind         |         | variable                    |
//! +--------+------------------+---------+-----------------------------+
//! common = magic "LT" (2) | version (1) | kind (1) | session id (4, LE)
//! ```
//!
//! All integers are little-endian; all headers are read in place with
//! `zerocopy` (no allocation per packet).
//!
//! # Authentication
//!
//! `tag` is the first 16 bytes of keyed BLAKE3 (key = the deployment key) over
//! everything in the packet except the tag itself and, for `Data` packets, the
//! data payload. A packet whose tag does not verify is dropped before any other
//! field is looked at beyond the common header. Data payloads are not covered
//! by the tag because they are verified against the content's block table
//! anyway: tagging 32–60 header bytes costs about one BLAKE3 compression
//! (≈ 0.1 µs), where tagging a whole 1400-byte packet costs ≈ 1.5 µs, as much
//! as sending it (see `benches/` for the measurement). The consequence: an
//! on-path attacker who can rewrite payloads cannot get bad data accepted, but
//! can make an honest server look like one that sent a bad block. Encryption
//! of the payload (AEAD, below) closes that gap where it matters.
//!
//! # Encryption (optional, per session)
//!
//! A fetcher that wants the data encrypted sets [`REQUEST_ENCRYPT`] in its
//! `Request` flags and puts a random 64-bit `fetch_nonce` in the request. A
//! server that agrees sets [`ACCEPT_ENCRYPTED`] in its `Accept`; from then on
//! every `Data` payload of the session is sealed with AES-256-GCM and its
//! 16-byte AEAD tag is appended to the datagram:
//!
//! ```text
//! | common | DataFixed | tag(16, keyed BLAKE3 over the header) | ciphertext | AEAD tag(16) |
//! ```
//!
//! - key = BLAKE3 `derive_key("lowtide 2026 data key v1", deployment key ‖
//!   session id ‖ content id ‖ fetch_nonce ‖ server nonce)`: a fresh key per
//!   session, since both ends contribute a random nonce;
//! - AEAD nonce (96 bits) = stream (1 byte) ‖ 3 zero bytes ‖ packet number
//!   (8, LE). The packet number grows by one for every datagram the server
//!   sends, retransmissions included, so a nonce never repeats under one key
//!   (a retransmitted block carries a new packet number, hence a new nonce);
//! - associated data = the whole 48-byte header including its BLAKE3 tag.
//!
//! A `Data` datagram whose AEAD tag fails is dropped and counted (per source,
//! [`crate::session::fetch::SourceStats::sealed_rejected`]); it does not drop
//! the source, since only someone on the path could have produced it.
//! Encrypted sessions carry 16 payload bytes less per datagram so datagrams
//! keep their size. Negotiation is strict: a fetcher that asked for
//! encryption drops a source whose `Accept` lacks the flag, and a fetcher
//! that did not ask drops one whose `Accept` has it; plain and encrypted
//! peers never mix data within a session.
//!
//! # Versions
//!
//! `version` is 1. Flags and reserved fields added since (the encryption
//! flags, `fetch_nonce` in what was a reserved field) are ignored by peers
//! that predate them and keep the version: an old server ignores
//! `REQUEST_ENCRYPT` and answers without `ACCEPT_ENCRYPTED`, which the
//! fetcher refuses. A server may serve encrypted sessions only
//! (`ServerConfig::require_encryption`): it answers a plain request with
//! `Reject` reason 3 (`EncryptionRequired`), which older fetchers read as
//! "other"; likewise reason 4 (`DeviceBusy`: the device refuses to serve for
//! now: busy, on battery, or configured to serve nobody). A change that old peers would misread takes a new version,
//! and a peer drops versions it does not know (`BadVersion`).
//!
//! # Address validation
//!
//! A server answers a first `Request` with an `Accept` that is no larger than
//! the request and carries a random `nonce`; it sends no `Data` until a
//! packet from the fetcher echoes that nonce. A spoofed source address thus
//! gets at most one small `Accept` (no amplification). A replayed request
//! on an existing session can at most make the server resend ranges to the
//! fetcher that owns the session, which discards duplicates.
//!
//! # Kinds
//!
//! | kind | dir | fixed part | body |
//! |---|---|---|---|
//! | `Request` 1 | F→S | content id, nonce echo, fetch nonce, window, stream, flags (background, encrypt) | ranges of blocks wanted |
//! | `Accept` 2 | S→F | content id, nonce, size, block size, flags (complete, encrypted) | — |
//! | `Reject` 3 | S→F | content id, reason | — |
//! | `Data` 4 | S→F | packet number, stream, offset, send time | payload (untagged, or sealed + AEAD tag) |
//! | `Ack` 5 | F→S | nonce echo, largest pn, ack delay, timestamps | packet-number ranges received |
//! | `NotHave` 6 | S→F | stream | ranges of blocks the server does not hold |
//! | `Cancel` 7 | F→S | stream | ranges of blocks no longer wanted |
//! | `Close` 8 | either | reason | — |
//!
//! Streams: 0 is the content's bytes (offsets are byte offsets in the
//! content, ranges are block indices); 1 is the content's encoded block table
//! (offsets are byte offsets in the table; a request for stream 1 asks for the
//! whole table and carries no ranges).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::content::ContentId;

pub const MAGIC: [u8; 2] = *b"LT";
pub const VERSION: u8 = 1;
pub const TAG_BYTES: usize = 16;
/// Most ranges in one Request, Ack, NotHave or Cancel.
pub const RANGES_MAX: usize = 64;
/// Largest datagram we build or accept (jumbo frames included).
pub const DATAGRAM_BYTES_MAX: usize = 9000;

/// Stream carrying the content's bytes.
pub const STREAM_CONTENT: u8 = 0;
/// Stream carrying the content's encoded block table.
pub const STREAM_TABLE: u8 = 1;

/// The shared secret of a deployment: every packet is tagged with it.
#[derive(Clone)]
pub struct DeploymentKey(pub [u8; 32]);

impl std::fmt::Debug for DeploymentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeploymentKey(..)")
    }
}

impl DeploymentKey {
    /// Derive a key from a passphrase or key file contents.
    pub fn derive(material: &[u8]) -> Self {
        Self(blake3::derive_key("lowtide 2026 deployment key v1", material))
    }

    fn tag(&self, covered: &[u8], extra: &[u8]) -> [u8; TAG_BYTES] {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(covered);
        h.update(extra);
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(&h.finalize().as_bytes()[..TAG_BYTES]);
        out
    }
}

/// The deployment keys an endpoint holds: `current` signs everything it
/// sends; `previous`, kept for a while after a rotation, is still accepted on
/// receipt so peers that have not learnt the new key yet keep working.
#[derive(Clone, Debug)]
pub struct Keys {
    pub current: DeploymentKey,
    pub previous: Option<DeploymentKey>,
}

impl Keys {
    pub fn new(current: DeploymentKey) -> Self {
        Self {
            current,
            previous: None,
        }
    }

    /// [`decode`] with the current key, then (only when its tag fails) with the
    /// previous one. Returns the packet and the key that verified it.
    pub fn decode<'a>(&self, dgram: &'a [u8]) -> Result<(Packet<'a>, &DeploymentKey), WireError> {
        match decode(&self.current, dgram) {
            Err(WireError::BadTag) => match &self.previous {
                Some(prev) => decode(prev, dgram).map(|p| (p, prev)),
                None => Err(WireError::BadTag),
            },
            r => r.map(|p| (p, &self.current)),
        }
    }
}

impl PartialEq for DeploymentKey {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for DeploymentKey {}

#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request = 1,
    Accept = 2,
    Reject = 3,
    Data = 4,
    Ack = 5,
    NotHave = 6,
    Cancel = 7,
    Close = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Request,
            2 => Kind::Accept,
            3 => Kind::Reject,
            4 => Kind::Data,
            5 => Kind::Ack,
            6 => Kind::NotHave,
            7 => Kind::Cancel,
            8 => Kind::Close,
            _ => return None,
        })
    }

    fn fixed_bytes(self) -> usize {
        match self {
            Kind::Request => size_of::<RequestFixed>(),
            Kind::Accept => size_of::<AcceptFixed>(),
            Kind::Reject => size_of::<RejectFixed>(),
            Kind::Data => size_of::<DataFixed>(),
            Kind::Ack => size_of::<AckFixed>(),
            Kind::NotHave | Kind::Cancel => size_of::<RangesFixed>(),
            Kind::Close => size_of::<CloseFixed>(),
        }
    }
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Common {
    pub magic: [u8; 2],
    pub version: u8,
    pub kind: u8,
    pub session: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestFixed {
    pub content: [u8; 32],
    pub nonce_echo: U64,
    /// The fetcher's random contribution to the session's data key (with [`REQUEST_ENCRYPT`]).
    pub fetch_nonce: U64,
    /// Bytes the fetcher is prepared to receive in this session beyond what it has acknowledged.
    pub window_bytes: U32,
    pub stream: u8,
    pub flags: u8,
    pub range_count: U16,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AcceptFixed {
    pub content: [u8; 32],
    pub nonce: U64,
    pub size: U64,
    pub block_chunks_log: u8,
    pub flags: u8,
    pub payload_max: U16,
    pub reserved: [u8; 4],
}

/// `AcceptFixed::flags`: the server holds the whole content.
pub const ACCEPT_COMPLETE: u8 = 1;
/// `AcceptFixed::flags`: the server seals this session's data payloads (see Encryption).
pub const ACCEPT_ENCRYPTED: u8 = 2;
/// `RequestFixed::flags`: the fetcher asks for the background (scavenger) protocol.
pub const REQUEST_BACKGROUND: u8 = 1;
/// `RequestFixed::flags`: the fetcher asks for encrypted data payloads.
pub const REQUEST_ENCRYPT: u8 = 2;
/// Bytes of the AEAD tag after an encrypted payload.
pub const AEAD_TAG_BYTES: usize = 16;

/// The AES-256-GCM key of one encrypted session (see Encryption in the module docs).
pub struct DataKey(ring::aead::LessSafeKey);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

/// Why a sealed payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("encrypted payload does not authenticate (tampered, or sealed under another key)")]
pub struct OpenError;

impl DataKey {
    pub fn derive(key: &DeploymentKey, session: u32, content: &ContentId, fetch_nonce: u64, server_nonce: u64) -> Self {
        let mut h = blake3::Hasher::new_derive_key("lowtide 2026 data key v1");
        h.update(&key.0);
        h.update(&session.to_le_bytes());
        h.update(&content.0);
        h.update(&fetch_nonce.to_le_bytes());
        h.update(&server_nonce.to_le_bytes());
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, h.finalize().as_bytes())
            .expect("AES-256-GCM takes a 32-byte key");
        Self(ring::aead::LessSafeKey::new(unbound))
    }

    fn nonce(stream: u8, pn: u64) -> ring::aead::Nonce {
        let mut n = [0u8; 12];
        n[0] = stream;
        n[4..].copy_from_slice(&pn.to_le_bytes());
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    /// Seal the payload of a data datagram finished by [`seal_data`] (header and
    /// `payload_len` bytes of payload in `dgram`) and append the AEAD tag; returns
    /// the new datagram length. `dgram` must have room for [`AEAD_TAG_BYTES`] more.
    pub fn seal(&self, dgram: &mut [u8], payload_len: usize) -> usize {
        let (head, rest) = dgram.split_at_mut(DATA_HEADER_BYTES);
        let fixed = DataFixed::ref_from_prefix(&head[COMMON_BYTES..])
            .expect("a data header")
            .0;
        let nonce = Self::nonce(fixed.stream, fixed.pn.get());
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(&*head), &mut rest[..payload_len])
            .expect("AES-GCM seals any payload shorter than 64 GiB");
        rest[payload_len..payload_len + AEAD_TAG_BYTES].copy_from_slice(tag.as_ref());
        DATA_HEADER_BYTES + payload_len + AEAD_TAG_BYTES
    }

    /// Decrypt a received data packet's sealed payload (`header` and `payload` as
    /// [`decode`] returned them; the payload is ciphertext then AEAD tag) into `out`,
    /// which it resizes. On failure `out` is left empty.
    pub fn open(&self, header: &[u8], fixed: &DataFixed, payload: &[u8], out: &mut Vec<u8>) -> Result<(), OpenError> {
        let Some(clen) = payload.len().checked_sub(AEAD_TAG_BYTES).filter(|n| *n > 0) else {
            return Err(OpenError);
        };
        let tag = ring::aead::Tag::try_from(&payload[clen..]).map_err(|_| OpenError)?;
        out.clear();
        out.extend_from_slice(&payload[..clen]);
        let nonce = Self::nonce(fixed.stream, fixed.pn.get());
        self.0
            .open_in_place_separate_tag(nonce, ring::aead::Aad::from(header), tag, out, 0..)
            .map(|_| ())
            .map_err(|_| {
                out.clear();
                OpenError
            })
    }
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RejectFixed {
    pub content: [u8; 32],
    pub reason: u8,
    pub reserved: [u8; 7],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataFixed {
    pub pn: U64,
    pub offset: U64,
    pub send_ts_us: U32,
    pub stream: u8,
    pub reserved: [u8; 3],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct AckFixed {
    pub nonce_echo: U64,
    pub largest: U64,
    pub ack_delay_us: U32,
    /// The sender's `send_ts_us` of the largest packet acknowledged.
    pub echo_send_ts_us: U32,
    /// The fetcher's clock when the largest packet arrived (for one-way delay).
    pub recv_ts_us: U32,
    pub range_count: U16,
    pub reserved: [u8; 2],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RangesFixed {
    pub stream: u8,
    pub reserved: u8,
    pub range_count: U16,
    pub reserved2: [u8; 4],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CloseFixed {
    pub reason: u8,
    pub reserved: [u8; 7],
}

/// A range in a packet body: `start .. start + count`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct WireRange {
    pub start: U64,
    pub count: U32,
}

/// Why a server refused a request.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    NotFound = 1,
    /// Serving as many peers as it may.
    Busy = 2,
    /// The server serves only encrypted sessions and the request did not ask for one.
    EncryptionRequired = 3,
    /// The device refuses to serve for now: busy CPU or disk, on battery, a VPN site, or
    /// configured to serve nobody (`sessions_max` 0).
    DeviceBusy = 4,
    Other = 255,
}

impl RejectReason {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::NotFound,
            2 => Self::Busy,
            3 => Self::EncryptionRequired,
            4 => Self::DeviceBusy,
            _ => Self::Other,
        }
    }
}

/// Bytes of the common header.
pub const COMMON_BYTES: usize = size_of::<Common>();
/// Bytes in front of a data payload: common + fixed + tag.
pub const DATA_HEADER_BYTES: usize = COMMON_BYTES + size_of::<DataFixed>() + TAG_BYTES;

/// Why an incoming datagram was dropped. Each class is counted by the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram shorter than its headers")]
    Truncated,
    #[error("not a Lowtide datagram (bad magic)")]
    BadMagic,
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown packet kind {0}")]
    UnknownKind(u8),
    #[error("authentication tag does not verify (wrong deployment key, or forged)")]
    BadTag,
    #[error("malformed body: {0}")]
    Malformed(&'static str),
}

/// Counters of dropped datagrams by class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub truncated: u64,
    pub bad_magic: u64,
    pub bad_version: u64,
    pub unknown_kind: u64,
    pub bad_tag: u64,
    pub malformed: u64,
}

impl DropCounters {
    pub fn count(&mut self, e: &WireError) {
        match e {
            WireError::Truncated => self.truncated += 1,
            WireError::BadMagic => self.bad_magic += 1,
            WireError::BadVersion(_) => self.bad_version += 1,
            WireError::UnknownKind(_) => self.unknown_kind += 1,
            WireError::BadTag => self.bad_tag += 1,
            WireError::Malformed(_) => self.malformed += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.truncated + self.bad_magic + self.bad_version + self.unknown_kind + self.bad_tag + self.malformed
    }
}

/// A decoded, authenticated packet borrowing from the datagram.
#[derive(Debug)]
pub enum Packet<'a> {
    Request {
        session: u32,
        fixed: &'a RequestFixed,
        ranges: &'a [WireRange],
    },
    Accept {
        session: u32,
        fixed: &'a AcceptFixed,
    },
    Reject {
        session: u32,
        fixed: &'a RejectFixed,
    },
    Data {
        session: u32,
        fixed: &'a DataFixed,
        /// The whole header (common, fixed part, tag): an encrypted payload's associated data.
        header: &'a [u8],
        payload: &'a [u8],
    },
    Ack {
        session: u32,
        fixed: &'a AckFixed,
        ranges: &'a [WireRange],
    },
    NotHave {
        session: u32,
        fixed: &'a RangesFixed,
        ranges: &'a [WireRange],
    },
    Cancel {
        session: u32,
        fixed: &'a RangesFixed,
        ranges: &'a [WireRange],
    },
    Close {
        session: u32,
        fixed: &'a CloseFixed,
    },
}

impl Packet<'_> {
    pub fn session(&self) -> u32 {
        match self {
            Packet::Request { session, .. }
            | Packet::Accept { session, .. }
            | Packet::Reject { session, .. }
            | Packet::Data { session, .. }
            | Packet::Ack { session, .. }
            | Packet::NotHave { session, .. }
            | Packet::Cancel { session, .. }
            | Packet::Close { session, .. } => *session,
        }
    }
}

fn ref_at<T: FromBytes + KnownLayout + Immutable + Unaligned>(b: &[u8]) -> Result<&T, WireError> {
    T::ref_from_prefix(b).map(|(t, _)| t).map_err(|_| WireError::Truncated)
}

fn ranges_in(body: &[u8], count: u16) -> Result<&[WireRange], WireError> {
    let count = count as usize;
    if count > RANGES_MAX {
        return Err(WireError::Malformed("too many ranges"));
    }
    let (ranges, rest) =
        <[WireRange]>::ref_from_prefix_with_elems(body, count).map_err(|_| WireError::Malformed("ranges truncated"))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed("trailing bytes after ranges"));
    }
    Ok(ranges)
}

/// Parse and authenticate one datagram.
pub fn decode<'a>(key: &DeploymentKey, dgram: &'a [u8]) -> Result<Packet<'a>, WireError> {
    let common: &Common = ref_at(dgram)?;
    if common.magic != MAGIC {
        return Err(WireError::BadMagic);
    }
    if common.version != VERSION {
        return Err(WireError::BadVersion(common.version));
    }
    let kind = Kind::from_u8(common.kind).ok_or(WireError::UnknownKind(common.kind))?;
    let head = COMMON_BYTES + kind.fixed_bytes();
    if dgram.len() < head + TAG_BYTES {
        return Err(WireError::Truncated);
    }
    let tag = &dgram[head..head + TAG_BYTES];
    let body = &dgram[head + TAG_BYTES..];
    let tagged_body: &[u8] = if kind == Kind::Data { &[] } else { body };
    if !ct_eq(tag, &key.tag(&dgram[..head], tagged_body)) {
        return Err(WireError::BadTag);
    }
    let session = common.session.get();
    let fixed = &dgram[COMMON_BYTES..head];
    Ok(match kind {
        Kind::Request => {
            let f: &RequestFixed = ref_at(fixed)?;
            Packet::Request {
                session,
                fixed: f,
                ranges: ranges_in(body, f.range_count.get())?,
            }
        }
        Kind::Accept => Packet::Accept {
            session,
            fixed: no_body(fixed, body)?,
        },
        Kind::Reject => Packet::Reject {
            session,
            fixed: no_body(fixed, body)?,
        },
        Kind::Data => {
            let f: &DataFixed = ref_at(fixed)?;
            if body.is_empty() {
                return Err(WireError::Malformed("data packet without payload"));
            }
            Packet::Data {
                session,
                fixed: f,
                header: &dgram[..head + TAG_BYTES],
                payload: body,
            }
        }
        Kind::Ack => {
            let f: &AckFixed = ref_at(fixed)?;
            Packet::Ack {
                session,
                fixed: f,
                ranges: ranges_in(body, f.range_count.get())?,
            }
        }
        Kind::NotHave => {
            let f: &RangesFixed = ref_at(fixed)?;
            Packet::NotHave {
                session,
                fixed: f,
                ranges: ranges_in(body, f.range_count.get())?,
            }
        }
        Kind::Cancel => {
            let f: &RangesFixed = ref_at(fixed)?;
            Packet::Cancel {
                session,
                fixed: f,
                ranges: ranges_in(body, f.range_count.get())?,
            }
        }
        Kind::Close => Packet::Close {
            session,
            fixed: no_body(fixed, body)?,
        },
    })
}

fn no_body<'a, T: FromBytes + KnownLayout + Immutable + Unaligned>(
    fixed: &'a [u8],
    body: &[u8],
) -> Result<&'a T, WireError> {
    if !body.is_empty() {
        return Err(WireError::Malformed("unexpected body"));
    }
    ref_at(fixed)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Write a control packet (anything but `Data`) into `buf`; returns its length.
/// Panics if `buf` is too small: callers size buffers with [`DATAGRAM_BYTES_MAX`].
fn encode_control<F: IntoBytes + Immutable>(
    key: &DeploymentKey,
    buf: &mut [u8],
    kind: Kind,
    session: u32,
    fixed: &F,
    ranges: &[WireRange],
) -> usize {
    debug_assert!(ranges.len() <= RANGES_MAX);
    let common = Common {
        magic: MAGIC,
        version: VERSION,
        kind: kind as u8,
        session: session.into(),
    };
    let head = COMMON_BYTES + size_of::<F>();
    buf[..COMMON_BYTES].copy_from_slice(common.as_bytes());
    buf[COMMON_BYTES..head].copy_from_slice(fixed.as_bytes());
    let body = ranges.as_bytes();
    let body_at = head + TAG_BYTES;
    buf[body_at..body_at + body.len()].copy_from_slice(body);
    let tag = key.tag(&buf[..head], &buf[body_at..body_at + body.len()]);
    buf[head..body_at].copy_from_slice(&tag);
    body_at + body.len()
}

pub fn encode_request(
    key: &DeploymentKey,
    buf: &mut [u8],
    session: u32,
    fixed: &RequestFixed,
    ranges: &[WireRange],
) -> usize {
    let mut f = *fixed;
    f.range_count = (ranges.len() as u16).into();
    encode_control(key, buf, Kind::Request, session, &f, ranges)
}

pub fn encode_accept(key: &DeploymentKey, buf: &mut [u8], session: u32, fixed: &AcceptFixed) -> usize {
    encode_control(key, buf, Kind::Accept, session, fixed, &[])
}

pub fn encode_reject(
    key: &DeploymentKey,
    buf: &mut [u8],
    session: u32,
    content: &ContentId,
    reason: RejectReason,
) -> usize {
    let f = RejectFixed {
        content: content.0,
        reason: reason as u8,
        reserved: [0; 7],
    };
    encode_control(key, buf, Kind::Reject, session, &f, &[])
}

pub fn encode_ack(key: &DeploymentKey, buf: &mut [u8], session: u32, fixed: &AckFixed, ranges: &[WireRange]) -> usize {
    let mut f = *fixed;
    f.range_count = (ranges.len() as u16).into();
    encode_control(key, buf, Kind::Ack, session, &f, ranges)
}

/// `NotHave` (server → fetcher) or `Cancel` (fetcher → server).
pub fn encode_ranges(
    key: &DeploymentKey,
    buf: &mut [u8],
    kind: Kind,
    session: u32,
    stream: u8,
    ranges: &[WireRange],
) -> usize {
    assert!(
        matches!(kind, Kind::NotHave | Kind::Cancel),
        "encode_ranges is for NotHave and Cancel"
    );
    let f = RangesFixed {
        stream,
        reserved: 0,
        range_count: (ranges.len() as u16).into(),
        reserved2: [0; 4],
    };
    encode_control(key, buf, kind, session, &f, ranges)
}

pub fn encode_close(key: &DeploymentKey, buf: &mut [u8], session: u32, reason: u8) -> usize {
    encode_control(
        key,
        buf,
        Kind::Close,
        session,
        &CloseFixed {
            reason,
            reserved: [0; 7],
        },
        &[],
    )
}

/// Finish a data packet whose payload is already in `buf[DATA_HEADER_BYTES..DATA_HEADER_BYTES + payload_len]`
/// (the sender reads content straight into place); returns the datagram length.
pub fn seal_data(key: &DeploymentKey, buf: &mut [u8], session: u32, fixed: &DataFixed, payload_len: usize) -> usize {
    let common = Common {
        magic: MAGIC,
        version: VERSION,
        kind: Kind::Data as u8,
        session: session.into(),
    };
    let head = COMMON_BYTES + size_of::<DataFixed>();
    buf[..COMMON_BYTES].copy_from_slice(common.as_bytes());
    buf[COMMON_BYTES..head].copy_from_slice(fixed.as_bytes());
    let tag = key.tag(&buf[..head], &[]);
    buf[head..DATA_HEADER_BYTES].copy_from_slice(&tag);
    DATA_HEADER_BYTES + payload_len
}

/// Write the correct tag into `dgram` for whatever its header says it is, as
/// an insider holding the key could. For fuzzing and tests: it lets arbitrary
/// bytes past the tag check so the body parsers see them. Returns false if
/// the datagram is too short or of an unknown kind.
pub fn retag(key: &DeploymentKey, dgram: &mut [u8]) -> bool {
    let Some(kind) = dgram.get(3).and_then(|k| Kind::from_u8(*k)) else {
        return false;
    };
    let head = COMMON_BYTES + kind.fixed_bytes();
    if dgram.len() < head + TAG_BYTES {
        return false;
    }
    let body_at = head + TAG_BYTES;
    let tag = if kind == Kind::Data {
        key.tag(&dgram[..head], &[])
    } else {
        key.tag(&dgram[..head], &dgram[body_at..])
    };
    dgram[head..body_at].copy_from_slice(&tag);
    true
}

/// Ranges from `(start, count)` pairs.
pub fn wire_ranges(it: impl IntoIterator<Item = (u64, u32)>) -> Vec<WireRange> {
    it.into_iter()
        .map(|(s, c)| WireRange {
            start: s.into(),
            count: c.into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> DeploymentKey {
        DeploymentKey::derive(b"test")
    }

    fn sample_request(buf: &mut [u8]) -> usize {
        let f = RequestFixed {
            content: [7; 32],
            nonce_echo: 5.into(),
            fetch_nonce: 0.into(),
            window_bytes: (1u32 << 20).into(),
            stream: 0,
            flags: 0,
            range_count: 0.into(),
        };
        encode_request(&key(), buf, 42, &f, &wire_ranges([(0, 4), (10, 2)]))
    }

    fn sample_data(buf: &mut [u8]) -> usize {
        buf[DATA_HEADER_BYTES..DATA_HEADER_BYTES + 100].fill(0xab);
        let f = DataFixed {
            pn: 9.into(),
            offset: 16384.into(),
            send_ts_us: 77.into(),
            stream: 0,
            reserved: [0; 3],
        };
        seal_data(&key(), buf, 42, &f, 100)
    }

    #[test]
    fn request_and_data_round_trip() {
        let mut buf = [0u8; 2048];
        let n = sample_request(&mut buf);
        match decode(&key(), &buf[..n]).unwrap() {
            Packet::Request { session, fixed, ranges } => {
                assert_eq!(session, 42);
                assert_eq!(fixed.content, [7; 32]);
                assert_eq!(ranges.len(), 2);
                assert_eq!(ranges[1].start.get(), 10);
            }
            p => panic!("{p:?}"),
        }
        let n = sample_data(&mut buf);
        match decode(&key(), &buf[..n]).unwrap() {
            Packet::Data { fixed, payload, .. } => {
                assert_eq!(fixed.offset.get(), 16384);
                assert_eq!(payload, &[0xab; 100][..]);
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn decode_drops_every_malformed_class() {
        let mut buf = [0u8; 2048];
        let n = sample_request(&mut buf);
        let good = buf[..n].to_vec();
        assert_eq!(decode(&key(), &good[..5]).unwrap_err(), WireError::Truncated);
        assert_eq!(decode(&key(), &good[..40]).unwrap_err(), WireError::Truncated);
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode(&key(), &b).unwrap_err(), WireError::BadMagic);
        let mut b = good.clone();
        b[2] = 9;
        assert_eq!(decode(&key(), &b).unwrap_err(), WireError::BadVersion(9));
        let mut b = good.clone();
        b[3] = 99;
        assert_eq!(decode(&key(), &b).unwrap_err(), WireError::UnknownKind(99));
        assert_eq!(
            decode(&DeploymentKey::derive(b"other"), &good).unwrap_err(),
            WireError::BadTag
        );
        // Any flipped bit in a tagged field fails the tag.
        for byte in 4..n {
            let mut b = good.clone();
            b[byte] ^= 1;
            assert!(decode(&key(), &b).is_err(), "flip at {byte}");
        }
        // A truncated body fails the tag (it covers the body) before the range parser sees it.
        assert!(decode(&key(), &good[..n - 3]).is_err());
    }

    #[test]
    fn decode_rejects_range_count_lies_with_a_valid_tag() {
        // An insider (valid key) that lies about range_count must still not crash us.
        let mut buf = [0u8; 2048];
        let f = RequestFixed {
            content: [0; 32],
            nonce_echo: 0.into(),
            fetch_nonce: 0.into(),
            window_bytes: 0.into(),
            stream: 0,
            flags: 0,
            range_count: 0.into(),
        };
        let mut ff = f;
        ff.range_count = 500.into();
        let n = encode_control(&key(), &mut buf, Kind::Request, 1, &ff, &[]);
        assert_eq!(
            decode(&key(), &buf[..n]).unwrap_err(),
            WireError::Malformed("too many ranges")
        );
        ff.range_count = 3.into();
        let n = encode_control(&key(), &mut buf, Kind::Request, 1, &ff, &wire_ranges([(1, 1)]));
        assert_eq!(
            decode(&key(), &buf[..n]).unwrap_err(),
            WireError::Malformed("ranges truncated")
        );
    }

    #[test]
    fn keys_accept_the_previous_key_and_say_which_verified() {
        let (old, new) = (DeploymentKey::derive(b"old"), DeploymentKey::derive(b"new"));
        let mut buf = [0u8; 2048];
        let f = CloseFixed {
            reason: 0,
            reserved: [0; 7],
        };
        let from_old = encode_control(&old, &mut buf, Kind::Close, 3, &f, &[]);
        let from_old = buf[..from_old].to_vec();
        let n = encode_control(&new, &mut buf, Kind::Close, 3, &f, &[]);
        let mut ring = Keys::new(new.clone());
        assert_eq!(ring.decode(&from_old).unwrap_err(), WireError::BadTag);
        ring.previous = Some(old.clone());
        assert_eq!(ring.decode(&from_old).unwrap().1, &old);
        assert_eq!(ring.decode(&buf[..n]).unwrap().1, &new);
        let stranger = encode_control(&DeploymentKey::derive(b"x"), &mut buf, Kind::Close, 3, &f, &[]);
        assert_eq!(ring.decode(&buf[..stranger]).unwrap_err(), WireError::BadTag);
    }

    #[test]
    fn drop_counters_count_by_class() {
        let mut c = DropCounters::default();
        c.count(&WireError::BadTag);
        c.count(&WireError::Truncated);
        assert_eq!((c.bad_tag, c.truncated, c.total()), (1, 1, 2));
    }

    fn sealed(key: &DataKey, stream: u8, pn: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; DATA_HEADER_BYTES + payload.len() + AEAD_TAG_BYTES];
        buf[DATA_HEADER_BYTES..DATA_HEADER_BYTES + payload.len()].copy_from_slice(payload);
        let f = DataFixed {
            pn: pn.into(),
            offset: 16384.into(),
            send_ts_us: 5.into(),
            stream,
            reserved: [0; 3],
        };
        seal_data(&key_dk(), &mut buf, 42, &f, payload.len());
        let n = key.seal(&mut buf, payload.len());
        assert_eq!(n, buf.len());
        buf
    }

    fn key_dk() -> DeploymentKey {
        key()
    }

    fn open_all(key: &DataKey, dgram: &[u8]) -> Result<Vec<u8>, OpenError> {
        match decode(&key_dk(), dgram) {
            Ok(Packet::Data {
                fixed, header, payload, ..
            }) => {
                let mut out = Vec::new();
                key.open(header, fixed, payload, &mut out).map(|()| out)
            }
            _ => Err(OpenError),
        }
    }

    #[test]
    fn data_keys_differ_by_every_input() {
        let id = ContentId::of(b"c");
        let k = DataKey::derive(&key(), 1, &id, 2, 3);
        let payload = [9u8; 64];
        let d = sealed(&k, 0, 7, &payload);
        assert_eq!(open_all(&k, &d).unwrap(), payload);
        for other in [
            DataKey::derive(&DeploymentKey::derive(b"other"), 1, &id, 2, 3),
            DataKey::derive(&key(), 9, &id, 2, 3),
            DataKey::derive(&key(), 1, &ContentId::of(b"d"), 2, 3),
            DataKey::derive(&key(), 1, &id, 9, 3),
            DataKey::derive(&key(), 1, &id, 2, 9),
        ] {
            assert_eq!(open_all(&other, &d), Err(OpenError));
        }
    }

    proptest! {
        #[test]
        fn sealed_data_round_trips(payload in proptest::collection::vec(any::<u8>(), 1..1400), pn in any::<u64>(), stream in 0u8..2) {
            let k = DataKey::derive(&key(), 42, &ContentId::of(b"c"), 1, 2);
            let d = sealed(&k, stream, pn, &payload);
            prop_assert_ne!(&d[DATA_HEADER_BYTES..DATA_HEADER_BYTES + payload.len()], &payload[..]);
            prop_assert_eq!(open_all(&k, &d).unwrap(), payload);
        }

        #[test]
        fn sealed_data_tampered_anywhere_is_refused(payload in proptest::collection::vec(any::<u8>(), 1..600), at in any::<usize>(), bit in 0u8..8) {
            let k = DataKey::derive(&key(), 42, &ContentId::of(b"c"), 1, 2);
            let mut d = sealed(&k, 0, 3, &payload);
            let at = 4 + at % (d.len() - 4); // past magic/version/kind, which decode checks first
            d[at] ^= 1 << bit;
            prop_assert!(open_all(&k, &d).is_err());
            // And cut short.
            let d = sealed(&k, 0, 3, &payload);
            prop_assert!(open_all(&k, &d[..d.len() - 1]).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = decode(&key(), &bytes);
        }

        #[test]
        fn decode_never_panics_on_retagged_garbage(mut bytes in proptest::collection::vec(any::<u8>(), 8..400), kind in 1u8..9) {
            bytes[..2].copy_from_slice(&MAGIC);
            bytes[2] = VERSION;
            bytes[3] = kind;
            if retag(&key(), &mut bytes) {
                prop_assert!(!matches!(decode(&key(), &bytes), Err(WireError::BadTag)));
            }
        }

        #[test]
        fn decode_never_panics_on_mutated_valid_packets(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8), cut in 0usize..200) {
            let mut buf = [0u8; 2048];
            let n = sample_data(&mut buf);
            let mut b = buf[..n].to_vec();
            for (i, v) in flips { let len = b.len(); b[i % len] ^= v; }
            b.truncate(n.saturating_sub(cut));
            let _ = decode(&key(), &b);
        }
    }
}
