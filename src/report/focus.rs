//! `report --format focus`: spend as FinOps FOCUS 1.x cost and usage rows (CSV), one per
//! charge period × table × workflow × endpoint × credit type, for finance tools that read
//! FOCUS (the FinOps Foundation's open billing format).
//!
//! Rows come from the hourly rollups, so the export covers the whole history whatever
//! `ledger.retention` deleted, and the window is widened to whole charge periods (a day by
//! default; `--timeline 1h` for hourly periods). Settlement rows (deferred charges) count in
//! their call's period; charges still pending are not in it. See the README for how each
//! column is filled.

use std::fmt::Write as _;

use rusqlite::Connection;

use super::{credits, csv_field, format_time, parse_time, ReportError, ReportRequest};
use crate::ledger::queries::{ceil_to, floor_to, HOUR_MS};

/// The columns, in order. FOCUS names first; `x_` columns are creditmeter's own (FOCUS allows
/// custom columns with that prefix).
pub const COLUMNS: [&str; 31] = [
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_CreditType",
    "x_Endpoint",
    "x_Calls",
];

/// The price to put on credits (`--price-per-credit`, `--currency`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pricing {
    /// Currency units per credit; `None`: costs are 0.
    pub per_credit: Option<f64>,
    /// ISO 4217, default `USD`.
    pub currency: String,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            per_credit: None,
            currency: "USD".into(),
        }
    }
}

/// One FOCUS row before rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct FocusRow {
    pub period_start_ms: i64,
    pub period_end_ms: i64,
    pub table: String,
    pub workflow: String,
    pub endpoint: String,
    pub credit_type: &'static str,
    pub calls: i64,
    pub milli: i64,
}

/// The rows of the window (widened to whole periods), oldest period first.
pub fn rows(conn: &Connection, req: &ReportRequest) -> Result<Vec<FocusRow>, ReportError> {
    let period = req.bucket_ms;
    let since = floor_to(req.since_ms.max(0), period);
    let until = ceil_to(req.until_ms, period);
    let (filter_sql, filter_params) = req.filter.sql(true);
    let sql = format!(
        "SELECT (hour / :p) * :p AS period, table_name, workflow, endpoint, sum(calls),
                sum(lead_milli), sum(direct_dial_milli), sum(export_milli)
           FROM rollup_hourly
          WHERE hour >= :since AND hour < :until{filter_sql}
          GROUP BY 1, 2, 3, 4
          ORDER BY 1, 2, 3, 4"
    );
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> =
        vec![(":p", &period), (":since", &since), (":until", &until)];
    for (name, v) in &filter_params {
        params.push((name, v));
    }
    let mut stmt = conn.prepare(&sql)?;
    let mut out = Vec::new();
    let mut q = stmt.query(params.as_slice())?;
    while let Some(r) = q.next()? {
        let start: i64 = r.get(0)?;
        let (table, workflow, endpoint): (String, String, String) =
            (r.get(1)?, r.get(2)?, r.get(3)?);
        let calls: i64 = r.get(4)?;
        for (i, credit_type) in ["lead", "direct_dial", "export"].into_iter().enumerate() {
            let milli: i64 = r.get(5 + i)?;
            if milli != 0 {
                out.push(FocusRow {
                    period_start_ms: start,
                    period_end_ms: start + period,
                    table: table.clone(),
                    workflow: workflow.clone(),
                    endpoint: endpoint.clone(),
                    credit_type,
                    calls,
                    milli,
                });
            }
        }
    }
    Ok(out)
}

/// The UTC calendar month holding `ms`: `[start, end)`.
fn month_of(ms: i64) -> (i64, i64) {
    let t = format_time(ms);
    let (y, m) = (
        t[0..4].parse::<i64>().unwrap_or(1970),
        t[5..7].parse::<i64>().unwrap_or(1),
    );
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let start = parse_time(&format!("{y:04}-{m:02}-01"), 0).unwrap_or(ms);
    let end = parse_time(&format!("{ny:04}-{nm:02}-01"), 0).unwrap_or(ms);
    (start, end)
}

/// A FOCUS decimal: up to 6 decimals, no trailing zeros.
fn decimal(v: f64) -> String {
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// The CSV (header and rows).
pub fn render(rows: &[FocusRow], pricing: &Pricing) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let qty = credits(r.milli);
        let cost = decimal(pricing.per_credit.unwrap_or(0.0) * r.milli as f64 / 1000.0);
        let (bp_start, bp_end) = month_of(r.period_start_ms);
        let tags = serde_json::json!({
            "table": r.table, "workflow": r.workflow, "endpoint": r.endpoint,
            "credit_type": r.credit_type,
        })
        .to_string();
        let description = format!(
            "Apollo.io {} {} credits for table {} (workflow {})",
            r.endpoint, r.credit_type, r.table, r.workflow
        );
        let fields: [String; 31] = [
            cost.clone(),
            String::new(),
            String::new(),
            pricing.currency.clone(),
            format_time(bp_end),
            format_time(bp_start),
            "Usage".into(),
            String::new(),
            description,
            "Usage-Based".into(),
            format_time(r.period_end_ms),
            format_time(r.period_start_ms),
            qty.clone(),
            "Credits".into(),
            cost.clone(),
            cost.clone(),
            "Apollo.io".into(),
            cost,
            qty,
            "Credits".into(),
            "Apollo.io".into(),
            "Apollo.io".into(),
            "Business Applications".into(),
            "Apollo.io".into(),
            format!("{}:{}", r.endpoint, r.credit_type),
            r.table.clone(),
            r.table.clone(),
            tags,
            r.credit_type.into(),
            r.endpoint.clone(),
            r.calls.to_string(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        let _ = writeln!(out, "{}", line.join(","));
    }
    out
}

/// Checks the period: whole hours, at least one.
pub fn check_period(ms: i64) -> Result<(), String> {
    if ms % HOUR_MS != 0 {
        return Err(format!(
            "timeline: FOCUS charge periods are whole hours (1h, 1d, ...), not {}",
            super::width_label(ms)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_decimals() {
        let t = parse_time("2026-12-06T21:00:00Z", 0).unwrap();
        let (s, e) = month_of(t);
        assert_eq!(format_time(s), "2026-12-01T00:00:00Z");
        assert_eq!(format_time(e), "2027-01-01T00:00:00Z");
        assert_eq!(decimal(0.0), "0");
        assert_eq!(decimal(12.5), "12.5");
        assert_eq!(decimal(0.025 * 3.0), "0.075");
    }

    #[test]
    fn a_row_fills_the_focus_columns() {
        let row = FocusRow {
            period_start_ms: parse_time("2026-12-06", 0).unwrap(),
            period_end_ms: parse_time("2026-12-07", 0).unwrap(),
            table: "Inbound, leads".into(),
            workflow: "enrich-person".into(),
            endpoint: "people_match".into(),
            credit_type: "lead",
            calls: 12,
            milli: 10_500,
        };
        let csv = render(
            &[row],
            &Pricing {
                per_credit: Some(0.02),
                currency: "EUR".into(),
            },
        );
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        assert_eq!(header, COLUMNS);
        let line = lines.next().unwrap();
        assert!(line.starts_with("0.21,,,EUR,2027-01-01T00:00:00Z,2026-12-01T00:00:00Z,Usage,,"));
        assert!(line.contains(",2026-12-07T00:00:00Z,2026-12-06T00:00:00Z,10.5,Credits,"));
        assert!(line.contains("\"Inbound, leads\""));
        assert!(line.contains(r#""{""credit_type"":""lead"",""endpoint"":""people_match"",""table"":""Inbound, leads"",""workflow"":""enrich-person""}""#));
        assert!(line.ends_with(",lead,people_match,12"));
    }
}
