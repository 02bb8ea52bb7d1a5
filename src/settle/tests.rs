//! Unit tests: a pending charge settles exactly once, whichever path sees the result first.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::catalog::{Catalog, TypedMilli};
use crate::config::{OnLedgerError, Synchronous};
use crate::ledger::{LedgerWriter, WriterConfig};

struct Fixture {
    book: Book,
    metrics: Arc<Metrics>,
    writer: Option<LedgerWriter>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(polling: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = crate::ledger::SqliteStore::open(&path, Synchronous::Normal).unwrap();
        let secret = crate::ledger::Store::install_secret(&store).unwrap();
        let metrics = Arc::new(Metrics::new(10, "test", OnLedgerError::Spool).unwrap());
        let sink = crate::ledger::Store::call_sink(
            &store,
            &crate::ledger::SinkOptions {
                busy_timeout: Duration::from_secs(5),
                secret,
            },
        )
        .unwrap();
        let (writer, handle) = LedgerWriter::spawn(
            sink,
            WriterConfig {
                spool_base: path,
                batch_max: 64,
                on_error: OnLedgerError::Spool,
                spool_reserve: 0,
                group_wait: Duration::ZERO,
                commit_timeout: crate::config::DEFAULT_COMMIT_TIMEOUT,
            },
            metrics.ledger(),
        )
        .unwrap();
        let settings = Arc::new(SettingsCell::new(crate::settings::ProxySettings {
            catalog: Arc::new(Catalog::builtin()),
            require_table: false,
        }));
        let book = Book::new(
            handle,
            metrics.clone(),
            settings,
            polling,
            Duration::from_secs(20),
            Duration::from_secs(3600),
        );
        Fixture {
            book,
            metrics,
            writer: Some(writer),
            dir,
        }
    }

    /// Flushes the ledger and returns the settlement rows: (settles, credits_milli, source, error).
    fn settlements(&mut self) -> Vec<(String, i64, String, Option<String>)> {
        if let Some(w) = self.writer.take() {
            w.close();
        }
        let conn = rusqlite::Connection::open(self.dir.path().join("ledger.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT settles, credits_milli, credit_source, error FROM calls WHERE outcome = 'settlement'")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
}

fn original(id: &str) -> Original {
    Original {
        request_id: id.to_owned(),
        started_at: now_ms(),
        method: "POST".into(),
        path: "/api/v1/people/match".into(),
        endpoint: "people_match".into(),
        table_name: Some("phones".into()),
        workflow: None,
        tags: None,
        key_fp: None,
        records_requested: Some(1),
        records_matched: Some(1),
    }
}

fn reveal(job: Option<&str>) -> Deferred {
    Deferred {
        job_id: job.map(str::to_owned),
        worst: TypedMilli {
            direct_dial: 8000,
            ..TypedMilli::default()
        },
        estimate: TypedMilli {
            direct_dial: 4000,
            ..TypedMilli::default()
        },
        params: vec!["reveal_phone_number".into()],
        note: None,
    }
}

const MOBILE: &[u8] = br#"{"request_id": -42, "status": "completed", "people": [{"id": "p", "phone_numbers": [{"sanitized_number": "+15550100", "type_cd": "mobile"}]}]}"#;

fn metric(m: &Metrics, line: &str) -> bool {
    String::from_utf8(m.encode())
        .unwrap()
        .lines()
        .any(|l| l == line)
}

#[test]
fn a_result_seen_twice_settles_once() {
    let mut f = Fixture::new(true);
    f.book.register(original("a"), reveal(Some("-42")), None);
    assert_eq!(f.book.len(), 1);
    assert!(metric(&f.metrics, "creditmeter_credits_pending 8"));
    // A caller's poll, then creditmeter's own: the second finds nothing to do.
    assert!(f.book.observe_result("/api/v1/webhook_result/-42", MOBILE));
    assert!(!f.book.observe_result("/api/v1/webhook_result/-42", MOBILE));
    f.book.resolve_polled("a", MOBILE);
    assert!(f.book.is_empty());
    assert!(metric(&f.metrics, "creditmeter_credits_pending 0"));
    assert!(metric(
        &f.metrics,
        "creditmeter_settlements_total{result=\"catalog\"} 1"
    ));
    assert_eq!(
        f.settlements(),
        vec![("a".to_owned(), 8000, "catalog".to_owned(), None)]
    );
}

#[test]
fn an_unreadable_caller_result_leaves_the_charge_pending() {
    let f = Fixture::new(true);
    f.book.register(original("a"), reveal(Some("-42")), None);
    assert!(!f
        .book
        .observe_result("/api/v1/webhook_result/-42", b"{\"people\": "));
    assert!(!f
        .book
        .observe_result("/api/v1/webhook_result/7", MOBILE.split_at(5).1));
    assert_eq!(f.book.len(), 1);
}

#[test]
fn settlement_off_records_the_estimate_at_once() {
    let mut f = Fixture::new(false);
    f.book.register(original("a"), reveal(Some("-42")), None);
    assert!(f.book.is_empty());
    let rows = f.settlements();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].1, rows[0].2.as_str()), (4000, "estimated"));
    assert!(rows[0].3.as_deref().unwrap().contains("settlement is off"));
}

#[test]
fn a_charge_without_a_job_id_cannot_wait() {
    let mut f = Fixture::new(true);
    f.book.register(original("a"), reveal(None), None);
    let rows = f.settlements();
    assert_eq!((rows[0].1, rows[0].2.as_str()), (4000, "estimated"));
    assert!(rows[0].3.as_deref().unwrap().contains("no job"));
}

#[test]
fn past_the_deadline_a_charge_is_planned_for_its_estimate() {
    let f = Fixture::new(true);
    let mut o = original("a");
    o.started_at -= 2 * 3_600_000;
    f.book.register(o, reveal(Some("-42")), None);
    let plan = f.book.plan(now_ms());
    assert_eq!(plan.expired.len(), 1);
    assert!(plan.due.is_empty());
    assert!(f.book.is_empty());
}
