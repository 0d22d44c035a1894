/* Fused float32 kernels for training steps on a CPU (see __init__.py for how they are built and
 * when they are used).
 *
 * Each function does in one pass over memory what PyTorch's eager ops do in two to six: on a
 * CPU the activations of even a small model do not fit in the core's cache, so every extra pass
 * over them costs about as much as the arithmetic. Rows are split among the OpenMP threads of the
 * process (PyTorch's own: libgomp.so.1 resolves to the copy torch loaded first), and the inner
 * loops are written so that the compiler vectorises them, exp included (glibc's libmvec).
 *
 * All tensors are float32 and contiguous unless a stride is passed; sizes are int64_t.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#ifndef PRETRAINER_NO_VECTOR_MATH
/* lets the compiler call the vector expf of libmvec inside `omp simd` loops */
#pragma omp declare simd notinbranch
float expf(float);
#endif

static inline float sigmoid(float g) { return 1.f / (1.f + expf(-g)); }

/* SwiGLU (Shazeer 2020) on the fused projection h = [gate, up] ([N, 2n]):
 * y[i, j] = silu(gate) * up, with silu(g) = g * sigmoid(g). */
void swiglu_forward(const float *h, float *y, int64_t N, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *g = h + i * 2 * n, *u = g + n;
        float *yi = y + i * n;
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) yi[j] = g[j] * sigmoid(g[j]) * u[j];
    }
}

/* Gradient of the above into dh ([N, 2n], laid out as h): d up = dy * silu(g),
 * d gate = dy * up * silu'(g) with silu'(g) = s + g s (1 - s), s = sigmoid(g). */
void swiglu_backward(const float *dy, const float *h, float *dh, int64_t N, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *g = h + i * 2 * n, *u = g + n, *d = dy + i * n;
        float *dg = dh + i * 2 * n, *du = dg + n;
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            float s = sigmoid(g[j]);
            float a = g[j] * s;
            du[j] = d[j] * a;
            dg[j] = d[j] * u[j] * (s + a * (1.f - s));
        }
    }
}

/* GELU in its tanh form (Hendrycks & Gimpel 2016; GPT-2's, BERT's gelu_new) over n values:
 * y = x (1 + tanh(u)) / 2 with u = sqrt(2/pi) (x + 0.044715 x^3), and tanh(u) = 2 sigmoid(2u) - 1. */
#define GELU_K 0.7978845608028654f
#define GELU_C 0.044715f
void gelu_tanh_forward(const float *x, float *y, int64_t n) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float t = 2.f * sigmoid(2.f * GELU_K * (v + GELU_C * v * v * v)) - 1.f;
        y[i] = 0.5f * v * (1.f + t);
    }
}

/* Its gradient: dx = dy ((1 + t) / 2 + x (1 - t^2) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2)). */
void gelu_tanh_backward(const float *dy, const float *x, float *dx, int64_t n) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float t = 2.f * sigmoid(2.f * GELU_K * (v + GELU_C * v * v * v)) - 1.f;
        dx[i] = dy[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_C * v * v));
    }
}

/* RMSNorm (Zhang & Sennrich 2019) over rows of x [N, d]: r = 1 / sqrt(mean(x^2) + eps),
 * y = x * r * w. r [N] is kept for the backward. */
void rms_norm_forward(const float *x, const float *w, float *y, float *r, int64_t N, int64_t d, float eps) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        float ss = 0.f;
        #pragma omp simd reduction(+:ss)
        for (int64_t j = 0; j < d; j++) ss += xi[j] * xi[j];
        float ri = 1.f / sqrtf(ss / (float)d + eps);
        r[i] = ri;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) yi[j] = xi[j] * ri * w[j];
    }
}

/* dx = r (dy w) - x r^3 (sum_j dy w x) / d and dw = sum over rows of dy x r. Each thread adds its
 * rows' share of dw into its own row of partial [threads, d]; the caller sums those rows. */
void rms_norm_backward(const float *dy, const float *x, const float *w, const float *r, float *dx,
                       float *partial, int64_t N, int64_t d, int64_t threads) {
    memset(partial, 0, sizeof(float) * threads * d);
    #pragma omp parallel num_threads(threads)
    {
        float *p = partial + omp_get_thread_num() * d;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            const float *dyi = dy + i * d, *xi = x + i * d;
            float *dxi = dx + i * d;
            float ri = r[i], t = 0.f;
            #pragma omp simd reduction(+:t)
            for (int64_t j = 0; j < d; j++) t += dyi[j] * w[j] * xi[j];
            float k = ri * ri * ri * t / (float)d;
            #pragma omp simd
            for (int64_t j = 0; j < d; j++) {
                dxi[j] = ri * dyi[j] * w[j] - xi[j] * k;
                p[j] += dyi[j] * xi[j] * ri;
            }
        }
    }
}

/* Rotary embedding (Su et al. 2021), half-split layout: out = x cos + rotate_half(x) sign sin with
 * rotate_half(x) = [-x2, x1]; sign -1 is the inverse rotation (the backward). x and out are
 * [B, T, H, D] with strides xs / os for the first three dimensions (the last is contiguous);
 * cos [T, D] and sin [T, D/2] have row strides cs / ss. */
void rotary(const float *x, const int64_t *xs, float *out, const int64_t *os, const float *cos_,
            int64_t cs, const float *sin_, int64_t ss, int64_t B, int64_t T, int64_t H, int64_t D,
            float sign) {
    int64_t half = D / 2;
    #pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        const float *c = cos_ + t * cs, *s = sin_ + t * ss;
        for (int64_t h = 0; h < H; h++) {
            const float *xi = x + b * xs[0] + t * xs[1] + h * xs[2];
            float *oi = out + b * os[0] + t * os[1] + h * os[2];
            #pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                float x1 = xi[j], x2 = xi[j + half];
                oi[j] = x1 * c[j] - sign * x2 * s[j];
                oi[j + half] = x2 * c[j + half] + sign * x1 * s[j];
            }
        }
    }
}

/* Cross-entropy over logits [N, V], in place: bias [V] (or NULL) added to every row first, then
 * loss[i] = logsumexp(row i) - row i at target[i], then row i becomes its softmax times scale[i]
 * minus scale[i] at target[i]: the gradient of sum_i scale[i] * loss[i]. A row is in cache from
 * the first read to the last write. With dbias [parts, V] (zeros; or NULL), `parts` threads each
 * add their rows' gradients into their own row of it: the bias gradient is its column sums. */
void softmax_cross_entropy(float *x, const float *bias, const int64_t *target, const float *scale,
                           float *loss, float *dbias, int64_t parts, int64_t N, int64_t V) {
    #pragma omp parallel num_threads(parts)
    {
        /* this thread's row of dbias [parts, V] (zeros): the column sums of its rows' gradients */
        float *acc = dbias ? dbias + (int64_t)omp_get_thread_num() * V : NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < N; i++) {
            float *xi = x + i * V;
            if (bias) {
                #pragma omp simd
                for (int64_t j = 0; j < V; j++) xi[j] += bias[j];
            }
            float picked = xi[target[i]];
            float m = xi[0];
            #pragma omp simd reduction(max:m)
            for (int64_t j = 0; j < V; j++) m = xi[j] > m ? xi[j] : m;
            float total = 0.f;
            #pragma omp simd reduction(+:total)
            for (int64_t j = 0; j < V; j++) {
                float e = expf(xi[j] - m);
                xi[j] = e;
                total += e;
            }
            float k = scale[i] / total;
            #pragma omp simd
            for (int64_t j = 0; j < V; j++) xi[j] *= k;
            loss[i] = m + logf(total) - picked;
            xi[target[i]] -= scale[i];
            if (acc) {
                #pragma omp simd
                for (int64_t j = 0; j < V; j++) acc[j] += xi[j];
            }
        }
    }
}

/* Attention probabilities with an additive bias (T5's learned relative positions), in place:
 * x [B, R, S] (R = heads x queries) becomes softmax(x + bias) over its last dimension; bias is
 * [R, S], shared by the B batch entries (bstride 0), or [B, R, S] (bstride R * S). Masked entries
 * hold float's lowest value, so no row is all -inf; a row that is gets zeros. */
void biased_softmax_forward(float *x, const float *bias, int64_t B, int64_t R, int64_t S, int64_t bstride) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < B * R; i++) {
        float *xi = x + i * S;
        const float *bi = bias + (i / R) * bstride + (i % R) * S;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t j = 0; j < S; j++) {
            xi[j] += bi[j];
            m = xi[j] > m ? xi[j] : m;
        }
        if (m == -INFINITY) {
            memset(xi, 0, sizeof(float) * S);
            continue;
        }
        float total = 0.f;
        #pragma omp simd reduction(+:total)
        for (int64_t j = 0; j < S; j++) {
            float e = expf(xi[j] - m);
            xi[j] = e;
            total += e;
        }
        float r = 1.f / total;
        #pragma omp simd
        for (int64_t j = 0; j < S; j++) xi[j] *= r;
    }
}

/* Its gradient: dp [B, R, S], the gradient of the probabilities p, becomes that of the scores,
 * p (dp - sum(dp p)), in place; with dbias [R, S] (a shared bias), those summed over the batch are
 * written into it. The rows are split among the threads by r, each walking the batch for its own
 * rows, so no two threads write the same row of dbias. */
void biased_softmax_backward(float *dp, const float *p, float *dbias, int64_t B, int64_t R, int64_t S) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        float *db = dbias ? dbias + r * S : NULL;
        if (db) memset(db, 0, sizeof(float) * S);
        for (int64_t b = 0; b < B; b++) {
            float *di = dp + (b * R + r) * S;
            const float *pi = p + (b * R + r) * S;
            float t = 0.f;
            #pragma omp simd reduction(+:t)
            for (int64_t j = 0; j < S; j++) t += di[j] * pi[j];
            #pragma omp simd
            for (int64_t j = 0; j < S; j++) di[j] = pi[j] * (di[j] - t);
            if (db) {
                #pragma omp simd
                for (int64_t j = 0; j < S; j++) db[j] += di[j];
            }
        }
    }
}

/* Dropout (Srivastava et al. 2014). Element i of a call keeps its value when the i-th output of
 * SplitMix64 (Steele, Lea & Flood 2014) started at `seed` has its high 32 bits below `thr`
 * (= (1 - p) 2^32, so it keeps with probability 1 - p to within 2^-32). Each draw is a function
 * of (seed, i) alone: the mask does not depend on how the elements are split among threads, and
 * the caller draws `seed` from PyTorch's generator, so runs repeat and resume exactly. */
#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull
static inline uint64_t splitmix64(uint64_t seed, uint64_t i) {
    uint64_t z = seed + (i + 1) * GOLDEN_GAMMA;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* y = res + x * keep * scale over n values (res NULL: no residual), keep written to mask (0 / 1).
 * The dropped values are multiplied by 0, as PyTorch's dropout does (a NaN stays NaN). */
void dropout_forward(const float *x, const float *res, float *y, uint8_t *mask, int64_t n,
                     uint64_t thr, uint64_t seed, float scale) {
    if (res) {
        #pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) {
            uint8_t k = (splitmix64(seed, (uint64_t)i) >> 32) < thr;
            mask[i] = k;
            y[i] = res[i] + x[i] * (k ? scale : 0.f);
        }
    } else {
        #pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) {
            uint8_t k = (splitmix64(seed, (uint64_t)i) >> 32) < thr;
            mask[i] = k;
            y[i] = x[i] * (k ? scale : 0.f);
        }
    }
}

/* dx = dy * keep * scale: the same mask as the forward. */
void dropout_backward(const float *dy, const uint8_t *mask, float *dx, int64_t n, float scale) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * (mask[i] ? scale : 0.f);
}

/* Attention probabilities with dropout over the rows of scores s [N, S]: p = softmax(a s) (kept for
 * the backward) and y = p * keep * scale, element (i, j) drawn as element i S + j of
 * dropout_forward. A row that is -inf throughout (every key masked) gives zeros, as PyTorch's
 * attention does. */
void softmax_dropout_forward(const float *s, float *p, float *y, int64_t N, int64_t S, float a,
                             uint64_t thr, uint64_t seed, float scale) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *si = s + i * S;
        float *pi = p + i * S, *yi = y + i * S;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t j = 0; j < S; j++) m = si[j] > m ? si[j] : m;
        if (m == -INFINITY) {
            memset(pi, 0, sizeof(float) * S);
            memset(yi, 0, sizeof(float) * S);
            continue;
        }
        float total = 0.f;
        #pragma omp simd reduction(+:total)
        for (int64_t j = 0; j < S; j++) {
            float e = expf(a * (si[j] - m));
            pi[j] = e;
            total += e;
        }
        float r = 1.f / total;
        #pragma omp simd
        for (int64_t j = 0; j < S; j++) {
            uint8_t k = (splitmix64(seed, (uint64_t)(i * S + j)) >> 32) < thr;
            float pj = pi[j] * r;
            pi[j] = pj;
            yi[j] = pj * (k ? scale : 0.f);
        }
    }
}

/* Its gradient with respect to s, from dy (the gradient of y), p and y: with g = dy keep scale,
 * ds = a p (g - sum(g p)), and p g = dy y, so ds = a (dy y - p sum(dy y)): no mask needed. ds may
 * be dy itself. */
void softmax_dropout_backward(const float *dy, const float *p, const float *y, float *ds, int64_t N,
                              int64_t S, float a) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N; i++) {
        const float *dyi = dy + i * S, *pi = p + i * S, *yi = y + i * S;
        float *dsi = ds + i * S;
        float t = 0.f;
        #pragma omp simd reduction(+:t)
        for (int64_t j = 0; j < S; j++) t += dyi[j] * yi[j];
        #pragma omp simd
        for (int64_t j = 0; j < S; j++) dsi[j] = a * (dyi[j] * yi[j] - pi[j] * t);
    }
}
