"""Checkpoint folders (round trip, resume, atomicity, shared tensors), save_pretrained / from_pretrained folders with their
model card, and published LAPS .pth checkpoints (transformers-4 keys, recorded transformers-4 outputs, safe unpickling,
mismatch and corrupt-file errors, conversion to a save_pretrained folder)."""
import argparse, json, logging, os
from pathlib import Path
import pytest
import torch
from transformers import ViTConfig, SwinConfig, BertConfig, ViTModel, SwinModel, BertModel
import laps.model.pretrained
from laps.checkpoint.run import save_checkpoint, load_trainer_state, load_checkpoint, load_any_checkpoint, resolve_checkpoint, refresh_model_card
from laps.checkpoint.released import load_legacy_checkpoint, convert_legacy_state_dict, config_from_opt, read_legacy_checkpoint, convert_checkpoint
from laps.core.rng import rng_states, restore_rng_states
from laps.core.errors import CheckpointError
from laps.core.config import LapsConfig, ModelConfig
from laps.model.modeling import LAPSModel, unwrap_model

FIX = Path(__file__).parent / 'fixtures'
T4 = json.loads((FIX / 'transformers4_keys.json').read_text())
T4_OUT = torch.load(FIX / 'transformers4_outputs.pt', weights_only=True)
VIT, SWIN, BERT = ViTConfig(**T4['configs']['vit']), SwinConfig(**T4['configs']['swin']), BertConfig(**T4['configs']['bert'])
TINY = {'legacy_vit_improved': dict(vision_backbone=VIT, text_backbone=BERT),
        'legacy_swin_paper': dict(vision_backbone=SWIN, text_backbone=BERT)}
PIX, IDS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0], [2, 4, 4, 3]])


def _model(tiny_vit, tiny_bert, **kw):
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, vision_pretrained=False, text_pretrained=False,
                     **{'similarity_calc_method': 'attn', 'use_token_selection': 1, **kw})
    return LAPSModel(cfg, tiny_vit, tiny_bert).eval()


def _sims(model):
    with torch.no_grad(): return model.eval()(PIX, IDS)


def _legacy(name):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIX / f'{name}.pth', weights_only=True)


def _write_legacy(tmp_path, raw, name='ckpt.pth'):
    torch.save(raw, tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- this project's checkpoint folders

@pytest.mark.parametrize('vision', ['tiny_vit', 'tiny_swin'])
def test_round_trip_identical_outputs(vision, tiny_bert, tmp_path, request):
    model = _model(request.getfixturevalue(vision), tiny_bert, vit_type='vit' if vision == 'tiny_vit' else 'swin')
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))     # not the init values
    p = save_checkpoint(tmp_path / 'run' / 'checkpoint_best', model, trainer_state={'epoch': 2, 'step': 7, 'best_rsum': 99.5})
    loaded, cfg, state = load_checkpoint(p)
    assert torch.equal(_sims(loaded), _sims(model))
    assert cfg.model == loaded.cfg == model.cfg                              # the run's LapsConfig holds the saved ModelConfig
    assert (state['format'], state['epoch'], state['step'], state['best_rsum']) == ('laps', 2, 7, 99.5)
    assert json.loads((p / 'backbones.json').read_text())['vision']['model_type'] == ('vit' if vision == 'tiny_vit' else 'swin')
    assert not loaded.training


def test_load_never_touches_the_network(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'c', model)
    def no_hub(*a, **k): raise AssertionError('from_pretrained called')
    for cls in (ViTModel, BertModel, SwinModel):
        monkeypatch.setattr(cls, 'from_pretrained', classmethod(no_hub))
    monkeypatch.setattr('transformers.AutoConfig.from_pretrained', no_hub)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert torch.equal(_sims(load_checkpoint(p)[0]), _sims(model))


def test_resume_restores_optimizer_and_rng(tiny_vit, tiny_bert, tmp_path):
    def step(model, opt):
        model.train()
        sims, _ = model(PIX, IDS)
        opt.zero_grad(); (sims.diag().sum() - sims.mean()).backward(); opt.step()
    model = _model(tiny_vit, tiny_bert)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt)
    opt.param_groups[0]['lr'] = 1e-2 * 0.3                                    # what set_epoch_lr does at an epoch boundary
    save_checkpoint(tmp_path / 'last', model, trainer_state={'epoch': 0, 'step': 1}, optimizer=opt)
    step(model, opt)                                                         # the uninterrupted run (dropout uses the RNG)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)                                                   # a new process would have other RNG states
    resumed, cfg, state = load_checkpoint(tmp_path / 'last')
    assert sorted(torch.load(tmp_path / 'last' / 'trainer_state.pt', weights_only=True)) == ['optimizer', 'rng']
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(state['optimizer'])
    restore_rng_states(state['rng'])
    step(resumed, opt2)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert opt2.param_groups[0]['lr'] == pytest.approx(1e-2 * 0.3)


def test_save_checkpoint_has_no_scheduler_parameter(tiny_vit, tiny_bert, tmp_path):
    "It was never used (the runner sets the lr per epoch); passing one is an error, not silently ignored state."
    model = _model(tiny_vit, tiny_bert)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.3)
    with pytest.raises(TypeError, match='scheduler'):
        save_checkpoint(tmp_path / 'c', model, optimizer=opt, scheduler=sched)
    assert not (tmp_path / 'c').exists()


def test_save_checkpoint_keeps_the_fp16_scaler(tiny_vit, tiny_bert, tmp_path):
    "fp16 training's gradient scaler (--precision fp16) is saved with the optimizer, so a resume continues its scale."
    model = _model(tiny_vit, tiny_bert)
    scaler = torch.amp.GradScaler('cpu', init_scale=256.0)
    save_checkpoint(tmp_path / 'c', model, optimizer=torch.optim.AdamW(model.parameters()), scaler=scaler)
    state = load_trainer_state(tmp_path / 'c')
    resumed = torch.amp.GradScaler('cpu')
    resumed.load_state_dict(state['scaler'])
    assert resumed.get_scale() == 256.0 and 'optimizer' in state


def test_failed_write_keeps_old_checkpoint_and_leaves_no_temp(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'checkpoint_best', model, trainer_state={'epoch': 1})
    before = _sims(model)
    other = _model(tiny_vit, tiny_bert)
    with torch.no_grad(): other.img_enc.vision_proj.weight.mul_(-1)
    def boom(*a, **k): raise OSError('No space left on device')
    monkeypatch.setattr(laps.model.pretrained, 'save_file', boom)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint(p, other, trainer_state={'epoch': 2})
    monkeypatch.undo()
    assert sorted(x.name for x in tmp_path.iterdir()) == ['checkpoint_best']
    loaded, _, state = load_checkpoint(p)
    assert state['epoch'] == 1 and torch.equal(_sims(loaded), before)


def test_failure_between_renames_restores_old(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'checkpoint_best', model, trainer_state={'epoch': 1})
    real_replace, calls = os.replace, []
    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2: raise OSError('crash while swapping')         # old moved aside, new not yet in place
        return real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', flaky)
    with pytest.raises(OSError, match='crash while swapping'):
        save_checkpoint(p, model, trainer_state={'epoch': 2})
    monkeypatch.undo()
    assert sorted(x.name for x in tmp_path.iterdir()) == ['checkpoint_best']
    assert load_checkpoint(p)[2]['epoch'] == 1


def test_killed_between_renames_uses_backup(tiny_vit, tiny_bert, tmp_path, caplog):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'run' / 'checkpoint_best', model, trainer_state={'epoch': 4})
    os.replace(p, p.with_name('.checkpoint_best.old'))                      # what a kill at that moment leaves
    (tmp_path / 'run' / '.checkpoint_best.tmp-zzz').mkdir()                 # and a stale temp folder
    with caplog.at_level(logging.WARNING, logger='laps.core.atomic'):
        assert load_any_checkpoint(tmp_path / 'run')[2]['epoch'] == 4
        assert load_checkpoint(p)[2]['epoch'] == 4
    assert 'interrupted save' in caplog.text
    save_checkpoint(p, model, trainer_state={'epoch': 5})                    # the next save cleans up
    assert sorted(x.name for x in (tmp_path / 'run').iterdir()) == ['checkpoint_best']


def test_shared_tensors_are_saved_once(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    model.cross_net.t2i_attn_mat.weight = model.cross_net.i2t_attn_mat.weight   # tie two weights
    with torch.no_grad(): model.cross_net.i2t_attn_mat.weight.normal_()
    p = save_checkpoint(tmp_path / 'c', model)
    from safetensors import safe_open
    with safe_open(str(p / 'model.safetensors'), 'pt') as f:
        assert 'cross_net.t2i_attn_mat.weight' not in f.keys()
        assert json.loads(f.metadata()['aliases']) == {'cross_net.t2i_attn_mat.weight': 'cross_net.i2t_attn_mat.weight'}
    loaded = load_checkpoint(p)[0]
    assert torch.equal(loaded.cross_net.t2i_attn_mat.weight, model.cross_net.i2t_attn_mat.weight)
    assert torch.equal(_sims(loaded), _sims(model))


def test_trainer_state_must_be_json(tiny_vit, tiny_bert, tmp_path):
    with pytest.raises(TypeError, match='JSON-serialisable'):
        save_checkpoint(tmp_path / 'c', _model(tiny_vit, tiny_bert), trainer_state={'x': torch.ones(1)})
    assert not (tmp_path / 'c').exists()


def test_rng_states_round_trip():
    import random, numpy as np
    st = rng_states()
    a = (random.random(), np.random.rand(), torch.rand(2).tolist())
    restore_rng_states(st)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == a


# ---------------------------------------------------------------- save_pretrained / from_pretrained (Hugging Face conventions)

def _no_network(monkeypatch):
    "Any Hub download or transformers hub load fails the test; HF_HUB_OFFLINE is set too."
    def no_hub(*a, **k): raise AssertionError('network access attempted')
    for name in ('hf_hub_download', 'snapshot_download'):
        monkeypatch.setattr(f'huggingface_hub.{name}', no_hub)
    monkeypatch.setattr(laps.model.pretrained, 'snapshot_download', no_hub)
    monkeypatch.setattr('huggingface_hub.hub_mixin.hf_hub_download', no_hub)
    for cls in (ViTModel, BertModel, SwinModel):
        monkeypatch.setattr(cls, 'from_pretrained', classmethod(no_hub))
    monkeypatch.setattr('transformers.AutoConfig.from_pretrained', no_hub)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')


@pytest.mark.parametrize('vision', ['tiny_vit', 'tiny_swin'])
def test_save_pretrained_from_pretrained_offline(vision, tiny_bert, tmp_path, request, monkeypatch):
    model = _model(request.getfixturevalue(vision), tiny_bert, vit_type='vit' if vision == 'tiny_vit' else 'swin')
    with torch.no_grad():
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / 'm')
    assert sorted(f.name for f in (tmp_path / 'm').iterdir()) == ['README.md', 'backbones.json', 'checksums.json', 'config.json',
                                                                  'model.safetensors']
    assert ModelConfig.from_dict(json.loads((tmp_path / 'm' / 'config.json').read_text())) == model.cfg   # the model only
    _no_network(monkeypatch)
    loaded = LAPSModel.from_pretrained(tmp_path / 'm')
    assert isinstance(loaded, LAPSModel) and not loaded.training
    assert torch.equal(_sims(loaded), _sims(model))
    assert loaded.cfg == model.cfg.replace(vision_pretrained=False, text_pretrained=False)
    assert torch.equal(_sims(LAPSModel.from_pretrained(str(tmp_path / 'm'), map_location='cpu')), _sims(model))
    card = (tmp_path / 'm' / 'README.md').read_text()
    assert card.startswith('---\nlibrary_name: laps\n') and 'LAPSModel.from_pretrained' in card
    assert 'not recorded (saved outside a run directory)' in card and 'Not recorded: no evaluation' in card


def test_save_pretrained_replaces_a_stale_card_and_from_pretrained_checks_the_config(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    (tmp_path / 'm').mkdir()
    (tmp_path / 'm' / 'README.md').write_text('an old card')
    model.save_pretrained(tmp_path / 'm')
    assert 'LAPS image-text retrieval model' in (tmp_path / 'm' / 'README.md').read_text()
    with pytest.raises(CheckpointError, match=r'(?s)m/model\.safetensors: .*embed_size: checkpoint 16, configuration 8'):
        LAPSModel.from_pretrained(tmp_path / 'm', cfg=model.cfg.replace(embed_size=8))
    other = LAPSModel.from_pretrained(tmp_path / 'm', vision_backbone=tiny_vit, text_backbone=tiny_bert)
    assert torch.equal(_sims(other), _sims(model))


def test_from_pretrained_path_errors(tiny_vit, tiny_bert, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    (tmp_path / 'model_best.pth').write_bytes(b'x')
    with pytest.raises(CheckpointError, match=r'model_best\.pth: a file, not a save_pretrained folder .*laps\.checkpoint\.released'):
        LAPSModel.from_pretrained(tmp_path / 'model_best.pth')
    with pytest.raises(FileNotFoundError, match=r'checkpoint folder .*runs/typo does not exist'):
        (tmp_path / 'runs').mkdir(); LAPSModel.from_pretrained(tmp_path / 'runs' / 'typo')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match='checkpoint folder runs/typo does not exist'):
        LAPSModel.from_pretrained('runs/typo')                               # a relative path whose parent exists: local
    (tmp_path / 'runs' / 'half').mkdir()
    with pytest.raises(CheckpointError, match=r'half: not a complete laps checkpoint folder \(missing config\.json, backbones\.json'):
        LAPSModel.from_pretrained('runs/half')


def test_checkpoint_folders_are_save_pretrained_folders_with_a_run_card(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'commands.jsonl').write_text(json.dumps({'argv': ['/venv/bin/laps', 'train', '--preset', 'cpu', '--logger_name', 'run'],
                                                    'commit': 'abc1234+dirty', 'time': '2024-06-01T10:00:00+00:00'}) + '\n')
    test_m = {f'{d}_{k}': v for d in ('i2t', 't2i') for k, v in (('r1', 11.0), ('r5', 22.0), ('r10', 33.0))} | {'rsum': 132.0}
    best = dict(test_m, rsum=140.0, epoch=2, step=30)
    p = save_checkpoint(run / 'checkpoint_best', model, trainer_state={'epoch': 2, 'step': 30, 'best_rsum': 140.0, 'best_metrics': best})
    assert torch.equal(_sims(LAPSModel.from_pretrained(p)), _sims(load_checkpoint(p)[0]))
    assert '| test ' not in (p / 'README.md').read_text()                   # saved during training: not evaluated on test yet
    (run / 'metrics_test.json').write_text(json.dumps(test_m))              # what an evaluation of the run leaves
    assert refresh_model_card(p) == p / 'README.md'
    card = (p / 'README.md').read_text()
    assert '- training command: `laps train --preset cpu --logger_name run`' in card
    assert '- commit: `abc1234+dirty`' in card and '- this checkpoint: epoch 2, step 30' in card
    assert '| test (`metrics_test.json`) | 11.0 | 22.0 | 33.0 | 11.0 | 22.0 | 33.0 | 132.0 |' in card
    assert '| dev (best so far: epoch 2, step 30) | 11.0 | 22.0 | 33.0 | 11.0 | 22.0 | 33.0 | 140.0 |' in card
    assert "dataset `f30k`" in card
    model.save_pretrained(tmp_path / 'alone')
    assert refresh_model_card(tmp_path / 'alone') is None                   # outside a run directory the card stays


def test_unwrap_model_and_saving_a_wrapped_model(tiny_vit, tiny_bert, tmp_path):
    class Wrapper(torch.nn.Module):                                          # DDP / DataParallel / GatherForward keep .module
        def __init__(self, module): super().__init__(); self.module = module
    model = _model(tiny_vit, tiny_bert)
    compiled = torch.compile(model)                                          # lazy: nothing is compiled here
    assert unwrap_model(Wrapper(compiled)) is model and unwrap_model(model) is model
    p = save_checkpoint(tmp_path / 'c', Wrapper(compiled))
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in load_checkpoint(p)[0].state_dict())


# ---------------------------------------------------------------- mismatch and corrupt folders

def test_config_mismatch_errors_name_the_file_and_the_difference(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'ck', model)
    with pytest.raises(CheckpointError, match=r'(?s)model\.safetensors: .*embed_size: checkpoint 16, configuration 8'):
        load_checkpoint(p, cfg=model.cfg.replace(embed_size=8))
    with pytest.raises(CheckpointError, match=r'(?s)token_selection: checkpoint True, configuration False'):
        load_checkpoint(p, cfg=model.cfg.replace(use_token_selection=0))
    with pytest.raises(CheckpointError, match=r'(?s)n_aggregated: checkpoint 3, configuration 6'):
        load_checkpoint(p, cfg=model.cfg.replace(aggr_ratio=0.8))


def test_corrupt_or_incomplete_folder(tiny_vit, tiny_bert, tmp_path):
    p = save_checkpoint(tmp_path / 'ck', _model(tiny_vit, tiny_bert))
    data = (p / 'model.safetensors').read_bytes()
    (p / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=rf'(?s)ck/model\.safetensors: {len(data) // 2} bytes, but .*checksums\.json recorded {len(data)}'):
        load_checkpoint(p)                                                   # the checksums catch it first
    (p / 'checksums.json').unlink()                                          # a folder from before checksums: the readers' errors
    with pytest.raises(CheckpointError, match=r'(?s)ck/model\.safetensors: unreadable safetensors'):
        load_checkpoint(p)
    (p / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match=r'(?s)ck: not a complete laps checkpoint folder \(missing model\.safetensors\)'):
        load_checkpoint(p)
    (p / 'config.json').write_text('{"embed_size": 16,')
    (p / 'model.safetensors').write_bytes(data)
    with pytest.raises(CheckpointError, match=r'(?s)config\.json: unreadable JSON'):
        load_checkpoint(p)


# ---------------------------------------------------------------- transformers 4 -> 5 key mapping

@pytest.mark.parametrize('version', sorted(T4['versions']))
def test_recorded_transformers4_names_are_the_old_layout(version):
    vit, swin, bert = (T4['versions'][version]['models'][n]['state_dict'] for n in ('vit', 'swin', 'bert'))
    assert version.startswith('4.')
    for k in ('encoder.layer.0.attention.attention.query.weight', 'encoder.layer.0.attention.output.dense.weight',
              'encoder.layer.0.intermediate.dense.weight', 'encoder.layer.0.output.dense.weight',
              'encoder.layer.0.layernorm_before.weight', 'pooler.dense.weight'):
        assert k in vit, k
    for k in ('encoder.layers.0.blocks.0.attention.self.query.weight', 'encoder.layers.0.blocks.0.attention.self.relative_position_bias_table',
              'encoder.layers.0.blocks.0.attention.self.relative_position_index', 'encoder.layers.0.blocks.0.intermediate.dense.weight'):
        assert k in swin, k
    assert ('embeddings.position_ids' in bert) == (version == '4.30.2')       # non-persistent since transformers 4.31


@pytest.mark.parametrize('version', sorted(T4['versions']))
@pytest.mark.parametrize('name,prefix,t5_model', [
    ('vit', 'img_enc.visual_encoder.', lambda: ViTModel(VIT, add_pooling_layer=True)),
    ('swin', 'img_enc.visual_encoder.', lambda: SwinModel(SWIN)),
    ('bert', 'txt_enc.bert.', lambda: BertModel(BERT))])
def test_convert_maps_every_transformers4_key(name, prefix, t5_model, version):
    t4 = {prefix + k: torch.zeros(shape) for k, (shape, _) in T4['versions'][version]['models'][name]['state_dict'].items()}
    dropped = []
    out = convert_legacy_state_dict(t4, dropped)
    t5 = t5_model().state_dict()
    assert {k: tuple(v.shape) for k, v in out.items()} == {prefix + k: tuple(v.shape) for k, v in t5.items()}
    expected = {'swin': ['relative_position_index'] * 4, 'bert': ['position_ids'] if version == '4.30.2' else []}
    assert [k.rsplit('.', 1)[-1] for k in dropped] == expected.get(name, [])
    assert convert_legacy_state_dict(out) == out                             # idempotent on transformers 5 keys


def test_convert_strips_module_prefix_and_old_buffers():
    sd = {'module.txt_enc.bert.embeddings.position_ids': torch.arange(4)[None],
          'module.img_enc.visual_encoder.encoder.layer.3.output.dense.bias': torch.ones(2),
          'module.txt_enc.bert.encoder.layer.3.output.dense.bias': torch.ones(2)}
    dropped = []
    assert list(convert_legacy_state_dict(sd, dropped)) == ['img_enc.visual_encoder.layers.3.mlp.fc2.bias',
                                                            'txt_enc.bert.encoder.layer.3.output.dense.bias']
    assert dropped == ['txt_enc.bert.embeddings.position_ids']


# ---------------------------------------------------------------- published checkpoints (fixtures made under transformers 4)

@pytest.mark.parametrize('name', ['legacy_vit_improved', 'legacy_swin_paper'])
def test_legacy_fixture_matches_transformers4_outputs(name):
    model, cfg, info = load_legacy_checkpoint(FIX / f'{name}.pth', **TINY[name])
    rec = T4_OUT[name]
    with torch.no_grad():
        img = model.encode_images(T4_OUT['pixel_values'])
        cap, lens = model.encode_captions(T4_OUT['input_ids'])
        sims = model(T4_OUT['pixel_values'], T4_OUT['input_ids'])
    torch.testing.assert_close(img, rec['img_embs'], rtol=0, atol=1e-6)
    torch.testing.assert_close(cap, rec['cap_embs'], rtol=0, atol=1e-6)
    torch.testing.assert_close(sims, rec['sims'], rtol=0, atol=1e-6)
    assert (info['format'], info['epoch'], info['best_rsum'], info['Eiters'], info['step']) == ('legacy', 12, 512.5, 4321, 4321)
    assert cfg.vision_pretrained is False and cfg.text_pretrained is False
    assert cfg.bert_path == 'bert-base-uncased'                              # the author's folder does not exist here
    assert any('vocab_path' in n for n in info['notes'])


def test_legacy_swin_drops_unused_improved_keys_and_old_buffers(caplog):
    with caplog.at_level(logging.INFO, logger='laps.checkpoint.released'):
        model, cfg, info = load_legacy_checkpoint(FIX / 'legacy_swin_paper.pth', **TINY['legacy_swin_paper'])
    assert (cfg.vit_type, cfg.similarity_calc_method, cfg.use_token_selection, cfg.n_aggregated) == ('swin', 'max', 0, 7)
    assert sorted(k.rsplit('.', 1)[-1] for k in info['dropped_keys']) == ['position_ids'] + ['relative_position_index'] * 4
    notes = '\n'.join(info['notes'])
    assert 'cross_net.tok_select_net.attn_mat.weight' in notes and 'use_token_selection=0' in notes
    assert "cross_net.temp: unused with similarity_calc_method='max'" in notes
    assert 'cross_net.tok_select_net' in caplog.text
    assert not any(k.startswith(('cross_net.tok_select_net', 'cross_net.i2t')) for k in model.state_dict())


def test_unused_keys_are_kept_when_the_flags_use_them(tmp_path):
    raw = _legacy('legacy_vit_improved')
    del raw['model']['cross_net.tok_select_net.attn_mat.weight']
    with pytest.raises(CheckpointError, match=r'(?s)ckpt\.pth: .*1 key\(s\) missing from the checkpoint: '
                                              r'cross_net\.tok_select_net\.attn_mat\.weight'):
        load_legacy_checkpoint(_write_legacy(tmp_path, raw), **TINY['legacy_vit_improved'])
    del raw['model']['cross_net.tok_select_net.attn_mat.bias']
    with pytest.raises(CheckpointError, match=r'(?s)ckpt\.pth: .*token_selection: checkpoint False, configuration True'):
        load_legacy_checkpoint(_write_legacy(tmp_path, raw), **TINY['legacy_vit_improved'])


def test_unknown_extra_key_is_refused(tmp_path):
    raw = _legacy('legacy_vit_improved')
    raw['model']['cross_net.gate.weight'] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r'(?s)ckpt\.pth: .*1 key\(s\) unexpected \(not in the model\): cross_net\.gate\.weight'):
        load_legacy_checkpoint(_write_legacy(tmp_path, raw), **TINY['legacy_vit_improved'])


def test_missing_fixed_temp_and_module_prefix(tmp_path):
    raw = _legacy('legacy_vit_improved')
    del raw['model']['cross_net.temp']
    raw['model'] = {'module.' + k: v for k, v in raw['model'].items()}
    model, _, info = load_legacy_checkpoint(_write_legacy(tmp_path, raw), **TINY['legacy_vit_improved'])
    assert any(n.startswith('cross_net.temp absent') and "attn's default [1.0]" in n for n in info['notes'])
    with torch.no_grad():
        torch.testing.assert_close(model(T4_OUT['pixel_values'], T4_OUT['input_ids']), T4_OUT['legacy_vit_improved']['sims'],
                                   rtol=0, atol=1e-6)


def test_architecture_mismatch_errors():
    with pytest.raises(CheckpointError, match=r'(?s)legacy_swin_paper\.pth: .*vision: checkpoint swin, depths \[2, 1, 1\], configuration vit'):
        load_legacy_checkpoint(FIX / 'legacy_swin_paper.pth', vision_backbone=VIT, text_backbone=BERT)
    cfg = load_legacy_checkpoint(FIX / 'legacy_vit_improved.pth', **TINY['legacy_vit_improved'])[1]
    with pytest.raises(CheckpointError, match=r'(?s)legacy_vit_improved\.pth: .*embed_size: checkpoint 16, configuration 32'):
        load_legacy_checkpoint(FIX / 'legacy_vit_improved.pth', cfg=cfg.replace(embed_size=32), **TINY['legacy_vit_improved'])


def test_tiny_weights_against_the_paper_architecture(tmp_path):
    "The flags alone (no tiny overrides) name ViT-B/16 + BERT-base: checked on the meta device, a clear error."
    raw = _legacy('legacy_vit_improved')
    raw['opt'].img_res = 224
    with pytest.raises(CheckpointError, match=r'(?s)ckpt\.pth: .*vision_hidden: checkpoint 32, configuration 768.*text_hidden: checkpoint 24, configuration 768'):
        load_legacy_checkpoint(_write_legacy(tmp_path, raw))


def test_weights_only_refuses_other_globals(tmp_path):
    marker = tmp_path / 'pwned'
    class Evil:
        def __reduce__(self): return (os.mkdir, (str(marker),))
    torch.save({'model': {}, 'opt': Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'(?s)evil\.pth: refused to load: it contains a pickled Python object of type \S*mkdir'):
        read_legacy_checkpoint(tmp_path / 'evil.pth')
    assert not marker.exists()
    torch.save({'model': {'w': torch.ones(1)}, 'opt': Custom(3)}, tmp_path / 'custom.pth')
    with pytest.raises(CheckpointError, match=r'(?s)custom\.pth: refused to load: .*Custom.*argparse\.Namespace'):
        load_any_checkpoint(tmp_path / 'custom.pth')


class Custom:
    def __init__(self, x): self.x = x


@pytest.mark.parametrize('make,msg', [
    (lambda p: p.write_bytes((FIX / 'legacy_vit_improved.pth').read_bytes()[:50_000]), 'not a readable PyTorch checkpoint'),
    (lambda p: p.write_text('hello, not a checkpoint'), 'not a readable PyTorch checkpoint'),
    (lambda p: p.write_bytes(b''), 'not a readable PyTorch checkpoint'),
    (lambda p: torch.save([torch.ones(1)], p), "expected a LAPS checkpoint dict with 'model'"),
    (lambda p: torch.save({'state_dict': {}, 'epoch': 1}, p), r"found \['epoch', 'state_dict'\]"),
    (lambda p: torch.save({'model': {'a': 1}}, p), "'model' must map names to tensors"),
])
def test_corrupt_legacy_files(tmp_path, make, msg):
    p = tmp_path / 'model_best.pth'
    make(p)
    with pytest.raises(CheckpointError, match=r'(?s)model_best\.pth: .*' + msg):
        load_legacy_checkpoint(p)


def test_legacy_without_opt_needs_cfg(tmp_path):
    raw = _legacy('legacy_vit_improved')
    cfg = config_from_opt(raw.pop('opt'), vision_backbone=VIT, text_backbone=BERT)
    p = _write_legacy(tmp_path, raw)
    with pytest.raises(CheckpointError, match="has no 'opt' flags; pass cfg="):
        load_legacy_checkpoint(p)
    model = load_legacy_checkpoint(p, cfg=cfg, **TINY['legacy_vit_improved'])[0]
    with torch.no_grad():
        torch.testing.assert_close(model(T4_OUT['pixel_values'], T4_OUT['input_ids']), T4_OUT['legacy_vit_improved']['sims'],
                                   rtol=0, atol=1e-6)


# ---------------------------------------------------------------- conversion to a save_pretrained folder

@pytest.mark.parametrize('name', ['legacy_vit_improved', 'legacy_swin_paper'])
def test_convert_checkpoint_gives_the_same_outputs(name, tmp_path, monkeypatch):
    out = convert_checkpoint(FIX / f'{name}.pth', tmp_path / 'converted', **TINY[name])
    assert out == tmp_path / 'converted'
    assert sorted(f.name for f in out.iterdir()) == ['README.md', 'backbones.json', 'checksums.json', 'config.json', 'model.safetensors']
    ref, ref_cfg, _ = load_legacy_checkpoint(FIX / f'{name}.pth', **TINY[name])
    _no_network(monkeypatch)
    conv = LAPSModel.from_pretrained(out)                                    # no flags, no overrides
    assert conv.cfg == ref_cfg.model
    with torch.no_grad():
        a = conv(T4_OUT['pixel_values'], T4_OUT['input_ids'])
        b = ref(T4_OUT['pixel_values'], T4_OUT['input_ids'])
    assert (a - b).abs().max().item() == 0
    torch.testing.assert_close(a, T4_OUT[name]['sims'], rtol=0, atol=1e-6)
    m, _, info = load_any_checkpoint(out)                                    # what `laps eval OUT` loads
    with torch.no_grad(): assert info['format'] == 'laps' and torch.equal(m(T4_OUT['pixel_values'], T4_OUT['input_ids']), b)
    card = (out / 'README.md').read_text()
    assert f'converted from the published checkpoint `{name}.pth` (epoch 12, best_rsum 512.5, Eiters 4321)' in card
    assert '- this checkpoint: epoch 12, step 4321' in card


def test_convert_checkpoint_refuses_a_non_empty_folder_and_bad_sources(tmp_path):
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match=r'out already exists and is not empty; .*overwrite=True'):
        convert_checkpoint(FIX / 'legacy_vit_improved.pth', tmp_path / 'out', **TINY['legacy_vit_improved'])
    assert sorted(f.name for f in (tmp_path / 'out').iterdir()) == ['keep.txt']
    with pytest.raises(FileExistsError, match=r'out holds files laps convert does not write: keep\.txt'):   # overwrite: only its own
        convert_checkpoint(FIX / 'legacy_vit_improved.pth', tmp_path / 'out', overwrite=True, **TINY['legacy_vit_improved'])
    assert sorted(f.name for f in (tmp_path / 'out').iterdir()) == ['keep.txt']
    (tmp_path / 'out' / 'keep.txt').unlink()
    convert_checkpoint(FIX / 'legacy_vit_improved.pth', tmp_path / 'out', **TINY['legacy_vit_improved'])
    convert_checkpoint(FIX / 'legacy_vit_improved.pth', tmp_path / 'out', overwrite=True, **TINY['legacy_vit_improved'])
    assert sorted(f.name for f in (tmp_path / 'out').iterdir()) == ['README.md', 'backbones.json', 'checksums.json', 'config.json',
                                                                    'model.safetensors']
    assert sorted(f.name for f in tmp_path.iterdir()) == ['out']                # replaced as a whole, nothing left over
    (tmp_path / 'bad.pth').write_text('hello, not a checkpoint')
    with pytest.raises(CheckpointError, match=r'bad\.pth: not a readable PyTorch checkpoint'):
        convert_checkpoint(tmp_path / 'bad.pth', tmp_path / 'out2')
    assert not (tmp_path / 'out2').exists()


# ---------------------------------------------------------------- flags -> config

def test_config_from_opt_backbones(tmp_path):
    notes = []
    cfg = config_from_opt(argparse.Namespace(vit_type='swin', img_res=224, sparse_ratio=0.8, aggr_ratio=0.6,
                                             bert_path='bert-large-uncased', lr=3.0), notes=notes)
    assert (cfg.vision_backbone, cfg.num_patches, cfg.n_aggregated, cfg.bert_path) == \
        ('microsoft/swin-base-patch4-window7-224', 49, 23, 'bert-base-uncased')
    assert any("'bert-large-uncased'" in n for n in notes) and any('lr' in n for n in notes)
    BERT.save_pretrained(tmp_path / 'mybert')                                # an existing local folder is kept
    assert config_from_opt({'bert_path': str(tmp_path / 'mybert')}).bert_path == str(tmp_path / 'mybert')
    with pytest.raises(ValueError, match="vit_type must be one of 'vit', 'swin', 'deit', 'conv-vit'; got 'resnet'"):
        config_from_opt({'vit_type': 'resnet'})


# ---------------------------------------------------------------- any checkpoint

def test_load_any_checkpoint_resolution(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    run = tmp_path / 'run'
    save_checkpoint(run / 'checkpoint_last', model, trainer_state={'epoch': 9})
    with pytest.raises(CheckpointError, match='run folder without checkpoint_best/; pass .*checkpoint_last'):
        load_any_checkpoint(run)
    assert load_any_checkpoint(run / 'checkpoint_last')[2]['epoch'] == 9
    save_checkpoint(run / 'checkpoint_best', model, trainer_state={'epoch': 5})
    m, cfg, info = load_any_checkpoint(run)
    assert (info['format'], info['epoch'], Path(info['path']).name) == ('laps', 5, 'checkpoint_best')
    assert torch.equal(_sims(m), _sims(model))
    old_run = tmp_path / 'released_run'
    old_run.mkdir()
    (old_run / 'model_best.pth').write_bytes((FIX / 'legacy_vit_improved.pth').read_bytes())
    assert resolve_checkpoint(old_run) == ('legacy', old_run / 'model_best.pth')
    assert load_any_checkpoint(old_run, **TINY['legacy_vit_improved'])[2]['format'] == 'legacy'
    with pytest.raises(FileNotFoundError, match='nowhere'):
        load_any_checkpoint(tmp_path / 'nowhere')
    with pytest.raises(CheckpointError, match='neither a checkpoint folder'):
        load_any_checkpoint(tmp_path)
