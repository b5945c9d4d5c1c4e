// Bulk casts with amax, the device twins of fp8lm_fp8::cast (same bits, see fp8.cuh).
// Scales are one-element device buffers (`real = stored / scale`); amaxes are u32 bit
// accumulators (see abs_bits) the caller zeroes; the amax is of the *unscaled* input.
// Grid-stride loops: any grid covers any n.

extern "C" __global__ void cast_f32_to_fp8(unsigned char* __restrict__ dst, const float* __restrict__ src,
                                           const float* __restrict__ scale, unsigned int* __restrict__ amax,
                                           unsigned long long n, int fmt, int mode) {
    const Fp8Consts k = fp8_consts(fmt, mode);
    const float s = scale[0];
    unsigned int acc = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float x = src[i];
        acc = max(acc, abs_bits(x));
        dst[i] = (unsigned char)fp8_from_f32_scaled(k, x, s);
    }
    block_max_atomic(acc, amax);
}

extern "C" __global__ void cast_f16_to_fp8(unsigned char* __restrict__ dst, const unsigned short* __restrict__ src,
                                           const float* __restrict__ scale, unsigned int* __restrict__ amax,
                                           unsigned long long n, int fmt, int mode) {
    const Fp8Consts k = fp8_consts(fmt, mode);
    const float s = scale[0];
    unsigned int acc = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float x = f16_bits_to_f32(src[i]);
        acc = max(acc, abs_bits(x));
        dst[i] = (unsigned char)fp8_from_f32_scaled(k, x, s);
    }
    block_max_atomic(acc, amax);
}

// dst = decode(src) * (1 / scale); amax of the decoded (unscaled) values.
extern "C" __global__ void cast_fp8_to_f32(float* __restrict__ dst, const unsigned char* __restrict__ src,
                                           const float* __restrict__ scale, unsigned int* __restrict__ amax,
                                           unsigned long long n, int fmt) {
    const float inv = __fdiv_rn(1.0f, scale[0]);
    unsigned int acc = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float v = fp8_decode(fmt, src[i]);
        acc = max(acc, abs_bits(v));
        dst[i] = __fmul_rn(v, inv);
    }
    block_max_atomic(acc, amax);
}

// f32 -> f16 with a scale (the FP16 master / second moment casts), amax of the input.
extern "C" __global__ void cast_f32_to_f16(unsigned short* __restrict__ dst, const float* __restrict__ src,
                                           const float* __restrict__ scale, unsigned int* __restrict__ amax,
                                           unsigned long long n) {
    const float s = scale[0];
    unsigned int acc = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float x = src[i];
        acc = max(acc, abs_bits(x));
        // NaN decided on the input, keeping its payload, as x86 propagates it (fp8.cuh).
        dst[i] = f32_to_f16_bits(abs_bits(x) > 0x7F800000u ? x : __fmul_rn(x, s));
    }
    block_max_atomic(acc, amax);
}

// amax only (delayed scaling of a tensor that is not cast yet).
extern "C" __global__ void amax_f32(const float* __restrict__ src, unsigned int* __restrict__ amax,
                                    unsigned long long n) {
    unsigned int acc = 0u;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        acc = max(acc, abs_bits(src[i]));
    block_max_atomic(acc, amax);
}

// Inverse scales for cuBLASLt (D = scale_a * scale_b * A B with real = stored * scale_inv):
// inv[i] = 1 / scale[i] on the device, so no host round trip per GEMM.
extern "C" __global__ void invert_scales(float* __restrict__ inv, const float* __restrict__ scale, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) inv[i] = __fdiv_rn(1.0f, scale[i]);
}

// dst[cols, rows] = src[rows, cols]^T for 1-byte elements (FP8 codes): cuBLASLt's FP8 GEMM
// takes only the TN layout, so the backward GEMMs transpose an operand first. 32x32 tiles
// through shared memory; launch with blockDim (32, 8) and grid (ceil(cols/32), ceil(rows/32)).
extern "C" __global__ void transpose_u8(unsigned char* __restrict__ dst, const unsigned char* __restrict__ src,
                                        int rows, int cols) {
    __shared__ unsigned char tile[32][33];
    const int c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int r = r0 + dy, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[dy][threadIdx.x] = src[(unsigned long long)r * cols + c];
    }
    __syncthreads();
    for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
        const int c = c0 + dy, r = r0 + threadIdx.x; // dst row c, column r
        if (c < cols && r < rows) dst[(unsigned long long)c * rows + r] = tile[threadIdx.x][dy];
    }
}

// f32 -> bf16 (bit patterns), round to nearest even; NaN stays NaN (quiet bit set), as
// the `half` crate's `bf16::from_f32`, which the CPU backends use: bit-identical to them.
extern "C" __global__ void cast_f32_to_bf16(unsigned short* __restrict__ dst, const float* __restrict__ src,
                                            unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned int x = __float_as_uint(src[i]);
        unsigned int r;
        if ((x & 0x7FFFFFFFu) > 0x7F800000u) {
            r = (x >> 16) | 0x0040u;
        } else if ((x & 0x8000u) != 0u && (x & 0x17FFFu) != 0u) {
            // Round bit set and (sticky bits or the kept LSB) set: round up.
            r = (x >> 16) + 1u;
        } else {
            r = x >> 16;
        }
        dst[i] = (unsigned short)r;
    }
}
