"""Report notebooks (registry, parameters, clean sources), `laps report` arguments, atomic writes and run provenance,
the quirks trace against the runner, and one quick report end to end."""
import json, os, shlex, subprocess
from pathlib import Path
import nbformat
import numpy as np
import pytest
from laps.reports import render as R
from laps.core.atomic import atomic_file, write_bytes_atomic, write_json_atomic, write_text_atomic, atomic_folder
from laps.core.provenance import git_commit, command_record
from laps.reports.runs import ABLATIONS, train_command, code_commit
from laps.reports.tables import save_figure
from laps.training.runner import prepare_run_dir, train
from laps.reports.training_trace import training_trace
from laps.cli import main, build_parser
from laps.cli.common import config_from_args
from laps.cli.report import parse_report_args
from laps.core.config import get_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('name', list(R.REPORTS))
def test_source_notebook_has_one_parameters_cell_and_no_outputs(name):
    nb = nbformat.read(ROOT / R.REPORTS[name].notebook, as_version=4)
    tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1 and tagged[0].cell_type == 'code'
    assert nb.metadata['kernelspec']['language'] == 'python'
    for c in nb.cells:
        if c.cell_type == 'code': assert c.outputs == [] and c.execution_count is None, f"{name}: committed outputs"
    params = R.notebook_parameters(name)
    assert {'out_dir', 'report_command'} <= set(params)
    assert set(R.REPORTS[name].quick) <= set(params), 'quick parameters the notebook does not declare'


def test_source_notebooks_are_not_module_notebooks():
    "nbdev scans nbs/ only: report sources live elsewhere, and no module notebook is a report."
    assert all(not s.notebook.startswith('nbs/') for s in R.REPORTS.values())
    assert 'nbs_path = nbs' in (ROOT / 'settings.ini').read_text()


def test_every_ablation_command_reproduces_its_config():
    for name, flags in ABLATIONS.items():
        ov = dict(data_path='data/x', dataset='synthetic', num_epochs=2, batch_size=64, seed=0, log_step=5,
                  logger_name=f'runs/{name}', freeze_text_layers=-1, **flags)
        cmd = train_command('cpu', ov)
        assert cmd[:4] == ['laps', 'train', '--preset', 'cpu']
        assert config_from_args(build_parser().parse_args(cmd[1:])) == get_config('cpu', **ov), name


def test_report_cli_rejects_bad_input(capsys):
    assert main(['report', 'curves', '-p', 'colour', 'red']) == 2
    err = capsys.readouterr().err
    assert "report curves has no parameter 'colour'" in err and 'ablation_runs' in err
    with pytest.raises(SystemExit) as e: main(['report', 'nope'])
    assert e.value.code == 2 and "unknown report 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['report'])
    assert e.value.code == 2 and 'give one report NAME, --all or --list' in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(['report', 'curves', '-p', 'out_dir'])
    assert e.value.code == 2


def test_report_cli_parses_values_like_papermill():
    a = parse_report_args(['efficiency', '-p', 'train_aggr_ratios', '[0.2, 0.6]', '-p', 'retrain', 'True',
                             '-p', 'data_path', 'None', '-p', 'base', 'final', '-p', 'seeds', '[3, 4]', '--out_dir', '/tmp/r'])
    assert a.params == dict(train_aggr_ratios=[0.2, 0.6], retrain=True, data_path=None, base='final', seeds=[3, 4])
    assert a.out_dir == '/tmp/r' and not a.quick
    p = R.resolve_params('efficiency', a.params, out_dir=a.out_dir)
    assert p['out_dir'] == '/tmp/r'
    assert shlex.split(p['report_command'])[:5] == ['laps', 'report', 'efficiency', '--out_dir', '/tmp/r']


def test_report_list(capsys):
    assert main(['report', '--list']) == 0
    out = capsys.readouterr().out
    assert 'ablation:' in out and "seeds = [0, 1, 2]" in out and "baseline = 'released'" in out
    assert ("configs = ['global', 'dense', 'released', 'cls', 'token_selection', 'attn', 'thres', 'learnable_temp', 'final', "
            "'dense_scratch', 'released_scratch']") in out


def test_source_notebooks_import_the_split_modules():
    "The report notebooks import what they use from the module of its job, not a catch-all `reports` namespace."
    for spec in R.REPORTS.values():
        src = '\n'.join(''.join(c.source) for c in nbformat.read(ROOT / spec.notebook, as_version=4).cells)
        assert 'reports as R' not in src and 'R.' not in src.replace('PROVENANCE', ''), spec.notebook
        assert "'testall'" not in src, f"{spec.notebook}: the COCO test split comes from the dataset registry"


def _listing(folder): return sorted(p.name for p in Path(folder).iterdir())


@pytest.mark.parametrize('write', ['text', 'bytes', 'json', 'file', 'figure'])
def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, write):
    path = tmp_path / 'out' / 'f.dat'
    write_text_atomic(path, 'old\n')
    class Boom(Exception): pass
    def fail_during(write_fn):
        with pytest.raises(Boom): write_fn()
    if write == 'text':
        def w():
            with atomic_file(path) as f: f.write('new, half'); raise Boom
    elif write == 'bytes':
        class Chunks:                                                   # a producer that dies half-way
            def __iter__(self): yield b'new'; raise Boom
        def w():
            with atomic_file(path, 'wb') as f:
                for c in Chunks(): f.write(c)
    elif write == 'json':
        def w():
            try: write_json_atomic(path, {'ok': 1, 'bad': object()})
            except TypeError as e: raise Boom from e
    elif write == 'file':
        def w():
            with atomic_file(path, 'wb') as f: np.save(f, np.zeros(3)); raise Boom
    else:
        import matplotlib; matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(2, 2)); ax.plot([0, 1])
        fig.canvas.print_png = lambda *a, **k: (_ for _ in ()).throw(Boom())   # the PNG writer fails
        prov = {'r': dict(run_dir='runs/r', command='laps train', commit='abc', seed=0, date='2026-01-01')}
        def w(): save_figure(fig, path, prov)
    fail_during(w)
    assert path.read_text() == 'old\n' and _listing(path.parent) == ['f.dat']
    write_bytes_atomic(path, b'new')
    assert path.read_bytes() == b'new' and _listing(path.parent) == ['f.dat']


def test_atomic_folder_keeps_the_old_folder_on_error(tmp_path):
    dst = tmp_path / 'ckpt'
    with atomic_folder(dst) as d: (d / 'w.txt').write_text('1')
    with pytest.raises(OSError):
        with atomic_folder(dst) as d: (d / 'w.txt').write_text('2'); raise OSError('disk full')
    assert (dst / 'w.txt').read_text() == '1' and _listing(tmp_path) == ['ckpt']


def _git(*args, cwd): subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True)


def test_git_commit_dirty_flag_and_command_record(tmp_path, monkeypatch):
    repo = tmp_path / 'repo'; (repo / 'reports').mkdir(parents=True)
    _git('init', '-q', cwd=repo)
    (repo / 'a.py').write_text('1\n'); (repo / 'reports' / 't.md').write_text('1\n')
    _git('add', '.', cwd=repo); _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'c', cwd=repo)
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(repo) == head
    (repo / 'untracked.txt').write_text('x')
    assert git_commit(repo) == head                                     # untracked files are not changes to the code
    (repo / 'reports' / 't.md').write_text('2\n')
    assert git_commit(repo) == head + '+dirty' and git_commit(repo, exclude='reports') == head
    assert code_commit(repo / 'reports') == head                         # what reports record
    (repo / 'a.py').write_text('2\n')
    assert git_commit(repo, exclude='reports') == head + '+dirty'
    assert git_commit(tmp_path) is None                                  # not a repository
    monkeypatch.chdir(repo)
    rec = command_record(['laps', 'train'], resume=False, world_size=2)
    assert (rec['argv'], rec['commit'], rec['resume'], rec['world_size']) == (['laps', 'train'], head + '+dirty', False, 2)
    run = prepare_run_dir(get_config('cpu', logger_name=str(tmp_path / 'run')), resume=False, command=['laps', 'train', '-x'])
    (logged,) = [json.loads(l) for l in (run / 'commands.jsonl').read_text().splitlines()]
    assert logged['argv'] == ['laps', 'train', '-x'] and logged['commit'] == head + '+dirty' and logged['time'].endswith('+00:00')


def test_trace_steps_are_the_runners_steps(tmp_path, synthetic_data):
    "n traced steps = the first n steps of `laps.training.runner.train` with the same configuration (same losses), across an epoch."
    vit, bert = 'laps/tiny-vit', 'laps/tiny-bert'
    cfg = get_config('cpu', data_path=str(synthetic_data), img_res=32, num_patches=16, embed_size=32, text_layers=0, freeze_text_layers=-1, batch_size=8,
                     use_token_selection=1, token_selection_ratio=0.8, token_selection_trainable=1, log_step=1, eval=0,
                     num_epochs=2, vision_pretrained=False, text_pretrained=False, logger_name=str(tmp_path / 'run'))
    train(cfg, command=['laps', 'train'], progress=False, vision_backbone=vit, text_backbone=bert)
    logged = [json.loads(l) for l in (tmp_path / 'run' / 'train_log.jsonl').read_text().splitlines()]
    assert len(logged) == 10                                            # 40 captions / 8 = 5 steps an epoch, 2 epochs
    traced = training_trace(cfg.replace(logger_name=str(tmp_path / 'trace')), 7, vision_backbone=vit, text_backbone=bert)
    assert [r['epoch'] for r in traced] == [0] * 5 + [1] * 2
    for key in ('loss', 'align_loss', 'grad_norm', 'attn_mat_grad_norm'):
        np.testing.assert_allclose([r[key] for r in traced], [r[key] for r in logged[:7]], rtol=1e-5, atol=1e-7, err_msg=key)
    assert len({round(r['loss'], 6) for r in traced}) > 1                   # the steps do train


@pytest.mark.slow
def test_quick_quirks_report_end_to_end(tmp_path):
    "The cheapest report, executed by papermill: outputs, manifest, index, executed notebook with its outputs."
    out = tmp_path / 'out'
    nb_path = R.run_report('quirks', dict(data_root=str(tmp_path / 'data'), runs_dir=str(tmp_path / 'runs')), quick=True,
                           out_dir=out)
    assert nb_path == out / '50_quirks.ipynb' and not list(out.glob('.*.partial.ipynb'))
    nb = nbformat.read(nb_path, as_version=4)
    assert nb.metadata.papermill.parameters['n_steps'] == 3
    assert any(c.outputs for c in nb.cells if c.cell_type == 'code')
    assert [c.metadata.get('tags') for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', [])]
    man = json.loads((out / 'quirks' / 'manifest.json').read_text())
    assert set(man['runs']) == {'released', 'trainable_selection', 'released_sparse0.3'}
    for o in man['outputs']: assert (out / o['file']).is_file()
    for p in man['runs'].values():
        assert p['run_dir'].startswith(str(tmp_path / 'runs')) and p['command'].startswith('laps report quirks --quick')
        assert p['seed'] == 0 and p['date'] and p['commit']
    rows = {r['variant']: r for r in __import__('csv').DictReader(open(out / 'quirks' / 'quirks.csv'))}
    assert float(rows['released']['attn_mat_grad_norm_max']) == 0 and float(rows['trainable_selection']['attn_mat_moved']) > 0
    assert abs(float(rows['released_sparse0.3']['ratio_loss_max']) - 2 * (20 / 64 - 0.3) ** 2) < 1e-6
    readme = (out / 'README.md').read_text()
    assert '[50_quirks.ipynb](50_quirks.ipynb)' in readme and 'Not generated yet: `laps report ablation`' in readme


def _released_layout(root, n_train=16, n_dev=6, n_test=10):
    "A tiny Flickr30K folder in the released caption-file layout (real test captions, generated JPEGs in a separate image folder)."
    from PIL import Image
    shared = ROOT / 'tests' / 'fixtures' / 'f30k'                       # the real Flickr30K caption files, kept in the repository
    caps = (shared / 'test_caps.txt').read_text().splitlines()
    d, images = root / 'data' / 'f30k', root / 'flickr_images'
    d.mkdir(parents=True); images.mkdir()
    rng, mapping, start = np.random.default_rng(0), {}, 0
    for split, n in (('train', n_train), ('dev', n_dev), ('test', n_test)):
        ids = list(range(start, start + n))
        (d / f'{split}_caps.txt').write_text(''.join(c + '\n' for c in caps[5 * start:5 * (start + n)]))
        (d / f'{split}_ids.txt').write_text(''.join(f'{i}\n' for i in ids for _ in range(5)))
        for i in ids:
            mapping[str(i)] = f'{1000 + i}.jpg'
            Image.fromarray(rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)).save(images / mapping[str(i)])
        start += n
    (d / 'id_mapping.json').write_text(json.dumps(mapping))
    return root / 'data', images


@pytest.mark.slow
def test_report_notebooks_run_unchanged_on_the_released_caption_layout(tmp_path):
    "The ablation, curves, patches and efficiency notebooks on a Flickr30K-layout folder, by parameters only: recall tables, no minimal pairs."
    data_path, images = _released_layout(tmp_path)
    params = dict(dataset='f30k', data_path=str(data_path), f30k_img_path=str(images), runs_dir=str(tmp_path / 'runs'),
                  configs=['released', 'final'], seeds=[0, 1], overrides={'freeze_text_layers': -1, 'pair_batches': 0},
                  batch_size=8, val_step=0, n_resamples=200)
    out = tmp_path / 'out'
    R.run_report('ablation', params, quick=True, out_dir=out, index=False)
    rows = list(__import__('csv').DictReader(open(out / 'ablation' / 'ablation.csv')))
    assert [r['config'] for r in rows] == ['released', 'final'] and all(r['n_seeds'] == '2' for r in rows)
    assert not (out / 'ablation' / 'minimal_pairs.md').exists()           # Flickr30K has no minimal pairs
    info = json.loads((out / 'ablation' / 'runs.json').read_text())
    assert info['dataset'] == 'f30k' and info['split'] == 'test' and set(info['configs']) == {'released', 'final'}
    for p in info['runs'].values():
        assert '--dataset f30k' in p['command'] and f'--f30k_img_path {images}' in p['command']
    long = {(r['config'], r['metric']): r for r in __import__('csv').DictReader(open(out / 'ablation' / 'ablation_long.csv'))}
    assert set(m for _, m in long) == {'rsum', 'i2t_r1', 't2i_r1'} and long[('released', 'rsum')]['diff'] == '0.0'
    R.run_report('curves', {}, quick=True, out_dir=out, index=False)
    R.run_report('patches', {}, quick=True, out_dir=out, index=False)
    eff = {k: v for k, v in params.items() if k not in ('configs', 'n_resamples')}
    R.run_report('efficiency', dict(eff, train_aggr_ratios=[0.4]), quick=True, out_dir=out, index=False)
    table = list(__import__('csv').DictReader(open(out / 'efficiency' / 'efficiency.csv')))
    assert table and all(r['seeds'] == '2' for r in table)                # the base setting reuses the ablation's two final runs
    man = json.loads((out / 'efficiency' / 'manifest.json').read_text())
    assert all(p['reused'] for p in man['runs'].values())
