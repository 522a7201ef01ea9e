"""The planner: per layer, time the kernel variants that can compute it on this machine and on
the layer's real shapes, and keep the fastest; plans are cached on disk.

A layer lists its variants (`Layer.inference_variants`, today's heuristic choice first); a plan
is a dict {layer index: variant} that `build_steps` / `InferencePlan` take. `plan_for` returns
the plan for a model: from this process's memo, else from the on-disk cache, else by timing.

Timing: every candidate of a layer runs that layer alone (its fusion block, with its padding
copy and any separate pooling step) on random input at batch 1, 8 and the largest batch the
model runs at once: up to BATCH_CHUNK images, or ROWS_CHUNK for a model of dense layers only
(`timing_batches`; a bigger batch runs in chunks of that size), in interleaved
rounds of single calls (after an untimed one: the caches then hold the candidate's own data, as
when it serves), keeping each round's fastest call. The candidates are compared round by round:
a candidate's time at a batch size is the median over rounds of its fastest call divided by the
fastest candidate's in the same round (the machine's speed drifts between rounds, hardly
within one), and its score the geometric mean of these over the batch sizes (`scores`); the
default keeps unless another is faster by more than SWITCH_MARGIN (timings on a busy machine
are noisy); among variants that tie so, the one whose worst batch size loses least (`pick`).
Then the whole model is timed the same way with that choice, the default plan and each layer's
fastest variant at the largest batch; the faster of the two plans built from the layers'
timings is kept unless the default beats it by SWITCH_MARGIN (`whole_model_choice`: they won
their layers' timings, so a disturbed whole-model round alone does not undo them).
Then a layer whose variant reads many weights is timed in the whole model against its variants
with far fewer (`in_model_pass`): alone it had the caches to itself. Last, for a model that runs
batches larger than its default chunk, the whole model is timed in chunks of twice, four times
... the default against the best so far (`measure_chunk`).
Before the clock starts, every candidate runs once at each timing batch (`compile_candidates`):
this compiles its kernels into numba's disk cache on a machine's first start, and loads them
on later ones. The timing then gets PLAN_SECONDS of wall time; layers not reached by then keep
their default (the layers timed, their choice; the whole-model comparison is then skipped),
and such an incomplete plan is used but not written to disk (the next start tries again); out
of time in the last pass, the plan is complete and cached, the layers not reached keeping
their variant. Neither is a plan timed on a busy machine (median calls more than NOISE_LIMIT
times the fastest).

One variant per layer for every batch size: the variants do not round alike, so switching by
batch size would break batch invariance.

The cache: one JSON file per key in `plan_cache_dir()`. The key hashes the CPU (model name and
flags from /proc/cpuinfo, LLVM's host CPU name and features, NUMBA_CPU_FEATURES, numba's thread
count), the shapes of the layers that have a choice, the batch and chunk sizes timed, and the
code (the sources of the kernel and layer packages, `cache_stamp.package_stamp`, and of this
module). Failing to read or write the cache (a read-only root, a full disk) never fails model
loading: the plan is then timed again or kept in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numba
import numpy as np
from convserve.core.architecture import Architecture
from convserve.core.inference import BATCH_CHUNK, InferencePlan, Plan, default_plan
from convserve.core.kernels import cache_stamp
from convserve.core.layers.flatten import Flatten
from convserve.core.layers.fusion import Block, blocks
from convserve.core.limits import image_activation_bytes
from convserve.core.threads import one_thread

log = logging.getLogger("convserve.planner")

# most wall time timing one model's variants may take (compiling aside; its chunk may take up to
# CHUNK_SECONDS more)
PLAN_SECONDS = 2.0
ROUNDS = 5  # interleaved timing rounds per candidate and batch size
ROUND_SECONDS = 0.004  # calls of one candidate per round: at least one, then until this long
SWITCH_MARGIN = 0.03  # another variant replaces the default only when this much faster
COMPILE_RUN_SECONDS = 0.05  # `compile_candidates` skips a batch whose run would take longer
NOISE_LIMIT = 2.0  # a plan timed with calls this much slower in the median than the fastest
# (a busy machine) is used but not cached
FORMAT = 4  # of the cache files; part of the key
WHOLE_MODEL = -1  # the timings' key of the whole model's candidate plans
# The packed weights from which a layer's variant is timed in the model against variants that
# read at most half as many (`in_model_pass`): about what stays in a core's L2 cache beside
# the other layers' data (256 KB; Zen 3 has 512 KB of L2 a core, Zen 4 1 MB, this Xeon 2 MB).
IN_MODEL_MIN_BYTES = 256 * 1024
# A variant of such a layer whose own score is within this factor of the current one's is timed
# in the model too (`in_model_pass`): alone, its weights may stay in cache where in the model
# they stream from L3, which some variants read better than others
NEAR_TIE = 1.10
# The largest chunk of images a pass may run at once that `measure_chunk` tries (it doubles the
# default chunk up to the largest batch the model runs, at most this)
MAX_CHUNK = 256
# A chunk twice as large replaces the current one when its pass at that size is this much faster
# (`measure_chunk`): a larger chunk costs only memory, so a small but steady gain decides
CHUNK_MARGIN = 0.01
# The most activation memory a chunk `measure_chunk` tries may hold: images x the bytes of one
# image's widest layer (`limits.image_activation_bytes`), so that timing (two plans at once) and
# running a large chunk stay small beside the memory the model needs anyway (a 224 x 224 image
# through 64 channels holds 13 MB: it stays at the default chunk). The chunks the planner chose
# on an Intel Xeon held 3-42 MB
CHUNK_MAX_BYTES = 64 * 2**20
# Seconds `measure_chunk` gets at least, after the layers' timing: what that leaves of
# PLAN_SECONDS, else this (cifar10's and rgb64's layers took all of it on a busy Intel Xeon,
# where timing 32 against 64 images took 0.1-0.2 s, 64 against 128 0.2-0.4)
CHUNK_SECONDS = 0.5
Rounds = dict[str, list[list[float]]]  # candidate -> per batch size, each round's fastest call
CACHE_SUBDIR = "convserve-plans"

# key -> (plan, chunk), so every instance of a model in a process agrees
_memo: dict[str, tuple[Plan, int]] = {}
_memo_lock = threading.Lock()


# -- the cache key ------------------------------------------------------------------------------
def cpu_identity() -> str:
    """What makes timings on this machine comparable: CPU model and flags, LLVM's view of the
    host, the vector features numba compiles for and its thread count."""
    parts = []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "vendor_id", "cpu family", "model"):
                    parts.append(line.strip())
                elif not line.strip() and parts:
                    break  # the first processor is enough
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm

        parts += [llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()]
    except Exception:  # pragma: no cover - an llvmlite without the host query
        pass
    parts += [os.environ.get("NUMBA_CPU_FEATURES", ""), f"threads {numba.config.NUMBA_NUM_THREADS}"]
    return "\n".join(parts)


@functools.cache  # sources do not change under a running process
def code_stamp() -> str:
    """A hash of the sources that decide what a variant computes and how fast, and which plan
    wins: the kernel package, the layer package (which packs weights and splits work) and this
    module."""
    here = Path(__file__).resolve()
    own = hashlib.sha256(here.read_bytes()).hexdigest()
    return cache_stamp.package_stamp() + cache_stamp.package_stamp(here.parent / "layers") + own


def _choices(arch: Architecture) -> list[tuple[Block, tuple[str, ...]]]:
    """The fusion blocks whose layer has more than one variant, with those variants."""
    found = []
    for block in blocks(arch.layers, inference=True):
        variants = block.layer.inference_variants(block)
        if len(variants) > 1:
            found.append((block, variants))
    return found


def _block_shape(block: Block) -> list[Any]:
    """What identifies a block's work: its layers' types, hyperparameters and shapes (not the
    user's layer names)."""
    return [
        [layer.index, layer.type, layer.describe(), layer.input_shape, layer.output_shape]
        for layer in block.layers
    ]


def timing_batches(largest: int, chunk: int = BATCH_CHUNK) -> tuple[int, ...]:
    """The batch sizes candidates are timed at for a model run on batches of up to `largest`
    images in chunks of `chunk` (`InferencePlan.chunk`): 1, 8 and the largest chunk (never more
    images than the model may hold at once). A variant that is faster from a few images on but
    loses at one image (a larger Winograd tile on a small image) then wins two of three. A
    model of dense layers only runs 256 rows at once, where its layers' variants rank otherwise
    than at 32 (wide_dense's 1,024 -> 512 layer on an Intel Xeon: timed at 1, 8 and 32 rows it
    took `passes`; at 256 rows `one_pass` ran in 0.84-0.87x its time, in one process)."""
    top = max(1, min(largest, chunk))
    return tuple(sorted({1, min(8, top), top}))


def chunk_sizes(largest: int, chunk: int = BATCH_CHUNK, image_bytes: int = 0) -> tuple[int, ...]:
    """The chunk sizes (`InferencePlan.chunk`) `measure_chunk` may try for a model run on
    batches of up to `largest` images whose default chunk is `chunk`: the default, then twice
    the one before, up to `largest` and MAX_CHUNK (the last one may be smaller than twice),
    while a chunk's images of `image_bytes` each hold at most CHUNK_MAX_BYTES."""
    top = min(largest, MAX_CHUNK)
    sizes = [chunk]
    while sizes[-1] < top and min(2 * sizes[-1], top) * image_bytes <= CHUNK_MAX_BYTES:
        sizes.append(min(2 * sizes[-1], top))
    return tuple(sizes)


def plan_key(
    arch: Architecture,
    batches: tuple[int, ...] = (1,),
    parallel_min_batch: int = 0,
    chunks: tuple[int, ...] = (BATCH_CHUNK,),
) -> str:
    """The cache key of a model's plan timed at `batches` (those below `parallel_min_batch` on
    one thread), its chunk chosen among `chunks`, on this machine with this code."""
    shapes = [_block_shape(block) for block, _ in _choices(arch)]
    single = [n for n in batches if one_thread(n, parallel_min_batch)]  # timed on one thread
    text = json.dumps([FORMAT, cpu_identity(), code_stamp(), shapes, batches, single, chunks])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- the cache directory ------------------------------------------------------------------------
def plan_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where plans are cached: `override` when given, else next to numba's cache
    ($NUMBA_CACHE_DIR/convserve-plans: a read-only install points it at a writable place), else
    the user's cache directory ($XDG_CACHE_HOME or ~/.cache, then convserve-plans)."""
    if override:
        return Path(override)
    numba_dir = os.environ.get("NUMBA_CACHE_DIR")
    if numba_dir:
        return Path(numba_dir) / CACHE_SUBDIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_SUBDIR


def read_cached(
    directory: Path, key: str, arch: Architecture, chunks: tuple[int, ...] = (BATCH_CHUNK,)
) -> tuple[Plan, int] | None:
    """The cached plan and chunk under `key`, if a readable file holds a plan that fits `arch`
    and a chunk among `chunks`."""
    try:
        data = json.loads((directory / f"{key}.json").read_text())
        plan = {int(k): str(v) for k, v in data["plan"].items()}
        chunk = data["chunk"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    allowed = {block.layer.index: variants for block, variants in _choices(arch)}
    if any(plan.get(i) not in variants for i, variants in allowed.items()):
        return None  # a damaged or foreign file: plan again
    if type(chunk) is not int or chunk not in chunks:
        return None
    return {**default_plan(arch), **{i: plan[i] for i in allowed}}, chunk


def write_cached(directory: Path, key: str, record: dict[str, Any]) -> bool:
    """Write a plan record atomically; False (and a log line) when the directory is not
    writable, which never fails the caller."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # as a plain file would be (mkstemp makes it private)
            os.replace(tmp, directory / f"{key}.json")
        except BaseException:
            os.unlink(tmp)
            raise
        return True
    except OSError as exc:
        log.info("kernel plan not cached (%s): %s", directory, exc)
        return False


# -- timing -------------------------------------------------------------------------------------
def _block_runner(arch: Architecture, block: Block, weights: dict, variant: str) -> InferencePlan:
    """An InferencePlan computing `block` alone with `variant`, on its own input shape (a flat
    input, a dense layer's, as a 1 x 1 image flattened first)."""
    shape, layers = block.layer.input_shape, tuple(block.layers)
    if len(shape) == 1:
        index = block.layer.index - 1  # a model's input is an image: a layer comes first
        layers = (Flatten(index=index, input_shape=(1, 1, shape[0]), output_shape=shape), *layers)
        shape = (1, 1, shape[0])
    channels = shape[-1]
    alone = dataclasses.replace(
        arch,
        input_shape=shape,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        scale=1.0,
        layers=layers,
    )
    return InferencePlan(alone, weights, {block.layer.index: variant})


def time_block(
    arch: Architecture,
    block: Block,
    weights: dict,
    variants: tuple[str, ...],
    deadline: float,
    batches: tuple[int, ...],
    parallel_min_batch: int = 0,
) -> tuple[Rounds, float] | None:
    """({variant: [each round's fastest call in seconds, at each of `batches`]}, noise), or
    None when the deadline passes first. Noise: the largest ratio of a variant's median call to
    its fastest (about 1 on a quiet machine). Batches below `parallel_min_batch` run on one
    numba thread, as a server runs them (`threads.threads_by_batch`)."""
    runners = {v: _block_runner(arch, block, weights, v) for v in variants}
    shape = next(iter(runners.values())).architecture.input_shape
    index = block.layer.index
    return time_runners(
        runners, shape, deadline, batches, index, parallel_min_batch=parallel_min_batch
    )


def time_runners(
    runners: dict[str, InferencePlan],
    input_shape: tuple[int, ...],
    deadline: float,
    batches: tuple[int, ...],
    seed: int = 0,
    parallel_min_batch: int = 0,
) -> tuple[Rounds, float] | None:
    """`time_block` for any set of plans with one input shape."""
    threads = numba.get_num_threads()
    try:
        return _time_rounds(
            runners, input_shape, deadline, batches, seed, parallel_min_batch, threads
        )
    finally:
        numba.set_num_threads(threads)


def _time_rounds(
    runners: dict[str, InferencePlan],
    input_shape: tuple[int, ...],
    deadline: float,
    batches: tuple[int, ...],
    seed: int,
    parallel_min_batch: int,
    threads: int,
) -> tuple[Rounds, float] | None:
    """`time_runners` on `threads` numba threads (one below `parallel_min_batch`); the caller
    restores the thread count."""
    rng = np.random.default_rng(seed)
    rounds: Rounds = {v: [] for v in runners}
    noise = 1.0
    for n in batches:
        # one thread below parallel_min_batch. With numba's threads sleeping between parallel
        # regions (`GOMP_SPINCOUNT=1000`, as `convserve serve` sets it), each call's wake-up on
        # a busy host put the median call of fashion_mnist's layers at 4-15x the fastest on two
        # threads at 1 and 8 images, where the server runs one
        numba.set_num_threads(1 if one_thread(n, parallel_min_batch) else threads)
        x = rng.standard_normal((n, *input_shape)).astype(np.float32)
        samples: dict[str, list[float]] = {v: [] for v in runners}
        fastest: dict[str, list[float]] = {v: [] for v in runners}  # each round's fastest call
        for runner in runners.values():  # untimed first calls (buffers, the kernels at hand)
            if time.perf_counter() > deadline:
                return None
            runner.run(x)
        for _ in range(ROUNDS):
            for v, runner in runners.items():  # interleaved: drift hits every candidate alike
                if time.perf_counter() > deadline:
                    return None
                # untimed: the first call after another candidate finds the caches holding that
                # one's weights and buffers (measurably slower at a batch of 32), unlike a model
                # that serves on its own
                runner.run(x)
                round_end = time.perf_counter() + ROUND_SECONDS
                calls = []
                while True:  # single calls: the fastest is the one nothing else disturbed
                    start = time.perf_counter()
                    if start > deadline:
                        return None
                    runner.run(x)
                    end = time.perf_counter()
                    calls.append(end - start)
                    if end > round_end:
                        break
                samples[v] += calls
                fastest[v].append(min(calls))
        for v, times in samples.items():
            rounds[v].append(fastest[v])
            noise = max(noise, float(np.median(times)) / min(times))
    return rounds, noise


def relative(variants: tuple[str, ...], rounds: Rounds, b: int) -> dict[str, float]:
    """Each variant's time at batch size number b relative to the fastest variant's, round by
    round: the median over rounds of its fastest call / the fastest variant's in that round (a
    neighbour's burst on a shared machine lasts longer than a round: one disturbed or lucky
    round does not decide, and the drift between rounds cancels)."""
    count = len(rounds[variants[0]][b])
    best = [min(rounds[v][b][r] for v in variants) for r in range(count)]
    return {
        v: float(np.median([rounds[v][b][r] / best[r] for r in range(count)])) for v in variants
    }


def _relative_at_each(variants: tuple[str, ...], rounds: Rounds) -> dict[str, list[float]]:
    """Each variant's `relative` time at each batch size."""
    at = [relative(variants, rounds, b) for b in range(len(rounds[variants[0]]))]
    return {v: [times[v] for times in at] for v in variants}


def scores(variants: tuple[str, ...], rounds: Rounds) -> dict[str, float]:
    """Each variant's geometric mean, over the batch sizes, of its `relative` time (1.0: the
    fastest in every round at every batch size)."""
    at = _relative_at_each(variants, rounds)
    return {v: math.exp(sum(map(math.log, at[v])) / len(at[v])) for v in variants}


def worst(variants: tuple[str, ...], rounds: Rounds) -> dict[str, float]:
    """Each variant's largest `relative` time over the batch sizes."""
    return {v: max(times) for v, times in _relative_at_each(variants, rounds).items()}


def pick(variants: tuple[str, ...], rounds: Rounds) -> str:
    """The variant with the lowest score (`scores`); the default (first) unless another beats
    it by more than SWITCH_MARGIN. The variants within SWITCH_MARGIN of the lowest score tie;
    when that choice loses more than SWITCH_MARGIN at some batch size (`worst`), the tied
    variant that loses least at its worst batch size replaces it (the choice stays when none
    loses less): the batch size that would lose most decides.
    strided5's 5x5/2 layer of 32 -> 64 channels in the model on an Intel Xeon: F(4x4, 3x3)
    over the phases 1.20 / 1.00 / 1.00 at 1 / 8 / 32 images, F(2x2, 3x3) 1.01 / 1.06 / 1.14
    (scores 1.063 and 1.068); the model then ran at one image at 0.98x and 1.11x ORT's
    speed. The worst cases are not compared with a margin: with one (3 %), 2 of 15 plannings
    of that model kept F(4x4, 3x3), whose worst case, 1.16-1.21, was then within 3 % of the
    other's 1.13-1.15; variants whose scores tie cost the same on average either way."""
    score = scores(variants, rounds)
    best = min(variants, key=score.__getitem__)
    near = [v for v in variants if score[v] <= score[best] * (1 + SWITCH_MARGIN)]
    choice = variants[0] if variants[0] in near else best
    worst_at = worst(variants, rounds)
    if worst_at[choice] <= 1 + SWITCH_MARGIN:  # within the margin of the fastest everywhere
        return choice
    better = [v for v in near if worst_at[v] < worst_at[choice]]
    return min(better, key=worst_at.__getitem__) if better else choice


def whole_model_choice(names: tuple[str, ...], rounds: Rounds) -> str:
    """Of the whole-model candidates ("default" and the plans built from the layers' timings):
    the fastest plan built from the layers' timings, unless the default beats it by more than
    SWITCH_MARGIN. Those plans won their layers' timings, so the default needs clear evidence
    to return; among themselves they are equals. Without "default" among the names (the
    per-layer choice is the default plan itself), the first stays unless another beats it by
    the margin."""
    if "default" not in names:
        return pick(names, rounds)
    score = scores(names, rounds)
    best = min((n for n in names if n != "default"), key=score.__getitem__)
    return pick((best, "default"), rounds)


def measure_plan(
    arch: Architecture,
    weights: dict,
    seconds: float = PLAN_SECONDS,
    batches: tuple[int, ...] = timing_batches(BATCH_CHUNK),
    parallel_min_batch: int = 0,
) -> tuple[Plan, dict[int | str, Rounds], float | None]:
    """Time every layer's variants at `batches` within `seconds`: (plan, timings per layer,
    noise: the largest of `time_block`'s, None when out of time). Out of time, the layers
    timed keep their choice and the others their default variant (a slow or busy machine
    then still gets the choices it timed: rgb64 on a busy AMD Zen 3 needed 3.6 s and fell back
    to every default, where the F(4x4, 3x3) layers it timed took 0.71-0.83x the time).
    Otherwise the whole model runs, timed the same way, with the per-layer
    choice, the default plan and each layer's fastest variant at the largest batch, and the
    fastest of these is kept (`whole_model_choice`): a layer timed alone pays its own padding
    copy, which in the model the conv before it may save, and a layer whose variants nearly tie
    is chosen by noise. Last, `in_model_pass` with the time left. Batches below
    `parallel_min_batch` run on one thread (`time_block`)."""
    default = default_plan(arch)
    plan = dict(default)
    largest = dict(default)  # each layer's fastest variant at the largest batch
    deadline = time.perf_counter() + seconds
    timings: dict[int | str, Rounds] = {}
    noise = 1.0
    for block, variants in _choices(arch):
        measured = time_block(arch, block, weights, variants, deadline, batches, parallel_min_batch)
        if measured is None:
            return plan, timings, None
        timings[block.layer.index], layer_noise = measured
        noise = max(noise, layer_noise)
        plan[block.layer.index] = pick(variants, measured[0])
        at_largest = relative(variants, measured[0], len(batches) - 1)
        largest[block.layer.index] = min(variants, key=at_largest.__getitem__)
    candidates: dict[str, Plan] = {"planned": plan}  # the per-layer choice first
    for name, candidate in (("default", default), ("largest batch", largest)):
        if candidate not in candidates.values():
            candidates[name] = candidate
    if len(candidates) > 1:
        runners = {name: InferencePlan(arch, weights, p) for name, p in candidates.items()}
        measured = time_runners(
            runners, arch.input_shape, deadline, batches, parallel_min_batch=parallel_min_batch
        )
        if measured is None:  # out of time: the layers' own timings decide
            return plan, timings, None
        whole, whole_noise = measured
        timings[WHOLE_MODEL] = whole
        plan = candidates[whole_model_choice(tuple(candidates), whole)]
        noise = max(noise, whole_noise)
    plan, pass_noise = in_model_pass(
        arch, weights, plan, timings, deadline, batches, parallel_min_batch
    )
    return plan, timings, max(noise, pass_noise)


def in_model_pass(
    arch: Architecture,
    weights: dict,
    plan: Plan,
    timings: dict[int | str, Rounds],
    deadline: float,
    batches: tuple[int, ...],
    parallel_min_batch: int = 0,
) -> tuple[Plan, float]:
    """(plan, noise as in `time_block`): where a layer's variant reads IN_MODEL_MIN_BYTES of
    weights or more and another variant at most half as many, or one whose score alone was
    within NEAR_TIE of its own, the whole model timed with each of those variants in `plan` (as
    `time_block` times a layer; the largest weights first), the layer's variant kept unless
    another is faster by more than SWITCH_MARGIN (`pick`).
    A layer timed alone has the caches to itself. In the model the other layers evict its
    weights and it evicts theirs, which costs a variant with large weights most: on an Intel
    Xeon (AVX-512, 2 MB of L2 a core) on a busy host, strided5's 5x5/2 layer of 32 -> 64
    channels by F(4x4, 3x3) over the phases (1.18 MB of transformed weights, direct's 205 KB)
    took 15.6 us alone and 35.9 in the model at one image, and the model took 1.65x the time
    it took with the layer direct. Variants that read as many bytes differ in how they stream
    them: wide_dense's 784 -> 1,024 layer (3.2 MB, which alone stays in the two cores' L2) took
    47.4-50.7 us alone at 8 rows in each of its three variants, and in the model (5.3 MB of
    weights, from L3) 100-102 us in strips against 122-126 in blocks of 64.
    Out of time, the layers not reached keep their variant.
    Timings go under "in model <layer index>"."""
    plan = dict(plan)
    noise = 1.0
    if time.perf_counter() > deadline:
        return plan, noise
    checks = []
    for block, variants in _choices(arch):
        index = block.layer.index
        current = _weight_bytes(arch, block, weights, plan[index])
        if current < IN_MODEL_MIN_BYTES:  # (packing the other variants costs milliseconds)
            continue
        others = [v for v in variants if v != plan[index]]
        smaller = [v for v in others if 2 * _weight_bytes(arch, block, weights, v) <= current]
        close = []  # variants as large whose own timings were near the current one's
        if index in timings:
            score = scores(variants, timings[index])
            limit = NEAR_TIE * score[plan[index]]
            close = [v for v in others if v not in smaller and score[v] <= limit]
        if smaller or close:
            checks.append((current, index, (plan[index], *smaller, *close)))
    for _, index, order in sorted(checks, reverse=True):
        runners = {v: InferencePlan(arch, weights, {**plan, index: v}) for v in order}
        measured = time_runners(
            runners,
            arch.input_shape,
            deadline,
            batches,
            index,
            parallel_min_batch=parallel_min_batch,
        )
        if measured is None:
            break
        timings[f"in model {index}"] = measured[0]
        noise = max(noise, measured[1])
        plan[index] = pick(order, measured[0])
    return plan, noise


def _weight_bytes(arch: Architecture, block: Block, weights: dict, variant: str) -> int:
    """Bytes of packed weights `block` reads with `variant`."""
    runner = _block_runner(arch, block, weights, variant)
    return sum(step.weight_bytes() for step in runner.steps)


def measure_chunk(
    arch: Architecture,
    weights: dict,
    plan: Plan,
    chunks: tuple[int, ...],
    deadline: float,
    parallel_min_batch: int = 0,
) -> tuple[int, dict[str, Rounds], float]:
    """(chunk, timings, noise as in `time_block`): the most images a pass of `plan` runs at
    once (`InferencePlan.chunk`). From the first of `chunks` (the default), for each larger
    size in turn the whole model runs a batch of that size in chunks of the best so far and in
    one piece, timed as `time_block` times a layer, and the larger chunk becomes the best when
    it is faster by CHUNK_MARGIN. A size that ties does not end the search: fashion_mnist at
    256 images on an Intel Xeon took 5,374 / 5,373 / 5,199 / 5,030 us in chunks of 32 / 64 /
    128 / 256, and stopping at the first size that did not win kept 32 in 2 of 10 plannings.
    The deadline ends it, keeping the best so far.

    Each chunk pays the pass's fixed costs again (a parallel region per kernel call, the
    first touch of each layer's weights and buffers), and a larger chunk's activations leave
    the caches sooner: which wins depends on the model and the machine's caches. On an Intel
    Xeon (AVX-512, 2 MB of L2 a core), 2 threads, 256 images: lenet5 in chunks of 32 / 64 /
    128 / 256 took 1,717 / 1,516 / 1,429 / 1,385 us, cifar10 21.4 / 20.9 / 21.3 / 23.2 ms,
    strided_rgb128 28.9 / 28.5 / 29.7 / 31.9 ms; at 64 images pointwise_wide took 4.37 ms in
    one piece against 4.50 in two chunks (medians of 5 rounds).
    Timings go under "chunk <size>"."""
    chunk = chunks[0]
    timings: dict[str, Rounds] = {}
    noise = 1.0
    for larger in chunks[1:]:
        runners = {str(c): InferencePlan(arch, weights, plan, chunk=c) for c in (chunk, larger)}
        measured = time_runners(
            runners, arch.input_shape, deadline, (larger,), parallel_min_batch=parallel_min_batch
        )
        if measured is None:
            break
        timings[f"chunk {larger}"], pass_noise = measured
        noise = max(noise, pass_noise)
        times = relative(tuple(runners), measured[0], 0)
        if times[str(larger)] <= times[str(chunk)] * (1 - CHUNK_MARGIN):
            chunk = larger
    return chunk, timings, noise


def plan_for(
    arch: Architecture,
    weights: dict,
    cache_dir: str | os.PathLike | None = None,
    seconds: float | None = None,
    largest_batch: int = BATCH_CHUNK,
    chunk: int = BATCH_CHUNK,
    parallel_min_batch: int = 0,
) -> tuple[Plan, int]:
    """The timed plan for `arch` and the chunk to run it in (`InferencePlan.chunk`), run on
    batches of up to `largest_batch` images, by default in chunks of `chunk`, those below
    `parallel_min_batch` on one thread, on this machine: from this process's memo, the disk
    cache in `plan_cache_dir(cache_dir)`, or by timing (then cached when complete)."""
    chunks = chunk_sizes(largest_batch, chunk, image_activation_bytes(arch))
    if not _choices(arch) and len(chunks) == 1:
        return default_plan(arch), chunk
    seconds = PLAN_SECONDS if seconds is None else seconds
    batches = timing_batches(largest_batch, chunk)
    key = plan_key(arch, batches, parallel_min_batch, chunks)
    with _memo_lock:  # one model planned at a time: concurrent timings would disturb each other
        if key in _memo:
            plan, chosen = _memo[key]
            return dict(plan), chosen
        directory = plan_cache_dir(cache_dir)
        with _directory_lock(directory):  # other processes (server workers) wait, then read
            plan, chosen = _cached_or_timed(
                arch, weights, directory, key, seconds, batches, parallel_min_batch, chunks
            )
        _memo[key] = plan, chosen
        return dict(plan), chosen


def compile_candidates(
    arch: Architecture, weights: dict, batches: tuple[int, ...], parallel_min_batch: int = 0
) -> float:
    """Run every layer's every variant alone at each of `batches` (a layer's serial and parallel
    kernels, and the paths of larger batches, differ), each on as many threads as it is timed
    on, twice (the second run tells how long a larger batch would take: one that would take
    more than COMPILE_RUN_SECONDS is skipped); returns the seconds taken. Where numba's disk
    cache lacks the kernels this compiles them, else it loads them. Before, with compiling
    inside the clock, a fresh clone's fashion_mnist ran out of time on each of its first three
    starts (the second compiled for 12.8 s the variants the first had not reached, and started
    in 13.2 s), and the first plan was cached on the fourth (Intel Xeon, 2 threads). With this:
    the first start took 54 s instead of 41 (53 s compiling), planned in 0.92 s and cached the
    plan; the second started in 0.57 s; with the kernels compiled and no plan cached, a start
    takes 1.4-1.5 s. Last, the whole model with its default variants, the same way: a step of
    several layers (`layers.dense.DenseChainStep`) may run kernels its layers alone do not."""
    start = time.perf_counter()
    threads = numba.get_num_threads()

    def runners() -> Iterator[InferencePlan]:  # one at a time: each packs weights of its own
        for block, variants in _choices(arch):
            for variant in variants:
                yield _block_runner(arch, block, weights, variant)
        yield InferencePlan(arch, weights)

    try:
        for runner in runners():
            shape = runner.architecture.input_shape
            per_image = 0.0  # seconds a run took per image, once compiled
            for n in batches:
                if n * per_image > COMPILE_RUN_SECONDS:
                    break  # a large layer: its larger batches compile within the clock
                numba.set_num_threads(1 if one_thread(n, parallel_min_batch) else threads)
                x = np.zeros((n, *shape), np.float32)
                runner.run(x)  # compiles or loads the kernels
                ran = time.perf_counter()
                runner.run(x)
                per_image = (time.perf_counter() - ran) / n
    finally:
        numba.set_num_threads(threads)
    return time.perf_counter() - start


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the cache directory where one can be taken (best effort: an
    unwritable directory is planned without)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def _cached_or_timed(
    arch: Architecture,
    weights: dict,
    directory: Path,
    key: str,
    seconds: float,
    batches: tuple[int, ...],
    parallel_min_batch: int,
    chunks: tuple[int, ...],
) -> tuple[Plan, int]:
    cached = read_cached(directory, key, arch, chunks)
    if cached is not None:
        return cached
    if seconds > 0:
        took = compile_candidates(arch, weights, batches, parallel_min_batch)
        if took > 1.0:  # a first start on this machine: say where the time went
            log.info("kernel variants of %s compiled in %.1f s", arch.name, took)
    start = time.perf_counter()
    plan, timings, noise = measure_plan(arch, weights, seconds, batches, parallel_min_batch)
    chunk = chunks[0]
    if noise is not None:  # the time left, or CHUNK_SECONDS, chooses the chunk
        deadline = max(start + seconds, time.perf_counter() + CHUNK_SECONDS)
        chunk, chunk_timings, chunk_noise = measure_chunk(
            arch, weights, plan, chunks, deadline, parallel_min_batch
        )
        timings.update(chunk_timings)
        noise = max(noise, chunk_noise)
    took = time.perf_counter() - start
    if noise is None:
        note = " (out of time: the rest keeps the defaults; not cached)"
    elif noise > NOISE_LIMIT:
        note = f" (a busy machine, median call {noise:.1f}x the fastest: not cached)"
    else:
        note = ""
    log.info(
        "kernel plan for %s in %.2f s%s: %s, chunks of %d images",
        arch.name,
        took,
        note,
        plan,
        chunk,
    )
    if not note:
        record = {
            "noise": noise,
            "model": arch.name,
            "plan": plan,
            "chunk": chunk,
            "seconds": {str(key): rounds for key, rounds in timings.items()},
            "batches": batches,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_cached(directory, key, record)
    return plan, chunk
