"""The torch-only code paths that `--device cuda` takes, run on the CPU: they must give the numpy paths' bytes.

On a GPU the kernels, the counter-based RNG (SplitMix64 in int64 torch ops), the stable sorts (torch.sort instead
of packed numpy keys), the top-k selections (kthvalue instead of np.partition) and the L1 sums (torch float64
instead of numpy's) run in torch. Here the switches (`sparsify.numpy_path`, `rng.numpy_path`) are turned off so the
same torch code runs on the CPU, whole-tensor and in row blocks. What this cannot show is CUDA's own arithmetic;
test_run.py::test_cuda_gives_the_same_bytes_as_cpu does, where a GPU is present.
"""

import pytest

from helpers import SEED_RECIPE, run_recipe
from test_run import digest, write_recipe


@pytest.mark.parametrize("method", ["della_linear", "ties", "dare_ties", "breadcrumbs_ties"])
@pytest.mark.parametrize("blocks", [False, True])
def test_device_paths_give_the_cpu_bytes(tmp_path, fam, monkeypatch, method, blocks):
    import mergesmith.plan as plan_module
    from mergesmith.methods import rng, sparsify

    if blocks:
        monkeypatch.setattr(plan_module, "BLOCK_ELEMENTS", 1000)
    recipe = write_recipe(tmp_path, fam, SEED_RECIPE.replace("merge_method: della_linear", f"merge_method: {method}"))
    run_recipe(str(recipe), str(tmp_path / "numpy"), seed=5)
    calls = {"sparsify": 0, "rng": 0}

    def off(kind):
        def f(_):
            calls[kind] += 1
            return False

        return f

    monkeypatch.setattr(sparsify, "numpy_path", off("sparsify"))
    monkeypatch.setattr(rng, "numpy_path", off("rng"))
    run_recipe(str(recipe), str(tmp_path / "torch"), seed=5)
    assert calls["sparsify"] > 0 and (calls["rng"] > 0) == (method != "ties" and method != "breadcrumbs_ties")
    assert digest(tmp_path / "numpy") == digest(tmp_path / "torch")
