// foveal_native::na_forward / na_backward: neighbourhood attention over exactly the pairs a Neighborhood allows.
//
// The pattern arrives as per-axis tables made by foveal.kernels.native.neighborhood from
// Neighborhood.progression (NATTEN's definition: dilation, stride groups, per-axis causal): for every
// coordinate x of axis a, the first key first[a][x] and the number of keys count[a][x] (step dilation[a]);
// a query's keys are the product of its per-axis progressions. Grids of 1 or 2 axes are padded to 3 with
// leading axes of length 1. Every query computes scores against its own keys only (at most
// prod(kernel_size)), vectorised over head_dim with ATen's Vectorized; softmax with the row's maximum
// subtracted; out and lse in the compute type (float or double).
//
// Backward (FlashAttention-2 style, recomputing P from the lse) in two passes without atomics:
//  1. per query: P and dS of its window (stored per (query, window slot): O(N·prod(kernel_size)), never N×N)
//     and dq;
//  2. per key: NATTEN's inverse neighbourhood (the queries whose window holds the key, again a product of
//     per-axis lists inv_ptr/inv_x/inv_m giving each such query's coordinate and the key's slot in its
//     window): dk and dv summed over those queries (and over the query heads sharing the key head, GQA),
//     each key written by one task.
// Parallel over (batch, head, rows of the grid's last axis) with at::parallel_for.
#include "flash_tile.h"  // first: sets the vector instruction set (CPU_CAPABILITY) before ATen's headers

#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace foveal {
namespace na {

using at::vec::Vectorized;

struct Geo {
  int64_t L[3], K[3], dil[3];
  const int64_t *first[3], *count[3];
  const int64_t *inv_ptr[3] = {nullptr, nullptr, nullptr}, *inv_x[3] = {nullptr, nullptr, nullptr},
                *inv_m[3] = {nullptr, nullptr, nullptr};
  const int64_t* bidx[3] = {nullptr, nullptr, nullptr};  // (L_a, kk) table offsets per axis, or null
  int64_t kk = 0;
  int64_t N() const { return L[0] * L[1] * L[2]; }
  int64_t KM() const { return K[0] * K[1] * K[2]; }
};

// the keys of query (x0, x1, x2): flat key index, slot in the K0·K1·K2 window, table offset; returns how many
inline int64_t window(const Geo& g, int64_t x0, int64_t x1, int64_t x2, int64_t* idx, int64_t* slot, int64_t* boff) {
  const int64_t f0 = g.first[0][x0], c0 = g.count[0][x0];
  const int64_t f1 = g.first[1][x1], c1 = g.count[1][x1];
  const int64_t f2 = g.first[2][x2], c2 = g.count[2][x2];
  int64_t n = 0;
  for (int64_t m0 = 0; m0 < c0; ++m0) {
    const int64_t y0 = f0 + m0 * g.dil[0];
    for (int64_t m1 = 0; m1 < c1; ++m1) {
      const int64_t y1 = f1 + m1 * g.dil[1];
      const int64_t base = (y0 * g.L[1] + y1) * g.L[2] + f2;
      const int64_t sbase = (m0 * g.K[1] + m1) * g.K[2];
      int64_t b01 = 0;
      if (boff) b01 = g.bidx[0][x0 * g.kk + m0] + g.bidx[1][x1 * g.kk + m1];
      for (int64_t m2 = 0; m2 < c2; ++m2) {
        idx[n] = base + m2 * g.dil[2];
        slot[n] = sbase + m2;
        if (boff) boff[n] = b01 + g.bidx[2][x2 * g.kk + m2];
        ++n;
      }
    }
  }
  return n;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  T s = 0;
  if (n >= W) {
    V acc0(T(0)), acc1(T(0));
    for (; c + 2 * W <= n; c += 2 * W) {
      acc0 = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc0);
      acc1 = at::vec::fmadd(V::loadu(a + c + W), V::loadu(b + c + W), acc1);
    }
    for (; c + W <= n; c += W) acc0 = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc0);
    s = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, acc0 + acc1);
  }
  for (; c < n; ++c) s += a[c] * b[c];
  return s;
}

// y += alpha · x
template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V a(alpha);
  int64_t c = 0;
  for (; c + W <= n; c += W) at::vec::fmadd(a, V::loadu(x + c), V::loadu(y + c)).store(y + c);
  for (; c < n; ++c) y[c] += alpha * x[c];
}

// acc[c] = Σ_t w[t] · rows[idx[t]·stride + c] for c < n, accumulators held in registers over the keys
// (a chunk of NV vectors at a time); rows with w[t] == 0 are skipped
template <typename T, int NV>
inline void wsum_chunk(const T* w, const int64_t* idx, int64_t nk, const T* rows, int64_t stride, int64_t c0, T* acc) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V a[NV];
  for (int u = 0; u < NV; ++u) a[u] = V(T(0));
  for (int64_t t = 0; t < nk; ++t) {
    if (w[t] == T(0)) continue;
    const V wt(w[t]);
    const T* r = rows + idx[t] * stride + c0;
    for (int u = 0; u < NV; ++u) a[u] = at::vec::fmadd(wt, V::loadu(r + u * W), a[u]);
  }
  for (int u = 0; u < NV; ++u) a[u].store(acc + c0 + u * W);
}

template <typename T>
inline void wsum(const T* w, const int64_t* idx, int64_t nk, const T* rows, int64_t stride, int64_t n, T* acc) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) wsum_chunk<T, 4>(w, idx, nk, rows, stride, c, acc);
  for (; c + 2 * W <= n; c += 2 * W) wsum_chunk<T, 2>(w, idx, nk, rows, stride, c, acc);
  for (; c + W <= n; c += W) wsum_chunk<T, 1>(w, idx, nk, rows, stride, c, acc);
  for (; c < n; ++c) {
    T s = 0;
    for (int64_t t = 0; t < nk; ++t) s += w[t] * rows[idx[t] * stride + c];
    acc[c] = s;
  }
}

// out[t] = a · rows[idx[t]·stride] (length n) for t < nk, four keys at a time (independent accumulators)
template <typename T>
inline void dots(const T* a, const int64_t* idx, int64_t nk, const T* rows, int64_t stride, int64_t n, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const auto add = [](V& x, V& y) { return x + y; };
  int64_t t = 0;
  const int64_t nv = n / W * W;
  for (; t + 4 <= nk; t += 4) {
    const T* r0 = rows + idx[t] * stride;
    const T* r1 = rows + idx[t + 1] * stride;
    const T* r2 = rows + idx[t + 2] * stride;
    const T* r3 = rows + idx[t + 3] * stride;
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t c = 0; c < nv; c += W) {
      const V x = V::loadu(a + c);
      a0 = at::vec::fmadd(x, V::loadu(r0 + c), a0);
      a1 = at::vec::fmadd(x, V::loadu(r1 + c), a1);
      a2 = at::vec::fmadd(x, V::loadu(r2 + c), a2);
      a3 = at::vec::fmadd(x, V::loadu(r3 + c), a3);
    }
    T s0 = nv ? at::vec::vec_reduce_all<T>(add, a0) : T(0), s1 = nv ? at::vec::vec_reduce_all<T>(add, a1) : T(0);
    T s2 = nv ? at::vec::vec_reduce_all<T>(add, a2) : T(0), s3 = nv ? at::vec::vec_reduce_all<T>(add, a3) : T(0);
    for (int64_t c = nv; c < n; ++c) {
      s0 += a[c] * r0[c];
      s1 += a[c] * r1[c];
      s2 += a[c] * r2[c];
      s3 += a[c] * r3[c];
    }
    out[t] = s0;
    out[t + 1] = s1;
    out[t + 2] = s2;
    out[t + 3] = s3;
  }
  for (; t < nk; ++t) out[t] = dot(a, rows + idx[t] * stride, n);
}

// s *= scale; returns max s
template <typename T>
inline T scale_max(T* s, int64_t n, T scale) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V sv(scale);
  V mx(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const V x = V::loadu(s + c) * sv;
    x.store(s + c);
    mx = at::vec::maximum(mx, x);
  }
  T m = at::vec::vec_reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, mx);
  for (; c < n; ++c) {
    s[c] *= scale;
    m = std::max(m, s[c]);
  }
  return m;
}

template <typename T>
struct Terms {
  T scale;
  bool has_cap;
  T cap;
  const bool* pad;    // (B, N) or null
  const T* sink;      // (Hq,) or null
  const T* table;     // (Hq, S) or null
  int64_t table_stride;
};

// scores of query row qi against its n keys: sc[t]; tanh of the capped score in th[t] when has_cap
template <typename T>
inline T scores(const T* qi, const T* kb, int64_t D, const int64_t* idx, const int64_t* boff, int64_t n,
                const bool* pb, const T* tb, const Terms<T>& tm, T* sc, T* th) {
  constexpr T NEG = -std::numeric_limits<T>::infinity();
  dots(qi, idx, n, kb, D, D, sc);
  if (!pb && !tm.has_cap && !tb) return scale_max(sc, n, tm.scale);
  T m = NEG;
  for (int64_t t = 0; t < n; ++t) {
    T s;
    if (pb && pb[idx[t]]) {
      s = NEG;
    } else {
      s = sc[t] * tm.scale;
      if (tm.has_cap) {
        const T h = std::tanh(s / tm.cap);
        if (th) th[t] = h;
        s = tm.cap * h;
      }
      if (tb) s += tb[boff[t]];
    }
    sc[t] = s;
    m = std::max(m, s);
  }
  return m;
}

// ---- the tiled path: W queries of one grid row (the vector's lanes) whose windows on the last axis are the first
// one's shifted by one key per query (inside the grid, away from its borders, stride 1 on that axis). Then the
// t-th query's key of every window slot is the first query's key + t, so with q, k, v transposed to (D, N) rows
// (padded by W columns so a tile never reads past a row) every score and output is a full-width vector
// operation over the tile's queries: no horizontal sums, no gathers.

// the n window keys idx[s] (flat token = row·NP + x) as offsets into row-transposed k (D channels) and v (Dv):
// token (row, x), channel c at (row·E + c)·NP + x
inline void transposed_offsets(const int64_t* idx, int64_t n, int64_t NP, int64_t D, int64_t Dv, int64_t* kix,
                               int64_t* vix) {
  for (int64_t s = 0; s < n; ++s) {
    const int64_t kr = idx[s] / NP, kx = idx[s] - kr * NP;
    kix[s] = kr * D * NP + kx;
    vix[s] = kr * Dv * NP + kx;
  }
}

// the number of queries from x2 on (at most W) that form such a tile
inline int64_t shift_run(const Geo& g, int64_t x2, int64_t W) {
  const int64_t f = g.first[2][x2], c = g.count[2][x2];
  int64_t r = 1;
  while (r < W && x2 + r < g.L[2] && g.first[2][x2 + r] == f + r && g.count[2][x2 + r] == c) ++r;
  return r;
}

// dst[t·ld + c] = O[c·W + t] for t < run, c < D: a tile's (D, W) result back to token-major rows
template <typename T>
inline void untile(const T* O, int64_t D, int64_t run, T* dst, int64_t ld) {
  at::vec::transpose_mxn<T>(O, Vectorized<T>::size(), dst, ld, int(D), int(run));
}

// dst[0:run] = src[0:run] (run ≤ W) as one (masked) vector store
template <typename T>
inline void store_run(const T* src, int64_t run, T* dst) {
  Vectorized<T>::loadu(src).store(dst, run);
}

// S[u·W + t] = Σ_c Qt[c][i0 + t] · Kt[c][idx[u] + t] for u < NB
template <typename T, int NB>
inline void qk_block(const T* Qh, const T* Kh, int64_t NP, int64_t D, int64_t i0, const int64_t* idx, T* S) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[NB];
  for (int u = 0; u < NB; ++u) acc[u] = V(T(0));
  for (int64_t c = 0; c < D; ++c) {
    const V qv = V::loadu(Qh + c * NP + i0);
    const T* kr = Kh + c * NP;
    for (int u = 0; u < NB; ++u) acc[u] = at::vec::fmadd(qv, V::loadu(kr + idx[u]), acc[u]);
  }
  for (int u = 0; u < NB; ++u) acc[u].store(S + u * W);
}

template <typename T>
inline void qk_tile(const T* Qh, const T* Kh, int64_t NP, int64_t D, int64_t i0, const int64_t* idx, int64_t n, T* S) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) qk_block<T, 8>(Qh, Kh, NP, D, i0, idx + t, S + t * W);
  for (; t + 4 <= n; t += 4) qk_block<T, 4>(Qh, Kh, NP, D, i0, idx + t, S + t * W);
  for (; t < n; ++t) qk_block<T, 1>(Qh, Kh, NP, D, i0, idx + t, S + t * W);
}

// O[(c0 + u)·W + t] = Σ_s S[s·W + t] · Vt[c0 + u][idx[s] + t] for u < NB
template <typename T, int NB>
inline void pv_block(const T* S, const int64_t* idx, int64_t n, const T* Vh, int64_t NP, int64_t c0, T* O) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[NB];
  for (int u = 0; u < NB; ++u) acc[u] = V(T(0));
  for (int64_t s = 0; s < n; ++s) {
    const V pv = V::loadu(S + s * W);
    for (int u = 0; u < NB; ++u) acc[u] = at::vec::fmadd(pv, V::loadu(Vh + (c0 + u) * NP + idx[s]), acc[u]);
  }
  for (int u = 0; u < NB; ++u) acc[u].store(O + (c0 + u) * W);
}

template <typename T>
inline void pv_tile(const T* S, const int64_t* idx, int64_t n, const T* Vh, int64_t NP, int64_t Dv, T* O) {
  int64_t c = 0;
  for (; c + 8 <= Dv; c += 8) pv_block<T, 8>(S, idx, n, Vh, NP, c, O);
  for (; c + 4 <= Dv; c += 4) pv_block<T, 4>(S, idx, n, Vh, NP, c, O);
  for (; c < Dv; ++c) pv_block<T, 1>(S, idx, n, Vh, NP, c, O);
}

// scores of a tile (scale, softcap, table term per slot), in place; returns the lanes' maximum (with the sink)
template <typename T>
inline Vectorized<T> tile_scores(T* S, int64_t n, const int64_t* boff, const T* tb, const Terms<T>& tm, T sk,
                                 T* TH) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V sv(tm.scale), cv(tm.cap), icv(T(1) / tm.cap);
  V m(sk);
  for (int64_t s = 0; s < n; ++s) {
    V x = V::loadu(S + s * W) * sv;
    if (tm.has_cap) {
      const V h = (x * icv).tanh();
      if (TH) h.store(TH + s * W);
      x = cv * h;
    }
    if (tb) x = x + V(tb[boff[s]]);
    x.store(S + s * W);
    m = at::vec::maximum(m, x);
  }
  return m;
}

template <typename T>
void forward_kernel(const T* q, const T* k, const T* v, T* out, T* lse, int64_t B, int64_t Hq, int64_t Hkv,
                    int64_t D, int64_t Dv, const Geo& g, const Terms<T>& tm, const T* Qt, const T* Kt, const T* Vt,
                    int64_t NP) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr T NEG = -std::numeric_limits<T>::infinity();
  const int64_t N = g.N(), KM = g.KM(), G = Hq / Hkv, rows = g.L[0] * g.L[1];
  const bool tiled = Qt != nullptr;
  at::parallel_for(0, B * Hq * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(KM), slot(KM), boff(KM);
    std::vector<T> sc(KM), acc(Dv), S(tiled ? KM * W : 0), O(tiled ? Dv * W : 0), lt(W);
    std::vector<int64_t> kix(tiled ? KM : 0), vix(tiled ? KM : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / rows, row = r % rows, b = bh / Hq, h = bh % Hq, hk = h / G;
      const int64_t x0 = row / g.L[1], x1 = row % g.L[1];
      const T* kb = k + (b * Hkv + hk) * N * D;
      const T* vb = v + (b * Hkv + hk) * N * Dv;
      const bool* pb = tm.pad ? tm.pad + b * N : nullptr;
      const T* tb = tm.table ? tm.table + h * tm.table_stride : nullptr;
      const T sk = tm.sink ? tm.sink[h] : NEG;
      for (int64_t x2 = 0; x2 < g.L[2];) {
        const int64_t i = row * g.L[2] + x2;
        const int64_t n = window(g, x0, x1, x2, idx.data(), slot.data(), tb ? boff.data() : nullptr);
        const int64_t run = tiled ? shift_run(g, x2, W) : 1;
        if (run >= 4) {
          // row-transposed offsets: token (row, x2), channel c at (row·D + c)·L2 + x2
          const T* Qh = Qt + bh * N * D;
          const T* Kh = Kt + (b * Hkv + hk) * N * D;
          const T* Vh = Vt + (b * Hkv + hk) * N * Dv;
          transposed_offsets(idx.data(), n, NP, D, Dv, kix.data(), vix.data());
          qk_tile(Qh, Kh, NP, D, row * D * NP + x2, kix.data(), n, S.data());
          const V m = tile_scores<T>(S.data(), n, boff.data(), tb, tm, sk, nullptr);
          V l(T(0));
          for (int64_t s = 0; s < n; ++s) {
            const V e = tile::vexp(V::loadu(S.data() + s * W) - m);
            e.store(S.data() + s * W);
            l = l + e;
          }
          if (tm.sink) l = l + tile::vexp(V(sk) - m);
          pv_tile(S.data(), vix.data(), n, Vh, NP, Dv, O.data());
          const V inv = V(T(1)) / l;
          (m + l.log()).store(lt.data());
          for (int64_t c = 0; c < Dv; ++c) (V::loadu(O.data() + c * W) * inv).store(O.data() + c * W);
          untile(O.data(), Dv, run, out + (bh * N + i) * Dv, Dv);
          store_run(lt.data(), run, lse + bh * N + i);
          x2 += run;
          continue;
        }
        const T* qi = q + (bh * N + i) * D;
        T* o = out + (bh * N + i) * Dv;
        const T m = scores<T>(qi, kb, D, idx.data(), boff.data(), n, pb, tb, tm, sc.data(), nullptr);
        const T mm = std::max(m, sk);
        ++x2;
        if (mm == NEG) {
          std::fill(o, o + Dv, T(0));
          lse[bh * N + i] = NEG;
          continue;
        }
        T l = tile::exp_sum(sc.data(), n, mm);
        if (tm.sink) l += std::exp(sk - mm);
        wsum(sc.data(), idx.data(), n, vb, Dv, Dv, acc.data());
        const T inv = T(1) / l;
        for (int64_t c = 0; c < Dv; ++c) o[c] = acc[c] * inv;
        lse[bh * N + i] = mm + std::log(l);
      }
    }
  });
}

// pass 1: per query, P and dS (the gradient of q·k, scale and softcap folded in) in window slots, and dq
template <typename T>
void backward_q_kernel(const T* dout, const T* q, const T* k, const T* v, const T* lse, const T* delta, T* dq, T* P,
                       T* dS, T* dB, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t Dv, const Geo& g,
                       const Terms<T>& tm, const T* Qt, const T* Kt, const T* Vt, const T* dOt, int64_t NP) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr T NEG = -std::numeric_limits<T>::infinity();
  const int64_t N = g.N(), KM = g.KM(), G = Hq / Hkv, rows = g.L[0] * g.L[1];
  const bool tiled = Qt != nullptr;
  at::parallel_for(0, B * Hq * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(KM), slot(KM), boff(KM);
    std::vector<T> sc(KM), th(KM), dp(KM);
    const int64_t TS = tiled ? KM * W : 0;
    std::vector<T> S(TS), TH(TS), DP(TS), DB(dB ? TS : 0), O(tiled ? D * W : 0), lt(W), dt(W);
    std::vector<int64_t> kix(tiled ? KM : 0), vix(tiled ? KM : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bh = r / rows, row = r % rows, b = bh / Hq, h = bh % Hq, hk = h / G;
      const int64_t x0 = row / g.L[1], x1 = row % g.L[1];
      const T* kb = k + (b * Hkv + hk) * N * D;
      const T* vb = v + (b * Hkv + hk) * N * Dv;
      const bool* pb = tm.pad ? tm.pad + b * N : nullptr;
      const T* tb = tm.table ? tm.table + h * tm.table_stride : nullptr;
      for (int64_t x2 = 0; x2 < g.L[2]; ++x2) {
        const int64_t i = row * g.L[2] + x2;
        const int64_t qi_off = bh * N + i;
        const int64_t run = tiled ? shift_run(g, x2, W) : 1;
        if (run >= 4) {  // a tile (no key padding here: every lse is finite)
          const int64_t n = window(g, x0, x1, x2, idx.data(), slot.data(), tb ? boff.data() : nullptr);
          const T* Qh = Qt + bh * N * D;
          const T* dOh = dOt + bh * N * Dv;
          const T* Kh = Kt + (b * Hkv + hk) * N * D;
          const T* Vh = Vt + (b * Hkv + hk) * N * Dv;
          transposed_offsets(idx.data(), n, NP, D, Dv, kix.data(), vix.data());
          for (int64_t t = 0; t < W; ++t) {
            lt[t] = t < run ? lse[qi_off + t] : T(0);
            dt[t] = t < run ? delta[qi_off + t] : T(0);
          }
          qk_tile(Qh, Kh, NP, D, row * D * NP + x2, kix.data(), n, S.data());
          tile_scores<T>(S.data(), n, boff.data(), tb, tm, NEG, TH.data());
          qk_tile(dOh, Vh, NP, Dv, row * Dv * NP + x2, vix.data(), n, DP.data());
          const V lv = V::loadu(lt.data()), dv = V::loadu(dt.data()), sv(tm.scale), one(T(1));
          for (int64_t s = 0; s < n; ++s) {
            const V p = tile::vexp(V::loadu(S.data() + s * W) - lv);
            p.store(S.data() + s * W);
            const V ds = p * (V::loadu(DP.data() + s * W) - dv);
            if (dB) ds.store(DB.data() + s * W);
            V dsr = ds * sv;
            if (tm.has_cap) {
              const V h = V::loadu(TH.data() + s * W);
              dsr = dsr * (one - h * h);
            }
            dsr.store(DP.data() + s * W);
          }
          pv_tile(DP.data(), kix.data(), n, Kh, NP, D, O.data());
          untile(O.data(), D, run, dq + qi_off * D, D);
          for (int64_t t = 0; dB && t < run; ++t) {  // the table's gradient stays (query, slot)
            T* dBi = dB + (qi_off + t) * KM;
            if (n < KM) std::fill(dBi, dBi + KM, T(0));
            for (int64_t s = 0; s < n; ++s) dBi[slot[s]] = DB[s * W + t];
          }
          // P and dS slot-major: (batch·head, slot, query), `run` consecutive queries per slot
          T* Ph = P + bh * KM * N;
          T* dSh = dS + bh * KM * N;
          if (n < KM) {  // a causal window's missing slots
            for (int64_t s = 0; s < KM; ++s) {
              std::fill(Ph + s * N + i, Ph + s * N + i + run, T(0));
              std::fill(dSh + s * N + i, dSh + s * N + i + run, T(0));
            }
          }
          for (int64_t s = 0; s < n; ++s) {
            store_run(S.data() + s * W, run, Ph + slot[s] * N + i);
            store_run(DP.data() + s * W, run, dSh + slot[s] * N + i);
          }
          x2 += run - 1;
          continue;
        }
        T* dqi = dq + qi_off * D;
        const T li = lse[qi_off];
        T* Ph = P + bh * KM * N;
        T* dSh = dS + bh * KM * N;
        for (int64_t s = 0; s < KM; ++s) Ph[s * N + i] = dSh[s * N + i] = T(0);
        if (dB) std::fill(dB + qi_off * KM, dB + (qi_off + 1) * KM, T(0));
        if (li == NEG) {  // no key and no sink: nothing flows back
          std::fill(dqi, dqi + D, T(0));
          continue;
        }
        const T* qi = q + qi_off * D;
        const T* doi = dout + qi_off * Dv;
        const T di = delta[qi_off];
        const int64_t n = window(g, x0, x1, x2, idx.data(), slot.data(), tb ? boff.data() : nullptr);
        scores<T>(qi, kb, D, idx.data(), boff.data(), n, pb, tb, tm, sc.data(), th.data());
        tile::exp_sum(sc.data(), n, li);
        dots(doi, idx.data(), n, vb, Dv, Dv, dp.data());
        T* dBi = dB ? dB + qi_off * KM : nullptr;
        for (int64_t t = 0; t < n; ++t) {
          const T p = sc[t];
          if (p == T(0)) {
            dp[t] = T(0);
            continue;
          }
          const T ds = p * (dp[t] - di);
          if (dBi) dBi[slot[t]] = ds;
          T dsr = ds * tm.scale;
          if (tm.has_cap) dsr *= T(1) - th[t] * th[t];
          Ph[slot[t] * N + i] = p;
          dSh[slot[t] * N + i] = dsr;
          dp[t] = dsr;
        }
        wsum(dp.data(), idx.data(), n, kb, D, D, dqi);
      }
    }
  });
}

// the most queries (over all axes) whose window holds one key
inline int64_t max_inverse(const Geo& g) {
  int64_t m = 1;
  for (int a = 0; a < 3; ++a) {
    int64_t ma = 0;
    for (int64_t y = 0; y < g.L[a]; ++y) ma = std::max(ma, g.inv_ptr[a][y + 1] - g.inv_ptr[a][y]);
    m *= ma;
  }
  return m;
}

// the number of keys from y2 on (at most W) whose inverse neighbourhoods on the last axis are the first one's
// shifted by one query per key (same window slots)
inline int64_t inverse_shift_run(const Geo& g, int64_t y2, int64_t W) {
  const int64_t p0 = g.inv_ptr[2][y2], len = g.inv_ptr[2][y2 + 1] - p0;
  int64_t r = 1;
  for (; r < W && y2 + r < g.L[2]; ++r) {
    const int64_t pr = g.inv_ptr[2][y2 + r];
    if (g.inv_ptr[2][y2 + r + 1] - pr != len) break;
    bool same = true;
    for (int64_t e = 0; e < len && same; ++e)
      same = g.inv_x[2][pr + e] == g.inv_x[2][p0 + e] + r && g.inv_m[2][pr + e] == g.inv_m[2][p0 + e];
    if (!same) break;
  }
  return r;
}

// O[(c0 + u)·W + t] = Σ_e Wb[woff[e] + t] · Rb[roff[e] + (c0 + u)·NP + t] for u < NB
template <typename T, int NB>
inline void wr_block(const T* Wb, const int64_t* woff, const T* Rb, const int64_t* roff, int64_t ne, int64_t NP,
                     int64_t c0, T* O) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[NB];
  for (int u = 0; u < NB; ++u) acc[u] = V(T(0));
  for (int64_t e = 0; e < ne; ++e) {
    const V wv = V::loadu(Wb + woff[e]);
    const T* r = Rb + roff[e] + c0 * NP;
    for (int u = 0; u < NB; ++u) acc[u] = at::vec::fmadd(wv, V::loadu(r + u * NP), acc[u]);
  }
  for (int u = 0; u < NB; ++u) acc[u].store(O + (c0 + u) * W);
}

template <typename T>
inline void wr_tile(const T* Wb, const int64_t* woff, const T* Rb, const int64_t* roff, int64_t ne, int64_t NP,
                    int64_t D, T* O) {
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) wr_block<T, 8>(Wb, woff, Rb, roff, ne, NP, c, O);
  for (; c + 4 <= D; c += 4) wr_block<T, 4>(Wb, woff, Rb, roff, ne, NP, c, O);
  for (; c < D; ++c) wr_block<T, 1>(Wb, woff, Rb, roff, ne, NP, c, O);
}

// pass 2: per key, over the queries whose window holds it (the inverse neighbourhood) in all the query heads that
// share its key head, dk = Σ dS·q and dv = Σ P·dO. P and dS are slot-major (batch·head, slot, query). Keys whose
// inverse neighbourhoods shift by one query per key run W at a time over row-transposed q and dO.
template <typename T>
void backward_kv_kernel(const T* dout, const T* q, const T* P, const T* dS, T* dk, T* dv, int64_t B, int64_t Hq,
                        int64_t Hkv, int64_t D, int64_t Dv, const Geo& g, const T* Qt, const T* dOt, int64_t NP) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t N = g.N(), KM = g.KM(), G = Hq / Hkv, rows = g.L[0] * g.L[1];
  const int64_t cap = max_inverse(g) * G;
  const bool tiled = Qt != nullptr;
  at::parallel_for(0, B * Hkv * rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> ii(cap), wo(cap), qo(cap), oo(cap);
    std::vector<T> pw(cap), dw(cap), O(tiled ? std::max(D, Dv) * W : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bhk = r / rows, row = r % rows, b = bhk / Hkv, hk = bhk % Hkv;
      const int64_t y0 = row / g.L[1], y1 = row % g.L[1];
      const int64_t head0 = b * Hq + hk * G;  // the first query head of this key head
      const T* Pb = P + head0 * KM * N;
      const T* dSb = dS + head0 * KM * N;
      for (int64_t y2 = 0; y2 < g.L[2];) {
        const int64_t j = row * g.L[2] + y2;
        const int64_t run = tiled ? inverse_shift_run(g, y2, W) : 1;
        int64_t n = 0;
        for (int64_t gg = 0; gg < G; ++gg) {
          for (int64_t e0 = g.inv_ptr[0][y0]; e0 < g.inv_ptr[0][y0 + 1]; ++e0) {
            const int64_t x0 = g.inv_x[0][e0], m0 = g.inv_m[0][e0];
            for (int64_t e1 = g.inv_ptr[1][y1]; e1 < g.inv_ptr[1][y1 + 1]; ++e1) {
              const int64_t x1 = g.inv_x[1][e1], m1 = g.inv_m[1][e1];
              const int64_t qrow = x0 * g.L[1] + x1, tbase = (m0 * g.K[1] + m1) * g.K[2];
              for (int64_t e2 = g.inv_ptr[2][y2]; e2 < g.inv_ptr[2][y2 + 1]; ++e2) {
                const int64_t x2 = g.inv_x[2][e2], t = tbase + g.inv_m[2][e2];
                const int64_t i = qrow * g.L[2] + x2;
                if (run >= 4) {
                  wo[n] = (gg * KM + t) * N + i;
                  qo[n] = gg * N * D + qrow * D * NP + x2;
                  oo[n] = gg * N * Dv + qrow * Dv * NP + x2;
                } else {
                  ii[n] = gg * N + i;
                  pw[n] = Pb[(gg * KM + t) * N + i];
                  dw[n] = dSb[(gg * KM + t) * N + i];
                }
                ++n;
              }
            }
          }
        }
        if (run >= 4) {
          wr_tile(dSb, wo.data(), Qt + head0 * N * D, qo.data(), n, NP, D, O.data());
          untile(O.data(), D, run, dk + (bhk * N + j) * D, D);
          wr_tile(Pb, wo.data(), dOt + head0 * N * Dv, oo.data(), n, NP, Dv, O.data());
          untile(O.data(), Dv, run, dv + (bhk * N + j) * Dv, Dv);
          y2 += run;
          continue;
        }
        wsum(dw.data(), ii.data(), n, q + head0 * N * D, D, D, dk + (bhk * N + j) * D);
        wsum(pw.data(), ii.data(), n, dout + head0 * N * Dv, Dv, Dv, dv + (bhk * N + j) * Dv);
        ++y2;
      }
    }
  });
}

// ---- op wrappers ----

void check_table(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.dim() >= 2 && t.size(0) == rows,
              "foveal_native neighbourhood: ", name, " must be a contiguous int64 tensor with ", rows, " rows");
}

Geo make_geo(const at::Tensor& geometry, const at::Tensor& first, const at::Tensor& count) {
  TORCH_CHECK(geometry.scalar_type() == at::kLong && geometry.is_contiguous() && geometry.numel() == 9,
              "foveal_native neighbourhood: geometry must be a contiguous int64 (3, 3) tensor (grid, kernel_size, "
              "dilation per axis)");
  check_table(first, "first", 3);
  check_table(count, "count", 3);
  Geo g;
  const int64_t* gp = geometry.data_ptr<int64_t>();
  const int64_t lmax = first.size(1);
  for (int a = 0; a < 3; ++a) {
    g.L[a] = gp[a];
    g.K[a] = gp[3 + a];
    g.dil[a] = gp[6 + a];
    TORCH_CHECK(g.L[a] >= 1 && g.L[a] <= lmax && g.K[a] >= 1 && g.dil[a] >= 1, "foveal_native neighbourhood: bad geometry");
    g.first[a] = first.data_ptr<int64_t>() + a * lmax;
    g.count[a] = count.data_ptr<int64_t>() + a * lmax;
  }
  return g;
}

template <typename T>
Terms<T> make_terms(double scale, const std::optional<at::Tensor>& pad, std::optional<double> softcap,
                    const std::optional<at::Tensor>& sink, const std::optional<at::Tensor>& table) {
  Terms<T> tm;
  tm.scale = static_cast<T>(scale);
  tm.has_cap = softcap.has_value();
  tm.cap = static_cast<T>(softcap.value_or(1.0));
  tm.pad = pad ? pad->data_ptr<bool>() : nullptr;
  tm.sink = sink ? sink->data_ptr<T>() : nullptr;
  tm.table = table ? table->data_ptr<T>() : nullptr;
  tm.table_stride = table ? table->size(1) : 0;
  return tm;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Geo& g,
                  const std::optional<at::Tensor>& pad, const std::optional<at::Tensor>& sink,
                  const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& bias_index) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "foveal_native neighbourhood: q, k, v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "foveal_native neighbourhood: q, k, v must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "foveal_native neighbourhood: q, k, v must all be float32 or all float64");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), N = g.N();
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0 && v.size(1) == Hkv && k.size(0) == B && v.size(0) == B,
              "foveal_native neighbourhood: heads or batch do not match");
  TORCH_CHECK(q.size(2) == N && k.size(2) == N && v.size(2) == N && k.size(3) == q.size(3),
              "foveal_native neighbourhood: tokens must equal the grid's size and k must have q's head_dim");
  if (pad)
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 && pad->size(0) == B &&
                    pad->size(1) == N,
                "foveal_native neighbourhood: key_padding_mask must be a contiguous bool (B, N) tensor");
  if (sink)
    TORCH_CHECK(sink->scalar_type() == q.scalar_type() && sink->is_contiguous() && sink->numel() == Hq,
                "foveal_native neighbourhood: sink_logits must be (Hq,) in q's dtype");
  TORCH_CHECK(table.has_value() == bias_index.has_value(),
              "foveal_native neighbourhood: bias_table and bias_index come together");
  if (table) {
    TORCH_CHECK(table->scalar_type() == q.scalar_type() && table->is_contiguous() && table->dim() == 2 &&
                    table->size(0) == Hq,
                "foveal_native neighbourhood: bias_table must be (Hq, S) contiguous in q's dtype");
    check_table(*bias_index, "bias_index", 3);
    TORCH_CHECK(bias_index->dim() == 3, "foveal_native neighbourhood: bias_index must be (3, Lmax, kk)");
  }
}

void attach_bias(Geo& g, const std::optional<at::Tensor>& bias_index) {
  if (!bias_index) return;
  const int64_t lmax = bias_index->size(1), kk = bias_index->size(2);
  TORCH_CHECK(kk >= std::max({g.K[0], g.K[1], g.K[2]}), "foveal_native neighbourhood: bias_index too narrow");
  g.kk = kk;
  for (int a = 0; a < 3; ++a) g.bidx[a] = bias_index->data_ptr<int64_t>() + a * lmax * kk;
}

// A workspace kept by the calling thread between calls for the tiled path's transposed copies: large fresh
// allocations are mapped anew by the system on every call, and their page faults cost as much as the
// copy (up to WORKSPACE_MAX elements kept; larger ones are allocated per call).
constexpr int64_t WORKSPACE_MAX = int64_t(1) << 24;

template <typename T>
T* workspace(int64_t n, std::vector<T>& fresh) {
  thread_local std::vector<T> kept;
  if (n > WORKSPACE_MAX) {
    fresh.resize(n);
    return fresh.data();
  }
  if (int64_t(kept.size()) < n) kept.resize(n);
  return kept.data();
}

// (B, H, N, D) tensors → row-transposed into their destinations: for every (batch·head, row of the grid's last axis)
// a (D, L2) block, then W zeros (a tile's lanes may read past its row's end, never past the copy's). One parallel
// region for all of them.
template <typename T>
void row_transposed(const std::vector<std::pair<const at::Tensor*, T*>>& jobs, int64_t L2) {
  constexpr int64_t W = Vectorized<T>::size();
  std::vector<int64_t> start(jobs.size() + 1, 0);
  for (size_t a = 0; a < jobs.size(); ++a) {
    const at::Tensor& x = *jobs[a].first;
    std::fill(jobs[a].second + x.numel(), jobs[a].second + x.numel() + W, T(0));
    start[a + 1] = start[a] + x.size(0) * x.size(1) * (x.size(2) / L2);
  }
  at::parallel_for(0, start.back(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      size_t a = 0;
      while (start[a + 1] <= r) ++a;
      const at::Tensor& x = *jobs[a].first;
      const int64_t D = x.size(3), rr = r - start[a];
      const T* s = x.data_ptr<T>() + rr * L2 * D;
      T* d = jobs[a].second + rr * D * L2;
      at::vec::transpose_mxn<T>(s, D, d, L2, int(L2), int(D));  // 16×16 register blocks for float on AVX-512
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& geometry, const at::Tensor& first,
                                              const at::Tensor& count, double scale,
                                              const std::optional<at::Tensor>& key_padding_mask,
                                              std::optional<double> softcap,
                                              const std::optional<at::Tensor>& sink_logits,
                                              const std::optional<at::Tensor>& bias_table,
                                              const std::optional<at::Tensor>& bias_index, bool keep_transposed) {
  Geo g = make_geo(geometry, first, count);
  check_inputs(q, k, v, g, key_padding_mask, sink_logits, bias_table, bias_index);
  attach_bias(g, bias_index);
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(3), Dv = v.size(3), N = g.N();
  at::Tensor out = at::empty({B, Hq, N, Dv}, q.options());
  at::Tensor lse = at::empty({B, Hq, N}, q.options());
  at::Tensor kept = at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "foveal_na_forward", [&] {
    const auto tm = make_terms<scalar_t>(scale, key_padding_mask, softcap, sink_logits, bias_table);
    const int64_t NP = g.L[2];  // the row-transposed tensors' stride over head_dim
    // the tiled path (no key padding): q, k, v row-transposed into one workspace
    const bool tiled = !key_padding_mask.has_value();
    constexpr int64_t W = Vectorized<scalar_t>::size();
    std::vector<scalar_t> fresh;
    scalar_t *Qt = nullptr, *Kt = nullptr, *Vt = nullptr;
    if (tiled) {
      const int64_t nq = q.numel() + W, nk = k.numel() + W, nv = v.numel() + W;
      if (keep_transposed) {  // handed to the backward, which then transposes only grad_out
        kept = at::empty({nq + nk + nv}, q.options());
        Qt = kept.data_ptr<scalar_t>();
      } else {
        Qt = workspace<scalar_t>(nq + nk + nv, fresh);
      }
      Kt = Qt + nq;
      Vt = Kt + nk;
      row_transposed<scalar_t>({{&q, Qt}, {&k, Kt}, {&v, Vt}}, NP);
    }
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, Hq, Hkv, D, Dv, g, tm,
                             Qt, Kt, Vt, NP);
  });
  return {out, lse, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> na_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, const at::Tensor& geometry, const at::Tensor& first, const at::Tensor& count,
    const at::Tensor& inv_ptr, const at::Tensor& inv_x, const at::Tensor& inv_m, double scale,
    const std::optional<at::Tensor>& key_padding_mask, std::optional<double> softcap,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& bias_index, bool need_bias_grad,
    const std::optional<at::Tensor>& transposed) {
  Geo g = make_geo(geometry, first, count);
  check_inputs(q, k, v, g, key_padding_mask, std::nullopt, bias_table, bias_index);
  attach_bias(g, bias_index);
  check_table(inv_ptr, "inv_ptr", 3);
  check_table(inv_x, "inv_x", 3);
  check_table(inv_m, "inv_m", 3);
  TORCH_CHECK(inv_x.sizes() == inv_m.sizes() && inv_ptr.size(1) == first.size(1) + 1,
              "foveal_native neighbourhood: inverse tables of the wrong shape");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(3), Dv = v.size(3), N = g.N(),
                KM = g.KM();
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == q.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({B, Hq, N, Dv}),
              "foveal_native neighbourhood: grad_out must be contiguous (B, Hq, N, Dv) in q's dtype");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == q.scalar_type() && out.sizes() == grad_out.sizes(),
              "foveal_native neighbourhood: out must be contiguous (B, Hq, N, Dv) in q's dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == q.scalar_type() && lse.numel() == B * Hq * N &&
                  (!grad_lse || (grad_lse->is_contiguous() && grad_lse->scalar_type() == q.scalar_type() &&
                                 grad_lse->numel() == B * Hq * N)),
              "foveal_native neighbourhood: lse and grad_lse must be contiguous (B, Hq, N) in q's dtype");
  const int64_t eb = inv_x.size(1);
  for (int a = 0; a < 3; ++a) {
    g.inv_ptr[a] = inv_ptr.data_ptr<int64_t>() + a * inv_ptr.size(1);
    g.inv_x[a] = inv_x.data_ptr<int64_t>() + a * eb;
    g.inv_m[a] = inv_m.data_ptr<int64_t>() + a * eb;
  }
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  at::Tensor delta = at::empty({B, Hq, N}, q.options());
  // every row of P, dS (and dB) is written by pass 1, zeros included
  // P and dS slot-major (B, Hq, KM, N), W more numbers at the end for the last tile's lanes
  const int64_t PW = q.scalar_type() == at::kDouble ? Vectorized<double>::size() : Vectorized<float>::size();
  at::Tensor P = at::empty({B * Hq * KM * N + PW}, q.options()), dS = at::empty({B * Hq * KM * N + PW}, q.options());
  P.narrow(0, B * Hq * KM * N, PW).zero_();
  dS.narrow(0, B * Hq * KM * N, PW).zero_();
  at::Tensor dB = need_bias_grad ? at::empty({B, Hq, N, KM}, q.options()) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "foveal_na_backward", [&] {
    const auto tm = make_terms<scalar_t>(scale, key_padding_mask, softcap, std::nullopt, bias_table);
    const int64_t NP = g.L[2];
    const bool tiled = !key_padding_mask.has_value();
    constexpr int64_t W = Vectorized<scalar_t>::size();
    std::vector<scalar_t> fresh;
    scalar_t *Qt = nullptr, *Kt = nullptr, *Vt = nullptr, *dOt = nullptr;
    // delta = rowsum(dO ∘ O) − grad_lse
    {
      const scalar_t* o = out.data_ptr<scalar_t>();
      const scalar_t* go = grad_out.data_ptr<scalar_t>();
      const scalar_t* gl = grad_lse ? grad_lse->data_ptr<scalar_t>() : nullptr;
      scalar_t* dl = delta.data_ptr<scalar_t>();
      at::parallel_for(0, B * Hq * N, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) dl[i] = dot(go + i * Dv, o + i * Dv, Dv) - (gl ? gl[i] : scalar_t(0));
      });
    }
    if (tiled) {
      const int64_t nq = q.numel() + W, nk = k.numel() + W, nv = v.numel() + W, no = grad_out.numel() + W;
      // the forward's row-transposed q, k, v when it kept them: then only grad_out is transposed here
      const bool reuse =
          transposed && transposed->numel() == nq + nk + nv && transposed->scalar_type() == q.scalar_type();
      Qt = reuse ? transposed->data_ptr<scalar_t>() : workspace<scalar_t>(nq + nk + nv + no, fresh);
      Kt = Qt + nq;
      Vt = Kt + nk;
      dOt = reuse ? workspace<scalar_t>(no, fresh) : Vt + nv;
      if (reuse) row_transposed<scalar_t>({{&grad_out, dOt}}, NP);
      else row_transposed<scalar_t>({{&q, Qt}, {&k, Kt}, {&v, Vt}, {&grad_out, dOt}}, NP);
    }
    backward_q_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                v.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                                dq.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), dS.data_ptr<scalar_t>(),
                                need_bias_grad ? dB.data_ptr<scalar_t>() : nullptr, B, Hq, Hkv, D, Dv, g, tm, Qt, Kt,
                                Vt, dOt, NP);
    backward_kv_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(),
                                 dS.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, Hq,
                                 Hkv, D, Dv, g, Qt, dOt, NP);
  });
  return {dq, dk, dv, dB, delta};
}

}  // namespace na
}  // namespace foveal

TORCH_LIBRARY_FRAGMENT(foveal_native, m) {
  m.def(
      "na_forward(Tensor q, Tensor k, Tensor v, Tensor geometry, Tensor first, Tensor count, float scale, "
      "Tensor? key_padding_mask=None, float? softcap=None, Tensor? sink_logits=None, Tensor? bias_table=None, "
      "Tensor? bias_index=None, bool keep_transposed=False) -> (Tensor out, Tensor lse, Tensor transposed)");
  m.def(
      "na_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
      "Tensor geometry, "
      "Tensor first, Tensor count, Tensor inv_ptr, Tensor inv_x, Tensor inv_m, float scale, "
      "Tensor? key_padding_mask=None, float? softcap=None, Tensor? bias_table=None, Tensor? bias_index=None, "
      "bool need_bias_grad=False, Tensor? transposed=None) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias, "
      "Tensor delta)");
}

TORCH_LIBRARY_IMPL(foveal_native, CPU, m) {
  m.impl("na_forward", &foveal::na::na_forward);
  m.impl("na_backward", &foveal::na::na_backward);
}
