//! Transparent capture: the iptables rules `mycel-proxy init` installs in a pod's network
//! namespace, and recovering a redirected connection's original destination (`SO_ORIGINAL_DST`).
//!
//! Outbound TCP from the app is redirected to the outbound port (15001), inbound TCP arriving at
//! the pod to the inbound port (15006). The proxy's own traffic (its user id, 1337) is never
//! captured, nor traffic to loopback, nor excluded ports and CIDRs. Rules go in with
//! `iptables-restore --noflush`, all at once, for IPv4 and IPv6.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    process::{Command, Stdio},
};

/// What `init` installs.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureOptions {
    pub proxy_uid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Inbound ports never redirected (besides the proxy's own ports and 15020).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never redirected, as `ip/prefix` (either family).
    pub exclude_outbound_cidrs: Vec<String>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            proxy_uid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
        }
    }
}

/// The admin port: probes reach it directly.
pub const ADMIN_PORT: u16 = 15020;

/// The `nat` table rules for one family, in `iptables-restore` format.
pub fn rules(o: &CaptureOptions, ipv6: bool) -> String {
    let loopback = if ipv6 { "::1/128" } else { "127.0.0.1/32" };
    let mut r = String::from("*nat\n");
    for chain in ["MYCEL_INBOUND", "MYCEL_IN_REDIRECT", "MYCEL_OUTPUT", "MYCEL_REDIRECT"] {
        r.push_str(&format!(":{chain} - [0:0]\n"));
    }
    r.push_str(&format!("-A MYCEL_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", o.inbound_port));
    r.push_str(&format!("-A MYCEL_REDIRECT -p tcp -j REDIRECT --to-ports {}\n", o.outbound_port));
    // Inbound: everything but the proxy's own ports and the excluded ones.
    r.push_str("-A PREROUTING -p tcp -j MYCEL_INBOUND\n");
    let mut skip_in = vec![o.outbound_port, o.inbound_port, ADMIN_PORT];
    skip_in.extend(&o.exclude_inbound_ports);
    for p in skip_in {
        r.push_str(&format!("-A MYCEL_INBOUND -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str("-A MYCEL_INBOUND -p tcp -j MYCEL_IN_REDIRECT\n");
    // Outbound: not the proxy's own connections, not loopback, not excluded ports or CIDRs.
    r.push_str("-A OUTPUT -p tcp -j MYCEL_OUTPUT\n");
    r.push_str(&format!("-A MYCEL_OUTPUT -m owner --uid-owner {} -j RETURN\n", o.proxy_uid));
    r.push_str(&format!("-A MYCEL_OUTPUT -d {loopback} -j RETURN\n"));
    for p in &o.exclude_outbound_ports {
        r.push_str(&format!("-A MYCEL_OUTPUT -p tcp --dport {p} -j RETURN\n"));
    }
    for c in o.exclude_outbound_cidrs.iter().filter(|c| c.contains(':') == ipv6) {
        r.push_str(&format!("-A MYCEL_OUTPUT -d {c} -j RETURN\n"));
    }
    r.push_str("-A MYCEL_OUTPUT -j MYCEL_REDIRECT\n");
    r.push_str("COMMIT\n");
    r
}

/// The first address of `/proc/net/if_inet6` (its text) that is neither loopback nor
/// link-local: one the pod could send or receive IPv6 traffic on.
pub fn routable_ipv6(if_inet6: &str) -> Option<String> {
    if_inet6.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (addr, scope) = (f.next()?, f.nth(2)?);
        // Scope 0x10 is the host (loopback), 0x20 the link; anything else can be routed.
        let scope = u8::from_str_radix(scope, 16).ok()?;
        (addr.len() == 32 && scope != 0x10 && scope != 0x20).then(|| {
            let groups: Vec<&str> = (0..8).map(|i| &addr[i * 4..i * 4 + 4]).collect();
            groups.join(":")
        })
    })
}

/// Installs the rules for both families. IPv6 is skipped (with a note) where the namespace has
/// no IPv6 tables and no IPv6 address; with an address it fails, since the pod's IPv6 traffic
/// would otherwise bypass the sidecar.
pub fn install(o: &CaptureOptions) -> Result<Vec<String>, String> {
    for cidr in &o.exclude_outbound_cidrs {
        cidr.parse::<mycel_api::net::Cidr>().map_err(|e| format!("--exclude-outbound-cidrs: {e}"))?;
    }
    let mut notes = Vec::new();
    for (tool, ipv6) in [("iptables-restore", false), ("ip6tables-restore", true)] {
        let mut child = Command::new(tool)
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{tool}: {e} (is iptables installed?)"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(rules(o, ipv6).as_bytes()).map_err(|e| format!("{tool}: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("{tool}: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if ipv6 {
                let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
                if let Some(addr) = routable_ipv6(&inet6) {
                    return Err(format!(
                        "{tool} failed: {err}; the pod has the IPv6 address {addr}, whose traffic would bypass the sidecar (the init container needs NET_ADMIN and ip6tables)"
                    ));
                }
                notes.push(format!("IPv6 capture not installed (the pod has no IPv6 address): {err}"));
                continue;
            }
            return Err(format!("{tool} failed: {err} (the init container needs NET_ADMIN)"));
        }
    }
    Ok(notes)
}

/// Where a redirected connection was going before the capture rules sent it here.
pub fn original_destination(stream: &tokio::net::TcpStream) -> std::io::Result<SocketAddr> {
    crate::sys::original_destination(stream.as_raw_fd(), stream.local_addr()?.is_ipv4())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_address_makes_missing_ipv6_capture_fatal() {
        let loopback_and_link = "00000000000000000000000000000001 01 80 10 80       lo\nfe800000000000000c1b2afffe3d4e5f 02 40 20 80     eth0\n";
        assert_eq!(
            routable_ipv6(loopback_and_link),
            None,
            "loopback and link-local only: IPv6 may be skipped"
        );
        let global = format!("{loopback_and_link}fd000000000000000000000000000007 02 80 00 80     eth0\n");
        assert_eq!(routable_ipv6(&global).as_deref(), Some("fd00:0000:0000:0000:0000:0000:0000:0007"));
        assert_eq!(routable_ipv6(""), None);
    }

    #[test]
    fn rules_exclude_the_proxy_loopback_and_what_was_asked() {
        let o = CaptureOptions {
            exclude_inbound_ports: vec![8081],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
            ..Default::default()
        };
        let v4 = rules(&o, false);
        assert!(v4.contains("-A MYCEL_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
        assert!(v4.contains("-A MYCEL_OUTPUT -d 127.0.0.1/32 -j RETURN"));
        assert!(v4.contains("-A MYCEL_INBOUND -p tcp --dport 8081 -j RETURN"));
        assert!(v4.contains("-A MYCEL_OUTPUT -p tcp --dport 5432 -j RETURN"));
        assert!(v4.contains("-A MYCEL_OUTPUT -d 10.0.0.0/8 -j RETURN") && !v4.contains("fd00::/8"));
        let v6 = rules(&o, true);
        assert!(v6.contains("-d ::1/128") && v6.contains("-d fd00::/8") && !v6.contains("10.0.0.0/8"));
        // The redirect is the last outbound rule: every exclusion comes before it.
        assert!(v4.find("-A MYCEL_OUTPUT -j MYCEL_REDIRECT").unwrap() > v4.find("--dport 5432").unwrap());
    }
}
