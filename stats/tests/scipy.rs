#![allow(clippy::unwrap_used)]

//! The formulas against independent implementations on fixed inputs: scipy for the χ² SRM
//! test, Mann-Whitney U (asymptotic, tie-corrected, no continuity correction) and the normal
//! quantile; a transcription of GrowthBook's gbstats formulas in Python for the confidence
//! sequence, its p-value and the relative CUPED variance; scipy's Student's t and Welch's
//! test for one cohort's difference in differences.
//!
//! Python is `SIGHTLINE_PYTHON`, or the test venv that `scripts/test` installs
//! (`.tools/venv`, with scipy). Without it the test fails and says so.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use sightline_stats::did::{CohortChanges, did};
use sightline_stats::dist::{normal_quantile, student_t_quantile, student_t_sf};
use sightline_stats::effect;
use sightline_stats::moments::{Moments, fixed};
use sightline_stats::rank::mann_whitney;
use sightline_stats::sequential::{Sequential, Sides};
use sightline_stats::srm::srm_p_value;

const SCRIPT: &str = r#"
import json, math, sys
import numpy as np
from scipy import stats

cases = json.load(sys.stdin)
out = {}
out["srm"] = [float(stats.chisquare(c, np.array(w) / sum(w) * sum(c)).pvalue) for c, w in cases["srm"]]

mw = []
for a, b in cases["mann_whitney"]:
    x = np.repeat([k for k, _ in a], [n for _, n in a])
    y = np.repeat([k for k, _ in b], [n for _, n in b])
    r = stats.mannwhitneyu(x, y, use_continuity=False, method="asymptotic", alternative="two-sided")
    mw.append([float(r.statistic), float(r.pvalue)])
out["mann_whitney"] = mw
out["ppf"] = [float(stats.norm.ppf(p)) for p in cases["ppf"]]

# gbstats (growthbook/growthbook:packages/stats/gbstats/frequentist/tests.py), transcribed.
def sequential_rho(alpha, n_star):
    return math.sqrt((-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / n_star)
def halfwidth(s2, n, rho, alpha):
    return math.sqrt(s2) * math.sqrt(2 * (n * rho**2 + 1) / (n**2 * rho**2) * math.log(math.sqrt(n * rho**2 + 1) / alpha))
def p_value(est, se, n, rho):
    st2 = est**2 * n / se**2
    e = math.exp(rho**2 * st2 / (2 * (n * rho**2 + 1))) / math.sqrt(n * rho**2 + 1)
    return min(1 / e, 1)
seq = []
for est, se, n, alpha, n_star in cases["sequential"]:
    rho = sequential_rho(alpha, n_star)
    seq.append([halfwidth(se * se * n, n, rho, alpha), p_value(est, se, n, rho)])
out["sequential"] = seq

# frequentist_variance_relative_cuped (gbstats/models/tests.py, after PR #3610).
cuped = []
for mt, mc, vyt, vyc, vxt, vxc, cxyt, cxyc, nt, nc, theta in cases["cuped"]:
    num_t = (vyt + theta**2 * vxt - 2 * theta * cxyt) / (nt * mc**2)
    num_c = (vyc * mt**2 / mc**2 - 2 * theta * cxyc * mt / mc + theta**2 * vxc) / (nc * mc**2)
    cuped.append(num_t + num_c)
out["cuped"] = cuped

# Student's t, and one cohort's DiD as Welch's test of the changes.
out["t"] = [[float(stats.t.sf(t, df)), float(stats.t.ppf(p, df))] for t, p, df in cases["t"]]
welch = []
for treated, controls in cases["welch"]:
    r = stats.ttest_ind(treated, controls, equal_var=False)
    ci = r.confidence_interval(0.95)
    welch.append([float(r.pvalue), float(r.df), float(ci.low), float(ci.high)])
out["welch"] = welch
json.dump(out, sys.stdout)
"#;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SIGHTLINE_PYTHON") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python")
}

fn run_python(cases: &Value) -> Value {
    let python = python();
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run scripts/test, which installs scipy into .tools/venv, or set SIGHTLINE_PYTHON",
                python.display()
            )
        });
    serde_json::to_writer(child.stdin.take().unwrap(), cases).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed (is scipy installed in {}?)",
        python.display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn close(got: f64, want: f64, relative: f64, what: &str) {
    let scale = want.abs().max(1e-300);
    assert!(
        (got - want).abs() / scale <= relative,
        "{what}: {got} vs {want}"
    );
}

#[test]
fn the_formulas_match_scipy_and_gbstats() {
    let srm: Vec<(Vec<i64>, Vec<f64>)> = vec![
        (vec![510, 490], vec![1.0, 1.0]),
        (vec![1020, 980, 1100], vec![1.0, 1.0, 1.0]),
        (vec![400, 600], vec![0.5, 0.5]),
        (vec![330, 3400, 330], vec![0.1, 0.8, 0.1]),
    ];
    type Histogram = Vec<(i64, i64)>;
    let mw: Vec<(Histogram, Histogram)> = vec![
        (
            vec![(1, 10), (2, 20), (5, 3)],
            vec![(1, 8), (3, 15), (5, 9), (9, 1)],
        ),
        (
            vec![(10, 500), (11, 300), (12, 100)],
            vec![(10, 450), (11, 350), (13, 90)],
        ),
        (vec![(0, 3), (4, 1)], vec![(2, 2), (4, 5), (6, 1)]),
    ];
    let ppf = [1e-9, 0.001, 0.05, 0.5, 0.9, 0.975, 0.999_999];
    let sequential = [
        (0.3, 0.12, 800.0, 0.05, 5000.0),
        (-0.02, 0.01, 20_000.0, 0.05, 10_000.0),
        (1.5, 0.9, 150.0, 0.01, 1000.0),
    ];
    // Two arms with pre-exposure data, summarized, and a θ.
    let arm = |ys: &[f64], xs: &[f64]| {
        ys.iter()
            .zip(xs)
            .map(|(y, x)| Moments::unit(fixed(*y).unwrap(), Some(fixed(*x).unwrap())))
            .fold(Moments::default(), |a, b| a.plus(&b))
            .summary()
    };
    let t = arm(
        &[12.0, 14.5, 11.0, 16.0, 13.5],
        &[9.0, 11.0, 8.5, 12.0, 10.0],
    );
    let c = arm(
        &[10.0, 9.5, 11.5, 8.0, 10.5, 9.0],
        &[10.0, 9.0, 11.0, 8.5, 10.5, 9.5],
    );
    let theta = 0.8;
    let t_cases = [
        (2.1, 0.975, 3.0),
        (-0.4, 0.9, 7.5),
        (5.0, 0.995, 1.3),
        (1.0, 0.6, 40.0),
    ];
    let welch: Vec<(Vec<f64>, Vec<f64>)> = vec![
        (vec![1.2, 2.5, 0.4], vec![0.1, -0.3, 0.2, 0.6, -0.8]),
        (
            vec![3.0, 2.2, 4.1, 2.8, 3.3, 2.9],
            vec![0.5, 1.0, -0.2, 0.3, 0.9, 1.4, 0.1, 0.0],
        ),
    ];
    let cases = json!({
        "t": t_cases,
        "welch": welch,
        "srm": srm,
        "mann_whitney": mw,
        "ppf": ppf,
        "sequential": sequential,
        "cuped": [[t.mean_y, c.mean_y, t.var_y, c.var_y, t.var_x, c.var_x, t.cov_xy, c.cov_xy, t.n, c.n, theta]],
    });
    let want = run_python(&cases);

    for ((counts, weights), want) in srm.iter().zip(want["srm"].as_array().unwrap()) {
        close(
            srm_p_value(counts, weights),
            want.as_f64().unwrap(),
            1e-9,
            "srm",
        );
    }
    for ((a, b), want) in mw.iter().zip(want["mann_whitney"].as_array().unwrap()) {
        let got = mann_whitney(a, b).unwrap();
        close(got.u, want[0].as_f64().unwrap(), 1e-12, "U");
        close(
            got.p_value,
            want[1].as_f64().unwrap(),
            1e-9,
            "Mann-Whitney p",
        );
    }
    for (p, want) in ppf.iter().zip(want["ppf"].as_array().unwrap()) {
        close(normal_quantile(*p), want.as_f64().unwrap(), 1e-9, "ppf");
    }
    for ((est, se, n, alpha, n_star), want) in sequential
        .iter()
        .zip(want["sequential"].as_array().unwrap())
    {
        let test = Sequential {
            alpha: *alpha,
            n_star: *n_star,
        };
        close(
            test.half_width(*se, *n, Sides::Two),
            want[0].as_f64().unwrap(),
            1e-12,
            "half-width",
        );
        close(
            test.p_value(*est, *se, *n, 0.0),
            want[1].as_f64().unwrap(),
            1e-9,
            "sequential p",
        );
    }
    let got = effect::cuped_relative(&t, &c, theta).unwrap();
    close(
        got.se * got.se,
        want["cuped"][0].as_f64().unwrap(),
        1e-12,
        "relative CUPED variance",
    );
    for ((t, p, df), want) in t_cases.iter().zip(want["t"].as_array().unwrap()) {
        close(
            student_t_sf(*t, *df),
            want[0].as_f64().unwrap(),
            1e-9,
            "t sf",
        );
        close(
            student_t_quantile(*p, *df),
            want[1].as_f64().unwrap(),
            1e-9,
            "t ppf",
        );
    }
    for ((treated, controls), want) in welch.iter().zip(want["welch"].as_array().unwrap()) {
        let cohort = CohortChanges {
            treated: treated.clone(),
            controls: controls.iter().map(|c| Some(*c)).collect(),
        };
        let got = did(&[cohort], 0.05).unwrap();
        close(got.p_value, want[0].as_f64().unwrap(), 1e-9, "DiD p");
        close(got.df, want[1].as_f64().unwrap(), 1e-9, "DiD df");
        close(got.lower, want[2].as_f64().unwrap(), 1e-9, "DiD lower");
        close(got.upper, want[3].as_f64().unwrap(), 1e-9, "DiD upper");
    }
}
