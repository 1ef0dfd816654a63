// Nearest-code search on the CPU, fused with the similarity product.
//
// Work items are (group, block of tokens[, part of the codes]); each thread takes items
// and, per block of codes, computes the score tile (codes x tokens) with a
// single-threaded BLAS call into a buffer that stays in its L2 cache, then scans the tile
// at once with a SIMD filter against each token's running threshold, so that most scores
// cost one compare and the token x code score matrix is never written to memory.
//
// Result rule (shared with the PyTorch path, rescore.py): the k codes of highest
// float64 score, ties to the lower id, where the float64 score is evaluated in a fixed
// order (products in float64, pairwise sum over the width padded to a power of two).
// The float32 scan keeps every code whose float32 score is within `tol` (twice a bound
// on the float32 error) of the running k-th best, so it never drops a code of the true
// top k; codes whose float32 ranks are closer than `tol` are rescored in float64. The
// result is thus independent of tiles, threads, SIMD level and BLAS.
//
// The SIMD variants are compiled side by side with per-function target attributes and
// chosen at run time by the caller (see cpu_simd); the file is built without -march.
//
// x: (N, G, d) float32, w: (G, C, d) float32 (the codebooks as stored),
// mul, add: (G, C) float32: the float32 score is fma(<x, w_c>, mul_c, add_c);
// tol_a, tol_b: (G,) float64: a token's tolerance is tol_a * |x| + tol_b;
// mode: 0 inner product, 1 cosine, 2 euclidean (for the float64 score);
// zero_rule: a token with x = 0 gets ids 0..k-1 (all its scores are exactly 0).
// Returns (N, G, k) int64 ids, best first.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

extern "C" {
// The Fortran BLAS entry point of the library libtorch links (MKL or OpenBLAS). Weak, so
// that a libtorch without it leaves it null and the tile is computed with at::mm_out.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (weak: absent from other BLAS libraries). Inside the
// kernel's own parallel loop each BLAS call must run on its calling thread alone.
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace {

constexpr int64_t kScalar = 0, kAvx2 = 1, kAvx512 = 2;
constexpr int64_t kInner = 0, kCosine = 1, kEuclidean = 2;
constexpr uint8_t kNormal = 0, kPlain = 1, kZero = 2;
constexpr int64_t kPad = 16;  // tile rows are padded to whole 16-lane vectors
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t cpu_simd() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kScalar;
}

// ---- the fixed-order float64 score -------------------------------------------------------

double tree_sum(double* p, int64_t width) {  // width: a power of two
  for (int64_t h = width / 2; h >= 1; h /= 2) {
    for (int64_t i = 0; i < h; ++i) p[i] = p[i] + p[i + h];
  }
  return p[0];
}

double exact_score(const float* x, const float* w, int64_t d, int64_t width, int64_t mode,
                   double* p) {
  for (int64_t i = 0; i < d; ++i) p[i] = double(x[i]) * double(w[i]);
  for (int64_t i = d; i < width; ++i) p[i] = 0.0;
  const double dot = tree_sum(p, width);
  if (mode == kInner) return dot;
  for (int64_t i = 0; i < d; ++i) p[i] = double(w[i]) * double(w[i]);
  for (int64_t i = d; i < width; ++i) p[i] = 0.0;
  const double sq = tree_sum(p, width);
  // cosine ranked as sign(dot) dot^2 / |w|^2: no square root (libraries round it differently)
  if (mode == kCosine) return dot * std::fabs(dot) / std::max(sq, 1e-24);
  return 2.0 * dot - sq;
}

int64_t pow2_at_least(int64_t d) {
  int64_t w = 1;
  while (w < d) w *= 2;
  return w;
}

// ---- per-token candidates ------------------------------------------------------------------

struct Cand {
  float s;      // float32 score
  int32_t id;   // code id within the group
  double e;     // float64 score, once computed
  bool scored;  // whether e holds it
};

// The candidates of one block of tokens of one group.
struct Block {
  const float* x = nullptr;  // row of token j: x + j * ldx
  int64_t ldx = 0;
  const float* w = nullptr;  // code c of this group: w + c * d
  int64_t d = 0, width = 0, mode = 0, k = 0, cap = 0, nt = 0;
  std::vector<float> thr;    // admission threshold per token (+inf on padding lanes)
  std::vector<double> tol;
  std::vector<uint8_t> kind;
  std::vector<int32_t> count;
  std::vector<Cand> cand;    // cap per token, sorted by s descending
  std::vector<double> scratch;
  std::vector<int32_t> order, cluster;

  void reset(const float* x_, int64_t ldx_, const float* w_, int64_t d_, int64_t mode_,
             int64_t k_, int64_t cap_, int64_t nt_, int64_t ldt, double tol_a, double tol_b,
             bool zero_rule) {
    x = x_;
    ldx = ldx_;
    w = w_;
    d = d_;
    width = pow2_at_least(d_);
    mode = mode_;
    k = k_;
    cap = cap_;
    nt = nt_;
    thr.assign(ldt, kInf);
    tol.assign(nt, 0.0);
    kind.assign(nt, kNormal);
    count.assign(nt, 0);
    cand.resize(nt * cap);
    scratch.resize(width);
    for (int64_t j = 0; j < nt; ++j) {
      const float* row = x + j * ldx;
      double sq = 0.0;
      for (int64_t i = 0; i < d; ++i) sq += double(row[i]) * double(row[i]);
      const double norm = std::sqrt(sq);
      const double t = tol_a * norm + tol_b;
      if (!std::isfinite(t)) {
        kind[j] = kPlain;  // non-finite input: the float32 ranking, nothing promised
        thr[j] = -kInf;
      } else if (zero_rule && norm == 0.0) {
        kind[j] = kZero;
      } else {
        tol[j] = t;
        thr[j] = -kInf;
      }
    }
  }

  double score(int64_t j, int32_t id) {
    return exact_score(x + j * ldx, w + int64_t(id) * d, d, width, mode, scratch.data());
  }

  void ensure(int64_t j, Cand& c) {
    if (!c.scored) {
      c.e = score(j, c.id);
      c.scored = true;
    }
  }

  static float lower(float kth, double tol) {  // float32 at most kth - tol
    const double t = double(kth) - tol;
    float f = float(t);
    if (double(f) > t) f = std::nextafter(f, -kInf);
    return f;
  }

  // Keep the k best by the float64 score (ties: lower id): the others can never be in
  // the top k, since k codes are known to beat them.
  void compact(int64_t j) {
    Cand* b = cand.data() + j * cap;
    const int32_t n = count[j];
    for (int32_t i = 0; i < n; ++i) ensure(j, b[i]);
    std::sort(b, b + n, [](const Cand& u, const Cand& v) {
      return u.e > v.e || (u.e == v.e && u.id < v.id);
    });
    std::sort(b, b + k, [](const Cand& u, const Cand& v) {
      return u.s > v.s || (u.s == v.s && u.id < v.id);
    });
    count[j] = int32_t(k);
    thr[j] = lower(b[k - 1].s, tol[j]);
  }

  void admit(int64_t j, float s, int32_t id) {
    if (!(s >= thr[j]) || kind[j] == kZero) return;
    Cand* b = cand.data() + j * cap;
    int32_t n = count[j];
    if (kind[j] == kPlain) {
      if (n == k) n = int32_t(k - 1);  // s beats the k-th (thr is just above it)
    } else if (n == cap) {
      compact(j);
      n = count[j];
      if (!(s >= thr[j])) return;
    }
    int32_t p = n;
    while (p > 0 && b[p - 1].s < s) {
      b[p] = b[p - 1];
      --p;
    }
    b[p] = Cand{s, id, 0.0, false};
    ++n;
    if (n >= k) {
      if (kind[j] == kPlain) {
        thr[j] = std::nextafter(b[k - 1].s, kInf);
      } else {
        thr[j] = lower(b[k - 1].s, tol[j]);
        while (n > k && b[n - 1].s < thr[j]) --n;
      }
    }
    count[j] = n;
  }

  // The k ids of token j, best first.
  void finish(int64_t j, int64_t* out) {
    const Cand* b = cand.data() + j * cap;
    int32_t n = count[j];
    int64_t filled = 0;
    if (kind[j] == kZero) {
      for (int64_t i = 0; i < k; ++i) out[i] = i;
      return;
    }
    if (kind[j] == kPlain || n == 0) {
      for (; filled < std::min<int64_t>(n, k); ++filled) out[filled] = b[filled].id;
    } else {
      // clusters: runs of candidates whose float32 scores are within tol of the next
      Cand* c = cand.data() + j * cap;
      cluster.resize(n);
      cluster[0] = 0;
      for (int32_t i = 1; i < n; ++i) {
        cluster[i] = cluster[i - 1] + (double(c[i - 1].s) - double(c[i].s) > tol[j] ? 1 : 0);
      }
      const int32_t m = int32_t(std::min<int64_t>(n, k));
      const int32_t last = cluster[m - 1];
      int32_t end = n;
      for (int32_t i = m; i < n; ++i) {
        if (cluster[i] > last) {
          end = i;
          break;
        }
      }
      for (int32_t i = 0; i < end; ++i) {
        const bool multi = (i > 0 && cluster[i - 1] == cluster[i]) ||
                           (i + 1 < n && cluster[i + 1] == cluster[i]);
        if (multi) ensure(j, c[i]);
      }
      order.resize(end);
      std::iota(order.begin(), order.end(), 0);
      const std::vector<int32_t>& cl = cluster;
      std::sort(order.begin(), order.end(), [&](int32_t u, int32_t v) {
        if (cl[u] != cl[v]) return cl[u] < cl[v];
        if (c[u].e != c[v].e) return c[u].e > c[v].e;  // both scored: same cluster
        return c[u].id < c[v].id;
      });
      for (; filled < m; ++filled) out[filled] = c[order[filled]].id;
    }
    // fewer than k finite scores: the lowest unused ids
    for (int64_t id = 0; filled < k; ++id) {
      if (std::find(out, out + filled, id) == out + filled) out[filled++] = id;
    }
  }
};

// ---- the scan of one tile (codes x tokens, row stride ldt) -----------------------------

void scan_scalar(Block& st, const float* tile, int64_t ldt, int64_t nc, int32_t c0,
                 const float* mul, const float* add) {
  float* thr = st.thr.data();
  for (int64_t c = 0; c < nc; ++c) {
    const float* row = tile + c * ldt;
    const float m = mul[c], a = add[c];
    for (int64_t j = 0; j < st.nt; ++j) {
      const float s = row[j] * m + a;
      if (s >= thr[j]) st.admit(j, s, c0 + int32_t(c));
    }
  }
}

// (lambdas do not inherit a target attribute, so the lane handlers are functions)
// the scores of code ``id`` for the tokens ``j0 + b`` whose bit b is set in ``mask``
void admit_lanes(Block& st, const float* lane, unsigned mask, int64_t j0, int32_t id) {
  while (mask) {
    const int b = __builtin_ctz(mask);
    mask &= mask - 1;
    st.admit(j0 + b, lane[b], id);
  }
}

__attribute__((target("avx2,fma"))) void admit_lanes8(Block& st, __m256 v, int mask,
                                                      int64_t j0, int32_t id) {
  alignas(32) float lane[8];
  _mm256_store_ps(lane, v);
  admit_lanes(st, lane, unsigned(mask), j0, id);
}

__attribute__((target("avx2,fma"))) void scan_avx2(Block& st, const float* tile, int64_t ldt,
                                                   int64_t nc, int32_t c0, const float* mul,
                                                   const float* add) {
  const float* thr = st.thr.data();
  for (int64_t j0 = 0; j0 < st.nt; j0 += 8) {
    const int rest = int(std::min<int64_t>(8, st.nt - j0));
    const int valid = (1 << rest) - 1;
    __m256 t = _mm256_loadu_ps(thr + j0);
    const float* col = tile + j0;
    int64_t c = 0;
    for (; c + 4 <= nc; c += 4) {
      const __m256 v0 = _mm256_fmadd_ps(_mm256_loadu_ps(col + (c + 0) * ldt),
                                        _mm256_set1_ps(mul[c + 0]), _mm256_set1_ps(add[c + 0]));
      const __m256 v1 = _mm256_fmadd_ps(_mm256_loadu_ps(col + (c + 1) * ldt),
                                        _mm256_set1_ps(mul[c + 1]), _mm256_set1_ps(add[c + 1]));
      const __m256 v2 = _mm256_fmadd_ps(_mm256_loadu_ps(col + (c + 2) * ldt),
                                        _mm256_set1_ps(mul[c + 2]), _mm256_set1_ps(add[c + 2]));
      const __m256 v3 = _mm256_fmadd_ps(_mm256_loadu_ps(col + (c + 3) * ldt),
                                        _mm256_set1_ps(mul[c + 3]), _mm256_set1_ps(add[c + 3]));
      const __m256 any = _mm256_or_ps(
          _mm256_or_ps(_mm256_cmp_ps(v0, t, _CMP_GE_OQ), _mm256_cmp_ps(v1, t, _CMP_GE_OQ)),
          _mm256_or_ps(_mm256_cmp_ps(v2, t, _CMP_GE_OQ), _mm256_cmp_ps(v3, t, _CMP_GE_OQ)));
      if ((_mm256_movemask_ps(any) & valid) == 0) continue;
      // in code order, each against the threshold its predecessors left
      const __m256 vs[4] = {v0, v1, v2, v3};
      for (int u = 0; u < 4; ++u) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(vs[u], t, _CMP_GE_OQ)) & valid;
        if (mask) {
          admit_lanes8(st, vs[u], mask, j0, c0 + int32_t(c + u));
          t = _mm256_loadu_ps(thr + j0);
        }
      }
    }
    for (; c < nc; ++c) {
      const __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(col + c * ldt), _mm256_set1_ps(mul[c]),
                                       _mm256_set1_ps(add[c]));
      const int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_GE_OQ)) & valid;
      if (mask) {
        admit_lanes8(st, v, mask, j0, c0 + int32_t(c));
        t = _mm256_loadu_ps(thr + j0);
      }
    }
  }
}

__attribute__((target("avx512f"))) void admit_lanes16(Block& st, __m512 v, unsigned mask,
                                                       int64_t j0, int32_t id) {
  alignas(64) float lane[16];
  _mm512_store_ps(lane, v);
  admit_lanes(st, lane, mask, j0, id);
}

__attribute__((target("avx512f"))) void scan_avx512(Block& st, const float* tile, int64_t ldt,
                                                    int64_t nc, int32_t c0, const float* mul,
                                                    const float* add) {
  const float* thr = st.thr.data();
  for (int64_t j0 = 0; j0 < st.nt; j0 += 16) {
    const int64_t rest = std::min<int64_t>(16, st.nt - j0);
    const __mmask16 valid = __mmask16((1u << rest) - 1);
    __m512 t = _mm512_loadu_ps(thr + j0);
    const float* col = tile + j0;
    int64_t c = 0;
    for (; c + 4 <= nc; c += 4) {
      const __m512 v0 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (c + 0) * ldt),
                                        _mm512_set1_ps(mul[c + 0]), _mm512_set1_ps(add[c + 0]));
      const __m512 v1 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (c + 1) * ldt),
                                        _mm512_set1_ps(mul[c + 1]), _mm512_set1_ps(add[c + 1]));
      const __m512 v2 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (c + 2) * ldt),
                                        _mm512_set1_ps(mul[c + 2]), _mm512_set1_ps(add[c + 2]));
      const __m512 v3 = _mm512_fmadd_ps(_mm512_loadu_ps(col + (c + 3) * ldt),
                                        _mm512_set1_ps(mul[c + 3]), _mm512_set1_ps(add[c + 3]));
      const __mmask16 m0 = _mm512_mask_cmp_ps_mask(valid, v0, t, _CMP_GE_OQ);
      const __mmask16 m1 = _mm512_mask_cmp_ps_mask(valid, v1, t, _CMP_GE_OQ);
      const __mmask16 m2 = _mm512_mask_cmp_ps_mask(valid, v2, t, _CMP_GE_OQ);
      const __mmask16 m3 = _mm512_mask_cmp_ps_mask(valid, v3, t, _CMP_GE_OQ);
      if ((m0 | m1 | m2 | m3) == 0) continue;
      // in code order, each against the threshold its predecessors left
      const __m512 vs[4] = {v0, v1, v2, v3};
      for (int u = 0; u < 4; ++u) {
        const __mmask16 mask = _mm512_mask_cmp_ps_mask(valid, vs[u], t, _CMP_GE_OQ);
        if (mask) {
          admit_lanes16(st, vs[u], mask, j0, c0 + int32_t(c + u));
          t = _mm512_loadu_ps(thr + j0);
        }
      }
    }
    for (; c < nc; ++c) {
      const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(col + c * ldt), _mm512_set1_ps(mul[c]),
                                       _mm512_set1_ps(add[c]));
      const __mmask16 mask = _mm512_mask_cmp_ps_mask(valid, v, t, _CMP_GE_OQ);
      if (mask) {
        admit_lanes16(st, v, mask, j0, c0 + int32_t(c));
        t = _mm512_loadu_ps(thr + j0);
      }
    }
  }
}

// tile (codes c0..c0+nc) x (tokens of the block), row stride ldt
void score_tile(float* tile, int64_t ldt, const float* xb, int64_t ldx, const float* wb,
                int64_t nt, int64_t nc, int64_t d) {
  if (sgemm_ != nullptr) {
    // column-major view: tile (nt x nc, ld ldt) = xb^T (nt x d) * wb (d x nc)
    const char ta = 'T', tb = 'N';
    const int m = int(nt), n = int(nc), kk = int(d), lda = int(ldx), ldb = int(d),
              ldc = int(ldt);
    const float one = 1.0f, zero = 0.0f;
    sgemm_(&ta, &tb, &m, &n, &kk, &one, xb, &lda, wb, &ldb, &zero, tile, &ldc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto out = at::from_blob(tile, {nc, nt}, {ldt, 1}, opts);
  auto keys = at::from_blob(const_cast<float*>(wb), {nc, d}, {d, 1}, opts);
  auto xt = at::from_blob(const_cast<float*>(xb), {d, nt}, {1, ldx}, opts);
  at::mm_out(out, keys, xt);
}

// While alive, BLAS calls on this thread use this thread only.
struct OneBlasThread {
  int previous = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
};

// Run fn(item, block state, tile) for items 0..count-1 on the intra-op threads. Items are
// handed out one at a time (an atomic counter), so a thread that the OS pauses on a busy
// machine does not hold up a fixed share of them.
template <typename Fn>
void for_each_item(int64_t count, int64_t threads, const Fn& fn, int64_t tile_floats) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, count), 1, [&](int64_t, int64_t) {
    OneBlasThread one;
    Block st;
    std::vector<float> tile(tile_floats);
    for (int64_t item = next++; item < count; item = next++) fn(item, st, tile);
  });
}

}  // namespace

int64_t simd_supported() { return cpu_simd(); }

at::Tensor fused_topk(at::Tensor x, at::Tensor w, at::Tensor mul, at::Tensor add,
                         at::Tensor tol_a, at::Tensor tol_b, int64_t mode, bool zero_rule,
                         int64_t k, int64_t tok_block, int64_t code_block, int64_t simd) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3, "x must be (N, G, d) and w (G, C, d)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "x and w must be contiguous");
  const int64_t N = x.size(0), G = x.size(1), d = x.size(2), C = w.size(1);
  TORCH_CHECK(w.size(0) == G && w.size(2) == d, "x and w do not match");
  TORCH_CHECK(k >= 1 && k <= C, "k out of range");
  TORCH_CHECK(C < (int64_t(1) << 31), "too many codes");
  TORCH_CHECK(mul.numel() == G * C && add.numel() == G * C && mul.is_contiguous() &&
                  add.is_contiguous() && mul.scalar_type() == at::kFloat &&
                  add.scalar_type() == at::kFloat,
              "mul and add must be contiguous (G, C) float32");
  TORCH_CHECK(tol_a.numel() == G && tol_b.numel() == G &&
                  tol_a.scalar_type() == at::kDouble && tol_b.scalar_type() == at::kDouble,
              "tol_a and tol_b must be (G,) float64");
  TORCH_CHECK(simd <= cpu_simd(), "SIMD level not supported by this CPU");
  auto ids = at::empty({N, G, k}, x.options().dtype(at::kLong));
  if (N == 0) return ids;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* mulp = mul.data_ptr<float>();
  const float* addp = add.data_ptr<float>();
  auto tol_ac = tol_a.contiguous(), tol_bc = tol_b.contiguous();
  const double* tap = tol_ac.data_ptr<double>();
  const double* tbp = tol_bc.data_ptr<double>();
  int64_t* idp = ids.data_ptr<int64_t>();

  const int64_t tb = std::max<int64_t>(1, std::min(tok_block, N));
  const int64_t cb = std::max<int64_t>(1, std::min(code_block, C));
  const int64_t ldt = (tb + kPad - 1) / kPad * kPad;
  const int64_t cap = 2 * k + 16;  // candidates held per token before a float64 compaction
  const int64_t n_tb = (N + tb - 1) / tb;
  const int64_t n_cb = (C + cb - 1) / cb;
  const int64_t blocks = G * n_tb;
  // few blocks of tokens (small N): split the codes too, so that every thread has work
  const int64_t threads = at::get_num_threads();
  const int64_t parts =
      blocks >= 2 * threads ? 1 : std::min(n_cb, (2 * threads + blocks - 1) / blocks);
  const int64_t ldx = G * d;

  auto scan = simd == kAvx512 ? scan_avx512 : simd == kAvx2 ? scan_avx2 : scan_scalar;

  // one (group, token block, part of the codes) item: scan its codes into st
  auto run_item = [&](Block& st, std::vector<float>& tile, int64_t g, int64_t t0, int64_t nt,
                      int64_t part) {
    const float* wg = wp + g * C * d;
    st.reset(xp + t0 * ldx + g * d, ldx, wg, d, mode, k, cap, nt, (nt + kPad - 1) / kPad * kPad,
             tap[g], tbp[g], zero_rule);
    const int64_t ld = (nt + kPad - 1) / kPad * kPad;
    const int64_t b0 = part * n_cb / parts, b1 = (part + 1) * n_cb / parts;
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t c0 = bi * cb, nc = std::min(cb, C - c0);
      score_tile(tile.data(), ld, st.x, ldx, wg + c0 * d, nt, nc, d);
      scan(st, tile.data(), ld, nc, int32_t(c0), mulp + g * C + c0, addp + g * C + c0);
    }
  };

  if (parts == 1) {
    for_each_item(blocks, threads, [&](int64_t item, Block& st, std::vector<float>& tile) {
      const int64_t g = item / n_tb, t0 = (item % n_tb) * tb, nt = std::min(tb, N - t0);
      run_item(st, tile, g, t0, nt, 0);
      for (int64_t j = 0; j < nt; ++j) st.finish(j, idp + ((t0 + j) * G + g) * k);
    }, cb * ldt);
    return ids;
  }
  // parts > 1: each part keeps its candidates, then the parts of a block are merged
  std::vector<Cand> kept(blocks * parts * tb * cap);
  std::vector<int32_t> kept_n(blocks * parts * tb, 0);
  for_each_item(blocks * parts, threads, [&](int64_t item, Block& st, std::vector<float>& tile) {
    const int64_t block = item / parts, part = item % parts;
    const int64_t g = block / n_tb, t0 = (block % n_tb) * tb, nt = std::min(tb, N - t0);
    run_item(st, tile, g, t0, nt, part);
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t slot = item * tb + j;
      kept_n[slot] = st.count[j];
      std::copy(st.cand.begin() + j * cap, st.cand.begin() + j * cap + st.count[j],
                kept.begin() + slot * cap);
    }
  }, cb * ldt);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Block st;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t g = block / n_tb, t0 = (block % n_tb) * tb, nt = std::min(tb, N - t0);
      st.reset(xp + t0 * ldx + g * d, ldx, wp + g * C * d, d, mode, k, cap, nt,
               (nt + kPad - 1) / kPad * kPad, tap[g], tbp[g], zero_rule);
      for (int64_t part = 0; part < parts; ++part) {
        for (int64_t j = 0; j < nt; ++j) {
          const int64_t slot = (block * parts + part) * tb + j;
          for (int32_t i = 0; i < kept_n[slot]; ++i) {
            const Cand& c = kept[slot * cap + i];
            st.admit(j, c.s, c.id);
          }
        }
      }
      for (int64_t j = 0; j < nt; ++j) st.finish(j, idp + ((t0 + j) * G + g) * k);
    }
  });
  return ids;
}

// The fixed-order float64 scores of row pairs (x[i], w[i]), for the tests to compare with
// the PyTorch path's: x, w: (R, d) float32.
at::Tensor exact_scores(at::Tensor x, at::Tensor w, int64_t mode) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == w.sizes(), "x and w must be (R, d) alike");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "float32 only");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t R = x.size(0), d = x.size(1), width = pow2_at_least(d);
  auto out = at::empty({R}, x.options().dtype(at::kDouble));
  std::vector<double> p(width);
  for (int64_t r = 0; r < R; ++r) {
    out.data_ptr<double>()[r] = exact_score(x.data_ptr<float>() + r * d,
                                            w.data_ptr<float>() + r * d, d, width, mode, p.data());
  }
  return out;
}
