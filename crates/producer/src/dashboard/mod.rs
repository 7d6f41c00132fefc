//! The dashboard: three static files embedded in the binary, served without a token at `/`,
//! `/dashboard/app.js` and `/dashboard/style.css`. The page asks for a token only when the API
//! answers 401, keeps it in the browser's localStorage and sends it on every data call. It has
//! an overview and, by hash route, a page per job (`/#/jobs/{id}`) and per batch
//! (`/#/batches/{id}`).

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::header;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// The content security policy of every dashboard response: scripts, styles and API calls from
/// this origin only; videos and images also from other origins, because a job's video is served
/// by the S3 endpoint (another origin) and its start and end images are wherever the user put
/// them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; \
     img-src 'self' data: http: https:; media-src 'self' http: https:; style-src 'self'; \
     script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

/// What every dashboard response carries: its type, no caching across releases, and the
/// [`CONTENT_SECURITY_POLICY`].
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// The dashboard's routes, all public.
pub(crate) fn routes() -> Router {
    Router::new()
        .route("/", get(index))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/style.css", get(style_css))
}
