"""One CUDA launch per 128-column block for a whole chunk of the batched GPTQ solve.

GPTQModel's block-update extension runs one CUDA block per weight row with one thread per column:
each of the 128 pivot columns costs two block-wide barriers, and it takes one shared Hessian
inverse per launch, so a chunk of the batched solve needs one launch per (shared) Hessian and
block (192 for a gate/up chunk of 24 experts). This kernel runs a whole chunk's rows in one launch
per block: one warp per row, each lane holding four columns in registers, the pivot's error passed
to the other lanes by a warp shuffle, and each row reading its own unit's inverse.

Per element it computes what GPTQModel's extension computes, in the same order, each step rounded
to nearest on its own (no fused multiply-add): the quantized value of the pivot column, its loss
and error, then ``value - error * hinv`` for the pivot column and every column after it. So the
results are the extension's bit for bit (asserted on CUDA by the tests). The batched solve uses it
only where GPTQModel would run its extension (:func:`.batched._use_extension`).

It is compiled with ``torch.utils.cpp_extension.load_inline`` (``nvcc`` needed; about a minute the first
time on a machine, then loaded from torch's build cache); where that fails the batched solve calls
GPTQModel's extension per Hessian and :func:`why_unavailable` says why. When a batched solve starts on a
CUDA machine (:func:`.batched.batched_solves`), :func:`load_ahead` loads a cached build on a background
thread, so the run's start does not wait for torch's extension import and ninja's check; without a
cached build the first chunk that can use the kernel compiles it.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "block_update", "why_unavailable"]

_NAME = "defuser_quant_rows_block_update"

_CPP = "void rows_block_update(at::Tensor work, at::Tensor hinv, at::Tensor task_unit, at::Tensor scale, " \
       "at::Tensor zero, at::Tensor column_group, at::Tensor quantized, at::Tensor errors, at::Tensor losses, " \
       "int64_t rows_per_task, int64_t maxq);"

_CUDA = r"""
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

namespace {
constexpr int kWidth = 128;
constexpr int kLanes = 32;
constexpr int kSlots = kWidth / kLanes;  // columns per lane: lane l holds l, l + 32, l + 64, l + 96
constexpr int kRowsPerBlock = 8;         // one warp per row

__global__ void rows_block_update_kernel(
    float* __restrict__ work, const float* __restrict__ hinv, const int32_t* __restrict__ task_unit,
    const float* __restrict__ scale, const float* __restrict__ zero, const int32_t* __restrict__ column_group,
    float* __restrict__ quantized, float* __restrict__ errors, float* __restrict__ losses,
    int64_t rows, int64_t rows_per_task, int64_t work_stride, int64_t scale_stride, int64_t zero_stride,
    int64_t quant_stride, int64_t error_stride, int64_t loss_stride, float maxq) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  if (row >= rows) return;  // the whole warp: one row per warp
  const float* h = hinv + static_cast<int64_t>(task_unit[row / rows_per_task]) * kWidth * kWidth;
  float value[kSlots], q[kSlots], err[kSlots], loss[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) value[s] = work[row * work_stride + s * kLanes + lane];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    for (int p = 0; p < kLanes; ++p) {
      const int pivot = s * kLanes + p;
      float pivot_error = 0.0f;
      if (lane == p) {
        // The extension's steps: round to nearest even, each operation rounded on its own.
        const int32_t group = column_group[pivot];
        const float row_scale = scale[group * scale_stride + row];
        const float row_zero = zero[group * zero_stride + row];
        const float diagonal = h[pivot * kWidth + pivot];
        const float rounded = nearbyintf(__fdiv_rn(value[s], row_scale));
        const float shifted = __fadd_rn(rounded, row_zero);
        const float code = isnan(shifted) ? shifted : fminf(fmaxf(shifted, 0.0f), maxq);
        const float quant = __fmul_rn(row_scale, __fsub_rn(code, row_zero));
        const float residual = __fsub_rn(value[s], quant);
        loss[s] = __fdiv_rn(__fmul_rn(residual, residual), __fmul_rn(diagonal, diagonal));
        pivot_error = __fdiv_rn(residual, diagonal);
        err[s] = pivot_error;
        q[s] = quant;
      }
      pivot_error = __shfl_sync(0xffffffffu, pivot_error, p);
      const float* h_row = h + pivot * kWidth + lane;
#pragma unroll
      for (int t = s; t < kSlots; ++t) {
        if (t > s || lane >= p) value[t] = __fsub_rn(value[t], __fmul_rn(pivot_error, h_row[t * kLanes]));
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int col = s * kLanes + lane;
    work[row * work_stride + col] = value[s];
    quantized[row * quant_stride + col] = q[s];
    errors[row * error_stride + col] = err[s];
    losses[row * loss_stride + col] = loss[s];
  }
}
}  // namespace

void rows_block_update(at::Tensor work, at::Tensor hinv, at::Tensor task_unit, at::Tensor scale,
                       at::Tensor zero, at::Tensor column_group, at::Tensor quantized, at::Tensor errors,
                       at::Tensor losses, int64_t rows_per_task, int64_t maxq) {
  TORCH_CHECK(maxq >= 3 && maxq <= 255 && ((maxq + 1) & maxq) == 0, "maxq must be 2^bits - 1 for bits 2 through 8");
  const auto device = work.device();
  TORCH_CHECK(device.is_cuda(), "work must be CUDA");
  for (const auto& t : {hinv, scale, zero, quantized, errors, losses, work}) {
    TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat, "block tensors must be float32 on one CUDA device");
  }
  for (const auto& t : {task_unit, column_group}) {
    TORCH_CHECK(t.device() == device && t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
                "task_unit and column_group must be contiguous CUDA int32 vectors");
  }
  TORCH_CHECK(work.dim() == 2 && work.size(1) == kWidth && work.stride(1) == 1, "work must have 128 contiguous columns");
  const int64_t rows = work.size(0);
  TORCH_CHECK(rows_per_task > 0 && rows % rows_per_task == 0 && task_unit.size(0) == rows / rows_per_task,
              "task_unit must name one unit per task of rows_per_task rows");
  TORCH_CHECK(hinv.dim() == 3 && hinv.size(1) == kWidth && hinv.size(2) == kWidth && hinv.is_contiguous(),
              "hinv must be contiguous [units, 128, 128]");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) > 0 && scale.size(1) == rows && scale.stride(1) == 1,
              "scale must have shape [groups, rows] with contiguous rows");
  TORCH_CHECK(zero.sizes() == scale.sizes() && zero.stride(1) == 1, "zero must match scale");
  TORCH_CHECK(column_group.size(0) == kWidth, "column_group must have 128 entries");
  for (const auto& t : {quantized, errors, losses}) {
    TORCH_CHECK(t.sizes() == work.sizes() && t.stride(1) == 1, "outputs must match work and have contiguous columns");
  }
  if (rows == 0) return;
  c10::cuda::CUDAGuard guard(device);
  auto stream = at::cuda::getCurrentCUDAStream(device.index());
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  rows_block_update_kernel<<<static_cast<unsigned int>(blocks), kRowsPerBlock * kLanes, 0, stream>>>(
      work.data_ptr<float>(), hinv.const_data_ptr<float>(), task_unit.const_data_ptr<int32_t>(),
      scale.const_data_ptr<float>(), zero.const_data_ptr<float>(), column_group.const_data_ptr<int32_t>(),
      quantized.data_ptr<float>(), errors.data_ptr<float>(), losses.data_ptr<float>(), rows, rows_per_task,
      work.stride(0), scale.stride(0), zero.stride(0), quantized.stride(0), errors.stride(0), losses.stride(0),
      static_cast<float>(maxq));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
"""

_lock = threading.Lock()
_module: object | None = None
_failure: str | None = None


def _load() -> object | None:
    """The compiled module, built once per process (None, with :data:`_failure` set, if it cannot be)."""
    global _module, _failure
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        if not torch.cuda.is_available():
            _failure = "CUDA is not available"
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            logger.info("loading defuser-quant's one-launch GPTQ block kernel (the first time on a machine it is "
                        "compiled with nvcc, about a minute; torch caches the build)")
            _module = load_inline(name=_NAME, cpp_sources=_CPP, cuda_sources=_CUDA, functions=["rows_block_update"],
                                  extra_cuda_cflags=["-O3", "--fmad=false"], verbose=False)
        except Exception as exc:  # no nvcc, a compiler error: GPTQModel's extension per Hessian instead
            _failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            logger.warning("defuser-quant's one-launch GPTQ block kernel is unavailable (%s); the batched solve "
                           "calls GPTQModel's extension once per Hessian instead", _failure)
        return _module


_ahead: threading.Thread | None = None
#: The background thread's name (:func:`load_ahead`).
AHEAD_THREAD = "defuser-quant-rows-kernel-load"


def _cached_build() -> bool:
    """Whether torch's build folder for this kernel holds a built library and no build is under way."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        folder = _get_build_directory(_NAME, verbose=False)
    except Exception:  # another torch: leave the load to the first use
        return False
    return os.path.isfile(os.path.join(folder, f"{_NAME}.so")) and not os.path.exists(os.path.join(folder, "lock"))


def _load_if_cached() -> None:
    if _cached_build():
        _load()


def load_ahead() -> threading.Thread | None:
    """Start loading a build torch has cached, on a background thread (not a daemon: an interpreter
    that exits waits for it, so torch's build lock is always released); callers of :func:`available`
    wait for it. None, and nothing started, where the kernel is loaded or refused already, a load is
    under way, or there is no CUDA; without a cached build the thread leaves the build to the first use."""
    global _ahead
    with _lock:
        if _module is not None or _failure is not None or not torch.cuda.is_available():
            return None
        if _ahead is not None and _ahead.is_alive():
            return None
        _ahead = threading.Thread(target=_load_if_cached, name=AHEAD_THREAD)
        _ahead.start()
        return _ahead


def available() -> bool:
    """True once the kernel is compiled and loaded (builds it at the first call)."""
    return _load() is not None


def why_unavailable() -> str | None:
    """Why :func:`available` is False (None while it is True or was not asked yet)."""
    return _failure


def block_update(work: torch.Tensor, hinv: torch.Tensor, task_unit: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, column_group: torch.Tensor, quantized: torch.Tensor, errors: torch.Tensor,
                 losses: torch.Tensor, rows_per_task: int, maxq: int) -> None:
    """One 128-column block of every row of a chunk, in place, on the current stream.

    ``work``/``quantized``/``errors``/``losses``: ``[rows, 128]`` (contiguous columns); ``hinv``:
    ``[units, 128, 128]`` contiguous, the block of each unit's inverse; ``task_unit[i]``: the unit
    of rows ``i * rows_per_task`` to ``(i + 1) * rows_per_task``; ``scale``/``zero``: ``[groups,
    rows]``; ``column_group``: each column's row in ``scale``; ``maxq``: ``2**bits - 1``."""
    module = _load()
    if module is None:
        raise RuntimeError(f"defuser-quant's GPTQ block kernel is unavailable: {_failure}")
    module.rows_block_update(work, hinv, task_unit, scale, zero, column_group, quantized, errors, losses,
                             int(rows_per_task), int(maxq))
