"""`illada eval`: answer extraction on tricky strings, the sandbox (time limit, no network, no processes, memory),
prompts and few-shot selection, presets against reference §6.3, and the runner/CLI end to end on a tiny model."""
import json

import pytest
import torch

import illada.__main__ as cli
from illada.api import DiffusionLM
from illada.checkpoint import save_checkpoint
from illada.config import preset
from illada.errors import IlladaError
from illada.evaluation import PRESETS, evaluate, get_preset, load_samples, run_python
from illada.evaluation.answers import extract_answer, extract_gold, extract_letter, normalize_number, numbers_equal
from illada.evaluation.tasks import fewshot_examples, gsm8k_prompt, humaneval_program, mmlu_request
from illada.model import build_model
from illada.scoring import score
from illada.tokenizer import byte_level_tokenizer



# ---------------------------------------------------------------------------------------------- answer extraction
@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 4 more.\n#### 7", "7"),
    ("#### 1,234,567", "1234567"),
    ("The total is $1,250.50.\n#### $1,250.50", "1250.5"),
    ("#### -12", "-12"),
    ("#### \u221212", "-12"),  # Unicode minus
    ("#### 18 dollars", "18"),
    ("#### 45%", "45"),
    ("#### 7.00", "7"),
    ("#### .5", "0.5"),
    ("#### 3/4", "0.75"),
    ("first #### 72\n\nQuestion: next one\nAnswer: ... #### 9", "72"),  # several ####: the first one
    ("####\n#### 5", "5"),  # an empty marker is skipped
    ("5 - 3 = 2 so the answer is 2.", "2"),
    ("so 10 - 4 = 6, giving 6 cookies in all", "6"),
    ("<think>maybe 41? no</think> The answer is \\boxed{42}.", "42"),
    ("The answer is -8 degrees.", "-8"),
    ("x-5 is not negative here: 10", "10"),
    ("no digits at all", None),
])
def test_extract_answer_tricky(text, expected):
    assert extract_answer(text) == expected


def test_gold_and_comparison():
    assert extract_gold("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    assert extract_gold("1,000") == "1000" and extract_gold(15) == "15"
    assert numbers_equal("1000", "1000.0") and not numbers_equal("-3", "3") and not numbers_equal(None, "3")
    assert normalize_number("costs $0.50") == "0.5"
    assert normalize_number("#### " + "9" * 60) == "9" * 60  # more digits than the decimal context: no crash


@pytest.mark.parametrize("text, expected", [("B", "B"), (" (C) because", "C"), ("Answer: D.", "D"), ("b)", "B"),
                                            ("<think>A or B</think>C", "C"), ("E", None), ("none", None)])
def test_extract_letter(text, expected):
    assert extract_letter(text, 4) == expected


# ------------------------------------------------------------------------------------------------- prompts, data
def test_presets_follow_the_paper():
    for name in ("arc_challenge", "hellaswag", "piqa"):
        assert (PRESETS[name].method, PRESETS[name].num_fewshot) == ("confidence", 0)
    assert (PRESETS["mmlu"].method, PRESETS["mmlu"].num_fewshot) == ("exact", 5)
    g, gs = PRESETS["gsm8k"], PRESETS["gsm8k"].sampling
    assert (g.num_fewshot, gs.gen_length, gs.block_length, gs.steps, gs.variable_length) == (8, 1024, 32, 32, True)
    h = PRESETS["humaneval"].sampling
    assert (h.gen_length, h.block_length, h.variable_length) == (512, 512, False)
    mi = get_preset("mmlu", instruct=True)
    assert (mi.chat, mi.sampling.gen_length, mi.num_fewshot) == (True, 3, 5)
    assert get_preset("humaneval", instruct=True).sampling.end_think_power == 1.0
    gi = get_preset("gsm8k", instruct=True).sampling
    assert (gi.end_think_boost, gi.end_think_power) == (100.0, 3.0)
    with pytest.raises(IlladaError, match="unknown task"):
        get_preset("nope")


def test_fewshot_excludes_the_sample_and_prompts_render():
    pool = [{"question": f"q{i}", "answer": f"a{i}\n#### {i}"} for i in range(5)]
    for i in range(5):
        shots = fewshot_examples(i, pool, 4, True, seed=0)
        assert len(shots) == 4 and pool[i] not in shots
    with pytest.raises(IlladaError, match="5-shot"):
        fewshot_examples(0, pool, 5, True, seed=0)
    prompt = gsm8k_prompt(pool[0], [pool[1]])
    assert prompt == "Question: q1\nAnswer: a1\n#### 1\n\nQuestion: q0\nAnswer:"
    context, options = mmlu_request({"question": "2+2?", "choices": ["3", "4"], "answer": 1, "subject": "math"},
                                    [{"question": "1+1?", "choices": ["2", "5"], "answer": 0}])
    assert context == ("The following are multiple choice questions (with answers) about math.\n\n"
                       "1+1?\nA. 2\nB. 5\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nAnswer:")
    assert options == [" A", " B"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_load_samples_validates(tmp_path):
    good = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["x", "y", "z"], "answer": "C"}])
    assert load_samples(good, "multiple_choice")[0]["answer"] == 2
    for record, message in [({"question": "q", "choices": ["x", "y"], "answer": 5}, "out of range"),
                            ({"question": "q", "choices": ["x", "y"], "answer": "Z"}, "index or a letter"),
                            ({"question": "q", "choices": ["x"], "answer": 0}, "at least two"),
                            ({"question": "q", "answer": 0}, "missing field")]:
        with pytest.raises(IlladaError, match=message):
            load_samples(write_jsonl(tmp_path / "bad.jsonl", [record]), "multiple_choice")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(IlladaError, match="broken.jsonl:1"):
        load_samples(tmp_path / "broken.jsonl", "gsm8k")


# --------------------------------------------------------------------------------------------------- runner, CLI
def tiny_lm(seed=0):
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512, mask_token_id=tok.mask_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return DiffusionLM(model=build_model(config, seed=seed).eval(), tokenizer=tok, config=config, name="tiny")


HUMANEVAL = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "t/1", "prompt": "def neg(a):\n", "entry_point": "neg",
     "test": "def check(f):\n    assert f(2) == -2\n"},
    {"task_id": "t/2", "prompt": "def one():\n", "entry_point": "one", "test": "def check(f):\n    assert f() == 1\n"},
]


def with_output(texts: list[str]):
    """(texts, a GenerationOutput stand-in) as `DiffusionLM.generate(..., return_output=True)` returns them."""
    import torch

    lengths = torch.tensor([len(t) for t in texts])
    return texts, type("Output", (), {"generated_lengths": lengths, "row_nfe": lengths, "nfe": int(lengths.max())})()


def test_humaneval_runner_scores_in_the_sandbox(monkeypatch, tmp_path, sandbox_available):
    lm = tiny_lm()
    completions = {"def add": "    return a + b\n\ndef helper():\n    pass",  # cut at the "\ndef " stop
                   "def neg": "    while True:\n        pass\n",  # killed by the timeout
                   "def one": "    return 2\n"}  # wrong

    def fake_generate(prompts, return_output=False, **options):
        config = options["config"]
        assert config.variable_length is False and config.gen_length == 512
        return with_output([next(v for k, v in completions.items() if p.startswith(k)) for p in prompts])

    monkeypatch.setattr(lm, "generate", fake_generate)
    log = tmp_path / "log.jsonl"
    result = evaluate(lm, PRESETS["humaneval"], HUMANEVAL, timeout=1.0, log_path=log, progress=False)
    assert result.metric == "pass@1" and result.score == pytest.approx(1 / 3)
    statuses = [json.loads(line)["status"] for line in log.read_text().splitlines()]
    assert statuses == ["passed", "timeout", "failed"]
    program = humaneval_program(HUMANEVAL[1], "```python\ndef neg(a):\n    return -a\n```", chat=True)
    assert run_python(program).passed


def test_fewshot_prompts_that_do_not_fit_drop_their_last_shots(tmp_path, capsys):
    """8 long shots cannot fit a 512-token context with room to answer: the last shots go (a note says so, the
    log records each sample's count), instead of the eval stopping with 'the prompt fills the model context'."""
    lm = tiny_lm()
    pool = [{"question": f"Question number {i}: " + "how many apples are there " * 6 + "?",
             "answer": f"{i} apples\n#### {i}"} for i in range(12)]
    sample = [{"question": "What is 2 + 2?", "answer": "#### 4"}]
    task = PRESETS["gsm8k"].replace(num_fewshot=8, max_new_tokens=16, block_length=8)
    result = evaluate(lm, task, sample, fewshot_pool=pool, progress=False, log_path=tmp_path / "l.jsonl")
    record = json.loads((tmp_path / "l.jsonl").read_text())
    room = min(16, lm.config.max_seq_len // 2)
    assert 0 < record["shots"] < 8 and record["prompt"].count("Question:") == record["shots"] + 1
    assert len(lm.tokenizer.encode(record["prompt"])) <= lm.config.max_seq_len - room
    assert result.n == 1 and "the last shots are dropped" in capsys.readouterr().err


def test_gsm8k_runner_extracts_and_logs(monkeypatch, tmp_path):
    lm = tiny_lm()
    samples = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"}
               for i in (1, 2, 600)]
    outputs = {"What is 1 + 1?": "1 + 1 = 2\n#### 2\n\nQuestion: more", "What is 2 + 2?": "#### 5",
               "What is 600 + 600?": "600 + 600 = 1200\n#### 1,200 apples"}

    def fake_generate(prompts, return_output=False, **options):
        config = options["config"]
        assert config.stop_strings == ("Question:",) and config.block_length == 32
        return with_output([next(v for k, v in outputs.items() if p.endswith(f"Question: {k}\nAnswer:"))
                            for p in prompts])

    monkeypatch.setattr(lm, "generate", fake_generate)
    result = evaluate(lm, PRESETS["gsm8k"].replace(num_fewshot=2), samples, log_path=tmp_path / "l.jsonl",
                      progress=False, batch_size=2)
    records = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [r["extracted"] for r in records] == ["2", "5", "1200"]
    assert [r["correct"] for r in records] == [True, False, True] and result.score == pytest.approx(2 / 3)
    assert records[0]["output"] == "1 + 1 = 2\n#### 2\n\n"  # cut before the stop string
    assert records[0]["prompt"].count("Question:") == 3  # two shots + the question


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    lm = tiny_lm(seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(lm.model, lm.config, path, tokenizer=lm.tokenizer)
    return path


@pytest.fixture
def eval_cli(monkeypatch):
    """`illada eval` through the real CLI entry point (the lead registers it in COMMANDS)."""
    monkeypatch.setitem(cli.COMMANDS, "eval", ("eval", "benchmarks on local files"))
    return cli.main


MC = [{"question": "The sky is", "choices": ["blue", "green", "red"], "answer": 0},
      {"question": "Grass is", "choices": ["purple", "green"], "answer": "B"},
      {"question": "Snow is", "choices": ["white", "black"], "answer": 0}]


def test_eval_cli_multiple_choice_end_to_end(checkpoint, tmp_path, eval_cli, capsys):
    data = write_jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "out"
    code = eval_cli(["eval", "--model", str(checkpoint), "--task", "hellaswag", "--data", str(data), "--out", str(out),
                     "--limit", "2", "--no-progress"])
    assert code == 0
    results = json.loads((out / "hellaswag.json").read_text())
    records = [json.loads(line) for line in (out / "hellaswag.samples.jsonl").read_text().splitlines()]
    assert results["n"] == 2 and len(records) == 2 and results["metric"] == "accuracy"
    import illada
    lm = illada.load(str(checkpoint))
    for sample, record in zip(MC, records):
        want = score(lm, sample["question"], [" " + c for c in sample["choices"]], method="confidence")
        assert record["scores"] == pytest.approx(want, abs=1e-4)
        assert record["correct"] == (max(range(len(want)), key=want.__getitem__) == record["target"])
    assert results["score"] == pytest.approx(sum(r["correct"] for r in records) / 2)
    # confidence: one pass per candidate token ("blue" etc. are 5 and 6 byte tokens with the space)
    assert results["sequence_passes"] == sum(len(" " + c) for s in MC[:2] for c in s["choices"])
    assert "hellaswag" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown task"),
    (["--task", "mmlu"], "5-shot prompts need 5 examples"),
    (["--task", "mmlu", "--num-fewshot", "0"], "one-token"),  # " A" is two byte tokens: exact must refuse
    (["--task", "hellaswag", "--limit", "0"], "--limit"),
    (["--task", "gsm8k"], "no number in the answer field"),
    (["--task", "hellaswag", "--method", "generate"], "scored, not generated"),
])
def test_eval_cli_user_mistakes_exit_2(checkpoint, tmp_path, eval_cli, capsys, argv, message):
    data = write_jsonl(tmp_path / "mc.jsonl", MC)
    code = eval_cli(["eval", "--model", str(checkpoint), "--data", str(data), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert eval_cli(["eval", "--model", str(checkpoint), "--task", "piqa", "--data", str(tmp_path / "none.jsonl")]) == 2


def test_eval_cli_mmlu_by_mc_likelihood(checkpoint, tmp_path, eval_cli):
    data = write_jsonl(tmp_path / "mmlu.jsonl", [dict(s, subject="colours") for s in MC])
    code = eval_cli(["eval", "--model", str(checkpoint), "--task", "mmlu", "--method", "mc", "--mc-num", "2",
                     "--num-fewshot", "1", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 0
    records = [json.loads(x) for x in (tmp_path / "o" / "mmlu.samples.jsonl").read_text().splitlines()]
    assert records[0]["choices"] == [" A", " B", " C"] and "about colours" in records[0]["prompt"]


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every (input_ids, attention_mask) it is fed."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append((input_ids.clone(), None if attention_mask is None else attention_mask.clone()))
        return self.inner(input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("published", [True, False])
def test_mmlu_preset_scores_bos_context_mask_eos(monkeypatch, published):
    """The MMLU/CMMLU preset feeds BOS + context + [MASK] + EOS (the published iLLaDA eval: mc_num 1, BOS
    prepended, EOS appended) and scores the gold letter at the mask; add_bos/append_eos False give the plain
    context + [MASK]. Letters without the space, so that they are one byte token each."""
    import illada.evaluation.runner as runner

    lm = tiny_lm(seed=5)
    recorder = Recorder(lm.model)
    lm.model = recorder
    plain = runner.tasks.mmlu_request
    monkeypatch.setattr(runner.tasks, "mmlu_request", lambda s, d: (plain(s, d)[0], [c.strip() for c in plain(s, d)[1]]))
    task = PRESETS["mmlu"].replace(num_fewshot=0)
    assert (task.add_bos, task.append_eos) == (True, True) and "BOS + context + [MASK] + EOS" in task.description
    if not published:
        task = task.replace(add_bos=False, append_eos=False)
    samples = [dict(s, subject="colours") for s in MC]
    result = evaluate(lm, task, samples, batch_size=1, progress=False)
    tok = lm.tokenizer
    mask, bos, eos = lm.mask_token_id, tok.bos_token_id, tok.eos_token_id
    assert len(recorder.calls) == len(samples)  # one pass per question, shared by its letters
    for (ids, attention), sample, record in zip(recorder.calls, samples, result.records):
        context = tok.encode(record["prompt"].rstrip())
        want = [bos] + context + [mask, eos] if published else context + [mask]
        assert attention is None and ids.tolist() == [want]
        with torch.no_grad():  # the naive score: log-softmax at the mask of that one row
            logp = torch.log_softmax(recorder.inner(torch.tensor([want]))[0, len(want) - (2 if published else 1)]
                                     .float(), -1)
        letters = [tok.encode(c) for c in record["choices"]]
        assert all(len(t) == 1 for t in letters)
        assert record["scores"] == pytest.approx([logp[t[0]].item() for t in letters], abs=1e-5)


def test_generation_presets_run_the_real_sampler():
    """The preset options reach the real sampler (base few-shot and instruct chat prompts)."""
    lm = tiny_lm(seed=1)
    gsm = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(3)]
    task = PRESETS["gsm8k"].replace(num_fewshot=1, max_new_tokens=8, block_length=4, steps=4)
    result = evaluate(lm, task, gsm, progress=False)
    assert result.n == 3 and result.sequence_passes == 3 * 8  # one token per pass, no stop hit by random weights
    mmlu = [dict(s, subject="colours") for s in MC]
    result = evaluate(lm, get_preset("mmlu", instruct=True).replace(num_fewshot=1), mmlu, progress=False)
    assert result.records[0]["prompt"].count("<|start_header_id|>user") == 2  # one shot turn + the question
    assert all(r["target"] in "ABC" for r in result.records)


def test_mmlu_options_inside_the_question_are_split_out():
    from illada.evaluation.tasks import mmlu_request, normalize_sample

    record = {"question": "Which is a prime?\n\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:", "answer": "C"}
    sample = normalize_sample(record, "mmlu")
    assert sample["question"] == "Which is a prime?"
    assert sample["choices"] == ["4", "6", "7", "9"] and sample["answer"] == 2
    context, continuations = mmlu_request(sample, [])
    assert context.endswith("Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:")
    assert continuations == [" A", " B", " C", " D"]
    # letters out of order are not options: the record then lacks `choices`, a clear error
    with pytest.raises(IlladaError, match="choices"):
        normalize_sample({"question": "Q\nB. x\nA. y\nAnswer:", "answer": "A"}, "mmlu")
