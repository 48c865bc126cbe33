"""Weight-only quantisation through torchao (`--quantize`, `illada.load(quantize=)`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import illada
from illada.__main__ import main
from illada.api import DEFAULT_MODEL
from illada.errors import IlladaError

pytest.importorskip("torchao")

from illada import quantize as quant  # noqa: E402

IDS = torch.tensor([[1, 40, 41, 42, 3, 3, 3, 50, 51, 3, 3, 60, 61, 62, 3, 3]])


@pytest.fixture(scope="module")
def fp32():
    return illada.load(DEFAULT_MODEL)


def _logits(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(IDS).float()


def _drift(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || other) in nats per position, top-1 agreement)."""
    kl = torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    return kl, (reference.argmax(-1) == other.argmax(-1)).float().mean().item()


def test_int8_logits_are_close_to_fp32(fp32):
    kl, top1 = _drift(_logits(fp32), _logits(illada.load(DEFAULT_MODEL, quantize="int8")))
    assert kl < 0.01 and top1 >= 0.9, (kl, top1)


def test_int4_logits_stay_near_fp32(fp32):
    kl, top1 = _drift(_logits(fp32), _logits(illada.load(DEFAULT_MODEL, quantize="int4")))
    assert kl < 0.2 and top1 >= 0.6, (kl, top1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_linear_weights_are_torchao_quantised_tensors(mode, fp32):
    lm = illada.load(DEFAULT_MODEL, quantize=mode)
    linears = [m for m in lm.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(quant.is_quantized(m.weight) for m in linears)
    assert all(type(m.weight).__module__.startswith("torchao") for m in linears)
    assert quant.is_quantized(lm.model.embed_tokens.weight)
    assert quant.model_bytes(lm.model) < 0.4 * quant.model_bytes(fp32.model)  # fp32 weights: 4 bytes each


def test_quantisation_happens_layer_by_layer_while_loading(monkeypatch):
    """When a Linear is quantised, no other Linear holds a full-precision weight: they are either still meta
    (not read yet) or already quantised."""
    seen = []
    original = quant.quantize_linear

    def spy(module, mode):
        model_linears = [m for m in spy.model.modules() if isinstance(m, nn.Linear) and m is not module]
        seen.append(sum(not m.weight.is_meta and not quant.is_quantized(m.weight) for m in model_linears))
        return original(module, mode)

    from illada.checkpoint import io

    real_transformer = io.Transformer

    def capture(config):
        spy.model = real_transformer(config)
        return spy.model

    monkeypatch.setattr(io, "Transformer", capture)
    monkeypatch.setattr(quant, "quantize_linear", spy)
    illada.load(DEFAULT_MODEL, quantize="int8")
    assert len(seen) > 10 and max(seen) == 0, seen


def test_generate_with_quantize_end_to_end(capsys):
    argv = ["generate", "To be, or not", "--max-new-tokens", "16", "--device", "cpu"]
    assert main([*argv, "--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("To be, or not") and "tokens/s" in out.err
    assert main([*argv, "--quantize", "int4"]) == 0


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_bad_quantize_mode_is_one_line_exit_2(capsys):
    line = _one_line_error(capsys, ["generate", "hi", "--quantize", "int3"])
    assert "--quantize" in line and "int3" in line


def test_int4_where_unsupported_is_one_line_exit_2(capsys, monkeypatch):
    with pytest.raises(IlladaError, match="--quantize int4 on cuda needs bfloat16"):
        quant.check_mode("int4", torch.device("cuda"), torch.float32)
    with pytest.raises(IlladaError, match="choose one of int8, int4"):
        illada.load(DEFAULT_MODEL, quantize="int3")
    monkeypatch.setattr(quant, "require_torchao", lambda: (_ for _ in ()).throw(
        IlladaError(f"--quantize needs torchao: {quant.EXTRA}")))
    line = _one_line_error(capsys, ["generate", "hi", "--quantize", "int8"])
    assert "illada[quant]" in line
