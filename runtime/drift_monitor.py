"""Drift monitoring: is the served stream still what the guard was calibrated on?

Two sequential tests follow the stream of verdicts, one verdict at a time, and raise one flag
(theory, choices and measured detection delays: ``docs/drift.md``):

1. **Rejection rate** — a one-sided Bernoulli CUSUM (Page 1954) of the guard's rejections: the
   log-likelihood ratio of a rate ``p1 = 2 p0`` (at most ``(1 + p0) / 2``) against the in-control rate ``p0``. Under the
   calibrated policy the conformal cut makes the false-rejection rate *of this bundle* (given its
   calibration set of ``n`` conformal images) a draw from ``Beta(k + 1, n - k)``,
   ``k + 1 = floor(alpha (n + 1))``: at most alpha on average, but one bundle's own rate can sit
   above alpha by chance (about ±1 point at n = 500, ±2 at n = 135). ``p0`` is that distribution's
   upper ``1 - CALIBRATION_CONFIDENCE`` quantile (:func:`calibrated_rate_bound`), so an honest bundle
   on exchangeable data is in control. Each check's rejections get the same CUSUM, for diagnosis: a
   check fires only when the verdict is a rejection, so its statistic never exceeds the overall one
   and costs no false alarms of its own.
2. **Score shift** — the *monitored statistic* of each verdict, ``m = k · min_i p_i`` over the ``k``
   enforced checks' p-values (0 for a garbage-class argmax), is ranked among the calibration's conformal
   part's and *every earlier score of the stream*. While calibration and stream are exchangeable these
   online conformal p-values are independent and (conservatively) uniform (Vovk, Gammerman & Shafer,
   *Algorithmic Learning in a Random World*, 2005, ch. 7), so ``log f(u)`` with the power calibrator
   ``f(u) = kappa u^(kappa - 1)`` is the log of a test-martingale factor, and its CUSUM is the
   score-shift statistic. It sees a stream whose scores are all a little less typical than
   calibration, not only the rejections. Why every check at equal weight and not the decision's
   statistic (``combined_p = min_i p_i / w_i``): the decision's weights are chosen for ranking
   off-distribution inputs and give most of the budget to one check, so a shift in what the other
   checks see (the model looking at other places: the attention check) would barely move it; drift is
   about any check leaving its calibrated distribution. The rejection-rate CUSUM above follows the
   decisions themselves.

Why a CUSUM and not a windowed exact binomial test: the CUSUM's false-alarm probability has a
closed-form bound for any horizon and it needs no window: it accumulates a small excess over as many
verdicts as it takes and forgets an in-control past (it restarts at 0). Overlapping windows are many
correlated tests whose family-wise error has to be simulated, and the window length fixes the
smallest drift they can see.

False alarms: a CUSUM is a sequence of excursions from 0. While the stream is in control, ``e^S`` of
an excursion is a non-negative (super)martingale (the increments are log-likelihood ratios and log
e-values), so an excursion that has reached ``S = V`` goes on to reach ``h`` with probability at most
``e^(V - h)`` (optional stopping, as in Ville's inequality). Hence the expected number of excursions
that reach ``h`` within ``T`` verdicts — a bound on the false-alarm probability — is at most
``e^-h · E[sum_k e^(V_k)]``, the sum over the excursions that pass a low level (``TAIL_START``) within
``T`` verdicts, ``V_k`` the value at which each passes it. That expectation depends only on ``p0`` (the
rate CUSUM) and ``kappa`` (the score CUSUM on uniform online p-values), and is estimated by a seeded
simulation of in-control streams (:func:`alarm_threshold`, upper 3-sigma bound of the estimate; well
under a second at the defaults, cached): ``h = log((A_rate + A_score) / false_alarm)``. The plain union
bound ``h = log(2 T / false_alarm)`` (each of the ``T`` start points exceeds ``e^h`` with probability at
most ``e^-h``) is also valid; the threshold is the smaller of the two. The union bound ignores that
in-control excursions are short and rarely climb, and sits about 4 above the simulated one. The
defaults (T = 10,000 verdicts, false_alarm = 0.005, plus CALIBRATION_CONFIDENCE = 0.005 for the rate
bound) keep the flag down on in-distribution traffic with probability at least 99 % over 10,000
verdicts (``scripts/drift_false_alarm.py`` checks the rate by brute-force simulation).
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from .checks.combine import EQUAL, REASON_OF_CHECK, combined_statistic

CALIBRATION_CONFIDENCE = 0.005  # chance that a bundle's own false-rejection rate exceeds the rate bound
DEFAULT_HORIZON = 10_000  # verdicts the false-alarm guarantee covers
DEFAULT_FALSE_ALARM = 0.005  # family-wise false-alarm probability of both CUSUMs over that horizon
# power calibrator f(u) = kappa u^(kappa - 1): in control each verdict costs log(kappa) + 1 - kappa = -0.057
# on average, the most atypical verdict of n = 500 gains log(kappa) + (1 - kappa) log(501) = 1.5. Closer to 1
# than the usual 0.5 because field drift tends to shift every image a little rather than a few a lot.
KAPPA = 0.7
N_STATISTICS = 2  # rejection-rate CUSUM + score-shift CUSUM share the false-alarm budget


def calibrated_rate_bound(alpha: float, n_conformal: int, confidence: float = CALIBRATION_CONFIDENCE) -> float:
    """Upper ``1 - confidence`` quantile of a bundle's own in-distribution false-rejection rate.

    The split-conformal cut rejects ``s < s_(k+1)`` with ``k + 1 = floor(alpha (n + 1))``; for a
    continuous score the rate ``F(s_(k+1))`` of one calibration set is ``Beta(k + 1, n - k)``."""
    from scipy.stats import beta

    k1 = int(math.floor(alpha * (n_conformal + 1) + 1e-9))
    if k1 < 1:
        return 0.0  # the cut never rejects
    return float(beta.ppf(1.0 - confidence, k1, n_conformal + 1 - k1))


def binomial_rate_bound(rate: float, n: int, confidence: float = CALIBRATION_CONFIDENCE) -> float:
    """Clopper-Pearson upper ``1 - confidence`` bound of a rate measured as ``rate`` on ``n`` images."""
    from scipy.stats import beta

    x = int(round(rate * n))
    return 1.0 if x >= n else float(beta.ppf(1.0 - confidence, x + 1, n - x))


TAIL_START = 3.0  # level at which the simulation records an excursion's passage (see the module docstring)
_SIMULATION_STEPS = 2_560_000  # streams x horizon simulated per statistic (at least 32 streams)
_SIMULATION_SEED = 20261130


def union_bound_threshold(
    horizon: int = DEFAULT_HORIZON, false_alarm: float = DEFAULT_FALSE_ALARM, n_statistics: int = N_STATISTICS
) -> float:
    """``h = log(n_statistics · horizon / false_alarm)``: Ville's inequality at each start point, union bound."""
    return math.log(n_statistics * horizon / false_alarm)


def excursion_tail_mass(draw, horizon: int, streams: int, start: float = TAIL_START) -> float:
    """Mean over ``streams`` simulated CUSUMs of ``horizon`` steps (increments ``draw(streams)``) of
    ``sum_k e^(V_k)`` over the excursions passing ``start`` (``V_k``: the value at the passage), plus three
    standard errors of that mean (an upper bound of the expectation but for Monte Carlo odds of about
    0.1 %). ``e^-h`` times it bounds the expected number of excursions reaching ``h >= start`` when
    ``e^S`` is a supermartingale within an excursion."""
    s = np.zeros(streams)
    armed = np.ones(streams, bool)  # no passage yet in the current excursion
    mass = np.zeros(streams)
    for _ in range(horizon):
        s = np.maximum(0.0, s + draw(streams))
        passed = armed & (s >= start)
        if passed.any():
            mass[passed] += np.exp(s[passed])
            armed &= ~passed
        armed |= s == 0.0
    return float(mass.mean() + 3.0 * mass.std(ddof=1) / math.sqrt(streams))


def _streams(horizon: int) -> int:
    return max(32, _SIMULATION_STEPS // max(int(horizon), 1))


@functools.lru_cache(maxsize=64)
def _rate_tail_mass(p0: float, p1: float, horizon: int) -> float:
    rng = np.random.default_rng(_SIMULATION_SEED)
    up, down = bernoulli_llr(True, p0, p1), bernoulli_llr(False, p0, p1)
    return excursion_tail_mass(lambda k: np.where(rng.random(k) < p0, up, down), horizon, _streams(horizon))


@functools.lru_cache(maxsize=16)
def _score_tail_mass(kappa: float, horizon: int) -> float:
    rng = np.random.default_rng(_SIMULATION_SEED + 1)
    log_kappa = math.log(kappa)
    # u uniform (the conservative online p-values are larger, so their CUSUM is smaller path by path)
    return excursion_tail_mass(
        lambda k: log_kappa + (kappa - 1.0) * np.log1p(-rng.random(k)), horizon, _streams(horizon)
    )


def alarm_threshold(
    reference_rate: float,
    alternative_rate: float,
    horizon: int = DEFAULT_HORIZON,
    false_alarm: float = DEFAULT_FALSE_ALARM,
    kappa: float = KAPPA,
) -> float:
    """CUSUM threshold ``h`` shared by both statistics with ``P(any false alarm within horizon) <=
    false_alarm`` in control (rejections at most at ``reference_rate``, exchangeable scores): the smaller
    of the simulated excursion bound and the union bound (module docstring)."""
    mass = _rate_tail_mass(round(float(reference_rate), 12), round(float(alternative_rate), 12), int(horizon))
    mass += _score_tail_mass(float(kappa), int(horizon))
    simulated = max(math.log(mass / false_alarm), TAIL_START)  # below TAIL_START: mass e^-start <= false_alarm
    return min(simulated, union_bound_threshold(horizon, false_alarm))


def bernoulli_llr(rejected: bool, p0: float, p1: float) -> float:
    """Log-likelihood ratio of one 0/1 observation under Bernoulli(p1) against Bernoulli(p0)."""
    return math.log(p1 / p0) if rejected else math.log((1.0 - p1) / (1.0 - p0))


def power_calibrator_log(u: float, kappa: float = KAPPA) -> float:
    """``log f(u)``, ``f(u) = kappa u^(kappa-1)``: an e-value for a (super-)uniform p-value ``u``
    (``E f(U) = 1`` for uniform ``U``; small ``u``, large evidence)."""
    return math.log(kappa) + (kappa - 1.0) * math.log(u)


def online_conformal_pvalue(bag: list, s: float) -> float:
    """Insert ``s`` into the sorted list ``bag`` (reference scores and the stream so far) and return
    its conservative rank p-value ``#{x in bag: x <= s} / len(bag)``. Small = less typical."""
    bisect.insort(bag, s)
    return bisect.bisect_right(bag, s) / len(bag)


def online_conformal_pvalues(reference, stream) -> np.ndarray:
    """:func:`online_conformal_pvalue` of each stream score in turn (a fresh bag from ``reference``)."""
    bag = sorted(float(x) for x in np.asarray(reference, np.float64))
    return np.array([online_conformal_pvalue(bag, float(s)) for s in np.asarray(stream, np.float64)])


# ------------------------------------------------------------------------------------ the monitor

WINDOW = 200  # verdicts in the rolling (descriptive) rejection rate
SKIPPED_REASONS = frozenset({"INVALID_INPUT", "GUARD_ERROR"})  # faults, not decisions of the calibrated checks


def monitored_weights(checks) -> dict[str, float]:
    """The enforced ``checks``' weights in the monitored statistic: all equal (:data:`EQUAL`)."""
    return EQUAL.for_checks("+".join(checks))


def monitored_statistic(scores: dict, weights: dict[str, float]) -> float | None:
    """The score-shift CUSUM's statistic of one verdict: ``min_i p_i / w_i = k · min_i p_i`` over the
    ``k`` enforced checks (``weights``: :func:`monitored_weights`; ``scores["<check>.p"]``), and 0 when
    the garbage check is enforced and the argmax is the garbage class (``garbage_margin > 0``) — the
    quantity, computed the same way, that :func:`monitored_statistics` gives the calibration. None when
    a score is missing."""
    try:
        if "garbage" in weights and float(scores["garbage_margin"]) > 0:
            return 0.0
        return min(float(scores[f"{c}.p"]) / w for c, w in weights.items())
    except (KeyError, TypeError, ValueError):
        return None


def monitored_statistics(calibration, checks: str) -> np.ndarray:
    """:func:`monitored_statistic` of the calibration's conformal part:
    :func:`~gamguard.runtime.checks.combine.combined_statistic` with :data:`EQUAL` weights."""
    return np.asarray(combined_statistic(calibration.conformal_pvalues, checks, EQUAL), np.float64)


@dataclass(frozen=True)
class DriftReference:
    """What the monitor compares the stream with, all from the bundle's calibration."""

    alpha: float
    policy: str
    checks: tuple[str, ...]  # enforced checks
    conformal_stats: np.ndarray  # monitored statistic of the calibration's conformal part (any order)
    reference_rate: float  # p0: the in-control rejection rate (an upper bound of the bundle's own)
    calibrated_per_check: dict  # the bundle's measured (cross-fitted) per-check rates, for display
    horizon: int = DEFAULT_HORIZON
    false_alarm: float = DEFAULT_FALSE_ALARM

    @property
    def alternative_rate(self) -> float:
        return min(2.0 * self.reference_rate, 0.5 * (1.0 + self.reference_rate))

    @functools.cached_property
    def threshold(self) -> float:
        return alarm_threshold(self.reference_rate, self.alternative_rate, self.horizon, self.false_alarm)

    @classmethod
    def from_calibration(
        cls,
        manifest: dict,
        calibration,
        *,
        policy: str,
        checks: str,
        horizon: int = DEFAULT_HORIZON,
        false_alarm: float = DEFAULT_FALSE_ALARM,
    ) -> "DriftReference":
        """From a bundle's manifest and its loaded :class:`CalibrationData`, for the policy and
        enforced-checks key the guard serves with."""
        cal = manifest.get("calibration") or {}
        alpha = float(calibration.alpha)
        stats = monitored_statistics(calibration, checks)
        measured = ((cal.get("measured_by_checks") or {}).get(checks) or {}).get(policy) or {}
        if policy == "calibrated":
            p0 = calibrated_rate_bound(alpha, stats.size)
        else:  # strict: no conformal bound; the cross-fitted rate measured on the held-out part
            split = cal.get("split") or {}
            n_held = int(split.get("null", 0)) + int(split.get("conformal", 0))
            if "false_rejection_rate" not in measured or n_held <= 0:
                raise ValueError(f"the bundle records no measured {policy} false-rejection rate for {checks}")
            p0 = binomial_rate_bound(float(measured["false_rejection_rate"]), n_held)
        return cls(
            alpha=alpha,
            policy=policy,
            checks=tuple(checks.split("+")),
            conformal_stats=stats,
            reference_rate=min(max(p0, 1e-6), 0.99),  # the CUSUM needs 0 < p0 < p1 < 1
            calibrated_per_check=dict(measured.get("per_check") or {}),
            horizon=int(horizon),
            false_alarm=float(false_alarm),
        )


@dataclass
class DriftHistory:
    """Per counted verdict (for reports): rejection flags and both statistics."""

    rejected: list = field(default_factory=list)
    per_check: dict = field(default_factory=dict)
    rate_statistic: list = field(default_factory=list)
    score_statistic: list = field(default_factory=list)
    time: list = field(default_factory=list)


class DriftMonitor:
    """Feeds on verdicts one at a time (:meth:`observe`) and keeps both CUSUMs and the rates.

    Thread-safe (the server observes on its event loop, Prometheus reads :meth:`state` from its HTTP
    thread). Memory: the rank bag holds the calibration scores plus at most ``horizon`` stream
    scores; past the horizon new scores are ranked against the frozen bag."""

    def __init__(self, reference: DriftReference, *, window: int = WINDOW, keep_history: bool = False):
        self.reference = reference
        self.window = int(window)
        _ = reference.threshold  # its short simulation runs here, at start, not on the first verdict
        ref = reference
        self._up = bernoulli_llr(True, ref.reference_rate, ref.alternative_rate)
        self._down = bernoulli_llr(False, ref.reference_rate, ref.alternative_rate)
        self._bag = sorted(float(x) for x in ref.conformal_stats)
        self._weights = monitored_weights(ref.checks)
        self._bag_room = ref.horizon
        self._lock = threading.Lock()
        self.n = 0
        self.n_skipped = 0
        self.rejections = 0
        self.check_rejections = {c: 0 for c in ref.checks}
        self.rate_statistic = 0.0
        self.check_statistic = {c: 0.0 for c in ref.checks}
        self.score_statistic = 0.0
        self.max_statistics = {"rejection_rate": 0.0, "score_shift": 0.0}  # highest values so far
        self.alarm: dict | None = None
        # the last ``window`` verdicts' flags (overall, then per check) and their running sums
        self._recent: collections.deque = collections.deque()
        self._recent_sums = [0] * (1 + len(ref.checks))
        self.history = DriftHistory(per_check={c: [] for c in ref.checks}) if keep_history else None

    @classmethod
    def for_guard(cls, guard, **kw) -> "DriftMonitor":
        """A monitor for a loaded :class:`gamguard.runtime.guard.Guard` (its policy and enforced checks)."""
        reference = DriftReference.from_calibration(
            guard.manifest, guard.calibration, policy=guard.policy, checks=guard.enforced_checks
        )
        return cls(reference, **kw)

    def observe(self, reasons, scores: dict | None, *, time: str | None = None) -> None:
        """One verdict: its rejection ``reasons`` (empty when accepted) and ``scores`` (``<check>.p``)."""
        with self._lock:
            self._observe(set(reasons or ()), scores or {}, time)

    def _observe(self, reasons: set, scores: dict, time: str | None) -> None:
        if reasons & SKIPPED_REASONS:
            self.n_skipped += 1
            return
        s = monitored_statistic(scores, self._weights)
        if s is None or not math.isfinite(s):
            self.n_skipped += 1  # a verdict without its checks' p-values cannot be ranked
            return
        self.n += 1
        rejected = bool(reasons)
        self.rejections += rejected
        self.rate_statistic = max(0.0, self.rate_statistic + (self._up if rejected else self._down))
        flags = (rejected,) + tuple(REASON_OF_CHECK[c] in reasons for c in self.reference.checks)
        for c, fired in zip(self.reference.checks, flags[1:]):
            self.check_rejections[c] += fired
            self.check_statistic[c] = max(0.0, self.check_statistic[c] + (self._up if fired else self._down))
        self._recent.append(flags)
        for i, f in enumerate(flags):
            self._recent_sums[i] += f
        if len(self._recent) > self.window:
            for i, f in enumerate(self._recent.popleft()):
                self._recent_sums[i] -= f
        # score shift: the online conformal p-value of s among calibration + stream so far
        s = float(s)
        if self._bag_room > 0:
            u = online_conformal_pvalue(self._bag, s)
            self._bag_room -= 1
        else:  # past the horizon: ranked against the frozen bag (itself counted), memory stays bounded
            u = (bisect.bisect_right(self._bag, s) + 1) / (len(self._bag) + 1)
        self.score_statistic = max(0.0, self.score_statistic + power_calibrator_log(u))
        m = self.max_statistics
        m["rejection_rate"] = max(m["rejection_rate"], self.rate_statistic)
        m["score_shift"] = max(m["score_shift"], self.score_statistic)
        if self.alarm is None:
            by = [
                name
                for name, v in (("rejection_rate", self.rate_statistic), ("score_shift", self.score_statistic))
                if v >= self.reference.threshold
            ]
            if by:
                self.alarm = {"at": self.n, "by": by, "time": time}
        if self.history is not None:
            h = self.history
            h.rejected.append(rejected)
            for c, fired in zip(self.reference.checks, flags[1:]):
                h.per_check[c].append(fired)
            h.rate_statistic.append(self.rate_statistic)
            h.score_statistic.append(self.score_statistic)
            h.time.append(time)

    @property
    def drift(self) -> bool:
        """Latched: once a statistic crossed the threshold the flag stays up (until a restart)."""
        return self.alarm is not None

    def state(self) -> dict:
        """Everything the metrics, GetModelInfo and ``gamguard drift --json`` report (rates are None
        before the first verdict)."""
        with self._lock:
            ref = self.reference
            n = self.n
            k = len(self._recent)
            w = [v / k if k else None for v in self._recent_sums]
            return {
                "drift": self.drift,
                "n": n,
                "n_skipped": self.n_skipped,
                "rejection_rate": self.rejections / n if n else None,
                "per_check": {c: (v / n if n else None) for c, v in self.check_rejections.items()},
                "window": self.window,
                "window_rejection_rate": w[0],
                "window_per_check": dict(zip(ref.checks, w[1:])),
                "alpha": ref.alpha,
                "policy": ref.policy,
                "checks": list(ref.checks),
                "reference_rate": ref.reference_rate,
                "alternative_rate": ref.alternative_rate,
                "calibrated_per_check": dict(ref.calibrated_per_check),
                "statistics": {"rejection_rate": self.rate_statistic, "score_shift": self.score_statistic},
                "max_statistics": dict(self.max_statistics),
                "per_check_statistic": dict(self.check_statistic),
                "threshold": ref.threshold,
                "alarm": dict(self.alarm) if self.alarm else None,
                "horizon": ref.horizon,
                "false_alarm": ref.false_alarm,
                "calibration_confidence": CALIBRATION_CONFIDENCE,
                "method": "Bernoulli CUSUM of rejections against the calibration's rate bound; CUSUM of a "
                "power calibrator on online conformal ranks of k·min of the enforced checks' p-values; "
                "threshold: simulated excursion bound (or log(2T/false_alarm) if lower)",
            }
