//! Interfaces and network namespaces of the calling thread.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;

use crate::MonitorError;

/// This thread's network namespace (a thread moved with `setns` differs from
/// the process's main thread, so `/proc/self` would be wrong).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Inode number of the calling thread's network namespace: the `ns.inum`
/// the kernel keeps in `struct net`, and what `ls -iL /proc/self/ns/net` shows.
pub fn netns_inode() -> Result<u64, MonitorError> {
    std::fs::metadata(THREAD_NETNS)
        .map(|m| m.ino())
        .map_err(|source| MonitorError::Netns {
            path: THREAD_NETNS,
            source,
        })
}

pub(crate) fn index_of(name: &str) -> Result<u32, MonitorError> {
    let not_found = || MonitorError::InterfaceNotFound {
        name: name.to_owned(),
        netns_inode: netns_inode().unwrap_or(0),
    };
    let c = CString::new(name).map_err(|_| not_found())?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(not_found());
    }
    Ok(index)
}

pub(crate) fn name_of(index: u32) -> Result<String, MonitorError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(MonitorError::InterfaceNotFound {
            name: format!("#{index}"),
            netns_inode: netns_inode().unwrap_or(0),
        });
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
