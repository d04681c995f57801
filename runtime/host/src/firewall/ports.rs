//! The parsers the CLI and huskd share: published ports (`[HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]`)
//! and egress CIDRs (`A.B.C.D[/N]`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a published port or CIDR was refused (the message names the text and the rule).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("published port {0:?}: expected [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]")]
    PortShape(String),
    #[error("published port {text:?}: {part:?} is not a port (1..65535)")]
    Port { text: String, part: String },
    #[error("published port {text:?}: {part:?} is not an IPv4 address")]
    HostIp { text: String, part: String },
    #[error("published port {text:?}: unknown protocol {part:?} (tcp or udp)")]
    Protocol { text: String, part: String },
    #[error("CIDR {0:?}: expected an IPv4 address with an optional /0..32 prefix")]
    Cidr(String),
}

/// tcp or udp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One published port: connections to `host_port` (on `host_ip`, or any of the host's
/// addresses) go to `guest_port` of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl FromStr for PortMapping {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Protocol::Tcp),
            Some((rest, "udp")) => (rest, Protocol::Udp),
            Some((_, part)) => {
                return Err(ParseError::Protocol {
                    text: text.into(),
                    part: part.into(),
                })
            }
            None => (text, Protocol::Tcp),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts[..] {
            [h, g] => (None, h, g),
            [ip, h, g] => {
                let ip = ip.parse().map_err(|_| ParseError::HostIp {
                    text: text.into(),
                    part: ip.into(),
                })?;
                (Some(ip), h, g)
            }
            _ => return Err(ParseError::PortShape(text.into())),
        };
        let port = |part: &str| {
            part.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| ParseError::Port {
                    text: text.into(),
                    part: part.into(),
                })
        };
        Ok(PortMapping {
            host_ip,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
            protocol,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.guest_port, self.protocol
        )
    }
}

/// An IPv4 network; host bits are cleared when parsed (`10.1.2.3/8` is `10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = mask(self.prefix);
        u32::from(ip) & mask == u32::from(self.addr)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::Cidr(text.into());
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (text, 32),
        };
        if prefix > 32 {
            return Err(bad());
        }
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_port_takes_an_optional_host_ip_and_protocol() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            p,
            PortMapping {
                host_ip: None,
                host_port: 8080,
                guest_port: 80,
                protocol: Protocol::Tcp
            }
        );
        let p: PortMapping = "192.0.2.2:5353:53/udp".parse().unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::new(192, 0, 2, 2)));
        assert_eq!((p.host_port, p.guest_port), (5353, 53));
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.to_string(), "192.0.2.2:5353:53/udp");
        assert_eq!(
            "1:65535/tcp".parse::<PortMapping>().unwrap().guest_port,
            65535
        );
    }

    #[test]
    fn a_malformed_published_port_is_refused_with_the_part_that_is_wrong() {
        for (text, want) in [
            ("80", "expected [HOSTIP:]HOSTPORT:GUESTPORT"),
            ("a:b:c:d", "expected [HOSTIP:]HOSTPORT:GUESTPORT"),
            ("0:80", "\"0\" is not a port"),
            ("65536:80", "\"65536\" is not a port"),
            ("80:x", "\"x\" is not a port"),
            ("host:80:80", "\"host\" is not an IPv4 address"),
            ("80:80/sctp", "unknown protocol \"sctp\""),
        ] {
            let err = text.parse::<PortMapping>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn a_cidr_is_normalised_to_its_network_and_a_bare_address_is_a_slash_32() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(Ipv4Addr::new(10, 200, 0, 1)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        for bad in ["10.0.0.0/33", "10.0.0/8", "::1/128", "10.0.0.0/", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
