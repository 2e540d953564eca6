/* One-token decode step of a pre-norm tokenmill Transformer in fp32, one thread, in one call.

   Computes what tokenmill.generation.decode_step.FusedDecodeStep computes, on the same weights (the NumPy arrays
   of that step, passed as pointers) and the same cache, with no per-op dispatch in between: the ~100 small ops of
   a step (norms, QK-norm, RoPE, cache writes, attention, activations) are loops here, and each matrix product
   streams its (in, out) row-major matrix once for all rows. The layouts are those of the Python step:
   - qkv: q of the H query heads, then k and v of the H_kv kv heads, each head hd wide;
   - query head h uses kv head h / g, g = H / H_kv (Attention's GQA order);
   - up: the gate then the up half for SwiGLU (silu(gate) * up), the one hidden layer otherwise;
   - cache: per layer (rows, H_kv, slots, hd), slot = position, strides given in floats;
   - RoPE: x cos + rotate_half(x) sin per head with tables (max_seq_len, hd / 2), rotate_half(x) = [-x2, x1]. */

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { NORM_RMS = 0, NORM_LAYER = 1 };
enum { ACT_GELU = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_RELU = 3, ACT_LEAKY_RELU = 4, ACT_RELU2 = 5 };

typedef struct {
    const float *attn_norm_w, *attn_norm_b; /* b NULL: RMSNorm or LayerNorm without bias */
    const float *qkv_t, *qkv_b;             /* (d, (H + 2 H_kv) hd) */
    const float *q_gain, *k_gain;           /* (hd) each; NULL without QK-norm */
    const float *o_t, *o_b;                 /* (H hd, d) */
    const float *ffn_norm_w, *ffn_norm_b;
    const float *up_t, *up_b;               /* (d, up_width) */
    const float *down_t, *down_b;           /* (hidden, d) */
    float *keys, *values;                   /* this layer's cache */
} Layer;

typedef struct {
    int64_t n_layers, d, n_heads, n_kv_heads, head_dim, hidden, up_width, vocab;
    int64_t norm_kind, gated, activation, has_final_norm;
    int64_t cache_row_stride, cache_head_stride; /* floats; a slot is head_dim floats */
    int64_t tok_emb_row_stride, tok_emb_col_stride; /* floats: a tied table may be stored column-major */
    float norm_eps, qk_eps, scale;
    const float *tok_emb;                 /* (V, d), strided */
    const float *pos_emb;                 /* (max_seq_len, d) or NULL */
    const float *rope_cos, *rope_sin;     /* (max_seq_len, hd / 2) or NULL */
    const float *final_norm_w, *final_norm_b;
    const float *head_t;                  /* (d, V) */
    const Layer *layers;
} Model;

/* y[b] = x[b] @ W (+ bias), or y[b] += ... when accumulate: W (in, out) row-major is read once for all rows,
   four input rows at a time (fewer passes over y). */
static void project(const float *x, int64_t B, int64_t in, const float *W, int64_t out, const float *bias,
                    float *y, int accumulate) {
    for (int64_t b = 0; b < B; b++) {
        float *yb = y + b * out;
        if (!accumulate) {
            if (bias) memcpy(yb, bias, (size_t)out * sizeof(float));
            else memset(yb, 0, (size_t)out * sizeof(float));
        } else if (bias) {
            for (int64_t j = 0; j < out; j++) yb[j] += bias[j];
        }
    }
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        const float *w0 = W + i * out, *w1 = w0 + out, *w2 = w1 + out, *w3 = w2 + out;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * in + i;
            const float x0 = xb[0], x1 = xb[1], x2 = xb[2], x3 = xb[3];
            float *restrict yb = y + b * out;
            for (int64_t j = 0; j < out; j++) yb[j] += x0 * w0[j] + x1 * w1[j] + x2 * w2[j] + x3 * w3[j];
        }
    }
    for (; i < in; i++) {
        const float *w = W + i * out;
        for (int64_t b = 0; b < B; b++) {
            const float xi = x[b * in + i];
            float *restrict yb = y + b * out;
            for (int64_t j = 0; j < out; j++) yb[j] += xi * w[j];
        }
    }
}

/* RMSNorm (Zhang & Sennrich 2019) or LayerNorm (Ba et al. 2016) of each of B rows of width n. */
static void norm(const float *x, int64_t B, int64_t n, int64_t kind, const float *w, const float *bias, float eps,
                 float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * n;
        float *ob = out + b * n;
        if (kind == NORM_RMS) {
            float ss = 0.0f;
            for (int64_t j = 0; j < n; j++) ss += xb[j] * xb[j];
            const float r = 1.0f / sqrtf(ss / (float)n + eps);
            for (int64_t j = 0; j < n; j++) ob[j] = xb[j] * r * w[j];
        } else {
            float mean = 0.0f, var = 0.0f;
            for (int64_t j = 0; j < n; j++) mean += xb[j];
            mean /= (float)n;
            for (int64_t j = 0; j < n; j++) var += (xb[j] - mean) * (xb[j] - mean);
            const float r = 1.0f / sqrtf(var / (float)n + eps);
            for (int64_t j = 0; j < n; j++) ob[j] = (xb[j] - mean) * r * w[j] + (bias ? bias[j] : 0.0f);
        }
    }
}

/* QK-norm of one head in place: RMSNorm over hd, then the gain. */
static void head_norm(float *x, int64_t hd, const float *gain, float eps) {
    float ss = 0.0f;
    for (int64_t j = 0; j < hd; j++) ss += x[j] * x[j];
    const float r = 1.0f / sqrtf(ss / (float)hd + eps);
    for (int64_t j = 0; j < hd; j++) x[j] = x[j] * r * gain[j];
}

/* RoPE of one head in place at one position (rotate-half form). */
static void rotate(float *x, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j] + a * sin[j];
    }
}

static float activate(float v, int64_t kind) {
    switch (kind) {
    case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case ACT_SILU: return v / (1.0f + expf(-v));
    case ACT_RELU: return v > 0.0f ? v : 0.0f;
    case ACT_LEAKY_RELU: return v > 0.0f ? v : 0.01f * v;
    default: return v > 0.0f ? v * v : 0.0f; /* ACT_RELU2 */
    }
}

/* Attention of one row's H query heads over slots 0..position of its cache row. */
static void attend(const Model *m, const float *q, const float *keys, const float *values, int64_t position,
                   float *scores, float *out) {
    const int64_t hd = m->head_dim, g = m->n_heads / m->n_kv_heads;
    for (int64_t h = 0; h < m->n_heads; h++) {
        const float *qh = q + h * hd;
        const float *K = keys + (h / g) * m->cache_head_stride, *V = values + (h / g) * m->cache_head_stride;
        float top = -INFINITY, total = 0.0f;
        for (int64_t s = 0; s <= position; s++) {
            float dot = 0.0f;
            for (int64_t j = 0; j < hd; j++) dot += qh[j] * K[s * hd + j];
            scores[s] = dot * m->scale;
            if (scores[s] > top) top = scores[s];
        }
        for (int64_t s = 0; s <= position; s++) total += (scores[s] = expf(scores[s] - top));
        float *oh = out + h * hd;
        memset(oh, 0, (size_t)hd * sizeof(float));
        for (int64_t s = 0; s <= position; s++) {
            const float p = scores[s] / total;
            for (int64_t j = 0; j < hd; j++) oh[j] += p * V[s * hd + j];
        }
    }
}

/* Floats of scratch `tm_decode_step` needs for B rows and positions below max_positions. */
int64_t tm_scratch_floats(const Model *m, int64_t B, int64_t max_positions) {
    const int64_t qkv = (m->n_heads + 2 * m->n_kv_heads) * m->head_dim;
    return B * (2 * m->d + qkv + m->n_heads * m->head_dim + m->up_width + m->hidden) + max_positions;
}

/* Feed token tokens[b] at position positions[b] for rows b < B; write (B, V) logits. */
void tm_decode_step(const Model *m, int64_t B, const int64_t *tokens, const int64_t *positions, float *scratch,
                    float *logits) {
    const int64_t d = m->d, H = m->n_heads, H_kv = m->n_kv_heads, hd = m->head_dim, half = hd / 2;
    const int64_t width = (H + 2 * H_kv) * hd;
    float *x = scratch, *h = x + B * d, *qkv = h + B * d, *att = qkv + B * width, *up = att + B * H * hd;
    float *act = up + B * m->up_width, *scores = act + B * m->hidden;
    for (int64_t b = 0; b < B; b++) {
        const float *row = m->tok_emb + tokens[b] * m->tok_emb_row_stride;
        for (int64_t j = 0; j < d; j++) x[b * d + j] = row[j * m->tok_emb_col_stride];
        if (m->pos_emb)
            for (int64_t j = 0; j < d; j++) x[b * d + j] += m->pos_emb[positions[b] * d + j];
    }
    for (int64_t i = 0; i < m->n_layers; i++) {
        const Layer *L = m->layers + i;
        norm(x, B, d, m->norm_kind, L->attn_norm_w, L->attn_norm_b, m->norm_eps, h);
        project(h, B, d, L->qkv_t, width, L->qkv_b, qkv, 0);
        for (int64_t b = 0; b < B; b++) {
            float *q = qkv + b * width, *k = q + H * hd, *v = k + H_kv * hd;
            const int64_t p = positions[b];
            for (int64_t j = 0; j < H + H_kv; j++) {
                if (L->q_gain) head_norm(q + j * hd, hd, j < H ? L->q_gain : L->k_gain, m->qk_eps);
                if (m->rope_cos) rotate(q + j * hd, hd, m->rope_cos + p * half, m->rope_sin + p * half);
            }
            float *keys = L->keys + b * m->cache_row_stride, *values = L->values + b * m->cache_row_stride;
            for (int64_t j = 0; j < H_kv; j++) {
                memcpy(keys + j * m->cache_head_stride + p * hd, k + j * hd, (size_t)hd * sizeof(float));
                memcpy(values + j * m->cache_head_stride + p * hd, v + j * hd, (size_t)hd * sizeof(float));
            }
            attend(m, q, keys, values, p, scores, att + b * H * hd);
        }
        project(att, B, H * hd, L->o_t, d, L->o_b, x, 1);
        norm(x, B, d, m->norm_kind, L->ffn_norm_w, L->ffn_norm_b, m->norm_eps, h);
        project(h, B, d, L->up_t, m->up_width, L->up_b, up, 0);
        for (int64_t b = 0; b < B; b++) {
            const float *ub = up + b * m->up_width;
            float *ab = act + b * m->hidden;
            if (m->gated)
                for (int64_t j = 0; j < m->hidden; j++) ab[j] = activate(ub[j], ACT_SILU) * ub[m->hidden + j];
            else
                for (int64_t j = 0; j < m->hidden; j++) ab[j] = activate(ub[j], m->activation);
        }
        project(act, B, m->hidden, L->down_t, d, L->down_b, x, 1);
    }
    const float *final = x;
    if (m->has_final_norm) {
        norm(x, B, d, m->norm_kind, m->final_norm_w, m->final_norm_b, m->norm_eps, h);
        final = h;
    }
    project(final, B, d, m->head_t, m->vocab, NULL, logits, 0);
}
