"""Backbone families through their adapters: prefix tokens, patch grids, pad ids, layers to freeze or truncate,
optimizer groups by module membership. Tiny configs, no downloads."""
import pytest
import torch
from torch import nn
from transformers import (AutoConfig, BertConfig, DeiTConfig, RobertaConfig, SwinConfig)
from laps import LapsConfig, LAPSModel, CrossNet
from laps.core.config import default_vision_backbone
from laps.data.loaders import collate, load_tokenizer
from laps.model.encoders import (adapter_for, backbone_config, build_backbone, has_cls_token, num_spatial_patches, pad_token_id,
                           vision_families, ImageEncoder, TextEncoder)
from laps.model.modeling import keep_text_layers, frozen_text_modules
from laps.core.registry import BACKBONES
from laps.training.step import build_optimizer

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)   # laps/tiny-vit's, as a DeiT


def tiny_deit(image_size=224, patch_size=16):
    return DeiTConfig(**TINY, image_size=image_size, patch_size=patch_size)


def tiny_text(family, layers=3):
    cls = {'bert': BertConfig, 'roberta': RobertaConfig}[family]
    return cls(hidden_size=24, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48, vocab_size=60,
               max_position_embeddings=40)


def test_registry_holds_the_five_families():
    assert BACKBONES.names() == ('vit', 'swin', 'bert', 'deit', 'roberta', 'conv-vit')
    assert vision_families() == ('vit', 'swin', 'deit', 'conv-vit')
    assert [BACKBONES.get(n).modality for n in BACKBONES.names()] == ['vision', 'vision', 'text', 'vision', 'text', 'vision']
    assert default_vision_backbone('vit') == 'google/vit-base-patch16-224-in21k'
    assert default_vision_backbone('swin') == 'microsoft/swin-base-patch4-window7-224'
    assert BACKBONES.get('bert').default_backbone == 'bert-base-uncased'


@pytest.mark.parametrize('config,prefix,res', [
    (backbone_config('laps/tiny-vit'), 1, 32),
    (backbone_config('laps/tiny-vit'), 1, 48),      # off its native size: positions interpolated
    (backbone_config('laps/tiny-swin'), 0, 32),
    (SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4), 0, 64),
    (tiny_deit(32, 8), 2, 32)])
def test_adapter_counts_the_tokens_the_backbone_produces(config, prefix, res):
    "P + N from the adapter equals the length of the backbone's real output, for every vision family."
    enc = ImageEncoder(build_backbone(config), 16).eval()
    with torch.no_grad(): out = enc(torch.randn(1, 3, res, res))
    a = adapter_for(config)
    assert a.num_prefix_tokens(config) == enc.num_prefix_tokens == prefix
    assert out.shape == (1, prefix + a.num_patches(config, res), 16)
    assert num_spatial_patches(config, res) == a.num_patches(config, res)


def test_swin_grid_is_after_patch_merging():
    swin_b = backbone_config('microsoft/swin-base-patch4-window7-224')
    a = adapter_for(swin_b)
    assert (a.patch_grid(swin_b, 224), a.num_patches(swin_b, 224), a.hidden_size(swin_b)) == ((7, 7), 49, 1024)


def test_deit_at_224_has_196_patches_behind_two_prefix_tokens():
    cfg_b = tiny_deit()
    assert (adapter_for(cfg_b).name, num_spatial_patches(cfg_b, 224), adapter_for(cfg_b).num_prefix_tokens(cfg_b)) == \
        ('deit', 196, 2)
    assert has_cls_token(198)                               # the released guess would read 1 + 197 patches
    cfg = LapsConfig(embed_size=16, use_cls_as_glob_embd=1, vision_backbone='unused', vit_type='deit')
    model = LAPSModel(cfg, cfg_b, tiny_text('bert', 1)).eval()
    assert cfg.num_patches == 196 and model.img_enc.num_prefix_tokens == 2
    pixels = torch.randn(2, 3, 224, 224)
    ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0]])
    with torch.no_grad():
        img = model.encode_images(pixels)
        cap, lens = model.encode_captions(ids)
        assert img.shape == (2, 198, 16)
        sims = model(pixels, ids)
        for engine in ('reference', 'fast'):
            model.cross_net.engine = engine
            assert torch.allclose(model.cross_net(img, cap, lens), sims, atol=1e-5)
            # the distillation token (index 1) is dropped: changing it changes nothing
            other = img.clone(); other[:, 1] = torch.randn(2, 16)
            assert torch.allclose(model.cross_net(other, cap, lens), sims, atol=1e-5)
            # [CLS] (index 0) is used as [CLS]: as a global embedding and as an image token
            moved = img.clone(); moved[:, 0] = torch.randn(2, 16)
            assert not torch.allclose(model.cross_net(moved, cap, lens), sims, atol=1e-3)
        # the same as a one-prefix CrossNet (same weights) on the tokens without the distillation token
        one = CrossNet(cfg, num_prefix_tokens=1).eval()
        one.load_state_dict(model.cross_net.state_dict())
        assert torch.allclose(one(torch.cat([img[:, :1], img[:, 2:]], 1), cap, lens), sims, atol=1e-5)
    model.train()
    assert model(pixels, ids)[1].shape == (2, 2, 196)          # score_mask over the 196 patches


def test_roberta_pads_with_one_and_keeps_its_s_token():
    text = build_backbone(tiny_text('roberta', 1))
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16)
    model = LAPSModel(cfg, backbone_config('laps/tiny-vit'), text).eval()
    assert model.txt_enc.pad_token_id == 1 and pad_token_id(text.config) == 1
    ids = torch.tensor([[0, 7, 9, 11, 2], [0, 5, 2, 1, 1]])  # <s> ... </s> <pad>; <s> is 0
    with torch.no_grad():
        embs, lens = model.encode_captions(ids)
        assert lens.tolist() == [5, 3]
        # the attention mask hides exactly the padding: the short caption alone gives the same embeddings
        alone, _ = model.encode_captions(ids[1:, :3])
        assert torch.allclose(embs[1, :3], alone[0], atol=1e-5)
        # the released `ids != 0` mask would hide <s> and attend to the padding
        wrong = model.txt_enc.fc(text(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state)
        assert not torch.allclose(wrong[1, :3], alone[0], atol=1e-3)
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32), ids)).all()


def test_collate_pads_with_the_tokenizers_id():
    b = collate([dict(input_ids=torch.tensor([0, 7, 2])), dict(input_ids=torch.tensor([0, 2]))], pad_id=1)
    assert b['input_ids'].tolist() == [[0, 7, 2], [0, 2, 1]] and b['lengths'].tolist() == [3, 2]
    assert pad_token_id(load_tokenizer('minilm')) == 0
    with pytest.raises(ValueError, match='has no pad token id'): pad_token_id(AutoConfig.for_model('gpt2'))


@pytest.mark.parametrize('family', ['bert', 'roberta'])
def test_freezing_and_truncation_use_the_adapters_layers(family):
    vit = backbone_config('laps/tiny-vit')
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16)
    ids = torch.tensor([[2, 7, 9, 3], [2, 5, 3, 4]])
    frozen = LAPSModel(cfg.replace(freeze_text_layers=2), vit, tiny_text(family)).train()
    frozen(torch.randn(2, 3, 32, 32), ids)[0].sum().backward()
    text = frozen.txt_enc.bert
    got = {n.split('.')[0] + ('.' + n.split('.')[2] if n.startswith('encoder') else ''): p.grad is not None
           for n, p in text.named_parameters() if not n.startswith('pooler')}
    assert got == {'embeddings': False, 'encoder.0': False, 'encoder.1': False, 'encoder.2': True}
    assert not text.encoder.layer[1].training and text.encoder.layer[2].training
    assert frozen_text_modules(text, -1) == [text] and frozen_text_modules(text, 0) == []
    with pytest.raises(ValueError, match='freeze_text_layers=4, but the text backbone has only 3 layers'):
        LAPSModel(cfg.replace(freeze_text_layers=4), vit, tiny_text(family))
    torch.manual_seed(0); full = LAPSModel(cfg, vit, tiny_text(family)).eval()
    torch.manual_seed(0); short = LAPSModel(cfg.replace(text_layers=1), vit, tiny_text(family)).eval()
    assert len(short.txt_enc.bert.encoder.layer) == short.txt_enc.bert.config.num_hidden_layers == 1
    assert sorted(k for k in short.state_dict() if '.layer.' in k) == \
        sorted(k for k in full.state_dict() if '.layer.0.' in k)
    keep_text_layers(full.txt_enc.bert, 1)
    with torch.no_grad(): assert torch.equal(short.encode_captions(ids)[0], full.encode_captions(ids)[0])
    with pytest.raises(ValueError, match='text_layers=4, but'): LAPSModel(cfg.replace(text_layers=4), vit, tiny_text(family))


@pytest.mark.parametrize('freeze', [0, 2, -1])
def test_optimizer_groups_by_module_membership(freeze):
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, similarity_calc_method='attn', freeze_text_layers=freeze)
    model = LAPSModel(cfg, tiny_deit(32, 8), tiny_text('roberta'))
    wrapped = nn.ModuleDict(dict(module=model))             # names now start with 'module.', as under DDP
    opt = build_optimizer(wrapped, 1e-3, vision_lr_scale=0.1, text_lr_scale=0.5)
    groups = {g['name']: ({id(p) for p in g['params']}, g['lr']) for g in opt.param_groups}
    ids = lambda m: {id(p) for p in m.parameters() if p.requires_grad}
    heads = ids(model) - ids(model.img_enc.visual_encoder) - ids(model.txt_enc.bert)
    assert groups['vision'] == (ids(model.img_enc.visual_encoder), 1e-4)
    assert groups['heads'] == (heads, 1e-3) and id(model.cross_net.i2t_attn_mat.weight) in heads
    assert id(model.txt_enc.fc.weight) in heads and id(model.img_enc.vision_proj.weight) in heads
    if freeze == -1: assert 'text' not in groups
    else: assert groups['text'] == (ids(model.txt_enc.bert), 0.5e-3) and len(groups['text'][0]) > 0
    assert sum(len(g['params']) for g in opt.param_groups) == len(ids(model))


def test_config_and_errors_name_the_registered_families():
    with pytest.raises(ValueError, match="vit_type must be one of 'vit', 'swin', 'deit', 'conv-vit'; got 'bert'"):
        LapsConfig(vit_type='bert')
    with pytest.raises(ValueError, match="vit_type='deit' has no default vision backbone"): LapsConfig(vit_type='deit')
    with pytest.raises(ValueError, match='unsupported backbone architecture GPT2Config; registered backbone families: '
                                         r'vit \(ViTConfig\), swin'):
        adapter_for(AutoConfig.for_model('gpt2'))
    with pytest.raises(ValueError, match='BertConfig is a text backbone: it has no patch grid'):
        num_spatial_patches(backbone_config('laps/tiny-bert'), 224)
    with pytest.raises(ValueError, match='the text backbone is a ViTConfig, a vision backbone'):
        TextEncoder(build_backbone(backbone_config('laps/tiny-vit')), 16)
    from laps.cli import build_parser
    with pytest.raises(SystemExit): build_parser().parse_args(['train', '--vit_type', 'bert'])
