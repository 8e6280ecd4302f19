"""Integer GEMM with zero-point corrections: the deploy-time kernel of W4A4 / W8A8 linears.

For a per-token quantized activation ``x_hat[t, i] = s_x[t] * (cx[t, i] - zx[t])`` and a weight
quantized per output channel (or per group ``g`` of the input dim)
``w_hat[o, i] = s_w[o, g] * (cw[o, i] - zw[o, g])`` we compute

    y[t, o] = s_x[t] * sum_g s_w[o, g] * T_g[t, o] + bias[o]
    T_g[t, o] = sum_{i in g} (cx - zx)(cw - zw)
              = P_g[t, o] - zx[t] * Sw_g[o] - (Sx_g[t] - n_g * zx[t]) * zw[o, g]

with ``P_g = cx @ cw^T`` ONE int8 x int8 -> int32 product per group (``torch._int_mm``),
``Sw_g`` the weight code sums (precomputed once) and ``Sx_g`` the activation code sums.

Layout decisions (made once by :func:`prepare_int_weight`):

* Weight codes are stored int8 ``[out, in]`` contiguous and fed as ``codes.t()`` (group ``g`` is a
  column slice): on CPU ``_int_mm`` is ~2x faster with this column-major B than with a contiguous
  ``[in, out]`` copy at small batch (measured 0.14 vs 0.39 ms, 2048^2, M=1).
* Asymmetric weights whose centred codes ``cw - zw`` fit int8 are stored CENTRED (``zw`` term
  gone; the common 2/3/4-bit case).  Otherwise codes above 127 (8-bit asymmetric) are shifted
  with their zero point by -128 (``(c - 128) - (z - 128) = c - z``).  Symmetric: ``z = 0``.

Per call (:func:`int_linear`):

* Activation codes: symmetric are used as-is; asymmetric codes of <= 7 bits are CENTRED
  (``cx - zx``, one int8 pass over ``[M, K]``) whenever ``max|zx| + qmax <= 127``, i.e. for every
  token whose range contains 0.  With both operands centred ``T_g = P_g``: one ``_int_mm`` and a
  fused rescale, no correction pass over the ``[M, N]`` output at all.  Otherwise (8-bit
  asymmetric, shifted by -128 with one xor pass, or far-off zero points) the corrections above are
  applied as one rank-1/rank-2 ``addmm`` per group.
* Per-group weights: for ``M * G <= 64`` (decode) ONE ``_int_mm`` of a block-diagonal ``[G*M, K]``
  activation against the whole weight (which is read once), then a G-way weighted sum; for
  larger M one product per group, tiled over 128-row blocks, accumulated with ``addcmul_``.

Exactness: ``T_g`` is an integer.  It is assembled in fp32 only when a bound on every partial
result is below ``2^24`` (all fp32 operations on those integers are exact), otherwise in fp64
(exact below ``2^53``).  ``P_g`` itself is accumulated in int32; K is split into chunks (int64
sum) when ``K * max|cx| * max|cw|`` could reach ``2^31``.  The only roundings are in the final
rescale ``s_x * sum_g s_w * T_g + bias`` (fp32).  Asymmetric activations need ``max|zx|`` on the
host (one ``.item()``: a device sync on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hf_roste.numerics import onednn as _dnn
from hf_roste.numerics.quantize import codes_from_qparams, quantize, rowwise_qparams
from hf_roste.numerics.spec import QuantSpec

__all__ = ["IntWeight", "int8_matmul", "int_linear", "prepare_int_weight"]

_FP32_EXACT = float(1 << 24)
_INT32_LIMIT = (1 << 31) - 1
_ACT_GRANULARITIES = ("token", "tensor")
_WEIGHT_GRANULARITIES = ("channel", "group")


@dataclass
class IntWeight:
    """A weight prepared once in kernel layout (not serialized; rebuilt from packed codes).

    Attributes:
        codes: int8 ``[out, in]`` contiguous stored codes (group ``g`` is ``codes[:, g*n_g:(g+1)*n_g]``).
            When the oneDNN pre-packed copy serves every product of the fast path (per-channel
            weights, see :func:`prepare_int_weight`) this int8 copy is NOT kept: the property
            rebuilds it from ``codes_source`` on first use by another route and keeps it from then on.
        scale: fp32 ``[out, G]`` weight scales; scale_t: the same transposed ``[G, out]`` contiguous.
        zero: fp64 ``[G, out]`` effective zero points (after the -128 shift); ``None`` when the
            codes are stored centred (then the ``zw`` correction term is skipped).
        colsum: fp64 ``[G, out]`` sum over each group of the stored (effective) codes.
        max_abs_code: bound on ``|stored code|`` (for overflow / exactness decisions).
        max_abs_zero: bound on ``|zero|`` (0 when centred).
        max_abs_colsum: bound on ``|colsum|``.
        in_features: K; out_features: N; group_size: n_g (== K for per-channel).
        onednn_packed: CPU only: each group's codes pre-packed once for oneDNN's int8 GEMM
            (``torch.ops.onednn.qlinear_prepack``; opaque tensors), or None when unavailable.
        onednn_zeros: int64 ``[out]`` zeros (the weight zero points oneDNN takes; built once).
        scale_row: ``scale_t[0]`` (``[out]``), kept so the per-channel call does not index per call.
        codes_source: callable returning the quantized codes again (as passed to
            :func:`prepare_int_weight`), used to rebuild a dropped int8 copy; None if it was kept.
        onednn_small_m: whether the oneDNN route is used for small row counts (decode).  Measured
            once per weight: for some shapes (a dimension <= 256 here) oneDNN's single-row int8 GEMM
            is 50-300x slower than ``torch._int_mm``; both routes give identical (exact) results.
    """

    _codes: Tensor | None
    scale: Tensor
    scale_t: Tensor
    zero: Tensor | None
    colsum: Tensor
    max_abs_code: int
    max_abs_zero: float
    max_abs_colsum: float
    in_features: int
    out_features: int
    group_size: int
    onednn_packed: tuple[Tensor, ...] | None = None
    onednn_zeros: Tensor | None = None
    scale_row: Tensor | None = None
    codes_source: Callable[[], Tensor] | None = None
    spec: QuantSpec | None = None
    zero_source: Tensor | None = None
    onednn_small_m: bool = True

    @property
    def codes(self) -> Tensor:
        if self._codes is None:
            if self.codes_source is None or self.spec is None or self.zero_source is None:
                raise RuntimeError("IntWeight: the int8 codes were dropped and no source to rebuild them was kept")
            stored, _ = _stored_layout(self.codes_source(), self.zero_source, self.spec)
            self._codes = stored.view(self.out_features, self.in_features)
        return self._codes

    @property
    def nbytes(self) -> int:
        """Bytes of the int8 copy when held (the oneDNN copy is opaque and not counted)."""
        return 0 if self._codes is None else self._codes.numel()


def _check_tensor(name: str, t: object, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def prepare_int_weight(
    codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, codes_source: Callable[[], Tensor] | None = None
) -> IntWeight:
    """Build the kernel layout from quantized weight codes (as returned by ``quantize``).

    Args:
        codes: ``[out, in]`` uint8 (asymmetric, ``0..2^b-1``) or int8 (symmetric) codes.
        scale: fp32 ``[out, G]``; zero: fp32 ``[out, G]`` integer-valued zero points.
        spec: the weight :class:`QuantSpec` (granularity "channel" or "group", bits 2..8).
        codes_source: optional callable returning ``codes`` again (e.g. unpacking a checkpoint
            buffer).  Given it, a per-channel weight with a oneDNN pre-packed copy does not keep a
            second int8 copy in memory; the copy is rebuilt from the source if a route needs it.

    Returns:
        An :class:`IntWeight` on the device of ``codes``.
    """
    _check_tensor("codes", codes, 2)
    _check_tensor("scale", scale, 2)
    _check_tensor("zero", zero, 2)
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if not spec.enabled:
        raise ValueError(f"weight spec must quantize (bits in 2..8) for the int kernel, got bits={spec.bits}")
    if spec.granularity not in _WEIGHT_GRANULARITIES:
        raise ValueError(
            f"weight spec granularity must be one of {_WEIGHT_GRANULARITIES}, got {spec.granularity!r}"
        )
    expected = torch.int8 if spec.symmetric else torch.uint8
    if codes.dtype != expected:
        raise TypeError(
            f"codes must be {expected} for a {'symmetric' if spec.symmetric else 'asymmetric'} spec, "
            f"got {codes.dtype}"
        )
    n_out, k = codes.shape
    groups = spec.num_groups(k)
    if tuple(scale.shape) != (n_out, groups) or tuple(zero.shape) != (n_out, groups):
        raise ValueError(
            f"scale and zero must have shape {(n_out, groups)} for codes {tuple(codes.shape)} and {spec}, "
            f"got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    stored, zero_eff = _stored_layout(codes, zero, spec)  # int8 [out, G, n_g]
    gsz = stored.shape[-1]
    colsum = torch.empty(n_out, groups, dtype=torch.float64, device=codes.device)
    for r0 in range(0, n_out, _PREP_ROWS):  # row chunks: no full-size int32 / int64 temporaries
        colsum[r0 : r0 + _PREP_ROWS] = stored[r0 : r0 + _PREP_ROWS].sum(-1, dtype=torch.int32)
    lo, hi = torch.aminmax(stored) if stored.numel() else (torch.tensor(0), torch.tensor(0))

    def _amax(t: Tensor | None) -> float:
        return float(t.abs().max().item()) if t is not None and t.numel() else 0.0

    scale_t = scale.to(torch.float32).t().contiguous()
    stored8 = stored.view(n_out, k)
    packed = _dnn.prepack_groups(stored)
    small_m = packed is not None and groups == 1 and _dnn.fast_at_small_m(stored8, packed[0])
    # per channel, the oneDNN copy serves every exact-in-fp32 product: the int8 copy is dropped
    # (rebuilt on demand) unless the caller cannot provide the codes again or decode needs _int_mm
    drop = packed is not None and groups == 1 and codes_source is not None and small_m
    return IntWeight(
        _codes=None if drop else stored8,
        scale=scale.to(torch.float32).contiguous(),
        scale_t=scale_t,
        zero=None if zero_eff is None else zero_eff.t().contiguous(),
        colsum=colsum.t().contiguous(),
        max_abs_code=max(-int(lo), int(hi)),
        max_abs_zero=_amax(zero_eff),
        max_abs_colsum=_amax(colsum),
        in_features=k,
        out_features=n_out,
        group_size=gsz,
        onednn_packed=packed,
        onednn_zeros=None if packed is None else torch.zeros(n_out, dtype=torch.int64),
        scale_row=scale_t[0],
        codes_source=codes_source if drop else None,
        spec=spec,
        zero_source=zero.detach().clone() if drop else None,
        onednn_small_m=small_m,
    )


_PREP_ROWS = 512


def _stored_layout(codes: Tensor, zero: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Kernel codes int8 ``[out, G, n_g]`` (contiguous) and effective zero points fp64 ``[out, G]``
    (None when the stored codes are centred); see the module docstring for the three layouts.

    Built with one int8-sized allocation: centring is done in wrapping uint8 arithmetic, which is
    exact because it is only used when every ``c - z`` lies in ``[-127, 127]``.
    """
    n_out, k = codes.shape
    groups = spec.num_groups(k)
    cg = codes.view(n_out, groups, k // groups if groups else k)
    if spec.symmetric:
        return cg.contiguous(), None
    z = zero.to(torch.float64)
    if cg.numel():
        cmax = cg.amax(-1).to(torch.float64)  # [out, G] reductions only: no full-size temporaries
        cmin = cg.amin(-1).to(torch.float64)
        spread = max(float((cmax - z).abs().max()), float((z - cmin).abs().max()))
    else:
        spread = 0.0
    if spread <= 127:
        z_mod = torch.remainder(z, 256).to(torch.uint8).unsqueeze(-1)
        return (cg - z_mod).view(torch.int8), None  # (c - z) mod 256 read as int8 == c - z here
    if spec.bits <= 7:
        return cg.view(torch.int8).contiguous(), z  # codes <= 127: the same values as int8
    return torch.bitwise_xor(cg, 128).view(torch.int8), z - 128.0  # c ^ 128 read as int8 == c - 128


_ONEDNN_ENABLED = True  # set False to force torch._int_mm (tests compare both routes)

def _int_mm_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    """Whether ``torch._int_mm`` computes these shapes correctly (CPU: k >= 2; CUDA: m > 16, k, n % 8 == 0, k >= 16).

    On CPU (measured on torch 2.13) ``_int_mm`` returns uninitialised values when K == 1 and the
    operands are contiguous, so K == 1 takes the exact float route.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    if device.type == "cpu":
        return k >= 2
    if device.type == "cuda":
        return m > 16 and k >= 16 and k % 8 == 0 and n % 8 == 0
    return False


def int8_matmul(a: Tensor, b_t: Tensor, max_abs_a: int = 128, max_abs_b: int = 128) -> Tensor:
    """Exact ``a @ b_t`` for int8 operands, int32 result.

    Args:
        a: int8 ``[M, K]``; b_t: int8 ``[K, N]`` (any strides; ``w.t()`` of a contiguous ``[N, K]`` is
            the fast CPU layout).
        max_abs_a, max_abs_b: bounds on ``|a|`` and ``|b_t|`` (default: the int8 range).

    Returns:
        int32 ``[M, N]`` (int64 when ``K * max_abs_a * max_abs_b >= 2^31``: K is then processed in
        chunks whose int32 partial sums cannot overflow).  Uses ``torch._int_mm`` when the shapes
        are supported on the device (CUDA rows are zero-padded up to 17 when that is the only
        violated constraint), else an exact float matmul on the integer values (fp32 if
        ``K*max|a|*max|b| < 2^24``, else fp64).
    """
    if a.dtype != torch.int8 or b_t.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 operands, got {a.dtype} and {b_t.dtype}")
    if a.dim() != 2 or b_t.dim() != 2 or a.shape[1] != b_t.shape[0]:
        raise ValueError(f"int8_matmul needs [M, K] @ [K, N], got {tuple(a.shape)} @ {tuple(b_t.shape)}")
    m, k = a.shape
    n = b_t.shape[1]
    per_elem = max(1, max_abs_a * max_abs_b)
    chunk = max(1, _INT32_LIMIT // per_elem)
    if k > chunk:
        out = int8_matmul(a[:, :chunk], b_t[:chunk], max_abs_a, max_abs_b).to(torch.int64)
        for k0 in range(chunk, k, chunk):
            out += int8_matmul(a[:, k0 : k0 + chunk], b_t[k0 : k0 + chunk], max_abs_a, max_abs_b)
        return out
    if _int_mm_ok(m, k, n, a.device):
        return torch._int_mm(a, b_t)
    if a.device.type == "cuda" and _int_mm_ok(17, k, n, a.device):
        pad = torch.zeros(17 - m, k, dtype=torch.int8, device=a.device)
        return torch._int_mm(torch.cat([a, pad]), b_t)[:m]
    ftype = torch.float32 if k * per_elem < _FP32_EXACT else torch.float64
    return (a.to(ftype) @ b_t.to(ftype)).to(torch.int32)


def _act_codes(codes: Tensor, zero: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None, int, float]:
    """Activation codes as int8, effective zero (fp32 ``[M]``, None if none is needed), bounds.

    Returns ``(a, zx_eff, max|a|, max|zx_eff|)``.  Asymmetric codes of <= 7 bits are CENTRED
    (``a = cx - zx``) when that fits int8, which removes the ``zx`` correction entirely: one pass
    over ``[M, K]`` int8 instead of a pass over the ``[M, N]`` output.
    """
    if spec.symmetric:
        return codes, None, 1 << (spec.bits - 1), 0.0
    qmax = (1 << spec.bits) - 1
    if spec.bits <= 7:
        zmax = float(zero.abs().max().item())
        if zmax + qmax <= 127:  # int8 arithmetic below is exact: every result fits int8
            return codes.view(torch.int8) - zero.to(torch.int8).unsqueeze(1), None, qmax + int(zmax), 0.0
        return codes.view(torch.int8), zero, qmax, zmax
    zero = zero - 128.0
    return torch.bitwise_xor(codes, 128).view(torch.int8), zero, 128, float(zero.abs().max().item())


_ROW_TILE = 128  # rows per tile in the per-group loop: keeps the int32 / fp32 [tile, N] blocks in cache
_BLOCKDIAG_MAX_ROWS = 64  # use the single block-diagonal product while M * G <= this


def _grouped_pure(a: Tensor, max_a: int, weight: IntWeight) -> Tensor:
    """``sum_g s_w[:, g] * (a_g @ cw_g^T)`` in fp32 ``[M, N]`` for centred operands (no corrections).

    Small M: one ``_int_mm`` of a block-diagonal ``[G*M, K]`` activation against the whole weight
    (the weight is read once; decode is weight-bandwidth bound).  Larger M: per-group products,
    tiled over rows (oneDNN pre-packed per-group weights with the scale folded into the GEMM when
    available, else ``_int_mm`` + a mixed int32 x fp32 ``addcmul_``).
    The caller guarantees ``n_g * max|a| * max|cw| < 2^24`` (the int32 -> fp32 steps are exact).
    """
    m, k = a.shape
    gsz, n = weight.group_size, weight.out_features
    groups = k // gsz
    max_w = weight.max_abs_code
    if m * groups <= _BLOCKDIAG_MAX_ROWS:
        abd = a.new_zeros(groups, m, groups, gsz)
        idx = torch.arange(groups, device=a.device)
        abd[idx, :, idx, :] = a.view(m, groups, gsz).transpose(0, 1)
        p = int8_matmul(abd.view(groups * m, k), weight.codes.t(), max_a, max_w).view(groups, m, n)
        return (p * weight.scale_t.unsqueeze(1)).sum(0)
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    dnn = weight.onednn_packed if _ONEDNN_ENABLED else None
    for m0 in range(0, m, _ROW_TILE):
        a_t, acc = a[m0 : m0 + _ROW_TILE], out[m0 : m0 + _ROW_TILE]
        for g in range(groups):
            sl = slice(g * gsz, (g + 1) * gsz)
            if dnn is not None:
                y = _dnn.scaled_mm(a_t[:, sl].contiguous(), dnn[g], weight.scale_t[g], weight.onednn_zeros)
                if g == 0:
                    acc.copy_(y)
                else:
                    acc.add_(y)
                continue
            p = int8_matmul(a_t[:, sl], weight.codes[:, sl].t(), max_a, max_w)
            if g == 0:
                torch.mul(p, weight.scale_t[0], out=acc)
            else:
                acc.addcmul_(p, weight.scale_t[g])
    return out


def _general(a: Tensor, zx: Tensor | None, zmax: float, max_a: int, weight: IntWeight) -> Tensor:
    """Zero-point-corrected path: ``sum_g s_w[:, g] * T_g`` in fp32 ``[M, N]`` with exact ``T_g``."""
    gsz = weight.group_size
    bound = gsz * max_a * weight.max_abs_code + zmax * weight.max_abs_colsum
    if weight.zero is not None:
        bound += gsz * (max_a + zmax) * max(1.0, weight.max_abs_zero)
    ctype = torch.float32 if bound < _FP32_EXACT else torch.float64
    zx_c = None if zx is None else zx.to(ctype)
    acc: Tensor | None = None
    for g in range(weight.codes.shape[1] // gsz):
        sl = slice(g * gsz, (g + 1) * gsz)
        a_g = a[:, sl]
        t = int8_matmul(a_g, weight.codes[:, sl].t(), max_a, weight.max_abs_code).to(ctype)  # [M, N]
        if weight.zero is not None:
            r = a_g.sum(-1, dtype=torch.int64).to(ctype)  # Sx_g
            if zx_c is not None:
                r = r - gsz * zx_c
            lhs = r.unsqueeze(1) if zx_c is None else torch.stack([zx_c, r], 1)
            rhs = weight.zero[g : g + 1].to(ctype)
            if zx_c is not None:
                rhs = torch.cat([weight.colsum[g : g + 1].to(ctype), rhs])
            t = torch.addmm(t, lhs, rhs, alpha=-1)
        elif zx_c is not None:
            t = torch.addr(t, zx_c, weight.colsum[g].to(ctype), alpha=-1)
        if ctype != torch.float32:
            t = t.to(torch.float32)
        if acc is None:
            acc = t.mul_(weight.scale_t[g])
        else:
            acc.addcmul_(t, weight.scale_t[g])
    assert acc is not None
    return acc


@dataclass
class QuantizedActivation:
    """Per-token integer form of an activation, ready for :func:`int_linear` (reusable by several layers).

    Attributes: ``a`` int8 codes ``[m, in]`` (shifted for 8-bit asymmetric), ``sx`` fp32 scales
    ``[m, 1]``, ``zx_eff`` effective zero points (None when the codes are centred), bounds ``max_a``
    and ``zmax``, and the leading shape ``lead`` of the original ``x``.
    """

    a: Tensor
    sx: Tensor
    zx_eff: Tensor | None
    max_a: int
    zmax: float
    lead: tuple[int, ...]


def quantize_activation(x: Tensor, act_spec: QuantSpec) -> QuantizedActivation:
    """Quantize ``x`` ``[..., in]`` per token with ``act_spec`` into :class:`QuantizedActivation`.

    The codes are those of :func:`~hf_roste.numerics.quantize.quantize` (same qparams and code
    function).  When every token is finite and non-constant (checked on the host, CPU) the
    centred int8 codes are produced directly, in a handful of ops; otherwise through ``quantize``.
    """
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    use_fast = act_spec.granularity == "token" and act_spec.bits <= 7
    fast = rowwise_qparams(x2, act_spec) if use_fast else None
    if fast is not None:
        sx, zx, zmax = fast
        codes = codes_from_qparams(x2, sx, zx, act_spec)
        if act_spec.symmetric:
            return QuantizedActivation(codes.to(torch.int8), sx, None, 1 << (act_spec.bits - 1), 0.0, lead)
        qmax = (1 << act_spec.bits) - 1
        if zmax + qmax <= 127:  # centred codes cx - zx fit int8 (exact: integers in fp32)
            return QuantizedActivation(codes.sub_(zx).to(torch.int8), sx, None, qmax + int(zmax), 0.0, lead)
    codes, sx, zx = quantize(x2, act_spec)
    sx = sx.reshape(-1, 1).expand(m, 1)
    a, zx_eff, max_a, zmax = _act_codes(codes, zx.reshape(-1).expand(m), act_spec)
    return QuantizedActivation(a, sx, zx_eff, max_a, zmax, lead)


def check_linear_input(x: object, in_features: int) -> None:
    """TypeError / ValueError unless ``x`` is a float32/bf16/fp16 tensor ``[..., in_features]``."""
    _check_tensor("x", x)
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim in_features={in_features}, got shape {tuple(x.shape)}")


def int_linear(
    x: Tensor,
    weight: IntWeight,
    act_spec: QuantSpec,
    bias: Tensor | None = None,
    act: QuantizedActivation | None = None,
) -> Tensor:
    """Quantize ``x`` per token at run time and apply the integer linear layer.

    Args:
        x: ``[..., in]`` fp32 / bf16 / fp16.
        weight: :class:`IntWeight` from :func:`prepare_int_weight`.
        act_spec: activation spec; granularity "token" (or "tensor"), bits 2..8.
        bias: optional float ``[out]``.
        act: ``quantize_activation(x, act_spec)`` when already computed (layers sharing an input).

    Returns:
        ``[..., out]`` in ``x.dtype``; equals
        ``F.linear(fake_quantize(x, act_spec), fake_quantize(W, weight_spec), bias)`` up to fp32
        rounding (the integer part is exact; see the module docstring).
    """
    _check_tensor("x", x)
    if not isinstance(weight, IntWeight):
        raise TypeError(f"weight must be an IntWeight (see prepare_int_weight), got {type(weight).__name__}")
    check_linear_input(x, weight.in_features)
    if not isinstance(act_spec, QuantSpec):
        raise TypeError(f"act_spec must be a QuantSpec, got {type(act_spec).__name__}")
    if not act_spec.enabled or act_spec.granularity not in _ACT_GRANULARITIES:
        raise ValueError(
            f"act_spec must quantize (bits 2..8) with granularity in {_ACT_GRANULARITIES}, got {act_spec}"
        )
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.out_features,)):
        raise ValueError(
            f"bias must be a tensor of shape ({weight.out_features},), got "
            f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}"
        )
    return int_linear_unchecked(x, weight, act_spec, bias, act)


def int_linear_unchecked(
    x: Tensor, weight: IntWeight, act_spec: QuantSpec, bias: Tensor | None, act: QuantizedActivation | None
) -> Tensor:
    """:func:`int_linear` without argument checks, for callers that validated once (`PackedLinear`)."""
    lead = x.shape[:-1]
    k, n = weight.in_features, weight.out_features
    if x.numel() == 0:
        return x.new_zeros(*lead, n)
    if act is None:
        act = quantize_activation(x, act_spec)
    a, sx, zx_eff, max_a, zmax = act.a, act.sx, act.zx_eff, act.max_a, act.zmax

    group_exact = weight.group_size * max_a * weight.max_abs_code < _FP32_EXACT
    if zx_eff is None and weight.zero is None and (weight.group_size == k or group_exact):
        if weight.group_size == k:  # per channel: exactly one int8 GEMM, no correction at all
            exact32 = k * max_a * weight.max_abs_code < _FP32_EXACT
            dnn = weight.onednn_packed is not None and _ONEDNN_ENABLED
            if exact32 and dnn and (weight.onednn_small_m or a.shape[0] > _dnn.SMALL_M):
                acc = _dnn.scaled_mm(a, weight.onednn_packed[0], weight.scale_row, weight.onednn_zeros)
            else:
                p = int8_matmul(a, weight.codes.t(), max_a, weight.max_abs_code)
                if exact32:  # convert, then scale in place: the same values as the mixed-dtype
                    acc = p.to(torch.float32).mul_(weight.scale_row)  # int32 * fp32 mul, ~5x faster
                else:  # int32 -> fp32 would round before the scale
                    acc = torch.mul(p.to(torch.float64), weight.scale_row).to(torch.float32)
        else:
            acc = _grouped_pure(a, max_a, weight)
    else:
        acc = _general(a, zx_eff, zmax, max_a, weight)
    if bias is not None:
        y = torch.addcmul(bias.to(torch.float32), acc, sx)
    else:
        y = acc.mul_(sx)
    return y.to(x.dtype).reshape(*lead, n)
