// A persistent kernel that runs the matrix products of a decode step as one stream of weight bytes.
//
// Why: at decode batch sizes (M = 64 rows) every product is bound by reading its weight matrix, and a
// library GEMM per product pays its own ramp-up and tail (the 89 products of the 1.1B model's step read
// 2.07 GB at 1.97 TB/s back to back with cuBLASLt, against 2.98 TB/s of copy bandwidth). Weights do not
// depend on activations, so nothing forces a pause between products: here one CTA per SM runs a static
// program of product *tasks*, and in each CTA a producer warp streams the weight tiles of all its tasks, in
// order, into a ring of shared-memory slots (cp.async.bulk, completion on mbarriers) without waiting for
// any activation. Consumer warps wait for a task's input (a per-product counter of finished tasks), stage
// the input rows in shared memory, multiply with mma.sync (bf16 in, fp32 accumulate) and release the
// slots. While consumers wait at a dependency the producer keeps filling the ring with later products'
// weights, so the memory system stays busy across product boundaries.
//
// Program (int64 [P, 16] rows, built by reallm/kernels/decode_stream.py), per product p:
//   y[M, N] = f(x) @ W^T, W [N, K] row-major bf16; f: mode 0 x[:, :K] (x_stride apart),
//                                                     mode 1 silu(x[:, :K]) * x[:, K:2K] (SwiGLU)
//   tasks: N / BN tiles of BN rows of W times `split` slices of K; task j of p has global index task0 + j,
//   tile j % tiles, slice j / tiles. Global task t runs on CTA t % gridDim.x, in increasing t.
//   split > 1: each slice writes its fp32 partial tile to `partial` [split, M, N], takes a ticket on the
//   tile's counter (acq-rel); the last slice sums the partials, writes bf16 y, and resets the counter.
//   dep >= 0: a task waits until done[dep] counts all of product dep's tasks (each task adds one after its
//   output, or its partial and ticket, is written and fenced). Counters go back to 0 at the end of the
//   launch (the last CTA to leave resets them), so the kernel replays from a CUDA graph.
// Progress: tasks depend only on earlier products and every CTA takes its tasks in increasing order, so
// the lowest unfinished product can always proceed; the grid must be co-resident (one CTA per SM, grid <=
// SM count).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kM = 64;                  // rows of a step (sequences); the caller pads to 64
constexpr int kConsumers = 4;           // consumer warps (2 x 2 over the M x BN tile)
constexpr int kThreads = 32 * (kConsumers + 1);
constexpr int kChunkBytes = 16384;      // weight bytes per ring slot (BN rows x BK columns)
constexpr int kStages = 8;              // ring slots

// Program row fields.
enum : int { F_W, F_X, F_Y, F_PARTIAL, F_TICKETS, F_N, F_K, F_XSTRIDE, F_YSTRIDE, F_SPLIT, F_MODE, F_DEP,
             F_TASKS, F_TASK0, F_TILES, F_COUNT = 16 };

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// Asynchronous copy of `bytes` (multiple of 16, 16-byte aligned ends) from global to shared memory,
// completing on `bar`'s transaction count; the weights are read once per step: evict them from L2 first.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
      "%4;" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(32 * kConsumers) : "memory");
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

__device__ __forceinline__ uint4 swiglu8(uint4 g, uint4 u) {
  const __nv_bfloat162* gv = reinterpret_cast<const __nv_bfloat162*>(&g);
  const __nv_bfloat162* uv = reinterpret_cast<const __nv_bfloat162*>(&u);
  uint4 out;
  __nv_bfloat162* ov = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 gf = __bfloat1622float2(gv[i]);
    float2 uf = __bfloat1622float2(uv[i]);
    ov[i] = __floats2bfloat162_rn(silu(gf.x) * uf.x, silu(gf.y) * uf.y);
  }
  return out;
}

struct Product {
  const __nv_bfloat16* w;
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  float* partial;
  int* tickets;
  int N, K, x_stride, y_stride, split, mode, dep, tasks, task0, tiles;
};

__device__ __forceinline__ Product read_product(const long long* __restrict__ prog, int p) {
  const long long* r = prog + (size_t)p * F_COUNT;
  Product d;
  d.w = reinterpret_cast<const __nv_bfloat16*>(__ldg(r + F_W));
  d.x = reinterpret_cast<const __nv_bfloat16*>(__ldg(r + F_X));
  d.y = reinterpret_cast<__nv_bfloat16*>(__ldg(r + F_Y));
  d.partial = reinterpret_cast<float*>(__ldg(r + F_PARTIAL));
  d.tickets = reinterpret_cast<int*>(__ldg(r + F_TICKETS));
  d.N = (int)__ldg(r + F_N);
  d.K = (int)__ldg(r + F_K);
  d.x_stride = (int)__ldg(r + F_XSTRIDE);
  d.y_stride = (int)__ldg(r + F_YSTRIDE);
  d.split = (int)__ldg(r + F_SPLIT);
  d.mode = (int)__ldg(r + F_MODE);
  d.dep = (int)__ldg(r + F_DEP);
  d.tasks = (int)__ldg(r + F_TASKS);
  d.task0 = (int)__ldg(r + F_TASK0);
  d.tiles = (int)__ldg(r + F_TILES);
  return d;
}

// Index of the product holding global task t, searching forward from p (tasks only increase).
__device__ __forceinline__ int advance_product(const long long* __restrict__ prog, int P, int p, int t) {
  while (p + 1 < P && t >= (int)__ldg(prog + (size_t)(p + 1) * F_COUNT + F_TASK0)) ++p;
  return p;
}

template <int BN>
struct Shape {
  static constexpr int BK = kChunkBytes / 2 / BN;   // weight columns per slot
  static constexpr int ROW = BK + 8;                 // padded shared-memory row: ldmatrix without conflicts
  static constexpr int SLOT = BN * ROW;              // elements per ring slot
  static constexpr int XBUF = kM * ROW;              // elements per staged input chunk
  static constexpr int NT = BN / 16;                 // n8 tiles per consumer warp (2 warps across BN)
  static constexpr int XV = kM * BK / 8 / (32 * kConsumers);  // 16-byte input vectors per consumer thread
  static constexpr size_t SMEM = (size_t)(kStages * SLOT + 2 * XBUF) * 2 + 2 * kStages * sizeof(uint64_t) + 16;
};

template <int BN>
__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const long long* __restrict__ prog, int P, int T, int* done, int* exit_ticket) {
  using S = Shape<BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  __nv_bfloat16* ring = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* xs = ring + kStages * S::SLOT;
  uint64_t* full = reinterpret_cast<uint64_t*>(xs + 2 * S::XBUF);
  uint64_t* empty = full + kStages;
  int* flag = reinterpret_cast<int*>(empty + kStages);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kConsumers) {  // ---------------------------------------------------------------- producer
    const uint64_t policy = evict_first_policy();
    int slot = 0, p = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < T; t += gridDim.x) {
      p = advance_product(prog, P, p, t);
      const Product d = read_product(prog, p);
      const int local = t - d.task0, tile = local % d.tiles, slice = local / d.tiles;
      const int ks = d.K / d.split;
      const __nv_bfloat16* wt = d.w + (size_t)tile * BN * d.K + (size_t)slice * ks;
      for (int c = 0; c < ks / S::BK; ++c) {
        mbar_wait(&empty[slot], phase ^ 1);
        if (lane == 0) mbar_expect_tx(&full[slot], BN * S::BK * 2);
        __syncwarp();
        __nv_bfloat16* dst = ring + slot * S::SLOT;
        for (int r = lane; r < BN; r += 32)
          bulk_copy(dst + r * S::ROW, wt + (size_t)r * d.K + c * S::BK, S::BK * 2, &full[slot], policy);
        if (++slot == kStages) {
          slot = 0;
          phase ^= 1;
        }
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------------- consumers
  const int tid = threadIdx.x;  // 0 .. 32 * kConsumers - 1
  const int warp_m = warp & 1, warp_n = warp >> 1;
  int slot = 0, p = 0;
  uint32_t phase = 0;
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    p = advance_product(prog, P, p, t);
    const Product d = read_product(prog, p);
    const int local = t - d.task0, tile = local % d.tiles, slice = local / d.tiles;
    const int ks = d.K / d.split, k0 = slice * ks, nc = ks / S::BK;

    if (d.dep >= 0 && tid == 0) {
      const int target = (int)__ldg(prog + (size_t)d.dep * F_COUNT + F_TASKS);
      while (load_acquire(done + d.dep) < target) __nanosleep(32);
      __threadfence();
    }
    consumer_sync();

    float acc[2][S::NT][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < S::NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    // Input rows of chunk c into registers (L2 only: other SMs wrote them), SwiGLU applied at staging.
    uint4 xg[S::XV], xu[S::XV];
    auto load_x = [&](int c) {
#pragma unroll
      for (int v = 0; v < S::XV; ++v) {
        const int i = tid + v * 32 * kConsumers;
        const int row = i / (S::BK / 8), col = k0 + c * S::BK + (i % (S::BK / 8)) * 8;
        const __nv_bfloat16* src = d.x + (size_t)row * d.x_stride + col;
        xg[v] = __ldcg(reinterpret_cast<const uint4*>(src));
        if (d.mode == 1) xu[v] = __ldcg(reinterpret_cast<const uint4*>(src + d.K));
      }
    };
    load_x(0);
    for (int c = 0; c < nc; ++c) {
      __nv_bfloat16* xb = xs + (c & 1) * S::XBUF;
#pragma unroll
      for (int v = 0; v < S::XV; ++v) {
        const int i = tid + v * 32 * kConsumers;
        const int row = i / (S::BK / 8), col = (i % (S::BK / 8)) * 8;
        *reinterpret_cast<uint4*>(xb + row * S::ROW + col) = d.mode == 1 ? swiglu8(xg[v], xu[v]) : xg[v];
      }
      consumer_sync();
      if (c + 1 < nc) load_x(c + 1);
      mbar_wait(&full[slot], phase);
      const __nv_bfloat16* wb = ring + slot * S::SLOT;
#pragma unroll
      for (int kk = 0; kk < S::BK / 16; ++kk) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(a[mt], xb + (warp_m * 32 + mt * 16 + (lane & 15)) * S::ROW + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < S::NT / 2; ++np) {
          uint32_t b[4];
          const int n = warp_n * (BN / 2) + np * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldmatrix_x4(b, wb + n * S::ROW + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_bf16(acc[mt][2 * np], a[mt], b[0], b[1]);
            mma_bf16(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
          }
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[slot]);
      if (++slot == kStages) {
        slot = 0;
        phase ^= 1;
      }
    }

    // Epilogue: the tile's output (split 1) or its partial, the ticket, and the last slice's sum.
    const int n_base = tile * BN + warp_n * (BN / 2) + (lane & 3) * 2;
    if (d.split == 1) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_m * 32 + mt * 16 + (lane >> 2) + h * 8;
#pragma unroll
          for (int nt = 0; nt < S::NT; ++nt)
            *reinterpret_cast<__nv_bfloat162*>(d.y + (size_t)row * d.y_stride + n_base + nt * 8) =
                __floats2bfloat162_rn(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]);
        }
    } else {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_m * 32 + mt * 16 + (lane >> 2) + h * 8;
#pragma unroll
          for (int nt = 0; nt < S::NT; ++nt)
            __stcg(reinterpret_cast<float2*>(d.partial + ((size_t)slice * kM + row) * d.N + n_base + nt * 8),
                   make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]));
        }
      __threadfence();
      consumer_sync();
      if (tid == 0) *flag = atomicAdd(d.tickets + tile, 1) == d.split - 1;
      consumer_sync();
      if (*flag) {
        __threadfence();
        for (int e = tid; e < kM * BN / 4; e += 32 * kConsumers) {
          const int row = e / (BN / 4), col = tile * BN + (e % (BN / 4)) * 4;
          float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int sl = 0; sl < d.split; ++sl) {
            const float4 q = __ldcg(reinterpret_cast<const float4*>(d.partial + ((size_t)sl * kM + row) * d.N + col));
            s.x += q.x;
            s.y += q.y;
            s.z += q.z;
            s.w += q.w;
          }
          __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(d.y + (size_t)row * d.y_stride + col);
          out[0] = __floats2bfloat162_rn(s.x, s.y);
          out[1] = __floats2bfloat162_rn(s.z, s.w);
        }
        if (tid == 0) d.tickets[tile] = 0;
      }
    }
    __threadfence();
    consumer_sync();
    if (tid == 0) atomicAdd(done + p, 1);
  }

  if (tid == 0) {  // the last CTA out resets the counters for the next launch
    __threadfence();
    if (atomicAdd(exit_ticket, 1) == (int)gridDim.x - 1) {
      for (int i = 0; i < P; ++i) done[i] = 0;
      *exit_ticket = 0;
      __threadfence();
    }
  }
}

template <int BN>
void launch(const torch::Tensor& prog, int64_t P, int64_t T, torch::Tensor& done, torch::Tensor& exit_ticket,
            int64_t grid) {
  const size_t smem = Shape<BN>::SMEM;
  auto kernel = stream_kernel<BN>;
  static bool configured = false;  // once per process, outside any graph capture that follows
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    configured = true;
  }
  kernel<<<(unsigned)grid, kThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      prog.data_ptr<int64_t>(), (int)P, (int)T, done.data_ptr<int>(), exit_ticket.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Run a program (see the header): prog int64 [P, 16] on the device, done int32 [P] and exit_ticket int32
// [1] zeroed once at allocation (the kernel leaves them zeroed), bn in {64, 128}, grid <= SM count.
void run(torch::Tensor prog, int64_t P, int64_t T, torch::Tensor done, torch::Tensor exit_ticket, int64_t bn,
         int64_t grid) {
  TORCH_CHECK(prog.is_cuda() && prog.scalar_type() == torch::kInt64 && prog.is_contiguous(), "prog: int64 CUDA");
  TORCH_CHECK(done.scalar_type() == torch::kInt32 && exit_ticket.scalar_type() == torch::kInt32, "int32 counters");
  const c10::cuda::CUDAGuard guard(prog.device());
  if (bn == 64)
    launch<64>(prog, P, T, done, exit_ticket, grid);
  else if (bn == 128)
    launch<128>(prog, P, T, done, exit_ticket, grid);
  else
    TORCH_CHECK(false, "bn must be 64 or 128, got ", bn);
}

int64_t rows() { return kM; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "run a decode product program (persistent, weight-streaming)");
  m.def("rows", &rows, "rows of a step the kernel computes");
}
