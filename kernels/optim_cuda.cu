// Fused optimizer kernels for CuPy (hpcdl.kernels.optim_gpu loads this file as a RawModule).
//
// Same structure as the Numba kernels in optim_cpu.py, after apex's
// multi-tensor kernels (NVIDIA/apex csrc/multi_tensor_lamb.cu,
// multi_tensor_l2norm_kernel.cu): one thread block per chunk of the flat
// arena, a chunk -> segment table, per-chunk float64 partial sums of squares
// written without atomics (so the result is deterministic), elementwise
// arithmetic in T (float or double). Launch with gridDim.x = number of
// chunks and blockDim.x a multiple of 32, at most 1024.
//
// Chunk table: start[c], stop[c] element range, segment[c] owning segment.
// Per-segment scalars (seg_*) are T arrays indexed by segment.

typedef long long i64;

// Sum of `value` over the block; the result is valid in thread 0.
__device__ double block_sum(double value) {
    __shared__ double warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_down_sync(0xffffffffu, value, offset);
    __syncthreads();  // a previous call may still be reading warp_sums
    if (lane == 0) warp_sums[warp] = value;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) >> 5;
        value = lane < warps ? warp_sums[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1)
            value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    return value;
}

__device__ __forceinline__ float sqrt_t(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_t(double x) { return sqrt(x); }

template <typename T>
__global__ void sumsq_chunks(const T* __restrict__ x, const i64* __restrict__ start,
                             const i64* __restrict__ stop, double* __restrict__ out) {
    const i64 c = blockIdx.x;
    double acc = 0.0;
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[c] = acc;
}

template <typename T>
__global__ void sumsq2_chunks(const T* __restrict__ x, const T* __restrict__ y, const i64* __restrict__ start,
                              const i64* __restrict__ stop, double* __restrict__ out_x, double* __restrict__ out_y) {
    const i64 c = blockIdx.x;
    double ax = 0.0, ay = 0.0;
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const double xi = (double)x[i];
        const double yi = (double)y[i];
        ax += xi * xi;
        ay += yi * yi;
    }
    ax = block_sum(ax);
    ay = block_sum(ay);
    if (threadIdx.x == 0) {
        out_x[c] = ax;
        out_y[c] = ay;
    }
}

// SGD with momentum, PyTorch convention: v = m*v + (g + wd*w); w -= lr*v
// (Nesterov: w -= lr*(g + wd*w + m*v)).
template <typename T>
__global__ void sgd_update(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v,
                           const i64* __restrict__ start, const i64* __restrict__ stop,
                           const i64* __restrict__ segment, const T* __restrict__ seg_decay,
                           const T lr, const T momentum, const int nesterov) {
    const i64 c = blockIdx.x;
    const T wd = seg_decay[segment[c]];
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const T d = g[i] + wd * w[i];
        const T vi = momentum * v[i] + d;
        v[i] = vi;
        w[i] = w[i] - lr * (nesterov ? d + momentum * vi : vi);
    }
}

// AdamW, PyTorch convention: w = w*keep - lr*mhat/(sqrt(vhat) + eps), keep = 1 - lr*wd per segment.
template <typename T>
__global__ void adamw_update(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                             const i64* __restrict__ start, const i64* __restrict__ stop,
                             const i64* __restrict__ segment, const T* __restrict__ seg_keep,
                             const T beta1, const T one_minus_beta1, const T beta2, const T one_minus_beta2,
                             const T inv_bc1, const T inv_bc2, const T eps, const T lr) {
    const i64 c = blockIdx.x;
    const T keep = seg_keep[segment[c]];
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const T gi = g[i];
        const T mi = beta1 * m[i] + one_minus_beta1 * gi;
        const T vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = w[i] * keep - lr * ((mi * inv_bc1) / (sqrt_t(vi * inv_bc2) + eps));
    }
}

// LARS, MLPerf ResNet-50 semantics: v = m*v - lr_s*(g + wd_s*w); w += v
// (Nesterov: w += m*v - lr_s*(g + wd_s*w)); seg_lr holds lr*trust per segment.
template <typename T>
__global__ void lars_update(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v,
                            const i64* __restrict__ start, const i64* __restrict__ stop,
                            const i64* __restrict__ segment, const T* __restrict__ seg_decay,
                            const T* __restrict__ seg_lr, const T momentum, const int nesterov) {
    const i64 c = blockIdx.x;
    const i64 s = segment[c];
    const T wd = seg_decay[s];
    const T scaled_lr = seg_lr[s];
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const T wi = w[i];
        const T step = scaled_lr * (g[i] + wd * wi);
        const T vi = momentum * v[i] - step;
        v[i] = vi;
        w[i] = nesterov ? wi + momentum * vi - step : wi + vi;
    }
}

// LAMB stage 1: m, v from g*grad_scale; per-chunk sums of w^2 and u^2 with
// u = mhat/(sqrt(vhat) + eps) + wd_s*w. u is not stored: stage 2 recomputes it.
template <typename T>
__global__ void lamb_stage1(const T* __restrict__ w, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v,
                            const i64* __restrict__ start, const i64* __restrict__ stop,
                            const i64* __restrict__ segment, const T* __restrict__ seg_decay,
                            double* __restrict__ w_sumsq, double* __restrict__ u_sumsq,
                            const T beta1, const T one_minus_beta1, const T beta2, const T one_minus_beta2,
                            const T inv_bc1, const T inv_bc2, const T eps, const T grad_scale) {
    const i64 c = blockIdx.x;
    const T wd = seg_decay[segment[c]];
    double aw = 0.0, au = 0.0;
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const T gi = g[i] * grad_scale;
        const T mi = beta1 * m[i] + one_minus_beta1 * gi;
        const T vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const T wi = w[i];
        const T ui = (mi * inv_bc1) / (sqrt_t(vi * inv_bc2) + eps) + wd * wi;
        aw += (double)wi * (double)wi;
        au += (double)ui * (double)ui;
    }
    aw = block_sum(aw);
    au = block_sum(au);
    if (threadIdx.x == 0) {
        w_sumsq[c] = aw;
        u_sumsq[c] = au;
    }
}

// LAMB stage 2: w -= step_s*u with u recomputed exactly as in stage 1; seg_step = lr*trust.
template <typename T>
__global__ void lamb_stage2(T* __restrict__ w, const T* __restrict__ m, const T* __restrict__ v,
                            const i64* __restrict__ start, const i64* __restrict__ stop,
                            const i64* __restrict__ segment, const T* __restrict__ seg_decay,
                            const T* __restrict__ seg_step, const T inv_bc1, const T inv_bc2, const T eps) {
    const i64 c = blockIdx.x;
    const i64 s = segment[c];
    const T wd = seg_decay[s];
    const T step = seg_step[s];
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) {
        const T wi = w[i];
        const T ui = (m[i] * inv_bc1) / (sqrt_t(v[i] * inv_bc2) + eps) + wd * wi;
        w[i] = wi - step * ui;
    }
}

// a += b over the chunks: the bandwidth the kernels above are compared with.
template <typename T>
__global__ void add_inplace(T* __restrict__ a, const T* __restrict__ b,
                            const i64* __restrict__ start, const i64* __restrict__ stop) {
    const i64 c = blockIdx.x;
    for (i64 i = start[c] + threadIdx.x; i < stop[c]; i += blockDim.x) a[i] += b[i];
}
