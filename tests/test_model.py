"""Sweep every model configuration at tiny size: shapes, finiteness, where gradients go."""
import itertools
import pytest
import torch
from laps import LapsConfig, LAPSModel, CrossNet, hinge_triplet_loss, ratio_loss

COMBOS = [c for c in itertools.product(['max', 'attn', 'thres'], [0, 1], [0, 1], [0, 1], ['ratio', 'score'])
          if c[2] or c[4] == 'ratio']                                       # strategy only matters with selection


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
    assert sims.shape == (3, 3) and score_mask.shape == (3, 3, 16)
    assert torch.isfinite(sims).all()
    assert score_mask.sum(-1).eq(8).all()                                    # K = ceil(16 * 0.5)
    loss = hinge_triplet_loss(sims) + ratio_loss(score_mask, cfg.sparse_ratio)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads['cross_net.aggr_net.weight.3.weight'].abs().sum() > 0
    assert grads['img_enc.vision_proj.weight'].abs().sum() > 0
    assert grads['txt_enc.fc.weight'] is not None or isinstance(model.txt_enc.fc, torch.nn.Identity)
    if method == 'attn':
        assert grads['cross_net.i2t_attn_mat.weight'].abs().sum() > 0
        assert grads['cross_net.t2i_attn_mat.weight'].abs().sum() > 0
        assert (grads['cross_net.temp'] is not None) == bool(learn_temp)
    if tok_sel:
        assert grads['cross_net.tok_select_net.attn_mat.weight'] is None   # the released quirk
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(torch.zeros(2, 3, 32, 32), _ids()[:2]), model(torch.zeros(2, 3, 32, 32), _ids()[:2]))


def test_crossnet_columns_are_independent_captions():
    "Column j of the reference matrix depends only on caption j: batching captions changes nothing."
    cfg = LapsConfig(embed_size=8, num_patches=16, similarity_calc_method='thres', score_threshold=0.3)
    net = CrossNet(cfg).eval()
    img, cap = torch.randn(4, 17, 8), torch.randn(3, 7, 8)
    lens = [7, 4, 2]
    full = net(img, cap, lens)
    for j in range(3):
        assert torch.allclose(full[:, j], net(img, cap[j:j + 1], lens[j:j + 1])[:, 0], atol=1e-6)
    # padding beyond a caption's length is never read
    cap2 = cap.clone(); cap2[1, 4:] = 1e6
    assert torch.allclose(net(img, cap2, lens), full)


def test_trainable_token_selection_learns(tiny_vit, tiny_bert):
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, use_token_selection=1, token_selection_ratio=0.5,
                     token_selection_trainable=1)
    model = LAPSModel(cfg, vision_backbone=tiny_vit, text_backbone=tiny_bert).train()
    sims, _ = model(torch.randn(3, 3, 32, 32), _ids())
    hinge_triplet_loss(sims).backward()
    assert model.cross_net.tok_select_net.attn_mat.weight.grad.abs().sum() > 0
