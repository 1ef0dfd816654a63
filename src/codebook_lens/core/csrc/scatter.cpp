// The codes' gradient on the CPU: out[flat[i, j]] += weight[i, j] * rows[i] for every row i
// and slot j, into an (num_rows, d) float32 output and nothing else (the sparse product
// it replaces holds a second copy of the output).
//
// Entries are bucketed by target row (a counting sort, in entry order), then each thread
// sums whole target rows, in that order: no atomics, and the same sums whatever the
// thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

at::Tensor scatter_rows(at::Tensor flat, at::Tensor rows, at::Tensor weight, int64_t num_rows) {
  TORCH_CHECK(flat.dim() == 2 && rows.dim() == 2 && flat.size(0) == rows.size(0),
              "flat must be (R, k) and rows (R, d)");
  TORCH_CHECK(flat.scalar_type() == at::kLong && rows.scalar_type() == at::kFloat,
              "flat must be int64 and rows float32");
  const bool weighted = weight.defined() && weight.numel() > 0;
  TORCH_CHECK(!weighted || (weight.sizes() == flat.sizes() && weight.scalar_type() == at::kFloat),
              "weight must be float32 of flat's shape");
  flat = flat.contiguous();
  rows = rows.contiguous();
  if (weighted) weight = weight.contiguous();
  const int64_t R = rows.size(0), d = rows.size(1), k = flat.size(1), E = R * k;
  const int64_t* fp = flat.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(fp[e] >= 0 && fp[e] < num_rows, "row index out of range");
  }
  std::vector<int64_t> start(num_rows + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++start[fp[e] + 1];
  for (int64_t r = 0; r < num_rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(E);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < E; ++e) order[fill[fp[e]]++] = e;
  }
  auto out = at::empty({num_rows, d}, rows.options());
  float* op = out.data_ptr<float>();
  const float* rp = rows.data_ptr<float>();
  const float* wp = weighted ? weight.data_ptr<float>() : nullptr;
  at::parallel_for(0, num_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* dst = op + r * d;
      std::fill(dst, dst + d, 0.0f);
      for (int64_t i = start[r]; i < start[r + 1]; ++i) {
        const int64_t e = order[i];
        const float* src = rp + (e / k) * d;
        if (wp == nullptr) {
          for (int64_t c = 0; c < d; ++c) dst[c] += src[c];
        } else {
          const float w = wp[e];
          for (int64_t c = 0; c < d; ++c) dst[c] += w * src[c];
        }
      }
    }
  });
  return out;
}
