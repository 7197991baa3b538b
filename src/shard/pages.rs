//! The static pages and their files: the chat page at `/` (`server.demo_page`, on by
//! default in dev mode) and the live console at `/console` (with an API key, or in dev
//! mode). They live in `assets/` and are compiled in: nothing is read from disk at
//! request time, and a page that is off answers 404 like any unknown path.

use super::console;
use crate::context::Context;
use crate::transport::host::Routed;

/// Which page a file belongs to: it is served only while that page is on.
#[derive(Clone, Copy)]
enum Page {
    Chat,
    Console,
    Both,
}

/// One compiled-in file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
    page: Page,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file, by the path it is served at.
const ASSETS: [Asset; 6] = [
    Asset {
        path: "/",
        content_type: HTML,
        body: include_str!("../../assets/chat.html"),
        page: Page::Chat,
    },
    Asset {
        path: "/console",
        content_type: HTML,
        body: include_str!("../../assets/console.html"),
        page: Page::Console,
    },
    Asset {
        path: "/assets/sio.js",
        content_type: JS,
        body: include_str!("../../assets/sio.js"),
        page: Page::Chat,
    },
    Asset {
        path: "/assets/chat.js",
        content_type: JS,
        body: include_str!("../../assets/chat.js"),
        page: Page::Chat,
    },
    Asset {
        path: "/assets/console.js",
        content_type: JS,
        body: include_str!("../../assets/console.js"),
        page: Page::Console,
    },
    Asset {
        path: "/assets/corelay.css",
        content_type: CSS,
        body: include_str!("../../assets/corelay.css"),
        page: Page::Both,
    },
];

/// The pages are fetched again on every load (`no-cache` without validators): a page
/// never outlives the release that serves it.
const PAGE_CACHE: &str = "no-cache";

/// Scripts and the style sheet are kept five minutes: a new release shows within that.
const FILE_CACHE: &str = "public, max-age=300";

/// The pages run only this server's scripts and styles, connect (WebSocket, fetch) only
/// to it, and are never framed.
const PAGE_HEADERS: &str = "Content-Security-Policy: default-src 'self'; connect-src 'self'; \
     img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'\r\n\
     X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n";

/// Scripts and the style sheet are used only as the type they are served with.
const FILE_HEADERS: &str = "X-Content-Type-Options: nosniff\r\n";

/// The Engine.IO path the chat page's `<meta name="corelay-path">` names by default.
const DEFAULT_EIO_PATH: &str = "/socket.io/";

/// Whether the chat page is on: `server.demo_page`, or unset and in dev mode.
pub(super) fn chat_enabled(ctx: &Context) -> bool {
    ctx.config
        .server
        .demo_page
        .unwrap_or(ctx.auth.is_dev_mode())
}

/// The page or file at `path` (a GET), if there is one and its page is on.
pub(super) fn serve(ctx: &Context, path: &str, consumed: bool) -> Option<Routed> {
    let asset = ASSETS.iter().find(|a| a.path == path)?;
    let on = match asset.page {
        Page::Chat => chat_enabled(ctx),
        Page::Console => console::enabled(ctx),
        Page::Both => chat_enabled(ctx) || console::enabled(ctx),
    };
    if !on {
        return None;
    }
    let is_page = asset.content_type == HTML;
    let mut body = asset.body.as_bytes().to_vec();
    let eio_path = ctx.config.server.path.as_str();
    if asset.path == "/" && eio_path != DEFAULT_EIO_PATH {
        let meta = |p: &str| format!("name=\"corelay-path\" content=\"{p}\"");
        let escaped = eio_path.replace('&', "&amp;").replace('"', "&quot;");
        body = asset
            .body
            .replace(&meta(DEFAULT_EIO_PATH), &meta(&escaped))
            .into_bytes();
    }
    Some(Routed {
        status: 200,
        content_type: asset.content_type,
        body,
        consumed,
        cache_control: if is_page { PAGE_CACHE } else { FILE_CACHE },
        headers: if is_page { PAGE_HEADERS } else { FILE_HEADERS },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::transport::testing;

    fn ctx(tune: impl FnOnce(&mut Config)) -> Context {
        let mut config = Config::default();
        tune(&mut config);
        testing::context(config)
    }

    #[test]
    fn the_chat_page_follows_dev_mode_unless_configured() {
        let dev = ctx(|_| {});
        assert!(dev.auth.is_dev_mode(), "the test context is in dev mode");
        assert!(serve(&dev, "/", true).is_some());
        assert!(serve(&dev, "/assets/sio.js", true).is_some());
        let off = ctx(|c| c.server.demo_page = Some(false));
        assert!(serve(&off, "/", true).is_none());
        assert!(serve(&off, "/assets/chat.js", true).is_none());
        assert!(
            serve(&off, "/console", true).is_some(),
            "the console is not the demo page"
        );
        assert!(serve(&dev, "/nothing", true).is_none());
    }

    #[test]
    fn with_a_jwt_secret_the_pages_are_opt_in() {
        let secret = |tune: fn(&mut Config)| {
            let mut c = ctx(tune);
            c.auth = crate::auth::Authenticator::new(Some("a-secret-of-20-bytes"));
            c
        };
        let prod = secret(|_| {});
        assert!(serve(&prod, "/", true).is_none());
        assert!(
            serve(&prod, "/console", true).is_none(),
            "no API key, no console"
        );
        assert!(serve(&prod, "/assets/corelay.css", true).is_none());
        let on = secret(|c| {
            c.server.demo_page = Some(true);
            c.auth.api_key = Some("key".into());
        });
        assert!(serve(&on, "/", true).is_some());
        assert!(serve(&on, "/console", true).is_some());
    }

    #[test]
    fn pages_are_revalidated_and_files_cached_with_their_types() {
        let dev = ctx(|_| {});
        let page = serve(&dev, "/console", true).expect("console");
        assert_eq!((page.content_type, page.cache_control), (HTML, "no-cache"));
        assert!(page.headers.contains("Content-Security-Policy"));
        let css = serve(&dev, "/assets/corelay.css", true).expect("css");
        assert_eq!(css.content_type, CSS);
        assert_eq!(css.cache_control, "public, max-age=300");
    }

    #[test]
    fn the_chat_page_names_the_configured_engine_io_path() {
        let moved = ctx(|c| c.server.path = "/rt/".into());
        let page = serve(&moved, "/", true).expect("chat page");
        let html = String::from_utf8(page.body).expect("utf-8");
        assert!(
            html.contains(r#"name="corelay-path" content="/rt/""#),
            "{html}"
        );
    }
}
