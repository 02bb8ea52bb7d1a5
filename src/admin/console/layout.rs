//! The page shell every console page shares: the header with the navigation, the inline
//! stylesheet (no external asset), and the window selector.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::{Ctx, Win};

const CSS: &str = r#"
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #111827; background: #ffffff; }
header { background: #111827; color: #ffffff; padding: 10px 20px; display: flex; gap: 24px; align-items: center; flex-wrap: wrap; }
header a { color: #ffffff; text-decoration: none; }
header a[aria-current="page"] { text-decoration: underline; text-underline-offset: 4px; }
header .brand { font-weight: 700; }
header nav { display: flex; gap: 16px; flex-wrap: wrap; }
header form { margin-left: auto; }
main { padding: 16px 20px 40px; max-width: 1100px; }
h1 { font-size: 22px; margin: 8px 0 12px; }
h2 { font-size: 17px; margin: 24px 0 8px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e5e7eb; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; white-space: normal; }
thead th { background: #f3f4f6; }
tfoot td { font-weight: 700; }
a { color: #1d4ed8; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 8px 0 8px; }
.card { border: 1px solid #d1d5db; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card .label { color: #4b5563; font-size: 12px; }
.card .value { font-size: 20px; font-weight: 600; }
.chart svg { width: 100%; height: auto; max-width: 960px; }
.chart figcaption { color: #4b5563; font-size: 12px; }
figure { margin: 8px 0; }
.spike-key { color: #b91c1c; font-weight: 600; }
.note { color: #4b5563; font-size: 12px; }
.firing { color: #b91c1c; font-weight: 600; }
.quiet { color: #047857; }
.windows a, .windows span { margin-right: 10px; }
.windows span { font-weight: 700; }
form.inline { display: inline; }
button { font: inherit; padding: 3px 10px; cursor: pointer; }
button.danger { background: #b91c1c; color: #ffffff; border: 1px solid #7f1d1d; border-radius: 4px; }
label { margin-right: 6px; }
input[type=text], input[type=password] { font: inherit; padding: 3px 6px; }
.error { color: #b91c1c; }
"#;

/// Navigation entries: (path, label).
const NAV: [(&str, &str); 5] = [
    ("/ui/", "Overview"),
    ("/ui/repeats", "Repeats"),
    ("/ui/reconcile", "Reconciliation"),
    ("/ui/guardrails", "Guardrails"),
    ("/ui/keys", "Keys"),
];

/// A whole page: `title`, the nav entry to mark, and the body.
pub fn page(ctx: &Ctx, title: &str, current: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — creditmeter" }
                style { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a.brand href="/ui/" { "creditmeter" }
                    nav aria-label="Console" {
                        @for (path, label) in NAV {
                            @if path == current {
                                a href=(path) aria-current="page" { (label) }
                            } @else {
                                a href=(path) { (label) }
                            }
                        }
                    }
                    @if let Some(csrf) = &ctx.csrf {
                        @if ctx.login_required {
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main {
                    @if !ctx.login_required {
                        p.note { "No admin token is configured and the admin listener is on a loopback address, so the console needs no login. Set the variable named by admin.token_env to require one." }
                    }
                    (body)
                }
            }
        }
    }
}

/// The window selector: 24h, 7d, 30d, and a custom since/until form (GET, works without
/// JavaScript). `base` is the page's path with its other query parameters (ending in `?` or
/// `&`).
pub fn window_selector(base: &str, win: &Win, hidden: &[(&str, &str)]) -> Markup {
    html! {
        div.windows {
            "Window: "
            @for w in ["24h", "7d", "30d"] {
                @if win.label == w {
                    span aria-current="true" { (w) }
                } @else {
                    a href=(format!("{base}window={w}")) { (w) }
                }
            }
            form.inline method="get" {
                @for (k, v) in hidden {
                    input type="hidden" name=(k) value=(v);
                }
                input type="hidden" name="window" value="custom";
                label for="since" { "Since" }
                input #since type="text" name="since" size="22" placeholder="2026-11-24 or 2026-11-24T10:00:00Z"
                    value=(if win.label == "custom" { win.since.as_str() } else { "" });
                " "
                label for="until" { "Until" }
                input #until type="text" name="until" size="22" placeholder="now"
                    value=(win.until.as_deref().unwrap_or(""));
                " "
                button type="submit" { "Show" }
            }
        }
    }
}
