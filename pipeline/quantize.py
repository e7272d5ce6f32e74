"""The precisions a hand-off is served in, as weight transforms (pipeline/method.md, "Audit").

A model is served in bf16, int8 or 4-bit, and an unlearning update of ~1e-5 per weight can
vanish inside a 4-bit bucket (~0.05 wide). `served_copy` returns a copy of a model whose
weights hold exactly the numbers such a kernel multiplies with:
- bf16: every floating-point tensor cast to bfloat16 (and run in bfloat16). On a CPU the
  linear layers' matmuls run in fp32 on the bf16 values and round the result to bf16: what a
  bf16 GEMM with fp32 accumulation computes (cuBLAS's default, oneDNN's on CPUs with bf16
  instructions), since the product of two bf16 numbers is exact in fp32; only the summation
  order differs. torch's own bf16 matmul on a CPU without bf16 instructions (AVX2) is 8x
  slower than fp32 (SmolLM2-135M, 64 x 48 tokens: 44 s vs 5.6 s a forward pass, measured).
  Two bf16 computations that differ in summation order only (one GEMM: 0.02 % of outputs one
  bf16 step apart) drift apart over 30 layers of bf16 rounding, as a GPU's and a CPU's bf16
  would: on the demo's 64 audit rows this one and torch's gave the same leak verdict for every
  erased and never-seen row, and flipped 3 of 24 half-forgotten kept rows, both ways.
- int8: GGUF's Q8_0 (blocks of 32 along the input dimension, scale d = absmax / 127,
  q = round(x / d) half away from zero, weight q d), dequantized;
- int4: GGUF's Q4_0 (blocks of 32, scale d = the block's largest-magnitude value / -8,
  q = min(15, floor(x / d + 8.5)), weight (q - 8) d: ggml's reference quantize_row_q4_0),
  dequantized.
Both store d in fp16 (and dequantize with it), as the file format does.
int8 / int4 are weight-only round-to-nearest (RTN): the weights of every linear layer in the
transformer blocks are rounded, embeddings and the output head stay full precision (as
llama.cpp's Q8_0 / Q4_0 files keep the output at higher precision), and activations run in
fp32 with torch's matmul, so logits match a real kernel up to its accumulation order.
"""

from __future__ import annotations

import copy

import torch

from pipeline.errors import UserError

PRECISIONS = ("bf16", "int8", "int4")
BLOCK = 32


def _blocks(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[rows, in] -> [rows, n_blocks, BLOCK] (zero-padded at the end) and the padding."""
    pad = -weight.shape[-1] % BLOCK
    w = torch.nn.functional.pad(weight.float(), (0, pad))
    return w.reshape(weight.shape[0], -1, BLOCK), pad


def _unblocks(blocks: torch.Tensor, pad: int, like: torch.Tensor) -> torch.Tensor:
    out = blocks.reshape(like.shape[0], -1)
    return (out[:, : out.shape[1] - pad] if pad else out).to(like.dtype)


def q8_0(weight: torch.Tensor) -> torch.Tensor:
    """Q8_0 round trip of a 2-D weight (see module docstring)."""
    x, pad = _blocks(weight)
    d = x.abs().amax(-1, keepdim=True) / 127
    q = x * torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # C's roundf: halves away from zero
    return _unblocks(q * _fp16(d), pad, weight)


def q4_0(weight: torch.Tensor) -> torch.Tensor:
    """Q4_0 round trip of a 2-D weight (see module docstring)."""
    x, pad = _blocks(weight)
    signed_max = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = signed_max / -8
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
    q = torch.clamp(torch.floor(x * inv + 8.5), max=15)
    return _unblocks((q - 8) * _fp16(d), pad, weight)


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    """A block's scale as the file stores it (fp16), which is what the kernel multiplies by."""
    return scale.half().float()


class _Bf16Gemm:
    """An nn.Linear's forward in a bf16 model: fp32 matmul of the bf16 input and (a fp32 copy of)
    the bf16 weight, bias added in fp32, the result rounded to bf16 (see module docstring)."""

    def __init__(self, linear: torch.nn.Linear):
        self.weight = linear.weight.detach().float()
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight, self.bias).to(x.dtype)


ROUND_TRIPS = {"int8": q8_0, "int4": q4_0}


def rounded_linears(model: torch.nn.Module) -> list[str]:
    """Names of the weights int8 / int4 round: every nn.Linear but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]


@torch.no_grad()
def served_copy(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A copy of `model` as served in `precision` (one of PRECISIONS); `model` is unchanged."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    served = copy.deepcopy(model)
    if precision == "bf16":
        served.to(torch.bfloat16)
        if next(served.parameters()).device.type == "cpu":
            for module in served.modules():
                if isinstance(module, torch.nn.Linear):
                    module.forward = _Bf16Gemm(module)
        return served
    params, names = dict(served.named_parameters()), rounded_linears(served)
    if not names:
        raise UserError(
            f"{precision}: this model has no nn.Linear layers to round (GPT-2-style Conv1D?), so its "
            f"{precision} copy would be the fp32 model; fix: drop {precision} from audit.probes and "
            "unlearning.check.harden for this model"
        )
    for name in names:
        params[name].copy_(ROUND_TRIPS[precision](params[name]))
    return served
