"""Named chat templates (Jinja, as transformers' `apply_chat_template` reads them)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

TEMPLATES: Dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    # mergekit's exaone.jinja, without the indentation and line breaks between its tags: transformers keeps those
    # (trim_blocks drops only a newline right after a block tag), so mergekit's file renders stray spaces and
    # newlines into every turn
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


# A `chat_template:` file must look like a template, and lie in the recipe's folder or an input model's folder: the
# template goes into the output's tokenizer_config.json, which people publish (a path to a token must not).
TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt")
MAX_TEMPLATE = 1 << 20


def _read_template(path: Path) -> str:
    from mergesmith.errors import MergeError
    from mergesmith.io.index import read_capped

    raw = read_capped(path, MAX_TEMPLATE, "chat template")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def template_of(folder: Path) -> Optional[str]:
    """The chat template a model folder carries (chat_template.jinja, else tokenizer_config.json), or None. Both
    are read through safe_member: a link leading out of the folder is refused, never read."""
    from mergesmith.io.index import has_member, member_json, safe_member

    if has_member(folder, "chat_template.jinja"):
        return _read_template(safe_member(folder, "chat_template.jinja"))
    if has_member(folder, "tokenizer_config.json"):
        t = member_json(folder, "tokenizer_config.json").get("chat_template")
        if isinstance(t, str):
            return t
    return None


def _auto(folders: List[Path], base_folder: Optional[Path]) -> Optional[str]:
    """The template most input models carry (the base's on a tie), or None."""
    found = [t for t in (template_of(f) for f in folders) if t]
    if not found:
        return None
    counts = Counter(found)
    top = max(counts.values())
    base_t = template_of(base_folder) if base_folder else None
    if base_t and counts.get(base_t) == top:
        return base_t
    return next(t for t in found if counts[t] == top)


def _template_file(spec: str, roots: List[Path], where: str) -> Optional[str]:
    """The template file `spec` names (relative: to the recipe's folder, else the working directory), when it has
    a template's suffix and, links followed, lies in one of `roots`; None when there is no such file."""
    from mergesmith.errors import MergeError
    from mergesmith.io.index import lies_inside

    p = Path(spec).expanduser()
    found = next((c for c in ([p] if p.is_absolute() else [roots[0] / p, Path.cwd() / p]) if os.path.lexists(c)), None)
    if found is None:
        return None
    target = found.resolve()
    # the name given and the file it leads to (a Hub cache blob has no suffix) both look like a template
    if found.suffix.lower() not in TEMPLATE_SUFFIXES or (
        target.suffix.lower() not in TEMPLATE_SUFFIXES and target.parent.name != "blobs"
    ):
        raise MergeError(
            f"{where}: chat_template file {spec} is not a template file ({', '.join(TEMPLATE_SUFFIXES)}); "
            "refused, as the template is written into the output"
        )
    if not any(lies_inside(r, target) for r in roots):
        raise MergeError(
            f"{where}: chat_template file {spec} lies outside the recipe's folder and the models' "
            "folders; refused (copy it next to the recipe)"
        )
    return _read_template(target)


def choose_template(
    spec: str, folders: List[Path], base_folder: Optional[Path], recipe_dir: Path, where: str
) -> Optional[str]:
    """Resolve a recipe's `chat_template:` (line `where`): a name, `auto`, an inline Jinja string, or a template
    file in `recipe_dir` or one of the models' `folders`."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec == "auto":
        return _auto(folders, base_folder)
    if "{%" in spec or "{{" in spec:
        return spec
    text = _template_file(spec, [recipe_dir, *folders], where)
    if text is not None:
        return text
    from mergesmith.errors import MergeError, did_you_mean

    raise MergeError(
        f"{where}: chat_template '{spec}' is not a known name{did_you_mean(spec, [*TEMPLATES, 'auto'])}, "
        "a template file, or a Jinja string (known: " + ", ".join([*TEMPLATES, "auto"]) + ")"
    )
