"""A faster CPU pack for one module: the words of GPTQModel's ``pack_block_cpu``, row by row.

GPTQModel's extension (``gptqmodel_ext/pack_block_cpu.cpp``) converts the whole weight to float32 first, then for each
block of 32 inputs walks every output row, one element at a time: about 12.6 ms for a 768x2048 bf16 expert projection
on one thread, and ``block_finalize``'s last finalize window is mostly those calls (docs/performance.md, round 69).
This kernel reads each output row where it lies (contiguous), looks up the row's scale and offset per input once, and
does the same float32 operations as the extension over the row (add the offset, divide by the scale, 1e-6 where it is
0, round half to even, clamp to ``[0, 2**bits - 1]``), which the compiler vectorizes for the host's instruction set
(``-march=native``; no fast-math, so each operation is IEEE's, as the extension's). Then the bit planes, in the
extension's layout, without the interpreter lock (as the extension, a torch op). Its words equal the extension's (tests:
every bit width, weight dtype, ``g_idx`` order, zero scales, non-finite weights). ``block_finalize`` uses it with the
opt-in ``row_pack`` part (not yet run on a GPU host).

Built on first use with ``torch.utils.cpp_extension`` (about 30 s on two cores, then cached under
``TORCH_EXTENSIONS_DIR``, one build per source and host CPU); where it cannot be built, :func:`load` says why once and
returns ``None``.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["load", "pack_rows"]

BITS = (2, 4, 8)

_SOURCE = r"""
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void codes_of_rows(const T* weight, const float* divisor, const float* offset, const int32_t* group_of,
                          int64_t out, int64_t in, int bits, int32_t* qweight) {
  const int per_word = 32 / bits;
  const int64_t blocks = in / 32;
  const float max_q = static_cast<float>((1 << bits) - 1);
  std::vector<float> row_divisor(in), row_offset(in), codes(in);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {  // this row's scale and offset for each input
      const int64_t at = static_cast<int64_t>(group_of[i]) * out + o;
      row_divisor[i] = divisor[at];
      row_offset[i] = offset[at];
    }
    const T* w = weight + o * in;
    for (int64_t i = 0; i < in; ++i) {  // the extension's float32 steps, in its order
      float q = std::nearbyint((static_cast<float>(w[i]) + row_offset[i]) / row_divisor[i]);
      codes[i] = std::max<float>(0.0f, std::min<float>(q, max_q));
    }
    for (int64_t b = 0; b < blocks; ++b) {
      for (int plane = 0; plane < bits; ++plane) {
        const float* lane = codes.data() + b * 32 + plane * per_word;
        int64_t packed = 0;
        for (int k = 0; k < per_word; ++k) {
          packed |= static_cast<int64_t>(static_cast<int32_t>(lane[k])) << (bits * k);
        }
        qweight[(b * bits + plane) * out + o] = static_cast<int32_t>(packed & 0xFFFFFFFF);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pack_rows(const at::Tensor& weight, const at::Tensor& scales,
                                             const at::Tensor& zeros, const at::Tensor& g_idx, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "pack_rows: bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(weight.device().is_cpu() && scales.device().is_cpu() && zeros.device().is_cpu() &&
              g_idx.device().is_cpu(), "pack_rows: every tensor must be on the CPU");
  TORCH_CHECK(weight.dim() == 2, "pack_rows: weight must be [out, in], got ", weight.dim(), " dims");
  TORCH_CHECK(scales.dim() == 2 && zeros.dim() == 2 && g_idx.dim() == 1,
              "pack_rows: scales and zeros must be [groups, out] and g_idx [in]");
  const int64_t out = weight.size(0), in = weight.size(1), groups = scales.size(0);
  TORCH_CHECK(in % 32 == 0, "pack_rows: in_features must be a multiple of 32, got ", in);
  TORCH_CHECK(scales.size(1) == out && zeros.size(0) == groups && zeros.size(1) == out,
              "pack_rows: scales and zeros must be [groups, out]");
  TORCH_CHECK(g_idx.size(0) == in, "pack_rows: g_idx length ", g_idx.size(0), " != in_features ", in);

  at::Tensor scale_f = scales.contiguous().to(at::kFloat);
  at::Tensor zero_i = zeros.contiguous().to(at::kInt);
  at::Tensor offset = zero_i.to(at::kFloat) * scale_f;  // the extension's scale_zeros
  at::Tensor divisor = at::where(scale_f == 0, at::full_like(scale_f, 1e-6f), scale_f);
  at::Tensor g = g_idx.contiguous().to(at::kInt);
  std::vector<int32_t> group_of(in);
  const int32_t* gp = g.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < in; ++i) {
    int32_t group = gp[i] < 0 ? gp[i] + static_cast<int32_t>(groups) : gp[i];
    TORCH_CHECK(group >= 0 && group < groups, "pack_rows: g_idx[", i, "]=", gp[i], " is out of range for ", groups,
                " groups");
    group_of[i] = group;
  }

  at::Tensor qweight = at::empty({in / 32 * bits, out}, at::TensorOptions().dtype(at::kInt));
  at::Tensor w = weight.contiguous();
  const float* dp = divisor.const_data_ptr<float>();
  const float* op = offset.const_data_ptr<float>();
  int32_t* qp = qweight.data_ptr<int32_t>();
  if (w.scalar_type() == at::kBFloat16) {
    codes_of_rows(w.const_data_ptr<c10::BFloat16>(), dp, op, group_of.data(), out, in, bits, qp);
  } else if (w.scalar_type() == at::kHalf) {
    codes_of_rows(w.const_data_ptr<c10::Half>(), dp, op, group_of.data(), out, in, bits, qp);
  } else if (w.scalar_type() == at::kFloat) {
    codes_of_rows(w.const_data_ptr<float>(), dp, op, group_of.data(), out, in, bits, qp);
  } else {
    codes_of_rows(w.to(at::kFloat).const_data_ptr<float>(), dp, op, group_of.data(), out, in, bits, qp);
  }

  // the zero points, as the extension packs them: 32 / bits a word along the outputs
  const int per_word = 32 / bits;
  const int64_t columns = out / 32 * bits;
  at::Tensor qzeros = at::zeros({groups, columns}, at::TensorOptions().dtype(at::kInt));
  const int32_t* zp = zero_i.const_data_ptr<int32_t>();
  int32_t* qzp = qzeros.data_ptr<int32_t>();
  for (int64_t gi = 0; gi < groups; ++gi) {
    for (int64_t c = 0; c < columns; ++c) {
      int64_t packed = 0;
      for (int k = 0; k < per_word; ++k) {
        packed |= static_cast<int64_t>(zp[gi * out + c * per_word + k]) << (bits * k);
      }
      qzp[gi * columns + c] = static_cast<int32_t>(packed & 0xFFFFFFFF);
    }
  }
  return {qweight, qzeros};
}

// without the interpreter lock, as a torch op runs: block_finalize's pool packs members side by side, and the main
// thread goes on meanwhile
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""

_FLAGS = ["-O3", "-march=native", "-fno-math-errno"]
_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _host_tag() -> str:
    """The host CPU's identity for the build's name: ``-march=native`` code runs only where it was built."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        flags = next((line for line in cpuinfo.read_text(errors="replace").splitlines()
                      if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build_name() -> str:
    digest = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, _host_tag(), torch.__version__]).encode()).hexdigest()
    return f"defuser_quant_pack_rows_{digest[:16]}"


def load() -> Callable | None:
    """The kernel's ``pack_rows(weight, scales, zeros, g_idx, bits) -> (qweight, qzeros)``, built on first use, or
    ``None`` where it cannot be built here (said once, with the reason, in the log)."""
    with _lock:
        if "module" not in _loaded:
            try:
                from torch.utils.cpp_extension import load_inline

                _loaded["module"] = load_inline(name=_build_name(), cpp_sources=[_SOURCE], extra_cflags=_FLAGS,
                                                with_cuda=False, verbose=False)
            except Exception as exc:  # no compiler, no ninja, a failed build: the caller packs another way
                logger.warning("pack_kernel: could not be built here (%s: %s); GPTQModel's extension packs instead",
                               type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                _loaded["module"] = None
        module = _loaded["module"]
    return None if module is None else module.pack_rows  # type: ignore[attr-defined]


def pack_rows(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_block_cpu(weight, scales, zeros, g_idx, bits, 32, ...)``'s ``(qweight, qzeros)`` with this kernel:
    ``weight`` [out, in], ``scales``/``zeros`` [groups, out] (transposed, as ``pack_block`` passes them), ``g_idx``
    [in]. Raises ``RuntimeError`` where the kernel cannot be built, ``ValueError`` for bits it does not pack."""
    if int(bits) not in BITS:
        raise ValueError(f"pack_rows packs 2, 4 or 8 bits (whole codes per 32-bit word), got {bits}")
    kernel = load()
    if kernel is None:
        raise RuntimeError("pack_kernel could not be built here (see the log); use GPTQModel's extension")
    return kernel(weight, scales, zeros, g_idx, int(bits))
