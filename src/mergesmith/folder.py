"""The rest of the output folder: config.json, generation config, tokenizer, chat template, recipe copy, model card.

No network calls. A base without tokenizer files gets a warning and no tokenizer, never a failure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

from mergesmith.errors import MergeError, warn
from mergesmith.io.index import FP8, has_member, model_folder, read_json_object, safe_member
from mergesmith.version import __version__
from mergesmith.io.resolve import is_hub_id
from mergesmith.plan import Plan
from mergesmith.stacks import anatomy, update_counts
from mergesmith.vocab import TOKENIZER_FILES, check_tokenizer_files


def _dtype_name(plan: Plan) -> str:
    float_dtypes = {t.out_dtype for t in plan.tasks if t.out_dtype.is_floating_point}
    if len(float_dtypes) == 1:
        return str(next(iter(float_dtypes))).replace("torch.", "")
    return "float32"


def _template(plan: Plan) -> str:
    """The model whose config.json the output takes."""
    return plan.template or plan.base_model or next(iter(plan.models))


def config_text(plan: Plan) -> Optional[str]:
    """The output's config.json, None when the template model has none."""
    tref = _template(plan)
    cfg = plan.models[tref].config
    if cfg is None:
        return None
    # the layer counts and per-layer lists of the stacks the recipe changed follow their new layers
    cfg = dict(
        update_counts(
            cfg,
            anatomy(plan.models[tref].tensors),
            tref,
            dict(plan.stacks),
            {ref: idx.config for ref, idx in plan.models.items()},
        )
    )
    if plan.vocabulary is not None:
        cfg["vocab_size"] = plan.vocabulary.size
    name = _dtype_name(plan)
    keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = name
    q = cfg.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "fp8" and not any(t.out_dtype in FP8 for t in plan.tasks):
        del cfg["quantization_config"]  # FP8 weights were read dequantized, and written in the recipe's dtype
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def write_config(plan: Plan, out: Path) -> None:
    template = _template(plan)
    text = config_text(plan)
    if text is None:
        warn(f"model {template} has no config.json; the output has none either")
        return
    (out / "config.json").write_text(text)
    _copy_generation_config(model_folder(plan.models[template]), out)


def _copy_generation_config(folder: Path, out: Path) -> None:
    """generation_config.json, copied only when it is a regular file inside the model folder holding a JSON
    object; else a warning (the output works without it, and a link could lead to any file)."""
    if not has_member(folder, "generation_config.json"):
        return
    try:
        src = safe_member(folder, "generation_config.json")
        read_json_object(src)
    except MergeError as e:
        warn(f"{e}; the output has no generation_config.json")
        return
    shutil.copyfile(src, out / "generation_config.json")


def _tokenizer_source(plan: Plan) -> str:
    """The model whose tokenizer files the output copies."""
    c = plan.recipe.config
    if c.tokenizer_source and c.tokenizer_source not in ("base", "union"):
        return c.tokenizer_source
    return plan.base_model or next(iter(plan.models))


def check_tokenizer(plan: Plan) -> None:
    """Before any work: the tokenizer files the output will copy are regular files of their folder, JSON ones
    objects (a tokenizer the recipe builds was checked when it was read)."""
    if plan.vocabulary is None:
        ref = _tokenizer_source(plan)
        check_tokenizer_files(model_folder(plan.models[ref]), ref)


def copy_tokenizer(plan: Plan, out: Path, chat_template: Optional[str]) -> None:
    if plan.vocabulary is not None:
        plan.vocabulary.tokenizer.save_pretrained(str(out))
    else:
        src_ref = _tokenizer_source(plan)
        files = check_tokenizer_files(model_folder(plan.models[src_ref]), src_ref)  # as at plan time
        if not files:
            warn(f"model {src_ref} has no tokenizer files; the output has no tokenizer")
            return
        for name, src in files:  # copied from where the check resolved them
            shutil.copyfile(src, out / name)
    if chat_template is not None:
        tc_path = out / "tokenizer_config.json"
        tc = read_json_object(tc_path) if tc_path.exists() else {}
        tc["chat_template"] = chat_template
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        (out / "chat_template.json").unlink(missing_ok=True)


def recipe_copy(plan: Plan) -> str:
    header = f"# merged with mergesmith {__version__}\n"
    relative = [
        (ref, idx.path)
        for ref, idx in plan.models.items()
        if idx.lora is None and not Path(ref).is_absolute() and Path(ref).resolve() != idx.path.resolve()
    ]
    if relative:  # where the relative paths pointed (recipe.Recipe.found_at)
        header += "# relative model paths, as found when merging:\n"
        header += "".join(f"#   {ref} -> {path.resolve()}\n" for ref, path in relative)
    return plan.recipe.to_yaml(seed=plan.seed, header=header)


def write_recipe_copy(plan: Plan, out: Path) -> None:
    (out / "mergesmith_config.yml").write_text(recipe_copy(plan), encoding="utf-8")


def model_card(plan: Plan, name: str) -> str:
    refs: List[str] = list(plan.models)
    hub = [r.split("@")[0] for r in refs if is_hub_id(r)]
    front = ["---"]
    if hub:
        front.append("base_model:")
        front += [f"- {h}" for h in hub]
    else:
        front.append("base_model: []")
    front += ["library_name: transformers", "tags:", "- mergesmith", "- merge", "---", ""]
    m = plan.method
    merged = [r for r in plan.recipe.input_models() if r != plan.base_model]
    lines = [
        f"# {name}",
        "",
        f"This is a merge of pre-trained language models created with [mergesmith](https://pypi.org/project/"
        f"mergesmith/) {__version__}.",
        "",
        "## Merge Details",
        "",
        "### Merge Method",
        "",
    ]
    if plan.base_model:
        lines.append(
            f"This model was merged using the [{m.pretty}]({m.url}) merge method using {plan.base_model} as a base."
        )
    else:
        lines.append(f"This model was merged using the [{m.pretty}]({m.url}) merge method.")
    if m.randomized:
        lines += [
            "",
            f"Random choices were drawn from seed {plan.seed}; the same seed reproduces this model byte for byte.",
        ]
    lines += ["", "### Models Merged", "", "The following models were included in the merge:"]
    lines += [f"* {r}" for r in merged]
    lines += [
        "",
        "### Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        plan.recipe.to_yaml(seed=plan.seed).rstrip(),
        "```",
        "",
    ]
    if plan.recipe.pipeline:  # the last stage of a multi-stage recipe (mergesmith.stages): every stage's recipe
        lines += [
            "### Stages",
            "",
            "This model is the last stage of a multi-stage merge, made from this file:",
            "",
            "```yaml",
            plan.recipe.pipeline.rstrip(),
            "```",
            "",
        ]
    return "\n".join(front + lines)


def write_folder(
    plan: Plan, out: Path, name: str, tokenizer: bool = True, card: bool = True, chat_template: Optional[str] = None
) -> None:
    write_config(plan, out)
    if tokenizer:
        copy_tokenizer(plan, out, chat_template)
    write_recipe_copy(plan, out)
    if card:
        (out / "README.md").write_text(model_card(plan, name), encoding="utf-8")


def _file_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def folder_bytes(
    plan: Plan, name: str, tokenizer: bool = True, card: bool = True, chat_template: Optional[str] = None
) -> int:
    """The bytes write_folder writes, for the free-space check: config, recipe copy and card exactly, the tokenizer
    files as large as their source's (every input's, for a built vocabulary)."""
    total = len((config_text(plan) or "").encode("utf-8")) + len(recipe_copy(plan).encode("utf-8"))
    total += _file_bytes(model_folder(plan.models[_template(plan)]) / "generation_config.json")
    if card:
        total += len(model_card(plan, name).encode("utf-8"))
    if tokenizer:
        refs = list(plan.models) if plan.vocabulary is not None else [_tokenizer_source(plan)]
        total += sum(_file_bytes(model_folder(plan.models[r]) / f) for r in refs for f in TOKENIZER_FILES)
        total += 2 * len((chat_template or "").encode("utf-8"))
    return total
