"""`laps index`, `laps search` and `laps eval --rerank_topk` as a user meets them: the commands, their bad input, an
interrupted build, shards, and an index built by two processes under torchrun."""
import json, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from index_world import ROOT, ENV, _laps, _one_error_line, make_world


@pytest.fixture(scope='module')
def world(tmp_path_factory, synthetic_data):
    "The shared synthetic data, a gallery folder (with a corrupt file), and two tiny models: with a global head, and another one."
    return make_world(tmp_path_factory.mktemp('index'), synthetic_data)


def test_index_then_search_both_ways(world, tmp_path):
    idx = tmp_path / 'idx'
    out = _laps('index', world['head'], '--images', world['gallery'], '--captions', world['data'] / 'synthetic' / 'test_caps.txt',
                '--out', idx, '--no_progress')
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{idx}: {world['n_images']} images (1 skipped), FAISS flat" in out.stdout
    assert 'skipped' in out.stderr and 'corrupt.jpg' in out.stderr                    # named on stderr
    m = json.loads((idx / 'index.json').read_text())
    assert m['model']['global_embedding'] == 'global head' and m['collections']['captions']['n'] == 60
    assert [json.loads(l)['argv'][1] for l in (idx / 'commands.jsonl').read_text().splitlines()] == ['index']
    res = _laps('search', idx, 'a red circle', '-k', 3, '--rerank', 8, '--json')
    assert res.returncode == 0, res.stderr[-3000:]
    hits = json.loads(res.stdout)
    assert [h['rank'] for h in hits] == [0, 1, 2] and all(Path(h['path']).is_file() for h in hits)
    assert hits[0]['score'] >= hits[1]['score'] >= hits[2]['score']
    table = _laps('search', idx, 'a red circle', '-k', 3, '--rerank', 8, '--grid', tmp_path / 'grid.png')
    assert table.returncode == 0 and [l.split()[-1] for l in table.stdout.splitlines()] == [h['path'] for h in hits]
    assert Image.open(tmp_path / 'grid.png').size[0] > 500                            # the results as an image grid
    i2t = _laps('search', idx, '--image', hits[0]['path'], '-k', 4, '--json')
    assert i2t.returncode == 0, i2t.stderr[-3000:]
    assert len(json.loads(i2t.stdout)) == 4 and all('text' in h for h in json.loads(i2t.stdout))


def test_search_scores_are_the_models_scores(world, tmp_path):
    "The re-ranked scores are the LAPS scores of the query against those images (up to the fp16 token store)."
    from laps.checkpoint.run import load_any_checkpoint
    from laps.data.loaders import load_image, eval_transform, load_tokenizer, encode_caption
    from laps.retrieval.build import build_index, list_images
    from laps.retrieval.search import Index
    model, cfg, _ = load_any_checkpoint(world['head'])
    build_index(model, cfg, tmp_path / 'idx', images=list_images(world['gallery']), source=world['head'], progress=False)
    hits = Index.open(tmp_path / 'idx').search('two small blue squares', k=5, rerank=9)
    tok = load_tokenizer('minilm')
    with torch.no_grad():
        px = torch.stack([eval_transform(load_image(h.item['path']), cfg.img_res) for h in hits])
        ids = torch.tensor([encode_caption(tok, 'two small blue squares', cfg.max_word)])
        direct = model.cross_net(model.encode_images(px), *model.encode_captions(ids))[:, 0]
    np.testing.assert_allclose([h.score for h in hits], direct.numpy(), atol=2e-3)
    shortlist_only = Index.open(tmp_path / 'idx').search('two small blue squares', k=9, rerank=0)
    assert [h.shortlist_score for h in shortlist_only] == sorted((h.shortlist_score for h in shortlist_only), reverse=True)


def test_cli_defaults_are_the_librarys():
    from laps.retrieval.store import DEFAULT_RERANK
    from laps.eval.two_stage import DEFAULT_TOPK
    search, ev = _laps('search', '--help'), _laps('eval', '--help')
    assert f'default max(-k, {DEFAULT_RERANK}))' in ' '.join(search.stdout.split())
    assert f'(default K: {DEFAULT_TOPK})' in ' '.join(ev.stdout.split())


def test_bad_input_is_one_line(world, tmp_path):
    _one_error_line(_laps('index', world['head'], '--out', tmp_path / 'x'), 'one of --images FOLDER or --split')
    _one_error_line(_laps('index', world['head'], '--images', tmp_path / 'nowhere', '--out', tmp_path / 'x'),
                    '--images', 'not a folder')
    (tmp_path / 'empty').mkdir()
    _one_error_line(_laps('index', world['head'], '--images', tmp_path / 'empty', '--out', tmp_path / 'x'), 'no image files')
    _one_error_line(_laps('search', tmp_path / 'nowhere', 'a red circle'), 'index', 'not found')
    _one_error_line(_laps('search', tmp_path / 'empty', 'a red circle'), 'is not a laps index')
    idx = tmp_path / 'idx'
    assert _laps('index', world['head'], '--images', world['gallery'], '--out', idx, '--no_progress').returncode == 0
    _one_error_line(_laps('search', idx), 'needs a text QUERY, or --image')
    _one_error_line(_laps('search', idx, '--image', world['gallery'] / 'corrupt.jpg'), 'corrupt.jpg')
    _one_error_line(_laps('search', idx, '--image', next(world['gallery'].glob('*.png'))), 'holds no captions')
    _one_error_line(_laps('index', world['head'], '--images', world['gallery'], '--out', idx), 'pass --append')
    _one_error_line(_laps('index', world['other'], '--images', world['gallery'], '--out', idx, '--append'),
                    str(idx), 'build an index with this model')
    _one_error_line(_laps('search', idx, 'a red circle', '--shards', idx.parent / 'nowhere'), 'not found')


def test_append_adds_only_new_images(world, tmp_path):
    from laps.retrieval.search import Index
    first, idx = tmp_path / 'first', tmp_path / 'idx'
    first.mkdir()
    for p in sorted(world['gallery'].glob('*.png'))[:3]: (first / p.name).write_bytes(p.read_bytes())
    assert _laps('index', world['head'], '--images', first, '--out', idx, '--no_progress').returncode == 0
    out = _laps('index', world['head'], '--images', world['gallery'], '--out', idx, '--append', '--no_progress')
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((idx / 'index.json').read_text())
    assert m['collections']['images']['segments'] == ['seg-0000', 'seg-0001']
    assert m['collections']['images']['n'] == world['n_images'] + 3      # the three first ones again, by their other path
    assert Index.open(idx).images.n == m['collections']['images']['n']


def test_an_interrupted_build_is_never_read_and_continues(world, tmp_path):
    "Kill `laps index` after its first committed batch: search refuses the folder; the same command finishes it."
    from laps.retrieval.search import Index
    many = tmp_path / 'many'; many.mkdir()
    src = sorted((world['data'] / 'synthetic' / 'images').glob('*.png'))
    for i in range(40): (many / f'{i:03d}.png').write_bytes(src[i % len(src)].read_bytes())
    idx = tmp_path / 'idx'
    cmd = [sys.executable, '-m', 'laps', 'index', str(world['head']), '--images', str(many), '--out', str(idx),
           '--batch_size', '1', '--no_progress']
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = idx / 'images' / 'seg-0000.partial' / 'progress.json'
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(progress.read_text())['rows'] >= 3: break
        except (OSError, ValueError): pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    rows = json.loads(progress.read_text())['rows']
    assert 3 <= rows < 40 and not (idx / 'index.json').exists()
    _one_error_line(_laps('search', idx, 'a red circle'), 'interrupted', 'run the same command again')
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = tmp_path / 'whole'
    assert _laps('index', world['head'], '--images', many, '--out', whole, '--no_progress').returncode == 0
    a = np.fromfile(idx / 'images' / 'seg-0000' / 'tokens.f16', np.float16)
    b = np.fromfile(whole / 'images' / 'seg-0000' / 'tokens.f16', np.float16)
    np.testing.assert_array_equal(a, b)                                   # batch size does not change the tokens here
    assert Index.open(idx).images.n == 40


def test_two_shards_answer_as_one_index(world, tmp_path):
    from laps.retrieval.build import list_images
    paths = list_images(world['gallery'])
    halves = [tmp_path / 'a', tmp_path / 'b']
    for half, part in zip(halves, (paths[:5], paths[5:])):
        half.mkdir()
        for p in part: (half / Path(p).name).write_bytes(Path(p).read_bytes())
    for folder, out in ((world['gallery'], 'all'), (halves[0], 's0'), (halves[1], 's1')):
        assert _laps('index', world['head'], '--images', folder, '--out', tmp_path / out, '--no_progress').returncode == 0
    one = json.loads(_laps('search', tmp_path / 'all', 'a big green triangle', '-k', 6, '--rerank', 9, '--json').stdout)
    two = _laps('search', tmp_path / 's0', 'a big green triangle', '--shards', tmp_path / 's1', '-k', 6, '--rerank', 9, '--json')
    assert two.returncode == 0, two.stderr[-3000:]
    two = json.loads(two.stdout)
    assert [Path(h['path']).name for h in two] == [Path(h['path']).name for h in one]
    np.testing.assert_allclose([h['score'] for h in two], [h['score'] for h in one], atol=1e-5)


def test_eval_rerank_topk_with_the_whole_gallery_is_exhaustive(world):
    out = _laps('eval', world['head'], '--split', 'test', '--rerank_topk', 60, '--json')
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads(out.stdout)
    assert m['pairs_scored'] == m['pairs_exhaustive'] == 12 * 60
    assert abs(m['two_stage']['rsum'] - m['exhaustive']['rsum']) < 1e-6 and m['rsum_minus_exhaustive'] == pytest.approx(0)
    assert m['shortlist_recall_at_k'] == {'i2t': 100.0, 't2i': 100.0}
    small = json.loads(_laps('eval', world['head'], '--split', 'test', '--rerank_topk', 2, '--exhaustive', 0, '--json').stdout)
    assert 60 * 2 <= small['pairs_scored'] <= (12 + 60) * 2 and 'exhaustive' not in small
    assert json.loads((world['head'] / 'metrics_test_rerank2.json').read_text())['k'] == 2
    _one_error_line(_laps('eval', world['head'], '--rerank_topk', 0), '--rerank_topk must be a positive')


def test_index_bench_prints_one_row_per_size(world, tmp_path):
    out = _laps('bench', '--index', world['head'], '--sizes', 200, 400, '--queries', 4, '--rerank', 20, '--json',
                '--work', tmp_path / 'w')
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert [row['n'] for row in r['rows']] == [200, 400] and r['setup']['source'] == 'encoded tokens replicated with noise'
    assert (r['setup']['base_images'], r['setup']['queries']) == (12, 4)           # the test split's images; the queries asked for
    assert r['rows'][1]['disk_mb'] > r['rows'][0]['disk_mb']
    for row in r['rows']:
        assert row['queries'] == 4 and 0 <= row['shortlist_recall'] <= 1            # every query timed, once
        for k in ('build_s', 'open_s', 'median_ms', 'p90_ms', 'shortlist_only_median_ms'):
            assert 0 < row[k] < float('inf'), (k, row[k])                           # measured: finite, positive
        assert row['median_ms'] <= row['p90_ms']                                    # of 4 latencies: median <= the 3rd
    assert not any((tmp_path / 'w').glob('index-*'))                   # removed unless --keep


@pytest.mark.slow
def test_torchrun_builds_one_index_from_two_ranks(world, tmp_path):
    "Two processes each encode half of the gallery into their own segment; rank 0 commits both: the same index as one process."
    res = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m', 'laps',
                          'index', str(world['head']), '--images', str(world['gallery']), '--out', str(tmp_path / 'two'),
                          '--device', 'cpu', '--no_progress'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count('images (1 skipped)') == 1                       # rank 0 reports
    m = json.loads((tmp_path / 'two' / 'index.json').read_text())
    assert m['collections']['images']['segments'] == ['seg-0000-r0', 'seg-0000-r1']
    assert m['collections']['images']['n'] == world['n_images']
    assert _laps('index', world['head'], '--images', world['gallery'], '--out', tmp_path / 'one', '--no_progress').returncode == 0
    q = ('search', 'a small red cross', '-k', 5, '--rerank', 10, '--json')
    one = json.loads(_laps(q[0], tmp_path / 'one', *q[1:]).stdout)
    two = json.loads(_laps(q[0], tmp_path / 'two', *q[1:]).stdout)
    assert [h['path'] for h in two] == [h['path'] for h in one]
    np.testing.assert_allclose([h['score'] for h in two], [h['score'] for h in one], atol=1e-5)
