//! Facts about this machine that the server ranks agents by: free disk space
//! (`statvfs`), chassis (`/sys/class/dmi/id/chassis_type`), OS type, uptime
//! (`/proc/uptime`), addresses and subnets (`getifaddrs`).
//!
//! Everything here reads the machine; the mapping from raw values to what
//! the server takes is in small pure functions that the tests exercise.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Chassis classes the server ranks by (desktop before laptop).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chassis {
    Desktop,
    Server,
    Vm,
    Laptop,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsType {
    Server,
    Workstation,
    Unknown,
}

/// Map an SMBIOS chassis type number (DMTF DSP0134, table 17) to a class.
pub fn chassis_from_smbios(code: u32) -> Chassis {
    match code {
        3 | 4 | 5 | 6 | 7 | 13 | 15 | 16 | 24 | 35 | 36 => Chassis::Desktop,
        8..=12 | 14 | 30..=32 => Chassis::Laptop,
        17 | 23 | 25 | 28 | 29 => Chassis::Server,
        _ => Chassis::Unknown,
    }
}

/// Vendor or product strings of common hypervisors, as DMI reports them.
const VM_MARKERS: &[&str] = &[
    "qemu",
    "kvm",
    "vmware",
    "virtualbox",
    "xen",
    "bochs",
    "virtual machine",
    "amazon ec2",
    "google compute engine",
    "cloud hypervisor",
    "firecracker",
];

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The chassis class of this machine: a virtual machine when DMI or the CPU
/// flags say so, else the DMI chassis type.
pub fn chassis() -> Chassis {
    let dmi = [
        read_trim("/sys/class/dmi/id/sys_vendor"),
        read_trim("/sys/class/dmi/id/product_name"),
    ];
    let vm_by_dmi = dmi
        .iter()
        .flatten()
        .any(|s| VM_MARKERS.iter().any(|m| s.to_lowercase().contains(m)));
    let vm_by_cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
        })
        .unwrap_or(false);
    if vm_by_dmi || vm_by_cpu {
        return Chassis::Vm;
    }
    read_trim("/sys/class/dmi/id/chassis_type")
        .and_then(|s| s.parse().ok())
        .map_or(Chassis::Unknown, chassis_from_smbios)
}

/// Workstation when a graphical session is installed, server otherwise.
pub fn os_type() -> OsType {
    let graphical = ["/usr/share/xsessions", "/usr/share/wayland-sessions"]
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some()));
    if graphical {
        OsType::Workstation
    } else {
        OsType::Server
    }
}

/// Seconds since boot, from the first field of `/proc/uptime`.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some(secs as u64)
}

pub fn uptime_secs() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|t| parse_uptime(&t))
        .unwrap_or(0)
}

/// Free space of the file system holding `path`: (really free, free to unprivileged users).
pub fn disk_free(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct we own; c is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok((s.f_bfree as u64 * frsize, s.f_bavail as u64 * frsize))
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub interface: String,
    pub net: IpNet,
}

/// Every IPv4 and IPv6 address of every interface that is up.
pub fn interface_addresses() -> std::io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: ifa_addr and ifa_netmask point to sockaddrs of the family in sa_family.
        let (addr, mask) = unsafe { (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) };
        let Some(addr) = addr else { continue };
        let prefix = mask.map_or(if addr.is_ipv4() { 32 } else { 128 }, prefix_len);
        if let Ok(net) = IpNet::new(addr, prefix) {
            out.push(IfAddr { interface: name, net });
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `sa` is null or points to a valid sockaddr of the family it names.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: the caller promises a valid sockaddr; we read the variant its family names.
    unsafe {
        match (*sa).sa_family as libc::c_int {
            libc::AF_INET => {
                let s = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let s = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(s.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn prefix_len(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    }
}

/// Addresses worth reporting: not loopback, not IPv6 link-local.
fn routable(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The addresses and subnets to report: `advertise` when given (with the
/// subnets of the interfaces that carry them), else every routable address.
pub fn addresses_and_subnets(ifs: &[IfAddr], advertise: &[IpAddr]) -> (Vec<IpAddr>, Vec<IpNet>) {
    let chosen: Vec<&IfAddr> = if advertise.is_empty() {
        ifs.iter().filter(|i| routable(&i.net.addr())).collect()
    } else {
        ifs.iter().filter(|i| advertise.contains(&i.net.addr())).collect()
    };
    let addrs = if advertise.is_empty() {
        chosen.iter().map(|i| i.net.addr()).collect()
    } else {
        advertise.to_vec()
    };
    let mut nets: Vec<IpNet> = chosen.iter().map(|i| i.net.trunc()).collect();
    nets.sort();
    nets.dedup();
    (addrs, nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chassis_maps_smbios_codes() {
        assert_eq!(chassis_from_smbios(3), Chassis::Desktop);
        assert_eq!(chassis_from_smbios(10), Chassis::Laptop);
        assert_eq!(chassis_from_smbios(23), Chassis::Server);
        assert_eq!(chassis_from_smbios(1), Chassis::Unknown);
        assert_eq!(chassis_from_smbios(2), Chassis::Unknown);
    }

    #[test]
    fn uptime_parses_proc_format() {
        assert_eq!(parse_uptime("2741.65 810.30\n"), Some(2741));
        assert_eq!(parse_uptime("nope"), None);
        assert_eq!(parse_uptime(""), None);
    }

    #[test]
    fn facts_read_this_machine() {
        let (free, usable) = disk_free(Path::new("/")).unwrap();
        assert!(free >= usable && free > 0);
        let ifs = interface_addresses().unwrap();
        assert!(
            ifs.iter()
                .any(|i| i.net.addr() == IpAddr::V4(Ipv4Addr::LOCALHOST) && i.net.prefix_len() == 8),
            "{ifs:?}"
        );
        assert!(uptime_secs() > 0);
        assert!(!hostname().is_empty());
    }

    #[test]
    fn addresses_skip_loopback_unless_advertised() {
        let ifs = vec![
            IfAddr {
                interface: "lo".into(),
                net: "127.0.0.1/8".parse().unwrap(),
            },
            IfAddr {
                interface: "eth0".into(),
                net: "10.1.2.3/24".parse().unwrap(),
            },
            IfAddr {
                interface: "eth0".into(),
                net: "fe80::1/64".parse().unwrap(),
            },
        ];
        let (a, n) = addresses_and_subnets(&ifs, &[]);
        assert_eq!(a, vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(n, vec!["10.1.2.0/24".parse::<IpNet>().unwrap()]);
        let (a, n) = addresses_and_subnets(&ifs, &["127.0.0.1".parse().unwrap()]);
        assert_eq!(a, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(n, vec!["127.0.0.0/8".parse::<IpNet>().unwrap()]);
    }
}
