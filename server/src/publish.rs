//! Publishing: hash a package with the engine (BLAKE3 root and block table),
//! keep a copy in the server's file store if asked, record it, and sign its
//! manifest with the server's Ed25519 key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer;
use lowtide_engine::content::{BlockTable, BLOCK_CHUNKS_LOG_DEFAULT, CONTENT_BYTES_MAX};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::store::{ContentInfo, Manifest, SignedManifest, Store};

/// Longest name or version string.
pub const NAME_CHARS_MAX: usize = 255;
/// Most origin URLs on one content.
pub const ORIGINS_MAX: usize = 16;

/// Where the package's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishSource {
    /// A file on the server's own file system.
    Path(PathBuf),
    /// An `http://` URL the server downloads once to hash.
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub name: String,
    pub version: String,
    #[serde(flatten)]
    pub source: PublishSource,
    /// Extra origin URLs (mirrors, a CDN) that serve the same bytes.
    #[serde(default)]
    pub origins: Vec<String>,
    /// Keep a copy in the server's file store and serve it as an origin.
    #[serde(default = "yes")]
    pub store: bool,
}

fn yes() -> bool {
    true
}

/// Copies everything read through it into a writer.
struct Tee<R, W> {
    r: R,
    w: Option<W>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        if let Some(w) = &mut self.w {
            w.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

fn check_url(u: &str) -> Result<()> {
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() > 2048 || u.chars().any(char::is_whitespace)
    {
        return Err(Error::BadRequest(format!(
            "origin {:?} is not an http:// or https:// URL",
            u.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// Hash `src` (and copy it to `copy_to` when given) on a blocking thread.
async fn hash_file(src: PathBuf, copy_to: Option<PathBuf>) -> Result<BlockTable> {
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&src).map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
        let size = f
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", src.display()), e))?
            .len();
        if !f.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(Error::BadRequest(format!("{} is not a regular file", src.display())));
        }
        if size > CONTENT_BYTES_MAX {
            return Err(Error::TooLarge(format!(
                "{} is {size} bytes; the largest content is {CONTENT_BYTES_MAX}",
                src.display()
            )));
        }
        let w = match &copy_to {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| Error::io(format!("creating {}", p.display()), e))?,
            )),
            None => None,
        };
        let mut tee = Tee {
            r: std::io::BufReader::with_capacity(1 << 20, f),
            w,
        };
        let table = BlockTable::compute(&mut tee, size, BLOCK_CHUNKS_LOG_DEFAULT).map_err(|e| {
            Error::io(
                format!("hashing {} (did it change while being read?)", src.display()),
                e,
            )
        })?;
        if let Some(mut w) = tee.w.take() {
            w.flush().map_err(|e| Error::io("writing to the file store", e))?;
            w.into_inner()
                .map_err(|e| Error::io("writing to the file store", e.into_error()))?
                .sync_all()
                .map_err(|e| Error::io("syncing the file store", e))?;
        }
        Ok(table)
    })
    .await
    .map_err(|e| Error::Upstream(format!("hashing task failed: {e}")))?
}

async fn download(url: &str, to: &Path) -> Result<()> {
    if url.starts_with("https://") {
        return Err(Error::BadRequest(format!(
            "this server build downloads http:// URLs only; fetch {url} yourself, publish the file, and add the URL with --origin"
        )));
    }
    crate::install_tls_provider();
    let mut resp = reqwest::get(url)
        .await
        .map_err(|e| Error::Upstream(format!("fetching {url}: {e}")))?;
    if !resp.status().is_success() {
        return Err(Error::Upstream(format!(
            "fetching {url}: the server answered {}",
            resp.status()
        )));
    }
    let mut f = tokio::fs::File::create(to)
        .await
        .map_err(|e| Error::io(format!("creating {}", to.display()), e))?;
    let mut total: u64 = 0;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| Error::Upstream(format!("fetching {url}: {e}")))?
    {
        total += chunk.len() as u64;
        if total > CONTENT_BYTES_MAX {
            return Err(Error::TooLarge(format!(
                "{url} is larger than {CONTENT_BYTES_MAX} bytes"
            )));
        }
        f.write_all(&chunk)
            .await
            .map_err(|e| Error::io(format!("writing {}", to.display()), e))?;
    }
    f.sync_all()
        .await
        .map_err(|e| Error::io(format!("syncing {}", to.display()), e))?;
    Ok(())
}

/// Publish a package: hash it, store a copy if asked, record it and sign its manifest.
pub async fn publish(
    store: &Store,
    files_dir: &Path,
    public_url: &str,
    req: &PublishRequest,
    now_ms: i64,
) -> Result<ContentInfo> {
    for (what, v) in [("name", &req.name), ("version", &req.version)] {
        if v.trim().is_empty() || v.chars().count() > NAME_CHARS_MAX || v.chars().any(char::is_control) {
            return Err(Error::BadRequest(format!(
                "{what} must be 1-{NAME_CHARS_MAX} printable characters"
            )));
        }
    }
    if req.origins.len() > ORIGINS_MAX {
        return Err(Error::BadRequest(format!("at most {ORIGINS_MAX} origins")));
    }
    req.origins.iter().try_for_each(|u| check_url(u))?;
    if let PublishSource::Url(u) = &req.source {
        check_url(u)?;
    }
    if !req.store && req.origins.is_empty() && matches!(req.source, PublishSource::Path(_)) {
        return Err(Error::BadRequest(
            "without the file store the content needs an external origin: add an origin URL or keep store on".into(),
        ));
    }
    tokio::fs::create_dir_all(files_dir)
        .await
        .map_err(|e| Error::io(format!("creating the file store {}", files_dir.display()), e))?;
    let incoming = files_dir.join(format!(".incoming-{}", hex::encode(rand::random::<[u8; 8]>())));
    let result = async {
        let table = match &req.source {
            PublishSource::Path(p) => hash_file(p.clone(), req.store.then(|| incoming.clone())).await?,
            PublishSource::Url(u) => {
                download(u, &incoming).await?;
                hash_file(incoming.clone(), None).await?
            }
        };
        let id = table.root();
        let mut origins = Vec::new();
        if req.store {
            let dest = files_dir.join(id.to_string());
            tokio::fs::rename(&incoming, &dest)
                .await
                .map_err(|e| Error::io(format!("moving into {}", dest.display()), e))?;
            origins.push(format!("{public_url}/files/{id}"));
        }
        if let PublishSource::Url(u) = &req.source {
            origins.push(u.clone());
        }
        for o in &req.origins {
            if !origins.contains(o) {
                origins.push(o.clone());
            }
        }
        let manifest = Manifest {
            id,
            name: req.name.trim().to_string(),
            version: req.version.trim().to_string(),
            size: table.geometry().size,
            block_chunks_log: table.geometry().block_chunks_log,
            origins: origins.clone(),
            published_ms: now_ms,
        };
        let text = serde_json::to_string(&manifest).expect("manifest serialises");
        let key = store.signing_key().await?;
        let signed = SignedManifest {
            signature: hex::encode(key.sign(text.as_bytes()).to_bytes()),
            public_key: hex::encode(key.verifying_key().to_bytes()),
            manifest: text,
        };
        let info = ContentInfo {
            id,
            name: manifest.name,
            version: manifest.version,
            size: manifest.size,
            block_chunks_log: manifest.block_chunks_log,
            origins,
            stored: req.store,
            published_ms: now_ms,
            retired_ms: None,
        };
        store.put_content(&info, &signed, &table.encode()).await?;
        tracing::info!(id = %id, name = %info.name, version = %info.version, size = info.size, "published");
        Ok(info)
    }
    .await;
    let _ = tokio::fs::remove_file(&incoming).await;
    result
}
