"""Training to a plateau (`--plateau_patience`): off is the released fixed schedule to the bit; a forced plateau decays the
learning rate, then stops the run early, recorded in the run directory; `--resume` stops at the same epoch; bad values are
one error line. Tiny backbones on the shared synthetic set: 40 training captions at batch 8, 5 steps an epoch."""
import json
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from laps.cli import build_parser, main
from laps.cli.common import config_from_args
from laps.core.config import get_config
import laps.training.runner as runner
from laps.training.runner import train

BACKBONES = dict(vision_backbone='laps/tiny-vit', text_backbone='laps/tiny-bert')
# A run of `_cfg(num_epochs=3)` before the plateau fields existed (commit 7e46ec7): its dev rsum after each epoch and
# its logged losses. `_cfg` keeps that commit's fp32 and `lr_schedules [1]` (x0.3 at epoch 1).
RELEASED_VAL_RSUM = [240.0, 240.0, 246.0]
RELEASED_LOSSES = [23.70689, 25.992365, 31.688129, 29.24774, 37.256767, 8.873306, 8.397943, 8.699537, 7.916539, 8.907132,
                   7.801675, 7.98792, 8.009139, 7.355907, 8.219282]
FORCED = dict(plateau_patience=1, plateau_min_delta=1e9, plateau_decays=1)   # every validation after the first is stale


def _cfg(data, run, **kw):
    return get_config('cpu', data_path=str(data), img_res=32, num_patches=16, embed_size=16, text_layers=0,
                      freeze_text_layers=-1, batch_size=8, log_step=1, vision_pretrained=False, text_pretrained=False,
                      precision='fp32', lr_schedules=[1], logger_name=str(run), **kw)   # the schedule the values were pinned with


def _train(cfg, **kw):
    return train(cfg, command=['laps', 'train'], progress=False, **BACKBONES, **kw)


def _log(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / 'train_log.jsonl').read_text().splitlines()]


def _epoch_lrs(log: list[dict], key='epoch') -> list:
    "`key` ('epoch' or 'lr') of each epoch's training records, one per epoch (an epoch trains at one rate)."
    per_epoch = sorted({(r['epoch'], r['lr']) for r in log if r['kind'] == 'train'})
    return [e if key == 'epoch' else lr for e, lr in per_epoch]


def _weights(run: Path, which='checkpoint_last') -> dict:
    return load_file(run / which / 'model.safetensors')


def _same_weights(a: Path, b: Path, which='checkpoint_last') -> bool:
    wa, wb = _weights(a, which), _weights(b, which)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_off_is_the_released_schedule(synthetic_data, tmp_path):
    "plateau_patience 0 trains as before the plateau fields existed; a rule that never fires changes nothing either."
    off = _train(_cfg(synthetic_data, tmp_path / 'off', num_epochs=3))
    run = tmp_path / 'off'
    log = _log(run)
    assert [r['rsum'] for r in log if r['kind'] == 'val_dev'] == RELEASED_VAL_RSUM and off['best_rsum'] == 246.0
    assert [r['loss'] for r in log if r['kind'] == 'train'] == pytest.approx(RELEASED_LOSSES, rel=1e-4, abs=1e-5)
    assert _epoch_lrs(log) == [0, 1, 2] and _epoch_lrs(log, 'lr') == pytest.approx([1e-3, 3e-4, 3e-4], rel=1e-12)
    assert 'plateau' not in off and not (run / 'plateau.json').exists() and 'plateau' not in {r['kind'] for r in log}
    assert 'plateau' not in json.loads((run / 'checkpoint_last' / 'trainer_state.json').read_text())
    # patience 5 in 3 epochs never reaches a plateau: the same weights, bit for bit, and the rule's record says so
    on = _train(_cfg(synthetic_data, tmp_path / 'on', num_epochs=3, plateau_patience=5))
    assert _same_weights(run, tmp_path / 'on') and on['best_rsum'] == off['best_rsum']
    assert (on['plateau']['reason'], on['plateau']['epochs_trained'], on['plateau']['decay_epochs']) == ('num_epochs', 3, [])
    assert [r['stale'] for r in _log(tmp_path / 'on') if r['kind'] == 'plateau'] == [0, 1, 0]   # 240, 240 (stale), 246


def test_forced_plateau_decays_then_stops_early(synthetic_data, tmp_path):
    "Patience 1, one decay, every validation stale: epoch 1 stale -> x0.3 from epoch 2; epoch 2 stale -> stop (3 of 5 epochs)."
    run = tmp_path / 'run'
    result = _train(_cfg(synthetic_data, run, num_epochs=5, **FORCED))
    log = _log(run)
    assert _epoch_lrs(log) == [0, 1, 2]                                 # lr_schedules [1], then the plateau's x0.3 on top
    assert _epoch_lrs(log, 'lr') == pytest.approx([1e-3, 3e-4, 9e-5], rel=1e-12)
    assert [r['loss'] for r in log if r['kind'] == 'train'][:10] == pytest.approx(RELEASED_LOSSES[:10], rel=1e-4, abs=1e-5)
    assert result['steps'] == 15 and {r['epoch'] for r in log} == {0, 1, 2}
    plateau = [r for r in log if r['kind'] == 'plateau']
    assert [(r['epoch'], r['stale'], r['decays'], r['stopped']) for r in plateau] == [(0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 1, 1)]
    assert [r['lr_factor'] for r in plateau] == pytest.approx([1.0, 0.3, 0.3], rel=1e-12)
    saved = json.loads((run / 'plateau.json').read_text())
    assert saved == result['plateau']
    assert {k: saved[k] for k in ('reason', 'epochs_trained', 'stopped_epoch', 'decay_epochs', 'best_rsum', 'num_epochs')} == \
        dict(reason='plateau', epochs_trained=3, stopped_epoch=2, decay_epochs=[2], best_rsum=RELEASED_VAL_RSUM[0], num_epochs=5)
    assert saved['lr_factor'] == pytest.approx(0.3) and saved['rule']['plateau_patience'] == 1
    state = json.loads((run / 'checkpoint_last' / 'trainer_state.json').read_text())
    assert state['epoch'] == 2 and state['plateau']['stopped_epoch'] == 2
    # the cap comes first: the same rule in 2 epochs decays after epoch 1 but ends at num_epochs
    capped = _train(_cfg(synthetic_data, tmp_path / 'capped', num_epochs=2, **FORCED))['plateau']
    assert (capped['reason'], capped['epochs_trained'], capped['stopped_epoch'], capped['decay_epochs']) == ('num_epochs', 2, None, [2])


def test_resume_stops_at_the_same_epoch(synthetic_data, tmp_path, monkeypatch):
    "Killed after epoch 1's checkpoint (the decay decided, epoch 2 not trained), --resume ends as the uninterrupted run did."
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    expected = _train(_cfg(synthetic_data, whole, num_epochs=5, **FORCED))
    real, saves = runner.save_checkpoint, []

    class Killed(Exception): pass

    def save_then_die(path, *a, **kw):
        out = real(path, *a, **kw)
        if Path(path).name == 'checkpoint_last':
            saves.append(path)
            if len(saves) == 2: raise Killed
        return out
    monkeypatch.setattr(runner, 'save_checkpoint', save_then_die)
    with pytest.raises(Killed): _train(_cfg(synthetic_data, cut, num_epochs=5, **FORCED))
    monkeypatch.setattr(runner, 'save_checkpoint', real)
    assert json.loads((cut / 'checkpoint_last' / 'trainer_state.json').read_text())['plateau']['decay_epochs'] == [2]
    resumed = _train(_cfg(synthetic_data, cut, num_epochs=5, **FORCED), resume=True)
    assert resumed['plateau'] == expected['plateau'] and resumed['steps'] == expected['steps'] == 15
    assert _same_weights(whole, cut) and _same_weights(whole, cut, 'checkpoint_best')
    for name in ('plateau.json', 'checkpoint_last/trainer_state.json', 'metrics_dev.json'):
        assert (whole / name).read_text() == (cut / name).read_text(), name
    keys = lambda run: [(r['kind'], r['step'], r['epoch'], r.get('lr'), r.get('loss'), r.get('rsum')) for r in _log(run)]
    assert keys(cut) == keys(whole)
    # resuming the stopped run trains nothing, even with a larger cap
    again = _train(_cfg(synthetic_data, cut, num_epochs=8, **FORCED), resume=True)
    assert again['steps'] == 15 and again['plateau']['reason'] == 'plateau' and keys(cut) == keys(whole)


def test_flags_and_one_line_errors(tmp_path, capsys):
    "The three flags come from LapsConfig; a bad value is one `laps: error:` line naming the flag, status 2."
    args = build_parser('train').parse_args(['train', '--plateau_patience', '2', '--plateau_min_delta', '0.5',
                                             '--plateau_decays', '3'])
    cfg = config_from_args(args)
    assert (cfg.plateau_patience, cfg.plateau_min_delta, cfg.plateau_decays) == (2, 0.5, 3)
    assert config_from_args(build_parser('train').parse_args(['train'])).plateau_patience == 0
    for flags, expected in [(['--plateau_patience', '2', '--eval', '0'],
                             'plateau_patience 2 needs a validation after every epoch (eval 1), got eval 0'),
                            (['--plateau_patience', '-1'], 'plateau_patience must be at least 0, got -1'),
                            (['--plateau_min_delta', '-0.5'], 'plateau_min_delta must be at least 0, got -0.5'),
                            (['--plateau_decays', '-2'], 'plateau_decays must be at least 0, got -2')]:
        assert main(['train', '--logger_name', str(tmp_path / 'run'), *flags]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0] == f'laps: error: {expected}', err
    assert not (tmp_path / 'run').exists()                              # refused before anything is written
