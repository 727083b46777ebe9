//! Wire protocol: building and parsing the packets of a transfer, and what the
//! packet authentication scheme costs compared with the alternatives.
//!
//! `packet/*`: `seal_data` (header + tag around a payload already in place),
//! `decode` of a data packet (1472-byte datagram: 1424 payload bytes, the
//! default for a 1500-byte MTU), and `encode_ack` / `decode` of an ack with 8
//! ranges. `*_encrypted_*`: the same data packet on an encrypted session
//! (what `wire::DataKey` does: ring's AES-256-GCM over the 1408-byte payload,
//! the 48-byte header as associated data, the 16-byte AEAD tag appended), i.e.
//! the whole per-datagram cost of encryption next to the plain path; `open`
//! includes the copy of the payload out of the receive buffer.
//!
//! `auth_1472B/*`: the cost per full-size data packet of each way to
//! authenticate it, all on the same 1472 bytes, reported as packet bytes per
//! second so they compare directly:
//! - `blake3_keyed_header32`: keyed BLAKE3 over the 32-byte common + data
//!   header, the scheme `wire` uses (the payload is checked by the block table).
//! - `blake3_keyed_packet`: keyed BLAKE3 over all 1472 bytes.
//! - `chacha20poly1305_seal` / `_open`: encrypt (decrypt and check) the
//!   1424-byte payload with the 32-byte header as associated data.
//! - `aes256gcm_seal` / `_open`: the same with AES-256-GCM (AES-NI and
//!   PCLMULQDQ are detected at run time).
//! - `*_auth_only`: the AEAD's tag over the whole packet as associated data,
//!   no encryption (GMAC / Poly1305 alone).
//!
//! Time is the bench thread's CPU time, not wall time (see `common`).

use std::hint::black_box;
use std::time::Duration;

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::Aes256Gcm;
use chacha20poly1305::ChaCha20Poly1305;
mod common;

use common::ThreadCpuTime;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lowtide_engine::session::PAYLOAD_BYTES_DEFAULT;
use lowtide_engine::wire::{self, AckFixed, DataFixed, DeploymentKey, Packet, DATAGRAM_BYTES_MAX, DATA_HEADER_BYTES};

const PACKET_BYTES: usize = DATA_HEADER_BYTES + PAYLOAD_BYTES_DEFAULT;
/// Common (8) + data fixed part (24): what the tag covers.
const HEADER_BYTES: usize = DATA_HEADER_BYTES - wire::TAG_BYTES;

fn data_fixed(pn: u64) -> DataFixed {
    DataFixed {
        pn: pn.into(),
        offset: (pn * PAYLOAD_BYTES_DEFAULT as u64).into(),
        send_ts_us: 12345.into(),
        stream: wire::STREAM_CONTENT,
        reserved: [0; 3],
    }
}

fn ack_fixed() -> AckFixed {
    AckFixed {
        nonce_echo: 0x1234_5678.into(),
        largest: 10_000.into(),
        ack_delay_us: 25.into(),
        echo_send_ts_us: 99.into(),
        recv_ts_us: 150.into(),
        range_count: 0.into(),
        reserved: [0; 2],
    }
}

fn packet(c: &mut Criterion<ThreadCpuTime>) {
    let key = DeploymentKey::derive(b"bench");
    let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
    let mut g = c.benchmark_group("packet");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));

    g.throughput(Throughput::Bytes(PACKET_BYTES as u64));
    let mut pn = 0u64;
    g.bench_function("seal_data_1472B", |b| {
        b.iter(|| {
            pn += 1;
            wire::seal_data(&key, black_box(&mut buf), 7, &data_fixed(pn), PAYLOAD_BYTES_DEFAULT)
        })
    });
    let n = wire::seal_data(&key, &mut buf, 7, &data_fixed(1), PAYLOAD_BYTES_DEFAULT);
    let dgram = buf[..n].to_vec();
    g.bench_function("decode_data_1472B", |b| {
        b.iter(|| match wire::decode(&key, black_box(&dgram)) {
            Ok(Packet::Data { payload, .. }) => payload.len(),
            other => panic!("{other:?}"),
        })
    });

    let ranges = wire::wire_ranges((0..8u64).map(|i| (i * 100, 90)));
    let mut abuf = vec![0u8; DATAGRAM_BYTES_MAX];
    let alen = wire::encode_ack(&key, &mut abuf, 7, &ack_fixed(), &ranges);
    g.throughput(Throughput::Bytes(alen as u64));
    g.bench_function("encode_ack_8ranges", |b| {
        b.iter(|| wire::encode_ack(&key, black_box(&mut abuf), 7, &ack_fixed(), black_box(&ranges)))
    });
    let ack = abuf[..alen].to_vec();
    g.bench_function("decode_ack_8ranges", |b| {
        b.iter(|| match wire::decode(&key, black_box(&ack)) {
            Ok(Packet::Ack { ranges, .. }) => ranges.len(),
            other => panic!("{other:?}"),
        })
    });

    // Encrypted sessions: same datagram size, 16 payload bytes less.
    let dk = wire::DataKey::derive(&key, 7, &lowtide_engine::content::ContentId::of(b"c"), 1, 2);
    let plen = PAYLOAD_BYTES_DEFAULT - wire::AEAD_TAG_BYTES;
    g.throughput(Throughput::Bytes(PACKET_BYTES as u64));
    g.bench_function("seal_data_encrypted_1472B", |b| {
        b.iter(|| {
            pn += 1;
            wire::seal_data(&key, black_box(&mut buf), 7, &data_fixed(pn), plen);
            dk.seal(black_box(&mut buf), plen)
        })
    });
    wire::seal_data(&key, &mut buf, 7, &data_fixed(1), plen);
    let n = dk.seal(&mut buf, plen);
    let edgram = buf[..n].to_vec();
    let mut opened = Vec::with_capacity(PAYLOAD_BYTES_DEFAULT);
    g.bench_function("open_data_encrypted_1472B", |b| {
        b.iter(|| match wire::decode(&key, black_box(&edgram)) {
            Ok(Packet::Data {
                fixed, header, payload, ..
            }) => {
                dk.open(header, fixed, payload, &mut opened).expect("opens");
                opened.len()
            }
            other => panic!("{other:?}"),
        })
    });
    g.bench_function("decode_bad_tag_1472B", |b| {
        let other = DeploymentKey::derive(b"other");
        b.iter(|| wire::decode(&other, black_box(&dgram)).is_err())
    });
    g.finish();
}

fn auth(c: &mut Criterion<ThreadCpuTime>) {
    let key = [7u8; 32];
    let mut pkt = vec![0u8; PACKET_BYTES];
    for (i, b) in pkt.iter_mut().enumerate() {
        *b = (i * 31) as u8;
    }
    let mut g = c.benchmark_group("auth_1472B");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300))
        .throughput(Throughput::Bytes(PACKET_BYTES as u64));

    g.bench_function("blake3_keyed_header32", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new_keyed(&key);
            h.update(black_box(&pkt[..HEADER_BYTES]));
            *h.finalize().as_bytes()
        })
    });
    g.bench_function("blake3_keyed_packet", |b| {
        b.iter(|| {
            let mut h = blake3::Hasher::new_keyed(&key);
            h.update(black_box(&pkt[..]));
            *h.finalize().as_bytes()
        })
    });

    let nonce = [3u8; 12];
    let chacha = ChaCha20Poly1305::new(&key.into());
    let aes = Aes256Gcm::new(&key.into());
    let (head, payload) = pkt.split_at(DATA_HEADER_BYTES);
    let head = head[..HEADER_BYTES].to_vec();
    let mut body = payload.to_vec();

    g.bench_function("chacha20poly1305_seal", |b| {
        b.iter(|| {
            chacha
                .encrypt_inout_detached(&nonce.into(), black_box(&head), black_box(&mut body[..]).into())
                .expect("seal")
        })
    });
    let mut sealed = payload.to_vec();
    let tag = chacha
        .encrypt_inout_detached(&nonce.into(), &head, (&mut sealed[..]).into())
        .expect("seal");
    g.bench_function("chacha20poly1305_open", |b| {
        b.iter(|| {
            let mut m = sealed.clone();
            chacha
                .decrypt_inout_detached(&nonce.into(), black_box(&head), (&mut m[..]).into(), &tag)
                .expect("open");
            m
        })
    });
    g.bench_function("chacha20poly1305_auth_only", |b| {
        b.iter(|| {
            chacha
                .encrypt_inout_detached(&nonce.into(), black_box(&pkt[..]), (&mut [][..]).into())
                .expect("seal")
        })
    });

    g.bench_function("aes256gcm_seal", |b| {
        b.iter(|| {
            aes.encrypt_inout_detached(&nonce.into(), black_box(&head), black_box(&mut body[..]).into())
                .expect("seal")
        })
    });
    let mut sealed = payload.to_vec();
    let tag = aes
        .encrypt_inout_detached(&nonce.into(), &head, (&mut sealed[..]).into())
        .expect("seal");
    g.bench_function("aes256gcm_open", |b| {
        b.iter(|| {
            let mut m = sealed.clone();
            aes.decrypt_inout_detached(&nonce.into(), black_box(&head), (&mut m[..]).into(), &tag)
                .expect("open");
            m
        })
    });
    g.bench_function("aes256gcm_auth_only", |b| {
        b.iter(|| {
            aes.encrypt_inout_detached(&nonce.into(), black_box(&pkt[..]), (&mut [][..]).into())
                .expect("seal")
        })
    });
    // The copy the `_open` benches include, to subtract.
    g.bench_function("copy_1424B", |b| b.iter(|| black_box(&sealed).clone()));
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = packet, auth
}
criterion_main!(benches);
