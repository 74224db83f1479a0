"""The fast engine against the per-caption reference: values, every gradient, selections, blocks, padding."""
import itertools
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from laps import LapsConfig, CrossNet
from laps.core.registry import SIMILARITY_METHODS
from laps.model.engine import DEFAULT_MEMORY_BUDGET
from laps.model.lps import n_kept_patches, image_global, text_global, patch_scores, split_cls
import extra_similarity

TOL = 1e-4


def _combos():
    "(method, use_cls, selection, learnable_temp, trainable_selection) for every registered method and meaningful option."
    for method, use_cls, selection in itertools.product(SIMILARITY_METHODS.names(), [0, 1], [None, 'ratio', 'score']):
        for learn_temp in ([0, 1] if 'use_learnable_temp' in SIMILARITY_METHODS.get(method).config_fields else [0]):
            for trainable in ([0, 1] if selection else [0]):
                yield method, use_cls, selection, learn_temp, trainable


with extra_similarity.registered():                                       # a method only these tests know is swept too
    COMBOS, METHODS = list(_combos()), SIMILARITY_METHODS.names()
    BASELINES = [m for m in METHODS if not SIMILARITY_METHODS.get(m).slims_patches]   # global, dense: no LPS/SPA


@pytest.fixture(autouse=True, scope='module')
def _extra_method_registered():
    with extra_similarity.registered(): yield


def test_the_sweep_covers_every_registered_method():
    assert extra_similarity.GatedMeanSimilarity.name in METHODS
    assert set(METHODS) == set(SIMILARITY_METHODS.names()) >= {'max', 'attn', 'thres', 'global', 'dense'}
    assert {c[0] for c in COMBOS} == set(METHODS)
    assert {m for m in METHODS if not SIMILARITY_METHODS.get(m).slims_patches} == {'global', 'dense'}


def _same_mask(a, b):
    "Both None (a method that does not slim), or equal."
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _mask_shape_ok(net, mask, shape):
    return mask is None if not net.slims_patches else mask.shape == shape


def _net(method='max', use_cls=0, selection=None, learn_temp=0, trainable=0, C=32, N=196, prefix=None, **kw):
    cfg = LapsConfig(embed_size=C, num_patches=N, similarity_calc_method=method, use_cls_as_glob_embd=use_cls,
                     use_token_selection=int(selection is not None), token_selection_strategy=selection or 'ratio',
                     token_selection_ratio=0.6, use_learnable_temp=learn_temp, token_selection_trainable=trainable,
                     score_threshold=0.25, **kw)
    net = CrossNet(cfg, num_prefix_tokens=prefix)
    with torch.no_grad():
        for p in net.method_params.values():                               # a trained scalar, e.g. a learnable temp,
            if isinstance(p, nn.Parameter) and p.requires_grad: p.fill_(0.7)   # away from its init, so misuse would show
    return net


def decision_margin(net, img, cap, lens):
    "Smallest gap at any discrete choice the reference makes: top-k boundary, text selection, `thres` threshold."
    img_cls, patches = net.split_image(img)
    N = patches.shape[1]
    K = n_kept_patches(N, net.sparse_ratio)
    gaps = []
    with torch.no_grad():
        for c, n in zip(cap, lens):
            c = c[:int(n)]
            if not net.slims_patches: continue                             # no selection: nothing discrete but a max
            score = patch_scores(patches, image_global(img_cls, patches, net.use_cls_as_glob),
                                 text_global(c, net.use_cls_as_glob))
            if K < N:
                top = score.topk(K + 1, dim=1).values
                gaps.append((top[:, K - 1] - top[:, K]).min())
            if net.uses_token_selection and c.shape[0] > 1:
                rel = net.tok_select_net.relevance(F.normalize(c, dim=-1))
                if net.token_selection['strategy'] == 'score': gaps.append(rel.abs().min())
                else:
                    k = -(-rel.numel() * net.token_selection['ratio'] // 1)
                    srt = rel.sort(descending=True).values
                    if 0 < k < rel.numel(): gaps.append(srt[int(k) - 1] - srt[int(k)])
            for jump in net.similarity_method.discontinuities:             # e.g. `thres`'s threshold
                tokens, _ = net.image_tokens(img_cls, patches, c)
                S = F.leaky_relu(net.caption_tokens(c) @ tokens.transpose(-1, -2), 0.1)
                gaps.append((S - jump).abs().min())
    return float(min(gaps)) if gaps else float('inf')


def untied_inputs(net, T, C, n_img=3, caps=((9, 9), (5, 9), (3, 9), (7, 9)), margin=1e-5, requires_grad=False):
    "Seeded random inputs on which no discrete choice of the reference is within `margin` of a tie."
    L = max(l for _, l in caps)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        img = torch.randn(n_img, T, C, generator=g)
        cap = torch.randn(len(caps), L, C, generator=g)
        lens = torch.tensor([n for n, _ in caps])
        if decision_margin(net, img, cap, lens) > margin:
            return img.requires_grad_(requires_grad), cap.requires_grad_(requires_grad), lens
    raise AssertionError('no untied inputs found in 200 seeds')


def _grads(sims, net, img, cap, weights):
    params = [p for p in net.parameters() if p.requires_grad]
    return torch.autograd.grad((sims * weights).sum(), [img, cap] + params, allow_unused=True)


def _assert_grads_close(g_fast, g_ref, tol=TOL):
    assert len(g_fast) == len(g_ref)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None: assert (a - b).abs().max() <= tol, (a - b).abs().max()


@pytest.mark.parametrize('method,use_cls,selection,learn_temp,trainable', COMBOS)
@pytest.mark.parametrize('T', [197, 49])
def test_fast_equals_reference_values_masks_and_every_gradient(T, method, use_cls, selection, learn_temp, trainable):
    N = T - 1 if T == 197 else T
    net = _net(method, use_cls, selection, learn_temp, trainable, N=N).train()
    img, cap, lens = untied_inputs(net, T, 32, requires_grad=True)
    weights = torch.randn(img.shape[0], cap.shape[0], generator=torch.Generator().manual_seed(7))
    net.engine = 'reference'
    sims_ref, mask_ref = net(img, cap, lens)
    g_ref = _grads(sims_ref, net, img, cap, weights)
    net.engine = 'fast'
    sims, mask = net(img, cap, lens)
    assert sims.shape == sims_ref.shape and _mask_shape_ok(net, mask, (cap.shape[0], img.shape[0], N))
    assert (sims - sims_ref).abs().max() <= TOL
    assert _same_mask(mask, mask_ref)                                    # same kept patches (inputs are untied)
    _assert_grads_close(_grads(sims, net, img, cap, weights), g_ref)
    sims_1, mask_1 = net(img, cap, lens, memory_budget=1)                # one pair a block: several caption blocks,
    assert (sims_1 - sims_ref).abs().max() <= TOL and _same_mask(mask_1, mask_ref)   # norms over all of them at once
    _assert_grads_close(_grads(sims_1, net, img, cap, weights), g_ref)
    net.eval()
    with torch.no_grad():                                                # the no-grad path updates in place
        assert (net(img, cap, lens) - sims_ref).abs().max() <= TOL



@pytest.mark.parametrize('method,use_cls,selection,learn_temp,trainable', COMBOS)
@pytest.mark.parametrize('T', [197, 49])
def test_pair_scores_are_the_matrix_entries(T, method, use_cls, selection, learn_temp, trainable):
    "`pairs_forward` (both engines' `pair_scores`) on a sparse, unordered, repeating set of pairs, and with tiny chunks."
    net = _net(method, use_cls, selection, learn_temp, trainable, N=T - 1 if T == 197 else T).eval()
    img, cap, lens = untied_inputs(net, T, 32, n_img=4, caps=((9, 9), (5, 9), (3, 9), (7, 9), (2, 9), (8, 9)))
    with torch.no_grad(): full = net.reference_forward(img, cap, lens)[0]                  # (4, 6)
    g = torch.Generator().manual_seed(11)
    pairs = torch.stack([torch.randint(0, 4, (15,), generator=g), torch.randint(0, 6, (15,), generator=g)], 1)
    for engine, budget in (('fast', None), ('fast', 1), ('reference', None)):
        net.engine = engine
        assert (net.pair_scores(img, cap, lens, pairs, memory_budget=budget) - full[pairs[:, 0], pairs[:, 1]]).abs().max() <= TOL
    assert net.pair_scores(img, cap, lens, torch.zeros(0, 2)).shape == (0,)


def test_pair_scores_bad_pairs_name_what_was_expected():
    net = _net().eval()
    img, cap, lens = torch.randn(2, 197, 32), torch.randn(3, 6, 32), [6, 2, 4]
    with pytest.raises(ValueError, match=r'caption indices in \[0, 3\)'): net.pair_scores(img, cap, lens, [[0, 3]])
    with pytest.raises(ValueError, match=r'\(P, 2\) array'): net.pair_scores(img, cap, lens, [[0, 1, 2]])
    with pytest.raises(ValueError, match='cap_lens has 2 entries'): net.pair_scores(img, cap, [6, 2], [[0, 1]])

@pytest.mark.parametrize('preset', ['paper', 'improved'])
def test_vit_base_shapes(preset):
    "C=512, 197 tokens, caption lengths like Flickr30K's, values and gradients."
    from laps import get_config
    net = CrossNet(get_config(preset)).train()
    img, cap, lens = untied_inputs(net, 197, 512, n_img=4, caps=((16, 23), (12, 23), (23, 23)), requires_grad=True)
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    net.engine = 'reference'; sims_ref, mask_ref = net(img, cap, lens); g_ref = _grads(sims_ref, net, img, cap, weights)
    net.engine = 'fast'; sims, mask = net(img, cap, lens)
    assert (sims - sims_ref).abs().max() <= TOL and torch.equal(mask, mask_ref)
    _assert_grads_close(_grads(sims, net, img, cap, weights), g_ref)


@pytest.mark.parametrize('method,prefix,T', [(m, p, T) for m in METHODS for p, T in ((None, 197), (2, 198), (0, 49))])
def test_prefix_tokens_both_engines(method, prefix, T):
    "A DeiT's [CLS] + distillation token (2 prefix tokens), a ViT's [CLS] by the fallback rule, Swin's none."
    net = _net(method, use_cls=1, selection='ratio', N=196 if T > 49 else 49, prefix=prefix).train()
    img, cap, lens = untied_inputs(net, T, 32, requires_grad=True)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    net.engine = 'reference'; s_ref, m_ref = net(img, cap, lens); g_ref = _grads(s_ref, net, img, cap, weights)
    net.engine = 'fast'; s, m = net(img, cap, lens)
    assert _mask_shape_ok(net, m, (4, 3, 196 if T > 49 else 49))
    assert (s - s_ref).abs().max() <= TOL and _same_mask(m, m_ref)
    g = _grads(s, net, img, cap, weights)
    _assert_grads_close(g, g_ref)
    if prefix == 2:                                                        # the distillation token is never read
        assert g_ref[0][:, 1].abs().sum() == 0 and g[0][:, 1].abs().sum() == 0


@pytest.mark.parametrize('method', METHODS)
def test_memory_budget_only_changes_blocks(method):
    net = _net(method, selection='ratio').train()
    img, cap, lens = untied_inputs(net, 197, 32, n_img=5, caps=((9, 9), (2, 9), (5, 9), (7, 9), (3, 9), (9, 9)),
                                   requires_grad=True)
    weights = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    outs = []
    for budget in (1, 200_000, DEFAULT_MEMORY_BUDGET, 2**40):            # one pair per block ... one block
        sims, mask = net(img, cap, lens, memory_budget=budget)
        outs.append((sims, mask, _grads(sims, net, img, cap, weights)))
    for sims, mask, grads in outs[1:]:
        assert (sims - outs[0][0]).abs().max() <= 1e-6 and _same_mask(mask, outs[0][1])
        _assert_grads_close(grads, outs[0][2], tol=1e-6)


@pytest.mark.parametrize('method', ['thres'] + BASELINES)
def test_padding_content_never_matters(method):
    "Neither what a caption is padded with, nor how wide, nor which other captions share its batch changes its column."
    net = _net(method, use_cls=1, selection='ratio').train()
    img, cap, lens = untied_inputs(net, 49, 32, requires_grad=False)
    noisy = cap.clone()
    for j, n in enumerate(lens.tolist()):
        noisy[j, n:] = torch.tensor([float('nan'), 1e6, -3.0]).repeat(cap.shape[-1])[:cap.shape[-1]]
    cap.requires_grad_(); noisy.requires_grad_()
    sims, mask = net(img, cap, lens)
    sims_n, mask_n = net(img, noisy, lens)
    assert torch.equal(sims, sims_n) and _same_mask(mask, mask_n)
    g, = torch.autograd.grad(sims.sum(), cap); g_n, = torch.autograd.grad(sims_n.sum(), noisy)
    assert torch.equal(g, g_n) and torch.isfinite(g_n).all()
    for j, n in enumerate(lens.tolist()): assert g_n[j, n:].abs().sum() == 0      # padding gets no gradient
    # a longer padded width changes nothing either
    wide = torch.cat([cap.detach(), torch.randn(4, 5, 32)], 1)
    assert (net(img, wide, lens)[0] - sims).abs().max() <= 1e-6
    # nor do the other captions of the batch: column j is caption j scored alone, in both engines
    for net.engine in ('fast', 'reference'):
        for j in range(len(lens)):
            assert (net(img, cap[j:j + 1].detach(), lens[j:j + 1])[0][:, 0] - sims[:, j]).abs().max() <= TOL


def test_train_and_eval_modes_return_what_the_reference_returns():
    net = _net('attn', use_cls=1, selection='score').train()
    img, cap, lens = untied_inputs(net, 197, 32)
    out_fast = net(img, cap, lens)
    net.engine = 'reference'; out_ref = net(img, cap, lens)
    assert isinstance(out_fast, tuple) and len(out_fast) == 2
    assert (out_fast[0] - out_ref[0]).abs().max() <= TOL and torch.equal(out_fast[1], out_ref[1])
    assert out_fast[1].shape == (4, 3, 196) and out_fast[1].sum(-1).eq(98).all()
    net.eval(); net.engine = 'fast'
    sims = net(img, cap, lens)
    assert torch.is_tensor(sims) and sims.shape == (3, 4)


def test_reference_engine_is_the_reference_path_and_fast_is_default():
    assert LapsConfig().engine == 'fast' and CrossNet(LapsConfig(embed_size=16)).engine == 'fast'
    net = CrossNet(LapsConfig(embed_size=16, engine='reference')).eval()
    img, cap, lens = torch.randn(2, 197, 16), torch.randn(3, 6, 16), [6, 3, 4]
    assert torch.equal(net(img, cap, lens), net.reference_forward(img, cap, lens)[0])


def test_large_aggregation_logits_take_the_exact_per_pair_path():
    net = _net('max').train()
    with torch.no_grad(): net.aggr_net.scale.fill_(300.)                 # logits span far more than 20
    img, cap, lens = untied_inputs(net, 197, 32, requires_grad=True)
    weights = torch.ones(3, 4)
    net.engine = 'reference'; s_ref, _ = net(img, cap, lens); g_ref = _grads(s_ref, net, img, cap, weights)
    net.engine = 'fast'; s, _ = net(img, cap, lens)
    assert (s - s_ref).abs().max() <= TOL
    _assert_grads_close(_grads(s, net, img, cap, weights), g_ref)


def test_sparse_ratio_one_keeps_every_patch():
    net = _net('max', sparse_ratio=1.0, aggr_ratio=0.2).eval()
    img, cap, lens = torch.randn(2, 49, 32), torch.randn(3, 6, 32), torch.tensor([6, 2, 4])
    with torch.no_grad():
        assert (net(img, cap, lens) - net.reference_forward(img, cap, lens)[0]).abs().max() <= TOL


def test_bad_inputs_name_what_was_expected():
    net = _net().eval()
    img, cap = torch.randn(2, 197, 32), torch.randn(3, 6, 32)
    with pytest.raises(ValueError, match=r'cap_lens must lie in \[1, 6\]'): net(img, cap, [6, 0, 2])
    with pytest.raises(ValueError, match='cap_lens has 2 entries for 3 captions'): net(img, cap, [6, 2])
    with pytest.raises(ValueError, match='memory_budget must be a positive number of bytes'):
        net(img, cap, [6, 1, 2], memory_budget=-5)
    with pytest.raises(ValueError, match='same C'): net(img, torch.randn(3, 6, 16), [6, 1, 2])


@pytest.mark.parametrize('method', METHODS)
def test_empty_batches(method):
    net = _net(method).eval()
    with torch.no_grad():
        assert net(torch.randn(0, 197, 32), torch.randn(3, 6, 32), [6, 1, 2]).shape == (0, 3)
        assert net(torch.randn(2, 197, 32), torch.randn(0, 6, 32), []).shape == (2, 0)


@pytest.mark.parametrize('method', BASELINES)
def test_methods_that_do_not_slim_ignore_every_slimming_flag(method):
    "No aggr_net, no tok_select_net, no mask; sparse_ratio, aggr_ratio and text selection change nothing."
    img, cap, lens = torch.randn(3, 197, 32), torch.randn(4, 9, 32), torch.tensor([9, 5, 3, 7])
    outs = []
    for kw in (dict(), dict(selection='ratio', sparse_ratio=0.3, aggr_ratio=0.9), dict(selection='score', sparse_ratio=1.0)):
        net = _net(method, **kw).train()
        assert not net.slims_patches and not hasattr(net, 'aggr_net') and not net.uses_token_selection
        assert not any(k.startswith(('aggr_net.', 'tok_select_net.')) for k in net.state_dict())
        for net.engine in ('fast', 'reference'):
            sims, mask = net(img, cap, lens)
            assert mask is None
            outs.append(sims)
    for s in outs[1:]: assert (s - outs[0]).abs().max() <= 1e-6


@pytest.mark.parametrize('use_cls,T', [(0, 197), (1, 197), (1, 49)])
def test_global_is_the_cosine_of_the_lps_global_embeddings(use_cls, T):
    "`global` = cos(image_global, text_global), the pooling of LPS's global embeddings, in both engines."
    net = _net('global', use_cls, N=T - 1 if T == 197 else T).eval()
    img, cap, lens = torch.randn(3, T, 32), torch.randn(4, 9, 32), torch.tensor([9, 5, 3, 7])
    cls, patches = split_cls(img)
    g_img = image_global(cls, patches, bool(use_cls))                     # (3, C)
    g_txt = torch.stack([text_global(c[:int(n)], bool(use_cls)) for c, n in zip(cap, lens)])   # (4, C)
    expected = F.normalize(g_img, dim=-1) @ F.normalize(g_txt, dim=-1).T
    for net.engine in ('fast', 'reference'):
        with torch.no_grad(): assert (net(img, cap, lens) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize('T', [197, 49])
def test_dense_is_max_over_every_image_token_and_word(T):
    net = _net('dense', N=T - 1 if T == 197 else T).eval()
    img, cap, lens = torch.randn(3, T, 32), torch.randn(4, 9, 32), torch.tensor([9, 5, 3, 7])
    V = F.normalize(img, dim=-1)                                           # [CLS] (if any) and every patch
    expected = torch.empty(3, 4)
    for j, n in enumerate(lens.tolist()):
        S = F.leaky_relu(F.normalize(cap[j, :n], dim=-1) @ V.transpose(1, 2), 0.1)   # (3, n, T)
        expected[:, j] = S.amax(-1).mean(-1) + S.amax(-2).mean(-1)
    for net.engine in ('fast', 'reference'):
        with torch.no_grad(): assert (net(img, cap, lens) - expected).abs().max() <= 1e-5
