"""Small models and recipes made in the tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer with ChatML special tokens, saved in HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["hello world, merging models is fun", "the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))


def make_mistral(
    folder: Path,
    seed: int,
    layers: int = 2,
    hidden: int = 64,
    inter: int = 128,
    vocab: int = 320,
    dtype=torch.bfloat16,
    shard: Optional[str] = None,
    from_state: Optional[Dict] = None,
    noise: float = 0.0,
    tokenizer: bool = True,
) -> Dict[str, torch.Tensor]:
    """Save a small MistralForCausalLM; returns its state dict (float32 copies)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if from_state is not None:
                p.copy_(from_state[name])
            if noise:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        make_tokenizer(folder)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def read_folder(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: Dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def family(root: Path, n_ft: int = 3, **kw) -> List[Path]:
    """Base + n_ft fine-tunes (base + dense noise), in bf16. Returns [base, ft1, ...]."""
    base = root / "base"
    sd = make_mistral(base, seed=0, **kw)
    paths = [base]
    for i in range(n_ft):
        p = root / f"ft{i + 1}"
        make_mistral(p, seed=10 + i, from_state=sd, noise=0.02, **kw)
        paths.append(p)
    return paths


SEED_RECIPE = """models:
  - model: {ft1}
    parameters:
      weight: 0.3
      density: 0.25
  - model: {ft2}
    parameters:
      weight: 0.1
      density: 0.4
  - model: {ft3}
    parameters:
      weight: 0.4
      density: 0.5
merge_method: della_linear
base_model: {base}
parameters:
  epsilon: 0.05
  lambda: 1
merge_method: della_linear
dtype: bfloat16
"""


def hub_cache(root: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `folder` out in `root` as huggingface_hub's cache does (HF_HUB_CACHE=root): the files' bytes in
    `models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>` relative symlinks to them, `refs/main` holding
    the commit. Returns the snapshot folder."""
    import hashlib
    import os

    repo = root / ("models--" + repo_id.replace("/", "--"))
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(folder)
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        os.replace(f, blobs / digest)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snap


def run_recipe(recipe, out, **options):
    """mergesmith.merge with MergeOptions(progress=False, **options); returns the MergeResult."""
    import mergesmith

    return mergesmith.merge(recipe, out, mergesmith.MergeOptions(progress=False, **options))


class MemoryModel:
    """A model of one in-memory tensor, read by rows like a checkpoint; `reads` collects the rows of every read
    (None: the whole tensor)."""

    def __init__(self, t: torch.Tensor, reads: Optional[list] = None):
        self.t, self.reads = t, (reads if reads is not None else [])

    def read(self, name, rows=None, take=None):
        self.reads.append(rows)
        return self.t if rows is None else self.t[rows[0] : rows[1]]


def through_executor(method, base, xs, block_elements, monkeypatch, shared=None, per=None, keys=None):
    """One tensor through the executor (execute.compute_tensor), in row blocks of about `block_elements`:
    (output, its row blocks, the rows of every read). `method`: a name or a Method; `shared` adds to its
    defaults."""
    import types

    import mergesmith.plan as plan_module
    from mergesmith.execute import compute_tensor
    from mergesmith.methods import METHODS

    m = METHODS[method] if isinstance(method, str) else method
    monkeypatch.setattr(plan_module, "BLOCK_ELEMENTS", block_elements)
    reads: list = []
    models = {f"m{i}": MemoryModel(x, reads) for i, x in enumerate(xs)}
    if base is not None:
        models["base"] = MemoryModel(base, reads)
    ref = plan_module.InputRef
    task = plan_module.TensorTask(
        "t",
        tuple(xs[0].shape),
        torch.float32,
        "merge",
        ref("base", "t") if base is not None else None,
        [ref(f"m{i}", "t") for i in range(len(xs))],
        {**m.defaults(), **(shared or {})},
        per if per is not None else [{}] * len(xs),
        keys if keys is not None else [0] * len(xs),
    )
    plan = types.SimpleNamespace(models=models, method=m, strict=False, vocabulary=None)
    return compute_tensor(plan, task, torch.device("cpu")), plan_module.row_blocks(plan, task), reads


def ref_multislerp(xs, ws, base=None, normalize=True, eps=1e-8):
    """multislerp in float64 numpy (Goddard): the reference the tests hold the kernel to."""
    import math

    import numpy as np

    xs = [x - base if base is not None else x for x in xs]
    ws = np.array(ws) / (np.sum(ws) if normalize else 1.0)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(w * u for w, u in zip(ws, units))
    m = m / np.linalg.norm(m)
    tang = sum(w * (u - np.sum(u * m) * m) for w, u in zip(ws, units))
    tn = np.linalg.norm(tang) + eps
    res = (m * math.cos(tn) + tang * math.sin(tn) / tn) * sum(w * n for w, n in zip(ws, norms))
    return res + base if base is not None else res


def ref_della_mask(d: np.ndarray, u: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    """u < p(rank) with ranks by magnitude within each row, ties by column (np.lexsort), p in float64 then float32
    as the method's table: density - epsilon + 2 epsilon r / (n - 1)."""
    rows, n = d.shape
    keep = np.zeros(d.shape, dtype=bool)
    for r in range(rows):
        order = np.lexsort((np.arange(n), np.abs(d[r])))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        if n == 1:
            p = np.float32(density)
        else:
            p = np.float32(rank * np.float32(2 * epsilon / (n - 1))) + np.float32(density - epsilon)
        keep[r] = u[r] < p
    return keep
