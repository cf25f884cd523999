//! The agent's HTTP/JSON API on a unix socket (mode 0600, root only). The
//! CLI is its client; docs/api/openapi.json describes it.

use std::{path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Query, Request, State},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::net::UnixListener;

use super::core::{AgentError, Core, Ctx, Shared};
use crate::api::*;
use crate::{
    dataplane::{DataplaneError, PolicyMaps, stats},
    engine::lb_view::LbView,
    model::policy::{self, Interface, Op, RuleRow, config::ConfigErrors},
};

pub const OPENAPI: &str = include_str!("../../../docs/api/openapi.json");

/// Who is calling: the socket peer's credentials plus the user the CLI
/// says it runs for (SUDO_USER), for the history.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, UnixListener>>
    for Peer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        Self {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

fn author(peer: &Peer, headers: &axum::http::HeaderMap) -> String {
    let from_uid = || {
        peer.uid
            .and_then(|u| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
                    .ok()
                    .flatten()
            })
            .map_or_else(|| "?".to_string(), |u| u.name)
    };
    let user = headers
        .get("x-sluice-user")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() < 64 && !s.chars().any(char::is_control))
        .map_or_else(from_uid, str::to_string);
    match (peer.uid, peer.pid) {
        (Some(uid), Some(pid)) => format!("{user} (uid {uid}, pid {pid})"),
        (Some(uid), None) => format!("{user} (uid {uid})"),
        _ => user.to_string(),
    }
}

/// The caller's session (`X-Sluice-Session`: its `$SSH_CONNECTION`) and
/// whether it insists (`X-Sluice-Force: 1`).
fn safety(headers: &axum::http::HeaderMap) -> super::core::Safety {
    super::core::Safety {
        session: headers
            .get("x-sluice-session")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::model::policy::eval::Probe::from_ssh_connection),
        force: headers.get("x-sluice-force").is_some_and(|v| v == "1"),
    }
}

/// The request id the caller chose (`X-Sluice-Request`: letters, digits,
/// `-`, at most 64), or one made here; it is kept in history so a caller
/// that lost the connection can find out what became of its change.
fn request_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-sluice-request")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        .map_or_else(new_request_id, str::to_string)
}

/// Who asks, with which request id and safety settings.
fn ctx(peer: &Peer, headers: &axum::http::HeaderMap) -> Ctx {
    Ctx {
        author: author(peer, headers),
        request: Some(request_id(headers)),
        safety: safety(headers),
        retry_interfaces: false,
    }
}

/// The largest request body the API takes: 512 MiB (a million IPv6
/// prefixes as JSON take about 45 MiB).
pub const BODY_LIMIT: usize = 512 << 20;

/// A JSON request body: a body that is not JSON, misses fields, or has
/// fields the endpoint does not know is a 400 with the JSON error body.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                let status = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError(
                    status,
                    ErrorBody {
                        error: rejection.body_text(),
                        diagnostics: Vec::new(),
                    },
                ))
            }
        }
    }
}

/// Every error the API answers is the JSON error body, also those axum
/// makes itself (unknown path, wrong method, bad path or query parameter,
/// body too large); 415 and 422 become 400.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let status = match status {
        StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::UNPROCESSABLE_ENTITY => {
            StatusCode::BAD_REQUEST
        }
        s => s,
    };
    let error = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    ApiError(
        status,
        ErrorBody {
            error,
            diagnostics: Vec::new(),
        },
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        ErrorBody {
            error: "no such endpoint (see GET /openapi.json)".into(),
            diagnostics: Vec::new(),
        },
    )
}

/// Text a user sends that is shown and logged again (a reason): refused
/// when it holds control characters (a newline would fake a row in `deny
/// list`, an escape sequence would rewrite the terminal).
fn plain_text(what: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().any(char::is_control) {
        return Err(bad_request(format!(
            "{what} must not contain control characters (newlines, escapes)"
        )));
    }
    if s.len() > max {
        return Err(bad_request(format!("{what} is longer than {max} bytes")));
    }
    Ok(())
}

pub struct ApiError(StatusCode, ErrorBody);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        let status = match e.root_cause() {
            AgentError::Config(_) | AgentError::Refused(_) => StatusCode::BAD_REQUEST,
            AgentError::LockOut { .. } | AgentError::DenyEverything { .. } => StatusCode::CONFLICT,
            AgentError::NoSuchVersion { .. } => StatusCode::NOT_FOUND,
            AgentError::HistoryMismatch { .. } => StatusCode::CONFLICT,
            AgentError::Dataplane(
                DataplaneError::NotInList { .. }
                | DataplaneError::NoSuchRule { .. }
                | DataplaneError::BadPosition { .. }
                | DataplaneError::UnknownInterface { .. }
                | DataplaneError::NotAttachedTo { .. }
                | DataplaneError::Cgroup { .. }
                | DataplaneError::Steer { .. }
                | DataplaneError::NoCgroup2,
            ) => StatusCode::BAD_REQUEST,
            AgentError::Netns(_) => StatusCode::BAD_REQUEST,
            AgentError::Dataplane(
                DataplaneError::ListFull { .. } | DataplaneError::TooManyRules { .. },
            ) => StatusCode::CONFLICT,
            AgentError::Dataplane(DataplaneError::NotAttached { .. }) => StatusCode::CONFLICT,
            AgentError::Lb(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let diagnostics = match e.root_cause() {
            AgentError::Config(ConfigErrors(d)) => d.clone(),
            _ => Vec::new(),
        };
        Self(
            status,
            ErrorBody {
                error: e.to_string(),
                diagnostics,
            },
        )
    }
}

/// The agent's own failure (a task that panicked): 500.
fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorBody {
            error: e.to_string(),
            diagnostics: Vec::new(),
        },
    )
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        ErrorBody {
            error: msg.into(),
            diagnostics: Vec::new(),
        },
    )
}

/// Runs `f` on the core on a blocking thread (bpf syscalls block).
async fn with_core<T: Send + 'static>(
    core: &Shared,
    f: impl FnOnce(&mut Core) -> Result<T, AgentError> + Send + 'static,
) -> Result<T, ApiError> {
    let core = core.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut c)
    })
    .await
    .map_err(internal)?
    .map_err(ApiError::from)
}

async fn info(State(core): State<Shared>) -> Result<Json<Info>, ApiError> {
    with_core(&core, |c| {
        Ok(Info {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pin_root: c.root.root.clone(),
            socket: c.settings.socket.clone(),
            state_dir: c.settings.state_dir.clone(),
            config: c.config_path.clone(),
            policy_version: c.state.current_version(),
            base_source: c.state.base_source.clone(),
            runtime_changes: c.state.overlay.len(),
            recovered: c.recovered.clone(),
        })
    })
    .await
    .map(Json)
}

async fn status(State(core): State<Shared>) -> Result<Json<crate::dataplane::Status>, ApiError> {
    with_core(&core, |c| c.dataplane_status()).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct TopQuery {
    top: Option<usize>,
}

async fn get_stats(
    State(core): State<Shared>,
    Query(q): Query<TopQuery>,
) -> Result<Json<stats::Stats>, ApiError> {
    with_core(&core, move |c| {
        let maps = PolicyMaps::open(&c.root)?;
        Ok(stats::collect(&maps, q.top.unwrap_or(10))?)
    })
    .await
    .map(Json)
}

/// `POST /v1/stats/reset`: zero every packet counter (not a version).
async fn reset_stats(State(core): State<Shared>) -> Result<Json<stats::ResetReport>, ApiError> {
    with_core(&core, move |c| {
        let mut maps = PolicyMaps::open(&c.root)?;
        let r = stats::reset(&mut maps, crate::api::time::unix_now_ns())?;
        tracing::info!(entries = r.entries, "packet counters reset");
        Ok(r)
    })
    .await
    .map(Json)
}

async fn get_events(State(core): State<Shared>) -> Result<Json<EventsBody>, ApiError> {
    with_core(&core, |c| {
        let dataplane = crate::dataplane::runtime::named_stats(&c.root)?
            .into_iter()
            .map(|(name, v)| (name.to_string(), v))
            .collect();
        Ok(EventsBody {
            dataplane,
            escalated_sources: c.metrics.escalations.get(),
            deny_expirations: c.metrics.expirations.get(),
            temporary_denies: c.desired.temp_deny.len(),
        })
    })
    .await
    .map(Json)
}

fn list_kind(kind: &str) -> Result<bool, ApiError> {
    match kind {
        "deny" => Ok(false),
        "allow" => Ok(true),
        other => Err(bad_request(format!(
            "unknown list {other:?} (deny or allow)"
        ))),
    }
}

async fn get_list(
    State(core): State<Shared>,
    Path(kind): Path<String>,
) -> Result<Json<ListBody>, ApiError> {
    let allow = list_kind(&kind)?;
    with_core(&core, move |c| {
        let maps = PolicyMaps::open(&c.root)?;
        let (v4, v6) = if allow {
            (
                sluice_common::ListId::AllowV4,
                sluice_common::ListId::AllowV6,
            )
        } else {
            (sluice_common::ListId::DenyV4, sluice_common::ListId::DenyV6)
        };
        let mut entries: Vec<ListedEntry> =
            maps.list_entries(v4)?.into_iter().map(Into::into).collect();
        entries.extend(maps.list_entries(v6)?.into_iter().map(ListedEntry::from));
        if !allow {
            for e in &mut entries {
                e.temporary = c.desired.temp_deny.get(&e.prefix).cloned();
            }
        }
        Ok(ListBody {
            list: kind,
            entries,
        })
    })
    .await
    .map(Json)
}

async fn list_change(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    Path((kind, verb)): Path<(String, String)>,
    ApiJson(body): ApiJson<PrefixesBody>,
) -> Result<Json<Applied>, ApiError> {
    let allow = list_kind(&kind)?;
    match (verb.as_str(), body.prefixes.is_empty()) {
        ("flush", false) => return Err(bad_request("flush takes no prefixes")),
        ("flush", true) => {}
        (_, true) => return Err(bad_request("no prefixes given")),
        _ => {}
    }
    if let Some(r) = &body.reason {
        plain_text("reason", r, 200)?;
    }
    let ctx = ctx(&peer, &headers);
    let who = ctx.author.clone();
    if body.ttl_secs.is_some() && (allow || verb != "add") {
        return Err(bad_request("ttl_secs applies to deny add only"));
    }
    if body.reason.is_some() && body.ttl_secs.is_none() {
        return Err(bad_request("reason goes with ttl_secs"));
    }
    if matches!(verb.as_str(), "replace" | "flush") {
        for n in &body.prefixes {
            crate::model::policy::exact_prefix(n).map_err(bad_request)?;
        }
        let new: std::collections::BTreeSet<IpNet> =
            body.prefixes.iter().map(IpNet::trunc).collect();
        return with_core(&core, move |c| {
            let (current, temporary) = if allow {
                (&c.desired.policy.allow, None)
            } else {
                (&c.desired.policy.deny, Some(&c.desired.temp_deny))
            };
            let dels: Vec<IpNet> = current.difference(&new).copied().collect();
            // Entries of the new list that are temporary now become
            // permanent (an add of an entry makes it permanent).
            let adds: Vec<IpNet> = new
                .iter()
                .filter(|n| !current.contains(n) || temporary.is_some_and(|t| t.contains_key(n)))
                .copied()
                .collect();
            let list = if allow { "allow" } else { "deny" };
            let added = new.difference(current).count();
            let cause = if verb == "flush" {
                format!("{list} flush (-{})", dels.len())
            } else {
                let permanent = match adds.len() - added {
                    0 => String::new(),
                    n => format!(", {n} made permanent"),
                };
                format!(
                    "{list} replace: {} prefix(es) (+{added} -{}{permanent})",
                    new.len(),
                    dels.len()
                )
            };
            let ops = Op::list_edit(allow, dels, adds);
            c.change_with_cause(ops, &ctx, cause)
        })
        .await
        .map(Json);
    }
    let op = match verb.as_str() {
        "add" if body.ttl_secs.is_some() => {
            let ttl = body.ttl_secs.unwrap_or(0);
            if !(1..=365 * 86_400).contains(&ttl) {
                return Err(bad_request("ttl_secs must be 1 to 31536000"));
            }
            Op::DenyFor {
                prefixes: body.prefixes,
                reason: body.reason.unwrap_or_else(|| format!("added by {who}")),
                expires_unix: crate::api::time::unix_now() + ttl,
            }
        }
        "add" => Op::ListAdd {
            allow,
            prefixes: body.prefixes,
        },
        "del" => Op::ListDel {
            allow,
            prefixes: body.prefixes,
        },
        other => {
            return Err(bad_request(format!(
                "unknown operation {other:?} (add, del, replace or flush)"
            )));
        }
    };
    with_core(&core, move |c| c.change(vec![op], &ctx))
        .await
        .map(Json)
}

fn rule_rows(c: &Core) -> Result<Vec<RuleRow>, AgentError> {
    let maps = PolicyMaps::open(&c.root)?;
    Ok(maps
        .rules()?
        .iter()
        .map(crate::engine::policy::rule_row)
        .collect())
}

async fn get_rules(State(core): State<Shared>) -> Result<Json<RulesBody>, ApiError> {
    with_core(&core, |c| {
        Ok(RulesBody {
            rules: rule_rows(c)?,
        })
    })
    .await
    .map(Json)
}

async fn add_rule(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<RuleAddBody>,
) -> Result<Json<RuleAdded>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        let position = body.at.unwrap_or(c.desired.policy.rules.len());
        let applied = c.change(
            vec![Op::RuleAdd {
                at: body.at,
                rule: body.rule,
            }],
            &ctx,
        )?;
        let rule_id = rule_rows(c)?
            .iter()
            .find(|r| r.position == position)
            .map_or(0, |r| r.id);
        Ok(RuleAdded {
            applied,
            rule_id,
            position,
        })
    })
    .await
    .map(Json)
}

async fn del_rule(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    Path(id): Path<u32>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        let rows = rule_rows(c)?;
        let Some(row) = rows.into_iter().find(|r| r.id == id) else {
            return Err(DataplaneError::NoSuchRule { id }.into());
        };
        c.change(vec![Op::RuleDel { rule: row.rule }], &ctx)
    })
    .await
    .map(Json)
}

/// Deletes several rules in one change (all or none).
async fn del_rules(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<RuleDelBody>,
) -> Result<Json<Applied>, ApiError> {
    if body.ids.is_empty() {
        return Err(bad_request("no rule ids given"));
    }
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        let rows = rule_rows(c)?;
        let mut ops = Vec::new();
        for id in body.ids {
            let Some(row) = rows.iter().find(|r| r.id == id) else {
                return Err(DataplaneError::NoSuchRule { id }.into());
            };
            ops.push(Op::RuleDel {
                rule: row.rule.clone(),
            });
        }
        c.change(ops, &ctx)
    })
    .await
    .map(Json)
}

async fn put_settings(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<SettingsBody>,
) -> Result<Json<Applied>, ApiError> {
    let mut ops = Vec::new();
    if let Some(action) = body.default {
        ops.push(Op::Default { action });
    }
    if let Some(action) = body.malformed {
        ops.push(Op::Malformed { action });
    }
    if let Some(on) = body.audit {
        ops.push(Op::Audit { on });
    }
    if ops.is_empty() {
        return Err(bad_request(
            "nothing to set (default, malformed and/or audit)",
        ));
    }
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| c.change(ops, &ctx))
        .await
        .map(Json)
}

/// Parses a config the caller sent, reading the list files it names,
/// outside the agent's lock (a slow or huge file never holds up the agent).
async fn parse_sent(
    limits: Limits,
    body: FileBody,
) -> Result<(PathBuf, crate::model::policy::config::Config, String), ApiError> {
    let FileBody { path, text } = body;
    tokio::task::spawn_blocking(move || {
        let cfg =
            crate::model::policy::config::parse_with(&path, &text, Some(limits.file_size_limit))
                .map_err(|e| ApiError::from(AgentError::Config(e)))?;
        let hash = super::store::content_hash(&text);
        Ok((path, cfg, hash))
    })
    .await
    .map_err(internal)?
}

async fn apply_policy(
    State(core): State<Shared>,
    axum::Extension(limits): axum::Extension<Limits>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<FileBody>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    let (path, cfg, hash) = parse_sent(limits, body).await?;
    with_core(&core, move |c| c.apply_config(&path, cfg, hash, &ctx))
        .await
        .map(Json)
}

async fn diff_policy(
    State(core): State<Shared>,
    axum::Extension(limits): axum::Extension<Limits>,
    ApiJson(body): ApiJson<FileBody>,
) -> Result<Json<policy::PolicyDiff>, ApiError> {
    let (_, cfg, _) = parse_sent(limits, body).await?;
    with_core(&core, move |c| Ok(c.diff_config(&cfg)))
        .await
        .map(Json)
}

async fn get_policy(State(core): State<Shared>) -> Result<Json<DesiredBody>, ApiError> {
    with_core(&core, |c| {
        Ok(DesiredBody {
            version: c.state.current_version(),
            desired: c.desired.clone(),
        })
    })
    .await
    .map(Json)
}

async fn history(State(core): State<Shared>) -> Result<Json<Vec<HistoryEntry>>, ApiError> {
    with_core(&core, |c| {
        let current = c.state.current_version();
        Ok(c.state
            .history
            .iter()
            .map(|v| history_entry(v, current))
            .collect())
    })
    .await
    .map(Json)
}

fn history_entry(v: &super::store::Version, current: u64) -> HistoryEntry {
    HistoryEntry {
        version: v.number,
        time: v.time,
        author: v.author.clone(),
        cause: v.cause.clone(),
        deny: v.summary.deny,
        allow: v.summary.allow,
        rules: v.summary.rules,
        default: v.summary.default,
        malformed: v.summary.malformed,
        current: v.number == current,
        request: v.request.clone(),
        changes: v.delta.size(),
        services: v.summary.services,
    }
}

async fn history_version(
    State(core): State<Shared>,
    Path(version): Path<u64>,
) -> Result<Json<VersionDetail>, ApiError> {
    with_core(&core, move |c| {
        let current = c.state.current_version();
        let v = c
            .state
            .history
            .iter()
            .find(|v| v.number == version)
            .ok_or_else(|| AgentError::NoSuchVersion {
                version,
                kept: c
                    .state
                    .history
                    .iter()
                    .map(|v| v.number.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(VersionDetail {
            entry: history_entry(v, current),
            diff: v.delta.policy_diff(),
            temporary_changes: v.delta.temp.len(),
            services_changed: v.delta.services.is_some(),
            interfaces_changed: v.delta.interfaces.is_some(),
        })
    })
    .await
    .map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    from: u64,
    to: Option<u64>,
}

/// `GET /v1/history/diff?from=A&to=B`: what going from version A's policy
/// to B's (default: the current one) changes.
async fn history_diff(
    State(core): State<Shared>,
    Query(q): Query<DiffQuery>,
) -> Result<Json<policy::PolicyDiff>, ApiError> {
    with_core(&core, move |c| {
        let to = q.to.unwrap_or(c.state.current_version());
        let a = c.policy_at(q.from)?;
        let b = c.policy_at(to)?;
        Ok(policy::PolicyDiff::between(&a, &b))
    })
    .await
    .map(Json)
}

async fn rollback(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<RollbackBody>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| c.rollback(body.version, &ctx))
        .await
        .map(Json)
}

async fn attach_iface(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(interface): ApiJson<Interface>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        c.change(vec![Op::Attach { interface }], &ctx)
    })
    .await
    .map(Json)
}

async fn detach_iface(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<DetachBody>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        c.change(
            vec![Op::Detach {
                name: body.name,
                netns: body.netns,
            }],
            &ctx,
        )
    })
    .await
    .map(Json)
}

/// `GET /v1/lb`: services, backends, health, counters.
#[derive(Debug, serde::Deserialize)]
struct LbQuery {
    /// Count open connections (walks the connection table); default true.
    active: Option<bool>,
}

async fn get_lb(
    State(core): State<Shared>,
    Query(q): Query<LbQuery>,
) -> Result<Json<LbView>, ApiError> {
    let walk = q.active.unwrap_or(true);
    with_core(&core, move |c| Ok(c.lb_view(walk)?))
        .await
        .map(Json)
}

/// `POST /v1/lb/change`: one change to the services.
async fn lb_change(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(change): ApiJson<crate::model::lb::LbOp>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| c.change(vec![Op::Lb { change }], &ctx))
        .await
        .map(Json)
}

/// `GET /v1/workloads`: the socket layer's workloads, links and counters.
async fn get_workloads(
    State(core): State<Shared>,
) -> Result<Json<Vec<crate::engine::sock::WorkloadState>>, ApiError> {
    with_core(&core, |c| Ok(c.workloads_view())).await.map(Json)
}

/// `POST /v1/workloads/change`: one change to the workloads.
async fn workload_change(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(change): ApiJson<crate::model::sock::WorkloadOp>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| {
        c.change(vec![Op::Workload { change }], &ctx)
    })
    .await
    .map(Json)
}

/// `GET /v1/steers`: steering's link, steers, sockets and counters.
async fn get_steers(
    State(core): State<Shared>,
) -> Result<Json<crate::engine::steer::SteerView>, ApiError> {
    with_core(&core, |c| Ok(c.steer_view())).await.map(Json)
}

/// `POST /v1/steers/change`: one change to the steers.
async fn steer_change(
    State(core): State<Shared>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: axum::http::HeaderMap,
    ApiJson(change): ApiJson<crate::model::steer::SteerOp>,
) -> Result<Json<Applied>, ApiError> {
    let ctx = ctx(&peer, &headers);
    with_core(&core, move |c| c.change(vec![Op::Steer { change }], &ctx))
        .await
        .map(Json)
}

/// Body of `POST /v1/steers/{name}/socket`: whose socket to take.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketBody {
    pub pid: u32,
    #[serde(default)]
    pub fd: Option<i32>,
}

/// `POST /v1/steers/{name}/socket`: register a process's socket for a steer.
async fn steer_register(
    State(core): State<Shared>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<SocketBody>,
) -> Result<Json<crate::engine::steer::Registered>, ApiError> {
    with_core(&core, move |c| c.steer_register(&name, body.pid, body.fd))
        .await
        .map(Json)
}

/// `DELETE /v1/steers/{name}/socket`: let go of a steer's socket.
async fn steer_unregister(
    State(core): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    with_core(&core, move |c| c.steer_unregister(&name))
        .await
        .map(|had| Json(serde_json::json!({ "unregistered": had })))
}

/// The flow reader, given to the router as an extension by the agent.
type FlowsExt = axum::Extension<Arc<super::flows::Flows>>;

/// `GET /v1/flows`: recent records, or with `follow=true` a stream of new
/// ones (NDJSON).
async fn get_flows(
    axum::Extension(flows): FlowsExt,
    Query(q): Query<crate::api::flows::FlowsQuery>,
) -> Result<Response, ApiError> {
    let bad = |e: crate::api::flows::FilterError| bad_request(e.to_string());
    if crate::api::flows::parse_bool(q.follow.as_deref()).map_err(bad)? {
        if q.limit.is_some() {
            return Err(bad_request("limit does not apply to follow"));
        }
        let filter = crate::api::flows::Filter::parse(&q).map_err(bad)?;
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            flows.follow(filter),
        )
            .into_response());
    }
    Ok(Json(flows.query_recent(&q).map_err(bad)?).into_response())
}

async fn get_flows_top(
    axum::Extension(flows): FlowsExt,
    Query(q): Query<crate::api::flows::FlowsQuery>,
) -> Result<Json<crate::api::flows::TopReport>, ApiError> {
    tokio::task::spawn_blocking(move || flows.query_top(&q))
        .await
        .map_err(internal)?
        .map(Json)
        .map_err(|e| bad_request(e.to_string()))
}

async fn get_flows_stats(
    axum::Extension(flows): FlowsExt,
) -> Result<Json<crate::api::flows::FlowStats>, ApiError> {
    tokio::task::spawn_blocking(move || flows.stats())
        .await
        .map(Json)
        .map_err(internal)
}

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

pub fn router(core: Shared) -> Router {
    let steer_socket = post(steer_register).delete(steer_unregister);
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/info", get(info))
        .route("/v1/status", get(status))
        .route("/v1/stats", get(get_stats))
        .route("/v1/stats/reset", post(reset_stats))
        .route("/v1/events", get(get_events))
        .route("/v1/lists/{kind}", get(get_list))
        .route("/v1/lists/{kind}/{verb}", post(list_change))
        .route("/v1/rules", get(get_rules).post(add_rule))
        .route("/v1/rules/{id}", delete(del_rule))
        .route("/v1/rules/delete", post(del_rules))
        .route("/v1/settings", put(put_settings))
        .route("/v1/policy", get(get_policy))
        .route("/v1/policy/apply", post(apply_policy))
        .route("/v1/policy/diff", post(diff_policy))
        .route("/v1/history", get(history))
        .route("/v1/history/diff", get(history_diff))
        .route("/v1/history/{version}", get(history_version))
        .route("/v1/rollback", post(rollback))
        .route("/v1/interfaces/attach", post(attach_iface))
        .route("/v1/interfaces/detach", post(detach_iface))
        .route("/v1/flows", get(get_flows))
        .route("/v1/flows/top", get(get_flows_top))
        .route("/v1/flows/stats", get(get_flows_stats))
        .route("/v1/lb", get(get_lb))
        .route("/v1/lb/change", post(lb_change))
        .route("/v1/workloads", get(get_workloads))
        .route("/v1/workloads/change", post(workload_change))
        .route("/v1/steers", get(get_steers))
        .route("/v1/steers/change", post(steer_change))
        .route("/v1/steers/{name}/socket", steer_socket)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(core)
}

#[cfg(test)]
mod tests {
    /// Every route the router serves is described in the OpenAPI document,
    /// and the document describes nothing that is not served.
    #[test]
    fn openapi_describes_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("valid JSON");
        let mut described: Vec<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .cloned()
            .collect();
        described.sort();
        let source = include_str!("api.rs");
        let mut served: Vec<String> = source
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
            .filter_map(|l| l.split('"').next())
            .map(String::from)
            .collect();
        served.sort();
        assert_eq!(described, served);
    }
}
