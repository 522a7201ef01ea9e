"""The latency-SLO controller: exact AIMD steps, the service-time fit, and a simulated load ramp."""

from __future__ import annotations

import random

import pytest
from convserve.server import slo
from convserve.server.config import OPTIONS, ServerConfig
from convserve.server.model_config import ModelConfigError, ModelSettings, VersionPolicy, _settings
from convserve.server.slo import ServiceModel, SloController, window_bound_error

from tests.slo_simulation import simulate

SLO = 0.100


def _period(
    controller: SloController,
    p99: float,
    *,
    per_batch: int = 2,
    windowed: bool = True,
    size: int = 2,
    compute: float = 0.001,
    now: float = 0.0,
) -> bool:
    """Feed one full control period whose latencies have the given p99; returns update()."""
    requests = slo.PERIOD_REQUESTS
    for _ in range(requests // per_batch):
        controller.observe_batch(size, compute, windowed)
    controller.observe_latencies([p99 / 2] * (requests - 3) + [p99] * 3)
    return controller.update(now)


def test_additive_increase_while_p99_has_headroom():
    controller = SloController(SLO, SLO, 64)
    assert controller.window_s == 0.0
    assert _period(controller, 0.5 * SLO)
    assert controller.window_s == pytest.approx(SLO / 16)
    assert _period(controller, 0.5 * SLO)
    assert controller.window_s == pytest.approx(2 * SLO / 16)
    assert controller.adjustments == {"up": 2, "down": 0}


def test_multiplicative_decrease_when_p99_is_over_and_slivers_go_to_zero():
    controller = SloController(SLO, SLO, 64)
    for _ in range(8):
        _period(controller, 0.5 * SLO)
    assert controller.window_s == pytest.approx(SLO / 2)
    _period(controller, 1.2 * SLO)
    assert controller.window_s == pytest.approx(0.7 * SLO / 2)
    for _ in range(20):
        _period(controller, 1.2 * SLO)
    assert controller.window_s == 0.0  # not an ever smaller sliver
    assert controller.last_p99_s == pytest.approx(1.2 * SLO)


def test_no_change_between_headroom_and_slo():
    controller = SloController(SLO, SLO, 64)
    _period(controller, 0.5 * SLO)
    before = controller.window_s
    assert _period(controller, 0.9 * SLO)  # between 0.8 x SLO and the SLO: hold
    assert controller.window_s == before


def test_no_wind_up_when_the_window_decides_no_batch():
    """Full batches or an idle model: growing the window would change nothing but latency."""
    controller = SloController(SLO, SLO, 64)
    for _ in range(5):
        _period(controller, 0.1 * SLO, windowed=False)
    assert controller.window_s == 0.0


def test_open_window_shrinks_when_requests_do_not_meet_in_batches():
    controller = SloController(SLO, SLO, 64)
    for _ in range(4):
        _period(controller, 0.3 * SLO)
    grown = controller.window_s
    _period(controller, 0.3 * SLO, size=1)  # held batches of one image: waiting gathers nothing
    assert controller.window_s == pytest.approx(0.7 * grown)


def test_control_period_needs_enough_requests_or_time():
    controller = SloController(SLO, SLO, 64)
    controller.observe_batch(2, 0.001, True)
    controller.observe_latencies([0.01] * (slo.MIN_REQUESTS - 1))
    assert not controller.update(0.0)
    assert not controller.update(5.0)  # long enough, but too few requests for a p99
    controller.observe_latencies([0.01])
    assert controller.update(5.0 + slo.PERIOD_SECONDS)
    controller.observe_latencies([0.01] * 50)
    assert not controller.update(5.5 + slo.PERIOD_SECONDS)  # a new period has started


def test_window_stays_within_its_bound():
    bound = SLO / 5
    controller = SloController(SLO, bound, 64)
    for _ in range(30):
        _period(controller, 0.1 * SLO)
    assert controller.window_s == pytest.approx(bound)


def test_service_fit_recovers_overhead_and_per_image_cost():
    model = ServiceModel()
    for n in range(1, 17):
        for _ in range(slo.FIT_MIN_SAMPLES):
            model.add(n, 0.001 + 0.002 * n)
    model.add(3, 0.5)  # one preempted batch does not move the median of its size
    model.refit()
    assert model.fitted
    assert model.overhead == pytest.approx(0.001)
    assert model.per_image == pytest.approx(0.002)
    assert model.largest_batch(0.05, 64) == 24  # (0.05 - 0.001) / 0.002 = 24.5
    assert model.largest_batch(0.05, 16) == 16
    assert model.largest_batch(0.0001, 64) == 1  # never below one image


def test_cap_is_never_below_a_size_seen_within_budget():
    """A steep line from noisy small batches must not cap below what demonstrably ran in time."""
    model = ServiceModel()
    for n, t in ((1, 0.0003), (2, 0.0004), (3, 0.0045), (6, 0.0048)):
        for _ in range(slo.FIT_MIN_SAMPLES):
            model.add(n, t)
    model.refit()
    assert (0.005 - model.overhead) / model.per_image < 6  # the slow size-3 batches tilt it
    assert model.largest_batch(0.005, 64) == 6


def test_one_batch_size_gives_no_fit():
    model = ServiceModel()
    for _ in range(20):
        model.add(8, 0.004)
    model.refit()
    assert not model.fitted
    assert model.largest_batch(0.001, 64) == 64  # no slope known: no cap


def test_heavy_model_caps_batch_size_and_window():
    """Two executions of the largest batch must fit in the SLO (a request that just missed one)."""
    controller = SloController(SLO, SLO, 64)
    for n in range(1, 17):
        for _ in range(slo.FIT_MIN_SAMPLES):
            controller.observe_batch(n, 0.001 + 0.002 * n, True)
    controller.observe_latencies([0.01] * slo.PERIOD_REQUESTS)
    controller.update(0.0)
    assert controller.batch_limit == 24
    ceiling = SLO - (0.001 + 0.002 * 24)
    for _ in range(40):
        _period(controller, 0.1 * SLO, size=2, compute=0.005)  # one size: the fit is kept
    assert controller.batch_limit == 24
    assert controller.window_s == pytest.approx(ceiling)


def test_random_observations_keep_the_invariants():
    rng = random.Random(7)
    bound = 0.03
    controller = SloController(SLO, bound, 32)
    for step in range(3000):
        size = rng.randint(1, 32)
        scale = 0.06 if step // 500 % 2 else 0.2  # calm and overloaded phases
        controller.observe_batch(size, rng.uniform(0, 0.08), rng.random() < 0.5)
        controller.observe_latencies(rng.uniform(0, scale) for _ in range(rng.randint(1, size)))
        controller.update(step * 0.01)
        assert 0.0 <= controller.window_s <= bound
        assert 1 <= controller.batch_limit <= 32
    assert controller.adjustments["up"] and controller.adjustments["down"]


RAMP = [100, 500, 1500, 3000, 5000, 3000, 1000, 100]  # requests per second, 10 s each
SERVICE = dict(overhead=0.002, per_image=0.0001, max_batch_size=64)  # 2 ms + 0.1 ms per image
SLO_RAMP = 0.020
SETTLE = 5.0  # seconds of each step left to convergence


@pytest.fixture(scope="module")
def ramp():
    runs = {
        "small": simulate(RAMP, 10.0, fixed_window=0.0, **SERVICE),
        "large": simulate(RAMP, 10.0, fixed_window=0.016, **SERVICE),
    }
    controller = SloController(SLO_RAMP, SLO_RAMP, 64)
    runs["slo"] = simulate(RAMP, 10.0, controller=controller, **SERVICE)
    return runs


def test_ramp_holds_the_slo_after_convergence(ramp):
    for step in ramp["slo"]:
        assert step.p99(SETTLE) <= SLO_RAMP, f"p99 over the SLO at {step.rate} requests/s"


def test_ramp_fixed_large_window_misses_the_slo(ramp):
    """The scenario is meaningful: a window long enough for large batches breaks the SLO."""
    missed = [s.rate for s in ramp["large"] if s.p99(SETTLE) > SLO_RAMP]
    assert missed, "the fixed large window never missed the SLO"


def test_ramp_window_grows_with_headroom_and_batches_beat_no_window(ramp):
    for fixed, adaptive in zip(ramp["small"], ramp["slo"]):
        if fixed.rate < 500:
            continue
        assert adaptive.windows[-1] > 0, f"no window at {adaptive.rate} requests/s"
        # larger batches: fewer executions for the same requests, the compute time saved
        assert adaptive.mean_batch(SETTLE) >= 2 * fixed.mean_batch(SETTLE), fixed.rate


def test_very_low_load_gets_no_window_that_gathers_nothing():
    """10 requests/s: a held batch almost never finds company, so waiting would only cost."""
    rates = [10, 10, 10]
    controller = SloController(SLO_RAMP, SLO_RAMP, 64)
    adaptive = simulate(rates, 20.0, controller=controller, **SERVICE)
    fixed = simulate(rates, 20.0, fixed_window=0.0, **SERVICE)
    assert max(w for step in adaptive for w in step.windows) <= SLO_RAMP / 16  # one probe step
    assert adaptive[-1].p99() <= fixed[-1].p99() + SLO_RAMP / 16


def test_window_bound_errors_name_the_settings():
    assert window_bound_error(0.0, 50_000) is None  # no SLO: the delay is the fixed window
    assert window_bound_error(10.0, 9_999) is None
    message = window_bound_error(10.0, 10_000)
    assert "--max-queue-delay-us 10000 (10 ms) must be below --latency-slo-ms 10" in message
    assert "max_queue_delay_us 20000" in window_bound_error(10.0, 20_000, "key")
    with pytest.raises(ValueError):
        SloController(0.01, 0.02, 64)


def test_latency_slo_option_is_off_by_default():
    option = next(opt for opt in OPTIONS if opt.flag == "--latency-slo-ms")
    assert option.env == "CONVSERVE_LATENCY_SLO_MS"
    assert ServerConfig().latency_slo_ms == 0.0
    assert option.parse("12.5") == 12.5
    for bad in ("-1", "nan", "inf", "1e9"):
        with pytest.raises(ValueError):
            option.parse(bad)


def test_config_json_sets_and_checks_the_slo():
    defaults = ModelSettings(64, 0, 1, 16, VersionPolicy())
    assert _settings({"latency_slo_ms": 25}, defaults).latency_slo_ms == 25.0
    assert _settings({"latency_slo_ms": 25, "max_queue_delay_us": 5000}, defaults)
    with pytest.raises(ModelConfigError, match="max_queue_delay_us 30000 .* latency_slo_ms 25"):
        _settings({"latency_slo_ms": 25, "max_queue_delay_us": 30_000}, defaults)
    for bad in ("10", True, -1, 1e12):
        with pytest.raises(ModelConfigError, match="latency_slo_ms must be a number"):
            _settings({"latency_slo_ms": bad}, defaults)
