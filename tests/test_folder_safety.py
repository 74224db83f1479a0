"""Model folders and run directories as untrusted input, and commands that never destroy their input: `laps convert` keeps
its source, checksums catch corrupt weights, symbolic links out of a folder are refused, config values are type-checked,
and a device that is not there is one clear line."""
import argparse, hashlib, json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from transformers import ViTConfig, BertConfig
import laps.model.pretrained
from laps.checkpoint.run import save_checkpoint, load_checkpoint, load_any_checkpoint, resolve_checkpoint, refresh_model_card
from laps.core.config import LapsConfig, get_config
from laps.checkpoint.released import convert_checkpoint, load_legacy_checkpoint
from laps.model.modeling import LAPSModel
from laps.model.pretrained import config_from_json, read_pretrained
from laps.training.runner import prepare_run_dir
from laps.core.errors import CheckpointError
from laps.core.devices import resolve_device

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / 'tests' / 'fixtures'
T4 = json.loads((FIX / 'transformers4_keys.json').read_text())
TINY = dict(vision_backbone=ViTConfig(**T4['configs']['vit']), text_backbone=BertConfig(**T4['configs']['bert']))
PIX, IDS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)), torch.tensor([[2, 7, 9, 3], [2, 5, 3, 0], [2, 4, 4, 3]])
CONVERTED = ['README.md', 'backbones.json', 'checksums.json', 'config.json', 'model.safetensors']


def _laps(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'laps', *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(out, *expected: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and re.match(r'laps( \w+)?: error: ', lines[0]), out.stderr[-3000:]
    for s in expected: assert s in lines[0], (s, lines[0])
    return lines[0]


def _main(capsys, *argv):
    "(status, stderr) of `laps ARGV` in this process."
    from laps.cli import main
    capsys.readouterr()
    rc = main(list(map(str, argv)))
    return rc, capsys.readouterr().err


def _sha(p: Path) -> str: return hashlib.sha256(p.read_bytes()).hexdigest()


def _model(tiny_vit, tiny_bert, **kw):
    cfg = LapsConfig(embed_size=16, img_res=32, num_patches=16, vision_pretrained=False, text_pretrained=False,
                     similarity_calc_method='attn', use_token_selection=1, **kw)
    return LAPSModel(cfg, tiny_vit, tiny_bert).eval()


def _sims(model):
    with torch.no_grad(): return model.eval()(PIX, IDS)


def _stamp_ff(path: Path, n: int = 64) -> None:
    "Overwrite `n` bytes in the middle of a safetensors file's data with 0xFF (a float32 NaN pattern); the size stays."
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], 'little')
    at = header + (len(data) - header) // 2 // 4 * 4
    data[at:at + n] = b'\xff' * n
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- laps convert keeps its source

@pytest.fixture
def legacy(tmp_path):
    "A released run folder: legacy/model_best.pth and a note beside it; returns (folder, source, {file: sha256})."
    folder = tmp_path / 'legacy'
    folder.mkdir()
    shutil.copy(FIX / 'legacy_vit_improved.pth', folder / 'model_best.pth')
    (folder / 'NOTES.txt').write_text('how this model was trained\n')
    return folder, folder / 'model_best.pth', {f.name: _sha(f) for f in folder.iterdir()}


def _intact(folder, shas):
    assert {f.name: _sha(f) for f in folder.iterdir() if f.name in shas} == shas


@pytest.mark.parametrize('where', ['folder', 'above', 'itself', 'link'])
def test_convert_refuses_an_output_that_holds_its_source(legacy, where, tmp_path):
    folder, src, shas = legacy
    out = {'folder': folder, 'above': tmp_path, 'itself': src, 'link': tmp_path / 'link'}[where]
    if where == 'link': out.symlink_to(folder, target_is_directory=True)          # resolved: the source's folder
    for overwrite in (True, False):
        with pytest.raises(ValueError, match=r'holds? the source|is the source'):
            convert_checkpoint(src, out, overwrite=overwrite, **TINY)
        _intact(folder, shas)


def test_cli_convert_overwrite_of_the_source_folder_is_one_line(legacy, capsys):
    folder, src, shas = legacy
    _one_error_line(_laps('convert', src, folder, '--overwrite'), f'{folder}', 'source')
    _intact(folder, shas)
    for out in (folder.parent, src):
        rc, err = _main(capsys, 'convert', src, out, '--overwrite')
        assert rc == 2 and err.count('\n') == 1 and 'the output folder is replaced as a whole' in err, err
        _intact(folder, shas)


def test_convert_overwrite_replaces_only_what_it_wrote(legacy, tmp_path, monkeypatch):
    _, src, shas = legacy
    out = tmp_path / 'converted'
    convert_checkpoint(src, out, **TINY)
    assert sorted(f.name for f in out.iterdir()) == CONVERTED
    (out / 'model.safetensors').write_bytes(b'an older conversion')
    convert_checkpoint(src, out, overwrite=True, **TINY)                        # its own output: replaced
    assert sorted(f.name for f in out.iterdir()) == CONVERTED
    assert torch.equal(_sims(LAPSModel.from_pretrained(out)), _sims(load_legacy_checkpoint(src, **TINY)[0]))
    (out / 'mine.txt').write_text('a file of the user')
    (out / 'plots').mkdir()
    with pytest.raises(FileExistsError, match=r"holds files laps convert does not write: mine\.txt, plots"):
        convert_checkpoint(src, out, overwrite=True, **TINY)
    assert (out / 'mine.txt').read_text() == 'a file of the user' and (out / 'model.safetensors').is_file()
    (out / 'mine.txt').unlink(); (out / 'plots').rmdir()
    first = {f.name: _sha(f) for f in out.iterdir()}
    def boom(*a, **k): raise OSError('No space left on device')                 # a failed replacement keeps the old output
    monkeypatch.setattr(laps.model.pretrained, 'save_file', boom)
    with pytest.raises(OSError, match='No space left'): convert_checkpoint(src, out, overwrite=True, **TINY)
    monkeypatch.undo()
    assert {f.name: _sha(f) for f in out.iterdir()} == first
    assert sorted(f.name for f in tmp_path.iterdir()) == ['converted', 'legacy']
    _intact(src.parent, shas)


# ---------------------------------------------------------------- checksums of model folders

def test_folders_record_checksums_of_what_they_load(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    model.save_pretrained(tmp_path / 'm')
    rec = json.loads((tmp_path / 'm' / 'checksums.json').read_text())
    assert rec['algorithm'] == 'sha256'
    assert sorted(rec['files']) == ['backbones.json', 'config.json', 'model.safetensors']      # not README.md
    assert rec['files']['model.safetensors'] == {'sha256': _sha(tmp_path / 'm' / 'model.safetensors'),
                                                 'bytes': (tmp_path / 'm' / 'model.safetensors').stat().st_size}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = save_checkpoint(tmp_path / 'run' / 'checkpoint_last', model, trainer_state={'epoch': 1}, optimizer=opt)
    assert sorted(json.loads((p / 'checksums.json').read_text())['files']) == \
        ['backbones.json', 'config.json', 'model.safetensors', 'trainer_state.json', 'trainer_state.pt']
    (tmp_path / 'run' / 'commands.jsonl').write_text('{"argv": ["laps", "train"]}\n')
    refresh_model_card(p)                                                   # the card is rewritten: still loads
    assert torch.equal(_sims(load_checkpoint(p)[0]), _sims(model))


def test_corrupt_weights_are_refused_naming_the_file(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'ck', model)
    _stamp_ff(p / 'model.safetensors')
    with pytest.raises(CheckpointError, match=r'ck/model\.safetensors: SHA-256 .* differs'):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match=r'ck/model\.safetensors: SHA-256'):
        LAPSModel.from_pretrained(p)
    save_checkpoint(p, model, trainer_state={'epoch': 1})
    (p / 'trainer_state.json').write_text('{"epoch": 99}\n')               # the trainer state is covered too
    with pytest.raises(CheckpointError, match=r'ck/trainer_state\.json: .*recorded'):
        load_checkpoint(p)


def test_cli_eval_of_corrupt_weights_is_one_line(tiny_vit, tiny_bert, tmp_path):
    p = save_checkpoint(tmp_path / 'ck', _model(tiny_vit, tiny_bert))
    _stamp_ff(p / 'model.safetensors')
    _one_error_line(_laps('eval', p, '--data_path', tmp_path / 'nodata'), f'{p / "model.safetensors"}: SHA-256')


def test_a_folder_without_checksums_loads_as_before_but_not_with_nan_weights(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'old', model, trainer_state={'epoch': 3})
    (p / 'checksums.json').unlink()                                         # a folder written before checksums
    m, _, state = load_checkpoint(p)
    assert state['epoch'] == 3 and torch.equal(_sims(m), _sims(model))
    assert torch.equal(_sims(LAPSModel.from_pretrained(p)), _sims(model))
    _stamp_ff(p / 'model.safetensors')
    with pytest.raises(CheckpointError, match=r'old/model\.safetensors: non-finite values \(NaN or inf\) in tensor \S+'):
        load_checkpoint(p)


def test_legacy_checkpoint_with_nan_weights_is_refused(tmp_path):
    import argparse as _a
    with torch.serialization.safe_globals([_a.Namespace]):
        raw = torch.load(FIX / 'legacy_vit_improved.pth', weights_only=True)
    key = 'img_enc.vision_proj.weight'
    raw['model'][key] = raw['model'][key].clone().fill_(float('inf'))
    torch.save(raw, tmp_path / 'inf.pth')
    with pytest.raises(CheckpointError, match=rf'inf\.pth: non-finite values \(NaN or inf\) in tensor {re.escape(key)}'):
        load_legacy_checkpoint(tmp_path / 'inf.pth', **TINY)


# ---------------------------------------------------------------- symbolic links out of a run or model folder

@pytest.mark.parametrize('entry', ['checkpoint_best', '.checkpoint_best.old'])
def test_run_folder_links_out_are_refused(entry, tiny_vit, tiny_bert, tmp_path):
    elsewhere = save_checkpoint(tmp_path / 'elsewhere' / 'ck', _model(tiny_vit, tiny_bert))
    run = tmp_path / 'run'
    run.mkdir()
    (run / entry).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(run))}: '{re.escape(entry)}' leads outside"):
        load_any_checkpoint(run)
    if entry.endswith('.old'):                                              # the backup of a missing checkpoint_best
        with pytest.raises(CheckpointError, match=r"'\.checkpoint_best\.old' leads outside"):
            load_checkpoint(run / 'checkpoint_best')


def test_released_run_folder_link_out_is_refused(tmp_path):
    run = tmp_path / 'released'
    run.mkdir()
    (run / 'model_best.pth').symlink_to(FIX / 'legacy_vit_improved.pth')
    with pytest.raises(CheckpointError, match=r"'model_best\.pth' leads outside"):
        resolve_checkpoint(run)


def test_links_inside_a_folder_are_followed(tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    p = save_checkpoint(tmp_path / 'run' / 'ck-7', model, trainer_state={'epoch': 7})
    (tmp_path / 'run' / 'checkpoint_best').symlink_to('ck-7', target_is_directory=True)
    m, _, info = load_any_checkpoint(tmp_path / 'run')
    assert info['epoch'] == 7 and torch.equal(_sims(m), _sims(model))


@pytest.mark.parametrize('name', ['config.json', 'backbones.json', 'model.safetensors', 'trainer_state.json', 'trainer_state.pt',
                                  'run_config.json'])
def test_model_folder_file_links_out_are_refused(name, tiny_vit, tiny_bert, tmp_path):
    model = _model(tiny_vit, tiny_bert)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    p = save_checkpoint(tmp_path / 'ck', model, LapsConfig.from_model(model.cfg), trainer_state={'epoch': 1}, optimizer=opt)
    (p / 'checksums.json').unlink()                                         # even without checksums
    (tmp_path / name).write_bytes((p / name).read_bytes())
    (p / name).unlink()
    (p / name).symlink_to(tmp_path / name)
    with pytest.raises(CheckpointError, match=rf"ck: '{re.escape(name)}' leads outside"):
        load_checkpoint(p)


def test_resume_refuses_a_run_directory_with_links_out(tmp_path, tiny_vit, tiny_bert):
    elsewhere = save_checkpoint(tmp_path / 'elsewhere', _model(tiny_vit, tiny_bert), trainer_state={'epoch': 0})
    cfg = LapsConfig(logger_name=str(tmp_path / 'run'))
    run = prepare_run_dir(cfg, resume=False, command=['laps', 'train'])
    (run / 'checkpoint_last').symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"'checkpoint_last' leads outside"):
        prepare_run_dir(cfg, resume=True, command=['laps', 'train', '--resume'])


# ---------------------------------------------------------------- configuration values

@pytest.mark.parametrize('field,value,msg', [
    ('embed_size', '128', "embed_size must be an integer, got '128' (str)"),
    ('num_patches', None, 'num_patches must be an integer, got None'),
    ('batch_size', 32.0, 'batch_size must be an integer, got 32.0 (float)'),
    ('learning_rate', '1e-3', "learning_rate must be a number, got '1e-3' (str)"),
    ('margin', True, 'margin must be a number, got True (bool)'),
    ('data_path', 3, 'data_path must be a string, got 3 (int)'),
    ('img_path', ['x'], "img_path must be a string or null, got ['x'] (list)"),
    ('lr_schedules', 9, 'lr_schedules must be a list of integers, got 9 (int)'),
    ('lr_schedules', [9, '15'], "lr_schedules must be a list of integers, got [9, '15']"),
    ('vision_pretrained', 'yes', "vision_pretrained must be true or false, got 'yes' (str)"),
    ('learning_rate', float('nan'), 'learning_rate must be a finite number, got nan'),
])
def test_config_types_are_checked_naming_the_field(field, value, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        LapsConfig(**{field: value})


def test_config_accepts_the_usual_spellings():
    cfg = LapsConfig(max_violation=1, eval=True, learning_rate=1, margin=0, img_path=None, lr_schedules=(3, 5), seed=7)
    assert (cfg.learning_rate, cfg.lr_schedules, cfg.max_violation) == (1, [3, 5], 1)
    for preset in ('paper', 'paper-swin', 'improved', 'cpu', 'cpu-released'): get_config(preset)


@pytest.mark.parametrize('field,value', [('num_epochs', 0), ('num_epochs', -1), ('learning_rate', 0), ('log_step', 0),
                                         ('val_step', -1), ('workers', -1), ('margin', -0.1), ('grad_clip', 0),
                                         ('decay_rate', 0), ('seed', -1), ('gpu_id', -1), ('device', 'gpu'), ('device', 'cuda:x')])
def test_config_ranges(field, value):
    with pytest.raises(ValueError, match=re.escape(field)):
        LapsConfig(**{field: value})


def test_config_json_errors_name_the_file_and_the_field(tiny_vit, tiny_bert, tmp_path):
    with pytest.raises(CheckpointError, match=r"m/config\.json: invalid configuration: embed_size must be an integer, got '128'"):
        config_from_json({'embed_size': '128'}, tmp_path / 'm' / 'config.json')
    _model(tiny_vit, tiny_bert).save_pretrained(tmp_path / 'm')
    d = json.loads((tmp_path / 'm' / 'config.json').read_text())
    (tmp_path / 'm' / 'config.json').write_text(json.dumps(dict(d, num_patches=None)))
    (tmp_path / 'm' / 'checksums.json').unlink()
    with pytest.raises(CheckpointError, match=r'm/config\.json: invalid configuration: num_patches must be an integer, got None'):
        read_pretrained(tmp_path / 'm')


def test_cli_train_refuses_no_epochs_and_an_empty_logger_name(tmp_path, monkeypatch, capsys):
    _one_error_line(_laps('train', '--preset', 'cpu', '--num_epochs', '-1', '--logger_name', tmp_path / 'r', cwd=tmp_path),
                    'num_epochs must be at least 1, got -1')
    monkeypatch.chdir(tmp_path)
    rc, err = _main(capsys, 'train', '--preset', 'cpu', '--logger_name', '', '--data_path', tmp_path / 'nodata')
    assert (rc, err) == (2, 'laps: error: --logger_name is empty: name the run directory (e.g. runs/my_run)\n')
    assert list(tmp_path.iterdir()) == []                                   # nothing written into the current folder


def test_prepare_run_dir_refuses_the_current_folder_and_the_root(tmp_path, monkeypatch):
    (tmp_path / 'work').mkdir()
    monkeypatch.chdir(tmp_path / 'work')
    for name in ('', '.', './', '..', '/', str(tmp_path / 'work'), 'sub/..'):
        with pytest.raises(ValueError, match=r'--logger_name'):
            prepare_run_dir(LapsConfig(logger_name=name), resume=False, command=['laps', 'train'])
    assert list((tmp_path / 'work').iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ['work']
    assert prepare_run_dir(LapsConfig(logger_name='runs/a'), resume=False, command=['laps']) == Path('runs/a')


# ---------------------------------------------------------------- devices

def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    assert resolve_device('auto') == torch.device('cpu') and resolve_device('cpu') == torch.device('cpu')
    for dev in ('cuda', 'cuda:0', 'cuda:3'):
        with pytest.raises(ValueError, match=re.escape(f"--device {dev}: this torch ({torch.__version__}) has no CUDA "
                                                       f"device; use --device cpu or auto")):
            resolve_device(dev)
    for dev in ('gpu', 'cuda:x', 'mps:0', ''):
        with pytest.raises(ValueError, match=re.escape(f"--device {dev!r}: expected auto, cpu, cuda, cuda:N or mps")):
            resolve_device(dev)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    with pytest.raises(ValueError, match='--device mps: this machine has no MPS device'): resolve_device('mps')


def test_resolve_device_beyond_the_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('cuda:1') == torch.device('cuda:1') and resolve_device('auto', 1) == torch.device('cuda:1')
    with pytest.raises(ValueError, match=re.escape('--device cuda:2: this machine has 2 CUDA devices (cuda:0 to cuda:1)')):
        resolve_device('cuda:2')
    with pytest.raises(ValueError, match=re.escape('--gpu_id 5: this machine has 2 CUDA devices')):
        resolve_device('auto', 5)


def test_cli_device_that_is_not_there_is_one_line_before_any_model_is_loaded(tiny_vit, tiny_bert, tmp_path, monkeypatch, capsys):
    p = save_checkpoint(tmp_path / 'ck', _model(tiny_vit, tiny_bert))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)          # any machine: a CPU-only torch
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    def no_load(*a, **k): raise AssertionError('a model was loaded before the device was checked')
    monkeypatch.setattr('laps.checkpoint.run.load_any_checkpoint', no_load)
    msg = f"--device cuda: this torch ({torch.__version__}) has no CUDA device; use --device cpu or auto"
    for argv in (['train', '--preset', 'cpu', '--device', 'cuda', '--logger_name', tmp_path / 'r'],
                 ['eval', p, '--device', 'cuda'], ['eval', p, '--rerank_topk', '5', '--device', 'cuda'],
                 ['index', p, '--images', tmp_path, '--out', tmp_path / 'idx', '--device', 'cuda'],
                 ['search', tmp_path / 'idx', 'a red circle', '--device', 'cuda']):
        rc, err = _main(capsys, *argv)
        assert (rc, err) == (2, f'laps: error: {msg}\n'), (argv, err)
    assert not (tmp_path / 'r').exists() and not (tmp_path / 'idx').exists()
    rc, err = _main(capsys, 'train', '--preset', 'cpu', '--device', 'gpu', '--logger_name', tmp_path / 'r')
    assert rc == 2 and "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_cli_train_device_cuda_without_cuda_is_one_line(tmp_path):
    _one_error_line(_laps('train', '--preset', 'cpu', '--device', 'cuda', '--logger_name', tmp_path / 'r'),
                    f"--device cuda: this torch ({torch.__version__}) has no CUDA device; use --device cpu or auto")
    assert not (tmp_path / 'r').exists()


@pytest.mark.parametrize('fname, edit, expect', [
    ('config.json', lambda p: p.write_text('[' * 100_000), 'config.json: unreadable JSON (RecursionError'),
    ('checksums.json', lambda p: p.write_text('[' * 100_000), 'checksums.json: unreadable'),
    ('checksums.json', lambda p: p.write_text(json.dumps({'algorithm': 'sha256', 'files': {}})),
     'lists no checksum of config.json, backbones.json, model.safetensors'),
    ('backbones.json', lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), 'text': {
        'model_type': 'bert', 'config': {**json.loads(p.read_text())['text']['config'], 'num_hidden_layers': '1'}}})),
     'invalid backbone configs'),
])
def test_a_hostile_folder_file_is_one_line(fname, edit, expect, tiny_vit, tiny_bert, tmp_path):
    "Deeply nested JSON, checksums that cover nothing, a wrong-typed backbone field: one line each, not a traceback."
    p = save_checkpoint(tmp_path / 'ck', _model(tiny_vit, tiny_bert))
    edit(p / fname)
    if fname != 'checksums.json': (p / 'checksums.json').unlink()           # the damage itself, not its checksum, is refused
    _one_error_line(_laps('eval', p, '--data_path', tmp_path / 'nodata'), expect)
