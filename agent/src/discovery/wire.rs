//! The discovery wire format, version 1.
//!
//! Discovery packets are UDP datagrams on the discovery port (4501 by
//! default), separate from the engine's transfer packets. There are four
//! kinds, each of one fixed length:
//!
//! | kind | bytes | sent to | meaning |
//! |---|---|---|---|
//! | `Query` 1 | [`QUERY_BYTES`] (128) | a subnet's broadcast address, or one address | "who holds `content`?" (all zeros: "is an agent there?") |
//! | `Reply` 2 | [`REPLY_BYTES`] (88) | the query's source address | "I do, this much, fetch it from my engine port" |
//! | `ManifestQuery` 3 | [`MANIFEST_QUERY_BYTES`] (1200) | one peer that holds `content` | "send me the server-signed manifest of `content`, from byte `offset`" |
//! | `ManifestChunk` 4 | [`MANIFEST_CHUNK_BYTES`] (1184) | the query's source address | "here are `len` bytes of it from `offset`, of `total`" |
//!
//! A reply is always smaller than the query that caused it (queries are
//! padded with zeros), so discovery cannot amplify traffic toward a spoofed
//! source; replies are also rate-limited per source address.
//!
//! The manifest kinds let an agent start a download while the server is
//! unreachable: the signed manifest comes from a peer and is checked against
//! the server key pinned at enrolment before anything is stored (a peer can
//! withhold it, never forge it). What they carry is the manifest as the server
//! signed it: the 64-byte Ed25519 signature, then the signed JSON text.
//!
//! # Layout
//!
//! ```text
//! offset size field
//!  0      2   magic "LD"
//!  2      1   version (1)
//!  3      1   kind (1 query, 2 reply)
//!  4      1   flags (reply: 1 = holds all of it, 2 = serving now; query: 0)
//!  5      3   reserved, zero
//!  8      8   sent_ms: the sender's Unix time in milliseconds
//! 16      8   sender: random id of the sending agent process (it ignores its own broadcasts)
//! 24      8   nonce: query: random; reply: the query's
//! 32     32   content id (all zeros: a presence query)
//! 64      2   port: the sender's engine UDP port
//! 66      2   held_permille: reply: share of the content held, 0..=1000; query: 0
//! 68      4   reserved, zero
//! 72     40   query only: padding, zero
//! end-16 16   tag
//! ```
//!
//! The manifest kinds share the header (flags and held_permille zero, the
//! content id not zero), then:
//!
//! ```text
//! 72      4   offset: first byte of the signed manifest asked for / carried
//! 76      4   chunk only: total bytes of the signed manifest (at most MANIFEST_BYTES_MAX)
//! 80      2   chunk only: len, bytes carried (at most CHUNK_DATA_MAX; offset + len <= total)
//! 82      2   chunk only: reserved, zero
//! 84    len   chunk only: the bytes; zero after them
//! ```
//!
//! (in a query, everything from 76 to the tag is padding, zero).
//!
//! Integers are little-endian. Fields are read with explicit bounds-checked
//! slicing; [`decode`] never panics, whatever the input.
//!
//! # Authentication and freshness
//!
//! `tag` is the first 16 bytes of keyed BLAKE3 over every byte before it,
//! keyed with a key derived from the deployment key
//! ([`DiscoveryKey::from_deployment`]), so only members of the deployment can
//! make a packet another agent acts on. A packet whose `sent_ms` is more than
//! [`CLOCK_SKEW_MS_MAX`] away from the receiver's clock is stale; within that
//! window the receiver remembers (sender, nonce) of the queries it answered
//! and answers each once (see [`super::Core`]); a reply is taken only for a
//! nonce the receiver itself sent and is still waiting on.
//!
//! Reserved bytes and padding must be zero: a packet of a later version that
//! uses them carries another version number.

use lowtide_engine::content::ContentId;
use lowtide_engine::wire::DeploymentKey;

pub const MAGIC: [u8; 2] = *b"LD";
pub const VERSION: u8 = 1;
pub const KIND_QUERY: u8 = 1;
pub const KIND_REPLY: u8 = 2;
pub const KIND_MANIFEST_QUERY: u8 = 3;
pub const KIND_MANIFEST_CHUNK: u8 = 4;
/// Bytes of the fixed header shared by both kinds.
pub const HEADER_BYTES: usize = 72;
pub const TAG_BYTES: usize = 16;
/// Length of every query (padded).
pub const QUERY_BYTES: usize = 128;
/// Length of every reply.
pub const REPLY_BYTES: usize = HEADER_BYTES + TAG_BYTES;
/// Length of every manifest query (padded, so no chunk is larger).
pub const MANIFEST_QUERY_BYTES: usize = 1200;
/// Length of every manifest chunk.
pub const MANIFEST_CHUNK_BYTES: usize = 1184;
/// Where a chunk's bytes start.
const CHUNK_DATA_AT: usize = 84;
/// Most bytes one chunk carries.
pub const CHUNK_DATA_MAX: usize = MANIFEST_CHUNK_BYTES - TAG_BYTES - CHUNK_DATA_AT;
/// Largest signed manifest sent or taken (signature and JSON text).
pub const MANIFEST_BYTES_MAX: usize = 32 << 10;
/// Largest packet [`decode`] looks at; anything longer is refused unread.
pub const PACKET_BYTES_MAX: usize = MANIFEST_QUERY_BYTES;
/// Packets whose time is further than this from ours are stale.
pub const CLOCK_SKEW_MS_MAX: u64 = 30_000;

/// Reply flag: the sender holds the whole content.
pub const FLAG_COMPLETE: u8 = 1;
/// Reply flag: the sender serves peers now (not busy, not on battery, not a VPN site).
pub const FLAG_SERVING: u8 = 2;

const _: () = assert!(REPLY_BYTES < QUERY_BYTES, "a reply must never be larger than the query");
const _: () = assert!(
    MANIFEST_CHUNK_BYTES < MANIFEST_QUERY_BYTES,
    "a chunk must never be larger than the query"
);

/// The key discovery packets are tagged with, derived from the deployment key
/// (so a discovery tag can never pass for a transfer packet's, or back).
#[derive(Clone)]
pub struct DiscoveryKey([u8; 32]);

impl std::fmt::Debug for DiscoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryKey(..)")
    }
}

impl DiscoveryKey {
    pub fn from_deployment(k: &DeploymentKey) -> Self {
        Self(blake3::derive_key("lowtide 2026 discovery v1", &k.0))
    }

    fn tag(&self, covered: &[u8]) -> [u8; TAG_BYTES] {
        let h = blake3::keyed_hash(&self.0, covered);
        let mut out = [0u8; TAG_BYTES];
        out.copy_from_slice(&h.as_bytes()[..TAG_BYTES]);
        out
    }
}

/// What a packet says, once it passed every check of [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub flags: u8,
    pub sent_ms: u64,
    pub sender: u64,
    pub nonce: u64,
    /// `None` for a presence query (all-zero content).
    pub content: Option<ContentId>,
    pub port: u16,
    pub held_permille: u16,
    /// Manifest kinds: the first byte asked for or carried (0 otherwise).
    pub offset: u32,
    /// Manifest chunk: bytes of the whole signed manifest (0 otherwise).
    pub total: u32,
    /// Manifest chunk: bytes carried, at [`chunk_data`] (0 otherwise).
    pub len: u16,
}

/// The bytes a manifest chunk carries (`buf` is the datagram `m` was decoded from).
pub fn chunk_data<'a>(buf: &'a [u8], m: &Message) -> &'a [u8] {
    if m.kind != KIND_MANIFEST_CHUNK {
        return &[];
    }
    buf.get(CHUNK_DATA_AT..CHUNK_DATA_AT + m.len as usize).unwrap_or(&[])
}

/// Why a packet was dropped. Every variant is something a sender got wrong
/// or an attacker tried; none is an error of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes is shorter than any discovery packet")]
    Truncated { len: usize },
    #[error("{len} bytes is longer than any discovery packet")]
    Oversized { len: usize },
    #[error("not a discovery packet (magic)")]
    Magic,
    #[error("discovery version {0}, this agent speaks {VERSION}")]
    Version(u8),
    #[error("unknown discovery packet kind {0}")]
    Kind(u8),
    #[error("a kind {kind} packet of {len} bytes (each kind has one length)")]
    Length { kind: u8, len: usize },
    #[error("the tag does not verify (another deployment's key, or forged)")]
    Tag,
    #[error("reserved bytes or padding are not zero")]
    Reserved,
    #[error("held share {0} is more than 1000 per mille")]
    Held(u16),
    #[error("a manifest packet without a content id, or a chunk whose offset, length and total disagree")]
    Chunk,
    #[error("sent {skew_ms} ms away from this agent's clock (more than {CLOCK_SKEW_MS_MAX})")]
    Stale { skew_ms: u64 },
}

impl DecodeError {
    /// A short label for counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Truncated { .. } | Self::Oversized { .. } | Self::Length { .. } | Self::Magic => "malformed",
            Self::Version(_) => "version",
            Self::Kind(_) => "malformed",
            Self::Tag => "tag",
            Self::Reserved | Self::Held(_) | Self::Chunk => "malformed",
            Self::Stale { .. } => "stale",
        }
    }
}

fn write_header(buf: &mut [u8], m: &Message) {
    buf[0..2].copy_from_slice(&MAGIC);
    buf[2] = VERSION;
    buf[3] = m.kind;
    buf[4] = m.flags;
    buf[5..8].fill(0);
    buf[8..16].copy_from_slice(&m.sent_ms.to_le_bytes());
    buf[16..24].copy_from_slice(&m.sender.to_le_bytes());
    buf[24..32].copy_from_slice(&m.nonce.to_le_bytes());
    buf[32..64].copy_from_slice(&m.content.map_or([0u8; 32], |c| c.0));
    buf[64..66].copy_from_slice(&m.port.to_le_bytes());
    buf[66..68].copy_from_slice(&m.held_permille.to_le_bytes());
    buf[68..72].fill(0);
}

/// A query for `content` (or presence, with `None`).
pub fn encode_query(
    key: &DiscoveryKey,
    sent_ms: u64,
    sender: u64,
    nonce: u64,
    content: Option<ContentId>,
    port: u16,
) -> [u8; QUERY_BYTES] {
    let mut b = [0u8; QUERY_BYTES];
    let m = Message {
        kind: KIND_QUERY,
        flags: 0,
        sent_ms,
        sender,
        nonce,
        content,
        port,
        held_permille: 0,
        offset: 0,
        total: 0,
        len: 0,
    };
    write_header(&mut b, &m);
    let tag = key.tag(&b[..QUERY_BYTES - TAG_BYTES]);
    b[QUERY_BYTES - TAG_BYTES..].copy_from_slice(&tag);
    b
}

/// The reply to `query` (`flags` and `held_permille` say what this agent holds and whether it serves).
pub fn encode_reply(
    key: &DiscoveryKey,
    sent_ms: u64,
    sender: u64,
    query: &Message,
    flags: u8,
    port: u16,
    held_permille: u16,
) -> [u8; REPLY_BYTES] {
    let mut b = [0u8; REPLY_BYTES];
    let m = Message {
        kind: KIND_REPLY,
        flags,
        sent_ms,
        sender,
        nonce: query.nonce,
        content: query.content,
        port,
        held_permille: held_permille.min(1000),
        offset: 0,
        total: 0,
        len: 0,
    };
    write_header(&mut b, &m);
    let tag = key.tag(&b[..HEADER_BYTES]);
    b[HEADER_BYTES..].copy_from_slice(&tag);
    b
}

/// A query for the signed manifest of `content` from byte `offset`.
pub fn encode_manifest_query(
    key: &DiscoveryKey,
    sent_ms: u64,
    sender: u64,
    nonce: u64,
    content: ContentId,
    port: u16,
    offset: u32,
) -> [u8; MANIFEST_QUERY_BYTES] {
    let mut b = [0u8; MANIFEST_QUERY_BYTES];
    let m = Message {
        kind: KIND_MANIFEST_QUERY,
        flags: 0,
        sent_ms,
        sender,
        nonce,
        content: Some(content),
        port,
        held_permille: 0,
        offset,
        total: 0,
        len: 0,
    };
    write_header(&mut b, &m);
    b[72..76].copy_from_slice(&offset.to_le_bytes());
    let tag = key.tag(&b[..MANIFEST_QUERY_BYTES - TAG_BYTES]);
    b[MANIFEST_QUERY_BYTES - TAG_BYTES..].copy_from_slice(&tag);
    b
}

/// The chunk of `signed` (the whole signed manifest) that `query` asks for; `None` when
/// the query's offset is past its end or it is larger than [`MANIFEST_BYTES_MAX`].
pub fn encode_manifest_chunk(
    key: &DiscoveryKey,
    sent_ms: u64,
    sender: u64,
    query: &Message,
    port: u16,
    signed: &[u8],
) -> Option<[u8; MANIFEST_CHUNK_BYTES]> {
    let at = query.offset as usize;
    if signed.is_empty() || signed.len() > MANIFEST_BYTES_MAX || at >= signed.len() {
        return None;
    }
    let part = &signed[at..signed.len().min(at + CHUNK_DATA_MAX)];
    let mut b = [0u8; MANIFEST_CHUNK_BYTES];
    let m = Message {
        kind: KIND_MANIFEST_CHUNK,
        flags: 0,
        sent_ms,
        sender,
        nonce: query.nonce,
        content: query.content,
        port,
        held_permille: 0,
        offset: query.offset,
        total: signed.len() as u32,
        len: part.len() as u16,
    };
    write_header(&mut b, &m);
    b[72..76].copy_from_slice(&m.offset.to_le_bytes());
    b[76..80].copy_from_slice(&m.total.to_le_bytes());
    b[80..82].copy_from_slice(&m.len.to_le_bytes());
    b[CHUNK_DATA_AT..CHUNK_DATA_AT + part.len()].copy_from_slice(part);
    let tag = key.tag(&b[..MANIFEST_CHUNK_BYTES - TAG_BYTES]);
    b[MANIFEST_CHUNK_BYTES - TAG_BYTES..].copy_from_slice(&tag);
    Some(b)
}

/// Recompute the tag of a packet of a valid length in place, as a sender
/// holding the key would after editing it (tests and fuzzing reach the
/// checks past the tag with it). False when `buf` has no valid length.
pub fn retag(key: &DiscoveryKey, buf: &mut [u8]) -> bool {
    if ![QUERY_BYTES, REPLY_BYTES, MANIFEST_QUERY_BYTES, MANIFEST_CHUNK_BYTES].contains(&buf.len()) {
        return false;
    }
    let n = buf.len() - TAG_BYTES;
    let t = key.tag(&buf[..n]);
    buf[n..].copy_from_slice(&t);
    true
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut x = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        x.copy_from_slice(s);
    }
    u16::from_le_bytes(x)
}

/// Check and read one packet received at `now_ms` (Unix milliseconds).
///
/// Checks in order: length bounds, magic, version, kind, the kind's exact
/// length, the tag (constant time), reserved bytes and padding, the held
/// share, then freshness. Never panics.
pub fn decode(key: &DiscoveryKey, buf: &[u8], now_ms: u64) -> Result<Message, DecodeError> {
    let len = buf.len();
    if len < REPLY_BYTES {
        return Err(DecodeError::Truncated { len });
    }
    if len > PACKET_BYTES_MAX {
        return Err(DecodeError::Oversized { len });
    }
    if buf[0..2] != MAGIC {
        return Err(DecodeError::Magic);
    }
    if buf[2] != VERSION {
        return Err(DecodeError::Version(buf[2]));
    }
    let kind = buf[3];
    let want = match kind {
        KIND_QUERY => QUERY_BYTES,
        KIND_REPLY => REPLY_BYTES,
        KIND_MANIFEST_QUERY => MANIFEST_QUERY_BYTES,
        KIND_MANIFEST_CHUNK => MANIFEST_CHUNK_BYTES,
        k => return Err(DecodeError::Kind(k)),
    };
    if len != want {
        return Err(DecodeError::Length { kind, len });
    }
    let (covered, tag) = buf.split_at(len - TAG_BYTES);
    let expect = key.tag(covered);
    // Constant-time comparison: the time taken says nothing about how much of the tag was right.
    let diff = expect.iter().zip(tag).fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff != 0 {
        return Err(DecodeError::Tag);
    }
    let zero = |r: std::ops::Range<usize>| covered.get(r).is_some_and(|s| s.iter().all(|&b| b == 0));
    let (offset, total, chunk_len) = match kind {
        KIND_MANIFEST_QUERY => (u32_at(buf, 72), 0, 0),
        KIND_MANIFEST_CHUNK => (u32_at(buf, 72), u32_at(buf, 76), u16_at(buf, 80)),
        _ => (0, 0, 0),
    };
    // Where the padding starts: after the kind's fields (a chunk's bytes included).
    let padding = match kind {
        KIND_MANIFEST_QUERY => 76,
        KIND_MANIFEST_CHUNK if (chunk_len as usize) <= CHUNK_DATA_MAX => CHUNK_DATA_AT + chunk_len as usize,
        KIND_MANIFEST_CHUNK => return Err(DecodeError::Chunk),
        _ => HEADER_BYTES,
    };
    let chunk_reserved_zero = kind != KIND_MANIFEST_CHUNK || zero(82..84);
    if !(zero(5..8) && zero(68..72) && chunk_reserved_zero && zero(padding..covered.len())) {
        return Err(DecodeError::Reserved);
    }
    let flags = buf[4];
    let held_permille = u16_at(buf, 66);
    if kind != KIND_REPLY && (flags != 0 || held_permille != 0) {
        return Err(DecodeError::Reserved);
    }
    let manifest_kind = kind == KIND_MANIFEST_QUERY || kind == KIND_MANIFEST_CHUNK;
    if manifest_kind && buf[32..64].iter().all(|&b| b == 0) {
        return Err(DecodeError::Chunk);
    }
    if kind == KIND_MANIFEST_CHUNK
        && (total as usize > MANIFEST_BYTES_MAX
            || chunk_len == 0
            || u64::from(offset) + u64::from(chunk_len) > u64::from(total))
    {
        return Err(DecodeError::Chunk);
    }
    if held_permille > 1000 {
        return Err(DecodeError::Held(held_permille));
    }
    let sent_ms = u64_at(buf, 8);
    let skew_ms = sent_ms.abs_diff(now_ms);
    if skew_ms > CLOCK_SKEW_MS_MAX {
        return Err(DecodeError::Stale { skew_ms });
    }
    let mut content = [0u8; 32];
    content.copy_from_slice(&buf[32..64]);
    Ok(Message {
        kind,
        flags,
        sent_ms,
        sender: u64_at(buf, 16),
        nonce: u64_at(buf, 24),
        content: (content != [0u8; 32]).then_some(ContentId(content)),
        port: u16_at(buf, 64),
        held_permille,
        offset,
        total,
        len: chunk_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn key(s: &str) -> DiscoveryKey {
        DiscoveryKey::from_deployment(&DeploymentKey::derive(s.as_bytes()))
    }

    #[test]
    fn discovery_wire_roundtrips_and_replies_are_smaller() {
        let k = key("s");
        let id = ContentId::of(b"pkg");
        let q = encode_query(&k, NOW, 7, 99, Some(id), 4500);
        assert_eq!(q.len(), QUERY_BYTES);
        let m = decode(&k, &q, NOW + 10).unwrap();
        assert_eq!(
            (m.kind, m.sender, m.nonce, m.content, m.port),
            (KIND_QUERY, 7, 99, Some(id), 4500)
        );
        let r = encode_reply(&k, NOW, 8, &m, FLAG_COMPLETE | FLAG_SERVING, 4600, 1000);
        assert!(r.len() < q.len(), "no amplification");
        let rm = decode(&k, &r, NOW).unwrap();
        assert_eq!(
            (rm.kind, rm.nonce, rm.content, rm.port),
            (KIND_REPLY, 99, Some(id), 4600)
        );
        assert_eq!((rm.flags, rm.held_permille), (FLAG_COMPLETE | FLAG_SERVING, 1000));
        let p = encode_query(&k, NOW, 7, 1, None, 1);
        assert_eq!(decode(&k, &p, NOW).unwrap().content, None, "presence query");
    }

    #[test]
    fn discovery_wire_refuses_malformed_packets() {
        let k = key("s");
        let q = encode_query(&k, NOW, 7, 99, Some(ContentId::of(b"x")), 4500);
        // Truncated at every length, and oversized.
        for n in 0..q.len() {
            let e = decode(&k, &q[..n], NOW).unwrap_err();
            assert!(
                matches!(e, DecodeError::Truncated { .. } | DecodeError::Length { .. }),
                "{n}: {e:?}"
            );
        }
        let mut big = q.to_vec();
        big.extend_from_slice(&[0; 1100]);
        assert_eq!(decode(&k, &big, NOW), Err(DecodeError::Oversized { len: 1228 }));
        // Wrong magic, version, kind (each re-tagged, so the field itself is what fails).
        let mut b = q;
        b[0] = b'X';
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Magic));
        let mut b = q;
        b[2] = 2;
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Version(2)));
        let mut b = q;
        b[3] = 9;
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Kind(9)));
        // A query cut to a reply's length: wrong length for its kind.
        assert_eq!(
            decode(&k, &q[..REPLY_BYTES], NOW),
            Err(DecodeError::Length {
                kind: KIND_QUERY,
                len: REPLY_BYTES
            })
        );
        // Wrong key, or any flipped bit: the tag fails.
        assert_eq!(decode(&key("other"), &q, NOW), Err(DecodeError::Tag));
        for i in [4, 8, 20, 40, 64, 100, QUERY_BYTES - 1] {
            let mut b = q;
            b[i] ^= 1;
            assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Tag), "bit flipped at {i}");
        }
        // Non-zero padding or reserved bytes, even correctly tagged.
        for i in [5, 70, 100] {
            let mut b = q;
            b[i] = 1;
            assert!(retag(&k, &mut b));
            assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Reserved), "byte {i}");
        }
        // A held share over 1000.
        let m = decode(&k, &q, NOW).unwrap();
        let mut r = encode_reply(&k, NOW, 1, &m, 0, 1, 0);
        r[66..68].copy_from_slice(&1001u16.to_le_bytes());
        assert!(retag(&k, &mut r));
        assert_eq!(decode(&k, &r, NOW), Err(DecodeError::Held(1001)));
    }

    #[test]
    fn discovery_wire_carries_a_signed_manifest_in_chunks_never_larger_than_the_query() {
        let k = key("s");
        let id = ContentId::of(b"pkg");
        let signed: Vec<u8> = (0..2500u32).map(|i| (i * 7) as u8).collect();
        let mut got = Vec::new();
        while got.len() < signed.len() {
            let q = encode_manifest_query(&k, NOW, 7, 5 + got.len() as u64, id, 4500, got.len() as u32);
            let m = decode(&k, &q, NOW).unwrap();
            assert_eq!(
                (m.kind, m.content, m.offset),
                (KIND_MANIFEST_QUERY, Some(id), got.len() as u32)
            );
            let c = encode_manifest_chunk(&k, NOW, 8, &m, 4600, &signed).unwrap();
            assert!(c.len() < q.len(), "no amplification");
            let cm = decode(&k, &c, NOW).unwrap();
            assert_eq!((cm.kind, cm.nonce, cm.total), (KIND_MANIFEST_CHUNK, m.nonce, 2500));
            assert_eq!(cm.offset as usize, got.len());
            got.extend_from_slice(chunk_data(&c, &cm));
        }
        assert_eq!(got, signed);
        // Past the end: nothing to send.
        let q = encode_manifest_query(&k, NOW, 7, 1, id, 4500, 2500);
        assert!(encode_manifest_chunk(&k, NOW, 8, &decode(&k, &q, NOW).unwrap(), 1, &signed).is_none());
        // A chunk whose length runs past its total, or over the most a chunk carries, or
        // with bytes after its length: refused even when correctly tagged.
        let q = encode_manifest_query(&k, NOW, 7, 1, id, 4500, 0);
        let c = encode_manifest_chunk(&k, NOW, 8, &decode(&k, &q, NOW).unwrap(), 1, &signed).unwrap();
        let mut b = c;
        b[76..80].copy_from_slice(&100u32.to_le_bytes());
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Chunk));
        let mut b = c;
        b[80..82].copy_from_slice(&(CHUNK_DATA_MAX as u16 + 1).to_le_bytes());
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Chunk));
        let mut b = c;
        b[80..82].copy_from_slice(&10u16.to_le_bytes());
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Reserved));
        // A manifest query without a content id.
        let mut b = q;
        b[32..64].fill(0);
        assert!(retag(&k, &mut b));
        assert_eq!(decode(&k, &b, NOW), Err(DecodeError::Chunk));
    }

    #[test]
    fn discovery_wire_refuses_old_and_future_timestamps() {
        let k = key("s");
        let q = encode_query(&k, NOW, 7, 99, None, 4500);
        assert!(decode(&k, &q, NOW + CLOCK_SKEW_MS_MAX).is_ok());
        assert_eq!(
            decode(&k, &q, NOW + CLOCK_SKEW_MS_MAX + 1),
            Err(DecodeError::Stale {
                skew_ms: CLOCK_SKEW_MS_MAX + 1
            })
        );
        assert!(matches!(decode(&k, &q, NOW - 60_000), Err(DecodeError::Stale { .. })));
        assert!(matches!(decode(&k, &q, 0), Err(DecodeError::Stale { .. })));
    }

    #[test]
    fn discovery_wire_decode_never_panics_on_noise() {
        let k = key("s");
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut b = [0u8; 200];
        for round in 0..20_000 {
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = x as u8;
            }
            if round % 2 == 0 {
                b[0..2].copy_from_slice(&MAGIC);
                b[2] = VERSION;
                b[3] = 1 + (round as u8 % 3);
            }
            let n = (x as usize) % b.len();
            assert!(decode(&k, &b[..n], NOW).is_err());
        }
    }
}
