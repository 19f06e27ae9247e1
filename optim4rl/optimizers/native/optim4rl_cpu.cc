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
#include <array>
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
#include <utility>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Everything below runs on 16-lane vectors held in registers: it must all be inlined (a call
// would pass them through memory).
#define O4R_INLINE inline __attribute__((always_inline))

// Unrolling. The inner loops (over a layer's inputs) are unrolled fully: their accumulators
// then stay in registers. The outer loops over a layer's outputs (dense, dense_backward) and
// over a GRU's units (gru_cached, gru_backward) are kept rolled (`unroll 1`): unrolled, the
// default network's backward pass was ~23k instructions per tile and bound by instruction
// fetch rather than arithmetic; rolled it is ~6k, with the same operations in the same order
// (the same numbers). benchmarks/results/backward_code_size_before_after.json: the default's
// meta-gradient through one update 93-100 -> 85-95 ns per coordinate, meta-training 2-4 %
// faster. The forward GRU keeps `unroll 16`: rolling it gained nothing.

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

// The range reduction both exps share: x clamped so that exp stays finite (the Newton steps of
// vrcp and vrsqrt turn an infinite input into nan, inf · 0), t = x·log2(e), n = round(t), and
// the final scaling by 2^n. With AVX-512 the rounding and the scaling are one instruction each
// (vrndscaleps, vscalefps); elsewhere 2^n is built from its bits.
struct ExpReduction {
  vf x, t, nf;
  O4R_INLINE explicit ExpReduction(vf input) {
    x = vmin(input, splat(88.3762626647949f));
    x = vmax(x, splat(-87.3365447504f));
    t = x * 1.44269504088896341f;
#ifdef __AVX512F__
    nf = reinterpret_cast<vf>(_mm512_roundscale_ps(reinterpret_cast<__m512>(t),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    nf = __builtin_convertvector(
        __builtin_convertvector(t + select(t >= 0.0f, splat(0.5f), splat(-0.5f)), vi), vf);
#endif
  }
  O4R_INLINE vf times_pow2(vf y) const {
#ifdef __AVX512F__
    return reinterpret_cast<vf>(_mm512_scalef_ps(reinterpret_cast<__m512>(y),
                                                 reinterpret_cast<__m512>(nf)));
#else
    return y * as_float((__builtin_convertvector(nf, vi) + 127) << 23);
#endif
  }
};

// exp, float32, ~1 ulp (Cephes expf): 2^n · p(r), r = x − n·ln 2.
O4R_INLINE vf vexp(vf input) {
  const ExpReduction e(input);
  vf r = e.x - e.nf * 0.693359375f - e.nf * -2.12194440e-4f;
  vf p = splat(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  return e.times_pow2(p * r * r + r + 1.0f);
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

// exp for the gates (sigmoid and tanh), ~4 FMA-pipe operations cheaper than vexp: 2^t with
// t = x·log2(e) rounded to float32, split into n + f (|f| <= 1/2), and 2^f as one degree-5
// polynomial (fitted for relative error, 7.5e-8 in exact arithmetic). The rounding of t costs
// |x|·6e-8 relative error: 7e-7 at |x| = 10 (vexp: ~1 ulp everywhere). A gate's exp feeds
// 1 / (1 + e) or (1 − e) / (1 + e), whose absolute error stays below ~1e-7 for any x, so the
// gates and hidden states agree with the JAX network to float32 rounding; the update's own
// exp(o1), exp(o2) keep vexp.
O4R_INLINE vf vexp_gate(vf input) {
  const ExpReduction e(input);
  vf f = e.t - e.nf;
  vf p = splat(1.3278163969516754e-3f);
  p = p * f + 9.675555862486362e-3f;
  p = p * f + 5.5507078766822815e-2f;
  p = p * f + 2.4022118747234344e-1f;
  p = p * f + 6.931469440460205e-1f;
  p = p * f + 1.0000001192092896f;
  return e.times_pow2(p);
}

O4R_INLINE vf vsigmoid(vf x) { return vrcp(1.0f + vexp_gate(-x)); }

// tanh(x) = sign(x) · (1 − e) / (1 + e), e = exp(−2|x|): relative error ~1e-7 where |tanh| is
// of order one. Below |x| = 1e-4, where the rounding of e would leave an absolute error of ~6e-8,
// tanh(x) = x to float32 precision: so tanh(0) is exactly 0, as in JAX. That matters: a GRU at a
// zero state with a zero input then keeps an exact zero state, and a ReLU of the head sees an
// exact 0 (derivative 0) rather than a 1e-8 (derivative 1), which would change meta-gradients.
O4R_INLINE vf vtanh(vf x) {
  const vi sign_bit = as_int(x) & static_cast<int32_t>(0x80000000u);
  const vf ax = as_float(as_int(x) & 0x7fffffff);
  vf e = vexp_gate(-2.0f * ax);
  vf t = select(ax < 1e-4f, ax, (1.0f - e) * vrcp(1.0f + e));
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
#pragma GCC unroll 1
  for (int o = 0; o < Out; ++o) {
    vf acc = layer.w[o] * x[0];
#pragma GCC unroll 32
    for (int i = 1; i < In; ++i) acc += layer.w[i * Out + o] * x[i];
    acc += layer.b[o];
    out[o] = Relu ? select(acc < 0.0f, splat(0.0f), acc) : acc;  // ReLU; nan stays nan
  }
}

// A head with Out outputs, its hidden activations (after ReLU) kept in a and b.
template <int H, int D1, int D2, int Out>
O4R_INLINE void head_out(const Layer* layers, const vf* h, vf* a, vf* b, vf* out) {
  if constexpr (D1 == 0) {
    dense<H, Out, false>(layers[0], h, out);
  } else {
    dense<H, D1, true>(layers[0], h, a);
    dense<D1, D2, true>(layers[1], a, b);
    dense<D2, Out, false>(layers[2], b, out);
  }
}

// Where a head's layers lie in the packed phi (w [in, out], b [out] per layer); returns the end.
template <int H, int D1, int D2, int Out>
const float* take_head(const float* p, Layer* layers) {
  if (D1 == 0) {
    layers[0] = {p, p + H * Out};
    return p + H * Out + Out;
  }
  const int sizes[4] = {H, D1, D2, Out};
  for (int l = 0; l < 3; ++l) {
    layers[l].w = p; p += sizes[l] * sizes[l + 1];
    layers[l].b = p; p += sizes[l + 1];
  }
  return p;
}

// Optim4RL's heads: one output.
template <int H, int D1, int D2>
O4R_INLINE vf head(const Layer* layers, const vf* h) {
  vf a[D1 == 0 ? 1 : D1], b[D2 == 0 ? 1 : D2], out[1];
  head_out<H, D1, D2, 1>(layers, h, a, b, out);
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
  explicit Kernel(const Problem& pr) {
    const float* p = pr.phi;
    p = take_gru(p, pr.raw ? 1 : 2, &gru_m);
    p = take_head<H, D1, D2, 1>(p, head_m);
    p = take_gru(p, 1, &gru_v);
    take_head<H, D1, D2, 1>(p, head_v);
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

// Denormals flushed to zero, on inputs and results (MXCSR's FTZ and DAZ bits), as XLA's CPU code
// runs: a kernel's numbers then do not depend on which thread ran which chunk, and a denormal
// never takes the slow microcode path. (The workers would inherit the mode of the XLA thread
// that starts them; this does not rely on it.) The caller's mode is restored when a call returns.
struct FlushDenormals {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
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
    const FlushDenormals flush;  // for the life of the worker
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

template <int H_, int D1_, int D2_>
struct Sizes { static constexpr int H = H_, D1 = D1_, D2 = D2_; };

// Calls f(Sizes<H, D1, D2>{}) for the sizes this build supports (optim4rl_native_supports),
// after checking that phi has that architecture's size.
template <typename F>
ffi::Error WithSizes(int64_t hidden, int64_t head1, int64_t head2, int64_t phi_size, bool raw,
                     F f) {
  auto checked = [&](auto sizes) {
    using S = decltype(sizes);
    if (phi_size != Kernel<S::H, S::D1, S::D2>::phi_size(raw))
      return ffi::Error::InvalidArgument("phi has the wrong size");
    return f(sizes);
  };
  if (hidden == 8 && head1 == 16 && head2 == 16) return checked(Sizes<8, 16, 16>{});
  if (hidden == 8 && head1 == 0 && head2 == 0) return checked(Sizes<8, 0, 0>{});
  return ffi::Error::InvalidArgument("unsupported Optim4RL sizes");
}

ffi::Error Optim4RLImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> g,
                        ffi::Buffer<ffi::F32> hm, ffi::Buffer<ffi::F32> hv,
                        ffi::ResultBuffer<ffi::F32> direction, ffi::ResultBuffer<ffi::F32> hm_out,
                        ffi::ResultBuffer<ffi::F32> hv_out, int64_t hidden, int64_t head1,
                        int64_t head2, bool raw, float log_eps, float eps, float log_scale) {
  const FlushDenormals flush;
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [batch, n]");
  Problem pr{phi.typed_data(), g.typed_data(), hm.typed_data(), hv.typed_data(),
             direction->typed_data(), hm_out->typed_data(), hv_out->typed_data(),
             dims[0], dims[1], raw, log_eps, eps, log_scale};
  if (pr.batch * pr.n == 0) return ffi::Error::Success();
  return WithSizes(hidden, head1, head2, phi.element_count(), raw, [&](auto sizes) {
    using S = decltype(sizes);
    return Run<S::H, S::D1, S::D2>(pr);
  });
}


// ---- The backward pass (vector-Jacobian product), for meta-gradients ----------------------
//
// Per tile: the forward pass again, keeping the gates and the heads' activations, then reverse
// mode through the update rule, both heads and both GRU cells. Cotangents of g and of the two
// hidden states are written per coordinate; the cotangent of phi is summed over the coordinates
// of each batch row: lane-wise within a chunk of tiles (one row each), then each chunk's sum is
// written to its own slot and the slots of a row are added in order, so the result does not
// depend on which thread ran which chunk.

struct BackwardProblem {
  const float* phi;
  const float* g;
  const float* hm;
  const float* hv;
  const float* dd;    // cotangent of the direction [B, N]
  const float* dhm;   // cotangents of the new hidden states [B, H, N]
  const float* dhv;
  float* dg;          // outputs: cotangents of the inputs
  float* dhm_in;
  float* dhv_in;
  int64_t batch, n;
  bool raw;
  float log_eps, eps, log_scale;
};

struct GruGrads { vf *wi, *wh, *b, *bhn; };
struct LayerGrads { vf *w, *b; };

template <int H, int I>
O4R_INLINE void gru_cached(const GruWeights& p, const vf* x, const vf* h, vf* out, vf* r, vf* z,
                           vf* c, vf* hn) {
#pragma GCC unroll 1
  for (int j = 0; j < H; ++j) {
    vf xr = p.wi[j] * x[0], xz = p.wi[H + j] * x[0], xn = p.wi[2 * H + j] * x[0];
    for (int i = 1; i < I; ++i) {
      xr += p.wi[i * 3 * H + j] * x[i];
      xz += p.wi[i * 3 * H + H + j] * x[i];
      xn += p.wi[i * 3 * H + 2 * H + j] * x[i];
    }
    vf hr = p.wh[j] * h[0], hz = p.wh[H + j] * h[0], hnj = p.wh[2 * H + j] * h[0];
#pragma GCC unroll 16
    for (int k = 1; k < H; ++k) {
      hr += p.wh[k * 3 * H + j] * h[k];
      hz += p.wh[k * 3 * H + H + j] * h[k];
      hnj += p.wh[k * 3 * H + 2 * H + j] * h[k];
    }
    r[j] = vsigmoid(xr + p.b[j] + hr);
    z[j] = vsigmoid(xz + p.b[H + j] + hz);
    hn[j] = hnj + p.bhn[j];
    c[j] = vtanh(xn + p.b[2 * H + j] + r[j] * hn[j]);
    out[j] = (1.0f - z[j]) * c[j] + z[j] * h[j];
  }
}

// Reverse mode through one GRU step: dnew (cotangent of the new state) -> dx, dh; each unit j's
// gate cotangents (dr, dz, dc, dn) go to weights(j, dr, dz, dc, dn), which adds (gru_backward) or
// keeps (gru_backward_deferred) the weight cotangents.
template <int H, int I, typename W>
O4R_INLINE void gru_backward_with(const GruWeights& p, const vf* h, const vf* r, const vf* z,
                                  const vf* c, const vf* hn, const vf* dnew, vf* dx, vf* dh,
                                  W&& weights) {
  for (int i = 0; i < I; ++i) dx[i] = splat(0.0f);
  for (int k = 0; k < H; ++k) dh[k] = splat(0.0f);
#pragma GCC unroll 1
  for (int j = 0; j < H; ++j) {
    const vf dc = dnew[j] * (1.0f - z[j]);
    const vf dz = dnew[j] * (h[j] - c[j]);
    dh[j] += dnew[j] * z[j];
    const vf dcp = dc * (1.0f - c[j] * c[j]);
    const vf dhn = dcp * r[j];
    const vf drp = dcp * hn[j] * r[j] * (1.0f - r[j]);
    const vf dzp = dz * z[j] * (1.0f - z[j]);
    weights(j, drp, dzp, dcp, dhn);
    for (int i = 0; i < I; ++i)
      dx[i] += p.wi[i * 3 * H + j] * drp + p.wi[i * 3 * H + H + j] * dzp +
               p.wi[i * 3 * H + 2 * H + j] * dcp;
#pragma GCC unroll 16
    for (int k = 0; k < H; ++k)
      dh[k] += p.wh[k * 3 * H + j] * drp + p.wh[k * 3 * H + H + j] * dzp +
               p.wh[k * 3 * H + 2 * H + j] * dhn;
  }
}

// The same, weight cotangents added to gp.
template <int H, int I>
O4R_INLINE void gru_backward(const GruWeights& p, const GruGrads& gp, const vf* x, const vf* h,
                             const vf* r, const vf* z, const vf* c, const vf* hn, const vf* dnew,
                             vf* dx, vf* dh) {
  gru_backward_with<H, I>(p, h, r, z, c, hn, dnew, dx, dh,
                          [&](int j, vf drp, vf dzp, vf dcp, vf dhn) {
    gp.b[j] += drp;
    gp.b[H + j] += dzp;
    gp.b[2 * H + j] += dcp;
    gp.bhn[j] += dhn;
    for (int i = 0; i < I; ++i) {
      gp.wi[i * 3 * H + j] += x[i] * drp;
      gp.wi[i * 3 * H + H + j] += x[i] * dzp;
      gp.wi[i * 3 * H + 2 * H + j] += x[i] * dcp;
    }
#pragma GCC unroll 16
    for (int k = 0; k < H; ++k) {
      gp.wh[k * 3 * H + j] += h[k] * drp;
      gp.wh[k * 3 * H + H + j] += h[k] * dzp;
      gp.wh[k * 3 * H + 2 * H + j] += h[k] * dhn;
    }
  });
}

// Reverse mode through a dense layer: dout -> dx (added), weight cotangents added to gl. The
// ReLU of the layer that produced x is applied by the caller.
template <int In, int Out>
O4R_INLINE void dense_backward(const Layer& layer, const LayerGrads& gl, const vf* x,
                               const vf* dout, vf* dx) {
#pragma GCC unroll 1
  for (int o = 0; o < Out; ++o) {
    gl.b[o] += dout[o];
#pragma GCC unroll 32
    for (int i = 0; i < In; ++i) {
      gl.w[i * Out + o] += x[i] * dout[o];
      dx[i] += layer.w[i * Out + o] * dout[o];
    }
  }
}

// dout[Out] (cotangents of the head's outputs) -> dh (added); weight cotangents added to gl.
template <int H, int D1, int D2, int Out>
O4R_INLINE void head_out_backward(const Layer* layers, const LayerGrads* gl, const vf* h,
                                  const vf* a, const vf* b, const vf* dout, vf* dh) {
  if constexpr (D1 == 0) {
    dense_backward<H, Out>(layers[0], gl[0], h, dout, dh);
  } else {
    vf db[D2], da[D1];
    for (int i = 0; i < D2; ++i) db[i] = splat(0.0f);
    for (int i = 0; i < D1; ++i) da[i] = splat(0.0f);
    dense_backward<D2, Out>(layers[2], gl[2], b, dout, db);
    for (int i = 0; i < D2; ++i) db[i] = select(b[i] > 0.0f, db[i], splat(0.0f));
    dense_backward<D1, D2>(layers[1], gl[1], a, db, da);
    for (int i = 0; i < D1; ++i) da[i] = select(a[i] > 0.0f, da[i], splat(0.0f));
    dense_backward<H, D1>(layers[0], gl[0], h, da, dh);
  }
}

// The backward pass's weight cotangents, deferred: per tile, only the factors of each layer's
// outer product (its input x and its output cotangent d) are kept, and after kDeferTiles tiles
// dense_flush adds Σ_t x_t ⊗ d_t to the accumulators at once, summed in tile order (so the
// result still does not depend on threads). The accumulators of the default network (~1,400
// 16-lane vectors, 88 KB) do not fit in L1; read and written once per tile they cost about a
// quarter of the backward pass. Deferred over 8 tiles, meta-training the default network ran
// 8-15 % faster (benchmarks/results/deferred_weight_cotangents_before_after.json).
constexpr int kDeferTiles = 8;

template <int H, int D1, int D2, int Out>
struct HeadFactors {
  static constexpr int A = D1 == 0 ? 1 : D1, B = D2 == 0 ? 1 : D2;
  vf x0[H], d0[D1 == 0 ? Out : D1], x1[A], d1[B], x2[B], d2[Out];
};

// dx (added) of a dense layer, without its weight cotangents.
template <int In, int Out>
O4R_INLINE void dense_backward_dx(const Layer& layer, const vf* dout, vf* dx) {
#pragma GCC unroll 1
  for (int o = 0; o < Out; ++o) {
#pragma GCC unroll 32
    for (int i = 0; i < In; ++i) dx[i] += layer.w[i * Out + o] * dout[o];
  }
}

// head_out_backward with the weight cotangents' factors written to f instead.
template <int H, int D1, int D2, int Out>
O4R_INLINE void head_out_backward_deferred(const Layer* layers, HeadFactors<H, D1, D2, Out>* f,
                                           const vf* h, const vf* a, const vf* b, const vf* dout,
                                           vf* dh) {
  for (int i = 0; i < H; ++i) f->x0[i] = h[i];
  if constexpr (D1 == 0) {
    for (int o = 0; o < Out; ++o) f->d0[o] = dout[o];
    dense_backward_dx<H, Out>(layers[0], dout, dh);
  } else {
    vf db[D2], da[D1];
    for (int i = 0; i < D2; ++i) db[i] = splat(0.0f);
    for (int i = 0; i < D1; ++i) da[i] = splat(0.0f);
    for (int o = 0; o < Out; ++o) f->d2[o] = dout[o];
    for (int i = 0; i < D2; ++i) f->x2[i] = b[i];
    dense_backward_dx<D2, Out>(layers[2], dout, db);
    for (int i = 0; i < D2; ++i) f->d1[i] = db[i] = select(b[i] > 0.0f, db[i], splat(0.0f));
    for (int i = 0; i < D1; ++i) f->x1[i] = a[i];
    dense_backward_dx<D1, D2>(layers[1], db, da);
    for (int i = 0; i < D1; ++i) f->d0[i] = da[i] = select(a[i] > 0.0f, da[i], splat(0.0f));
    dense_backward_dx<H, D1>(layers[0], da, dh);
  }
}

// gl += Σ_t x_t ⊗ d_t (w) and Σ_t d_t (b) over `count` tiles, summed in tile order.
template <int In, int Out, bool Bias = true>
O4R_INLINE void dense_flush(const LayerGrads& gl, const vf* const* xs, const vf* const* ds,
                            int count) {
#pragma GCC unroll 1
  for (int o = 0; o < Out; ++o) {
    if constexpr (Bias) {
      vf sb = ds[0][o];
      for (int t = 1; t < count; ++t) sb += ds[t][o];
      gl.b[o] += sb;
    }
#pragma GCC unroll 1
    for (int i = 0; i < In; ++i) {
      vf sw = xs[0][i] * ds[0][o];
      for (int t = 1; t < count; ++t) sw += xs[t][i] * ds[t][o];
      gl.w[i * Out + o] += sw;
    }
  }
}

template <int H, int D1, int D2, int Out>
void head_flush(const LayerGrads* gl, const HeadFactors<H, D1, D2, Out>* f, int count) {
  const vf *x[kDeferTiles], *d[kDeferTiles];
  auto layer = [&](auto in, auto out, int l, auto member_x, auto member_d) {
    for (int t = 0; t < count; ++t) x[t] = member_x(f[t]), d[t] = member_d(f[t]);
    dense_flush<decltype(in)::value, decltype(out)::value>(gl[l], x, d, count);
  };
  using std::integral_constant;
  if constexpr (D1 == 0) {
    layer(integral_constant<int, H>{}, integral_constant<int, Out>{}, 0,
          [](const auto& g) { return g.x0; }, [](const auto& g) { return g.d0; });
  } else {
    layer(integral_constant<int, H>{}, integral_constant<int, D1>{}, 0,
          [](const auto& g) { return g.x0; }, [](const auto& g) { return g.d0; });
    layer(integral_constant<int, D1>{}, integral_constant<int, D2>{}, 1,
          [](const auto& g) { return g.x1; }, [](const auto& g) { return g.d1; });
    layer(integral_constant<int, D2>{}, integral_constant<int, Out>{}, 2,
          [](const auto& g) { return g.x2; }, [](const auto& g) { return g.d2; });
  }
}

// A GRU step's weight cotangents as outer products: wi += x ⊗ (dr, dz, dc), b += (dr, dz, dc),
// wh += h ⊗ (dr, dz, dn), bhn += dn (gru_backward's terms, deferred as the heads' are).
template <int H, int I>
struct GruFactors {
  vf x[I], h[H], dx_gates[3 * H], dh_gates[3 * H];  // (dr, dz, dc) and (dr, dz, dn)
};

template <int H, int I>
O4R_INLINE void gru_backward_deferred(const GruWeights& p, GruFactors<H, I>* f, const vf* x,
                                      const vf* h, const vf* r, const vf* z, const vf* c,
                                      const vf* hn, const vf* dnew, vf* dx, vf* dh) {
  for (int i = 0; i < I; ++i) f->x[i] = x[i];
  for (int k = 0; k < H; ++k) f->h[k] = h[k];
  gru_backward_with<H, I>(p, h, r, z, c, hn, dnew, dx, dh,
                          [&](int j, vf drp, vf dzp, vf dcp, vf dhn) {
    f->dx_gates[j] = f->dh_gates[j] = drp;
    f->dx_gates[H + j] = f->dh_gates[H + j] = dzp;
    f->dx_gates[2 * H + j] = dcp;
    f->dh_gates[2 * H + j] = dhn;
  });
}

template <int H, int I>
void gru_flush(const GruGrads& gp, const GruFactors<H, I>* f, int count) {
  const vf *x[kDeferTiles], *d[kDeferTiles];
  for (int t = 0; t < count; ++t) x[t] = f[t].x, d[t] = f[t].dx_gates;
  dense_flush<I, 3 * H>(LayerGrads{gp.wi, gp.b}, x, d, count);
  for (int t = 0; t < count; ++t) x[t] = f[t].h, d[t] = f[t].dh_gates;
  dense_flush<H, 3 * H, false>(LayerGrads{gp.wh, nullptr}, x, d, count);
  for (int j = 0; j < H; ++j) {
    vf s = f[0].dh_gates[2 * H + j];
    for (int t = 1; t < count; ++t) s += f[t].dh_gates[2 * H + j];
    gp.bhn[j] += s;
  }
}

template <int H, int D1, int D2>
struct Backward {
  using K = Kernel<H, D1, D2>;
  static constexpr int kLayers = K::kLayers;
  // The GRUs' cotangents are deferred too where the heads make φ large (the default network);
  // rlc2024's accumulators (~540 vectors) are cheaper to update in place.
  static constexpr bool kDeferGru = D1 != 0;
  const K& k;
  const float* phi;

  GruGrads gru_grads(const GruWeights& w, vf* acc) const {
    return {acc + (w.wi - phi), acc + (w.wh - phi), acc + (w.b - phi), acc + (w.bhn - phi)};
  }
  void layer_grads(const Layer* layers, vf* acc, LayerGrads* out) const {
    for (int l = 0; l < kLayers; ++l) out[l] = {acc + (layers[l].w - phi), acc + (layers[l].b - phi)};
  }

  template <bool Raw>
  O4R_INLINE void tile(const BackwardProblem& pr, const float* g_row, const float* hm_row,
                       const float* hv_row, const float* dd_row, const float* dhm_row,
                       const float* dhv_row, int64_t stride, float* dg_row, float* dhm_in,
                       float* dhv_in, const GruGrads& gm, const GruGrads& gv,
                       GruFactors<H, Raw ? 1 : 2>* qm, GruFactors<H, 1>* qv,
                       HeadFactors<H, D1, D2, 1>* fm, HeadFactors<H, D1, D2, 1>* fv) const {
    constexpr int I = Raw ? 1 : 2;
    constexpr int A = D1 == 0 ? 1 : D1, B = D2 == 0 ? 1 : D2;
    const vf g = load(g_row);
    vf hm[H], hv[H], hm_new[H], hv_new[H];
    vf rm[H], zm[H], cm[H], nm[H], rv[H], zv[H], cv[H], nv[H];
    vf am[A], bm[B], av[A], bv[B];
    for (int j = 0; j < H; ++j) {
      hm[j] = load(hm_row + j * stride);
      hv[j] = load(hv_row + j * stride);
    }
    vf xm[I], xv[1];
    const vf a = select(g < 0.0f, -g, g);
    if constexpr (Raw) {
      xm[0] = g;
      xv[0] = g * g;
    } else {
      const vf log_abs = pr.log_scale * vlog(a + pr.log_eps);
      xm[0] = vsign(g);
      xm[1] = log_abs;
      xv[0] = 2.0f * log_abs;
    }
    gru_cached<H, I>(k.gru_m, xm, hm, hm_new, rm, zm, cm, nm);
    gru_cached<H, 1>(k.gru_v, xv, hv, hv_new, rv, zv, cv, nv);
    vf o1, o2;
    head_out<H, D1, D2, 1>(k.head_m, hm_new, am, bm, &o1);
    head_out<H, D1, D2, 1>(k.head_v, hv_new, av, bv, &o2);
    const vf e2 = vexp(o2);
    const vf s = vrsqrt(e2 + pr.eps);
    const vf d = vsign(g) * vexp(o1) * s;
    const vf dd = load(dd_row);
    const vf do1 = dd * d;                        // d/do1 of sign(g) exp(o1) s
    const vf do2 = -0.5f * dd * d * e2 * s * s;   // d/do2 of rsqrt(exp(o2) + eps)
    vf dm[H], dv[H];
    for (int j = 0; j < H; ++j) {
      dm[j] = load(dhm_row + j * stride);
      dv[j] = load(dhv_row + j * stride);
    }
    head_out_backward_deferred<H, D1, D2, 1>(k.head_m, fm, hm_new, am, bm, &do1, dm);
    head_out_backward_deferred<H, D1, D2, 1>(k.head_v, fv, hv_new, av, bv, &do2, dv);
    vf dxm[I], dxv[1], dhm[H], dhv[H];
    if constexpr (kDeferGru) {
      gru_backward_deferred<H, I>(k.gru_m, qm, xm, hm, rm, zm, cm, nm, dm, dxm, dhm);
      gru_backward_deferred<H, 1>(k.gru_v, qv, xv, hv, rv, zv, cv, nv, dv, dxv, dhv);
    } else {
      gru_backward<H, I>(k.gru_m, gm, xm, hm, rm, zm, cm, nm, dm, dxm, dhm);
      gru_backward<H, 1>(k.gru_v, gv, xv, hv, rv, zv, cv, nv, dv, dxv, dhv);
    }
    vf dg;
    if constexpr (Raw) {
      dg = dxm[0] + dxv[0] * 2.0f * g;
    } else {
      // sign(g) has derivative 0; d/dg log(|g| + eps) = ±1 / (|g| + eps), +1 at g = 0 as in
      // JAX's derivative of abs (x >= 0 ? 1 : -1).
      const vf abs_slope = select(g >= 0.0f, splat(1.0f), splat(-1.0f));
      dg = (dxm[1] + 2.0f * dxv[0]) * pr.log_scale * abs_slope / (a + pr.log_eps);
    }
    store(dg_row, dg);
    for (int j = 0; j < H; ++j) {
      store(dhm_in + j * stride, dhm[j]);
      store(dhv_in + j * stride, dhv[j]);
    }
  }

  // Tiles [first, last) of row b; their phi cotangent summed into acc (lane-wise).
  template <bool Raw>
  void run(const BackwardProblem& pr, int64_t b, int64_t first, int64_t last, vf* acc) const {
    GruGrads gm = gru_grads(k.gru_m, acc), gv = gru_grads(k.gru_v, acc);
    LayerGrads lm[3], lv[3];
    layer_grads(k.head_m, acc, lm);
    layer_grads(k.head_v, acc, lv);
    const int64_t n = pr.n;
    const int64_t row = b * n, hrow = b * H * n;
    HeadFactors<H, D1, D2, 1> fm[kDeferTiles], fv[kDeferTiles];
    GruFactors<H, Raw ? 1 : 2> qm[kDeferTiles];
    GruFactors<H, 1> qv[kDeferTiles];
    int count = 0;
    auto flush = [&] {
      if constexpr (kDeferGru) {
        gru_flush<H, Raw ? 1 : 2>(gm, qm, count);
        gru_flush<H, 1>(gv, qv, count);
      }
      head_flush<H, D1, D2, 1>(lm, fm, count);
      head_flush<H, D1, D2, 1>(lv, fv, count);
      count = 0;
    };
    for (int64_t t = first; t < last; ++t) {
      if (count == kDeferTiles) flush();
      const int64_t start = t * kLanes;
      if (start + kLanes <= n) {
        tile<Raw>(pr, pr.g + row + start, pr.hm + hrow + start, pr.hv + hrow + start,
                  pr.dd + row + start, pr.dhm + hrow + start, pr.dhv + hrow + start, n,
                  pr.dg + row + start, pr.dhm_in + hrow + start, pr.dhv_in + hrow + start, gm, gv,
                  &qm[count], &qv[count], &fm[count], &fv[count]);
        ++count;
        continue;
      }
      // The last, partial tile: zero-padded copies, with zero cotangents in the padding (so it
      // adds nothing to phi's cotangent).
      const int64_t valid = n - start;
      float gp[kLanes] = {}, ddp[kLanes] = {}, hmp[H * kLanes] = {}, hvp[H * kLanes] = {};
      float dmp[H * kLanes] = {}, dvp[H * kLanes] = {};
      float dgo[kLanes], hmo[H * kLanes], hvo[H * kLanes];
      for (int64_t l = 0; l < valid; ++l) {
        gp[l] = pr.g[row + start + l];
        ddp[l] = pr.dd[row + start + l];
        for (int j = 0; j < H; ++j) {
          hmp[j * kLanes + l] = pr.hm[hrow + j * n + start + l];
          hvp[j * kLanes + l] = pr.hv[hrow + j * n + start + l];
          dmp[j * kLanes + l] = pr.dhm[hrow + j * n + start + l];
          dvp[j * kLanes + l] = pr.dhv[hrow + j * n + start + l];
        }
      }
      tile<Raw>(pr, gp, hmp, hvp, ddp, dmp, dvp, kLanes, dgo, hmo, hvo, gm, gv, &qm[count],
                &qv[count], &fm[count], &fv[count]);
      ++count;
      for (int64_t l = 0; l < valid; ++l) {
        pr.dg[row + start + l] = dgo[l];
        for (int j = 0; j < H; ++j) {
          pr.dhm_in[hrow + j * n + start + l] = hmo[j * kLanes + l];
          pr.dhv_in[hrow + j * n + start + l] = hvo[j * kLanes + l];
        }
      }
    }
    if (count) flush();
  }
};

constexpr int64_t kBackwardTilesPerChunk = 128;  // 2,048 coordinates

// φ's cotangent of a backward call, [batch, size]: run_tiles(b, first, last, acc) adds (lane-wise)
// the cotangent of tiles [first, last) of row b to acc. Each chunk of tiles sums into its own
// slot and the slots of a row are added in order, so the result does not depend on which thread
// ran which chunk.
template <typename F>
void SumPhiCotangent(int64_t batch, int64_t n, int64_t size, float* dphi, F run_tiles) {
  const int64_t tiles_per_row = (n + kLanes - 1) / kLanes;
  const int64_t chunks_per_row = (tiles_per_row + kBackwardTilesPerChunk - 1) / kBackwardTilesPerChunk;
  const int64_t chunks = batch * chunks_per_row;
  std::vector<float> partial(static_cast<size_t>(chunks * size));
  Workers::get().run(chunks, [&](int64_t c) {
    const int64_t b = c / chunks_per_row, first = (c % chunks_per_row) * kBackwardTilesPerChunk;
    const int64_t last = std::min(tiles_per_row, first + kBackwardTilesPerChunk);
    std::vector<vf> acc(static_cast<size_t>(size), splat(0.0f));
    run_tiles(b, first, last, acc.data());
    float* out = partial.data() + c * size;
    for (int64_t w = 0; w < size; ++w) {
      float total = 0.0f;
      for (int l = 0; l < kLanes; ++l) total += acc[w][l];
      out[w] = total;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    float* row = dphi + b * size;
    std::fill(row, row + size, 0.0f);
    for (int64_t c = b * chunks_per_row; c < (b + 1) * chunks_per_row; ++c) {
      const float* part = partial.data() + c * size;
      for (int64_t w = 0; w < size; ++w) row[w] += part[w];
    }
  }
}

template <int H, int D1, int D2>
ffi::Error RunBackward(const BackwardProblem& pr, float* dphi) {
  using K = Kernel<H, D1, D2>;
  Problem fp{};
  fp.phi = pr.phi;
  fp.raw = pr.raw;
  const K kernel(fp);
  const Backward<H, D1, D2> backward{kernel, pr.phi};
  SumPhiCotangent(pr.batch, pr.n, K::phi_size(pr.raw), dphi,
                  [&](int64_t b, int64_t first, int64_t last, vf* acc) {
    if (pr.raw) backward.template run<true>(pr, b, first, last, acc);
    else backward.template run<false>(pr, b, first, last, acc);
  });
  return ffi::Error::Success();
}

ffi::Error Optim4RLBackwardImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> g,
                                ffi::Buffer<ffi::F32> hm, ffi::Buffer<ffi::F32> hv,
                                ffi::Buffer<ffi::F32> dd, ffi::Buffer<ffi::F32> dhm,
                                ffi::Buffer<ffi::F32> dhv, ffi::ResultBuffer<ffi::F32> dphi,
                                ffi::ResultBuffer<ffi::F32> dg, ffi::ResultBuffer<ffi::F32> dhm_in,
                                ffi::ResultBuffer<ffi::F32> dhv_in, int64_t hidden, int64_t head1,
                                int64_t head2, bool raw, float log_eps, float eps, float log_scale) {
  const FlushDenormals flush;
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [batch, n]");
  BackwardProblem pr{phi.typed_data(), g.typed_data(), hm.typed_data(), hv.typed_data(),
                     dd.typed_data(), dhm.typed_data(), dhv.typed_data(), dg->typed_data(),
                     dhm_in->typed_data(), dhv_in->typed_data(), dims[0], dims[1], raw, log_eps,
                     eps, log_scale};
  const int64_t phi_size = phi.element_count();
  if (dphi->element_count() != pr.batch * phi_size)
    return ffi::Error::InvalidArgument("dphi must be [batch, phi size]");
  if (pr.batch * pr.n == 0) {
    std::fill(dphi->typed_data(), dphi->typed_data() + dphi->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  return WithSizes(hidden, head1, head2, phi_size, raw, [&](auto sizes) {
    using S = decltype(sizes);
    return RunBackward<S::H, S::D1, S::D2>(pr, dphi->typed_data());
  });
}

// ---- The one-GRU baselines, L2L and Lin ----------------------------------------------------
//
// The same machinery for _SingleGRU's networks (gru_optimizers.py): one GRU cell, one head with
// Out outputs, and the baseline's update rule; forward and backward passes as above. Layout:
// g [B, N], h [B, H, N]; phi packed as gru: wi [I, 3H], wh [H, 3H], b [3H], bhn [H], then the
// head's layers (w [in, out], b [out]), Out outputs:
//   L2L (I = 2, Out = 1): x = l2l_features(g) = (log(|g| + eps) / p, sign g) where that log is
//        >= -p, else (−1, e^p · g); direction exp(o) · g.
//   Lin (I = 1, Out = 3): x = g; direction exp(o1) · g + exp(o2) · o3.

// `rows` rows of n floats of one batch member, from `base`.
struct RowsIn { const float* base; int rows; };
struct RowsOut { float* base; int rows; };

// f(inputs, outputs, stride) on the tile of 16 coordinates at `start` of rows of n floats: on
// the rows themselves where the tile is whole, else (the last, partial tile of a row) through
// zero-padded copies of at most MaxRows rows each. Outputs may alias inputs: f reads a tile
// before it writes it.
template <int MaxRows, size_t NI, size_t NO, typename F>
O4R_INLINE void on_tile(int64_t n, int64_t start, const std::array<RowsIn, NI>& in,
                        const std::array<RowsOut, NO>& out, F&& f) {
  const float* ip[NI];
  float* op[NO];
  if (start + kLanes <= n) {
    for (size_t i = 0; i < NI; ++i) ip[i] = in[i].base + start;
    for (size_t o = 0; o < NO; ++o) op[o] = out[o].base + start;
    f(ip, op, n);
    return;
  }
  const int64_t valid = n - start;
  float ib[NI][MaxRows * kLanes] = {}, ob[NO][MaxRows * kLanes];
  for (size_t i = 0; i < NI; ++i) {
    for (int r = 0; r < in[i].rows; ++r)
      for (int64_t l = 0; l < valid; ++l) ib[i][r * kLanes + l] = in[i].base[r * n + start + l];
    ip[i] = ib[i];
  }
  for (size_t o = 0; o < NO; ++o) op[o] = ob[o];
  f(ip, op, static_cast<int64_t>(kLanes));
  for (size_t o = 0; o < NO; ++o)
    for (int r = 0; r < out[o].rows; ++r)
      for (int64_t l = 0; l < valid; ++l) out[o].base[r * n + start + l] = ob[o][r * kLanes + l];
}

constexpr int kRuleL2L = 0, kRuleLin = 1;

struct SingleProblem {
  const float* phi;
  const float* g;       // [B, N]
  const float* h;       // [B, H, N]
  float* direction;     // forward outputs
  float* h_out;
  const float* dd;      // backward: cotangents of the direction and of the new hidden state
  const float* dh;
  float* dg;            // backward outputs: cotangents of g and of the hidden state
  float* dh_in;
  int64_t batch, n;
  float p, eps;         // L2L's preprocessing constants
};

template <int H, int D1, int D2, int Rule>
struct Single {
  static constexpr int I = Rule == kRuleL2L ? 2 : 1;
  static constexpr int Out = Rule == kRuleL2L ? 1 : 3;
  static constexpr int kLayers = D1 == 0 ? 1 : 3;
  static constexpr int A = D1 == 0 ? 1 : D1, B = D2 == 0 ? 1 : D2;
  static constexpr bool kDeferGru = D1 != 0;  // as in Backward
  const float* phi;
  GruWeights cell;
  Layer head[3];
  float p, eps, exp_p;

  static int64_t phi_size() {
    const int64_t gru_size = I * 3 * H + H * 3 * H + 3 * H + H;
    return gru_size + (D1 == 0 ? H * Out + Out : H * D1 + D1 + D1 * D2 + D2 + D2 * Out + Out);
  }

  Single(const float* phi_, float p_, float eps_)
      : phi(phi_), p(p_), eps(eps_), exp_p(std::exp(p_)) {
    take_head<H, D1, D2, Out>(Kernel<H, D1, D2>::take_gru(phi_, I, &cell), head);
  }

  // What the GRU reads; for L2L, `large` says which branch of the preprocessing each lane took.
  O4R_INLINE void features(vf g, vf* x, vi* large) const {
    if constexpr (Rule == kRuleL2L) {
      const vf scaled_log = vlog(select(g < 0.0f, -g, g) + eps) / p;
      *large = scaled_log >= -1.0f;
      x[0] = select(*large, scaled_log, splat(-1.0f));
      x[1] = select(*large, vsign(g), exp_p * g);
    } else {
      x[0] = g;
    }
  }

  O4R_INLINE void forward_tile(const float* const* in, float* const* out, int64_t stride) const {
    const vf g = load(in[0]);
    vf h[H], h_new[H], x[I], a[A], b[B], o[Out];
    vi large;
    for (int k = 0; k < H; ++k) h[k] = load(in[1] + k * stride);
    features(g, x, &large);
    gru<H, I>(cell, x, h, h_new);
    head_out<H, D1, D2, Out>(head, h_new, a, b, o);
    if constexpr (Rule == kRuleL2L) store(out[0], vexp(o[0]) * g);
    else store(out[0], vexp(o[0]) * g + vexp(o[1]) * o[2]);
    for (int k = 0; k < H; ++k) store(out[1] + k * stride, h_new[k]);
  }

  void forward(const SingleProblem& pr, int64_t first, int64_t last) const {
    const int64_t n = pr.n, tiles_per_row = (n + kLanes - 1) / kLanes;
    for (int64_t t = first; t < last; ++t) {
      const int64_t row = t / tiles_per_row;
      on_tile<H>(n, (t % tiles_per_row) * kLanes,
                 std::array<RowsIn, 2>{{{pr.g + row * n, 1}, {pr.h + row * H * n, H}}},
                 std::array<RowsOut, 2>{{{pr.direction + row * n, 1}, {pr.h_out + row * H * n, H}}},
                 [this](const float* const* in, float* const* out, int64_t stride) {
                   forward_tile(in, out, stride);
                 });
    }
  }

  // in: g, h, dd, dh; out: dg, dh_in. φ's cotangent added (lane-wise) to gg and gl.
  O4R_INLINE void backward_tile(const float* const* in, float* const* out, int64_t stride,
                                const GruGrads& gg, GruFactors<H, I>* q,
                                HeadFactors<H, D1, D2, Out>* f) const {
    const vf g = load(in[0]);
    vf h[H], h_new[H], r[H], z[H], c[H], hn[H], x[I], a[A], b[B], o[Out];
    vi large;
    for (int k = 0; k < H; ++k) h[k] = load(in[1] + k * stride);
    features(g, x, &large);
    gru_cached<H, I>(cell, x, h, h_new, r, z, c, hn);
    head_out<H, D1, D2, Out>(head, h_new, a, b, o);
    const vf dd = load(in[2]);
    vf dout[Out], dg;
    const vf e0 = vexp(o[0]);
    dout[0] = dd * e0 * g;
    dg = dd * e0;
    if constexpr (Rule == kRuleLin) {
      const vf e1 = vexp(o[1]);
      dout[1] = dd * e1 * o[2];
      dout[2] = dd * e1;
    }
    vf dnew[H], dx[I], dh[H];
    for (int k = 0; k < H; ++k) dnew[k] = load(in[3] + k * stride);
    head_out_backward_deferred<H, D1, D2, Out>(head, f, h_new, a, b, dout, dnew);
    if constexpr (kDeferGru) gru_backward_deferred<H, I>(cell, q, x, h, r, z, c, hn, dnew, dx, dh);
    else gru_backward<H, I>(cell, gg, x, h, r, z, c, hn, dnew, dx, dh);
    if constexpr (Rule == kRuleL2L) {
      // d/dg log(|g| + eps) / p = ±1 / (p (|g| + eps)) (+1 at g = 0, as JAX's abs); sign(g) has
      // derivative 0 and e^p · g derivative e^p.
      const vf abs_slope = select(g >= 0.0f, splat(1.0f), splat(-1.0f));
      const vf a_g = select(g < 0.0f, -g, g);
      dg += select(large, dx[0] / p * abs_slope / (a_g + eps), dx[1] * exp_p);
    } else {
      dg += dx[0];
    }
    store(out[0], dg);
    for (int k = 0; k < H; ++k) store(out[1] + k * stride, dh[k]);
  }

  void backward(const SingleProblem& pr, int64_t row, int64_t first, int64_t last, vf* acc) const {
    const GruGrads gg{acc + (cell.wi - phi), acc + (cell.wh - phi), acc + (cell.b - phi),
                      acc + (cell.bhn - phi)};
    LayerGrads gl[3];
    for (int l = 0; l < kLayers; ++l) gl[l] = {acc + (head[l].w - phi), acc + (head[l].b - phi)};
    const int64_t n = pr.n, r1 = row * n, rh = row * H * n;
    GruFactors<H, I> q[kDeferTiles];
    HeadFactors<H, D1, D2, Out> f[kDeferTiles];
    int count = 0;
    auto flush = [&] {  // the weight cotangents of the last `count` tiles (see kDeferTiles)
      if constexpr (kDeferGru) gru_flush<H, I>(gg, q, count);
      head_flush<H, D1, D2, Out>(gl, f, count);
      count = 0;
    };
    for (int64_t t = first; t < last; ++t) {
      if (count == kDeferTiles) flush();
      on_tile<H>(n, t * kLanes,
                 std::array<RowsIn, 4>{{{pr.g + r1, 1}, {pr.h + rh, H}, {pr.dd + r1, 1}, {pr.dh + rh, H}}},
                 std::array<RowsOut, 2>{{{pr.dg + r1, 1}, {pr.dh_in + rh, H}}},
                 [&](const float* const* in, float* const* out, int64_t stride) {
                   backward_tile(in, out, stride, gg, &q[count], &f[count]);
                 });
      ++count;
    }
    if (count) flush();
  }
};

// Calls f(Single<...>) for the sizes and rules this build supports, after checking phi's size.
template <typename F>
ffi::Error WithSingle(int64_t hidden, int64_t head1, int64_t head2, int64_t rule, int64_t phi_size,
                      const SingleProblem& pr, F f) {
  auto checked = [&](auto kernel) {
    if (phi_size != decltype(kernel)::phi_size())
      return ffi::Error::InvalidArgument("phi has the wrong size");
    f(kernel);
    return ffi::Error::Success();
  };
  if (rule != kRuleL2L && rule != kRuleLin) return ffi::Error::InvalidArgument("unknown rule");
  const bool l2l = rule == kRuleL2L;
  if (hidden == 8 && head1 == 16 && head2 == 16) {
    if (l2l) return checked(Single<8, 16, 16, kRuleL2L>(pr.phi, pr.p, pr.eps));
    return checked(Single<8, 16, 16, kRuleLin>(pr.phi, pr.p, pr.eps));
  }
  if (hidden == 8 && head1 == 0 && head2 == 0) {
    if (l2l) return checked(Single<8, 0, 0, kRuleL2L>(pr.phi, pr.p, pr.eps));
    return checked(Single<8, 0, 0, kRuleLin>(pr.phi, pr.p, pr.eps));
  }
  return ffi::Error::InvalidArgument("unsupported sizes");
}

ffi::Error SingleForwardImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> g,
                             ffi::Buffer<ffi::F32> h, ffi::ResultBuffer<ffi::F32> direction,
                             ffi::ResultBuffer<ffi::F32> h_out, int64_t hidden, int64_t head1,
                             int64_t head2, int64_t rule, float p, float eps) {
  const FlushDenormals flush;
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [batch, n]");
  SingleProblem pr{};
  pr.phi = phi.typed_data();
  pr.g = g.typed_data();
  pr.h = h.typed_data();
  pr.direction = direction->typed_data();
  pr.h_out = h_out->typed_data();
  pr.batch = dims[0];
  pr.n = dims[1];
  pr.p = p;
  pr.eps = eps;
  if (pr.batch * pr.n == 0) return ffi::Error::Success();
  return WithSingle(hidden, head1, head2, rule, phi.element_count(), pr, [&](const auto& kernel) {
    const int64_t total = pr.batch * ((pr.n + kLanes - 1) / kLanes);
    const int64_t chunks = (total + kTilesPerChunk - 1) / kTilesPerChunk;
    Workers::get().run(chunks, [&kernel, &pr, total](int64_t c) {
      kernel.forward(pr, c * kTilesPerChunk, std::min(total, (c + 1) * kTilesPerChunk));
    });
  });
}

ffi::Error SingleBackwardImpl(ffi::Buffer<ffi::F32> phi, ffi::Buffer<ffi::F32> g,
                              ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dd,
                              ffi::Buffer<ffi::F32> dh, ffi::ResultBuffer<ffi::F32> dphi,
                              ffi::ResultBuffer<ffi::F32> dg, ffi::ResultBuffer<ffi::F32> dh_in,
                              int64_t hidden, int64_t head1, int64_t head2, int64_t rule, float p,
                              float eps) {
  const FlushDenormals flush;
  auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("g must be [batch, n]");
  SingleProblem pr{};
  pr.phi = phi.typed_data();
  pr.g = g.typed_data();
  pr.h = h.typed_data();
  pr.dd = dd.typed_data();
  pr.dh = dh.typed_data();
  pr.dg = dg->typed_data();
  pr.dh_in = dh_in->typed_data();
  pr.batch = dims[0];
  pr.n = dims[1];
  pr.p = p;
  pr.eps = eps;
  const int64_t phi_size = phi.element_count();
  if (dphi->element_count() != pr.batch * phi_size)
    return ffi::Error::InvalidArgument("dphi must be [batch, phi size]");
  if (pr.batch * pr.n == 0) {
    std::fill(dphi->typed_data(), dphi->typed_data() + dphi->element_count(), 0.0f);
    return ffi::Error::Success();
  }
  return WithSingle(hidden, head1, head2, rule, phi_size, pr, [&](const auto& kernel) {
    SumPhiCotangent(pr.batch, pr.n, phi_size, dphi->typed_data(),
                    [&](int64_t row, int64_t first, int64_t last, vf* acc) {
                      kernel.backward(pr, row, first, last, acc);
                    });
  });
}

// ---------------------------------------------------------------------------------------------
// STAR (star.py), forward only: the accumulators' update, the 28 features, their per-tensor
// normalisation, the MLP 28 -> 4 -> 4 -> 2 and the update, for the default sizes (3 momentum
// decays, 1 second-moment decay, 3 adafactor decays, two hidden layers of 4). The features are
// divided by their root mean square over each tensor, so it runs in two passes over a row:
// pass 1 updates the accumulators (in place) and sums the squared features per tensor; pass 2
// recomputes the features from the new accumulators and runs the MLP with each tensor's scales
// folded into a copy of the first layer. The meta-gradient runs as JAX (star.py).
//
// coef, one row per batch member (packed by star.py, in this order): momentum decays [3], rms
// decay [1], adafactor decays [3], first layer's feature weights [28, 4], its bias with the
// step embedding folded in [4], dense1 w [4, 4], b [4], dense2 w [4, 2], b [2], learning rate.
constexpr int kStarFeatures = 28, kStarHidden = 4;
constexpr int kStarCoef = 7 + kStarFeatures * kStarHidden + kStarHidden + 16 + 4 + 8 + 2 + 1;

struct StarProblem {
  const float *coef, *g, *params, *m, *r, *f;  // [B, 154], [B, N], [B, N], [B, 3|1|3, N]
  float *delta, *m_out, *r_out, *f_out;
  int64_t batch, n;
  const int64_t* offsets;  // tensor boundaries within a row: offsets[0] = 0 ... offsets[S] = n
  int64_t segments;
  float exp_mult, nominal;
};

// The features of one tile from the new accumulators (star.py: STAR.features), each distinct
// one once: STAR's 28 features hold the adafactor accumulators and their rsqrt twice each (as in
// learned_optimization), and a duplicate has the same statistics, hence the same scale, so its
// first-layer weights are summed into its twin's (StarForwardImpl). Distinct features, in order:
// g, params, m[3], r, m·rsqrt(r + 1e-6)[3], rsqrt(r + 1e-6), g·rsqrt(max(f + 1e-9, 1e-9))[3],
// f[3], rsqrt(f + 1e-8)[3], m·(f + 1e-6)^-1/2[3].
constexpr int kStarDistinct = 22;

// The original feature (0..27) each of STAR's features is, as a distinct one (0..21).
O4R_INLINE int star_distinct(int k) {
  if (k < 16) return k;         // g ... f[3]
  if (k < 19) return k - 3;     // f[3] again
  if (k < 22) return k - 3;     // rsqrt(f + 1e-8)[3]
  if (k < 25) return k - 6;     // the same again
  return k - 6;                 // m·(f + 1e-6)^-1/2[3]
}

O4R_INLINE void star_features(vf g, vf p, const vf* m, vf r, const vf* f, vf* x) {
  const vf rsqrt_r = vrsqrt(r + 1e-6f);
  x[0] = g;
  x[1] = p;
  for (int i = 0; i < 3; ++i) {
    x[2 + i] = m[i];
    x[6 + i] = m[i] * rsqrt_r;
    x[10 + i] = g * vrsqrt(vmax(f[i] + 1e-9f, splat(1e-9f)));
    x[13 + i] = f[i];
    x[16 + i] = vrsqrt(f[i] + 1e-8f);
    x[19 + i] = m[i] * vrsqrt(f[i] + 1e-6f);
  }
  x[5] = r;
  x[9] = rsqrt_r;
}

struct StarTile {
  vf g, p, m[3], r, f[3];
};

// A tile's inputs at `start` of a row (n floats per accumulator row), lanes past `end` zero.
O4R_INLINE int64_t star_load(const float* g, const float* params, const float* m, const float* r,
                             const float* f, int64_t n, int64_t start, int64_t end, StarTile* t) {
  const int64_t valid = std::min<int64_t>(kLanes, end - start);
  if (valid == kLanes) {
    t->g = load(g + start);
    t->p = load(params + start);
    for (int i = 0; i < 3; ++i) t->m[i] = load(m + i * n + start), t->f[i] = load(f + i * n + start);
    t->r = load(r + start);
    return valid;
  }
  float buf[9][kLanes] = {};
  for (int64_t l = 0; l < valid; ++l) {
    buf[0][l] = g[start + l];
    buf[1][l] = params[start + l];
    for (int i = 0; i < 3; ++i) buf[2 + i][l] = m[i * n + start + l], buf[5 + i][l] = f[i * n + start + l];
    buf[8][l] = r[start + l];
  }
  t->g = load(buf[0]);
  t->p = load(buf[1]);
  for (int i = 0; i < 3; ++i) t->m[i] = load(buf[2 + i]), t->f[i] = load(buf[5 + i]);
  t->r = load(buf[8]);
  return valid;
}

O4R_INLINE void store_part(float* p, vf v, int64_t valid) {
  if (valid == kLanes) { store(p, v); return; }
  float buf[kLanes];
  store(buf, v);
  for (int64_t l = 0; l < valid; ++l) p[l] = buf[l];
}

// One work item: `row`, tensor `segment`, coordinates [first, last) of it.
struct StarItem { int64_t row, segment, first, last; };

void star_pass1(const StarProblem& pr, const StarItem& it, double* sums) {
  const float* c = pr.coef + it.row * kStarCoef;
  vf dm[3], df[3];
  for (int i = 0; i < 3; ++i) dm[i] = splat(c[i]), df[i] = splat(c[4 + i]);
  const vf dr = splat(c[3]);
  const int64_t n = pr.n, o1 = it.row * n, o3 = it.row * 3 * n;
  vf acc[kStarDistinct];
  for (int k = 0; k < kStarDistinct; ++k) acc[k] = splat(0.0f);
  for (int64_t start = it.first; start < it.last; start += kLanes) {
    StarTile t;
    const int64_t valid = star_load(pr.g + o1, pr.params + o1, pr.m + o3, pr.r + o1, pr.f + o3, n,
                                    start, it.last, &t);
    const vf g2 = t.g * t.g;
    for (int i = 0; i < 3; ++i) {
      t.m[i] = dm[i] * t.m[i] + (1.0f - dm[i]) * t.g;
      t.f[i] = df[i] * t.f[i] + (1.0f - df[i]) * (g2 + 1e-30f);
      store_part(pr.m_out + o3 + i * n + start, t.m[i], valid);
      store_part(pr.f_out + o3 + i * n + start, t.f[i], valid);
    }
    t.r = dr * t.r + (1.0f - dr) * g2;
    store_part(pr.r_out + o1 + start, t.r, valid);
    vf x[kStarDistinct];
    star_features(t.g, t.p, t.m, t.r, t.f, x);
    if (valid == kLanes) {
      for (int k = 0; k < kStarDistinct; ++k) acc[k] += x[k] * x[k];
    } else {
      vi lane;
      for (int l = 0; l < kLanes; ++l) lane[l] = l;
      const vi inside = lane < static_cast<int32_t>(valid);
      for (int k = 0; k < kStarDistinct; ++k) acc[k] += select(inside, x[k] * x[k], splat(0.0f));
    }
  }
  for (int k = 0; k < kStarDistinct; ++k) {
    double total = 0.0;
    for (int l = 0; l < kLanes; ++l) total += acc[k][l];
    sums[k] = total;
  }
}

// w0: the first layer's weights of the distinct features with this tensor's scales folded in,
// [22, 4].
void star_pass2(const StarProblem& pr, const StarItem& it, const float* w0) {
  const float* c = pr.coef + it.row * kStarCoef;
  const float* b0 = c + 7 + kStarFeatures * kStarHidden;
  const float *w1 = b0 + 4, *b1 = w1 + 16, *w2 = b1 + 4, *b2 = w2 + 8;
  const vf lr = splat(b2[2]);
  const int64_t n = pr.n, o1 = it.row * n, o3 = it.row * 3 * n;
  for (int64_t start = it.first; start < it.last; start += kLanes) {
    StarTile t;
    const int64_t valid = star_load(pr.g + o1, pr.params + o1, pr.m_out + o3, pr.r_out + o1,
                                    pr.f_out + o3, n, start, it.last, &t);
    vf x[kStarDistinct];
    star_features(t.g, t.p, t.m, t.r, t.f, x);
    vf h0[kStarHidden], h1[kStarHidden], out[2];
    for (int j = 0; j < kStarHidden; ++j) {
      vf a = w0[j] * x[0];
#pragma GCC unroll 22
      for (int k = 1; k < kStarDistinct; ++k) a += w0[k * kStarHidden + j] * x[k];
      a += b0[j];
      h0[j] = select(a < 0.0f, splat(0.0f), a);
    }
    for (int j = 0; j < kStarHidden; ++j) {
      vf a = w1[j] * h0[0];
      for (int k = 1; k < kStarHidden; ++k) a += w1[k * kStarHidden + j] * h0[k];
      a += b1[j];
      h1[j] = select(a < 0.0f, splat(0.0f), a);
    }
    for (int j = 0; j < 2; ++j) {
      vf a = w2[j] * h1[0];
      for (int k = 1; k < kStarHidden; ++k) a += w2[k * 2 + j] * h1[k];
      out[j] = a + b2[j];
    }
    const vf learned = out[0] * vexp(pr.exp_mult * out[1]) * lr;
    const vf rsqrt_r = vrsqrt(t.r + 1e-6f);
    const vf adam = (t.m[0] * rsqrt_r + t.m[1] * rsqrt_r + t.m[2] * rsqrt_r) / 3.0f;
    store_part(pr.delta + o1 + start, -(learned + pr.nominal * adam), valid);
  }
}

ffi::Error StarForwardImpl(ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> g,
                           ffi::Buffer<ffi::F32> params, ffi::Buffer<ffi::F32> m,
                           ffi::Buffer<ffi::F32> r, ffi::Buffer<ffi::F32> f,
                           ffi::ResultBuffer<ffi::F32> delta, ffi::ResultBuffer<ffi::F32> m_out,
                           ffi::ResultBuffer<ffi::F32> r_out, ffi::ResultBuffer<ffi::F32> f_out,
                           ffi::Span<const int64_t> offsets, float exp_mult, float nominal) {
  const FlushDenormals flush;
  auto dims = g.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("g must be [..., n]");
  StarProblem pr{};
  pr.n = dims.back();
  pr.batch = pr.n == 0 ? 0 : g.element_count() / pr.n;
  if (coef.element_count() != pr.batch * kStarCoef)
    return ffi::Error::InvalidArgument("coef must be [..., 154]");
  if (params.element_count() != pr.batch * pr.n || m.element_count() != 3 * pr.batch * pr.n ||
      r.element_count() != pr.batch * pr.n || f.element_count() != 3 * pr.batch * pr.n)
    return ffi::Error::InvalidArgument("the accumulators must be [..., 3|1|3, n]");
  if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != pr.n)
    return ffi::Error::InvalidArgument("offsets must run from 0 to n");
  for (size_t s = 1; s < offsets.size(); ++s)
    if (offsets[s] < offsets[s - 1]) return ffi::Error::InvalidArgument("offsets must not decrease");
  if (pr.batch * pr.n == 0) return ffi::Error::Success();
  pr.coef = coef.typed_data();
  pr.g = g.typed_data();
  pr.params = params.typed_data();
  pr.m = m.typed_data();
  pr.r = r.typed_data();
  pr.f = f.typed_data();
  pr.delta = delta->typed_data();
  pr.m_out = m_out->typed_data();
  pr.r_out = r_out->typed_data();
  pr.f_out = f_out->typed_data();
  pr.offsets = offsets.begin();
  pr.segments = static_cast<int64_t>(offsets.size()) - 1;
  pr.exp_mult = exp_mult;
  pr.nominal = nominal;

  // Work items of at most kTilesPerChunk tiles, each within one tensor of one row.
  constexpr int64_t kItem = kTilesPerChunk * kLanes;
  std::vector<StarItem> items;
  for (int64_t row = 0; row < pr.batch; ++row)
    for (int64_t s = 0; s < pr.segments; ++s)
      for (int64_t a = pr.offsets[s]; a < pr.offsets[s + 1]; a += kItem)
        items.push_back({row, s, a, std::min(pr.offsets[s + 1], a + kItem)});
  const int64_t count = static_cast<int64_t>(items.size());
  std::vector<double> partial(count * kStarDistinct);
  Workers::get().run(count, [&](int64_t i) { star_pass1(pr, items[i], &partial[i * kStarDistinct]); });

  // Each tensor's scales, rsqrt(1e-5 + mean of the squared feature), folded into its copy of
  // the first layer's weights (a duplicate feature's weights added to its twin's).
  std::vector<double> sums(pr.batch * pr.segments * kStarDistinct, 0.0);
  for (int64_t i = 0; i < count; ++i)
    for (int k = 0; k < kStarDistinct; ++k)
      sums[(items[i].row * pr.segments + items[i].segment) * kStarDistinct + k] += partial[i * kStarDistinct + k];
  std::vector<float> w0(pr.batch * pr.segments * kStarDistinct * kStarHidden, 0.0f);
  for (int64_t row = 0; row < pr.batch; ++row) {
    const float* w = pr.coef + row * kStarCoef + 7;
    for (int64_t s = 0; s < pr.segments; ++s) {
      const int64_t size = pr.offsets[s + 1] - pr.offsets[s];
      const int64_t base = row * pr.segments + s;
      for (int k = 0; k < kStarFeatures; ++k) {
        const int u = star_distinct(k);
        const float mean = static_cast<float>(sums[base * kStarDistinct + u] /
                                              static_cast<double>(std::max<int64_t>(size, 1)));
        const float scale = 1.0f / std::sqrt(1e-5f + mean);
        for (int j = 0; j < kStarHidden; ++j)
          w0[(base * kStarDistinct + u) * kStarHidden + j] += scale * w[k * kStarHidden + j];
      }
    }
  }
  Workers::get().run(count, [&](int64_t i) {
    const StarItem& it = items[i];
    star_pass2(pr, it, &w0[(it.row * pr.segments + it.segment) * kStarDistinct * kStarHidden]);
  });
  return ffi::Error::Success();
}

}  // namespace

// Both calls take the architecture as the same attributes (native/__init__.py: kernel_for).
template <typename Binding>
auto WithAttributes(Binding binding) {
  return std::move(binding).template Attr<int64_t>("hidden")
      .template Attr<int64_t>("head1")
      .template Attr<int64_t>("head2")
      .template Attr<bool>("raw")
      .template Attr<float>("log_eps")
      .template Attr<float>("eps")
      .template Attr<float>("log_scale");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optim4RLForward, Optim4RLImpl,
                              WithAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Optim4RLBackward, Optim4RLBackwardImpl,
                              WithAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

template <typename Binding>
auto WithSingleAttributes(Binding binding) {
  return std::move(binding).template Attr<int64_t>("hidden")
      .template Attr<int64_t>("head1")
      .template Attr<int64_t>("head2")
      .template Attr<int64_t>("rule")
      .template Attr<float>("p")
      .template Attr<float>("eps");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SingleForward, SingleForwardImpl,
                              WithSingleAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SingleBackward, SingleBackwardImpl,
                              WithSingleAttributes(ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(StarForward, StarForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<float>("exp_mult")
                                  .Attr<float>("nominal"));

// The sizes this build supports (both kernels), for the Python side to check before it calls.
extern "C" int optim4rl_native_supports(int64_t hidden, int64_t head1, int64_t head2) {
  return hidden == 8 && ((head1 == 16 && head2 == 16) || (head1 == 0 && head2 == 0));
}

extern "C" int64_t optim4rl_native_threads() { return Workers::get().size() + 1; }
