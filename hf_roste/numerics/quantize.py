"""The single definition of the RoSTE b-bit uniform quantizer.

Training fake-quant modules and packed integer inference kernels both call into this
module, so the trained and the deployed model compute the same numbers.

Exact rule (all statistics, scales and zero points in fp32 whatever the input dtype; ``c`` is
``spec.clip_ratio``, ``b`` is ``spec.bits``, ``round`` is ``torch.round``, i.e. half-to-even).
For each quantization group (a row of the last dim, a block of ``group_size`` elements of it,
or the whole tensor) with minimum ``mn``, maximum ``mx`` and ``amax = max(|mn|, |mx|)``::

    floor = max(amax * 2^-20, FLT_MIN)          # FLT_MIN = smallest normal fp32, 1.1754944e-38
    asymmetric:
        s = max(mx * k - mn * k, floor)          # k = c / (2^b - 1), i.e. s = c * (mx - mn) / (2^b - 1)
        z = round(-c * mn / s)                    # integer-valued fp32, may lie outside [0, 2^b - 1]
        if mx == mn (constant group):  s = |mn| (1 if mn == 0),  z = -sign(mn)
        codes = clamp(round(x / s) + z, 0, 2^b - 1)
    symmetric:
        s = max(c * amax / (2^(b-1) - 1), floor);  s = 1 if amax == 0
        z = 0
        codes = clamp(round(x / s) + 0, -2^(b-1), 2^(b-1) - 1)
    x_hat = (codes - z) * s

(``mx * k - mn * k`` is used instead of ``(mx - mn) * k`` so that ranges near the fp32 limit do
not overflow.)  Consequences of the rule:

* the relative floor keeps ``|x / s| <= 2^20 + 1`` and ``|z| <= 2^20``, so ``x / s`` never
  overflows, and codes and zero points are exactly representable fp32 integers; tiny (1e-30,
  subnormal) and huge (1e30) magnitudes give finite results (outputs are finite whenever
  ``amax <= 2^127``; only within ~25% of the fp32 maximum can the top grid point overflow). For
  fp16 inputs the result is cast back to fp16, so a grid point above 65504 (asymmetric grids,
  inputs near the fp16 maximum) becomes inf;
* a constant group is reproduced EXACTLY in asymmetric mode (codes are 0, ``x_hat == mn``);
  an all-zero group gives exact zeros in both modes;
* a group containing NaN or +-Inf gets ``s = NaN`` and ``z = 0``: its whole fake-quant output is
  NaN, :func:`quantize` returns code 0 for it (so :func:`dequantize` also gives NaN) and other
  groups are unaffected.  No exception is raised;
* ``bits == 16`` means "not quantized": :func:`fake_quantize` returns its input unchanged and
  :func:`quantization_error` returns zeros; :func:`compute_qparams`, :func:`quantize` and
  :func:`dequantize` raise ``ValueError`` because there are no integer codes.

Reduced-precision inputs (bfloat16, float16): every value is first converted exactly to fp32;
the minimum, maximum, scale, zero point, codes and ``(codes - z) * s`` are all computed in fp32
from those values (``k``, ``c`` and ``2^-20`` as fp32 constants, IEEE round-to-nearest division,
no fused multiply-add), and only the final ``x_hat`` is rounded once, to nearest even, to the input
dtype.  The fused Triton kernel (:mod:`hf_roste.numerics.kernels.fake_quant`) follows this rule and
equals this module bit for bit for float32, bfloat16 and float16 inputs (NaN outputs are NaN, their
payload bits are unspecified: torch's own fp32 -> bfloat16 cast writes different NaNs on CPU and CUDA).

Symmetric codes get ``+ 0`` added before the clamp so a ``-0.0`` from ``round`` becomes ``+0.0``:
:func:`fake_quantize` is then bit-for-bit equal (in fp32) to
``dequantize(*quantize(x, spec), spec)``, signed zeros included.  Both go through the same private
function :func:`quantize_fp32`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fp4 as _fp4
from .fp4 import FP4Spec
from .fp8 import Fp8Spec, fp8_fake_quantize_fp32
from .kernels._triton import use_triton
from .kernels.fake_quant import kernel_supports, triton_fake_quantize
from .spec import QuantSpec

__all__ = ["compute_qparams", "quantize", "dequantize", "fake_quantize", "fake_quantize_op", "quantization_error"]

_REL_FLOOR = 2.0**-20
_FLT_MIN = torch.finfo(torch.float32).tiny
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACCEPTED_DTYPES = (*_NATIVE_DTYPES, torch.float64)


# --------------------------------------------------------------------------- validation helpers
def _check_spec(spec: object) -> QuantSpec:
    if isinstance(spec, FP4Spec):
        raise TypeError(f"{spec} has no integer codes: use hf_roste.numerics.fp4.quantize_fp4 / dequantize_fp4")
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    return spec


def _check_input(x: object, spec: object) -> tuple[Tensor, QuantSpec]:
    if isinstance(spec, FP4Spec):  # FP4 block formats: fake_quantize / quantization_error dispatch to numerics.fp4
        return _fp4._check_input(x, spec)  # type: ignore[return-value]
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    spec = _check_spec(spec)
    if x.dtype not in _ACCEPTED_DTYPES:
        raise TypeError(f"x must have dtype in {_ACCEPTED_DTYPES}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension (quantization reduces over the last dim), got 0-dim")
    if spec.enabled:
        spec.num_groups(x.shape[-1])  # raises ValueError when group_size does not divide the last dim
    return x, spec


def _require_enabled(spec: QuantSpec, fn: str) -> None:
    _check_spec(spec)  # an FP4Spec gets a pointer to the fp4 functions
    if isinstance(spec, Fp8Spec):
        raise ValueError(f"{fn}: {spec} is the fp8 e4m3 format, which has no integer codes; use fake_quantize.")
    if not spec.enabled:
        raise ValueError(f"{fn}: spec.bits=16 means quantization is disabled (no integer codes); got {spec}")


# --------------------------------------------------------------------------- shared core
def _stat_shape(shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
    """Public shape of scale / zero for a tensor of ``shape``."""
    if spec.granularity == "tensor":
        return (1,) * len(shape)
    return (*shape[:-1], spec.num_groups(shape[-1]))


def _grouped(x: Tensor, spec: QuantSpec) -> Tensor:
    """View of ``x`` whose last dim is one quantization group (group: ``[..., G, group_size]``)."""
    if spec.granularity == "group":
        assert spec.group_size is not None
        return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return x


def _internal(t: Tensor, spec: QuantSpec) -> Tensor:
    """Public-shaped scale/zero -> broadcastable against :func:`_grouped` (group: add a trailing 1)."""
    return t.unsqueeze(-1) if spec.granularity == "group" else t


def rowwise_qparams(xg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, float] | None:
    """The rule of the module docstring for CPU row-wise groups, when no group needs a special case.

    Returns ``(scale, zero, max|zero|)`` (fp32 ``[..., 1]``), or None when some group is constant
    or non-finite (or the range overflows): the caller then runs the general rule.  On the groups
    it accepts it performs the general rule's float operations in the same order on the same values
    (``max(mx, -mn)`` equals ``max(|mn|, |mx|)`` whenever ``mn <= mx``), so results are bit-equal;
    it skips the ``where`` guards, which is what dominates small (decode-time) tensors.  CPU only:
    the accept/reject decision reads three scalars on the host, a sync we avoid on accelerators, and
    that torch.compile cannot trace without a graph break (skipped while compiling).
    """
    if (xg.device.type != "cpu" or spec.granularity == "tensor" or xg.numel() == 0
            or torch.compiler.is_compiling()):
        return None
    mx = xg.amax(dim=-1, keepdim=True).float()  # amax + amin: ~5x faster than aminmax(dim=-1) on CPU
    mn = xg.amin(dim=-1, keepdim=True).float()
    c = float(spec.clip_ratio)
    if spec.symmetric:
        amax = torch.maximum(mx, mn.neg())
        raw = amax * (c / spec.qmax)
    else:
        k = c / spec.qmax
        raw = torch.sub(mx * k, mn * k)
        amax = torch.maximum(mx, mn.neg())
    lo, hi = torch.aminmax(raw)
    if not (lo.item() > 0.0 and hi.item() < float("inf")):  # constant / all-zero / NaN / Inf group
        return None
    floor = (amax * _REL_FLOOR).clamp_(min=_FLT_MIN)
    scale = _round_scale(torch.maximum(raw, floor), spec)
    if spec.symmetric:
        return scale, torch.zeros_like(scale), 0.0
    zero = torch.round(mn * (-c) / scale).add_(0.0)
    return scale, zero, float(zero.abs().max().item())


_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)
_FP16_MAX = 65504.0


def _round_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    """``spec.scale_dtype == "float16"``: scales rounded to fp16 (never to 0), as GGUF stores them."""
    if spec.scale_dtype == "float32":
        return scale
    return scale.clamp(max=_FP16_MAX).to(torch.float16).float().clamp_(min=_FP16_TINY)


def _qparams_grouped(xg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """fp32 ``(scale, zero)`` broadcastable against ``xg`` (see the module docstring for the rule)."""
    fast = rowwise_qparams(xg, spec)
    if fast is not None:
        return fast[0], fast[1]
    return _general_qparams(xg, spec)


def _general_qparams(xg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The rule with every special case handled by ``where`` (any device, no host sync)."""
    if spec.granularity == "tensor":
        mn, mx = torch.aminmax(xg)
        shape = (1,) * xg.dim()
        mn, mx = mn.reshape(shape), mx.reshape(shape)
    else:  # separate amax/amin reductions are faster than aminmax(dim=-1) on CPU
        mx = xg.amax(dim=-1, keepdim=True)
        mn = xg.amin(dim=-1, keepdim=True)
    mn = mn.float()
    mx = mx.float()
    c = float(spec.clip_ratio)
    amax = torch.maximum(mn.abs(), mx.abs())  # NaN propagates
    floor = (amax * _REL_FLOOR).clamp_(min=_FLT_MIN)
    if spec.symmetric:
        scale = _round_scale(torch.maximum(amax * (c / spec.qmax), floor), spec)
        scale = torch.where(amax == 0, 1.0, scale)
        zero = torch.zeros_like(scale)
    else:
        k = c / spec.qmax
        scale = _round_scale(torch.maximum(mx * k - mn * k, floor), spec)
        zero = torch.round(mn * (-c) / scale).add_(0.0)  # no -0.0 zero points
        constant = mx == mn
        scale = torch.where(constant, torch.where(mn == 0, 1.0, mn.abs()), scale)
        zero = torch.where(constant, torch.sign(mn).neg_().add_(0.0), zero)  # +0.0, not -0.0
    finite = torch.isfinite(amax)
    scale = torch.where(finite, scale, float("nan"))
    zero = torch.where(finite, zero, 0.0)
    return scale, zero


def quantize_fp32(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """THE quantizer: returns ``(codes, scale, zero)``, all fp32, in the :func:`_grouped` layout.

    ``codes`` is a fresh contiguous fp32 tensor holding integer values in ``[qmin, qmax]``
    (NaN for non-finite groups); callers may modify it in place.  ``x`` must be non-empty.
    """
    if x.dtype not in _NATIVE_DTYPES:
        x = x.float()
    xg = _grouped(x, spec)
    scale, zero = _qparams_grouped(xg, spec)
    return codes_from_qparams(xg, scale, zero, spec), scale, zero


def codes_from_qparams(xg: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """fp32 ``clamp(round(xg / scale) + zero, qmin, qmax)``, a fresh contiguous tensor (the only
    full-size allocation of the quantizer); shared by every caller that produces codes."""
    codes = torch.div(xg, scale)  # fp32 result (type promotion)
    codes.round_()
    if spec.symmetric:
        codes.add_(0.0)  # turns -0.0 into +0.0, see module docstring
    else:
        codes.add_(zero)
    return codes.clamp_(spec.qmin, spec.qmax)


def _fake_quant_fp32(x: Tensor, spec: QuantSpec) -> Tensor:
    """fp32 ``(codes - zero) * scale`` with the shape of ``x`` (no autograd, no dtype cast)."""
    if isinstance(spec, FP4Spec):
        return _fp4._fake_quant_fp32(x, spec)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if isinstance(spec, Fp8Spec):
        return fp8_fake_quantize_fp32(x, spec)
    codes, scale, zero = quantize_fp32(x, spec)
    if not spec.symmetric:
        codes.sub_(zero)
    codes.mul_(scale)
    return codes.view(x.shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize forward, identity (straight-through) backward; saves nothing."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec) -> Tensor:  # type: ignore[override]
        out = _fake_quant_fp32(x, spec)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad_output, None


# --------------------------------------------------------------------------- public API
def compute_qparams(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Dynamic scale and zero point of ``x`` (no gradient).

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor ``[..., n]`` (at least 1-D).
        spec: enabled :class:`QuantSpec` (``bits < 16``).

    Returns:
        ``(scale, zero)``, both float32 of shape ``x.shape[:-1] + (G,)`` where ``G`` is
        ``n // group_size`` for ``"group"`` and 1 for row-wise granularities, or ``(1,) * x.dim()``
        for ``"tensor"``.  ``zero`` is integer valued (all zeros when symmetric).

    Raises:
        TypeError: ``x`` is not a floating tensor / ``spec`` is not a QuantSpec.
        ValueError: ``spec.bits == 16``, ``x`` is 0-dim or ``group_size`` does not divide ``n``.
    """
    x, spec = _check_input(x, spec)
    _require_enabled(spec, "compute_qparams")
    shape = _stat_shape(x.shape, spec)
    if x.numel() == 0:
        return (torch.ones(shape, dtype=torch.float32, device=x.device),
                torch.zeros(shape, dtype=torch.float32, device=x.device))
    with torch.no_grad():
        src = x if x.dtype in _NATIVE_DTYPES else x.float()
        scale, zero = _qparams_grouped(_grouped(src, spec), spec)
    return scale.reshape(shape), zero.reshape(shape)


def quantize(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Integer form of ``x``: ``(codes, scale, zero)``.

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor ``[..., n]``.
        spec: enabled :class:`QuantSpec`.

    Returns:
        codes: same shape as ``x``; uint8 in ``[0, 2^b - 1]`` (asymmetric) or int8 in
            ``[-2^(b-1), 2^(b-1) - 1]`` (symmetric).  Non-finite groups get code 0.
        scale, zero: float32, shapes as in :func:`compute_qparams`.

    Raises:
        TypeError / ValueError: as :func:`compute_qparams`.
    """
    x, spec = _check_input(x, spec)
    _require_enabled(spec, "quantize")
    code_dtype = torch.int8 if spec.symmetric else torch.uint8
    shape = _stat_shape(x.shape, spec)
    if x.numel() == 0:
        return (torch.empty(x.shape, dtype=code_dtype, device=x.device),
                torch.ones(shape, dtype=torch.float32, device=x.device),
                torch.zeros(shape, dtype=torch.float32, device=x.device))
    with torch.no_grad():
        codes, scale, zero = quantize_fp32(x, spec)
        codes.nan_to_num_(nan=0.0)
        return codes.view(x.shape).to(code_dtype), scale.reshape(shape), zero.reshape(shape)


def dequantize(
    codes: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(codes - zero) * scale`` computed in fp32 with group broadcasting, then cast to ``dtype``.

    In fp32 this reproduces :func:`fake_quantize` bit for bit.

    Args:
        codes: integer tensor ``[..., n]`` (uint8 / int8 from :func:`quantize`; any integer dtype
            holding the same values is accepted).
        scale, zero: float32 tensors with the shapes returned by :func:`compute_qparams` for ``codes.shape``.
        spec: the enabled :class:`QuantSpec` used to quantize.
        dtype: floating output dtype (default float32).

    Returns:
        Tensor of shape ``codes.shape`` and dtype ``dtype``.

    Raises:
        TypeError: non-integer ``codes``, non-float32 ``scale`` / ``zero``, non-floating ``dtype``.
        ValueError: disabled spec, 0-dim codes or scale / zero shape mismatch.
    """
    spec = _check_spec(spec)
    _require_enabled(spec, "dequantize")
    if not isinstance(codes, Tensor) or codes.dtype.is_floating_point or codes.dtype.is_complex \
            or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (uint8/int8), got "
                        f"{getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least 1 dimension, got 0-dim")
    for name, t in (("scale", scale), ("zero", zero)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    expected = _stat_shape(codes.shape, spec)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} for codes of shape {tuple(codes.shape)} "
                             f"and granularity {spec.granularity!r}, got {tuple(t.shape)}")
    out = codes.to(torch.float32)
    if out.numel() == 0:
        return out.to(dtype)
    og = _grouped(out, spec)
    if not spec.symmetric:
        og.sub_(_internal(zero, spec))
    og.mul_(_internal(scale, spec))
    return out if dtype == torch.float32 else out.to(dtype)


def fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize ``x`` with a straight-through-estimator backward.

    Forward value: ``dequantize(*quantize(x, spec), spec)`` cast back to ``x.dtype``.  Backward:
    the gradient w.r.t. ``x`` is exactly ``grad_output`` (also through clipped values).  One custom
    autograd node per call, which saves no tensors; when ``x`` does not require grad (or grad mode
    is off) no graph is built.

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor ``[..., n]``.
        spec: :class:`QuantSpec` (``bits == 16`` returns ``x`` itself) or an
            :class:`~hf_roste.numerics.fp4.FP4Spec` (NVFP4 / MXFP4, same straight-through backward).

    Returns:
        Tensor with the shape and dtype of ``x``.

    Raises:
        TypeError / ValueError: as :func:`compute_qparams` (except that bits=16 is allowed).
    """
    x, spec = _check_input(x, spec)
    if not spec.enabled:
        return x
    if isinstance(spec, FP4Spec):
        return _fp4.fake_quantize_fp4(x, spec)
    if fake_quantize_op_supports(spec) and (
            torch.compiler.is_compiling() or (x.dtype in _NATIVE_DTYPES and use_triton(x.device))):
        # one custom op: no graph break under torch.compile, the fused kernel where Triton runs
        return fake_quantize_op(x, spec)
    if x.requires_grad and torch.is_grad_enabled():
        return _FakeQuantSTE.apply(x, spec)
    out = _fake_quant_fp32(x, spec)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def quantization_error(
    x: Tensor, spec: QuantSpec, reduce: str = "sum", row_mask: Tensor | None = None
) -> Tensor:
    """Squared quantization error ``||Q(x) - x||^2`` in fp32 (not differentiable).

    ``Q(x)`` is the fp32 fake-quant value (before the cast back to ``x.dtype``) and ``x`` is
    upcast to fp32.  Rows are the last-dim rows of ``x`` (tokens for activations).

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor ``[..., n]``.
        spec: :class:`QuantSpec` (bits=16 gives zero error) or an FP4Spec (NVFP4 / MXFP4 error).
        reduce: ``"sum"`` (scalar), ``"mean"`` (scalar, per included element; 0 if nothing is
            included) or ``"none"`` (per-row sums, shape ``x.shape[:-1]``, excluded rows are 0).
        row_mask: optional bool tensor of shape ``x.shape[:-1]``; False rows (e.g. padding tokens)
            are excluded (a NaN in an excluded row does not leak into the result).

    Returns:
        float32 tensor (0-dim for "sum" / "mean", ``x.shape[:-1]`` for "none").  Rows containing
        NaN / Inf give NaN.

    Raises:
        TypeError: bad ``x`` / ``spec`` / ``row_mask`` types.
        ValueError: unknown ``reduce`` or ``row_mask`` shape mismatch.
    """
    x, spec = _check_input(x, spec)
    if reduce not in ("sum", "mean", "none"):
        raise ValueError(f"reduce must be one of 'sum', 'mean', 'none', got {reduce!r}")
    if row_mask is not None:
        if not isinstance(row_mask, Tensor) or row_mask.dtype != torch.bool:
            raise TypeError(f"row_mask must be a bool tensor, got {getattr(row_mask, 'dtype', type(row_mask))}")
        if tuple(row_mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"row_mask must have shape x.shape[:-1]={tuple(x.shape[:-1])}, "
                             f"got {tuple(row_mask.shape)}")
    with torch.no_grad():
        xf = x.detach().float()
        if not spec.enabled or x.numel() == 0:
            per_row = torch.zeros(x.shape[:-1], dtype=torch.float32, device=x.device)
        else:
            diff = _fake_quant_fp32(xf, spec).sub_(xf)
            per_row = diff.square_().sum(dim=-1)
        if row_mask is not None:
            per_row = torch.where(row_mask, per_row, 0.0)
        if reduce == "none":
            return per_row
        total = per_row.sum()
        if reduce == "sum":
            return total
        n_rows = per_row.numel() if row_mask is None else int(row_mask.sum())
        return total / max(n_rows * x.shape[-1], 1)


# --------------------------------------------------------------------------- the custom op
def _spec_of(bits: int, symmetric: bool, clip_ratio: float, granularity: str, group_size: int) -> QuantSpec:
    return QuantSpec(bits, symmetric, clip_ratio, granularity, group_size if granularity == "group" else None)


@torch.library.custom_op("hf_roste::fake_quantize", mutates_args=())
def _fake_quantize_impl(
    x: Tensor, bits: int, symmetric: bool, clip_ratio: float, granularity: str, group_size: int,
    out_dtype: torch.dtype,
) -> Tensor:
    spec = _spec_of(bits, symmetric, clip_ratio, granularity, group_size)
    if kernel_supports(x, spec) and out_dtype in _NATIVE_DTYPES and use_triton(x.device):
        return triton_fake_quantize(x, spec, out_dtype)
    out = _fake_quant_fp32(x, spec)
    out = out if out.dtype == out_dtype else out.to(out_dtype)
    return out.contiguous()  # the layout the fake implementation promises (a no-op for contiguous x)


@_fake_quantize_impl.register_fake
def _(x: Tensor, bits: int, symmetric: bool, clip_ratio: float, granularity: str, group_size: int,
      out_dtype: torch.dtype) -> Tensor:
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)


def _ste_setup(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library autograd signature
    ctx.in_dtype = inputs[0].dtype


def _ste_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202 - torch.library autograd signature
    grad = grad if grad.dtype == ctx.in_dtype else grad.to(ctx.in_dtype)
    return grad, None, None, None, None, None, None


_fake_quantize_impl.register_autograd(_ste_backward, setup_context=_ste_setup)


def fake_quantize_op_supports(spec: object) -> bool:
    """Whether :func:`fake_quantize_op` expresses ``spec``: an integer :class:`QuantSpec` with fp32 scales.

    FP4 block formats, fp8 K/V and fp16-rounded scales keep the PyTorch path of :func:`fake_quantize`.
    """
    return type(spec) is QuantSpec and spec.scale_dtype == "float32"


def fake_quantize_op(x: Tensor, spec: QuantSpec, out_dtype: torch.dtype | None = None) -> Tensor:
    """``hf_roste::fake_quantize``: quantize-dequantize with a straight-through backward, as one custom op.

    Same value and gradient as :func:`hf_roste.numerics.fake_quantize` (``spec`` must be enabled);
    used where a graph must not break (``torch.compile``) and where the fused kernel runs. With
    ``out_dtype`` the result is rounded once to that dtype (the value of
    ``fake_quantize(x, spec).to(out_dtype)``, the gradient cast back to ``x.dtype``): under bf16
    autocast a float32 activation is quantized straight into the bf16 the matmul reads.
    """
    return _fake_quantize_impl(x, spec.bits, spec.symmetric, float(spec.clip_ratio), spec.granularity,
                               spec.group_size or 0, out_dtype or x.dtype)
