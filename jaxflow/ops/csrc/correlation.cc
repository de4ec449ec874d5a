// Stride-1 cost volume (FlowNetC / PWC-Net correlation) for XLA:CPU, called through the XLA FFI.
//
// Semantics (jaxflow.ops.correlation with stride 1): for float32 f1, f2 of shape (..., H, W, C) (all leading
// axes are images) and a displacement radius n (K = 2n + 1),
//   out[b, y, x, i*K + j] = 1/C * sum_c f1[b, y, x, c] * f2[b, y + i - n, x + j - n, c],
// f2 being zero outside the image. The backward kernel takes the cotangent g (..., H, W, K*K) and returns
//   df1[b, y, x, c]   = 1/C * sum_{i,j} g[b, y, x, i*K + j] * f2[b, y + i - n, x + j - n, c]
//   df2[b, y', x', c] = 1/C * sum_{i,j} g[b, y' - i + n, x' - j + n, i*K + j] * f1[b, y' - i + n, x' - j + n, c].
//
// Method. Each row of an image is first copied into 8-pixel chunk windows: for chunk q (pixels 8q..8q+7) and
// channel c, the ww = roundup(8 + 2n, 8) values f[8q + t - n][c], t < ww (zero outside the image), so one
// block's data for all channels is contiguous. The product loops then run 8 pixels per vector with the K
// horizontal displacements (dx) of one vertical displacement (dy) in K (or ceil(K / 12)-sized groups of) vector
// accumulators: for every channel one vector of f1 (forward) or of g (backward, held in registers across the
// channels) meets K shifted, unaligned loads of the other map's window, one load per fused multiply-add. The
// forward writes its accumulators through 8 x 8 register transposes into the pixels' K*K-channel rows. The df2
// sum is the same loop on the (g, f1) pair with both displacement axes reversed, so nothing is scattered; the
// cotangent is kept channel-major (K*K, W + 2n) per row for it. Work is split over the rows of an image on
// XLA's intra-op thread pool (FFI ThreadPool context); images are processed one after another, so the scratch
// (malloc'd here, not in XLA's buffers) is per image: ~7 MB at PWC-Net's 96x128x32 level.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int kMaxGroup = 12;  // accumulators per block: 12 + 1 operand + 1 load stay within 16 vector registers

typedef float Vec __attribute__((vector_size(32)));
typedef float VecU __attribute__((vector_size(32), aligned(4), may_alias));

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }

// ---- thread pool helper -----------------------------------------------------------------------------------

struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  const std::function<void(int64_t)>* body = nullptr;  // valid until done == total
};

void Drain(ForState& s) {
  for (;;) {
    int64_t i = s.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= s.total) return;  // a task starting after the loop ended only touches the shared state
    (*s.body)(i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs body(0..total-1) on the caller and up to num_threads - 1 pool tasks; returns when all are done.
// Tasks may run late, in the caller's thread, or not in parallel at all: items are claimed from a counter,
// so the caller finishes whatever no helper has started.
void ParallelFor(ffi::ThreadPool& pool, int64_t total, const std::function<void(int64_t)>& body) {
  if (total <= 0) return;
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < total; ++i) body(i);
    return;
  }
  auto state = std::make_shared<ForState>();
  state->total = total;
  state->body = &body;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { Drain(*state); });
  Drain(*state);
  while (state->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// ---- inner blocks -------------------------------------------------------------------------------------------

#if defined(__AVX__)
// In-register transpose of an 8 x 8 block: r[l][j] <- r[j][l].
inline void Transpose8(Vec* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

// dst[c * ds + r] = scale * src[r * ss + c] for r < rows, c < cols (8 x 8 register blocks where possible).
void Transpose(const float* src, int64_t ss, float* dst, int64_t ds, int64_t rows, int64_t cols, float scale) {
  int64_t r0 = 0;
#if defined(__AVX__)
  const Vec sv = Vec{} + scale;
  for (; r0 + kLanes <= rows; r0 += kLanes) {
    int64_t c0 = 0;
    for (; c0 + kLanes <= cols; c0 += kLanes) {
      Vec t[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) t[l] = Load(src + (r0 + l) * ss + c0);
      Transpose8(t);
      for (int64_t l = 0; l < kLanes; ++l) Store(dst + (c0 + l) * ds + r0, t[l] * sv);
    }
    for (int64_t r = r0; r < r0 + kLanes; ++r) {
      for (int64_t c = c0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c] * scale;
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ds + r] = src[r * ss + c] * scale;
  }
}

// For j < J and pixel l < lanes: out[l * so + j] = sum_c a[c*sa + l] * b[c*sb + j + l]
// (forward: a = f1's channel-major row, b = f2's shifted row; out = the pixels' K*K-channel output rows).
template <int J>
void FwdBlock(const float* a, int64_t sa, const float* b, int64_t sb, int64_t channels, float* out, int64_t so,
              int64_t lanes) {
  Vec acc[J];
  for (int j = 0; j < J; ++j) acc[j] = Vec{};
  for (int64_t c = 0; c < channels; ++c) {
    const Vec av = Load(a + c * sa);
    const float* bc = b + c * sb;
    for (int j = 0; j < J; ++j) acc[j] += av * Load(bc + j);
  }
  int j0 = 0;
#if defined(__AVX__)
  for (; j0 + kLanes <= J; j0 += kLanes) {
    Vec t[kLanes];
    for (int l = 0; l < kLanes; ++l) t[l] = acc[j0 + l];
    Transpose8(t);
    for (int64_t l = 0; l < lanes; ++l) Store(out + l * so + j0, t[l]);
  }
#endif
  if (j0 < J) {
    alignas(32) float tile[J * kLanes];
    for (int j = j0; j < J; ++j) Store(tile + j * kLanes, acc[j]);
    for (int64_t l = 0; l < lanes; ++l) {
      for (int j = j0; j < J; ++j) out[l * so + j] = tile[j * kLanes + l];
    }
  }
}

// d[c*sd + 0..7] += sum_j gv[j] * b[c*sb + j + 0..7] for every channel c (backward: gv = cotangent vectors).
template <int J>
void BwdBlock(const Vec* gv_in, const float* b, int64_t sb, int64_t channels, float* d, int64_t sd) {
  Vec gv[J];
  for (int j = 0; j < J; ++j) gv[j] = gv_in[j];
  for (int64_t c = 0; c < channels; ++c) {
    const float* bc = b + c * sb;
    // Three independent partial sums: a single chain of J dependent FMAs per channel would be latency-bound.
    Vec part[3] = {Vec{}, Vec{}, Vec{}};
    for (int j = 0; j < J; ++j) part[j % 3] += gv[j] * Load(bc + j);
    Store(d + c * sd, Load(d + c * sd) + ((part[0] + part[1]) + part[2]));
  }
}

using FwdFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t);
using BwdFn = void (*)(const Vec*, const float*, int64_t, int64_t, float*, int64_t);

template <int... Js>
struct Tables {
  static constexpr FwdFn fwd[] = {nullptr, &FwdBlock<Js>...};
  static constexpr BwdFn bwd[] = {nullptr, &BwdBlock<Js>...};
};
using Table = Tables<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>;

// The K horizontal displacements in near-equal groups of at most kMaxGroup: (first j, size) pairs.
std::vector<std::pair<int64_t, int>> Groups(int64_t k) {
  int64_t count = (k + kMaxGroup - 1) / kMaxGroup;
  int64_t size = (k + count - 1) / count;
  std::vector<std::pair<int64_t, int>> out;
  for (int64_t j0 = 0; j0 < k; j0 += size) out.push_back({j0, static_cast<int>(std::min(size, k - j0))});
  return out;
}

// ---- shapes -----------------------------------------------------------------------------------------------

struct Shape {
  int64_t images = 1, h = 0, w = 0, c = 0;
  int64_t n = 0, k = 0, kk = 0, wpad = 0, p = 0;
  int64_t nq = 0, ww = 0;  // 8-pixel chunks per row; window width per chunk (8 + 2n rounded up to 8)
  int64_t win_row() const { return nq * c * ww; }  // floats per row of windows
};

ffi::Error ReadShape(ffi::Span<const int64_t> dims, int64_t n, Shape* s) {
  if (dims.size() < 4) {
    return ffi::Error::InvalidArgument("jaxflow correlation kernel: f1 must have rank >= 4 (..., H, W, C), got rank " +
                                       std::to_string(dims.size()));
  }
  if (n < 0) return ffi::Error::InvalidArgument("jaxflow correlation kernel: attribute n must be >= 0");
  size_t r = dims.size();
  for (size_t a = 0; a + 3 < r; ++a) s->images *= dims[a];
  s->h = dims[r - 3];
  s->w = dims[r - 2];
  s->c = dims[r - 1];
  s->n = n;
  s->k = 2 * n + 1;
  s->kk = s->k * s->k;
  s->wpad = (s->w + kLanes - 1) / kLanes * kLanes;
  s->nq = s->wpad / kLanes;
  s->ww = (kLanes + 2 * n + kLanes - 1) / kLanes * kLanes;
  s->p = s->wpad - kLanes + s->ww;  // >= wpad + 2n: every chunk's window lies inside a padded row
  return ffi::Error::Success();
}

bool SameDims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

bool IsVolumeOf(ffi::Span<const int64_t> vol, ffi::Span<const int64_t> feat, int64_t kk) {
  if (vol.size() != feat.size()) return false;
  for (size_t a = 0; a + 1 < vol.size(); ++a) {
    if (vol[a] != feat[a]) return false;
  }
  return vol[vol.size() - 1] == kk;
}

// Row y of one image (W, E) -> rows E x P of `dst` at column offset `off` (channel-major, zero pads untouched).
void TransposeRow(const float* src, int64_t w, int64_t e, float* dst, int64_t p, int64_t off, float scale = 1.0f) {
  Transpose(src, e, dst + off, p, w, e, scale);
}

// Row (W, C) of one image -> chunk windows dst[q][c][t] = scale * f[8q + t - off][c], t < ww (zero outside
// the row): the data of one 8-pixel block for all channels is contiguous, so the inner loops stream it.
void WindowRow(const float* src, int64_t w, int64_t c, int64_t off, int64_t ww, int64_t nq, int64_t p, float scale,
               float* dst) {
  thread_local std::vector<float> tmp;  // channel-major padded row (C, P)
  if (tmp.size() < static_cast<size_t>(c * p)) tmp.resize(static_cast<size_t>(c * p));
  for (int64_t ch = 0; ch < c; ++ch) {
    std::fill(tmp.data() + ch * p, tmp.data() + ch * p + off, 0.0f);
    std::fill(tmp.data() + ch * p + off + w, tmp.data() + (ch + 1) * p, 0.0f);
  }
  Transpose(src, c, tmp.data() + off, p, w, c, scale);
  for (int64_t q = 0; q < nq; ++q) {
    for (int64_t ch = 0; ch < c; ++ch) {
      std::memcpy(dst + (q * c + ch) * ww, tmp.data() + ch * p + q * kLanes, sizeof(float) * ww);
    }
  }
}

// ---- forward ----------------------------------------------------------------------------------------------

ffi::Error CorrelationFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> f1, ffi::Buffer<ffi::F32> f2,
                          ffi::ResultBuffer<ffi::F32> out, int64_t n) {
  Shape s;
  if (ffi::Error e = ReadShape(f1.dimensions(), n, &s); e.failure()) return e;
  if (!SameDims(f1.dimensions(), f2.dimensions())) {
    return ffi::Error::InvalidArgument("jaxflow correlation kernel: f1 and f2 must have the same shape");
  }
  if (!IsVolumeOf(out->dimensions(), f1.dimensions(), s.kk)) {
    return ffi::Error::InvalidArgument("jaxflow correlation kernel: output must be (..., H, W, K*K)");
  }
  const int64_t h = s.h, w = s.w, c = s.c, k = s.k, kk = s.kk, p = s.p, wpad = s.wpad, nq = s.nq, ww = s.ww;
  const int64_t row_floats = s.win_row();
  const float inv_c = c > 0 ? 1.0f / static_cast<float>(c) : 0.0f;
  const auto groups = Groups(k);
  std::vector<float> f2w(static_cast<size_t>(h * row_floats));  // f2's chunk windows, (H, nq, C, ww)

  for (int64_t b = 0; b < s.images; ++b) {
    const float* f1b = f1.typed_data() + b * h * w * c;
    const float* f2b = f2.typed_data() + b * h * w * c;
    float* outb = out->typed_data() + b * h * w * kk;
    ParallelFor(pool, h, [&](int64_t y) {
      WindowRow(f2b + y * w * c, w, c, s.n, ww, nq, p, 1.0f, f2w.data() + y * row_floats);
    });
    ParallelFor(pool, h, [&](int64_t y) {
      thread_local std::vector<float> f1c;  // f1's row in 8-pixel chunks (nq, C, 8), times 1/C (the mean)
      if (f1c.size() < static_cast<size_t>(nq * c * kLanes)) f1c.resize(static_cast<size_t>(nq * c * kLanes));
      WindowRow(f1b + y * w * c, w, c, 0, kLanes, nq, wpad, inv_c, f1c.data());
      float* row = outb + y * w * kk;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t yy = y + i - s.n;
        if (yy < 0 || yy >= h) {
          for (int64_t x = 0; x < w; ++x) std::memset(row + x * kk + i * k, 0, sizeof(float) * k);
          continue;
        }
        const float* src = f2w.data() + yy * row_floats;
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t x0 = q * kLanes, lanes = std::min(kLanes, w - x0);
          for (const auto& [j0, size] : groups) {
            Table::fwd[size](f1c.data() + q * c * kLanes, kLanes, src + q * c * ww + j0, ww, c,
                             row + x0 * kk + i * k + j0, kk, lanes);
          }
        }
      }
    });
  }
  return ffi::Error::Success();
}

// ---- backward ---------------------------------------------------------------------------------------------

ffi::Error CorrelationBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> f1, ffi::Buffer<ffi::F32> f2,
                          ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> df1,
                          ffi::ResultBuffer<ffi::F32> df2, int64_t n) {
  Shape s;
  if (ffi::Error e = ReadShape(f1.dimensions(), n, &s); e.failure()) return e;
  if (!SameDims(f1.dimensions(), f2.dimensions()) || !SameDims(f1.dimensions(), df1->dimensions()) ||
      !SameDims(f1.dimensions(), df2->dimensions())) {
    return ffi::Error::InvalidArgument("jaxflow correlation kernel: f1, f2, df1 and df2 must have the same shape");
  }
  if (!IsVolumeOf(g.dimensions(), f1.dimensions(), s.kk)) {
    return ffi::Error::InvalidArgument("jaxflow correlation kernel: the cotangent must be (..., H, W, K*K)");
  }
  const int64_t h = s.h, w = s.w, c = s.c, k = s.k, kk = s.kk, p = s.p, nn = s.n, nq = s.nq, ww = s.ww;
  const int64_t row_floats = s.win_row();
  const float inv_c = c > 0 ? 1.0f / static_cast<float>(c) : 0.0f;
  const auto groups = Groups(k);
  // One image at a time: f1's and f2's chunk windows (H, nq, C, ww), the cotangent channel-major (H, K*K, P)
  // with zero pads of n columns.
  std::vector<float> f1w(static_cast<size_t>(h * row_floats));
  std::vector<float> f2w(static_cast<size_t>(h * row_floats));
  std::vector<float> gt(static_cast<size_t>(h * kk * p), 0.0f);

  for (int64_t b = 0; b < s.images; ++b) {
    const int64_t off = b * h * w * c;
    const float* gb = g.typed_data() + b * h * w * kk;
    ParallelFor(pool, h, [&](int64_t y) {
      WindowRow(f1.typed_data() + off + y * w * c, w, c, nn, ww, nq, p, 1.0f, f1w.data() + y * row_floats);
      WindowRow(f2.typed_data() + off + y * w * c, w, c, nn, ww, nq, p, 1.0f, f2w.data() + y * row_floats);
      TransposeRow(gb + y * w * kk, w, kk, gt.data() + y * kk * p, p, nn);
    });
    float* d1b = df1->typed_data() + off;
    float* d2b = df2->typed_data() + off;
    ParallelFor(pool, h, [&](int64_t y) {
      thread_local std::vector<float> acc1, acc2;  // (nq, C, 8) each
      acc1.assign(static_cast<size_t>(nq * c * kLanes), 0.0f);
      acc2.assign(static_cast<size_t>(nq * c * kLanes), 0.0f);
      Vec gv[kMaxGroup];
      for (int64_t i = 0; i < k; ++i) {
        const int64_t yy = y + i - nn;  // df1: f2's row at dy = i - n
        if (yy >= 0 && yy < h) {
          const float* grow = gt.data() + y * kk * p;
          const float* src = f2w.data() + yy * row_floats;
          for (int64_t q = 0; q < nq; ++q) {
            for (const auto& [j0, size] : groups) {
              for (int jj = 0; jj < size; ++jj) gv[jj] = Load(grow + (i * k + j0 + jj) * p + nn + q * kLanes);
              Table::bwd[size](gv, src + q * c * ww + j0, ww, c, acc1.data() + q * c * kLanes, kLanes);
            }
          }
        }
        const int64_t ys = y + i - nn;  // df2: source row of the reversed displacement i' = i
        if (ys >= 0 && ys < h) {
          const float* grow = gt.data() + ys * kk * p;
          const float* src = f1w.data() + ys * row_floats;
          const int64_t gi = (k - 1 - i) * k;
          for (int64_t q = 0; q < nq; ++q) {
            for (const auto& [j0, size] : groups) {
              for (int jj = 0; jj < size; ++jj) {
                gv[jj] = Load(grow + (gi + k - 1 - j0 - jj) * p + q * kLanes + j0 + jj);
              }
              Table::bwd[size](gv, src + q * c * ww + j0, ww, c, acc2.data() + q * c * kLanes, kLanes);
            }
          }
        }
      }
      for (int64_t q = 0; q < nq; ++q) {
        const int64_t x0 = q * kLanes, lanes = std::min(kLanes, w - x0);
        Transpose(acc1.data() + q * c * kLanes, kLanes, d1b + (y * w + x0) * c, c, c, lanes, inv_c);
        Transpose(acc2.data() + q * c * kLanes, kLanes, d2b + (y * w + x0) * c, c, c, lanes, inv_c);
      }
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxflowCorrelationFwd, CorrelationFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxflowCorrelationBwd, CorrelationBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n"));
