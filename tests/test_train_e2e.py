"""End to end: generate a tiny synthetic set, train the cpu preset, kill and resume, evaluate (slow)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from laps.data.synthetic import generate_synthetic

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
UNTRAINED_RSUM_MAX = 149.0        # the highest test rsum of an untrained cpu-preset model on `tiny_data` (seeds 0-2)


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    generate_synthetic(root / 'synthetic', seed=0, n_train=320, n_dev=20, n_test=20, dev_probe_pairs=2, test_probe_pairs=2)
    return root


def _laps(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, '-m', 'laps', *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, **kw)


def _train_args(data, run, epochs):
    return ['train', '--preset', 'cpu', '--data_path', data, '--logger_name', run, '--num_epochs', epochs,
            '--batch_size', 16, '--log_step', 5, '--no_progress']


def test_train_kill_resume_and_eval(tiny_data, tmp_path):
    run = tmp_path / 'run'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, '-m', 'laps', *map(str, _train_args(tiny_data, run, 3))], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = run / 'checkpoint_last' / 'trainer_state.json'
    deadline = time.time() + 600
    while not state.exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.5)
    assert state.exists(), proc.communicate()[0][-3000:]
    time.sleep(2.0)                                                     # into epoch 1
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert json.loads(state.read_text())['epoch'] == 0                  # epoch 0 is saved, epoch 1 was cut short
    out = _laps(*_train_args(tiny_data, run, 3), '--resume')
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(state.read_text())['epoch'] == 2
    log = [json.loads(l) for l in (run / 'train_log.jsonl').read_text().splitlines()]
    assert {r['epoch'] for r in log if r['kind'] == 'val_dev'} >= {0, 1, 2}
    commands = [json.loads(l) for l in (run / 'commands.jsonl').read_text().splitlines()]
    assert [c['resume'] for c in commands] == [False, True]
    assert json.loads((run / 'config.json').read_text())['preset'] == 'cpu'
    # evaluation of the run directory (best checkpoint) on the test split
    out = _laps('eval', run, '--json', '--save_sims', tmp_path / 'sims.npy')
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    # the run records the test metrics, and its best checkpoint's model card names them
    written = json.loads((run / 'metrics_test.json').read_text())
    assert {k: v for k, v in written.items() if k != 'command'} == metrics          # and with it the command that made them
    assert metrics['data']['data_path'] == str(tiny_data.resolve()) and metrics['model']['path'].endswith('checkpoint_best')
    card = (run / 'checkpoint_best' / 'README.md').read_text()
    assert 'metrics_test.json' in card and f"{metrics['rsum']:.1f}" in card
    for k in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum', 'minimal_pair_i2t', 'minimal_pair_t2i'):
        assert k in metrics
    assert abs(metrics['rsum'] - sum(metrics[k] for k in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10'))) < 1e-6
    # It learned. Measured on this tiny test split (20 images in 10 minimal pairs, 100 captions; generator version 2;
    # 320 training images): a freshly initialised cpu-preset model (seed_everything(seed); LAPSModel(cfg) at batch 16;
    # evaluate_split on 'test') scores rsum 109.0, 144.0 and 149.0 for seeds 0-2. With 64 training images the preset's
    # 12 steps left it below that (rsum 91.0), so the set is larger. Every test caption has a near-duplicate partner
    # image, so R@1 stays low at this size; the rsum bound lies above every untrained value.
    assert metrics['rsum'] > UNTRAINED_RSUM_MAX + 15, (metrics['rsum'], metrics['t2i_r1'])
    # the saved matrix evaluates to the same numbers through --ensemble (one member)
    out2 = _laps('eval', '--ensemble', tmp_path / 'sims.npy', '--dataset', 'synthetic', '--data_path', tiny_data, '--json')
    assert out2.returncode == 0, out2.stderr[-3000:]
    ens = json.loads(out2.stdout.strip().splitlines()[-1])
    recall = [k for k in metrics if not k.startswith('minimal_pair') and k not in ('data', 'model')]   # the probe split is
                                                                           # scored from the model, not the matrix
    assert recall and {k: ens[k] for k in recall} == {k: metrics[k] for k in recall}


def test_same_seed_same_numbers(tiny_data, tmp_path):
    "Two runs with the same seed on the same machine produce identical logs and metrics."
    results = []
    for name in ('a', 'b'):
        out = _laps(*_train_args(tiny_data, tmp_path / name, 1))
        assert out.returncode == 0, out.stderr[-3000:]
        log = [json.loads(l) for l in (tmp_path / name / 'train_log.jsonl').read_text().splitlines()]
        results.append([{k: v for k, v in r.items() if k != 'time'} for r in log])
    assert results[0] == results[1]


def test_train_refuses_bad_input(tmp_path):
    out = _laps('train', '--preset', 'cpu', '--data_path', tmp_path / 'nowhere', '--logger_name', tmp_path / 'r')
    assert out.returncode == 2 and 'laps: error:' in out.stderr and 'nowhere' in out.stderr
    out = _laps('train', '--similarity_calc_method', 'cosine')
    assert out.returncode == 2 and "invalid choice: 'cosine'" in out.stderr
