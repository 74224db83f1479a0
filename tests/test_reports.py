"""Report notebooks (registry, parameters, clean sources), `laps report` arguments, and one quick report end to end."""
import json, shlex
from pathlib import Path
import nbformat
import pytest
from laps import reports as R
from laps.cli import main, build_parser, config_from_args
from laps.config import get_config

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
    for name, flags in R.ABLATIONS.items():
        ov = dict(data_path='data/x', dataset='synthetic', num_epochs=2, batch_size=64, seed=0, log_step=5,
                  logger_name=f'runs/{name}', freeze_text_layers=-1, **flags)
        cmd = R.train_command('cpu', ov)
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
    a = R.parse_report_args(['efficiency', '-p', 'train_aggr_ratios', '[0.2, 0.6]', '-p', 'retrain', 'True',
                             '-p', 'data_path', 'None', '-p', 'base', 'final', '-p', 'seed', '3', '--out_dir', '/tmp/r'])
    assert a.params == dict(train_aggr_ratios=[0.2, 0.6], retrain=True, data_path=None, base='final', seed=3)
    assert a.out_dir == '/tmp/r' and not a.quick
    p = R.resolve_params('efficiency', a.params, out_dir=a.out_dir)
    assert p['out_dir'] == '/tmp/r'
    assert shlex.split(p['report_command'])[:5] == ['laps', 'report', 'efficiency', '--out_dir', '/tmp/r']


def test_report_list(capsys):
    assert main(['report', '--list']) == 0
    out = capsys.readouterr().out
    assert 'ablation:' in out and "configs = ['released', 'cls', 'token_selection', 'attn', 'thres', 'learnable_temp', 'final']" in out


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
