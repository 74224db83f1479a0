"""`laps bench` for the methods that do not slim: it runs, both engines agree, and the FLOP estimate is the method's."""
import json
import pytest
from laps.eval.bench import run_bench
from laps.cli import main
from laps.core.config import get_config
from laps.core.registry import SIMILARITY_METHODS

BASELINES = [m for m in SIMILARITY_METHODS.names() if not SIMILARITY_METHODS.get(m).slims_patches]
C = get_config('cpu').embed_size   # the cpu preset's joint embedding width


def timed(monkeypatch) -> list:
    "Record every time the bench measures (`best_time`, real clocks), in order: eval fast, eval reference, GEMM, train fast, train reference."
    times, real = [], run_bench.__globals__['best_time']              # the bench module's own name
    def best_time(*args, **kw):
        times.append(real(*args, **kw))
        return times[-1]
    monkeypatch.setitem(run_bench.__globals__, 'best_time', best_time)
    return times


def assert_rates_are_counts_over_times(r: dict, times: list, gemm_n: int):
    "Each reported rate is what was counted over what was timed, and the derived figures follow from them."
    import math
    assert len(times) == 5 and all(math.isfinite(t) and t > 0 for t in times), times
    t_fast, t_ref, t_gemm, t_train, t_train_ref = times
    n, m, k, B, kt = r['n_images'], r['n_texts'], r['reference_texts_timed'], r['train_batch'], r['train_reference_texts_timed']
    assert r['eval_pairs_per_s_fast'] == pytest.approx(n * m / t_fast)
    assert r['eval_pairs_per_s_reference'] == pytest.approx(n * k / t_ref)
    assert r['eval_speedup'] == pytest.approx(r['eval_pairs_per_s_fast'] / r['eval_pairs_per_s_reference'])
    assert r['gemm_gflops'] == pytest.approx(2 * gemm_n ** 3 / t_gemm / 1e9)
    for e in ('fast', 'reference'):
        assert r[f'eval_gflops_{e}'] == pytest.approx(r[f'eval_pairs_per_s_{e}'] * r[f'flops_per_pair_{e}'] / 1e9)
        assert r[f'flop_bound_fraction_{e}'] == pytest.approx(r[f'eval_gflops_{e}'] / r['gemm_gflops'])
    assert r['train_seconds_fast'] == t_train
    assert r['train_seconds_reference'] == pytest.approx(t_train_ref * B / kt)    # timed on kt captions, scaled to B
    assert r['train_speedup'] == pytest.approx(r['train_seconds_reference'] / r['train_seconds_fast'])


@pytest.mark.parametrize('method', BASELINES)
def test_bench_runs_a_baseline_at_cpu_preset_shapes(method, monkeypatch):
    times = timed(monkeypatch)
    r = run_bench(preset='cpu', similarity=method, n_images=16, n_texts=24, ref_texts=4, train_batch=8,
                  ref_train_texts=4, gemm_n=256, log=lambda *a: None)
    assert r['similarity'] == method and r['embed_size'] == C and r['tokens_per_image'] == 65
    assert (r['n_images'], r['n_texts'], r['reference_texts_timed'], r['train_batch'], r['train_reference_texts_timed']) == \
        (16, 24, 4, 8, 4)
    assert_rates_are_counts_over_times(r, times, 256)
    assert r['max_abs_diff'] <= 1e-5 and r['train_max_abs_diff'] <= 1e-5
    M, L = SIMILARITY_METHODS.get(method).aligned_tokens(64, r['mean_caption_len'], True)   # [CLS] + 64 patches
    assert r['flops_per_pair_fast'] == r['flops_per_pair_reference'] == pytest.approx(2 * M * L * C)


def test_bench_cli_similarity_choices_come_from_the_registry(capsys):
    assert main(['bench', '--preset', 'cpu', '--similarity', 'global', '--images', '8', '--texts', '8', '--ref-texts', '2',
                      '--no-train', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['similarity'] == 'global' and out['flops_per_pair_fast'] == 2 * C       # one cosine per pair
    with pytest.raises(SystemExit) as e: main(['bench', '--similarity', 'nope'])
    assert e.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quick_json(capsys, monkeypatch):
    "`laps bench --quick --json`: the quick sizes, both engines agree, every rate is a count over a measured time."
    times = timed(monkeypatch)
    assert main(['bench', '--quick', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out['n_images'], out['n_texts'], out['reference_texts_timed'], out['train_batch'], out['train_reference_texts_timed']) == \
        (100, 500, 8, 128, 8)
    assert_rates_are_counts_over_times(out, times, 2048)
    assert 0 <= out['max_abs_diff'] <= 1e-4 and 0 <= out['train_max_abs_diff'] <= 1e-4
    # Gradients are not compared here: the bench's random inputs are not kept away from ties, and where two
    # cosines of a `max` are within rounding the engines may send the gradient to different tokens (both are
    # subgradients): train_grad_max_abs_diff was 6.8e-4 with uniform lengths, at fa51256 as now. The sweeps
    # in test_engine.py compare every gradient on untied inputs.
    assert out['similarity'] == 'max' and out['caption_lengths_used'] in ('captions file', 'uniform 10-30 (captions file missing)')
