"""`laps eval` never destroys a run's results and says which data produced its numbers: a data fingerprint and the
model's identity beside every number, results on other data under `RUN/data-<fingerprint>/`, no stale matrix beside
fresh metrics."""
import hashlib, json, shutil, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from laps.checkpoint.run import save_checkpoint
from laps.cli import main
from laps.core.config import LapsConfig
from laps.eval.metrics import evaluate_sims, load_sims, load_sims_metadata, save_sims
from laps.model.modeling import LAPSModel
from conftest import SYNTHETIC


def _model(seed, data_path):
    torch.manual_seed(seed)
    cfg = LapsConfig(dataset='synthetic', data_path=str(data_path), img_res=32, num_patches=16, embed_size=16,
                     bert_path='minilm', vision_pretrained=False, text_pretrained=False, workers=0, max_word=32)
    return LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert'), cfg


@pytest.fixture(scope='module')
def world(tmp_path_factory, synthetic_data):
    "The run's own data (the shared folder), other data (another seed, another folder), and a run directory holding a tiny untrained model."
    from laps.data.synthetic import generate_synthetic
    root = tmp_path_factory.mktemp('provenance')
    generate_synthetic(root / 'other' / 'synthetic', **{**SYNTHETIC, 'seed': 1})
    model, cfg = _model(0, synthetic_data)
    template = root / 'template'
    save_checkpoint(template / 'checkpoint_best', model, cfg, save_rng=False)
    (template / 'commands.jsonl').write_text(json.dumps({'argv': ['laps', 'train'], 'resume': False}) + '\n')
    return dict(root=root, own=synthetic_data, other=root / 'other', template=template, cfg=cfg)


@pytest.fixture
def run(world, tmp_path):
    "A fresh copy of the run directory for each test."
    return Path(shutil.copytree(world['template'], tmp_path / 'run'))


def _eval(capsys, monkeypatch, *args):
    "`laps eval ARGS --no_progress` in this process: (stdout, stderr); the command line is what the record shows."
    argv = ['eval', *map(str, args), '--no_progress']
    monkeypatch.setattr(sys, 'argv', ['laps', *argv])
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr()


def _files(folder: Path) -> dict:
    "{relative path: bytes} of every file under `folder`."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def _sha(path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_every_metrics_file_says_which_data_and_which_model(world, run, capsys, monkeypatch):
    out = _eval(capsys, monkeypatch, run, '--split', 'test', '--json', '--save_sims', run / 'sims_test.npy')
    printed = json.loads(out.out)
    written = json.loads((run / 'metrics_test.json').read_text())
    data, model = written['data'], written['model']
    folder = world['own'] / 'synthetic'
    assert (data['dataset'], data['split'], data['data_path']) == ('synthetic', 'test', str(world['own'].resolve()))
    assert data['image_folder'] == str((folder / 'images').resolve())
    assert data['files'] == {n: _sha(folder / n) for n in ('test_caps.txt', 'test_ids.txt', 'id_mapping.json',
                                                           'test_probes_caps.txt', 'test_probes_ids.txt',
                                                           'test_probes_minimal_pairs.json')}
    assert len(data['sha256']) == 64 and data['short'] == data['sha256'][:12]
    assert model['path'] == str((run / 'checkpoint_best').resolve())
    assert model['sha256'] == _sha(run / 'checkpoint_best' / 'model.safetensors')
    assert written['command']['argv'] == ['laps', 'eval', str(run), '--split', 'test', '--json', '--save_sims',
                                          str(run / 'sims_test.npy'), '--no_progress'] and 'commit' in written['command']
    assert {k: v for k, v in written.items() if k != 'command'} == printed          # the numbers printed are the ones kept
    meta = load_sims_metadata(run / 'sims_test.npy')                                  # the matrix says the same
    assert (meta['data'], meta['model']) == (data, model)
    text = _eval(capsys, monkeypatch, run, '--split', 'test').out
    assert f"data: synthetic test in {world['own'].resolve()} (fingerprint {data['short']})" in text


def test_eval_on_other_data_never_touches_the_runs_results(world, run, capsys, monkeypatch):
    "The probe: `laps eval RUN --data_path OTHER` overwrote RUN/metrics_test.json and the model card, recording nothing."
    _eval(capsys, monkeypatch, run, '--split', 'test', '--save_sims', run / 'sims_test.npy')
    before = _files(run)
    own = json.loads((run / 'metrics_test.json').read_text())
    out = _eval(capsys, monkeypatch, run, '--split', 'test', '--data_path', world['other'], '--json', '--save_results', 1)
    other = json.loads(out.out)
    assert (run / 'metrics_test.json').read_bytes() == before['metrics_test.json']   # the run's own numbers stay
    assert (run / 'checkpoint_best' / 'README.md').read_bytes() == before['checkpoint_best/README.md']
    assert other['data']['data_path'] == str(world['other'].resolve()) and other['data']['sha256'] != own['data']['sha256']
    assert other['rsum'] != own['rsum']                                               # other data, other numbers
    folder = run / f"data-{other['data']['short']}"
    assert f"results go to {folder}/" in out.err
    two = _eval(capsys, monkeypatch, run, '--split', 'test', '--data_path', world['other'], '--rerank_topk', 2,
                '--exhaustive', 0, '--json')
    assert json.loads(two.out)['data'] == other['data']                               # the same data: the same folder
    argv = ['eval', str(run), '--split', 'test', '--data_path', str(world['other']), '--save_sims', str(run / 'sims_test.npy')]
    capsys.readouterr()
    assert main(argv) == 2                                                            # nor by a path given inside the run
    assert capsys.readouterr().err == (f"laps: error: --save_sims {run / 'sims_test.npy'}: inside run {run}, which this "
                                       f"command evaluates on other data; save it under {folder}/ or outside the run\n")
    after = _files(run)
    assert {k: v for k, v in after.items() if k in before} == before                  # nothing of the run changed
    assert sorted(set(after) - set(before)) == [f"{folder.name}/{n}" for n in (
        'data.json', 'metrics_test.json', 'metrics_test_rerank2.json', 'results_synthetic.npy', 'results_synthetic.npy.json')]
    assert json.loads((folder / 'data.json').read_text()) == other['data']
    kept = json.loads((folder / 'metrics_test.json').read_text())
    assert {k: v for k, v in kept.items() if k != 'command'} == other
    assert json.loads((folder / 'metrics_test_rerank2.json').read_text())['data'] == other['data']
    assert evaluate_sims(load_sims(folder / 'results_synthetic.npy'), 'synthetic')['rsum'] == other['rsum']
    assert load_sims_metadata(folder / 'results_synthetic.npy')['data'] == other['data']
    card = (run / 'checkpoint_best' / 'README.md').read_text()
    assert f"{own['rsum']:.1f}" in card and 'data-' not in card                      # the card shows the run's own numbers only


def test_no_stale_matrix_beside_fresh_metrics(world, run, tmp_path, capsys, monkeypatch):
    "The probe: a sims_test.npy saved by an earlier evaluation stayed beside metrics_test.json of a newer one."
    _eval(capsys, monkeypatch, run, '--split', 'test', '--save_sims', run / 'sims_test.npy')
    old = load_sims(run / 'sims_test.npy')
    save_sims(run / 'legacy.npy', old, 'synthetic', 'test')                           # saved before fingerprints
    save_sims(run / 'sims_dev.npy', np.zeros((10, 50), np.float32), 'synthetic', 'dev')  # another split: not this one's
    new_model, cfg = _model(1, world['own'])                                          # a new best checkpoint
    save_checkpoint(run / 'checkpoint_best', new_model, cfg, save_rng=False)
    out = _eval(capsys, monkeypatch, run, '--split', 'test', '--json', '--save_sims', tmp_path / 'new.npy')
    m = json.loads(out.out)
    new = load_sims(tmp_path / 'new.npy')
    assert not np.array_equal(new, old)
    assert evaluate_sims(load_sims(run / 'sims_test.npy'), 'synthetic')['rsum'] == m['rsum']   # matrix and metrics agree
    assert m['model']['sha256'] == _sha(run / 'checkpoint_best' / 'model.safetensors')
    np.testing.assert_array_equal(load_sims(run / 'sims_test.npy'), new)               # this checkpoint's: refreshed
    assert load_sims_metadata(run / 'sims_test.npy')['model'] == m['model']
    assert f"refreshed {run / 'sims_test.npy'}" in out.err
    np.testing.assert_array_equal(load_sims(run / 'legacy.npy'), old)                  # no model recorded: not ours to replace
    assert f"left {run / 'legacy.npy'} as it is" in out.err and 'saved before they were recorded' in out.err
    np.testing.assert_array_equal(load_sims(run / 'sims_dev.npy'), np.zeros((10, 50), np.float32))
    assert json.loads((run / 'metrics_test.json').read_text())['rsum'] == m['rsum']


def test_save_sims_never_overwrites_an_input(world, run, tmp_path, capsys, monkeypatch):
    "--save_sims onto the checkpoint's weights, into its folder or the data folder, or onto an ensemble member: refused."
    weights = run / 'checkpoint_best' / 'model.safetensors'
    before = _files(run)
    for target, expect in ((weights, 'an input of this command'),
                           (run / 'checkpoint_best' / 'sims.npy', 'an input of this command; choose a place outside it'),
                           (world['own'] / 'synthetic' / 'sims.npy', 'an input of this command; choose a place outside it')):
        argv = ['eval', str(run), '--split', 'test', '--data_path', str(world['own']), '--save_sims', str(target), '--no_progress']
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and expect in err and '--save_sims' in err, err
    assert _files(run) == before and not (world['own'] / 'synthetic' / 'sims.npy').exists()
    member = tmp_path / 'a.npy'
    save_sims(member, np.eye(12, 60, dtype=np.float32), 'synthetic', 'test')
    kept = member.read_bytes()
    assert main(['eval', '--ensemble', str(member), '--save_sims', str(member)]) == 2
    assert 'that is an input of this command' in capsys.readouterr().err and member.read_bytes() == kept


def test_own_data_is_recognised_from_another_folder(world, tmp_path, capsys, monkeypatch):
    """A run trained with a relative --data_path: evaluated from another folder, whose own data/ is other data, the results
    go to data-<fingerprint>/; given its own data by absolute path, they are the run's own (the run records where it ran)."""
    home, elsewhere = tmp_path / 'home', tmp_path / 'elsewhere'
    shutil.copytree(world['own'], home / 'data'); shutil.copytree(world['other'], elsewhere / 'data')
    model, cfg = _model(0, 'data')                                                      # recorded as given: relative
    run = home / 'runs' / 'r'
    save_checkpoint(run / 'checkpoint_best', model, cfg, save_rng=False)
    (run / 'commands.jsonl').write_text(json.dumps({'argv': ['laps', 'train'], 'workdir': str(home)}) + '\n')
    monkeypatch.chdir(elsewhere)
    _eval(capsys, monkeypatch, run, '--split', 'test')                                  # elsewhere/data: not the run's data
    assert not (run / 'metrics_test.json').exists() and len(list(run.glob('data-*/metrics_test.json'))) == 1
    _eval(capsys, monkeypatch, run, '--split', 'test', '--data_path', home / 'data', '--save_sims', run / 'sims_test.npy')
    assert (run / 'metrics_test.json').is_file() and (run / 'sims_test.npy').is_file()    # its own data, by another name
