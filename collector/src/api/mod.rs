//! The HTTP API on :8480 (DESIGN.md, "Ports, API and CLI"). Handlers parse and check
//! parameters, ask `crate::query`, and answer JSON; every error is `{"error": "..."}` with a
//! 4xx/5xx status, and storage errors are logged, never shown.

pub mod dashboard;
pub mod params;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{rejection::JsonRejection, Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use tracing::error;

use crate::{
    alerts::{
        evaluator::{self, unix_now, AlertsState},
        slo::SloDefinition,
    },
    auth::Token,
    metrics::Metrics,
    query::{CompareScope, Queries},
    sampling::SamplingPolicy,
};
pub use params::{parse_time, parse_window};
use sightline_compare::Settings;

#[derive(Clone)]
pub struct ApiState {
    pub queries: Queries,
    pub metrics: Arc<Metrics>,
    /// The sampling policy agent streams push to their agents.
    pub sampling: Arc<tokio::sync::watch::Sender<SamplingPolicy>>,
    /// Asked of every route but the health checks, the login and the dashboard's files (which
    /// hold no data; the dashboard asks for the token when the API answers 401).
    pub api_token: Token,
    /// The longest `to - from` a request may ask for.
    pub max_window_us: u64,
    /// The alert evaluator's book, SLOs and health.
    pub alerts: Arc<AlertsState>,
}

impl ApiState {
    /// The request's window, refused when longer than the limit.
    fn window(&self, params: &HashMap<String, String>) -> Result<crate::query::Window, ApiError> {
        let window = parse_window(params)?;
        if window.to_us - window.from_us > self.max_window_us {
            return Err(ApiError::bad_request(format!(
                "the window is {:.1} days; at most {} days may be asked (api.max_window_days)",
                (window.to_us - window.from_us) as f64 / 86_400e6,
                self.max_window_us / 86_400_000_000
            )));
        }
        Ok(window)
    }
}

/// The API under `/api/v1`, `/metrics`, the health checks, and the dashboard at `/`.
pub fn router(state: ApiState, dashboard_dir: &std::path::Path) -> Router {
    let auth = (state.api_token.clone(), state.metrics.clone(), "api");
    let open = Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/api/v1/login", axum::routing::post(login))
        .with_state(state.clone());
    Router::new()
        .route("/api/v1/services", get(services))
        .route("/api/v1/traces", get(search_traces))
        .route("/api/v1/traces/{trace_id}", get(trace))
        .route("/api/v1/topology", get(topology))
        .route("/api/v1/transactions", get(transactions))
        .route("/api/v1/compare", get(compare).post(compare_with))
        .route("/api/v1/agents/sampling", get(sampling).put(set_sampling))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/slos", get(slos))
        .route("/api/v1/slos/{name}", get(slo).put(put_slo).delete(delete_slo))
        .route("/metrics", get(metrics))
        .route(
            "/api/{*rest}",
            axum::routing::any(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            count_refusals,
        ))
        .layer(axum::middleware::from_fn_with_state(auth, crate::auth::require))
        .with_state(state)
        .merge(open)
        .merge(dashboard::router(dashboard_dir))
}

/// Counts the API's refusals of bad requests (400, 413, 422) by reason; 401 counts itself.
async fn count_refusals(
    State(metrics): State<Arc<Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let reason = match response.status() {
        StatusCode::BAD_REQUEST => "bad_parameter",
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => "result_too_large",
        _ => return response,
    };
    metrics.reject_request("api", reason);
    response
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// The dashboard's login: the right API token comes back as an HTTP-only cookie, which the
/// browser then sends with every API request.
async fn login(State(state): State<ApiState>, body: Result<Json<Login>, JsonRejection>) -> Response {
    let Ok(Json(Login { token })) = body else {
        return ApiError::bad_request("send {\"token\": \"...\"}").into_response();
    };
    if !state.api_token.allows(Some(&token)) {
        state.metrics.reject_request("api", "unauthenticated");
        return crate::auth::unauthorized("the API");
    }
    let cookie = format!("{}={token}; Path=/; HttpOnly; SameSite=Strict", crate::auth::COOKIE);
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A storage failure: logged in full, reported without ClickHouse's text. The API's own
    /// limits (result size, query time), which ClickHouse enforces, are named.
    fn storage(e: clickhouse::error::Error) -> Self {
        let text = e.to_string();
        if text.contains("Code: 396,") {
            return Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the answer is larger than the API allows (api.max_result_rows): narrow the window or add filters",
            );
        }
        if text.contains("Code: 159,") {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the query ran longer than the API allows (api.query_timeout_secs): narrow the window",
            );
        }
        error!("query failed: {e}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the trace store could not answer; see the collector log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

type Params = Query<HashMap<String, String>>;

async fn sampling(State(state): State<ApiState>) -> Json<SamplingPolicy> {
    Json(state.sampling.borrow().clone())
}

/// Replaces the sampling policy; connected agents get their new ratio at once.
async fn set_sampling(
    State(state): State<ApiState>,
    body: Result<Json<SamplingPolicy>, JsonRejection>,
) -> Result<Json<SamplingPolicy>, ApiError> {
    let Json(policy) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    policy.check().map_err(ApiError::bad_request)?;
    state.sampling.send_replace(policy.clone());
    Ok(Json(policy))
}

/// Firing alerts (most severe first) and those resolved lately, with the evaluator's health.
async fn alerts(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let now = unix_now();
    let alerts = &state.alerts;
    Json(json!({
        "active": alerts.active(),
        "recent": alerts.recent(),
        "evaluator": {
            "interval_secs": alerts.interval_secs,
            "last_evaluation": alerts.last_success(),
            "lag_secs": alerts.lag_secs(now),
            "stalled": alerts.stalled(now),
            "last_error": alerts.last_error(),
        },
    }))
}

/// Every SLO with its burn rates and the error budget left.
async fn slos(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let now = unix_now();
    let mut out = Vec::new();
    for (slo, source) in state.alerts.slos() {
        out.push(
            evaluator::slo_status(&state.queries, &slo, source, now)
                .await
                .map_err(ApiError::storage)?,
        );
    }
    Ok(Json(json!({ "slos": out })))
}

async fn slo(State(state): State<ApiState>, Path(name): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let Some((slo, source)) = state.alerts.slos().into_iter().find(|(s, _)| s.name == name) else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no SLO named {name}")));
    };
    let status = evaluator::slo_status(&state.queries, &slo, source, unix_now())
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(status))
}

/// Creates or replaces an SLO (the body's `name`, if given, must be the path's).
async fn put_slo(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<SloDefinition>, ApiError> {
    let Json(mut body) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Some(fields) = body.as_object_mut() else {
        return Err(ApiError::bad_request("send the SLO as a JSON object"));
    };
    match fields.get("name") {
        None => {
            fields.insert("name".into(), json!(name));
        }
        Some(given) if given == &json!(name) => {}
        Some(_) => return Err(ApiError::bad_request("the body's name differs from the path's")),
    }
    let slo: SloDefinition =
        serde_json::from_value(body).map_err(|e| ApiError::bad_request(format!("not an SLO: {e}")))?;
    slo.check().map_err(ApiError::bad_request)?;
    if state.alerts.is_config_slo(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("SLO {name} is defined in the configuration file; change it there"),
        ));
    }
    state
        .queries
        .store_slo(&name, Some(&slo))
        .await
        .map_err(ApiError::storage)?;
    state.alerts.put_api_slo(slo.clone());
    Ok(Json(slo))
}

async fn delete_slo(State(state): State<ApiState>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    if state.alerts.is_config_slo(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("SLO {name} is defined in the configuration file; remove it there"),
        ));
    }
    if !state.alerts.slos().iter().any(|(s, _)| s.name == name) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, format!("no SLO named {name}")));
    }
    state.queries.store_slo(&name, None).await.map_err(ApiError::storage)?;
    state.alerts.remove_api_slo(&name);
    Ok(StatusCode::NO_CONTENT)
}

async fn services(State(state): State<ApiState>, Query(params): Params) -> Result<Response, ApiError> {
    let window = state.window(&params)?;
    let services = state.queries.services(window).await.map_err(ApiError::storage)?;
    Ok(Json(json!({ "services": services })).into_response())
}

async fn topology(State(state): State<ApiState>, Query(params): Params) -> Result<Response, ApiError> {
    let window = state.window(&params)?;
    let filter = params::topology_filter(&params)?;
    let topology = state
        .queries
        .topology(window, &filter)
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(topology).into_response())
}

/// The comparison with the default bands.
async fn compare(state: State<ApiState>, params: Params) -> Result<Response, ApiError> {
    compare_with(state, params, Ok(Json(Settings::default()))).await
}

/// The comparison with the caller's settings (the gate sends its gate.toml as JSON).
async fn compare_with(
    State(state): State<ApiState>,
    Query(params): Params,
    settings: Result<Json<Settings>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(settings) = settings.map_err(|e| ApiError::bad_request(e.body_text()))?;
    settings.check().map_err(ApiError::bad_request)?;
    let window = state.window(&params)?;
    let scope = CompareScope {
        service: params::required(&params, "service")?,
        baseline: params::required(&params, "baseline")?,
        candidate: params::required(&params, "candidate")?,
        block_seconds: params::block_seconds(&params, &window)?,
        window,
    };
    if scope.baseline == scope.candidate {
        return Err(ApiError::bad_request("baseline and candidate must differ"));
    }
    let inputs = state.queries.compare_inputs(&scope).await.map_err(ApiError::storage)?;
    for (version, missing) in [
        (&scope.baseline, inputs.iter().all(|i| i.baseline.blocks.is_empty())),
        (&scope.candidate, inputs.iter().all(|i| i.candidate.blocks.is_empty())),
    ] {
        if missing {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no traffic of {} version {version} in the window", scope.service),
            ));
        }
    }
    let report = sightline_compare::compare(&inputs, &settings);
    // What the dashboard draws beside the verdicts: each side's latency distribution (summed
    // block histograms, [bucket µs, count] ascending) and mean time per stage.
    let sides: serde_json::Map<String, serde_json::Value> = inputs
        .iter()
        .map(|input| {
            let side = |side: &sightline_compare::Side| {
                let mut summed: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
                for (bucket, count) in side.blocks.iter().flat_map(|b| &b.histogram) {
                    *summed.entry(*bucket).or_insert(0) += count;
                }
                let histogram: Vec<[u64; 2]> = summed.into_iter().map(|(b, c)| [b, c]).collect();
                json!({ "histogram": histogram, "stages_ms": side.stages_ms })
            };
            (
                input.bt.clone(),
                json!({ "baseline": side(&input.baseline), "candidate": side(&input.candidate) }),
            )
        })
        .collect();
    Ok(Json(json!({
        "service": scope.service,
        "baseline": scope.baseline,
        "candidate": scope.candidate,
        "from": scope.window.from_us / 1000,
        "to": scope.window.to_us / 1000,
        "block_seconds": scope.block_seconds,
        "verdict": report.verdict,
        "reweighted_mean_ratio": report.reweighted_mean_ratio,
        "transactions": report.transactions,
        "sides": sides,
    }))
    .into_response())
}

async fn transactions(State(state): State<ApiState>, Query(params): Params) -> Result<Response, ApiError> {
    let window = state.window(&params)?;
    let service = params::service(&params)?;
    let transactions = state
        .queries
        .transactions(window, service.as_deref())
        .await
        .map_err(ApiError::storage)?;
    Ok(Json(json!({ "transactions": transactions })).into_response())
}

async fn search_traces(State(state): State<ApiState>, Query(params): Params) -> Result<Response, ApiError> {
    let window = state.window(&params)?;
    let filter = params::trace_filter(&params)?;
    let traces = state.queries.search(window, &filter).await.map_err(ApiError::storage)?;
    Ok(Json(json!({ "traces": traces })).into_response())
}

async fn trace(State(state): State<ApiState>, Path(trace_id): Path<String>) -> Result<Response, ApiError> {
    if trace_id.len() != 32 || !trace_id.bytes().all(|b| b.is_ascii_hexdigit()) || trace_id.bytes().all(|b| b == b'0') {
        return Err(ApiError::bad_request("trace id must be 32 hex digits, not all zero"));
    }
    match state.queries.trace(&trace_id).await.map_err(ApiError::storage)? {
        Some(spans) => Ok(Json(json!({ "trace_id": trace_id.to_ascii_lowercase(), "spans": spans })).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("trace {trace_id} not found"),
        )),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let now = unix_now();
    if state.alerts.stalled(now) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "alert evaluation has not completed for {} s",
                state.alerts.lag_secs(now)
            ),
        ));
    }
    match tokio::time::timeout(Duration::from_secs(2), state.queries.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ready" })).into_response()),
        Ok(Err(e)) => {
            error!("readiness check failed: {e}");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ClickHouse is not answering",
            ))
        }
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ClickHouse did not answer within 2 s",
        )),
    }
}
