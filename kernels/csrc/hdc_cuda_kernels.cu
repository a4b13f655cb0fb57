// CUDA kernels for the HDC hot path (Jetson and desktop GPUs), free of torch headers so
// that `nvcc -c` can check them on any machine with nvcc; hdc_cuda.cpp binds them to torch.
//
// Layout as in kernels/reference.py: packed rows int64 (N, W), offsets (S+1,).
// One warp scans one memory row at a time: lanes stride over the row's words (coalesced
// loads), __popcll counts, a shuffle reduction sums. Lane 0 of each warp keeps that warp's
// sorted top-k keys (distance << 32 | row: unique, ties go to the lower row); at the end
// thread 0 merges the warps' lists. Grid (B, S, splits); splits > 1 are merged on the host.
#include <cuda_runtime.h>
#include <stdint.h>

#define HDC_WARPS 4
#define HDC_MAX_K 32
#define HDC_PAD_KEY 0x7FFFFFFFFFFFFFFFULL

__device__ __forceinline__ int warp_distance(const unsigned long long* q, const unsigned long long* row,
                                             int words, int lane) {
  int acc = 0;
  for (int w = lane; w < words; w += 32) acc += __popcll(q[w] ^ row[w]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}

__global__ void hdc_hamming_kernel(const unsigned long long* query, const unsigned long long* memory,
                                   int* out, long long rows, int words) {
  extern __shared__ unsigned long long q_shared[];
  const long long b = blockIdx.x;
  for (int w = threadIdx.x; w < words; w += blockDim.x) q_shared[w] = query[b * words + w];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long r = (long long)blockIdx.y * HDC_WARPS + warp;
  if (r >= rows) return;
  const int d = warp_distance(q_shared, memory + r * words, words, lane);
  if (lane == 0) out[b * rows + r] = d;
}

__global__ void hdc_topk_kernel(const unsigned long long* query, const unsigned long long* memory,
                                const long long* offsets, unsigned long long* out_keys, int n_seg,
                                int words, int k, int splits) {
  extern __shared__ unsigned long long q_shared[];
  __shared__ unsigned long long lists[HDC_WARPS][HDC_MAX_K];
  const long long b = blockIdx.x;
  const int seg = blockIdx.y, split = blockIdx.z;
  for (int w = threadIdx.x; w < words; w += blockDim.x) q_shared[w] = query[b * words + w];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
    unsigned long long* dst = out_keys + (((long long)b * n_seg + seg) * splits + split) * k;
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

__global__ void hdc_pack_kernel(const float* x, unsigned long long* out, long long n, long long dim,
                                long long words) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n * words) return;
  const long long i = t / words, w = t % words, base = w * 64;
  const long long m = dim - base < 64 ? dim - base : 64;
  unsigned long long bits = 0;
  for (long long j = 0; j < m; ++j) bits |= (unsigned long long)(x[i * dim + base + j] > 0.0f) << j;
  out[t] = bits;
}

extern "C" cudaError_t hdc_launch_hamming(const int64_t* query, const int64_t* memory, int32_t* out,
                                          int64_t batch, int64_t rows, int64_t words,
                                          cudaStream_t stream) {
  dim3 grid((unsigned)batch, (unsigned)((rows + HDC_WARPS - 1) / HDC_WARPS));
  hdc_hamming_kernel<<<grid, HDC_WARPS * 32, words * sizeof(unsigned long long), stream>>>(
      (const unsigned long long*)query, (const unsigned long long*)memory, (int*)out, rows, (int)words);
  return cudaGetLastError();
}

extern "C" cudaError_t hdc_launch_topk(const int64_t* query, const int64_t* memory, const int64_t* offsets,
                                       int64_t* out_keys, int64_t batch, int64_t n_seg, int64_t words,
                                       int64_t k, int64_t splits, cudaStream_t stream) {
  if (k > HDC_MAX_K) return cudaErrorInvalidValue;
  dim3 grid((unsigned)batch, (unsigned)n_seg, (unsigned)splits);
  hdc_topk_kernel<<<grid, HDC_WARPS * 32, words * sizeof(unsigned long long), stream>>>(
      (const unsigned long long*)query, (const unsigned long long*)memory, (const long long*)offsets,
      (unsigned long long*)out_keys, (int)n_seg, (int)words, (int)k, (int)splits);
  return cudaGetLastError();
}

extern "C" cudaError_t hdc_launch_pack(const float* x, int64_t* out, int64_t n, int64_t dim,
                                       cudaStream_t stream) {
  const long long words = (dim + 63) / 64, total = n * words;
  const int threads = 256;
  hdc_pack_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, stream>>>(
      x, (unsigned long long*)out, n, dim, words);
  return cudaGetLastError();
}
