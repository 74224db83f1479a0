"""`laps pretrain` end to end at a tiny size, and the shipped built-in backbone `laps/conv-vit-synth`: loadable, documented, the cpu preset's."""
import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from laps.core.config import get_config
from laps.model.encoders import BUILTIN_FOLDERS, backbone_config, build_backbone, synthetic_backbone_path
from laps.training.pretrain import LABEL_GROUPS, render_pretrain_set, to_batch


def test_pretrain_command_tiny(tmp_path):
    out, log = tmp_path / 'bb', tmp_path / 'log'
    r = subprocess.run([sys.executable, '-m', 'laps', 'pretrain', '--out', str(out), '--n_train', '48', '--n_val', '16',
                        '--epochs', '1', '--batch_size', '16', '--precision', 'fp32', '--quiet', '--log_dir', str(log)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors', 'pretrain.json']
    rec = json.loads((out / 'pretrain.json').read_text())
    assert rec['config']['n_train'] == 48 and rec['config']['seed'] == 1234 and set(rec['held_out']) == {*LABEL_GROUPS, 'patch'}
    assert rec['command']['argv'][:2] == ['laps', 'pretrain'] and '--n_train' in rec['command']['argv']
    card = (out / 'README.md').read_text()
    assert 'laps pretrain --out' in card and 'seed 1234' in card and '| shape_colour | 35 |' in card
    assert (log / 'train_log.jsonl').is_file() or (log / 'tensorboard').is_dir()
    bb = build_backbone(str(out))                                            # loads as a Hugging Face folder
    assert type(bb).__name__ == 'ConvStemViTModel'
    again = subprocess.run([sys.executable, '-m', 'laps', 'pretrain', '--out', str(out), '--n_train', '8', '--quiet'],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and 'pass --force' in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert json.loads((out / 'pretrain.json').read_text())['config']['n_train'] == 48   # refused: nothing replaced


def test_pretrain_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    r = subprocess.run([sys.executable, '-m', 'laps', 'pretrain', '--out', str(tmp_path / 'mine'), '--force', '--quiet'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'holds no pretrain.json' in r.stderr
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == ['notes.txt']


def test_the_shipped_backbone():
    folder = synthetic_backbone_path()
    assert BUILTIN_FOLDERS['laps/conv-vit-synth']() == folder and folder.parent.name == 'weights'
    assert (folder / 'model.safetensors').stat().st_size < 5_000_000            # a few MB, in the repository
    rec = json.loads((folder / 'pretrain.json').read_text())
    assert rec['config']['backbone'] == 'laps/conv-vit-64' and rec['command']['commit']
    assert rec['config']['seed'] not in (0, 1, 2)                              # not the benchmark's seeds
    card = (folder / 'README.md').read_text()
    assert rec['command']['commit'] in card and f"seed {rec['config']['seed']}" in card
    ours, arch = backbone_config('laps/conv-vit-synth'), backbone_config('laps/conv-vit-64')
    bookkeeping = ('architectures', 'dtype', 'torch_dtype', 'transformers_version', '_name_or_path')   # not the architecture
    same = lambda c: {k: v for k, v in c.to_dict().items() if k not in bookkeeping}
    assert same(ours) == same(arch)                                          # the cpu preset's architecture, unchanged
    assert rec['held_out']['patch']['objects'] > 50                         # it has learnt to see (held-out, its record)


def test_cpu_preset_fine_tunes_from_it_and_scratch_is_one_flag_away():
    cfg = get_config('cpu')
    assert (cfg.vision_backbone, cfg.vision_pretrained) == ('laps/conv-vit-synth', True)
    x = to_batch(render_pretrain_set(2, seed=5)[0])
    torch.manual_seed(0)
    pre, scratch = build_backbone(cfg.vision_backbone, cfg.vision_pretrained), build_backbone(cfg.vision_backbone, False)
    shipped = build_backbone(str(synthetic_backbone_path()))
    pre.eval(); scratch.eval(); shipped.eval()
    with torch.no_grad():
        assert torch.equal(pre(pixel_values=x).last_hidden_state, shipped(pixel_values=x).last_hidden_state)
        assert not torch.allclose(pre(pixel_values=x).last_hidden_state, scratch(pixel_values=x).last_hidden_state)
