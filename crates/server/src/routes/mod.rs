//! The HTTP surface. One table lists every route with what it does; the router and `/openapi.json` are both built
//! from it, so the description cannot drift from what is served.

mod auth;
mod enterprise;
mod fetch;
mod files;
mod generate;
mod jobs;
mod openai;
mod playground;
mod sdapi;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body as Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::app::App;
use crate::backend::PipelineKind;
use crate::family::Family;
use crate::responses::ApiError;

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Creates a text-to-image, img2img or pix2pix job of a family.
    Generate(Family, PipelineKind),
    /// Fetches a job; the id in the path.
    FetchById,
    /// Fetches a job; `request_id` in the body.
    FetchByBody,
    /// An enterprise management call, by name.
    Manage(&'static str),
    /// `GET` of a stored file.
    File,
    /// `GET /health`.
    Health,
    /// `GET /metrics`.
    Metrics,
    /// `GET /openapi.json`.
    OpenApi,
    /// `POST /api/v3/system_load`.
    SystemLoad,
    /// An AUTOMATIC1111 route under `/sdapi/v1/`, by name.
    Sdapi(&'static str),
    /// `POST /v1/images/generations` (OpenAI).
    OpenAiGenerations,
    /// `POST /v1/images/edits` (OpenAI, multipart).
    OpenAiEdits,
    /// `GET /v1/models` (OpenAI).
    OpenAiModels,
    /// A hosted-API route for something Pictor cannot do yet; the message says what.
    NotYet(&'static str),
    /// `GET /api/v1/jobs/{id}/events`: the job's progress as Server-Sent Events.
    JobEvents,
    /// `POST /api/v1/jobs/{id}/cancel`.
    JobCancel,
    /// `GET /`: the playground page.
    Playground,
    /// `GET /api/v1/options`: the lists the playground offers.
    Options,
}

/// One route of the table.
#[derive(Debug, Clone)]
pub struct RouteInfo {
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The path, axum syntax (`{id}`, `{*key}`).
    pub path: String,
    /// What it does.
    pub kind: RouteKind,
}

/// Fetch routes, each served with the id in the path and with `request_id` in the body.
pub const FETCH_PATHS: &[&str] = &[
    "/api/v3/fetch",
    "/api/v3/dreambooth/fetch",
    "/api/v4/dreambooth/fetch",
    "/api/v4/fetch",
    "/api/v5/fetch",
    "/api/v6/images/fetch",
    "/api/v6/realtime/fetch",
    "/api/v1/enterprise/fetch",
    "/api/v1/enterprise/images/fetch",
    "/api/v1/enterprise/realtime/fetch",
    "/api/v1/enterprise/fetch_queue_image",
    "/api/v7/images/fetch",
];

/// Routes of the hosted API for what Pictor cannot do yet: answered with an error that says so (in the API's
/// shape) instead of a 404.
pub const NOT_YET: &[(&str, &str)] = &[
    ("/api/v3/inpaint", "inpainting is not supported yet"),
    (
        "/api/v4/dreambooth/inpaint",
        "inpainting is not supported yet",
    ),
    ("/api/v6/images/inpaint", "inpainting is not supported yet"),
    (
        "/api/v6/realtime/inpaint",
        "inpainting is not supported yet",
    ),
    (
        "/api/v1/enterprise/inpaint",
        "inpainting is not supported yet",
    ),
    ("/api/v7/images/inpaint", "inpainting is not supported yet"),
    (
        "/api/v6/images/controlnet",
        "ControlNet is not supported yet",
    ),
    ("/api/v5/controlnet", "ControlNet is not supported yet"),
    (
        "/api/v1/enterprise/controlnet",
        "ControlNet is not supported yet",
    ),
];

/// Enterprise management calls, served under each enterprise prefix.
pub const MANAGEMENT: &[&str] = &[
    "system_details",
    "schedulers_list",
    "load_model",
    "verify_model",
    "get_all_models",
    "delete_model",
    "sync_models",
    "load_vae",
    "clear_cache",
    "clear_queue",
    "upload_image",
    "nsfw_image_check",
    "restart_server",
    "update_server",
    "update",
    "update_s3",
    "reset_s3",
];

const ENTERPRISE_PREFIXES: &[&str] = &[
    "/api/v1/enterprise/",
    "/api/v1/enterprise/images/",
    "/api/v1/enterprise/realtime/",
];

/// `?key=` on routes a browser's EventSource calls.
#[derive(Debug, serde::Deserialize)]
pub struct KeyQuery {
    /// The API key.
    pub key: Option<String>,
}

/// The `{id}` of a path, or the API's error naming `field` (a path segment that is not UTF-8 text is refused by
/// axum's extractor with a plain-text 400, which no client of the API can read).
fn path_id(path: Result<Path<String>, PathRejection>, field: &str) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| {
        ApiError::field(
            field,
            format!("the id in the path could not be read: {}", e.body_text()),
        )
    })
}

/// `?key=`, or the API's error (a query string that cannot be read, such as `key` given twice).
fn query_key(query: Result<Query<KeyQuery>, QueryRejection>) -> Result<Option<String>, ApiError> {
    query.map(|Query(q)| q.key).map_err(|e| {
        ApiError::field(
            "key",
            format!("the query string could not be read: {}", e.body_text()),
        )
    })
}

/// Every route the service answers.
pub fn table() -> Vec<RouteInfo> {
    let mut routes = Vec::new();
    let mut add = |method, path: String, kind| {
        routes.push(RouteInfo { method, path, kind });
    };
    for family in Family::ALL {
        for kind in [
            PipelineKind::Text2Img,
            PipelineKind::Img2Img,
            PipelineKind::Pix2Pix,
        ] {
            for path in family.generation_paths(kind) {
                add("POST", path.to_string(), RouteKind::Generate(family, kind));
            }
        }
    }
    for path in FETCH_PATHS {
        add("POST", path.to_string(), RouteKind::FetchByBody);
        add("POST", format!("{path}/{{id}}"), RouteKind::FetchById);
    }
    for prefix in ENTERPRISE_PREFIXES {
        for name in MANAGEMENT {
            add("POST", format!("{prefix}{name}"), RouteKind::Manage(name));
        }
    }
    add("POST", "/api/v3/system_load".into(), RouteKind::SystemLoad);
    for (method, name) in sdapi::ROUTES {
        add(method, format!("/sdapi/v1/{name}"), RouteKind::Sdapi(name));
    }
    add(
        "POST",
        "/v1/images/generations".into(),
        RouteKind::OpenAiGenerations,
    );
    add("POST", "/v1/images/edits".into(), RouteKind::OpenAiEdits);
    add("GET", "/v1/models".into(), RouteKind::OpenAiModels);
    add(
        "GET",
        "/api/v1/jobs/{id}/events".into(),
        RouteKind::JobEvents,
    );
    add(
        "POST",
        "/api/v1/jobs/{id}/cancel".into(),
        RouteKind::JobCancel,
    );
    add("GET", "/".into(), RouteKind::Playground);
    add("GET", "/api/v1/options".into(), RouteKind::Options);
    for (path, what) in NOT_YET {
        add("POST", path.to_string(), RouteKind::NotYet(what));
    }
    add("GET", "/generations/{*key}".into(), RouteKind::File);
    add("GET", "/temp/{*key}".into(), RouteKind::File);
    add("GET", "/health".into(), RouteKind::Health);
    add("GET", "/metrics".into(), RouteKind::Metrics);
    add("GET", "/openapi.json".into(), RouteKind::OpenApi);
    routes
}

/// The axum router over `app`.
pub fn router(app: Arc<App>) -> Router {
    let mut router: Router<Arc<App>> = Router::new();
    for route in table() {
        router = match route.kind {
            RouteKind::Sdapi(name) => {
                let method = route.method;
                let handler =
                    move |State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes| {
                        sdapi::handle(app, method, name, headers, body)
                    };
                router.route(
                    &route.path,
                    if method == "GET" {
                        get(handler)
                    } else {
                        post(handler)
                    },
                )
            }
            RouteKind::Generate(family, kind) => router.route(
                &route.path,
                post(
                    move |State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes| {
                        generate::handle(app, family, kind, headers, body)
                    },
                ),
            ),
            RouteKind::OpenAiGenerations => router.route(
                &route.path,
                post(
                    |State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes| {
                        openai::generations(app, headers, body)
                    },
                ),
            ),
            RouteKind::OpenAiEdits => router.route(
                &route.path,
                // The handler reads the body within the limit itself; the layer only lifts the
                // multipart extractor's own 2 MB default to the same limit.
                post(|State(app): State<Arc<App>>, request: Request| openai::edits(app, request))
                    .layer(DefaultBodyLimit::max(app.node.config.max_body_bytes)),
            ),
            RouteKind::OpenAiModels => router.route(
                &route.path,
                get(|State(app): State<Arc<App>>, headers: HeaderMap| {
                    openai::list_models(app, headers)
                }),
            ),
            RouteKind::JobEvents => router.route(
                &route.path,
                get(
                    |State(app): State<Arc<App>>,
                     path: Result<Path<String>, PathRejection>,
                     query: Result<Query<KeyQuery>, QueryRejection>,
                     headers: HeaderMap| async move {
                        match (path_id(path, "id"), query_key(query)) {
                            (Ok(id), Ok(key)) => jobs::events(app, id, key, headers).await,
                            (Err(e), _) | (_, Err(e)) => e.into_response(),
                        }
                    },
                ),
            ),
            RouteKind::Playground => router.route(&route.path, get(playground::page)),
            RouteKind::Options => router.route(
                &route.path,
                get(
                    |State(app): State<Arc<App>>,
                     query: Result<Query<KeyQuery>, QueryRejection>,
                     headers: HeaderMap| async move {
                        match query_key(query) {
                            Ok(key) => playground::options(app, key, headers).await,
                            Err(e) => e.into_response(),
                        }
                    },
                ),
            ),
            RouteKind::JobCancel => router.route(
                &route.path,
                post(
                    |State(app): State<Arc<App>>,
                     path: Result<Path<String>, PathRejection>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        match path_id(path, "id") {
                            Ok(id) => jobs::cancel(app, id, headers, body).await,
                            Err(e) => e.into_response(),
                        }
                    },
                ),
            ),
            RouteKind::NotYet(what) => router.route(
                &route.path,
                post(move || async move { ApiError::message(what).into_response() }),
            ),
            RouteKind::FetchByBody => router.route(
                &route.path,
                post(
                    |State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes| {
                        fetch::handle(app, None, headers, body)
                    },
                ),
            ),
            RouteKind::FetchById => router.route(
                &route.path,
                post(
                    |State(app): State<Arc<App>>,
                     path: Result<Path<String>, PathRejection>,
                     headers: HeaderMap,
                     body: Bytes| async move {
                        match path_id(path, "request_id") {
                            Ok(id) => fetch::handle(app, Some(id), headers, body).await,
                            Err(e) => e.into_response(),
                        }
                    },
                ),
            ),
            RouteKind::Manage(name) => router.route(
                &route.path,
                post(
                    move |State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes| {
                        enterprise::handle(app, name, headers, body)
                    },
                ),
            ),
            RouteKind::SystemLoad => router.route(
                &route.path,
                post(|State(app): State<Arc<App>>| enterprise::system_load(app)),
            ),
            RouteKind::File => router.route(&route.path, get(files::file)),
            RouteKind::Health => router.route(&route.path, get(files::health)),
            RouteKind::Metrics => router.route(&route.path, get(files::metrics)),
            RouteKind::OpenApi => router.route(&route.path, get(files::openapi)),
        };
    }
    router
        .fallback(files::not_found)
        .method_not_allowed_fallback(files::method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// The routes of a `--role worker` process: `/health` and `/metrics` only.
pub fn worker_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(files::health))
        .route("/metrics", get(files::metrics))
        .fallback(files::not_found)
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .with_state(app)
}

/// Counts every request by route and status, and logs it.
async fn count_requests(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    app.node
        .metrics
        .requests
        .with_label_values(&[&route, &status])
        .inc();
    tracing::debug!(
        route,
        status,
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    response
}
