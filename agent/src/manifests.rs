//! Signed manifests kept beside the store, so peers can start a download from
//! this agent while the server is unreachable.
//!
//! After `get` checked a manifest against the server key pinned at enrolment,
//! it keeps it in `<state_dir>/manifests/<content id>`, as signed: the 64-byte
//! Ed25519 signature, then the exact signed JSON text. Discovery hands it to
//! peers that ask ([`crate::discovery::wire`], kinds 3 and 4); they check it
//! against their own pinned key before they store anything, so a file changed
//! here is refused there, never trusted.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use lowtide_engine::content::ContentId;

use crate::server::SignedManifest;

/// Signature bytes in front of the signed text.
pub const SIGNATURE_BYTES: usize = 64;

/// Where manifests are kept, under the agent's state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("manifests")
}

fn path(dir: &Path, id: &ContentId) -> PathBuf {
    dir.join(id.to_string())
}

/// The signed manifest as bytes: signature, then the signed text.
pub fn to_bytes(m: &SignedManifest) -> anyhow::Result<Vec<u8>> {
    let mut sig = [0u8; SIGNATURE_BYTES];
    hex::decode_to_slice(&m.signature, &mut sig)
        .map_err(|_| anyhow!("the manifest signature is not 128 hex characters"))?;
    let mut out = sig.to_vec();
    out.extend_from_slice(m.manifest.as_bytes());
    Ok(out)
}

/// Back from [`to_bytes`] (not checked: call [`SignedManifest::verify`] with the pinned key).
pub fn from_bytes(b: &[u8]) -> anyhow::Result<SignedManifest> {
    if b.len() <= SIGNATURE_BYTES {
        return Err(anyhow!("{} bytes is too short for a signed manifest", b.len()));
    }
    let (sig, text) = b.split_at(SIGNATURE_BYTES);
    Ok(SignedManifest {
        manifest: String::from_utf8(text.to_vec()).context("the signed manifest text is not UTF-8")?,
        signature: hex::encode(sig),
        public_key: String::new(),
    })
}

/// Keep `m` (already checked against the pinned key) for peers (write, then rename).
pub fn save(dir: &Path, id: &ContentId, m: &SignedManifest) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let to = path(dir, id);
    let tmp = to.with_extension("tmp");
    std::fs::write(&tmp, to_bytes(m)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &to).with_context(|| format!("renaming {} into place", tmp.display()))
}

/// The kept signed manifest of `id` as bytes, if there is one no larger than `max`.
pub fn load_bytes(dir: &Path, id: &ContentId, max: usize) -> Option<Vec<u8>> {
    let p = path(dir, id);
    let len = std::fs::metadata(&p).ok()?.len();
    if len as usize > max {
        return None;
    }
    std::fs::read(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_kept_as_signed_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let id = ContentId::of(b"x");
        let m = SignedManifest {
            manifest: "{\"id\":\"x\"}".into(),
            signature: "ab".repeat(64),
            public_key: "ignored".into(),
        };
        save(d.path(), &id, &m).unwrap();
        let b = load_bytes(d.path(), &id, 1 << 20).unwrap();
        assert_eq!(b.len(), SIGNATURE_BYTES + m.manifest.len());
        let back = from_bytes(&b).unwrap();
        assert_eq!((back.manifest, back.signature), (m.manifest, m.signature));
        assert!(load_bytes(d.path(), &id, 10).is_none(), "larger than asked for");
        assert!(load_bytes(d.path(), &ContentId::of(b"y"), 1 << 20).is_none());
        assert!(from_bytes(&[0; SIGNATURE_BYTES]).is_err());
    }
}
