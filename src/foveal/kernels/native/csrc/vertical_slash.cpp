// foveal_native::vertical_slash_index: MInference's conversion of kept columns and diagonals into key ranges and
// gathered columns per query block (Jiang et al., "MInference 1.0", 2024; its csrc/vertical_slash_index.cu,
// convert_vertical_slash_indexes), on the CPU.
//
//   vertical (B, H, NV) int64: kept columns, ascending, -1 after the last (a shorter list per (batch, head)).
//   slash    (B, H, NS) int64: kept diagonal offsets o = i - j >= 0, DEscending, -1 after the last.
//   n, block: the sequence length and MInference's BLOCK_M = BLOCK_N.
// Returns, per (batch, head, query block [start, end = start + block)), -1 in unused slots:
//   range_start, range_end (B, H, nqb, max(NS, 1)) int64: the key ranges [start, end), ascending and disjoint;
//   columns (B, H, nqb, NV) int64: the gathered columns, ascending.
// The walk is MInference's, step for step (foveal/patterns/dynamic.py, VerticalSlashRanges, states what it means):
// offsets >= end are skipped; a kept offset o opens s = max(end - o, block) and the range [s - block, s); the next
// s further than one block past the range's end starts a new range, one within a block extends the range by a whole
// block; a column before the current range is gathered, one inside it is covered, and the walk stops when the
// offsets run out, so columns from the last range's end on are dropped. No offset below end: the range is
// [end, end + block) (MInference's sentinel); no offset at all: s = end + 1 (its s_idx = -1).
// Parallel over (batch, head, query block) with at::parallel_for; O(NV + NS) per query block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace foveal {
namespace vs {

// Entries before the first -1 (the lists are -1 padded at their end).
static int64_t list_length(const int64_t* p, int64_t cap) {
  int64_t c = 0;
  while (c < cap && p[c] >= 0) ++c;
  return c;
}

// One query block's walk: writes its ranges and gathered columns (the slots are -1 already).
static void walk(const int64_t* vert, int64_t nv, const int64_t* slash, int64_t ns, int64_t end_m, int64_t block,
                 int64_t* rs_out, int64_t* re_out, int64_t* col_out) {
  int64_t v = 0, s = 0, nr = 0, nc = 0;
  int64_t v_idx = v < nv ? vert[v++] : end_m + block;
  int64_t s_idx = s < ns ? slash[s++] : -1;
  while (s_idx >= end_m && s < ns) s_idx = slash[s++];
  s_idx = s_idx >= end_m ? end_m + block : std::max(end_m - s_idx, block);
  int64_t range_start = s_idx - block, range_end = s_idx;
  auto save = [&]() {
    rs_out[nr] = range_start;
    re_out[nr] = range_end;
    ++nr;
  };
  while (true) {
    if (v_idx < range_end) {
      if (v_idx < range_start) col_out[nc++] = v_idx;
      v_idx = v < nv ? vert[v++] : end_m + block;
    } else {
      if (s < ns) {
        s_idx = std::max(end_m - slash[s++], block);
      } else {
        save();
        break;
      }
      if (s_idx > range_end + block) {
        save();
        range_start = s_idx - block;
        range_end = s_idx;
      } else if (s_idx > range_end) {
        range_end += block;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vertical_slash_index(const at::Tensor& vertical,
                                                                    const at::Tensor& slash, int64_t n,
                                                                    int64_t block) {
  TORCH_CHECK(vertical.dim() == 3 && vertical.scalar_type() == at::kLong && vertical.is_contiguous(),
              "vertical_slash_index: vertical must be a contiguous int64 (B, H, NV) tensor");
  TORCH_CHECK(slash.dim() == 3 && slash.scalar_type() == at::kLong && slash.is_contiguous(),
              "vertical_slash_index: slash must be a contiguous int64 (B, H, NS) tensor");
  TORCH_CHECK(slash.size(0) == vertical.size(0) && slash.size(1) == vertical.size(1),
              "vertical_slash_index: vertical and slash must have the same (B, H)");
  TORCH_CHECK(n > 0 && block > 0, "vertical_slash_index: n and block must be positive");
  const int64_t B = vertical.size(0), H = vertical.size(1), NV = vertical.size(2), NS = slash.size(2);
  const int64_t nqb = (n + block - 1) / block, R = std::max<int64_t>(NS, 1);
  auto opts = vertical.options();
  at::Tensor rs = at::full({B, H, nqb, R}, -1, opts), re = at::full({B, H, nqb, R}, -1, opts);
  at::Tensor cols = at::full({B, H, nqb, NV}, -1, opts);
  const int64_t *pv = vertical.data_ptr<int64_t>(), *ps = slash.data_ptr<int64_t>();
  int64_t *prs = rs.data_ptr<int64_t>(), *pre = re.data_ptr<int64_t>(), *pc = cols.data_ptr<int64_t>();
  at::parallel_for(0, B * H * nqb, 16, [&](int64_t begin, int64_t stop) {
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t bh = item / nqb, qb = item % nqb;
      const int64_t* v = pv + bh * NV;
      const int64_t* s = ps + bh * NS;
      walk(v, list_length(v, NV), s, list_length(s, NS), (qb + 1) * block, block, prs + item * R, pre + item * R,
           pc + item * NV);
    }
  });
  return {rs, re, cols};
}

}  // namespace vs
}  // namespace foveal

TORCH_LIBRARY_FRAGMENT(foveal_native, m) {
  m.def("vertical_slash_index(Tensor vertical, Tensor slash, int n, int block) "
        "-> (Tensor range_start, Tensor range_end, Tensor columns)");
}

TORCH_LIBRARY_IMPL(foveal_native, CPU, m) { m.impl("vertical_slash_index", &foveal::vs::vertical_slash_index); }
