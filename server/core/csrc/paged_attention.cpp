// Decode attention over KV-pool rows, reading each row's keys and values where they lie, through its block table.
//
// The engine's decode step without this kernel gathers every row's history out of the pool into a padded copy
// per layer (index_select) and runs SDPA over the copy: the batch's keys and values cross memory three times.
// Here each row is one task: its query heads score every position it attends, in place (a query head reads
// its group's KV head: grouped heads are never expanded), then sum the values with the softmax weights.
// float32 only; built with fast-math (vectorized sums and glibc's vector exp), so results differ from SDPA's
// in the last bits. Keys and values are finite (they come out of the model's projections): no infinities.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                           const torch::Tensor& table, const torch::Tensor& lengths, int64_t block_size,
                           int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [rows, heads, head_dim] tensor");
  TORCH_CHECK(k_pool.dim() == 3 && k_pool.scalar_type() == torch::kFloat && k_pool.is_contiguous() &&
                  v_pool.sizes() == k_pool.sizes() && v_pool.scalar_type() == torch::kFloat && v_pool.is_contiguous(),
              "the pools must be contiguous float32 [slots, kv_heads, head_dim] tensors of one shape");
  TORCH_CHECK(table.dim() == 2 && table.scalar_type() == torch::kLong && table.is_contiguous() &&
                  lengths.dim() == 1 && lengths.scalar_type() == torch::kLong && lengths.size(0) == q.size(0),
              "table must be int64 [rows, blocks] and lengths int64 [rows]");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), slots = k_pool.size(0), nblocks = table.size(1);
  TORCH_CHECK(k_pool.size(2) == dim && heads % kv_heads == 0, "head sizes or head counts do not match");
  const int64_t group = heads / kv_heads, slot_stride = kv_heads * dim;
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_pool.data_ptr<float>();
  const float* vp = v_pool.data_ptr<float>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // One task per row: each slot's keys (all KV heads, one contiguous run) are read once for every query head,
  // so a cache line crosses memory once per step however many heads share it.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> where;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t len = std::min(lp[row], nblocks * block_size);
      if (len <= 0) continue;  // a padding row: its output stays zero
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      where.resize(n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = start + i;
        const int64_t slot = tp[row * nblocks + p / block_size] * block_size + p % block_size;
        TORCH_CHECK(slot >= 0 && slot < slots, "a block table points outside the pool");
        where[i] = slot * slot_stride;
      }
      scores.assign(heads * n, 0.f);  // [heads, n]
      const float* qrow = qp + row * heads * dim;
      for (int64_t i = 0; i < n; ++i) {
        const float* k_slot = kp + where[i];
        for (int64_t h = 0; h < heads; ++h) {
          const float* k = k_slot + (h / group) * dim;
          const float* qq = qrow + h * dim;
          float acc = 0.f;
          for (int64_t d = 0; d < dim; ++d) acc += qq[d] * k[d];
          scores[h * n + i] = acc * fscale;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* s = scores.data() + h * n;
        float top = std::numeric_limits<float>::lowest();  // built with finite-math: no infinities
        for (int64_t i = 0; i < n; ++i) top = std::max(top, s[i]);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - top);
          sum += s[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < n; ++i) s[i] *= inv;
      }
      float* orow = op + row * heads * dim;
      for (int64_t i = 0; i < n; ++i) {
        const float* v_slot = vp + where[i];
        for (int64_t h = 0; h < heads; ++h) {
          const float* v = v_slot + (h / group) * dim;
          const float w = scores[h * n + i];
          float* o = orow + h * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] += w * v[d];
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode,
        "Decode attention [rows, heads, head_dim] over pool rows, through their block tables, with GQA groups");
}
