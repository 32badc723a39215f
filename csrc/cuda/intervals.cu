// Gather many flat intervals of a buffer into one contiguous message, and scatter a message back.
//
// For reallocation (executor/realloc.py): a message is K intervals [start_k, start_k + len_k) of a rank's
// flat parameter buffer, laid end to end. off_k = len_0 + ... + len_{k-1} (exclusive prefix sum, off_K =
// total). Element j of the message belongs to the interval k with off_k <= j < off_{k+1}, at buffer index
// start_k + (j - off_k).
//
// Indices are in *words*: 16-byte vectors when every start and length is a multiple of 16 bytes and both
// buffers are 16-byte aligned (the usual case: shard widths are multiples of 8 bf16), else the element
// itself (2, 4 or 8 bytes). The caller converts starts/offsets to word units.
//
// Work split: the message is cut into chunks of kChunk words, one block each. The host gives each chunk
// the interval holding its first word (chunk_first, a searchsorted of the chunk starts in off). The block
// copies the chunk's (few) interval boundaries into shared memory; thread t then walks words
// j0 + t, j0 + t + blockDim, ... in order, advancing its interval index linearly: no per-word binary search,
// coalesced reads and writes of the message, and runs of at least one word per interval on the buffer side.
// Chunks spanning more than kMaxShared intervals (tiny intervals) read the boundaries from global memory.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 8192;      // words per block: 128 KiB of vectors, 32 per thread
constexpr int kMaxShared = 512;        // interval boundaries cached in shared memory per block
constexpr int kUnroll = 4;

struct alignas(16) Vec16 {
  uint4 v;
};

template <typename Word, bool kGather>
__global__ void __launch_bounds__(kThreads) interval_copy(
    Word* __restrict__ flat, Word* __restrict__ msg, const int64_t* __restrict__ start,
    const int64_t* __restrict__ off, const int64_t* __restrict__ chunk_first, int64_t k_count, int64_t total) {
  __shared__ int64_t s_off[kMaxShared + 1];
  __shared__ int64_t s_start[kMaxShared];
  const int64_t j0 = (int64_t)blockIdx.x * kChunk;
  const int64_t j1 = min(j0 + kChunk, total);
  const int64_t k0 = chunk_first[blockIdx.x];
  // last interval touching the chunk: the next chunk's first (or the last interval)
  const int64_t k1 = (blockIdx.x + 1 < gridDim.x) ? chunk_first[blockIdx.x + 1] : k_count - 1;
  const int64_t n = k1 - k0 + 1;
  const bool cached = n <= kMaxShared;
  if (cached) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      s_off[i] = off[k0 + i];
      s_start[i] = start[k0 + i];
    }
    if (threadIdx.x == 0) s_off[n] = off[k0 + n];
    __syncthreads();
  }
  const int64_t* o = cached ? s_off : off + k0;
  const int64_t* s = cached ? s_start : start + k0;
  int64_t k = 0;  // local interval index, only ever advances
  // kUnroll words per thread per round: all their loads are issued before any store (bytes in flight).
  for (int64_t base = j0 + threadIdx.x; base < j1; base += (int64_t)kThreads * kUnroll) {
    int64_t idx[kUnroll];
    Word w[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + (int64_t)u * kThreads;
      if (j < j1) {
        while (o[k + 1] <= j) ++k;
        idx[u] = s[k] + (j - o[k]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + (int64_t)u * kThreads;
      if (j < j1) w[u] = kGather ? flat[idx[u]] : msg[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + (int64_t)u * kThreads;
      if (j < j1) {
        if (kGather) msg[j] = w[u]; else flat[idx[u]] = w[u];
      }
    }
  }
}

template <bool kGather>
void launch(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off, torch::Tensor chunk_first,
            int64_t word_bytes) {
  TORCH_CHECK(flat.is_cuda() && msg.is_cuda() && start.is_cuda() && off.is_cuda() && chunk_first.is_cuda(),
              "tensors must be on CUDA");
  TORCH_CHECK(flat.is_contiguous() && msg.is_contiguous(), "flat and msg must be contiguous");
  TORCH_CHECK(flat.scalar_type() == msg.scalar_type(), "flat and msg must have one dtype");
  TORCH_CHECK(start.scalar_type() == torch::kInt64 && off.scalar_type() == torch::kInt64 &&
              chunk_first.scalar_type() == torch::kInt64, "int64 offsets");
  const int64_t k_count = start.numel();
  TORCH_CHECK(off.numel() == k_count + 1, "off must have K + 1 entries");
  const int64_t esize = flat.element_size();
  TORCH_CHECK(word_bytes == esize || word_bytes == 16, "word_bytes must be the element size or 16");
  TORCH_CHECK((msg.numel() * esize) % word_bytes == 0, "message is not a whole number of words");
  const int64_t total = msg.numel() * esize / word_bytes;
  if (total == 0 || k_count == 0) return;
  const int64_t blocks = (total + kChunk - 1) / kChunk;
  TORCH_CHECK(chunk_first.numel() == blocks, "chunk_first must have one entry per chunk of ", kChunk, " words");
  TORCH_CHECK(blocks < (1LL << 31), "message too large");
  if (word_bytes == 16) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(flat.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(msg.data_ptr()) % 16 == 0, "16-byte words need 16-byte aligned buffers");
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t* st = start.data_ptr<int64_t>();
  const int64_t* of = off.data_ptr<int64_t>();
  const int64_t* cf = chunk_first.data_ptr<int64_t>();
#define REALLM_LAUNCH(W)                                                                                  \
  interval_copy<W, kGather><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<W*>(flat.data_ptr()),       \
                                                             reinterpret_cast<W*>(msg.data_ptr()), st, of, \
                                                             cf, k_count, total)
  switch (word_bytes) {
    case 2: REALLM_LAUNCH(uint16_t); break;
    case 4: REALLM_LAUNCH(uint32_t); break;
    case 8: REALLM_LAUNCH(uint64_t); break;
    case 16: REALLM_LAUNCH(Vec16); break;
    default: TORCH_CHECK(false, "element size must be 2, 4 or 8 bytes");
  }
#undef REALLM_LAUNCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off, torch::Tensor chunk_first,
            int64_t word_bytes) {
  launch<true>(flat, msg, start, off, chunk_first, word_bytes);
}

void scatter(torch::Tensor flat, torch::Tensor msg, torch::Tensor start, torch::Tensor off, torch::Tensor chunk_first,
             int64_t word_bytes) {
  launch<false>(flat, msg, start, off, chunk_first, word_bytes);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CHUNK_WORDS") = kChunk;
  m.def("gather", &gather, "msg[j] = flat[start[k] + j - off[k]] for off[k] <= j < off[k+1] (word units)");
  m.def("scatter", &scatter, "flat[start[k] + j - off[k]] = msg[j] for off[k] <= j < off[k+1] (word units)");
}
