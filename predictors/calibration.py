"""Drift-proof latency predictions: scale a fitted predictor by an anchor re-measured at use time.

Why: the machine a predictor was fitted on does not keep one speed. On a shared CPU the same
sub-network runs 5-10% faster or slower from one run to the next (turbo, neighbours, thermal
state), so a predictor fitted in a slow phase predicts every sub-network too slow later, by the
same factor. One reference sub-network, the *anchor*, is profiled at fit time (its record is in
the training set, its latency stored in the manifest) and measured again, in seconds, whenever
the predictor is used for real decisions (the search, ``nasprune predict --calibrate``). Then::

    calibrated prediction = prediction x (anchor measured now / anchor at fit time)

A uniform speed change of the machine cancels exactly; what remains is the predictor's own
error (interpolation, extrapolation to corners of the space) and the anchor's measurement noise.

Several anchors (``FitConfig.anchors`` / ``nasprune predictor fit --anchors K``): one timing of one
sub-network can be off by more than the drift it is meant to cancel (session 11, a quiet 2-vCPU
VM: the full model's re-timing moved x1.08 / x1.14 / x0.89 at fp32 / int8-pc / int8-mixed while
the sub-networks around it moved -5..+3 % in median, so one anchor made every precision's
predictions worse). With k anchors (the largest, then the profiled sub-networks nearest
(k-1)/k ... 1/k of its parameters) the factor is the *median* of their ratios: one disturbed
timing no longer moves it, a uniform shift still cancels exactly. Measured with k = 3 in a later
run of the same VM it was better at fp32, worse at int8-pc and equal at int8-mixed than one anchor
(the smaller anchors drifted otherwise than the full model: the machine's drift is not uniform
over sizes there), so one anchor stays the default.

Pure core: :func:`anchor_from_records` (chosen at fit time), :func:`scale_factor`,
:func:`calibrate` and :class:`CalibratedPredictor` (take any ``measure(sub, workload) -> ms``).
I/O at the edge: :func:`profile_anchor` measures with the profilers package, on the engine,
precision, threads, export recipe and protocol the anchor was profiled with.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from compressor.core.errors import NaspruneError
from compressor.core.workload import Workload
from compressor.elastic.search_space import SubNetwork

Measure = Callable[[SubNetwork, Workload], float]

# Beyond this the machine is probably not the one the predictor was fitted on (or badly loaded):
# the factor is still applied, with a warning to re-fit.
PLAUSIBLE = (0.5, 2.0)


class CalibrationWarning(UserWarning):
    """The anchor ran implausibly faster/slower than at fit time."""


# ---- pure core --------------------------------------------------------------------------------
def anchor_from_records(records: Sequence[dict]) -> dict:
    """The anchor a predictor stores in its manifest: the sub-network of ``records`` with the most
    parameters among those profiled on the most workloads (the full model when profiled: it is
    always in ``nasprune profile``'s sample), with its fit-time median per workload.

    The largest one because its timing is the least noisy relative to its length and, being the
    user's own alternative, it is the sub-network a later run most likely profiles too.
    """
    if not records:
        raise NaspruneError("no records to choose a calibration anchor from")
    by_arch: dict[SubNetwork, list[dict]] = {}
    for r in records:
        by_arch.setdefault(SubNetwork.from_dict(r["arch"]), []).append(r)
    sub, rs = max(by_arch.items(), key=lambda kv: (len({r["workload"] for r in kv[1]}), kv[1][0]["params"]))
    workloads = {}
    for r in sorted(rs, key=lambda r: r.get("created_at") or ""):  # the latest record per workload wins
        workloads[r["workload"]] = {
            "median_ms": float(r["stats_ms"]["median"]),
            "key": r["key"],
            "created_at": r.get("created_at"),
        }
    return {
        "arch": sub.to_dict(),
        "params": int(rs[0]["params"]),
        "workloads": dict(sorted(workloads.items())),
        "protocol": rs[0].get("protocol"),
        "threads": rs[0].get("threads"),
    }


def anchors_from_records(records: Sequence[dict], k: int = 1) -> list[dict]:
    """``k`` anchors (fewer when fewer sub-networks were profiled): :func:`anchor_from_records`'s first,
    then among the sub-networks profiled on as many workloads the ones nearest ``(k-1)/k ... 1/k`` of its
    parameter count (mid-sized: timed in a fraction of the full model's seconds, long enough that fixed
    per-call overheads do not dominate their noise)."""
    first = anchor_from_records(records)
    by_arch: dict[SubNetwork, list[dict]] = {}
    for r in records:
        by_arch.setdefault(SubNetwork.from_dict(r["arch"]), []).append(r)
    n_workloads = len(first["workloads"])
    pool = {s: rs for s, rs in by_arch.items() if len({r["workload"] for r in rs}) == n_workloads}
    pool.pop(SubNetwork.from_dict(first["arch"]), None)
    chosen = [first]
    for j in range(1, k):
        if not pool:
            break
        target = first["params"] * (k - j) / k
        sub = min(pool, key=lambda s: (abs(pool[s][0]["params"] - target), str(s)))
        chosen.append(anchor_from_records(pool.pop(sub)))
    return chosen


def scale_factor(now_ms: float, fit_ms: float) -> float:
    """Machine speed now relative to fit time: > 1 when slower now, < 1 when faster."""
    now_ms, fit_ms = float(now_ms), float(fit_ms)
    if not (np.isfinite(now_ms) and now_ms > 0 and np.isfinite(fit_ms) and fit_ms > 0):
        raise NaspruneError(f"anchor latencies must be positive, got {now_ms} ms now and {fit_ms} ms at fit time")
    return now_ms / fit_ms


@dataclass(frozen=True)
class Calibration:
    """One workload's anchor measurement and the factor every prediction of that workload gets."""

    workload: str
    anchor: dict  # arch of the first anchor (the largest)
    fit_ms: float
    fit_source: str  # "measured" (the anchor's training record) or "predicted" (no record for this workload)
    now_ms: float
    factor: float  # the median of the anchors' now / fit ratios
    seconds: float  # what the anchor measurements cost
    # every anchor measured: [{"arch", "fit_ms", "now_ms", "ratio"}]; the first is the one above
    anchors: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibratedPredictor:
    """A :class:`~predictors.predictor.LatencyPredictor` whose predictions are scaled per workload.

    Everything but :meth:`predict_ms` (ranges, group, manifest, compatibility) is the base
    predictor's; only workloads that were calibrated can be predicted (another one would need its
    own anchor measurement, not a borrowed factor).
    """

    base: object
    calibrations: dict[str, Calibration]

    def predict_ms(self, subs: Sequence[SubNetwork], workload: Workload, quantile: str = "median") -> np.ndarray:
        c = self.calibrations.get(str(workload))
        if c is None:
            raise NaspruneError(
                f"the predictor was calibrated for {', '.join(self.calibrations)}, not {workload}; calibrate for it"
            )
        return np.asarray(self.base.predict_ms(subs, workload, quantile=quantile)) * c.factor

    def metadata(self) -> dict:
        """What a search/bundle records about the calibration (per workload)."""
        return {w: c.to_dict() for w, c in self.calibrations.items()}

    def __getattr__(self, name):
        if name in ("base", "calibrations"):  # not set yet (copy/unpickle): no recursion into base
            raise AttributeError(name)
        return getattr(self.base, name)


def stored_anchor(predictor) -> dict:
    """The (first) anchor in the predictor's manifest; predictors fitted before anchors existed have none."""
    anchor = predictor.manifest.get("anchor")
    if not anchor:
        raise NaspruneError(
            "this predictor has no calibration anchor (fitted by an older nasprune); re-fit it "
            "(nasprune predictor fit ...) or run without --calibrate"
        )
    return anchor


def stored_anchors(predictor) -> list[dict]:
    """Every anchor in the manifest, the first first; a predictor fitted with one anchor has that one."""
    first = stored_anchor(predictor)
    return list(predictor.manifest.get("anchors") or [first])


def calibrate(predictor, workloads: Sequence[Workload | str], measure: Measure) -> CalibratedPredictor:
    """Measure the stored anchors on each workload with ``measure`` and scale the predictor by the
    median of their ratios.

    The fit-time latency is an anchor's training record for that workload; for a workload the first
    anchor was not profiled on it is the predictor's own (deterministic) prediction of it; other
    anchors without a record for the workload are not measured there.
    """
    anchors = stored_anchors(predictor)
    out = {}
    for w in workloads:
        w = w if isinstance(w, Workload) else Workload.parse(str(w))
        start = time.perf_counter()
        measured = []
        for i, anchor in enumerate(anchors):
            sub = SubNetwork.from_dict(anchor["arch"])
            stored = anchor["workloads"].get(str(w))
            if stored is not None:
                fit_ms, source = float(stored["median_ms"]), "measured"
            elif i == 0:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fit_ms, source = float(predictor.predict_ms([sub], w)[0]), "predicted"
            else:
                continue
            now_ms = float(measure(sub, w))
            measured.append(
                {"arch": sub.to_dict(), "fit_ms": fit_ms, "now_ms": now_ms, "ratio": scale_factor(now_ms, fit_ms)}
            )
            if i == 0:
                first_source = source
        seconds = time.perf_counter() - start
        factor = float(np.median([m["ratio"] for m in measured]))
        if not PLAUSIBLE[0] <= factor <= PLAUSIBLE[1]:
            warnings.warn(
                f"the anchors ran x{factor:.2f} their fit-time latency on {w} (median of {len(measured)}; the first, "
                f"{SubNetwork.from_dict(measured[0]['arch'])}, {measured[0]['now_ms']:.2f} ms now vs "
                f"{measured[0]['fit_ms']:.2f} ms); is this the machine the predictor was fitted on? Re-fit it if the "
                "setup changed",
                CalibrationWarning,
                stacklevel=2,
            )
        head = measured[0]
        out[str(w)] = Calibration(
            str(w), head["arch"], head["fit_ms"], first_source, head["now_ms"], factor, seconds, tuple(measured)
        )
    return CalibratedPredictor(predictor, out)


# ---- I/O edge: measuring the anchor with the profilers package ------------------------------
def profile_anchor(loaded, predictor, progress: bool = False) -> Measure:
    """``measure(sub, workload)`` that profiles ``sub`` of ``loaded`` the way the predictor's records
    were profiled (engine, device, provider, precision, threads, exporter, protocol), stores
    nothing, and refuses a measurement from another device setup (other fingerprint id)."""
    from profilers.api import make_plan, profile_subnetworks
    from profilers.standalone import Protocol

    m, group = predictor.manifest, predictor.group
    anchor = stored_anchor(predictor)
    known = set(Protocol.__dataclass_fields__)
    protocol = Protocol.from_dict({k: v for k, v in (anchor.get("protocol") or {}).items() if k in known})
    protocol.lock_path = None  # this machine's default lock
    setup = dict(
        engine=group["engine"],
        device=m.get("device") or "cpu",
        precision=group["precision"],
        threads=int(anchor.get("threads") or m.get("fingerprint", {}).get("threads") or 1),
        exporter=m.get("export_recipe", {}).get("exporter", "torchscript"),
        provider=m.get("provider") if group["engine"] == "onnxruntime" else None,
    )
    plan = make_plan(loaded, list(anchor["workloads"]) or ["prefill:1x1"], **setup)
    _same_setup(plan.fingerprint_id, plan.recipe_id, group)  # before any measuring: fail in seconds

    def measure(sub: SubNetwork, w: Workload) -> float:
        (record,) = profile_subnetworks(loaded, [sub], [w], store=None, progress=progress, protocol=protocol, **setup)
        _same_setup(record["fingerprint_id"], record["recipe_id"], group)
        if record.get("env", {}).get("drifted"):
            warnings.warn(
                f"the machine looked disturbed while the anchor {sub} {w} was measured (load or reference-kernel "
                "speed moved); the calibration factor may be off",
                CalibrationWarning,
                stacklevel=2,
            )
        return float(record["stats_ms"]["median"])

    return measure


def _same_setup(fingerprint_id: str, recipe_id: str, group: dict) -> None:
    if fingerprint_id != group["fingerprint_id"] or recipe_id != group["recipe_id"]:
        raise NaspruneError(
            f"the anchor would be measured on another setup (fingerprint {fingerprint_id}, recipe {recipe_id}) than "
            f"the predictor's ({group['fingerprint_id']}, {group['recipe_id']}); calibration corrects the drift of "
            "one machine, not a change of machine: re-fit the predictor here"
        )


def calibrate_if(predictor, loaded, workloads: Sequence[Workload | str], enabled: bool, log=None):
    """``(predictor, metadata)``: calibrated by profiling the anchor when ``enabled``, else as is
    with ``None`` (so a caller wraps its predictor in one line and records the metadata)."""
    if not enabled:
        return predictor, None
    calibrated = calibrate(predictor, workloads, profile_anchor(loaded, predictor))
    if log is not None:
        for c in calibrated.calibrations.values():
            ratios = ", ".join(f"{a['ratio']:.3f}" for a in c.anchors)
            log(
                f"  calibration: anchor {SubNetwork.from_dict(c.anchor)} {c.workload} {c.now_ms:.2f} ms now vs "
                f"{c.fit_ms:.2f} ms at fit ({c.fit_source}): predictions x{c.factor:.3f} (median of "
                f"{len(c.anchors) or 1} anchor ratios: {ratios}; "
                f"{c.seconds:.0f} s)"
            )
    return calibrated, calibrated.metadata()
