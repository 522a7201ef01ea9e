"""Where a forward pass spends its time: `InferencePlan.kernel_times` and
`python -m convserve.core.bench_steps`, run as a user would."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
from convserve.core.bench_models import load_bench_model
from convserve.core.bench_steps import _same_plan as bench_steps_same_plan
from convserve.core.model import Model

from tests.conftest import random_weights


def _bench_steps(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convserve.core.bench_steps", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("name", ["lenet5", "strided_rgb128", "wide_dense"])
def test_kernel_times_time_every_call_of_the_pass_and_change_no_result(name):
    """One entry per kernel call of the batch's program, in its order, each with the step it
    belongs to and a time; the pass's results are the same after it."""
    doc, _ = load_bench_model(name)
    model = Model(doc, random_weights(doc), plan=False)
    plan = model._plan
    x = np.random.default_rng(0).standard_normal((3, *plan.architecture.input_shape))
    x = x.astype(np.float32)
    before = plan.run(x).copy()
    times = plan.kernel_times(x, rounds=3)
    calls = plan._programs[(3, False, plan._threads_now())][0]
    assert [name for _, name, _ in times] == [call[0].__name__ for call in calls]
    steps = [step for step, _, _ in times]
    assert steps == sorted(steps) and 0 <= steps[0] and steps[-1] < len(plan.steps)
    assert all(seconds > 0 for _, _, seconds in times)
    np.testing.assert_array_equal(plan.run(x), before)
    with pytest.raises(ValueError, match=f"1 to {plan.chunk} images"):
        plan.kernel_times(np.zeros((plan.chunk + 1, *x.shape[1:]), np.float32))


def test_bench_steps_prints_our_kernel_calls_and_ort_nodes():
    done = _bench_steps("--model", "lenet5", "--batch", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    total = float(re.search(r"ours: forward pass ([\d,.]+) us", out).group(1).replace(",", ""))
    ours = re.findall(
        r"^\| (\d+): (\w+) -> [\dx]+ \| (\w+) \| ([\d,.]+) \| ([\d.]+)% \|$", out, re.M
    )
    assert [kernel for *_, kernel, _, _ in ours][-1] == "dense_chain", out
    assert {kernel for _, _, kernel, _, _ in ours} >= {"conv_pool2"}, out
    # the calls alone add up to about the pass (not more than it and a margin for noise)
    assert 0 < sum(float(us.replace(",", "")) for *_, us, _ in ours) < 1.5 * total, out
    ort_nodes = re.findall(r"^\| (\S+) \| (\w+) \| ([\d,.]+) \| [\d.]+% \|$", out, re.M)
    assert "Conv" in {op for _, op, _ in ort_nodes}, out
    assert re.search(r"ONNX Runtime: run [\d,.]+ us \(ORT / ours: [\d.]+x\)", out), out


def test_bench_steps_times_the_planned_variants(monkeypatch):
    """Ours is the model as planned at warm-up, not the heuristic plan it starts with: a plan
    that puts lenet5's second conv on Winograd shows a Winograd step there."""
    from convserve.core import bench_steps, planner

    doc, _ = load_bench_model("lenet5")
    weights = random_weights(doc)
    default = Model(doc, weights, plan=False).kernel_plan
    assert default[2] == "direct"  # the heuristic's choice, which the plan below replaces
    monkeypatch.setattr(
        planner, "plan_for", lambda *args, **kwargs: ({**default, 2: "winograd4_split"}, 32)
    )
    x = np.random.default_rng(1).standard_normal((2, 28, 28, 1)).astype(np.float32)
    result = bench_steps._ours(doc, weights, x)
    assert result["plan"]["2"] == "winograd4_split"
    labels = [label for label, _, _ in result["rows"]]
    # (labels name steps: the pooling layer after the first conv is fused into its step)
    assert any(": WinogradConv" in label for label in labels), labels
    assert not any(": DirectConv" in label for label in labels), labels


def test_bench_steps_tables_only_runs_of_one_plan():
    runs = [{"plan": {"1": "direct"}}, {"plan": {"1": "winograd"}}, {"plan": {"1": "direct"}}]
    kept, others = bench_steps_same_plan(runs)
    assert kept == [runs[0], runs[2]] and others == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "lenet5", "--batch", "0"], "--batch must be at least 1"),
        (["--model", "lenet5", "--batch", "33", "--repeats", "1"], "--batch must be at most 32"),
        (["--model", "no_such_model"], "no_such_model"),
    ],
)
def test_bench_steps_refuses_what_it_cannot_time_in_one_line(args, message):
    done = _bench_steps(*args)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
