// Fused CPU kernels for the lwrs LARS / CLARS / TVLARS / mNAG step (float32 and float64).
//
// Two passes over the parameters, the minimum the algorithm allows:
//   1. layer_sums: for every layer k, sum w^2, sum g^2, sum d^2 (where d is given) and, for the "norm_of_sum" form,
//      sum (g + lambda w)^2, in one pass over w, g and d (blocks summed in float64; never an expansion that cancels);
//   2. mnag_update: for every element, with s = r_k (g + lambda_k w),
//        d <- beta d - s;  w <- w - s + beta d   (Nesterov)   or   w <- w + d   (heavy ball),
//      in one read of w, g, d and one write of w, d. This is CLARS eq. (4) in the order of the core.
// The rates r_k are computed between the passes by the lwrs core, from the norms of pass 1.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
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
    TORCH_CHECK(a[k].scalar_type() == at::kFloat || a[k].scalar_type() == at::kDouble, what, ": layer ", k,
                " is neither float32 nor float64");
    TORCH_CHECK(a[k].is_contiguous() && b[k].is_contiguous(), what, ": layer ", k, " is not contiguous");
    TORCH_CHECK(a[k].scalar_type() == b[k].scalar_type(), what, ": layer ", k, " mixes dtypes");
    TORCH_CHECK(a[k].numel() == b[k].numel(), what, ": layer ", k, " has mismatched sizes");
  }
}

// The sums of squares of one range of a layer, in one pass over w, g (and d): over blocks of kSumBlock entries,
// kAcc vectors of 64 bytes per sum (32 float or 16 double lanes, 128 or 256 terms per lane), each block's lanes
// added in float64. Written with the compiler's vector types, so that every variant (with or without d and u)
// compiles to the same vector loop. u = g + lambda w is rounded as the core rounds it (lambda w, then + g; no
// fused multiply-add), and never expanded into terms that cancel.
constexpr int64_t kSumBlock = 1 << 12;
constexpr int kAcc = 2;

template <typename scalar_t, bool with_d, bool with_u>
void sums_range(const scalar_t* __restrict__ w, const scalar_t* __restrict__ g, const scalar_t* __restrict__ d,
                int64_t begin, int64_t end, scalar_t lam, double* out) {
  typedef scalar_t vec __attribute__((vector_size(64)));
  constexpr int kN = 64 / sizeof(scalar_t);
  const auto load = [](const scalar_t* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  };
  for (int64_t b = begin; b < end; b += kSumBlock) {
    const int64_t e = std::min(end, b + kSumBlock);
    vec aw[kAcc] = {}, ag[kAcc] = {}, ad[kAcc] = {}, au[kAcc] = {};
    int64_t i = b;
    for (; i + kAcc * kN <= e; i += kAcc * kN) {
      for (int a = 0; a < kAcc; ++a) {
        const vec wv = load(w + i + a * kN), gv = load(g + i + a * kN);
        aw[a] += wv * wv;
        ag[a] += gv * gv;
        if (with_d) {
          const vec dv = load(d + i + a * kN);
          ad[a] += dv * dv;
        }
        if (with_u) {
          const vec lw = lam * wv;
          const vec u = gv + lw;
          au[a] += u * u;
        }
      }
    }
    double sw = 0, sg = 0, sd = 0, su = 0;
    for (; i < e; ++i) {
      sw += static_cast<double>(w[i] * w[i]);
      sg += static_cast<double>(g[i] * g[i]);
      if (with_d) sd += static_cast<double>(d[i] * d[i]);
      if (with_u) {
        const scalar_t lw = lam * w[i];
        const scalar_t u = g[i] + lw;
        su += static_cast<double>(u * u);
      }
    }
    for (int a = 0; a < kAcc; ++a) {
      for (int j = 0; j < kN; ++j) {
        sw += aw[a][j];
        sg += ag[a][j];
        sd += ad[a][j];
        su += au[a][j];
      }
    }
    out[0] += sw;
    out[1] += sg;
    out[2] += sd;
    out[3] += su;
  }
}

template <typename scalar_t>
void sums_dispatch(const torch::Tensor& w, const torch::Tensor& g, const torch::Tensor& d, double lam, int64_t begin,
                   int64_t end, double* out) {
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* dp = d.numel() ? d.data_ptr<scalar_t>() : nullptr;
  const scalar_t l = static_cast<scalar_t>(lam);
  if (dp && lam != 0.0) sums_range<scalar_t, true, true>(wp, gp, dp, begin, end, l, out);
  else if (dp) sums_range<scalar_t, true, false>(wp, gp, dp, begin, end, l, out);
  else if (lam != 0.0) sums_range<scalar_t, false, true>(wp, gp, dp, begin, end, l, out);
  else sums_range<scalar_t, false, false>(wp, gp, dp, begin, end, l, out);
}

}  // namespace

// Returns a (K, 4) float64 tensor: for every layer sum w^2, sum g^2, sum d^2 (0 where d is empty) and
// sum (g + lambda w)^2 (0 where lambda is 0), in one pass over each layer's w, g and d, in chunks that run in
// parallel; each chunk's sums are added in a fixed order, so the result does not depend on the thread count.
torch::Tensor layer_sums(const std::vector<torch::Tensor>& ws, const std::vector<torch::Tensor>& gs,
                         const std::vector<torch::Tensor>& ds, const torch::Tensor& decays) {
  check(ws, gs, "layer_sums");
  const int64_t K = static_cast<int64_t>(ws.size());
  TORCH_CHECK(static_cast<int64_t>(ds.size()) == K && decays.numel() == K, "layer_sums: one buffer and decay per layer");
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(ds[k].numel() == 0 || (ds[k].numel() == ws[k].numel() && ds[k].is_contiguous() &&
                                       ds[k].scalar_type() == ws[k].scalar_type()), "layer_sums: buffer ", k);
  }
  auto l64 = decays.to(torch::kFloat64).contiguous();
  const double* lam = l64.data_ptr<double>();
  std::vector<int64_t> layer_of, start_of;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t s = 0; s < ws[k].numel(); s += kChunk) {
      layer_of.push_back(k);
      start_of.push_back(s);
    }
  }
  const int64_t T = static_cast<int64_t>(layer_of.size());
  std::vector<double> part(4 * T, 0.0);
  at::parallel_for(0, T, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t k = layer_of[t];
      const int64_t begin = start_of[t], end = std::min(ws[k].numel(), begin + kChunk);
      AT_DISPATCH_FLOATING_TYPES(ws[k].scalar_type(), "layer_sums", [&] {
        sums_dispatch<scalar_t>(ws[k], gs[k], ds[k], lam[k], begin, end, &part[4 * t]);
      });
    }
  });
  auto out = torch::zeros({K, 4}, torch::kFloat64);
  auto acc = out.accessor<double, 2>();
  for (int64_t t = 0; t < T; ++t) {
    for (int c = 0; c < 4; ++c) acc[layer_of[t]][c] += part[4 * t + c];
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
  // written through raw pointers: bump the version counters as an in-place op does, so that autograd refuses a
  // backward through a graph that saved the old weights (forward, step, backward), as it does after torch.optim
  for (int64_t k = 0; k < K; ++k) {
    torch::autograd::impl::bump_version(ws[k]);
    torch::autograd::impl::bump_version(ds[k]);
  }
}

// In place: every step count (a CPU tensor of one element) + 1, all checked before any changes; with the version
// bump of an in-place op, as for the weights and buffers above.
void increment(const std::vector<torch::Tensor>& counts) {
  for (size_t k = 0; k < counts.size(); ++k) {
    TORCH_CHECK(counts[k].device().is_cpu() && counts[k].numel() == 1, "increment: count ", k,
                " is not a CPU tensor of one element");
  }
  for (const auto& c : counts) {
    AT_DISPATCH_ALL_TYPES(c.scalar_type(), "increment", [&] { *c.data_ptr<scalar_t>() += 1; });
    torch::autograd::impl::bump_version(c);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_sums", &layer_sums, "sum w^2, g^2, d^2, (g + lambda w)^2 per layer (K, 4), float64");
  m.def("mnag_update", &mnag_update, "fused in-place mNAG update with per-layer rates");
  m.def("increment", &increment, "every step count + 1, in place");
}
