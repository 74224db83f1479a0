"""An index folder from someone else is untrusted input: `laps index` and `laps search` never read or delete outside
it, refuse a damaged one with one line, skip what cannot be encoded, print what it names safely, and one writer at a
time builds it (issue #21). The commands run in this process (`laps.cli.main`), which keeps these tests fast."""
import contextlib, io, json, os, shutil, struct, threading, time, zlib
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from index_world import make_world
from laps.cli import main
from laps.core.guards import folder_lock


@pytest.fixture(scope='module')
def world(tmp_path_factory, synthetic_data):
    return make_world(tmp_path_factory.mktemp('safety'), synthetic_data)


def _quiet(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main([str(a) for a in args])


@pytest.fixture(scope='module')
def built(world):
    "An index of the gallery (10 images, one corrupt file) and the test captions, built once; tests work on copies."
    base = world['root'] / 'base'
    caps = world['data'] / 'synthetic' / 'test_caps.txt'
    assert _quiet('index', world['head'], '--images', world['gallery'], '--captions', caps, '--out', base, '--no_progress') == 0
    return base


@pytest.fixture
def idx(built, tmp_path):
    shutil.copytree(built, tmp_path / 'idx', symlinks=True)
    return tmp_path / 'idx'


def _run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _refused(capsys, *args, expect=()) -> str:
    "Run `laps ARGS` here: exit status 2 and one `laps: error:` line holding every string of `expect`."
    code, _, err = _run(capsys, *args)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith('laps: error:'), (code, err[-3000:])
    for s in expect: assert s in lines[0], (s, lines[0])
    return lines[0]


def _edit(folder: Path, fn, name='index.json'):
    f = folder / name
    m = json.loads(f.read_text())
    fn(m)
    f.write_text(json.dumps(m))


def _png_header(path: Path, w: int, h: int) -> Path:
    "A PNG whose header announces w x h pixels (a few dozen bytes on disk, like a decompression bomb's)."
    def chunk(t, d): return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))
    return path


def _small_gallery(world, folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for p in sorted(world['gallery'].glob('*.png'))[:n]: shutil.copy(p, folder / p.name)
    return folder


# 1. A collection key that leads outside: refused before anything is written or deleted.
def test_a_collection_outside_the_index_is_refused_and_nothing_outside_is_deleted(world, idx, capsys):
    victim = idx.parent / 'victim'; victim.mkdir()
    (victim / 'faiss-7.index').write_bytes(b'precious')
    _edit(idx, lambda m: m['collections'].update({'../victim': m['collections']['images']}))
    expect = (f"{idx / 'index.json'}: collections: '../victim' is not a collection (expected images or captions)",)
    _refused(capsys, 'index', world['head'], '--images', world['gallery'], '--out', idx, '--append', '--no_progress',
             expect=expect)
    assert (victim / 'faiss-7.index').read_bytes() == b'precious'
    _refused(capsys, 'search', idx, 'a red circle', expect=expect)


# 2. Segment names: only the names this code writes, inside the index.
@pytest.mark.parametrize('name', ['ABS', '../../other/images/seg-0000', 'seg-0000/../../../other/images/seg-0000', 'x'])
def test_a_segment_name_from_elsewhere_is_refused(idx, capsys, name):
    other = idx.parent / 'other'; shutil.copytree(idx, other)
    name = str(other / 'images' / 'seg-0000') if name == 'ABS' else name
    _edit(idx, lambda m: m['collections']['images'].update(segments=[name]))
    _refused(capsys, 'search', idx, 'a red circle',
             expect=(f"{idx / 'index.json'}: collections.images.segments[0]: {name!r} is not a segment name",))


def test_a_collection_folder_or_segment_linked_outside_is_refused(idx, capsys):
    other = idx.parent / 'other'; shutil.copytree(idx, other)
    shutil.rmtree(idx / 'images' / 'seg-0000')
    (idx / 'images' / 'seg-0000').symlink_to(other / 'images' / 'seg-0000')
    _refused(capsys, 'search', idx, 'a red circle', expect=('collections.images.segments[0]', 'leads outside'))
    shutil.rmtree(idx / 'images')
    (idx / 'images').symlink_to(other / 'images')
    _refused(capsys, 'search', idx, 'a red circle', expect=('leads outside',))


# 3. The FAISS file: its pattern, inside the index.
def test_a_faiss_file_from_elsewhere_is_refused(idx, capsys):
    other = idx.parent / 'other'; shutil.copytree(idx, other)
    _edit(idx, lambda m: m['collections']['images']['faiss'].update(file='../../other/images/faiss-0.index'))
    _refused(capsys, 'search', idx, 'a red circle',
             expect=('collections.images.faiss.file', "'../../other/images/faiss-0.index' is not a FAISS file name"))
    _edit(idx, lambda m: m['collections']['images']['faiss'].update(file='faiss-0.index'))
    (idx / 'images' / 'faiss-0.index').unlink()
    (idx / 'images' / 'faiss-0.index').symlink_to(other / 'images' / 'faiss-0.index')
    _refused(capsys, 'search', idx, 'a red circle', expect=('collections.images.faiss.file', 'leads outside'))


# 4. Every file a segment opens stays inside: a token store (or meta.json) linked outside is refused.
@pytest.mark.parametrize('fname', ['tokens.f16', 'meta.json', 'items.jsonl'])
def test_a_segment_file_linked_outside_is_refused(idx, capsys, fname):
    seg = idx / 'images' / 'seg-0000'
    outside = idx.parent / f'outside-{fname}'
    shutil.move(seg / fname, outside)
    (seg / fname).symlink_to(outside)                                   # the same bytes, but outside the index
    _refused(capsys, 'search', idx, 'a red circle', expect=(f"'images/seg-0000/{fname}' leads outside",))


# 5. A damaged index is one line that names the file.
def test_a_missing_corrupt_or_foreign_faiss_file_is_one_line(world, idx, capsys, tmp_path):
    faiss_file = idx / 'images' / 'faiss-0.index'
    good = faiss_file.read_bytes()
    faiss_file.unlink()
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(faiss_file), 'missing'))
    faiss_file.write_bytes(b'\0' * len(good))
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(faiss_file), 'SHA-256'))
    def forget_checksums(m):
        m.pop('checksums', None)
        for e in m['collections'].values(): e['faiss'].pop('sha256', None); e['faiss'].pop('bytes', None)
    _edit(idx, forget_checksums)                                       # as an index without them
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(faiss_file), 'not a readable FAISS index'))
    small = tmp_path / 'small'
    assert _quiet('index', world['head'], '--images', _small_gallery(world, tmp_path / 'three'), '--out', small, '--no_progress') == 0
    shutil.copy(small / 'images' / 'faiss-0.index', faiss_file)       # another index's: 3 rows, not 10
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(faiss_file), '3 rows', 'holds 10 rows', 'another index'))


@pytest.mark.parametrize('content, expect', [
    ('[]', 'expected a JSON object (an index manifest), got a list'),
    ('{"format": "laps-index", "version": 1, "generation": 0}', 'model: expected the record'),
    ('NOMANIFEST', 'collections: expected an object of collections (images, captions), got nothing'),
    ('[' * 100_000, 'not valid JSON'),
])
def test_a_malformed_manifest_is_one_line(idx, capsys, content, expect):
    if content == 'NOMANIFEST':
        _edit(idx, lambda m: m.pop('collections'))
    else: (idx / 'index.json').write_text(content)
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(idx / 'index.json'), expect))


def test_a_segment_without_n_or_with_a_short_token_store_is_one_line(idx, capsys):
    seg = idx / 'images' / 'seg-0000'
    meta = json.loads((seg / 'meta.json').read_text())
    _edit(seg, lambda m: m.pop('n'), 'meta.json')
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(seg / 'meta.json'), 'n: expected the number of rows'))
    (seg / 'meta.json').write_text(json.dumps(meta))
    size = (seg / 'tokens.f16').stat().st_size
    os.truncate(seg / 'tokens.f16', size - 100)
    _refused(capsys, 'search', idx, 'a red circle',
             expect=(str(seg / 'tokens.f16'), f'{size - 100:,} bytes', f'{size:,} bytes', '10 rows'))


# 6. Oversized images are skipped like unreadable ones; a failed build never blocks the next command.
def test_huge_images_are_skipped_named_and_refused_as_a_query(world, tmp_path, capsys):
    gallery = _small_gallery(world, tmp_path / 'g')
    _png_header(gallery / 'huge.png', 20000, 20000)
    _png_header(gallery / 'big.png', 12000, 12000)                      # 144 Mpx: over the 40 Mpx default too
    out = tmp_path / 'idx'
    code, stdout, err = _run(capsys, 'index', world['head'], '--images', gallery, '--out', out, '--no_progress')
    assert code == 0 and f'{out}: 3 images (2 skipped)' in stdout, err
    assert 'huge.png' in err and 'big.png' in err and 'Traceback' not in err
    skipped = [json.loads(l) for l in (out / 'images' / 'seg-0000' / 'skipped.jsonl').read_text().splitlines()]
    assert sorted(Path(s['path']).name for s in skipped) == ['big.png', 'huge.png']
    assert all('over the limit' in s['error'] or 'too large to decode' in s['error'] for s in skipped)
    _refused(capsys, 'search', out, '--image', gallery / 'big.png', expect=('big.png', 'over the limit'))
    _refused(capsys, 'search', out, '--image', gallery / 'huge.png', expect=('huge.png', 'too large to decode'))


def test_an_interrupted_build_of_other_items_does_not_block_the_next_command(world, tmp_path, capsys):
    from laps.checkpoint.run import load_any_checkpoint
    from laps.retrieval.build import build_index, list_images
    model, cfg, _ = load_any_checkpoint(world['head'])
    out = tmp_path / 'idx'
    class Stop(Exception): pass
    def stop(kind, rows): raise Stop()
    with pytest.raises(Stop):
        build_index(model, cfg, out, images=list_images(world['gallery']), batch_size=2, progress=False, callback=stop)
    assert (out / 'images' / 'seg-0000.partial').is_dir()
    code, stdout, err = _run(capsys, 'index', world['head'], '--images', _small_gallery(world, tmp_path / 'three'),
                             '--out', out, '--no_progress')
    assert code == 0 and f'{out}: 3 images (0 skipped)' in stdout, err
    assert 'replacing' in err and 'seg-0000.partial' in err and 'interrupted build' in err
    assert not list(out.rglob('*.partial'))


# 7. What an index names is printed safely; --json stays exact.
def test_names_and_captions_cannot_drive_the_terminal(world, tmp_path, capsys):
    gallery = _small_gallery(world, tmp_path / 'g', n=2)
    evil = 'evil\x1b[2J\x1b]0;owned\x07\nsecond line.png'
    shutil.copy(next(gallery.glob('*.png')), gallery / evil)
    caps = tmp_path / 'caps.txt'
    caps.write_text('a red circle\n\x1b[31ma blue square\u202e\n')
    out = tmp_path / 'idx'
    assert _run(capsys, 'index', world['head'], '--images', gallery, '--captions', caps, '--out', out, '--no_progress')[0] == 0
    code, stdout, _ = _run(capsys, 'search', out, 'a red circle', '-k', 3, '--rerank', 3)
    assert code == 0 and len(stdout.splitlines()) == 3 and '\x1b' not in stdout and '\x07' not in stdout
    assert 'evil\\x1b[2J\\x1b]0;owned\\x07\\nsecond line.png' in stdout
    code, stdout, _ = _run(capsys, 'search', out, '--image', gallery / evil, '-k', 2, '--rerank', 2)
    assert code == 0 and len(stdout.splitlines()) == 2 and '\x1b' not in stdout and '\u202e' not in stdout
    assert '\\x1b[31ma blue square\\u202e' in stdout
    code, stdout, _ = _run(capsys, 'search', out, 'a red circle', '-k', 3, '--rerank', 3, '--json')
    assert code == 0 and str(gallery.resolve() / evil) in [h['path'] for h in json.loads(stdout)]


# 8. Queries, re-rank depth, links and shards.
def test_queries_rerank_links_and_shards_are_checked(world, idx, tmp_path, capsys):
    from laps.retrieval.build import list_images
    from laps.retrieval.search import Index
    _refused(capsys, 'search', idx, '', expect=('empty',))
    _refused(capsys, 'search', idx, '   ', expect=('empty',))
    _refused(capsys, 'search', idx, 'a' * 1001, expect=('1001 characters', 'at most 1000'))
    _refused(capsys, 'search', idx, 'a red circle', '--rerank', 3, '-k', 10, expect=('--rerank 3 is below -k 10',))
    assert _run(capsys, 'search', idx, 'a red circle', '--rerank', 0, '-k', 10)[0] == 0          # the shortlist order
    assert _run(capsys, 'search', idx, 'a red circle')[0] == 0                                    # the defaults: k 10, rerank max(k, 100)
    index = Index.open(idx)
    for q in ('', 'x' * 5000):
        with pytest.raises(ValueError): index.search(q)
    with pytest.raises(ValueError, match='rerank 3 is below k 10'): index.search('a red circle', k=10, rerank=3)
    _refused(capsys, 'search', idx, 'a red circle', '--shards', idx, expect=('the same index as', 'give each shard once'))
    _refused(capsys, 'search', idx, 'a red circle', '--shards', idx / '..' / idx.name, expect=('the same index as',))
    g = _small_gallery(world, tmp_path / 'linked', n=2)
    (g / 'link.png').symlink_to(next(g.glob('*.png')))
    assert len(list_images(g)) == 2


# 9. One writer at a time.
def test_a_second_writer_is_refused_or_waits(world, idx, tmp_path, capsys):
    more = _small_gallery(world, tmp_path / 'more', n=1)
    shutil.copy(more / next(more.iterdir()).name, more / 'new.png')
    args = ('index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress')
    with folder_lock(idx, 'index', argv=['laps', 'index', 'elsewhere']):
        line = _refused(capsys, *args, expect=(f'index {idx} is being written by pid {os.getpid()}', 'laps index elsewhere'))
        t = time.monotonic()
        _refused(capsys, *args, '--wait', 0.6, expect=('is being written by',))
        assert time.monotonic() - t >= 0.6
    assert not list(idx.rglob('*.partial')) and 'delete' not in line
    held = threading.Event()
    def hold():
        with folder_lock(idx, 'index'): held.set(); time.sleep(1.0)
    th = threading.Thread(target=hold); th.start(); held.wait()
    code, stdout, err = _run(capsys, *args, '--wait', 60)
    th.join()
    assert code == 0 and f'{idx}: 12 images' in stdout, err


# 10. Checksums: a corrupted file is refused; the token store's hash on demand (--verify).
def test_checksums_refuse_a_corrupted_file(idx, capsys):
    seg = idx / 'images' / 'seg-0000'
    def flip(f, at=40):
        b = bytearray(f.read_bytes()); b[at] ^= 0xff; f.write_bytes(bytes(b))
    flip(seg / 'tokens.f16')
    assert _run(capsys, 'search', idx, 'a red circle', '-k', 2)[0] == 0      # sizes only: the token store's hash is --verify's
    _refused(capsys, 'search', idx, 'a red circle', '--verify', expect=(str(seg / 'tokens.f16'), 'SHA-256'))
    flip(seg / 'tokens.f16')
    assert _run(capsys, 'search', idx, 'a red circle', '--verify')[0] == 0
    flip(seg / 'globals.f32')
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(seg / 'globals.f32'), 'SHA-256'))
    flip(seg / 'globals.f32')
    _edit(seg, lambda m: m.pop('files'), 'meta.json')
    _refused(capsys, 'search', idx, 'a red circle', expect=(str(seg / 'meta.json'), 'no checksums'))


# 11. The sweep after a commit only touches this code's own files inside its own collection folders.
def test_a_commit_removes_only_its_own_leftovers(world, idx, tmp_path, capsys):
    keep = [idx / 'images' / 'notes.txt', idx / 'images' / 'faiss-old.index.bak', idx / 'README']
    for f in keep: f.write_text('mine')
    stale = [idx / 'images' / 'faiss-99.index', idx / 'images' / 'seg-0007.partial', idx / 'captions' / 'seg-0042']
    stale[0].write_bytes(b'x'); stale[1].mkdir(); stale[2].mkdir()
    more = _small_gallery(world, tmp_path / 'more', n=1)
    shutil.copy(next(more.iterdir()), more / 'new.png')
    assert _run(capsys, 'index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress')[0] == 0
    assert all(f.read_text() == 'mine' for f in keep) and not any(f.exists() for f in stale)
    assert sorted(f.name for f in (idx / 'images').glob('faiss-*.index')) == ['faiss-1.index']


# 12. The model inside the index.
def test_the_index_carries_its_model(world, tmp_path, capsys):
    run = tmp_path / 'run'; shutil.copytree(world['head'], run)
    out = tmp_path / 'idx'
    assert _run(capsys, 'index', run, '--images', world['gallery'], '--out', out, '--no_progress')[0] == 0
    assert (out / 'model' / 'model.safetensors').is_file()
    assert json.loads((out / 'index.json').read_text())['model']['source'] == str(run.resolve())
    shutil.rmtree(run)                                                  # the run it came from is gone: the index still works
    code, stdout, err = _run(capsys, 'search', out, 'a red circle', '-k', 3, '--rerank', 5)
    assert code == 0 and len(stdout.splitlines()) == 3, err
    _refused(capsys, 'search', out, 'a red circle', '--model', world['other'], expect=('build an index with this model',))
    assert _run(capsys, 'search', out, 'a red circle', '--model', world['head'])[0] == 0
    shutil.rmtree(out / 'model')                                        # an index built before the model was saved in it
    _refused(capsys, 'search', out, 'a red circle', expect=(f'{out}: no model/ folder inside', f'pass --model {run.resolve()}'))
    assert _run(capsys, 'search', out, 'a red circle', '--model', world['head'])[0] == 0
    more = _small_gallery(world, tmp_path / 'more', n=1)
    shutil.copy(next(more.iterdir()), more / 'new.png')
    assert _run(capsys, 'index', world['head'], '--images', more, '--out', out, '--append', '--no_progress')[0] == 0
    assert _run(capsys, 'search', out, 'a red circle')[0] == 0           # the append saved the model it checked
    assert (out / 'model' / 'tokenizer_config.json').is_file()           # ... and its tokenizer (see test 19)
    _edit(out / 'model', lambda c: c.update(bert_path=str(tmp_path)), 'config.json')   # a tampered model file
    _refused(capsys, 'search', out, 'a red circle', expect=(str(out / 'model' / 'config.json'), 'checksums.json'))
    shutil.rmtree(out / 'model')
    (out / 'model').symlink_to(world['head'] / 'checkpoint_best')
    _refused(capsys, 'search', out, 'a red circle', expect=('leads outside',))


def test_outputs_never_land_on_inputs(world, idx, tmp_path, capsys):
    "`laps search --grid` into the index it reads and `laps index --out` over its own model are refused; nothing is written."
    before = sorted(p.name for p in idx.iterdir())
    _refused(capsys, 'search', idx, 'a red circle', '--grid', idx / 'grid.png', expect=('--grid', 'an input of this command'))
    assert sorted(p.name for p in idx.iterdir()) == before
    model = Path(world['head'])
    listing = sorted(str(p) for p in model.rglob('*'))
    _refused(capsys, 'index', model, '--images', world['gallery'], '--out', model.parent, '--no_progress',
             expect=('--out', 'holds or lies inside the model'))
    assert sorted(str(p) for p in model.rglob('*')) == listing and not (model.parent / 'index.json').exists()


# 13. A build writes only its own files inside the index, never through a link planted there (review of issue #21).
def test_a_planted_faiss_temp_link_is_never_written_through(world, idx, tmp_path, capsys):
    from laps.retrieval.build import commit_segments
    victim = tmp_path / 'victim.bin'; victim.write_bytes(b'precious')
    planted = idx / 'images' / '.faiss-1.index.tmp'                   # the temp name the commit wrote through
    planted.symlink_to(victim)
    more = _small_gallery(world, tmp_path / 'more', n=1)
    _refused(capsys, 'index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress',
             expect=(str(planted), 'symbolic link'))
    assert victim.read_bytes() == b'precious'
    m = json.loads((idx / 'index.json').read_text())                   # the commit itself (as laps bench --index calls it)
    commit_segments(idx, m, m['model'], {'images': ['seg-0000']}, 'flat', 100, ['test'])
    assert victim.read_bytes() == b'precious' and not planted.is_symlink()   # a fresh temp name; the link was swept
    assert _run(capsys, 'search', idx, 'a red circle', '-k', 2)[0] == 0


@pytest.mark.parametrize('name', ['commands.jsonl', 'images/seg-0001.partial', 'captions/seg-0001'])
def test_a_link_where_a_build_writes_is_refused(world, idx, tmp_path, capsys, name):
    victim = tmp_path / 'victim'; victim.mkdir(); (victim / 'keep.txt').write_text('precious')
    if name == 'commands.jsonl': (idx / name).unlink()                 # the index's own log, replaced by a link
    (idx / name).symlink_to(victim / 'keep.txt' if name == 'commands.jsonl' else victim)
    manifest = (idx / 'index.json').read_bytes()
    more = _small_gallery(world, tmp_path / 'more', n=1)
    _refused(capsys, 'index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress',
             expect=(str(idx / name), 'symbolic link'))
    assert [f.name for f in victim.iterdir()] == ['keep.txt'] and (victim / 'keep.txt').read_text() == 'precious'
    assert (idx / 'index.json').read_bytes() == manifest and not (idx / 'images' / 'seg-0001').exists()


def test_a_planted_partial_segment_is_never_written_through(world, idx, tmp_path, capsys):
    "A `.partial` segment whose plan matches the append's would be continued in place: a link among its files is refused."
    from laps.retrieval.build import list_images
    more = _small_gallery(world, tmp_path / 'more', n=1)
    m = json.loads((idx / 'index.json').read_text())
    T, C = m['model']['image_tokens']
    part = idx / 'images' / 'seg-0001.partial'; part.mkdir()
    plan = dict(items=[dict(path=p) for p in list_images(more)], model=m['model']['fingerprint'], rank=0, world_size=1)
    (part / 'plan.json').write_text(json.dumps(plan))
    (part / 'progress.json').write_text(json.dumps(dict(done=0, rows=0, skipped=[])))
    for f, size in (('tokens.f16', T * C * 2), ('globals.f32', C * 4), ('rows.i64', 8)): (part / f).write_bytes(bytes(size))
    victim = tmp_path / 'victim.txt'; victim.write_text('precious')
    (part / 'items.jsonl').symlink_to(victim)
    code, _, err = _run(capsys, 'index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress')
    assert victim.read_text() == 'precious'
    assert code == 2 and err.startswith(f"laps: error: {part / 'items.jsonl'}: a symbolic link") and len(err.splitlines()) == 1, err


# 14. A torchrun rank with nothing to encode (fewer new items than ranks) writes an empty segment that opens.
def test_a_rank_with_no_items_writes_an_empty_segment(world, tmp_path, capsys):
    from laps.checkpoint.run import load_any_checkpoint
    from laps.core.distributed import DistInfo
    from laps.retrieval.store import Segment, SegmentWriter
    from laps.retrieval.build import build_index, list_images
    for kind in ('images', 'captions'):
        SegmentWriter(tmp_path / 'x' / kind, 'seg-0000-r1', dict(items=[], model='m', rank=1, world_size=2), (5, 4),
                      with_lens=kind == 'captions').finish()
        s = Segment.open(tmp_path / 'x', kind, 'seg-0000-r1', (5, 4))
        assert s.n == 0 and s.tokens.shape == (0, 5, 4) and s.items == []
    model, cfg, _ = load_any_checkpoint(world['head'])
    one = list_images(_small_gallery(world, tmp_path / 'one', n=1))
    out = tmp_path / 'idx'
    for rank in (1, 0):                                                 # rank 1's share of one image is empty; rank 0 commits
        build_index(model, cfg, out, images=one, progress=False, info=DistInfo(rank=rank, world_size=2))
    m = json.loads((out / 'index.json').read_text())
    assert m['collections']['images']['segments'] == ['seg-0000-r0', 'seg-0000-r1'] and m['collections']['images']['n'] == 1
    code, stdout, err = _run(capsys, 'search', out, 'a red circle')
    assert code == 0 and len(stdout.splitlines()) == 1, err


# 15. A manifest that no longer names seg-0000 never makes an append reuse (and delete) the live seg-0001.
def test_an_append_never_replaces_a_segment_the_manifest_names(world, idx, tmp_path, capsys):
    os.rename(idx / 'images' / 'seg-0000', idx / 'images' / 'seg-0001')
    _edit(idx, lambda m: m['collections']['images'].update(segments=['seg-0001']))
    assert _run(capsys, 'search', idx, 'a red circle')[0] == 0         # a valid index of 10 images
    items = (idx / 'images' / 'seg-0001' / 'items.jsonl').read_text()
    more = _small_gallery(world, tmp_path / 'more', n=1)
    code, stdout, err = _run(capsys, 'index', world['head'], '--images', more, '--out', idx, '--append', '--no_progress')
    assert code == 0 and f'{idx}: 11 images' in stdout, err
    assert json.loads((idx / 'index.json').read_text())['collections']['images']['segments'] == ['seg-0001', 'seg-0002']
    assert (idx / 'images' / 'seg-0001' / 'items.jsonl').read_text() == items


# 16. More results than the default re-rank depth: the default re-ranks max(k, 100).
def test_k_above_the_default_rerank_is_answered(idx, capsys):
    from laps.retrieval.search import Index
    code, stdout, err = _run(capsys, 'search', idx, 'a red circle', '-k', 200, '--json')
    hits = json.loads(stdout) if code == 0 else err
    assert code == 0 and len(hits) == 10 and any(h['score'] != h['shortlist_score'] for h in hits), hits   # re-ranked
    _refused(capsys, 'search', idx, 'a red circle', '-k', 200, '--rerank', 150, expect=('--rerank 150 is below -k 200',))
    assert _run(capsys, 'search', idx, 'a red circle', '-k', 200, '--rerank', 0)[0] == 0
    assert [h.item for h in Index.open(idx).search('a red circle', k=200)] == [{'path': h['path']} for h in hits]


# 17. A first build never takes over a folder that is not an index (an unrelated model/ would have been replaced).
@pytest.mark.parametrize('entry', ['model/weights.bin', 'notes.txt', 'images/holiday.jpg', 'LAPS MODEL'])
def test_a_first_build_never_takes_over_a_folder_that_is_not_an_index(world, tmp_path, capsys, entry):
    project = tmp_path / 'project'
    if entry == 'LAPS MODEL': shutil.copytree(world['other'] / 'checkpoint_best', project / 'model'); entry = 'model/config.json'
    else: (project / entry).parent.mkdir(parents=True, exist_ok=True); (project / entry).write_text('mine')
    listing = {p: p.read_bytes() for p in project.rglob('*') if p.is_file()}
    name = entry.split('/')[0]
    _refused(capsys, 'index', world['head'], '--images', world['gallery'], '--out', project, '--no_progress',
             expect=(str(project), repr(name) if name == 'notes.txt' else f'{name}/', 'new or empty folder'))
    assert {p: p.read_bytes() for p in project.rglob('*') if p.is_file()} == listing     # nothing written, nothing replaced
    assert sorted(p.name for p in project.iterdir()) == [name]


def test_a_first_build_interrupted_after_saving_its_model_continues(world, tmp_path, capsys):
    out = tmp_path / 'idx'
    args = ('index', world['head'], '--images', _small_gallery(world, tmp_path / 'g'), '--out', out, '--no_progress')
    assert _run(capsys, *args)[0] == 0
    (out / 'index.json').unlink(); (out / 'commands.jsonl').unlink()     # as if killed just before the manifest
    code, stdout, err = _run(capsys, *args)
    assert code == 0 and f'{out}: 3 images' in stdout, err


# 18. Token shapes are the model's: a manifest (and segments) crafted with another token count is one line.
def test_token_shapes_other_than_the_models_are_refused(world, idx, capsys):
    from laps.core.guards import sha256_file
    T, C = json.loads((idx / 'index.json').read_text())['model']['image_tokens']
    seg = idx / 'images' / 'seg-0000'
    meta = json.loads((seg / 'meta.json').read_text())
    tokens = np.fromfile(seg / 'tokens.f16', np.float16).reshape(meta['n'], T, C)
    np.concatenate([tokens, tokens[:, :1]], 1).tofile(seg / 'tokens.f16')   # one token more per image, consistently
    meta.update(token_shape=[T + 1, C], files=dict(meta['files'], **{'tokens.f16': dict(
        sha256=sha256_file(seg / 'tokens.f16'), bytes=(seg / 'tokens.f16').stat().st_size)}))
    (seg / 'meta.json').write_text(json.dumps(meta))
    _edit(idx, lambda m: m['model'].update(image_tokens=[T + 1, C]))
    expect = (str(idx / 'index.json'), f'model.image_tokens [{T + 1}, {C}]', f'makes [{T}, {C}]')
    _refused(capsys, 'search', idx, 'a red circle', expect=expect)
    _refused(capsys, 'index', world['head'], '--images', world['gallery'], '--out', idx, '--append', '--no_progress',
             expect=expect)


# 19. The tokenizer comes from inside the index: a model whose tokenizer was a local folder, or a hub name that the
# current folder happens to hold, is searched without --model; an index saved before keeps the old rule.
def test_the_index_carries_its_tokenizer(world, tmp_path, capsys, monkeypatch):
    from index_world import _tiny_model
    from laps.checkpoint.run import save_checkpoint
    from laps.data.loaders import load_tokenizer
    from laps.core.guards import write_checksums
    from laps.model.pretrained import PRETRAINED_FILES
    local = tmp_path / 'bert-local'; load_tokenizer('minilm').save_pretrained(str(local))
    gallery = _small_gallery(world, tmp_path / 'g')
    outs = {}
    for bert in (local, 'bert-base-uncased'):                          # an offline copy; a hub name
        model, cfg = _tiny_model(0, 0.5, world['data'], bert_path=bert)
        run = tmp_path / f'run-{len(outs)}'; save_checkpoint(run / 'checkpoint_best', model, cfg, save_rng=False)
        outs[bert] = out = tmp_path / f'idx-{len(outs)}'
        assert _run(capsys, 'index', run, '--images', gallery, '--out', out, '--no_progress')[0] == 0
        assert (out / 'model' / 'tokenizer_config.json').is_file()
    shutil.rmtree(local)                                                # the tokenizer folder is gone: the index has its own
    (tmp_path / 'bert-base-uncased').mkdir(); monkeypatch.chdir(tmp_path)   # a folder named like the hub tokenizer
    expected = None
    for out in outs.values():
        code, stdout, err = _run(capsys, 'search', out, 'a red circle', '-k', 3, '--json')
        assert code == 0, err
        hits = [(Path(h['path']).name, round(h['score'], 4)) for h in json.loads(stdout)]
        assert expected in (None, hits); expected = hits                  # the same weights and vocabulary: the same hits
    model_dir = outs[local] / 'model'
    (model_dir / 'added_tokens.json').write_text('{"evil": 0}')         # a tokenizer file nobody checksummed
    _refused(capsys, 'search', outs[local], 'a red circle', expect=(str(model_dir / 'added_tokens.json'), 'checksums.json'))
    (model_dir / 'added_tokens.json').unlink()
    from laps.core.guards import sha256_file
    tc = json.loads((model_dir / 'tokenizer_config.json').read_text())
    (model_dir / 'tokenizer_config.json').write_text(json.dumps(dict(tc, vocab_file=str(world['root'] / 'vocab.txt'))))
    sums = json.loads((model_dir / 'checksums.json').read_text())     # re-recorded too: checksums do not stop a forger
    sums['files']['tokenizer_config.json'] = dict(sha256=sha256_file(model_dir / 'tokenizer_config.json'),
                                                  bytes=(model_dir / 'tokenizer_config.json').stat().st_size)
    (model_dir / 'checksums.json').write_text(json.dumps(sums))
    _refused(capsys, 'search', outs[local], 'a red circle', expect=(str(model_dir / 'tokenizer_config.json'), 'auto_map, *_file'))
    for f in model_dir.glob('tokenizer*'): f.unlink()                  # as an index saved before the tokenizer was
    write_checksums(model_dir, PRETRAINED_FILES)
    _refused(capsys, 'search', outs[local], 'a red circle', expect=('bert_path', 'outside the index', '--model'))
