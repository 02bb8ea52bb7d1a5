//! The sim's credit account: the running totals of what calls billed ([`Billed`]), the balance
//! per credit type that `usage_stats/credit_usage_stats` reports, and the credit cycle.
//!
//! Amounts are in thousandths of a credit, like the proxy's ledger. Apollo bills fractions
//! (`credits_consumed: 1.01`) but its usage figures are integers, so the account keeps the exact
//! consumption and reports it rounded down to whole credits, cumulatively: 1.01 credits a call
//! shows as 1, 2, 3, ... 99, 101 (Apollo does not document its rounding; flooring the running
//! total is the model, and `left_over` is `limit - consumed` as Apollo documents). On a
//! unified-credit plan `lead_credit` is one pool that every credit type draws from, and the
//! per-type pools are not reported.

use serde_json::{json, Value};

use super::Billed;

const MILLI_PER_CREDIT: i64 = 1_000;

/// The first credit cycle is January 2026; each reset moves on one month.
const FIRST_CYCLE_MONTH: u32 = 2026 * 12;

/// Apollo's credit types; the discriminant indexes [`Account`]'s balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreditType {
    Lead,
    DirectDial,
    Export,
}

impl CreditType {
    const ALL: [CreditType; 3] = [CreditType::Lead, CreditType::DirectDial, CreditType::Export];

    /// `lead`, `direct_dial`, `export`, or Apollo's `…_credit` spellings.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name.strip_suffix("_credit").unwrap_or(name) {
            "lead" => Some(CreditType::Lead),
            "direct_dial" => Some(CreditType::DirectDial),
            "export" => Some(CreditType::Export),
            _ => None,
        }
    }

    fn usage_key(self) -> &'static str {
        match self {
            CreditType::Lead => "lead_credit",
            CreditType::DirectDial => "direct_dial_credit",
            CreditType::Export => "export_credit",
        }
    }
}

/// What one call billed, in thousandths of a credit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charge {
    pub(crate) lead_milli: i64,
    pub(crate) direct_dial_milli: i64,
    pub(crate) export_milli: i64,
}

impl Charge {
    /// Nothing billed.
    pub(crate) const NONE: Charge = Charge {
        lead_milli: 0,
        direct_dial_milli: 0,
        export_milli: 0,
    };

    /// `leads` lead credits and `direct_dials` direct-dial credits.
    pub(crate) fn credits(leads: u64, direct_dials: u64) -> Self {
        Self {
            lead_milli: milli(leads),
            direct_dial_milli: milli(direct_dials),
            export_milli: 0,
        }
    }

    /// `exports` export credits.
    pub(crate) fn exports(exports: u64) -> Self {
        Self {
            export_milli: milli(exports),
            ..Self::NONE
        }
    }

    pub(crate) fn total_milli(self) -> i64 {
        self.lead_milli + self.direct_dial_milli + self.export_milli
    }

    fn by_type(self) -> [i64; 3] {
        [self.lead_milli, self.direct_dial_milli, self.export_milli]
    }
}

fn milli(credits: u64) -> i64 {
    i64::try_from(credits)
        .unwrap_or(i64::MAX)
        .saturating_mul(MILLI_PER_CREDIT)
}

/// Credits as a JSON number: whole credits as integers, the rest as decimals (`1.5`).
pub(crate) fn credits_json(milli: i64) -> Value {
    if milli % MILLI_PER_CREDIT == 0 {
        json!(milli / MILLI_PER_CREDIT)
    } else {
        json!(milli as f64 / MILLI_PER_CREDIT as f64)
    }
}

/// Balances and totals; lives behind the sim's mutex.
#[derive(Debug)]
pub(crate) struct Account {
    /// The cycle's allowance per credit type (of the one pool, when unified).
    limit_milli: i64,
    /// A unified-credit plan: one pool, reported as `lead_credit`.
    unified: bool,
    /// Spent this cycle per credit type, calls and out-of-band debits alike.
    consumed_milli: [i64; 3],
    /// Months since year 0 of the current cycle's start.
    cycle_month: u32,
    billed: Billed,
}

impl Account {
    /// A fresh account allowing `initial_credits` of each credit type, or of the one pool.
    pub(crate) fn new(initial_credits: i64, unified: bool) -> Self {
        Self {
            limit_milli: initial_credits.saturating_mul(MILLI_PER_CREDIT),
            unified,
            consumed_milli: [0; 3],
            cycle_month: FIRST_CYCLE_MONTH,
            billed: Billed::default(),
        }
    }

    /// Records one API call and what it billed.
    pub(crate) fn bill(&mut self, charge: Charge) {
        let billed = &mut self.billed;
        billed.calls += 1;
        if charge.total_milli() > 0 {
            billed.billed_calls += 1;
        }
        billed.lead_milli += charge.lead_milli;
        billed.direct_dial_milli += charge.direct_dial_milli;
        billed.export_milli += charge.export_milli;
        for (consumed, spent) in self.consumed_milli.iter_mut().zip(charge.by_type()) {
            *consumed = consumed.saturating_add(spent);
        }
    }

    /// Spends credits outside any call: the balance moves, [`Billed`] does not.
    pub(crate) fn debit(&mut self, credit_type: CreditType, milli: i64) {
        let consumed = &mut self.consumed_milli[credit_type as usize];
        *consumed = consumed.saturating_add(milli);
    }

    /// Starts the next credit cycle with nothing consumed.
    pub(crate) fn reset_cycle(&mut self) {
        self.consumed_milli = [0; 3];
        self.cycle_month += 1;
    }

    pub(crate) fn billed(&self) -> Billed {
        self.billed
    }

    /// The body of `usage_stats/credit_usage_stats`: whole credits, the running consumption
    /// rounded down.
    pub(crate) fn usage_stats(&self) -> Value {
        let mut stats = serde_json::Map::new();
        let whole = |milli: i64| milli.div_euclid(MILLI_PER_CREDIT);
        let limit = whole(self.limit_milli);
        let mut pool = |key: &str, consumed_milli: i64| {
            let consumed = whole(consumed_milli);
            stats.insert(
                key.to_owned(),
                json!({"limit": limit, "consumed": consumed, "left_over": limit - consumed}),
            );
        };
        if self.unified {
            pool(
                CreditType::Lead.usage_key(),
                self.consumed_milli.iter().sum(),
            );
        } else {
            for (credit_type, consumed) in CreditType::ALL.iter().zip(self.consumed_milli) {
                pool(credit_type.usage_key(), consumed);
            }
        }
        stats.insert(
            "current_credit_cycle_start".to_owned(),
            cycle_date(self.cycle_month).into(),
        );
        stats.insert(
            "current_credit_cycle_end".to_owned(),
            cycle_date(self.cycle_month + 1).into(),
        );
        Value::Object(stats)
    }
}

/// The first instant of the month `month` (months since year 0).
fn cycle_date(month: u32) -> String {
    format!("{}-{:02}-01T00:00:00.000+00:00", month / 12, month % 12 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bills_calls_and_reports_balances() {
        let mut account = Account::new(100, false);
        account.bill(Charge::credits(2, 8));
        account.bill(Charge::NONE);
        account.bill(Charge::exports(1));
        assert_eq!(
            account.billed(),
            Billed {
                lead_milli: 2_000,
                direct_dial_milli: 8_000,
                export_milli: 1_000,
                calls: 3,
                billed_calls: 2,
            }
        );
        let stats = account.usage_stats();
        assert_eq!(
            stats["lead_credit"],
            json!({"limit": 100, "consumed": 2, "left_over": 98})
        );
        assert_eq!(stats["direct_dial_credit"]["left_over"], 92);
        assert_eq!(stats["export_credit"]["consumed"], 1);
        assert_eq!(
            stats["current_credit_cycle_start"],
            "2026-01-01T00:00:00.000+00:00"
        );
        assert_eq!(
            stats["current_credit_cycle_end"],
            "2026-02-01T00:00:00.000+00:00"
        );
    }

    #[test]
    fn debits_move_the_balance_but_not_billed() {
        let mut account = Account::new(10, false);
        account.debit(CreditType::parse("lead_credit").unwrap(), 1_500);
        // Whole credits, rounded down: 1.5 consumed shows as 1.
        assert_eq!(account.usage_stats()["lead_credit"]["consumed"], 1);
        assert_eq!(account.usage_stats()["lead_credit"]["left_over"], 9);
        assert_eq!(account.billed(), Billed::default());
        assert_eq!(
            CreditType::parse("direct_dial"),
            Some(CreditType::DirectDial)
        );
        assert_eq!(CreditType::parse("mobile"), None);
    }

    #[test]
    fn a_new_cycle_starts_empty_a_month_later() {
        let mut account = Account::new(10, false);
        account.bill(Charge::credits(1, 0));
        for _ in 0..12 {
            account.reset_cycle();
        }
        let stats = account.usage_stats();
        assert_eq!(stats["lead_credit"]["consumed"], 0);
        assert_eq!(
            stats["current_credit_cycle_start"],
            "2027-01-01T00:00:00.000+00:00"
        );
        // Billed totals are a record of calls, not of the cycle.
        assert_eq!(account.billed().lead_milli, 1_000);
    }

    #[test]
    fn fractional_consumption_shows_as_whole_credits_rounded_down_cumulatively() {
        let mut account = Account::new(1000, false);
        let bulk = Charge {
            lead_milli: 1_010,
            ..Charge::NONE
        };
        let mut shown = Vec::new();
        for _ in 0..100 {
            account.bill(bulk);
            shown.push(account.usage_stats()["lead_credit"]["consumed"].clone());
        }
        assert_eq!(shown[0], 1);
        assert_eq!(shown[98], 99);
        // 100 calls of 1.01 are 101 credits: the fractions add up, none is lost.
        assert_eq!(shown[99], 101);
        assert_eq!(account.usage_stats()["lead_credit"]["left_over"], 899);
        assert!(shown.iter().all(Value::is_i64));
    }

    #[test]
    fn a_unified_plan_reports_one_pool_of_every_type() {
        let mut account = Account::new(100, true);
        account.bill(Charge::credits(2, 8));
        account.bill(Charge::exports(1));
        account.debit(CreditType::DirectDial, 500);
        let stats = account.usage_stats();
        assert_eq!(
            stats["lead_credit"],
            json!({"limit": 100, "consumed": 11, "left_over": 89})
        );
        assert!(stats.get("direct_dial_credit").is_none(), "{stats}");
        assert!(stats.get("export_credit").is_none(), "{stats}");
    }
}
