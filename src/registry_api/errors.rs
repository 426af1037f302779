//! The one place errors become responses: every error Stowage itself produces inside the
//! registry API is a registry JSON error body (`{"errors":[{"code","message"}]}`) with a
//! status chosen here.

use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use crate::http_util::{full, Body};
use crate::upstream::UpstreamError;

/// A registry-style JSON error.
pub fn registry_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] }).to_string();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Errors met while serving a registry request, mapped to responses in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream content does not match its digest")]
    DigestMismatch,
    #[error("manifest larger than the {0}-byte limit")]
    ManifestTooLarge(u64),
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable { len: u64 },
}

impl ServeError {
    pub fn into_response(self) -> Response<Body> {
        let message = self.to_string();
        match self {
            ServeError::Upstream(UpstreamError::Timeout { .. })
            | ServeError::Upstream(UpstreamError::BodyStalled(_)) => registry_error(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                &format!("upstream registry: {message}"),
            ),
            ServeError::Upstream(_) => registry_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!("upstream registry: {message}"),
            ),
            ServeError::DigestMismatch => {
                registry_error(StatusCode::BAD_GATEWAY, "DIGEST_INVALID", &message)
            }
            ServeError::ManifestTooLarge(_) => {
                registry_error(StatusCode::BAD_GATEWAY, "SIZE_INVALID", &message)
            }
            ServeError::RangeNotSatisfiable { len } => {
                let mut r =
                    registry_error(StatusCode::RANGE_NOT_SATISFIABLE, "SIZE_INVALID", &message);
                r.headers_mut().insert(
                    http::header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{len}")).expect("ascii"),
                );
                r
            }
        }
    }
}

/// Upstream's refusal as the client should see it: status and challenge, a JSON body.
pub fn refusal_response(status: StatusCode, passed: &HeaderMap) -> Response<Body> {
    let code = match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NAME_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let mut out = registry_error(status, code, "upstream registry refused access");
    for (name, v) in passed {
        out.headers_mut().append(name.clone(), v.clone());
    }
    out
}

/// Upstream's answer to a revalidation `HEAD`, for the client's own request: as it is for a
/// `HEAD`; for a `GET`, the same status and challenge with a registry JSON body (relayed as
/// is, the `HEAD` response's `Content-Length` would announce a body that never comes).
pub fn revalidation_answer(method: &Method, resp: Response<Body>) -> Response<Body> {
    if *method == Method::HEAD {
        return super::relay(resp);
    }
    let status = resp.status();
    let code = match status.as_u16() {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "MANIFEST_UNKNOWN",
        429 => "TOOMANYREQUESTS",
        _ => "UNAVAILABLE",
    };
    let mut out = registry_error(
        status,
        code,
        &format!("upstream registry answered {status}"),
    );
    for name in [WWW_AUTHENTICATE, http::header::RETRY_AFTER] {
        for v in resp.headers().get_all(&name) {
            out.headers_mut().append(name.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_registry_json() {
        let r = ServeError::RangeNotSatisfiable { len: 10 }.into_response();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()["content-range"], "bytes */10");
        let r = ServeError::Upstream(UpstreamError::Connect {
            host: "quay.io".into(),
            message: "refused".into(),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(r.headers()["content-type"], "application/json");
    }
}
