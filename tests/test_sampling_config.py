"""One typed SamplingConfig end to end: the flags of generate/chat/eval/serve and the server's body fields are
generated from its fields, the object travels to the sampler, special tokens are resolved once at load."""
import argparse
import dataclasses
import json

import pytest

pytest.importorskip("starlette")

from illada import __main__ as cli  # noqa: E402
from illada.api import DiffusionLM  # noqa: E402
from illada.commands import eval as eval_command  # noqa: E402
from illada.commands import generate as generate_command  # noqa: E402
from illada.commands import serve as serve_command  # noqa: E402
from illada.commands.sampling_flags import sampling_config  # noqa: E402
from illada.config import preset  # noqa: E402
from illada.errors import IlladaError  # noqa: E402
from illada.model import build_model  # noqa: E402
from illada.sampling import SamplingConfig  # noqa: E402
from illada.serving import ServerSettings, create_app, serve_in_thread  # noqa: E402
from illada.serving.protocol import SAMPLER_FIELDS  # noqa: E402
from illada.special_tokens import SpecialTokens  # noqa: E402
from illada.tokenizer import byte_level_tokenizer  # noqa: E402

# A non-default value for every knob a user sets, written out here (not derived from the config), and the flags
# that set it: the generated flags must reach exactly these values.
NON_DEFAULT = {
    "gen_length": (["--max-new-tokens", "40"], 40),
    "steps": (["--steps", "7"], 7),
    "block_length": (["--block-length", "8"], 8),
    "variable_length": (["--fixed-length"], False),
    "remasking": (["--remasking", "margin"], "margin"),
    "temperature": (["--temperature", "0.5"], 0.5),
    "top_k": (["--top-k", "5"], 5),
    "top_p": (["--top-p", "0.9"], 0.9),
    "cfg_scale": (["--cfg-scale", "1.5"], 1.5),
    "threshold": (["--threshold", "0.8"], 0.8),
    "cache": (["--cache", "dual"], "dual"),
    "cache_refresh": (["--cache-refresh", "3"], 3),
    "forbid_eos": (["--forbid-eos"], True),
    "eos_confidence": (["--eos-confidence", "neg_inf"], "neg_inf"),
    "stop_strings": (["--stop", "A", "--stop", "B"], ("A", "B")),
    "end_think_boost": (["--end-think-boost", "100"], 100.0),
    "end_think_power": (["--end-think-power", "1"], 1.0),
    "seed": (["--seed", "11"], 11),
}


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_every_user_knob_has_a_flag_and_reaches_the_config():
    flagged = {f.name for f in SamplingConfig.user_fields("flag")}
    assert flagged == set(NON_DEFAULT) | {"factor"}  # factor: exclusive with threshold, checked below
    argv = [a for args, _ in NON_DEFAULT.values() for a in args]
    config = sampling_config(parse(generate_command, argv))
    for name, (_, value) in NON_DEFAULT.items():
        assert getattr(config, name) == value, name
    # an untouched command line is exactly the default config (no second set of defaults in the CLI)
    assert sampling_config(parse(generate_command, [])) == SamplingConfig()
    assert sampling_config(parse(generate_command, ["--factor", "2"])).factor == 2.0


def test_defaults_resolve_per_mode():
    assert (SamplingConfig().resolved_block_length, SamplingConfig().resolved_steps) == (32, 32)
    fixed = SamplingConfig(max_new_tokens=40, variable_length=False)
    assert (fixed.resolved_block_length, fixed.resolved_steps) == (32, 40)
    short = SamplingConfig(max_new_tokens=8)
    assert (short.resolved_block_length, short.resolved_steps) == (8, 8)
    # steps left unset follow a later change of mode or budget
    assert SamplingConfig().replace(variable_length=False, max_new_tokens=64).resolved_steps == 64
    # one parallel rule replaces the other; both at once is a mistake
    assert SamplingConfig(threshold=0.9).replace(factor=1.0).threshold is None
    with pytest.raises(IlladaError, match="either threshold or factor"):
        SamplingConfig().replace(threshold=0.9, factor=1.0)


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
def test_each_command_offers_the_generated_flags(command):
    sub = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices[command]._actions}
    expected = {f.name for f in SamplingConfig.user_fields("flag")}
    if command == "eval":
        expected -= {"seed"}  # eval's own --seed also seeds the few-shot draw
    if command == "serve":
        expected -= {"gen_length", "stop_strings", "seed"}  # per request (max_tokens, stop, seed)
    assert expected <= set(sub), expected - set(sub)


def test_eval_flags_leave_the_preset_alone_unless_given():
    from illada.commands.sampling_flags import sampling_changes
    from illada.evaluation import get_preset

    args = parse(eval_command, ["--task", "gsm8k", "--data", "x.jsonl"])
    assert sampling_changes(args) == {}
    args = parse(eval_command, ["--task", "gsm8k", "--data", "x.jsonl", "--top-k", "3", "--cfg-scale", "0.5"])
    task = get_preset("gsm8k").replace(**sampling_changes(args))
    assert (task.sampling.top_k, task.sampling.cfg_scale, task.sampling.gen_length) == (3, 0.5, 1024)


def test_wire_fields_are_the_configs():
    wire = {f.name for f in SamplingConfig.user_fields("wire")}
    # the OpenAI fields carry these (max_tokens, temperature, top_p, stop, seed)
    assert wire == {f.name for f in SamplingConfig.user_fields("flag")} - {"gen_length", "temperature", "top_p",
                                                                           "stop_strings", "seed"}
    assert set(SAMPLER_FIELDS) == wire


def tiny_handle() -> DiffusionLM:
    tok = byte_level_tokenizer()
    config = preset("tiny", name="tiny-cfg", vocab_size=tok.vocab_size, max_seq_len=128,
                    mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    return DiffusionLM(model=build_model(config, seed=3).eval(), tokenizer=tok, config=config, name="tiny-cfg")


def post(url, body):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_server_defaults_from_serve_flags_and_request_overrides():
    lm = tiny_handle()
    args = parse(serve_command, ["--threshold", "0.5", "--block-length", "4"])
    settings = serve_command.settings_from_args(args)
    assert (settings.sampling.threshold, settings.sampling.block_length) == (0.5, 4)
    with serve_in_thread(create_app(lm, settings)) as url:
        status, body = post(url, {"prompt": "ab", "max_tokens": 8})
        assert status == 200
        assert body["choices"][0]["text"] == lm.generate("ab", max_new_tokens=8, threshold=0.5, block_length=4)
        status, body = post(url, {"prompt": "ab", "max_tokens": 8, "threshold": None, "steps": 8,
                                  "block_length": 8})
        assert body["choices"][0]["text"] == lm.generate("ab", max_new_tokens=8, threshold=0.5, steps=8,
                                                         block_length=8)
        # every wire field is accepted with a good value and refused (400, naming it) with a bad one
        good = {"steps": 2, "block_length": 4, "variable_length": True, "remasking": "margin", "top_k": 3,
                "cfg_scale": 0.5, "threshold": 0.9, "cache": "prefix", "cache_refresh": 2, "forbid_eos": True,
                "eos_confidence": "neg_inf", "end_think_boost": 1.0, "end_think_power": 2.0,
                "factor": 1.0}  # factor replaces the server's threshold
        assert set(good) == set(SAMPLER_FIELDS)
        for name, value in good.items():
            status, body = post(url, {"prompt": "ab", "max_tokens": 4, name: value})
            assert status == 200, (name, body)
            status, body = post(url, {"prompt": "ab", "max_tokens": 4, name: "bad" if name != "remasking" else 3})
            assert status == 400 and body["error"]["param"] == name, (name, body)
    with pytest.raises(IlladaError, match="either threshold or factor"):
        serve_command.settings_from_args(parse(serve_command, ["--threshold", "0.5", "--factor", "1"]))


def test_special_tokens_resolved_once_tokenizer_first():
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, mask_token_id=200, eos_token_id=201, bos_token_id=202)
    special = SpecialTokens.resolve(tok, config)
    assert (special.mask, special.eos, special.bos) == (tok.mask_token_id, tok.eos_token_id, tok.bos_token_id)
    assert special.end_think == tuple(tok.encode("</think>"))

    class Bare:  # a tokenizer that declares nothing: config.json's ids are used
        def encode(self, text):
            return [5, 6]

    bare = SpecialTokens.resolve(Bare(), config)
    assert (bare.mask, bare.eos, bare.bos, bare.eot, bare.pad, bare.prompt_pad) == (200, 201, 202, None, None, 200)
    lm = tiny_handle()
    config = lm.sampling_config(end_think_boost=10.0)
    assert (config.mask_id, config.eos_token_id, config.end_think_ids) == (
        tok.mask_token_id, tok.eos_token_id, tuple(tok.encode("</think>")))
    assert dataclasses.replace(config, mask_id=None).with_tokens(lm.special).mask_id == tok.mask_token_id


def test_serve_refuses_an_autoregressive_model(tmp_path, capsys):
    from illada.checkpoint import save_checkpoint

    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64, causal=True, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id)
    save_checkpoint(build_model(config, seed=0), config, tmp_path / "ar", tokenizer=tok)
    assert cli.main(["serve", "--model", str(tmp_path / "ar"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "autoregressive" in err[0] and "illada generate" in err[0]
