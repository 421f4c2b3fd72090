// A Llama-family decoder's forward pass in C++, over a KV cache of fixed capacity, for decoding: the compiled
// half of shrink.runtime (runtime/llama.py), built into the kernels' one extension module.
//
// transformers spends more time per generated token in Python (module calls, the dynamic cache, masks)
// than in the matrix products; this runs the whole step in one call. The matrix products are the AVX2
// kernel's (qgemm_avx2.h) for packed layers and ATen's for float ones, so a packed layer computes here
// what QuantLinear.forward computes. Everything else (RMSNorm, rotary embedding, grouped-query attention,
// SiLU gating) follows transformers' LlamaModel in float32.
//
// A call takes a flat list of tokens, each with the cache slot (sequence) it belongs to and its position
// there: one sequence's prompt, the next token of many sequences, or both. Every token's keys and values
// are written before any attention is computed, so a token sees its own sequence's positions 0..pos.

#include "packed_linear.h"

namespace shrink_kernels {
void bind_decoder(pybind11::module_& m);
}

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using shrink_kernels::float_gemv;
using shrink_kernels::float_gemv_into;
using shrink_kernels::GEMV_MAX_ROWS;
using torch::Tensor;

std::optional<Tensor> maybe(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? std::optional<Tensor>(t) : std::nullopt;
}

// A weight layer: packed integer codes in the kernel's row layout (and, where the layer has one, its
// tiled copy, which computes the same products faster), or a float32 matrix [out, in].
struct Linear {
  Tensor qweight, scales, zeros, weight, bias, order;  // unused ones empty
  int64_t zero_const, bits, group, in, out, large_batch;
  Tensor tcodes, tscales, tzeros;  // the tiled layout (zero points empty for symmetric formats), or empty

  bool packed() const { return qweight.numel() > 0 || tcodes.numel() > 0; }  // a tiled weight may have no rows
  bool tiled() const { return tcodes.numel() > 0; }

  // y [M, out] = x [M, in] times the weight, plus the bias.
  Tensor operator()(const Tensor& x) const {
    TORCH_CHECK(x.size(1) == in, "a layer of ", in, " inputs was given ", x.size(1));
    const Tensor xi = order.numel() > 0 ? x.index_select(1, order) : x;
    if (!packed()) return xi.size(0) <= GEMV_MAX_ROWS ? float_gemv(xi, weight, bias) : at::linear(xi, weight, maybe(bias));
    return shrink_kernels::packed_linear(xi, qweight, scales, zeros, zero_const, bias, bits, group, tcodes, tscales,
                                         tzeros, large_batch);
  }

  shrink_kernels::Path path(int64_t rows) const { return shrink_kernels::choose_path(tiled(), rows, large_batch); }

  // The same product written into y [M, out] (contiguous), which a caller reuses: a float weight's
  // product goes there directly, a packed one's is copied.
  void into(const Tensor& x, Tensor& y) const {
    if (packed() || order.numel() > 0) {
      y.copy_((*this)(x));
    } else if (x.size(0) <= GEMV_MAX_ROWS) {
      float_gemv_into(x, weight, bias, y);
    } else if (bias.numel() > 0) {
      at::addmm_out(y, bias, x, weight.t());
    } else {
      at::mm_out(y, x, weight.t());
    }
  }

  shrink_kernels::PackedWeight kernel_weight() const {
    return {qweight, scales, zeros, bias, zero_const, bits, group};
  }

  shrink_kernels::TiledWeight tiled_weight() const { return {tcodes, tscales, tzeros, bias, zero_const, bits, group}; }

  // Whether this layer's product can be computed together with `other`'s on the same input: both on the
  // same path (packed_linear's choice), tiled (8-bit codes, or both 2-4 bits) or the row kernel (the same bits),
  // the same group size.
  bool fuses_with(const Linear& other, int64_t rows) const {
    if (!packed() || !other.packed() || order.numel() > 0 || other.order.numel() > 0 || group != other.group ||
        in != other.in || path(rows) != other.path(rows))
      return false;
    switch (path(rows)) {
      case shrink_kernels::Path::Tiled: return (bits == 8) == (other.bits == 8);
      case shrink_kernels::Path::Rows: return bits == other.bits;
      default: return false;
    }
  }

  // Row `r` of the weight as floats into dst (an embedding table's lookup).
  void row(int64_t r, float* dst) const {
    if (!packed()) {
      std::memcpy(dst, weight.data_ptr<float>() + r * in, in * sizeof(float));
      return;
    }
    const Tensor w = shrink_kernels::dequantize(qweight.narrow(0, r, 1), scales.narrow(0, r, 1),
                                                zeros.numel() > 0 ? zeros.narrow(0, r, 1) : zeros, zero_const, bits,
                                                group, in);
    std::memcpy(dst, w.data_ptr<float>(), in * sizeof(float));
  }
};

// Each layer of `ls` applied to x: the activations quantized once and the products in one parallel
// region where the layers allow (same packed format, inputs in order, a small batch), else one by one.
std::vector<Tensor> apply_all(const std::vector<const Linear*>& ls, const Tensor& x) {
  bool together = true;
  for (const Linear* l : ls) together = together && ls[0]->fuses_with(*l, x.size(0));
  std::vector<Tensor> out;
  if (together && x.size(1) == ls[0]->in && ls[0]->tiled()) {
    std::vector<shrink_kernels::TiledWeight> ws;
    for (const Linear* l : ls) ws.push_back(l->tiled_weight());
    return shrink_kernels::tiled_many(x.contiguous(), ws);
  }
  if (together && x.size(1) == ls[0]->in) {
    std::vector<shrink_kernels::PackedWeight> ws;
    for (const Linear* l : ls) ws.push_back(l->kernel_weight());
    return shrink_kernels::qlinear_many(x.contiguous(), ws);
  }
  for (const Linear* l : ls) out.push_back((*l)(x));
  return out;
}

struct Layer {
  Tensor input_norm, post_norm;  // RMSNorm weights [hidden]
  Linear q, k, v, o, gate, up, down;
};

// x [M, H] -> x / rms(x) * w, in place into out.
void rms_norm(const Tensor& x, const Tensor& w, double eps, Tensor& out) {
  const int64_t M = x.size(0), H = x.size(1);
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = px + m * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += r[i] * r[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
    for (int64_t i = 0; i < H; ++i) po[m * H + i] = pw[i] * (r[i] * inv);
  }
}

class Decoder {
 public:
  Decoder(int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, Tensor inv_freq, double rope_scaling,
          double attn_scale, Linear embed, std::vector<Layer> layers, Tensor final_norm, Linear head)
      : n_heads_(n_heads), n_kv_(n_kv), head_dim_(head_dim), eps_(eps), inv_freq_(inv_freq.contiguous()),
        rope_scaling_(rope_scaling), attn_scale_(attn_scale), embed_(std::move(embed)), layers_(std::move(layers)),
        final_norm_(final_norm.contiguous()), head_(std::move(head)) {
    TORCH_CHECK(n_heads % n_kv == 0, "attention heads must be a multiple of key-value heads");
    TORCH_CHECK(head_dim % 2 == 0 && inv_freq_.numel() == head_dim / 2, "rotary frequencies: head_dim / 2 of them");
  }

  // Empty the cache and size it for `slots` sequences of up to `capacity` positions each.
  void reset(int64_t slots, int64_t capacity) {
    const int64_t L = static_cast<int64_t>(layers_.size());
    k_ = torch::empty({L, slots, n_kv_, capacity, head_dim_}, torch::kFloat32);
    v_ = torch::empty({L, slots, n_kv_, capacity, head_dim_}, torch::kFloat32);
  }

  int64_t capacity() const { return k_.defined() ? k_.size(3) : 0; }

  // Copy the keys and values of positions 0..length-1 of slot `src` into slot `dst`, so that dst can go on
  // from src's prefix (a continuation scored after a prompt) while src goes on differently.
  void fork(int64_t src, int64_t dst, int64_t length) {
    TORCH_CHECK(k_.defined(), "reset() the cache first");
    TORCH_CHECK(src >= 0 && src < k_.size(1) && dst >= 0 && dst < k_.size(1) && src != dst, "fork: slots ", src,
                " and ", dst, " of ", k_.size(1));
    TORCH_CHECK(length >= 0 && length <= capacity(), "fork: length ", length, " of a capacity of ", capacity());
    k_.select(1, dst).narrow(2, 0, length).copy_(k_.select(1, src).narrow(2, 0, length));
    v_.select(1, dst).narrow(2, 0, length).copy_(v_.select(1, src).narrow(2, 0, length));
  }

  // tokens, slots, positions: [M] int64. Returns the logits [len(rows), vocab] of the tokens `rows`.
  Tensor forward(const Tensor& tokens, const Tensor& slots, const Tensor& positions, const Tensor& rows) {
    return head_(normed(tokens, slots, positions, rows));
  }

  // As forward, with the logits of token rows[i] written into row out_rows[i] of `out` [R, vocab] (float32,
  // contiguous), a block of rows at a time through a scratch block kept between calls: logits a caller keeps
  // land where it keeps them, and no fresh block of memory is touched per call.
  void forward_into(const Tensor& tokens, const Tensor& slots, const Tensor& positions, const Tensor& rows,
                    Tensor& out, const Tensor& out_rows) {
    TORCH_CHECK(out.dim() == 2 && out.size(1) == head_.out && out.is_contiguous() &&
                    out.scalar_type() == torch::kFloat32, "forward_into: out must be [rows, vocab] float32, contiguous");
    TORCH_CHECK(out_rows.numel() == rows.numel(), "forward_into: one out row per row");
    const int64_t R = rows.numel();
    if (R > 0) {
      const int64_t* o = out_rows.data_ptr<int64_t>();
      for (int64_t i = 0; i < R; ++i) TORCH_CHECK(o[i] >= 0 && o[i] < out.size(0), "out row ", o[i], " outside ", out.size(0));
    }
    const Tensor hn = normed(tokens, slots, positions, rows);
    for (int64_t b = 0; b < R; b += HEAD_BLOCK) {
      const int64_t n = std::min(HEAD_BLOCK, R - b);
      if (!scratch_.defined() || scratch_.size(0) < n) scratch_ = torch::empty({n, head_.out}, torch::kFloat32);
      Tensor y = scratch_.narrow(0, 0, n);
      head_.into(hn.narrow(0, b, n), y);
      out.index_copy_(0, out_rows.narrow(0, b, n), y);
    }
  }

 private:
  static constexpr int64_t HEAD_BLOCK = 256;  // rows of logits per product in forward_into

  // The final-normed hidden states [len(rows), hidden] of the tokens `rows` after running all tokens.
  Tensor normed(const Tensor& tokens, const Tensor& slots, const Tensor& positions, const Tensor& rows) {
    TORCH_CHECK(k_.defined(), "reset() the cache first");
    const int64_t M = tokens.numel(), H = embed_.in;
    TORCH_CHECK(slots.numel() == M && positions.numel() == M, "one slot and one position per token");
    const int64_t* tok = tokens.data_ptr<int64_t>();
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(tok[i] >= 0 && tok[i] < embed_.out, "token id ", tok[i], " is outside the vocabulary of ", embed_.out);
      TORCH_CHECK(slot[i] >= 0 && slot[i] < k_.size(1), "slot ", slot[i], " is outside the cache's ", k_.size(1));
      TORCH_CHECK(pos[i] >= 0 && pos[i] < capacity(), "position ", pos[i], " is outside the cache's ", capacity());
    }
    Tensor x = torch::empty({M, H}, torch::kFloat32);
    for (int64_t i = 0; i < M; ++i) embed_.row(tok[i], x.data_ptr<float>() + i * H);
    Tensor h = torch::empty_like(x);
    const Tensor cos_sin = rotary(positions);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      rms_norm(x, L.input_norm, eps_, h);
      std::vector<Tensor> qkv = apply_all({&L.q, &L.k, &L.v}, h);
      Tensor &q = qkv[0], &k = qkv[1], &v = qkv[2];
      rotate(q, n_heads_, cos_sin);
      rotate(k, n_kv_, cos_sin);
      store(static_cast<int64_t>(l), k, v, slot, pos);
      x.add_(L.o(attend(static_cast<int64_t>(l), q, slot, pos)));
      rms_norm(x, L.post_norm, eps_, h);
      std::vector<Tensor> gu = apply_all({&L.gate, &L.up}, h);
      x.add_(L.down(at::silu_(gu[0]).mul_(gu[1])));
    }
    Tensor last = x.index_select(0, rows);
    Tensor out = torch::empty_like(last);
    rms_norm(last, final_norm_, eps_, out);
    return out;
  }

  // cos and sin of each token's position times each frequency, [M, 2, head_dim / 2], as transformers
  // computes them (float32 angles, then times the rope type's attention scaling).
  Tensor rotary(const Tensor& positions) const {
    const Tensor ang = positions.to(torch::kFloat32).unsqueeze(1) * inv_freq_.unsqueeze(0);
    return torch::stack({ang.cos(), ang.sin()}, 1).mul_(rope_scaling_).contiguous();
  }

  // Rotate the halves of each head of x [M, heads * head_dim] in place (transformers' rotate_half).
  void rotate(Tensor& x, int64_t heads, const Tensor& cos_sin) const {
    const int64_t M = x.size(0), D = head_dim_, half = D / 2;
    float* p = x.data_ptr<float>();
    const float* cs = cos_sin.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      const float* c = cs + m * D;
      const float* s = c + half;
      for (int64_t hh = 0; hh < heads; ++hh) {
        float* r = p + (m * heads + hh) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = r[i], b = r[i + half];
          r[i] = a * c[i] - b * s[i];
          r[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  }

  void store(int64_t l, const Tensor& k, const Tensor& v, const int64_t* slot, const int64_t* pos) {
    const int64_t M = k.size(0), D = head_dim_, S = k_.size(1), T = k_.size(3);
    float* kc = k_.data_ptr<float>() + l * S * n_kv_ * T * D;
    float* vc = v_.data_ptr<float>() + l * S * n_kv_ * T * D;
    const float* pk = k.data_ptr<float>();
    const float* pv = v.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < n_kv_; ++g) {
        const int64_t at = ((slot[m] * n_kv_ + g) * T + pos[m]) * D;
        std::memcpy(kc + at, pk + (m * n_kv_ + g) * D, D * sizeof(float));
        std::memcpy(vc + at, pv + (m * n_kv_ + g) * D, D * sizeof(float));
      }
  }

  // Softmax attention of each token's query heads over its sequence's cached positions 0..pos.
  // Runs of at least this many tokens of one slot at consecutive positions (a prompt, or a chunk of one)
  // attend through ATen's fused attention, causally over the slot's cached keys; other tokens one by one.
  static constexpr int64_t PROMPT_ROWS = 16;

  Tensor attend(int64_t l, const Tensor& q, const int64_t* slot, const int64_t* pos) const {
    const int64_t M = q.size(0), D = head_dim_, S = k_.size(1), T = k_.size(3), per_kv = n_heads_ / n_kv_;
    Tensor out = torch::empty({M, n_heads_ * D}, torch::kFloat32);
    std::vector<char> fused(M, 0);
    for (int64_t m = 0, e; m < M; m = e) {
      for (e = m + 1; e < M && slot[e] == slot[m] && pos[e] == pos[e - 1] + 1; ++e) {
      }
      const int64_t L = e - m, p0 = pos[m], n = p0 + L;
      if (L < PROMPT_ROWS) continue;
      const Tensor k = k_[l][slot[m]].narrow(1, 0, n).unsqueeze(0);  // [1, kv heads, n, D]
      const Tensor v = v_[l][slot[m]].narrow(1, 0, n).unsqueeze(0);
      const Tensor qh = q.narrow(0, m, L).view({L, n_heads_, D}).transpose(0, 1).unsqueeze(0);  // [1, heads, L, D]
      std::optional<Tensor> mask;  // query i (position p0 + i) sees keys 0..p0 + i
      if (p0 > 0)
        mask = torch::arange(n).unsqueeze(0) <= (torch::arange(L) + p0).unsqueeze(1);
      const Tensor o = at::scaled_dot_product_attention(qh, k, v, mask, 0.0, p0 == 0, attn_scale_, per_kv > 1);
      out.narrow(0, m, L).copy_(o.squeeze(0).transpose(0, 1).reshape({L, n_heads_ * D}));
      std::fill(fused.begin() + m, fused.begin() + e, 1);
    }
    const float* kc = k_.data_ptr<float>() + l * S * n_kv_ * T * D;
    const float* vc = v_.data_ptr<float>() + l * S * n_kv_ * T * D;
    const float* pq = q.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const float scale = static_cast<float>(attn_scale_);
    int64_t work = 0;  // cached positions read, over all tokens: short contexts are not worth a thread wake-up
    for (int64_t m = 0; m < M; ++m) work += fused[m] ? 0 : (pos[m] + 1) * n_heads_;
    const int64_t grain = work < 4096 ? M * n_heads_ : 1;
    at::parallel_for(0, M * n_heads_, grain, [&](int64_t w0, int64_t w1) {
      std::vector<float> score;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t m = w / n_heads_, hh = w % n_heads_, n = pos[m] + 1;
        if (fused[m]) continue;
        const float* qr = pq + w * D;
        const float* kr = kc + (slot[m] * n_kv_ + hh / per_kv) * T * D;
        const float* vr = vc + (slot[m] * n_kv_ + hh / per_kv) * T * D;
        score.resize(n);
        float top = -INFINITY;
        for (int64_t t = 0; t < n; ++t) {
          float d = 0.f;
#pragma omp simd reduction(+ : d)
          for (int64_t i = 0; i < D; ++i) d += qr[i] * kr[t * D + i];
          score[t] = d * scale;
          top = std::max(top, score[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < n; ++t) total += (score[t] = std::exp(score[t] - top));
        float* o = po + w * D;
        std::fill(o, o + D, 0.f);
        for (int64_t t = 0; t < n; ++t) {
          const float p = score[t] / total;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) o[i] += p * vr[t * D + i];
        }
      }
    });
    return out;
  }

  int64_t n_heads_, n_kv_, head_dim_;
  double eps_;
  Tensor inv_freq_;
  double rope_scaling_, attn_scale_;
  Linear embed_;
  std::vector<Layer> layers_;
  Tensor final_norm_;
  Linear head_;
  Tensor k_, v_;  // [layers, slots, kv heads, capacity, head_dim]
  Tensor scratch_;  // forward_into's block of logits
};

}  // namespace

// The runtime's classes, added to the kernels' module (qgemm_avx2.cpp) so that one build holds both.
void shrink_kernels::bind_decoder(pybind11::module_& m) {
  py::class_<Linear>(m, "Linear")
      .def(py::init([](Tensor qweight, Tensor scales, Tensor zeros, Tensor weight, Tensor bias, Tensor order,
                       int64_t zero_const, int64_t bits, int64_t group, int64_t in, int64_t out, int64_t large_batch,
                       Tensor tcodes, Tensor tscales, Tensor tzeros) {
             return Linear{qweight, scales, zeros, weight, bias, order, zero_const, bits, group, in, out, large_batch,
                           tcodes, tscales, tzeros};
           }),
           py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("weight"), py::arg("bias"),
           py::arg("order"), py::arg("zero_const"), py::arg("bits"), py::arg("group"), py::arg("in_features"),
           py::arg("out_features"), py::arg("large_batch"), py::arg("tcodes"), py::arg("tscales"), py::arg("tzeros"))
      .def("__call__", &Linear::operator());
  py::class_<Layer>(m, "Layer")
      .def(py::init([](Tensor input_norm, Tensor post_norm, Linear q, Linear k, Linear v, Linear o, Linear gate,
                       Linear up, Linear down) {
        return Layer{input_norm.contiguous(), post_norm.contiguous(), q, k, v, o, gate, up, down};
      }));
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, double, Tensor, double, double, Linear, std::vector<Layer>, Tensor,
                    Linear>())
      .def("reset", &Decoder::reset, "empty the cache, sized for (slots, capacity)")
      .def("capacity", &Decoder::capacity)
      .def("fork", &Decoder::fork, "copy positions 0..length-1 of slot src into slot dst")
      .def("forward", &Decoder::forward, "logits of the tokens `rows` after running tokens (slot, position)",
           py::call_guard<py::gil_scoped_release>())
      .def("forward_into", &Decoder::forward_into,
           "forward, with the logits of tokens `rows` written into rows `out_rows` of `out`",
           py::call_guard<py::gil_scoped_release>());
}
