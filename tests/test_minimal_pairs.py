"""Minimal-pair scores on hand-made blocks, their bootstrap intervals, the bag-of-words oracle, probe-split evaluation
against the full matrix, and the JSON structure the evaluation stores."""
import json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch
from laps.data.loaders import CaptionSplit
from laps.data.datasets import DatasetSpec, register_dataset
from laps.core.registry import DATASETS
from laps.eval.minimal_pairs import (CHANCE, SCORES, bow_pair_blocks, format_minimal_pairs, load_minimal_pairs,
                                minimal_pair_accuracy, minimal_pair_report, minimal_pair_summary, pair_blocks,
                                pair_outcomes, probe_split)

ROW_KEYS = sorted(['n_pairs', *SCORES, *(f'{s}_ci95' for s in SCORES)])


def _split(captions, k, ids=(10, 11, 12, 13)):
    return CaptionSplit('test', 'toy', k, list(captions), [i for i in ids for _ in range(k)], list(ids), {},
                        Path('.'), Path('.'), Path('.'))


def _perfect(P, k=5):
    return np.broadcast_to(np.eye(2)[None, :, :, None], (P, 2, 2, k)).copy()


def test_perfect_inverted_and_tied_blocks():
    for k in SCORES:
        assert pair_outcomes(_perfect(4))[k].tolist() == [1.0] * 4
        assert pair_outcomes(-_perfect(4))[k].tolist() == [0.0] * 4
    tied = pair_outcomes(np.zeros((3, 2, 2, 5)))                        # a constant model scores chance exactly
    assert {k: float(v.mean()) * 100 for k, v in tied.items()} == pytest.approx(CHANCE)
    # image A scores every caption 1, image B every caption 0: i2t ties both ways (1/2); A's captions pick A, B's
    # pick A too (t2i 1/2); pair 0 (M_BB < M_AB)
    S = np.zeros((1, 2, 2, 5)); S[0, 0] = 1.0
    o = pair_outcomes(S)
    assert (o['i2t'][0], o['t2i'][0], o['pair'][0], o['mean'][0]) == (0.5, 0.5, 0.0, 0.5)
    # a partial tie: M_AA = M_BB = M_AB = 1 > M_BA = 0; A's i2t comparison ties (1/2), B's is right: i2t 3/4; the pair
    # is right when the random order puts AB below both AA and BB among the three tied values: 1/3
    S = np.zeros((1, 2, 2, 5)); S[0, 0, 0] = S[0, 1, 1] = S[0, 0, 1] = 1.0
    o = pair_outcomes(S)
    assert (o['i2t'][0], o['t2i'][0]) == (0.75, 0.75) and o['pair'][0] == pytest.approx(1 / 3)


def test_full_matrix_blocks_and_flat_keys():
    k = 2
    split = _split([f'c{j}' for j in range(8)], k)
    sims = np.repeat(np.eye(4), k, axis=1)                              # every image scores its own captions 1
    pairs = [dict(image_a=10, image_b=13, kind='b'), dict(image_a=12, image_b=11, kind='a')]
    B = pair_blocks(sims, split, pairs)
    assert B.shape == (2, 2, 2, k) and np.array_equal(B, _perfect(2, k))
    assert minimal_pair_accuracy(sims, split, pairs) == dict(i2t=100.0, t2i=100.0, n_pairs=2, i2t_a=100.0, t2i_a=100.0,
                                                             i2t_b=100.0, t2i_b=100.0)
    assert minimal_pair_accuracy(-sims, split, pairs)['t2i_a'] == 0.0
    with pytest.raises(ValueError, match='image id 99 is not in toy/test'):
        pair_blocks(sims, split, [dict(image_a=99, image_b=10, kind='a')])


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_pairs():
    rng = np.random.default_rng(0)
    small = {s: rng.random(100) for s in SCORES}
    big = {s: np.tile(v, 16) for s, v in small.items()}                # same distribution, 16x the pairs
    rs = minimal_pair_summary(small, ['k'] * 100)['overall']
    rb = minimal_pair_summary(big, ['k'] * 1600)['overall']
    for s in SCORES:
        for r in (rs, rb): assert r[f'{s}_ci95'][0] < r[s] < r[f'{s}_ci95'][1]
        ws, wb = (np.diff(r[f'{s}_ci95'])[0] for r in (rs, rb))
        assert wb == pytest.approx(ws / 4, rel=0.2)                      # width ~ 1/sqrt(n)
    assert minimal_pair_summary(small, ['k'] * 100) == minimal_pair_summary(small, ['k'] * 100)   # seeded


def test_bow_oracle_on_aligned_captions():
    "A binding swap keeps the bag of words: 50 (ties); a colour change alters it: 100."
    caps = ['A red circle and a blue square.', 'A small red circle next to a blue square',
            'A blue circle and a red square.', 'A small blue circle next to a red square',       # binding swap
            'A green triangle left of a square.', 'a square right of a green triangle',
            'A yellow triangle left of a square.', 'a square right of a yellow triangle']        # colour change
    split = _split(caps, 2)
    pairs = [dict(image_a=10, image_b=11, kind='binding'), dict(image_a=12, image_b=13, kind='colour')]
    ref = minimal_pair_summary(pair_outcomes(bow_pair_blocks(split, pairs)), [p['kind'] for p in pairs])['kinds']
    assert (ref['binding']['i2t'], ref['binding']['t2i'], ref['binding']['mean']) == (50.0, 50.0, 50.0)
    assert ref['binding']['pair'] == pytest.approx(100 / 6)
    assert all(ref['colour'][s] == 100.0 for s in SCORES)
    rep = minimal_pair_report(_perfect(2, 2), split, pairs)
    rows = {l.split()[0]: l.split()[1] for l in format_minimal_pairs(rep).splitlines()[2:-1]}
    assert rows == dict(binding='no', colour='yes')                     # solvability is computed from the oracle


@pytest.fixture(scope='module')
def probe_data(tmp_path_factory, synthetic_data):
    """Copies of the shared synthetic folder as dataset `probetoy`, whose dev and test splits have probe splits `dev_probes`,
    `test_probes` (the same scenes), and as dataset `ownpairs`, which declares no probe splits (its splits' own pairs files are scored)."""
    root = tmp_path_factory.mktemp('probe')
    shutil.copytree(synthetic_data / 'synthetic', root / 'probetoy')
    d = root / 'probetoy'
    for split in ('dev', 'test'):
        for ext in ('caps.txt', 'ids.txt', 'minimal_pairs.json'): shutil.copy(d / f'{split}_{ext}', d / f'{split}_probes_{ext}')
        (d / f'{split}_minimal_pairs.json').unlink()
    shutil.copytree(synthetic_data / 'synthetic', root / 'ownpairs')
    register_dataset(DatasetSpec('probetoy', probe_splits={'dev': 'dev_probes', 'test': 'test_probes'}))
    register_dataset(DatasetSpec('ownpairs'))
    yield root
    DATASETS.unregister('probetoy'); DATASETS.unregister('ownpairs')


def _tiny_model_cfg(root, dataset):
    from laps.core.config import get_config
    from laps.model.modeling import LAPSModel
    cfg = get_config(None, dataset=dataset, data_path=str(root), img_res=32, num_patches=16, embed_size=16, batch_size=7,
                     workers=0, max_word=32, device='cpu', bert_path='minilm', vision_pretrained=False,
                     text_pretrained=False, shard_size=13)
    torch.manual_seed(0)
    return LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert').eval(), cfg


def test_probe_evaluation_equals_the_full_matrix(probe_data):
    from laps.data.loaders import read_split
    from laps.eval.evaluate import evaluate_minimal_pairs, evaluate_split, minimal_pair_metrics
    assert probe_split('probetoy', 'test') == 'test_probes' and probe_split('synthetic', 'test') == 'test_probes' and probe_split('f30k', 'test') is None
    model, cfg = _tiny_model_cfg(probe_data, 'probetoy')
    metrics, sims = evaluate_split(model, cfg, 'test', progress=False)   # the pairs come from the probe split
    split = read_split(probe_data, 'probetoy', 'test_probes')
    pairs = load_minimal_pairs(probe_data, 'probetoy', 'test_probes')
    full = minimal_pair_report(pair_blocks(sims, split, pairs), split, pairs)   # the same scenes, from the matrix
    assert metrics['minimal_pairs'] == full and full['split'] == 'test_probes'
    assert metrics['minimal_pair_i2t'] == full['overall']['i2t'] and metrics['minimal_pair_n_pairs'] == 6   # 12 test scenes
    for g in (1, 3):
        assert evaluate_minimal_pairs(model, cfg, 'test_probes', progress=False, pairs_per_call=g) == full
    # a dataset without probe splits: the split's own pairs file, scored from its matrix, in the same structure
    m2, s2 = evaluate_split(model, cfg.replace(dataset='ownpairs'), 'test', progress=False)
    assert m2['minimal_pairs']['split'] == 'test' and sorted(m2['minimal_pairs']) == sorted(full)
    s_split = read_split(probe_data, 'ownpairs', 'test')
    assert {k: v for k, v in minimal_pair_metrics(s2, s_split, probe_data, 'ownpairs').items()} == \
        {k: v for k, v in m2.items() if k.startswith('minimal_pair')}


def test_evaluation_json_keys(probe_data):
    from laps.eval.evaluate import evaluate_split
    model, cfg = _tiny_model_cfg(probe_data, 'probetoy')
    metrics, _ = evaluate_split(model, cfg, 'test', progress=False)
    metrics = json.loads(json.dumps(metrics))                           # JSON-ready as it is
    mp = metrics['minimal_pairs']
    assert sorted(mp) == ['bow', 'kinds', 'overall', 'split'] and sorted(mp['bow']) == ['kinds', 'overall']
    kinds = sorted({p['kind'] for p in load_minimal_pairs(probe_data, 'probetoy', 'test_probes')})
    assert sorted(mp['kinds']) == sorted(mp['bow']['kinds']) == kinds
    for row in [mp['overall'], mp['bow']['overall'], *mp['kinds'].values(), *mp['bow']['kinds'].values()]:
        assert sorted(row) == ROW_KEYS
        for s in SCORES: assert row[f'{s}_ci95'][0] <= row[s] <= row[f'{s}_ci95'][1]
    assert mp['overall']['n_pairs'] == sum(r['n_pairs'] for r in mp['kinds'].values()) == 6
    for k in ('i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'rsum'):
        lo, hi = metrics[f'{k}_ci95']
        assert lo <= metrics[k] <= hi


def test_validation_logs_the_probe_scores(probe_data, tmp_path):
    "One epoch of a tiny model: each validation logs mp_* of the dev probes; metrics_dev.json holds the report."
    from laps.core.config import get_config
    from laps.training.runner import train
    cfg = get_config(None, dataset='probetoy', data_path=str(probe_data), logger_name=str(tmp_path / 'run'), img_res=32,
                     num_patches=16, embed_size=16, batch_size=8, num_epochs=1, workers=0, max_word=32, device='cpu',
                     log_step=1, bert_path='minilm', vision_pretrained=False, text_pretrained=False, val_step=10**9)
    result = train(cfg, progress=False, vision_backbone='laps/tiny-vit', text_backbone='laps/tiny-bert')
    run = Path(result['run_dir'])
    val = [json.loads(l) for l in (run / 'train_log.jsonl').read_text().splitlines() if '"val_dev"' in l]
    kinds = sorted({p['kind'] for p in load_minimal_pairs(probe_data, 'probetoy', 'dev_probes')})
    assert len(val) == 1 and {'rsum', 'mp_mean', 'mp_pair', 'mp_i2t', 'mp_t2i'} <= set(val[0])
    assert sorted(k[len('mp_mean_'):] for k in val[0] if k.startswith('mp_mean_')) == kinds
    assert not any(k.startswith('minimal_pair') for k in val[0])       # the report's flat keys stay out of the log
    saved = json.loads((run / 'metrics_dev.json').read_text())
    assert saved['minimal_pairs']['split'] == 'dev_probes' and saved['minimal_pairs']['overall']['mean'] == val[0]['mp_mean']
    assert saved['rsum'] == result['best_rsum']                         # selection stays on rsum
