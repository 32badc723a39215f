// A persistent kernel that runs the matrix products of a decode step as one stream of weight bytes.
//
// Why: at decode batch sizes (M = 64 rows) every product is bound by reading its weight matrix, and a
// library GEMM per product pays its own ramp-up and tail (the 89 products of the 1.1B model's step read
// 2.07 GB at 1.7-2.0 TB/s back to back with cuBLASLt, against 2.98 TB/s of copy bandwidth). Weights do not
// depend on activations, so nothing forces a pause between products: here one CTA per SM runs a static
// program of product *tasks*. In each CTA
//   - two groups of four consumer warps take alternate tasks: multiply (mma.sync, bf16 in, fp32
//     accumulate), release the slots, and write the task's output;
//   - per group, a weight warp streams the weight chunks of the group's tasks, in order, into a ring of
//     shared-memory slots (one 16 KB cp.async.bulk per slot, completion on mbarriers), never waiting for
//     activations, and an input warp copies each task's input chunks into a second ring once they are
//     written (readiness counters, below). One stream per ring keeps both groups' copies in flight and
//     each ring consumed in order (an mbarrier parity wait is only sound one phase ahead).
// While the consumers wait at a dependency the weight warp keeps filling the ring with later products'
// weights, so the memory system stays busy across product boundaries.
//
// Layouts (reallm/kernels/decode_stream.py builds them): a *chunk* is 64 rows x 128 bf16 columns (16 KB),
// row-major, the 16-byte units of row r permuted u -> u ^ (r % 8) so that ldmatrix reads 8 rows without
// bank conflicts. Weights [N, K] are packed as [N/64 tiles][K/128 chunks][chunk]; activations [64, C] as
// [C/128 chunks][chunk]. Every ring slot is then one contiguous copy.
//
// Program (int64 [P, 16] rows), per product p: y = x @ W^T over the tasks (tile, slice): tile j % tiles,
// slice j / tiles of task j (global index task0 + j; global task t runs on CTA t % gridDim.x, in
// increasing t); a slice covers K / split columns.
//   out 0: y[:, tile*64 ...] = the 64 outputs; out 1 (SwiGLU): the tile's W rows are 32 gate rows then
//   the 32 matching up rows and y[:, tile*32 ...] = silu(gate) * up.
//   y_layout 0: chunked activation (the next product's input); 1: row-major, y_stride apart.
//   split > 1: each slice writes its fp32 partial tile to `partial` [split, 64, N], takes a ticket on the
//   tile's counter (acq-rel); the last slice sums the partials, writes y, and resets the counter.
//   dep >= 0: x is product dep's chunked output, and each input chunk is copied only once its readiness
//   counter counts every tile writing into it (2 per chunk, 4 for SwiGLU outputs; a tile adds one after its
//   output is written and fenced): a product starts on the chunks that are ready while the previous one
//   finishes its other tiles. Outputs must not alias the inputs of products that may still run (distinct
//   buffers per product are the safe rule). Counters return to 0 at the end of the launch (the last CTA
//   out resets them), so the kernel replays from a CUDA graph.
// Progress: tasks depend only on earlier products and every CTA takes its tasks in increasing order, so
// the lowest unfinished product can always proceed; the grid must be co-resident (one CTA per SM, grid <=
// SM count, which `run` enforces).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kM = 64;                  // rows of a step (sequences); the caller pads to 64
constexpr int kBN = 64;                 // weight rows per task
constexpr int kBK = 128;                // columns per chunk
constexpr int kChunk = kM * kBK;        // elements per chunk (= kBN * kBK)
constexpr int kChunkBytes = kChunk * 2;
constexpr int kGroupThreads = 128;

// Program row fields.
enum : int { F_W, F_X, F_Y, F_PARTIAL, F_TICKETS, F_N, F_K, F_YSTRIDE, F_SPLIT, F_OUT, F_YLAYOUT, F_READY_IN,
             F_NEED, F_READY_OUT, F_TASK0, F_TILES, F_COUNT = 16 };

// Ring shape: kGroups consumer groups (4 warps each, alternate tasks), each with kWStages weight and kXStages
// input slots (a group's rings are consumed in order only); warps 4 kGroups + g and 5 kGroups + g are
// group g's weight and input streams.
template <int kGroups, int kWStages, int kXStages>
struct Config {
  static constexpr int kWeightWarp = kGroups * 4, kInputWarp = kWeightWarp + kGroups;
  static constexpr int kThreads = 32 * (kInputWarp + kGroups);
};

template <int kGroups, int kWStages, int kXStages>
struct Smem {
  __nv_bfloat16 w[kGroups][kWStages][kChunk];
  __nv_bfloat16 x[kGroups][kXStages][kChunk];
  uint64_t w_full[kGroups][kWStages], w_empty[kGroups][kWStages], x_full[kGroups][kXStages],
      x_empty[kGroups][kXStages];
  int flag[kGroups];
};

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

// One contiguous asynchronous copy global -> shared, completing on `bar`'s transaction count.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
      "%4;" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}

__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first)
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  else
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(policy));
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

__device__ __forceinline__ int64_t global_ns() {
  int64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Generic-proxy writes of activations are read by other SMs' bulk copies (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

__device__ __forceinline__ void group_sync(int group) {
  asm volatile("bar.sync %0, %1;" ::"r"(group + 1), "n"(kGroupThreads) : "memory");
}

// Offset of element (row, col) of a chunk (col < 128): 16-byte unit col/8 of row `row` is stored at unit
// (col/8) ^ (row % 8).
__device__ __forceinline__ int swz(int row, int col) {
  return row * kBK + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

struct Product {
  const __nv_bfloat16* w;
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  float* partial;
  int* tickets;
  const int* ready_in;  // the dep's output-chunk counters (null: input ready before the launch)
  int* ready_out;       // this product's output-chunk counters (null: nobody waits on the output)
  int N, K, y_stride, split, out, y_layout, need, task0, tiles;
};

__device__ __forceinline__ Product read_product(const int64_t* __restrict__ prog, int p) {
  const int64_t* r = prog + (size_t)p * F_COUNT;
  Product d;
  d.w = reinterpret_cast<const __nv_bfloat16*>(__ldg(r + F_W));
  d.x = reinterpret_cast<const __nv_bfloat16*>(__ldg(r + F_X));
  d.y = reinterpret_cast<__nv_bfloat16*>(__ldg(r + F_Y));
  d.partial = reinterpret_cast<float*>(__ldg(r + F_PARTIAL));
  d.tickets = reinterpret_cast<int*>(__ldg(r + F_TICKETS));
  d.N = (int)__ldg(r + F_N);
  d.K = (int)__ldg(r + F_K);
  d.y_stride = (int)__ldg(r + F_YSTRIDE);
  d.split = (int)__ldg(r + F_SPLIT);
  d.out = (int)__ldg(r + F_OUT);
  d.y_layout = (int)__ldg(r + F_YLAYOUT);
  d.ready_in = reinterpret_cast<const int*>(__ldg(r + F_READY_IN));
  d.ready_out = reinterpret_cast<int*>(__ldg(r + F_READY_OUT));
  d.need = (int)__ldg(r + F_NEED);
  d.task0 = (int)__ldg(r + F_TASK0);
  d.tiles = (int)__ldg(r + F_TILES);
  return d;
}

// Index of the product holding global task t, searching forward from p (tasks only increase).
__device__ __forceinline__ int advance_product(const int64_t* __restrict__ prog, int P, int p, int t) {
  while (p + 1 < P && t >= (int)__ldg(prog + (size_t)(p + 1) * F_COUNT + F_TASK0)) ++p;
  return p;
}

// Global task t of the program: its product (searched forward from `p`, which it updates: tasks only
// increase), weight tile, K slice and chunk count.
struct Task {
  Product d;
  int p, tile, slice, nc;
};

__device__ __forceinline__ Task task_at(const int64_t* __restrict__ prog, int P, int& p, int t) {
  p = advance_product(prog, P, p, t);
  Task k;
  k.d = read_product(prog, p);
  k.p = p;
  const int local = t - k.d.task0;
  k.tile = local % k.d.tiles;
  k.slice = local / k.d.tiles;
  k.nc = k.d.K / kBK / k.d.split;
  return k;
}

struct Ring {
  int slot = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void step(int stages) {
    if (++slot == stages) {
      slot = 0;
      phase ^= 1;
    }
  }
};

// Column (0..63) of a consumer thread's accumulator acc[mt][nt][e] within its task's tile: warp_n's n8 tiles
// are {2 warp_n, 2 warp_n + 1} and {4 + 2 warp_n, 5 + 2 warp_n}, so a SwiGLU tile's gate column j (j < 32)
// and its up column j + 32 sit in the same thread (acc[.][nt] and acc[.][nt + 2]).
__device__ __forceinline__ int acc_col(int warp_n, int nt, int lane) {
  return (nt >> 1) * 32 + warp_n * 16 + (nt & 1) * 8 + (lane & 3) * 2;
}

// f(mt, nt, h, row, col) for each pair acc[mt][nt][2h], acc[mt][nt][2h + 1] of a consumer thread: the pair's
// tile row and its first column (acc_col).
template <typename F>
__device__ __forceinline__ void for_each_pair(int warp_m, int warp_n, int lane, F&& f) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) f(mt, nt, h, warp_m * 32 + mt * 16 + (lane >> 2) + h * 8, acc_col(warp_n, nt, lane));
}

template <int kGroups, int kWStages, int kXStages>
__global__ void __launch_bounds__((Config<kGroups, kWStages, kXStages>::kThreads), 1)
    stream_kernel(const int64_t* __restrict__ prog, int P, int T, int* counters, int n_counters, int* exit_ticket,
                  int flags, int64_t* trace) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  using C = Config<kGroups, kWStages, kXStages>;
  constexpr int kWeightWarp = C::kWeightWarp, kInputWarp = C::kInputWarp, kThreads = C::kThreads;
  Smem<kGroups, kWStages, kXStages>& sm = *reinterpret_cast<Smem<kGroups, kWStages, kXStages>*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int g = 0; g < kGroups; ++g) {
      for (int s = 0; s < kWStages; ++s) {
        mbar_init(&sm.w_full[g][s], 1);
        mbar_init(&sm.w_empty[g][s], 4);
      }
      for (int s = 0; s < kXStages; ++s) {
        mbar_init(&sm.x_full[g][s], 1);
        mbar_init(&sm.x_empty[g][s], 4);
      }
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= kWeightWarp && warp < kInputWarp) {  // ------------------------------------- weight streams
    if (lane == 0) {
      const int g = warp - kWeightWarp;
      const uint64_t policy = l2_policy(true);  // read once per step
      Ring r;
      int p = 0, mine = 0;
      for (int t = blockIdx.x; t < T; t += gridDim.x, ++mine) {
        if (mine % kGroups != g) continue;
        const Task k = task_at(prog, P, p, t);
        const int nc = k.nc;
        const __nv_bfloat16* src = k.d.w + ((size_t)k.tile * (k.d.K / kBK) + (size_t)k.slice * nc) * kChunk;
        for (int c = 0; c < nc; ++c) {
          mbar_wait(&sm.w_empty[g][r.slot], r.phase ^ 1);
          mbar_expect_tx(&sm.w_full[g][r.slot], kChunkBytes);
          bulk_copy(sm.w[g][r.slot], src + (size_t)c * kChunk, kChunkBytes, &sm.w_full[g][r.slot], policy);
          r.step(kWStages);
        }
      }
    }
  } else if (warp >= kInputWarp) {  // ---------------------------------------------------- input streams
    // The whole warp polls up to 32 chunk counters at once; lane 0 copies the ready run of chunks.
    const int g = warp - kInputWarp;
    const uint64_t policy = l2_policy(false);  // activations are read by many SMs
    Ring r;
    int p = 0, mine = 0;
    for (int t = blockIdx.x; t < T; t += gridDim.x, ++mine) {
      if (mine % kGroups != g) continue;
      const Task k = task_at(prog, P, p, t);
      const Product& d = k.d;
      const int nc = k.nc, first = k.slice * nc;
      const bool wait = d.ready_in != nullptr && !(flags & 1);
      for (int c = 0; c < nc;) {
        const bool ok = !wait || c + lane >= nc || load_acquire(d.ready_in + first + c + lane) >= d.need;
        const unsigned not_ready = ~__ballot_sync(0xffffffffu, ok);
        __syncwarp();  // lane 0's copies are ordered after every lane's acquire
        const int run = not_ready ? __ffs(not_ready) - 1 : 32;
        if (run == 0) {
          __nanosleep(20);
          continue;
        }
        if (lane == 0) {
          if (wait) fence_proxy_async();
          for (int i = 0; i < run && c + i < nc; ++i) {
            mbar_wait(&sm.x_empty[g][r.slot], r.phase ^ 1);
            mbar_expect_tx(&sm.x_full[g][r.slot], kChunkBytes);
            bulk_copy(sm.x[g][r.slot], d.x + (size_t)(first + c + i) * kChunk, kChunkBytes, &sm.x_full[g][r.slot],
                      policy);
            r.step(kXStages);
          }
        }
        __syncwarp();
        c += run;
      }
    }
  } else {  // ------------------------------------------------------------------------------ consumers
    const int group = warp / 4, gw = warp % 4, tid = threadIdx.x % kGroupThreads;
    const int warp_m = gw & 1, warp_n = gw >> 1;
    Ring wr, xr;
    int p = 0, mine = 0;
    for (int t = blockIdx.x; t < T; t += gridDim.x, ++mine) {
      const Task k = task_at(prog, P, p, t);
      const Product& d = k.d;
      const int tile = k.tile, slice = k.slice, nc = k.nc;
      if (mine % kGroups != group) continue;  // the other group's task (and rings)
      int64_t* tr = trace != nullptr && tid == 0 ? trace + (size_t)t * 4 : nullptr;  // timing: [start, first
      if (tr) tr[0] = global_ns();                                                 // input, products, end]
      float acc[2][4][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
      for (int c = 0; c < nc; ++c) {
        mbar_wait(&sm.x_full[group][xr.slot], xr.phase);
        if (tr && c == 0) tr[1] = global_ns();
        mbar_wait(&sm.w_full[group][wr.slot], wr.phase);
        if (!(flags & 2)) {
          const __nv_bfloat16* xb = sm.x[group][xr.slot];
          const __nv_bfloat16* wb = sm.w[group][wr.slot];
#pragma unroll
          for (int kk = 0; kk < kBK / 16; ++kk) {
            uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              const int row = warp_m * 32 + mt * 16 + (lane & 15);
              ldmatrix_x4(a[mt], xb + swz(row, kk * 16 + (lane >> 4) * 8));
            }
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              uint32_t b[4];
              const int n = np * 32 + warp_n * 16 + (lane & 7) + ((lane >> 4) << 3);
              ldmatrix_x4(b, wb + swz(n, kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) {
                mma_bf16(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_bf16(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
              }
            }
          }
        }
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(&sm.x_empty[group][xr.slot]);
          mbar_arrive(&sm.w_empty[group][wr.slot]);
        }
        wr.step(kWStages);
        xr.step(kXStages);
      }

      if (tr) tr[2] = global_ns();
      // Epilogue, from registers: the output (split 1), or the partial tile, a ticket, and for the last
      // slice the sum of the partials (read past L1) and the output.
      bool last = true;
      if (d.split > 1) {
        float* part = d.partial + tile * kBN;  // + (slice * kM + row) * N + column
        for_each_pair(warp_m, warp_n, lane, [&](int mt, int nt, int h, int row, int col) {
          __stcg(reinterpret_cast<float2*>(part + ((size_t)slice * kM + row) * d.N + col),
                 make_float2(acc[mt][nt][2 * h], acc[mt][nt][2 * h + 1]));
        });
        group_sync(group);
        if (tid == 0) {
          __threadfence();
          sm.flag[group] = atomicAdd(d.tickets + tile, 1) == d.split - 1;
          __threadfence();
        }
        group_sync(group);
        last = sm.flag[group];
        if (last) {
          for (int sl = 0; sl < d.split; ++sl) {
            if (sl == slice) continue;
            for_each_pair(warp_m, warp_n, lane, [&](int mt, int nt, int h, int row, int col) {
              const float2 q = __ldcg(reinterpret_cast<const float2*>(part + ((size_t)sl * kM + row) * d.N + col));
              acc[mt][nt][2 * h] += q.x;
              acc[mt][nt][2 * h + 1] += q.y;
            });
          }
          if (tid == 0) d.tickets[tile] = 0;
        }
      }
      if (last) {
        const int width = d.out == 1 ? 32 : kBN;  // output columns of a tile
        for_each_pair(warp_m, warp_n, lane, [&](int mt, int nt, int h, int row, int tile_col) {
          if (d.out == 1 && nt >= 2) return;  // up columns: consumed with their gate columns
          float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
          if (d.out == 1) {
            v0 = silu(v0) * acc[mt][(nt + 2) & 3][2 * h];
            v1 = silu(v1) * acc[mt][(nt + 2) & 3][2 * h + 1];
          }
          const int col = tile * width + tile_col;
          __nv_bfloat16* dst = d.y_layout == 0 ? d.y + (size_t)(col / kBK) * kChunk + swz(row, col % kBK)
                                               : d.y + (size_t)row * d.y_stride + col;
          *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
        });
        fence_proxy_async();
      }
      group_sync(group);
      if (tid == 0 && last && d.ready_out != nullptr) {
        __threadfence();
        atomicAdd(d.ready_out + tile * (d.out == 1 ? 32 : kBN) / kBK, 1);
      }
      if (tr) tr[3] = global_ns();
    }
  }

  __syncthreads();  // the last CTA out resets the counters for the next launch
  if (threadIdx.x == 0) {
    __threadfence();
    sm.flag[0] = atomicAdd(exit_ticket, 1) == (int)gridDim.x - 1;
  }
  __syncthreads();
  if (sm.flag[0]) {
    for (int i = threadIdx.x; i < n_counters; i += kThreads) counters[i] = 0;
    if (threadIdx.x == 0) *exit_ticket = 0;
    __threadfence();
  }
}

}  // namespace

// Run a program (see the header): prog int64 [P, 16] on the device; counters int32 (every product's output
// chunk counters) and exit_ticket int32 [1] zeroed once at allocation (the kernel leaves them zeroed);
// grid <= SM count. flags (diagnostics, 0 in use): 1 inputs do not wait for their products, 2 no arithmetic.
// trace (optional, int64 [T, 4]): per task the global timer (ns) at its start, first input chunk, end of its
// products and end of its epilogue.
template <int G, int WS, int XS>
void launch(const torch::Tensor& prog, int64_t P, int64_t T, torch::Tensor& counters, torch::Tensor& exit_ticket,
            int64_t grid, int64_t flags, const c10::optional<torch::Tensor>& trace) {
  using S = Smem<G, WS, XS>;
  auto kernel = stream_kernel<G, WS, XS>;
  static bool configured = false;  // once per process, outside any graph capture that follows
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(S)));
    configured = true;
  }
  kernel<<<(unsigned)grid, Config<G, WS, XS>::kThreads, sizeof(S), at::cuda::getCurrentCUDAStream()>>>(
      prog.data_ptr<int64_t>(), (int)P, (int)T, counters.data_ptr<int>(), (int)counters.numel(),
      exit_ticket.data_ptr<int>(), (int)flags, trace ? trace->data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(torch::Tensor prog, int64_t P, int64_t T, torch::Tensor counters, torch::Tensor exit_ticket, int64_t grid,
         int64_t flags, c10::optional<torch::Tensor> trace) {
  TORCH_CHECK(!trace || (trace->scalar_type() == torch::kInt64 && trace->numel() >= 4 * T), "trace: int64 [T, 4]");
  TORCH_CHECK(prog.is_cuda() && prog.scalar_type() == torch::kInt64 && prog.is_contiguous(), "prog: int64 CUDA");
  TORCH_CHECK(counters.scalar_type() == torch::kInt32 && exit_ticket.scalar_type() == torch::kInt32, "int32 counters");
  const c10::cuda::CUDAGuard guard(prog.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, prog.device().index()));
  TORCH_CHECK(grid >= 1 && grid <= sms, "grid must be 1..", sms, " (co-resident CTAs), got ", grid);
  // two groups of 4 + 3 slots: measured against 5 + 2 and one group of 10 + 3 (BENCHMARKS.md, session 8)
  launch<2, 4, 3>(prog, P, T, counters, exit_ticket, grid, flags, trace);
}


PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "run a decode product program (persistent, weight-streaming)");
}
