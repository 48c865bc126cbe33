"""The lm-evaluation-harness adapter on local task YAMLs and a tiny local dataset (no hub access): the registered
`illada` model returns the library's scores for loglikelihood, and generate_until honours `until`."""
import json
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra

from illada.checkpoint import save_checkpoint  # noqa: E402
from illada.config import preset  # noqa: E402
from illada.model import build_model  # noqa: E402
from illada.tokenizer import byte_level_tokenizer  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, mask_token_id=tok.mask_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(build_model(config, seed=5).eval(), config, path, tokenizer=tok)
    return path


DOCS = [{"question": "The sky is", "choices": ["blue", "green"], "label": 0},
        {"question": "Fire is", "choices": ["cold", "hot", "wet"], "label": 1}]

MC_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["e"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_choice.yaml").write_text(MC_YAML.format(data=data))
    (root / "tiny_gen.yaml").write_text(GEN_YAML.format(data=data))
    return root


@pytest.fixture(scope="module")
def task_manager(task_dir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir))  # indexing the built-in tasks is the slow part: do it once


def run(checkpoint, task_manager, task, model_args=""):
    from illada.lm_eval_adapter import IlladaLM  # importing registers "illada"

    assert lm_eval.api.registry.get_model("illada") is IlladaLM

    return lm_eval.simple_evaluate(model="illada", model_args=f"pretrained={checkpoint}{model_args}", tasks=[task],
                                   task_manager=task_manager, log_samples=True, batch_size=4, bootstrap_iters=0)


@pytest.mark.parametrize("method", ["confidence", "mc"])
def test_loglikelihood_matches_library_scores(checkpoint, task_manager, method):
    import illada
    from illada.scoring import score

    results = run(checkpoint, task_manager, "tiny_choice", f",method={method},mc_num=4")
    samples = results["samples"]["tiny_choice"]
    lm = illada.load(str(checkpoint))
    for sample in samples:
        doc = sample["doc"]
        got = [resp[0][0] for resp in sample["resps"]]
        want = score(lm, doc["question"], [" " + c for c in doc["choices"]], method=method, mc_num=4)
        assert got == pytest.approx(want, abs=1e-4)
    acc = results["results"]["tiny_choice"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def test_generate_until_stops_at_until(checkpoint, task_manager):
    import illada

    results = run(checkpoint, task_manager, "tiny_gen", ",block_length=4")
    samples = results["samples"]["tiny_gen"]
    lm = illada.load(str(checkpoint))
    for sample in samples:
        text = sample["resps"][0][0]
        assert "e" not in text
        prompt = f"Q: {sample['doc']['question']}\nA:"
        full = lm.generate(prompt, max_new_tokens=8, block_length=4, stop_strings=("e",), seed=0)
        assert text == full.split("e")[0]


def test_chat_template_and_bad_args(checkpoint):
    from illada.errors import IlladaError
    from illada.lm_eval_adapter import IlladaLM

    model = IlladaLM.create_from_arg_string(f"pretrained={checkpoint},method=exact")
    rendered = model.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in rendered and rendered.endswith("assistant<|end_header_id|>\n\n")
    with pytest.raises(IlladaError, match="method"):
        IlladaLM(pretrained=str(checkpoint), method="bogus")
    with pytest.raises(IlladaError, match="unknown model_args"):
        IlladaLM(pretrained=str(checkpoint), nonsense=1)


def test_illada_lm_eval_cli_runs_a_local_task(checkpoint, task_dir, tmp_path):
    """`illada-lm-eval` (lm_eval's own CLI with our model registered) end to end, in a fresh process."""
    import subprocess
    import sys

    out = tmp_path / "results"
    code = ("import sys; from illada.lm_eval_adapter import main; sys.argv[0] = 'illada-lm-eval'; main()")
    result = subprocess.run(
        [sys.executable, "-c", code, "run", "--model", "illada", "--model_args",
         f"pretrained={checkpoint},method=confidence,device=cpu", "--tasks", "tiny_choice",
         "--include_path", str(task_dir), "--output_path", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    files = list(out.rglob("results_*.json"))
    assert files, result.stdout[-2000:]
    results = json.loads(files[0].read_text())["results"]["tiny_choice"]
    assert 0.0 <= results["acc,none"] <= 1.0


def test_model_args_win_over_lm_eval_cli_defaults(checkpoint):
    from illada.lm_eval_adapter import IlladaLM

    lm = IlladaLM.create_from_arg_string(f"pretrained={checkpoint},device=cpu,method=exact",
                                         {"device": "cuda:7", "batch_size": 4, "max_batch_size": None})
    assert lm.lm.device.type == "cpu" and lm.batch_size == 4 and lm.method == "exact"
