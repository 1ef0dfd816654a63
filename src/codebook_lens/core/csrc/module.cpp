// The Python module of the compiled kernels (built by _native.py).

#include <torch/extension.h>

#include <mutex>
#include <set>

at::Tensor fused_topk(at::Tensor x, at::Tensor w, at::Tensor mul, at::Tensor add, at::Tensor tol_a,
                      at::Tensor tol_b, int64_t mode, bool zero_rule, int64_t k, int64_t tok_block,
                      int64_t code_block, int64_t simd);
int64_t simd_supported();
at::Tensor exact_scores(at::Tensor x, at::Tensor w, int64_t mode);
at::Tensor scatter_rows(at::Tensor flat, at::Tensor rows, at::Tensor weight, int64_t num_rows);

// How many threads one at::parallel_for of these kernels runs on: the intra-op thread
// count when they were compiled with OpenMP, 1 when not (its pragmas then do nothing).
int64_t parallel_threads() {
  std::mutex lock;
  std::set<int> seen;
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> hold(lock);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_topk", &fused_topk, "similarity + SIMD-filtered top-k over cached code tiles");
  m.def("simd_supported", &simd_supported, "0 scalar, 1 AVX2+FMA, 2 AVX-512 (this CPU)");
  m.def("exact_scores", &exact_scores, "the fixed-order float64 score of row pairs");
  m.def("scatter_rows", &scatter_rows, "out[flat[i, j]] += weight[i, j] * rows[i]");
  m.def("parallel_threads", &parallel_threads, "threads of one parallel loop of the kernels");
}
