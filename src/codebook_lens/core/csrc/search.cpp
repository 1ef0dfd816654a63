// Fused nearest-code search on the CPU: tiles of the score matrix (codes x tokens) are
// computed with the BLAS (at::mm_out, all threads) into a buffer that stays in cache and
// scanned at once for a running top-k per token, so the full token x code score matrix
// is never written to memory.
//
// x: (G, N, d) float32, keys: (G, C, d) float32, bias: (G, C) float32 or empty.
// score(n, c) = alpha * <x[g, n], keys[g, c]> + bias[g, c].
// Returns (N, G, k) int64 ids, best first; ties keep the lower code id first.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;

inline void insert(float* vals, int64_t* ids, int64_t k, float s, int64_t id) {
  int64_t pos = k - 1;  // s beats vals[k-1]; shift smaller entries down
  while (pos > 0 && vals[pos - 1] < s) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = s;
  ids[pos] = id;
}

}  // namespace

torch::Tensor fused_topk(torch::Tensor x, torch::Tensor keys, torch::Tensor bias, double alpha_d,
                         int64_t k, int64_t tok_block, int64_t code_block) {
  TORCH_CHECK(x.dim() == 3 && keys.dim() == 3, "x must be (G, N, d) and keys (G, C, d)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat, "float32 only");
  x = x.contiguous();
  keys = keys.contiguous();
  const int64_t G = x.size(0), N = x.size(1), C = keys.size(1);
  TORCH_CHECK(keys.size(0) == G && keys.size(2) == x.size(2), "x and keys do not match");
  TORCH_CHECK(k >= 1 && k <= C, "k out of range");
  const bool has_bias = bias.defined() && bias.numel() > 0;
  if (has_bias) bias = bias.contiguous();
  const float* bias_p = has_bias ? bias.data_ptr<float>() : nullptr;
  const float alpha = static_cast<float>(alpha_d);
  auto ids = torch::empty({N, G, k}, x.options().dtype(torch::kLong));
  int64_t* ids_p = ids.data_ptr<int64_t>();
  tok_block = std::min(tok_block, N);
  code_block = std::min(code_block, C);

  // The tile is computed by the BLAS with all threads, then scanned on this thread.
  // The tile lives for the process: allocating 8 MiB per call costs page faults.
  static thread_local std::vector<float> tile_store;
  if (tile_store.size() < static_cast<size_t>(code_block * tok_block)) {
    tile_store.resize(code_block * tok_block);
  }
  float* tile_p = tile_store.data();
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(alpha);
#endif
  std::vector<float> vals(tok_block * k);
  std::vector<int64_t> best(tok_block * k);
  std::vector<float> thr(tok_block);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t0 = 0; t0 < N; t0 += tok_block) {
      const int64_t nt = std::min(tok_block, N - t0);
      std::fill(vals.begin(), vals.begin() + nt * k, neg_inf);
      std::fill(best.begin(), best.begin() + nt * k, int64_t(-1));
      std::fill(thr.begin(), thr.begin() + nt, neg_inf);
      auto xb_t = x[g].narrow(0, t0, nt).t();  // (d, nt)
      for (int64_t c0 = 0; c0 < C; c0 += code_block) {
        const int64_t nc = std::min(code_block, C - c0);
        auto out = torch::from_blob(tile_p, {nc, nt}, x.options());
        at::mm_out(out, keys[g].narrow(0, c0, nc), xb_t);  // scores^T: (nc, nt), row stride nt
        // The scan runs on the calling thread: a second thread pool here would compete
        // with the BLAS threads, which keep spinning for a while after the product.
        // Row by row, 16 tokens at a time: streaming reads of the cached tile.
        for (int64_t c = 0; c < nc; ++c) {
          const float b = has_bias ? bias_p[g * C + c0 + c] : 0.0f;
          const float* row = tile_p + c * nt;
          for (int64_t j0 = 0; j0 < nt; j0 += kLanes) {
            const int64_t m = std::min(kLanes, nt - j0);
#if defined(__AVX512F__)
            // is any of these scores above its token's current k-th best?
            const __mmask16 lanes = m == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << m) - 1);
            const __m512 v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(lanes, row + j0),
                                             _mm512_set1_ps(b));
            const __m512 t = _mm512_maskz_loadu_ps(lanes, thr.data() + j0);
            if (!_mm512_mask_cmp_ps_mask(lanes, v, t, _CMP_GT_OQ)) continue;
#endif
            for (int64_t u = 0; u < m; ++u) {
              const float s = std::fma(alpha, row[j0 + u], b);
              const int64_t j = j0 + u;
              if (s > thr[j]) {
                insert(vals.data() + j * k, best.data() + j * k, k, s, c0 + c);
                thr[j] = vals[j * k + k - 1];
              }
            }
          }
        }
      }
      for (int64_t j = 0; j < nt; ++j) {
        // a token whose scores never beat -inf (all NaN or -inf) gets ids 0..k-1
        for (int64_t slot = 0; slot < k; ++slot) {
          const int64_t id = best[j * k + slot];
          ids_p[((t0 + j) * G + g) * k + slot] = id >= 0 ? id : slot;
        }
      }
    }
  }
  return ids;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_topk", &fused_topk, "fused similarity + running top-k over code tiles");
}
