// Packed GAE over variable-length sequences: one warp per sequence, reverse scan.
//
// Layout (reallm.algorithms.functional): sequence i has n_i = L_i - 1 reward entries at
// rewards[short_cu[i] .. short_cu[i+1]) and L_i values at values[short_cu[i] + i ..][0 .. n_i].
//   delta[k] = r[k] + gamma * V[k+1] * (k == n_i - 1 ? bootstrap_i : 1) - V[k]
//   A[k]     = delta[k] + gamma * lam * A[k+1]          (A[n_i] = 0)
//   R[k]     = A[k] + V[k]
// Lanes take 32 entries at a time from the end (lane j <-> entry n_i - 1 - (base + j)), so in lane order
// the recurrence is x_j = delta_j + c * x_{j-1} with c = gamma * lam: an inclusive Kogge-Stone scan where
// step `off` adds c^off * x_{j-off}; then x_j += c^(j+1) * carry (carry = A of the entry just after the
// chunk, from lane 31 of the previous chunk). Arithmetic is fp64 for fp32 inputs too (the kernel is
// latency-bound, so this is free): it then equals the fp64 torch path up to the final rounding, where fp32
// accumulation drifted by ~1e-5 relative over 1500-token sequences with gamma = lam = 1.
// Built JIT by reallm/kernels/gae.py; binding at the bottom.

#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename scalar_t>
__global__ void gae_packed_kernel(const scalar_t* __restrict__ rewards, const scalar_t* __restrict__ values,
                                  const int* __restrict__ short_cu, const bool* __restrict__ bootstrap,
                                  const double gamma, const double lam, const int num_seqs,
                                  scalar_t* __restrict__ adv, scalar_t* __restrict__ ret) {
  using acc_t = double;
  const int seq = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (seq >= num_seqs) return;  // warp-uniform: the whole warp leaves together

  const int r_begin = short_cu[seq];
  const int n = short_cu[seq + 1] - r_begin;
  const int v_begin = r_begin + seq;
  const bool boot = bootstrap[seq];
  const acc_t c = gamma * lam;
  acc_t c_lane = c;  // c^(lane + 1)
  for (int i = 0; i < lane; ++i) c_lane *= c;

  acc_t carry = 0;
  for (int base = 0; base < n; base += kWarp) {
    const int k = n - 1 - (base + lane);
    acc_t x = 0;
    acc_t v_k = 0;
    if (k >= 0) {
      v_k = static_cast<acc_t>(values[v_begin + k]);
      acc_t v_next = static_cast<acc_t>(values[v_begin + k + 1]);
      if (k == n - 1 && !boot) v_next = 0;
      x = static_cast<acc_t>(rewards[r_begin + k]) + gamma * v_next - v_k;
    }
    acc_t c_off = c;  // c^off
#pragma unroll
    for (int off = 1; off < kWarp; off <<= 1) {
      const acc_t y = __shfl_up_sync(0xffffffffu, x, off);
      if (lane >= off) x += c_off * y;
      c_off *= c_off;
    }
    x += c_lane * carry;
    carry = __shfl_sync(0xffffffffu, x, kWarp - 1);
    if (k >= 0) {
      adv[r_begin + k] = static_cast<scalar_t>(x);
      ret[r_begin + k] = static_cast<scalar_t>(x + v_k);
    }
  }
}

std::vector<torch::Tensor> gae_packed(torch::Tensor rewards, torch::Tensor values, torch::Tensor short_cu,
                                      torch::Tensor bootstrap, double gamma, double lam) {
  TORCH_CHECK(rewards.is_cuda() && values.is_cuda() && short_cu.is_cuda() && bootstrap.is_cuda(),
              "gae_packed: all tensors must be on CUDA");
  TORCH_CHECK(rewards.dim() == 1 && values.dim() == 1 && short_cu.dim() == 1 && bootstrap.dim() == 1,
              "gae_packed: 1-D tensors expected");
  TORCH_CHECK(rewards.is_contiguous() && values.is_contiguous() && short_cu.is_contiguous() &&
                  bootstrap.is_contiguous(),
              "gae_packed: contiguous tensors expected");
  TORCH_CHECK(short_cu.scalar_type() == torch::kInt32, "gae_packed: short_cu must be int32");
  TORCH_CHECK(bootstrap.scalar_type() == torch::kBool, "gae_packed: bootstrap must be bool");
  TORCH_CHECK(values.scalar_type() == rewards.scalar_type(), "gae_packed: rewards and values dtypes differ");
  const int64_t num_seqs = short_cu.numel() - 1;
  TORCH_CHECK(num_seqs >= 0 && bootstrap.numel() == num_seqs, "gae_packed: bootstrap must have one entry per sequence");
  TORCH_CHECK(values.numel() == rewards.numel() + num_seqs, "gae_packed: values must have N + B entries");
  TORCH_CHECK(values.numel() < (int64_t(1) << 31), "gae_packed: more than 2^31 entries");

  const c10::cuda::CUDAGuard guard(rewards.device());
  auto adv = torch::empty_like(rewards);
  auto ret = torch::empty_like(rewards);
  if (num_seqs == 0 || rewards.numel() == 0) return {adv, ret};

  const int threads = kWarp * kWarpsPerBlock;
  const int blocks = static_cast<int>((num_seqs + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "gae_packed", [&] {
    gae_packed_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        rewards.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), short_cu.data_ptr<int>(),
        bootstrap.data_ptr<bool>(), gamma, lam,
        static_cast<int>(num_seqs), adv.data_ptr<scalar_t>(), ret.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {adv, ret};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gae_packed", &gae_packed,
        "Packed GAE (rewards [N], values [N+B], short_cu int32 [B+1], bootstrap bool [B], gamma, lam) -> "
        "(advantages [N], returns [N])");
}
