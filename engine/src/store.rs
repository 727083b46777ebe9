//! The on-disk content store: verified, resumable, bounded.
//!
//! # Layout
//!
//! ```text
//! <root>/<content id in hex>/
//!     table     the encoded block table (written to a temporary file, fsync'd, renamed)
//!     data      the content, blocks written in place as they verify (sparse until complete)
//!     journal   16-byte records, one per committed block: index, and index ^ a check constant
//! ```
//!
//! # The promise
//!
//! A block is reported as held only after its bytes were verified, written
//! and `fdatasync`'d, and then its journal record was written and
//! `fdatasync`'d ([`Store::commit`]). A crash or `kill -9` at any moment
//! therefore loses at most the blocks written since the last commit; it never
//! leaves a block marked held whose bytes are not on disk. A torn or zeroed
//! journal tail fails its check value and is ignored.
//!
//! # Bounds
//!
//! The store has a size limit. Starting a new content that does not fit
//! evicts the least recently used contents that are not in use; if that is
//! not enough, it fails with [`StoreError::Full`], which says how much room is
//! missing. Disk space for a new content is reserved up front
//! (`posix_fallocate`), so a full disk is reported before the transfer starts,
//! not half-way. The journal still grows as blocks commit: a commit that
//! fails (a disk filled by something else) loses nothing, its blocks are
//! committed again with the next one ([`Store::commit_failed`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::content::{BlockTable, ContentId, Geometry, VerifyError};
use crate::ranges::BlockSet;
use crate::session::Library;
use crate::wire;

/// Check constant mixed into journal records.
const JOURNAL_CHECK: u64 = 0x4c54_6a72_6e6c_0001;
const RECORD_BYTES: usize = 16;

/// Errors from the store, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the store is full: content {content} needs {needed} bytes, {free} are free within the limit of {limit} bytes after evicting what is not in use; raise the cache limit or remove content (cache rm)")]
    Full {
        content: ContentId,
        needed: u64,
        free: u64,
        limit: u64,
    },
    #[error(
        "the disk under {path} has no room for content {content} ({needed} bytes): free disk space or move the cache"
    )]
    DiskFull {
        path: PathBuf,
        content: ContentId,
        needed: u64,
    },
    #[error("content {0} is not in the store")]
    Unknown(ContentId),
    #[error("block table on disk for {content} is damaged: {source}; remove it (cache rm) and fetch again")]
    BadTable { content: ContentId, source: VerifyError },
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Entry {
    table: BlockTable,
    table_bytes: Vec<u8>,
    dir: PathBuf,
    data: File,
    journal: File,
    /// Committed blocks: on disk, synced and journaled.
    have: BlockSet,
    /// Written since the last commit.
    written: Vec<u64>,
}

/// Blocks to make durable: sync the data file, then append and sync their journal records.
#[derive(Debug)]
pub struct CommitJob {
    pub id: ContentId,
    data: File,
    journal: File,
    dir: PathBuf,
    pub blocks: Vec<u64>,
}

impl CommitJob {
    pub fn run(&self) -> Result<(), StoreError> {
        let dpath = self.dir.join("data");
        self.data.sync_data().map_err(io_err(&dpath))?;
        let mut rec = Vec::with_capacity(self.blocks.len() * RECORD_BYTES);
        for &i in &self.blocks {
            rec.extend_from_slice(&i.to_le_bytes());
            rec.extend_from_slice(&(i ^ JOURNAL_CHECK).to_le_bytes());
        }
        let jpath = self.dir.join("journal");
        let before = self.journal.metadata().map_err(io_err(&jpath))?.len();
        if let Err(source) = (&self.journal).write_all(&rec).and_then(|()| self.journal.sync_data()) {
            // A part of the records may have been appended: cut it, or the records
            // appended by the retry would be misaligned and ignored at the next open.
            let _ = self.journal.set_len(before);
            return Err(if source.raw_os_error() == Some(libc::ENOSPC) {
                StoreError::DiskFull {
                    path: jpath,
                    content: self.id,
                    needed: rec.len() as u64,
                }
            } else {
                StoreError::Io { path: jpath, source }
            });
        }
        Ok(())
    }
}

/// Summary of one content in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemInfo {
    pub id: ContentId,
    pub size: u64,
    pub held_bytes: u64,
    pub complete: bool,
}

pub struct Store {
    root: PathBuf,
    limit_bytes: u64,
    entries: HashMap<ContentId, Entry>,
    /// Contents that may not be evicted (being fetched or served).
    pinned: HashSet<ContentId>,
}

impl Store {
    /// Open (or create) the store at `root`, loading every content found there.
    /// Damaged entries are skipped with a warning, never half-loaded.
    pub fn open(root: impl Into<PathBuf>, limit_bytes: u64) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let mut entries = HashMap::new();
        for d in fs::read_dir(&root).map_err(io_err(&root))? {
            let d = d.map_err(io_err(&root))?;
            let Ok(id) = d.file_name().to_string_lossy().parse::<ContentId>() else {
                continue;
            };
            match Self::load(&d.path(), id) {
                Ok(e) => {
                    entries.insert(id, e);
                }
                Err(e) => tracing::warn!("skipping damaged store entry {}: {e}", d.path().display()),
            }
        }
        Ok(Self {
            root,
            limit_bytes,
            entries,
            pinned: HashSet::new(),
        })
    }

    fn load(dir: &Path, id: ContentId) -> Result<Entry, StoreError> {
        let tpath = dir.join("table");
        let table_bytes = fs::read(&tpath).map_err(io_err(&tpath))?;
        let table = BlockTable::decode_verified(&table_bytes, &id)
            .map_err(|source| StoreError::BadTable { content: id, source })?;
        let dpath = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dpath)
            .map_err(io_err(&dpath))?;
        let jpath = dir.join("journal");
        let mut journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        let mut raw = Vec::new();
        journal.read_to_end(&mut raw).map_err(io_err(&jpath))?;
        let count = table.geometry().block_count();
        let mut have = BlockSet::new(count);
        for rec in raw.chunks_exact(RECORD_BYTES) {
            let index = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"));
            let check = u64::from_le_bytes(rec[8..].try_into().expect("8 bytes"));
            if check == index ^ JOURNAL_CHECK && index < count {
                have.insert(index);
            }
        }
        let whole = (raw.len() / RECORD_BYTES * RECORD_BYTES) as u64;
        if whole != raw.len() as u64 {
            // A torn record at the tail: cut it so later appends stay aligned.
            journal.set_len(whole).map_err(io_err(&jpath))?;
        }
        Ok(Entry {
            table,
            table_bytes,
            dir: dir.to_owned(),
            data,
            journal,
            have,
            written: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Bytes the store's contents take (their full sizes: space is reserved up front).
    pub fn used_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| e.table.geometry().size + e.table_bytes.len() as u64)
            .sum()
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn contains(&self, id: &ContentId) -> bool {
        self.entries.contains_key(id)
    }

    pub fn table(&self, id: &ContentId) -> Option<&BlockTable> {
        self.entries.get(id).map(|e| &e.table)
    }

    /// Committed blocks of `id`.
    pub fn have(&self, id: &ContentId) -> Option<&BlockSet> {
        self.entries.get(id).map(|e| &e.have)
    }

    pub fn is_complete(&self, id: &ContentId) -> bool {
        self.entries.get(id).is_some_and(|e| e.have.is_full())
    }

    pub fn list(&self) -> Vec<ItemInfo> {
        let mut v: Vec<ItemInfo> = self
            .entries
            .iter()
            .map(|(id, e)| {
                let g = e.table.geometry();
                let held = e
                    .have
                    .runs()
                    .map(|r| g.block_range(r.end - 1).end - g.block_range(r.start).start)
                    .sum();
                ItemInfo {
                    id: *id,
                    size: g.size,
                    held_bytes: held,
                    complete: e.have.is_full(),
                }
            })
            .collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Keep `id` from being evicted until [`unpin`](Self::unpin).
    pub fn pin(&mut self, id: ContentId) {
        self.pinned.insert(id);
    }

    pub fn unpin(&mut self, id: &ContentId) {
        self.pinned.remove(id);
    }

    /// Make room for `needed` bytes, evicting least recently used unpinned contents.
    fn make_room(&mut self, content: ContentId, needed: u64) -> Result<(), StoreError> {
        loop {
            let used = self.used_bytes();
            if used + needed <= self.limit_bytes {
                return Ok(());
            }
            let victim = self
                .entries
                .iter()
                .filter(|(id, _)| !self.pinned.contains(*id))
                .min_by_key(|(_, e)| fs::metadata(e.dir.join("table")).and_then(|m| m.modified()).ok())
                .map(|(id, _)| *id);
            match victim {
                Some(id) => {
                    tracing::info!("evicting {id} from the store to make room for {content}");
                    self.remove(&id)?;
                }
                None => {
                    return Err(StoreError::Full {
                        content,
                        needed,
                        free: self.limit_bytes.saturating_sub(used),
                        limit: self.limit_bytes,
                    })
                }
            }
        }
    }

    /// Start holding content described by a verified `table` (idempotent). Reserves its disk space.
    pub fn begin(&mut self, table: &BlockTable) -> Result<(), StoreError> {
        let id = table.root();
        if self.entries.contains_key(&id) {
            self.touch(&id);
            return Ok(());
        }
        let table_bytes = table.encode();
        let size = table.geometry().size;
        self.make_room(id, size + table_bytes.len() as u64)?;
        let dir = self.root.join(id.to_string());
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let dpath = dir.join("data");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&dpath)
            .map_err(io_err(&dpath))?;
        if size > 0 {
            // SAFETY: valid fd; posix_fallocate only changes the file's allocation.
            let r = unsafe { libc::posix_fallocate(data.as_raw_fd(), 0, size as libc::off_t) };
            if r == libc::ENOSPC {
                let _ = fs::remove_dir_all(&dir);
                return Err(StoreError::DiskFull {
                    path: self.root.clone(),
                    content: id,
                    needed: size,
                });
            } else if r != 0 && r != libc::EOPNOTSUPP {
                let _ = fs::remove_dir_all(&dir);
                return Err(StoreError::Io {
                    path: dpath,
                    source: io::Error::from_raw_os_error(r),
                });
            }
        }
        data.set_len(size).map_err(io_err(&dpath))?;
        let jpath = dir.join("journal");
        let journal = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&jpath)
            .map_err(io_err(&jpath))?;
        // The table goes last and atomically: a directory without it is ignored on open.
        let tmp = dir.join("table.tmp");
        let tpath = dir.join("table");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&table_bytes).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &tpath).map_err(io_err(&tpath))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
        let have = BlockSet::new(table.geometry().block_count());
        self.entries.insert(
            id,
            Entry {
                table: table.clone(),
                table_bytes,
                dir,
                data,
                journal,
                have,
                written: Vec::new(),
            },
        );
        Ok(())
    }

    /// Mark `id` as used now, for least-recently-used eviction.
    #[expect(
        clippy::disallowed_methods,
        reason = "the store is I/O, not the sans-IO core: LRU needs the wall clock"
    )]
    pub fn touch(&self, id: &ContentId) {
        if let Some(e) = self.entries.get(id) {
            if let Ok(f) = File::options().write(true).open(e.dir.join("table")) {
                let _ = f.set_modified(std::time::SystemTime::now());
            }
        }
    }

    /// Verify and write block `index` of `id`. It counts as held after the next [`commit`](Self::commit).
    pub fn write_block(&mut self, id: &ContentId, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let e = self.entries.get(id).ok_or(StoreError::Unknown(*id))?;
        e.table.verify_block(index, data)?;
        self.write_verified_block(id, index, data)
    }

    /// Write block `index` that the caller has already verified against a table
    /// verified for the same id (a [`crate::session::fetch::Fetch`] does), saving a second hash.
    pub fn write_verified_block(&mut self, id: &ContentId, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let e = self.entries.get_mut(id).ok_or(StoreError::Unknown(*id))?;
        if e.have.contains(index) {
            return Ok(());
        }
        let off = e.table.geometry().block_range(index).start;
        let dpath = e.dir.join("data");
        e.data.write_all_at(data, off).map_err(|source| {
            if source.raw_os_error() == Some(libc::ENOSPC) {
                StoreError::DiskFull {
                    path: dpath.clone(),
                    content: *id,
                    needed: data.len() as u64,
                }
            } else {
                StoreError::Io {
                    path: dpath.clone(),
                    source,
                }
            }
        })?;
        e.written.push(index);
        Ok(())
    }

    /// Blocks written but not yet committed.
    pub fn uncommitted(&self, id: &ContentId) -> usize {
        self.entries.get(id).map_or(0, |e| e.written.len())
    }

    /// Make written blocks durable and report them as held. Returns how many were committed.
    pub fn commit(&mut self, id: &ContentId) -> Result<usize, StoreError> {
        let Some(job) = self.take_commit(id)? else { return Ok(0) };
        job.run()?;
        let n = job.blocks.len();
        self.commit_done(&job);
        Ok(n)
    }

    /// Hand the blocks written since the last commit to a [`CommitJob`], which can
    /// run on another thread (the sync takes milliseconds the network loop cannot wait).
    /// Jobs of one content must run in the order they were taken.
    pub fn take_commit(&mut self, id: &ContentId) -> Result<Option<CommitJob>, StoreError> {
        let e = self.entries.get_mut(id).ok_or(StoreError::Unknown(*id))?;
        if e.written.is_empty() {
            return Ok(None);
        }
        let dpath = e.dir.join("data");
        let jpath = e.dir.join("journal");
        Ok(Some(CommitJob {
            id: *id,
            data: e.data.try_clone().map_err(io_err(&dpath))?,
            journal: e.journal.try_clone().map_err(io_err(&jpath))?,
            dir: e.dir.clone(),
            blocks: std::mem::take(&mut e.written),
        }))
    }

    /// Take back the blocks of a job that failed (a full disk): they are written
    /// but not durable, so they go with the next commit of the content.
    pub fn commit_failed(&mut self, job: CommitJob) {
        if let Some(e) = self.entries.get_mut(&job.id) {
            e.written.extend(job.blocks);
        }
    }

    /// Record a job that ran successfully: its blocks are now held.
    pub fn commit_done(&mut self, job: &CommitJob) {
        if let Some(e) = self.entries.get_mut(&job.id) {
            for &i in &job.blocks {
                e.have.insert(i);
            }
        }
    }

    /// Add a whole local file (copied into the store). Returns its table.
    pub fn import(&mut self, path: &Path, block_chunks_log: u8) -> Result<BlockTable, StoreError> {
        let f = File::open(path).map_err(io_err(path))?;
        let size = f.metadata().map_err(io_err(path))?.len();
        let table = BlockTable::compute(io::BufReader::with_capacity(1 << 20, &f), size, block_chunks_log)
            .map_err(io_err(path))?;
        let id = table.root();
        self.begin(&table)?;
        if self.is_complete(&id) {
            return Ok(table);
        }
        let g = table.geometry();
        let mut buf = vec![0u8; g.block_bytes() as usize];
        for i in 0..g.block_count() {
            let len = g.block_len(i) as usize;
            f.read_exact_at(&mut buf[..len], g.block_range(i).start)
                .map_err(io_err(path))?;
            self.write_block(&id, i, &buf[..len])?;
        }
        self.commit(&id)?;
        Ok(table)
    }

    /// Re-read and re-verify every held block of `id`; blocks that fail are forgotten.
    /// Returns the indices that failed.
    pub fn verify(&mut self, id: &ContentId) -> Result<Vec<u64>, StoreError> {
        let e = self.entries.get_mut(id).ok_or(StoreError::Unknown(*id))?;
        let g = e.table.geometry();
        let mut buf = vec![0u8; g.block_bytes() as usize];
        let mut bad = Vec::new();
        let held: Vec<u64> = e.have.runs().flatten().collect();
        for i in held {
            let len = g.block_len(i) as usize;
            let ok = e.data.read_exact_at(&mut buf[..len], g.block_range(i).start).is_ok()
                && e.table.verify_block(i, &buf[..len]).is_ok();
            if !ok {
                bad.push(i);
            }
        }
        if !bad.is_empty() {
            for &i in &bad {
                e.have.remove(i);
            }
            // Rewrite the journal without the bad blocks.
            let jpath = e.dir.join("journal");
            let tmp = e.dir.join("journal.tmp");
            let mut rec = Vec::new();
            for i in e.have.runs().flatten() {
                rec.extend_from_slice(&i.to_le_bytes());
                rec.extend_from_slice(&(i ^ JOURNAL_CHECK).to_le_bytes());
            }
            fs::write(&tmp, &rec).map_err(io_err(&tmp))?;
            File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
            fs::rename(&tmp, &jpath).map_err(io_err(&jpath))?;
            e.journal = OpenOptions::new()
                .append(true)
                .read(true)
                .open(&jpath)
                .map_err(io_err(&jpath))?;
        }
        Ok(bad)
    }

    /// Remove `id` and its files.
    pub fn remove(&mut self, id: &ContentId) -> Result<(), StoreError> {
        let e = self.entries.remove(id).ok_or(StoreError::Unknown(*id))?;
        self.pinned.remove(id);
        fs::remove_dir_all(&e.dir).map_err(io_err(&e.dir))
    }

    /// Copy complete content `id` to `to` (written to a temporary file and renamed).
    pub fn export(&self, id: &ContentId, to: &Path) -> Result<(), StoreError> {
        let e = self.entries.get(id).ok_or(StoreError::Unknown(*id))?;
        if !e.have.is_full() {
            return Err(StoreError::Unknown(*id));
        }
        let tmp = to.with_extension("lowtide-partial");
        fs::copy(e.dir.join("data"), &tmp).map_err(io_err(&tmp))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, to).map_err(io_err(to))
    }

    /// Path of the data file of `id` (for zero-copy exports by callers).
    pub fn data_path(&self, id: &ContentId) -> Option<PathBuf> {
        self.entries.get(id).map(|e| e.dir.join("data"))
    }
}

impl Library for Store {
    fn info(&self, id: &ContentId) -> Option<(Geometry, bool)> {
        let e = self.entries.get(id)?;
        (!e.have.is_empty()).then(|| (e.table.geometry(), e.have.is_full()))
    }

    fn has_block(&self, id: &ContentId, block: u64) -> bool {
        self.entries.get(id).is_some_and(|e| e.have.contains(block))
    }

    fn read(&self, id: &ContentId, stream: u8, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let e = self.entries.get(id).ok_or(io::ErrorKind::NotFound)?;
        if stream == wire::STREAM_TABLE {
            let end = offset as usize + buf.len();
            let src = e
                .table_bytes
                .get(offset as usize..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?;
            buf.copy_from_slice(src);
            return Ok(());
        }
        e.data.read_exact_at(buf, offset)
    }

    fn read_vectored(
        &self,
        id: &ContentId,
        stream: u8,
        offset: u64,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> io::Result<()> {
        let e = self.entries.get(id).ok_or(io::ErrorKind::NotFound)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if stream == wire::STREAM_CONTENT && bufs.len() <= 1024 {
            // SAFETY: IoSliceMut is ABI-compatible with iovec; the fd is valid; preadv writes
            // at most `total` bytes into the slices.
            let n = unsafe {
                libc::preadv(
                    e.data.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    bufs.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n == total as isize {
                return Ok(());
            }
        }
        // A short read (or the table stream): one slice at a time.
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read(id, stream, at, b)?;
            at += b.len() as u64;
        }
        Ok(())
    }
}
