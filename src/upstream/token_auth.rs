//! Upstream authentication that Stowage does itself: answering a registry's Bearer
//! challenge with configured credentials (or anonymously), and caching the tokens.
//!
//! A client's own `Authorization` always wins and is never replaced. Tokens are cached per
//! (realm, service, scope, account) until shortly before they expire. Credentials and
//! tokens are sensitive header values and never logged.
//!
//! A configured account ([`Account`]) goes only to the registry it is configured for and to
//! realms on that registry's configured auth hosts, all over HTTPS: an upstream's challenge
//! can name any realm, and one naming somewhere else gets an anonymous token request.

use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};

use super::client::{empty, redact, Fetched, Upstream, UpstreamError};
use crate::oci::Registry;
use crate::settings::Credentials;

/// A configured upstream account and the only origins it may be sent to: the registry it is
/// for and that registry's configured auth hosts, HTTPS only (scheme, host and port compared
/// exactly).
#[derive(Clone, Debug)]
pub struct Account {
    credentials: Credentials,
    origins: Vec<Registry>,
}

impl Account {
    pub fn new(credentials: Credentials, registry: Registry, auth_hosts: Vec<Registry>) -> Account {
        let origins = std::iter::once(registry)
            .chain(auth_hosts)
            .filter(Registry::is_https)
            .collect();
        Account {
            credentials,
            origins,
        }
    }

    pub fn username(&self) -> &str {
        &self.credentials.username
    }

    /// The account as `Authorization` for a request to `uri`, if it may go there.
    pub fn authorization_for(&self, uri: &Uri) -> Option<HeaderValue> {
        let to = Registry::of_uri(uri)?;
        (to.is_https() && self.origins.contains(&to)).then(|| self.credentials.basic())
    }
}

/// A parsed `WWW-Authenticate: Bearer realm="...",service="...",scope="..."`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses a Bearer challenge; `None` for other schemes or a challenge without a realm.
pub fn parse_bearer(value: &str) -> Option<Challenge> {
    let rest = value.trim();
    let (scheme, params) = rest.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut scope = None;
    let mut s = params.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, next) = if let Some(q) = after.strip_prefix('"') {
            // Quoted string; scopes contain commas ("repository:a:pull,push").
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => out.push(c),
                }
            }
            let end = end?;
            (out, &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        match key.as_str() {
            "realm" => realm = Some(val),
            "service" => service = Some(val),
            "scope" => scope = Some(val),
            _ => {}
        }
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: realm?,
        service,
        scope,
    })
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TokenKey {
    challenge: Challenge,
    account: Option<String>,
}

#[derive(Clone)]
struct Token {
    value: HeaderValue,
    expires: Instant,
}

/// Bearer tokens Stowage obtained itself, and which challenge each repository asked for.
pub struct Tokens {
    cache: moka::future::Cache<TokenKey, Token>,
    hints: moka::future::Cache<HintKey, Hint>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            cache: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            hints: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        }
    }
}

/// How a registry challenged requests for one repository last time, so that the next
/// request carries credentials at once instead of earning a `401` first (a pull is dozens
/// of requests for one repository; without this each one costs two round trips).
#[derive(Clone)]
enum Hint {
    Bearer(Challenge),
    Basic,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HintKey {
    authority: String,
    repo: String,
    account: Option<String>,
}

impl HintKey {
    fn new(uri: &Uri, creds: Option<&Account>) -> Option<HintKey> {
        Some(HintKey {
            authority: uri.authority()?.to_string(),
            repo: repo_of(uri.path())?.to_owned(),
            account: creds.map(|c| c.username().to_owned()),
        })
    }
}

/// The repository part of a registry API path (`/v2/<name>/blobs/...` → `<name>`).
fn repo_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/blobs/", "/manifests/", "/tags/"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .map(|i| &rest[..i])
        .filter(|r| !r.is_empty())
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Tokens {
    /// An `Authorization: Bearer` value for `challenge`, from the cache or the token service.
    pub async fn get(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
        creds: Option<&Account>,
    ) -> Result<HeaderValue, UpstreamError> {
        self.get_tracked(upstream, challenge, creds)
            .await
            .map(|(value, _)| value)
    }

    /// Like `get`, and whether the value was already cached (as opposed to just issued).
    async fn get_tracked(
        &self,
        upstream: &Upstream,
        challenge: &Challenge,
        creds: Option<&Account>,
    ) -> Result<(HeaderValue, bool), UpstreamError> {
        let key = Self::key(challenge, creds);
        if let Some(t) = self.cache.get(&key).await {
            if t.expires > Instant::now() {
                return Ok((t.value, true));
            }
            self.cache.invalidate(&key).await;
        }
        let token = self
            .cache
            .try_get_with(key, fetch_token(upstream, challenge, creds))
            .await
            .map_err(|e| (*e).clone())?;
        Ok((token.value, false))
    }

    /// Forgets the cached token for `challenge` if it is still `value` (upstream refused it).
    async fn invalidate(
        &self,
        challenge: &Challenge,
        creds: Option<&Account>,
        value: &HeaderValue,
    ) {
        let key = Self::key(challenge, creds);
        if self.cache.get(&key).await.is_some_and(|t| t.value == value) {
            self.cache.invalidate(&key).await;
        }
    }

    fn key(challenge: &Challenge, creds: Option<&Account>) -> TokenKey {
        TokenKey {
            challenge: challenge.clone(),
            account: creds.map(|c| c.username().to_owned()),
        }
    }
}

async fn fetch_token(
    upstream: &Upstream,
    ch: &Challenge,
    creds: Option<&Account>,
) -> Result<Token, UpstreamError> {
    let mut url = ch.realm.clone();
    let mut sep = if url.contains('?') { '&' } else { '?' };
    for (k, v) in [("service", &ch.service), ("scope", &ch.scope)] {
        if let Some(v) = v {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&urlencode(v));
            sep = '&';
        }
    }
    let uri: Uri = url
        .parse()
        .map_err(|_| UpstreamError::BadUri("token realm".into()))?;
    if !matches!(uri.scheme_str(), Some("https") | Some("http")) || uri.host().is_none() {
        return Err(UpstreamError::BadUri("token realm".into()));
    }
    // The realm is named by the upstream: the same places are off limits as for redirects.
    if let Err(reason) = upstream.check_destination(&uri).await {
        return Err(UpstreamError::Refused {
            what: "token realm",
            to: redact(&uri),
            reason,
        });
    }
    let mut headers = HeaderMap::new();
    if let Some(account) = creds {
        match account.authorization_for(&uri) {
            Some(value) => {
                headers.insert(AUTHORIZATION, value);
            }
            None => tracing::warn!(
                realm = %redact(&uri),
                account = account.username(),
                "the token realm is not this registry or one of its configured auth hosts (HTTPS): asking it for an anonymous token, without the account"
            ),
        }
    }
    let Fetched { response, .. } = upstream.fetch(Method::GET, uri, headers).await?;
    let status = response.status();
    let idle = upstream.idle_timeout();
    let body = tokio::time::timeout(
        idle,
        crate::http_util::collect_limited(response.into_body(), 1 << 20),
    )
    .await
    .map_err(|_| UpstreamError::BodyStalled(idle))?
    .map_err(|e| match e {
        crate::http_util::CollectError::Stalled(d) => UpstreamError::BodyStalled(d),
        e => UpstreamError::Body(format!("token response: {e:?}")),
    })?;
    if status != StatusCode::OK {
        return Err(UpstreamError::Body(format!(
            "token service answered {status}"
        )));
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| UpstreamError::Body("token response is not JSON".into()))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| UpstreamError::Body("token response has no token".into()))?;
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Body("token is not a header value".into()))?;
    value.set_sensitive(true);
    // Docker's default lifetime is 60 s; renew a little before expiry.
    let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(60).clamp(10, 3600));
    Ok(Token {
        value,
        expires: Instant::now() + lifetime - Duration::from_secs(5),
    })
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether and how Stowage answers an upstream challenge for a request without client
/// credentials.
#[derive(Clone, Copy)]
pub enum Answer<'a> {
    /// Pass the challenge to the client.
    No,
    /// Answer with these credentials, or anonymously when `None`.
    With(Option<&'a Account>),
}

/// A bodiless request upstream (redirects followed when `follow`), answering a `401`
/// Bearer challenge per `answer` when the client sent no `Authorization`.
pub async fn fetch(
    upstream: &Upstream,
    method: Method,
    uri: Uri,
    mut headers: HeaderMap,
    answer: Answer<'_>,
    follow: bool,
) -> Result<Fetched, UpstreamError> {
    let send = |method: Method, uri: Uri, headers: HeaderMap| async move {
        if follow {
            upstream.fetch(method, uri, headers).await
        } else {
            let mut req = http::Request::builder()
                .method(method)
                .uri(uri.clone())
                .body(empty())
                .expect("valid parts");
            *req.headers_mut() = headers;
            req.headers_mut().remove(http::header::HOST);
            upstream
                .send(req)
                .await
                .map(|response| Fetched { response, uri })
        }
    };
    let tokens = &upstream.tokens;
    let client_auth = headers.contains_key(AUTHORIZATION);
    let hint_key = match answer {
        Answer::With(creds) if !client_auth => HintKey::new(&uri, creds),
        _ => None,
    };
    // Credentials up front when this repository was challenged before.
    let mut sent_early: Option<(Hint, HeaderValue)> = None;
    if let (Some(key), Answer::With(creds)) = (&hint_key, answer) {
        let value = match tokens.hints.get(key).await {
            Some(Hint::Bearer(ch)) => tokens
                .get(upstream, &ch, creds)
                .await
                .ok()
                .map(|v| (Hint::Bearer(ch), v)),
            Some(Hint::Basic) => creds
                .and_then(|c| c.authorization_for(&uri))
                .map(|v| (Hint::Basic, v)),
            None => None,
        };
        if let Some((hint, value)) = value {
            headers.insert(AUTHORIZATION, value.clone());
            sent_early = Some((hint, value));
        }
    }
    let first = send(method.clone(), uri.clone(), headers.clone()).await?;
    let Answer::With(creds) = answer else {
        return Ok(first);
    };
    if client_auth || first.response.status() != StatusCode::UNAUTHORIZED {
        return Ok(first);
    }
    if let Some((hint, value)) = sent_early.take() {
        // Refused after all (token expired or revoked, permissions changed): forget the
        // hint and the token, and answer the fresh challenge below as if none was sent.
        headers.remove(AUTHORIZATION);
        if let Some(key) = &hint_key {
            tokens.hints.invalidate(key).await;
        }
        if let Hint::Bearer(ch) = hint {
            tokens.invalidate(&ch, creds, &value).await;
        }
    }
    let challenge = first
        .response
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_bearer);
    let Some(ch) = challenge else {
        // A Basic challenge: the configured account answers it directly.
        let Some(value) = creds.and_then(|c| c.authorization_for(&uri)) else {
            return Ok(first);
        };
        drop(first);
        headers.insert(AUTHORIZATION, value);
        let second = send(method, uri, headers).await?;
        remember(tokens, hint_key, second.response.status(), Hint::Basic).await;
        return Ok(second);
    };
    let (value, cached) = match tokens.get_tracked(upstream, &ch, creds).await {
        Ok(v) => v,
        // A token service that cannot be reached or stalls is an upstream outage, said as
        // such (502/504); passing its challenge on would send the client to it as well.
        Err(e) if e.is_unavailable() => {
            tracing::warn!(realm = %ch.realm, error = %e, "upstream token service unavailable");
            return Err(e);
        }
        Err(e) => {
            tracing::warn!(realm = %ch.realm, error = %e, "could not get an upstream token; passing the challenge on");
            return Ok(first);
        }
    };
    drop(first);
    headers.insert(AUTHORIZATION, value.clone());
    let second = send(method.clone(), uri.clone(), headers.clone()).await?;
    if !cached || second.response.status() != StatusCode::UNAUTHORIZED {
        remember(tokens, hint_key, second.response.status(), Hint::Bearer(ch)).await;
        return Ok(second);
    }
    // Upstream refused a token it issued earlier (restarted with a new key, revoked): a
    // cached token must not lock this account out until it expires. One fresh token.
    tracing::info!(realm = %ch.realm, "upstream refused a cached token; fetching a new one");
    tokens.invalidate(&ch, creds, &value).await;
    let value = match tokens.get(upstream, &ch, creds).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(realm = %ch.realm, error = %e, "could not renew the upstream token");
            return Ok(second);
        }
    };
    drop(second);
    headers.insert(AUTHORIZATION, value);
    let third = send(method, uri, headers).await?;
    remember(tokens, hint_key, third.response.status(), Hint::Bearer(ch)).await;
    Ok(third)
}

/// Keeps `hint` for the repository when the answered request was accepted.
async fn remember(tokens: &Tokens, key: Option<HintKey>, status: StatusCode, hint: Hint) {
    if let Some(key) = key {
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            tokens.hints.insert(key, hint).await;
        }
    }
}

/// Stable, non-reversible identity of a client credential for access decisions: the
/// SHA-256 of its `Authorization` value, or all zeros for none.
pub fn credential_id(headers: &HeaderMap) -> [u8; 32] {
    match headers.get(AUTHORIZATION) {
        None => [0; 32],
        Some(v) => {
            let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, v.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn repo_of_takes_the_name_before_the_route() {
        assert_eq!(
            repo_of("/v2/library/alpine/manifests/3.20"),
            Some("library/alpine")
        );
        assert_eq!(repo_of("/v2/a/b/c/blobs/sha256:00"), Some("a/b/c"));
        assert_eq!(repo_of("/v2/x/tags/list"), Some("x"));
        // a repository literally named like a route keeps the first split
        assert_eq!(repo_of("/v2/blobs/manifests/blobs/x"), Some("blobs"));
        assert_eq!(repo_of("/v2/"), None);
        assert_eq!(repo_of("/v2//blobs/x"), None);
        assert_eq!(repo_of("/token"), None);
    }

    use super::*;

    #[test]
    fn an_account_goes_only_to_its_registry_and_auth_hosts_over_https() {
        let reg = |s: &str| s.parse::<Registry>().unwrap();
        let account = Account::new(
            Credentials::new("alice", "pw"),
            reg("quay.io"),
            vec![reg("auth.quay.io:8443"), reg("http://plain.example")],
        );
        for ok in [
            "https://quay.io/v2/auth",
            "https://QUAY.io:443/x",
            "https://auth.quay.io:8443/token?scope=x",
        ] {
            assert!(
                account.authorization_for(&ok.parse().unwrap()).is_some(),
                "{ok}"
            );
        }
        for refused in [
            "http://quay.io/v2/auth",
            "https://quay.io:5000/token",
            "https://auth.quay.io/token",
            "https://evil.quay.io/token",
            "https://ghcr.io/token",
            "http://plain.example/token",
            "/relative",
        ] {
            assert!(
                account
                    .authorization_for(&refused.parse().unwrap())
                    .is_none(),
                "{refused}"
            );
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        let c = parse_bearer(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#).unwrap();
        assert_eq!(c.realm, "https://auth.docker.io/token");
        assert_eq!(c.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(
            c.scope.as_deref(),
            Some("repository:library/alpine:pull,push")
        );
        let c = parse_bearer(r#"bearer realm=https://x/token, service="a\"b""#).unwrap();
        assert_eq!(c.realm, "https://x/token");
        assert_eq!(c.service.as_deref(), Some("a\"b"));
        assert!(parse_bearer(r#"Basic realm="x""#).is_none());
        assert!(parse_bearer(r#"Bearer service="x""#).is_none());
        assert!(parse_bearer(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_bearer("Bearer").is_none());
    }

    #[test]
    fn credential_ids_are_hashes() {
        let mut h = HeaderMap::new();
        assert_eq!(credential_id(&h), [0; 32]);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        let a = credential_id(&h);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abd"));
        assert_ne!(a, credential_id(&h));
        assert_ne!(a, [0; 32]);
    }

    #[test]
    fn scope_is_url_encoded() {
        assert_eq!(
            urlencode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
