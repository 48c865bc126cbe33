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
    return _logits_of(lm.model)


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
    original = quant.load_linear

    def spy(module, *args):
        model_linears = [m for m in spy.model.modules() if isinstance(m, nn.Linear) and m is not module]
        seen.append(sum(not m.weight.is_meta and not quant.is_quantized(m.weight) for m in model_linears))
        return original(module, *args)

    from illada.checkpoint import io

    real_transformer = io.Transformer

    def capture(config):
        spy.model = real_transformer(config)
        return spy.model

    monkeypatch.setattr(io, "Transformer", capture)
    monkeypatch.setattr(quant, "load_linear", spy)
    illada.load(DEFAULT_MODEL, quantize="int8")
    assert len(seen) > 10 and max(seen) == 0, seen


def _whole_quantized(mode: str):
    """The bundled model loaded in fp32, then quantised the plain way: torchao's `quantize_` on each whole weight."""
    q = quant._quiet_import()
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int8Tensor, PerRow

    model = illada.load(DEFAULT_MODEL).model
    config = q.Int8WeightOnlyConfig() if mode == "int8" else PrototypeInt4WeightOnlyConfig(group_size=128)
    embedding = model.embed_tokens.weight.detach().clone()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    if mode == "int4":  # on CPU int4 is quantised from bfloat16 and runs on bfloat16 inputs, its output float32
        for m in linears:
            m.weight = nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
            _bf16_forward(m)
    q.quantize_(model, config, filter_fn=lambda m, _name: isinstance(m, nn.Linear) and m is not model.lm_head)
    table = Int8Tensor.from_hp(embedding, PerRow())
    model.embed_tokens.weight = nn.Parameter(Int8Tensor(table.qdata, table.scale, table.block_size, table.dtype),
                                             requires_grad=False)
    model.embed_tokens.__class__ = quant.QuantizedEmbedding
    if mode == "int8":
        model.lm_head.weight = model.embed_tokens.weight
    else:
        head = nn.Linear(embedding.shape[1], embedding.shape[0], bias=False)
        head.weight = nn.Parameter(embedding.to(torch.bfloat16))
        q.quantize_(head, config)
        model.lm_head.weight = head.weight
        _bf16_forward(model.lm_head)
    return model


def _bf16_forward(linear: nn.Linear) -> None:
    plain = linear.forward
    linear.forward = lambda x: plain(x.to(torch.bfloat16)).float()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_streamed_blocks_equal_quantising_the_loaded_model_whole(mode, monkeypatch):
    """Loading with quantize= (each weight read and quantised 64 rows at a time) gives exactly the tensors and
    logits of torchao's quantize_ applied to each whole weight of the fully loaded model; quantize_model too."""
    monkeypatch.setattr(quant, "BLOCK_ELEMENTS", 4096)  # 64-row blocks: every weight in several blocks
    reference = _whole_quantized(mode)
    streamed = illada.load(DEFAULT_MODEL, quantize=mode).model
    merged = quant.quantize_model(illada.load(DEFAULT_MODEL).model, mode, torch.float32)
    expected = dict(reference.named_parameters(remove_duplicate=False))
    for model in (streamed, merged):
        got = dict(model.named_parameters(remove_duplicate=False))
        assert got.keys() == expected.keys()
        for name, tensor in got.items():
            ref = expected[name]
            assert type(tensor) is type(ref), name
            names = tensor.__tensor_flatten__()[0] if quant.is_quantized(tensor) else [None]
            for field in names:
                a, b = (tensor, ref) if field is None else (getattr(tensor, field), getattr(ref, field))
                assert (a is None and b is None) or torch.equal(a, b), (name, field)
        assert (model.lm_head.weight is model.embed_tokens.weight) == (mode == "int8")
        assert torch.equal(_logits_of(model), _logits_of(reference))


def _logits_of(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).float()


def test_quantised_load_reads_the_files_without_memory_maps(monkeypatch):
    """Memory-mapped shard pages would count in the process's resident memory: a quantised load reads them."""
    from illada.checkpoint import io

    def refuse(*args, **kwargs):
        raise AssertionError("safe_open (a memory map) used by a quantised load")

    monkeypatch.setattr(io, "safe_open", refuse)
    lm = illada.load(DEFAULT_MODEL, quantize="int8")
    assert quant.is_quantized(lm.model.layers[0].mlp.down_proj.weight)


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
