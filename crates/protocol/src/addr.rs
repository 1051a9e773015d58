//! Addresses in dask's form: `tcp://host:port`, `host:port`, or `:port` / `port` for a local
//! port. gRPC needs `http://host:port`; [`Address::endpoint`] gives it.
use std::fmt;

/// A parsed `tcp://host:port` or `tls://host:port` address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    pub host: String,
    pub port: u16,
    /// `tls://`: connections to it are TLS with mutual authentication (see [`crate::tls`]).
    pub tls: bool,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "failed to parse address {input:?}: {why}; expected tcp://HOST:PORT or tls://HOST:PORT, e.g. tcp://127.0.0.1:8786"
)]
pub struct AddressError {
    pub input: String,
    pub why: &'static str,
}

impl Address {
    /// Parses `tcp://host:port`, `host:port`, `[::1]:port`. `default_port` is used when the
    /// address has no port (`tcp://host`).
    pub fn parse(input: &str, default_port: Option<u16>) -> Result<Address, AddressError> {
        let err = |why| AddressError { input: input.to_string(), why };
        let s = input.trim();
        let (tls, rest) = match s.split_once("://") {
            Some(("tcp", rest)) => (false, rest),
            Some(("tls", rest)) => (true, rest),
            Some(_) => return Err(err("unknown scheme (tcp:// and tls:// are supported)")),
            None => (false, s),
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Err(err("no host given"));
        }
        let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
            let (h, after) = stripped.split_once(']').ok_or_else(|| err("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_string(), Some(p)),
                None if after.is_empty() => (h.to_string(), None),
                None => return Err(err("garbage after ']'")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
                Some(_) => return Err(err("IPv6 hosts must be written in brackets: [::1]:8786")),
                None => (rest.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| err("the port is not a number from 0 to 65535"))?,
            None => default_port.ok_or_else(|| err("no port given"))?,
        };
        let host = if host.is_empty() { "127.0.0.1".to_string() } else { host };
        Ok(Address { host, port, tls })
    }

    /// The same address with TLS on or off.
    pub fn with_tls(mut self, tls: bool) -> Address {
        self.tls = tls;
        self
    }

    /// `http://host:port`, what tonic's `Endpoint` takes (TLS, if any, is its connector's).
    pub fn endpoint(&self) -> String {
        self.url("http")
    }

    /// The address of an HTTP port as a browser takes it: `https://host:port` when `tls`
    /// (HTTPS), else `http://host:port`.
    pub fn web_url(&self) -> String {
        self.url(if self.tls { "https" } else { "http" })
    }

    fn url(&self, scheme: &str) -> String {
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "tls" } else { "tcp" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl From<std::net::SocketAddr> for Address {
    fn from(a: std::net::SocketAddr) -> Self {
        Address { host: a.ip().to_string(), port: a.port(), tls: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dask_forms() {
        let a = Address::parse("tcp://127.0.0.1:8786", None).unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 8786));
        assert_eq!(a.to_string(), "tcp://127.0.0.1:8786");
        assert_eq!(a.endpoint(), "http://127.0.0.1:8786");
        assert_eq!(Address::parse("localhost:1", None).unwrap().host, "localhost");
        assert_eq!(Address::parse("tcp://host", Some(8786)).unwrap().port, 8786);
        assert_eq!(Address::parse("[::1]:5", None).unwrap().endpoint(), "http://[::1]:5");
        let t = Address::parse("tls://10.0.0.1:8786", None).unwrap();
        assert!(t.tls && !a.tls);
        assert_eq!(t.to_string(), "tls://10.0.0.1:8786");
        assert_eq!(Address::parse("tls://[::1]:5", None).unwrap().to_string(), "tls://[::1]:5");
    }

    #[test]
    fn rejects_bad_addresses_with_a_reason() {
        for bad in ["", "tcp://", "udp://x:1", "x:notaport", "x:99999", "::1:5", "tcp://h"] {
            let e = Address::parse(bad, None).unwrap_err();
            assert!(e.to_string().contains("expected tcp://HOST:PORT"), "{e}");
        }
    }
}

/// The local IP the system would send from to reach `host:port` (no packet is sent: a UDP
/// socket is connected, which only picks the route). `None` if there is no route.
pub fn route_ip_to(host: &str, port: u16) -> Option<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (host, port.max(1)).to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(target).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// This host's address for others to reach it by (dask's `get_ip`): the source of its default
/// route; on a host without one (a private network, a namespace), the first IPv4 address of an
/// interface that is up and not loopback; else loopback.
pub fn external_ip() -> std::net::IpAddr {
    route_ip_to("8.8.8.8", 80)
        .or_else(first_interface_ip)
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

#[cfg(unix)]
fn first_interface_ip() -> Option<std::net::IpAddr> {
    use nix::net::if_::InterfaceFlags;
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.flags.contains(InterfaceFlags::IFF_UP) && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .find_map(|a| a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| std::net::IpAddr::V4(s.ip())))
}

#[cfg(not(unix))]
fn first_interface_ip() -> Option<std::net::IpAddr> {
    None
}

/// The IPv4 address of network interface `name` (dask's `--interface`, e.g. `eth0`, `ib0`).
#[cfg(unix)]
pub fn interface_ip(name: &str) -> Result<std::net::IpAddr, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list network interfaces: {e}"))?;
    let mut names = std::collections::BTreeSet::new();
    for a in addrs {
        names.insert(a.interface_name.clone());
        if a.interface_name == name
            && let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip())
        {
            return Ok(std::net::IpAddr::V4(ip));
        }
    }
    if names.contains(name) {
        Err(format!("network interface {name:?} has no IPv4 address"))
    } else {
        Err(format!("no network interface named {name:?} (there are {names:?})"))
    }
}

#[cfg(not(unix))]
pub fn interface_ip(name: &str) -> Result<std::net::IpAddr, String> {
    Err(format!("--interface {name}: not supported on this platform; give --host"))
}

/// What `--protocol` and the scheme of an address flag (`--host tls://H`, `--listen-address
/// tls://H:P`) ask for: `Ok(Some(the flag that asked))` for TLS, `Ok(None)` for plain TCP. As
/// in dask, `--protocol` may end in `://`. The two must agree.
pub fn asks_for_tls(flag: &str, spec: Option<&str>, protocol: Option<&str>) -> Result<Option<String>, String> {
    let scheme = spec.and_then(|s| s.split_once("://")).map(|(s, _)| s);
    let protocol = protocol.map(|p| p.trim_end_matches("://"));
    if let Some(p) = protocol {
        if !matches!(p, "tcp" | "tls") {
            return Err(format!("--protocol {p}: tcp and tls are supported"));
        }
        if scheme.is_some_and(|s| s != p) {
            let spec = spec.unwrap_or_default();
            return Err(format!("--protocol {p} and {flag} {spec} disagree: give the protocol once"));
        }
    }
    Ok(match (scheme, protocol) {
        (Some("tls"), _) => Some(format!("{flag} {}", spec.unwrap_or_default())),
        (None, Some("tls")) => Some("--protocol tls".to_string()),
        _ => None,
    })
}

/// A host given as `HOST` or in URI form (`tcp://HOST`, `tcp://HOST:PORT`): the host part.
pub fn host_of(spec: &str) -> Result<String, String> {
    let s = spec.trim();
    let rest = match s.split_once("://") {
        Some(("tcp" | "tls", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!("{spec:?}: the {scheme}:// protocol is not supported (use tcp or tls)"));
        }
        None => s,
    };
    let rest = rest.trim_end_matches('/');
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map(|(h, _)| h).unwrap_or(v6),
        None => rest.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()).map_or(rest, |(h, _)| h),
    };
    Ok(host.to_string())
}

#[cfg(test)]
mod route_tests {
    use super::*;

    #[test]
    fn protocol_and_address_scheme_must_agree() {
        assert_eq!(asks_for_tls("--host", Some("0.0.0.0"), None), Ok(None));
        assert_eq!(asks_for_tls("--host", None, Some("tcp")), Ok(None));
        assert_eq!(asks_for_tls("--host", Some("tls://10.0.0.1"), None), Ok(Some("--host tls://10.0.0.1".into())));
        assert_eq!(asks_for_tls("--host", Some("10.0.0.1"), Some("tls")), Ok(Some("--protocol tls".into())));
        assert_eq!(asks_for_tls("--host", None, Some("tls://")), Ok(Some("--protocol tls".into())));
        assert_eq!(asks_for_tls("--host", Some("tcp://10.0.0.1"), Some("tcp")), Ok(None));
        let err = asks_for_tls("--listen-address", Some("tcp://0.0.0.0:1"), Some("tls")).unwrap_err();
        assert!(err.contains("--listen-address tcp://0.0.0.0:1 disagree"), "{err}");
        let err = asks_for_tls("--host", Some("10.0.0.1"), Some("ucx")).unwrap_err();
        assert!(err.contains("tcp and tls are supported"), "{err}");
    }

    #[test]
    fn hosts_in_uri_form_and_routes_to_loopback() {
        assert_eq!(host_of("tcp://127.0.0.1").unwrap(), "127.0.0.1");
        assert_eq!(host_of("tcp://10.0.0.1:9000").unwrap(), "10.0.0.1");
        assert_eq!(host_of("0.0.0.0").unwrap(), "0.0.0.0");
        assert_eq!(host_of("[::1]:80").unwrap(), "::1");
        assert!(host_of("udp://x").unwrap_err().contains("not supported"));
        assert_eq!(route_ip_to("127.0.0.1", 8786), Some("127.0.0.1".parse().unwrap()));
        #[cfg(unix)]
        assert_eq!(interface_ip("lo").unwrap().to_string(), "127.0.0.1");
        #[cfg(unix)]
        assert!(interface_ip("no-such-if0").unwrap_err().contains("no network interface"));
    }
}
