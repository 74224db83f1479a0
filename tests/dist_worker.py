"""Worker of tests/test_distributed.py, launched by `torchrun --standalone --nproc_per_node 2` (gloo, CPU).

`python dist_worker.py MODE OUT`: each rank first computes the single-process reference (before joining
the process group), then the same thing with 2 ranks, and writes what it measured to OUT/MODE_rank{R}.json.
  step: two training steps of DDP(GatherForward) on half-batches vs one process on the whole batch;
  eval: the sharded similarity matrix vs the single-process one.
"""
import json, sys
from pathlib import Path
import torch
from torch.utils.data import DataLoader
from laps.core.config import LapsConfig
from laps.model.encoders import backbone_config
from laps.model.modeling import LAPSModel
from laps.data.loaders import collate
from laps.core.distributed import init_distributed, cleanup_distributed, barrier, wrap_ddp, is_distributed
from laps.training.step import training_step
from laps.eval.evaluate import score_split

TINY = dict(embed_size=16, img_res=32, num_patches=16, engine='reference', grad_clip=1e6, max_violation=True)
IMPROVED = dict(use_cls_as_glob_embd=1, use_token_selection=1, token_selection_ratio=0.8, similarity_calc_method='attn',
                use_learnable_temp=0)
CONFIGS = {'paper': LapsConfig(**TINY),
           'improved': LapsConfig(**TINY, **IMPROVED),
           'improved_fast': LapsConfig(**{**TINY, 'engine': 'fast'}, **IMPROVED),
           'improved_global_head': LapsConfig(**{**TINY, 'engine': 'fast', 'glob_loss_weight': 0.5}, **IMPROVED)}


def tiny_model(cfg: LapsConfig) -> LAPSModel:
    "The same tiny model on every rank and in the reference (seeded; dropout off so the forward is deterministic)."
    torch.manual_seed(0)
    vit, bert = backbone_config('laps/tiny-vit'), backbone_config('laps/tiny-bert')
    for config in (vit, bert): config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return LAPSModel(cfg, vit, bert)


def caption_ids(lengths, seed):
    "0-padded ids `[CLS]=2 ... [SEP]=3` with the given lengths (B, max(lengths))."
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for k, n in enumerate(lengths):
        ids[k, :n] = torch.randint(4, 60, (n,), generator=g)
        ids[k, 0], ids[k, n - 1] = 2, 3
    return ids


def batches():
    "Two batches of 8 pairs. Halves (ranks) differ in caption length; images 0 and 2 sit on both ranks."
    g = torch.Generator().manual_seed(1)
    out = []
    for seed, lengths in ((2, [5, 6, 3, 4, 9, 7, 5, 8]), (3, [4, 4, 6, 3, 5, 10, 7, 6])):
        ids = caption_ids(lengths, seed)
        out.append(dict(images=torch.randn(8, 3, 32, 32, generator=g), input_ids=ids,
                        img_ids=torch.tensor([0, 1, 2, 3, 2, 5, 6, 0])))
    return out


def half(batch, rank):
    "Rank's half of a batch, trimmed to its own longest caption (as its loader would pad it)."
    sl = slice(4 * rank, 4 * rank + 4)
    ids = batch['input_ids'][sl]
    return dict(images=batch['images'][sl], input_ids=ids[:, :int((ids != 0).sum(1).max())], img_ids=batch['img_ids'][sl])


STEPS = (dict(epoch=0, step=5, steps_per_epoch=10),   # sum over negatives, loss warm-up factor 0.5
         dict(epoch=1, step=0, steps_per_epoch=10))   # hardest negatives


def run_steps(net, model, batch_list, cfg, rank=None):
    "Two SGD training steps; per step the loss and every parameter's gradient (before the update)."
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for b, kw in zip(batch_list, STEPS):
        logs = training_step(net, b if rank is None else half(b, rank), opt, cfg, **kw)
        out.append((logs, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}))
    return out, {n: p.detach().clone() for n, p in model.named_parameters()}


def mode_step():
    ref = {}
    for name, cfg in CONFIGS.items():
        model = tiny_model(cfg)
        ref[name] = run_steps(model, model, batches(), cfg)
    info = init_distributed(True, 'cpu')
    assert is_distributed() and info.world_size == 2
    res = {}
    for name, cfg in CONFIGS.items():
        model = tiny_model(cfg)
        (steps, params), (ref_steps, ref_params) = run_steps(wrap_ddp(model, info), model, batches(), cfg, info.rank), ref[name]
        r = dict(loss=[], ref_loss=[], max_grad_diff=[], max_grad=[], grads_none_match=[], attn_mat_grad_norm=[])
        for (logs, grads), (ref_logs, ref_grads) in zip(steps, ref_steps):
            r['loss'].append(logs['loss']); r['ref_loss'].append(ref_logs['loss'])
            r['attn_mat_grad_norm'].append(logs['attn_mat_grad_norm'])
            r['grads_none_match'].append(all((grads[n] is None) == (ref_grads[n] is None) for n in grads))
            diffs = [float((grads[n] - ref_grads[n]).abs().max()) for n in grads if grads[n] is not None and ref_grads[n] is not None]
            r['max_grad_diff'].append(max(diffs))
            r['max_grad'].append(max(float(g.abs().max()) for g in grads.values() if g is not None))
        r['max_param_diff'] = max(float((params[n] - ref_params[n]).abs().max()) for n in params)
        r['n_params_with_grad'] = sum(g is not None for g in steps[0][1].values())
        res[name] = r
    return info, res


def eval_loaders(n_images, n_captions, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    images = [dict(image=torch.randn(3, 32, 32, generator=g)) for _ in range(n_images)]
    lengths = torch.randint(3, 12, (n_captions,), generator=g).tolist()
    ids = caption_ids(lengths, seed)
    captions = [dict(input_ids=ids[k, :n]) for k, n in enumerate(lengths)]
    return (DataLoader(images, batch_size=batch_size, collate_fn=collate),
            DataLoader(captions, batch_size=batch_size, collate_fn=collate))


EVAL_CASES = {'improved_7x13': ('improved', 7, 13, 3, 4),   # config, images, captions, batch size, shard size
              'improved_fast_7x13': ('improved_fast', 7, 13, 3, 4),
              'paper_2x4_empty_shard': ('paper', 2, 4, 3, 2)}  # rank 1 gets no image


def mode_eval():
    models = {name: tiny_model(cfg).eval() for name, cfg in CONFIGS.items()}
    ref = {case: score_split(models[c], *eval_loaders(ni, nc, bs, 5), shard, progress=False)
           for case, (c, ni, nc, bs, shard) in EVAL_CASES.items()}
    info = init_distributed(True, 'cpu')
    assert is_distributed()
    res = {}
    for case, (c, ni, nc, bs, shard) in EVAL_CASES.items():
        sims = score_split(models[c], *eval_loaders(ni, nc, bs, 5), shard, progress=False)
        res[case] = dict(shape=list(sims.shape), ref_shape=list(ref[case].shape), equal=bool(torch.equal(sims, ref[case])),
                         max_diff=float((sims - ref[case]).abs().max()))
    return info, res


if __name__ == '__main__':
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    info, res = {'step': mode_step, 'eval': mode_eval}[mode]()
    (out / f'{mode}_rank{info.rank}.json').write_text(json.dumps(res))
    barrier(info)
    cleanup_distributed(info)
