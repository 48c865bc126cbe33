"""A model's generation_config.json: parsed as transformers reads it, layered under the flags of generate, chat and
serve, and its prompt template framing a base model's bare prompt."""
from __future__ import annotations

import json
import re
import shutil

import pytest

import illada
from illada.__main__ import build_parser, main
from illada.errors import IlladaError
from illada.sampling.config import SamplingConfig
from illada.sampling.generation_config import GenerationDefaults, parse_generation_config, read_generation_config
from test_cli import expected_text  # the generation computed through the library; pytest puts tests/ on sys.path

TEMPLATE = "Q: {prompt}\nA:"


@pytest.fixture
def model_dir(tiny_checkpoint, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, path)
    return path


def write(path, data) -> None:
    (path / "generation_config.json").write_text(json.dumps(data))


def test_hugging_face_keys_follow_transformers_and_knobs_go_by_field_name():
    hf = {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.46.0", "_from_model_config": True,
          "num_beams": 1, "max_new_tokens": 40, "temperature": 0.7, "top_k": 5}
    assert parse_generation_config(hf).options == {"max_new_tokens": 40}  # do_sample absent: greedy, as in HF
    sampled = parse_generation_config({**hf, "do_sample": True}).sampling_config()
    assert (sampled.temperature, sampled.top_k, sampled.gen_length) == (0.7, 5, 40)
    ours = parse_generation_config({"variable_length": False, "block_length": 8, "threshold": 0.9, "cache": "dual",
                                    "stop_strings": "####"}).sampling_config()
    assert ours == SamplingConfig(variable_length=False, block_length=8, threshold=0.9, cache="dual",
                                  stop_strings=("####",))
    assert parse_generation_config({"seed": 3, "mask_id": 5}).options == {}  # not the file's to set


@pytest.mark.parametrize("data, message", [
    ([1, 2], "expected a JSON object"),
    ({"threshold": 2}, "threshold must be in [0, 1]"),
    ({"steps": "8"}, "steps must be a positive integer"),
    ({"cache": "full"}, "unknown cache 'full'"),
    ({"variable_length": "no"}, "variable_length must be true or false"),
    ({"do_sample": True, "top_k": "x"}, "generation_config.json"),
    ({"prompt_template": "Q: {q}"}, "prompt_template must be a string with {prompt} exactly once"),
    ({"prompt_template": "{prompt}{prompt}"}, "exactly once"),
])
def test_bad_values_are_one_line_errors_naming_the_file(data, message):
    with pytest.raises(IlladaError, match=re.escape(message)) as caught:
        parse_generation_config(data)
    assert "generation_config.json" in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_file_changes_nothing_and_bad_json_is_named(tmp_path):
    assert read_generation_config(tmp_path) == GenerationDefaults()
    assert GenerationDefaults().sampling_config() == SamplingConfig()
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(IlladaError, match="not readable JSON"):
        read_generation_config(tmp_path)


def test_the_template_frames_the_text_literally():
    defaults = GenerationDefaults(prompt_template=TEMPLATE)
    assert defaults.format_prompt("What is {x} + 1?") == "Q: What is {x} + 1?\nA:"  # braces in the text stay
    assert defaults.format_prompt("") == ""  # an unconditional sample stays unconditional
    assert GenerationDefaults().format_prompt("hi") == "hi"


def test_generate_uses_the_model_file_under_the_flags_and_its_template_unless_raw(model_dir, capsys):
    write(model_dir, {"prompt_template": TEMPLATE, "max_new_tokens": 12, "variable_length": False,
                      "block_length": 4, "steps": 6, "forbid_eos": True})
    assert main(["generate", "Hi", "--model", str(model_dir)]) == 0
    out, err = capsys.readouterr()
    framed = "Q: Hi\nA:"
    assert out == framed + expected_text(model_dir, framed, gen_length=12, block_length=4, steps=6,
                                    forbid_eos=True) + "\n"
    assert re.search(r"\[12 tokens · (\d+) forward passes", err).group(1) == "6"
    # a flag beats the file; the file's other settings stay
    assert main(["generate", "Hi", "--model", str(model_dir), "--raw", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out == "Hi" + expected_text(model_dir, "Hi", gen_length=8, block_length=4, steps=6, forbid_eos=True) + "\n"
    assert "[8 tokens · 6 forward passes" in err
    assert main(["generate", "Hi", "--model", str(model_dir), "--variable-length", "--raw"]) == 0
    out, _ = capsys.readouterr()
    assert out == "Hi" + expected_text(model_dir, "Hi", gen_length=12, block_length=4, steps=6, forbid_eos=True,
                                  variable_length=True) + "\n"


def test_a_bad_model_file_is_exit_2_before_any_generation(model_dir, capsys):
    write(model_dir, {"threshold": 1.5})
    assert main(["generate", "Hi", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "generation_config.json: threshold must be in [0, 1]" in err and len(err.splitlines()) == 1


def test_the_library_and_the_server_start_from_the_model_file(model_dir):
    write(model_dir, {"threshold": 0.8, "block_length": 4})
    lm = illada.load(model_dir)
    config = lm.sampling_config()
    assert (config.threshold, config.block_length, config.mask_id) == (0.8, 4, lm.mask_token_id)
    assert lm.sampling_config(factor=1.0).threshold is None  # an option replaces the file's rule
    pytest.importorskip("starlette")
    from illada.commands.serve import server_sampling
    from illada.serving import Limits
    from illada.serving.protocol import parse_request

    request = parse_request({"prompt": "Hi", "max_tokens": 8}, chat=False, handle=lm, model_ids=(lm.name,),
                            limits=Limits(), defaults=None)  # create_app's default settings
    assert (request.config.threshold, request.config.block_length, request.config.gen_length) == (0.8, 4, 8)
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--cache", "dual", "--factor", "1"])
    assert server_sampling(lm, args) == SamplingConfig(factor=1.0, cache="dual", block_length=4)


def test_info_shows_the_model_defaults(model_dir, capsys):
    write(model_dir, {"prompt_template": TEMPLATE, "block_length": 8, "eos_token_id": 2})
    assert main(["info", "--model", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generation_defaults"] == {"block_length": 8,
                                                                          "prompt_template": TEMPLATE}
