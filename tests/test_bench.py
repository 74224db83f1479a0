"""`laps bench` for the methods that do not slim: it runs, both engines agree, and the FLOP estimate is the method's."""
import json
import pytest
from laps.eval.bench import run_bench
from laps.cli import main
from laps.core.config import get_config
from laps.core.registry import SIMILARITY_METHODS

BASELINES = [m for m in SIMILARITY_METHODS.names() if not SIMILARITY_METHODS.get(m).slims_patches]
C = get_config('cpu').embed_size   # the cpu preset's joint embedding width


@pytest.mark.parametrize('method', BASELINES)
def test_bench_runs_a_baseline_at_cpu_preset_shapes(method):
    r = run_bench(preset='cpu', similarity=method, n_images=16, n_texts=24, ref_texts=4, train_batch=8,
                  ref_train_texts=4, gemm_n=256, log=lambda *a: None)
    assert r['similarity'] == method and r['embed_size'] == C and r['tokens_per_image'] == 65
    assert r['eval_pairs_per_s_fast'] > 0 and r['eval_pairs_per_s_reference'] > 0 and r['train_seconds_fast'] > 0
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
