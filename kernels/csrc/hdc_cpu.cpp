// CPU kernels for the HDC hot path: packed Hamming distances, per-segment top-k fused
// into the scan, bit packing, and the structured (Hadamard) sign projection.
//
// Conventions (see kernels/reference.py): packed rows are int64 (N, W), W = ceil(D/64),
// bit j of word w is component 64w+j; padding bits are zero. Segments are given by
// offsets (S+1,). Input validation happens in Python (kernels/_checks.py); these functions
// assume valid, contiguous tensors of the right dtypes, except segmented_topk_checked, which
// validates for itself (it serves one frame per call, where the Python checks cost more
// than the scan).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kQueryBlock = 8;  // queries sharing one pass over a memory row (cuts memory traffic 8x)
constexpr int32_t kPadDist = std::numeric_limits<int32_t>::max();

// Distances from NQ queries to NR consecutive memory rows, out[j * NR + r]. Each query
// word is loaded once per NR rows and each memory word once per NQ queries; the NQ*NR
// partial sums stay in registers until the end of the rows. Several rows per query matter
// for a single frame: one row alone is a chain of dependent adds plus a horizontal sum,
// while NR independent rows keep the popcount units busy (while the memory fits in L2;
// beyond it the scan is bound by memory bandwidth either way).
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
// out[i] = the sum of acc[i]'s eight lanes, for i < N. For N = 4, 8, 16 the sums are
// transposed into one vector (unpack, then two 128-bit lane shuffles), about a third of the
// instructions of N separate horizontal sums, which at 2,048 bits a row would otherwise be
// a large share of a batched tile's work.
template <int N>
inline void reduce_store(const __m512i* acc, int32_t* out) {
  if constexpr (N == 16) {
    reduce_store<8>(acc, out);
    reduce_store<8>(acc + 8, out + 8);
  } else if constexpr (N == 8 || N == 4) {
    __m512i s[N / 2];  // s[i], 128-bit lane L: (lanes 2L + 2L+1 of acc[2i], the same of acc[2i+1])
    for (int i = 0; i < N / 2; ++i)
      s[i] = _mm512_add_epi64(_mm512_unpacklo_epi64(acc[2 * i], acc[2 * i + 1]),
                              _mm512_unpackhi_epi64(acc[2 * i], acc[2 * i + 1]));
    const __m512i u0 = _mm512_add_epi64(_mm512_shuffle_i64x2(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                        _mm512_shuffle_i64x2(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512i u1 = u0;
    if constexpr (N == 8)
      u1 = _mm512_add_epi64(_mm512_shuffle_i64x2(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i64x2(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
    // lane i of w: the whole sum of acc[i] (for N = 4 lanes 4..7 repeat 0..3)
    const __m512i w = _mm512_add_epi64(_mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i64x2(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256i d = _mm512_cvtepi64_epi32(w);  // a row's distance is at most 2^31 - 1 bits
    if constexpr (N == 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), d);
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(d));
  } else {
    for (int i = 0; i < N; ++i) out[i] = static_cast<int32_t>(_mm512_reduce_add_epi64(acc[i]));
  }
}

template <int NQ, int NR>
inline void tile_distances(const uint64_t* const* qs, const uint64_t* row, int64_t words, int32_t* out) {
  __m512i acc[NQ * NR];
  for (int i = 0; i < NQ * NR; ++i) acc[i] = _mm512_setzero_si512();
  int64_t w = 0;
  for (; w + 8 <= words; w += 8) {
    __m512i m[NR];
    for (int r = 0; r < NR; ++r) m[r] = _mm512_loadu_si512(row + r * words + w);
    for (int j = 0; j < NQ; ++j) {
      const __m512i x = _mm512_loadu_si512(qs[j] + w);
      for (int r = 0; r < NR; ++r)
        acc[j * NR + r] = _mm512_add_epi64(acc[j * NR + r], _mm512_popcnt_epi64(_mm512_xor_si512(m[r], x)));
    }
  }
  if (w < words) {  // masked tail: never reads past a row
    const __mmask8 mask = static_cast<__mmask8>((1u << (words - w)) - 1u);
    __m512i m[NR];
    for (int r = 0; r < NR; ++r) m[r] = _mm512_maskz_loadu_epi64(mask, row + r * words + w);
    for (int j = 0; j < NQ; ++j) {
      const __m512i x = _mm512_maskz_loadu_epi64(mask, qs[j] + w);
      for (int r = 0; r < NR; ++r)
        acc[j * NR + r] = _mm512_add_epi64(acc[j * NR + r], _mm512_popcnt_epi64(_mm512_xor_si512(m[r], x)));
    }
  }
  reduce_store<NQ * NR>(acc, out);
}
#else
template <int NQ, int NR>
inline void tile_distances(const uint64_t* const* qs, const uint64_t* row, int64_t words, int32_t* out) {
  int64_t acc[NQ * NR] = {0};
  for (int64_t w = 0; w < words; ++w) {
    for (int j = 0; j < NQ; ++j) {
      const uint64_t x = qs[j][w];
      for (int r = 0; r < NR; ++r) acc[j * NR + r] += __builtin_popcountll(row[r * words + w] ^ x);
    }
  }
  for (int i = 0; i < NQ * NR; ++i) out[i] = static_cast<int32_t>(acc[i]);
}
#endif

// No filter: every distance reaches fn (the whole distance matrix is wanted).
struct NoLimit {};

// fn(query, row, distance) for NQ queries over rows [r0, r1): NR rows per tile while they
// last, then one at a time. Rows reach fn in increasing order for each query. With a
// `limit` (query -> pointer to the worst distance its top-k list still takes), only the
// distances below it reach fn: one branch-free compare per distance and a loop over the few
// that pass, instead of a branch per distance that a top-k push would take (the insert
// itself re-checks, so a limit that moves within a tile stays exact).
template <int NQ, int NR, typename Fn, typename Limit>
inline void tile_out(const int32_t* d, int64_t i0, int64_t r, Fn& fn, const Limit& limit) {
  if constexpr (std::is_same_v<Limit, NoLimit>) {
    for (int j = 0; j < NQ; ++j)
      for (int t = 0; t < NR; ++t) fn(i0 + j, r + t, d[j * NR + t]);
  } else {
    uint32_t hits = 0;
    for (int j = 0; j < NQ; ++j) {
      const int32_t worst = *limit(i0 + j);
      for (int t = 0; t < NR; ++t) hits |= static_cast<uint32_t>(d[j * NR + t] < worst) << (j * NR + t);
    }
    while (hits) {
      const int b = __builtin_ctz(hits);
      hits &= hits - 1;
      fn(i0 + b / NR, r + b % NR, d[b]);
    }
  }
}

template <int NQ, int NR, typename Fn, typename Limit>
inline void scan_block(const uint64_t* const* qs, const uint64_t* mem, int64_t words, int64_t i0,
                       int64_t r0, int64_t r1, Fn& fn, const Limit& limit) {
  int32_t d[NQ * NR];
  int64_t r = r0;
  for (; r + NR <= r1; r += NR) {
    tile_distances<NQ, NR>(qs, mem + r * words, words, d);
    tile_out<NQ, NR>(d, i0, r, fn, limit);
  }
  for (; r < r1; ++r) {
    tile_distances<NQ, 1>(qs, mem + r * words, words, d);
    tile_out<NQ, 1>(d, i0, r, fn, limit);
  }
}

// Calls fn(query, row, distance) for rows r in [r0, r1) and queries [q0, q1), in
// sub-blocks of 8/4/2/1 queries so a single query does not pay for eight. Tiles of 8x2,
// 4x2, 2x4 and 1x4 (queries x rows), each timed against its neighbours: 8x2 over 8x1
// because two rows share each query load, and one query gains nothing past 4 rows (the
// scan is then bound by memory bandwidth).
template <typename Fn, typename Limit = NoLimit>
inline void scan_rows(const uint64_t* q, const uint64_t* mem, int64_t words, int64_t q0, int64_t q1,
                      int64_t r0, int64_t r1, Fn&& fn, const Limit& limit = Limit{}) {
  int64_t i = q0;
  while (i < q1) {
    const int64_t left = q1 - i;
    const int nq = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const uint64_t* qs[8];
    for (int j = 0; j < nq; ++j) qs[j] = q + (i + j) * words;
    switch (nq) {
      case 8: scan_block<8, 2>(qs, mem, words, i, r0, r1, fn, limit); break;
      case 4: scan_block<4, 2>(qs, mem, words, i, r0, r1, fn, limit); break;
      case 2: scan_block<2, 4>(qs, mem, words, i, r0, r1, fn, limit); break;
      default: scan_block<1, 4>(qs, mem, words, i, r0, r1, fn, limit); break;
    }
    i += nq;
  }
}

// Sorted (ascending by (dist, idx)) list of at most k entries. Rows arrive in increasing
// index order within one list, so a strict < keeps ties on the lower index.
struct TopK {
  int32_t* dist;
  int64_t* idx;
  int64_t k;
  inline void reset() {
    for (int64_t i = 0; i < k; ++i) {
      dist[i] = kPadDist;
      idx[i] = -1;
    }
  }
  inline void push(int32_t d, int64_t row) {
    if (d >= dist[k - 1]) return;
#if defined(__AVX512F__) && defined(__AVX512VL__)
    if (k <= 8) {
      // Branch-free insert: the entries farther than d move up one slot and d takes the first
      // of their places. The scalar shift below stops at a data-dependent position, a branch
      // the CPU mispredicts about once per insert, and early in a scan (or over a small
      // memory) most rows insert.
      const __mmask8 live = static_cast<__mmask8>((1u << k) - 1u);
      const __m256i dv = _mm256_maskz_loadu_epi32(live, dist);
      const __m512i iv = _mm512_maskz_loadu_epi64(live, idx);
      const __mmask8 after = _mm256_mask_cmpgt_epi32_mask(live, dv, _mm256_set1_epi32(d));
      const __mmask8 at = after & static_cast<__mmask8>(~(after << 1));
      __m256i nd = _mm256_mask_blend_epi32(
          after, dv, _mm256_permutexvar_epi32(_mm256_setr_epi32(0, 0, 1, 2, 3, 4, 5, 6), dv));
      __m512i ni = _mm512_mask_blend_epi64(
          after, iv, _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 1, 2, 3, 4, 5, 6), iv));
      nd = _mm256_mask_set1_epi32(nd, at, d);
      ni = _mm512_mask_set1_epi64(ni, at, row);
      _mm256_mask_storeu_epi32(dist, live, nd);
      _mm512_mask_storeu_epi64(idx, live, ni);
      return;
    }
#endif
    int64_t pos = k - 1;
    while (pos > 0 && dist[pos - 1] > d) {
      dist[pos] = dist[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    dist[pos] = d;
    idx[pos] = row;
  }
};

// First segment whose row range contains `row` (offsets is non-decreasing, offsets[0] = 0).
inline int64_t segment_of(const int64_t* offsets, int64_t n_seg, int64_t row) {
  const int64_t* it = std::upper_bound(offsets, offsets + n_seg + 1, row);
  return static_cast<int64_t>(it - offsets) - 1;
}

// Dot product of a float32 vector and an IEEE float16 row (torch's at::Half bits).
inline float dot_half(const float* q, const uint16_t* h, int64_t n) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__F16C__) && defined(__FMA__) && defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + j)));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), v, acc);
  }
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  s = _mm_cvtss_f32(lo);
  for (; j < n; ++j) s += q[j] * _cvtsh_ss(h[j]);
#else
  for (; j < n; ++j) s += q[j] * static_cast<float>(c10::Half(h[j], c10::Half::from_bits()));
#endif
  return s;
}

}  // namespace

// Outputs are allocated by the caller (kernels/_alloc.py) so tests can poison them.
// `parallel_work`: below this many (query, row, word) triples a scan runs on the calling
// thread (see cpp_backend.PARALLEL_WORK for why).
void hamming_cpu(torch::Tensor query, torch::Tensor memory, torch::Tensor out, int64_t parallel_work) {
  const int64_t b = query.size(0), m = memory.size(0), words = query.size(1);
  const auto* q = reinterpret_cast<const uint64_t*>(query.data_ptr<int64_t>());
  const auto* mem = reinterpret_cast<const uint64_t*>(memory.data_ptr<int64_t>());
  int32_t* o = out.data_ptr<int32_t>();
  const int64_t qblocks = (b + kQueryBlock - 1) / kQueryBlock;
  const int64_t row_chunk = 256;
  const int64_t rchunks = (m + row_chunk - 1) / row_chunk;
  const int64_t grain = b * m * words < parallel_work ? std::max<int64_t>(1, qblocks * rchunks) : 1;
  at::parallel_for(0, qblocks * rchunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t / rchunks, rc = t % rchunks;
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(b, q0 + kQueryBlock);
      const int64_t r0 = rc * row_chunk, r1 = std::min(m, r0 + row_chunk);
      scan_rows(q, mem, words, q0, q1, r0, r1, [&](int64_t i, int64_t r, int32_t d) { o[i * m + r] = d; });
    }
  });
}

// Per query and segment, the k nearest rows. Work is split into tiles of (query block,
// row chunk); each tile keeps its own partial top-k lists (in the output itself when there
// is a single chunk), and partial lists are merged by (dist, idx) afterwards.
// dist (B,S,k) int32 and idx (B,S,k) int64 are outputs.
static void segmented_topk_raw(const uint64_t* q, const uint64_t* mem, const int64_t* off, int64_t b,
                               int64_t m, int64_t words, int64_t n_seg, int64_t k, int32_t* out_d,
                               int64_t* out_i, int64_t parallel_work) {

  const int64_t qblocks = (b + kQueryBlock - 1) / kQueryBlock;
  const int64_t threads = at::get_num_threads();
  // Enough row chunks that every thread has work even for one query, but no chunk
  // smaller than 512 rows (merging costs more than it saves below that).
  int64_t chunks = std::max<int64_t>(1, (2 * threads + qblocks - 1) / qblocks);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, m / 512));
  const bool serial = b * m * words < parallel_work;
  if (serial) chunks = 1;

  std::vector<int32_t> part_d;
  std::vector<int64_t> part_i;
  int32_t* pd = out_d;
  int64_t* pi = out_i;
  if (chunks > 1) {
    part_d.resize(static_cast<size_t>(chunks * b * n_seg * k));
    part_i.resize(part_d.size());
    pd = part_d.data();
    pi = part_i.data();
  }
  const int64_t part_stride = b * n_seg * k;  // one chunk's lists

  at::parallel_for(0, qblocks * chunks, serial ? qblocks * chunks : 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t qb = t / chunks, c = t % chunks;
      const int64_t q0 = qb * kQueryBlock, q1 = std::min(b, q0 + kQueryBlock);
      const int64_t r0 = m * c / chunks, r1 = m * (c + 1) / chunks;
      int32_t* cd = pd + c * part_stride;
      int64_t* ci = pi + c * part_stride;
      for (int64_t i = q0; i < q1; ++i)
        for (int64_t s = 0; s < n_seg; ++s) TopK{cd + (i * n_seg + s) * k, ci + (i * n_seg + s) * k, k}.reset();
      if (r0 >= r1) continue;
      for (int64_t s = segment_of(off, n_seg, r0); s < n_seg && off[s] < r1; ++s) {
        const int64_t lo = std::max(off[s], r0), hi = std::min(off[s + 1], r1);
        scan_rows(
            q, mem, words, q0, q1, lo, hi,
            [&](int64_t i, int64_t r, int32_t d) {
              const int64_t slot = (i * n_seg + s) * k;
              TopK{cd + slot, ci + slot, k}.push(d, r);
            },
            [&](int64_t i) -> const int32_t* { return cd + (i * n_seg + s) * k + (k - 1); });
      }
    }
  });

  if (chunks > 1) {
    // Chunks cover increasing row ranges, so pushing chunk 0's list, then chunk 1's, ...
    // preserves the lower-index tie-break.
    int32_t* od = out_d;
    int64_t* oi = out_i;
    at::parallel_for(0, b * n_seg, 16, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l) {
        TopK out{od + l * k, oi + l * k, k};
        out.reset();
        for (int64_t c = 0; c < chunks; ++c) {
          const int32_t* cd = pd + c * part_stride + l * k;
          const int64_t* ci = pi + c * part_stride + l * k;
          for (int64_t j = 0; j < k && ci[j] >= 0; ++j) out.push(cd[j], ci[j]);
        }
      }
    });
  }
}

void segmented_topk_cpu(torch::Tensor query, torch::Tensor memory, torch::Tensor offsets,
                        torch::Tensor dist, torch::Tensor idx, int64_t parallel_work) {
  segmented_topk_raw(reinterpret_cast<const uint64_t*>(query.data_ptr<int64_t>()),
                     reinterpret_cast<const uint64_t*>(memory.data_ptr<int64_t>()),
                     offsets.data_ptr<int64_t>(), query.size(0), memory.size(0), query.size(1),
                     offsets.size(0) - 1, dist.size(2), dist.data_ptr<int32_t>(),
                     idx.data_ptr<int64_t>(), parallel_work);
}

// The public segmented top-k for CPU tensors in one native call: validation, output
// allocation and the scan. At one frame against a small memory the scan takes about a
// microsecond, and the Python-side checks and torch allocations it replaces cost ten, so
// they live here. Any failed check raises ValueError; the Python caller then runs its own
// checks, which name the mistake (kernels/_checks.py), so the messages here stay terse.
std::tuple<torch::Tensor, torch::Tensor> segmented_topk_checked(torch::Tensor query, torch::Tensor memory,
                                                                torch::Tensor offsets, int64_t k,
                                                                int64_t parallel_work) {
  TORCH_CHECK_VALUE(query.dim() == 2 && memory.dim() == 2 && offsets.dim() == 1, "rank");
  TORCH_CHECK_VALUE(query.scalar_type() == at::kLong && memory.scalar_type() == at::kLong &&
                        offsets.scalar_type() == at::kLong,
                    "dtype");
  TORCH_CHECK_VALUE(query.device().is_cpu() && memory.device().is_cpu() && offsets.device().is_cpu(),
                    "device");
  const int64_t b = query.size(0), words = query.size(1), m = memory.size(0);
  const int64_t n_seg = offsets.size(0) - 1;
  TORCH_CHECK_VALUE(b > 0 && words > 0 && memory.size(1) == words && n_seg >= 1 && k >= 1, "shape");
  if (!query.is_contiguous()) query = query.contiguous();
  if (!memory.is_contiguous()) memory = memory.contiguous();
  if (!offsets.is_contiguous()) offsets = offsets.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[n_seg] == m, "offsets bounds");
  for (int64_t s = 0; s < n_seg; ++s) TORCH_CHECK_VALUE(off[s] <= off[s + 1], "offsets order");
  auto dist = torch::empty({b, n_seg, k}, query.options().dtype(at::kInt));
  auto idx = torch::empty({b, n_seg, k}, query.options());
  segmented_topk_raw(reinterpret_cast<const uint64_t*>(query.data_ptr<int64_t>()),
                     reinterpret_cast<const uint64_t*>(memory.data_ptr<int64_t>()), off, b, m, words,
                     n_seg, k, dist.data_ptr<int32_t>(), idx.data_ptr<int64_t>(), parallel_work);
  return {dist, idx};
}

template <typename scalar_t>
static void pack_rows(const scalar_t* x, int64_t d, int64_t words, uint64_t* out) {
  for (int64_t w = 0; w < words; ++w) {
    const int64_t base = w * 64, n = std::min<int64_t>(64, d - base);
    uint64_t bits = 0;
    for (int64_t j = 0; j < n; ++j) bits |= static_cast<uint64_t>(x[base + j] > 0) << j;
    out[w] = bits;
  }
}

void pack_bits_cpu(torch::Tensor x, torch::Tensor out) {
  const int64_t n = x.size(0), d = x.size(1), words = (d + 63) / 64;
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pack_bits_cpu", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pack_rows(p + i * d, d, words, o + i * words);
    });
  });
}

// In-place unnormalised fast Walsh-Hadamard transform (Sylvester order) of length p.
static inline void fwht(float* v, int64_t p) {
  for (int64_t h = 1; h < p; h <<= 1) {
    for (int64_t i = 0; i < p; i += 2 * h) {
      float* a = v + i;
      float* c = v + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float x = a[j], y = c[j];
        a[j] = x + y;
        c[j] = x - y;
      }
    }
  }
}

// One row of the structured projection: sign(H D2 H D1 pad(xi)) per round, packed into oi.
// v is a P-float scratch buffer. Shared by the projection kernel and the fused bank scorer,
// so both give the same bits for the same input row.
static inline void project_row(const float* xi, int64_t f, const float* sg, int64_t rounds, int64_t p,
                               const float* bs, int64_t dim, float* v, uint64_t* oi) {
  for (int64_t r = 0; r < rounds; ++r) {
    const float* s1 = sg + (r * 2) * p;
    const float* s2 = s1 + p;
    for (int64_t j = 0; j < f; ++j) v[j] = xi[j] * s1[j];
    std::fill(v + f, v + p, 0.0f);
    fwht(v, p);
    for (int64_t j = 0; j < p; ++j) v[j] *= s2[j];
    fwht(v, p);
    // p is a multiple of 64, so round r fills whole words starting at r*p/64.
    const int64_t c0 = r * p;
    for (int64_t w = 0; w < p / 64; ++w) {
      const int64_t base = c0 + w * 64;
      if (base >= dim) break;
      const int64_t n = std::min<int64_t>(64, dim - base);
      uint64_t bits = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float h = bs ? v[w * 64 + j] + bs[base + j] : v[w * 64 + j];
        bits |= static_cast<uint64_t>(h > 0) << j;
      }
      oi[base / 64] = bits;
    }
  }
}

// sign(H D2 H D1 pad(x)) per round, concatenated, cut to `dim`, plus optional bias, packed.
// features (B,F) float32, signs (R,2,P) float32 of +-1, bias (dim,) float32 or empty.
// The float hypervector lives only in a P-float scratch buffer per thread.
void hadamard_project_pack_cpu(torch::Tensor features, torch::Tensor signs, torch::Tensor bias,
                               int64_t dim, torch::Tensor out) {
  const int64_t b = features.size(0), f = features.size(1);
  const int64_t rounds = signs.size(0), p = signs.size(2), words = (dim + 63) / 64;
  const float* x = features.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(p));
    for (int64_t i = begin; i < end; ++i) project_row(x + i * f, f, sg, rounds, p, bs, dim, buf.data(), o + i * words);
  });
}

// The memory bank's whole per-frame scoring step for a small batch, with no Python between
// the stages: per-layer L2 normalisation and weighting (layers (L,2) int64 column ranges,
// weights (L,) float32) → structured sign projection → per-segment Hamming top-k →
// k-NN similarity (1 - 2d/D; reduce 0 = "kth" neighbour, 1 = "mean" of the valid ones; an
// empty segment scores -inf) → minus thresholds (S,) float32. out (B,S) float32.
// Normalisation: ||x|| accumulated in double, rounded to float, clamped at 1e-12 like
// F.normalize; the division and weighting are single float32 operations, as in numpy.
int64_t fused_bank_scores_cpu(torch::Tensor features, torch::Tensor layers, torch::Tensor weights,
                           bool layer_norm, torch::Tensor signs, int64_t dim, torch::Tensor memory,
                           torch::Tensor offsets, int64_t k, int64_t reduce, torch::Tensor thresholds,
                           torch::Tensor exact, int64_t candidates, torch::Tensor out,
                           int64_t parallel_work) {
  const int64_t b = features.size(0), f_in = features.size(1);
  const int64_t n_layers = layers.size(0);
  const int64_t rounds = signs.size(0), p = signs.size(2), words = (dim + 63) / 64;
  const int64_t m = memory.size(0), n_seg = offsets.size(0) - 1;
  const float* x = features.data_ptr<float>();
  const int64_t* lay = layers.data_ptr<int64_t>();
  const float* lw = weights.data_ptr<float>();
  const float* sg = signs.data_ptr<float>();
  const float* thr = thresholds.data_ptr<float>();
  float* o = out.data_ptr<float>();
  int64_t width = 0;
  for (int64_t l = 0; l < n_layers; ++l) width += lay[2 * l + 1] - lay[2 * l];

  // Re-ranking (exact non-empty): keep `candidates` rows per segment, score them by the exact
  // angle between unit-norm vectors (exact: (M, width) float16 rows), as kernels/rerank.py.
  const bool rerank = exact.numel() > 0;
  const int64_t k_scan = rerank ? candidates : k;
  std::vector<float> unit(rerank ? static_cast<size_t>(b * width) : 0);

  // A row with NaN or Inf anywhere is not scored: its outputs become NaN and the return value
  // counts such rows, so the caller can report the bad input without a pass of its own.
  std::vector<uint8_t> bad(static_cast<size_t>(b), 0);
  std::vector<uint64_t> codes(static_cast<size_t>(b * words));
  const auto project = [&](int64_t begin, int64_t end) {
    std::vector<float> z(static_cast<size_t>(width)), buf(static_cast<size_t>(p));
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = x + i * f_in;
      float probe = 0.0f;  // x * 0 is NaN exactly when x is NaN or infinite
      for (int64_t j = 0; j < f_in; ++j) probe += xi[j] * 0.0f;
      if (probe != probe) {
        bad[i] = 1;
        continue;
      }
      int64_t c = 0;
      for (int64_t l = 0; l < n_layers; ++l) {
        const int64_t a = lay[2 * l], e = lay[2 * l + 1];
        const float w = lw[l];
        if (layer_norm) {
          double ss = 0.0;
          for (int64_t j = a; j < e; ++j) ss += static_cast<double>(xi[j]) * xi[j];
          const float norm = std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
          for (int64_t j = a; j < e; ++j) z[c++] = (xi[j] / norm) * w;
        } else {
          for (int64_t j = a; j < e; ++j) z[c++] = xi[j] * w;
        }
      }
      project_row(z.data(), width, sg, rounds, p, nullptr, dim, buf.data(), codes.data() + i * words);
      if (rerank) {
        double ss = 0.0;
        for (int64_t j = 0; j < width; ++j) ss += static_cast<double>(z[j]) * z[j];
        const float norm = std::max(static_cast<float>(std::sqrt(ss)), 1e-12f);
        for (int64_t j = 0; j < width; ++j) unit[i * width + j] = z[j] / norm;
      }
    }
  };
  if (b == 1) project(0, 1);  // no thread pool round trip for the per-frame case
  else at::parallel_for(0, b, 1, project);

  std::vector<int32_t> dist(static_cast<size_t>(b * n_seg * k_scan));
  std::vector<int64_t> idx(dist.size());
  segmented_topk_raw(codes.data(), reinterpret_cast<const uint64_t*>(memory.data_ptr<int64_t>()),
                     offsets.data_ptr<int64_t>(), b, m, words, n_seg, k_scan, dist.data(), idx.data(),
                     parallel_work);

  if (rerank) {
    const auto* ex = reinterpret_cast<const uint16_t*>(exact.data_ptr<at::Half>());
    const double pi = 3.14159265358979323846;
    std::vector<double> ang(static_cast<size_t>(k_scan));
#if defined(__x86_64__)
    // The candidates are scattered rows of a large table: ask for all of them before the
    // first dot product, so their cache misses overlap instead of queueing one row at a time.
    const int64_t row_bytes = width * static_cast<int64_t>(sizeof(uint16_t));
    for (int64_t l = 0; l < b * n_seg * k_scan; ++l) {
      if (idx[l] < 0) continue;
      const char* row = reinterpret_cast<const char*>(ex + idx[l] * width);
      for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
#endif
    for (int64_t l = 0; l < b * n_seg; ++l) {
      const int64_t* rows = idx.data() + l * k_scan;
      const float* zq = unit.data() + (l / n_seg) * width;
      int64_t n = 0;
      for (int64_t j = 0; j < k_scan; ++j) {
        if (rows[j] < 0) continue;
        const double c = std::min(1.0, std::max(-1.0, static_cast<double>(dot_half(zq, ex + rows[j] * width, width))));
        ang[n++] = 1.0 - 2.0 * std::acos(c) / pi;
      }
      float sim;
      const int64_t keep = std::min(n, k);
      if (keep == 0) {
        sim = -std::numeric_limits<float>::infinity();
      } else {
        std::partial_sort(ang.begin(), ang.begin() + keep, ang.begin() + n, std::greater<double>());
        if (reduce == 0) {
          sim = static_cast<float>(ang[keep - 1]);
        } else {
          double total = 0.0;
          for (int64_t j = 0; j < keep; ++j) total += ang[j];
          sim = static_cast<float>(total / static_cast<double>(keep));
        }
      }
      o[l] = sim - thr[l % n_seg];
    }
  } else {
    const double dd = static_cast<double>(dim);
    for (int64_t l = 0; l < b * n_seg; ++l) {
      const int32_t* d = dist.data() + l * k;
      int64_t n_valid = 0;
      double total = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        if (d[j] == kPadDist) continue;
        ++n_valid;
        total += 1.0 - 2.0 * static_cast<double>(d[j]) / dd;
      }
      float sim;
      if (n_valid == 0) {
        sim = -std::numeric_limits<float>::infinity();
      } else if (reduce == 0) {  // valid entries come first (ascending, padding last)
        sim = static_cast<float>(1.0 - 2.0 * static_cast<double>(d[n_valid - 1]) / dd);
      } else {
        sim = static_cast<float>(total / static_cast<double>(n_valid));
      }
      o[l] = sim - thr[l % n_seg];
    }
  }
  int64_t n_bad = 0;
  for (int64_t i = 0; i < b; ++i) {
    if (!bad[i]) continue;
    ++n_bad;
    for (int64_t t = 0; t < n_seg; ++t) o[i * n_seg + t] = std::numeric_limits<float>::quiet_NaN();
  }
  return n_bad;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hamming", &hamming_cpu, "packed Hamming distances (B,M) int32");
  m.def("segmented_topk", &segmented_topk_cpu, "per-segment Hamming top-k");
  m.def("segmented_topk_checked", &segmented_topk_checked, "validate, allocate, per-segment top-k");
  m.def("pack_bits", &pack_bits_cpu, "pack (N,D) float rows into (N,W) int64");
  m.def("hadamard_project_pack", &hadamard_project_pack_cpu, "structured sign projection, packed");
  m.def("fused_bank_scores", &fused_bank_scores_cpu, "normalise, project, top-k, k-NN score, calibrate");
}
