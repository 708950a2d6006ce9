//! The web dashboard: the files `dashboards/web` builds (npm, bundled, no CDN), served at `/`.
//! The dashboard is a single page that reads the API; its views live in the URL's fragment, so
//! only `index.html` and its assets are ever requested.

use std::path::{Path, PathBuf};

use axum::{
    http::{header, StatusCode},
    response::{Html, IntoResponse},
    Router,
};
use tower_http::services::{ServeDir, ServeFile};

/// Where the built dashboard is: the configured folder, else `dashboards/web/dist` under the
/// working directory, else the one in the source tree this binary was built from.
pub fn locate(configured: Option<&Path>) -> PathBuf {
    if let Some(dir) = configured {
        return dir.to_path_buf();
    }
    let here = PathBuf::from("dashboards/web/dist");
    if here.join("index.html").is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/web/dist")
}

/// Serves the dashboard from `dir`, or a page saying how to build it when it is missing.
pub fn router(dir: &Path) -> Router {
    let index = dir.join("index.html");
    if !index.is_file() {
        let page = format!(
            "<!doctype html><title>Sightline</title><h1>The dashboard is not built</h1>\
             <p>No <code>{}</code>. Build it with <code>npm --prefix dashboards/web ci &amp;&amp; \
             npm --prefix dashboards/web run build</code> and reload; the API answers meanwhile \
             at <a href=\"/api/v1/services\">/api/v1/services</a>.</p>",
            index.display()
        );
        return Router::new().fallback(move || {
            let page = page.clone();
            async move { (StatusCode::SERVICE_UNAVAILABLE, Html(page)).into_response() }
        });
    }
    let files = ServeDir::new(dir).fallback(ServeFile::new(index));
    Router::new()
        .fallback_service(files)
        // The bundle's names carry no hash: revalidate rather than serve yesterday's build.
        .layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        ))
}
