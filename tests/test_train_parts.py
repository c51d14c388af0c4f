"""AdamW, the cosine schedule, clipping, batches, checkpoints and decoding."""

import io

import numpy as np
import pytest
import torch

from model import ModelConfig, TransformerLM
from train import (
    AdamW,
    clip_grad_norm,
    get_batch,
    get_lr_cosine_schedule,
    load_checkpoint,
    save_checkpoint,
)
from train.decoding import generate


def test_adamw_matches_torch_adamw_over_steps():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = AdamW([p1], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(5, 4)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(p1, p2)


def test_adamw_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(1))]
    for kw in (dict(lr=-1), dict(betas=(1.0, 0.9)), dict(eps=-1), dict(weight_decay=-0.1)):
        with pytest.raises(ValueError):
            AdamW(p, **kw)


def test_cosine_schedule_break_points():
    kw = dict(max_learning_rate=1.0, min_learning_rate=0.1, warmup_iters=10, cosine_cycle_iters=110)
    assert get_lr_cosine_schedule(0, **kw) == 0.0
    assert get_lr_cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert get_lr_cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert get_lr_cosine_schedule(60, **kw) == pytest.approx(0.55)
    assert get_lr_cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert get_lr_cosine_schedule(500, **kw) == pytest.approx(0.1)


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    for x, y in zip(a, b):
        g = torch.randn_like(x) * 10
        x.grad, y.grad = g.clone(), g.clone()
    total = clip_grad_norm(a, 1.0)
    ref_total = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(total, ref_total)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)
    # Below the threshold nothing changes.
    small = [torch.nn.Parameter(torch.zeros(2))]
    small[0].grad = torch.tensor([0.1, 0.1])
    clip_grad_norm(small, 1.0)
    torch.testing.assert_close(small[0].grad, torch.tensor([0.1, 0.1]))


def test_get_batch_windows_and_errors():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 8, 10, "cpu", np.random.default_rng(0))
    assert x.shape == y.shape == (8, 10) and x.dtype == torch.long
    torch.testing.assert_close(y, x + 1)
    assert int(x.max()) <= 98
    with pytest.raises(ValueError, match="at least 11"):
        get_batch(np.arange(10), 2, 10, "cpu")
    with pytest.raises(TypeError):
        get_batch(np.zeros(100, dtype=np.float32), 2, 4, "cpu")


def test_get_batch_from_memmap(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, y = get_batch(mm, 4, 32, "cpu")
    torch.testing.assert_close(y, x + 1)


def _cfg(**kw):
    base = dict(vocab_size=50, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    base.update(kw)
    return ModelConfig(**base)


def _train_steps(m, opt, data, steps, seed):
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        x, y = get_batch(data, 4, 16, "cpu", rng)
        opt.zero_grad()
        loss = m.loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpoint_round_trip_gives_bit_identical_losses(tmp_path):
    torch.manual_seed(0)
    data = np.random.default_rng(1).integers(0, 50, 2000)
    m = TransformerLM(_cfg())
    opt = AdamW(m.parameters(), lr=3e-3)
    _train_steps(m, opt, data, 3, seed=0)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(m, opt, 3, path)
    expect = _train_steps(m, opt, data, 3, seed=7)

    m2 = TransformerLM(_cfg())
    opt2 = AdamW(m2.parameters(), lr=3e-3)
    assert load_checkpoint(path, m2, opt2) == 3
    assert _train_steps(m2, opt2, data, 3, seed=7) == expect


def test_checkpoint_to_file_object():
    m = TransformerLM(_cfg())
    buf = io.BytesIO()
    save_checkpoint(m, None, 5, buf)
    buf.seek(0)
    assert load_checkpoint(buf, TransformerLM(_cfg())) == 5


def test_checkpoint_from_other_config_names_keys_and_shapes(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(TransformerLM(_cfg()), None, 1, path)
    with pytest.raises(ValueError, match=r"token_embeddings.weight: checkpoint \(50, 32\) vs model \(60, 32\)"):
        load_checkpoint(path, TransformerLM(_cfg(vocab_size=60)))
    with pytest.raises(ValueError, match="unexpected keys.*layers.1"):
        load_checkpoint(path, TransformerLM(_cfg(num_layers=1)))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pt", TransformerLM(_cfg()))


def test_generate_stops_and_batches():
    torch.manual_seed(0)
    m = TransformerLM(_cfg())
    out = generate(m, [[1, 2, 3], [4]], max_new_tokens=5, temperature=0.0)
    assert [len(o) for o in out] == [5, 5]
    # Greedy decoding of a batch equals decoding each prompt alone.
    assert out[1] == generate(m, [[4]], max_new_tokens=5, temperature=0.0)[0]
    first = out[0][0]
    stopped = generate(m, [[1, 2, 3]], max_new_tokens=5, temperature=0.0, stop_token=first)
    assert stopped == [[first]]
    # Longer than the context: cropped, not an error.
    long = generate(m, [list(range(40))], max_new_tokens=3, temperature=0.8, top_p=0.9)
    assert len(long[0]) == 3 and all(0 <= t < 50 for t in long[0])


def test_adamw_low_precision_parameters_track_fp32():
    torch.manual_seed(0)
    p32 = torch.nn.Parameter(torch.randn(64))
    p16 = torch.nn.Parameter(p32.detach().bfloat16())
    o32, o16 = AdamW([p32], lr=1e-2), AdamW([p16], lr=1e-2)
    for _ in range(5):
        g = torch.randn(64)
        p32.grad, p16.grad = g.clone(), g.bfloat16()
        o32.step()
        o16.step()
    assert p16.dtype == torch.bfloat16 and o16.state[p16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32.detach(), atol=2e-2, rtol=2e-2)


def test_kv_cache_matches_full_forward_and_cropping():
    torch.manual_seed(0)
    m = TransformerLM(_cfg()).eval()
    x = torch.randint(0, 50, (2, 12))
    cache = m.new_kv_cache(2)
    parts = [m(x[:, :5], kv_cache=cache), m(x[:, 5:6], kv_cache=cache), m(x[:, 6:], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed context_length"):
        m(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)
    # Greedy decoding with the cache equals decoding without it, also past the context (16).
    prompts = [[1, 2, 3], [4, 5, 6], [7], list(range(20))]
    with_cache = generate(m, prompts, max_new_tokens=20, temperature=0.0)
    without = generate(m, prompts, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert with_cache == without and all(len(o) == 20 for o in with_cache)
