"""FP8 checkpoints (F8_E4M3 / F8_E5M2), with DeepSeek-V3-style block scales (`X.weight_scale_inv`) or without:
read dequantized, merged, and written in the recipe's dtype, against float64 references computed here."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mergesmith.plan as plan_module
from helpers import make_mistral, read_folder
from helpers import run_recipe
from mergesmith.errors import MergeError
from mergesmith.io.index import index_model

BLOCK = [24, 40]  # neither divides the tiny model's 64, 96 or 320: partial blocks at the edges
E4M3_MAX = 448.0


def block_scales(w: torch.Tensor, block) -> torch.Tensor:
    """Per block, amax / 448 (float64): the block's largest magnitude maps to E4M3's largest value."""
    br, bc = block
    rows, cols = -(-w.shape[0] // br), -(-w.shape[1] // bc)
    s = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for j in range(cols):
            s[i, j] = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max().double() / E4M3_MAX
    return s.clamp(min=1e-12)


def dequantized64(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """q * scale in float64, each scale applied to its block (element (r, c) takes scale[r // br, c // bc])."""
    br, bc = block
    r = torch.arange(q.shape[0]) // br
    c = torch.arange(q.shape[1]) // bc
    return q.double() * scale.double()[r][:, c]


def quantize(sd, block):
    """The projection weights of a state dict in FP8 with block scales (the rest stays); returns the tensors to
    save and the float64 values they stand for."""
    out, ref = {}, {}
    for name, w in sd.items():
        if name.endswith("proj.weight"):
            scale = block_scales(w, block).float()
            br, bc = block
            expanded = scale.double()[torch.arange(w.shape[0]) // br][:, torch.arange(w.shape[1]) // bc]
            q = (w.double() / expanded).float().to(torch.float8_e4m3fn)
            out[name], out[name + "_scale_inv"] = q, scale
            ref[name] = dequantized64(q, scale, block)
        else:
            out[name] = w.to(torch.bfloat16)
            ref[name] = out[name].double()
    return out, ref


def save_fp8(folder, tensors, quantization_config=None, split_scales=True):
    """The tensors as a safetensors checkpoint (scales in a second shard, as large checkpoints may have them), with
    config.json's quantization_config."""
    cfg = json.loads((folder / "config.json").read_text())
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg))
    scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")} if split_scales else {}
    rest = {k: v for k, v in tensors.items() if k not in scales}
    shards = {"model-00001-of-00002.safetensors": rest, "model-00002-of-00002.safetensors": scales}
    for fname, part in shards.items():
        if part:
            save_file(part, str(folder / fname), metadata={"format": "pt"})
    weight_map = {k: f for f, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An FP8 model with block scales, an FP8 model without (E5M2), and a bf16 model; float64 references."""
    root = tmp_path_factory.mktemp("fp8")
    sd = make_mistral(root / "fp8", seed=0, inter=96, dtype=torch.float32)
    tensors, ref_fp8 = quantize(sd, BLOCK)
    save_fp8(
        root / "fp8",
        tensors,
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": BLOCK},
    )
    other = make_mistral(root / "bf16", seed=1, inter=96, from_state=sd, noise=0.01)
    plain = {
        k: v.to(torch.float8_e5m2) if k.endswith("proj.weight") else v.to(torch.bfloat16)
        for k, v in make_mistral(root / "plain", seed=2, inter=96, from_state=sd, noise=0.01).items()
    }
    save_fp8(root / "plain", plain)
    return {
        "root": root,
        "fp8": ref_fp8,
        "bf16": {k: v.double() for k, v in other.items()},
        "plain": {k: v.double() for k, v in plain.items()},
    }


def merge(models, tmp_path, names, dtype="float32"):
    """A linear merge of the named models with equal weights (`dtype:` unless None)."""
    lines = ["merge_method: linear", "models:"]
    for n in names:
        lines += [f"  - model: {models['root'] / n}", "    parameters:", f"      weight: {1 / len(names)}"]
    tmp_path.mkdir(exist_ok=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text("\n".join(lines + ([f"dtype: {dtype}"] if dtype else [])) + "\n")
    out = tmp_path / "out"
    run_recipe(str(recipe), str(out))
    return out


@pytest.mark.parametrize("block_elements", [1 << 22, 1000])
def test_block_scaled_fp8_merges_as_its_dequantized_values(models, tmp_path, monkeypatch, block_elements):
    """Whole tensors, and rows in blocks of 10 to 15 rows (which cut through the 24-row scale blocks)."""
    monkeypatch.setattr(plan_module, "BLOCK_ELEMENTS", block_elements)
    out = merge(models, tmp_path, ["fp8", "bf16"])
    merged = read_folder(out)
    assert not any(k.endswith("_scale_inv") for k in merged)
    assert set(merged) == set(models["bf16"])
    for name, t in merged.items():
        ref = (models["fp8"][name] + models["bf16"][name]) / 2
        assert t.dtype == torch.float32
        np.testing.assert_allclose(t.double().numpy(), ref.numpy(), rtol=3e-7, atol=1e-9, err_msg=name)
    # the quantized weights really were scaled: their raw FP8 codes are far from the values
    name = "model.layers.0.mlp.up_proj.weight"
    codes = load_file(str(models["root"] / "fp8" / "model-00001-of-00002.safetensors"))[name].double()
    assert (codes - models["fp8"][name]).abs().max() > 10
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("torch_dtype", cfg.get("dtype")) == "float32"


def test_without_a_dtype_fp8_weights_are_written_as_bfloat16(models, tmp_path):
    out = merge(models, tmp_path, ["fp8", "bf16"], dtype=None)
    merged = read_folder(out)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    name = "model.layers.1.self_attn.q_proj.weight"
    ref = ((models["fp8"][name] + models["bf16"][name]) / 2).float().to(torch.bfloat16)
    assert torch.equal(merged[name], ref)  # one rounding from the float32 merge: bf16(float32(x)) here
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_plain_fp8_tensors_are_read_as_their_values(models, tmp_path):
    out = merge(models, tmp_path, ["plain", "bf16"], dtype=None)
    merged = read_folder(out)
    name = "model.layers.0.self_attn.o_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    np.testing.assert_allclose(
        merged[name].double().numpy(), ((models["plain"][name] + models["bf16"][name]) / 2).numpy(), rtol=2**-8
    )
    assert torch.equal(
        read_folder(merge(models, tmp_path / "alone", ["plain"]))[name].double(), models["plain"][name]
    )  # a model alone: its FP8 values, exactly


def test_reads_of_rows_and_leading_blocks_are_dequantized(models):
    idx = index_model("fp8", models["root"] / "fp8")
    name = "model.layers.1.mlp.down_proj.weight"  # 64 x 96, blocks of 24 x 40
    assert idx.tensors[name].dtype == torch.bfloat16 and f"{name}_scale_inv" not in idx.tensors
    ref = models["fp8"][name]
    assert torch.equal(idx.read(name).double(), ref.float().double())
    assert torch.equal(idx.read(name, rows=(23, 49)).double(), ref[23:49].float().double())
    assert torch.equal(idx.read(name, take=(30, 50)).double(), ref[:30, :50].float().double())
    idx.close()


def test_scales_of_the_wrong_shape_are_refused(models, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(models["root"] / "fp8", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [32, 32]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        MergeError,
        match=r"_scale_inv is torch.float32 \[\d+, \d+\], but the block scales of .* in "
        r"blocks of \[32, 32\] are floats of shape",
    ):
        index_model("bad", bad)
    cfg["quantization_config"]["weight_block_size"] = "128"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match='weight_block_size is "128", not \\[rows, columns\\]'):
        index_model("bad", bad)
