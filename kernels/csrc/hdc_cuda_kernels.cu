// CUDA kernels for the HDC hot path (Jetson and desktop GPUs), free of torch headers so
// that `nvcc -c` can check them on any machine with nvcc; hdc_cuda.cpp binds them to torch.
//
// Layout as in kernels/reference.py: packed rows int64 (N, W), offsets (S+1,).
// One warp scans one memory row at a time: lanes stride over the row's words (coalesced
// loads), __popcll counts, a shuffle reduction sums. Lane 0 of each warp keeps that warp's
// sorted top-k keys (distance << 32 | row: unique, ties go to the lower row); at the end
// thread 0 merges the warps' lists. splits > 1 are merged on the host.
//
// Grid limits: gridDim.x may reach 2^31-1 but gridDim.y/z only 65,535. So the many-valued
// axis (row blocks for hamming) sits on x, and every y/z axis (queries, segments, splits)
// is capped at HDC_MAX_GRID_YZ and walked with a grid-stride loop inside the kernel.
#include <cuda_runtime.h>
#include <stdint.h>

#define HDC_WARPS 4
#define HDC_MAX_K 32
#define HDC_PAD_KEY 0x7FFFFFFFFFFFFFFFULL
#define HDC_MAX_GRID_YZ 65535LL
#define HDC_MAX_GRID_X 2147483647LL

__device__ __forceinline__ int warp_distance(const unsigned long long* q, const unsigned long long* row,
                                             int words, int lane) {
  int acc = 0;
  for (int w = lane; w < words; w += 32) acc += __popcll(q[w] ^ row[w]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

__global__ void hdc_hamming_kernel(const unsigned long long* query, const unsigned long long* memory,
                                   int* out, long long batch, long long rows, int words) {
  extern __shared__ unsigned long long q_shared[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // rows on x (grid-stride too, should the x cap ever bind), queries on y (grid-stride)
  for (long long rb = blockIdx.x; rb * HDC_WARPS < rows; rb += gridDim.x) {
    const long long r = rb * HDC_WARPS + warp;
    for (long long b = blockIdx.y; b < batch; b += gridDim.y) {
      __syncthreads();  // the previous query's words are no longer read
      for (int w = threadIdx.x; w < words; w += blockDim.x) q_shared[w] = query[b * words + w];
      __syncthreads();
      if (r < rows) {  // no early return: every thread must reach the barriers
        const int d = warp_distance(q_shared, memory + r * words, words, lane);
        if (lane == 0) out[b * rows + r] = d;
      }
    }
  }
}

__global__ void hdc_topk_kernel(const unsigned long long* query, const unsigned long long* memory,
                                const long long* offsets, unsigned long long* out_keys, long long batch,
                                int n_seg, int words, int k, int splits) {
  extern __shared__ unsigned long long q_shared[];
  __shared__ unsigned long long lists[HDC_WARPS][HDC_MAX_K];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // queries on x, segments on y, splits on z; y and z are grid-stride (capped at 65,535)
  for (long long b = blockIdx.x; b < batch; b += gridDim.x) {
    __syncthreads();  // the previous query's words are no longer read
    for (int w = threadIdx.x; w < words; w += blockDim.x) q_shared[w] = query[b * words + w];
    for (int seg = blockIdx.y; seg < n_seg; seg += gridDim.y) {
      for (int split = blockIdx.z; split < splits; split += gridDim.z) {
        __syncthreads();  // thread 0 is done merging the previous lists
        if (lane == 0)
          for (int j = 0; j < k; ++j) lists[warp][j] = HDC_PAD_KEY;
        __syncthreads();

        const long long lo = offsets[seg], hi = offsets[seg + 1], span = hi - lo;
        const long long start = lo + span * split / splits, stop = lo + span * (split + 1) / splits;
        for (long long r = start + warp; r < stop; r += HDC_WARPS) {
          const int d = warp_distance(q_shared, memory + r * words, words, lane);
          if (lane == 0) {
            const unsigned long long key = ((unsigned long long)d << 32) | (unsigned long long)r;
            unsigned long long* list = lists[warp];
            if (key < list[k - 1]) {
              int pos = k - 1;
              while (pos > 0 && list[pos - 1] > key) {
                list[pos] = list[pos - 1];
                --pos;
              }
              list[pos] = key;
            }
          }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          int head[HDC_WARPS] = {0};
          unsigned long long* dst = out_keys + ((b * n_seg + seg) * splits + split) * k;
          for (int j = 0; j < k; ++j) {
            int pick = 0;
            unsigned long long best = HDC_PAD_KEY;
            for (int w = 0; w < HDC_WARPS; ++w) {
              const unsigned long long v = head[w] < k ? lists[w][head[w]] : HDC_PAD_KEY;
              if (v < best) {
                best = v;
                pick = w;
              }
            }
            if (best != HDC_PAD_KEY) ++head[pick];
            dst[j] = best;
          }
        }
      }
    }
  }
}

__global__ void hdc_pack_kernel(const float* x, unsigned long long* out, long long n, long long dim,
                                long long words) {
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < n * words; t += step) {
    const long long i = t / words, w = t % words, base = w * 64;
    const long long m = dim - base < 64 ? dim - base : 64;
    unsigned long long bits = 0;
    for (long long j = 0; j < m; ++j) bits |= (unsigned long long)(x[i * dim + base + j] > 0.0f) << j;
    out[t] = bits;
  }
}

static unsigned cap_blocks(long long want, long long cap) {
  return (unsigned)(want < 1 ? 1 : (want < cap ? want : cap));
}

extern "C" cudaError_t hdc_launch_hamming(const int64_t* query, const int64_t* memory, int32_t* out,
                                          int64_t batch, int64_t rows, int64_t words,
                                          cudaStream_t stream) {
  dim3 grid(cap_blocks((rows + HDC_WARPS - 1) / HDC_WARPS, HDC_MAX_GRID_X),
            cap_blocks(batch, HDC_MAX_GRID_YZ));
  hdc_hamming_kernel<<<grid, HDC_WARPS * 32, words * sizeof(unsigned long long), stream>>>(
      (const unsigned long long*)query, (const unsigned long long*)memory, (int*)out, (long long)batch,
      (long long)rows, (int)words);
  return cudaGetLastError();
}

extern "C" cudaError_t hdc_launch_topk(const int64_t* query, const int64_t* memory, const int64_t* offsets,
                                       int64_t* out_keys, int64_t batch, int64_t n_seg, int64_t words,
                                       int64_t k, int64_t splits, cudaStream_t stream) {
  if (k > HDC_MAX_K) return cudaErrorInvalidValue;
  if (k < 1 || n_seg > 0x7FFFFFFFLL || splits > 0x7FFFFFFFLL) return cudaErrorInvalidValue;
  dim3 grid(cap_blocks(batch, HDC_MAX_GRID_X), cap_blocks(n_seg, HDC_MAX_GRID_YZ),
            cap_blocks(splits, HDC_MAX_GRID_YZ));
  hdc_topk_kernel<<<grid, HDC_WARPS * 32, words * sizeof(unsigned long long), stream>>>(
      (const unsigned long long*)query, (const unsigned long long*)memory, (const long long*)offsets,
      (unsigned long long*)out_keys, (long long)batch, (int)n_seg, (int)words, (int)k, (int)splits);
  return cudaGetLastError();
}

extern "C" cudaError_t hdc_launch_pack(const float* x, int64_t* out, int64_t n, int64_t dim,
                                       cudaStream_t stream) {
  const long long words = (dim + 63) / 64, total = n * words;
  const int threads = 256;
  hdc_pack_kernel<<<cap_blocks((total + threads - 1) / threads, HDC_MAX_GRID_X), threads, 0, stream>>>(
      x, (unsigned long long*)out, n, dim, words);
  return cudaGetLastError();
}
