// Optim4RL's coordinate-wise network as one fused CPU kernel (an XLA FFI custom call).
//
// The same computation as Optim4RL._network in gru_optimizers.py (both GRUs, both heads and the
// update rule) for every coordinate, but in one pass: each tile of 16 coordinates is loaded once,
// its whole network runs in SIMD registers and a small stack buffer, and only the update and
// the two new hidden states are written back. XLA runs the same network as ~20 separate
// kernels that stream [features, N] activations through memory between them.
//
// Layout (feature-major, as in nets.py): g [B, N], hidden_m and hidden_v [B, H, N], outputs
// the same. phi is one flat float32 vector (packed by native/__init__.py, in this order):
//   gru_m: wi [I, 3H], wh [H, 3H], b [3H], bhn [H]       (I = 2 for sign_log inputs, 1 for raw)
//   head_m: dense0 (w [H, D1], b [D1]), dense1 (w [D1, D2], b [D2]), dense2 (w [D2, 1], b [1])
//           (a linear head, D1 = D2 = 0, is dense0 (w [H, 1], b [1]) alone)
//   gru_v: wi [1, 3H], wh, b, bhn;  head_v: as head_m.
// Built by native/__init__.py with the machine's C++ compiler; see docs/DESIGN.md.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#ifdef __linux__
#include <sched.h>
#endif

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Everything below runs on 16-lane vectors held in registers: it must all be inlined (a call
// would pass them through memory).
#define O4R_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

O4R_INLINE vf splat(float x) { return vf{} + x; }
O4R_INLINE vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
O4R_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
O4R_INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }
O4R_INLINE vf as_float(vi x) { vf v; std::memcpy(&v, &x, sizeof v); return v; }
O4R_INLINE vi as_int(vf x) { vi v; std::memcpy(&v, &x, sizeof v); return v; }
// min(x, c) and max(x, c) that keep a nan x a nan (x86's minps/maxps, with the operands in
// this order): a nan gradient must give a nan update, as in JAX, never a silent finite one.
O4R_INLINE vf vmin(vf x, vf c) { return c < x ? c : x; }
O4R_INLINE vf vmax(vf x, vf c) { return x < c ? c : x; }

// 1 / x and 1 / sqrt(x) to about 1 ulp: with AVX-512, a 14-bit hardware estimate refined by one
// Newton step (a division or square root costs several times more); elsewhere exact.
#ifdef __AVX512F__
O4R_INLINE vf vrcp(vf x) {
  vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(x)));
  return r + r * (1.0f - x * r);
}
O4R_INLINE vf vrsqrt(vf x) {
  vf r = reinterpret_cast<vf>(_mm512_rsqrt14_ps(reinterpret_cast<__m512>(x)));
  return r * (1.5f - (0.5f * x) * (r * r));
}
#else
O4R_INLINE vf vrcp(vf x) { return 1.0f / x; }
O4R_INLINE vf vrsqrt(vf x) {
  vf out;
  for (int l = 0; l < kLanes; ++l) out[l] = 1.0f / std::sqrt(x[l]);
  return out;
}
#endif

// exp, float32, ~1 ulp (Cephes expf): 2^n · p(r), r = x − n·ln 2. With AVX-512 the rounding and
// the scaling by 2^n are one instruction each (vrndscaleps, vscalefps); elsewhere 2^n is built
// from its bits.
O4R_INLINE vf vexp(vf x) {
  // Clamped so that exp stays finite: the Newton steps of vrcp and vrsqrt turn an infinite
  // input into nan (inf · 0).
  x = vmin(x, splat(88.3762626647949f));
  x = vmax(x, splat(-87.3365447504f));
  vf fx = x * 1.44269504088896341f;
#ifdef __AVX512F__
  vf nf = reinterpret_cast<vf>(_mm512_roundscale_ps(reinterpret_cast<__m512>(fx),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  vi n = __builtin_convertvector(fx + select(fx >= 0.0f, splat(0.5f), splat(-0.5f)), vi);
  vf nf = __builtin_convertvector(n, vf);
#endif
  vf r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  vf y = p * r * r + r + 1.0f;
#ifdef __AVX512F__
  return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(y),
                                               reinterpret_cast<__m512>(nf)));
#else
  return y * as_float((n + 127) << 23);
#endif
}

// log for positive normal x, ~1 ulp (Cephes logf); inf and nan pass through.
O4R_INLINE vf vlog(vf x) {
  vi bits = as_int(x);
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = as_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  vi small = m < 0.707106781186547524f;
  e = e + (small ? vi{} - 1 : vi{});
  m = select(small, m + m - 1.0f, m - 1.0f);
  vf ef = __builtin_convertvector(e, vf);
  vf z = m * m;
  vf y = splat(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf result = m + y + ef * 0.693359375f;
  vi finite = (bits & 0x7f800000) != 0x7f800000;
  return select(finite, result, x);
}

O4R_INLINE vf vsigmoid(vf x) { return vrcp(1.0f + vexp(-x)); }

// tanh(x) = sign(x) · (1 − e) / (1 + e), e = exp(−2|x|): relative error ~1e-7 where |tanh| is
// of order one, absolute error ~6e-8 near zero (from the rounding of e).
O4R_INLINE vf vtanh(vf x) {
  const vi sign_bit = as_int(x) & static_cast<int32_t>(0x80000000u);
  vf e = vexp(-2.0f * as_float(as_int(x) & 0x7fffffff));
  vf t = (1.0f - e) * vrcp(1.0f + e);
  return as_float(as_int(t) | sign_bit);
}

// jnp.sign: ±1, 0 at 0, nan at nan.
O4R_INLINE vf vsign(vf x) {
  return select(x > 0.0f, splat(1.0f), select(x < 0.0f, splat(-1.0f), x * 0.0f));
}

struct GruWeights { const float *wi, *wh, *b, *bhn; };
struct Layer { const float *w, *b; };

// One GRU step for a tile (flax GRUCell, as nets.gru_apply).
template <int H, int I>
O4R_INLINE void gru(const GruWeights& p, const vf* x, const vf* h, vf* out) {
#pragma GCC unroll 16
  for (int j = 0; j < H; ++j) {
    vf xr = p.wi[j] * x[0], xz = p.wi[H + j] * x[0], xn = p.wi[2 * H + j] * x[0];
    for (int i = 1; i < I; ++i) {
      xr += p.wi[i * 3 * H + j] * x[i];
      xz += p.wi[i * 3 * H + H + j] * x[i];
      xn += p.wi[i * 3 * H + 2 * H + j] * x[i];
    }
    vf hr = p.wh[j] * h[0], hz = p.wh[H + j] * h[0], hn = p.wh[2 * H + j] * h[0];
#pragma GCC unroll 16
    for (int k = 1; k < H; ++k) {
      hr += p.wh[k * 3 * H + j] * h[k];
      hz += p.wh[k * 3 * H + H + j] * h[k];
      hn += p.wh[k * 3 * H + 2 * H + j] * h[k];
    }
    vf reset = vsigmoid(xr + p.b[j] + hr);
    vf update = vsigmoid(xz + p.b[H + j] + hz);
    vf candidate = vtanh(xn + p.b[2 * H + j] + reset * (hn + p.bhn[j]));
    out[j] = (1.0f - update) * candidate + update * h[j];
  }
}

// out[o] = b[o] + Σ_i w[i, o] · x[i], optionally ReLU.
template <int In, int Out, bool Relu>
O4R_INLINE void dense(const Layer& layer, const vf* x, vf* out) {
#pragma GCC unroll 32
  for (int o = 0; o < Out; ++o) {
    vf acc = layer.w[o] * x[0];
#pragma GCC unroll 32
    for (int i = 1; i < In; ++i) acc += layer.w[i * Out + o] * x[i];
    acc += layer.b[o];
    out[o] = Relu ? select(acc < 0.0f, splat(0.0f), acc) : acc;  // ReLU; nan stays nan
  }
}

template <int H, int D1, int D2>
O4R_INLINE vf head(const Layer* layers, const vf* h) {
  vf out[1];
  if constexpr (D1 == 0) {
    dense<H, 1, false>(layers[0], h, out);
  } else {
    vf a[D1], b[D2];
    dense<H, D1, true>(layers[0], h, a);
    dense<D1, D2, true>(layers[1], a, b);
    dense<D2, 1, false>(layers[2], b, out);
  }
  return out[0];
}

struct Problem {
  const float* phi;
  const float* g;
  const float* hm;
  const float* hv;
  float* direction;
  float* hm_out;
  float* hv_out;
  int64_t batch, n;
  bool raw;
  float log_eps, eps, log_scale;
};

template <int H, int D1, int D2>
struct Kernel {
  static constexpr int kLayers = D1 == 0 ? 1 : 3;
  GruWeights gru_m, gru_v;
  Layer head_m[3], head_v[3];

  static const float* take_gru(const float* p, int inputs, GruWeights* w) {
    w->wi = p; p += inputs * 3 * H;
    w->wh = p; p += H * 3 * H;
    w->b = p; p += 3 * H;
    w->bhn = p; p += H;
    return p;
  }
  static const float* take_head(const float* p, Layer* layers) {
    const int sizes[4] = {H, D1, D2, 1};
    if (D1 == 0) {
      layers[0] = {p, p + H};
      return p + H + 1;
    }
    for (int l = 0; l < 3; ++l) {
      layers[l].w = p; p += sizes[l] * sizes[l + 1];
      layers[l].b = p; p += sizes[l + 1];
    }
    return p;
  }

  explicit Kernel(const Problem& pr) {
    const float* p = pr.phi;
    p = take_gru(p, pr.raw ? 1 : 2, &gru_m);
    p = take_head(p, head_m);
    p = take_gru(p, 1, &gru_v);
    take_head(p, head_v);
  }

  static int64_t phi_size(bool raw) {
    int64_t gru_m = (raw ? 1 : 2) * 3 * H + H * 3 * H + 3 * H + H;
    int64_t gru_v = 3 * H + H * 3 * H + 3 * H + H;
    int64_t head = D1 == 0 ? H + 1 : H * D1 + D1 + D1 * D2 + D2 + D2 + 1;
    return gru_m + gru_v + 2 * head;
  }

  // One tile of 16 coordinates whose rows start at g, hm, hv (row stride `stride`).
  template <bool Raw>
  O4R_INLINE void tile(const Problem& pr, const float* g_row, const float* hm_row, const float* hv_row,
                   int64_t stride, float* d_row, float* hm_out, float* hv_out) const {
    vf g = load(g_row);
    vf hm[H], hv[H], hm_new[H], hv_new[H];
    for (int k = 0; k < H; ++k) {
      hm[k] = load(hm_row + k * stride);
      hv[k] = load(hv_row + k * stride);
    }
    if constexpr (Raw) {
      vf xm[1] = {g};
      vf xv[1] = {g * g};
      gru<H, 1>(gru_m, xm, hm, hm_new);
      gru<H, 1>(gru_v, xv, hv, hv_new);
    } else {
      vf a = select(g < 0.0f, -g, g);
      vf log_abs = pr.log_scale * vlog(a + pr.log_eps);
      vf xm[2] = {vsign(g), log_abs};
      vf xv[1] = {2.0f * log_abs};
      gru<H, 2>(gru_m, xm, hm, hm_new);
      gru<H, 1>(gru_v, xv, hv, hv_new);
    }
    vf o1 = head<H, D1, D2>(head_m, hm_new);
    vf o2 = head<H, D1, D2>(head_v, hv_new);
    vf m = vsign(g) * vexp(o1);
    store(d_row, m * vrsqrt(vexp(o2) + pr.eps));
    for (int k = 0; k < H; ++k) {
      store(hm_out + k * stride, hm_new[k]);
      store(hv_out + k * stride, hv_new[k]);
    }
  }

  // Tiles [first, last) of the flattened (batch, tile) index space.
  template <bool Raw>
  void run(const Problem& pr, int64_t first, int64_t last) const {
    const int64_t n = pr.n, tiles_per_row = (n + kLanes - 1) / kLanes;
    for (int64_t t = first; t < last; ++t) {
      const int64_t b = t / tiles_per_row, start = (t % tiles_per_row) * kLanes;
      const float* g = pr.g + b * n;
      const float* hm = pr.hm + b * H * n;
      const float* hv = pr.hv + b * H * n;
      float* d = pr.direction + b * n;
      float* hm_out = pr.hm_out + b * H * n;
      float* hv_out = pr.hv_out + b * H * n;
      if (start + kLanes <= n) {
        tile<Raw>(pr, g + start, hm + start, hv + start, n, d + start, hm_out + start,
                  hv_out + start);
        continue;
      }
      // The last, partial tile of a row: through zero-padded copies.
      const int64_t valid = n - start;
      float gp[kLanes] = {}, hmp[H * kLanes] = {}, hvp[H * kLanes] = {};
      float dp[kLanes], hmo[H * kLanes], hvo[H * kLanes];
      for (int64_t l = 0; l < valid; ++l) {
        gp[l] = g[start + l];
        for (int k = 0; k < H; ++k) {
          hmp[k * kLanes + l] = hm[k * n + start + l];
          hvp[k * kLanes + l] = hv[k * n + start + l];
        }
      }
      tile<Raw>(pr, gp, hmp, hvp, kLanes, dp, hmo, hvo);
      for (int64_t l = 0; l < valid; ++l) {
        d[start + l] = dp[l];
        for (int k = 0; k < H; ++k) {
          hm_out[k * n + start + l] = hmo[k * kLanes + l];
          hv_out[k * n + start + l] = hvo[k * kLanes + l];
        }
      }
    }
  }

  void run_range(const Problem& pr, int64_t first, int64_t last) const {
    if (pr.raw) run<true>(pr, first, last); else run<false>(pr, first, last);
  }
};

// A small persistent pool of worker threads. A call splits its tiles into chunks that are
// claimed from an atomic counter by the calling thread and by any idle worker; the caller works
// too and waits only for chunks already claimed, so a busy pool (or a forked child, which has no
// workers) cannot stall a call: the caller then does every chunk itself. XLA's own intra-op pool
// (ffi::ThreadPool) was tried first: measured on a 2-core EPYC, its second thread picked up no
// work, so a call ran on one core.
struct Job {
  std::function<void(int64_t)> run;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;

  // Claims and runs chunks until none is left.
  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      run(c);
      if (done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }
};

class Workers {
 public:
  static Workers& get() {
    static Workers* workers = new Workers();  // never destroyed: workers may outlive main()
    return *workers;
  }

  int64_t size() const { return static_cast<int64_t>(threads_); }

  void run(int64_t chunks, std::function<void(int64_t)> fn) {
    auto job = std::make_shared<Job>();
    job->run = std::move(fn);
    job->chunks = chunks;
    if (chunks > 1 && threads_ > 0) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        jobs_.push_back(job);
      }
      wake_.notify_all();
    }
    job->work();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = jobs_.begin(); it != jobs_.end(); ++it) {
        if (*it == job) { jobs_.erase(it); break; }
      }
    }
    std::unique_lock<std::mutex> lock(job->mutex);
    job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
  }

 private:
  Workers() {
    int64_t count = static_cast<int64_t>(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) count = CPU_COUNT(&set);
#endif
    if (const char* env = std::getenv("OPTIM4RL_NATIVE_THREADS")) count = std::atoll(env);
    threads_ = static_cast<size_t>(std::max<int64_t>(count - 1, 0));
    for (size_t i = 0; i < threads_; ++i) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          for (auto& j : jobs_) if (j->next.load() < j->chunks) return true;
          return false;
        });
        for (auto& j : jobs_) {
          if (j->next.load() < j->chunks) { job = j; break; }
        }
      }
      if (job) job->work();
    }
  }

  size_t threads_ = 0;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> jobs_;
};

constexpr int64_t kTilesPerChunk = 64;  // 1,024 coordinates

template <int H, int D1, int D2>
ffi::Error Run(const Problem& pr) {
  const Kernel<H, D1, D2> kernel(pr);
  const int64_t total = pr.batch * ((pr.n + kLanes - 1) / kLanes);
  const int64_t chunks = (total + kTilesPerChunk - 1) / kTilesPerChunk;
  Workers::get().run(chunks, [&kernel, &pr, total](int64_t c) {
    kernel.run_range(pr, c * kTilesPerChunk, std::min(total, (c + 1) * kTilesPerChunk));
  });
  return ffi::Error::Success();
}

ffi::Error Optim4RLImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> g,
                        ffi::Buffer<ffi::F32> hm, ffi::Buffer<ffi::F32> hv,
                        ffi::ResultBuffer<ffi::F32> direction, ffi::ResultBuffer<ffi::F32> hm_out,
                        ffi::ResultBuffer<ffi::F32> hv_out, int64_t hidden, int64_t head1,
                        int64_t head2, bool raw, float log_eps, float eps, float log_scale) {
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [batch, n]");
  Problem pr{phi.typed_data(), g.typed_data(), hm.typed_data(), hv.typed_data(),
             direction->typed_data(), hm_out->typed_data(), hv_out->typed_data(),
             dims[0], dims[1], raw, log_eps, eps, log_scale};
  if (pr.batch * pr.n == 0) return ffi::Error::Success();
  const int64_t phi_size = phi.element_count();
  if (hidden == 8 && head1 == 16 && head2 == 16) {
    if (phi_size != Kernel<8, 16, 16>::phi_size(raw))
      return ffi::Error::InvalidArgument("phi has the wrong size");
    return Run<8, 16, 16>(pr);
  }
  if (hidden == 8 && head1 == 0 && head2 == 0) {
    if (phi_size != Kernel<8, 0, 0>::phi_size(raw))
      return ffi::Error::InvalidArgument("phi has the wrong size");
    return Run<8, 0, 0>(pr);
  }
  return ffi::Error::InvalidArgument("unsupported Optim4RL sizes");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optim4RLForward, Optim4RLImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("hidden")
                                  .Attr<int64_t>("head1")
                                  .Attr<int64_t>("head2")
                                  .Attr<bool>("raw")
                                  .Attr<float>("log_eps")
                                  .Attr<float>("eps")
                                  .Attr<float>("log_scale"));

// The sizes this build supports, for the Python side to check before it calls.
extern "C" int optim4rl_native_supports(int64_t hidden, int64_t head1, int64_t head2) {
  return hidden == 8 && ((head1 == 16 && head2 == 16) || (head1 == 0 && head2 == 0));
}

extern "C" int64_t optim4rl_native_threads() { return Workers::get().size() + 1; }
