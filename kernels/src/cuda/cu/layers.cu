// Layer ops forward and backward, f32, the device twins of kernels/src/layers (same
// formulas, same shapes; summation order differs, so results agree to rounding, not
// bit for bit). Launch shapes are in kernels/src/cuda/ops.rs next to each wrapper.
// Row kernels: one block per row, `blockDim.x` a multiple of 32 (<= 1024).

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float ssum[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // ssum may still be read by a previous call
    if (lane == 0) ssum[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? ssum[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v; // every thread holds the sum
}

__device__ __forceinline__ float block_maxf(float v) {
    __shared__ float smx[32];
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) smx[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? smx[lane] : FP8LM_NEG_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

#define GRID_STRIDE(i, n) \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// ---- embeddings: out[n,c] = wte[tok] + wpe[t] (wpe may be null) -------------------------
extern "C" __global__ void encoder_forward(float* out, const unsigned int* tokens, const float* wte,
                                           const float* wpe, unsigned long long n, int t, int c) {
    GRID_STRIDE(i, n * c) {
        const unsigned long long row = i / c;
        const int ch = (int)(i % c);
        float v = wte[(unsigned long long)tokens[row] * c + ch];
        if (wpe) v += wpe[(row % t) * c + ch];
        out[i] = v;
    }
}
// dwte[tok] += dout, dwpe[t] += dout (atomics: order of the sums is not fixed).
extern "C" __global__ void encoder_backward(float* dwte, float* dwpe, const float* dout,
                                            const unsigned int* tokens, unsigned long long n, int t, int c) {
    GRID_STRIDE(i, n * c) {
        const unsigned long long row = i / c;
        const int ch = (int)(i % c);
        atomicAdd(&dwte[(unsigned long long)tokens[row] * c + ch], dout[i]);
        if (dwpe) atomicAdd(&dwpe[(row % t) * c + ch], dout[i]);
    }
}

// ---- LayerNorm: out = (x - mean) * rstd * w + b; mean[n], rstd[n] saved -------------------
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* w, const float* b, int c) {
    const unsigned long long row = blockIdx.x;
    const float* x = inp + row * c;
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += x[i];
    const float m = block_sum(s) / (float)c;
    float v = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) { const float d = x[i] - m; v += d * d; }
    const float var = block_sum(v) / (float)c;
    const float r = 1.0f / sqrtf(var + 1e-5f);
    for (int i = threadIdx.x; i < c; i += blockDim.x) out[row * c + i] = (x[i] - m) * r * w[i] + b[i];
    if (threadIdx.x == 0) { mean[row] = m; rstd[row] = r; }
}
// dinp += (dy w - mean(dy w) - norm mean(dy w norm)) rstd  (one block per row).
extern "C" __global__ void layernorm_backward_dinp(float* dinp, const float* dout, const float* inp,
                                                   const float* w, const float* mean, const float* rstd, int c) {
    const unsigned long long row = blockIdx.x;
    const float* x = inp + row * c;
    const float* dy = dout + row * c;
    const float m = mean[row], r = rstd[row];
    float a = 0.0f, bsum = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float dn = dy[i] * w[i];
        a += dn;
        bsum += dn * (x[i] - m) * r;
    }
    const float dn_mean = block_sum(a) / (float)c;
    const float dnn_mean = block_sum(bsum) / (float)c;
    for (int i = threadIdx.x; i < c; i += blockDim.x) {
        const float norm = (x[i] - m) * r;
        dinp[row * c + i] += (dy[i] * w[i] - dn_mean - norm * dnn_mean) * r;
    }
}
// dw[j] += sum_rows dy (x - mean) rstd, db[j] += sum_rows dy: one thread per channel, rows
// in order (deterministic).
extern "C" __global__ void layernorm_backward_dwdb(float* dw, float* db, const float* dout, const float* inp,
                                                   const float* mean, const float* rstd,
                                                   unsigned long long n, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float sw = 0.0f, sb = 0.0f;
    for (unsigned long long row = 0; row < n; row++) {
        const float dy = dout[row * c + j];
        sw += dy * (inp[row * c + j] - mean[row]) * rstd[row];
        sb += dy;
    }
    dw[j] += sw;
    db[j] += sb;
}

// ---- RMSNorm: out = x rstd w, rstd = 1/sqrt(mean(x^2) + eps) ------------------------------
extern "C" __global__ void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int c) {
    const unsigned long long row = blockIdx.x;
    const float* x = inp + row * c;
    float s = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) s += x[i] * x[i];
    const float r = 1.0f / sqrtf(block_sum(s) / (float)c + 1e-5f);
    for (int i = threadIdx.x; i < c; i += blockDim.x) out[row * c + i] = x[i] * r * w[i];
    if (threadIdx.x == 0) rstd[row] = r;
}
// dinp += rstd (dy w - x rstd mean(dy w x rstd)).
extern "C" __global__ void rmsnorm_backward_dinp(float* dinp, const float* dout, const float* inp,
                                                 const float* w, const float* rstd, int c) {
    const unsigned long long row = blockIdx.x;
    const float* x = inp + row * c;
    const float* dy = dout + row * c;
    const float r = rstd[row];
    float a = 0.0f;
    for (int i = threadIdx.x; i < c; i += blockDim.x) a += dy[i] * w[i] * x[i] * r;
    const float dn_n = block_sum(a) / (float)c;
    for (int i = threadIdx.x; i < c; i += blockDim.x)
        dinp[row * c + i] += r * (dy[i] * w[i] - x[i] * r * dn_n);
}
// dw[j] += sum_rows dy x rstd.
extern "C" __global__ void rmsnorm_backward_dw(float* dw, const float* dout, const float* inp,
                                               const float* rstd, unsigned long long n, int c) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (unsigned long long row = 0; row < n; row++) s += dout[row * c + j] * inp[row * c + j] * rstd[row];
    dw[j] += s;
}

// ---- GELU (tanh form, GPT-2) -------------------------------------------------------------
#define GELU_K 0.7978845608028654f
#define GELU_A 0.044715f
extern "C" __global__ void gelu_forward(float* out, const float* inp, unsigned long long n) {
    GRID_STRIDE(i, n) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_K * (x + GELU_A * x * x * x)));
    }
}
// dinp = dout * gelu'(x) (overwrites, as the CPU op).
extern "C" __global__ void gelu_backward(float* dinp, const float* inp, const float* dout, unsigned long long n) {
    GRID_STRIDE(i, n) {
        const float x = inp[i];
        const float th = tanhf(GELU_K * (x + GELU_A * x * x * x));
        const float sech2 = 1.0f - th * th;
        const float dg = 0.5f * (1.0f + th) + 0.5f * x * sech2 * GELU_K * (1.0f + 3.0f * GELU_A * x * x);
        dinp[i] = dout[i] * dg;
    }
}

// ---- SwiGLU: inp[n,2f] = [gate | up], out[n,f] = silu(gate) up ----------------------------
extern "C" __global__ void swiglu_forward(float* out, const float* inp, unsigned long long n, int f) {
    GRID_STRIDE(i, n * f) {
        const unsigned long long row = i / f;
        const int j = (int)(i % f);
        const float g = inp[row * 2 * f + j], u = inp[row * 2 * f + f + j];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}
// dinp[n,2f] = [dgate | dup] (overwrites).
extern "C" __global__ void swiglu_backward(float* dinp, const float* inp, const float* dout,
                                           unsigned long long n, int f) {
    GRID_STRIDE(i, n * f) {
        const unsigned long long row = i / f;
        const int j = (int)(i % f);
        const float g = inp[row * 2 * f + j], u = inp[row * 2 * f + f + j];
        const float s = 1.0f / (1.0f + expf(-g));
        dinp[row * 2 * f + j] = dout[i] * u * s * (1.0f + g * (1.0f - s));
        dinp[row * 2 * f + f + j] = dout[i] * g * s;
    }
}

// ---- bias, residual ------------------------------------------------------------------------
extern "C" __global__ void bias_forward(float* out, const float* bias, unsigned long long n, int oc) {
    GRID_STRIDE(i, n * oc) out[i] += bias[i % oc];
}
extern "C" __global__ void bias_backward(float* dbias, const float* dout, unsigned long long n, int oc) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= oc) return;
    float s = 0.0f;
    for (unsigned long long row = 0; row < n; row++) s += dout[row * oc + j];
    dbias[j] += s;
}
extern "C" __global__ void residual_forward(float* out, const float* a, const float* b, unsigned long long n) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}
extern "C" __global__ void add_inplace(float* dst, const float* src, unsigned long long n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

// ---- causal attention: qkv[b,t,3c], att[b,nh,t,t], out[b,t,c] ------------------------------
// Forward: one thread per (b, h, t) row. Simple and correct, not fast (no tiling).
extern "C" __global__ void attention_forward(float* out, float* att, const float* qkv, int b, int t, int c, int nh) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= b * nh * t) return;
    const int ti = idx % t, h = (idx / t) % nh, bi = idx / (t * nh);
    const int hs = c / nh;
    const float scale = 1.0f / sqrtf((float)hs);
    const float* base = qkv + (unsigned long long)bi * t * 3 * c;
    const float* q = base + (unsigned long long)ti * 3 * c + h * hs;
    float* row = att + ((unsigned long long)(bi * nh + h) * t + ti) * t;
    float maxv = FP8LM_NEG_INF;
    for (int t2 = 0; t2 <= ti; t2++) {
        const float* k = base + (unsigned long long)t2 * 3 * c + c + h * hs;
        float s = 0.0f;
        for (int i = 0; i < hs; i++) s += q[i] * k[i];
        s *= scale;
        row[t2] = s;
        maxv = fmaxf(maxv, s);
    }
    float sum = 0.0f;
    for (int t2 = 0; t2 <= ti; t2++) { const float e = expf(row[t2] - maxv); row[t2] = e; sum += e; }
    const float inv = 1.0f / sum;
    for (int t2 = 0; t2 <= ti; t2++) row[t2] *= inv;
    for (int t2 = ti + 1; t2 < t; t2++) row[t2] = 0.0f;
    float* o = out + (unsigned long long)bi * t * c + (unsigned long long)ti * c + h * hs;
    for (int i = 0; i < hs; i++) {
        float acc = 0.0f;
        for (int t2 = 0; t2 <= ti; t2++) acc += row[t2] * base[(unsigned long long)t2 * 3 * c + 2 * c + h * hs + i];
        o[i] = acc;
    }
}
// Backward: one thread per (b, h) walks its rows in order as the CPU op does (each thread
// alone writes its head's q/k/v columns, so no atomics). dqkv is overwritten; `datt` is
// scratch of b*nh*t floats. Correct, slow: a reference kernel until a tiled one exists.
extern "C" __global__ void attention_backward(float* dqkv, float* datt, const float* dout, const float* qkv,
                                              const float* att, int b, int t, int c, int nh) {
    const int bh = blockIdx.x * blockDim.x + threadIdx.x;
    if (bh >= b * nh) return;
    const int bi = bh / nh, h = bh % nh, hs = c / nh;
    const float scale = 1.0f / sqrtf((float)hs);
    const unsigned long long base = (unsigned long long)bi * t * 3 * c;
    float* da = datt + (unsigned long long)bh * t;
    for (int ti = 0; ti < t; ti++)
        for (int part = 0; part < 3; part++)
            for (int i = 0; i < hs; i++) dqkv[base + (unsigned long long)ti * 3 * c + part * c + h * hs + i] = 0.0f;
    for (int ti = 0; ti < t; ti++) {
        const float* arow = att + ((unsigned long long)bh * t + ti) * t;
        const float* dy = dout + (unsigned long long)bi * t * c + (unsigned long long)ti * c + h * hs;
        const float* q = qkv + base + (unsigned long long)ti * 3 * c + h * hs;
        for (int t2 = 0; t2 <= ti; t2++) {
            const float* v = qkv + base + (unsigned long long)t2 * 3 * c + 2 * c + h * hs;
            float* dv = dqkv + base + (unsigned long long)t2 * 3 * c + 2 * c + h * hs;
            float s = 0.0f;
            for (int i = 0; i < hs; i++) { s += v[i] * dy[i]; dv[i] += arow[t2] * dy[i]; }
            da[t2] = s;
        }
        float s = 0.0f;
        for (int t2 = 0; t2 <= ti; t2++) s += arow[t2] * da[t2];
        float* dq = dqkv + base + (unsigned long long)ti * 3 * c + h * hs;
        for (int t2 = 0; t2 <= ti; t2++) {
            const float dpre = arow[t2] * (da[t2] - s) * scale;
            const float* k = qkv + base + (unsigned long long)t2 * 3 * c + c + h * hs;
            float* dk = dqkv + base + (unsigned long long)t2 * 3 * c + c + h * hs;
            for (int i = 0; i < hs; i++) { dq[i] += dpre * k[i]; dk[i] += dpre * q[i]; }
        }
    }
}

// ---- softmax cross-entropy, in place -------------------------------------------------------
// logits[n,v] -> probs; losses[n] = logsumexp - logit[target]. One block per row.
extern "C" __global__ void softmax_xent_forward(float* logits, float* losses, const unsigned int* targets, int v) {
    const unsigned long long row = blockIdx.x;
    float* x = logits + row * v;
    float m = FP8LM_NEG_INF;
    for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, x[i]);
    m = block_maxf(m);
    const float target_logit = x[targets[row]];
    __syncthreads(); // every thread has read the target logit before it is overwritten
    float s = 0.0f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) { const float e = expf(x[i] - m); x[i] = e; s += e; }
    const float sum = block_sum(s);
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < v; i += blockDim.x) x[i] *= inv;
    if (threadIdx.x == 0) losses[row] = logf(sum) + m - target_logit;
}
// probs -> dlogits = (p - onehot) * dloss.
extern "C" __global__ void softmax_xent_backward(float* probs, const unsigned int* targets, float dloss,
                                                 unsigned long long n, int v) {
    GRID_STRIDE(i, n * v) {
        const unsigned long long row = i / v;
        const int j = (int)(i % v);
        const float p = probs[i] - (j == (int)targets[row] ? 1.0f : 0.0f);
        probs[i] = p * dloss;
    }
}

// ---- rotary embeddings: table[t, hs/2, 2] of (cos, sin); q and k of qkv[b,t,3c] ------------
// dir = +1 forward rotation, -1 the inverse (backward).
extern "C" __global__ void rope_apply(float* qkv, const float* table, unsigned long long bt, int t, int c, int nh, float dir) {
    const int hs = c / nh, half = hs / 2;
    GRID_STRIDE(i, bt * 2 * nh * half) {
        const int p = (int)(i % half);
        const int h = (int)((i / half) % nh);
        const int part = (int)((i / ((unsigned long long)half * nh)) % 2);
        const unsigned long long row = i / ((unsigned long long)half * nh * 2);
        const int ti = (int)(row % t);
        const float cs = table[((unsigned long long)ti * half + p) * 2];
        const float sn = dir * table[((unsigned long long)ti * half + p) * 2 + 1];
        float* x = qkv + row * 3 * c + part * c + h * hs + 2 * p;
        const float x0 = x[0], x1 = x[1];
        x[0] = x0 * cs - x1 * sn;
        x[1] = x0 * sn + x1 * cs;
    }
}

// ---- embeddings from an FP16 table (fp8-o2's tied embedding: its only copy is the FP16
// master): out[n,c] = f32(wte[tok]) * inv_scale (+ wpe[t]); inv_scale = 1 / scale on the
// host, as the CPU backend multiplies by it (exact for power-of-two scales).
extern "C" __global__ void encoder_forward_f16(float* out, const unsigned int* tokens,
                                               const unsigned short* wte, float inv_scale,
                                               const float* wpe, unsigned long long n, int t, int c) {
    GRID_STRIDE(i, n * c) {
        const unsigned long long row = i / c;
        const int ch = (int)(i % c);
        float v = __fmul_rn(f16_bits_to_f32(wte[(unsigned long long)tokens[row] * c + ch]), inv_scale);
        if (wpe) v = __fadd_rn(v, wpe[(row % t) * c + ch]);
        out[i] = v;
    }
}
