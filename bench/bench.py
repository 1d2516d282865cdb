"""mergesmith vs mergekit, side by side, on the same files.

    python bench/bench.py            # Nemo-shaped: hidden 5120, intermediate 14336, vocab 131072, 1 layer, 3.2 GB each
    python bench/bench.py --small    # under a minute
    python bench/bench.py --layers 1 4 --no-mergekit   # memory vs depth
    python bench/bench.py --methods all                # the 20 methods both tools have
    python bench/bench.py --threads-compare            # also one core (taskset, --threads 1)
    python bench/bench.py --layers 8 --cold            # inputs evicted from the page cache before every run
    python bench/bench.py --device-compare cuda        # also on the GPU, its bytes compared with the CPU's

Builds a checkpoint family (random base; fine-tunes = base + small dense noise + sparse larger changes; bf16; sharded
like Hub checkpoints), then times on the same files: the I/O floor (read every input byte, write one output-sized
file as mergesmith writes it, whole pages with O_DIRECT, and fsync it; twice, each from the page cache state the timed
runs start from, the lower counts; the notes give the reading alone, since a merge overlaps its writes with the rest
and can take less than the whole floor),
`mergesmith run` and `mergekit-yaml` (0.1.5 from PyPI, installed by this script into bench/.mkvenv, skipped with a
note when it cannot be installed) on the seed recipe (della_linear) and on linear, ties and dare_linear, or on every
method (`recipe` says how each uses the family).
Reports wall time and the peak resident memory of the process tree (anonymous and total), compares the linear and
ties outputs of both tools with a float64 reference, and writes bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
MKVENV = HERE / ".mkvenv"
WEIGHTS = [0.3, 0.1, 0.4]
DENSITIES = [0.25, 0.4, 0.5]


# ----------------------------------------------------------------------------------------------- the model family


def shapes(hidden, inter, vocab, layers, kv_heads=8, head_dim=128, heads=32):
    q = heads * head_dim
    kv = kv_heads * head_dim
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def build_family(
    root: Path, hidden, inter, vocab, layers, n_ft, shard_bytes=2_000_000_000, heads=32, kv_heads=8, head_dim=128
) -> List[Path]:
    from safetensors.torch import save_file

    spec = shapes(hidden, inter, vocab, layers, kv_heads, head_dim, heads)
    cfg = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 1024,
    }
    paths = []
    for m in range(n_ft + 1):
        folder = root / ("base" if m == 0 else f"ft{m}")
        paths.append(folder)
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        shards: List[Dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, shape in spec:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if len(shape) == 1:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=g).mul_(0.02)
            if m:
                g2 = torch.Generator().manual_seed(zlib.crc32(f"{name}/{m}".encode()))
                t.add_(torch.randn(shape, generator=g2).mul_(0.0005))  # small dense change
                sparse = torch.rand(shape, generator=g2) < 0.01
                t.add_(torch.randn(shape, generator=g2).mul_(0.01).mul_(sparse))  # sparse larger changes
            t = t.to(torch.bfloat16)
            nbytes = t.numel() * 2
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        n = len(shards)
        wm = {}
        for i, sd in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(sd, str(folder / fname), metadata={"format": "pt"})
            wm.update({k: fname for k in sd})
        total = sum(t.numel() * 2 for sd in shards for t in sd.values())
        del shards
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
        )
        (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return paths


SPARSE = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
# every method both tools have: how each recipe uses the family (base + fine-tunes ft1..ft3)
ALL_METHODS = [
    "della_linear", "della", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl", "passthrough",
]  # fmt: skip


def _models(fts: List[Path], weights: bool, densities: bool) -> List[str]:
    lines = ["models:"]
    for p, w, d in zip(fts, WEIGHTS, DENSITIES):
        lines.append(f"  - model: {p}")
        params = ([f"      weight: {w}"] if weights else []) + ([f"      density: {d}"] if densities else [])
        lines += ["    parameters:"] + params if params else []
    return lines


def recipe(method: str, paths: List[Path], work_dtype: str = "bfloat16", layers: int = 1) -> str:
    """The bench recipe of `method` on the family: the seed recipe's weights and densities where the method takes
    them; two-model methods (slerp, nuslerp, nearswap, arcee_fusion) use ft1 (and ft2); passthrough stacks ft1's
    layers."""
    base, fts = paths[0], paths[1:]
    if method == "passthrough":
        lines = ["slices:", "  - sources:", f"      - model: {fts[0]}", f"        layer_range: [0, {layers}]"]
    elif method == "slerp":
        lines = ["models:", f"  - model: {base}", f"  - model: {fts[0]}", "parameters:", "  t: 0.4"]
    elif method == "nuslerp":
        lines = _models(fts[:2], True, False)
    elif method in ("nearswap", "arcee_fusion"):
        lines = ["models:", f"  - model: {fts[0]}"] + (["parameters:", "  t: 0.0001"] if method == "nearswap" else [])
    else:
        lines = _models(fts, method not in ("karcher", "model_stock", "ram", "ramplus_tl"), method in SPARSE)
    lines.append(f"merge_method: {method}")
    if method not in ("linear", "passthrough", "nuslerp", "karcher", "multislerp"):
        lines.append(f"base_model: {base}")
    if method.startswith("della"):
        lines += ["parameters:", "  epsilon: 0.05", "  lambda: 1"]
    if method == "sce":
        lines += ["parameters:", "  select_topk: 0.5"]
    lines.append(f"dtype: {work_dtype}")
    if work_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- measuring


def _tree_rss(pid: int) -> Tuple[int, int]:
    """(anonymous, total) resident bytes of a process and its descendants."""
    anon = total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return anon, total


def measure(cmd: List[str], env: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
    """Wall time and peak memory of the process tree; rc None when it ran past `timeout` (then killed)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = [0, 0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            a, t = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], a), max(peak[1], t)
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = None
    done.set()
    th.join()
    wall = time.monotonic() - t0
    if rc:
        print(out.decode(errors="replace")[-3000:], file=sys.stderr)
    return {"wall": wall, "anon": peak[0], "rss": peak[1], "rc": rc}


def read_all(paths: List[Path], buf) -> None:
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def write_out(path: Path, nbytes: int, buf) -> None:
    """Write and fsync an nbytes file from buf the way mergesmith's writer does: whole 4 KiB pages with O_DIRECT
    (where the file system takes it), the partial page at the end through the page cache."""
    whole = nbytes // 4096 * 4096
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd, whole = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 0
    try:
        done = 0
        while done < whole:
            done += os.pwrite(fd, memoryview(buf)[: min(whole - done, len(buf))], done)
    except OSError:  # the file system refused a direct write: the rest through the page cache
        whole = done
    finally:
        os.close(fd)
    with open(path, "r+b") as fh:
        fh.seek(whole)
        left = nbytes - whole
        while left > 0:
            left -= fh.write(memoryview(buf)[: min(left, len(buf))])
        fh.flush()
        os.fsync(fh.fileno())


def io_floor(paths: List[Path], out_bytes: int, scratch: Path) -> Tuple[float, float]:
    """(seconds to read every input byte, then write and fsync an output-sized file; of which the reading): a merge
    overlaps its writes with its reads and compute, so where the disk writes slowly it can take less than this."""
    t0 = time.monotonic()
    buf = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT needs
    read_all(paths, buf)
    read = time.monotonic() - t0
    write_out(scratch, out_bytes, buf)
    scratch.unlink()
    buf.close()
    return time.monotonic() - t0, read


def ensure_mergekit() -> Optional[str]:
    exe = MKVENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return str(exe)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(MKVENV)], check=True)
        pip = [str(MKVENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["mergekit==0.1.5"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"mergekit could not be installed ({e}); skipping it", file=sys.stderr)
        return None
    return str(exe) if exe.exists() else None


# ----------------------------------------------------------------------------------------------- comparing outputs


def _ordered(x: torch.Tensor) -> torch.Tensor:
    i = x.view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -32768 - i, i)


def _rows(folder: Path, name: str) -> int:
    from mergesmith.io.index import index_model

    return index_model("m", folder).tensors[name].shape[0]


def compare(method: str, paths: List[Path], ours: Path, theirs: Path) -> dict:
    """Share of elements where the two outputs are within one bf16 step, and which is closer to float64."""
    from safetensors import safe_open

    def opener(folder):
        idx = (
            json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            if (folder / "model.safetensors.index.json").exists()
            else None
        )
        handles = {}

        def get(name, rows=None):
            f = idx[name] if idx else "model.safetensors"
            if f not in handles:
                handles[f] = safe_open(str(folder / f), "pt")
            if rows is None:
                return handles[f].get_tensor(name)
            return handles[f].get_slice(name)[rows[0] : rows[1]]

        return get

    ins = [opener(p) for p in paths]
    a_get, b_get = opener(ours), opener(theirs)
    names = json.loads((paths[0] / "model.safetensors.index.json").read_text())["weight_map"].keys()
    n = within = ours_closer = theirs_closer = 0
    within_clear = n_clear = refs_within = ours_closer_clear = theirs_closer_clear = 0
    wn = [3, 1, 4]  # weights 0.3, 0.1, 0.4 as integers over 10: exact in float64
    skipped = 0
    for name in names:
        if method == "linear":  # elementwise: in row blocks, so a 671M-element embedding fits in memory
            shape = ins[0](name, (0, 1)).shape
            full = a_get(name) if len(shape) == 1 else None
            total_rows = full.shape[0] if full is not None else _rows(paths[0], name)
            step = max(1, (1 << 24) // max(1, shape[1] if len(shape) > 1 else 1))
            for r in range(0, total_rows, step):
                xs = [g(name, (r, r + step)).double() for g in ins[1:]]
                ref = sum(w * x for w, x in zip(wn, xs)) / sum(wn)
                aa, bb = a_get(name, (r, r + step)), b_get(name, (r, r + step))
                within += ((_ordered(aa) - _ordered(bb)).abs() <= 1).sum().item()
                ea, eb = (aa.double() - ref).abs(), (bb.double() - ref).abs()
                ours_closer += (ea < eb).sum().item()
                theirs_closer += (eb < ea).sum().item()
                n += aa.numel()
            continue
        a, b = a_get(name), b_get(name)
        if a.numel() > 100_000_000:  # whole-tensor top-k in float64 would not fit in this machine's memory
            skipped += a.numel()
            continue
        base = ins[0](name).double()
        xs = [g(name).double() for g in ins[1:]]
        # Two float64 references that differ only in which tied magnitudes at a model's density cut they keep:
        # by lowest index (mergesmith's rule) and by highest index. Both are exact top-k trims; where their tie
        # group straddles the cut, any choice is as right as another ("ambiguous" elements).
        refs = []
        amb = torch.zeros(base.numel(), dtype=torch.bool)
        for from_end in (False, True):
            deltas = []
            for x, w, d in zip(xs, wn, DENSITIES):
                delta = (x - base).flatten()
                mag = delta.abs()
                k = max(1, int(d * delta.numel()))
                order = torch.sort(mag, descending=True, stable=True).indices
                cut = mag[order[k - 1]]
                del order
                keep = mag > cut
                tied = (mag == cut).nonzero().squeeze(1)
                need = k - int(keep.sum())
                keep[tied[len(tied) - need :] if from_end else tied[:need]] = True
                if len(tied) > need:
                    amb[tied] = True
                deltas.append((w * delta * keep).reshape(base.shape))
                del delta, mag, keep, tied
            elected = torch.where(sum(deltas) >= 0, 1.0, -1.0)
            num = sum(torch.where(d.sign() == elected, d, 0.0) for d in deltas)
            den = sum(torch.where(d.sign() == elected, float(w), 0.0) for d, w in zip(deltas, wn))
            refs.append(base + num / torch.where(den == 0, 1.0, den))
            del deltas, num, den, elected
        ref, ref_end = refs
        amb = amb.reshape(base.shape)
        close = (_ordered(a) - _ordered(b)).abs() <= 1
        within += close.sum().item()
        within_clear += (close & ~amb).sum().item()
        n_clear += (~amb).sum().item()
        refs_within += (
            ((_ordered(ref.to(torch.bfloat16)) - _ordered(ref_end.to(torch.bfloat16))).abs() <= 1).sum().item()
        )
        ea, eb = (a.double() - ref).abs(), (b.double() - ref).abs()
        ours_closer += (ea < eb).sum().item()
        theirs_closer += (eb < ea).sum().item()
        # outside the ambiguous elements the two references are equal, so "closer" has one meaning there
        ours_closer_clear += ((ea < eb) & ~amb).sum().item()
        theirs_closer_clear += ((eb < ea) & ~amb).sum().item()
        n += a.numel()
        del a, b, base, xs, ref, ref_end, refs, ea, eb, amb, close
    return {
        "within_one_step": within / n,
        "ours_closer": ours_closer / n,
        "theirs_closer": theirs_closer / n,
        "skipped": skipped,
        "within_clear": within_clear / n_clear if n_clear else None,
        "ambiguous": 1 - n_clear / n if n_clear else None,
        "refs_within": refs_within / n if n_clear else None,
        "ours_closer_clear": ours_closer_clear / n_clear if n_clear else None,
        "theirs_closer_clear": theirs_closer_clear / n_clear if n_clear else None,
    }


# ----------------------------------------------------------------------------------------------- main


def evict(paths: List[Path]) -> None:
    """Drop the inputs' pages from the page cache (posix_fadvise DONTNEED), so the next read comes from the disk."""
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def prepare_cache(paths: List[Path], a) -> None:
    """Every timed run starts from the same page cache: the inputs evicted (--cold) or read once, untimed."""
    if a.cold:
        subprocess.run(["sync"], check=False)
        evict(paths)
    elif not a.no_warm:
        read_all(paths, bytearray(64 << 20))


def _commands(a, method: str, rfile: Path, root: Path, mk: Optional[str]) -> List[Tuple[str, Optional[List[str]]]]:
    ms = [sys.executable, "-m", "mergesmith", "run", str(rfile), str(root / f"out-ms-{method}"), "--seed", "1"]
    ms += ["--quiet", "--overwrite"]
    runs = [(f"mergesmith {method}", ms)]
    if a.threads_compare:  # one core: pinned, one thread
        runs.append((f"mergesmith {method}, 1 core (--threads 1)", ["taskset", "-c", "0"] + ms + ["--threads", "1"]))
    if a.device_compare:  # the same merge computed on another device (a GPU): its bytes are compared below
        dev = ms[:5] + [str(root / f"out-dev-{method}")] + ms[6:] + ["--device", a.device_compare]
        runs.append((f"mergesmith {method} on {a.device_compare}", dev))
    mkc = [mk, str(rfile), str(root / f"out-mk-{method}"), "--random-seed", "1", "--lazy-unpickle"] if mk else None
    runs.append((f"mergekit {method}", mkc))
    return runs


def _timed(what: str, cmd: List[str], paths: List[Path], root: Path, method: str, a) -> dict:
    if what.startswith("mergekit") and (root / f"out-mk-{method}").exists():
        shutil.rmtree(root / f"out-mk-{method}")
    prepare_cache(paths, a)
    r = measure(cmd, timeout=a.mergekit_timeout if what.startswith("mergekit") else None)
    r["status"] = "ok" if r["rc"] == 0 else ("timeout" if r["rc"] is None else f"failed (exit {r['rc']})")
    return r


def _compare_note(tag: str, method: str, c: dict) -> str:
    return (
        f"{tag} {method}: mergesmith and mergekit within one bf16 step on "
        f"{c['within_one_step']:.4%} of elements; closer to the float64 reference: mergesmith "
        f"{c['ours_closer']:.2%}, mergekit {c['theirs_closer']:.2%} (rest: equal)"
        + (
            f"; {c['ambiguous']:.2%} of elements sit in a tie group that straddles a model's "
            f"density cut (any choice there is an exact top-k): outside them the two agree on "
            f"{c['within_clear']:.4%} and the closer to float64 there is mergesmith on "
            f"{c['ours_closer_clear']:.3%}, mergekit on {c['theirs_closer_clear']:.3%}; "
            f"two float64 references that break those ties from "
            f"opposite ends agree on {c['refs_within']:.4%}"
            if c["within_clear"] is not None
            else ""
        )
        + (f"; {c['skipped'] / 1e6:.0f} M elements of tensors over 100 M elements not compared" if c["skipped"] else "")
    )


def same_bytes(cpu: Path, other: Path) -> str:
    """Whether two runs' outputs hold the same tensor bytes; where not, how many elements differ and by how much."""
    from safetensors import safe_open

    files, theirs = (sorted(p.name for p in d.glob("*.safetensors")) for d in (cpu, other))
    if not theirs:
        return "the device run wrote no output (see its status)"
    if files != theirs:
        return f"the device run wrote other shard files ({theirs} against the CPU run's {files})"
    if all(filecmp.cmp(cpu / f, other / f, shallow=False) for f in files):
        return "the device run wrote the CPU run's bytes"
    differ = total = 0
    worst = 0.0
    for f in files:
        with safe_open(str(cpu / f), "pt") as x, safe_open(str(other / f), "pt") as y:
            for name in x.keys():
                u, v = x.get_tensor(name).float(), y.get_tensor(name).float()
                total += u.numel()
                differ += int((u != v).sum())
                worst = max(worst, float((u - v).abs().max()) if u.numel() else 0.0)
    return f"the device run differs from the CPU run on {differ} of {total} elements (largest difference {worst:.3g})"


def bench_family(a, dims: dict, layers: int, mk: Optional[str], rows: list, notes: list) -> None:
    tag = f"{'small' if a.small else 'nemo'}-{layers}l"
    root = WORK / tag
    t0 = time.monotonic()
    paths = build_family(root, layers=layers, n_ft=a.fine_tunes, **dims)
    print(f"[{tag}] family ready ({time.monotonic() - t0:.0f} s)", flush=True)
    size = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    floors = []
    for _ in range(2):  # the lower of two, each from the page cache state the timed runs start from
        prepare_cache(paths, a)
        floors.append(io_floor(paths, size, root / "io-floor.bin"))
    floor = min(f[0] for f in floors)
    notes.append(
        f"{tag} I/O floor: {floors[0][0]:.1f} s and {floors[1][0]:.1f} s, the lower is used (reading the inputs: "
        f"{floors[0][1]:.1f} s and {floors[1][1]:.1f} s)"
    )
    what = "I/O floor (read inputs" + (" from a cold cache" if a.cold else "") + " + write output)"
    rows.append((tag, what, "-", floor, 0, 0, floor))
    print(f"[{tag}] io floor {floor:.1f} s", flush=True)
    each = []
    for method in ALL_METHODS if a.methods == ["all"] else a.methods:
        rfile = root / f"{method}.yml"
        rfile.write_text(recipe(method, [p.resolve() for p in paths], a.work_dtype, layers))
        if a.floor_each:  # the machine's speed drifts over a long run: each method against a floor taken beside it
            prepare_cache(paths, a)
            floor, read = io_floor(paths, size, root / "io-floor.bin")
            each.append((floor, read))
        for what, cmd in _commands(a, method, rfile, root, mk):
            if cmd is None:
                continue
            r = _timed(what, cmd, paths, root, method, a)
            rows.append((tag, what, r["status"], r["wall"], r["anon"], r["rss"], floor))
            print(f"[{tag}] {what}: {r['wall']:.1f} s ({r['wall'] / floor:.1f}x floor), anon "
                  f"{r['anon'] / 2**30:.2f} GiB, rss {r['rss'] / 2**30:.2f} GiB {r['status']}", flush=True)  # fmt: skip
        if mk and not a.no_compare and method in ("linear", "ties"):
            notes.append(
                _compare_note(tag, method, compare(method, paths, root / f"out-ms-{method}", root / f"out-mk-{method}"))
            )
            print(notes[-1], flush=True)
        if a.device_compare:
            notes.append(f"{tag} {method}: {same_bytes(root / f'out-ms-{method}', root / f'out-dev-{method}')}")
            print(notes[-1], flush=True)
        for side in ("ms", "mk", "dev"):  # outputs are the size of a model: keep the disk for the next method
            shutil.rmtree(root / f"out-{side}-{method}", ignore_errors=True)
    if each:
        floors, reads = [f for f, _ in each], [r for _, r in each]
        notes.append(
            f"{tag} I/O floor before each method (its ratio's floor): {min(floors):.1f} to {max(floors):.1f} s "
            f"(reading the inputs: {min(reads):.1f} to {max(reads):.1f} s)"
        )


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="hidden 1024, intermediate 2816, vocab 32768")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--layers", type=int, nargs="+", default=[1])
    ap.add_argument("--fine-tunes", type=int, default=3)
    ap.add_argument(
        "--methods", nargs="+", default=["della_linear", "linear", "ties", "dare_linear"], help="or: all (20 methods)"
    )
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-timeout", type=float, default=None, help="stop a mergekit run after this many seconds")
    ap.add_argument(
        "--work-dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="the recipes' dtype (what mergekit computes in; mergesmith always computes in float32); "
        "float32 adds out_dtype: bfloat16",
    )
    ap.add_argument("--no-compare", action="store_true")
    ap.add_argument(
        "--no-warm",
        action="store_true",
        help="do not read the inputs (untimed) before each timed run; runs then start with whatever "
        "page cache the previous run left (mergekit's 23 GiB della_linear evicts it)",
    )
    ap.add_argument("--cold", action="store_true", help="evict the inputs from the page cache before every timed run")
    ap.add_argument("--floor-each", action="store_true", help="measure the I/O floor again before each method")
    ap.add_argument(
        "--threads-compare", action="store_true", help="also run mergesmith pinned to one core with --threads 1"
    )
    ap.add_argument(
        "--device-compare",
        metavar="DEVICE",
        help="also run mergesmith with --device DEVICE (cuda) and compare its output's bytes with the CPU run's",
    )
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--append", action="store_true", help="add this run's table to --out instead of replacing it")
    return ap.parse_args()


def _accelerator() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return "CPU only"


def report(a, dims: dict, rows: list, notes: list, mk: Optional[str]) -> None:
    import platform

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines = [
        f"# mergesmith vs mergekit ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {os.cpu_count()} cores, {mem / 2**30:.0f} GiB memory, {platform.machine()}, {_accelerator()}. "
        f"Model: hidden {dims['hidden']}, intermediate {dims['inter']}, vocab {dims['vocab']}, bf16, "
        f"{a.fine_tunes} fine-tunes + base. Command: `python bench/bench.py {' '.join(sys.argv[1:])}`.",
        "",
        "| family | run | status | wall (s) | x I/O floor | peak anon RSS (GiB) | peak RSS (GiB) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for tag, what, status, wall, anon, rss, floor in rows:
        lines.append(
            f"| {tag} | {what} | {status} | {wall:.1f} | {wall / floor:.2f} | {anon / 2**30:.2f} | {rss / 2**30:.2f} |"
        )
    if not mk:
        lines += ["", "mergekit: not run (--no-mergekit, or it could not be installed)."]
    lines += [""] + [f"- {n}" for n in notes]
    if a.append and Path(a.out).exists():
        lines = Path(a.out).read_text().rstrip("\n").splitlines() + ["", "---", ""] + lines
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    a = _args()
    dims = (
        dict(hidden=1024, inter=2816, vocab=32768, heads=8, kv_heads=2, head_dim=128)
        if a.small
        else dict(hidden=a.hidden, inter=a.inter, vocab=a.vocab)
    )
    mk = None if a.no_mergekit else ensure_mergekit()
    rows: list = []
    notes: list = []
    for layers in a.layers:
        bench_family(a, dims, layers, mk, rows, notes)
    report(a, dims, rows, notes, mk)


if __name__ == "__main__":
    main()
