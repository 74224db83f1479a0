"""Mixed precision and gradient checkpointing (nbs/06a_core.precision.ipynb, nbs/60_training.step.ipynb): a bf16 step
against fp32 on a tiny model, checkpointing against none, fp16 with its scaler, the flags, and `laps bench --train`."""
import copy, json
import pytest
import torch
from laps.core.config import LapsConfig
from laps.core.precision import autocast, grad_scaler
from laps.model.encoders import backbone_config
from laps.model.modeling import LAPSModel
from laps.training.runner import configure_compute
from laps.training.step import training_step
from test_cli import _laps, _one_error_line

# A tiny improved model: [CLS] globals, text token selection, `attn` similarity: every part of the engine runs.
TINY = dict(vision_backbone='laps/tiny-vit', bert_path='laps/tiny-bert', vision_pretrained=False, text_pretrained=False,
            img_res=32, num_patches=16, embed_size=16, use_cls_as_glob_embd=1, use_token_selection=1,
            token_selection_ratio=0.8, similarity_calc_method='attn', grad_clip=1e6, max_violation=True, device='cpu')


def _batch(B=6, L=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (B, L), generator=g)
    for i, n in enumerate(torch.randint(4, L + 1, (B,), generator=g).tolist()): ids[i, n:] = 0
    return dict(images=torch.randn(B, 3, 32, 32, generator=g), input_ids=ids, img_ids=torch.arange(B))


def _model(dropout: bool = True, **changes):
    "The tiny model of TINY + `changes` (seed 0), its precision and checkpointing applied; without dropout if asked."
    cfg = LapsConfig(**{**TINY, **changes})
    torch.manual_seed(0)
    backbones = [backbone_config(name) for name in (cfg.vision_backbone, cfg.bert_path)]
    if not dropout:                                                       # so that two precisions' steps compare
        for c in backbones: c.hidden_dropout_prob = c.attention_probs_dropout_prob = 0.0
    return configure_compute(LAPSModel(cfg.model, *backbones), cfg, 'cpu'), cfg


def _step(model, cfg, batch, scaler=None):
    "One training step with a zero learning rate: -> (logs, flat gradient); the weights do not move."
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    torch.manual_seed(0)
    logs = training_step(model, batch, opt, cfg, epoch=1, step=0, steps_per_epoch=1, scaler=scaler)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logs, grads


def test_bf16_step_close_to_fp32():
    "Loss within 1%, the gradient's direction within cosine 0.99 and norm within 5%, on the same weights and batch."
    batch = _batch()
    m32, c32 = _model(dropout=False)
    m16, c16 = copy.deepcopy(m32), c32.replace(precision='bf16')
    configure_compute(m16, c16, 'cpu')
    (l32, g32), (l16, g16) = _step(m32, c32, batch), _step(m16, c16, batch)
    assert l32['loss'] > 0
    assert abs(l16['loss'] - l32['loss']) <= 0.01 * l32['loss'], (l16['loss'], l32['loss'])
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert abs(g16.norm() / g32.norm() - 1) < 0.05


def test_bf16_keeps_the_same_patches():
    "LPS's top-K under bf16 autocast (scores computed in the fp32 island) picks what fp32 picks for at least 95% of patches."
    batch = _batch(B=8)
    model, cfg = _model(dropout=False)
    model.train()
    with torch.no_grad():
        out32 = model.train_forward(batch['images'], batch['input_ids'])
        with autocast('bf16'): out16 = model.train_forward(batch['images'], batch['input_ids'])
    assert out16['sims'].dtype == torch.float32 and out16['score_mask'].dtype == torch.float32
    agree = (out16['score_mask'] == out32['score_mask']).float().mean().item()
    assert agree >= 0.95, agree
    assert out16['score_mask'].sum(-1).eq(out32['score_mask'].sum(-1)).all()   # K kept in every pair


def test_grad_checkpointing_same_loss_and_gradients():
    "Both backbones recompute their layers (dropout on: the recomputation replays the same masks): equal loss and gradients."
    batch = _batch()
    plain, cfg = _model()
    ckpt, ccfg = copy.deepcopy(plain), cfg.replace(grad_checkpointing=1)
    configure_compute(ckpt, ccfg, 'cpu')
    for bb in (ckpt.img_enc.backbone, ckpt.txt_enc.backbone):
        assert getattr(bb, 'is_activation_checkpointing', None) or getattr(bb, 'is_gradient_checkpointing')
    (l0, g0), (l1, g1) = _step(plain, cfg, batch), _step(ckpt, ccfg, batch)
    assert l0['loss'] == pytest.approx(l1['loss'], rel=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)


def test_fp16_step_with_scaler_on_cpu():
    """fp16 runs on CPU with a gradient scaler: steps whose scaled gradients overflow are skipped while the scale falls
    (from 2^16), then the weights move; every loss is finite."""
    batch = _batch()
    model, cfg = _model(precision='fp16')
    scaler = grad_scaler('fp16', 'cpu')
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(20):
        logs = training_step(model, batch, opt, cfg, epoch=1, step=step, steps_per_epoch=20, scaler=scaler)
        assert torch.isfinite(torch.tensor(logs['loss']))
        if any(not torch.equal(a, b) for a, b in zip(before, model.parameters())): break
    else: raise AssertionError(f"no fp16 step was taken in 20 (scale {scaler.get_scale()})")
    assert 1 <= scaler.get_scale() <= 2.0 ** 16


def test_precision_flag_errors():
    _one_error_line(_laps('train', '--precision', 'fp8'), "precision must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'")
    _one_error_line(_laps('train', '--grad_checkpointing', '2'), 'grad_checkpointing must be 0 or 1')
    _one_error_line(_laps('eval', 'runs/x', '--precision', 'half'), "invalid choice: 'half'")
    _one_error_line(_laps('index', 'runs/x', '--images', 'd', '--out', 'i', '--precision', 'half'), "invalid choice: 'half'")


def test_train_bench_cli_tiny():
    "`laps bench --train` on the cpu preset at batch 2 and 4, fp32 and bf16, each combination in its own process."
    out = _laps('bench', '--train', '--preset', 'cpu', '--batches', '2', '4', '--precisions', 'fp32', 'bf16',
                '--grad-checkpointing', '0', '1', '--steps', '1', '--warmup', '0', '--threads', '1', '--json')
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    rows = res['rows']
    assert [(r['batch'], r['precision'], r['grad_checkpointing']) for r in rows] == [
        (b, p, c) for b in (2, 4) for p in ('fp32', 'bf16') for c in (0, 1)]
    assert all(r['seconds'] > 0 and r['peak_mb'] > r['model_mb'] > 0 for r in rows)
    assert [r['speedup'] for r in rows if r['precision'] == 'fp32' and not r['grad_checkpointing']] == [1.0, 1.0]
    assert res['memory'].startswith('process peak RSS') and 'fresh process' in res['memory']
    assert set(res['largest_batch_estimate']) == {'fp32/ckpt0', 'fp32/ckpt1', 'bf16/ckpt0', 'bf16/ckpt1'}


def test_train_bench_mode_errors():
    _one_error_line(_laps('bench', '--batches', '4'), '--batches: only with --train')
    _one_error_line(_laps('bench', '--train', '--quick'), '--quick: not with --train')
    _one_error_line(_laps('bench', '--train', '--index', 'runs/x'), 'one benchmark at a time')
