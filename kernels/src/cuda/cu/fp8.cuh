// FP8 (OCP E4M3 / E5M2) casts in integer arithmetic, written to give the same bits as
// fp8lm's CPU casts (fp8/src/format.rs, `EncodeConsts::encode`) on every input.
//
// Mirrored line by line in Rust by `kernels/src/cuda/cast_mirror.rs`, which is tested on
// the CPU against the fp8 crate's reference (all 65536 f16 patterns, the seeded f32 set).
// Keep the two in step: change one, change the other.
//
// No CUDA header is needed: only integer ops, one IEEE f32 multiply (__fmul_rn: never
// contracted into an FMA) and one IEEE division for 1/scale.

// -inf without <math.h> (no header is included).
#define FP8LM_NEG_INF __uint_as_float(0xFF800000u)

#define FP8_E4M3 0
#define FP8_E5M2 1
#define MODE_SATFINITE 0
#define MODE_SATALL 1
#define MODE_NONSAT 2

struct Fp8Consts {
    unsigned int shift;       // 23 - m
    unsigned int round_bias;  // 2^(shift-1) - 1
    unsigned int rebias;      // (127 - bias) << m
    unsigned int min_normal_bits;
    int sub_shift_base;       // 150 + emin - m: right shift of the 24-bit significand is base - E
    unsigned int max_code, overflow_code, inf_code, nan_code;
};

__device__ __forceinline__ Fp8Consts fp8_consts(int fmt, int mode) {
    Fp8Consts k;
    const unsigned int m = fmt == FP8_E4M3 ? 3u : 2u;
    const int bias = fmt == FP8_E4M3 ? 7 : 15;
    const int emin = 1 - bias;
    const unsigned int max_bits = fmt == FP8_E4M3 ? 0x7Eu : 0x7Bu;
    const unsigned int nan_bits = fmt == FP8_E4M3 ? 0x7Fu : 0x7Eu;
    const bool has_inf = fmt == FP8_E5M2;
    const unsigned int overflow_value = has_inf ? 0x7Cu : nan_bits;
    k.shift = 23u - m;
    k.round_bias = (1u << (k.shift - 1u)) - 1u;
    k.rebias = ((unsigned int)(127 - bias)) << m;
    k.min_normal_bits = ((unsigned int)(emin + 127)) << 23;
    k.sub_shift_base = 150 + emin - (int)m;
    k.max_code = max_bits;
    k.nan_code = nan_bits;
    if (mode == MODE_SATFINITE) {
        k.overflow_code = max_bits;
        k.inf_code = has_inf ? overflow_value : max_bits;
    } else if (mode == MODE_SATALL) {
        k.overflow_code = max_bits;
        k.inf_code = max_bits;
    } else {
        k.overflow_code = overflow_value;
        k.inf_code = overflow_value;
    }
    return k;
}

// Round-to-nearest-even right shift of a significand (s >= 1).
__device__ __forceinline__ unsigned int rne_shift(unsigned int sig, int s) {
    if (s > 25) return 0u; // sig < 2^24: below half a quantum
    const unsigned int q = sig >> s;
    const unsigned int rem = sig & ((1u << s) - 1u);
    const unsigned int half = 1u << (s - 1);
    return q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
}

// Encode the f32 with bit pattern `b` (already scaled).
__device__ __forceinline__ unsigned int fp8_encode_bits(const Fp8Consts& k, unsigned int b) {
    const unsigned int sign = (b >> 24) & 0x80u;
    const unsigned int ab = b & 0x7FFFFFFFu;
    // Normal range: round the f32 pattern to m mantissa bits (a carry into the exponent
    // is the correct next binade).
    const unsigned int lsb = (ab >> k.shift) & 1u;
    const unsigned int r = (ab + k.round_bias + lsb) >> k.shift;
    const unsigned int code_n = r - k.rebias;
    // Subnormal range of the format: the value is sig * 2^(E - 150); the code is that
    // divided by the subnormal quantum 2^(emin - m), rounded to nearest even. f32
    // subnormals (E = 0) are far below half a quantum: code 0.
    const unsigned int e = ab >> 23;
    const unsigned int sig = (ab & 0x7FFFFFu) | 0x800000u;
    const unsigned int code_s = e == 0u ? 0u : rne_shift(sig, k.sub_shift_base - (int)e);
    unsigned int code = ab < k.min_normal_bits ? code_s : code_n;
    if (code > k.max_code) code = k.overflow_code;
    if (ab == 0x7F800000u) code = k.inf_code;
    if (ab > 0x7F800000u) code = k.nan_code;
    return code | sign;
}

// fp8(x * scale) exactly as the CPU bulk casts: one IEEE f32 multiply, then the encode.
// A NaN input keeps its own sign (x86 propagates the NaN operand of a multiply; a GPU
// would return its canonical NaN), so NaN is decided on the input.
__device__ __forceinline__ unsigned int fp8_from_f32_scaled(const Fp8Consts& k, float x, float scale) {
    const unsigned int xb = __float_as_uint(x);
    if ((xb & 0x7FFFFFFFu) > 0x7F800000u) return ((xb >> 24) & 0x80u) | k.nan_code;
    return fp8_encode_bits(k, __float_as_uint(__fmul_rn(x, scale)));
}

// f16 bits -> f32, exact (integer widening; NaN becomes a quiet NaN with the payload).
__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int exp = ((unsigned int)h >> 10) & 0x1Fu;
    unsigned int man = (unsigned int)h & 0x3FFu;
    unsigned int out;
    if (exp == 0x1Fu) {
        out = sign | 0x7F800000u | (man << 13) | (man != 0u ? 0x400000u : 0u);
    } else if (exp == 0u) {
        if (man == 0u) {
            out = sign;
        } else {
            // Subnormal: man * 2^-24. Normalise.
            int e = -14;
            while ((man & 0x400u) == 0u) { man <<= 1; e -= 1; }
            out = sign | ((unsigned int)(e + 127) << 23) | ((man & 0x3FFu) << 13);
        }
    } else {
        out = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return __uint_as_float(out);
}

// f32 -> f16 bits, round to nearest even, IEEE overflow to inf (as `half::f16::from_f32`).
__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    const unsigned int b = __float_as_uint(x);
    const unsigned int sign = (b >> 16) & 0x8000u;
    const unsigned int ab = b & 0x7FFFFFFFu;
    if (ab > 0x7F800000u) return (unsigned short)(sign | 0x7E00u | ((ab >> 13) & 0x3FFu));
    if (ab >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u); // rounds to >= 65536: inf
    const unsigned int e = ab >> 23;
    if (e >= 113u) {
        // Normal f16: round the f32 pattern to 10 mantissa bits, rebias 127 -> 15.
        const unsigned int lsb = (ab >> 13) & 1u;
        const unsigned int r = (ab + 0xFFFu + lsb) >> 13;
        return (unsigned short)(sign | (r - (112u << 10)));
    }
    // f16 subnormal (or zero): value / 2^-24, rounded to nearest even.
    if (e == 0u) return (unsigned short)sign;
    const unsigned int sig = (ab & 0x7FFFFFu) | 0x800000u;
    return (unsigned short)(sign | rne_shift(sig, 126 - (int)e));
}

// FP8 code -> exact f32 (NaN codes give NaN with the code's sign).
__device__ __forceinline__ float fp8_decode(int fmt, unsigned int bits) {
    const unsigned int m = fmt == FP8_E4M3 ? 3u : 2u;
    const int bias = fmt == FP8_E4M3 ? 7 : 15;
    const unsigned int sign = (bits >> 7) << 31;
    const unsigned int exp = (bits >> m) & ((1u << (7u - m)) - 1u);
    const unsigned int mant = bits & ((1u << m) - 1u);
    const unsigned int exp_all = (1u << (7u - m)) - 1u;
    if (fmt == FP8_E4M3 && exp == exp_all && mant == 7u) return __uint_as_float(sign | 0x7FC00000u);
    if (fmt == FP8_E5M2 && exp == exp_all)
        return __uint_as_float(sign | (mant == 0u ? 0x7F800000u : 0x7FC00000u));
    if (exp == 0u) {
        if (mant == 0u) return __uint_as_float(sign);
        int lead = 31 - __clz(mant);
        int e = 1 - bias - (int)m + lead;
        unsigned int frac = (mant ^ (1u << lead)) << (23 - lead);
        return __uint_as_float(sign | ((unsigned int)(e + 127) << 23) | frac);
    }
    const int e = (int)exp - bias;
    return __uint_as_float(sign | ((unsigned int)(e + 127) << 23) | (mant << (23u - m)));
}

// amax kept as the bits of |x| in a u32: non-negative f32 patterns order like their
// values and every NaN sorts above +inf, so atomicMax gives "max |x|, or NaN" (the CPU
// casts' `fold_amax_bits`).
__device__ __forceinline__ unsigned int abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// Block-wide max of a u32, then one atomicMax per block into *out. Every thread of the
// block must call it (it has barriers).
__device__ __forceinline__ void block_max_atomic(unsigned int v, unsigned int* out) {
    __shared__ unsigned int smax[32];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // a previous call's warp 0 may still be reading smax
    if (lane == 0) smax[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        v = lane < nw ? smax[lane] : 0u;
        for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
        if (lane == 0) atomicMax(out, v);
    }
}
