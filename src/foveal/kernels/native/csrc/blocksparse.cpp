// foveal_native::blocksparse_fwd / blocksparse_bwd: exact block-sparse flash attention over foveal's block tables.
//
// Tables (built in Python, foveal/kernels/native/blocksparse.py):
//   kv_blocks  (Bt, Ht, nqb, S) int64: the key blocks of each (batch, head, query block), -1 unused. Bt is 1 (one
//              table for every batch element) or B; Ht is 1 (every query head: then the G query heads of a key head
//              are stacked as the rows of one tile) or Hq.
//   mask_index (Bt, Ht, nqb, S) int64: -1 for a full tile (no mask), else a row of `masks`.
//   masks      (M, block, W) int64: bit j%64 of word j/64 of row i says whether query i of the tile may see key j.
//   key_padding (B, Nk) bool, True = ignore;  sinks (Hq,) a logit per query head joining every row's softmax.
//   kv_tokens  (B, Hq, nqb, T) int64, optional (per-(batch, head) tables only): single key tokens attended besides
//              the blocks (vertical-slash's columns), -1 unused; allowed where token_bits (B, Hq, nqb, block,
//              ceil(T / 64)) has bit t set for the row, or, with tokens_causal, where the token is <= the query.
//              They are gathered 64 at a time into one tile; their dK/dV go to per-thread buffers summed at the end.
//   term_table (Hq, L), term_index (U, block, block) int32, term_slot (Bt, Ht, nqb, S) int64, optional: a score
//              term read from a table (relative-position bias): score += term_table[h, term_index[term_slot][i][j]]
//              after the cap; its gradient (Hq, L) is summed from per-thread buffers in the dQ pass.
// A ragged last key block is cut to its Nk − kb·block keys, a ragged last query block to its rows: no mask needed.
//
// Forward: per item (batch, stacked query heads, query block) a tile loop over its key blocks with the online
// softmax (running max m and sum l per row; the accumulator is rescaled only when a row's max grows), the sink
// joined at the end (it changes only the normaliser and the lse). Backward (FlashAttention-2): P recomputed from
// the saved lse; dQ per query block; dK and dV per key block through the transposed table (the (query instance,
// slot) pairs that read each key block), so no two threads write the same rows and no atomics are needed.
// No tensor larger than O(N·D) and the tables; per thread a few block-sized tiles.
#include "flash_tile.h"

#include <torch/library.h>

namespace foveal {
namespace bs {

using namespace foveal::tile;

struct Geo {
  int64_t B, Hq, Hkv, G, Nq, Nk, D, Dv, block, nqb, nkb, Bt, Ht, S, W, SG, groups;
  int64_t T = 0, WT = 0, lds = 0;  // single key tokens per instance, their bit words per row; score tile width
  int64_t ct = 1;  // key tiles taken together by the forward (one softmax pass over ct·block keys)
};

constexpr int64_t kTokenChunk = 64;
// Keys the forward takes together: one score GEMM over consecutive key blocks (else one per tile) and one softmax
// pass, the accumulator rescaled once per chunk (PyTorch's CPU flash kernel splits keys by 512 likewise).
constexpr int64_t kChunkKeys = 512;

template <typename T>
struct Args {
  Geo g;
  const T *q, *k, *v;
  const int64_t *table, *midx;
  const uint64_t* masks;
  const bool* pad;
  const T* sinks;
  T scale, softcap;
  const int64_t* tokens = nullptr;
  const uint64_t* token_bits = nullptr;
  bool tokens_causal = false;
  const T* term = nullptr;  // (Hq, L)
  const int32_t* term_index = nullptr;  // (U, block, block)
  const int64_t* term_slot = nullptr;  // like the table
  int64_t L = 0;
};

template <typename T>
static void set_term(Args<T>& a, const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
                     const std::optional<at::Tensor>& slot, const at::Tensor& kv_blocks) {
  if (!table.has_value() || !table->defined()) return;
  const Geo& g = a.g;
  TORCH_CHECK(table->dim() == 2 && table->size(0) == g.Hq && table->is_contiguous() &&
                  table->scalar_type() == c10::CppTypeToScalarType<T>::value,
              "term_table must be a contiguous (Hq, L) tensor of q's dtype");
  TORCH_CHECK(index.has_value() && index->defined() && index->scalar_type() == at::kInt && index->is_contiguous() &&
                  index->dim() == 3 && index->size(1) == g.block && index->size(2) == g.block,
              "term_index must be a contiguous int32 (U, block, block) tensor");
  TORCH_CHECK(slot.has_value() && slot->defined() && slot->sizes() == kv_blocks.sizes() &&
                  slot->scalar_type() == at::kLong && slot->is_contiguous(),
              "term_slot must be int64 shaped like kv_blocks");
  a.term = table->data_ptr<T>();
  a.term_index = index->data_ptr<int32_t>();
  a.term_slot = slot->data_ptr<int64_t>();
  a.L = table->size(1);
}

static Geo geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                    const at::Tensor& midx, const at::Tensor& masks, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, D)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "the kernel takes float32/float64");
  Geo g;
  g.B = q.size(0), g.Hq = q.size(1), g.Nq = q.size(2), g.D = q.size(3);
  g.Hkv = k.size(1), g.Nk = k.size(2), g.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == g.B && v.size(0) == g.B && v.size(1) == g.Hkv && v.size(2) == g.Nk && k.size(3) == g.D,
              "k, v do not match q");
  TORCH_CHECK(g.Hkv > 0 && g.Hq % g.Hkv == 0, "Hq must be a multiple of Hkv");
  g.G = g.Hq / g.Hkv;
  TORCH_CHECK(block > 0, "block must be positive");
  g.block = block;
  g.nqb = (g.Nq + block - 1) / block, g.nkb = (g.Nk + block - 1) / block;
  TORCH_CHECK(table.dim() == 4 && table.scalar_type() == at::kLong && table.is_contiguous(),
              "kv_blocks must be a contiguous int64 (Bt, Ht, nqb, S) tensor");
  g.Bt = table.size(0), g.Ht = table.size(1), g.S = table.size(3);
  TORCH_CHECK((g.Bt == 1 || g.Bt == g.B) && (g.Ht == 1 || g.Ht == g.Hq) && table.size(2) == g.nqb,
              "kv_blocks must be (1 or B, 1 or Hq, nqb, S)");
  TORCH_CHECK(midx.sizes() == table.sizes() && midx.scalar_type() == at::kLong && midx.is_contiguous(),
              "mask_index must be int64 shaped like kv_blocks");
  g.W = (block + 63) / 64;
  TORCH_CHECK(masks.dim() == 3 && masks.scalar_type() == at::kLong && masks.is_contiguous() &&
                  masks.size(1) == block && masks.size(2) == g.W,
              "masks must be a contiguous int64 (M, block, ceil(block / 64)) tensor");
  g.SG = g.Ht == 1 ? g.G : 1;
  g.groups = g.Hq / g.SG;
  g.ct = std::max<int64_t>(1, kChunkKeys / block);
  g.lds = g.ct * block;
  return g;
}

// The single key tokens: (B, Hq, nqb, T) with per-(batch, head) tables, and their masks.
static void add_tokens(Geo& g, const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& bits,
                       bool causal) {
  if (!tokens.has_value() || !tokens->defined() || tokens->size(-1) == 0) return;
  TORCH_CHECK(g.Bt == g.B && g.Ht == g.Hq, "kv_tokens need per-(batch, head) tables");
  TORCH_CHECK(tokens->scalar_type() == at::kLong && tokens->is_contiguous() && tokens->dim() == 4 &&
                  tokens->size(0) == g.B && tokens->size(1) == g.Hq && tokens->size(2) == g.nqb,
              "kv_tokens must be a contiguous int64 (B, Hq, nqb, T) tensor");
  g.T = tokens->size(3);
  g.WT = (g.T + 63) / 64;
  if (!causal)
    TORCH_CHECK(bits.has_value() && bits->defined() && bits->scalar_type() == at::kLong && bits->is_contiguous() &&
                    bits->numel() == g.B * g.Hq * g.nqb * g.block * g.WT,
                "token_bits must be a contiguous int64 (B, Hq, nqb, block, ceil(T / 64)) tensor");
  g.lds = std::max(g.lds, kTokenChunk);
}

template <typename T>
static void set_tokens(Args<T>& a, const std::optional<at::Tensor>& tokens, const std::optional<at::Tensor>& bits,
                       bool causal) {
  if (a.g.T == 0) return;
  a.tokens = tokens->data_ptr<int64_t>();
  a.tokens_causal = causal;
  if (!causal) a.token_bits = reinterpret_cast<const uint64_t*>(bits->data_ptr<int64_t>());
}

template <typename T>
static Args<T> args(const Geo& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& table, const at::Tensor& midx, const at::Tensor& masks,
                    const std::optional<at::Tensor>& pad, const std::optional<at::Tensor>& sinks, double scale,
                    double softcap) {
  Args<T> a;
  a.g = g;
  a.q = q.data_ptr<T>(), a.k = k.data_ptr<T>(), a.v = v.data_ptr<T>();
  a.table = table.data_ptr<int64_t>(), a.midx = midx.data_ptr<int64_t>();
  a.masks = reinterpret_cast<const uint64_t*>(masks.data_ptr<int64_t>());
  a.pad = nullptr;
  if (pad.has_value() && pad->defined()) {
    TORCH_CHECK(pad->scalar_type() == at::kBool && pad->is_contiguous() && pad->dim() == 2 && pad->size(0) == g.B &&
                    pad->size(1) == g.Nk,
                "key_padding must be a contiguous bool (B, Nk) tensor");
    a.pad = pad->data_ptr<bool>();
  }
  a.sinks = nullptr;
  if (sinks.has_value() && sinks->defined()) {
    TORCH_CHECK(sinks->scalar_type() == q.scalar_type() && sinks->is_contiguous() && sinks->numel() == g.Hq,
                "sinks must be a contiguous (Hq,) tensor of q's dtype");
    a.sinks = sinks->data_ptr<T>();
  }
  a.scale = T(scale), a.softcap = T(softcap);
  return a;
}

// One tile's rows: heads h0 .. h0+SG-1 (stacked), query block qb, bq valid rows each: R = SG·bq rows.
struct Rows {
  int64_t b, h0, sg, qb, bq, R;
};

// A work item of the forward and of dQ: (batch, query-head group, query block) -> its rows, key head, the key
// head's first token row, its table instance and the instance's first table slot
struct Item {
  Rows r;
  int64_t kh, head0, inst, trow;
};

static Item item_rows(const Geo& g, int64_t item) {
  Item it;
  Rows& r = it.r;
  r.qb = item % g.nqb;
  const int64_t hg = (item / g.nqb) % g.groups;
  r.b = item / (g.nqb * g.groups);
  r.h0 = hg * g.SG, r.sg = g.SG;
  r.bq = std::min(g.block, g.Nq - r.qb * g.block), r.R = r.sg * r.bq;
  it.kh = r.h0 / g.G, it.head0 = (r.b * g.Hkv + it.kh) * g.Nk;
  it.inst = ((g.Bt > 1 ? r.b : 0) * g.Ht + (g.Ht > 1 ? hg : 0)) * g.nqb + r.qb, it.trow = it.inst * g.S;
  return it;
}

// Scaled queries of the rows into qs (R×D)
template <typename T>
static void load_q(const Args<T>& a, const Rows& r, T* qs) {
  const Geo& g = a.g;
  for (int64_t s = 0; s < r.sg; ++s) {
    const T* src = a.q + ((r.b * g.Hq + r.h0 + s) * g.Nq + r.qb * g.block) * g.D;
    scale_to(qs + s * r.bq * g.D, src, r.bq * g.D, a.scale);
  }
}

// Rows of a (B, Hq, Nq, E) tensor into dst (R×E), or of a (B, Hq, Nq) tensor when E == 1
template <typename T>
static void load_rows(const Geo& g, const Rows& r, const T* x, int64_t e, T* dst) {
  for (int64_t s = 0; s < r.sg; ++s) {
    const T* src = x + ((r.b * g.Hq + r.h0 + s) * g.Nq + r.qb * g.block) * e;
    std::copy(src, src + r.bq * e, dst + s * r.bq * e);
  }
}

// Does key padding cut any of keys [kv0, kv0 + kn) of batch b? (the padding row, or null)
template <typename T>
static const bool* padding_of(const Args<T>& a, int64_t b, int64_t kv0, int64_t kn) {
  if (!a.pad) return nullptr;
  const bool* p = a.pad + b * a.g.Nk + kv0;
  for (int64_t j = 0; j < kn; ++j)
    if (p[j]) return p;
  return nullptr;
}

// The rest of the final scores, on a tile s (R × kn, leading dimension lds) holding scale·q·kᵀ: cap (its
// derivative into deriv when given), the score term (tidx), the tile's bit mask (mask index mi, -1 none) and key
// padding as -inf.
template <typename T>
static void finish_scores(const Args<T>& a, const Rows& r, int64_t kn, int64_t mi, const bool* pad, T* s, T* deriv,
                          const int32_t* tidx) {
  const Geo& g = a.g;
  const int64_t ld = g.lds;
  if (a.softcap > T(0))
    for (int64_t i = 0; i < r.R; ++i) softcap_row(s + i * ld, kn, a.softcap, deriv ? deriv + i * ld : nullptr);
  if (tidx) {
    for (int64_t i = 0; i < r.R; ++i) {
      const T* tab = a.term + (r.h0 + i / r.bq) * a.L;
      const int32_t* ix = tidx + (i % r.bq) * g.block;
      T* row = s + i * ld;
      for (int64_t j = 0; j < kn; ++j) row[j] += tab[ix[j]];
    }
  }
  if (mi >= 0) {
    const uint64_t* bits = a.masks + mi * g.block * g.W;
    for (int64_t i = 0; i < r.R; ++i) apply_bits(s + i * ld, kn, bits + (i % r.bq) * g.W);
  }
  if (pad) {
    const T ninf = neg_inf<T>();
    for (int64_t i = 0; i < r.R; ++i)
      for (int64_t j = 0; j < kn; ++j)
        if (pad[j]) s[i * ld + j] = ninf;
  }
}

// The score term's index tile of a slot (null without a term)
template <typename T>
static const int32_t* term_tile(const Args<T>& a, int64_t at) {
  return a.term ? a.term_index + a.term_slot[at] * a.g.block * a.g.block : nullptr;
}

// The instance's valid single key tokens from table position `pos` on, at most kTokenChunk: their key indices into
// idx, their table positions into tpos; returns how many (0: none left).
template <typename T>
static int64_t token_chunk(const Args<T>& a, int64_t inst, int64_t& pos, int64_t* idx, int64_t* tpos) {
  const int64_t* row = a.tokens + inst * a.g.T;
  int64_t c = 0;
  for (; pos < a.g.T && c < kTokenChunk; ++pos)
    if (row[pos] >= 0) idx[c] = row[pos], tpos[c] = pos, ++c;
  return c;
}

// Key (or value) rows idx[0:c] of key head base row `head0` gathered into buf (c×e)
template <typename T>
static void gather_rows(const T* x, int64_t head0, const int64_t* idx, int64_t c, int64_t e, T* buf) {
  for (int64_t j = 0; j < c; ++j) std::copy(x + (head0 + idx[j]) * e, x + (head0 + idx[j] + 1) * e, buf + j * e);
}

// Final scores of the rows (one head: per-(batch, head) tables) against c gathered tokens into s (R × lds)
template <typename T>
static void token_scores(const Args<T>& a, const Rows& r, int64_t inst, const T* qs, const T* kbuf, int64_t c,
                         const int64_t* idx, const int64_t* tpos, T* s, T* deriv) {
  const Geo& g = a.g;
  const int64_t ld = g.lds;
  gemm<T>(false, true, r.R, c, g.D, T(1), qs, g.D, kbuf, g.D, T(0), s, ld);
  if (a.softcap > T(0))
    for (int64_t i = 0; i < r.R; ++i) softcap_row(s + i * ld, c, a.softcap, deriv ? deriv + i * ld : nullptr);
  const T ninf = neg_inf<T>();
  const bool* pad = a.pad ? a.pad + r.b * g.Nk : nullptr;
  for (int64_t i = 0; i < r.R; ++i) {
    const int64_t qtok = r.qb * g.block + i;
    const uint64_t* bits = a.token_bits ? a.token_bits + (inst * g.block + i) * g.WT : nullptr;
    for (int64_t j = 0; j < c; ++j) {
      const bool ok = (a.tokens_causal ? idx[j] <= qtok : ((bits[tpos[j] >> 6] >> (tpos[j] & 63)) & 1u)) &&
                      !(pad && pad[idx[j]]);
      if (!ok) s[i * ld + j] = ninf;
    }
  }
}

// The next run of the instance's table (row trow) from `slot` on, unused slots skipped: at most `most` consecutive
// key blocks (one GEMM reads them). Returns its first block (-1: none left), its length in n, its slots in sl;
// `slot` moves past it.
template <typename T>
static int64_t next_run(const Args<T>& a, int64_t trow, int64_t& slot, int64_t most, int64_t* sl, int64_t& n) {
  const Geo& g = a.g;
  while (slot < g.S && a.table[trow + slot] < 0) ++slot;
  n = 0;
  if (slot == g.S) return -1;
  const int64_t kb = a.table[trow + slot];
  sl[n++] = slot++;
  for (; slot < g.S && n < most; ++slot) {
    const int64_t next = a.table[trow + slot];
    if (next < 0) continue;
    if (next != kb + n) break;
    sl[n++] = slot;
  }
  return kb;
}

// How many keys a run of n blocks from kb holds (only the sequence's last block is ragged)
inline int64_t run_keys(const Geo& g, int64_t kb, int64_t n) { return std::min(g.Nk, (kb + n) * g.block) - kb * g.block; }

// Final scores of the rows against a run of key blocks (from next_run) into s (R × its keys): one GEMM, then each
// tile's cap, term, bit mask and padding
template <typename T>
static int64_t run_scores(const Args<T>& a, const Rows& r, const T* qs, int64_t head0, int64_t trow, int64_t kb,
                          int64_t n, const int64_t* sl, T* s, T* deriv) {
  const Geo& g = a.g;
  const int64_t kv0 = kb * g.block, kn = run_keys(g, kb, n);
  gemm<T>(false, true, r.R, kn, g.D, T(1), qs, g.D, a.k + (head0 + kv0) * g.D, g.D, T(0), s, g.lds);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t c0 = t * g.block, tn = std::min(g.block, kn - c0);
    finish_scores(a, r, tn, a.midx[trow + sl[t]], padding_of(a, r.b, kv0 + c0, tn), s + c0,
                  deriv ? deriv + c0 : nullptr, term_tile(a, trow + sl[t]));
  }
  return kn;
}

template <typename T>
struct FwdScratch {
  std::vector<T> qs, s, acc, m, l, kbuf, vbuf;
  std::vector<int64_t> idx, tpos;
  FwdScratch(const Geo& g) {
    const int64_t R = g.SG * g.block;
    qs.resize(R * g.D), s.resize(R * g.lds), acc.resize(R * g.Dv), m.resize(R), l.resize(R);
    if (g.T) kbuf.resize(kTokenChunk * g.D), vbuf.resize(kTokenChunk * g.Dv), idx.resize(kTokenChunk),
        tpos.resize(kTokenChunk);
  }
};

// The online softmax takes one tile's final scores s (R × kn): running max m and sum l per row, the accumulator
// rescaled where a row's max grows; s becomes P (zero rows where nothing is allowed). False: nothing allowed.
template <typename T>
static bool absorb(const Geo& g, int64_t R, T* s, int64_t kn, T* m, T* l, T* acc) {
  bool any = false;
  for (int64_t i = 0; i < R; ++i) {
    T* row = s + i * g.lds;
    const T mx = row_max(row, kn);
    if (mx == neg_inf<T>()) {
      std::fill(row, row + kn, T(0));
      continue;
    }
    any = true;
    if (mx > m[i]) {
      if (m[i] != neg_inf<T>()) {
        const T alpha = std::exp(m[i] - mx);
        l[i] *= alpha;
        scale_to(acc + i * g.Dv, acc + i * g.Dv, g.Dv, alpha);
      }
      m[i] = mx;
    }
    l[i] += exp_sum(row, kn, m[i]);
  }
  return any;
}

template <typename T>
static void forward_item(const Args<T>& a, int64_t item, FwdScratch<T>& w, T* out, T* lse) {
  const Geo& g = a.g;
  const Item it = item_rows(g, item);
  const Rows& r = it.r;
  const int64_t kh = it.kh, head0 = it.head0, inst = it.inst, trow = it.trow;
  T *qs = w.qs.data(), *s = w.s.data(), *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data();
  load_q(a, r, qs);
  std::fill(m, m + r.R, neg_inf<T>());
  std::fill(l, l + r.R, T(0));
  std::fill(acc, acc + r.R * g.Dv, T(0));
  // chunks of up to ct key blocks: one score GEMM per run of consecutive blocks, one softmax pass per chunk
  int64_t slot = 0, sl[kChunkKeys], runs[kChunkKeys][2];
  while (true) {
    int64_t tiles = 0, nruns = 0, kn = 0, n, kb;
    while (tiles < g.ct && (kb = next_run(a, trow, slot, g.ct - tiles, sl + tiles, n)) >= 0) {
      runs[nruns][0] = kb, runs[nruns++][1] = n;
      kn += run_scores(a, r, qs, head0, trow, kb, n, sl + tiles, s + kn, (T*)nullptr);
      tiles += n;
    }
    if (tiles == 0) break;
    if (!absorb(g, r.R, s, kn, m, l, acc)) continue;
    for (int64_t u = 0, col = 0; u < nruns; ++u) {  // P·V, a GEMM per run
      const int64_t kv0 = runs[u][0] * g.block, rk = run_keys(g, runs[u][0], runs[u][1]);
      gemm<T>(false, false, r.R, g.Dv, rk, T(1), s + col, g.lds, a.v + (head0 + kv0) * g.Dv, g.Dv, T(1), acc, g.Dv);
      col += rk;
    }
  }
  if (g.T) {
    int64_t pos = 0, c;
    while ((c = token_chunk(a, inst, pos, w.idx.data(), w.tpos.data())) > 0) {
      gather_rows(a.k, head0, w.idx.data(), c, g.D, w.kbuf.data());
      token_scores(a, r, inst, qs, w.kbuf.data(), c, w.idx.data(), w.tpos.data(), s, (T*)nullptr);
      if (absorb(g, r.R, s, c, m, l, acc)) {
        gather_rows(a.v, head0, w.idx.data(), c, g.Dv, w.vbuf.data());
        gemm<T>(false, false, r.R, g.Dv, c, T(1), s, g.lds, w.vbuf.data(), g.Dv, T(1), acc, g.Dv);
      }
    }
  }
  for (int64_t i = 0; i < r.R; ++i) {
    const int64_t h = r.h0 + i / r.bq, tok = r.qb * g.block + i % r.bq;
    T* o = out + ((r.b * g.Hq + h) * g.Nq + tok) * g.Dv;
    T* ls = lse + (r.b * g.Hq + h) * g.Nq + tok;
    const bool dead = m[i] == neg_inf<T>();
    if (a.sinks) {
      const T sink = a.sinks[h];
      if (dead) {
        std::fill(o, o + g.Dv, T(0));
        *ls = sink;
        continue;
      }
      const T top = std::max(m[i], sink);
      const T wk = std::exp(m[i] - top), total = l[i] * wk + std::exp(sink - top);
      scale_to(o, acc + i * g.Dv, g.Dv, wk / total);
      *ls = top + std::log(total);
    } else if (dead) {
      std::fill(o, o + g.Dv, T(0));
      *ls = neg_inf<T>();
    } else {
      scale_to(o, acc + i * g.Dv, g.Dv, T(1) / l[i]);
      *ls = m[i] + std::log(l[i]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> blocksparse_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& kv_blocks, const at::Tensor& mask_index,
                                                   const at::Tensor& masks,
                                                   const std::optional<at::Tensor>& key_padding,
                                                   const std::optional<at::Tensor>& sinks,
                                                   const std::optional<at::Tensor>& kv_tokens,
                                                   const std::optional<at::Tensor>& token_bits, bool tokens_causal,
                                                   const std::optional<at::Tensor>& term_table,
                                                   const std::optional<at::Tensor>& term_index,
                                                   const std::optional<at::Tensor>& term_slot, int64_t block,
                                                   double scale, double softcap) {
  Geo g = geometry(q, k, v, kv_blocks, mask_index, masks, block);
  add_tokens(g, kv_tokens, token_bits, tokens_causal);
  auto out = at::empty({g.B, g.Hq, g.Nq, g.Dv}, q.options());
  auto lse = at::empty({g.B, g.Hq, g.Nq}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "foveal_native::blocksparse_fwd", [&] {
    Args<scalar_t> a = args<scalar_t>(g, q, k, v, kv_blocks, mask_index, masks, key_padding, sinks, scale, softcap);
    set_tokens(a, kv_tokens, token_bits, tokens_causal);
    set_term(a, term_table, term_index, term_slot, kv_blocks);
    scalar_t *o = out.data_ptr<scalar_t>(), *ls = lse.data_ptr<scalar_t>();
    const int64_t n = g.B * g.groups * g.nqb;
    // last query blocks first: under a causal pattern they have the most key blocks
    parallel_items(
        n, [&](int64_t) { return FwdScratch<scalar_t>(g); },
        [&](int64_t i, FwdScratch<scalar_t>& w) { forward_item(a, n - 1 - i, w, o, ls); });
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------------
// backward

template <typename T>
struct BwdScratch {
  std::vector<T> qs, dO, lse, delta, s, dp, deriv, acc, acc2, kbuf, vbuf, tk, tv;
  std::vector<int64_t> idx, tpos;
  T *tok_dk = nullptr, *tok_dv = nullptr;  // this worker's dK/dV of single tokens (B·Hkv·Nk rows)
  T* dterm = nullptr;  // this worker's gradient of the term table (Hq, L)
  BwdScratch(const Geo& g, bool cap) {
    const int64_t R = g.SG * g.block, RS = g.ct * R;  // RS: the rows of ct stacked query tiles (dK/dV pass)
    qs.resize(RS * g.D), dO.resize(RS * g.Dv), lse.resize(RS), delta.resize(RS), s.resize(R * g.lds),
        dp.resize(R * g.lds), deriv.resize(cap ? R * g.lds : 0);
    acc.resize(std::max(R, g.block) * g.D), acc2.resize(g.block * g.Dv);
    if (g.T) kbuf.resize(kTokenChunk * g.D), vbuf.resize(kTokenChunk * g.Dv), tk.resize(kTokenChunk * g.D),
        tv.resize(kTokenChunk * g.Dv), idx.resize(kTokenChunk), tpos.resize(kTokenChunk);
  }
};

struct BwdTensors {
  const void *dout, *lse, *delta;
};

// From the rows' final scores in w.s (R × kn): P into w.s, dS into w.dp (values at vp, kn rows).
// With tidx and a term-gradient buffer: the gradient of the final scores also goes to the term table.
template <typename T>
static void probs_and_dscores(const Args<T>& a, const Rows& r, BwdScratch<T>& w, const T* vp, int64_t kn,
                              const int32_t* tidx = nullptr, T* dterm = nullptr) {
  const Geo& g = a.g;
  const int64_t ld = g.lds;
  T* deriv = w.deriv.empty() ? nullptr : w.deriv.data();
  if (tidx && dterm) {  // dS before the cap's derivative is what the term receives
    gemm<T>(false, true, r.R, kn, g.Dv, T(1), w.dO.data(), g.Dv, vp, g.Dv, T(0), w.dp.data(), ld);
    for (int64_t i = 0; i < r.R; ++i) {
      T* p = w.s.data() + i * ld;
      if (w.lse[i] == neg_inf<T>()) {
        std::fill(p, p + kn, T(0));
      } else {
        exp_shift(p, kn, w.lse[i]);
      }
      T* ds = w.dp.data() + i * ld;
      dscore_row(ds, p, kn, w.delta[i], (const T*)nullptr);
      T* dt = dterm + (r.h0 + i / r.bq) * a.L;
      const int32_t* ix = tidx + (i % r.bq) * g.block;
      for (int64_t j = 0; j < kn; ++j) dt[ix[j]] += ds[j];
      if (deriv)
        for (int64_t j = 0; j < kn; ++j) ds[j] *= deriv[i * ld + j];
    }
    return;
  }
  gemm<T>(false, true, r.R, kn, g.Dv, T(1), w.dO.data(), g.Dv, vp, g.Dv, T(0), w.dp.data(), ld);
  for (int64_t i = 0; i < r.R; ++i) {
    T* p = w.s.data() + i * ld;
    if (w.lse[i] == neg_inf<T>()) {  // a row with no allowed key (and no sink): no gradient
      std::fill(p, p + kn, T(0));
    } else {
      exp_shift(p, kn, w.lse[i]);
    }
    dscore_row(w.dp.data() + i * ld, p, kn, w.delta[i], deriv ? deriv + i * ld : nullptr);
  }
}

// The rows' scaled q, dO, lse and delta into the scratch from row `at` on
template <typename T>
static void load_bwd_rows(const Args<T>& a, const Rows& r, const BwdTensors& t, BwdScratch<T>& w, int64_t at = 0) {
  load_q(a, r, w.qs.data() + at * a.g.D);
  load_rows(a.g, r, static_cast<const T*>(t.dout), a.g.Dv, w.dO.data() + at * a.g.Dv);
  load_rows(a.g, r, static_cast<const T*>(t.lse), 1, w.lse.data() + at);
  load_rows(a.g, r, static_cast<const T*>(t.delta), 1, w.delta.data() + at);
}

template <typename T>
static void dq_item(const Args<T>& a, int64_t item, BwdScratch<T>& w, const BwdTensors& t, T* dq) {
  const Geo& g = a.g;
  const Item it = item_rows(g, item);
  const Rows& r = it.r;
  const int64_t kh = it.kh, head0 = it.head0, inst = it.inst, trow = it.trow;
  T* deriv = w.deriv.empty() ? nullptr : w.deriv.data();
  load_bwd_rows(a, r, t, w);
  T* acc = w.acc.data();
  std::fill(acc, acc + r.R * g.D, T(0));
  // runs of consecutive key blocks, one tile at a time with a score term (its gradient is gathered per tile)
  const int64_t most = a.term ? 1 : g.ct;
  int64_t slot = 0, n, kb, sl[kChunkKeys];
  while ((kb = next_run(a, trow, slot, most, sl, n)) >= 0) {
    const T* kp = a.k + (head0 + kb * g.block) * g.D;
    const int64_t kn = run_scores(a, r, w.qs.data(), head0, trow, kb, n, sl, w.s.data(), deriv);
    probs_and_dscores(a, r, w, a.v + (head0 + kb * g.block) * g.Dv, kn, term_tile(a, trow + sl[0]), w.dterm);
    gemm<T>(false, false, r.R, g.D, kn, T(1), w.dp.data(), g.lds, kp, g.D, T(1), acc, g.D);
  }
  if (g.T) {  // single tokens: dQ here, and their dK/dV into this worker's buffers
    int64_t pos = 0, c;
    while ((c = token_chunk(a, inst, pos, w.idx.data(), w.tpos.data())) > 0) {
      gather_rows(a.k, head0, w.idx.data(), c, g.D, w.kbuf.data());
      gather_rows(a.v, head0, w.idx.data(), c, g.Dv, w.vbuf.data());
      token_scores(a, r, inst, w.qs.data(), w.kbuf.data(), c, w.idx.data(), w.tpos.data(), w.s.data(), deriv);
      probs_and_dscores(a, r, w, w.vbuf.data(), c);
      gemm<T>(false, false, r.R, g.D, c, T(1), w.dp.data(), g.lds, w.kbuf.data(), g.D, T(1), acc, g.D);
      gemm<T>(true, false, c, g.Dv, r.R, T(1), w.s.data(), g.lds, w.dO.data(), g.Dv, T(0), w.tv.data(), g.Dv);
      gemm<T>(true, false, c, g.D, r.R, T(1), w.dp.data(), g.lds, w.qs.data(), g.D, T(0), w.tk.data(), g.D);
      for (int64_t j = 0; j < c; ++j) {
        T* dkr = w.tok_dk + (head0 + w.idx[j]) * g.D;
        T* dvr = w.tok_dv + (head0 + w.idx[j]) * g.Dv;
        for (int64_t e = 0; e < g.D; ++e) dkr[e] += w.tk[j * g.D + e];
        for (int64_t e = 0; e < g.Dv; ++e) dvr[e] += w.tv[j * g.Dv + e];
      }
    }
  }
  for (int64_t s = 0; s < r.sg; ++s) {
    T* dst = dq + ((r.b * g.Hq + r.h0 + s) * g.Nq + r.qb * g.block) * g.D;
    scale_to(dst, acc + s * r.bq * g.D, r.bq * g.D, a.scale);
  }
}

// dK and dV of one key block: the query tiles reading it (the transposed table), up to ct at a time stacked as
// the rows of one score tile (one at a time with a score term, whose gradient the dQ pass gathers)
template <typename T>
static void dkv_item(const Args<T>& a0, int64_t item, BwdScratch<T>& w, const BwdTensors& t, const int64_t* indptr,
                     const int64_t* inst, const int64_t* slots, T* dk, T* dv) {
  Args<T> a = a0;
  a.g.lds = a.g.block;  // the score tile here is (stacked rows × one key block)
  const Geo& g = a.g;
  const int64_t kb = item % g.nkb, kh = (item / g.nkb) % g.Hkv, b = item / (g.nkb * g.Hkv);
  const int64_t kv0 = kb * g.block, kn = std::min(g.block, g.Nk - kv0);
  const int64_t base = (b * g.Hkv + kh) * g.Nk + kv0;
  const T *kp = a.k + base * g.D, *vp = a.v + base * g.Dv;
  const int64_t htk = g.Ht > 1 ? g.Hkv : 1;
  const int64_t key = ((g.Bt > 1 ? b : 0) * htk + (g.Ht > 1 ? kh : 0)) * g.nkb + kb;
  T *dka = w.acc.data(), *dva = w.acc2.data();
  T* deriv = w.deriv.empty() ? nullptr : w.deriv.data();
  std::fill(dka, dka + kn * g.D, T(0));
  std::fill(dva, dva + kn * g.Dv, T(0));
  const bool* pad = padding_of(a, b, kv0, kn);
  const int64_t most = a.term ? 1 : g.ct;
  Rows sub[kChunkKeys];
  for (int64_t e = indptr[key]; e < indptr[key + 1];) {
    int64_t rows = 0, c = 0;
    for (; e < indptr[key + 1] && c < most; ++e, ++c) {
      Rows& r = sub[c];
      const int64_t in = inst[e];
      r.b = b;
      r.qb = in % g.nqb;
      const int64_t th = (in / g.nqb) % g.Ht;
      r.h0 = g.Ht > 1 ? th : kh * g.G, r.sg = g.SG;
      r.bq = std::min(g.block, g.Nq - r.qb * g.block), r.R = r.sg * r.bq;
      load_bwd_rows(a, r, t, w, rows);
      rows += r.R;
    }
    gemm<T>(false, true, rows, kn, g.D, T(1), w.qs.data(), g.D, kp, g.D, T(0), w.s.data(), g.lds);
    for (int64_t u = 0, at = 0; u < c; at += sub[u].R, ++u) {
      const int64_t en = e - c + u;
      finish_scores(a, sub[u], kn, a.midx[inst[en] * g.S + slots[en]], pad, w.s.data() + at * g.lds,
                    deriv ? deriv + at * g.lds : nullptr, term_tile(a, inst[en] * g.S + slots[en]));
    }
    Rows all = sub[0];
    all.R = rows;
    probs_and_dscores(a, all, w, vp, kn);
    gemm<T>(true, false, kn, g.Dv, rows, T(1), w.s.data(), g.lds, w.dO.data(), g.Dv, T(1), dva, g.Dv);
    gemm<T>(true, false, kn, g.D, rows, T(1), w.dp.data(), g.lds, w.qs.data(), g.D, T(1), dka, g.D);
  }
  std::copy(dka, dka + kn * g.D, dk + base * g.D);
  std::copy(dva, dva + kn * g.Dv, dv + base * g.Dv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blocksparse_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& lse,
    const at::Tensor& delta, const at::Tensor& kv_blocks, const at::Tensor& mask_index, const at::Tensor& masks,
    const at::Tensor& t_indptr, const at::Tensor& t_inst, const at::Tensor& t_slot,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& kv_tokens,
    const std::optional<at::Tensor>& token_bits, bool tokens_causal, const std::optional<at::Tensor>& term_table,
    const std::optional<at::Tensor>& term_index, const std::optional<at::Tensor>& term_slot, int64_t block,
    double scale, double softcap) {
  Geo g = geometry(q, k, v, kv_blocks, mask_index, masks, block);
  add_tokens(g, kv_tokens, token_bits, tokens_causal);
  TORCH_CHECK(dout.is_contiguous() && dout.scalar_type() == q.scalar_type() && dout.size(3) == g.Dv &&
                  dout.numel() == g.B * g.Hq * g.Nq * g.Dv,
              "dout must be contiguous (B, Hq, Nq, Dv) of q's dtype");
  for (const at::Tensor* x : {&lse, &delta})
    TORCH_CHECK(x->is_contiguous() && x->scalar_type() == q.scalar_type() && x->numel() == g.B * g.Hq * g.Nq,
                "lse and delta must be contiguous (B, Hq, Nq) of q's dtype");
  const int64_t htk = g.Ht > 1 ? g.Hkv : 1;
  TORCH_CHECK(t_indptr.scalar_type() == at::kLong && t_indptr.is_contiguous() &&
                  t_indptr.numel() == g.Bt * htk * g.nkb + 1,
              "t_indptr must be int64 (Bt·(1 or Hkv)·nkb + 1)");
  TORCH_CHECK(t_inst.scalar_type() == at::kLong && t_slot.scalar_type() == at::kLong && t_inst.is_contiguous() &&
                  t_slot.is_contiguous() && t_inst.numel() == t_slot.numel(),
              "t_inst and t_slot must be int64 of one length");
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const int64_t nq = g.B * g.groups * g.nqb;
  at::Tensor tok_dk, tok_dv;  // per worker: the single tokens' dK/dV (no two threads add into one buffer)
  if (g.T) {
    tok_dk = at::zeros({workers(nq), g.B * g.Hkv * g.Nk * g.D}, q.options());
    tok_dv = at::zeros({workers(nq), g.B * g.Hkv * g.Nk * g.Dv}, q.options());
  }
  const bool has_term = term_table.has_value() && term_table->defined();
  at::Tensor dterm = has_term ? at::zeros({workers(nq), term_table->numel()}, q.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "foveal_native::blocksparse_bwd", [&] {
    Args<scalar_t> a = args<scalar_t>(g, q, k, v, kv_blocks, mask_index, masks, key_padding,
                                      std::optional<at::Tensor>(), scale, softcap);
    set_tokens(a, kv_tokens, token_bits, tokens_causal);
    set_term(a, term_table, term_index, term_slot, kv_blocks);
    const BwdTensors t{dout.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>()};
    const bool cap = softcap > 0;
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    parallel_items(
        nq,
        [&](int64_t worker) {
          BwdScratch<scalar_t> w(g, cap);
          if (g.T) {
            w.tok_dk = tok_dk.data_ptr<scalar_t>() + worker * tok_dk.size(1);
            w.tok_dv = tok_dv.data_ptr<scalar_t>() + worker * tok_dv.size(1);
          }
          if (has_term) w.dterm = dterm.data_ptr<scalar_t>() + worker * dterm.size(1);
          return w;
        },
        [&](int64_t i, BwdScratch<scalar_t>& w) { dq_item(a, nq - 1 - i, w, t, dqp); });
    const int64_t *ip = t_indptr.data_ptr<int64_t>(), *in = t_inst.data_ptr<int64_t>(),
                  *sl = t_slot.data_ptr<int64_t>();
    scalar_t *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    const int64_t nk = g.B * g.Hkv * g.nkb;
    parallel_items(
        nk, [&](int64_t) { return BwdScratch<scalar_t>(g, cap); },
        [&](int64_t i, BwdScratch<scalar_t>& w) { dkv_item(a, i, w, t, ip, in, sl, dkp, dvp); });
  });
  if (g.T) {
    dk.add_(tok_dk.sum(0).view_as(dk));
    dv.add_(tok_dv.sum(0).view_as(dv));
  }
  at::Tensor dtable = has_term ? dterm.sum(0).view_as(*term_table) : at::empty({0}, q.options());
  return {dq, dk, dv, dtable};
}

}  // namespace bs
}  // namespace foveal

TORCH_LIBRARY_FRAGMENT(foveal_native, m) {
  m.def(
      "blocksparse_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_blocks, Tensor mask_index, Tensor masks, "
      "Tensor? key_padding, Tensor? sinks, Tensor? kv_tokens, Tensor? token_bits, bool tokens_causal, "
      "Tensor? term_table, Tensor? term_index, Tensor? term_slot, int block, float scale, float softcap) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "blocksparse_bwd(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor lse, Tensor delta, Tensor kv_blocks, "
      "Tensor mask_index, Tensor masks, Tensor t_indptr, Tensor t_inst, Tensor t_slot, Tensor? key_padding, "
      "Tensor? kv_tokens, Tensor? token_bits, bool tokens_causal, Tensor? term_table, Tensor? term_index, "
      "Tensor? term_slot, int block, float scale, float softcap) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dterm)");
}

TORCH_LIBRARY_IMPL(foveal_native, CPU, m) {
  m.impl("blocksparse_fwd", &foveal::bs::blocksparse_fwd);
  m.impl("blocksparse_bwd", &foveal::bs::blocksparse_bwd);
}
