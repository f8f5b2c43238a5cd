// What the BatchNorm + activation CUDA kernels share (bn_act_kernels.cu, bn_act_output_kernels.cu):
// storage / compute types, the layout of a dense (N, C, *) tensor, launch geometry, and the
// per-channel reduction. CUDA headers only.
//
// The reduction: each block covers a tile of channels and a share of the N*S rows; threads run
// along the contiguous dimension (rows for NCHW, channels for channels_last), accumulate in the
// compute type, reduce in shared memory and add the block's partial sums into a double
// workspace with atomicAdd (so the order of the adds, and the last bits, are not deterministic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "activations.h"
#include "cuda/bn_act_launch.h"

namespace mishkit::cuda::bn {

constexpr int kThreads = 256;
constexpr int kTileX = 32;  // reduction block: kTileX x kTileY threads
constexpr int kTileY = 8;

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <class T, class A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16(v);
}

struct Layout {
  int64_t c, s, rows, numel, stride_n, stride_c, stride_s;
};

inline Layout layout_of(const BnGeometry& g) {
  const int64_t cs = g.c * g.s;
  return g.channels_last ? Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, 1, g.c}
                         : Layout{g.c, g.s, g.n * g.s, g.n * cs, cs, g.s, 1};
}

inline int elementwise_blocks(int64_t numel) {
  return static_cast<int>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 8));
}

template <class A>
act::Params<A> params_of(const double* params) {
  return {static_cast<A>(params[0]), static_cast<A>(params[1])};
}

// Calls f(T{}) with the storage type of `dtype`.
template <class F>
void dispatch_dtype(BnDType dtype, F&& f) {
  switch (dtype) {
    case BnDType::kFloat: return f(float{});
    case BnDType::kDouble: return f(double{});
    case BnDType::kHalf: return f(__half{});
    case BnDType::kBFloat16: return f(__nv_bfloat16{});
  }
}

// A contribution to the two per-channel sums: `prepare()` once per thread (constants it may
// load), then `(state, i, c, a, b)` adds element i (of channel c) to a and b.
struct NoState {};

// blockIdx.y: channel tile; blockIdx.x: share of the rows. NCHW: threadIdx.x walks rows and each
// block row (threadIdx.y) is a channel; channels_last: threadIdx.x walks channels.
template <bool kChannelsLast, class A, class Contrib>
__global__ void reduce_kernel(Layout l, Contrib contrib, double* __restrict__ out_a,
                              double* __restrict__ out_b) {
  __shared__ A shared_a[kTileY][kTileX + 1];
  __shared__ A shared_b[kTileY][kTileX + 1];
  const int lane_c = kChannelsLast ? threadIdx.x : threadIdx.y;
  const int lane_r = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int row_lanes = kChannelsLast ? kTileY : kTileX;
  const int channel_tile = kChannelsLast ? kTileX : kTileY;
  const int64_t c = int64_t(blockIdx.y) * channel_tile + lane_c;
  const auto state = contrib.prepare();
  A a = 0, b = 0;
  if (c < l.c) {
    for (int64_t r = int64_t(blockIdx.x) * row_lanes + lane_r; r < l.rows;
         r += int64_t(gridDim.x) * row_lanes) {
      const int64_t i = (r / l.s) * l.stride_n + (r % l.s) * l.stride_s + c * l.stride_c;
      contrib(state, i, c, a, b);
    }
  }
  shared_a[threadIdx.y][threadIdx.x] = a;
  shared_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (lane_r != 0 || c >= l.c) return;
  A total_a = 0, total_b = 0;
  for (int k = 0; k < row_lanes; ++k) {
    total_a += kChannelsLast ? shared_a[k][threadIdx.x] : shared_a[threadIdx.y][k];
    total_b += kChannelsLast ? shared_b[k][threadIdx.x] : shared_b[threadIdx.y][k];
  }
  atomicAdd(out_a + c, static_cast<double>(total_a));
  if (out_b) atomicAdd(out_b + c, static_cast<double>(total_b));
}

template <class A, class Contrib>
void launch_reduce(const Layout& l, bool channels_last, Contrib contrib, double* out_a,
                   double* out_b, cudaStream_t stream) {
  const int channel_tile = channels_last ? kTileX : kTileY;
  const int row_lanes = channels_last ? kTileY : kTileX;
  const int64_t channel_tiles = (l.c + channel_tile - 1) / channel_tile;
  // enough row shares to fill the GPU (~4 waves of 132 SMs), none of them empty
  const int64_t wanted = std::max<int64_t>(1, 512 / std::max<int64_t>(channel_tiles, 1));
  const int64_t row_shares = std::min<int64_t>(wanted, (l.rows + row_lanes - 1) / row_lanes);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(row_shares, 1)),
                  static_cast<unsigned>(channel_tiles));
  const dim3 block(kTileX, kTileY);
  if (channels_last) {
    reduce_kernel<true, A><<<grid, block, 0, stream>>>(l, contrib, out_a, out_b);
  } else {
    reduce_kernel<false, A><<<grid, block, 0, stream>>>(l, contrib, out_a, out_b);
  }
}

template <class A>
__global__ void divide_kernel(const double* __restrict__ sums, int64_t c, double divisor,
                              A* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i < c) out[i] = static_cast<A>(sums[i] / divisor);  // 0 / 0 = nan for an empty batch
}

template <class A>
void launch_divide(const double* sums, int64_t c, double divisor, void* out, cudaStream_t stream) {
  divide_kernel<A><<<static_cast<unsigned>((c + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sums, c, divisor, static_cast<A*>(out));
}

}  // namespace mishkit::cuda::bn
