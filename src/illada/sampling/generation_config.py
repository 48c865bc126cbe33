"""A model's own generation defaults, read from the `generation_config.json` beside its weights (the file Hugging
Face checkpoints carry), layered under the user's flags: `SamplingConfig()` < the model's file < flags / options.

Keys understood:
- Hugging Face's `max_new_tokens`, and `temperature` / `top_k` / `top_p` when `do_sample` is true (as in
  transformers, where they are ignored otherwise);
- every `SamplingConfig` knob by its field name (`steps`, `block_length`, `variable_length`, `threshold`, `factor`,
  `cache`, `remasking`, ...), so a diffusion model records how it decodes best;
- `prompt_template`: how a bare prompt is framed for a base model, with `{prompt}` where the text goes (e.g.
  `"Question: {prompt}\\nAnswer:"`); `illada generate` applies it unless `--raw`.
Other keys (token ids, `transformers_version`, beam search, ...) are left to their owners and ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from illada.errors import IlladaError
from illada.sampling.config import SamplingConfig

FILE_NAME = "generation_config.json"
PLACEHOLDER = "{prompt}"
_SAMPLED = ("temperature", "top_k", "top_p")  # applied only with do_sample, as transformers does
_UNSET_BY_FILE = {"seed", "gen_length"}  # a seed is the user's; the budget comes as max_new_tokens


def _knob_names() -> set[str]:
    return {f.name for f in SamplingConfig.user_fields("flag")} - _UNSET_BY_FILE - set(_SAMPLED)


@dataclass(frozen=True)
class GenerationDefaults:
    """What a model's generation_config.json sets: sampler options (field names of `SamplingConfig`, or
    max_new_tokens) and the prompt template of a base model (None: prompts are used as given)."""

    options: dict[str, Any] = field(default_factory=dict)
    prompt_template: str | None = None

    def sampling_config(self) -> SamplingConfig:
        """`SamplingConfig()` with this model's options."""
        return SamplingConfig().replace(**self.options)

    def format_prompt(self, text: str) -> str:
        """`text` framed by the prompt template (unchanged without one, and an empty prompt stays empty)."""
        if self.prompt_template is None or not text:
            return text
        return self.prompt_template.replace(PLACEHOLDER, text)


def parse_generation_config(data: Any, where: str = FILE_NAME) -> GenerationDefaults:
    """The defaults in a parsed generation_config.json; IlladaError naming `where` for a value we cannot use."""
    if not isinstance(data, dict):
        raise IlladaError(f"{where}: expected a JSON object, got {type(data).__name__}")
    options: dict[str, Any] = {}
    if data.get("max_new_tokens") is not None:
        options["max_new_tokens"] = data["max_new_tokens"]
    if data.get("do_sample") is True:
        options.update({k: data[k] for k in _SAMPLED if data.get(k) is not None})
    knobs = _knob_names()
    options.update({k: v for k, v in data.items() if k in knobs and v is not None})
    if isinstance(options.get("stop_strings"), str):
        options["stop_strings"] = (options["stop_strings"],)
    for name in ("variable_length", "forbid_eos"):
        if name in options and not isinstance(options[name], bool):
            raise IlladaError(f"{where}: {name} must be true or false, got {options[name]!r}")
    try:
        SamplingConfig().replace(**options)  # every range and choice checked once, by the config itself
    except (IlladaError, TypeError) as error:
        raise IlladaError(f"{where}: {error}") from None
    template = data.get("prompt_template")
    if template is not None and (not isinstance(template, str) or template.count(PLACEHOLDER) != 1):
        raise IlladaError(f"{where}: prompt_template must be a string with {PLACEHOLDER} exactly once, "
                          f"got {template!r}")
    return GenerationDefaults(options=options, prompt_template=template)


def read_generation_config(directory: str | Path) -> GenerationDefaults:
    """The defaults of the checkpoint in `directory` (none when it has no generation_config.json)."""
    path = Path(directory) / FILE_NAME
    if not path.is_file():
        return GenerationDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IlladaError(f"{path}: not readable JSON ({error})") from None
    return parse_generation_config(data, str(path))
