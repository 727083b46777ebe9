//! Shared helpers for Lowtide benchmark harnesses.

/// `len` pseudo-random bytes (xorshift64 from `seed`): incompressible, reproducible.
pub fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
