"""Synthetic tasks: seeded and reproducible, answers checked by computations written here (not the generators'),
splits disjoint, the CLI's errors, a tiny training run that learns, and each task's eval end to end."""
import ast
import json
import math
import operator
import re

import pytest
import torch

import illada.__main__ as cli
from illada.api import DiffusionLM
from illada.config import preset
from illada.data.prepare import prepare_pretrain
from illada.errors import IlladaError
from illada.evaluation import evaluate, get_preset
from illada.model import build_model
from illada.tasks import TASKS, get_task, make_records
from illada.tokenizer import byte_level_tokenizer
from illada.training.config import TrainConfig
from illada.training.trainer import train

# ------------------------------------------------------------------------------------ independent arithmetic
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate_expression(text: str) -> int:
    """+, -, * and parentheses over integers, by Python's own parser (precedence included)."""
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"not arithmetic: {text!r}")
    # the aligned working pads numbers with zeros, which Python's parser refuses in literals
    return walk(ast.parse(re.sub(r"\b0+(\d)", r"\1", text), mode="eval"))


@pytest.mark.parametrize("variant", ["default", "aligned"])
def test_arithmetic_answers_are_right_and_working_is_true(variant):
    task = get_task("arithmetic", variant)
    records = make_records(task, "train", 3000, "eval", seed=5)
    templates = set()
    for record in records:
        question, answer = record["question"], record["answer"]
        working, final = answer.rsplit("\n#### ", 1)
        expression = re.fullmatch(r"What is (.+)\?", question)
        if expression:
            templates.add(re.sub(r"\d+", "N", expression.group(1)))
            operands = [int(x) for x in re.findall(r"\d+", expression.group(1))]
            assert all(0 <= x <= 99 for x in operands)
            assert int(final) == evaluate_expression(expression.group(1))
        # every line of working is a chain of equal expressions, the last value of the last line is the answer
        for line in working.split("\n"):
            values = {evaluate_expression(side) for side in line.split(" = ")}
            assert len(values) == 1, line
        assert int(working.split(" = ")[-1]) == int(final)
    assert templates == {"N + N", "N - N", "N * N", "N + N * N", "(N + N) * N"}
    assert any(int(r["answer"].rsplit("#### ", 1)[1]) < 0 for r in records)  # A - B may be negative
    if variant == "aligned":  # every number of a working line has its slot's fixed width
        lines = [line for r in records for line in r["answer"].split("\n")[:-1]]
        shapes = {re.sub(r"\d", "9", line) for line in lines}
        assert shapes == {"99 + 99 = 999", "99 - 99 = +99", "99 - 99 = -99", "9999 + 9999 = 9999",
                          "99 * 99 = 99 * 99 + 99 * 99 = 9999 + 9999 = 9999",
                          "999 * 99 = 999 * 99 + 999 * 99 = 99999 + 99999 = 99999"}, shapes


def test_arithmetic_templates_restrict_the_kinds_and_keep_the_split():
    full, only = get_task("arithmetic"), get_task("arithmetic", "aligned", ["add", "sub"])
    records = make_records(only, "train", 500, "eval", seed=2)
    kinds = {re.sub(r"\d+", "N", r["question"]) for r in records}
    assert kinds == {"What is N + N?", "What is N - N?"}
    for r in records:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", r["question"]).groups()
        assert int(r["answer"].rsplit("#### ", 1)[1]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    # the split is the full task's: a restricted train question is never a test question of the full task
    test = {r["question"] for r in make_records(full, "test", 300, "eval", seed=0)}
    assert not test & {r["question"] for r in records}
    assert {r["question"] for r in make_records(only, "test", 100, "eval", seed=1)} <= {
        e.key for e in _take(full.examples("test", 0), 50000)}


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_deterministic_for_a_seed(name):
    task = get_task(name)
    for fmt in ("text", "sft"):
        first = make_records(task, "train", 50, fmt, seed=3)
        assert first == make_records(get_task(name), "train", 50, fmt, seed=3)
        assert first != make_records(task, "train", 50, fmt, seed=4)
    assert make_records(task, "test", 20, "eval", seed=1) == make_records(get_task(name), "test", 20, "eval", seed=1)


@pytest.mark.parametrize("name", ["arithmetic", "sudoku"])
def test_train_and_test_problems_never_overlap(name):
    task = get_task(name)
    key = (lambda r: r["question"]) if name == "arithmetic" else (lambda r: r["answer"])
    train = {key(r) for r in make_records(task, "train", 3000 if name == "arithmetic" else 600, "eval", seed=0)}
    test = {key(r) for r in make_records(task, "test", 300 if name == "arithmetic" else 60, "eval", seed=0)}
    assert train and test and not train & test


# ---------------------------------------------------------------------------------------- independent sudoku
def valid_sudoku(rows: list[str]) -> bool:
    grid = [[int(ch) for ch in row] for row in rows]
    groups = [set(row) for row in grid] + [{grid[r][c] for r in range(6)} for c in range(6)]
    groups += [{grid[r][c] for r in range(br, br + 2) for c in range(bc, bc + 3)}
               for br in (0, 2, 4) for bc in (0, 3)]
    return all(group == {1, 2, 3, 4, 5, 6} for group in groups)


def completions(rows: list[str], limit: int = 2) -> int:
    """Brute force: first blank, every digit that keeps the grid consistent."""
    cells = [ch for row in rows for ch in row]
    if "." not in cells:
        return 1
    i = cells.index(".")
    r, c = divmod(i, 6)
    found = 0
    for d in "123456":
        peers = [cells[r * 6 + j] for j in range(6)] + [cells[j * 6 + c] for j in range(6)]
        peers += [cells[rr * 6 + cc] for rr in range(r - r % 2, r - r % 2 + 2) for cc in range(c - c % 3, c - c % 3 + 3)]
        if d not in peers:
            cells[i] = d
            found += completions(["".join(cells[k:k + 6]) for k in range(0, 36, 6)], limit - found)
            cells[i] = "."
            if found >= limit:
                break
    return found


def test_sudoku_puzzles_have_one_solution_which_is_the_answer():
    for record in make_records(get_task("sudoku"), "test", 25, "eval", seed=2):
        puzzle, solution = record["puzzle"].split("/"), record["answer"].split("/")
        assert record["prompt"] == f"Sudoku: {record['puzzle']}\nSolution:"
        assert valid_sudoku(solution)
        assert all(p in (".", s) for prow, srow in zip(puzzle, solution) for p, s in zip(prow, srow))
        assert 10 <= "".join(puzzle).count(".") <= 20
        assert completions(puzzle) == 1


def test_reversal_train_text_never_states_a_test_fact_backwards():
    task = get_task("reversal")
    text = {r["text"] for r in make_records(task, "train", 4000, "text", seed=0)}
    reverse = make_records(get_task("reversal", "reverse"), "test", 40, "eval", seed=0)
    forward = make_records(get_task("reversal", "forward"), "test", 40, "eval", seed=0)
    infill = make_records(get_task("reversal", "infill"), "test", 40, "eval", seed=0)
    for record in reverse:  # "Y's child is" -> X, where "X's parent is Y." was trained and the reverse never
        parent = record["prompt"].removesuffix("'s child is")
        assert f"{record['answer']}'s parent is {parent}." in text
        assert f"{parent}'s child is {record['answer']}." not in text
    assert all(f"{r['prompt']} {r['answer']}." in text for r in forward)
    assert all(r["prompt"] == "" and f"{r['answer']}{r['suffix']}" in text for r in infill)
    assert any("'s child is" in t for t in text)  # train pairs are stated both ways
    assert {len(r["answer"]) for r in reverse + forward} == {12}
    with pytest.raises(IlladaError, match="variant"):
        get_task("reversal", "sideways")


# ------------------------------------------------------------------------------------------------------ CLI
def test_tasks_make_cli_writes_the_records(tmp_path, capsys):
    out = tmp_path / "a" / "arith.jsonl"
    assert cli.main(["tasks", "make", "arithmetic", "--n", "7", "--seed", "2", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == make_records(get_task("arithmetic"), "train", 7, "text", seed=2)
    assert cli.main(["tasks", "make", "sudoku", "--split", "test", "--n", "3", "--out", str(tmp_path / "s.jsonl")]) == 0
    assert all(set(json.loads(x)) == {"prompt", "answer", "puzzle"} for x in (tmp_path / "s.jsonl").read_text().splitlines())
    assert "3 sudoku test records (eval" in capsys.readouterr().out


def test_completion_records_split_the_pretraining_document():
    task = get_task("arithmetic")
    for record, text in zip(make_records(task, "train", 20, "completion", seed=3),
                            make_records(task, "train", 20, "text", seed=3)):
        assert set(record) == {"prompt", "completion"}
        assert record["prompt"].startswith("Question: ") and record["prompt"].endswith("\nAnswer:")
        # the same problem: the document text is the bare question + working, or prompt + completion verbatim
        assert text["text"].endswith(record["completion"].lstrip())


@pytest.mark.parametrize("argv, message", [
    (["bogus", "--n", "3"], "unknown task 'bogus'"),
    (["arithmetic", "--n", "0"], "n must be a positive integer"),
    (["arithmetic", "--n", "-4"], "n must be a positive integer"),
    (["reversal", "--n", "3", "--variant", "x"], "variant must be one of"),
    (["reversal", "--split", "test", "--n", "500"], "fewer than 500 distinct problems"),
    (["arithmetic", "--n", "3", "--templates", "add,pow"], "templates must be among"),
    (["sudoku", "--n", "3", "--templates", "add"], "arithmetic only"),
])
def test_tasks_make_cli_mistakes_are_one_line(tmp_path, capsys, argv, message):
    code = cli.main(["tasks", "make", *argv, "--out", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_tasks_make_cli_unwritable_out(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert cli.main(["tasks", "make", "arithmetic", "--n", "2", "--out", str(tmp_path / "dir")]) == 2
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["tasks", "make", "arithmetic", "--n", "2", "--out", str(blocker / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "cannot write" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ training and eval end to end
def test_a_tiny_training_run_on_a_task_lowers_its_loss(tmp_path):
    from illada.tasks import write_records

    write_records(make_records(get_task("arithmetic"), "train", 400, "text"), tmp_path / "a.jsonl")
    prepare_pretrain([tmp_path / "a.jsonl"], tmp_path / "data", "bytes", progress=False)
    config = TrainConfig(data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), preset="tiny", seq_len=64,
                         micro_batch_size=8, steps=40, lr=1e-2, warmup_steps=4, save_every=40, eval_every=40,
                         eval_batches=1, val_rows=4, log_every=1, progress=False, device="cpu")
    losses = train(config).losses
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8


def tiny_lm(causal: bool = False, seed: int = 0) -> DiffusionLM:
    tok = byte_level_tokenizer()
    config = preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, causal=causal, mask_token_id=tok.mask_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=seed).eval()
    with torch.no_grad():  # sharper logits than the init, so greedy choices are not all ties
        model.lm_head.weight.mul_(30) if not config.tie_word_embeddings else model.embed_tokens.weight.mul_(30)
    return DiffusionLM(model=model, tokenizer=tok, config=config, name="tiny")


@pytest.mark.parametrize("causal", [False, True])
def test_each_task_evaluates_end_to_end(causal):
    lm = tiny_lm(causal=causal)
    arithmetic = make_records(get_task("arithmetic"), "test", 3, "eval")
    result = evaluate(lm, get_preset("gsm8k").replace(num_fewshot=0, max_new_tokens=16, block_length=8, steps=8),
                      arithmetic, progress=False)
    assert result.n == 3 and result.generated_tokens == sum(r["generated_tokens"] for r in result.records) > 0
    assert all(r["prompt"].startswith("Question: What is") or r["prompt"].startswith("Question: ") for r in result.records)
    probes = [make_records(get_task("sudoku"), "test", 2, "eval"),
              make_records(get_task("reversal", "reverse"), "test", 2, "eval")]
    if not causal:
        probes.append(make_records(get_task("reversal", "infill"), "test", 2, "eval"))
    for records in probes:
        result = evaluate(lm, get_preset("exact").replace(max_new_tokens=16, block_length=8), records, progress=False)
        for record, sample in zip(result.records, records):
            normal = lambda s: s.strip().removesuffix(".").rstrip()  # noqa: E731
            assert record["correct"] == (normal(record["output"]) == normal(sample["answer"]))
    if not causal:  # the infill probe fills exactly the answer's length
        assert all(r["generated_tokens"] == 12 for r in result.records)


def test_exact_metric_counts_a_right_answer():
    lm = tiny_lm()
    records = [{"prompt": "Q", "answer": "abc."}, {"prompt": "R", "answer": "xyz"}]
    fake = type("O", (), {"generated_lengths": torch.tensor([4, 2]), "row_nfe": torch.tensor([2, 1]), "nfe": 2})()
    lm.generate = lambda prompts, **kw: ([" abc\n", "xy"], fake)
    result = evaluate(lm, get_preset("exact"), records, progress=False)
    assert [r["correct"] for r in result.records] == [True, False] and result.score == 0.5
    # tokens per forward: 6 tokens over the 3 passes that worked on a row; rows through the model: 2 passes x 2
    assert result.to_dict()["tokens_per_forward"] == 2.0 and result.sequence_passes == 4


# -------------------------------------------------------------------------------------------- infill and AR
def naive_infill(model, ids: list[int], mask_id: int) -> list[int]:
    """One position per pass: the masked position whose best non-mask token is most probable."""
    ids = list(ids)
    while mask_id in ids:
        probs = torch.softmax(model(torch.tensor([ids])).float()[0], dim=-1)
        best = None
        for i, t in enumerate(ids):
            if t != mask_id:
                continue
            p = probs[i].clone()
            p[mask_id] = -1
            if best is None or p.max() > best[0]:
                best = (p.max(), i, int(p.argmax()))
        ids[best[1]] = best[2]
    return ids


def test_infill_equals_a_naive_reference_keeps_both_sides_and_is_batch_invariant():
    lm = tiny_lm(seed=4)
    tok, mask_id = lm.tokenizer, lm.mask_token_id
    cases = [("The cat ", " on the mat.", 5), ("", "'s parent is Bob.", 7), ("What is 3 + ", "?", 2)]
    batch = lm.infill([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
    for (prefix, suffix, n), text in zip(cases, batch):
        prefix_ids, suffix_ids = tok.encode(prefix) if prefix else [], tok.encode(suffix)
        want = naive_infill(lm.model, prefix_ids + [mask_id] * n + suffix_ids, mask_id)
        assert want[:len(prefix_ids)] == prefix_ids and want[len(want) - len(suffix_ids):] == suffix_ids
        assert text == tok.decode(want[len(prefix_ids):len(prefix_ids) + n], skip_special_tokens=True)
        assert lm.infill(prefix, suffix, n) == text  # alone == in a padded batch
    with pytest.raises(IlladaError, match="causal"):
        tiny_lm(causal=True).infill("a", "b", 2)
    with pytest.raises(IlladaError, match="positive"):
        lm.infill("a", "b", 0)


def test_threshold_infill_commits_several_per_pass_and_keeps_the_sides():
    from illada.sampling import fill_masks

    lm = tiny_lm(seed=4)
    ids = torch.tensor([[40, 41, 42] + [lm.mask_token_id] * 6 + [43, 44]])
    out = fill_masks(lm.model, ids, lm.mask_token_id, threshold=0.0)
    assert out.nfe == 1 and out.filled == 6  # threshold 0: every confident position at once
    assert out.sequences[0, :3].tolist() == [40, 41, 42] and out.sequences[0, -2:].tolist() == [43, 44]
    assert lm.mask_token_id not in out.sequences.tolist()[0]


def naive_ar(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_ar_decoding_of_a_padded_batch_equals_full_recompute_per_row():
    from illada.sampling import left_pad
    from illada.sampling.autoregressive import greedy_generate_ar

    lm = tiny_lm(causal=True, seed=2)
    prompts = [[20, 30, 40, 50, 60, 70], [80, 90], [100, 110, 120]]
    ids, mask = left_pad(prompts, 0)
    out = greedy_generate_ar(lm.model, ids, 6, attention_mask=mask)
    generated = out.sequences[:, ids.shape[1]:].tolist()
    for row, prompt in enumerate(prompts):
        assert generated[row] == naive_ar(lm.model, prompt, 6)[len(prompt):]
    assert len({tuple(g) for g in generated}) > 1  # the rows differ: not a copy of one row
    text = lm.generate(["ab", "abcdef"], max_new_tokens=5)
    assert text[0] == lm.generate("ab", max_new_tokens=5) and math.isfinite(out.tokens_per_forward)


def test_ar_budget_per_row_near_the_context_end():
    """Prompts of 200 and 238 tokens, context 256, 32 new tokens: the short row gets its 32 tokens as alone (the
    padded width does not cut it), the long one the 18 its own prompt leaves, with a note."""
    from illada.sampling import left_pad
    from illada.sampling.autoregressive import greedy_generate_ar

    lm = tiny_lm(causal=True, seed=4)
    prompts = [[(7 * i) % 200 + 20 for i in range(200)], [(11 * i) % 200 + 20 for i in range(238)]]
    ids, mask = left_pad(prompts, 0)
    out = greedy_generate_ar(lm.model, ids, 32, attention_mask=mask)
    assert out.budgets.tolist() == [32, 18] and out.generated_lengths.tolist() == [32, 18]
    assert len(out.notes) == 1 and "row 1: max_new_tokens 32 capped to 18" in out.notes[0]
    for row, prompt in enumerate(prompts):
        alone = naive_ar(lm.model, prompt, int(out.budgets[row]))[len(prompt):]
        assert out.sequences[row, ids.shape[1]:ids.shape[1] + len(alone)].tolist() == alone


def test_eval_cli_passes_every_sampler_knob_to_the_sampler(tmp_path, monkeypatch, capsys):
    from illada.api import DiffusionLM as Handle
    from illada.checkpoint import save_checkpoint
    from illada.tasks import write_records

    lm = tiny_lm()
    save_checkpoint(lm.model, lm.config, tmp_path / "m", tokenizer=lm.tokenizer)
    data = write_records(make_records(get_task("arithmetic"), "test", 2, "eval"), tmp_path / "t.jsonl")
    seen = {}
    real = Handle.generate

    def spy(self, prompts, **options):
        seen.update(vars(options["config"]), max_new_tokens=options["config"].gen_length)
        return real(self, prompts, **options)

    monkeypatch.setattr(Handle, "generate", spy)
    code = cli.main(["eval", "--model", str(tmp_path / "m"), "--task", "gsm8k", "--data", str(data), "--num-fewshot",
                     "0", "--fixed-length", "--max-new-tokens", "16", "--block-length", "8", "--steps", "4",
                     "--threshold", "0.7", "--cache", "dual", "--remasking", "margin", "--temperature", "0.5",
                     "--no-progress", "--out", str(tmp_path / "o")])
    assert code == 0
    assert {k: seen[k] for k in ("variable_length", "max_new_tokens", "block_length", "steps", "threshold", "cache",
                                 "remasking", "temperature")} == dict(
        variable_length=False, max_new_tokens=16, block_length=8, steps=4, threshold=0.7, cache="dual",
        remasking="margin", temperature=0.5)
    results = json.loads((tmp_path / "o" / "gsm8k.json").read_text())
    assert results["tokens_per_forward"] > 0 and results["tokens_per_second"] > 0
    assert "tokens/pass" in capsys.readouterr().out
    code = cli.main(["eval", "--model", str(tmp_path / "m"), "--task", "gsm8k", "--data", str(data), "--factor", "1",
                     "--threshold", "0.5"])
    assert code == 2 and "either threshold or factor" in capsys.readouterr().err


def test_generate_cli_decodes_an_ar_twin_left_to_right(tmp_path, capsys):
    from illada.checkpoint import save_checkpoint

    lm = tiny_lm(causal=True, seed=2)
    save_checkpoint(lm.model, lm.config, tmp_path / "ar", tokenizer=lm.tokenizer)
    assert cli.main(["generate", "abc", "--model", str(tmp_path / "ar"), "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    ids = lm.tokenizer.encode("abc")
    want = lm.tokenizer.decode(naive_ar(lm.model, ids, 6)[len(ids):], skip_special_tokens=True)
    assert out.rstrip("\n") == "abc" + want and "autoregressive, KV cache" in err
    assert cli.main(["generate", "abc", "--model", str(tmp_path / "ar"), "--show"]) == 2
    assert "autoregressive model" in capsys.readouterr().err
