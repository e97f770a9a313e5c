//! What an authorization policy's values must be for a proxy to use them: checked by the control
//! plane before it sends a policy (so that one bad value does not get a workload's whole inbound
//! policy rejected) and by the proxy when it receives one.

/// Whether `s` is an IP address or a CIDR (`10.0.0.0/8`, `fd00::/8`).
pub fn is_ip_block(s: &str) -> bool {
    s.parse::<crate::net::Cidr>().is_ok()
}

/// Why a path pattern with a template (`{*}` one segment, a last `{**}` the rest) is not one;
/// `None` when it is (a pattern without braces always is).
pub fn path_template_error(s: &str) -> Option<String> {
    if !s.contains('{') {
        return None;
    }
    let Some(rest) = s.strip_prefix('/') else {
        return Some(format!("{s:?}: a path template starts with /"));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    for (i, p) in parts.iter().enumerate() {
        match *p {
            "{*}" => {}
            "{**}" if i == parts.len() - 1 => {}
            "{**}" => return Some(format!("{s:?}: {{**}} may only be the last segment")),
            p if p.contains(['{', '}', '*']) => {
                return Some(format!("{s:?}: a segment is {{*}}, {{**}} or text without * or braces"));
            }
            _ => {}
        }
    }
    None
}

/// Why a `when` value is not one its key can have; `None` when it is.
pub fn condition_value_error(key: &str, v: &str) -> Option<String> {
    let ok = match key {
        "source.ip" | "remote.ip" => is_ip_block(v),
        "destination.port" => v.parse::<u16>().is_ok_and(|p| p > 0),
        _ => true,
    };
    (!ok).then(|| format!("{v:?} is not a value {key} can have"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_as_the_proxy_reads_them() {
        assert!(is_ip_block("10.0.0.0/8") && is_ip_block("fd00::1") && !is_ip_block("10.0.0.0/33"));
        assert!(path_template_error("/v1/{*}/x/{**}").is_none());
        assert!(path_template_error("/v1/{**}/x").is_some());
        assert!(path_template_error("/v1/a{*}").is_some());
        assert!(condition_value_error("destination.port", "http").is_some());
        assert!(condition_value_error("source.ip", "10.1.0.0/16").is_none());
    }
}
