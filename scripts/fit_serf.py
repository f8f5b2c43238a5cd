"""Regenerate the polynomial fits of serf's erf(softplus(x)) in csrc/cpu/vec_math.h.

    python scripts/fit_serf.py

With e = e^x (x < 0) or e^(-x^2) (x >= 0): erf(softplus(x)) = e H(e) | 1 - e R(x) and its
derivative e G(e) | e K(x) (G in e - 1/2). Each polynomial is a discrete minimax fit (Lawson's
iteratively reweighted least squares on a dense grid) of an mpmath reference; its coefficients are
then fixed to float32 from the highest degree down, the lower ones refitted each time, and the
error printed is the float32 Horner evaluation's (an exact fma per step). Prints the coefficient
lists highest degree first, as vec_math.h's horner() takes them. Needs numpy and mpmath.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 30
TWO_OVER_SQRT_PI = 2 / mp.sqrt(mp.pi)


def softplus(x):
    return x + mp.log1p(mp.exp(-x))


def minimax(t, f, weight, degree, iterations=3000):
    """Coefficients c_0..c_degree of sum c_k t^k minimizing max |weight (p - f)| on the grid."""
    basis = np.vander(t, degree + 1, increasing=True)
    lawson = np.full(len(t), 1.0 / len(t))
    for _ in range(iterations):
        w = np.sqrt(lawson) * weight
        coef, *_ = np.linalg.lstsq(w[:, None] * basis, w * f, rcond=None)
        lawson *= np.abs(weight * (basis @ coef - f))
        lawson /= lawson.sum()
    return coef


def horner_float32(coef, t):
    p = np.full(t.shape, np.float64(coef[-1]))
    for c in coef[-2::-1]:  # float32 operands: the float64 product is exact, one rounding each
        p = (p * t + np.float64(c)).astype(np.float32).astype(np.float64)
    return p


def fit_float32(t, f, weight, degree):
    fixed: dict[int, np.float32] = {}
    coef = minimax(t, f, weight, degree)
    for k in range(degree, -1, -1):
        fixed[k] = np.float32(coef[k])
        if k:
            rest = f - sum(float(c) * t**j for j, c in fixed.items())
            coef = minimax(t, rest, weight, k - 1)
    coef32 = np.array([fixed[k] for k in range(degree + 1)], dtype=np.float32)
    error = np.max(np.abs(weight * (horner_float32(coef32, t) - f)))
    return coef32, error


def targets():
    """(name, variable t, reference f, weight, shift of t) per polynomial."""
    u = np.linspace(0.0, 1.0, 2001)
    u[0] = 1e-9
    x4, x45 = np.linspace(0.0, 4.0, 2001), np.linspace(0.0, 4.5, 2251)
    h = np.array([float(mp.erf(mp.log1p(v)) / v) for v in map(mp.mpf, u)])
    g = np.array([float(TWO_OVER_SQRT_PI * mp.exp(-mp.log1p(v) ** 2) / (1 + v))
                  for v in map(mp.mpf, u)])
    r = np.array([float(mp.erfc(softplus(v)) * mp.exp(v * v)) for v in map(mp.mpf, x4)])
    k = np.array([float(TWO_OVER_SQRT_PI * mp.exp(v * v - softplus(v) ** 2) / (1 + mp.exp(-v)))
                  for v in map(mp.mpf, x45)])
    return [("H", u, h, 1 / h, 0.0), ("R", x4, r, np.exp(-x4**2), 0.0),
            ("G", u, g, 1 / g, 0.5), ("K", x45, k, np.maximum(1, x45) * np.exp(-x45**2), 0.0)]


DEGREES = {"kFull": {"H": 8, "R": 11, "G": 9, "K": 10},
           "kBFloat16": {"H": 6, "R": 7, "G": 7, "K": 6}}

if __name__ == "__main__":
    fits = targets()
    for precision, degrees in DEGREES.items():
        for name, t, f, weight, shift in fits:
            coef, error = fit_float32(t - shift, f, weight, degrees[name])
            print(f"{precision} {name}: degree {degrees[name]}, error {error:.2g}")
            print("  " + ", ".join(f"{float(c):.9e}f" for c in coef[::-1]))
