"""Infilling and editing: holes anywhere in a canvas, every sampler rule on it, batch invariance, a greedy
multi-span infill against a naive reference written here, the `<|mask:N|>` syntax, `lm.edit`, and the CLI."""
import types

import pytest
import torch
from torch import nn

from test_tasks import naive_infill, tiny_lm  # the reference: one pass per step, the most confident mask

from illada.errors import IlladaError
from illada.sampling import infill, left_pad
from illada.tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(seed=4)


def holes_canvas(lm, pieces):
    """Token ids of `pieces` (str: literal text, int: a hole of that many masks) and the holes' columns."""
    ids, spans = [], []
    for piece in pieces:
        if isinstance(piece, int):
            spans.append((len(ids), len(ids) + piece))
            ids += [lm.mask_token_id] * piece
        else:
            ids += lm.tokenizer.encode(piece)
    return ids, spans


CASES = [["The cat ", 3, " on the mat, ", 4, "."],
         [5, " is the capital of ", 2],
         ["What is 3 + ", 2, " = ", 1, "? ", 3, " ok"]]


# ------------------------------------------------------------------------------------------------ the sampler
def test_greedy_multi_span_infill_equals_a_naive_reference(lm):
    for pieces in CASES:
        ids, spans = holes_canvas(lm, pieces)
        want = naive_infill(lm.model, ids, lm.mask_token_id)
        out = infill(lm.model, torch.tensor([ids]))
        assert out.sequences[0].tolist() == want
        assert out.spans == [spans] and out.nfe == sum(e - s for s, e in spans)
        assert out.span_tokens[0] == [want[s:e] for s, e in spans]


def naive_hole_by_hole(model, ids: list[int], spans, mask_id: int) -> list[int]:
    """The cached infill's order with the cache refreshed every pass (so exact): the holes one after another,
    left to right; in each, one position per pass, the most confident of that hole's masks (full recompute)."""
    ids = list(ids)
    for start, end in spans:
        while mask_id in ids[start:end]:
            probs = torch.softmax(model(torch.tensor([ids])).float()[0], dim=-1)
            probs[:, mask_id] = -1
            best = max((float(probs[i].max().detach()), i) for i in range(start, end) if ids[i] == mask_id)
            ids[best[1]] = int(probs[best[1]].argmax())
    return ids


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_infill_refreshed_every_pass_equals_the_hole_by_hole_reference(lm, cache):
    for pieces in CASES:
        ids, spans = holes_canvas(lm, pieces)
        want = naive_hole_by_hole(lm.model, ids, spans, lm.mask_token_id)
        exact = infill(lm.model, torch.tensor([ids]), cache=cache, cache_refresh=1)
        assert exact.sequences[0].tolist() == want and exact.nfe == sum(e - s for s, e in spans)
        # the approximate cache (refreshed at each hole's start only) keeps the text and fills exactly the holes
        approx = infill(lm.model, torch.tensor([ids]), cache=cache).sequences[0].tolist()
        inside = {i for s, e in spans for i in range(s, e)}
        assert all(approx[i] == ids[i] for i in range(len(ids)) if i not in inside)
        assert all(approx[i] != lm.mask_token_id for i in inside)


def test_cached_infill_recomputes_only_the_window(lm):
    """A dual-cache pass feeds the model the hole's window alone; prefix, the window to the end of the canvas."""
    ids, spans = holes_canvas(lm, ["The cat sat ", 3, " on the mat, then ", 2, " slept."])
    for cache, widths in (("dual", {3, 2}), ("prefix", {len(ids) - spans[0][0], len(ids) - spans[1][0]})):
        seen = []
        handle = lm.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]),
                                                    with_kwargs=True)
        try:
            infill(lm.model, torch.tensor([ids]), cache=cache)
        finally:
            handle.remove()
        assert seen.count(len(ids)) == 2  # one full pass at the start of each hole stores the cache
        assert set(seen) - {len(ids)} == widths


RULES = [dict(), dict(steps=2), dict(threshold=0.3), dict(factor=1.0), dict(remasking="margin"),
         dict(remasking="entropy"), dict(remasking="random", seed=3), dict(temperature=1.0, seed=1),
         dict(cfg_scale=1.5), dict(top_k=5, top_p=0.8, temperature=0.7, seed=2), dict(forbid_eos=True),
         dict(eos_confidence="neg_inf"), dict(cache="dual"), dict(cache="prefix", threshold=0.3),
         dict(cache="dual", cfg_scale=1.5)]


@pytest.mark.parametrize("options", RULES, ids=[str(r) or "greedy" for r in RULES])
def test_every_rule_keeps_the_text_and_changes_exactly_the_holes(lm, options):
    rows = [holes_canvas(lm, p) for p in CASES]
    ids, mask = left_pad([r[0] for r in rows], lm.pad_token_id)
    out = infill(lm.model, ids, attention_mask=mask, **options)
    width = ids.shape[1]
    for b, (row_ids, spans) in enumerate(rows):
        offset = width - len(row_ids)
        got = out.sequences[b, offset:].tolist()
        holes = {c for s, e in spans for c in range(s, e)}
        assert [t for c, t in enumerate(got) if c not in holes] == [t for c, t in enumerate(row_ids) if c not in holes]
        assert lm.mask_token_id not in got
        assert out.spans[b] == [(s + offset, e + offset) for s, e in spans]
        assert out.sequences[b, :offset].tolist() == ids[b, :offset].tolist()  # padding untouched
        if options.get("forbid_eos"):
            assert lm.tokenizer.eos_token_id not in got
    if "steps" in options:
        assert out.nfe == 2  # two passes per row whatever its hole count
    if ("threshold" in options or "factor" in options) and "cache" not in options:
        assert out.nfe <= max(sum(e - s for s, e in r[1]) for r in rows)
    if "cache" in options:  # hole h of every row in round h: at most the round's longest hole in passes
        rounds = max(len(r[1]) for r in rows)
        longest = [max((e - s for s, e in r[1][h:h + 1]), default=0) for h in range(rounds) for r in rows]
        bound = sum(max(longest[h * len(rows):(h + 1) * len(rows)]) for h in range(rounds))
        assert rounds <= out.nfe // (2 if options.get("cfg_scale") else 1) <= bound


@pytest.mark.parametrize("options", [dict(), dict(steps=3), dict(threshold=0.2), dict(factor=2.0),
                                     dict(remasking="margin"), dict(cfg_scale=1.0), dict(eos_confidence="neg_inf")],
                         ids=["greedy", "steps", "threshold", "factor", "margin", "cfg", "neg_inf"])
def test_a_row_gives_what_it_gives_alone_left_or_right_padded(lm, options):
    rows = [holes_canvas(lm, p)[0] for p in CASES]
    alone = [infill(lm.model, torch.tensor([r]), **options).sequences[0].tolist() for r in rows]
    ids, mask = left_pad(rows, lm.pad_token_id)
    out = infill(lm.model, ids, attention_mask=mask, **options)
    for b, r in enumerate(rows):
        assert out.sequences[b, ids.shape[1] - len(r):].tolist() == alone[b]
        assert out.row_tokens(b) == alone[b]
    # right padding too: the padding columns are hidden keys wherever they are
    width = max(map(len, rows))
    right = torch.tensor([r + [lm.pad_token_id] * (width - len(r)) for r in rows])
    right_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    out = infill(lm.model, right, attention_mask=right_mask, **options)
    assert [out.row_tokens(b) for b in range(len(rows))] == alone


class Scripted(nn.Module):
    """A stand-in model whose greedy choice at column c is script[c] (confidence rising to the right)."""

    def __init__(self, script: list[int], vocab: int, mask_id: int, eos_id: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.vocab = script, vocab
        self.config = types.SimpleNamespace(mask_token_id=mask_id, eos_token_id=eos_id, max_seq_len=64)

    def forward(self, x, attention_mask=None):
        logits = torch.zeros(x.shape[0], x.shape[1], self.vocab)
        for c in range(x.shape[1]):
            logits[:, c, self.script[c]] = 5.0 + c * 0.01
        return logits


def test_allow_shorter_drops_eos_and_padding_only_at_the_end_of_a_hole():
    tok = byte_level_tokenizer()
    eos, pad, mask = tok.eos_token_id, tok.pad_token_id, tok.mask_token_id
    a, b, c = 9 + ord("a"), 9 + ord("b"), 9 + ord("c")
    canvas = [c, mask, mask, mask, mask, c, mask, mask, mask, c]
    script = [c, a, eos, b, eos, c, b, pad, eos, c]  # hole 1: a EOS b EOS; hole 2: b PAD EOS
    model = Scripted(script, tok.vocab_size, mask, eos)
    kept = infill(model, torch.tensor([canvas]))
    assert kept.span_tokens == [[[a, eos, b, eos], [b, pad, eos]]]
    short = infill(model, torch.tensor([canvas]), allow_shorter=True, pad_token_id=pad)
    assert short.span_tokens == [[[a, eos, b], [b]]]  # the EOS inside the first hole stays
    assert short.row_tokens(0) == [c, a, eos, b, c, b, c]
    assert short.sequences[0].tolist() == script  # the canvas itself keeps every position


def test_explicit_spans_remask_existing_text_and_leave_a_literal_mask_alone(lm):
    ids = lm.tokenizer.encode("Hello there, old friend.")
    ids[2] = lm.mask_token_id  # a literal mask token outside the spans: context, never filled
    out = infill(lm.model, torch.tensor([ids]), spans=[[(6, 11), (13, 16)]])
    got = out.sequences[0].tolist()
    assert got[:6] == ids[:6] and got[11:13] == ids[11:13] and got[16:] == ids[16:]
    assert got[2] == lm.mask_token_id and out.filled == 8
    with pytest.raises(IlladaError, match="overlapping"):
        infill(lm.model, torch.tensor([ids]), spans=[[(3, 8), (6, 9)]])
    with pytest.raises(IlladaError, match="bad"):
        infill(lm.model, torch.tensor([ids]), spans=[[(5, 5)]])
    with pytest.raises(IlladaError, match="unknown cache"):
        infill(lm.model, torch.tensor([ids]), cache="full")
    with pytest.raises(IlladaError, match="unknown infill option"):
        infill(lm.model, torch.tensor([ids]), block_length=4)


# ------------------------------------------------------------------------------------- text syntax and the API
def test_placeholder_parsing_and_escapes():
    from illada.holes import escape, parse_holes

    assert parse_holes("The capital of France is <|mask:3|>, a city known for <|mask:8|>.") == [
        "The capital of France is ", 3, ", a city known for ", 8, "."]
    assert parse_holes("<|mask:2|><|mask:1|>") == [2, 1]
    assert parse_holes(r"literal \<|mask:3|> then <|mask:4|>") == ["literal <|mask:3|> then ", 4]
    assert parse_holes(r"a \\<|mask:2|> b") == ["a \\", 2, " b"]  # an escaped backslash, then a hole
    assert parse_holes(r"a \\\<|mask:2|> <|mask:1|>") == ["a \\<|mask:2|> ", 1]
    assert parse_holes(r"C:\path <|mask:1|>") == ["C:\\path ", 1]
    text = r"keep <|mask:9|> and \<|mask:2|> \\ end"
    assert parse_holes(escape(text) + "<|mask:1|>") == [text, 1]


@pytest.mark.parametrize("text, message", [
    ("open <|mask:3 and more", "unclosed placeholder at character 5"),
    ("zero <|mask:0|>", "positive number of tokens, got 0"),
    ("negative <|mask:-2|>", "positive number of tokens, got -2"),
    ("word <|mask:three|>", "is not an integer"),
    ("empty <|mask:|>", "is not an integer"),
    ("no holes here", "no hole in the text"),
    (r"only \<|mask:3|> escaped", "no hole in the text"),
])
def test_bad_placeholders_are_one_line_errors(lm, text, message):
    with pytest.raises(IlladaError, match=message) as caught:
        lm.infill(text)
    assert "\n" not in str(caught.value)


def test_template_infill_keeps_every_literal_and_matches_the_canvas_sampler(lm):
    template = "The capital of France is <|mask:3|>, a city known for <|mask:8|>. \\<|mask:2|> stays"
    text, out = lm.infill(template, return_output=True)
    a, b = out.fills[0]
    assert text == f"The capital of France is {a}, a city known for {b}. <|mask:2|> stays"
    assert [len(t) for t in out.span_tokens[0]] == [3, 8] and lm.mask_token_id not in out.sequences[0].tolist()
    ids, spans = holes_canvas(lm, ["The capital of France is ", 3, ", a city known for ", 8,
                                   ". <|mask:2|> stays"])
    want = naive_infill(lm.model, ids, lm.mask_token_id)
    assert out.span_tokens[0] == [want[s:e] for s, e in spans]
    # a batch of templates: each as alone; the prefix/suffix form is the one-hole case
    batch = lm.infill([template, "<|mask:4|> is here", "x <|mask:1|>"])
    assert batch == [text, lm.infill("<|mask:4|> is here"), lm.infill("x <|mask:1|>")]
    fill = lm.infill("The cat ", " sat.", 5)
    assert lm.infill("The cat <|mask:5|> sat.") == f"The cat {fill} sat."
    assert lm.infill("The cat ", " sat.", 5, steps=2) == lm.infill("The cat <|mask:5|> sat.", steps=2)[8:-5]


def test_infill_options_and_input_errors(lm):
    assert lm.infill("a <|mask:4|> b", temperature=1.0, seed=3) == lm.infill("a <|mask:4|> b", temperature=1.0, seed=3)
    with pytest.raises(IlladaError, match="longer than the model context"):
        lm.infill("x <|mask:300|>")
    with pytest.raises(IlladaError, match="longer than the model context"):
        lm.infill("y" * 256 + "<|mask:1|>")
    with pytest.raises(IlladaError, match="unknown infill option"):
        lm.infill("a <|mask:2|>", max_new_tokens=3)
    with pytest.raises(IlladaError, match="cache_refresh must be >= 1"):
        lm.infill("a <|mask:2|>", cache="dual", cache_refresh=0)
    with pytest.raises(IlladaError, match="together"):
        lm.infill("a", suffix="b")
    with pytest.raises(IlladaError, match="causal"):
        tiny_lm(causal=True).infill("a <|mask:2|>")


def test_edit_regenerates_exactly_the_given_character_spans(lm):
    text = "To be, or not to be, that is the question."
    new, out = lm.edit(text, [(10, 13), (33, 41)], return_output=True)
    first, second = out.fills[0]
    assert new == text[:10] + first + text[13:33] + second + text[41:]
    assert [len(t) for t in out.span_tokens[0]] == [3, 8]  # same token count as the text they replace
    assert lm.edit(text, [(33, 41), (10, 13)]) == new  # span order does not matter
    longer, out = lm.edit(text, [(0, 2)], lengths=[6], return_output=True)
    assert len(out.span_tokens[0][0]) == 6 and longer.endswith(text[2:])
    for spans, message in [([(5, 3)], "empty or outside"), ([(0, 99)], "outside"), ([(0, 5), (3, 8)], "overlaps"),
                           ([], "non-empty"), ([(1,)], "pair of integers"), ([(0.5, 2)], "pair of integers")]:
        with pytest.raises(IlladaError, match=message):
            lm.edit(text, spans)
    with pytest.raises(IlladaError, match="one positive integer per span"):
        lm.edit(text, [(0, 2)], lengths=[0])


# -------------------------------------------------------------------------------------------------- the CLI
from test_cli import checkpoint  # noqa: E402,F401  (the tiny saved checkpoint fixture)

import illada  # noqa: E402
from illada.__main__ import main  # noqa: E402

TEMPLATE = "The capital of France is <|mask:3|>, a city known for <|mask:8|>."


@pytest.mark.parametrize("argv, options", [
    ([], {}),
    (["--steps", "3", "--remasking", "margin", "--allow-shorter"], dict(steps=3, remasking="margin",
                                                                        allow_shorter=True)),
    (["--threshold", "0.2", "--cfg-scale", "1.0"], dict(threshold=0.2, cfg_scale=1.0)),
    (["--temperature", "0.8", "--top-k", "20", "--seed", "5"], dict(temperature=0.8, top_k=20, seed=5)),
])
def test_infill_command_prints_the_library_result(checkpoint, capsys, argv, options):  # noqa: F811
    assert main(["infill", TEMPLATE, "--model", str(checkpoint), *argv]) == 0
    out, err = capsys.readouterr()
    want = illada.load(checkpoint).infill(TEMPLATE, **{"seed": 0, **options})
    assert out == want + "\n" and want.startswith("The capital of France is ") and want.endswith(".")
    assert "2 holes · 11 tokens filled" in err


def test_infill_show_and_record_show_the_holes_resolving_in_place(checkpoint, tmp_path, capsys):  # noqa: F811
    page = tmp_path / "fill.html"
    assert main(["infill", "Hi <|mask:2|> there <|mask:3|>!", "--model", str(checkpoint), "--show",
                 "--record", str(page)]) == 0
    out, err = capsys.readouterr()
    assert "NFE 5" in out and "recorded 5 steps" in err
    html = page.read_text()
    assert html.count('class="frame"') == 5
    assert html.count('<span class="c">') == 5 * len("Hi  there !")  # the fixed text in every frame
    first = html.split('class="frame"')[1]
    assert first.count('class="m"') == 4  # after step 1, four of the five hole tokens are still masked


@pytest.mark.parametrize("argv, message", [
    (["a <|mask:3"], "unclosed placeholder"),
    (["a <|mask:0|>"], "positive number of tokens, got 0"),
    (["a <|mask:-1|>"], "positive number of tokens, got -1"),
    (["a <|mask:x|>"], "not an integer"),
    (["no hole"], "no hole in the text"),
    (["a <|mask:200|>"], "longer than the model context"),
    (["a <|mask:2|>", "--cache", "dual", "--cache-refresh", "0"], "cache_refresh must be >= 1"),
    (["a <|mask:2|>", "--record", "out.png"], "must end in .html or .gif"),
    (["a <|mask:2|>", "--steps", "0"], "steps must be a positive integer"),
    (["a <|mask:2|>", "--threshold", "2"], "threshold must be in"),
])
def test_infill_command_mistakes_exit_2_with_one_line(checkpoint, capsys, argv, message):  # noqa: F811
    assert main(["infill", *argv[:1], "--model", str(checkpoint), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
