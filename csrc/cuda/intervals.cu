// Gather many flat intervals of a buffer into one contiguous message, and scatter a message back.
//
// For reallocation (executor/realloc.py): a message is K intervals [start_k, start_k + len_k) of a rank's
// flat parameter buffer, laid end to end. off_k = len_0 + ... + len_{k-1} (exclusive prefix sum, off_K =
// total). Element j of the message belongs to the interval k with off_k <= j < off_{k+1} (binary search),
// at buffer index start_k + (j - off_k). One thread per element, moving raw 2-, 4- or 8-byte words, so no
// int64 index per element is ever materialised (the torch path's index costs 4x a bf16 payload).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdint>

namespace {

__device__ __forceinline__ int64_t find_interval(const int64_t* off, int64_t k_count, int64_t j) {
  // largest k with off[k] <= j
  int64_t lo = 0, hi = k_count - 1;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) >> 1;
    if (off[mid] <= j) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename Word, bool kGather>
__global__ void interval_copy(Word* __restrict__ flat, Word* __restrict__ msg, const int64_t* __restrict__ start,
                              const int64_t* __restrict__ off, int64_t k_count, int64_t total) {
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < total;
       j += (int64_t)gridDim.x * blockDim.x) {
    int64_t k = find_interval(off, k_count, j);
    int64_t i = start[k] + (j - off[k]);
    if (kGather) msg[j] = flat[i]; else flat[i] = msg[j];
  }
}

template <bool kGather>
void launch(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off) {
  TORCH_CHECK(flat.is_cuda() && msg.is_cuda() && start.is_cuda() && off.is_cuda(), "tensors must be on CUDA");
  TORCH_CHECK(flat.is_contiguous() && msg.is_contiguous(), "flat and msg must be contiguous");
  TORCH_CHECK(flat.scalar_type() == msg.scalar_type(), "flat and msg must have one dtype");
  TORCH_CHECK(start.scalar_type() == torch::kInt64 && off.scalar_type() == torch::kInt64, "int64 offsets");
  const int64_t k_count = start.numel();
  TORCH_CHECK(off.numel() == k_count + 1, "off must have K + 1 entries");
  const int64_t total = msg.numel();
  if (total == 0 || k_count == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535LL * 8);
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (flat.element_size()) {
    case 2:
      interval_copy<uint16_t, kGather><<<blocks, threads, 0, stream>>>(
          reinterpret_cast<uint16_t*>(flat.data_ptr()), reinterpret_cast<uint16_t*>(msg.data_ptr()),
          start.data_ptr<int64_t>(), off.data_ptr<int64_t>(), k_count, total);
      break;
    case 4:
      interval_copy<uint32_t, kGather><<<blocks, threads, 0, stream>>>(
          reinterpret_cast<uint32_t*>(flat.data_ptr()), reinterpret_cast<uint32_t*>(msg.data_ptr()),
          start.data_ptr<int64_t>(), off.data_ptr<int64_t>(), k_count, total);
      break;
    case 8:
      interval_copy<uint64_t, kGather><<<blocks, threads, 0, stream>>>(
          reinterpret_cast<uint64_t*>(flat.data_ptr()), reinterpret_cast<uint64_t*>(msg.data_ptr()),
          start.data_ptr<int64_t>(), off.data_ptr<int64_t>(), k_count, total);
      break;
    default:
      TORCH_CHECK(false, "element size must be 2, 4 or 8 bytes");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off) {
  launch<true>(flat, msg, start, off);
}

void scatter(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off) {
  launch<false>(flat, msg, start, off);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather", &gather, "msg[j] = flat[start[k] + j - off[k]] for off[k] <= j < off[k+1]");
  m.def("scatter", &scatter, "flat[start[k] + j - off[k]] = msg[j] for off[k] <= j < off[k+1]");
}
