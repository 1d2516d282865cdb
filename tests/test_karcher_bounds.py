"""karcher's iteration is bounded: an unreachable tol is clamped (one warning per run), max_iter is honoured per
tensor (one warning naming the tensors that hit it), and an iteration that stops improving stops."""

import math
import time

import pytest
import torch
from safetensors.torch import save_file

import mergesmith.methods.karcher as karcher_module
from mergesmith.cli import main
from mergesmith.demo import tiny_dir
from mergesmith.methods import METHODS

PUBLISHED = """merge_method: karcher
models:
  - model: {tiny}/base
  - model: {tiny}/addition
  - model: {tiny}/reverse
  - model: {tiny}/sort
parameters:
  max_iter: 20000
  tol: 1e-9
dtype: bfloat16
"""


def run(recipe, out, capsys):
    """The warnings (stderr lines) of `mergesmith run`."""
    with pytest.raises(SystemExit) as e:
        main(["run", str(recipe), str(out), "--quiet"])
    assert e.value.code == 0
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]


class Steps:
    """Counts karcher's iterations: each one takes one dot product per direction."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = karcher_module.dot64

        def counting(a, b, *args, **kw):
            self.calls += 1
            return real(a, b, *args, **kw)

        monkeypatch.setattr(karcher_module, "dot64", counting)


def spread(n=3, shape=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_the_published_recipe_finishes_in_seconds_with_one_warning(tmp_path, capsys):
    recipe = tmp_path / "karcher.yml"
    recipe.write_text(PUBLISHED.format(tiny=tiny_dir()))
    t0 = time.monotonic()
    warnings = run(recipe, tmp_path / "out", capsys)
    assert time.monotonic() - t0 < 30
    clamped = [w for w in warnings if "tol 1e-09 is below what float32 iterations reach" in w]
    assert len(clamped) == 1 and "below 1e-06: 39 tensors (" in clamped[0], warnings
    assert not any("max_iter" in w for w in warnings)  # every tensor converged, long before 20000 steps
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_tensor_that_hits_max_iter_is_named_once_with_a_count(tmp_path, capsys):
    """Two tensors differ between the models (neither converges in 2 steps), one is the same in all (converges at
    once): one warning for the run, naming the two."""
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        g = torch.Generator().manual_seed(i)
        save_file(
            {
                "a.weight": torch.randn(8, 8, generator=g),
                "b.weight": torch.ones(4, 4),
                "c.weight": torch.randn(6, 5, generator=g),
            },
            str(folder / "model.safetensors"),
        )
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: karcher\nmodels:\n"
        + "".join(f"  - model: {tmp_path / f'm{i}'}\n" for i in range(3))
        + "parameters:\n  max_iter: 2\n  tol: 1e-6\n"
    )
    warnings = [w for w in run(recipe, tmp_path / "out", capsys) if "max_iter" in w]
    assert len(warnings) == 1, warnings
    assert "not converged in max_iter 2 iterations" in warnings[0]
    assert warnings[0].endswith("2 tensors (a.weight, c.weight)") or warnings[0].endswith(
        "2 tensors (c.weight, a.weight)"
    )


def test_max_iter_is_honoured_per_tensor(monkeypatch):
    steps = Steps(monkeypatch)
    notes = []
    xs = spread()
    METHODS["karcher"].merge(None, xs, {"max_iter": 3, "tol": 1e-6}, [{}] * 3, report=notes.append)
    assert steps.calls == 3 * 3
    assert notes == [
        "karcher: not converged in max_iter 3 iterations (the tangent norm stayed above 1e-06); the "
        "last iterate is used (raise max_iter to go on)"
    ]


def test_a_converged_mean_stops_and_is_the_karcher_mean(monkeypatch):
    """With max_iter 100000 the iteration stops at convergence: the result's tangent (recomputed in float64 here)
    is below the float32 floor."""
    steps = Steps(monkeypatch)
    notes = []
    xs = spread(shape=(64, 32))
    out = METHODS["karcher"].merge(None, xs, {"max_iter": 100000, "tol": 1e-9}, [{}] * 3, report=notes.append)
    assert steps.calls < 3 * 50 and len(notes) == 1 and "tol 1e-09 is below" in notes[0]
    m = out.double().reshape(-1) / out.double().norm()
    us = [x.double().reshape(-1) / x.double().norm() for x in xs]
    tangent = sum(
        (math.acos(float(m @ u)) / math.sin(math.acos(float(m @ u)))) * (u - float(m @ u) * m) / 3 for u in us
    )
    assert float(tangent.norm()) < 1e-6
    assert torch.allclose(out.double().norm(), sum(x.double().norm() for x in xs) / 3, rtol=1e-6)


def test_an_iteration_that_stops_improving_stops(monkeypatch):
    """Below float32's floor no step brings the tangent norm down: the iteration stops after STALL steps without a
    new low, not after max_iter."""
    monkeypatch.setattr(karcher_module, "TOL_FLOOR", 1e-30)
    steps = Steps(monkeypatch)
    notes = []
    METHODS["karcher"].merge(
        None, spread(shape=(64, 32)), {"max_iter": 100000, "tol": 1e-20}, [{}] * 3, report=notes.append
    )
    assert steps.calls <= 3 * 100
    assert any("stopped falling above tol 1e-20" in n for n in notes), notes


def test_max_iter_accepts_published_recipes_and_stays_bounded():
    m = METHODS["karcher"]
    assert m.param("max_iter").range.high == 100000 and m.param("max_iter").default == 10
