//! The distributions the tests need: the standard normal (CDF, survival function, quantile),
//! the χ² survival function (through the regularized incomplete gamma function) and Student's
//! t (survival function and quantile, through the regularized incomplete beta function).

/// P(Z ≤ z) for a standard normal Z.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// P(Z > z) for a standard normal Z (accurate far in the tail, unlike `1 - normal_cdf`).
pub fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// The standard normal density at `z`.
pub fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The `p`-quantile of the standard normal, for `p` in (0, 1): Acklam's rational
/// approximation (relative error below 1.2e-9) refined by one Halley step on `erfc`, which
/// brings it to about 1e-15. `p` outside (0, 1) gives ±∞ (or NaN for NaN).
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const LOW: f64 = 0.024_25;
    let x = if p < LOW {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    // One Halley step: e is the error of the CDF at x.
    let e = normal_cdf(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

/// P(X > x) for X ~ χ² with `df` degrees of freedom (`df` > 0): the regularized upper
/// incomplete gamma function Q(df/2, x/2). Series below a + 1, Lentz's continued fraction
/// above (Numerical Recipes §6.2), both to 1e-15 relative.
pub fn chi2_sf(x: f64, df: f64) -> f64 {
    if x.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(df / 2.0, x / 2.0)
}

/// The regularized upper incomplete gamma function Q(a, x), a > 0, x > 0.
fn gamma_q(a: f64, x: f64) -> f64 {
    let log_prefix = a * x.ln() - x - libm::lgamma(a);
    if x < a + 1.0 {
        // P(a, x) = e^{-x} x^a / Γ(a) · Σ x^n / (a (a+1) … (a+n)).
        let (mut term, mut sum, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..10_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-16 {
                break;
            }
        }
        (1.0 - sum * log_prefix.exp()).clamp(0.0, 1.0)
    } else {
        // Q(a, x) = e^{-x} x^a / Γ(a) · 1 / (x + 1 − a − 1·(1−a) / (x + 3 − a − …)).
        const TINY: f64 = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..10_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (log_prefix.exp() * h).clamp(0.0, 1.0)
    }
}

/// P(T > t) for T ~ Student's t with `df` degrees of freedom (`df` > 0, not necessarily
/// whole): ½ I_{df/(df+t²)}(df/2, ½) for t ≥ 0, by symmetry below.
pub fn student_t_sf(t: f64, df: f64) -> f64 {
    if t.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if t.is_infinite() {
        return if t > 0.0 { 0.0 } else { 1.0 };
    }
    let tail = 0.5 * beta_i(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 { tail } else { 1.0 - tail }
}

/// The `p`-quantile of Student's t with `df` degrees of freedom, for `p` in (0, 1): Newton
/// steps on [`student_t_sf`] from the normal quantile, safeguarded by bisection; to 1e-12.
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    if p.is_nan() || df.is_nan() || df <= 0.0 {
        return f64::NAN;
    }
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    // Bracket the root of F(t) − p, with F(t) = 1 − sf(t), on [0, hi].
    let f = |t: f64| (1.0 - student_t_sf(t, df)) - p;
    let (mut lo, mut hi) = (0.0f64, normal_quantile(p).max(1.0));
    while f(hi) < 0.0 {
        lo = hi;
        hi *= 2.0;
        if hi > 1e300 {
            return f64::INFINITY;
        }
    }
    let mut t = normal_quantile(p).clamp(lo, hi);
    for _ in 0..200 {
        let e = f(t);
        if e.abs() < 1e-15 {
            break;
        }
        if e < 0.0 {
            lo = t;
        } else {
            hi = t;
        }
        // The density of t at t.
        let log_pdf = libm::lgamma((df + 1.0) / 2.0)
            - libm::lgamma(df / 2.0)
            - 0.5 * (df * std::f64::consts::PI).ln()
            - (df + 1.0) / 2.0 * (1.0 + t * t / df).ln();
        let next = t - e / log_pdf.exp();
        t = if next > lo && next < hi {
            next
        } else {
            (lo + hi) / 2.0
        };
        if hi - lo < 1e-12 * hi.max(1.0) {
            break;
        }
    }
    t
}

/// The regularized incomplete beta function I_x(a, b), a, b > 0, x in [0, 1]: Lentz's
/// continued fraction (Numerical Recipes §6.4), on the side where it converges fast.
fn beta_i(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let log_front =
        libm::lgamma(a + b) - libm::lgamma(a) - libm::lgamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        (log_front.exp() * beta_cf(a, b, x) / a).clamp(0.0, 1.0)
    } else {
        (1.0 - log_front.exp() * beta_cf(b, a, 1.0 - x) / b).clamp(0.0, 1.0)
    }
}

/// The continued fraction of the incomplete beta function (modified Lentz: each step folds
/// the coefficient `aa` into `c` and `d` and returns its factor `c·d`).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let away_from_zero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / away_from_zero(1.0 - qab * x / qap);
    let mut h = d;
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 / away_from_zero(1.0 + aa * *d);
        *c = away_from_zero(1.0 + aa / *c);
        *d * *c
    };
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        // The even step, then the odd one.
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d);
        let delta = step(
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
            &mut c,
            &mut d,
        );
        h *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_quantile_inverts_the_cdf() {
        for p in [
            1e-12, 1e-6, 0.001, 0.025, 0.05, 0.3, 0.5, 0.7, 0.975, 0.999_999,
        ] {
            let z = normal_quantile(p);
            assert!(((normal_cdf(z) - p) / p).abs() < 1e-12, "p {p}: z {z}");
        }
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-13);
    }

    #[test]
    fn chi2_matches_closed_forms() {
        // df = 2: Q = e^{-x/2}; df = 1: Q = erfc(sqrt(x/2)).
        for x in [0.01, 0.5, 1.0, 3.0, 10.0, 40.0, 120.0] {
            let two = chi2_sf(x, 2.0);
            assert!(
                ((two - (-x / 2.0f64).exp()) / two).abs() < 1e-12,
                "df 2, x {x}"
            );
            let one = chi2_sf(x, 1.0);
            let want = libm::erfc((x / 2.0f64).sqrt());
            assert!(
                ((one - want) / want).abs() < 1e-10,
                "df 1, x {x}: {one} vs {want}"
            );
        }
    }

    #[test]
    fn student_t_matches_closed_forms() {
        // df = 1 is Cauchy: sf = 1/2 − atan(t)/π; df = 2: sf = (1 − t/√(t²+2)) / 2.
        for t in [-30.0, -2.0, -0.3, 0.0, 0.7, 1.5, 4.0, 60.0] {
            let cauchy = 0.5 - f64::atan(t) / std::f64::consts::PI;
            assert!((student_t_sf(t, 1.0) - cauchy).abs() < 1e-13, "df 1, t {t}");
            let two = 0.5 * (1.0 - t / (t * t + 2.0f64).sqrt());
            assert!((student_t_sf(t, 2.0) - two).abs() < 1e-13, "df 2, t {t}");
        }
        for (p, df) in [
            (0.975, 1.0),
            (0.975, 3.5),
            (0.9, 10.0),
            (0.025, 4.0),
            (0.5, 7.0),
        ] {
            let t = student_t_quantile(p, df);
            assert!(
                (1.0 - student_t_sf(t, df) - p).abs() < 1e-12,
                "p {p}, df {df}: {t}"
            );
        }
        // A large df is the normal.
        assert!((student_t_quantile(0.975, 1e7) - 1.959_964).abs() < 1e-5);
    }
}
