//! Who may read consent over the admin listener. The consent endpoints reveal every number with
//! its evidence, and the admin port is often shared with a scrape proxy or sidecar for
//! `/metrics`, so a request must pass every one of these, in order:
//! 1. the TCP peer is loopback (403 otherwise);
//! 2. its `Host` is a loopback name, `localhost`, `127.0.0.1`, `[::1]`, with any port (403
//!    otherwise): a page in a local browser that rebinds its own DNS name to 127.0.0.1 sends
//!    its own name;
//! 3. it carries no forwarding header, `Forwarded`, `X-Forwarded-For`, `X-Forwarded-Host`,
//!    `X-Forwarded-Proto`, `X-Real-IP` or `Via` (401): through a proxy the peer is the proxy,
//!    so its address says nothing, and the token is not accepted that way either;
//! 4. it carries `Authorization: Bearer <token>`, compared in constant time (401 otherwise).
//!
//! The token is `admin.token_file`, or, when that is unset, a random one the daemon writes at
//! each start to `state.dir/admin-token` (mode 0600), where `sendwell consent` (run as the
//! same user, or root) finds it.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Headers a forwarding proxy adds (RFC 7239, the de-facto `X-` ones, RFC 9110's `Via`).
pub const FORWARDING_HEADERS: [&str; 6] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
];

/// Whether a peer may read personal data: a loopback address (IPv4-mapped included).
pub fn is_loopback_peer(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// Whether a `Host` value (or an HTTP/2 authority) names this machine's loopback: `localhost`
/// or a loopback address, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let Ok(a) = host.parse::<Authority>() else {
        return false;
    };
    let name = a.host();
    // No user info, and a port only of digits.
    let port = host.strip_prefix(name).and_then(|rest| match rest {
        "" => Some(""),
        _ => rest.strip_prefix(':'),
    });
    if host.contains('@') || !port.is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") || name.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    name.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// The bearer token of `Authorization`, if the request has one.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = v.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

/// Writes a new random token to `path` (mode 0600, replacing the file whole) and returns it.
pub fn write_generated(path: &Path) -> io::Result<Secret> {
    use rand::RngCore;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover from a crash is replaced; create_new then guarantees the mode (an existing
    // file would keep its own) and never follows a planted link.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(Secret::new(token))
}

/// The guard in front of the consent endpoints (see the module's text for the rules).
/// Served without connect info, the peer is unknown and refused like a remote one.
pub(super) async fn consent_guard(
    State(token): State<Secret>,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let peer = ConnectInfo::<SocketAddr>::from_request_parts(&mut parts, &())
        .await
        .ok()
        .map(|c| c.0);
    let path = parts.uri.path().to_string();
    let refuse = |status: StatusCode, reason: &'static str, why: &'static str| {
        crate::metrics::admin_refused(reason, &path, why);
        let mut r = (status, format!("{why}\n")).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    };
    if !peer.is_some_and(is_loopback_peer) {
        return refuse(
            StatusCode::FORBIDDEN,
            "peer",
            "consent endpoints answer loopback clients only: they reveal personal data",
        );
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(Authority::as_str));
    if !host.is_some_and(is_loopback_host) {
        return refuse(
            StatusCode::FORBIDDEN,
            "host",
            "consent endpoints answer requests addressed to localhost, 127.0.0.1 or [::1] only",
        );
    }
    if FORWARDING_HEADERS
        .iter()
        .any(|h| parts.headers.contains_key(*h))
    {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "proxied",
            "consent endpoints do not answer through a proxy (the request carries a forwarding header)",
        );
    }
    let given = bearer(&parts.headers).unwrap_or_default();
    if !bool::from(given.ct_eq(token.expose().as_bytes())) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "token",
            "consent endpoints need Authorization: Bearer <the admin token> (admin.token_file; when unset, the file admin-token in state.dir, written at each start)",
        );
    }
    next.run(Request::from_parts(parts, body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_with_and_without_ports_are_loopback_hosts() {
        for h in [
            "localhost",
            "LocalHost:9187",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:9187",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:9187",
            "[::ffff:127.0.0.1]:9187",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:9187",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:9187",
            "[::2]:9187",
            "user@localhost",
            "0.0.0.0:9187",
            "localhost:notaport",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn the_bearer_token_is_read_from_authorization() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"abc"[..]));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn a_generated_token_is_random_private_and_replaced_at_each_start() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("admin-token");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let a = write_generated(&p).unwrap();
        assert_eq!(a.expose().len(), 64);
        assert_eq!(crate::config::read_secret(&p).unwrap().expose(), a.expose());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = write_generated(&p).unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
