// The FP8-LM optimizer update (FP16 master, E4M3 first moment, FP16 second moment, FP8
// gradient: 6 B/param with the 1-byte gradient) and the global gradient norm.
// Same expressions as optim/src/fp8_adam (`update_chunk`'s scalar tail), in the same
// order, every multiply and add rounded separately (compiled with --fmad=false).

struct AdamConsts {
    float b1, b2, one_minus_b1, one_minus_b2;
    float inv_bc1, inv_bc2; // 1/(1 - b^t), computed in f64 on the host
    float eps, lr, wd;
};

// scales[0..3]: the state's old scales (master, m1, m2) as stored; scales[3..6]: the new
// ones to encode with. The gradient is decode(code) * (1 / grad_scale[0]) * grad_mult[0]
// (the clip factor; 1 = none), two roundings as the CPU's `GradChunk::decode`; both are
// device scalars, so the clip factor can come from the device-side grad norm. amax[0..3]:
// u32 accumulators of |new master|, |new m1|, |new m2| (the next step's scales).
// `p` receives the new compute weights (decoded master) in f32.
extern "C" __global__ void fp8_adam_update(unsigned short* __restrict__ master_f16,
                                           unsigned char* __restrict__ m1_e4m3,
                                           unsigned short* __restrict__ m2_f16,
                                           float* __restrict__ p,
                                           const unsigned char* __restrict__ grad_fp8, int grad_fmt,
                                           const float* __restrict__ grad_scale,
                                           const float* __restrict__ grad_mult,
                                           const float* __restrict__ scales,
                                           unsigned int* __restrict__ amax,
                                           AdamConsts k, unsigned long long n) {
    const Fp8Consts e4m3 = fp8_consts(FP8_E4M3, MODE_SATFINITE);
    const float gi = 1.0f / grad_scale[0], gm = grad_mult[0];
    const float iw = 1.0f / scales[0], im = 1.0f / scales[1], iv = 1.0f / scales[2];
    const float sw = scales[3], sm = scales[4], sv = scales[5];
    const float inv_sw = 1.0f / sw;
    unsigned int aw = 0u, am = 0u, av = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float gx = fp8_decode(grad_fmt, grad_fp8[i]) * gi * gm;
        const float wx = f16_bits_to_f32(master_f16[i]) * iw;
        const float mx = fp8_decode(FP8_E4M3, m1_e4m3[i]) * im;
        const float vx = f16_bits_to_f32(m2_f16[i]) * iv;
        const float mn = k.b1 * mx + k.one_minus_b1 * gx;
        const float vn = k.b2 * vx + k.one_minus_b2 * gx * gx;
        const float u = (mn * k.inv_bc1) / (sqrtf(vn * k.inv_bc2) + k.eps);
        const float wn = wx - k.lr * (u + k.wd * wx);
        aw = max(aw, abs_bits(wn));
        am = max(am, abs_bits(mn));
        av = max(av, abs_bits(vn));
        const unsigned short wh = f32_to_f16_bits(wn * sw);
        master_f16[i] = wh;
        p[i] = f16_bits_to_f32(wh) * inv_sw;
        m2_f16[i] = f32_to_f16_bits(vn * sv);
        m1_e4m3[i] = (unsigned char)fp8_encode_bits(e4m3, __float_as_uint(mn * sm));
    }
    block_max_atomic(aw, &amax[0]);
    block_max_atomic(am, &amax[1]);
    block_max_atomic(av, &amax[2]);
}

// Sum of squares of an f32 gradient, two stages so the result does not depend on the
// scheduling: each block writes its partial (f64) to partial[blockIdx.x] ...
extern "C" __global__ void sumsq_partial_f32(double* __restrict__ partial, const float* __restrict__ g,
                                             unsigned long long n) {
    __shared__ double s[1024];
    double acc = 0.0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const double x = (double)g[i];
        acc += x * x;
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}
// ... the same over an FP8 gradient (decoded, times 1/scale) ...
extern "C" __global__ void sumsq_partial_fp8(double* __restrict__ partial, const unsigned char* __restrict__ g,
                                             int fmt, const float* __restrict__ scale, unsigned long long n) {
    __shared__ double s[1024];
    const double inv = 1.0 / (double)scale[0];
    double acc = 0.0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const double x = (double)fp8_decode(fmt, g[i]) * inv;
        acc += x * x;
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) s[threadIdx.x] += s[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}
// ... and one thread adds the partials in order into *total (+=, so tensors accumulate).
extern "C" __global__ void sum_partials(double* __restrict__ total, const double* __restrict__ partial, int n) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        double s = 0.0;
        for (int i = 0; i < n; i++) s += partial[i];
        total[0] += s;
    }
}

// The FP8-LM shared scale: every rank's scale goes through an all-reduce(min) (NCCL, on the
// device); this kernel then re-encodes a rank's FP8 gradient by `ratio = target / own`
// (target: mu * the shared min scale), in place, as collectives' `requant_table`:
// code = fp8(decode(code) * ratio), saturating every overflow (SatAll); NaN codes keep
// their exact bits.
extern "C" __global__ void fp8_rescale(unsigned char* __restrict__ g, int fmt, const float* __restrict__ own_scale,
                                       const float* __restrict__ target_scale, unsigned long long n) {
    const Fp8Consts k = fp8_consts(fmt, MODE_SATALL);
    const float ratio = __fdiv_rn(target_scale[0], own_scale[0]);
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float v = fp8_decode(fmt, g[i]);
        if (abs_bits(v) <= 0x7F800000u) g[i] = (unsigned char)fp8_encode_bits(k, __float_as_uint(__fmul_rn(v, ratio)));
    }
}

// dst[0] = src[0] * factor: scale bookkeeping on the device (mu * s, N * s) so the FP8-LM
// all-reduce needs no host round trip.
extern "C" __global__ void scale_scalar(float* __restrict__ dst, const float* __restrict__ src, float factor) {
    if (blockIdx.x == 0 && threadIdx.x == 0) dst[0] = __fmul_rn(src[0], factor);
}
