"""Sweep every model configuration at tiny size: shapes, finiteness, where gradients go."""
import itertools
import pytest
import torch
from laps import LapsConfig, LAPSModel, CrossNet, hinge_triplet_loss, ratio_loss
from laps.core.registry import SIMILARITY_METHODS
import extra_similarity


def _combos():
    "(method, use_cls, tok_sel, learn_temp, strategy) for every registered method; flags only where they matter."
    for method, use_cls, tok_sel, strategy in itertools.product(SIMILARITY_METHODS.names(), [0, 1], [0, 1], ['ratio', 'score']):
        if tok_sel or strategy == 'ratio':                                  # strategy only matters with selection
            for learn_temp in ([0, 1] if 'use_learnable_temp' in SIMILARITY_METHODS.get(method).config_fields else [0]):
                yield method, use_cls, tok_sel, learn_temp, strategy


with extra_similarity.registered():                                       # a method only these tests know is swept too
    COMBOS = list(_combos())


@pytest.fixture(autouse=True, scope='module')
def _extra_method_registered():
    with extra_similarity.registered(): yield


def _method_owned(name: str, method: str) -> bool:
    "Is `cross_net.`-relative key `name` a parameter of the similarity method?"
    return any(name == k or (k.endswith('.') and name.startswith(k)) for k in SIMILARITY_METHODS.get(method).param_names)


def _ids():
    return torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0], [2, 8, 8, 4, 6, 3]])


@pytest.mark.parametrize('method,use_cls,tok_sel,learn_temp,strategy', COMBOS)
@pytest.mark.parametrize('vision', ['tiny_vit', 'tiny_swin'])
def test_every_configuration_trains(vision, method, use_cls, tok_sel, learn_temp, strategy, tiny_bert, request):
    vis = request.getfixturevalue(vision)
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, similarity_calc_method=method,
                     use_cls_as_glob_embd=use_cls, use_token_selection=tok_sel, token_selection_strategy=strategy,
                     token_selection_ratio=0.6, use_learnable_temp=learn_temp, vit_type='vit' if vision == 'tiny_vit' else 'swin')
    model = LAPSModel(cfg, vision_backbone=vis, text_backbone=tiny_bert).train()
    sims, score_mask = model(torch.randn(3, 3, 32, 32), _ids())
    slims = SIMILARITY_METHODS.get(method).slims_patches
    assert sims.shape == (3, 3) and torch.isfinite(sims).all()
    if slims:
        assert score_mask.shape == (3, 3, 16) and score_mask.sum(-1).eq(8).all()   # K = ceil(16 * 0.5)
    else: assert score_mask is None                                        # a baseline selects nothing
    loss = hinge_triplet_loss(sims) + (ratio_loss(score_mask, cfg.sparse_ratio) if slims else 0)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if slims: assert grads['cross_net.aggr_net.weight.3.weight'].abs().sum() > 0
    else: assert not any(n.startswith(('cross_net.aggr_net.', 'cross_net.tok_select_net.')) for n in grads)
    assert grads['img_enc.vision_proj.weight'].abs().sum() > 0
    assert grads['txt_enc.fc.weight'] is not None or isinstance(model.txt_enc.fc, torch.nn.Identity)
    owned = {n: p for n, p in model.cross_net.named_parameters() if _method_owned(n, method)}
    assert bool(owned) == bool(SIMILARITY_METHODS.get(method).param_names)
    for n, p in owned.items():                                            # every parameter of the method learns,
        g = grads[f'cross_net.{n}']                                       # unless it is fixed (attn's temp by default)
        assert (g is not None and g.abs().sum() > 0) if p.requires_grad else g is None, n
    if tok_sel and slims:
        assert grads['cross_net.tok_select_net.attn_mat.weight'] is None   # the released quirk
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(torch.zeros(2, 3, 32, 32), _ids()[:2]), model(torch.zeros(2, 3, 32, 32), _ids()[:2]))


def test_trainable_token_selection_learns(tiny_vit, tiny_bert):
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, use_token_selection=1, token_selection_ratio=0.5,
                     token_selection_trainable=1)
    model = LAPSModel(cfg, vision_backbone=tiny_vit, text_backbone=tiny_bert).train()
    sims, _ = model(torch.randn(3, 3, 32, 32), _ids())
    hinge_triplet_loss(sims).backward()
    assert model.cross_net.tok_select_net.attn_mat.weight.grad.abs().sum() > 0


PUBLISHED_CROSS_NET_KEYS = {                                                # the published keys: released checkpoints depend on these
    'paper': ['aggr_net.scale', 'aggr_net.weight.0.bias', 'aggr_net.weight.0.weight', 'aggr_net.weight.1.bias',
              'aggr_net.weight.1.weight', 'aggr_net.weight.3.bias', 'aggr_net.weight.3.weight'],
    'improved': ['aggr_net.scale', 'aggr_net.weight.0.bias', 'aggr_net.weight.0.weight', 'aggr_net.weight.1.bias',
                 'aggr_net.weight.1.weight', 'aggr_net.weight.3.bias', 'aggr_net.weight.3.weight', 'i2t_attn_mat.bias',
                 'i2t_attn_mat.weight', 't2i_attn_mat.bias', 't2i_attn_mat.weight', 'temp', 'tok_select_net.attn_mat.bias',
                 'tok_select_net.attn_mat.weight'],
}


@pytest.mark.parametrize('preset', ['paper', 'improved'])
def test_state_dict_keys_are_the_published_ones(preset, tiny_vit, tiny_bert):
    from laps import get_config
    cfg = get_config(preset, embed_size=16, img_res=32, num_patches=16)
    model = LAPSModel(cfg, vision_backbone=tiny_vit, text_backbone=tiny_bert)
    keys = sorted(k[len('cross_net.'):] for k in model.state_dict() if k.startswith('cross_net.'))
    assert keys == PUBLISHED_CROSS_NET_KEYS[preset]
    order = [n[len('cross_net.'):] for n, _ in model.named_parameters() if n.startswith('cross_net.')]
    assert order == (['temp'] if preset == 'improved' else []) + [      # parameter order too, as before (optimiser state)
        'aggr_net.scale', 'aggr_net.weight.0.weight', 'aggr_net.weight.0.bias', 'aggr_net.weight.1.weight',
        'aggr_net.weight.1.bias', 'aggr_net.weight.3.weight', 'aggr_net.weight.3.bias'] + ([
        'tok_select_net.attn_mat.weight', 'tok_select_net.attn_mat.bias', 'i2t_attn_mat.weight', 'i2t_attn_mat.bias',
        't2i_attn_mat.weight', 't2i_attn_mat.bias'] if preset == 'improved' else [])
    sd = model.state_dict()
    model.load_state_dict(sd)                                             # and they load back, also by assignment
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    if preset == 'improved':
        assert model.cross_net.method_params['temp'] is model.cross_net.temp
        assert model.cross_net.method_params['i2t_attn_mat'] is model.cross_net.i2t_attn_mat


@pytest.mark.parametrize('method', ['max', 'attn', 'thres', 'global', 'dense'])
def test_method_keys_and_legacy_defaults(method):
    "Each built-in method owns exactly its published keys; `attn` with a fixed temperature may omit `temp`."
    cls = SIMILARITY_METHODS.get(method)
    net = CrossNet(LapsConfig(embed_size=8, similarity_calc_method=method))
    own = sorted(k for k in net.state_dict() if not k.startswith(('aggr_net.', 'tok_select_net.')))
    assert own == {'max': [], 'thres': [], 'global': [], 'dense': [],
                   'attn': ['i2t_attn_mat.bias', 'i2t_attn_mat.weight', 't2i_attn_mat.bias', 't2i_attn_mat.weight', 'temp']}[method]
    assert all(_method_owned(k, method) for k in own)
    fixed, learnable = (cls.legacy_defaults(LapsConfig(similarity_calc_method=method, use_learnable_temp=t)) for t in (0, 1))
    assert learnable == {}
    if method == 'attn':
        assert list(fixed) == ['temp'] and torch.equal(fixed['temp'], torch.ones(1, 1, 1))
        assert torch.equal(net.state_dict()['temp'], fixed['temp'])       # the value a fresh fixed-temp model has
    else: assert fixed == {}


BASELINES = [m for m in SIMILARITY_METHODS.names() if not SIMILARITY_METHODS.get(m).slims_patches]


def test_the_baselines_are_registered():
    assert set(BASELINES) == {'global', 'dense'}


@pytest.mark.parametrize('method', BASELINES)
@pytest.mark.parametrize('vision', ['tiny_vit', 'tiny_swin'])
def test_baseline_save_load_from_pretrained_round_trip(method, vision, tiny_bert, tmp_path, request):
    "A baseline's state dict has no aggr_net / tok_select_net keys, and it loads back by every route."
    from laps.model.state_dicts import describe_state_dict
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, similarity_calc_method=method, use_token_selection=1,
                     vit_type='vit' if vision == 'tiny_vit' else 'swin')
    model = LAPSModel(cfg, vision_backbone=request.getfixturevalue(vision), text_backbone=tiny_bert).eval()
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    assert not [k for k in sd if k.startswith('cross_net.')]               # no cross-net parameters at all
    d = describe_state_dict(sd)
    assert 'n_aggregated' not in d and d['token_selection'] is False and d['embed_size'] == 16
    images, ids = torch.randn(2, 3, 32, 32), _ids()
    with torch.no_grad(): sims = model(images, ids)
    model.save_pretrained(tmp_path / 'm')
    assert 'none (a baseline' in (tmp_path / 'm' / 'README.md').read_text()
    loaded = LAPSModel.from_pretrained(tmp_path / 'm')
    assert loaded.cfg.similarity_calc_method == method and not hasattr(loaded.cross_net, 'aggr_net')
    with torch.no_grad(): assert torch.equal(loaded(images, ids), sims)
    again = LAPSModel(cfg, vision_backbone=request.getfixturevalue(vision), text_backbone=tiny_bert).eval()
    again.load_state_dict(sd)
    with torch.no_grad(): assert torch.equal(again(images, ids), sims)


def test_a_published_style_checkpoint_fits_a_baseline_config(tiny_vit, tiny_bert):
    "fit_legacy_keys_to_config drops aggr_net / tok_select_net / attn keys for a baseline, and keeps them otherwise."
    from laps.checkpoint.released import fit_legacy_keys_to_config
    from laps import get_config
    improved = LAPSModel(get_config('improved', embed_size=16, img_res=32, num_patches=16),
                         vision_backbone=tiny_vit, text_backbone=tiny_bert)
    sd = improved.state_dict()
    notes = []
    cfg = get_config('improved', embed_size=16, img_res=32, num_patches=16, similarity_calc_method='dense')
    fitted = fit_legacy_keys_to_config(sd, cfg, notes)
    assert not [k for k in fitted if k.startswith('cross_net.')]
    assert any('does not slim patches' in n for n in notes)
    LAPSModel(cfg, vision_backbone=tiny_vit, text_backbone=tiny_bert).load_state_dict(fitted)
    kept = fit_legacy_keys_to_config(sd, improved.cfg)
    assert kept.keys() == sd.keys()                                        # the improved model's own keys stay


@pytest.mark.parametrize('method', BASELINES)
def test_training_step_of_a_baseline_logs_a_zero_ratio_loss(method, tiny_vit, tiny_bert):
    from laps.training.step import training_step, optimizer_for
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, similarity_calc_method=method, ratio_weight=2.0)
    model = LAPSModel(cfg, vision_backbone=tiny_vit, text_backbone=tiny_bert)
    batch = dict(images=torch.randn(3, 3, 32, 32), input_ids=_ids(), img_ids=torch.arange(3))
    logs = training_step(model, batch, optimizer_for(model, cfg), cfg, epoch=0, step=1, steps_per_epoch=2)
    assert logs['ratio_loss'] == 0.0 and logs['ratio_loss_requires_grad'] == 0.0
    assert logs['loss'] == pytest.approx(logs['align_loss'] * logs['warmup']) and logs['grad_norm'] > 0
