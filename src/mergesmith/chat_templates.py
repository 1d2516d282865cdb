"""Named chat templates (Jinja, as transformers' `apply_chat_template` reads them)."""

from __future__ import annotations

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
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
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
}


def template_of(folder: Path) -> Optional[str]:
    """The chat template a model folder carries (chat_template.jinja, else tokenizer_config.json), or None."""
    import json

    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if cfg.exists():
        try:
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError):
            return None
        if isinstance(t, str):
            return t
    return None


def choose_template(spec: str, folders: List[Path], base_folder: Optional[Path]) -> Optional[str]:
    """Resolve a recipe's `chat_template:` (a name, `auto`, a file path or an inline Jinja string)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec == "auto":
        found = [t for t in (template_of(f) for f in folders) if t]
        if not found:
            return None
        counts = Counter(found)
        top = max(counts.values())
        base_t = template_of(base_folder) if base_folder else None
        if base_t and counts.get(base_t) == top:
            return base_t
        return next(t for t in found if counts[t] == top)
    if "{%" in spec or "{{" in spec:
        return spec
    p = Path(spec).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8")
    from mergesmith.errors import MergeError, did_you_mean

    raise MergeError(f"chat_template '{spec}' is not a known name{did_you_mean(spec, [*TEMPLATES, 'auto'])}, "
                     "a file, or a Jinja string (known: " + ", ".join([*TEMPLATES, "auto"]) + ")")
