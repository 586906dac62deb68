//! The outbound URL guard (webhooks, init-image downloads): `net_guard::parse_url`, and for IP-literal hosts
//! `net_guard::resolve_checked` (no DNS is asked: literals are checked directly) against
//! `net_guard::address_allowed`, under both policies.
//!
//! Input: the first 16 bytes are also read as an address, checked in its IPv4, IPv4-mapped, IPv4-compatible and
//! NAT64 spellings; the whole input, as text, is the URL.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pictor_server::net_guard::{self, UrlPolicy};
use url::Host;

const POLICIES: [UrlPolicy; 2] = [
    UrlPolicy {
        allow_private: false,
    },
    UrlPolicy {
        allow_private: true,
    },
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fn addresses(bytes: &[u8]) {
    if bytes.len() < 16 {
        return;
    }
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).unwrap());
    let v4 = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
    let nat64 = Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u32::from(v4) as u128);
    let compat = Ipv6Addr::from(u32::from(v4) as u128);
    for policy in POLICIES {
        let _ = net_guard::address_allowed(IpAddr::V6(v6), policy);
        let plain = net_guard::address_allowed(IpAddr::V4(v4), policy).is_ok();
        // An IPv6 address that carries an IPv4 address is judged as that address.
        for carried in [v4.to_ipv6_mapped(), nat64] {
            assert_eq!(
                net_guard::address_allowed(IpAddr::V6(carried), policy).is_ok(),
                plain,
                "{v4} as {carried} ({policy:?})"
            );
        }
        if u32::from(v4) > 1 && !plain {
            // (::0 and ::1 are the IPv6 unspecified and loopback addresses, refused on their own.)
            assert!(
                net_guard::address_allowed(IpAddr::V6(compat), policy).is_err(),
                "{compat}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    addresses(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(url) = net_guard::parse_url(text) else {
        return;
    };
    assert!(matches!(url.scheme(), "http" | "https"));
    assert!(url.username().is_empty() && url.password().is_none());
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(_)) => return, // would need DNS
        None => panic!("{text:?} was accepted without a host"),
    };
    for policy in POLICIES {
        let resolved = runtime().block_on(net_guard::resolve_checked(&url, policy));
        let allowed = net_guard::address_allowed(ip, policy).is_ok();
        match resolved {
            Ok(addrs) => {
                assert!(allowed, "{text:?}: {ip} passed resolve_checked");
                assert!(addrs.iter().all(|a| a.ip() == ip));
            }
            Err(_) => assert!(
                !allowed || url.port_or_known_default().is_none(),
                "{text:?}"
            ),
        }
    }
});
