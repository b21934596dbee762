// One gated conv layer of FTWT as an XLA FFI custom call, a batch of samples per call.
//
// Why a custom call: on XLA:CPU a batch-1 CIFAR ResNet is bound by per-op dispatch,
// not by MACs (bench/RESULTS.md: the sparse XLA path ran ~1,200 small ops against
// dense's ~120). This handler does a whole layer in one call: the head (pool,
// softmax, matvec, > 0), then a direct convolution over the input channels that are
// not identically zero and the output channels the head keeps, then BN bias, the
// activation and the residual. Switched-off channels cost nothing but a fill.
//
// Layout: activations NCHW, kernels OIHW with BN folded in. Inputs: x (N,Cin,H,W),
// w (Cout,Cin,k,k) (depthwise: (Cin,1,k,k)), b (Cout), head_w (Cin,Cout), head_b
// (Cout), head_colsum (Cout: head_w summed over Cin), residual (N,Cout,Ho,Wo); an
// empty (size 0) head_w means "no head" and an empty residual "no residual".
// Outputs: y (N,Cout,Ho,Wo), logits (N,Cout) (zeros without a head), mask (N,Cout) as
// applied (ones without a head; depthwise: also 0 where the input channel is all
// zero, SPEC 2.2). Attributes: stride, pad, relu (activation after BN), post_relu
// (after the residual add), after_block (y = mask * relu(conv + residual)), pool_max,
// softmax, sparse (skip switched-off channels; false computes every channel, then
// masks: the masked dense forward with the same kernel), depthwise.
//
// Threads (XLA's intra-op pool plus the caller): one sample splits its conv's tiles;
// a batch splits its samples, which are independent (per-sample masks), each sample
// on one thread.
//
// The conv kernel: the active input channels are copied once into a zero-padded,
// column-phase-split buffer (stride s: s planes of every s-th column), so every
// tap reads contiguous floats; each tile accumulates OB output channels x T
// vectors of 8 output pixels in registers (GCC vector extensions: AVX/AVX-512/NEON
// as the build machine has).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;
constexpr int kOB = 4;  // output channels per tile
// Vectors of 8 output pixels per tile: kOB * kT accumulators plus kT inputs must fit
// the vector registers (32 with AVX-512VL or on AArch64, 16 with AVX2).
#if defined(__AVX512VL__) || defined(__aarch64__)
constexpr int kT = 4;
#else
constexpr int kT = 2;
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

static_assert(kLanes == 8, "splat spells out 8 lanes");
inline vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }  // one vbroadcastss

// Keep a loaded vector in a register: without this GCC re-reads it from memory as an
// FMA operand once per output channel, and the loads, not the FMAs, bound the tile.
inline void InRegister(vf& v) {
#if defined(__x86_64__)
  asm("" : "+x"(v));
#endif
}

inline vf Relu(vf a) { return (vf)((vi)a & (vi)(a > splat(0.0f))); }
inline float Relu(float a) { return a > 0.0f ? a : 0.0f; }

struct Geometry {
  int cin, h, w, cout, k, stride, pad, ho, wo;
  int hp, wq, plane;  // padded rows, padded phase-row width, floats per channel
  int vec_per_row, vecs;
  int tap_off[64];   // offset of tap (ky, kx) in a packed channel (phase plane, row, col)
  // Per vector of output pixels: offset in a packed input channel, offset in an output
  // channel, valid lanes (outputs narrower than 8 fill a vector partly).
  std::vector<int> vec_in, vec_out, vec_lanes;
};

Geometry MakeGeometry(int cin, int h, int w, int cout, int k, int stride, int pad) {
  Geometry g{cin, h, w, cout, k, stride, pad, 0, 0, 0, 0, 0, 0, 0, {}, {}, {}, {}};
  g.ho = (h + 2 * pad - k) / stride + 1;
  g.wo = (w + 2 * pad - k) / stride + 1;
  g.vec_per_row = (g.wo + kLanes - 1) / kLanes;
  g.vecs = g.ho * g.vec_per_row;
  g.hp = (g.ho - 1) * stride + k;
  g.wq = g.vec_per_row * kLanes + (k - 1) / stride + 1;
  g.plane = stride * g.hp * g.wq;
  for (int ky = 0; ky < k; ++ky)
    for (int kx = 0; kx < k; ++kx)
      g.tap_off[ky * k + kx] = ((kx % stride) * g.hp + ky) * g.wq + kx / stride;
  for (int v = 0; v < g.vecs; ++v) {
    int y = v / g.vec_per_row, x0 = v % g.vec_per_row * kLanes;
    g.vec_in.push_back(y * stride * g.wq + x0);
    g.vec_out.push_back(y * g.wo + x0);
    g.vec_lanes.push_back(std::min(kLanes, g.wo - x0));
  }
  return g;
}

// Copy the listed input channels into the padded, phase-split buffer.
void PackInput(const Geometry& g, const float* x, const int* in_idx, int n_in, float* xp) {
  std::fill(xp, xp + static_cast<size_t>(n_in) * g.plane, 0.0f);
  for (int i = 0; i < n_in; ++i) {
    const float* src = x + static_cast<size_t>(in_idx[i]) * g.h * g.w;
    float* dst = xp + static_cast<size_t>(i) * g.plane;
    for (int r = 0; r < g.hp; ++r) {
      int row = r - g.pad;
      if (row < 0 || row >= g.h) continue;
      const float* s = src + row * g.w;
      if (g.stride == 1) {
        std::memcpy(dst + r * g.wq + g.pad, s, g.w * sizeof(float));
        continue;
      }
      for (int p = 0; p < g.stride; ++p) {
        float* d = dst + (p * g.hp + r) * g.wq;
        for (int q = 0; q < g.wq; ++q) {
          int col = q * g.stride + p - g.pad;
          if (col >= 0 && col < g.w) d[q] = s[col];
        }
      }
    }
  }
}

// out[j][t] = sum over active inputs and taps of w[outs[j]][in] * x: T vector positions
// (8 pixels each) from vector position v0, kOB output channels.
template <int T, int K>
void Tile(const Geometry& g, const float* xp, const float* w, const int* in_idx, int n_in,
          const int* outs, int n_outs, int v0, vf out[kOB][T]) {
  const int kk = K > 0 ? K * K : g.k * g.k;
  int base[T];
  for (int t = 0; t < T; ++t) base[t] = g.vec_in[std::min(v0 + t, g.vecs - 1)];
  const int* tap_off = g.tap_off;
  vf acc[kOB][T];  // local, so that it lives in registers (``out`` may alias the inputs)
  for (int j = 0; j < kOB; ++j)
    for (int t = 0; t < T; ++t) acc[j][t] = splat(0.0f);
  const float* wrow[kOB];
  for (int i = 0; i < n_in; ++i) {
    const float* xi = xp + static_cast<size_t>(i) * g.plane;
    for (int j = 0; j < kOB; ++j)
      wrow[j] = w + (static_cast<size_t>(outs[std::min(j, n_outs - 1)]) * g.cin + in_idx[i]) * kk;
#pragma GCC unroll 9
    for (int tap = 0; tap < kk; ++tap) {
      vf in[T];
      for (int t = 0; t < T; ++t) {
        in[t] = load(xi + base[t] + tap_off[tap]);
        InRegister(in[t]);
      }
      for (int j = 0; j < kOB; ++j) {
        vf wv = splat(wrow[j][tap]);
        for (int t = 0; t < T; ++t) acc[j][t] += wv * in[t];
      }
    }
  }
  for (int j = 0; j < kOB; ++j)
    for (int t = 0; t < T; ++t) out[j][t] = acc[j][t];
}

struct Layer {
  const Geometry* geometry;
  const float* xp;
  const float* w;
  const float* b;
  const float* residual;  // nullptr: none
  const float* mask;      // nullptr: all on
  const int* in_idx;
  int n_in;
  const int* outs;  // output channels to compute
  int n_outs;
  bool relu, post_relu, after_block;
  float* y;
};

// Finish 8 computed output values z (conv + bias) of channel o at offset pix.
inline vf Finish(const Layer& L, int o, size_t pix, vf z) {
  vf m = splat(L.mask ? L.mask[o] : 1.0f);
  if (L.residual) {
    vf r = load(L.residual + pix);
    if (L.after_block) return m * Relu(z + r);
    vf a = (L.relu ? Relu(z) : z) * m + r;
    return L.post_relu ? Relu(a) : a;
  }
  return (L.relu ? Relu(z) : z) * m;
}

// Finish and store output vector v of channel o (z = conv + bias); outputs narrower
// than 8 store their valid lanes only (the residual is staged for the partial load).
inline void Store(const Layer& L, int o, int v, vf z) {
  const Geometry& g = *L.geometry;
  int nx = g.vec_lanes[v];
  size_t off = static_cast<size_t>(o) * g.ho * g.wo + g.vec_out[v];
  if (nx == kLanes) {
    z = Finish(L, o, off, z);
    std::memcpy(L.y + off, &z, sizeof(z));
    return;
  }
  float tmp[kLanes] = {};
  Layer part = L;
  if (L.residual) {
    std::memcpy(tmp, L.residual + off, nx * sizeof(float));
    part.residual = tmp;
  }
  z = Finish(part, o, 0, z);
  std::memcpy(L.y + off, &z, nx * sizeof(float));
}

template <int T, int K>
void RunBlock(const Layer& L, int ob, int v_begin, int v_end) {
  const Geometry& g = *L.geometry;
  const int* outs = L.outs + ob * kOB;
  int n = std::min(kOB, L.n_outs - ob * kOB);
  vf acc[kOB][T];
  for (int v0 = v_begin; v0 < v_end; v0 += T) {
    Tile<T, K>(g, L.xp, L.w, L.in_idx, L.n_in, outs, n, v0, acc);
    for (int j = 0; j < n; ++j) {
      vf bias = splat(L.b[outs[j]]);
      for (int t = 0; t < T && v0 + t < v_end; ++t) Store(L, outs[j], v0 + t, acc[j][t] + bias);
    }
  }
}

// Depthwise conv: packed channel j is input channel outs[j], the only one output
// channel outs[j] reads; w is (C, 1, k, k).
void RunDepthwise(const Layer& L) {
  const Geometry& g = *L.geometry;
  const int kk = g.k * g.k;
  for (int j = 0; j < L.n_outs; ++j) {
    const int o = L.outs[j];
    const float* xj = L.xp + static_cast<size_t>(j) * g.plane;
    const float* wo = L.w + static_cast<size_t>(o) * kk;
    const vf bias = splat(L.b[o]);
    for (int v = 0; v < g.vecs; ++v) {
      vf acc = bias;
      for (int tap = 0; tap < kk; ++tap)
        acc += splat(wo[tap]) * load(xj + g.vec_in[v] + g.tap_off[tap]);
      Store(L, o, v, acc);
    }
  }
}

template <int T>
void RunBlockK(const Layer& L, int ob, int v_begin, int v_end) {
  if (L.geometry->k == 3) RunBlock<T, 3>(L, ob, v_begin, v_end);
  else if (L.geometry->k == 1) RunBlock<T, 1>(L, ob, v_begin, v_end);
  else RunBlock<T, 0>(L, ob, v_begin, v_end);
}

// Work item ``item`` of ``chunks`` per output block: one block, a range of pixel vectors.
void RunItem(const Layer& L, int item, int chunks) {
  const int vecs = L.geometry->vecs;
  int ob = item / chunks, c = item % chunks;
  int per = (vecs + chunks - 1) / chunks;
  per = (per + kT - 1) / kT * kT;
  int v_begin = c * per, v_end = std::min(vecs, v_begin + per);
  if (v_begin >= v_end) return;
  // Fewer pixel vectors than a tile holds (outputs of a few pixels): narrower tiles,
  // or the tile would compute the same vector several times.
  if (vecs >= kT) RunBlockK<kT>(L, ob, v_begin, v_end);
  else if (vecs >= 2) RunBlockK<2>(L, ob, v_begin, v_end);
  else RunBlockK<1>(L, ob, v_begin, v_end);
}

// Items [0, items) shared between the calling thread and up to ``helpers`` tasks of
// XLA's intra-op pool. The caller claims items too, so the call finishes even if no
// pool thread ever runs a scheduled task; the state lives in a shared_ptr for tasks
// that start late (they find nothing left to claim).
void ParallelFor(ffi::ThreadPool* pool, int helpers, int items, std::function<void(int)> fn) {
  helpers = pool ? std::min(helpers, items - 1) : 0;
  if (helpers <= 0) {
    for (int i = 0; i < items; ++i) fn(i);
    return;
  }
  struct State {
    std::function<void(int)> fn;
    int items;
    std::atomic<int> next{0};
    std::atomic<int> done{0};
    void Drain() {
      for (int i; (i = next.fetch_add(1)) < items;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->fn = std::move(fn);
  state->items = items;
  for (int i = 0; i < helpers; ++i) pool->Schedule([state] { state->Drain(); });
  state->Drain();
  // A helper holds a claimed item: yield the core to it (there may be no other).
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// Below this many MACs a hand-off to the pool costs more than it saves (it wakes late).
constexpr int64_t kMinParallelMacs = 1 << 21;

// One layer's conv over pixel-vector chunks x output blocks; ``pool`` null: serial.
void RunParallel(const Layer& L, ffi::ThreadPool* pool) {
  const Geometry& g = *L.geometry;
  int blocks = (L.n_outs + kOB - 1) / kOB;
  int64_t macs = static_cast<int64_t>(L.n_outs) * L.n_in * g.k * g.k * g.ho * g.wo;
  int helpers = !pool || macs < kMinParallelMacs ? 0 : static_cast<int>(pool->num_threads());
  // About 4 items per thread, so that a late helper does not leave the caller waiting long.
  int chunks = helpers == 0 ? 1 : std::clamp((4 * (helpers + 1) + blocks - 1) / blocks, 1,
                                              (g.vecs + kT - 1) / kT);
  ParallelFor(pool, helpers, blocks * chunks, [&L, chunks](int i) { RunItem(L, i, chunks); });
}

// y[0:n] += a * x[0:n]
inline void Axpy(int n, float a, const float* x, float* y) {
  const vf av = splat(a);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf r = load(y + i) + av * load(x + i);
    std::memcpy(y + i, &r, sizeof(r));
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

struct ChannelStats {
  float sum, max;
  bool nonzero;
};

// Sum, max and "any nonzero" of one channel plane, 8 lanes at a time.
ChannelStats Scan(const float* p, int n) {
  vf sum = splat(0.0f), mx = splat(-INFINITY);
  vi nz = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf v = load(p + i);
    sum += v;
    mx = (vf)(((vi)v & (vi)(v > mx)) | ((vi)mx & ~(vi)(v > mx)));
    nz |= (vi)(v != splat(0.0f));
  }
  ChannelStats st{0.0f, -INFINITY, false};
  for (int l = 0; l < kLanes; ++l) {
    st.sum += sum[l];
    st.max = std::max(st.max, mx[l]);
    st.nonzero |= nz[l] != 0;
  }
  for (; i < n; ++i) {
    st.sum += p[i];
    st.max = std::max(st.max, p[i]);
    st.nonzero |= p[i] != 0.0f;
  }
  return st;
}

// One call's geometry, shared operands and attributes.
struct Spec {
  Geometry g;
  const float *w, *b, *head_w, *head_b, *head_colsum;
  bool gated, relu, post_relu, after_block, pool_max, softmax, sparse, depthwise,
      standardize;
};

// One sample: x (Cin,H,W), rs its residual (nullptr: none) -> ys, out_logits, mask.
// ``pool`` (null: this thread alone) splits the sample's conv across threads.
void RunSample(const Spec& s, const float* xs, const float* rs, float* ys,
               float* out_logits, float* mask, ffi::ThreadPool* pool) {
  const Geometry& g = s.g;
  const int hw = g.h * g.w;

  // Input channel scan: pooled value (head) and "not identically zero" (sparse; and
  // SPEC 2.2's depthwise rule: a channel switched off upstream stays off).
  std::vector<float> pooled(g.cin);
  std::vector<char> nonzero(g.cin);
  std::vector<int> in_idx;
  in_idx.reserve(g.cin);
  for (int c = 0; c < g.cin; ++c) {
    ChannelStats st = Scan(xs + static_cast<size_t>(c) * hw, hw);
    pooled[c] = s.pool_max ? st.max : st.sum / hw;
    nonzero[c] = st.nonzero;
    if (st.nonzero || !s.sparse) in_idx.push_back(c);
  }

  // Head: logits and the applied mask (all ones without a head).
    std::fill(out_logits, out_logits + g.cout, 0.0f);
  std::fill(mask, mask + g.cout, 1.0f);
  if (s.gated) {
    if (s.softmax) {
      float mx = *std::max_element(pooled.begin(), pooled.end()), sum = 0.0f;
      for (float& v : pooled) sum += (v = std::exp(v - mx));
      for (float& v : pooled) v /= sum;
    }
    if (s.standardize) {  // GateConfig.head_norm='standardize': (v - mean) / (std + 1e-6)
      float mean = 0.0f, var = 0.0f;
      for (float v : pooled) mean += v;
      mean /= g.cin;
      for (float v : pooled) var += (v - mean) * (v - mean);
      const float scale = 1.0f / (std::sqrt(var / g.cin) + 1e-6f);
      for (float& v : pooled) v = (v - mean) * scale;
    }
    // logits = head_b + pooled @ head_w, reading only the rows of channels that are
    // not all zero: an all-zero channel pools to 0, so every one of them has the same
    // head input s0 (softmax(0), or 0; standardized alike), and together they add
    // s0 * (colsum - the other rows' sum). A 1024-channel MobileNet head is 4 MB; most
    // rows are skipped.
    float s0 = 0.0f;
    for (int c = 0; c < g.cin; ++c)
      if (!nonzero[c]) {
        s0 = pooled[c];
        break;
      }
    const float* hb = s.head_b;
    const float* colsum = s.head_colsum;
    for (int o = 0; o < g.cout; ++o) out_logits[o] = hb[o] + s0 * colsum[o];
    for (int c = 0; c < g.cin; ++c)
      if (nonzero[c])
        Axpy(g.cout, pooled[c] - s0, s.head_w + static_cast<size_t>(c) * g.cout,
             out_logits);
    for (int o = 0; o < g.cout; ++o)
      mask[o] = out_logits[o] > 0.0f && (!s.depthwise || nonzero[o]) ? 1.0f : 0.0f;
  }
  std::vector<int> outs;
  outs.reserve(g.cout);
  for (int o = 0; o < g.cout; ++o)
    if (mask[o] > 0.0f || !s.sparse) outs.push_back(o);

  // Channels not computed: mask 0, so the output is post(residual) (0 after_block).
  const size_t opix = static_cast<size_t>(g.ho) * g.wo;
  std::vector<char> computed(g.cout, 0);
  for (int o : outs) computed[o] = 1;
  for (int o = 0; o < g.cout; ++o) {
    if (computed[o]) continue;
    float* d = ys + o * opix;
    if (!rs || s.after_block) {
      std::fill(d, d + opix, 0.0f);
    } else {
      const float* r = rs + o * opix;
      for (size_t i = 0; i < opix; ++i) d[i] = s.post_relu ? Relu(r[i]) : r[i];
    }
  }
  if (outs.empty()) return;

  // A depthwise conv reads exactly the channels it computes.
  const std::vector<int>& packed = s.depthwise ? outs : in_idx;
  static thread_local std::vector<float> xp;
  xp.resize(std::max<size_t>(1, packed.size() * static_cast<size_t>(g.plane)));
  PackInput(g, xs, packed.data(), static_cast<int>(packed.size()), xp.data());
  Layer L{&g, xp.data(), s.w, s.b, rs, s.gated ? mask : nullptr,
          packed.data(), static_cast<int>(packed.size()), outs.data(),
          static_cast<int>(outs.size()), s.relu, s.post_relu, s.after_block, ys};
  if (s.depthwise)
    RunDepthwise(L);
  else
    RunParallel(L, pool);
}



ffi::Error GatedConvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                         ffi::Buffer<ffi::F32> head_w, ffi::Buffer<ffi::F32> head_b,
                         ffi::Buffer<ffi::F32> head_colsum, ffi::Buffer<ffi::F32> residual,
                         ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> logits,
                         ffi::ResultBuffer<ffi::F32> mask_out,
                         int64_t stride, int64_t pad, bool relu, bool post_relu,
                         bool after_block, bool pool_max, bool softmax, bool sparse,
                         bool depthwise, bool standardize) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[1] != (depthwise ? 1 : xd[1]) ||
      (depthwise && wd[0] != xd[1]) || wd[2] != wd[3] || wd[2] > 8)
    return ffi::Error::InvalidArgument(
        "gated_conv: expected x (N,Cin,H,W) and w (Cout,Cin,k,k) (depthwise: (Cin,1,k,k)), "
        "k<=8");
  const int n = xd[0];
  Spec s{MakeGeometry(xd[1], xd[2], xd[3], wd[0], wd[2], stride, pad), w.typed_data(),
         b.typed_data(), head_w.typed_data(), head_b.typed_data(), head_colsum.typed_data(),
         head_w.element_count() > 0, relu, post_relu, after_block, pool_max, softmax, sparse,
         depthwise, standardize};
  const Geometry& g = s.g;
  const bool has_res = residual.element_count() > 0;
  if (s.gated && (head_w.element_count() != static_cast<size_t>(g.cin) * g.cout ||
                  head_b.element_count() != static_cast<size_t>(g.cout) ||
                  head_colsum.element_count() != static_cast<size_t>(g.cout)))
    return ffi::Error::InvalidArgument(
        "gated_conv: head must be (Cin,Cout), (Cout,) and its column sums (Cout,)");
  const size_t in_size = static_cast<size_t>(g.cin) * g.h * g.w;
  const size_t out_size = static_cast<size_t>(g.cout) * g.ho * g.wo;
  if (has_res && residual.element_count() != n * out_size)
    return ffi::Error::InvalidArgument("gated_conv: residual must be (N,Cout,Ho,Wo)");
  const float* xs = x.typed_data();
  const float* rs = has_res ? residual.typed_data() : nullptr;
  float* ys = y->typed_data();
  float* ls = logits->typed_data();
  float* ms = mask_out->typed_data();
  auto sample = [&](int i, ffi::ThreadPool* p) {
    RunSample(s, xs + i * in_size, rs ? rs + i * out_size : nullptr, ys + i * out_size,
              ls + static_cast<size_t>(i) * g.cout, ms + static_cast<size_t>(i) * g.cout, p);
  };
  if (n == 1) {
    sample(0, &pool);  // the threads split the sample's conv
    return ffi::Error::Success();
  }
  // Per-sample masks make a batch independent samples: the threads split the samples,
  // each sample runs on one thread (no barrier inside a sample's layer).
  int64_t macs = static_cast<int64_t>(n) * g.cout * (depthwise ? 1 : g.cin) * g.k * g.k *
                 g.ho * g.wo;
  int helpers = macs < kMinParallelMacs ? 0 : static_cast<int>(pool.num_threads());
  ParallelFor(&pool, helpers, n, [&sample](int i) { sample(i, nullptr); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FttwGatedConv, GatedConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
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
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("post_relu")
                                  .Attr<bool>("after_block")
                                  .Attr<bool>("pool_max")
                                  .Attr<bool>("softmax")
                                  .Attr<bool>("sparse")
                                  .Attr<bool>("depthwise")
                                  .Attr<bool>("standardize"));
