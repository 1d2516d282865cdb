"""Peak resident memory of `mergesmith run` vs. model depth (same width): it should follow the largest tensor.

    python bench/peak_memory.py --hidden 1024 --inter 4096 --vocab 32000 --layers 2 8

Builds a base and three fine-tunes (Mistral tensor names, bf16, random) per depth, runs the seed recipe's
della_linear merge in a child process and prints wall time and the child's peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def mistral_tensors(layers, hidden, inter, vocab, kv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = kv or hidden // 4
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    return {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def build(root: Path, layers, hidden, inter, vocab):
    base = mistral_tensors(layers, hidden, inter, vocab)
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab, "torch_dtype": "bfloat16"}
    paths = []
    for i in range(4):
        p = root / f"m{i}"
        p.mkdir(parents=True)
        g = torch.Generator().manual_seed(100 + i)
        sd = base if i == 0 else {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16)
                                  for k, v in base.items()}
        save_file(sd, str(p / "model.safetensors"), metadata={"format": "pt"})
        (p / "config.json").write_text(json.dumps(cfg))
        paths.append(p)
    recipe = root / "recipe.yml"
    recipe.write_text(
        "models:\n" + "".join(f"  - model: {p}\n    parameters:\n      weight: {w}\n      density: {d}\n"
                              for p, w, d in zip(paths[1:], [0.3, 0.1, 0.4], [0.25, 0.4, 0.5]))
        + f"merge_method: della_linear\nbase_model: {paths[0]}\nparameters:\n  epsilon: 0.05\n  lambda: 1\n"
          "dtype: bfloat16\n")
    largest = max(v.numel() for v in base.values())
    total = sum(v.numel() * 2 for v in base.values())
    return recipe, largest, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    a = ap.parse_args()
    rows = []
    for layers in a.layers:
        with tempfile.TemporaryDirectory() as tmp:
            recipe, largest, total = build(Path(tmp), layers, a.hidden, a.inter, a.vocab)
            code = ("import resource,sys\nfrom mergesmith.cli import main\ntry:\n    main(sys.argv[1:])\n"
                    "except SystemExit as e:\n    r=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                    "    print('MAXRSS', r, file=sys.stderr); raise\n")
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-c", code, "run", str(recipe), str(Path(tmp) / "out"), "--seed", "1",
                                "--quiet"], capture_output=True, text=True)
            wall = time.monotonic() - t0
            if p.returncode:
                sys.exit(p.stderr)
            rss = int(next(ln.split()[1] for ln in p.stderr.splitlines() if ln.startswith("MAXRSS"))) * 1024
            rows.append((layers, total, largest, wall, rss))
    print("| layers | model size (bf16) | largest tensor | wall (s) | peak RSS |")
    print("|---:|---:|---:|---:|---:|")
    for layers, total, largest, wall, rss in rows:
        print(f"| {layers} | {total / 1e6:.0f} MB | {largest / 1e6:.1f} M elements | {wall:.1f} | {rss / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
