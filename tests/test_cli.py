"""The command line as a new user meets it: one-line errors, the released eval command, ensembles, no dev tools."""
import ast, fractions, json, os, re, subprocess, sys, tomllib
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
import laps
from laps.checkpoint.run import save_checkpoint
from laps.core.config import LapsConfig
from laps.eval.metrics import evaluate_sims, format_metrics, load_sims, recall_ci95, save_sims, sims_metadata_path
from laps.model.modeling import LAPSModel

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / 'tests' / 'fixtures'


def _laps(*args, cwd=ROOT):
    "`python -m laps ARGS` in a subprocess that imports this checkout's laps."
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'laps', *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(out, *expected: str) -> str:
    "Assert status 2 and exactly one `laps...: error:` line on stderr holding each of `expected`; return it."
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert 'Traceback' not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and re.match(r'laps( \w+)?: error: ', lines[0]), out.stderr
    for s in expected: assert s in lines[0], (s, lines[0])
    return lines[0]


# ---------------------------------------------------------------- the runtime without dev tools

def test_no_module_imports_dev_tools():
    "`pip install .` has no fastcore/nbdev/execnb: no exported module may import them (at the top or inside a function)."
    dev = {'fastcore', 'nbdev', 'execnb'}
    found = []
    files = sorted((ROOT / 'laps').rglob('*.py'))
    assert len(files) > 50 and any(f.parent.name == 'model' for f in files)   # every subpackage's modules
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ''] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split('.')[0] in dev]
    assert not found, found


def test_package_docstring_and_version():
    assert laps.__doc__ and laps.__doc__.startswith('LAPS (Linguistic-Aware Patch Slimming)')
    assert laps.__version__ == tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']
    assert laps.__version__ == re.search(r'^version\s*=\s*(\S+)', (ROOT / 'settings.ini').read_text(), re.M)[1]


def test_help_texts_come_from_the_config_comments():
    out = _laps('train', '--help')
    assert out.returncode == 0, out.stderr
    text = ' '.join(out.stdout.split())
    assert ('--attention_weight ATTENTION_WEIGHT accepted for command-line compatibility; unused by the released '
            'model (default: 0.8)') in text
    assert '--sparse_ratio SPARSE_RATIO fraction of patches kept by LPS (default: 0.5)' in text
    out = _laps('--help')
    assert out.returncode == 0 and '--debug' in out.stdout and 'convert' in out.stdout


def test_help_and_usage_errors_start_without_torch():
    "`laps --help`, `laps eval --help` and a usage error answer at once: torch and transformers are not imported."
    code = ("import contextlib, io, sys; from laps.cli import main\n"
            "for argv in (['--help'], ['eval', '--help'], ['convert', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): main(argv)\n"
            "with contextlib.redirect_stderr(io.StringIO()): assert main(['eval']) == 2\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == '[]', (out.stdout, out.stderr[-2000:])


# ---------------------------------------------------------------- expected errors: one line, status 2

def _corrupt(p): p.write_bytes(b'PK\x03\x04 this is not a torch checkpoint' * 10)
def _empty(p): p.write_bytes(b'')
def _foreign_class(p): torch.save({'model': {'w': torch.ones(1)}, 'opt': fractions.Fraction(1, 3)}, p)  # refused
def _foreign_dict(p): torch.save({'state_dict': {'fc.weight': torch.ones(2, 2)}, 'epoch': 3}, p)

BAD = {'corrupt': (_corrupt, 'not a readable PyTorch checkpoint'),
       'empty': (_empty, 'the file is empty'),
       'foreign_class': (_foreign_class, 'refused to load: it contains a pickled Python object of type fractions.Fraction'),
       'foreign_dict': (_foreign_dict, "expected a LAPS checkpoint dict with 'model'")}


@pytest.mark.parametrize('case', sorted(BAD))
def test_eval_bad_checkpoint_is_one_line(case, tmp_path):
    path = tmp_path / f'{case}.pth'
    make, why = BAD[case]
    make(path)
    _one_error_line(_laps('eval', path), f'laps: error: {path}: ', why)


def test_eval_missing_file_and_a_checkpoint_of_another_model(tmp_path):
    _one_error_line(_laps('eval', tmp_path / 'nowhere.pth'), f'checkpoint {tmp_path / "nowhere.pth"} does not exist')
    # a published checkpoint of a tiny model: its flags name the paper's ViT-B/16 at 32 px, which leaves 4 patches
    _one_error_line(_laps('eval', FIX / 'legacy_vit_improved.pth'), f'{FIX / "legacy_vit_improved.pth"}: ',
                    "its 'opt' flags are not a valid configuration")


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / 'bad.pth'
    _corrupt(path)
    for argv in (['--debug', 'eval', path], ['eval', path, '--debug']):
        out = _laps(*argv)
        assert out.returncode == 2 and out.stderr.startswith('Traceback (most recent call last)'), out.stderr[-2000:]
        assert 'CheckpointError' in out.stderr and str(path) in out.stderr


def test_usage_errors_are_one_line():
    _one_error_line(_laps('eval', '--gpu-id', 'zero'), "argument --gpu-id/--gpu_id: invalid int value: 'zero'",
                    '(see laps eval --help)')
    _one_error_line(_laps('train', '--similarity_calc_method', 'cosine'), "invalid choice: 'cosine'")
    _one_error_line(_laps('eval'), 'laps eval needs a run directory, checkpoint folder or .pth')
    _one_error_line(_laps('train', '--sparse_ratio', '2'), 'sparse_ratio must be in (0, 1]')


def test_convert_errors_are_one_line(tmp_path):
    _one_error_line(_laps('convert', tmp_path / 'nowhere.pth', tmp_path / 'out'), str(tmp_path / 'nowhere.pth'))
    _corrupt(tmp_path / 'bad.pth')
    _one_error_line(_laps('convert', tmp_path / 'bad.pth', tmp_path / 'out'), f'{tmp_path / "bad.pth"}: ',
                    'not a readable PyTorch checkpoint')
    assert not (tmp_path / 'out').exists()
    (tmp_path / 'full').mkdir(); (tmp_path / 'full' / 'x').write_text('x')
    _one_error_line(_laps('convert', FIX / 'legacy_vit_improved.pth', tmp_path / 'full'),
                    f'{tmp_path / "full"} already exists and is not empty')


# ---------------------------------------------------------------- the released evaluation command line

N_IMG = 4


@pytest.fixture(scope='module')
def released_layout(tmp_path_factory):
    "A working folder as the released eval.py expects: data/f30k (test split only, real caption layout) and runs/."
    root = tmp_path_factory.mktemp('released')
    f30k = root / 'data' / 'f30k'
    (f30k / 'images').mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours, shapes = ['red', 'green', 'blue', 'yellow'], ['circle', 'square', 'star', 'cross']
    caps, ids, mapping = [], [], {}
    for i in range(N_IMG):
        img_id = 1000 + i
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(f30k / 'images' / f'{img_id}.jpg')
        mapping[str(img_id)] = f'{img_id}.jpg'
        caps += [f'a {colours[i]} {shapes[(i + k) % 4]} on the left number {k}' for k in range(5)]
        ids += [str(img_id)] * 5
    (f30k / 'test_caps.txt').write_text('\n'.join(caps) + '\n')
    (f30k / 'test_ids.txt').write_text('\n'.join(ids) + '\n')
    (f30k / 'id_mapping.json').write_text(json.dumps(mapping))
    for kind, folder in (('vit', 'runs/f30k_vit/checkpoint_best'), ('swin', 'runs/f30k_swin')):
        torch.manual_seed(0)
        cfg = LapsConfig(dataset='f30k', data_path='/elsewhere/data', vit_type=kind, img_res=32, num_patches=16,
                         embed_size=16, bert_path='minilm', vision_pretrained=False, text_pretrained=False, workers=0)
        save_checkpoint(root / folder, LAPSModel(cfg, f'laps/tiny-{kind}', 'laps/tiny-bert'), save_rng=False)
    return root


def test_released_eval_command(released_layout):
    root = released_layout
    out = _laps('eval', '--dataset', 'f30k', '--data_path', 'data/', '--gpu-id', '0', '--save_results', '1',
                '--no_progress', cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    for run in ('runs/f30k_vit', 'runs/f30k_swin'):                      # a table per model, in the released order
        sims = load_sims(root / run / 'results_f30k.npy')
        assert sims.shape == (N_IMG, 5 * N_IMG)
        meta = json.loads(sims_metadata_path(root / run / 'results_f30k.npy').read_text())
        assert {k: v for k, v in meta.items() if k not in ('data', 'model')} == \
            {'dataset': 'f30k', 'split': 'test', 'shape': [N_IMG, 5 * N_IMG],
             'protocol': {'captions_per_image': 5, 'fold_size': None, 'full_pass_prefix': None}}
        # the sidecar says which data and which model produced the matrix (the released runs are model folders, not
        # run directories: the matrix goes beside them, as the released eval.py put it)
        assert (meta['data']['data_path'], meta['data']['split']) == (str((root / 'data').resolve()), 'test')
        assert meta['model']['path'] == str((root / run / ('checkpoint_best' if 'vit' in run else '')).resolve())
        expected = {**evaluate_sims(sims, 'f30k'), **recall_ci95(sims, 'f30k')}
        assert f"{run} (f30k test)\n{format_metrics(expected)}" in out.stdout            # with rsum's interval
    assert out.stdout.index('runs/f30k_vit') < out.stdout.index('runs/f30k_swin')
    # the saved matrices ensemble under the protocol their sidecars name
    a, b = (root / r / 'results_f30k.npy' for r in ('runs/f30k_vit', 'runs/f30k_swin'))
    ens = _laps('eval', '--ensemble', a, b, '--json', cwd=root)
    assert ens.returncode == 0, ens.stderr[-3000:]
    mean = (load_sims(a).astype(np.float32) + load_sims(b)) / 2
    _assert_metrics(json.loads(ens.stdout), {**evaluate_sims(mean, 'f30k'), **recall_ci95(mean, 'f30k')})
    _one_error_line(_laps('eval', '--ensemble', a, b, '--dataset', 'coco', cwd=root), '--dataset coco disagrees with')


def test_released_eval_errors(released_layout, tmp_path):
    _one_error_line(_laps('eval', '--dataset', 'coco', '--data_path', 'data/', cwd=released_layout),
                    'neither runs/coco_vit nor runs/coco_swin exists')
    # a published model_best.pth in runs/<dataset>_swin that is not a checkpoint: the error names it
    (tmp_path / 'runs' / 'f30k_swin').mkdir(parents=True)
    _corrupt(tmp_path / 'runs' / 'f30k_swin' / 'model_best.pth')
    _one_error_line(_laps('eval', '--dataset', 'f30k', cwd=tmp_path),
                    'runs/f30k_swin/model_best.pth: not a readable PyTorch checkpoint')


def test_ensemble_needs_a_protocol(tmp_path):
    s = np.random.default_rng(0).standard_normal((2, 10)).astype(np.float32)
    plain = save_sims(tmp_path / 'plain.npy', s)
    coco = save_sims(tmp_path / 'coco.npy', s, 'coco', 'testall')
    f30k = save_sims(tmp_path / 'f30k.npy', s, 'f30k', 'test')
    _one_error_line(_laps('eval', '--ensemble', plain), f'{plain}: no .json sidecar naming the dataset', 'pass --dataset')
    _one_error_line(_laps('eval', '--ensemble', coco, f30k), f"{f30k} holds dataset 'f30k' but {coco} holds 'coco'")
    _one_error_line(_laps('eval', '--ensemble', coco, plain), f"while {coco} holds 'coco'")
    out = _laps('eval', '--ensemble', plain, '--dataset', 'f30k', '--json')
    assert out.returncode == 0
    _assert_metrics(json.loads(out.stdout), {**evaluate_sims(s, 'f30k'), **recall_ci95(s, 'f30k')})


def _assert_metrics(got: dict, expected: dict):
    "Same keys; numbers and [lo, hi] intervals equal up to float32 rounding."
    assert sorted(got) == sorted(expected)
    for k, v in expected.items(): assert got[k] == pytest.approx(v), k


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory, synthetic_data):
    "A run folder holding a tiny untrained model of the shared synthetic data (its test split is scored with the test probes, one pair per kind)."
    root = tmp_path_factory.mktemp('synthetic_run')
    torch.manual_seed(0)
    cfg = LapsConfig(dataset='synthetic', data_path=str(synthetic_data), img_res=32, num_patches=16, embed_size=16,
                     bert_path='minilm', vision_pretrained=False, text_pretrained=False, workers=0, max_word=32)
    run = root / 'run'
    save_checkpoint(run / 'checkpoint_best', LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert'), cfg, save_rng=False)
    (run / 'commands.jsonl').write_text(json.dumps({'argv': ['laps', 'train']}) + '\n')   # a run directory
    return run


def test_eval_json_and_table_show_minimal_pairs_and_intervals(synthetic_run, synthetic_data):
    from laps.eval.minimal_pairs import SCORES, format_minimal_pairs
    out = _laps('eval', synthetic_run, '--split', 'test', '--json')
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)
    assert m['rsum_ci95'][0] <= m['rsum'] <= m['rsum_ci95'][1] and 'i2t_r1_ci95' in m
    mp = m['minimal_pairs']
    probes = json.loads((synthetic_data / 'synthetic' / 'test_probes_minimal_pairs.json').read_text())
    kinds = sorted({p['kind'] for p in probes})
    assert (mp['split'], sorted(mp['kinds']), mp['overall']['n_pairs']) == ('test_probes', kinds, len(probes))
    assert len(kinds) == 8 and len(probes) == 8                                  # every kind of the generator, one pair each
    for row in (mp['overall'], *mp['kinds'].values(), mp['bow']['overall'], *mp['bow']['kinds'].values()):
        for s in SCORES: assert row[f'{s}_ci95'][0] <= row[s] <= row[f'{s}_ci95'][1]
    written = json.loads((synthetic_run / 'metrics_test.json').read_text())
    assert {k: v for k, v in written.items() if k != 'command'} == m             # the run records the same
    assert written['command']['argv'][:2] == ['laps', 'eval'] and m['data']['split'] == 'test'   # and what made them
    text = _laps('eval', synthetic_run, '--split', 'test', '--no_progress')
    assert text.returncode == 0, text.stderr[-3000:]
    assert format_minimal_pairs(mp) in text.stdout and '95% CI [' in text.stdout
    header = format_minimal_pairs(mp).splitlines()[1].split()
    assert header == ['kind', 'bow?', 'n', 'i2t', 't2i', 'pair', 'mean', 'bow', 'mean']
