"""lm-evaluation-harness model `illada` (install: `pip install illada[eval]`).

lm_eval has no plugin discovery for models, so this module must be imported before lm_eval looks the name up:

    python -m illada.lm_eval_adapter run --model illada --model_args pretrained=PATH,method=confidence --tasks ...
    # or, in Python: import illada.lm_eval_adapter; lm_eval.simple_evaluate(model="illada", ...)

model_args: `pretrained` (checkpoint directory or bundled name; default the demo model), `device`, `dtype`,
`method` for loglikelihood (confidence | mc | exact; default mc), `mc_num` (128), `cfg_scale`, `seed`, `add_bos`;
generation: `max_new_tokens` (default 256, or the request's max_gen_toks), `block_length` (32), `steps`,
`variable_length` (true), `threshold`, `cache`, `remasking`, `end_think_boost`, `end_think_power`,
`mask_token_id`.
"""
from __future__ import annotations

import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("illada.lm_eval_adapter needs lm-evaluation-harness: pip install 'illada[eval]'") from error

from illada.errors import IlladaError

_GENERATION_KEYS = ("block_length", "steps", "variable_length", "threshold", "factor", "cache", "remasking",
                    "end_think_boost", "end_think_power", "cfg_scale_generate")


@register_model("illada")
class IlladaLM(LM):
    """A masked diffusion LM for lm_eval: loglikelihood by `method`, generate_until by the sampler."""

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 method: str = "mc", mc_num: int = 128, cfg_scale: float = 0.0, seed: int = 0,
                 add_bos: bool | None = None, batch_size: int | str | None = 16, max_new_tokens: int = 256,
                 mask_token_id: int | None = None, max_batch_size: int | None = None, **generation) -> None:
        super().__init__()
        import illada
        from illada.scoring import METHODS

        if method not in METHODS:
            raise IlladaError(f"model_args method={method!r}: choose from {', '.join(METHODS)}")
        unknown = sorted(set(generation) - set(_GENERATION_KEYS))
        if unknown:
            raise IlladaError(f"unknown model_args: {', '.join(unknown)}")
        import torch

        if device in (None, "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line passes device="cuda" by default, also on machines without a GPU
            device = None
        self.lm = illada.load(pretrained, device=device, dtype=dtype, mask_token_id=mask_token_id)
        self.method, self.mc_num, self.cfg_scale = method, int(mc_num), float(cfg_scale)
        self.seed, self.add_bos = int(seed), add_bos
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> a fixed default
        self.max_new_tokens = int(max_new_tokens)
        self.generation = dict(generation)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "IlladaLM":
        # lm_eval's CLI adds its own --device/--batch_size defaults; what the user wrote in model_args wins
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "IlladaLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- identity -----------------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.lm.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.lm.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # -- scoring ------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from illada.scoring import score_pairs

        pairs = [tuple(r.args) for r in requests]
        results: list[tuple[float, bool]] = []
        for start in range(0, len(pairs), self.batch_size * 4):
            chunk = pairs[start:start + self.batch_size * 4]
            scores, greedy = score_pairs(self.lm, chunk, method=self.method, mc_num=self.mc_num,
                                         batch_size=self.batch_size, cfg_scale=self.cfg_scale, seed=self.seed,
                                         add_bos=self.add_bos)
            for pair, value, is_greedy in zip(chunk, scores, greedy):
                self.cache_hook.add_partial("loglikelihood", pair, (value, is_greedy))
                results.append((value, is_greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """-(diffusion ELBO) of each string, in nats: a lower bound on its log-likelihood (rows of the model's
        context, each document separately)."""
        from illada.scoring import corpus_elbo

        results = []
        for request in requests:
            (text,) = request.args
            ids = self.lm.tokenizer.encode(text)
            if not ids:
                results.append(0.0)
                continue
            elbo = corpus_elbo(self.lm.model, ids, seq_len=self.lm.config.max_seq_len, num_samples=self.mc_num,
                               batch_size=self.batch_size, mask_id=self.lm.mask_token_id, seed=self.seed)
            value = -elbo.nll * elbo.tokens
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            results.append(value)
        return results

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Variable-length generation (iLLaDA) by default, greedy; stops from each request's `until`."""
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            options = {k: v for k, v in self.generation.items() if k != "cfg_scale_generate"}
            if "cfg_scale_generate" in self.generation:
                options["cfg_scale"] = float(self.generation["cfg_scale_generate"])
            options["max_new_tokens"] = int(gen_kwargs.pop("max_gen_toks", self.max_new_tokens))
            options.setdefault("block_length", min(32, options["max_new_tokens"]))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            if gen_kwargs.pop("do_sample", False) and temperature > 0:
                options["temperature"] = temperature
            text = self.lm.generate(context, stop_strings=tuple(s for s in until if s), seed=self.seed, **options)
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            outputs.append(text)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm_eval's own command line, with the `illada` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
