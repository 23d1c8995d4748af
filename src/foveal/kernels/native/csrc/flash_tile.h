// Shared helpers of foveal's native flash-style kernels: the vector width of this processor, a row-major GEMM on
// the BLAS torch links (MKL's sgemm_/dgemm_), and the per-row softmax pieces (max, exp-and-sum, soft-cap, bit masks).
//
// Vectorized<T> picks its instruction set from CPU_CAPABILITY_* macros that torch's own build sets per kernel file;
// an extension must set them itself, from what the compiler targets (-march=native in build.FLAGS). Each kernel
// file includes this header first. The vector code lives in the inline namespace at::vec::<CAPABILITY>, so files
// compiled with other settings cannot clash with it.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// The Fortran BLAS interface of the MKL that libtorch_cpu carries (exported; 32-bit integers).
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace foveal {
namespace tile {

using at::vec::Vectorized;

inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                 const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                 const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                 const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                 const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C (m×n, leading dimension ldc) = alpha·op(A)·op(B) + beta·C, op(A) m×k, op(B) k×n; ta: A is stored
// k×m, tb: B is stored n×k. (Row-major C is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: the operands swap.)
template <typename T>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
                 int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (beta == T(0)) {
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
    } else if (beta != T(1)) {
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= beta;
    }
    return;
  }
  const char TA = tb ? 'T' : 'N', TB = ta ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  blas(&TA, &TB, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// exp on a vector: PyTorch's own flash kernel uses the fast polynomial for float (about 20 ulp, and 0 below
// log(FLT_MIN), so -inf gives 0); double takes Sleef's 1-ulp exp.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max of x[0:n] (-inf when n == 0)
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  T m = neg_inf<T>();
  int64_t j = 0;
  if (n >= L) {
    V vm = V::loadu(x);
    for (j = L; j + L <= n; j += L) vm = at::vec::maximum(vm, V::loadu(x + j));
    T buf[L];
    vm.store(buf);
    for (int64_t t = 0; t < L; ++t) m = std::max(m, buf[t]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x ← exp(x − mx) in place; returns the sum (exp(-inf) = 0)
template <typename T>
inline T exp_sum(T* x, int64_t n, T mx) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vmx(mx);
  V acc(T(0));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V e = vexp(V::loadu(x + j) - vmx);
    e.store(x + j);
    acc = acc + e;
  }
  T buf[L];
  acc.store(buf);
  T s = 0;
  for (int64_t t = 0; t < L; ++t) s += buf[t];
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - mx);
    s += x[j];
  }
  return s;
}

// x ← exp(x − c) in place (no sum)
template <typename T>
inline void exp_shift(T* x, int64_t n, T c) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vc(c);
  int64_t j = 0;
  for (; j + L <= n; j += L) vexp(V::loadu(x + j) - vc).store(x + j);
  for (; j < n; ++j) x[j] = std::exp(x[j] - c);
}

// y ← a·x (n elements; y may be x)
template <typename T>
inline void scale_to(T* y, const T* x, int64_t n, T a) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V va(a);
  int64_t j = 0;
  for (; j + L <= n; j += L) (V::loadu(x + j) * va).store(y + j);
  for (; j < n; ++j) y[j] = a * x[j];
}

// x ← c·tanh(x / c); deriv (if not null) ← 1 − tanh²
template <typename T>
inline void softcap_row(T* x, int64_t n, T c, T* deriv) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vc(c), vinv(T(1) / c), one(T(1));
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V t = (V::loadu(x + j) * vinv).tanh();
    (t * vc).store(x + j);
    if (deriv) (one - t * t).store(deriv + j);
  }
  for (; j < n; ++j) {
    T t = std::tanh(x[j] / c);
    x[j] = c * t;
    if (deriv) deriv[j] = T(1) - t * t;
  }
}

// ds ← p ∘ (dp − delta) [∘ deriv], written into dp
template <typename T>
inline void dscore_row(T* dp, const T* p, int64_t n, T delta, const T* deriv) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V vd(delta);
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    V r = V::loadu(p + j) * (V::loadu(dp + j) - vd);
    if (deriv) r = r * V::loadu(deriv + j);
    r.store(dp + j);
  }
  for (; j < n; ++j) {
    T r = p[j] * (dp[j] - delta);
    dp[j] = deriv ? r * deriv[j] : r;
  }
}

// x[j] ← -inf where bit j of the row's words is clear (words: one uint64 per 64 keys, bit j%64 of word j/64)
template <typename T>
inline void apply_bits(T* x, int64_t n, const uint64_t* words) {
  const T ninf = neg_inf<T>();
  for (int64_t w = 0; w * 64 < n; ++w) {
    const uint64_t word = words[w];
    const int64_t lo = w * 64, hi = std::min<int64_t>(n, lo + 64);
    if (word == ~uint64_t(0)) continue;
    if (word == 0) {
      std::fill(x + lo, x + hi, ninf);
      continue;
    }
    for (int64_t j = lo; j < hi; ++j)
      if (!((word >> (j - lo)) & 1u)) x[j] = ninf;
  }
}

// Runs body(item, scratch) for item in [0, n) on torch's threads, items handed out one at a time (dynamic schedule:
// a causal pattern's query blocks differ in cost), each thread with its own scratch made by make_scratch(worker);
// make_scratch(worker) gets the worker's number in [0, workers(n)).
inline int64_t workers(int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)); }

template <typename MakeScratch, typename Body>
inline void parallel_items(int64_t n, MakeScratch make_scratch, Body body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers(n), 1, [&](int64_t worker, int64_t) {
    auto scratch = make_scratch(worker);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, scratch);
  });
}

}  // namespace tile
}  // namespace foveal
