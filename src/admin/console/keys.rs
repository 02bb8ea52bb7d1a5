//! Virtual keys (`/ui/keys`): the list `creditmeter keys list` shows, and forms to create
//! (table, optional workflow and name), revoke and rotate a key. The forms are posts carrying
//! the session's CSRF token and go through the same [`crate::keys::ops`] calls as the CLI and
//! `/api/keys`, each audited with the console's actor (`console:` and the admin API's actor).
//!
//! A created or rotated key is shown once, on the page that answers the post (`no-store`),
//! and never stored or logged: the ledger keeps only its hash, the log only its id.

use http::StatusCode;
use maud::{html, Markup};

use super::{html_response, layout, message_page, redirect, Ctx, PageError, Query};
use crate::admin::AdminResponse;
use crate::keys::ops::{self, CreateRequest, KeyOpError};
use crate::ledger::keys::{Issued, KeyStoreError};

/// Renders `/ui/keys`.
pub fn render(ctx: &Ctx, q: &Query) -> Result<Markup, PageError> {
    let rows = ops::list(&ctx.db).map_err(|e| PageError::Internal(e.to_string()))?;
    let csrf = ctx.csrf.clone().unwrap_or_default();
    let t = crate::report::format_time;
    let body = html! {
        h1 { "Virtual keys" }
        p { "Callers send a creditmeter key (cmk_…) instead of the Apollo key; creditmeter swaps in the real key and attributes the call to the key's table and workflow. creditmeter keeps only a hash of each key." }
        @if ctx.keys_config.mode == crate::keys::KeysMode::Off {
            p.note #keys-off { "keys.mode is off: the proxy refuses virtual keys until it is optional or required." }
        }
        @if let Some(id) = q.text("revoked") {
            p #revoked role="status" { "Key " (id) " is revoked: calls with it are refused (401)." }
        }
        h2 { "Create a key" }
        form #create-key method="post" action="/ui/keys" {
            input type="hidden" name="csrf" value=(csrf);
            p {
                label for="key-table" { "Table" }
                input #key-table type="text" name="table" size="30" maxlength="256" required;
                " "
                label for="key-workflow" { "Workflow (optional)" }
                input #key-workflow type="text" name="workflow" size="20" maxlength="256";
                " "
                label for="key-name" { "Name (optional)" }
                input #key-name type="text" name="name" size="20" maxlength="64";
                " "
                button #create type="submit" { "Create key" }
            }
        }
        h2 { "Keys" }
        @if rows.is_empty() {
            p #keys data-keys="0" { "No virtual key yet." }
        } @else {
            table #keys data-keys=(rows.len()) {
                thead { tr {
                    th scope="col" { "id" } th.text scope="col" { "name" } th scope="col" { "prefix" } th scope="col" { "status" }
                    th.text scope="col" { "table" } th.text scope="col" { "workflow" } th scope="col" { "created (UTC)" }
                    th scope="col" { "last used (UTC)" } th scope="col" { "expires (UTC)" } th scope="col" { "" }
                } }
                tbody {
                    @for r in &rows {
                        @let status = ops::status(r, ctx.now);
                        @let label = r.name.clone().unwrap_or_else(|| r.id.clone());
                        tr.key data-id=(r.id) data-name=(r.name.as_deref().unwrap_or("")) data-table=(r.table) data-status=(status) {
                            td { (r.id) } td.text { (r.name.as_deref().unwrap_or("-")) } td { (r.prefix) "…" } td.status { (status) }
                            td.text { (r.table) } td.text { (r.workflow.as_deref().unwrap_or("-")) } td { (t(r.created_at)) }
                            td { (r.last_used_at.map_or("never".into(), t)) } td { (r.expires_at.map_or("-".into(), t)) }
                            td {
                                @if r.revoked_at.is_none() {
                                    form.inline method="post" action="/ui/keys/rotate" {
                                        input type="hidden" name="csrf" value=(csrf);
                                        input type="hidden" name="id" value=(r.id);
                                        button.rotate type="submit" aria-label=(format!("Rotate key {label}")) { "Rotate" }
                                    }
                                    " "
                                    form.inline method="post" action="/ui/keys/revoke" {
                                        input type="hidden" name="csrf" value=(csrf);
                                        input type="hidden" name="id" value=(r.id);
                                        button.danger.revoke type="submit" aria-label=(format!("Revoke key {label}")) { "Revoke" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(ctx, "Virtual keys", "/ui/keys", body))
}

fn refused(ctx: &Ctx, title: &str, e: KeyOpError) -> AdminResponse {
    let status = match &e {
        KeyOpError::Invalid(_) => StatusCode::BAD_REQUEST,
        KeyOpError::Store(KeyStoreError::NotFound(_)) => StatusCode::NOT_FOUND,
        KeyOpError::Store(KeyStoreError::NameTaken(_) | KeyStoreError::Revoked(_)) => {
            StatusCode::CONFLICT
        }
        KeyOpError::Store(e) => {
            tracing::error!(error = %e, "console: a key operation failed");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    message_page(ctx, status, title, &format!("{e}; nothing was changed"))
}

/// The page that shows a new secret, this once.
fn issued_page(ctx: &Ctx, what: &str, issued: &Issued) -> AdminResponse {
    let r = &issued.row;
    html_response(
        StatusCode::OK,
        layout::page(
            ctx,
            what,
            "/ui/keys",
            html! {
                h1 { (what) }
                p { "Key " (r.id) (r.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()) " for table " strong { (r.table) }
                    @if let Some(w) = &r.workflow { ", workflow " strong { (w) } } "." }
                p role="status" { strong { "Copy it now: it is shown this once." } " creditmeter keeps only its hash and cannot show it again (rotate the key to get a new one)." }
                p { label for="new-key" { "Key" } input #new-key type="text" readonly size="60" value=(issued.key) data-id=(r.id); }
                p { a href="/ui/keys" { "Back to the keys" } }
            },
        ),
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KeyOpError> + Send + 'static,
) -> Result<T, KeyOpError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(KeyOpError::Invalid(format!(
            "the key operation failed: {e}"
        )))
    })
}

/// `POST /ui/keys` (CSRF already checked): makes a key.
pub async fn create(ctx: &Ctx, form: &Query) -> AdminResponse {
    let Some(table) = form.text("table").map(|t| t.trim().to_owned()) else {
        return message_page(
            ctx,
            StatusCode::BAD_REQUEST,
            "No key created",
            "name the table the key is for; nothing was changed",
        );
    };
    let req = CreateRequest {
        table,
        workflow: form.text("workflow").map(|w| w.trim().to_owned()),
        name: form.text("name").map(|n| n.trim().to_owned()),
        ..Default::default()
    };
    let (db, config, actor, now) = (
        ctx.db.clone(),
        ctx.keys_config.clone(),
        ctx.actor.clone(),
        ctx.now,
    );
    match blocking(move || ops::create(&db, &req, Some(&config), &actor, now)).await {
        Ok(issued) => {
            tracing::info!(
                key = issued.row.id,
                table = issued.row.table,
                "virtual key created (console)"
            );
            issued_page(ctx, "Key created", &issued)
        }
        Err(e) => refused(ctx, "No key created", e),
    }
}

fn form_id(form: &Query) -> Option<String> {
    form.text("id").map(|i| i.trim().to_owned())
}

/// `POST /ui/keys/revoke` (CSRF already checked).
pub async fn revoke(ctx: &Ctx, form: &Query) -> AdminResponse {
    let Some(id) = form_id(form) else {
        return message_page(
            ctx,
            StatusCode::BAD_REQUEST,
            "Not revoked",
            "the form names no key; nothing was changed",
        );
    };
    let (db, actor, now) = (ctx.db.clone(), ctx.actor.clone(), ctx.now);
    match blocking(move || ops::revoke(&db, &id, &actor, now)).await {
        Ok((row, changed)) => {
            if changed {
                tracing::info!(key = row.id, "virtual key revoked (console)");
            }
            redirect(&format!("/ui/keys?revoked={}", row.id))
        }
        Err(e) => refused(ctx, "Not revoked", e),
    }
}

/// `POST /ui/keys/rotate` (CSRF already checked): a new secret, same id and scope.
pub async fn rotate(ctx: &Ctx, form: &Query) -> AdminResponse {
    let Some(id) = form_id(form) else {
        return message_page(
            ctx,
            StatusCode::BAD_REQUEST,
            "Not rotated",
            "the form names no key; nothing was changed",
        );
    };
    let (db, actor, now) = (ctx.db.clone(), ctx.actor.clone(), ctx.now);
    match blocking(move || ops::rotate(&db, &id, &actor, now)).await {
        Ok(issued) => {
            tracing::info!(key = issued.row.id, "virtual key rotated (console)");
            issued_page(ctx, "Key rotated", &issued)
        }
        Err(e) => refused(ctx, "Not rotated", e),
    }
}
