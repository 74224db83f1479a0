"""`laps serve` (laps.retrieval.server) through FastAPI's TestClient: every route of the JSON API and every safety rule
(only indexed images, bounded uploads and queries, 4xx JSON errors, the server staying up), the command line without
the `serve` extra and off loopback, and the load benchmark at a tiny size (counts, never timings)."""
import http.client, io, json, os, shutil, subprocess, sys, threading
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from index_world import ROOT, ENV, make_world, build_world_index

fastapi = pytest.importorskip('fastapi', reason="the serve extra (pip install 'laps[serve]') is not installed")
from fastapi.testclient import TestClient
from laps.retrieval.search import Index
from laps.retrieval.server import create_app, ServeLimits, bomb_png, SearchService


@pytest.fixture(scope='module')
def world(tmp_path_factory, synthetic_data):
    return make_world(tmp_path_factory.mktemp('serve'), synthetic_data)


@pytest.fixture(scope='module')
def index(world):
    return Index.open(build_world_index(world, world['root'] / 'idx'))


@pytest.fixture(scope='module')
def client(index):
    return TestClient(create_app(index, k=5))


def _ok(client):
    "The server still answers a good request."
    r = client.get('/api/search', params=dict(q='a red circle', k=2))
    assert r.status_code == 200 and len(r.json()['hits']) == 2, r.text


def _refused(r, status, *words):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers['content-type'] == 'application/json' and set(r.json()) == {'error'}, r.text
    assert 'Traceback' not in r.text and all(w in r.json()['error'] for w in words), r.json()


def _png(path: Path) -> bytes:
    return path.read_bytes()


def test_page_is_one_self_contained_document(client):
    r = client.get('/')
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/html')
    assert "default-src 'none'" in r.headers['content-security-policy'] and r.headers['x-content-type-options'] == 'nosniff'
    assert '<script>' in r.text and '<style>' in r.text
    assert 'http://' not in r.text and 'https://' not in r.text and ' src="/' not in r.text   # nothing fetched but the API
    for off in ('/docs', '/redoc', '/openapi.json'): assert client.get(off).status_code == 404    # they load a CDN's scripts


def test_info(client, index):
    i = client.get('/api/info').json()
    assert (i['images'], i['captions'], i['index']) == (12, 60, ['idx'])
    assert i['defaults'] == dict(k=5, rerank=100) and i['limits'] == dict(
        max_query_chars=500, max_k=100, max_rerank=1000, max_upload_bytes=10 << 20, max_pixels=24_000_000, cache=256)
    assert i['model'] == dict(similarity='attn', global_embedding='global head', fingerprint=index.record['fingerprint'][:12])


def test_search_is_the_index_search(client, index):
    r = client.get('/api/search', params=dict(q='a small red circle', k=4, rerank=8)).json()
    direct = index.search('a small red circle', 4, 8)
    assert [(h['id'], h['score']) for h in r['hits']] == [(h.row, h.score) for h in direct]
    assert (r['k'], r['rerank'], [h['rank'] for h in r['hits']]) == (4, 8, [0, 1, 2, 3])
    assert [h['name'] for h in r['hits']] == [Path(h.item['path']).name for h in direct]       # a name, never a path
    assert '/' not in json.dumps([h['name'] for h in r['hits']])
    assert set(r['timings_ms']) == {'encode_ms', 'shortlist_ms', 'rerank_ms', 'queue_ms', 'total_ms'}
    short = client.get('/api/search', params=dict(q='a small red circle', k=4, rerank=0)).json()
    assert short['rerank'] == 0 and all(h['score'] == h['shortlist_score'] for h in short['hits'])
    assert len(client.get('/api/search', params=dict(q='a red circle')).json()['hits']) == 5      # the server's -k
    img = client.get(r['hits'][0]['url'])
    assert img.status_code == 200 and img.headers['content-type'] == 'image/png'
    assert Image.open(io.BytesIO(img.content)).size == Image.open(direct[0].item['path']).size   # 64 px: under 256


def test_search_image_ranks_the_indexed_captions(client, index):
    path = index.images.items([3])[0]['path']
    r = client.post('/api/search_image', params=dict(k=6), files=dict(image=('q.png', _png(Path(path)), 'image/png')))
    assert r.status_code == 200, r.text
    hits = r.json()['hits']
    direct = index.search_image(path, 6)
    assert [(h['id'], h['text']) for h in hits] == [(h.row, h.item['text']) for h in direct]
    np.testing.assert_allclose([h['score'] for h in hits], [h.score for h in direct], atol=1e-5)
    for h in hits:                                                    # each caption names its own indexed image
        assert h['image_id'] == next(i for i in range(12) if index.images.items([i])[0]['path'] == index.captions.items([h['id']])[0]['image'])
    form = client.post('/api/search_image', data=dict(k='3'), files=dict(image=('q.png', _png(Path(path)), 'image/png')))
    assert len(form.json()['hits']) == 3                             # k as a form field too


def test_bad_parameters_are_4xx_json_and_the_server_stays_up(client):
    cases = [(dict(q='x' * 501), 'q is 501 characters long; at most 500'), (dict(), 'q is missing'), (dict(q='   '), 'q is empty'),
             (dict(q='a', k='0'), 'k must be between 1 and 100'), (dict(q='a', k='101'), 'k must be between 1 and 100'),
             (dict(q='a', k='abc'), 'k must be a whole number'), (dict(q='a', k='-3'), 'k must be a whole number'),
             (dict(q='a', rerank='1e9'), 'rerank must be a whole number'), (dict(q='a', rerank='5000'), 'between 0 and 1000'),
             (dict(q='a', k='10', rerank='4'), 'rerank 4 is below k 10')]
    for params, words in cases:
        _refused(client.get('/api/search', params=params), 400, words)
        _ok(client)
    _refused(client.get('/api/nowhere'), 404, 'not found')
    _refused(client.post('/api/search', params=dict(q='a')), 405, 'method POST not allowed')
    _refused(client.get('/api/explain', params=dict(q='a')), 400, 'item is missing')
    _refused(client.get('/api/explain', params=dict(item='0')), 400, 'q is missing')
    _refused(client.get('/api/explain', params=dict(item='12', q='a')), 404, 'no image')
    _ok(client)


@pytest.mark.parametrize('path', ['/api/image/12', '/api/image/-1', '/api/image/abc', '/api/image/1.0', '/api/image/0x1',
                                  '/api/image/99999999999999999999', '/api/image/%2e%2e', '/api/image/..%2F..%2Fetc%2Fpasswd',
                                  '/api/image/%2Fetc%2Fpasswd', '/api/image/../../etc/passwd', '/api/image//etc/passwd',
                                  '/api/image/' + '%2e%2e%2f' * 8 + 'etc%2fpasswd', '/api/image/ 1',
                                  '/api/image/1%00', '/etc/passwd', '/api/image/'])
def test_only_indexed_images_are_served(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()['error'], (path, r.status_code, r.text[:200])
    assert client.get('/api/image/11').status_code == 200


def test_a_changed_gallery_file_is_never_followed(world, tmp_path):
    "The index's paths are untrusted: a file replaced by a link, by a non-image or removed after indexing is a 404."
    from laps.checkpoint.run import load_any_checkpoint
    from laps.retrieval.build import build_index, list_images
    gallery = shutil.copytree(world['gallery'], tmp_path / 'gallery')
    (gallery / 'corrupt.jpg').unlink()
    model, cfg, _ = load_any_checkpoint(world['head'])
    build_index(model, cfg, tmp_path / 'idx', images=list_images(gallery), progress=False)
    c = TestClient(create_app(Index.open(tmp_path / 'idx')))
    paths = [Path(p['path']) for p in Index.open(tmp_path / 'idx').images.items(np.arange(3))]
    (tmp_path / 'secret.txt').write_text('not for you')
    paths[0].unlink(); paths[0].symlink_to(tmp_path / 'secret.txt')        # a link out of the gallery
    paths[1].write_text('not an image any more')
    paths[2].unlink()
    for i in range(3): _refused(c.get(f'/api/image/{i}'), 404, f'image {i} is not available')
    assert c.get('/api/image/3').status_code == 200
    other = tmp_path / 'other.png'; Image.new('RGB', (8, 8)).save(other)
    p3 = Path(Index.open(tmp_path / 'idx').images.items([3])[0]['path'])
    p3.unlink(); p3.symlink_to(other)                                   # even a link to an image: not what was listed
    _refused(c.get('/api/image/3'), 404)


def test_uploads_are_bounded_in_bytes_and_pixels(index, world):
    c = TestClient(create_app(index, limits=ServeLimits(max_upload_bytes=20_000, max_pixels=10_000)))
    good = _png(Path(index.images.items([0])[0]['path']))
    big = io.BytesIO(); Image.effect_noise((200, 200), 50).save(big, 'PNG')        # 40,000 pixels, ~40 KB
    post = lambda data, field='image', **kw: c.post('/api/search_image', files={field: ('x.png', data, 'image/png')}, **kw)
    cases = [(post(bomb_png()), 413, 'too large to decode'), (post(bomb_png(200, 100)), 413, '200x100 = 20,000 pixels, over'),
             (post(big.getvalue()), 413, 'over this server\'s limit of 20,000 bytes'), (post(b''), 400, 'empty'),
             (post(b'%PDF-1.4 not an image'), 400, 'not an image'), (post(good[:200]), 400, 'could not be decoded'),
             (post(good, field='file'), 400, "no file in the upload's field 'image'"),
             (c.post('/api/search_image', content=good, headers={'content-type': 'image/png'}), 400, 'multipart/form-data'),
             (c.post('/api/search_image', content=b'--x\r\nbroken', headers={'content-type': 'multipart/form-data; boundary=x'}), 400, ''),
             (post(good, params=dict(k='0')), 400, 'k must be between')]
    for r, status, words in cases:
        _refused(r, status, words)
        assert post(good).status_code == 200
    huge = b'x' * (200_000)
    _refused(c.post('/api/search_image', content=huge, headers={'content-type': 'multipart/form-data; boundary=x'}), 413, 'bytes')
    _ok(c)


def test_concurrent_requests_all_answer(client):
    "Eight threads at once (the model and its fast tokenizer are shared behind one lock)."
    out = []
    def go(i): out.append(client.get('/api/search', params=dict(q=f'a big blue square number {i}', k=3)).status_code)
    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert out == [200] * 8


def test_without_the_serve_extra_the_module_imports_and_the_command_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import laps.retrieval.server, laps.cli.serve\n"
            "from laps.cli import main; sys.exit(main(['serve', 'no-such-index']))")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == ["laps: error: laps serve needs fastapi: pip install 'laps[serve]'"]


def test_serve_warns_off_loopback(index, monkeypatch, capsys):
    import uvicorn
    from laps.cli import main
    calls = []
    monkeypatch.setattr(uvicorn, 'run', lambda app, **kw: calls.append(kw))
    assert main(['serve', str(index.paths[0]), '--host', '0.0.0.0', '--port', '8123', '-k', '7']) == 0
    out = capsys.readouterr()
    assert 'warning: listening on 0.0.0.0, not loopback' in out.err and 'http://0.0.0.0:8123/' in out.out
    assert calls[0]['host'] == '0.0.0.0' and calls[0]['port'] == 8123
    assert main(['serve', str(index.paths[0])]) == 0
    assert 'warning' not in capsys.readouterr().err and calls[1]['host'] == '127.0.0.1'
    assert main(['serve', str(index.paths[0]), '-k', '500']) == 2
    assert '-k 500 is over --max-k 100' in capsys.readouterr().err


def test_the_real_server_refuses_raw_traversal_and_the_load_bench_counts(index):
    "`laps serve` in a subprocess: raw request paths (sent unnormalised), then `laps serve --bench` at a tiny size."
    from laps.retrieval.load_bench import serving
    with serving(index.paths[0]) as (url, proc, info):
        conn = http.client.HTTPConnection('127.0.0.1', int(url.rsplit(':', 1)[1]), timeout=60)
        for raw in ('/api/image/../../../../etc/passwd', '/api/image/..%2f..%2fetc%2fpasswd', '/api/image/%2e%2e/%2e%2e/etc/passwd',
                    '/../../etc/passwd', '/api/image/0/../../../etc/passwd', '/api/image/0/../1', '/api/image/12'):
            conn.request('GET', raw); r = conn.getresponse(); body = r.read()
            assert r.status in (400, 404) and b'root:' not in body, (raw, r.status, body[:200])
        conn.request('GET', '/api/image/0'); r = conn.getresponse()
        assert r.status == 200 and r.read()[:4] == b'\x89PNG'
    r = subprocess.run([sys.executable, '-m', 'laps', 'serve', str(index.paths[0]), '--bench', '--clients', '4', '--requests',
                        '12', '--seconds', '120', '--json'], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert (res['requests'], res['errors'], res['server_alive'], res['clients']) == (12, 0, True, 4)
    assert {k: v['n'] for k, v in res['per_kind'].items()} == {'search': 8, 'explain': 2, 'explain.png': 2}
    assert res['rss_before_mb'] > 0 and res['rss_after_mb'] > 0
