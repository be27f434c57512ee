// Fused CPU kernels for the lwrs LARS / CLARS / TVLARS / mNAG step (float32 and float64).
//
// Two passes over the parameters, the minimum the algorithm allows:
//   1. layer_sums: for every layer k, sum w^2, sum g^2, sum d^2 and, for the "norm_of_sum" form, sum (g + lambda w)^2
//      (blocked dot products summed in float64, of the layer itself: never an expansion that cancels);
//   2. mnag_update: for every element, with s = r_k (g + lambda_k w),
//        d <- beta d - s;  w <- w - s + beta d   (Nesterov)   or   w <- w + d   (heavy ball),
//      in one read of w, g, d and one write of w, d. This is CLARS eq. (4) in the order of the core.
// The rates r_k are computed between the passes by the lwrs core, from the norms of pass 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;

template <typename scalar_t>
void update_range(scalar_t* __restrict__ w, const scalar_t* __restrict__ g, scalar_t* __restrict__ d,
                  int64_t begin, int64_t end, scalar_t rk, scalar_t lk, scalar_t b, bool nesterov) {
  if (nesterov) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t s = rk * (g[i] + lk * w[i]);
      const scalar_t dn = b * d[i] - s;
      d[i] = dn;
      w[i] = w[i] - s + b * dn;
    }
  } else {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t dn = b * d[i] - rk * (g[i] + lk * w[i]);
      d[i] = dn;
      w[i] = w[i] + dn;
    }
  }
}

void check(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), what, ": ", a.size(), " and ", b.size(), " layers");
  for (size_t k = 0; k < a.size(); ++k) {
    TORCH_CHECK(a[k].device().is_cpu() && b[k].device().is_cpu(), what, ": layer ", k, " is not on the CPU");
    TORCH_CHECK(a[k].is_contiguous() && b[k].is_contiguous(), what, ": layer ", k, " is not contiguous");
    TORCH_CHECK(a[k].scalar_type() == b[k].scalar_type(), what, ": layer ", k, " mixes dtypes");
    TORCH_CHECK(a[k].numel() == b[k].numel(), what, ": layer ", k, " has mismatched sizes");
  }
}

// sum(x^2) of one layer in float64: blocks of kBlock entries dotted in one batched BLAS product, their
// sums added in float64 (a single dot product accumulates sequentially: 3e-5 relative at 2.4M floats).
constexpr int64_t kBlock = 1 << 15;

double sq(const torch::Tensor& x) {
  const auto f = x.reshape({-1});
  const int64_t n = f.numel(), m = n / kBlock;
  double total = 0.0;
  if (m > 0) {
    const auto blocks = f.narrow(0, 0, m * kBlock).view({m, 1, kBlock});
    total = at::bmm(blocks, blocks.transpose(1, 2)).sum(torch::kFloat64).item<double>();
  }
  if (n > m * kBlock) {
    const auto rest = f.narrow(0, m * kBlock, n - m * kBlock);
    total += rest.dot(rest).item<double>();
  }
  return total;
}

// sum((g + lambda w)^2) of one layer: g + lambda w is formed a chunk at a time in a small buffer, with the
// core's rounding (lambda w, then + g), and its squares summed; never |g|^2 + 2 lambda <g, w> + lambda^2 |w|^2,
// which cancels near the weight-decay equilibrium g = -lambda w.
double decayed_sq(const torch::Tensor& w, const torch::Tensor& g, double lam) {
  const auto wf = w.reshape({-1}), gf = g.reshape({-1});
  const int64_t n = wf.numel();
  auto buf = torch::empty({std::min<int64_t>(n, kChunk)}, w.options());
  double total = 0.0;
  for (int64_t s = 0; s < n; s += kChunk) {
    const int64_t m = std::min(kChunk, n - s);
    auto part = buf.narrow(0, 0, m);
    at::mul_out(part, wf.narrow(0, s, m), lam);
    part.add_(gf.narrow(0, s, m));
    total += sq(part);
  }
  return total;
}

}  // namespace

// Returns a (K, 4) float64 tensor: for every layer sum w^2, sum g^2, sum d^2 (0 where d is empty) and
// sum (g + lambda w)^2 (0 where lambda is 0), one read of w and g per layer (plus d, and the decayed sum).
torch::Tensor layer_sums(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& gs,
                         const std::vector<torch::Tensor>& ds, const torch::Tensor& decays) {
  check(ws, gs, "layer_sums");
  const int64_t K = static_cast<int64_t>(ws.size());
  TORCH_CHECK(static_cast<int64_t>(ds.size()) == K && decays.numel() == K, "layer_sums: one buffer and decay per layer");
  auto l64 = decays.to(torch::kFloat64).contiguous();
  const double* lam = l64.data_ptr<double>();
  auto out = torch::zeros({K, 4}, torch::kFloat64);
  auto acc = out.accessor<double, 2>();
  for (int64_t k = 0; k < K; ++k) {
    acc[k][0] = sq(ws[k]);
    acc[k][1] = sq(gs[k]);
    acc[k][2] = ds[k].numel() ? sq(ds[k]) : 0.0;
    acc[k][3] = lam[k] != 0.0 ? decayed_sq(ws[k], gs[k], lam[k]) : 0.0;
  }
  return out;
}

// In place: d <- beta d - s, w <- w - s + beta d (or w + d), s = r_k (g + lambda_k w).
void mnag_update(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& gs,
                 const std::vector<torch::Tensor>& ds, const torch::Tensor& rates, const torch::Tensor& decays,
                 double beta, bool nesterov) {
  check(ws, gs, "mnag_update");
  check(ws, ds, "mnag_update");
  const int64_t K = static_cast<int64_t>(ws.size());
  TORCH_CHECK(rates.numel() == K && decays.numel() == K, "mnag_update: one rate and one decay per layer");
  auto r64 = rates.to(torch::kFloat64).contiguous();
  auto l64 = decays.to(torch::kFloat64).contiguous();
  const double* r = r64.data_ptr<double>();
  const double* lam = l64.data_ptr<double>();
  std::vector<int64_t> layer_of, start_of;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t s = 0; s < ws[k].numel(); s += kChunk) {
      layer_of.push_back(k);
      start_of.push_back(s);
    }
  }
  at::parallel_for(0, static_cast<int64_t>(layer_of.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t k = layer_of[t];
      const int64_t begin = start_of[t], end = std::min(ws[k].numel(), begin + kChunk);
      AT_DISPATCH_FLOATING_TYPES(ws[k].scalar_type(), "mnag_update", [&] {
        update_range<scalar_t>(ws[k].data_ptr<scalar_t>(), gs[k].data_ptr<scalar_t>(), ds[k].data_ptr<scalar_t>(),
                               begin, end, static_cast<scalar_t>(r[k]), static_cast<scalar_t>(lam[k]),
                               static_cast<scalar_t>(beta), nesterov);
      });
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_sums", &layer_sums, "sum w^2, g^2, d^2, (g + lambda w)^2 per layer (K, 4), float64");
  m.def("mnag_update", &mnag_update, "fused in-place mNAG update with per-layer rates");
}
