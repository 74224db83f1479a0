"""Vectorised retrieval metrics against the naive loop definition; COCO protocol; saved matrices and ensembles."""
import json
import numpy as np
import pytest
import torch
from laps.eval.metrics import (METRIC_KEYS, retrieval_ranks, retrieval_ranks_naive, retrieval_metrics,
                          retrieval_metrics_naive, evaluate_sims, format_metrics, save_sims, load_sims, ensemble_sims)


def _matrices():
    rng = np.random.default_rng(1234)
    yield 'normal', rng.standard_normal((40, 200)).astype(np.float32)
    yield 'ties', rng.integers(0, 3, size=(23, 115)).astype(np.float64)          # heavy ties
    yield 'diag-ish', (rng.standard_normal((30, 150)) + 2 * np.repeat(np.eye(30), 5, axis=1)).astype(np.float32)
    yield 'constant', np.zeros((6, 30), np.float32)                               # ties count against the query
    yield 'one image', rng.standard_normal((1, 5))


@pytest.mark.parametrize('name,sims', list(_matrices()), ids=[n for n, _ in _matrices()])
@pytest.mark.parametrize('chunk', [1, 7, 256])
def test_vectorised_equals_naive(name, sims, chunk):
    i2t, t2i = retrieval_ranks(sims, chunk_size=chunk)
    n_i2t, n_t2i = retrieval_ranks_naive(sims)
    np.testing.assert_array_equal(i2t, n_i2t)
    np.testing.assert_array_equal(t2i, n_t2i)
    assert retrieval_metrics(torch.from_numpy(sims), chunk_size=chunk) == retrieval_metrics_naive(sims)


def test_ties_count_against_the_query():
    s = np.zeros((2, 10))                                                         # a collapsed model: all tied
    i2t, t2i = retrieval_ranks(s)
    assert i2t.tolist() == [5, 5] and t2i.tolist() == [1] * 10                    # ranks last, not first
    assert retrieval_metrics(s)['i2t_r1'] == 0.0 and retrieval_metrics(s)['t2i_r1'] == 0.0
    s[1, 7] = 1.0                                                                 # image 1 scores its caption 7 higher
    i2t, t2i = retrieval_ranks(s)
    assert i2t.tolist() == [5, 0]
    assert t2i.tolist() == [1] * 7 + [0] + [1] * 2
    assert retrieval_metrics(s)['t2i_r1'] == 10.0


def test_hand_example_2x10():
    s = np.array([[0.1, 0.9, 0.2, 0.3, 0.0, 0.95, 0.5, 0.4, 0.0, 0.2],
                  [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.85]])
    m = retrieval_metrics(s)
    assert m == {'i2t_r1': 50.0, 'i2t_r5': 100.0, 'i2t_r10': 100.0, 'i2t_medr': 1.0, 'i2t_meanr': 1.5,
                 't2i_r1': 20.0, 't2i_r5': 100.0, 't2i_r10': 100.0, 't2i_medr': 2.0, 't2i_meanr': 1.8, 'rsum': 470.0}
    assert m == retrieval_metrics_naive(s)
    json.dumps(m)                                                                 # plain floats


def test_medr_and_recall_at_k_boundaries():
    # 12 images whose own caption ranks (0-based) are 0..11: R@1 = 1/12, R@5 = 5/12, R@10 = 10/12
    n = 12
    s = np.zeros((n, 5 * n))
    for i in range(n):
        s[i, 5 * i:5 * i + 5] = 0.5
        others = [j for j in range(5 * n) if j // 5 != i][:i]
        s[i, others] = 1.0                                                        # i captions beat image i's own
    i2t, _ = retrieval_ranks(s)
    assert i2t.tolist() == list(range(n))
    m = retrieval_metrics(s)
    assert m['i2t_r1'] == pytest.approx(100 / 12) and m['i2t_r5'] == pytest.approx(500 / 12)
    assert m['i2t_r10'] == pytest.approx(1000 / 12)
    assert m['i2t_medr'] == 6.0                                                   # floor(median 5.5) + 1
    assert m['i2t_meanr'] == pytest.approx(6.5)


def test_coco_protocol_folds_and_5k():
    rng = np.random.default_rng(7)
    s = rng.standard_normal((30, 150)).astype(np.float32)
    e = evaluate_sims(s, 'coco', fold_size=10)
    folds = [retrieval_metrics_naive(s[f * 10:(f + 1) * 10, f * 50:(f + 1) * 50]) for f in range(3)]
    for k in METRIC_KEYS:
        assert e[k] == pytest.approx(np.mean([m[k] for m in folds]))
        assert e[f'5k_{k}'] == retrieval_metrics_naive(s)[k]
    assert set(e) == set(METRIC_KEYS) | {f'5k_{k}' for k in METRIC_KEYS}
    text = format_metrics(e)
    assert 'COCO 1K (5-fold mean)' in text and 'COCO 5K' in text
    assert f"{e['5k_rsum']:7.1f}" in text


def test_f30k_and_synthetic_are_one_pass():
    s = np.random.default_rng(3).standard_normal((10, 50))
    assert evaluate_sims(s, 'f30k') == evaluate_sims(s, 'synthetic') == retrieval_metrics_naive(s)
    assert 'COCO' not in format_metrics(evaluate_sims(s, 'f30k'))


@pytest.mark.parametrize('bad,msg', [(np.zeros((3, 14)), 'expected 5 captions per image'),
                                     (np.zeros(15), '2-D'),
                                     (np.array([[np.nan] * 5]), 'NaN')])
def test_bad_matrices(bad, msg):
    with pytest.raises(ValueError, match=msg):
        retrieval_metrics(bad)


def test_save_load_and_ensemble(tmp_path):
    a = np.random.default_rng(0).standard_normal((4, 20)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((4, 20)).astype(np.float32)
    pa, pb = save_sims(tmp_path / 'run1' / 'sims_test.npy', a), save_sims(tmp_path / 'sims_b.npy', torch.from_numpy(b))
    np.testing.assert_array_equal(load_sims(pa), a)
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['sims_b.npy', 'sims_test.npy']
    np.testing.assert_allclose(ensemble_sims([pa, pb]), (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(ensemble_sims([pa, b, torch.from_numpy(a)]), (2 * a + b) / 3, rtol=1e-6)
    save_sims(tmp_path / 'wrong.npy', np.zeros((5, 25)))
    with pytest.raises(ValueError, match=r'wrong\.npy: shape \(5, 25\) differs from .*sims_test\.npy: \(4, 20\)'):
        ensemble_sims([pa, tmp_path / 'wrong.npy'])
    with pytest.raises(FileNotFoundError, match='nope.npy'):
        ensemble_sims([pa, tmp_path / 'nope.npy'])
    with pytest.raises(ValueError, match='at least one'):
        ensemble_sims([])


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = save_sims(tmp_path / 's.npy', np.ones((1, 5)))
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(np, 'save', boom)
    with pytest.raises(OSError, match='disk full'):
        save_sims(p, np.zeros((1, 5)))
    monkeypatch.undo()
    np.testing.assert_array_equal(load_sims(p), np.ones((1, 5)))
    assert [q.name for q in tmp_path.iterdir()] == ['s.npy']


def test_protocol_comes_from_the_dataset_spec():
    from laps.data.datasets import DatasetSpec, EvalProtocol, register_dataset
    from laps.core.registry import DATASETS
    rng = np.random.default_rng(11)
    s = rng.standard_normal((6, 18))                                              # 3 captions per image
    register_dataset(DatasetSpec('mine3', captions_per_image=3))
    register_dataset(DatasetSpec('mine3f', captions_per_image=3, protocol=EvalProtocol(fold_size=2, full_pass_prefix='all_')))
    try:
        assert evaluate_sims(s, 'mine3') == retrieval_metrics_naive(s, 3)
        e = evaluate_sims(s, 'mine3f')
        folds = [retrieval_metrics_naive(s[2 * f:2 * f + 2, 6 * f:6 * f + 6], 3) for f in range(3)]
        assert set(e) == set(METRIC_KEYS) | {f'all_{k}' for k in METRIC_KEYS}
        for k in METRIC_KEYS:
            assert e[k] == pytest.approx(np.mean([m[k] for m in folds])) and e[f'all_{k}'] == retrieval_metrics_naive(s, 3)[k]
        with pytest.raises(ValueError, match='expected 3 captions per image'):
            evaluate_sims(np.zeros((2, 10)), 'mine3')
    finally:
        DATASETS.unregister('mine3'); DATASETS.unregister('mine3f')
    with pytest.raises(KeyError, match=r"unknown dataset 'mine3'; registered: f30k, coco, synthetic"):
        evaluate_sims(s, 'mine3')
