"""The from-scratch layers and model against torch.nn.functional oracles and gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import model
from kernels import get_ops, reference
from model import ModelConfig, TransformerLM, block_output


def tiny_config(**kw):
    base = dict(vocab_size=61, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    base.update(kw)
    return ModelConfig(**base)


def test_softmax_matches_torch_and_is_stable():
    x = torch.randn(3, 7, dtype=torch.float64) * 1e4
    torch.testing.assert_close(model.softmax(x, -1), torch.softmax(x, -1))
    torch.testing.assert_close(model.softmax(x, 0), torch.softmax(x, 0))


def test_silu_matches_torch():
    x = torch.randn(100, dtype=torch.float64)
    torch.testing.assert_close(model.silu(x), F.silu(x))


def test_sdpa_matches_torch_with_mask_and_leading_dims():
    q, k, v = (torch.randn(2, 3, 5, 7, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(7, 7) > 0.3
    mask[:, 0] = True
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(model.scaled_dot_product_attention(q, k, v, mask), expect)
    torch.testing.assert_close(model.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_cross_entropy_matches_torch_and_is_stable():
    logits = torch.randn(9, 13, dtype=torch.float64) * 1e4
    targets = torch.randint(0, 13, (9,))
    torch.testing.assert_close(model.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    logits3 = torch.randn(2, 4, 13, dtype=torch.float64)
    t3 = torch.randint(0, 13, (2, 4))
    torch.testing.assert_close(model.cross_entropy(logits3, t3), F.cross_entropy(logits3.view(-1, 13), t3.view(-1)))


def test_cross_entropy_ignore_index():
    logits = torch.randn(6, 5, dtype=torch.float64)
    targets = torch.tensor([1, -100, 3, -100, 0, 4])
    torch.testing.assert_close(model.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    all_ignored = torch.full((6,), -100)
    lg = logits.clone().requires_grad_()
    loss = model.cross_entropy(lg, all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(lg.grad == 0)


def test_linear_and_embedding():
    lin = model.Linear(7, 5)
    assert lin.weight.shape == (5, 7)
    std = (2 / 12) ** 0.5
    assert lin.weight.abs().max() <= 3 * std + 1e-6
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight))
    emb = model.Embedding(11, 4)
    ids = torch.tensor([[0, 10, 3]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))


def test_rmsnorm_matches_torch_and_keeps_dtype():
    norm = model.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (24,), norm.weight, eps=1e-5))
    xb = x.bfloat16()
    assert norm(xb).dtype == torch.bfloat16


def test_swiglu_layer():
    ffn = model.SwiGLU(16, 40)
    x = torch.randn(2, 3, 16)
    expect = F.linear(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight), ffn.w2.weight)
    torch.testing.assert_close(ffn(x), expect)


def _rope_oracle(x, pos, theta):
    # Complex-number formulation: pair (2i, 2i+1) is one complex number, multiplied by e^{i p w_i}.
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.to(torch.float64)[..., None] * freqs
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


def test_rope_matches_complex_oracle_with_arbitrary_positions():
    rope = model.RotaryPositionalEmbedding(10000.0, 16, 64)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pos = torch.randint(0, 5000, (2, 9))
    torch.testing.assert_close(rope(x, pos), _rope_oracle(x, pos, 10000.0))
    assert len(rope.state_dict()) == 0


def test_mhsa_matches_torch_sdpa():
    torch.manual_seed(0)
    attn = model.MultiHeadSelfAttention(32, 4, max_seq_len=16, theta=10000.0).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    pos = torch.arange(11)

    def oracle(x):
        b, t, _ = x.shape
        q = F.linear(x, attn.q_proj.weight).view(b, t, 4, 8)
        k = F.linear(x, attn.k_proj.weight).view(b, t, 4, 8)
        v = F.linear(x, attn.v_proj.weight).view(b, t, 4, 8).transpose(1, 2)
        q = _rope_oracle(q.transpose(1, 2), pos, 10000.0)
        k = _rope_oracle(k.transpose(1, 2), pos, 10000.0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(b, t, 32), attn.output_proj.weight)

    torch.testing.assert_close(attn(x, pos), oracle(x))
    torch.testing.assert_close(attn(x), oracle(x))


@pytest.mark.parametrize(
    "fn,args",
    [
        ("rms_norm", lambda: (torch.randn(3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), 1e-5)),
        ("swiglu", lambda: (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64))),
        ("rope", lambda: (torch.randn(2, 3, 8, dtype=torch.float64), torch.tensor([0, 5, 9]), 100.0)),
        ("attention", lambda: tuple(torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))),
        ("cross_entropy", lambda: (torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 6, 3, -100, 2]))),
        (
            "linear_cross_entropy",
            lambda: (
                torch.randn(5, 4, dtype=torch.float64),
                torch.randn(7, 4, dtype=torch.float64),
                torch.tensor([0, 6, 3, 1, 2]),
            ),
        ),
    ],
)
def test_reference_ops_gradcheck(fn, args):
    a = args()
    inputs = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in a)
    assert torch.autograd.gradcheck(lambda *xs: getattr(reference, fn)(*xs), inputs)


def test_state_dict_keys_are_the_handouts():
    m = TransformerLM(tiny_config(num_layers=1))
    expect = {
        "token_embeddings.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.output_proj.weight",
        "layers.0.ln1.weight",
        "layers.0.ln2.weight",
        "layers.0.ffn.w1.weight",
        "layers.0.ffn.w2.weight",
        "layers.0.ffn.w3.weight",
        "ln_final.weight",
        "lm_head.weight",
    }
    assert set(m.state_dict()) == expect


def test_model_loss_equals_cross_entropy_of_logits():
    torch.manual_seed(0)
    m = TransformerLM(tiny_config())
    x = torch.randint(0, 61, (3, 16))
    y = torch.randint(0, 61, (3, 16))
    logits = m(x)
    assert logits.shape == (3, 16, 61)
    torch.testing.assert_close(m.loss(x, y), F.cross_entropy(logits.view(-1, 61), y.view(-1)))


@pytest.mark.parametrize(
    "ablation",
    [dict(use_rmsnorm=False), dict(post_norm=True), dict(use_rope=False), dict(ffn="silu", d_ff=128)],
)
def test_ablations_build_and_run(ablation):
    m = TransformerLM(tiny_config(**ablation))
    x = torch.randint(0, 61, (2, 8))
    loss = m.loss(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("ablation", [{}, dict(use_rmsnorm=False)])
def test_blocks_with_deferred_adds_equal_the_plain_stack(ablation):
    # The model hands each block's last residual add to the next norm; the result must be the
    # plain x -> block(x) -> ... -> ln_final stack's, bit for bit on the torch backend.
    torch.manual_seed(0)
    m = TransformerLM(tiny_config(num_layers=3, **ablation))
    x = torch.randint(0, 61, (2, 8))
    h = m.token_embeddings(x)
    for layer in m.layers:
        h = block_output(layer(h))
    assert torch.equal(m.hidden_states(x), m.ln_final(h))
    block = m.layers[0]
    e = m.token_embeddings(x)
    out, f = block(e)
    assert torch.equal(out + f, block_output(block(e)))
    assert torch.equal(block_output(block(e, pending=f)), block_output(block(e + f)))


def test_post_norm_blocks_refuse_deferred_adds():
    block = TransformerLM(tiny_config(post_norm=True)).layers[0]
    out, f = block(torch.randn(1, 4, 32))
    assert f is None and out.shape == (1, 4, 32)  # the same (h, f) shape; nothing deferred
    with pytest.raises(ValueError, match="post-norm"):
        block(torch.randn(1, 4, 32), pending=torch.randn(1, 4, 32))


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    m = TransformerLM(tiny_config())
    x = torch.randint(0, 61, (1, 12))
    x2 = x.clone()
    x2[0, 8:] = (x2[0, 8:] + 1) % 61
    torch.testing.assert_close(m(x)[0, :8], m(x2)[0, :8])
    assert not torch.allclose(m(x)[0, 8:], m(x2)[0, 8:])


def test_tiny_model_overfits_one_batch():
    from train import AdamW

    torch.manual_seed(0)
    m = TransformerLM(tiny_config())
    opt = AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.randint(0, 61, (4, 16))
    y = torch.randint(0, 61, (4, 16))
    for _ in range(150):
        opt.zero_grad()
        loss = m.loss(x, y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(d_model=30, num_heads=4), "divisible"),
        (dict(d_model=36, num_heads=12), "even head dimension"),
        (dict(vocab_size=0), "positive"),
        (dict(num_layers=-1), "positive"),
        (dict(ffn="relu"), "ffn"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**kw)


def test_bad_token_ids_and_lengths():
    m = TransformerLM(tiny_config())
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        m(torch.tensor([[0, 61]]))
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="context_length"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="torch, triton"):
        get_ops("cuda-magic")
    with pytest.raises(ValueError, match="torch, triton"):
        TransformerLM(tiny_config(), kernels="jax")


def _casts_in(fn) -> int:
    from bench.op_count import dispatched_ops

    def activation_cast(func, args, kwargs):
        # fp32 -> fp16 casts of (B, T, width) activations (weights are 2-D, heads 4-D)
        return (
            func is torch.ops.aten._to_copy.default
            and args[0].dim() == 3
            and args[0].dtype == torch.float32
            and kwargs.get("dtype") == torch.float16
        )

    with dispatched_ops(activation_cast) as casts:
        out = fn()
    return len(casts), out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_pre_norm_writes_its_output_in_the_matmul_dtype(kernels):
    # A pre-norm norm's output feeds one matmul (q, k and v packed; w1 and w3 packed; the head).
    # feeds_matmul makes the norm write it in the autocast dtype: the triton kernel stores fp16
    # itself, where otherwise autocast would cast the fp32 output (one cast per norm: 2 per layer
    # and the final norm); the torch backend casts inside the norm instead. Same values either way.
    torch.manual_seed(0)
    m = TransformerLM(tiny_config(), kernels=kernels)
    x = torch.randint(0, 61, (2, 16))
    counts, logits = {}, {}
    for on in (True, False):
        for mod in m.modules():
            if isinstance(mod, model.RMSNorm):
                mod.feeds_matmul = on
        with torch.autocast("cpu", dtype=torch.float16):  # fp16: the interpreter's bf16 dot is wrong
            counts[on], logits[on] = _casts_in(lambda: m(x))
    saved = 2 * m.config.num_layers + 1 if kernels == "triton" else 0
    assert counts[False] - counts[True] == saved, counts
    torch.testing.assert_close(logits[True], logits[False], atol=0, rtol=0)
    post = TransformerLM(tiny_config(post_norm=True), kernels="torch")
    assert not any(mod.feeds_matmul for mod in post.modules() if isinstance(mod, model.RMSNorm))
