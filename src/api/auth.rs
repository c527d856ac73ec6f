//! Who may POST tasks: bearer tokens from `api.tokens_file` (`name:token`
//! per line; several at once for rotation), or requests signed the way
//! Standard Webhooks senders sign (`webhook-id`, `webhook-timestamp` within
//! five minutes, `webhook-signature`) with `api.verify_secret_file` or
//! `$TTSPOOL_API_SECRET`. Tokens and signatures are compared in constant
//! time; the log names the token, never shows it.

use axum::http::HeaderMap;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::ApiConfig;

/// How far a signed request's timestamp may be from our clock.
pub const TOLERANCE_SECS: i64 = 300;

/// The credentials the API accepts.
#[derive(Default)]
pub struct Auth {
    /// (name, token).
    tokens: Vec<(String, Vec<u8>)>,
    /// Decoded `whsec_` secrets.
    keys: Vec<Vec<u8>>,
    /// Why every request is refused (credentials that could not be loaded
    /// at a reload): closed, never open.
    closed: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "Auth(tokens {names:?}, {} secret(s))", self.keys.len())
    }
}

impl Auth {
    /// Reads the tokens file and the verify secret.
    pub fn load(cfg: &ApiConfig) -> Result<Auth, String> {
        let mut auth = Auth::default();
        if let Some(p) = &cfg.tokens_file {
            let text = std::fs::read_to_string(p).map_err(|e| {
                format!(
                    "api.tokens_file {}: {}",
                    p.display(),
                    crate::util::io_msg(&e)
                )
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let Some((name, token)) = line.split_once(':') else {
                    return Err(format!(
                        "api.tokens_file {}:{}: a line is name:token",
                        p.display(),
                        i + 1
                    ));
                };
                if token.trim().len() < 16 {
                    return Err(format!(
                        "api.tokens_file {}:{}: the token of {:?} is shorter than 16 characters",
                        p.display(),
                        i + 1,
                        name.trim()
                    ));
                }
                auth.tokens
                    .push((name.trim().to_string(), token.trim().as_bytes().to_vec()));
            }
        }
        let secret = match &cfg.verify_secret_file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                format!(
                    "api.verify_secret_file {}: {}",
                    p.display(),
                    crate::util::io_msg(&e)
                )
            })?),
            None => std::env::var("TTSPOOL_API_SECRET").ok(),
        };
        if let Some(s) = secret {
            let s = s.trim();
            let b = s.strip_prefix("whsec_").unwrap_or(s).trim_end_matches('=');
            let key = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(b)
                .ok()
                .filter(|k| !k.is_empty())
                .ok_or("the API verify secret must be whsec_ followed by base64")?;
            auth.keys.push(key);
        }
        if auth.tokens.is_empty() && auth.keys.is_empty() {
            // Configured credentials that hold none never mean "anyone":
            // emptying the tokens file is how an operator revokes them all.
            if let Some(p) = &cfg.tokens_file {
                return Err(format!(
                    "api.tokens_file {} holds no token (only blank or comment lines); add a name:token line                      (the API never opens for want of tokens)",
                    p.display()
                ));
            }
            let loopback = cfg
                .listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback());
            if !cfg.listen.is_empty() && !loopback {
                return Err(format!(
                    "api.listen {} is reachable from other hosts, but no credential is set:                      set api.tokens_file or api.verify_secret_file (or $TTSPOOL_API_SECRET)",
                    cfg.listen
                ));
            }
        }
        Ok(auth)
    }

    /// Credentials that refuse every request, saying `why`.
    pub fn closed(why: String) -> Auth {
        Auth {
            closed: Some(why),
            ..Auth::default()
        }
    }

    /// True when no credential is configured and none is needed (the API
    /// listens on loopback only; see config.rs).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.keys.is_empty() && self.closed.is_none()
    }

    /// Who sent this request (a token's name, or "signed"), or why it is
    /// refused.
    pub fn check(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<String, String> {
        if let Some(why) = &self.closed {
            return Err(format!(
                "the API refuses every request until its credentials load: {why}"
            ));
        }
        if self.is_open() {
            return Ok("loopback".into());
        }
        if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
            let Some(t) = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
                return Err("the Authorization header must be \"Bearer <token>\"".into());
            };
            let mut who = None;
            for (name, token) in &self.tokens {
                if ct_eq(t.trim().as_bytes(), token) {
                    who = Some(name.clone());
                }
            }
            return who.ok_or_else(|| "unknown bearer token".to_string());
        }
        if headers.contains_key("webhook-signature") {
            return self
                .check_signature(headers, body, now)
                .map(|()| "signed".into());
        }
        Err("no credentials: send Authorization: Bearer <token>, or sign the request (Standard Webhooks)".into())
    }

    fn check_signature(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), String> {
        if self.keys.is_empty() {
            return Err("signed requests are not accepted here (no api.verify_secret_file)".into());
        }
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .ok_or_else(|| format!("a signed request needs the {name} header"))
        };
        let (id, ts, sigs) = (
            get("webhook-id")?,
            get("webhook-timestamp")?,
            get("webhook-signature")?,
        );
        let t: i64 = ts
            .parse()
            .map_err(|_| "webhook-timestamp must be seconds since the epoch".to_string())?;
        if (now - t).abs() > TOLERANCE_SECS {
            return Err(format!(
                "webhook-timestamp is {} s away from our clock (at most {TOLERANCE_SECS} s)",
                (now - t).abs()
            ));
        }
        for key in &self.keys {
            for sig in sigs.split_whitespace() {
                let Some(b64) = sig.strip_prefix("v1,") else {
                    continue;
                };
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                    continue;
                };
                let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
                mac.update(id.as_bytes());
                mac.update(b".");
                mac.update(ts.as_bytes());
                mac.update(b".");
                mac.update(body);
                if mac.verify_slice(&raw).is_ok() {
                    return Ok(());
                }
            }
        }
        Err("the webhook-signature does not match the body".into())
    }
}

/// Equal, in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(tokens: &str, secret: Option<&str>) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("tokens");
        std::fs::write(&tf, tokens).unwrap();
        let sf = dir.path().join("secret");
        let cfg = ApiConfig {
            tokens_file: Some(tf),
            verify_secret_file: secret.map(|s| {
                std::fs::write(&sf, s).unwrap();
                sf.clone()
            }),
            ..ApiConfig::default()
        };
        Auth::load(&cfg).unwrap()
    }

    #[test]
    fn bearer_tokens_name_their_holder() {
        let a = auth(
            "# comment\norders:0123456789abcdef0\ncrm:fedcba98765432100\n",
            None,
        );
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer fedcba98765432100".parse().unwrap());
        assert_eq!(a.check(&h, b"", 0).unwrap(), "crm");
        h.insert("authorization", "Bearer fedcba98765432101".parse().unwrap());
        assert!(a.check(&h, b"", 0).is_err());
        assert!(a.check(&HeaderMap::new(), b"", 0).is_err());
    }

    #[test]
    fn standard_webhooks_signatures_are_verified() {
        // The Standard Webhooks test vector.
        let a = auth("", Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        let body = br#"{"test": 2432232314}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap(),
        );
        h.insert("webhook-timestamp", "1614265330".parse().unwrap());
        h.insert(
            "webhook-signature",
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
                .parse()
                .unwrap(),
        );
        assert_eq!(a.check(&h, body, 1614265330).unwrap(), "signed");
        // Tampered body, old timestamp.
        assert!(a.check(&h, b"{}", 1614265330).is_err());
        let e = a.check(&h, body, 1614265330 + 301).unwrap_err();
        assert!(e.contains("301 s"), "{e}");
    }
}
