"""The bench scripts run end to end and print their tables (tiny settings; no timing checked).

The README's performance numbers come from these scripts at their default settings; this only
keeps them runnable as the library changes. The scripts run at the same time, four at once,
in one module fixture (each mostly one core's work on these tiny settings); each test reads
its script's output.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.program_runs import REPO, run_concurrently

TINY = ["--model=resnet_v2_tiny", "--image_size=16", "--batch_size=4"]

pytestmark = pytest.mark.slow

BENCH_FLAGS = {
    "attack.py": [*TINY, "--repetitions=1", "--dtypes=float32",
                  "--attacks=pgd_16_2_3,pgdll_16_2_3", "--apgd=apgdce_16_3",
                  "--autoattack=autoattack_16_3_20", "--strong_batch_size=4"],
    "train_step.py": [*TINY, "--repetitions=1", "--dtypes=float32", "--fit_steps=1"],
    "eval.py": ["--model=resnet_v2_tiny", "--image_size=16", "--eval_batch_size=4",
                "--clean_examples=8", "--adv_examples=8", "--repetitions=1",
                "--attacks=clean,pgd_16_2_2"],
    "memory.py": [*TINY, "--steps=1", "--dtypes=float32,bfloat16"],
    "data_pipeline.py": ["--model=resnet_v2_tiny", "--tiny_records=64", "--imagenet_records=16",
                         "--imagenet_shards=2", "--batch_size=4", "--num_batches=2",
                         "--imagenet_image_size=32"],
    "profile_gradient.py": [*TINY, "--repetitions=1"],
    "tf_parts.py": ["--model=resnet_v2_tiny", "--image_size=16", "--repetitions=1"],
}

# Inception v3's training steps run its auxiliary head, whose kernel needs 299 px and up.
TOO_SMALL = "train_step.py, image too small"
TOO_SMALL_FLAGS = ["--model=inception_v3", "--image_size=107", "--batch_size=2",
                   "--dtypes=float32", "--rows=stepll"]


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory) -> dict:
    """{script: ProgramRun} of every bench script of :data:`BENCH_FLAGS`."""
    runs = {script: (f"bench/{script}", flags) for script, flags in BENCH_FLAGS.items()}
    runs[TOO_SMALL] = ("bench/train_step.py", TOO_SMALL_FLAGS)
    return run_concurrently(runs, str(tmp_path_factory.mktemp("bench")), check=False,
                            max_at_once=4)


@pytest.fixture
def run_bench(bench_runs):
    """The stdout of one bench script's run, after checking it ran and printed its header."""
    def output(script: str) -> str:
        result = bench_runs[script]
        assert result.returncode == 0, result.stderr[-3000:]
        assert "machine: " in result.stdout and "TensorFlow " in result.stdout
        return result.stdout
    return output


def table_rows(output: str, header_start: str) -> list[list[str]]:
    """The rows under the table whose header line starts with ``header_start``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def numbers(row: list[str]) -> list[float]:
    return [float(cell) for cell in row if re.fullmatch(r"-?\d+(\.\d+)?", cell)]


def test_attack_bench_prints_a_row_per_attack_and_dtype(run_bench):
    output = run_bench("attack.py")
    rows = table_rows(output, "attack")
    assert [row[:2] for row in rows] == [["pgd_16_2_3", "float32"], ["pgdll_16_2_3", "float32"]]
    assert all(value > 0 for row in rows for value in numbers(row))
    strong = table_rows(output, "strong attack")
    assert [row[:2] for row in strong] == [
        ["apgdce_16_3", "4"], ["ART_APGD_matched", "4"], ["ART_APGD_defaults", "4"],
        ["autoattack_16_3_20", "4"]]
    ours, *art, autoattack = strong
    # s, s/image, / bound, robust after; ART's rows add time / ours, or are all 'n/a'.
    assert len(numbers(ours)) == 5 and 0 <= numbers(ours)[-1] <= 4
    if importlib.util.find_spec("art") is None:  # CI: the bench extra is not installed
        assert all(row[2:] == ["n/a"] * 5 for row in art), art
        assert "ART_APGD_matched: n/a (ART not installed" in output
    else:
        for row in art:
            seconds, per_image, to_bound, to_ours, robust = numbers(row[2:])
            assert per_image == pytest.approx(seconds / 4, abs=0.002)
            assert to_bound > 0 and to_ours > 0 and 0 <= robust <= 4
        assert re.search(r"ART_APGD_matched: ART \S+ AutoProjectedGradientDescent, "
                         r"cross_entropy, max_iter 3, nb_random_init 1, .*\(2\.00 eps\)", output)
    assert len(numbers(autoattack)) == 4  # images, s, s/image, robust after
    # The bound's unit: one pass's ms and images/s, and NITER of them.
    unit = re.search(r"one input-gradient pass \(resnet_v2_tiny, 16x16, batch 4, float32\) = "
                     r"([\d.]+) ms, ([\d.]+) images/s; bound = 3 of them", output)
    assert unit, output
    assert float(unit[2]) == pytest.approx(4 / (float(unit[1]) / 1000), rel=0.02)


# Runs the bench's ART APGD (both settings) on a linear model in a fresh process: bench/attack.py
# defines absl flags that other programs imported by the suite also define.
ART_ON_A_LINEAR_MODEL = """
import json, sys
import numpy as np, tensorflow as tf
from bench.attack import art_apgd
data = np.load(sys.argv[1])
w, x, y, eps = tf.constant(data["w"]), data["x"], data["y"], float(data["eps"])
forward = tf.function(lambda v: tf.matmul(tf.reshape(v, [-1, w.shape[0]]), w))
out = {}
for settings in ("matched", "defaults"):
    np.random.seed(0)
    attack = art_apgd(forward, eps, 10, 2, x.shape[1], len(x), settings)
    adv = attack.generate(x, y=np.eye(2, dtype=np.float32)[y])
    out[settings] = dict(robust=(forward(adv).numpy().argmax(-1) == y).tolist(),
                         linf=float(np.abs(adv - x).max()), eps=attack.eps,
                         max_iter=attack.max_iter, nb_random_init=attack.nb_random_init,
                         eps_step=attack.eps_step)
print(json.dumps(out))
"""


def test_art_apgd_peer_finds_exactly_the_analytic_non_robust_points(tmp_path):
    """On a 2-class linear model the minimal L-inf perturbation is margin / ||w_y - w_o||_1:
    ART's APGD, as the bench sets it up, must flip every point closer than eps and no other."""
    if importlib.util.find_spec("art") is None:
        pytest.skip("IBM ART (the bench extra) is not installed")
    from art.attacks.evasion import AutoProjectedGradientDescent

    rng = np.random.default_rng(0)
    size, eps = 2, 32 / 255  # apgdce_16 on the bounds (-1, 1)
    w = rng.normal(size=(size * size * 3, 2)).astype(np.float32)
    # Inside [-0.5, 0.5] the eps box never meets the bounds, so clipping plays no part.
    x = rng.uniform(-0.5, 0.5, (400, size, size, 3)).astype(np.float32)
    logits = x.reshape(len(x), -1) @ w
    y = logits.argmax(-1)
    distance = np.abs(logits[:, 0] - logits[:, 1]) / np.abs(w[:, 0] - w[:, 1]).sum()
    near, far = np.flatnonzero(distance < 0.8 * eps), np.flatnonzero(distance > 1.25 * eps)
    assert len(near) >= 5 and len(far) >= 3, (len(near), len(far))
    keep = np.concatenate([near[:5], far[:3]])
    np.savez(tmp_path / "linear.npz", w=w, x=x[keep], y=y[keep], eps=eps)
    run = subprocess.run(
        [sys.executable, "-c", ART_ON_A_LINEAR_MODEL, str(tmp_path / "linear.npz")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    art_defaults = {name: p.default for name, p in
                    inspect.signature(AutoProjectedGradientDescent.__init__).parameters.items()}
    expected = {"matched": (1, 2 * eps), "defaults": (art_defaults["nb_random_init"],
                                                      art_defaults["eps_step"])}
    for settings, (restarts, first_step) in expected.items():
        result = results[settings]
        assert result["robust"] == [False] * 5 + [True] * 3, settings
        assert result["linf"] <= eps + 1e-6, settings
        assert (result["nb_random_init"], result["eps_step"]) == pytest.approx(
            (restarts, first_step)), settings
        assert result["max_iter"] == 10 and result["eps"] == pytest.approx(eps)


def test_train_step_bench_prints_gradient_pass_and_every_step_row(run_bench):
    output = run_bench("train_step.py")
    (gradient,) = table_rows(output, "input-gradient pass")
    assert gradient[0] == "float32"
    milliseconds, rate = numbers(gradient)
    # images/s is the batch (4) over the pass's time (3 decimals, or 1 above 100).
    assert milliseconds > 0 and rate * milliseconds / 1000 == pytest.approx(4, rel=0.02)
    rows = table_rows(output, "step")
    assert [row[0] for row in rows] == ["ALP", "Step-LL", "LLR", "AdvProp", "ensemble", "clean"]
    assert all(numbers(row) and all(v > 0 for v in numbers(row)) for row in rows)
    # The ensemble row: images/s, s/step and its ratios to the bound, the clean, ALP and
    # Step-LL steps (no Keras fit column).
    assert rows[4][:6] == ["ensemble", "stepll_16,", "1", "static", "source", "float32"]
    assert len(rows[4][6:]) == 6 and all(float(cell) > 0 for cell in rows[4][6:]), rows[4]


def test_train_step_bench_ensemble_row_ran_its_frozen_static_source(run_bench):
    output = run_bench("train_step.py")
    note = re.search(r"ensemble, float32: the static source made the adversarial examples of "
                     r"(\d+) of the row's (\d+) steps .* equal its checkpoint after them: (\w+)",
                     output)
    assert note, output[-2000:]
    from_static, steps = int(note.group(1)), int(note.group(2))
    assert steps == 2  # one warm-up and one timed round
    assert from_static >= 1  # the row timed the static source's attack at least once
    assert note.group(3) == "yes"  # frozen: still its checkpoint's values (TF's reader)


def test_train_step_bench_refuses_an_image_size_the_model_cannot_train_on(bench_runs):
    result = bench_runs[TOO_SMALL]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.last_line.startswith("--image_size=107 for --model=inception_v3: ")
    assert "AuxLogits" in result.last_line


def test_eval_bench_prints_rate_time_and_bound_ratio_per_attack(run_bench):
    output = run_bench("eval.py")
    rows = table_rows(output, "adv_method")
    assert [row[0] for row in rows] == ["clean", "pgd_16_2_2"]
    for row in rows:
        images, rate, seconds, fixed, ratio = numbers(row)
        assert images == 8  # images evaluated
        # images/s is images over s/run (both printed to 3 decimals or 1 above 100).
        assert rate * seconds == pytest.approx(images, rel=0.02)
        assert fixed > 0 and ratio > 0
    assert "bound: clean = one forward pass per batch" in output


def test_memory_bench_prints_rss_before_and_peak_per_dtype(run_bench):
    output = run_bench("memory.py")
    rows = table_rows(output, "dtype")
    assert [row[0] for row in rows] == ["float32", "bfloat16"]
    for row in rows:
        before, peak, added = numbers(row)
        assert peak >= before > 0
        assert added == pytest.approx(peak - before, abs=0.002)  # GiB, 3 decimals
        assert row[-1] == ("yes" if peak < 4 else "NO")


def test_data_pipeline_bench_compares_both_pipelines_with_the_step(run_bench):
    output = run_bench("data_pipeline.py")
    rows = table_rows(output, "dataset")
    assert [row[:2] for row in rows] == [["tiny_imagenet", "64"], ["imagenet", "32"]]
    assert all(value > 0 for row in rows for value in numbers(row))


def test_gradient_profile_attributes_time_to_forward_and_backward_convolutions(run_bench):
    output = run_bench("profile_gradient.py")
    # Family names contain spaces: the two numbers are the last cells.
    families = {" ".join(row[:-2]): (float(row[-2]), float(row[-1]))
                for row in table_rows(output, "family")}
    assert {"conv forward", "conv backward (input)"} <= set(families), families
    assert families["conv forward"][0] > 0 and families["conv backward (input)"][0] > 0
    # Shares of the summed op time: they add up to 100% (up to rounding).
    assert sum(share for _, share in families.values()) == pytest.approx(100.0, abs=0.5)
    op_types = {row[0]: float(row[-1]) for row in table_rows(output, "op type")}
    assert any("Conv2DBackpropInput" in name for name in op_types), op_types


def test_tf_parts_bench_finds_tensorflows_numbers_and_names(run_bench):
    output = run_bench("tf_parts.py")
    rows = table_rows(output, "piece")
    assert [row[0] for row in rows] == ["moving", "RMSProp", "checkpoint"]
    assert [row[-1] for row in rows[:2]] == ["0.000", "0.000"]  # largest difference
    assert rows[2][-2:] == ["same", "names"]
