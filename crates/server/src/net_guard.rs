//! Outbound HTTP that cannot be turned against the service's own network (SSRF).
//!
//! Every outbound request (init-image downloads, webhooks) goes through this module. A URL must be `http` or
//! `https` without credentials; its host is resolved here, every address it resolves to is checked against the
//! [`UrlPolicy`], and the request is then pinned to exactly those checked addresses so that a second DNS lookup
//! (DNS rebinding) cannot swap in another target. Redirects are followed by hand, one hop at a time, and each hop is
//! checked again. Cloud-metadata endpoints are refused whatever the policy says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::redirect::Policy;
use url::{Host, Url};

/// User-Agent sent with downloads.
const FETCH_USER_AGENT: &str = "pictor";
/// User-Agent sent with webhooks.
const WEBHOOK_USER_AGENT: &str = "pictor-webhook";
/// Upper bound on the buffer reserved up front from a declared Content-Length.
const MAX_INITIAL_CAPACITY: u64 = 8 * 1024 * 1024;

/// Which remote addresses outbound requests may reach.
#[derive(Clone, Copy, Debug, Default)]
pub struct UrlPolicy {
    /// Allow loopback, private, link-local and other non-public addresses (the `--allow-private-urls` flag).
    /// Cloud-metadata addresses stay refused even when this is set.
    pub allow_private: bool,
}

/// Size, time and redirect bounds for one download.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock bound on the whole download: resolution, every redirect hop and the body.
    pub timeout: Duration,
    /// Largest body accepted, in bytes.
    pub max_bytes: u64,
    /// Most redirects followed before giving up.
    pub max_redirects: usize,
}

/// Why an outbound request was refused or failed. The messages are meant to be shown to API users.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The URL is malformed or not acceptable (scheme, credentials, missing host).
    #[error("invalid URL: {0}")]
    BadUrl(String),
    /// The URL's host is, or resolves to, an address the policy does not allow.
    #[error("URL not allowed: {0}")]
    Refused(String),
    /// The response body is larger than the allowed size.
    #[error("the response is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: u64,
    },
    /// The request did not complete in the allowed time.
    #[error("the request timed out")]
    Timeout,
    /// The remote server's final answer was not a 2xx status.
    #[error("the remote server answered with HTTP status {0}")]
    Status(u16),
    /// Name resolution, connection or transfer failure.
    #[error("network error: {0}")]
    Network(String),
}

/// Why an address is refused.
enum Block {
    /// A cloud-metadata endpoint: refused under every policy.
    Metadata,
    /// A non-public address, allowed only with [`UrlPolicy::allow_private`]; the text names the kind of address.
    NonPublic(&'static str),
}

const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean ...
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task credentials
    Ipv4Addr::new(169, 254, 170, 23),  // AWS EKS pod identity credentials
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
];

const METADATA_V6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254), // AWS IMDS over IPv6
    Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0023), // AWS EKS pod identity over IPv6
];

fn in_v4_net(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn in_v6_net(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn v4_block(ip: Ipv4Addr) -> Option<Block> {
    if METADATA_V4.contains(&ip) {
        return Some(Block::Metadata);
    }
    let kind = if in_v4_net(ip, [0, 0, 0, 0], 8) {
        "an unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_private() {
        "a private-network address"
    } else if ip.is_link_local() {
        "a link-local address"
    } else if in_v4_net(ip, [100, 64, 0, 0], 10) {
        "a shared (carrier-grade NAT) address"
    } else if ip.is_broadcast() {
        "a broadcast address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_documentation() || in_v4_net(ip, [198, 18, 0, 0], 15) {
        "a documentation or benchmarking address"
    } else if in_v4_net(ip, [192, 0, 0, 0], 24) || in_v4_net(ip, [240, 0, 0, 0], 4) {
        "a reserved address"
    } else {
        return None;
    };
    Some(Block::NonPublic(kind))
}

fn v6_block(ip: Ipv6Addr) -> Option<Block> {
    if METADATA_V6.contains(&ip) {
        return Some(Block::Metadata);
    }
    if ip.is_unspecified() {
        return Some(Block::NonPublic("an unspecified address"));
    }
    if ip.is_loopback() {
        return Some(Block::NonPublic("a loopback address"));
    }
    // Addresses that carry an IPv4 address are judged as that IPv4 address: mapped (::ffff:a.b.c.d),
    // the deprecated compatible form (::a.b.c.d) and the NAT64 well-known prefix (64:ff9b::a.b.c.d).
    let low32 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_block(v4);
    }
    if in_v6_net(ip, Ipv6Addr::UNSPECIFIED, 96)
        || in_v6_net(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96)
    {
        return v4_block(low32);
    }
    let kind = if in_v6_net(ip, Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7) {
        "a private-network address"
    } else if in_v6_net(ip, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
        "a link-local address"
    } else if in_v6_net(ip, Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10) {
        "a site-local address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if in_v6_net(ip, Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48) {
        "a private-network address"
    } else if in_v6_net(ip, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32)
        || in_v6_net(ip, Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20)
        || in_v6_net(ip, Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 0), 48)
    {
        "a documentation or benchmarking address"
    } else if in_v6_net(ip, Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64) {
        "a reserved address"
    } else {
        return None;
    };
    Some(Block::NonPublic(kind))
}

/// Checks one address against the policy. `Err` carries what kind of address it is ("a loopback address",
/// "a cloud metadata address", ...), to be put after "… is" / "… resolves to" in a message.
pub fn address_allowed(ip: IpAddr, policy: UrlPolicy) -> Result<(), String> {
    let block = match ip {
        IpAddr::V4(v4) => v4_block(v4),
        IpAddr::V6(v6) => v6_block(v6),
    };
    match block {
        None => Ok(()),
        Some(Block::Metadata) => Err("a cloud metadata address".to_string()),
        Some(Block::NonPublic(_)) if policy.allow_private => Ok(()),
        Some(Block::NonPublic(kind)) => Err(kind.to_string()),
    }
}

/// Parses a user-given URL and accepts only `http`/`https` URLs with a host and without a user name or password.
pub fn parse_url(s: &str) -> Result<Url, NetError> {
    let url = Url::parse(s).map_err(|_| NetError::BadUrl("not a valid http(s) URL".to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(NetError::BadUrl("not an http(s) URL".to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(NetError::BadUrl(
            "URLs with a user name or password are not accepted".to_string(),
        ));
    }
    if url.host().is_none() {
        return Err(NetError::BadUrl("the URL has no host".to_string()));
    }
    Ok(url)
}

/// Resolves the URL's host (tokio::net::lookup_host; IP literals directly) and checks every address; error if none or any refused.
pub async fn resolve_checked(url: &Url, policy: UrlPolicy) -> Result<Vec<SocketAddr>, NetError> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| NetError::BadUrl("the URL has no port".to_string()))?;
    let literal = |ip: IpAddr| -> Result<Vec<SocketAddr>, NetError> {
        address_allowed(ip, policy).map_err(|why| NetError::Refused(format!("{ip} is {why}")))?;
        Ok(vec![SocketAddr::new(ip, port)])
    };
    match url.host() {
        None => Err(NetError::BadUrl("the URL has no host".to_string())),
        Some(Host::Ipv4(ip)) => literal(IpAddr::V4(ip)),
        Some(Host::Ipv6(ip)) => literal(IpAddr::V6(ip)),
        Some(Host::Domain(domain)) => {
            let found = tokio::net::lookup_host((domain, port)).await.map_err(|e| {
                tracing::debug!(host = domain, error = %e, "outbound host lookup failed");
                NetError::Network(format!("could not resolve host {domain}"))
            })?;
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for addr in found {
                address_allowed(addr.ip(), policy)
                    .map_err(|why| NetError::Refused(format!("{domain} resolves to {why}")))?;
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
            if addrs.is_empty() {
                return Err(NetError::Network(format!("host {domain} has no addresses")));
            }
            Ok(addrs)
        }
    }
}

/// A client for one request to `url`: no proxy, no automatic redirects, rustls, and the host pinned to `addrs`
/// (already checked) so that reqwest never resolves the name itself.
fn pinned_client(
    url: &Url,
    addrs: &[SocketAddr],
    timeout: Duration,
    user_agent: &str,
) -> Result<reqwest::Client, NetError> {
    let mut builder = reqwest::Client::builder()
        .redirect(Policy::none())
        .no_proxy()
        .use_rustls_tls()
        .timeout(timeout)
        .user_agent(user_agent);
    // IP-literal hosts are connected to directly; only names need pinning.
    if let Some(Host::Domain(domain)) = url.host() {
        builder = builder.resolve_to_addrs(domain, addrs);
    }
    builder.build().map_err(|e| {
        tracing::warn!(error = ?e, "could not build the outbound HTTP client");
        NetError::Network("could not set up the HTTP client".to_string())
    })
}

/// Turns a reqwest error into a user-facing [`NetError`], logging the details.
fn request_error(e: reqwest::Error) -> NetError {
    tracing::debug!(error = ?e, "outbound request failed");
    if e.is_timeout() {
        NetError::Timeout
    } else if e.is_connect() {
        NetError::Network("could not connect to the remote server".to_string())
    } else if e.is_body() || e.is_decode() {
        NetError::Network("the connection failed while reading the response".to_string())
    } else {
        NetError::Network("the request failed".to_string())
    }
}

/// GET, following at most `limits.max_redirects` redirects BY HAND (reqwest redirect policy none): each hop's URL is parsed,
/// resolved and checked again, and the request is pinned to the checked address (reqwest ClientBuilder::resolve_to_addrs)
/// so DNS rebinding cannot swap it. The body is streamed and cut off with TooLarge past max_bytes (also reject early on a
/// Content-Length above the limit). Whole-request timeout = limits.timeout.
pub async fn get_bytes(url: &str, policy: UrlPolicy, limits: Limits) -> Result<Vec<u8>, NetError> {
    let url = parse_url(url)?;
    tokio::time::timeout(limits.timeout, get_following(url, policy, limits))
        .await
        .unwrap_or(Err(NetError::Timeout))
}

async fn get_following(
    mut url: Url,
    policy: UrlPolicy,
    limits: Limits,
) -> Result<Vec<u8>, NetError> {
    let mut followed = 0usize;
    loop {
        let addrs = resolve_checked(&url, policy).await?;
        let client = pinned_client(&url, &addrs, limits.timeout, FETCH_USER_AGENT)?;
        let response = client
            .get(url.clone())
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status();
        if status.is_redirection() {
            let Some(location) = response.headers().get(LOCATION) else {
                return Err(NetError::Status(status.as_u16()));
            };
            if followed >= limits.max_redirects {
                return Err(NetError::Network(format!(
                    "too many redirects (the limit is {})",
                    limits.max_redirects
                )));
            }
            followed += 1;
            let bad_target =
                || NetError::BadUrl("the redirect target is not a valid URL".to_string());
            let location = location.to_str().map_err(|_| bad_target())?;
            let next = url.join(location).map_err(|_| bad_target())?;
            url = parse_url(next.as_str()).map_err(|e| match e {
                NetError::BadUrl(why) => NetError::BadUrl(format!("redirect target: {why}")),
                other => other,
            })?;
            continue;
        }
        if !status.is_success() {
            return Err(NetError::Status(status.as_u16()));
        }
        return read_limited(response, limits.max_bytes).await;
    }
}

/// Streams the body into memory, failing with [`NetError::TooLarge`] as soon as it passes `max_bytes`.
async fn read_limited(
    mut response: reqwest::Response,
    max_bytes: u64,
) -> Result<Vec<u8>, NetError> {
    let declared = response.content_length();
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(NetError::TooLarge { limit: max_bytes });
    }
    let capacity = declared.unwrap_or(0).min(MAX_INITIAL_CAPACITY);
    let mut body = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(request_error)? {
        if (body.len() as u64).saturating_add(chunk.len() as u64) > max_bytes {
            return Err(NetError::TooLarge { limit: max_bytes });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// POSTs a JSON body (Content-Type application/json, User-Agent "pictor-webhook"), no redirects followed, pinned
/// to checked addresses, with the given timeout. Ok(status) for 2xx, Err(NetError::Status) otherwise.
pub async fn post_json(
    url: &str,
    body: &serde_json::Value,
    policy: UrlPolicy,
    timeout: Duration,
) -> Result<u16, NetError> {
    let url = parse_url(url)?;
    let payload = body.to_string();
    let attempt = async {
        let addrs = resolve_checked(&url, policy).await?;
        let client = pinned_client(&url, &addrs, timeout, WEBHOOK_USER_AGENT)?;
        let response = client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(payload)
            .send()
            .await
            .map_err(request_error)?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            Ok(status)
        } else {
            Err(NetError::Status(status))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Err(NetError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use axum::Router;
    use std::sync::{Arc, Mutex};

    const PRIVATE_OK: UrlPolicy = UrlPolicy {
        allow_private: true,
    };
    const STRICT: UrlPolicy = UrlPolicy {
        allow_private: false,
    };

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(10),
            max_bytes: 4096,
            max_redirects: 3,
        }
    }

    #[test]
    fn address_table() {
        // (address, allowed without allow_private, allowed with allow_private)
        let table: &[(&str, bool, bool)] = &[
            ("127.0.0.1", false, true),
            ("127.8.9.10", false, true),
            ("::1", false, true),
            ("0.0.0.0", false, true),
            ("::", false, true),
            ("10.1.2.3", false, true),
            ("172.16.0.1", false, true),
            ("172.31.255.255", false, true),
            ("172.32.0.1", true, true),
            ("192.168.1.1", false, true),
            ("169.254.1.1", false, true),
            ("169.254.169.254", false, false),
            ("169.254.170.2", false, false),
            ("100.100.100.200", false, false),
            ("fd00:ec2::254", false, false),
            ("::ffff:169.254.169.254", false, false),
            ("::ffff:127.0.0.1", false, true),
            ("::ffff:10.0.0.1", false, true),
            ("::127.0.0.1", false, true),
            ("64:ff9b::7f00:1", false, true),
            ("::ffff:8.8.8.8", true, true),
            ("100.64.0.1", false, true),
            ("100.127.255.254", false, true),
            ("100.128.0.1", true, true),
            ("255.255.255.255", false, true),
            ("224.0.0.1", false, true),
            ("192.0.2.1", false, true),
            ("198.18.0.1", false, true),
            ("240.0.0.1", false, true),
            ("fd12:3456::1", false, true),
            ("fc00::1", false, true),
            ("fe80::1", false, true),
            ("ff02::1", false, true),
            ("2001:db8::1", false, true),
            ("8.8.8.8", true, true),
            ("1.1.1.1", true, true),
            ("2606:4700::1111", true, true),
            ("2a00:1450:4001:81b::200e", true, true),
        ];
        for &(text, strict, private) in table {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(
                address_allowed(ip, STRICT).is_ok(),
                strict,
                "{text} without allow_private"
            );
            assert_eq!(
                address_allowed(ip, PRIVATE_OK).is_ok(),
                private,
                "{text} with allow_private"
            );
        }
    }

    #[test]
    fn refusal_reasons_name_the_kind() {
        let why = |s: &str| address_allowed(s.parse().unwrap(), STRICT).unwrap_err();
        assert_eq!(why("127.0.0.1"), "a loopback address");
        assert_eq!(why("::ffff:127.0.0.1"), "a loopback address");
        assert_eq!(why("10.0.0.1"), "a private-network address");
        assert_eq!(why("169.254.169.254"), "a cloud metadata address");
        assert_eq!(
            address_allowed("fd00:ec2::254".parse().unwrap(), PRIVATE_OK).unwrap_err(),
            "a cloud metadata address"
        );
    }

    #[test]
    fn parse_url_accepts_http_and_https_only() {
        assert!(parse_url("http://example.com/a.png").is_ok());
        assert!(parse_url("https://example.com:8443/a.png?x=1").is_ok());
        for bad in [
            "ftp://example.com/a.png",
            "file:///etc/passwd",
            "gopher://example.com/",
            "data:image/png;base64,AAAA",
            "javascript:alert(1)",
            "https://user:pass@example.com/a.png",
            "https://user@example.com/a.png",
            "https://:pass@example.com/a.png",
            "not a url",
            "",
            "http://",
            "//example.com/a.png",
        ] {
            assert!(
                matches!(parse_url(bad), Err(NetError::BadUrl(_))),
                "{bad:?} should be rejected"
            );
        }
    }

    #[tokio::test]
    async fn literal_and_hostname_resolution_is_checked() {
        let url = parse_url("http://[::ffff:127.0.0.1]:8080/").unwrap();
        assert!(matches!(
            resolve_checked(&url, STRICT).await,
            Err(NetError::Refused(_))
        ));
        // Numeric shorthand is normalised by the URL parser and still caught.
        let url = parse_url("http://2130706433/").unwrap();
        assert!(matches!(
            resolve_checked(&url, STRICT).await,
            Err(NetError::Refused(_))
        ));

        let url = parse_url("http://localhost:8080/").unwrap();
        match resolve_checked(&url, STRICT).await {
            Err(NetError::Refused(msg)) => {
                assert!(msg.contains("localhost"), "{msg}");
                assert!(msg.contains("loopback"), "{msg}");
            }
            other => panic!("localhost not refused: {other:?}"),
        }
        let addrs = resolve_checked(&url, PRIVATE_OK).await.unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080));

        let url = parse_url("http://169.254.169.254/latest/meta-data/").unwrap();
        assert!(matches!(
            resolve_checked(&url, PRIVATE_OK).await,
            Err(NetError::Refused(_))
        ));
    }

    #[derive(Clone, Default)]
    struct Recorded {
        posts: Arc<Mutex<Vec<(String, String, String)>>>,
    }

    fn redirect_to(location: &str) -> impl IntoResponse {
        (
            StatusCode::FOUND,
            [(axum::http::header::LOCATION, location.to_string())],
        )
    }

    async fn redirect_chain(Path(n): Path<u32>) -> axum::response::Response {
        if n == 0 {
            "end of chain".into_response()
        } else {
            redirect_to(&format!("/redir/{}", n - 1)).into_response()
        }
    }

    fn chunked(chunks: usize, size: usize) -> Body {
        let parts =
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(Bytes::from(vec![b'y'; size])));
        Body::from_stream(futures_util::stream::iter(parts))
    }

    async fn record(State(rec): State<Recorded>, headers: HeaderMap, body: String) -> StatusCode {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let entry = (
            header(axum::http::header::CONTENT_TYPE),
            header(axum::http::header::USER_AGENT),
            body,
        );
        rec.posts.lock().unwrap().push(entry);
        StatusCode::NO_CONTENT
    }

    /// Starts the test server on 127.0.0.1 and returns its base URL.
    async fn serve() -> (String, Recorded) {
        let recorded = Recorded::default();
        let app = Router::new()
            .route("/small", get(|| async { "hello pictor" }))
            .route("/redir/{n}", get(redirect_chain))
            .route(
                "/to-metadata",
                get(|| async { redirect_to("http://169.254.169.254/latest/meta-data/") }),
            )
            .route(
                "/to-metadata-v6",
                get(|| async { redirect_to("http://[fd00:ec2::254]/latest/") }),
            )
            .route(
                "/to-file",
                get(|| async { redirect_to("file:///etc/passwd") }),
            )
            .route("/no-location", get(|| async { StatusCode::FOUND }))
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
            .route("/exact", get(|| async { vec![b'x'; 4096] }))
            .route("/big", get(|| async { vec![b'x'; 4097] }))
            .route("/big-chunked", get(|| async { chunked(8, 1024) }))
            .route("/small-chunked", get(|| async { chunked(4, 1000) }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "too late"
                }),
            )
            .route(
                "/slow-body",
                get(|| async {
                    let parts = futures_util::stream::unfold(0u8, |step| async move {
                        if step > 0 {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        Some((
                            Ok::<_, std::io::Error>(Bytes::from_static(b"part")),
                            step + 1,
                        ))
                    });
                    Body::from_stream(parts)
                }),
            )
            .route("/hook", post(record))
            .route(
                "/fail",
                post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            )
            .route(
                "/hook-redirect",
                post(|| async {
                    (
                        StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, "/hook")],
                    )
                }),
            )
            .with_state(recorded.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (format!("http://{addr}"), recorded)
    }

    #[tokio::test]
    async fn get_small_body_only_with_allow_private() {
        let (base, _) = serve().await;
        let body = get_bytes(&format!("{base}/small"), PRIVATE_OK, limits())
            .await
            .unwrap();
        assert_eq!(body, b"hello pictor");

        match get_bytes(&format!("{base}/small"), STRICT, limits()).await {
            Err(NetError::Refused(msg)) => assert!(msg.contains("loopback"), "{msg}"),
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn localhost_by_name() {
        let (base, _) = serve().await;
        let port = base.rsplit(':').next().unwrap();
        let url = format!("http://localhost:{port}/small");
        assert!(matches!(
            get_bytes(&url, STRICT, limits()).await,
            Err(NetError::Refused(_))
        ));
        assert_eq!(
            get_bytes(&url, PRIVATE_OK, limits()).await.unwrap(),
            b"hello pictor"
        );
    }

    #[tokio::test]
    async fn pinned_client_never_resolves_the_name_itself() {
        let (base, _) = serve().await;
        let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
        // `.invalid` can never resolve, so this only works if the pinned address is used.
        let url = parse_url(&format!(
            "http://pictor-pinning-test.invalid:{}/small",
            addr.port()
        ))
        .unwrap();
        let client =
            pinned_client(&url, &[addr], Duration::from_secs(5), FETCH_USER_AGENT).unwrap();
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "hello pictor");
    }

    #[tokio::test]
    async fn redirects_are_followed_up_to_the_limit() {
        let (base, _) = serve().await;
        let body = get_bytes(&format!("{base}/redir/3"), PRIVATE_OK, limits())
            .await
            .unwrap();
        assert_eq!(body, b"end of chain");

        match get_bytes(&format!("{base}/redir/4"), PRIVATE_OK, limits()).await {
            Err(NetError::Network(msg)) => assert!(msg.contains("too many redirects"), "{msg}"),
            other => panic!("expected too many redirects, got {other:?}"),
        }
        let none = Limits {
            max_redirects: 0,
            ..limits()
        };
        assert!(get_bytes(&format!("{base}/redir/1"), PRIVATE_OK, none)
            .await
            .is_err());
        assert!(get_bytes(&format!("{base}/redir/0"), PRIVATE_OK, none)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn every_redirect_hop_is_checked() {
        let (base, _) = serve().await;
        for path in ["/to-metadata", "/to-metadata-v6"] {
            match get_bytes(&format!("{base}{path}"), PRIVATE_OK, limits()).await {
                Err(NetError::Refused(msg)) => assert!(msg.contains("metadata"), "{msg}"),
                other => panic!("{path}: expected Refused, got {other:?}"),
            }
        }
        assert!(matches!(
            get_bytes(&format!("{base}/to-file"), PRIVATE_OK, limits()).await,
            Err(NetError::BadUrl(_))
        ));
        assert!(matches!(
            get_bytes(&format!("{base}/no-location"), PRIVATE_OK, limits()).await,
            Err(NetError::Status(302))
        ));
        assert!(matches!(
            get_bytes(&format!("{base}/missing"), PRIVATE_OK, limits()).await,
            Err(NetError::Status(404))
        ));
    }

    #[tokio::test]
    async fn body_size_is_limited() {
        let (base, _) = serve().await;
        let exact = get_bytes(&format!("{base}/exact"), PRIVATE_OK, limits())
            .await
            .unwrap();
        assert_eq!(exact.len(), 4096);
        assert!(matches!(
            get_bytes(&format!("{base}/big"), PRIVATE_OK, limits()).await,
            Err(NetError::TooLarge { limit: 4096 })
        ));

        // Make sure the chunked routes really come without a Content-Length, so the streaming cut-off is tested.
        let plain = reqwest::Client::builder().no_proxy().build().unwrap();
        let head = plain
            .get(format!("{base}/big-chunked"))
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), None);
        drop(head);

        assert!(matches!(
            get_bytes(&format!("{base}/big-chunked"), PRIVATE_OK, limits()).await,
            Err(NetError::TooLarge { limit: 4096 })
        ));
        let small = get_bytes(&format!("{base}/small-chunked"), PRIVATE_OK, limits())
            .await
            .unwrap();
        assert_eq!(small.len(), 4000);
    }

    #[tokio::test]
    async fn slow_servers_time_out() {
        let (base, _) = serve().await;
        let quick = Limits {
            timeout: Duration::from_millis(300),
            ..limits()
        };
        for path in ["/slow", "/slow-body"] {
            let started = std::time::Instant::now();
            let result = get_bytes(&format!("{base}{path}"), PRIVATE_OK, quick).await;
            assert!(
                matches!(result, Err(NetError::Timeout)),
                "{path}: {result:?}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{path} took {:?}",
                started.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn post_json_sends_the_body() {
        let (base, recorded) = serve().await;
        let payload = serde_json::json!({"status": "success", "id": 42, "output": ["a.png"]});
        let status = post_json(
            &format!("{base}/hook"),
            &payload,
            PRIVATE_OK,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status, 204);
        let posts = recorded.posts.lock().unwrap().clone();
        assert_eq!(posts.len(), 1);
        let (content_type, user_agent, body) = &posts[0];
        assert_eq!(content_type, "application/json");
        assert_eq!(user_agent, "pictor-webhook");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            payload
        );
    }

    #[tokio::test]
    async fn post_json_failures() {
        let (base, recorded) = serve().await;
        let payload = serde_json::json!({"ok": false});
        let timeout = Duration::from_secs(5);
        assert!(matches!(
            post_json(&format!("{base}/fail"), &payload, PRIVATE_OK, timeout).await,
            Err(NetError::Status(500))
        ));
        // Redirects are not followed for webhooks.
        assert!(matches!(
            post_json(
                &format!("{base}/hook-redirect"),
                &payload,
                PRIVATE_OK,
                timeout
            )
            .await,
            Err(NetError::Status(307))
        ));
        assert!(matches!(
            post_json(&format!("{base}/hook"), &payload, STRICT, timeout).await,
            Err(NetError::Refused(_))
        ));
        assert!(matches!(
            post_json("http://169.254.169.254/hook", &payload, PRIVATE_OK, timeout).await,
            Err(NetError::Refused(_))
        ));
        assert!(matches!(
            post_json("ftp://example.com/hook", &payload, PRIVATE_OK, timeout).await,
            Err(NetError::BadUrl(_))
        ));
        assert!(recorded.posts.lock().unwrap().is_empty());
    }

    #[test]
    fn messages_are_readable() {
        assert_eq!(
            NetError::Status(500).to_string(),
            "the remote server answered with HTTP status 500"
        );
        assert_eq!(
            NetError::TooLarge { limit: 10 }.to_string(),
            "the response is larger than the limit of 10 bytes"
        );
        assert_eq!(NetError::Timeout.to_string(), "the request timed out");
    }
}
