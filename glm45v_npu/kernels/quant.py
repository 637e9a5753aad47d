"""8-bit linear layers: the math of every scheme the runner reads, once, in the torch twin, and its Triton
kernels.

A quantized weight is [N, K] in fp8 (e4m3) or int8 with fp32 scales [N, G]: one per output row (G = 1: per
channel, or per tensor spread over the rows) or one per row and 128-column group (G = ceil(K / 128): 128x128
blocks, spread over their rows). Activations are quantized the way the checkpoint says:
- "token":  dynamic, one scale per token (FP8_DYNAMIC, msmodelslim W8A8_DYNAMIC)
- "group":  dynamic, one scale per token and 128 columns (FP8_BLOCK)
- "static": one scale (and, for int8, an offset) from the checkpoint (static FP8, msmodelslim W8A8)
- "none":   not quantized; the weight is dequantized in the matmul (weight-only, W8A16)
Symmetric scales are max|x| / qmax (448 for e4m3, 127 for int8); a zero scale becomes the float32 epsilon, as
compressed-tensors makes it. y = sum over groups of (x_q . w_q) * x_scale * w_scale + bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
EPS = float(torch.finfo(torch.float32).eps)
GROUP = 128
ACTS = ("token", "group", "static", "none")


@dataclass(frozen=True)
class QuantSpec:
    """How one layer's weight is stored and its input quantized."""

    weight: str  # "fp8" or "int8"
    act: str  # one of ACTS
    group: int = 0  # columns per weight scale (GROUP for block scales); 0 = the whole row

    def __post_init__(self) -> None:
        if self.weight not in ("fp8", "int8") or self.act not in ACTS:
            raise ValueError(f"unknown quantization {self}")

    @property
    def dtype(self) -> torch.dtype:
        return FP8 if self.weight == "fp8" else torch.int8

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.weight == "fp8" else INT8_MAX

    def groups(self, k: int) -> int:
        return -(-k // self.group) if self.group else 1


def wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _to_q(scaled: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Values already divided by their scale -> the 8-bit type (fp8 rounds to nearest; int8 rounds half to even)."""
    if spec.weight == "fp8":
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return scaled.round().clamp(-128, 127).to(torch.int8)


def expand(scale: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[rows, G] scales -> [rows, k], each scale over its group of columns."""
    return scale if scale.shape[-1] == 1 else scale.repeat_interleave(group, dim=-1)[..., :k]


def quantize_torch(x: torch.Tensor, spec: QuantSpec, input_scale: torch.Tensor | None = None,
                   input_offset: torch.Tensor | None = None, token_scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (x_q [T, K], scales [T, G] in float32 or wider): dynamic per token or per token group, or the
    static scale (and offset) given. Static int8 scales come back as 1: deq_scale carries them. token_scale [T]:
    per-token scales found elsewhere (a row-parallel layer's shards agree on their token's scale)."""
    T, K = x.shape
    xw = x.to(wide(x.dtype))
    if token_scale is not None:
        scale = token_scale.to(xw.dtype)[:, None]
        return _to_q(xw / scale, spec), scale
    if spec.act == "static":
        scaled = xw / input_scale.to(xw.dtype) + (input_offset.to(xw.dtype) if input_offset is not None else 0)
        scale = input_scale.to(xw.dtype).reshape(1, 1).expand(T, 1) if spec.weight == "fp8" else xw.new_ones(T, 1)
        return _to_q(scaled, spec), scale
    group = GROUP if spec.act == "group" else K
    G = -(-K // group)
    padded = torch.nn.functional.pad(xw, (0, G * group - K)).view(T, G, group)
    scale = padded.abs().amax(-1) / spec.qmax
    scale = torch.where(scale == 0, torch.full_like(scale, EPS), scale)
    return _to_q(xw / expand(scale, K, group), spec), scale


def token_scales(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """max|x| per token / qmax ([T] float32): what a shard all-reduces (max) before quantizing its part of a row."""
    return x.abs().amax(-1).float() / spec.qmax


def clamp_scale(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.full_like(scale, EPS), scale)


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] 8-bit weight and [N, G] scales -> the weight in `dtype` (the weight-only path, and FP8 checkpoints
    on devices without FP8 arithmetic)."""
    return (w.to(wide(dtype)) * expand(scale.to(wide(dtype)), w.shape[1], group)).to(dtype)


def quant_linear_torch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                       spec: QuantSpec, input_scale: torch.Tensor | None = None,
                       input_offset: torch.Tensor | None = None, quant_bias: torch.Tensor | None = None,
                       token_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of every 8-bit linear layer: x [T, K] -> [T, N] in x's dtype, computed in float32 or wider (float64
    inputs give the float64 reference). quant_bias (msmodelslim W8A8) is added to the integer product before the
    scales: y = (x_q W_q^T + quant_bias) * deq_scale."""
    w = wide(x.dtype)
    K = x.shape[1]
    w_deq = weight.to(w) * expand(weight_scale.to(w), K, spec.group)
    if spec.act == "none":
        x_deq = x.to(w)
    else:
        xq, xs = quantize_torch(x, spec, input_scale, input_offset, token_scale)
        x_deq = xq.to(w) * expand(xs.to(w), K, GROUP if spec.act == "group" else K)
    y = x_deq @ w_deq.T
    if quant_bias is not None:
        y = y + quant_bias.to(w) * weight_scale.to(w)[:, 0]
    if bias is not None:
        y = y + bias.to(w)
    return y.to(x.dtype)


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (8-bit [N, K], scales [N, G]): what `--quantization fp8` does at load, per output
    channel (or per row and 128-column group)."""
    N, K = w.shape
    ww = w.to(wide(w.dtype))
    group = spec.group or K
    G = -(-K // group)
    scale = torch.nn.functional.pad(ww, (0, G * group - K)).view(N, G, group).abs().amax(-1) / spec.qmax
    scale = torch.where(scale == 0, torch.full_like(scale, EPS), scale)
    return _to_q(ww / expand(scale, K, group), spec), scale.float()


# --- Triton -------------------------------------------------------------------------------------------------
# quantize: one program per (token, scale group) finds max|x| over its columns and writes the 8-bit values and
# the scale. scaled_mm: one program per [BLOCK_M, BLOCK_N] tile of y; each BLOCK_K step is one tl.dot of 8-bit
# tiles (fp8 x fp8 or int8 x int8, float32 / int32 accumulation); with grouped scales (BLOCK_K divides 128) each
# step is scaled as it is added, otherwise the row and column scales multiply the sum once. The weight-only
# kernel dequantizes the weight tile to the activation type before its tl.dot. Weight tiles are read as they lie
# ([BLOCK_N, BLOCK_K], contiguous along K) and transposed in registers: a strided [BLOCK_K, BLOCK_N] read of
# 8-bit values overflows Ascend's UB.

try:
    import triton
    import triton.language as tl

    from ._triton import Launch, dot_mode, fp8_dot, ptr, row_offset, target_of
    from ._triton import mma as _dot
    from .tiles import QMM, Tile, fixed
except ImportError:
    triton = None

TRITON_TYPES = {FP8: "fp8e4nv", torch.int8: "i8", torch.uint8: "u8"}

if triton is not None:

    @triton.jit
    def _round_e4m3(v):
        """v (float32, |v| <= 448) rounded to nearest-even e4m3: 3 mantissa bits kept by integer rounding (a carry
        moves the exponent, as it should), spacing 2^-9 below the normal range. The cast after it is exact (the
        interpreter's own float32 -> e4m3 cast rounds wrongly across powers of two)."""
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000: drop 20 mantissa bits
        normal = bits.to(tl.float32, bitcast=True)
        s = v * 512.0
        r = tl.floor(s + 0.5)
        r = tl.where((r - s == 0.5) & (r % 2 != 0), r - 1, r)
        return tl.where(tl.abs(v) < 0.015625, r / 512.0, normal)

    @triton.jit
    def _e4m3_bytes(b):
        """Raw e4m3 bytes -> float32, where Triton has no e4m3 type (sm_80): the sign and the 7 exponent and
        mantissa bits set into a float16's, times 2^8 for the exponent bias (7 against 15); subnormals come out
        right too (e4m3's smallest, 2^-9, is a float16 subnormal)."""
        bits = b.to(tl.int32)
        half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.int16)
        return half.to(tl.float16, bitcast=True).to(tl.float32) * 256.0

    @triton.jit
    def weight_values(b, W_BYTES: tl.constexpr):
        """A tile of 8-bit weights as float32: converted, or decoded from raw e4m3 bytes (W_BYTES)."""
        if W_BYTES:
            return _e4m3_bytes(b)
        return b.to(tl.float32)

    @triton.jit(do_not_specialize=["T"])
    def _quantize_kernel(x, xq, xs, T, K: tl.constexpr, GROUP_K: tl.constexpr, G: tl.constexpr,
                         BLOCK: tl.constexpr, QMAX: tl.constexpr, INT8: tl.constexpr):
        t = tl.program_id(0)
        g = tl.program_id(1)
        src = x + row_offset(t, K) + g * GROUP_K
        dst = xq + row_offset(t, K) + g * GROUP_K
        amax = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, GROUP_K, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            m = (c < GROUP_K) & (g * GROUP_K + c < K)
            amax = tl.maximum(amax, tl.abs(tl.load(src + c, mask=m, other=0.0).to(tl.float32)))
        scale = tl.max(amax, axis=0) / QMAX
        scale = tl.where(scale == 0, 1.1920928955078125e-07, scale)
        for c0 in range(0, GROUP_K, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            m = (c < GROUP_K) & (g * GROUP_K + c < K)
            v = tl.load(src + c, mask=m, other=0.0).to(tl.float32) / scale
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            if INT8:  # round half to even, as torch.round does
                r = tl.floor(v + 0.5)
                r = tl.where((r - v == 0.5) & (r % 2 != 0), r - 1, r)
                tl.store(dst + c, r.to(tl.int8), mask=m)
            else:
                tl.store(dst + c, _round_e4m3(v).to(xq.dtype.element_ty), mask=m)
        tl.store(xs + t.to(tl.int64) * G + g, scale)

    @triton.jit
    def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's output tile: its indices, row and column offsets inside it, rows, columns, masks."""
        pm = tl.program_id(0)
        pn = tl.program_id(1)
        mi, ni = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
        m = pm * BLOCK_M + mi
        n = pn * BLOCK_N + ni
        return pm, pn, mi, ni, m, n, m < M, n < N

    @triton.jit(do_not_specialize=["M"])
    def _scaled_mm_kernel(xq, xs, wq, ws, bias, qbias, y, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                          GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, INT8: tl.constexpr, HAS_QBIAS: tl.constexpr):
        pm, pn, mi, ni, m, n, mm, nm = _output_tile(M, N, BLOCK_M, BLOCK_N)
        x_tile = xq + row_offset(pm * BLOCK_M, K)  # 64-bit tile bases, 32-bit offsets inside the tile
        w_tile = wq + row_offset(pn * BLOCK_N, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        part = tl.zeros([BLOCK_M, BLOCK_N], tl.int32 if INT8 else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            a = tl.load(x_tile + mi[:, None] * K + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            b = tl.trans(tl.load(w_tile + ni[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0))
            if G > 1:  # grouped scales: scale each K step as it is added
                g = k0 // GROUP_K
                sx = tl.load(xs + m.to(tl.int64) * G + g, mask=mm, other=0.0)
                sw = tl.load(ws + n.to(tl.int64) * G + g, mask=nm, other=0.0)
                acc += tl.dot(a, b).to(tl.float32) * sx[:, None] * sw[None, :]
            else:
                part += tl.dot(a, b)
        if G == 1:
            if HAS_QBIAS:
                part += tl.load(qbias + n, mask=nm, other=0)[None, :]
            sx = tl.load(xs + m, mask=mm, other=0.0)
            sw = tl.load(ws + n, mask=nm, other=0.0)
            acc = part.to(tl.float32) * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(y.dtype.element_ty),
                 mask=mm[:, None] & nm[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _dequant_mm_kernel(x, wq, ws, bias, y, M, N: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                           GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                           W_BYTES: tl.constexpr):
        pm, pn, mi, ni, m, n, mm, nm = _output_tile(M, N, BLOCK_M, BLOCK_N)
        x_tile = x + row_offset(pm * BLOCK_M, K)
        w_tile = wq + row_offset(pn * BLOCK_N, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            a = tl.load(x_tile + mi[:, None] * K + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            b = tl.load(w_tile + ni[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            sw = tl.load(ws + n.to(tl.int64) * G + (k0 // GROUP_K if G > 1 else 0), mask=nm, other=0.0)
            acc += _dot(a, tl.trans((weight_values(b, W_BYTES) * sw[:, None]).to(a.dtype)), DOT)
        if HAS_BIAS:
            acc += tl.load(bias + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y + m[:, None].to(tl.int64) * N + n[None, :], acc.to(y.dtype.element_ty),
                 mask=mm[:, None] & nm[None, :])


def quantize_launch(T: int, K: int, spec: QuantSpec, dtype: torch.dtype, target: str = "cuda") -> Launch:
    group_k = GROUP if spec.act == "group" else K
    G = -(-K // group_k)
    block = min(fixed(target)["quant_block"], triton.next_power_of_2(group_k))
    return Launch(_quantize_kernel, (T, G),
                  dict(K=K, GROUP_K=group_k, G=G, BLOCK=block, QMAX=spec.qmax, INT8=spec.weight == "int8"),
                  dict(x=ptr(dtype), xq="*" + TRITON_TYPES[spec.dtype], xs=ptr(torch.float32), T="i32"))


def _mm_tile(M: int, grouped: bool, target: str) -> Tile:
    """The table's 8-bit GEMM tile, its rows cut to the step's (a power of two, 16 at least: one compile per
    size class) and its K step to one 128-column scale group where scales are grouped."""
    t = QMM[target]
    return Tile(min(t.block_m, max(16, triton.next_power_of_2(M))), t.block_n,
                min(t.block_k, GROUP) if grouped else t.block_k, t.num_warps, t.num_stages)


def scaled_mm_launch(M: int, N: int, K: int, spec: QuantSpec, out_dtype: torch.dtype, has_bias: bool,
                     target: str = "cuda", has_qbias: bool = False) -> Launch:
    G = spec.groups(K)
    t = _mm_tile(M, G > 1, target)
    q = "*" + TRITON_TYPES[spec.dtype]
    return Launch(_scaled_mm_kernel, (triton.cdiv(M, t.block_m), triton.cdiv(N, t.block_n)),
                  dict(N=N, K=K, G=G, GROUP_K=GROUP, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                       HAS_BIAS=has_bias, INT8=spec.weight == "int8", HAS_QBIAS=has_qbias),
                  dict(xq=q, xs=ptr(torch.float32), wq=q, ws=ptr(torch.float32), bias=ptr(out_dtype),
                       qbias=ptr(torch.int32), y=ptr(out_dtype), M="i32"), t.options(target))


def dequant_mm_launch(M: int, N: int, K: int, spec: QuantSpec, dtype: torch.dtype, has_bias: bool,
                      target: str = "cuda", w_bytes: bool = False) -> Launch:
    """Weight-only GEMM; w_bytes: FP8 weights passed as their raw bytes (fp8_as_bytes)."""
    G = spec.groups(K)
    t = _mm_tile(M, G > 1, target)
    weight = "*u8" if w_bytes else "*" + TRITON_TYPES[spec.dtype]
    return Launch(_dequant_mm_kernel, (triton.cdiv(M, t.block_m), triton.cdiv(N, t.block_n)),
                  dict(N=N, K=K, G=G, GROUP_K=GROUP, BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k,
                       HAS_BIAS=has_bias, DOT=dot_mode(dtype, target), W_BYTES=w_bytes),
                  dict(x=ptr(dtype), wq=weight, ws=ptr(torch.float32), bias=ptr(dtype), y=ptr(dtype), M="i32"),
                  t.options(target))


def weight_only_unless_fp8_dot(spec: QuantSpec, device: torch.device) -> QuantSpec:
    """FP8 activations need FP8 tensor cores (sm_89+); on sm_80 the FP8 weights run weight-only (vLLM's Marlin
    choice): same weights, activations left in bf16."""
    if spec.weight == "fp8" and spec.act != "none" and not fp8_dot(device):
        return QuantSpec("fp8", "none", spec.group)
    return spec


def fp8_as_bytes(spec: QuantSpec, device: torch.device) -> bool:
    """Whether FP8 weights reach the kernels as raw bytes: where Triton has no e4m3 type at all (CUDA before sm_89,
    where they run weight-only), the kernels decode them (_e4m3_bytes)."""
    return spec.weight == "fp8" and spec.act == "none" and device.type == "cuda" and not fp8_dot(device)


def quantize_triton(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization (per token or per token group) on the device, no host sync."""
    T, K = x.shape
    launch = quantize_launch(T, K, spec, x.dtype, target_of(x.device))
    xq = torch.empty(T, K, dtype=spec.dtype, device=x.device)
    xs = torch.empty(T, launch.grid[1], dtype=torch.float32, device=x.device)
    launch(x.contiguous(), xq, xs, T)
    return xq, xs


def quant_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                        spec: QuantSpec, input_scale: torch.Tensor | None = None,
                        input_offset: torch.Tensor | None = None, quant_bias: torch.Tensor | None = None,
                        token_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as the twin. Dynamic schemes quantize on the device; static ones and given per-token scales
    quantize with the torch twin (elementwise work) before the same GEMM."""
    M, K = x.shape
    N = weight.shape[0]
    target = target_of(x.device)
    spec = weight_only_unless_fp8_dot(spec, x.device)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    absent = y  # never read: HAS_BIAS is off
    x = x.contiguous()
    if spec.act == "none":
        raw = fp8_as_bytes(spec, x.device)
        dequant_mm_launch(M, N, K, spec, x.dtype, bias is not None, target, raw)(
            x, weight.view(torch.uint8) if raw else weight, weight_scale, bias if bias is not None else absent, y, M)
        return y
    if spec.act == "static" or token_scale is not None:
        xq, xs = quantize_torch(x, spec, input_scale, input_offset, token_scale)
        xs = xs.float().contiguous()
    else:
        xq, xs = quantize_triton(x, spec)
    has_qbias = quant_bias is not None and spec.weight == "int8" and spec.groups(K) == 1
    scaled_mm_launch(M, N, K, spec, x.dtype, bias is not None, target, has_qbias)(
        xq, xs, weight, weight_scale.float().contiguous(), bias if bias is not None else absent,
        quant_bias.to(torch.int32).contiguous() if has_qbias else absent, y, M)
    return y
