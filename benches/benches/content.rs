//! Content layer: hashing a whole content into a block table, and verifying
//! one block, for block sizes of 2^2..2^6 BLAKE3 chunks (4..64 KiB).
//!
//! `table_64MiB/*` is the cost of `lowtide-xfer add` per byte (the server
//! hashes each content once); `verify_block/*` is the receiver's cost per
//! received block, the one that runs at line rate. `table_64MiB/blake3_hash` is the
//! single-threaded lower bound for any block size: plain `blake3::hash` over
//! the same bytes.
//!
//! Time is the bench thread's CPU time, not wall time (see `common`).

use std::hint::black_box;
use std::time::Duration;

mod common;

use common::ThreadCpuTime;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use lowtide_engine::content::{BlockTable, CHUNK_BYTES};

const CONTENT_BYTES: usize = 64 << 20;
const BLOCK_LOGS: [u8; 5] = [2, 3, 4, 5, 6];

fn table(c: &mut Criterion<ThreadCpuTime>) {
    let data = lowtide_benches::content(0x9E37_79B9_7F4A_7C15, CONTENT_BYTES);
    let mut g = c.benchmark_group("table_64MiB");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .throughput(Throughput::Bytes(CONTENT_BYTES as u64));
    g.bench_function("blake3_hash", |b| b.iter(|| blake3::hash(black_box(&data))));
    for log in BLOCK_LOGS {
        let kib = (CHUNK_BYTES << log) / 1024;
        g.bench_with_input(BenchmarkId::new("from_bytes", format!("{kib}KiB")), &log, |b, &log| {
            b.iter(|| BlockTable::from_bytes(black_box(&data), log))
        });
    }
    // `compute` from a reader (what `Store::import` does with a file), 16 KiB blocks.
    g.bench_function("compute_reader/16KiB", |b| {
        b.iter(|| BlockTable::compute(black_box(&data[..]), CONTENT_BYTES as u64, 4).expect("in memory"))
    });
    g.finish();
}

fn verify(c: &mut Criterion<ThreadCpuTime>) {
    // 4 MiB is enough for many blocks of every size; verification cost does not depend on the content size.
    let data = lowtide_benches::content(0x9E37_79B9_7F4A_7C15, 4 << 20);
    let mut g = c.benchmark_group("verify_block");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for log in BLOCK_LOGS {
        let t = BlockTable::from_bytes(&data, log);
        let geo = t.geometry();
        let block_bytes = geo.block_bytes();
        g.throughput(Throughput::Bytes(block_bytes));
        let blocks = geo.block_count();
        let kib = block_bytes / 1024;
        let mut i = 0u64;
        g.bench_function(BenchmarkId::from_parameter(format!("{kib}KiB")), |b| {
            b.iter(|| {
                // Walk the blocks so the offset varies, as it does in a transfer.
                i = (i + 7) % blocks;
                let r = geo.block_range(i);
                t.verify_block(i, black_box(&data[r.start as usize..r.end as usize]))
                    .expect("valid block")
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = table, verify
}
criterion_main!(benches);
