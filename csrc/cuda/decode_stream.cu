// A persistent kernel that runs a decode step (its matrix products, and with them the norms, rope, the
// cache append, attention and the residual adds) as one stream of weight bytes.
//
// Why: at decode batch sizes (M = 64 rows) every product is bound by reading its weight matrix, and a
// library GEMM per product pays its own ramp-up and tail (the 89 products of the 1.1B model's step read
// 2.07 GB at 1.7-2.0 TB/s back to back with cuBLASLt, against 2.98 TB/s of copy bandwidth). Weights do not
// depend on activations, so nothing forces a pause between products: one CTA per SM walks a static list
// of *segments* (product, 128-row weight tile, K-chunk range), in product order:
//   - a weight warp streams the list's weight chunks (32 KB, one cp.async.bulk each) into a ring of
//     shared-memory slots, never waiting for activations, so across a product boundary the ring fills
//     with the next products' weights while the activations are still being written. It keeps few
//     copies in flight (one by default): 132 SMs x one 32 KB copy already cover the memory latency, and
//     every further byte in flight only lengthens the queues to L2 that the small, latency-bound
//     messages of a product boundary (counters, partial sums, activations) wait in;
//   - an input warp copies each segment's input chunks (16 KB) into a second ring once readiness counters
//     say the tiles that write them are done;
//   - two consumer warpgroups multiply (wgmma m64n64k16 from shared memory, bf16 in, fp32 accumulate):
//     warps 0-3 the tile's first 64 rows, 4-7 its second, both against the same input chunk.
// Balance: the host cuts every product's (tile, chunk) units into contiguous ranges, one per CTA
// (stream-K), so that every SM's running total stays within one chunk of an equal share and the SMs reach
// each boundary together (whole tiles per SM left a third of the SMs idle at the end of the MLP product). A tile whose chunks
// are spread over several segments is summed in fp32 at L2: the other pieces add their partials into
// the tile's sums (red.add) and arrive on its counter; the piece from chunk 0 (the last its CTA runs in
// the product) adds those sums to its own and writes the output. An exchange warp per CTA does the
// waiting and publishing; a finalizer's consumers read the sums straight from L2 once told (one round
// trip, as a bulk copy would be, and the shared memory goes to the weight ring). (Sums of three or more
// pieces are added in arrival order: the last bit of an fp32 sum may differ between launches.)
//
// Layouts (reallm/kernels/decode_stream.py builds them): an input chunk is 64 rows x 128 bf16 columns
// (16 KB) stored as two 64-column blocks [2][64 rows][64], each row 128 bytes with its 16-byte units permuted
// u -> u ^ (r % 8) (wgmma's 128-byte swizzle, K-major); activations [64, C] are [C/128 chunks][chunk].
// Weights [N, K] are packed as [N/128 tiles][K/128 chunks][2 halves][2 blocks][64 rows][64] (each half laid
// out like an input chunk): a ring slot is one contiguous copy.
//
// Program: operations (int64 [P, 32] rows, F_*: products y = x @ W^T, or attention phases), and per CTA a
// segment list (int32 [S, L, 8]: p, tile, c0, c1, slot, slot0, nslots, -; `lens` [S] entries each).
//   out 0: y[:, tile*128 ...] = the tile's 128 outputs; out 1 (SwiGLU): each 64-row half of a tile holds 32
//   gate rows and then the 32 matching up rows, and y[:, half_tile*32 ...] = silu(gate) * up.
//   out 2 (residual): y = res + x W^T (chunked), and each row's sum of squares of y (as rounded) is added
//   to ss_out[row] (fp32 [64] in the zeroed scratch) for a later norm.
//   out 3 (qkv): W = [Wq; Wk; Wv], a half tile = one head of 64; rope (rotate-half pairs i, i + 32, angle
//   pos[row] * freq[i]) on q and k; q to rows y, k and v into the layer's caches [rows][kv heads][max_len][64]
//   at pos[row] (-1: a padding row, nothing written), in the stream layout (cache_col).
//   out 4 (attention): items (rows 2 p and 2 p + 1, kv group g) instead of tiles (tile = g * 32 + p, no weight
//   chunks): the cached keys and values stream through the weight ring, the query heads and new key/value
//   through the input ring (attend). Its output chunks need 32 arrivals (every pair's item).
//   ss_in (a norm): the finalizing epilogue scales row r by rsqrt(ss_in[r] / K + eps) (the norm's weight is
//   folded into W); under a norm the exchange warp first waits for every input chunk, so ss_in is complete.
//   A residual read needs no wait of its own: every input chunk a segment reads was written by a tile or
//   item that itself waited (through a norm) for the whole residual.
//   y_layout 0: chunked activation (the next product's input); 1: row-major, y_stride apart.
//   slot >= 0 (a piece of a tile spread over segments): the partial is added to sums tile `slot` of the
//   product (fp32, 32 KB each, thread-major so the adds coalesce; zero between launches); nslots > 0 (the
//   tile's finalizer): waits for nslots pieces, then reads sums tile slot0 and zeroes it.
//   ready_in: the dep's output-chunk counters; an input chunk is copied once its counter reaches `need`
//   (1 for a plain dep, 2 for SwiGLU: two tiles write each chunk). Outputs must not alias the inputs of
//   products that may still run (distinct buffers per product are the safe rule). Counters and tickets
//   return to 0 by the end of the launch (tickets by the tile's finalizer, counters by the last CTA out),
//   so the kernel replays from a CUDA graph.
// Progress: every list is in product order and a product waits only on earlier ones, so the lowest
// unfinished product can always proceed; the grid must be co-resident (grid <= SM count, one CTA per SM).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <cstdint>

namespace {

constexpr int kM = 64;                  // rows of a step (sequences); the caller pads to 64
constexpr int kHalf = 64;               // weight rows per consumer half
constexpr int kTile = 2 * kHalf;        // weight rows per tile
constexpr int kBK = 128;                // columns per chunk
constexpr int kXChunk = kM * kBK;       // elements of an input chunk
constexpr int kWChunk = kTile * kBK;    // elements of a weight chunk (two halves)
constexpr int kConsumerWarps = 8, kConsumerThreads = 32 * kConsumerWarps;
constexpr int kWeightWarp = kConsumerWarps, kInputWarp = kConsumerWarps + 1, kExchangeWarp = kConsumerWarps + 2;
constexpr int kThreads = 32 * (kConsumerWarps + 3);
constexpr int kSignalStages = 2;  // segments the consumers may finish ahead of the exchange warp's signals
constexpr int kPartialFloats = kTile * kM;  // one partial slot (32 KB)
constexpr int kTrace = 8;  // timers per segment (run's trace argument)

// Program row fields.
enum : int { F_W, F_X, F_Y, F_PARTIAL, F_TICKETS, F_N, F_K, F_YSTRIDE, F_OUT, F_YLAYOUT, F_READY_IN, F_NEED,
             F_READY_OUT, F_SS_IN, F_EPS, F_RES, F_SS_OUT, F_KCACHE, F_VCACHE, F_POS, F_FREQ, F_QCOLS, F_KVCOLS,
             F_MAXLEN, F_GROUP, F_XSTRIDE, F_SCALE, F_COUNT = 32 };
// Operation kinds (F_OUT).
enum : int { OUT_PLAIN, OUT_SWIGLU, OUT_RESIDUAL, OUT_QKV, OUT_ATTENTION };
constexpr int kHeadDim = 64;  // attention and rope: one head = one consumer half
// Segment fields.
enum : int { S_P, S_TILE, S_C0, S_C1, S_SLOT, S_SLOT0, S_NSLOTS, S_COUNT = 8 };

template <int kWStages, int kXStages>
struct Smem {
  static constexpr int kW = kWStages, kX = kXStages;
  __nv_bfloat16 w[kWStages][kWChunk];
  __nv_bfloat16 x[kXStages][kXChunk];
  uint64_t w_full[kWStages], w_empty[kWStages], x_full[kXStages], x_empty[kXStages];
  uint64_t sums_ready, done_full[kSignalStages], done_empty[kSignalStages];
  int flag;
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

// Shared-memory matrix descriptor of a K-major 64-column block stored in 128-byte rows with the 128-byte
// swizzle (8-row groups 1024 bytes apart; the block 1024-byte aligned).
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  return (uint64_t)((smem_u32(p) & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// d[64 x 64] += A[64 x 16] * B[64 x 16]^T, both K-major in shared memory (one warpgroup).
__device__ __forceinline__ void wgmma_64x64x16(float (&d)[32], uint64_t a, uint64_t b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, 1, 1, 1, 0, 0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b));
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

// Add to a counter after every write of this CTA ordered before it (a barrier, then one thread: release is
// cumulative), without waiting for the result.
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ void red_relaxed(int* p, int v) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void red_release(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// sums[0..3] += v, at L2, without waiting.
__device__ __forceinline__ void red_add4(float* sums, float4 v) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(sums), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}

// Generic-proxy writes of activations are read by other SMs' bulk copies (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.global;" ::: "memory"); }


// Offset of element (row, col) of a chunk (col < 128): columns 64 k .. 64 k + 63 form block k (64 rows of 128
// bytes), and 16-byte unit u of a row r is stored at unit u ^ (r % 8): the 128-byte swizzle of wgmma operands.
__device__ __forceinline__ int swz(int row, int col) {
  return (col >> 6) * (kM * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// Caches in the stream layout: position p's row of 64 values keeps its 16-byte units permuted, unit u at
// u ^ (p % 8) (the 128-byte swizzle: eight consecutive positions' same unit sit in eight bank groups).
__device__ __forceinline__ int cache_col(int pos, int c) { return ((((c >> 3) ^ pos) & 7) << 3) | (c & 7); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

struct Product {
  const __nv_bfloat16* w;
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  float* partial;
  int* tickets;
  const int* ready_in;  // the dep's output-chunk counters (null: input ready before the launch)
  int* ready_out;       // this product's output-chunk counters (null: nobody waits on the output)
  int N, K, y_stride, out, y_layout, need;
  const float* ss_in;        // RMSNorm of the input: its rows' sums of squares (null: no norm)
  float eps;
  const __nv_bfloat16* res;  // OUT_RESIDUAL: the chunked residual added to the product
  float* ss_out;             // OUT_RESIDUAL: the output rows' sums of squares are added here
  __nv_bfloat16 *kc, *vc;    // OUT_QKV, OUT_ATTENTION: this layer's caches [rows][kv heads][max_len][64]
  const int64_t* pos;        // OUT_QKV, OUT_ATTENTION: each row's position (-1: a padding row)
  const float* freq;         // OUT_QKV: rope's inverse frequencies [32]
  int q_cols, kv_cols, max_len, group, x_stride;
  float scale;               // OUT_ATTENTION: softmax scale times log2(e)
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
  d.out = (int)__ldg(r + F_OUT);
  d.y_layout = (int)__ldg(r + F_YLAYOUT);
  d.ready_in = reinterpret_cast<const int*>(__ldg(r + F_READY_IN));
  d.ready_out = reinterpret_cast<int*>(__ldg(r + F_READY_OUT));
  d.need = (int)__ldg(r + F_NEED);
  d.ss_in = reinterpret_cast<const float*>(__ldg(r + F_SS_IN));
  d.eps = __int_as_float((int)__ldg(r + F_EPS));
  d.res = reinterpret_cast<const __nv_bfloat16*>(__ldg(r + F_RES));
  d.ss_out = reinterpret_cast<float*>(__ldg(r + F_SS_OUT));
  d.kc = reinterpret_cast<__nv_bfloat16*>(__ldg(r + F_KCACHE));
  d.vc = reinterpret_cast<__nv_bfloat16*>(__ldg(r + F_VCACHE));
  d.pos = reinterpret_cast<const int64_t*>(__ldg(r + F_POS));
  d.freq = reinterpret_cast<const float*>(__ldg(r + F_FREQ));
  d.q_cols = (int)__ldg(r + F_QCOLS);
  d.kv_cols = (int)__ldg(r + F_KVCOLS);
  d.max_len = (int)__ldg(r + F_MAXLEN);
  d.group = (int)__ldg(r + F_GROUP);
  d.x_stride = (int)__ldg(r + F_XSTRIDE);
  d.scale = __int_as_float((int)__ldg(r + F_SCALE));
  return d;
}

// Segment i of this CTA's list, with its product.
struct Segment {
  Product d;
  int tile, c0, c1, slot, slot0, nslots;
};

__device__ __forceinline__ Segment segment_at(const int64_t* __restrict__ prog, const int* __restrict__ list, int i) {
  const int* e = list + (size_t)i * S_COUNT;
  Segment s;
  s.d = read_product(prog, __ldg(e + S_P));
  s.tile = __ldg(e + S_TILE);
  s.c0 = __ldg(e + S_C0);
  s.c1 = __ldg(e + S_C1);
  s.slot = __ldg(e + S_SLOT);
  s.slot0 = __ldg(e + S_SLOT0);
  s.nslots = __ldg(e + S_NSLOTS);
  return s;
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

// f(j, h, row, col) for each pair d[4 j + 2 h], d[4 j + 2 h + 1] of a consumer thread's wgmma accumulators
// (m64n64: warp w of the warpgroup holds rows 16 w ..): the pair's row (sequence) and its first column in the
// half. A SwiGLU half's gate column c (c < 32, j < 4) and its up column c + 32 (j + 4) sit in the same thread.
template <typename F>
__device__ __forceinline__ void for_each_pair(int wq, int lane, F&& f) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) f(j, h, wq * 16 + (lane >> 2) + h * 8, j * 8 + (lane & 3) * 2);
}

// The j-th four accumulators of a consumer thread as one float4.
__device__ __forceinline__ float4 acc4(const float (&acc)[32], int j) {
  return make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
}

__device__ __forceinline__ void red_add(float* p, float v) {
  asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(v) : "memory");
}

// A row's position (a padding row: -1).
__device__ __forceinline__ int row_pos(const Product& d, int row) { return (int)__ldg(d.pos + row); }

// Which chunks of its input an attention item (row b, kv group g) waits for: its query heads' columns and
// the group's key and value columns of the qkv product's output (chunks [lo, hi), then k, then v).
__device__ __forceinline__ int attention_input_chunk(const Product& d, int g, int lane) {
  const int lo = g * d.group * kHeadDim / kBK, hi = ((g + 1) * d.group * kHeadDim - 1) / kBK + 1;
  if (lo + lane < hi) return lo + lane;
  if (lane == hi - lo) return (d.q_cols + g * kHeadDim) / kBK;
  if (lane == hi - lo + 1) return (d.q_cols + d.kv_cols + g * kHeadDim) / kBK;
  return -1;
}

// What a finalizing epilogue reads that does not depend on the tile's sums, loaded (and rope's angles
// computed) while the exchange warp still waits for them: the residual's words, the rows' positions.
// Every load of an epilogue comes before its first store: the compiler cannot move a load past a store
// that may alias it, and a load between stores waits a whole round trip (sixteen of them in a row cost the
// residual epilogue ~10 µs).
// The rows' positions and rope's angles are the same for every qkv product that reads the same positions
// and frequencies (every layer of a step): computed at the first, kept in registers for the others.
struct Pre {
  unsigned int res[8][2];  // OUT_RESIDUAL: the residual's bf16 pairs, as for_each_pair visits them
  int pos[2];              // OUT_QKV: rows wq * 16 + lane / 4 (+ 8)
  float cs[2][4][2], sn[2][4][2];  // OUT_QKV (q and k heads): rope's cos and sin, [h][j][e]
  const int64_t* rope_pos = nullptr;  // what pos, cs and sn were computed from
  const float* rope_freq = nullptr;
};

__device__ __forceinline__ void prepare(const Product& d, int tile, int half, int wq, int lane, Pre& pre,
                                        bool fresh) {
  const int col0 = (2 * tile + half) * kHalf;
  if (d.out == OUT_QKV) {
    if (fresh || pre.rope_pos != d.pos || pre.rope_freq != d.freq) {
      pre.pos[0] = row_pos(d, wq * 16 + (lane >> 2));
      pre.pos[1] = row_pos(d, wq * 16 + (lane >> 2) + 8);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            sincosf((float)max(pre.pos[h], 0) * __ldg(d.freq + j * 8 + (lane & 3) * 2 + e), &pre.sn[h][j][e],
                    &pre.cs[h][j][e]);
      pre.rope_pos = d.pos;
      pre.rope_freq = d.freq;
    }
  } else if (d.out == OUT_RESIDUAL) {
    for_each_pair(wq, lane, [&](int j, int h, int row, int c) {
      const int col = col0 + c;
      pre.res[j][h] = __ldcg(reinterpret_cast<const unsigned int*>(d.res + (size_t)(col / kBK) * kXChunk + swz(row, col % kBK)));
    });
  }
}

// Writes a tile half's outputs (64 weight rows: 64 output columns, 32 for SwiGLU) from a consumer thread's
// accumulators, already summed over the tile's pieces and scaled by the input rows' norm.
__device__ __forceinline__ void epilogue(const Product& d, int tile, int half, int wq, int lane, float (&acc)[32],
                                         const Pre& pre) {
  const int col0 = (2 * tile + half) * kHalf;
  if (d.out == OUT_QKV) {  // the half is one head: q (to rows), k or v (to the caches at the rows' positions)
    const int kind = col0 < d.q_cols ? 0 : col0 < d.q_cols + d.kv_cols ? 1 : 2;
    if (kind < 2) {  // rope: column i < 32 pairs with i + 32, which the same thread holds (pair j and j + 4)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float sn = pre.sn[h][j][e], cs = pre.cs[h][j][e];
            const float x1 = acc[4 * j + 2 * h + e], x2 = acc[4 * (j + 4) + 2 * h + e];
            acc[4 * j + 2 * h + e] = x1 * cs - x2 * sn;
            acc[4 * (j + 4) + 2 * h + e] = x2 * cs + x1 * sn;
          }
    }
    const int g = (col0 - d.q_cols - (kind == 2 ? d.kv_cols : 0)) / kHeadDim;
    for_each_pair(wq, lane, [&](int j, int h, int row, int c) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
      if (kind == 0) {
        *reinterpret_cast<__nv_bfloat162*>(d.y + (size_t)row * d.y_stride + col0 + c) = v;
        return;
      }
      const int p = pre.pos[h];
      if (p < 0) return;
      __nv_bfloat16* cache = kind == 1 ? d.kc : d.vc;  // the stream layout (cache_col)
      *reinterpret_cast<__nv_bfloat162*>(
          cache + (((size_t)row * (d.kv_cols / kHeadDim) + g) * d.max_len + p) * kHeadDim + cache_col(p, c)) = v;
    });
    return;
  }
  if (d.out == OUT_RESIDUAL) {  // y = residual + product (chunked), and the rows' sums of squares of y
    float ss[2] = {0.f, 0.f};
    for_each_pair(wq, lane, [&](int j, int h, int row, int c) {
      const int col = col0 + c;
      const size_t off = (size_t)(col / kBK) * kXChunk + swz(row, col % kBK);
      const unsigned int r = pre.res[j][h];
      const __nv_bfloat162 v = __floats2bfloat162_rn(__uint_as_float(r << 16) + acc[4 * j + 2 * h],
                                                     __uint_as_float(r & 0xffff0000u) + acc[4 * j + 2 * h + 1]);
      *reinterpret_cast<__nv_bfloat162*>(d.y + off) = v;
      const float2 f = __bfloat1622float2(v);
      ss[h] += f.x * f.x + f.y * f.y;
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the four threads of a row
      ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 1);
      ss[h] += __shfl_xor_sync(0xffffffffu, ss[h], 2);
    }
    if (d.ss_out != nullptr && (lane & 3) == 0) {
      red_add(d.ss_out + wq * 16 + (lane >> 2), ss[0]);
      red_add(d.ss_out + wq * 16 + (lane >> 2) + 8, ss[1]);
    }
    return;
  }
  const int width = d.out == OUT_SWIGLU ? kHalf / 2 : kHalf;  // output columns of a half
  const int out0 = (2 * tile + half) * width;
  for_each_pair(wq, lane, [&](int j, int h, int row, int half_col) {
    if (d.out == OUT_SWIGLU && j >= 4) return;  // up columns: consumed with their gate columns
    float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
    if (d.out == OUT_SWIGLU) {
      v0 = silu(v0) * acc[4 * (j + 4) + 2 * h];
      v1 = silu(v1) * acc[4 * (j + 4) + 2 * h + 1];
    }
    const int col = out0 + half_col;
    __nv_bfloat16* dst = d.y_layout == 0 ? d.y + (size_t)(col / kBK) * kXChunk + swz(row, col % kBK)
                                         : d.y + (size_t)row * d.y_stride + col;
    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
  });
}


__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}

// d[16 x 8] += a[16 x 16] b[16 x 8] (bf16 in, fp32 accumulate; one warp)
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One attention item: rows b0 = 2 (item % 32) and b0 + 1 of kv group g = item / 32, with tensor cores; warps
// 0-3 take row b0, warps 4-7 row b0 + 1, side by side (an SM's items per layer run at once, not one after
// the other). A row's cached keys and values (positions 0 .. old - 1) arrive through the weight ring, 128
// positions a slot (keys, then values, both in the stream layout), the two rows' slots interleaved; its query heads and
// new key and value through the input ring (a slot per row, whose tail is the row's scratch). Warp w of a
// row's four takes keys 32 w .. 32 w + 31 of every slot: scores S = Q K^T (m16n8k16, the heads as rows,
// padded to 16), its own running max and sum per head (fp32, exp2 with the scale holding log2 e), then
// O += P V with P rounded to bf16; it only releases the other row's slots. At the end a row's four warps'
// states meet in its scratch (plain stores, one barrier of the four: shared-memory float atomics are
// compare-and-swap loops, and eight warps adding into one tile took 7.5 µs an item), and warp w rescales
// and adds them for heads w and w + 4, adds the new position and writes the head, rounded once to bf16,
// into the chunked attention output.
constexpr int kAttnWarps = 4, kMaxGroup = 8, kPairs = kM / 2;
constexpr int kAttnM = 2048, kAttnL = 2176, kAttnO = 4096;  // scratch offsets in the slot (bytes)

__device__ __forceinline__ void row_sync(int row) {  // the four warps of one row of an attention item
  asm volatile("bar.sync %0, %1;" ::"r"(2 + row), "n"(32 * kAttnWarps) : "memory");
}

// Cached key/value slots of a row with `old` cached positions.
__device__ __forceinline__ int kv_slots(int old) { return old > 0 ? (old + kBK - 1) / kBK : 0; }

template <typename S>
__device__ __forceinline__ void attend(S& sm, const Product& d, int item, Ring& wr, Ring& xr, Ring& done,
                                       int64_t* tr, bool skip) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment row (head) and column pair
  const int row = warp / kAttnWarps, wk = warp % kAttnWarps;  // this warp's row of the pair, its keys
  const int b0 = 2 * (item % kPairs), b = b0 + row, g = item / kPairs, group = d.group;
  const int old = row_pos(d, b);  // cached positions 0 .. old - 1; the new one is `old` (-1: a padding row)
  const int n0 = kv_slots(row_pos(d, b0)), n1 = kv_slots(row_pos(d, b0 + 1));
  Ring mine = xr;  // this row's input slot: the pair's first or second
  if (row == 1) mine.step(S::kX);
  mbar_wait(&sm.x_full[mine.slot], mine.phase);
  if (tr) tr[1] = global_ns();
  unsigned char* xs = reinterpret_cast<unsigned char*>(sm.x[mine.slot]);
  const __nv_bfloat16* q = reinterpret_cast<const __nv_bfloat16*>(xs);  // [group][64], new k, new v
  float* mbuf = reinterpret_cast<float*>(xs + kAttnM);  // [4 warps][8 heads]
  float* lbuf = reinterpret_cast<float*>(xs + kAttnL);  // [4 warps][8 heads]
  float* obuf = reinterpret_cast<float*>(xs + kAttnO);  // [4 warps][8 heads][64]
  const bool keys = !skip;
  uint32_t qa[4][2];  // the query heads as mma A fragments (rows 8-15 padding), one per 16 dimensions
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int hi = 0; hi < 2; ++hi)
      qa[ks][hi] = keys && gq < group
                       ? *reinterpret_cast<const uint32_t*>(q + gq * kHeadDim + 16 * ks + 8 * hi + 2 * tq) : 0u;
  float m = -INFINITY, l = 0.f;  // this lane's head gq: running max (uniform over its 4 lanes), partial sum
  float o[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  for (int k = 0; k < 2 * max(n0, n1); ++k) {  // the rows' slots interleaved: slot t of row b0, of row b0 + 1, ...
    const int r = k & 1, t = k >> 1;
    if (t >= (r == 0 ? n0 : n1)) continue;
    const int rows = min(kBK, old - t * kBK);
    mbar_wait(&sm.w_full[wr.slot], wr.phase);  // (the other row's slot: released once it is this use's)
    if (r == row && keys && 32 * wk < rows) {
      const __nv_bfloat16* kb = sm.w[wr.slot];
      const __nv_bfloat16* vb = sm.w[wr.slot] + kXChunk;
      const int key0 = 32 * wk;
      float s[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // keys key0 + 8 nt .., dimension units 4 c .. 4 c + 3
          const int key = key0 + 8 * nt + (lane & 7), unit = 4 * c + (lane >> 3);
          uint32_t r[4];
          ldmatrix_x4(r, kb + key * kHeadDim + ((unit ^ key) & 7) * 8);
          mma_16816(s[nt], qa[2 * c][0], 0u, qa[2 * c][1], 0u, r[0], r[1]);
          mma_16816(s[nt], qa[2 * c + 1][0], 0u, qa[2 * c + 1][1], 0u, r[2], r[3]);
        }
      }
      // scores of head gq for keys key0 + 8 nt + 2 tq + e (s[nt][e]; [2], [3] are padding rows)
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          s[nt][e] = key0 + 8 * nt + 2 * tq + e < rows && gq < group ? s[nt][e] * d.scale : -INFINITY;
          mx = fmaxf(mx, s[nt][e]);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m, mx);
      const bool none = m_new == -INFINITY;
      const float alpha = none ? 1.f : exp2f(m - m_new);
      float p[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) p[nt][e] = none ? 0.f : exp2f(s[nt][e] - m_new);
      l = l * alpha + ((p[0][0] + p[0][1]) + (p[1][0] + p[1][1])) + ((p[2][0] + p[2][1]) + (p[3][0] + p[3][1]));
      m = m_new;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[j][0] *= alpha;
        o[j][1] *= alpha;
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {  // P (16 keys = k) as the A fragment, V through transposed loads
        const uint32_t pa0 = pack_bf16(p[2 * ks][0], p[2 * ks][1]), pa2 = pack_bf16(p[2 * ks + 1][0], p[2 * ks + 1][1]);
#pragma unroll
        for (int u = 0; u < 8; u += 2) {  // dimension units u, u + 1
          const int key = key0 + 16 * ks + (lane & 7) + 8 * ((lane >> 3) & 1), unit = u + (lane >> 4);
          uint32_t r[4];
          ldmatrix_x4_trans(r, vb + key * kHeadDim + ((unit ^ key) & 7) * 8);
          mma_16816(o[u], pa0, 0u, pa2, 0u, r[0], r[1]);
          mma_16816(o[u + 1], pa0, 0u, pa2, 0u, r[2], r[3]);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&sm.w_empty[wr.slot]);
    wr.step(S::kW);
    if (tr && r == row && (t + 1) * kBK >= old) tr[5] = global_ns();  // the last slot of keys and values done
  }
  if (keys) {  // this warp's state, unscaled, to the row's scratch
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (tq == 0) {
      mbuf[wk * kMaxGroup + gq] = m;
      lbuf[wk * kMaxGroup + gq] = l;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
      *reinterpret_cast<float2*>(obuf + (wk * kMaxGroup + gq) * kHeadDim + 8 * j + 2 * tq) = make_float2(o[j][0], o[j][1]);
  }
  row_sync(row);
  if (tr) tr[2] = global_ns();
  mbar_wait(&sm.done_empty[done.slot], done.phase ^ 1);
  for (int h = wk; !skip && h < group; h += kAttnWarps) {  // head h: the warps' states, the new position, the output
    float mall = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) mall = fmaxf(mall, mbuf[w * kMaxGroup + h]);
    float l_h = 0.f, o0 = 0.f, o1 = 0.f;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) {
      const float mw = mbuf[w * kMaxGroup + h];
      const float sc = mw == -INFINITY ? 0.f : exp2f(mw - mall);
      const float2 ow = *reinterpret_cast<const float2*>(obuf + (w * kMaxGroup + h) * kHeadDim + 2 * lane);
      l_h += sc * lbuf[w * kMaxGroup + h];
      o0 += sc * ow.x;
      o1 += sc * ow.y;
    }
    if (old >= 0) {
      const int c = cache_col(old, 2 * lane);  // the new key and value rows are in the stream layout
      const float2 q2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(q + h * kHeadDim + 2 * lane));
      const float2 k2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(q + group * kHeadDim + c));
      const float2 v2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(q + (group + 1) * kHeadDim + c));
      float sc = q2.x * k2.x + q2.y * k2.y;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, off);
      sc *= d.scale;
      const float m_new = fmaxf(mall, sc);
      const float alpha = exp2f(mall - m_new), pn = exp2f(sc - m_new);  // mall = -inf: alpha 0
      o0 = o0 * alpha + pn * v2.x;
      o1 = o1 * alpha + pn * v2.y;
      l_h = l_h * alpha + pn;
    }
    const float inv = l_h > 0.f ? 1.f / l_h : 0.f;  // a padding row (no keys): zeros
    const int col = (g * group + h) * kHeadDim + 2 * lane;
    *reinterpret_cast<__nv_bfloat162*>(d.y + (size_t)(col / kBK) * kXChunk + swz(b, col % kBK)) =
        __floats2bfloat162_rn(o0 * inv, o1 * inv);
  }
  fence_proxy_async();
  // the slots' scratch was written by this proxy; the next bulk copies into them come from the async one
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncwarp();
  if (lane == 0) {  // both of the pair's input slots (in ring order), then the segment
    mbar_arrive(&sm.x_empty[xr.slot]);
    Ring second = xr;
    second.step(S::kX);
    mbar_arrive(&sm.x_empty[second.slot]);
    mbar_arrive(&sm.done_full[done.slot]);
  }
  xr.step(S::kX);
  xr.step(S::kX);
  done.step(kSignalStages);
  if (tr) tr[3] = global_ns();
}

template <int kWStages, int kXStages>
__global__ void __launch_bounds__(kThreads, 1)
    stream_kernel(const int64_t* __restrict__ prog, const int* __restrict__ segs, const int* __restrict__ lens, int L,
                  int* counters, int n_counters, float* scratch, int n_scratch, int* exit_ticket, int flags,
                  int64_t* trace, int max_inflight) {
  extern __shared__ __align__(128) unsigned char smem_raw[];  // wgmma's swizzle needs 1024-byte alignment
  Smem<kWStages, kXStages>& sm =
      *reinterpret_cast<Smem<kWStages, kXStages>*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cta = blockIdx.x;
  const int* list = segs + (size_t)cta * L * S_COUNT;
  const int n = lens[cta];
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWStages; ++s) {
      mbar_init(&sm.w_full[s], 1);
      mbar_init(&sm.w_empty[s], kConsumerWarps);
    }
    for (int s = 0; s < kXStages; ++s) {
      mbar_init(&sm.x_full[s], 1);
      mbar_init(&sm.x_empty[s], kConsumerWarps);
    }
    mbar_init(&sm.sums_ready, 1);
    for (int s = 0; s < kSignalStages; ++s) {
      mbar_init(&sm.done_full[s], kConsumerWarps);
      mbar_init(&sm.done_empty[s], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == kWeightWarp) {  // ------------------------------------------------------------ weight stream
    if (lane == 0) {
      const uint64_t policy = l2_policy(true);  // read once per step
      Ring r, landed;  // the next slot to fill; the oldest copy that may still be in flight
      int issued = 0;
      auto next_slot = [&]() {  // a free slot, with at most max_inflight copies in flight
        mbar_wait(&sm.w_empty[r.slot], r.phase ^ 1);
        // (a cap of the ring size or more is the ring's own, and waiting on a slot's barrier a whole ring
        // back would wait for a later phase)
        if (max_inflight > 0 && max_inflight < kWStages && issued >= max_inflight) {
          mbar_wait(&sm.w_full[landed.slot], landed.phase);
          landed.step(kWStages);
        }
        ++issued;
      };
      for (int i = 0; i < n; ++i) {
        const Segment s = segment_at(prog, list, i);
        int64_t* tr = trace != nullptr ? trace + ((size_t)cta * L + i) * kTrace : nullptr;
        if (s.d.out == OUT_ATTENTION) {
          // An attention item's cached keys and values (positions before the row's own: nothing in this
          // launch writes them) stream like weights, 128 positions a slot: keys in its first half, values
          // in its second. Whole slots (max_len is a multiple of 128): the positions past the row's are
          // masked, and must be finite values (a zeroed cache, or older entries), not stale shared memory.
          const Product& d = s.d;
          const int g = s.tile / kPairs, b0 = 2 * (s.tile % kPairs);
          const int n0 = kv_slots(row_pos(d, b0)), n1 = kv_slots(row_pos(d, b0 + 1));
          for (int k = 0; k < 2 * max(n0, n1); ++k) {  // the pair's rows' slots interleaved (both end together)
            const int b = b0 + (k & 1), t = k >> 1;
            if (t >= ((k & 1) == 0 ? n0 : n1)) continue;
            const size_t at = (((size_t)b * (d.kv_cols / kHeadDim) + g) * d.max_len + (size_t)t * kBK) * kHeadDim;
            const uint32_t bytes = kBK * kHeadDim * 2;
            next_slot();
            if (tr && k < 2) tr[4] = global_ns();
            mbar_expect_tx(&sm.w_full[r.slot], 2 * bytes);
            bulk_copy(sm.w[r.slot], d.kc + at, bytes, &sm.w_full[r.slot], policy);
            bulk_copy(sm.w[r.slot] + kXChunk, d.vc + at, bytes, &sm.w_full[r.slot], policy);
            r.step(kWStages);
          }
          continue;
        }
        const __nv_bfloat16* src = s.d.w + ((size_t)s.tile * (s.d.K / kBK) + s.c0) * kWChunk;
        for (int c = s.c0; c < s.c1; ++c, src += kWChunk) {
          next_slot();
          if (tr && c == s.c0) tr[4] = global_ns();
          mbar_expect_tx(&sm.w_full[r.slot], kWChunk * 2);
          bulk_copy(sm.w[r.slot], src, kWChunk * 2, &sm.w_full[r.slot], policy);
          r.step(kWStages);
        }
      }
    }
  } else if (warp == kInputWarp) {  // ------------------------------------------------------- input stream
    // The whole warp polls up to 32 chunk counters at once; lane 0 copies the ready run of chunks.
    const uint64_t policy = l2_policy(false);  // activations are read by many SMs
    Ring r;
    for (int i = 0; i < n; ++i) {
      const Segment s = segment_at(prog, list, i);
      const Product& d = s.d;
      const bool wait = d.ready_in != nullptr && !(flags & 1);
      if (d.out == OUT_ATTENTION) {  // item (rows b0, b0 + 1, kv group g): their query heads, new keys and values
        const int g = s.tile / kPairs;
        if (wait) {
          const int c = attention_input_chunk(d, g, lane);
          while (__any_sync(0xffffffffu, c >= 0 && load_acquire(d.ready_in + c) < d.need)) __nanosleep(20);
        }
        __syncwarp();
        if (lane == 0) {
          if (wait) fence_proxy_async();
          if (trace != nullptr) trace[((size_t)cta * L + i) * kTrace + 6] = global_ns();
          for (int b = 2 * (s.tile % kPairs); b < 2 * (s.tile % kPairs) + 2; ++b) {  // a slot per row
            mbar_wait(&sm.x_empty[r.slot], r.phase ^ 1);
            const int pos = row_pos(d, b);
            if (pos >= 0 && !(flags & 8)) {  // [query heads of the group][new key][new value]
              const uint32_t qbytes = d.group * kHeadDim * 2;
              const size_t at = (((size_t)b * (d.kv_cols / kHeadDim) + g) * d.max_len + pos) * kHeadDim;
              mbar_expect_tx(&sm.x_full[r.slot], qbytes + 4 * kHeadDim);
              bulk_copy(sm.x[r.slot], d.x + (size_t)b * d.x_stride + g * d.group * kHeadDim, qbytes,
                        &sm.x_full[r.slot], policy);
              bulk_copy(sm.x[r.slot] + d.group * kHeadDim, d.kc + at, 2 * kHeadDim, &sm.x_full[r.slot], policy);
              bulk_copy(sm.x[r.slot] + (d.group + 1) * kHeadDim, d.vc + at, 2 * kHeadDim, &sm.x_full[r.slot],
                        policy);
            } else {
              mbar_arrive(&sm.x_full[r.slot]);  // a padding row: nothing to copy
            }
            r.step(kXStages);
          }
        }
        __syncwarp();
        continue;
      }
      for (int c = s.c0; c < s.c1;) {
        const bool ok = !wait || c + lane >= s.c1 || load_acquire(d.ready_in + c + lane) >= d.need;
        const unsigned not_ready = ~__ballot_sync(0xffffffffu, ok);
        __syncwarp();  // lane 0's copies are ordered after every lane's acquire
        const int run = not_ready ? __ffs(not_ready) - 1 : 32;
        if (run == 0) {
          __nanosleep(20);
          continue;
        }
        if (lane == 0) {
          if (wait) fence_proxy_async();
          if (trace != nullptr && c == s.c0) trace[((size_t)cta * L + i) * kTrace + 6] = global_ns();
          for (int j = 0; j < run && c + j < s.c1; ++j) {
            mbar_wait(&sm.x_empty[r.slot], r.phase ^ 1);
            if (flags & 8) {
              mbar_arrive(&sm.x_full[r.slot]);
            } else {
              mbar_expect_tx(&sm.x_full[r.slot], kXChunk * 2);
              bulk_copy(sm.x[r.slot], d.x + (size_t)(c + j) * kXChunk, kXChunk * 2, &sm.x_full[r.slot], policy);
            }
            r.step(kXStages);
          }
        }
        __syncwarp();
        c += run;
      }
    }
  } else if (warp == kExchangeWarp) {  // --------------------------------------------------- exchange
    // Keeps global round trips off the consumers: per segment, for a tile this CTA finishes, waits for the
    // other pieces to have added theirs and tells the consumers (who read the sums from L2); then, once
    // the consumers have stored the segment's partial or output, publishes it (a release on the tile's
    // counter or the output chunk's readiness counter).
    Ring done;
    for (int i = 0; i < n; ++i) {
      const Segment s = segment_at(prog, list, i);
      const Product& d = s.d;
      float4* sums_tile = reinterpret_cast<float4*>(d.partial) + (size_t)s.slot0 * (kPartialFloats / 4);
      if (s.slot < 0 && (s.nslots > 0 || d.ss_in != nullptr)) {
        // Once the other pieces have added theirs (acquire) and, under a norm, every input chunk is written
        // (so are its rows' sums of squares), tell the consumers. At most one such signal is outstanding:
        // segment i's comes after every earlier segment is done.
        if (s.nslots > 0 && lane == 0 && !(flags & 64))
          while (load_acquire(d.tickets + s.tile) < s.nslots) __nanosleep(32);
        if (d.ss_in != nullptr && d.ready_in != nullptr && !(flags & 1))
          for (int c = lane; c < d.K / kBK; c += 32)
            while (load_acquire(d.ready_in + c) < d.need) __nanosleep(32);
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(&sm.sums_ready);
          if (trace != nullptr) trace[((size_t)cta * L + i) * kTrace + 5] = global_ns();
        }
      }
      mbar_wait(&sm.done_full[done.slot], done.phase);
      if (lane == 0) {
        if (s.slot >= 0) {
          red_release(d.tickets + s.tile, 1);
        } else if (d.out == OUT_ATTENTION) {  // the chunks of the item's query heads
          const int g = s.tile / kPairs;
          fence_acq_rel();  // one fence for the item's chunks (a release each waited for the one before)
          for (int c = g * d.group * kHeadDim / kBK; c * kBK < (g + 1) * d.group * kHeadDim; ++c)
            red_relaxed(d.ready_out + c, 1);
        } else if (d.ready_out != nullptr)
          red_release(d.ready_out + s.tile * (d.out == 1 ? kHalf : kTile) / kBK, 1);
        mbar_arrive(&sm.done_empty[done.slot]);
        if (trace != nullptr) trace[((size_t)cta * L + i) * kTrace + 7] = global_ns();
      }
      __syncwarp();
      if (s.nslots > 0) {  // after the publication, so that its release does not wait for these stores:
        // the sums tile and ticket back to zero for the next launch (nobody touches them again in this one)
        if (lane == 0) d.tickets[s.tile] = 0;
        // (plain stores: bulk stores from a zeroed shared-memory block, which a later release would not
        // wait for, measured 4-15 µs slower a step)
        for (int k = lane; k < kPartialFloats / 4; k += 32) __stcg(sums_tile + k, make_float4(0.f, 0.f, 0.f, 0.f));
      }
      done.step(kSignalStages);
    }
  } else {  // ------------------------------------------------------------------------------ consumers
    const int half = warp >> 2, wq = warp & 3, tid = threadIdx.x;  // warpgroup `half` multiplies tile rows 64 half ..
    Ring wr, xr, sums, done;
    Pre pre;
    for (int i = 0; i < n; ++i) {
      const Segment s = segment_at(prog, list, i);
      const Product& d = s.d;
      int64_t* tr = trace != nullptr && tid == 0 ? trace + ((size_t)cta * L + i) * kTrace : nullptr;
      if (tr) tr[0] = global_ns();  // timing: [start, first input, products, end]
      if (d.out == OUT_ATTENTION) {
        attend(sm, d, s.tile, wr, xr, done, tr, flags & 16);
        continue;
      }
      float acc[32];
#pragma unroll
      for (int e = 0; e < 32; ++e) acc[e] = 0.f;
      for (int c = s.c0; c < s.c1; ++c) {
        mbar_wait(&sm.x_full[xr.slot], xr.phase);
        if (tr && c == s.c0) tr[1] = global_ns();
        mbar_wait(&sm.w_full[wr.slot], wr.phase);
        if (!(flags & 2)) {
          const __nv_bfloat16* xb = sm.x[xr.slot];
          const __nv_bfloat16* wb = sm.w[wr.slot] + half * kHalf * kBK;
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < kBK / 16; ++kk) {  // 64-column blocks of 64 rows; 16 columns = 32 bytes a step
            const int off = (kk >> 2) * (64 * 64) + (kk & 3) * 16;
            wgmma_64x64x16(acc, smem_desc(xb + off), smem_desc(wb + off));
          }
          wgmma_commit();
          wgmma_wait_all();
        }
        __syncwarp();
        if (lane == 0) {
          mbar_arrive(&sm.x_empty[xr.slot]);
          mbar_arrive(&sm.w_empty[wr.slot]);
        }
        wr.step(kWStages);
        xr.step(kXStages);
      }

      if (tr) tr[2] = global_ns();
      // Epilogue, from registers: a piece of a spread tile stores its partial; a whole tile, or a spread
      // tile's finalizer after adding the other pieces' sums, writes the output. The exchange warp gathers
      // what the epilogue waits for and publishes what it writes (done ring): no consumer waits on a round trip.
      mbar_wait(&sm.done_empty[done.slot], done.phase ^ 1);
      if (s.slot >= 0) {
        float* sums_tile = d.partial + (size_t)s.slot * kPartialFloats;
        if (!(flags & 4))
#pragma unroll
          for (int j = 0; j < 8; ++j) red_add4(sums_tile + (j * kConsumerThreads + tid) * 4, acc4(acc, j));  // coalesced
      } else {
        const bool gated = s.nslots > 0 || d.ss_in != nullptr;
        prepare(d, s.tile, half, wq, lane, pre, flags & 128);
        if (gated) mbar_wait(&sm.sums_ready, sums.phase);
        float ss_in[2] = {0.f, 0.f};
        if (d.ss_in != nullptr)  // (loaded with the sums: one round trip)
#pragma unroll
          for (int h = 0; h < 2; ++h) ss_in[h] = __ldcg(d.ss_in + wq * 16 + (lane >> 2) + 8 * h);
        if (s.nslots > 0) {
          const float4* sums_tile = reinterpret_cast<const float4*>(d.partial) + (size_t)s.slot0 * (kPartialFloats / 4);
          float4 got[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) got[j] = __ldcg(sums_tile + j * kConsumerThreads + tid);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const float4 v = got[j];
            acc[4 * j] += v.x;
            acc[4 * j + 1] += v.y;
            acc[4 * j + 2] += v.z;
            acc[4 * j + 3] += v.w;
          }
        }
        if (gated) sums.step(1);
        if (d.ss_in != nullptr) {  // RMSNorm (its weight folded into W): scale row r by rsqrt(mean(x_r^2) + eps)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float rs = rsqrtf(ss_in[h] / (float)d.K + d.eps);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              acc[4 * j + 2 * h] *= rs;
              acc[4 * j + 2 * h + 1] *= rs;
            }
          }
        }
        if (!(flags & 32)) epilogue(d, s.tile, half, wq, lane, acc, pre);
        fence_proxy_async();
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&sm.done_full[done.slot]);
      done.step(kSignalStages);
      if (tr) tr[3] = global_ns();
    }
  }

  __syncthreads();  // the last CTA out resets the counters for the next launch
  if (threadIdx.x == 0) {
    __threadfence();
    sm.flag = atomicAdd(exit_ticket, 1) == (int)gridDim.x - 1;
    __threadfence();  // fence, ticket, fence: the last CTA's resets come after every CTA's adds
  }
  __syncthreads();
  if (sm.flag) {
    for (int i = threadIdx.x; i < n_counters; i += kThreads) counters[i] = 0;
    for (int i = threadIdx.x; i < n_scratch; i += kThreads) scratch[i] = 0.f;
    if (threadIdx.x == 0) *exit_ticket = 0;
    __threadfence();
  }
}

}  // namespace

// Run a program (see the header): prog int64 [P, 32] and segs int32 [grid, L, 8] (lens int32 [grid]) on the
// device; counters int32 (every product's output-chunk counters) and exit_ticket int32 [1] zeroed once at
// allocation (the kernel leaves them zeroed). flags (diagnostics, 0 in use): 1 inputs do not wait for their
// products, 2 no arithmetic, 4 no partial sums, 8 no input copies, 16 no attention arithmetic, 32 no
// epilogue stores, 64 finalizers do not wait for their pieces, 128 rope's angles computed for every qkv
// tile. trace (optional, int64 [grid, L, 8]): per segment the global
// timer (ns) at its start, first input chunk, end of its products, end of its epilogue (consumers), first
// weight copy issued (weight warp), the other pieces' sums landed (exchange warp; a finalizer's segment,
// else 0), first input copy issued (input warp) and its publication (exchange warp).
// variant: the ring shape (weight x input slots), 0: 6 x 2, 1: 5 x 3, 2: 5 x 2. max_inflight: weight
// copies (32 KB) in flight per SM (0: up to the free slots).
template <int WS, int XS>
void launch(const torch::Tensor& prog, const torch::Tensor& segs, const torch::Tensor& lens, torch::Tensor& counters,
            torch::Tensor& scratch, torch::Tensor& exit_ticket, int64_t grid, int64_t flags,
            const c10::optional<torch::Tensor>& trace, int64_t max_inflight) {
  using S = Smem<WS, XS>;
  static_assert(sizeof(S) + 1024 <= 227 * 1024, "the ring does not fit an SM's shared memory");
  auto kernel = stream_kernel<WS, XS>;
  static bool configured = false;  // once per process, outside any graph capture that follows
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sizeof(S) + 1024));
    configured = true;
  }
  kernel<<<(unsigned)grid, kThreads, sizeof(S) + 1024, at::cuda::getCurrentCUDAStream()>>>(
      prog.data_ptr<int64_t>(), segs.data_ptr<int>(), lens.data_ptr<int>(), (int)segs.size(1),
      counters.data_ptr<int>(), (int)counters.numel(), scratch.data_ptr<float>(), (int)scratch.numel(),
      exit_ticket.data_ptr<int>(), (int)flags,
      trace ? trace->data_ptr<int64_t>() : nullptr, (int)max_inflight);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void run(torch::Tensor prog, torch::Tensor segs, torch::Tensor lens, torch::Tensor counters, torch::Tensor scratch,
         torch::Tensor exit_ticket, int64_t flags, c10::optional<torch::Tensor> trace, int64_t variant,
         int64_t max_inflight) {
  TORCH_CHECK(prog.is_cuda() && prog.scalar_type() == torch::kInt64 && prog.is_contiguous(), "prog: int64 CUDA");
  TORCH_CHECK(segs.dim() == 3 && segs.size(2) == S_COUNT && segs.scalar_type() == torch::kInt32 && segs.is_contiguous(),
              "segs: int32 [grid, L, 8]");
  const int64_t grid = segs.size(0);
  TORCH_CHECK(lens.numel() == grid && lens.scalar_type() == torch::kInt32, "lens: int32 [grid]");
  TORCH_CHECK(!trace || (trace->scalar_type() == torch::kInt64 && trace->numel() >= grid * segs.size(1) * kTrace),
              "trace: int64 [grid, L, 8]");
  TORCH_CHECK(counters.scalar_type() == torch::kInt32 && exit_ticket.scalar_type() == torch::kInt32, "int32 counters");
  TORCH_CHECK(scratch.scalar_type() == torch::kFloat32 && scratch.is_cuda(), "scratch: float32 CUDA");
  const c10::cuda::CUDAGuard guard(prog.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, prog.device().index()));
  TORCH_CHECK(grid >= 1 && grid <= sms, "grid must be 1..", sms, " (co-resident CTAs), got ", grid);
  if (variant == 0)
    launch<6, 2>(prog, segs, lens, counters, scratch, exit_ticket, grid, flags, trace, max_inflight);
  else if (variant == 1)
    launch<5, 3>(prog, segs, lens, counters, scratch, exit_ticket, grid, flags, trace, max_inflight);
  else
    launch<5, 2>(prog, segs, lens, counters, scratch, exit_ticket, grid, flags, trace, max_inflight);
}

// A step's inputs in one launch (it was eight small torch kernels, ~20 us a step): block r < B gathers
// embedding row tokens[r] into the chunked layout of h0 (unit u of a row stored at u ^ (r % 8)), adds up
// the row's fp32 sum of squares for the first norm and copies its position; rows past B are zeros with
// position -1 (padding: the kernel writes no cache entry for them).
__global__ void __launch_bounds__(256) prepare_kernel(const int64_t* __restrict__ tokens,
                                                      const int64_t* __restrict__ positions,
                                                      const __nv_bfloat16* __restrict__ embed, int64_t vocab,
                                                      int hidden, int rows, __nv_bfloat16* __restrict__ h0,
                                                      float* __restrict__ ss0, int64_t* __restrict__ pos) {
  const int r = blockIdx.x;
  const bool live = r < rows;
  int64_t tok = live ? tokens[r] : 0;
  CUDA_KERNEL_ASSERT(tok >= 0 && tok < vocab);
  const uint4* src = reinterpret_cast<const uint4*>(embed + tok * (int64_t)hidden);
  float ss = 0.f;
  for (int u = threadIdx.x; u < hidden / 8; u += blockDim.x) {  // 16-byte units of 8 columns
    uint4 v = live ? __ldg(src + u) : make_uint4(0, 0, 0, 0);
    const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 f = __bfloat1622float2(h2[j]);
      ss += f.x * f.x + f.y * f.y;
    }
    const int c = u * 8, chunk = c >> 7, block = (c >> 6) & 1, unit = (c >> 3) & 7;
    const int64_t at = ((int64_t)(chunk * 2 + block) * kM + r) * 64 + ((unit ^ (r & 7)) << 3);
    *reinterpret_cast<uint4*>(h0 + at) = v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  __shared__ float warp_ss[8];
  if ((threadIdx.x & 31) == 0) warp_ss[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += warp_ss[w];
    ss0[r] = t;
    pos[r] = live ? positions[r] : -1;
  }
}

void prepare_inputs(torch::Tensor tokens, torch::Tensor positions, torch::Tensor embed, torch::Tensor h0, torch::Tensor ss0,
             torch::Tensor pos) {
  const int64_t rows = tokens.numel(), hidden = embed.size(1);
  TORCH_CHECK(tokens.is_cuda() && tokens.scalar_type() == torch::kInt64 && tokens.is_contiguous() &&
              positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.numel() == rows,
              "prepare: tokens and positions int64 [B] CUDA");
  TORCH_CHECK(rows <= kM, "prepare: at most ", kM, " rows, got ", rows);
  TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == torch::kBFloat16 && embed.is_contiguous() &&
              hidden % kBK == 0, "prepare: embed bf16 [V, hidden], hidden a multiple of ", kBK);
  TORCH_CHECK(h0.scalar_type() == torch::kBFloat16 && h0.numel() >= kM * hidden && ss0.scalar_type() == torch::kFloat32 &&
              ss0.numel() >= kM && pos.scalar_type() == torch::kInt64 && pos.numel() >= kM && h0.is_contiguous() &&
              ss0.is_contiguous() && pos.is_contiguous(),
              "prepare: h0 bf16 [64 * hidden], ss0 fp32 [64], pos int64 [64], contiguous");
  for (const torch::Tensor* t : {&positions, &embed, &h0, &ss0, &pos})
    TORCH_CHECK(t->device() == tokens.device(), "prepare: every tensor on ", tokens.device(), ", got one on ", t->device());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(embed.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(h0.data_ptr()) % 16 == 0,
              "prepare: embed and h0 must be 16-byte aligned (16-byte loads and stores)");
  const c10::cuda::CUDAGuard guard(tokens.device());
  prepare_kernel<<<kM, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      tokens.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
      reinterpret_cast<const __nv_bfloat16*>(embed.data_ptr<at::BFloat16>()), embed.size(0), (int)hidden, (int)rows,
      reinterpret_cast<__nv_bfloat16*>(h0.data_ptr<at::BFloat16>()), ss0.data_ptr<float>(), pos.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Packing a model's weights for the kernel in one launch (in torch it was ~12 ops a matrix: a generation's
// first step spent ~15 ms re-packing). Table row j (int64, P_*): the packed destination, N, K, glu, the
// norm weight gamma (bf16 [K], 0: none), the first packed unit of the row (a prefix over the table: rows
// share one grid-stride loop) and up to three row-major bf16 sources stacked along N ([Wq; Wk; Wv],
// [Wg; Wu]). A packed 16-byte unit q of a matrix is (tile, chunk, half, block, row, u) in pack_weight's
// order; it holds source unit u ^ (row % 8) of row tile*128 + half*64 + row (with glu: 32 gate rows then the
// 32 matching up rows per half), scaled column-wise by gamma in fp32 and rounded once, as the torch fold.
enum : int { P_DST, P_N, P_K, P_GLU, P_GAMMA, P_FIRST, P_NSRC /* informational */, P_SRC0, P_ROWS0, P_SRC1, P_ROWS1, P_SRC2, P_ROWS2,
             P_COUNT = 16 };

__global__ void __launch_bounds__(256) pack_kernel(const int64_t* __restrict__ table, int rows, int64_t units) {
  int j = 0;
  for (int64_t q0 = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; q0 < units;
       q0 += (int64_t)gridDim.x * blockDim.x) {
    while (j + 1 < rows && q0 >= table[(j + 1) * P_COUNT + P_FIRST]) ++j;  // the loop only moves forward
    const int64_t* t = table + j * P_COUNT;
    const int64_t q = q0 - t[P_FIRST], n = t[P_N], k = t[P_K], chunks = k / kBK;
    const int u = (int)(q & 7), row = (int)((q >> 3) & 63), block = (int)((q >> 9) & 1), half = (int)((q >> 10) & 1);
    const int64_t chunk = (q >> 11) % chunks, tile = (q >> 11) / chunks;
    int64_t r = tile * kTile + half * kHalf + row;
    if (t[P_GLU]) {
      const int64_t blk = r / kHalf, i = r % kHalf;
      r = i < kHalf / 2 ? blk * (kHalf / 2) + i : n / 2 + blk * (kHalf / 2) + (i - kHalf / 2);
    }
    const int64_t col = chunk * kBK + block * 64 + ((u ^ (row & 7)) << 3);
    int s = 0;
    while (s < 2 && r >= t[P_ROWS0 + 2 * s]) r -= t[P_ROWS0 + 2 * s], ++s;
    const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(t[P_SRC0 + 2 * s]);
    uint4 v = __ldg(reinterpret_cast<const uint4*>(src + r * k + col));
    if (t[P_GAMMA]) {
      const uint4 g = __ldg(reinterpret_cast<const uint4*>(reinterpret_cast<const __nv_bfloat16*>(t[P_GAMMA]) + col));
      __nv_bfloat162* v2 = reinterpret_cast<__nv_bfloat162*>(&v);
      const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 a = __bfloat1622float2(v2[e]), b = __bfloat1622float2(g2[e]);
        v2[e] = __floats2bfloat162_rn(a.x * b.x, a.y * b.y);
      }
    }
    reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(t[P_DST]))[q] = v;
  }
}

// Blocks of 256 threads for a grid-stride loop over `work` items on `device`: enough to fill it (8 a SM).
int64_t grid_stride_blocks(const torch::Device& device, int64_t work) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return std::min<int64_t>((work + 255) / 256, (int64_t)sms * 8);
}

void pack_weights(torch::Tensor table, int64_t units) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == torch::kInt64 && table.dim() == 2 && table.size(1) == P_COUNT &&
              table.is_contiguous(), "pack: table int64 [P, ", P_COUNT, "] CUDA");
  if (units == 0) return;
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t blocks = grid_stride_blocks(table.device(), units);
  pack_kernel<<<(unsigned)blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(table.data_ptr<int64_t>(),
                                                                              (int)table.size(0), units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Plain <-> stream cache layout in place (an involution, stream_cache): in every 128-byte position row of
// the listed caches ([rows, heads, max_len, 64] bf16; table int64 [T]: their addresses, all of `positions`
// rows of max_len), unit u goes to u ^ (p % 8), p the row's position.
__global__ void __launch_bounds__(256) permute_kernel(const int64_t* __restrict__ table, int64_t per_cache,
                                                      int max_len, int64_t total) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i / per_cache, prow = i % per_cache;
    const int p = (int)(prow % max_len) & 7;
    if (p == 0) continue;
    uint4* row = reinterpret_cast<uint4*>(reinterpret_cast<__nv_bfloat16*>(table[c])) + prow * 8;
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = row[u];
#pragma unroll
    for (int u = 0; u < 8; ++u) row[u ^ p] = v[u];
  }
}

void permute_caches(torch::Tensor table, int64_t position_rows, int64_t max_len) {
  TORCH_CHECK(table.is_cuda() && table.scalar_type() == torch::kInt64 && table.dim() == 1, "permute: table int64 [T]");
  const int64_t total = table.numel() * position_rows;
  if (total == 0) return;
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t blocks = grid_stride_blocks(table.device(), total);
  permute_kernel<<<(unsigned)blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(table.data_ptr<int64_t>(),
                                                                                 position_rows, (int)max_len, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack_weights, "pack weight matrices (stacked sources, folded norm weights) for the kernel");
  m.def("permute_caches", &permute_caches, "plain <-> stream layout of KV caches, in place");
  m.def("run", &run, "run a decode product program (persistent, weight-streaming)");
  m.def("prepare", &prepare_inputs, "a decode step's input rows from token ids (embedding gather, chunked layout, norms)");
}
