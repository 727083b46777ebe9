//! The last resort: missing blocks from the origin (the server's `/files/{id}`
//! or a CDN) over HTTP Range requests. Every 16 KiB block is verified against
//! the block table before it is handed to the store; an origin that sends a
//! bad block is left for the next one.

use anyhow::{anyhow, bail, Context};
use lowtide_engine::content::BlockTable;

use crate::worker::{Cmd, Handle};

/// Most blocks asked for in one Range request (4 MiB at 16 KiB blocks).
pub const RANGE_BLOCKS_MAX: u64 = 256;
/// Written bytes made durable together (one `fdatasync` of data and journal).
pub const COMMIT_BYTES: u64 = 16 << 20;

/// Fetch the block runs `missing` (`[start, end)` block indices) from the
/// first origin in `urls` that serves them, verify and store them. Calls
/// `on_bytes` after each stored request. Returns the bytes stored.
pub async fn fetch_missing(
    http: &reqwest::Client,
    urls: &[String],
    table: &BlockTable,
    missing: &[(u64, u64)],
    engine: &Handle,
    mut on_bytes: impl FnMut(u64),
) -> anyhow::Result<u64> {
    if urls.is_empty() {
        bail!("the server names no origin for this content");
    }
    let id = table.root();
    let mut stored = 0u64;
    let mut uncommitted = 0u64;
    let r = fetch_runs(
        http,
        urls,
        table,
        missing,
        engine,
        &mut on_bytes,
        &mut stored,
        &mut uncommitted,
    )
    .await;
    // Keep what verified even when a later range failed.
    if uncommitted > 0 {
        let c = engine
            .call(|reply| Cmd::Write {
                id,
                blocks: Vec::new(),
                commit: true,
                reply,
            })
            .await
            .with_context(|| format!("committing blocks of {id} from the origin"));
        r.and(c)?;
    } else {
        r?;
    }
    Ok(stored)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the loop of fetch_missing, split out so its error path commits"
)]
async fn fetch_runs(
    http: &reqwest::Client,
    urls: &[String],
    table: &BlockTable,
    missing: &[(u64, u64)],
    engine: &Handle,
    on_bytes: &mut impl FnMut(u64),
    stored: &mut u64,
    uncommitted: &mut u64,
) -> anyhow::Result<()> {
    let id = table.root();
    let g = table.geometry();
    let mut good = 0usize;
    for &(start, end) in missing {
        let mut b = start;
        while b < end {
            let e = (b + RANGE_BLOCKS_MAX).min(end);
            let mut last_err = None;
            let mut done = false;
            for k in 0..urls.len() {
                let u = (good + k) % urls.len();
                match range(http, &urls[u], table, b, e).await {
                    Ok(blocks) => {
                        let n: u64 = blocks.iter().map(|(_, d)| d.len() as u64).sum();
                        let commit = *uncommitted + n >= COMMIT_BYTES;
                        engine
                            .call(|reply| Cmd::Write {
                                id,
                                blocks,
                                commit,
                                reply,
                            })
                            .await
                            .with_context(|| format!("storing blocks of {id} from the origin"))?;
                        *stored += n;
                        *uncommitted = if commit { 0 } else { *uncommitted + n };
                        on_bytes(n);
                        good = u;
                        done = true;
                        break;
                    }
                    Err(err) => {
                        tracing::warn!("origin {}: {err:#}", urls[u]);
                        last_err = Some(err);
                    }
                }
            }
            if !done {
                let err = last_err.unwrap_or_else(|| anyhow!("no origin"));
                return Err(err.context(format!(
                    "no origin could serve blocks {b}..{e} of {id} ({} bytes in all)",
                    g.size
                )));
            }
            b = e;
        }
    }
    Ok(())
}

/// Blocks `[b, e)` from one origin URL, each verified.
async fn range(
    http: &reqwest::Client,
    url: &str,
    table: &BlockTable,
    b: u64,
    e: u64,
) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
    let g = table.geometry();
    let (start, end) = (g.block_range(b).start, g.block_range(e - 1).end);
    let want = (end - start) as usize;
    let mut r = http
        .get(url)
        .header(reqwest::header::RANGE, format!("bytes={start}-{}", end - 1))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let whole = start == 0 && end == g.size;
    match r.status().as_u16() {
        206 => {}
        200 if whole => {}
        s => bail!("{url} answered {s} to a Range request for bytes {start}..{end}"),
    }
    let mut body = Vec::with_capacity(want);
    while let Some(c) = r.chunk().await.with_context(|| format!("reading from {url}"))? {
        if body.len() + c.len() > want {
            bail!("{url} sent more than the {want} bytes asked for");
        }
        body.extend_from_slice(&c);
    }
    if body.len() != want {
        bail!("{url} sent {} bytes, {want} were asked for", body.len());
    }
    let mut out = Vec::with_capacity((e - b) as usize);
    for i in b..e {
        let r = g.block_range(i);
        let d = &body[(r.start - start) as usize..(r.end - start) as usize];
        table
            .verify_block(i, d)
            .with_context(|| format!("{url} sent block {i} that does not match content {}", table.root()))?;
        out.push((i, d.to_vec()));
    }
    Ok(out)
}
