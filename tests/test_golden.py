"""Output bytes pinned: the sha256 of the weights every bundled recipe writes (seed 1).

These digests were recorded from the engine before its internals were reorganized; a change that alters them
changes what users get from an unchanged recipe, and must be deliberate (and the digests re-recorded with it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from helpers import run_recipe
from mergesmith.demo import method_recipes, recipe_path, tiny_dir

GOLDEN = {
    # its KL is float32 softmax and log as mergekit takes them: torch's AVX2 and AVX-512 kernels round them apart
    "arcee_fusion": {
        "AVX512": "c6c12910c9ddd782a17b1e63ee4ef1ec923dbd268d09a932d4b6986c9755409a",
        "AVX2": "94d619cef50dc8ca90a438572fa84b591d2bc2b7797dc8446f229f4027c40007",
    },
    "karcher": "7c5cf4c935402fc6bf9f6a04df14b3ec1537db875751109c9ecfd06f64505722",
    "model_stock": "569d301ff681d73e33a3bf92e820f96c2fe3f5593cc9c3ab2d2f7b1342313555",
    "multislerp": "6ffc7c9b759f3edb9c25e4277eade2866b2fe767e20b9b27489e32b42521aff6",
    "nearswap": "ef60b859797de1101e81376709028e17ba0cd8dea349667dd261c3fcad127a4d",
    "nuslerp": "261a5d50607b7f0c7743b45e8e0048f67f60f47891c52cc0880b51010044c209",
    "passthrough": "7321d38a32c426f93299eb618631cd93d733515f8f8a0e0a4305428f9af2cc37",
    "ram": "65627fe6f920845ec7273d00a2885df4db9eb95577cf99c3b14e8606994c2ed5",
    "ramplus_tl": "ad441627266e3e0a635afa2494bb5552920f7bef18e76e59c663beffff920ee6",
    "sce": "f6335295ab8a1d9e1fdbde18f95ac04726b8cbab7080907d3a241569f7525557",
    "slerp": "bf35700b040cc2ef8433fba0f192fe2cbfcfd3f09ee4f6bbc57dfc70aca9eacd",
    "stellar-della_linear": "2bde5b7512b817b90c37aaa50b7a9a6669c9051e6e3886acc67f071a3b6b43ac",
    "stellar-della": "7adaa639a2a34b323e52f93d1ff000e7de6644512efdca407b750708546d18f0",
    "stellar-ties": "729a4df6a0ad036635a6cc77290e7ea1c89d3c108e2067716257e8fbf81c6f77",
    "stellar-dare_ties": "c73b8b511a5762392db433ef17a4e43a86da14b4cd704ab3b5649b3255fd52c6",
    "stellar-dare_linear": "10da16dbdd36189660eab748f9b91cd18f94f201df357a91106c477dcdc87227",
    "stellar-breadcrumbs": "c0bbeb693c7ed8eb5827c686802b952f4c211926db7227f175eb190e15fae472",
    "stellar-breadcrumbs_ties": "068871ef9d4f825f60d0b30aafc7692592acc221b664b37ce8236dd0c8a5ede7",
    "stellar-task_arithmetic": "c4a18635fbd38e87c5ea661e2a4f425e9576897863f0852428542835136d9fe6",
}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def recipe_for(case: str, tmp: Path) -> Path:
    """The bundled recipe of a case; `stellar-M` is the seed recipe with merge_method M (paths made absolute)."""
    if not case.startswith("stellar-"):
        return method_recipes()[case]
    text = recipe_path().read_text(encoding="utf-8").replace("tiny/", f"{tiny_dir()}/")
    r = tmp / f"{case}.yml"
    r.write_text(text.replace("merge_method: della_linear", f"merge_method: {case[len('stellar-') :]}"))
    return r


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_output_bytes_are_pinned(case, tmp_path):
    out = tmp_path / "out"
    want = GOLDEN[case]
    if isinstance(want, dict):
        want = want.get(torch.backends.cpu.get_cpu_capability())
        if want is None:
            pytest.skip(f"{case}: no digest pinned for torch's {torch.backends.cpu.get_cpu_capability()} kernels")
    run_recipe(str(recipe_for(case, tmp_path)), str(out), seed=1)
    assert digest(out) == want


def test_every_bundled_recipe_is_pinned():
    assert set(method_recipes()) <= set(GOLDEN)
