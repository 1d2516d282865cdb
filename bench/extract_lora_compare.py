"""How faithful an extracted LoRA is: `mergesmith extract-lora` vs `mergekit-extract-lora`, on the bundled tiny family.

    python bench/extract_lora_compare.py                      # addition expert vs base, ranks 4 8 16 32
    python bench/extract_lora_compare.py --ranks 8 --skill sort
    python bench/extract_lora_compare.py --mergekit /path/to/mergekit-extract-lora
    python bench/extract_lora_compare.py --linear-only        # also the linear weights alone (no modules_to_save)

Both tools run with their defaults at `--max-rank R` (mergekit from /work/mkvenv/bin, or --mergekit; skipped with a
note when absent). Each adapter is then judged by PEFT itself, not by either tool: the base is loaded in float32,
PeftModel.from_pretrained applies the adapter, and
- delta error: ||D_adapter - D||_F / ||D||_F over every tensor together, D = FT - BASE, D_adapter = what
  merge_and_unload() gives minus BASE (float64);
- linear error: the same over the linear weights only (what a LoRA factor pair can hold);
- max |Δlogit|: the largest |logit(FT) - logit(BASE + adapter)| over every position of the skill's held-out prompts,
  each wrapped in the tokenizer's chat template; rms Δlogit: the root mean square of the same differences.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

DEFAULT_MERGEKIT = Path("/work/mkvenv/bin/mergekit-extract-lora")
# what mergesmith extract-lora held before it saved embeddings, head and norms: the linear weights only
LINEAR_ONLY = ["-e", "embed_tokens", "-e", "lm_head", "--skip-undecomposable"]


def extract(tool: str, exe: Optional[Path], ft: Path, base: Path, out: Path, rank: int) -> float:
    """Run one tool; returns seconds."""
    args = ["--model", str(ft), "--base-model", str(base), "--out-path", str(out), "--max-rank", str(rank)]
    ours = [sys.executable, "-m", "mergesmith", "extract-lora", *args]
    cmd = {"mergesmith": ours, "mergesmith, linear only": ours + LINEAR_ONLY, "mergekit": [str(exe), *args]}[tool]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - t0


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def prompts(ft: Path, skill: str) -> List[torch.Tensor]:
    from transformers import AutoTokenizer

    from mergesmith.skills import eval_set

    tok = AutoTokenizer.from_pretrained(str(ft))
    out = []
    for p, _ in eval_set(skill):
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        out.append(tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def logits(model, ids: List[torch.Tensor]) -> List[torch.Tensor]:
    return [model(input_ids=x).logits[0].double() for x in ids]


def delta_errors(got: Dict[str, torch.Tensor], ft: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor]):
    """(whole-delta relative error, linear-weights-only relative error), float64."""
    from mergesmith.params import is_embedding

    linear = {n for n, t in ft.items() if n.endswith(".weight") and t.dim() == 2 and not is_embedding(n)}
    num = {True: 0.0, False: 0.0}
    den = {True: 0.0, False: 0.0}
    for n, f in ft.items():
        d = f.double() - base[n].double()
        e = got[n].double() - f.double()
        num[n in linear] += float(e.pow(2).sum())
        den[n in linear] += float(d.pow(2).sum())
    whole = ((num[True] + num[False]) / (den[True] + den[False])) ** 0.5
    return whole, (num[True] / den[True]) ** 0.5


@torch.no_grad()
def judge(adapter: Path, base: Path, ft_sd, base_sd, ids, ft_logits):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    diff = torch.cat([(a - b).flatten() for a, b in zip(logits(pm, ids), ft_logits)])
    merged = {k: v for k, v in pm.merge_and_unload().state_dict().items()}
    whole, lin = delta_errors(merged, ft_sd, base_sd)
    return whole, lin, float(diff.abs().max()), float(diff.pow(2).mean().sqrt())


def main() -> None:
    import transformers

    from mergesmith.demo import tiny_dir

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--skill", default="addition")
    ap.add_argument("--mergekit", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--linear-only", action="store_true", help="also mergesmith with " + " ".join(LINEAR_ONLY))
    a = ap.parse_args()
    ft, base = tiny_dir() / a.skill, tiny_dir() / "base"
    tools = (
        ["mergesmith"]
        + (["mergekit"] if a.mergekit.exists() else [])
        + (["mergesmith, linear only"] if a.linear_only else [])
    )
    if not a.mergekit.exists():
        print(f"note: {a.mergekit} not found; mergekit skipped", file=sys.stderr)
    ft_model = load(ft)
    ft_sd = {k: v.clone() for k, v in ft_model.state_dict().items()}
    base_sd = {k: v.clone() for k, v in load(base).state_dict().items()}
    ids = prompts(ft, a.skill)
    ft_logits = logits(ft_model, ids)
    print(f"{a.skill} vs base, {len(ids)} chat prompts; judged by PEFT on a float32 base\n")
    print(
        "| rank | tool | delta error (all tensors) | linear-weights error | max abs logit diff | rms logit diff "
        "| adapter KiB | s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in a.ranks:
            for tool in tools:
                out = Path(tmp) / f"{tool.replace(' ', '')}-{r}"
                secs = extract(tool, a.mergekit, ft, base, out, r)
                whole, lin, dl, rms = judge(out, base, ft_sd, base_sd, ids, ft_logits)
                kib = sum(f.stat().st_size for f in out.glob("adapter_model.*")) / 1024
                print(
                    f"| {r} | {tool} | {whole:.6f} | {lin:.6f} | {dl:.4f} | {rms:.5f} | {kib:.0f} | {secs:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
