//! Content addressing and verified streaming.
//!
//! # What this is
//!
//! A package's id is the standard BLAKE3 hash of its bytes (the same value
//! `b3sum` prints). BLAKE3 is a tree hash: the file is split into 1 KiB chunks
//! whose chaining values are merged pairwise up to the root. Lowtide cuts that
//! tree at the level of **blocks** (16 KiB by default: 16 chunks, the size
//! iroh-blobs uses for its chunk groups) and keeps the chaining value of every
//! block in a [`BlockTable`]: 32 bytes per block, 0.2 % of the content.
//!
//! # Goals
//!
//! - Any block, from any source (a peer's UDP datagrams, an HTTP range
//!   response from the origin, a file on disk after a crash), arriving in any
//!   order, is verified on its own with one hash of its bytes and one
//!   comparison: [`BlockTable::verify_block`].
//! - The table itself is verified once against the content id by re-merging
//!   the tree ([`BlockTable::verify_root`]); a table that does not hash to the
//!   id is rejected before any data is trusted.
//! - Errors say what was wrong (which block of which content); the session
//!   layer adds *who* sent it.
//!
//! # Non-goals
//!
//! Proofs for a single block without the whole table (bao-tree's encoded
//! streams). They interleave parent hashes with data in a fixed order, which
//! suits an ordered byte stream but not UDP datagrams arriving out of order
//! from several peers; the flat table costs one fetch of 0.2 % of the content
//! and then verifies every source the same way. bao-tree's outboard for the
//! same block size is twice as large (64 bytes per block).
//!
//! The hard part, computing chaining values of subtrees at an offset and
//! merging them, is BLAKE3's own [`blake3::hazmat`] API; nothing here
//! re-implements the compression function.

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::str::FromStr;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

/// BLAKE3 chunk: the leaf of the hash tree.
pub const CHUNK_BYTES: u64 = 1024;
/// Default block size as log2 of chunks: 2^4 chunks = 16 KiB.
pub const BLOCK_CHUNKS_LOG_DEFAULT: u8 = 4;
/// Largest block size we accept from a peer or a file: 2^10 chunks = 1 MiB.
pub const BLOCK_CHUNKS_LOG_MAX: u8 = 10;
/// Largest content we handle: 1 TiB.
pub const CONTENT_BYTES_MAX: u64 = 1 << 40;
/// Upper bound on the number of blocks in one table (64 Mi entries, 2 GiB).
pub const BLOCK_TABLE_ENTRIES_MAX: u64 = 1 << 26;

/// The id of a piece of content: its BLAKE3 hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// The id of `data` (the BLAKE3 hash).
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// Short form for logs: the first 8 bytes in hex.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", self.short())
    }
}

/// A content id could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not a content id: expected 64 hexadecimal characters (a BLAKE3 hash, as b3sum prints it)")]
pub struct ParseContentIdError {
    input: String,
}

impl FromStr for ContentId {
    type Err = ParseContentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseContentIdError {
            input: s.chars().take(80).collect(),
        })?;
        Ok(Self(out))
    }
}

impl serde::Serialize for ContentId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ContentId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why data or a block table failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The bytes of a block do not hash to the table's entry: whoever sent them lied or corrupted them.
    #[error("block {block} of content {content} ({len} bytes at offset {offset}) does not match its hash")]
    BlockMismatch {
        content: ContentId,
        block: u64,
        offset: u64,
        len: usize,
    },
    /// A block arrived with the wrong length.
    #[error("block {block} of content {content} has {got} bytes; it must have {expected}")]
    BlockLength {
        content: ContentId,
        block: u64,
        got: usize,
        expected: u64,
    },
    /// A block index past the end of the content.
    #[error("block {block} is out of range: content {content} has {count} blocks")]
    BlockOutOfRange { content: ContentId, block: u64, count: u64 },
    /// The block table does not hash to the content id.
    #[error("block table does not match content {expected} (it hashes to {actual}); the source of the table is wrong")]
    TableMismatch { expected: ContentId, actual: ContentId },
    /// The encoded block table is malformed.
    #[error("block table is malformed: {0}")]
    TableMalformed(&'static str),
}

/// Geometry of a piece of content: its size and block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Content size in bytes.
    pub size: u64,
    /// Block size as log2 of 1 KiB chunks.
    pub block_chunks_log: u8,
}

impl Geometry {
    pub fn new(size: u64, block_chunks_log: u8) -> Result<Self, VerifyError> {
        if block_chunks_log > BLOCK_CHUNKS_LOG_MAX {
            return Err(VerifyError::TableMalformed("block size above 1 MiB"));
        }
        if size > CONTENT_BYTES_MAX {
            return Err(VerifyError::TableMalformed("content larger than 1 TiB"));
        }
        let g = Self { size, block_chunks_log };
        if g.block_count() > BLOCK_TABLE_ENTRIES_MAX {
            return Err(VerifyError::TableMalformed("too many blocks; use a larger block size"));
        }
        Ok(g)
    }

    /// Block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        CHUNK_BYTES << self.block_chunks_log
    }

    /// Number of blocks (an empty content has one empty block).
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.block_bytes()).max(1)
    }

    /// Byte range of block `i` within the content.
    pub fn block_range(&self, i: u64) -> Range<u64> {
        let start = i * self.block_bytes();
        start..(start + self.block_bytes()).min(self.size)
    }

    /// Length of block `i`.
    pub fn block_len(&self, i: u64) -> u64 {
        let r = self.block_range(i);
        r.end - r.start
    }
}

/// Chaining value of one block: a subtree of the BLAKE3 tree at `offset`, or the
/// root hash itself when the whole content is one block.
fn block_cv(geometry: &Geometry, index: u64, data: &[u8]) -> ChainingValue {
    if geometry.block_count() == 1 {
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * geometry.block_bytes());
    h.update(data);
    h.finalize_non_root()
}

/// The chaining value of every block of a piece of content: enough to verify
/// any block on its own, itself verifiable against the [`ContentId`].
#[derive(Clone, PartialEq, Eq)]
pub struct BlockTable {
    geometry: Geometry,
    cvs: Vec<ChainingValue>,
    root: ContentId,
}

impl fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockTable")
            .field("root", &self.root)
            .field("size", &self.geometry.size)
            .field("block_bytes", &self.geometry.block_bytes())
            .finish()
    }
}

/// Magic at the start of an encoded block table.
const TABLE_MAGIC: [u8; 4] = *b"LTbt";
const TABLE_VERSION: u8 = 1;
/// magic(4) version(1) block_chunks_log(1) reserved(2) size(8)
const TABLE_HEADER_BYTES: usize = 16;

impl BlockTable {
    /// Hash content read from `reader` (exactly `size` bytes).
    pub fn compute(mut reader: impl Read, size: u64, block_chunks_log: u8) -> std::io::Result<Self> {
        let geometry = Geometry::new(size, block_chunks_log)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let count = geometry.block_count();
        let mut cvs = Vec::with_capacity(count as usize);
        let mut buf = vec![0u8; geometry.block_bytes() as usize];
        for i in 0..count {
            let len = geometry.block_len(i) as usize;
            reader.read_exact(&mut buf[..len])?;
            cvs.push(block_cv(&geometry, i, &buf[..len]));
        }
        let root = merge_root(&geometry, &cvs);
        Ok(Self { geometry, cvs, root })
    }

    /// Hash an in-memory buffer.
    pub fn from_bytes(data: &[u8], block_chunks_log: u8) -> Self {
        Self::compute(data, data.len() as u64, block_chunks_log)
            .expect("reading from a slice of the stated size cannot fail")
    }

    /// The content id this table hashes to.
    pub fn root(&self) -> ContentId {
        self.root
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Check that this table belongs to `id`.
    pub fn verify_root(&self, id: &ContentId) -> Result<(), VerifyError> {
        if &self.root == id {
            Ok(())
        } else {
            Err(VerifyError::TableMismatch {
                expected: *id,
                actual: self.root,
            })
        }
    }

    /// Verify the bytes of block `index`.
    pub fn verify_block(&self, index: u64, data: &[u8]) -> Result<(), VerifyError> {
        let g = &self.geometry;
        if index >= g.block_count() {
            return Err(VerifyError::BlockOutOfRange {
                content: self.root,
                block: index,
                count: g.block_count(),
            });
        }
        let expected = g.block_len(index);
        if data.len() as u64 != expected {
            return Err(VerifyError::BlockLength {
                content: self.root,
                block: index,
                got: data.len(),
                expected,
            });
        }
        if block_cv(g, index, data) == self.cvs[index as usize] {
            Ok(())
        } else {
            Err(VerifyError::BlockMismatch {
                content: self.root,
                block: index,
                offset: g.block_range(index).start,
                len: data.len(),
            })
        }
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        TABLE_HEADER_BYTES + 32 * self.cvs.len()
    }

    /// Serialise: a 16-byte header then 32 bytes per block.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&TABLE_MAGIC);
        out.push(TABLE_VERSION);
        out.push(self.geometry.block_chunks_log);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.geometry.size.to_le_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Parse an encoded table. The result is *not* trusted until
    /// [`verify_root`](Self::verify_root) passes against the id you expect;
    /// [`decode_verified`](Self::decode_verified) does both.
    pub fn decode(bytes: &[u8]) -> Result<Self, VerifyError> {
        if bytes.len() < TABLE_HEADER_BYTES {
            return Err(VerifyError::TableMalformed("shorter than its header"));
        }
        if bytes[..4] != TABLE_MAGIC {
            return Err(VerifyError::TableMalformed("bad magic"));
        }
        if bytes[4] != TABLE_VERSION {
            return Err(VerifyError::TableMalformed("unknown version"));
        }
        // Reserved: zero in version 1, so a table has exactly one encoding.
        if bytes[6..8] != [0, 0] {
            return Err(VerifyError::TableMalformed("reserved header bytes are not zero"));
        }
        let size = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let geometry = Geometry::new(size, bytes[5])?;
        let body = &bytes[TABLE_HEADER_BYTES..];
        if body.len() as u64 != 32 * geometry.block_count() {
            return Err(VerifyError::TableMalformed("length does not match the content size"));
        }
        let cvs: Vec<ChainingValue> = body.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
        let root = merge_root(&geometry, &cvs);
        Ok(Self { geometry, cvs, root })
    }

    /// Parse and check against the content id in one step.
    pub fn decode_verified(bytes: &[u8], id: &ContentId) -> Result<Self, VerifyError> {
        let t = Self::decode(bytes)?;
        t.verify_root(id)?;
        Ok(t)
    }
}

/// Merge block chaining values up to the root, following BLAKE3's tree shape
/// (the left subtree is the largest power of two of chunks smaller than the whole).
fn merge_root(g: &Geometry, cvs: &[ChainingValue]) -> ContentId {
    if cvs.len() == 1 {
        return ContentId(cvs[0]);
    }
    let (l, r) = split(g, 0, cvs.len() as u64, g.size, cvs);
    ContentId(*merge_subtrees_root(&l, &r, Mode::Hash).as_bytes())
}

/// Chaining values of the two children of the subtree spanning blocks
/// `first..first+count` (covering `len` bytes).
fn split(g: &Geometry, first: u64, count: u64, len: u64, cvs: &[ChainingValue]) -> (ChainingValue, ChainingValue) {
    let left_len = blake3::hazmat::left_subtree_len(len);
    let left_count = left_len / g.block_bytes();
    let l = subtree(g, first, left_count, left_len, cvs);
    let r = subtree(g, first + left_count, count - left_count, len - left_len, cvs);
    (l, r)
}

fn subtree(g: &Geometry, first: u64, count: u64, len: u64, cvs: &[ChainingValue]) -> ChainingValue {
    if count == 1 {
        return cvs[first as usize];
    }
    let (l, r) = split(g, first, count, len, cvs);
    merge_subtrees_non_root(&l, &r, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 10) as u8)
            .collect()
    }

    #[test]
    fn table_root_is_the_blake3_hash() {
        for len in [
            0,
            1,
            1024,
            16 * 1024,
            16 * 1024 + 1,
            5 * 16 * 1024 + 77,
            1 << 20,
            (1 << 20) + 3 * 1024 + 5,
        ] {
            let d = data(len, 7);
            for log in [0u8, 2, 4, 6] {
                let t = BlockTable::from_bytes(&d, log);
                assert_eq!(t.root(), ContentId::of(&d), "len {len} log {log}");
            }
        }
    }

    #[test]
    fn verify_block_rejects_a_flipped_bit_in_every_block() {
        let d = data(9 * 16 * 1024 + 100, 3);
        let t = BlockTable::from_bytes(&d, 4);
        let g = t.geometry();
        for i in 0..g.block_count() {
            let r = g.block_range(i);
            let mut block = d[r.start as usize..r.end as usize].to_vec();
            t.verify_block(i, &block).unwrap();
            let bit = (i as usize * 977) % (block.len() * 8);
            block[bit / 8] ^= 1 << (bit % 8);
            let err = t.verify_block(i, &block).unwrap_err();
            assert!(matches!(err, VerifyError::BlockMismatch { block, .. } if block == i));
        }
    }

    #[test]
    fn verify_block_rejects_wrong_length_and_index() {
        let d = data(40_000, 1);
        let t = BlockTable::from_bytes(&d, 4);
        assert!(matches!(
            t.verify_block(0, &d[..100]),
            Err(VerifyError::BlockLength { .. })
        ));
        assert!(matches!(
            t.verify_block(3, &d[..100]),
            Err(VerifyError::BlockOutOfRange { .. })
        ));
    }

    #[test]
    fn table_decode_rejects_tampering() {
        let d = data(100_000, 9);
        let t = BlockTable::from_bytes(&d, 4);
        let mut enc = t.encode();
        assert_eq!(BlockTable::decode_verified(&enc, &t.root()).unwrap(), t);
        let last = enc.len() - 1;
        enc[last] ^= 0x80;
        assert!(matches!(
            BlockTable::decode_verified(&enc, &t.root()),
            Err(VerifyError::TableMismatch { .. })
        ));
        assert!(matches!(
            BlockTable::decode(&enc[..10]),
            Err(VerifyError::TableMalformed(_))
        ));
        assert!(matches!(
            BlockTable::decode(&enc[..enc.len() - 1]),
            Err(VerifyError::TableMalformed(_))
        ));
    }

    /// Found by `scripts/fuzz.sh` (engine:table_decode) in CI: a table whose reserved
    /// header bytes were not zero decoded, and re-encoded to other bytes.
    #[test]
    fn table_with_nonzero_reserved_bytes_is_malformed() {
        let input: &[u8] = &[
            0x4c, 0x54, 0x62, 0x74, 0x1, 0xa, 0x0, 0xa, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0,
            0x0, 0xfe, 0xff, 0x7, 0x0, 0x0, 0x0, 0x80, 0xff, 0xf7, 0xff, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0,
            0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0,
        ];
        assert!(matches!(
            BlockTable::decode(input),
            Err(VerifyError::TableMalformed("reserved header bytes are not zero"))
        ));
        let mut enc = BlockTable::from_bytes(&[7u8; 5000], 4).encode();
        assert!(BlockTable::decode(&enc).is_ok());
        enc[6] = 1;
        assert!(matches!(BlockTable::decode(&enc), Err(VerifyError::TableMalformed(_))));
    }

    #[test]
    fn content_id_parses_and_prints() {
        let id = ContentId::of(b"hello");
        assert_eq!(id.to_string().parse::<ContentId>().unwrap(), id);
        let err = "xyz".parse::<ContentId>().unwrap_err().to_string();
        assert!(err.contains("64 hexadecimal"), "{err}");
    }

    proptest! {
        #[test]
        fn table_root_matches_hash_for_any_size(len in 0usize..300_000, log in 0u8..6, seed: u8) {
            let d = data(len, seed);
            let t = BlockTable::from_bytes(&d, log);
            prop_assert_eq!(t.root(), ContentId::of(&d));
            let back = BlockTable::decode_verified(&t.encode(), &t.root()).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn table_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = BlockTable::decode(&bytes);
        }
    }
}
