"""The SpQR engine: GPTQ error feedback with bilevel group statistics and sparse outliers.

Implements SpQR (Dettmers et al., ICLR 2024) Algorithm 1 on plain tensors: takes a weight and
its Hessian, returns the packed layer. Knows nothing about models or transformers.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spqr_hf.core.bilevel import quantize_statistic, refine_statistic_pair
from spqr_hf.core.outliers import outlier_threshold, without_likely_outliers
from spqr_hf.core.params import WHOLE_ROW, SpQRParams
from spqr_hf.core.quant_grid import fit_minmax, quantize_to_codes
from spqr_hf.format import layout
from spqr_hf.format.layout import MAX_IN_FEATURES, affine
from spqr_hf.format.pack import PackedSpQR, pack_bits, pack_bits_transposed

_FP16_MAX = 65504.0
_MAX_DAMPING_RETRIES = 6
_MIN_PARALLEL_DIM = 1024  # below this, multi-threaded matmuls cost more in wake-ups than they save
_SUBBLOCK = 16  # columns per eager rank-1 update region inside a GPTQ block
REFINE_STATISTICS = True  # joint neighbour search of second-level codes (bilevel.refine_statistic_pair)


@dataclass
class SpQRResult:
    """A quantized layer plus what the engine observed while producing it."""

    packed: PackedSpQR
    proxy_loss: float  # sum over columns of ||(w - q(w)) / d||^2: GPTQ's Hessian-weighted error
    damp_percent: float  # damping actually used (higher than requested after a retry)
    reconstruction: torch.Tensor | None = None  # [out, in] weights used for error feedback, if kept

    @property
    def outlier_fraction(self) -> float:
        return self.packed.nnz / max(1, self.packed.in_features * self.packed.out_features)


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (CPU ops only)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _validate_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = getattr(weight, "shape", type(weight))
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {got}")
    m, n = weight.shape
    if m == 0 or n == 0:
        raise ValueError(f"cannot quantize an empty weight of shape {tuple(weight.shape)}")
    if n > MAX_IN_FEATURES:
        raise ValueError(f"in_features={n} exceeds the format's limit of {MAX_IN_FEATURES} columns")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    absmax = float(weight.abs().amax())  # one pass: NaN and inf propagate into the max
    if not math.isfinite(absmax):
        raise ValueError("weight contains NaN or infinite values; fix the checkpoint before quantizing")
    if absmax > _FP16_MAX:
        raise ValueError("weight has entries beyond the float16 range (65504), which SpQR statistics cannot represent")
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (n, n):
        raise ValueError(
            f"hessian must have shape ({n}, {n}) to match in_features={n}, got {tuple(getattr(hessian, 'shape', ()))}"
        )
    if not math.isfinite(float(hessian.sum())):
        raise ValueError("hessian contains NaN or infinite values (calibration activations overflowed?)")


def _lower_triangular_inverse(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 block recursion: n^3/3 flops in matmuls,
    about twice as fast as a triangular solve against the identity, on any device."""
    n = lower.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    top, bottom = _lower_triangular_inverse(lower[:k, :k], leaf), _lower_triangular_inverse(lower[k:, k:], leaf)
    out = torch.zeros_like(lower)
    out[:k, :k], out[k:, k:] = top, bottom
    out[k:, :k] = -(bottom @ (lower[k:, :k] @ top))
    return out


def _inverse_cholesky_upper(flipped: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, raising damping until it exists.

    Takes ``flipped`` = J H J (J the index reversal). With L the Cholesky factor of J H J,
    U = J L^-1 J: one Cholesky and one triangular inverse instead of GPTQ's Cholesky, inverse
    and second Cholesky.
    """
    mean_diag = flipped.diagonal().mean()
    damp = damp_percent
    for attempt in range(_MAX_DAMPING_RETRIES + 1):
        damped = flipped.clone()
        damped.diagonal().add_(damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper = _lower_triangular_inverse(chol).flip(0, 1)
            if math.isfinite(float(upper.sum())) and bool((upper.diagonal() > 0).all()):
                if attempt:
                    warnings.warn(
                        f"Hessian not positive definite with damp_percent={damp_percent}; used {damp:g} instead",
                        stacklevel=3,
                    )
                return upper, damp
        damp = max(damp * 10, 0.01)
    raise ValueError("Hessian is not positive definite even with strong damping; check the calibration inputs")


def spqr_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, params: SpQRParams, keep_reconstruction: bool = False
) -> SpQRResult:
    """Quantize ``weight`` [out, in] given its input Hessian [in, in]; runs on ``weight.device``.

    ``keep_reconstruction`` also returns the dense weights the error feedback used (for tests
    of the decoder's bit-exactness; costs one float32 copy of the weight).
    """
    return spqr_quantize_shared([weight], hessian, params, keep_reconstruction)[0]


def _can_share_pass(weights: Sequence[torch.Tensor], params: SpQRParams) -> bool:
    """Rows of several layers can share one pass when no second-level chunk straddles two layers."""
    if params.qq_groupsize == WHOLE_ROW:
        return False
    return all(w.shape[0] % params.qq_groupsize == 0 for w in weights)


def spqr_quantize_shared(
    weights: Sequence[torch.Tensor], hessian: torch.Tensor, params: SpQRParams, keep_reconstruction: bool = False
) -> list[SpQRResult]:
    """Quantize layers that read the same input (q/k/v, gate/up) with one Hessian, in one pass.

    GPTQ's work is per output row given H, so stacking the rows of such layers gives each the
    same result as its own run (each keeps its own outlier threshold), while the per-column
    Python loop, the damping/Cholesky and the permutation are paid once instead of per layer.

    The working matrix is kept transposed (``wt`` [in, rows], one input column per row) so that
    every per-column step touches contiguous memory; GPTQ's lazy updates are blocked twice
    (sub-blocks of ``_SUBBLOCK`` columns inside blocks of ``params.blocksize``).
    """
    if not weights:
        return []
    for weight in weights:
        _validate_inputs(weight, hessian)
    if len(weights) > 1 and not _can_share_pass(weights, params):
        return [spqr_quantize_shared([w], hessian, params, keep_reconstruction)[0] for w in weights]
    # Almost everything here is thousands of small tensor ops: run them on one thread (intra-op
    # thread wake-ups cost more than the ops: 20x on a busy 2-core machine) and give only the
    # large matmuls (Cholesky, triangular inverse, per-block lazy update) the caller's threads.
    threads = torch.get_num_threads()
    with intra_op_threads(1):
        return _quantize_rows(weights, hessian, params, keep_reconstruction, threads)


def _quantize_rows(
    weights: Sequence[torch.Tensor], hessian: torch.Tensor, params: SpQRParams, keep_reconstruction: bool,
    threads: int,
) -> list[SpQRResult]:
    """The body of :func:`spqr_quantize_shared` (validated inputs, single-threaded context)."""
    device = weights[0].device
    n = hessian.shape[0]
    sizes = [w.shape[0] for w in weights]
    m = sum(sizes)
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    if params.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(n, device=device)
    wt = torch.cat([w.detach().to(device=device, dtype=torch.float32).t()[perm] for w in weights], dim=1)
    wt[dead[perm]] = 0.0
    reverse = perm.flip(0)
    with intra_op_threads(threads if n >= _MIN_PARALLEL_DIM else 1):
        u, damp = _inverse_cholesky_upper(h[reverse][:, reverse], params.damp_percent)
    del h
    d = u.diagonal().contiguous()

    g = params.effective_groupsize(n)
    r = params.effective_qq_groupsize(m if len(weights) > 1 else sizes[0])
    maxq = (1 << params.bits) - 1
    n_groups = layout.num_groups(n, g)
    blocksize = params.blocksize
    sub = min(_SUBBLOCK, blocksize)
    starts = itertools.accumulate([0] + sizes[:-1])
    row_slices = [slice(start, start + size) for start, size in zip(starts, sizes, strict=True)]
    thr = None
    if params.has_outliers:  # one threshold per layer, as a per-row vector
        thr = torch.cat([outlier_threshold(wt[:, rows], d, params.outlier_threshold).expand(rows.stop - rows.start)
                         for rows in row_slices])

    codes_t = torch.empty(n, m, dtype=torch.uint8, device=device)
    stat_codes = {"scale": torch.empty(n_groups, m, dtype=torch.int64, device=device),
                  "zero": torch.empty(n_groups, m, dtype=torch.int64, device=device)}
    stat_meta: dict[str, list[torch.Tensor]] = {"scale": [], "zero": []}
    if thr is not None:
        outlier_mask_t = torch.zeros(n, m, dtype=torch.bool, device=device)
        outlier_delta_t = torch.zeros(n, m, dtype=torch.float16, device=device)
    errors = torch.empty(blocksize, m, dtype=torch.float32, device=device)
    recon_t = torch.empty(n, m, dtype=torch.float32, device=device) if keep_reconstruction else None
    row_loss = torch.zeros(m, dtype=torch.float32, device=device)
    scale = zero = None

    for b0 in range(0, n, blocksize):
        b1 = min(b0 + blocksize, n)
        for s0 in range(b0, b1, sub):
            s1 = min(s0 + sub, b1)
            for j in range(s0, s1):
                if j % g == 0:
                    # Every update from columns < j has reached columns j..j+g here: a group
                    # starts on a sub-block boundary, and one wider than a block on a block's.
                    scale, zero = _fit_group_statistics(wt[j:j + g], d[j:j + g], maxq, thr, params, r,
                                                        j // g, stat_codes, stat_meta)
                col = wt[j]
                q = quantize_to_codes(col, scale, zero, maxq)
                recon = affine(q, scale, zero)
                if thr is not None:
                    is_outlier = ((col - recon) / d[j]).square() > thr
                    delta = (col - recon).to(torch.float16)
                    recon = torch.where(is_outlier, recon + delta.to(torch.float32), recon)
                    outlier_mask_t[j] = is_outlier
                    outlier_delta_t[j] = delta
                err = errors[j - b0]
                torch.div(col - recon, d[j], out=err)
                codes_t[j] = q
                if recon_t is not None:
                    recon_t[j] = recon
                if j + 1 < s1:
                    wt[j + 1:s1].addr_(u[j, j + 1:s1], err, alpha=-1.0)
            if s1 < b1:
                wt[s1:b1].addmm_(u[s0:s1, s1:b1].t(), errors[s0 - b0:s1 - b0], alpha=-1.0)
        if b1 < n:
            big = (n - b1) * m >= _MIN_PARALLEL_DIM**2  # the one large matmul per block
            with intra_op_threads(threads if big else 1):
                wt[b1:].addmm_(u[b0:b1, b1:].t(), errors[:b1 - b0], alpha=-1.0)
        # GPTQ's proxy loss sum ||(w - q(w)) / d||^2 per row, accumulated without a host sync.
        row_loss += errors[:b1 - b0].square().sum(dim=0)

    metas = {name: torch.stack(values) if values else None for name, values in stat_meta.items()}
    results = []
    for rows in row_slices:
        packed = PackedSpQR(
            in_features=n, out_features=rows.stop - rows.start, bits=params.bits, groupsize=g,
            qq_groupsize=r if len(weights) > 1 else params.effective_qq_groupsize(sizes[0]),
            scale_bits=params.qq_scale_bits, zero_bits=params.qq_zero_bits,
            qweight=pack_bits_transposed(codes_t[:, rows], params.bits),
            scale_codes=pack_bits(stat_codes["scale"][:, rows], params.qq_scale_bits),
            zero_codes=pack_bits(stat_codes["zero"][:, rows], params.qq_zero_bits),
            scale_meta=_meta_rows(metas["scale"], rows, r),
            zero_meta=_meta_rows(metas["zero"], rows, r),
            perm=layout.to_uint16_storage(perm),
            **_outliers_csr(outlier_mask_t[:, rows], outlier_delta_t[:, rows]) if thr is not None
            else _outliers_csr(None, None, rows.stop - rows.start, device),
        )
        reconstruction = None
        if recon_t is not None:
            reconstruction = torch.empty(rows.stop - rows.start, n, dtype=torch.float32, device=device)
            reconstruction[:, perm] = recon_t[:, rows].t()
        results.append(SpQRResult(packed=packed, proxy_loss=float(row_loss[rows].sum()), damp_percent=damp,
                                  reconstruction=reconstruction))
    return results


def _meta_rows(meta: torch.Tensor | None, rows: slice, qq_groupsize: int) -> torch.Tensor | None:
    """The second-level meta chunks of one layer's rows (chunks never straddle layers)."""
    if meta is None:
        return None
    return meta[:, rows.start // qq_groupsize:-(-rows.stop // qq_groupsize)].contiguous()


def _outliers_csr(
    mask_t: torch.Tensor | None, delta_t: torch.Tensor | None, rows: int = 0, device: torch.device | None = None
) -> dict[str, torch.Tensor]:
    """CSR outlier buffers (row pointers, permuted columns, float16 deltas) from [in, out] masks."""
    if mask_t is None:
        return {
            "outlier_row_ptr": torch.zeros(rows + 1, dtype=torch.int32, device=device),
            "outlier_col": torch.zeros(0, dtype=torch.int16, device=device),
            "outlier_delta": torch.zeros(0, dtype=torch.float16, device=device),
        }
    n, m = mask_t.shape
    cols, row_index = mask_t.nonzero(as_tuple=True)
    order = torch.argsort(row_index * n + cols)  # CSR: by row, then column
    row_index, cols = row_index[order], cols[order]
    counts = torch.bincount(row_index, minlength=m)
    return {
        "outlier_row_ptr": torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32),
        "outlier_col": layout.to_uint16_storage(cols),
        "outlier_delta": delta_t[cols, row_index].contiguous(),
    }


def _fit_group_statistics(
    group_t: torch.Tensor,
    group_d: torch.Tensor,
    maxq: int,
    thr: torch.Tensor | None,
    params: SpQRParams,
    qq_groupsize: int,
    group_index: int,
    stat_codes: dict[str, torch.Tensor],
    stat_meta: dict[str, list[torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one column group's per-row grid (``group_t`` [g, m]), quantize its statistics, record their codes.

    Returns the *decoded* (scale, zero) that the column loop must use, so that the engine's
    reconstruction is the decoder's bit for bit.
    """
    fitted = group_t
    if thr is not None and not params.simplified_outliers:
        fitted = without_likely_outliers(group_t, group_d, maxq, thr)
    scale, zero = fit_minmax(fitted, maxq)
    bits = (params.qq_scale_bits, params.qq_zero_bits)
    quantized = (quantize_statistic(scale, bits[0], qq_groupsize), quantize_statistic(zero, bits[1], qq_groupsize))
    if REFINE_STATISTICS:
        quantized = refine_statistic_pair(fitted, group_d.square().reciprocal(), maxq, (scale, zero), quantized, bits,
                                          qq_groupsize)
    for name, stat in zip(("scale", "zero"), quantized, strict=True):
        stat_codes[name][group_index] = stat.codes
        if stat.meta is not None:
            stat_meta[name].append(stat.meta)
    return quantized[0].decoded, quantized[1].decoded
