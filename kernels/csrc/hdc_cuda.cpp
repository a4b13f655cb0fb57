// torch bindings for csrc/hdc_cuda_kernels.cu. Inputs are validated in Python
// (kernels/_checks.py); here only device/contiguity is asserted.
//
// Each binding first makes the inputs' GPU current (OptionalCUDAGuard): without it a tensor on
// cuda:1 would launch on whichever device is current (usually cuda:0) and on that device's
// stream. getCurrentCUDAStream() is read after the guard, so it is the stream of the tensors'
// device (a user's torch.cuda.stream(...) on that device is honoured).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

extern "C" cudaError_t hdc_launch_hamming(const int64_t*, const int64_t*, int32_t*, int64_t, int64_t,
                                          int64_t, cudaStream_t);
extern "C" cudaError_t hdc_launch_topk(const int64_t*, const int64_t*, const int64_t*, int64_t*, int64_t,
                                       int64_t, int64_t, int64_t, int64_t, cudaStream_t);
extern "C" cudaError_t hdc_launch_pack(const float*, int64_t*, int64_t, int64_t, cudaStream_t);

static void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

// Outputs are allocated by the caller (kernels/_alloc.py) so tests can poison them.
void hamming_cuda(torch::Tensor query, torch::Tensor memory, torch::Tensor out) {
  TORCH_CHECK(query.is_cuda() && memory.is_cuda() && query.is_contiguous() && memory.is_contiguous());
  TORCH_CHECK(memory.device() == query.device() && out.device() == query.device(),
              "hamming: tensors on different devices");
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  check_launch(hdc_launch_hamming(query.data_ptr<int64_t>(), memory.data_ptr<int64_t>(),
                                  out.data_ptr<int32_t>(), query.size(0), memory.size(0), query.size(1),
                                  at::cuda::getCurrentCUDAStream()),
               "hamming");
}

// Fills keys (B, S, splits, k) int64 with sorted keys distance << 32 | row.
void topk_keys_cuda(torch::Tensor query, torch::Tensor memory, torch::Tensor offsets, torch::Tensor keys) {
  TORCH_CHECK(query.is_cuda() && memory.is_cuda() && offsets.is_cuda() && keys.is_cuda());
  TORCH_CHECK(memory.device() == query.device() && offsets.device() == query.device() &&
                  keys.device() == query.device(),
              "topk: tensors on different devices");
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  const int64_t n_seg = offsets.size(0) - 1, splits = keys.size(2), k = keys.size(3);
  check_launch(hdc_launch_topk(query.data_ptr<int64_t>(), memory.data_ptr<int64_t>(),
                               offsets.data_ptr<int64_t>(), keys.data_ptr<int64_t>(), query.size(0), n_seg,
                               query.size(1), k, splits, at::cuda::getCurrentCUDAStream()),
               "topk");
}

void pack_bits_cuda(torch::Tensor x, torch::Tensor out) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.scalar_type() == torch::kFloat32);
  TORCH_CHECK(out.device() == x.device(), "pack: tensors on different devices");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  check_launch(hdc_launch_pack(x.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1),
                               at::cuda::getCurrentCUDAStream()),
               "pack");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hamming", &hamming_cuda, "packed Hamming distances (B,M) int32 on CUDA");
  m.def("topk_keys", &topk_keys_cuda, "per-segment top-k keys on CUDA");
  m.def("pack_bits", &pack_bits_cuda, "pack float32 rows on CUDA");
}
