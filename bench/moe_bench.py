"""Peak memory and wall time of `mergesmith moe` on a checkpoint family built by bench.py.

    python bench/moe_bench.py                                    # Nemo-shaped, 1 layer: gate_mode hidden
    python bench/moe_bench.py --gate-mode hidden random cheap_embed
    python bench/moe_bench.py --small --gate-mode random         # under a minute
    python bench/moe_bench.py --family DIR --results bench/RESULTS.md

Builds (or reuses: an existing family is only read) the family of bench.py's `build_family`, then a 3-expert
Mixtral recipe: base_model = the base, experts = the fine-tunes, a few positive prompts each, dtype bfloat16. The
family has no tokenizer, which the prompt-based gate modes and the routing report need: the base is given one in a
folder of hard links to its weight files (no copy; symbolic links leading out of a model folder are refused by
mergesmith's input checks) with a small tokenizer (the bundled tiny family's, whose ids all lie in the vocabulary).
Each run is `python -m mergesmith moe RECIPE OUT` under bench.py's `measure` (peak resident memory of the process
tree, anonymous and total); the output's index is loaded and layer 0's expert tensors are compared byte for byte
with the experts' MLPs. Prints a markdown table, and with --results puts it at the top of that file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import WORK, build_family, measure, read_all  # noqa: E402

SRC = HERE.parent / "src"
TINY_TOKENIZER = SRC / "mergesmith" / "data" / "tiny" / "base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROMPTS = [
    ["What is 17 + 25?", "Add 304 and 58.", "Compute 9 + 8 + 7."],
    ["Reverse the word planet.", "Spell 'stone' backwards.", "Write 'abc' in reverse order."],
    ["Sort 5, 2, 9, 1.", "Put these in order: pear, fig, apple.", "Sort the letters of 'dcba'."],
]
MIXTRAL_PROJ = {"w1": "gate", "w2": "down", "w3": "up"}


def with_tokenizer(base: Path, tokenizer_from: Path, dest: Path) -> Path:
    """`dest`: the base's weight files as hard links (the same bytes on disk, nothing copied), its config, and the
    tokenizer files of `tokenizer_from`."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(base.glob("*.safetensors")) + [base / "model.safetensors.index.json"]:
        link = dest / f.name
        if link.exists() and os.path.samefile(link, f):
            continue
        link.unlink(missing_ok=True)
        os.link(f, link)  # OSError across file systems: the family must lie on the same one
    shutil.copyfile(base / "config.json", dest / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_from / name, dest / name)
    return dest


def moe_recipe(base: Path, experts: List[Path], gate_mode: str) -> str:
    """A mergekit-moe recipe: the base's attention, each fine-tune's MLP as an expert, 2 experts per token."""
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: bfloat16", "experts_per_token: 2", "experts:"]
    for path, prompts in zip(experts, PROMPTS * len(experts)):
        lines += [f"  - source_model: {path}", "    positive_prompts:"]
        lines += [f"      - {json.dumps(p)}" for p in prompts]
    return "\n".join(lines) + "\n"


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _tensor_bytes(folder: Path) -> Dict[str, int]:
    """Bytes of each tensor of a model folder (from its safetensors headers)."""
    sys.path.insert(0, str(SRC))
    from mergesmith.io.index import index_model

    return {n: t.nbytes for n, t in index_model("m", folder).tensors.items()}


def _getter(folder: Path):
    """name -> tensor of a sharded safetensors folder (or a single model.safetensors), opened lazily."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    wm = json.loads(index.read_text())["weight_map"] if index.exists() else None
    handles: Dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        f = wm[name] if wm else "model.safetensors"
        if f not in handles:
            handles[f] = safe_open(str(folder / f), "pt")
        return handles[f].get_tensor(name)

    return get, wm


def check_output(out: Path, base: Path, experts: List[Path]) -> int:
    """The output's index maps each tensor to the file that holds it; its config is a Mixtral of len(experts)
    experts; layer 0's expert tensors and attention projections are the sources' bytes. Returns how many tensors
    were compared."""
    from safetensors import safe_open

    get, wm = _getter(out)
    assert wm is not None or (out / "model.safetensors").is_file(), f"{out} has neither an index nor one file"
    for f in sorted(set(wm.values()) if wm else []):
        with safe_open(str(out / f), "pt") as h:
            assert set(h.keys()) == {n for n, g in wm.items() if g == f}, f"{f} does not hold what the index says"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == len(experts), cfg
    pairs = []
    for e, src in enumerate(experts):
        for w, proj in MIXTRAL_PROJ.items():
            pairs.append(
                (
                    f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight",
                    src,
                    f"model.layers.0.mlp.{proj}_proj.weight",
                )
            )
    for name in ("q_proj", "o_proj"):
        pairs.append((f"model.layers.0.self_attn.{name}.weight", base, f"model.layers.0.self_attn.{name}.weight"))
    sources = {}
    for out_name, src, src_name in pairs:
        if src not in sources:
            sources[src] = _getter(src)[0]
        a, b = get(out_name), sources[src](src_name)
        assert a.dtype == b.dtype and a.shape == b.shape, (out_name, a.dtype, a.shape, b.dtype, b.shape)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{out_name} differs from {src}/{src_name}"
    gate = get("model.layers.0.block_sparse_moe.gate.weight")
    assert gate.shape == (len(experts), cfg["hidden_size"]) and bool(torch.isfinite(gate.float()).all())
    return len(pairs)


def run_one(gate_mode: str, base: Path, experts: List[Path], root: Path, extra: List[str], keep: bool) -> dict:
    """One `mergesmith moe` under `measure`, its output checked (and removed unless `keep`)."""
    name = f"moe-{gate_mode}-{len(experts)}e" + ("-noreport" if "--no-report" in extra else "")
    recipe = root / f"{name}.yml"
    recipe.write_text(moe_recipe(base, experts, gate_mode))
    out = root / f"out-{name}"
    args = ["--seed", "1", "--quiet", "--overwrite"] + extra
    cmd = [sys.executable, "-m", "mergesmith", "moe", str(recipe), str(out)] + args
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    load_before = os.getloadavg()[0]
    r = measure(cmd, env=env)
    r.update(
        gate_mode=gate_mode,
        experts=len(experts),
        report="--no-report" not in extra,
        load=(load_before, os.getloadavg()[0]),
        cmd=" ".join(["mergesmith moe", recipe.name, out.name] + args),
    )
    if r["rc"] == 0:
        r["out_bytes"] = weight_bytes(out)
        r["compared"] = check_output(out, base, experts)
        if not keep:
            shutil.rmtree(out)
    return r


def table(rows: List[dict], inputs: dict, command: str) -> str:
    """The markdown section of this run."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = 2**30
    lines = [
        f"## `mergesmith moe`: peak memory of a Mixtral of fine-tunes ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {os.cpu_count()} cores, {mem / gib:.0f} GiB memory, {platform.machine()}, CPU only, other work "
        "running (load average in the table: memory is the number here, wall time is noisy). Command: "
        f"`python bench/moe_bench.py {command}`. Inputs ({inputs['family']}): base {inputs['base'] / gib:.2f} GiB, "
        f"each fine-tune {inputs['expert'] / gib:.2f} GiB ({inputs['mlp'] / gib:.2f} GiB of it the MLP), largest "
        f"tensor {inputs['largest'] / gib:.2f} GiB ({inputs['largest'] / 1e9:.2f} GB), bf16; more experts than "
        "fine-tunes take the fine-tunes in turn; page cache warmed before each run.",
        "",
        "| gate mode | experts | routing report | status | wall (s) | peak anon RSS (GiB) | peak RSS (GiB) "
        "| output (GiB) | load avg before/after |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        status = "ok" if r["rc"] == 0 else f"failed (exit {r['rc']})"
        out = f"{r['out_bytes'] / gib:.2f}" if "out_bytes" in r else "-"
        lines.append(
            f"| {r['gate_mode']} | {r['experts']} | {'yes' if r['report'] else 'no'} | {status} | {r['wall']:.1f} | "
            f"{r['anon'] / gib:.2f} | {r['rss'] / gib:.2f} | {out} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    if any("compared" in r for r in rows):
        lines += [
            "",
            "Each output's index maps every tensor to the file that holds it, and layer 0's expert tensors (every "
            "expert's w1/w2/w3) and q_proj, o_proj equal their sources byte for byte. Each run, in "
            f"bench/work/moe-{inputs['family']}/: `{rows[0]['cmd']}` (MODE-Ne[-noreport] and --no-report as in "
            "the row).",
        ]
    return "\n".join(lines) + "\n"


def put_first(path: Path, section: str) -> None:
    """Insert `section` above the first `## ` section of `path` (newest first), or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    path.write_text("".join(lines[:at]) + section + "\n" + "".join(lines[at:]))


def family_inputs(paths: List[Path], tag: str) -> dict:
    """The sizes a reader compares the memory with."""
    base, expert = _tensor_bytes(paths[0]), _tensor_bytes(paths[1])
    return {
        "family": tag,
        "base": weight_bytes(paths[0]),
        "expert": weight_bytes(paths[1]),
        "mlp": sum(v for k, v in expert.items() if ".mlp." in k),
        "largest": max(base.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="hidden 1024, intermediate 2816, vocab 32768")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--family", type=Path, help="the family's folder (default: bench/work/nemo-<layers>l)")
    ap.add_argument(
        "--gate-mode", nargs="+", default=["hidden"], choices=["hidden", "hidden_avg", "cheap_embed", "random"]
    )
    ap.add_argument("--experts", type=int, nargs="+", default=[3], help="numbers of experts (default 3)")
    ap.add_argument(
        "--report", nargs="+", default=["yes"], choices=["yes", "no"], help="with the routing report, without, or both"
    )
    ap.add_argument(
        "--out-shard-size", default="2GB", help="passed on (default 2GB: the output is sharded, with an index)"
    )
    ap.add_argument("--no-warm", action="store_true", help="do not read the inputs (untimed) before each run")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (about 1.3x the base's size each)")
    ap.add_argument("--results", type=Path, help="put the table at the top of this file (e.g. bench/RESULTS.md)")
    a = ap.parse_args()
    dims = (
        dict(hidden=1024, inter=2816, vocab=32768, heads=8, kv_heads=2, head_dim=128)
        if a.small
        else dict(hidden=5120, inter=14336, vocab=131072)
    )
    tag = f"{'small' if a.small else 'nemo'}-{a.layers}l"
    root = a.family or WORK / tag
    paths = build_family(root, layers=a.layers, n_ft=3, **dims)  # an existing family is only read
    work = WORK / f"moe-{tag}"
    base = with_tokenizer(paths[0], TINY_TOKENIZER, work / "base-tokenized")
    inputs = family_inputs(paths, tag)
    rows = []
    for n, mode, report in itertools.product(a.experts, a.gate_mode, a.report):
        if not a.no_warm:
            read_all(paths, bytearray(64 << 20))
        extra = ["--out-shard-size", a.out_shard_size] + (["--no-report"] if report == "no" else [])
        r = run_one(mode, base, [paths[1 + i % (len(paths) - 1)] for i in range(n)], work, extra, a.keep)
        rows.append(r)
        print(
            f"[{tag}] {mode}, {n} experts, report {report}: {r['wall']:.1f} s, anon {r['anon'] / 2**30:.2f} GiB, "
            f"rss {r['rss'] / 2**30:.2f} GiB, exit {r['rc']}",
            flush=True,
        )
    section = table(rows, inputs, " ".join(sys.argv[1:]))
    print(section)
    if a.results:
        put_first(a.results, section)


if __name__ == "__main__":
    main()
