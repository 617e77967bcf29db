"""Parity metrics between an engine's output (``actual``, a) and a reference (``reference``, b), with gates.

All metrics are computed in float64 over elements where both arrays are finite. With e = a − b:

- ``max_abs``   = max |e|
- ``mean_abs``  = mean |e|
- ``p99_abs``   = 99th percentile of |e| (numpy's linear interpolation)
- ``max_rel``   = max |e| / (|b| + eps), ``eps`` = :data:`REL_EPS` (1e-6: keeps elements where b is ~0 finite;
  report-only, it is not a gate, since near-zero references make it large whatever the engine does)
- ``cosine``    = Σ a·b / (‖a‖·‖b‖) over the flattened arrays (1 when both are all zero, 0 when only one is)
- ``sqnr_db``   = 10·log10(Σ b² / Σ e²): signal-to-quantization-noise ratio in dB (``inf`` when e = 0)
- ``nan_count``, ``inf_count``: non-finite elements of ``actual`` (those of ``reference`` are reported as
  ``ref_nan_count``/``ref_inf_count``). Any NaN or Inf in either array fails.
- ``elementwise_fail_fraction``: Polygraphy's elementwise check: an element fails only where BOTH
  |e| > ``atol`` AND |e| / (|b| + eps) > ``rtol``.

A comparison passes when: every element is finite, shapes match, the elementwise fail fraction is at most
``max_fail_fraction`` (0: Polygraphy's default), ``cosine >= min_cosine`` and ``sqnr_db >= min_sqnr_db``.

Apart from :func:`compare`, :func:`relative_l2` is the relative error ``‖a − b‖ / ‖b‖`` over all elements (NaN in,
NaN out) that the ε-error and trajectory metrics of :mod:`slimexport.verify.parity` and
:mod:`slimexport.verify.quality` report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from slimexport.errors import ConfigError, UsageError

REL_EPS = 1e-6
P99 = 99.0
# Floor of the reference norm in relative_l2: an all-zero reference gives a large finite error, not a division by 0.
REL_L2_FLOOR = 1e-12


@dataclass(frozen=True)
class Tolerance:
    """Gate thresholds for one output.

    Attributes:
        atol, rtol: Polygraphy-style elementwise check (an element fails only where |e| > atol AND rel > rtol).
        min_cosine: smallest accepted cosine similarity.
        min_sqnr_db: smallest accepted SQNR in dB (``None``: not gated).
        max_fail_fraction: largest accepted fraction of elements failing the elementwise check.
    """

    atol: float
    rtol: float
    min_cosine: float
    min_sqnr_db: float | None = None
    max_fail_fraction: float = 0.0

    def __post_init__(self):
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError("Tolerance", name, v, "a finite number >= 0")
        if not (isinstance(self.min_cosine, (int, float)) and -1 <= self.min_cosine <= 1):
            raise ConfigError("Tolerance", "min_cosine", self.min_cosine, "a number in [-1, 1]")
        if self.min_sqnr_db is not None and not (isinstance(self.min_sqnr_db, (int, float)) and math.isfinite(self.min_sqnr_db)):
            raise ConfigError("Tolerance", "min_sqnr_db", self.min_sqnr_db, "None or a finite number (dB)")
        if not (isinstance(self.max_fail_fraction, (int, float)) and 0 <= self.max_fail_fraction <= 1):
            raise ConfigError("Tolerance", "max_fail_fraction", self.max_fail_fraction, "a number in [0, 1]")

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerance:
        """The default gate for an engine computing in ``dtype`` (``fp32``, ``fp16``, ``bf16``), against an
        fp32 reference."""
        if dtype not in DEFAULT_TOLERANCES:
            raise UsageError(f"no default tolerance for dtype {dtype!r}", f"use one of {', '.join(DEFAULT_TOLERANCES)}")
        return DEFAULT_TOLERANCES[dtype]

    def to_dict(self) -> dict:
        return asdict(self)


# fp32: export parity is fp32 rounding noise: ~1e-6 relative per op, ~1e-5 after the UNet's ~100 layers.
# fp16: unit roundoff 4.9e-4 (2**-11); errors compound through the network to ~1e-3..1e-2 of the output scale
# (AITemplate gates its fp16 UNet at atol=rtol=0.1; we are tighter). SQNR 30 dB = error RMS 3% of signal RMS.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.9999, min_sqnr_db=60.0),
    "fp16": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.9995, min_sqnr_db=30.0),
    "bf16": Tolerance(atol=1e-1, rtol=1e-1, min_cosine=0.998, min_sqnr_db=24.0),
}



def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, any dtype or device
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_l2(actual, reference) -> float:
    """The relative error ``‖a − b‖ / ‖b‖`` over all elements (Frobenius norms), in float64.

    The one formula of every relative error in slimexport: ε error of a slim UNet per timestep, final-latent
    error of a trajectory, the quality harness's columns.

    Args:
        actual: a, a numpy array or torch tensor (any float dtype, any device).
        reference: b, the same shape.

    Returns:
        The error as a Python float; NaN when either holds a NaN; ``‖b‖`` is floored at :data:`REL_L2_FLOOR`.
    """
    a, b = _float64(actual), _float64(reference)
    if a.shape != b.shape:
        raise UsageError(f"relative_l2 of shape {list(a.shape)} against reference {list(b.shape)}",
                         "compare outputs of the same shape")
    return float(np.linalg.norm((a - b).ravel()) / max(float(np.linalg.norm(b.ravel())), REL_L2_FLOOR))


def compare(actual: np.ndarray, reference: np.ndarray, tol: Tolerance | str = "fp32") -> dict:
    """Parity metrics of ``actual`` against ``reference`` and the gate's verdict (formulas: module docstring).

    Args:
        actual: engine output, any float dtype. reference: the reference output (usually fp32 PyTorch).
        tol: a :class:`Tolerance` or a dtype name for :meth:`Tolerance.for_dtype`.

    Returns:
        ``{"max_abs", "max_rel", "p99_abs", "mean_abs", "cosine", "sqnr_db", "nan_count", "inf_count",
        "ref_nan_count", "ref_inf_count", "elementwise_fail_fraction", "numel", "shape", "passed", "failed",
        "reason", "tolerance"}``; ``failed`` lists the criteria that failed (``shape``, ``finite``, ``elementwise``,
        ``cosine``, ``sqnr_db``) and ``reason`` says why in one line (``None`` when passed).
    """
    if isinstance(tol, str):
        tol = Tolerance.for_dtype(tol)
    a = np.asarray(actual)
    b = np.asarray(reference)
    out: dict = {"shape": list(a.shape), "numel": int(a.size), "tolerance": tol.to_dict()}
    if a.shape != b.shape:
        out.update(passed=False, failed=["shape"], reason=f"shape {list(a.shape)} differs from reference {list(b.shape)}")
        return out
    a = a.astype(np.float64, copy=False).ravel()
    b = b.astype(np.float64, copy=False).ravel()
    fa, fb = np.isfinite(a), np.isfinite(b)
    out.update(nan_count=int(np.isnan(a).sum()), inf_count=int(np.isinf(a).sum()),
               ref_nan_count=int(np.isnan(b).sum()), ref_inf_count=int(np.isinf(b).sum()))
    both = fa & fb
    if not both.all():
        a, b = a[both], b[both]
    e = np.abs(a - b)
    if a.size:
        rel = e / (np.abs(b) + REL_EPS)
        na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
        if na == 0.0 and nb == 0.0:
            cosine = 1.0
        elif na == 0.0 or nb == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.dot(a, b) / (na * nb))
        noise, signal = float(np.sum(e * e)), float(np.sum(b * b))
        sqnr = math.inf if noise == 0.0 else (-math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise))
        fail_frac = float(np.mean((e > tol.atol) & (rel > tol.rtol)))
        out.update(max_abs=float(e.max()), max_rel=float(rel.max()), p99_abs=float(np.percentile(e, P99)),
                   mean_abs=float(e.mean()), cosine=cosine, sqnr_db=sqnr, elementwise_fail_fraction=fail_frac)
    else:
        out.update(max_abs=None, max_rel=None, p99_abs=None, mean_abs=None, cosine=None, sqnr_db=None,
                   elementwise_fail_fraction=None)

    failed, reasons = [], []
    if out["numel"] == 0:
        failed.append("empty")
        reasons.append("the output is empty: nothing to compare")
    nonfinite = out["nan_count"] + out["inf_count"] + out["ref_nan_count"] + out["ref_inf_count"]
    if nonfinite:
        failed.append("finite")
        reasons.append(f"{out['nan_count']} NaN and {out['inf_count']} Inf in the output"
                       + (f", {out['ref_nan_count']} NaN and {out['ref_inf_count']} Inf in the reference"
                          if out["ref_nan_count"] + out["ref_inf_count"] else ""))
    if a.size:
        if out["elementwise_fail_fraction"] > tol.max_fail_fraction:
            failed.append("elementwise")
            reasons.append(f"{out['elementwise_fail_fraction']:.3g} of elements exceed both atol={tol.atol:g} and "
                           f"rtol={tol.rtol:g} (max abs {out['max_abs']:.3g})")
        if out["cosine"] < tol.min_cosine:
            failed.append("cosine")
            reasons.append(f"cosine {out['cosine']:.6f} < {tol.min_cosine}")
        if tol.min_sqnr_db is not None and out["sqnr_db"] < tol.min_sqnr_db:
            failed.append("sqnr_db")
            reasons.append(f"SQNR {out['sqnr_db']:.1f} dB < {tol.min_sqnr_db:g} dB")
    out["passed"] = not failed
    out["failed"] = failed
    out["reason"] = "; ".join(reasons) if reasons else None
    return out


def compare_outputs(actual: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                    tol: Tolerance | str = "fp32") -> dict:
    """:func:`compare` for every output of ``reference``: ``{"outputs": {name: metrics}, "passed", "failed"}``,
    where ``failed`` names the outputs that failed (a missing output fails)."""
    results, failed = {}, []
    for name, ref in reference.items():
        if name not in actual:
            results[name] = {"passed": False, "failed": ["missing"], "reason": f"output {name} is missing"}
        else:
            results[name] = compare(actual[name], ref, tol)
        if not results[name]["passed"]:
            failed.append(name)
    return {"outputs": results, "passed": not failed, "failed": failed}
