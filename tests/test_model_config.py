"""ModelConfig apart from the run: what a model folder's config.json holds, the LapsConfig alias of the model classes, and
the checkpoints written before the split (tests/fixtures/legacy, made by the code of ae47892) loading and scoring as then."""
import json, shutil
from pathlib import Path
import pytest
import torch
from transformers import ViTConfig, BertConfig
from laps.core.config import LapsConfig, ModelConfig, get_config
from laps.model.modeling import LAPSModel
from laps.model.crossnet import CrossNet
from laps.checkpoint.run import load_any_checkpoint, load_checkpoint, save_checkpoint, refresh_model_card
from laps.checkpoint.released import load_legacy_checkpoint
from laps.retrieval.store import check_same_model, model_record

# The config fields an index recorded before ModelConfig existed (laps.retrieval.index.MODEL_FIELDS at ae47892).
MODEL_FIELDS = ('vit_type', 'vision_backbone', 'bert_path', 'img_res', 'num_patches', 'embed_size', 'max_word',
                'text_layers', 'sparse_ratio', 'aggr_ratio', 'use_cls_as_glob_embd', 'use_token_selection',
                'token_selection_strategy', 'token_selection_ratio', 'similarity_calc_method', 'use_learnable_temp',
                'score_threshold', 'glob_loss_weight')

LEGACY = Path(__file__).parent / 'fixtures' / 'legacy'
EXP = json.loads((LEGACY / 'expected.json').read_text())
VIT, BERT = ViTConfig(**EXP['vit']), BertConfig(**EXP['bert'])
PIX = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(EXP['pixel_seed']))
IDS = torch.tensor(EXP['input_ids'])


def _assert_scores(model, kind):
    with torch.no_grad(): sims = model.eval()(PIX, IDS)
    torch.testing.assert_close(sims, torch.tensor(EXP['sims'][kind]), rtol=0, atol=1e-6)


def test_model_config_is_the_architecture_part_of_the_flags():
    run = get_config('cpu')
    assert set(ModelConfig.__dataclass_fields__) < set(LapsConfig.__dataclass_fields__)
    assert run.model == ModelConfig(**{k: getattr(run, k) for k in ModelConfig.__dataclass_fields__})
    assert (run.model.n_kept, run.model.n_aggregated) == (run.n_kept, run.n_aggregated) == (32, 12)
    assert LapsConfig.from_model(run.model, **{k: v for k, v in run.to_dict().items()}) == run
    for name in ('logger_name', 'data_path', 'batch_size', 'learning_rate', 'engine', 'device', 'val_split'):
        assert name not in ModelConfig.__dataclass_fields__, name
    with pytest.raises(ValueError, match='sparse_ratio must be in'): LapsConfig(sparse_ratio=0)   # the model's checks still apply


def test_the_flat_run_config_still_builds_the_model():
    run = LapsConfig(embed_size=16, img_res=32, num_patches=16, vision_pretrained=False, text_pretrained=False,
                     similarity_calc_method='attn', use_token_selection=1, engine='reference')
    torch.manual_seed(0); a = LAPSModel(run, VIT, BERT).eval()
    torch.manual_seed(0); b = LAPSModel(run.model, VIT, BERT, engine='reference').eval()
    assert isinstance(a.cfg, ModelConfig) and a.cfg == run.model and a.cross_net.engine == 'reference'
    with torch.no_grad(): assert torch.equal(a(PIX, IDS), b(PIX, IDS))
    assert CrossNet(run).engine == 'reference' and CrossNet(run.model).engine == 'fast'


def test_save_pretrained_writes_only_the_model_config_and_the_run_keeps_its_own(tmp_path):
    run = LapsConfig(embed_size=16, img_res=32, num_patches=16, vision_pretrained=False, text_pretrained=False,
                     logger_name=str(tmp_path / 'run'), dataset='synthetic', val_split='dev')
    model = LAPSModel(run.model, VIT, BERT).eval()
    model.save_pretrained(tmp_path / 'folder')
    assert json.loads((tmp_path / 'folder' / 'config.json').read_text()) == run.model.to_dict()
    (tmp_path / 'run').mkdir(); (tmp_path / 'run' / 'commands.jsonl').write_text('{}\n')
    (tmp_path / 'run' / 'config.json').write_text(json.dumps(run.to_dict()))
    p = save_checkpoint(tmp_path / 'run' / 'checkpoint_best', model, run, {'epoch': 0})
    assert json.loads((p / 'config.json').read_text()) == run.model.to_dict()
    loaded, cfg, _ = load_any_checkpoint(tmp_path / 'run')
    assert cfg == run and loaded.cfg == run.model                      # the run's config from <run>/config.json
    assert '| data | dataset `synthetic`' in refresh_model_card(p).read_text()
    _, alone, _ = load_checkpoint(tmp_path / 'folder')                 # no run around it: the run fields' defaults
    assert alone == LapsConfig.from_model(run.model) and alone.logger_name == 'runs/test'


def test_old_save_pretrained_folder_loads_and_scores_the_same():
    model = LAPSModel.from_pretrained(LEGACY / 'pretrained')
    saved = json.loads((LEGACY / 'pretrained' / 'config.json').read_text())
    assert 'logger_name' in saved and model.cfg == ModelConfig.from_dict(saved, strict=False)   # a whole LapsConfig then
    assert model.has_global_head
    _assert_scores(model, 'pretrained')
    m2, cfg, info = load_any_checkpoint(LEGACY / 'pretrained')
    assert cfg == LapsConfig.from_dict(saved) and info['format'] == 'laps'   # its run fields, as saved
    _assert_scores(m2, 'pretrained')


def test_old_run_directory_loads_and_scores_the_same(tmp_path):
    model, cfg, info = load_any_checkpoint(LEGACY / 'run')
    assert cfg == LapsConfig.from_dict(json.loads((LEGACY / 'run' / 'config.json').read_text()))
    assert (cfg.batch_size, cfg.num_epochs, info['epoch'], info['best_rsum']) == (4, 2, 1, 123.5)
    _assert_scores(model, 'run')
    copy = shutil.copytree(LEGACY / 'run', tmp_path / 'run')           # the card is rewritten from the run's config
    assert '| data | dataset `synthetic`' in refresh_model_card(copy / 'checkpoint_best').read_text()


def test_old_published_pth_loads_and_scores_the_same():
    model, cfg, info = load_legacy_checkpoint(LEGACY / 'published.pth', vision_backbone=VIT, text_backbone=BERT)
    assert isinstance(cfg, LapsConfig) and model.cfg == cfg.model and not cfg.vision_pretrained
    assert (info['epoch'], info['best_rsum'], info['step']) == (3, 321.5, 99)
    _assert_scores(model, 'published')
    m2, _, _ = load_any_checkpoint(LEGACY / 'published.pth', vision_backbone=VIT, text_backbone=BERT)
    _assert_scores(m2, 'published')


def test_index_record_is_the_model_config_and_old_records_still_match():
    model = LAPSModel.from_pretrained(LEGACY / 'pretrained')
    rec = model_record(model, model.cfg)
    assert rec['config'] == model.cfg.to_dict()
    old = dict(rec, config={k: rec['config'][k] for k in MODEL_FIELDS})   # what an index built before the split recorded
    check_same_model(old, rec, 'idx')
    with pytest.raises(ValueError, match=r"idx: built with another config \(embed_size=8\)"):
        check_same_model(dict(old, config=dict(old['config'], embed_size=8)), rec, 'idx')
