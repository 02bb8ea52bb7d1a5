//! Drift for one window and credit type, with calls at the window's edges netted out.
//!
//! Apollo's balance at a snapshot counts every call it billed before it answered the poll, a
//! little late ("within seconds"). So relative to a snapshot sent at `s` and answered at `r`:
//! a call that finished at least `balance_lag` before `s` is surely counted; a call that started
//! after `r` surely is not; any other call is *at the edge*: either side of the snapshot may hold
//! it. `ledger` is what the ledger surely puts in the window, `edge` the credits of the calls at
//! the closing edge.
//!
//! Only the split of the edge calls between two neighbouring windows is uncertain, never their
//! sum. So the state carried from snapshot to snapshot is an interval, [`Carry`]: how much of the
//! edge credits Apollo had already counted, as far as the evidence so far allows. Each window
//! takes the placement of its edge calls that explains Apollo's delta best, and reports only the
//! drift no placement can explain. Consequences (the tolerance the README states):
//!
//! - No flapping: calls at an edge never show up as drift, whichever side Apollo counted them on.
//! - Exact when nothing was at the edges: the drift is Apollo's delta minus the ledger's credits.
//! - Drift that coincides with edge calls may be reported in the neighbouring window, shifted by
//!   at most those calls' credits; the sum over consecutive windows is always exact.

/// Of the credits at a snapshot's edge, how much Apollo had already counted, less the fraction
/// of a credit its whole-credit figure hides: somewhere in `lo..=hi` (thousandths of a credit).
///
/// Apollo's usage figures are whole credits while calls bill fractions (`1.01`). We model the
/// figure as Apollo's cumulative consumption rounded down (Apollo does not document its
/// rounding), so the true consumption at a snapshot is `figure + f` with `f` in
/// `0..=slack` ([`slack`]). With `a` the edge credits Apollo had counted, the state carried is
/// `u = a - f`, in `-slack..=edge`; it is an interval because only the evidence of the windows
/// so far narrows it down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carry {
    pub lo: i64,
    pub hi: i64,
}

impl Carry {
    /// Nothing known yet: anywhere from none to all of `edge`, less any hidden fraction (a
    /// first snapshot, or the first after a credit-cycle reset).
    pub fn unknown(edge: i64, slack: i64) -> Carry {
        Carry {
            lo: -slack.max(0),
            hi: edge.max(0),
        }
    }
}

/// How much of a credit a snapshot's figure may hide: up to 0.999 when it is a whole number of
/// credits (Apollo's figures always are), nothing when Apollo reported a fraction.
pub fn slack(consumed_milli: i64) -> i64 {
    if consumed_milli.rem_euclid(1000) == 0 {
        999
    } else {
        0
    }
}

/// One window's figures, thousandths of a credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Apollo's consumed delta; `None` when the credit cycle restarted inside the window.
    pub apollo_delta: Option<i64>,
    /// Credits of calls surely inside the window.
    pub ledger: i64,
    /// Credits of calls at the closing edge.
    pub edge: i64,
    /// What the closing snapshot's figure may hide ([`slack`]); 0 for exact figures.
    pub slack: i64,
}

/// What the window settles to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Apollo's delta minus what creditmeter saw, signed; 0 across a cycle reset.
    pub drift: i64,
    /// What creditmeter saw: `ledger` with the edge calls placed where Apollo counted them.
    pub metered: i64,
    /// The state at the closing snapshot, for the next window.
    pub carry: Carry,
}

/// Settles `w`, given the state at its opening snapshot.
pub fn settle(prev: Carry, w: Window) -> Settled {
    let edge = w.edge.max(0);
    let slack = w.slack.max(0);
    let Some(delta) = w.apollo_delta else {
        // Apollo's counter restarted somewhere inside: the window cannot be reconciled, and the
        // next one starts from scratch.
        return Settled {
            drift: 0,
            metered: w.ledger,
            carry: Carry::unknown(edge, slack),
        };
    };
    // With drift d, the closing state is `u1 = u0 + raw - d` for some `u0` in `prev`, and it
    // must lie in `-slack..=edge`. So d lies in `raw + prev.lo - edge ..= raw + prev.hi + slack`.
    let raw = delta - w.ledger;
    let (d_lo, d_hi) = (raw + prev.lo - edge, raw + prev.hi + slack);
    let drift = if d_lo <= 0 && 0 <= d_hi {
        0
    } else if slack > 0 {
        // Something left (or came back) outside the ledger, seen through whole-credit figures.
        // Nearly every charge is whole credits, so take the whole amount that fits nearest the
        // middle of what fits (ties toward 0); if none fits, the amount nearest to 0.
        let mid = d_lo + (d_hi - d_lo) / 2;
        let below = mid.div_euclid(1000) * 1000;
        let candidates = [below, below + 1000];
        candidates
            .into_iter()
            .filter(|c| (d_lo..=d_hi).contains(c))
            .min_by_key(|c| ((c - mid).abs(), c.abs()))
            .unwrap_or(if d_lo > 0 { d_lo } else { d_hi })
    } else if d_lo > 0 {
        // Apollo fell by more than even all the edge calls can explain.
        d_lo
    } else {
        // Apollo fell by less than the ledger surely saw.
        d_hi
    };
    let carry = Carry {
        lo: (raw - drift + prev.lo).max(-slack),
        hi: (raw - drift + prev.hi).min(edge),
    };
    Settled {
        drift,
        metered: delta - drift,
        carry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(apollo_delta: i64, ledger: i64, edge: i64) -> Window {
        Window {
            apollo_delta: Some(apollo_delta),
            ledger,
            edge,
            slack: 0,
        }
    }

    /// Settles a run of windows from an empty start, returning the drifts.
    fn run(windows: &[Window]) -> Vec<i64> {
        let mut carry = Carry::unknown(0, 0);
        windows
            .iter()
            .map(|&win| {
                let s = settle(carry, win);
                carry = s.carry;
                assert_eq!(s.metered + s.drift, win.apollo_delta.unwrap_or(s.metered));
                s.drift
            })
            .collect()
    }

    #[test]
    fn exact_when_nothing_is_at_the_edges() {
        assert_eq!(
            run(&[w(3000, 3000, 0), w(8000, 3000, 0), w(0, 0, 0)]),
            [0, 5000, 0]
        );
        // Creditmeter saw more than Apollo took: negative drift.
        assert_eq!(run(&[w(1000, 3000, 0)]), [-2000]);
    }

    #[test]
    fn an_edge_call_never_flaps_whichever_side_apollo_counted() {
        // A 1-credit call in flight at the first window's closing snapshot.
        // Apollo counted it in the first window:
        assert_eq!(run(&[w(1000, 0, 1000), w(0, 1000, 0)]), [0, 0]);
        // ...or in the second:
        assert_eq!(run(&[w(0, 0, 1000), w(1000, 1000, 0)]), [0, 0]);
        // A long call at the edge of two snapshots in a row.
        assert_eq!(
            run(&[w(0, 0, 1000), w(1000, 0, 1000), w(0, 1000, 0)]),
            [0, 0, 0]
        );
    }

    #[test]
    fn drift_next_to_an_edge_call_moves_at_most_its_credits_and_sums_exactly() {
        // 5 credits out of band in window 1, and a 1-credit call at its closing edge that
        // Apollo counted only in window 2.
        let drifts = run(&[w(5000, 0, 1000), w(1000, 1000, 0)]);
        assert_eq!(drifts, [4000, 1000]);
        assert_eq!(drifts.iter().sum::<i64>(), 5000);
        // Counted in window 1 after all: exact.
        assert_eq!(run(&[w(6000, 0, 1000), w(0, 1000, 0)]), [5000, 0]);
    }

    #[test]
    fn a_cycle_reset_is_not_drift_and_restarts_the_state() {
        let reset = Window {
            apollo_delta: None,
            ledger: 4000,
            edge: 1000,
            slack: 0,
        };
        let s = settle(Carry::unknown(0, 0), reset);
        assert_eq!(
            (s.drift, s.metered, s.carry),
            (0, 4000, Carry::unknown(1000, 0))
        );
        // The edge call lands on either side of the post-reset snapshot: no drift either way.
        assert_eq!(settle(s.carry, w(0, 1000, 0)).drift, 0);
        assert_eq!(settle(s.carry, w(1000, 1000, 0)).drift, 0);
        // Real drift after the reset still shows (less what the edge call may explain).
        assert_eq!(settle(s.carry, w(3000, 1000, 0)).drift, 2000);
    }

    /// Runs windows over whole-credit figures: Apollo's consumption floored at each snapshot.
    /// `spend` is per window: (billed through the proxy, spent outside), thousandths.
    fn floored(start_milli: i64, spend: &[(i64, i64)]) -> Vec<i64> {
        let floor = |c: i64| c.div_euclid(1000) * 1000;
        let mut apollo = start_milli;
        let mut carry = Carry::unknown(0, slack(floor(apollo)));
        spend
            .iter()
            .map(|&(metered, outside)| {
                let before = floor(apollo);
                apollo += metered + outside;
                let after = floor(apollo);
                let s = settle(
                    carry,
                    Window {
                        apollo_delta: Some(after - before),
                        ledger: metered,
                        edge: 0,
                        slack: slack(after),
                    },
                );
                carry = s.carry;
                s.drift
            })
            .collect()
    }

    #[test]
    fn fractional_spend_against_whole_credit_figures_is_never_drift() {
        // 1.01 credits a window for 300 windows, from any starting fraction.
        for start in [0, 1, 500, 990, 999, 12_345] {
            let drifts = floored(start, &[(1010, 0); 300]);
            assert!(drifts.iter().all(|&d| d == 0), "start {start}: {drifts:?}");
        }
        // Uneven fractions, some windows with nothing billed.
        let spend: Vec<(i64, i64)> = (0..200).map(|i| ((i % 7) * 333, 0)).collect();
        assert!(floored(250, &spend).iter().all(|&d| d == 0));
    }

    #[test]
    fn whole_credits_outside_show_as_whole_credits_despite_the_rounding() {
        let mut spend = vec![(1010, 0); 20];
        spend[7] = (1010, 5000);
        spend[15] = (0, 8000);
        let drifts = floored(400, &spend);
        assert_eq!(drifts[7], 5000, "{drifts:?}");
        assert_eq!(drifts[15], 8000, "{drifts:?}");
        assert_eq!(drifts.iter().sum::<i64>(), 13_000, "{drifts:?}");
    }

    #[test]
    fn slack_is_only_for_whole_figures() {
        assert_eq!((slack(0), slack(7000), slack(-3000)), (999, 999, 999));
        assert_eq!((slack(1010), slack(-1)), (0, 0));
    }
}
