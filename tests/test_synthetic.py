"""The synthetic fine-grained benchmark v3: determinism, layout, graded minimal pairs, aligned captions, leakage, version refusal, pair batches."""
import difflib, hashlib, json, re
from collections import Counter
from pathlib import Path
import numpy as np
import pytest
import torch
from laps.core.config import get_config
from laps.data.loaders import read_split, check_images, load_tokenizer, build_train_loader, build_eval_loaders, caption_words, flip_token_map
from laps.data.datasets import get_dataset
from laps.cli import main
from laps.data.synthetic import (generate_synthetic, plan_splits, scene_captions, mirror, SYNONYMS, COLOURS, SHAPES,
                            SIZES, PAIR_KINDS, SPLITS, TEMPLATES, GENERATOR_VERSION)

SMALL = dict(n_train=28, n_dev=16, n_test=16, dev_probe_pairs=2, test_probe_pairs=3)   # 28 + 16 + 16 + 32 + 48 images
N_IMAGES = 140


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('syn')
    generate_synthetic(root / 'synthetic', seed=0, **SMALL)
    return root


def scenes_of(root, split) -> dict:
    return {r['id']: r for r in json.loads((Path(root) / 'synthetic' / f'{split}_scenes.json').read_text())}


def pairs_of(root, split) -> list:
    return json.loads((Path(root) / 'synthetic' / f'{split}_minimal_pairs.json').read_text())


# --- what the tests know about scenes, from the written files only (not the generator's internals)
attrs = lambda o: (o['shape'], o['colour'], o['size'])
key = lambda r: (r['layout'],) + tuple(attrs(o) for o in r['objects'])
cell = lambda d: (d['side'], d['slot'])


def canon(r) -> tuple:
    "A scene's identity up to horizontal mirror: a row read in either direction, a column as is."
    k = key(r)
    return min(k, (k[0],) + k[1:][::-1]) if r['layout'] == 'horizontal' else k


def differs_by(a: dict, b: dict, kind: str) -> bool:
    "Does scene b differ from scene a by exactly one change of `kind`?"
    oa, ob = a['objects'], b['objects']
    if a['layout'] != b['layout'] or canon(a) == canon(b): return False
    colours_a = {o['colour'] for o in oa}
    da, db = a['distractors'], b['distractors']
    if [cell(d) for d in da] != [cell(d) for d in db]: return False             # distractors never move
    if kind == 'distractor_swap':                                               # a described object and a look-alike swap colours
        if len(oa) != len(ob): return False
        diff = [k for k in range(len(oa)) if attrs(oa[k]) != attrs(ob[k])]
        ddiff = [k for k in range(len(da)) if attrs(da[k]) != attrs(db[k])]
        if len(diff) != 1 or len(ddiff) != 1: return False
        o1, o2, d1, d2 = oa[diff[0]], ob[diff[0]], da[ddiff[0]], db[ddiff[0]]
        return ((o1['shape'], o1['size']) == (o2['shape'], o2['size']) == (d1['shape'], d1['size']) == (d2['shape'], d2['size'])
                and (o1['colour'], d1['colour']) == (d2['colour'], o2['colour']) and o1['colour'] != d1['colour'])
    if [attrs(d) for d in da] != [attrs(d) for d in db]: return False           # other kinds leave the distractors alone
    if kind == 'count_change':
        small_, big_ = (oa, ob) if len(oa) < len(ob) else (ob, oa)
        return (len(small_), len(big_)) == (2, 3) and any(
            [attrs(o) for o in big_[:k] + big_[k + 1:]] == [attrs(o) for o in small_] for k in range(3))
    if len(oa) != len(ob): return False
    diff = [k for k in range(len(oa)) if attrs(oa[k]) != attrs(ob[k])]
    if kind in ('colour_change', 'shape_change', 'size_change'):
        f = kind.split('_')[0]
        if len(diff) != 1: return False
        d = diff[0]
        same_rest = all(oa[d][g] == ob[d][g] for g in ('colour', 'shape', 'size') if g != f)
        new_value = f == 'size' or ob[d][f] not in {o[f] for o in oa} or oa[d][f] not in {o[f] for o in ob}   # a or b first
        return same_rest and new_value
    if len(diff) != 2: return False
    i, j = diff
    if kind == 'relation_swap':
        return j == i + 1 and attrs(oa[i]) == attrs(ob[j]) and attrs(oa[j]) == attrs(ob[i])
    if kind in ('colour_binding', 'size_binding'):
        f = kind.split('_')[0]
        others = [g for g in ('colour', 'shape', 'size') if g != f]
        need_differ = 'shape' if f == 'colour' else 'size'
        return (all(oa[k][g] == ob[k][g] for k in diff for g in others) and oa[i][need_differ] != oa[j][need_differ]
                and (oa[i][f], oa[j][f]) == (ob[j][f], ob[i][f]) and {o['colour'] for o in ob} == colours_a)
    raise ValueError(kind)


def words(caption: str) -> list[str]:
    "Words as the uncased BERT tokenizer splits them."
    return re.findall(r'\w+|[^\w\s]', caption.lower())


def test_same_seed_same_files_other_seed_differs(tmp_path, small):
    generate_synthetic(tmp_path / 'again', seed=0, **SMALL)
    generate_synthetic(tmp_path / 'other', seed=1, **SMALL)
    h0, h1, h2 = tree_hash(small / 'synthetic'), tree_hash(tmp_path / 'again'), tree_hash(tmp_path / 'other')
    assert h0 == h1 and len(h0) == N_IMAGES + 4 * len(SPLITS) + 2           # PNGs, 4 files per split, id_mapping, meta
    assert h0.keys() == h2.keys() and sum(h0[k] != h2[k] for k in h0) > N_IMAGES


def test_rendering_in_processes_writes_the_same_files(tmp_path, small, capsys):
    "Each image draws from its own seed: two (or three) rendering processes write the files of one, byte for byte."
    generate_synthetic(tmp_path / 'two', seed=0, workers=2, **SMALL)
    assert tree_hash(tmp_path / 'two') == tree_hash(small / 'synthetic')
    flags = [f'--{k}={v}' for k, v in SMALL.items()]
    assert main(['data', 'synthetic', '--out', str(tmp_path / 'three'), '--workers', '3', *flags]) == 0
    assert tree_hash(tmp_path / 'three') == tree_hash(small / 'synthetic')


def test_reads_back_through_the_reader_ids_unique(small):
    sizes, ids = {}, []
    for split in SPLITS:
        s = read_split(small, 'synthetic', split)
        paths = check_images(s, small / 'synthetic' / 'images')
        sizes[split] = (s.n_images, s.n_captions)
        ids += s.image_ids
        assert all(p.suffix == '.png' for p in paths)
        assert all(len(set(s.captions[5 * k:5 * k + 5])) == 5 for k in range(s.n_images))   # 5 different captions
    assert sizes == dict(train=(28, 140), dev=(16, 80), test=(16, 80), dev_probes=(32, 160), test_probes=(48, 240))
    assert sorted(ids) == list(range(N_IMAGES))                             # unique over the whole folder
    assert set(json.loads((small / 'synthetic' / 'id_mapping.json').read_text())) == {str(i) for i in ids}
    assert read_split(small, 'synthetic', 'test').image_ids == list(range(44, 60))
    meta = json.loads((small / 'synthetic' / 'meta.json').read_text())
    assert (meta['generator'], meta['version'], list(meta['pair_kinds'])) == ('laps.synthetic', 3, list(PAIR_KINDS))


def test_kind_table():
    assert list(PAIR_KINDS) == ['colour_change', 'shape_change', 'size_change', 'count_change',
                                'colour_binding', 'size_binding', 'relation_swap', 'distractor_swap']
    assert [k for k, v in PAIR_KINDS.items() if not v.bow_solvable] == ['colour_binding', 'size_binding', 'relation_swap']
    assert all(v.name == k and v.doc and callable(v.perturb) for k, v in PAIR_KINDS.items())
    assert get_dataset('synthetic').probe_splits == {'dev': 'dev_probes', 'test': 'test_probes'}
    assert get_dataset('synthetic').folder_format == {'generator': 'laps.synthetic', 'version': GENERATOR_VERSION}


@pytest.mark.parametrize('split', SPLITS)
def test_every_image_has_a_valid_partner(small, split):
    scenes, pairs = scenes_of(small, split), pairs_of(small, split)
    assert sorted(i for p in pairs for i in (p['image_a'], p['image_b'])) == sorted(scenes)   # each image in one pair
    for p in pairs:
        a, b = scenes[p['image_a']], scenes[p['image_b']]
        assert differs_by(a, b, p['kind']), p
        assert [k for k in PAIR_KINDS if differs_by(a, b, k)] == [p['kind']]                 # exactly that kind
        assert not differs_by(a, dict(a, objects=a['objects'][::-1]) if a['layout'] == 'horizontal' else a, p['kind'])
        assert a['templates'] == b['templates'] and len(set(a['templates'])) == 5
    assert Counter(p['kind'] for p in pairs)[list(PAIR_KINDS)[0]] >= 1


def test_probe_sizes(small):
    assert Counter(p['kind'] for p in pairs_of(small, 'dev_probes')) == Counter({k: 2 for k in PAIR_KINDS})
    assert Counter(p['kind'] for p in pairs_of(small, 'test_probes')) == Counter({k: 3 for k in PAIR_KINDS})
    assert [p['kind'] for p in pairs_of(small, 'test')] == list(PAIR_KINDS)   # retrieval splits: kinds in turn


CHANGE_WORDS = dict(colour_change=set(COLOURS), size_change={w for s in SIZES for w in SYNONYMS[s]},
                    shape_change={x for s in SHAPES for w in SYNONYMS[s] for x in w.split()})


CONNECTORS = {',', 'which', 'is', 'to', 'the', 'of', 'left', 'right', 'above', 'below', 'then'}


def phrase_of(o: dict) -> str:
    size, shape = SYNONYMS[o['size']], SYNONYMS[o['shape']]
    return f"a {size[o['syn'][0] % len(size)]} {o['colour']} {shape[o['syn'][1] % len(shape)]}"


@pytest.mark.parametrize('split', SPLITS)
def test_aligned_captions_differ_only_in_the_change(small, split):
    s, scenes = read_split(small, 'synthetic', split), scenes_of(small, split)
    at = {i: k for k, i in enumerate(s.image_ids)}
    n_checked = 0
    for p in pairs_of(small, split):
        kind = p['kind']
        for k in range(5):
            ca, cb = (words(s.captions[5 * at[p[x]] + k]) for x in ('image_a', 'image_b'))
            assert (Counter(ca) == Counter(cb)) == (not PAIR_KINDS[kind].bow_solvable), (kind, ca, cb)
            ops = [op for op in difflib.SequenceMatcher(a=ca, b=cb, autojunk=False).get_opcodes() if op[0] != 'equal']
            changed = {w for _, i1, i2, j1, j2 in ops for w in ca[i1:i2] + cb[j1:j2]}
            if kind in CHANGE_WORDS:                                             # one attribute word (or 'plus sign')
                assert changed and changed <= CHANGE_WORDS[kind], (kind, ca, cb)
            elif kind == 'count_change':                                         # one object phrase and its connectors
                (short, _), (long, big) = sorted(((ca, p['image_a']), (cb, p['image_b'])), key=lambda t: len(t[0]))
                others = {o['colour'] for o in scenes[p['image_a'] if big == p['image_b'] else p['image_b']]['objects']}
                gone = [o for o in scenes[big]['objects'] if o['colour'] not in others]
                assert len(gone) == 1
                extra = Counter(long) - Counter(short)
                assert not Counter(short) - Counter(long), (ca, cb)              # nothing else changed
                phrase = Counter(words(phrase_of(gone[0])))
                assert not phrase - extra and set(extra - phrase) <= CONNECTORS, (ca, cb, extra)
            n_checked += 1
    assert n_checked == s.n_captions // 2


def test_captions_determine_the_scene(small):
    """Every caption names every object's size, colour and shape and the layout's direction words."""
    s = read_split(small, 'synthetic', 'test')
    scenes = scenes_of(small, 'test')
    for j, cap in enumerate(s.captions):
        sc = scenes[s.caption_img_ids[j]]
        low = cap.lower()
        for o in sc['objects']:
            assert any(f"{sz} {o['colour']} {sh}" in low for sz in SYNONYMS[o['size']] for sh in SYNONYMS[o['shape']]), (cap, o)
        horizontal = bool({'left', 'right'} & set(words(low)))
        vertical = bool({'top', 'bottom', 'above', 'below'} & set(words(low)))
        assert horizontal != vertical and horizontal == (sc['layout'] == 'horizontal')


def test_horizontal_flip_keeps_every_template_true():
    """Swapping left/right tokens (the training flip) in any horizontal caption gives a caption of the mirrored row."""
    tok = load_tokenizer('minilm')
    fm = flip_token_map(tok, get_dataset('synthetic').augmentation.flip_words)
    objs = [dict(shape='cross', colour='green', size='small', syn=[1, 1]), dict(shape='circle', colour='white', size='big', syn=[0, 1]),
            dict(shape='diamond', colour='red', size='big', syn=[1, 0])]
    ids = lambda caps: [[t for w in ws for t in w] for ws in caption_words(tok, caps)]
    for n in (2, 3):
        row = dict(layout='horizontal', objects=objs[:n])
        every = range(len(TEMPLATES['horizontal']))
        flipped = [[fm.get(t, t) for t in c] for c in ids(scene_captions(row, every))]
        mirrored = ids(scene_captions(mirror(row), every))
        assert all(f in mirrored for f in flipped)
        assert sorted(map(tuple, flipped)) == sorted(map(tuple, mirrored))   # the twins map onto each other one to one


def test_no_leakage_in_the_written_files(small):
    keys = {sp: [canon(r) for r in scenes_of(small, sp).values()] for sp in SPLITS}
    held = [k for sp in SPLITS if sp != 'train' for k in keys[sp]]
    assert len(set(held)) == len(held)                                      # dev, test, probes: disjoint, each unique
    assert not set(held) & set(keys['train'])                               # no held-out scene (nor its mirror) in train
    for sp in SPLITS[1:]:                                                   # partners are held out too
        sc = scenes_of(small, sp)
        assert not {canon(sc[p[x]]) for p in pairs_of(small, sp) for x in ('image_a', 'image_b')} & set(keys['train'])
    mirrored = [dict(r, objects=r['objects'][::-1]) for r in scenes_of(small, 'test').values() if r['layout'] == 'horizontal']
    assert mirrored and all(canon(m) in set(held) for m in mirrored)       # the checker sees mirrors


def test_minimal_pair_properties_at_full_size():
    plan = plan_splits(seed=0)                                              # the default sizes, no rendering
    train_keys = {canon(s) for s in plan['train'][0]}
    sizes = dict(train=3500, dev=500, test=1000, dev_probes=3200, test_probes=8000)
    held = []
    for split, n in sizes.items():
        scenes, pairs = plan[split]
        assert len(scenes) == n and len(pairs) == n // 2
        assert sorted(i for a, b, _ in pairs for i in (a, b)) == list(range(n))
        assert all(differs_by(scenes[a], scenes[b], k) for a, b, k in pairs)
        if split != 'train': held += [canon(s) for s in scenes]
        share2 = sum(len(s['objects']) == 2 for s in scenes) / n
        assert 0.22 < share2 < 0.34, (split, share2)                         # the same mix of 2 and 3 objects everywhere
    assert Counter(k for _, _, k in plan['test_probes'][1]) == Counter({k: 500 for k in PAIR_KINDS})
    assert Counter(k for _, _, k in plan['test'][1]) == Counter({k: 63 if i < 4 else 62 for i, k in enumerate(PAIR_KINDS)})
    assert len(set(held)) == len(held) and not set(held) & train_keys and len(train_keys) == 3500


def test_rendered_objects_where_the_metadata_says(small):
    from PIL import Image
    for r in scenes_of(small, 'test_probes').values():
        a = np.asarray(Image.open(small / 'synthetic' / 'images' / r['file'])).astype(int)
        assert a.shape == (64, 64, 3)
        for o in r['objects']:
            if o['shape'] in ('cross', 'triangle'): continue                  # centre pixel may be thin/edge
            px = a[int(round(o['y'])), int(round(o['x']))]
            assert np.abs(px - np.array(COLOURS[o['colour']])).max() < 40, (r['id'], o, px)
        along = [o['x'] if r['layout'] == 'horizontal' else o['y'] for o in r['objects']]
        assert along == sorted(along)                                      # reading order = left->right / top->bottom
        across = lambda o: o['y'] if r['layout'] == 'horizontal' else o['x']
        assert all(64 / 3 - 1 < across(o) - o['w'] / 2 and across(o) + o['w'] / 2 < 128 / 3 + 1 for o in r['objects'])
        assert 1 <= len(r['distractors']) <= 3
        for d in r['distractors']:                                         # distractors: in their outer band, where they say
            assert (across(d) + d['w'] / 2 < 64 / 3) if d['side'] == 0 else (across(d) - d['w'] / 2 > 128 / 3)
            if d['shape'] in ('cross', 'triangle'): continue
            px = a[int(round(d['y'])), int(round(d['x']))]
            assert np.abs(px - np.array(COLOURS[d['colour']])).max() < 40, (r['id'], d, px)
    first = np.asarray(Image.open(small / 'synthetic' / 'images' / '000000.png')).astype(float)
    assert first.std(axis=(0, 1)).min() > 5                                 # a textured background, not one flat colour


def test_cli_atomic_skip_and_refusals(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    args = ['--out', str(out), '--n_train', '6', '--n_dev', '2', '--n_test', '4', '--dev_probe_pairs', '1', '--test_probe_pairs', '1']
    assert main(['data', 'synthetic', *args]) == 0
    assert 'train 6 images / 30 captions / 3 minimal pairs' in capsys.readouterr().out
    before = tree_hash(out)
    assert main(['data', 'synthetic', *args]) == 0
    assert 'nothing to do' in capsys.readouterr().out and tree_hash(out) == before
    assert main(['data', 'synthetic', *args + ['--seed', '3']]) == 0
    assert tree_hash(out) != before and json.loads((out / 'meta.json').read_text())['seed'] == 3
    assert main(['data', 'synthetic', '--out', str(out), '--n_test', '5']) == 2
    assert 'n_test must be an even number' in capsys.readouterr().err
    assert main(['data', 'synthetic', '--out', str(out), '--n_train', '5']) == 2
    assert main(['data', 'synthetic', '--out', str(out), '--test_probe_pairs', '0']) == 2
    assert 'test_probe_pairs must be a positive number' in capsys.readouterr().err
    assert main(['data', 'synthetic', '--out', str(out), '--workers', '-1']) == 2
    assert capsys.readouterr().err.strip() == ("laps data synthetic: error: --workers must be 0 (one process per CPU core) "
                                               "or a positive number, got -1")
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    assert main(['data', 'synthetic', *['--out', str(tmp_path / 'mine')] + args[2:]]) == 2
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mine', 'synthetic']   # no temporary folders left


def test_version_2_folder_is_refused_with_advice(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    args = ['--out', str(out), '--n_train', '4', '--n_dev', '2', '--n_test', '2', '--dev_probe_pairs', '1', '--test_probe_pairs', '1']
    assert main(['data', 'synthetic', *args]) == 0; capsys.readouterr()
    meta = json.loads((out / 'meta.json').read_text())
    (out / 'meta.json').write_text(json.dumps(dict(meta, version=2)))
    advice = (f"{out} was made by laps.synthetic version 2; this laps reads version 3: "
              f"regenerate it with `laps data synthetic --out {out} --force`")
    with pytest.raises(ValueError) as e: read_split(tmp_path, 'synthetic', 'train')
    assert str(e.value) == advice
    before = tree_hash(out)
    assert main(['data', 'synthetic', *args]) == 2
    assert capsys.readouterr().err.strip() == f"laps data synthetic: error: {advice}"
    assert tree_hash(out) == before                                         # refused: nothing touched
    assert main(['data', 'synthetic', *args + ['--force']]) == 0
    assert json.loads((out / 'meta.json').read_text())['version'] == 3 and read_split(tmp_path, 'synthetic', 'train').n_images == 4


def test_train_with_a_version_2_folder_fails_in_one_line(tmp_path):
    import subprocess, sys
    out = tmp_path / 'synthetic'
    generate_synthetic(out, n_train=4, n_dev=2, n_test=2, dev_probe_pairs=1, test_probe_pairs=1)
    (out / 'meta.json').write_text(json.dumps(dict(json.loads((out / 'meta.json').read_text()), version=2)))
    r = subprocess.run([sys.executable, '-m', 'laps', 'train', '--preset', 'cpu', '--data_path', str(tmp_path),
                        '--logger_name', str(tmp_path / 'run'), '--num_epochs', '1'], capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stderr.strip().split('\n') if l]
    assert r.returncode == 2 and lines[-1] == (f"laps: error: {out} was made by laps.synthetic version 2; this laps reads "
                                               f"version 3: regenerate it with `laps data synthetic --out {out} --force`"), r.stderr


def test_loaders_on_synthetic_with_cpu_preset(small):
    tok = load_tokenizer('minilm')
    cfg = get_config('cpu', data_path=str(small), batch_size=8)
    b = next(iter(build_train_loader(cfg, tok)))
    assert b['images'].shape == (8, 3, 64, 64) and b['input_ids'].shape[0] == 8
    split, il, cl = build_eval_loaders(cfg, 'test', tok)
    assert [x['images'].shape[0] for x in il] == [8, 8] and sum(x['input_ids'].shape[0] for x in cl) == 80
    split, il, cl = build_eval_loaders(cfg, 'test_probes', tok)
    assert split.n_images == 48


def test_pair_batches_put_partners_together(small):
    tok = load_tokenizer('minilm')
    cfg = get_config('cpu', data_path=str(small), batch_size=8, pair_batches=1, workers=0)
    partner = {}
    for p in pairs_of(small, 'train'): partner[p['image_a']], partner[p['image_b']] = p['image_b'], p['image_a']
    loader = build_train_loader(cfg, tok)
    assert len(loader) == 140 // 8                                          # 70 units of 2 captions, 4 per batch
    sampler = loader.batch_sampler
    epoch0 = [b for b in sampler]
    assert len(epoch0) == len(loader) and all(len(b) == 8 for b in epoch0)
    first = read_split(small, 'synthetic', 'train')
    for b in epoch0:                                                        # caption k of a paired image: caption k of its partner
        for j in b:
            img, k = first.caption_img_ids[j], j % 5
            assert first.image_ids.index(partner[img]) * 5 + k in b
    assert [b for b in build_train_loader(cfg, tok).batch_sampler] == epoch0   # deterministic
    sampler.set_epoch(1); assert list(sampler) != epoch0
    batch = next(iter(loader))
    ids = batch['img_ids'].tolist()
    assert all(partner[i] in ids for i in ids)
    shares = [list(build_train_loader(cfg, tok, rank=r, world_size=2).batch_sampler) for r in (0, 1)]
    assert [len(s) for s in shares] == [8, 8] and not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}
    with pytest.raises(ValueError, match='needs an even --batch_size'):
        build_train_loader(cfg.replace(batch_size=7), tok)


def test_pair_batches_without_the_pairs_file(small, tmp_path):
    import shutil
    shutil.copytree(small / 'synthetic', tmp_path / 'synthetic')
    (tmp_path / 'synthetic' / 'train_minimal_pairs.json').unlink()
    cfg = get_config('cpu', data_path=str(tmp_path), batch_size=8, pair_batches=1)
    with pytest.raises(FileNotFoundError, match=r'train_minimal_pairs.json not found: --pair_batches 1 needs the minimal pairs'):
        build_train_loader(cfg, load_tokenizer('minilm'))
    assert len(build_train_loader(cfg.replace(pair_batches=0), load_tokenizer('minilm'))) == 17   # the plain shuffle needs no pairs


def test_runner_uses_the_pair_sampler(small, tmp_path):
    from laps.training.runner import prepare_training
    cfg = get_config('cpu', data_path=str(small), batch_size=8, pair_batches=1, workers=0, eval=0,
                     logger_name=str(tmp_path / 'run'))
    tr = prepare_training(cfg)
    assert tr.sampler is tr.loader.batch_sampler and tr.steps_per_epoch == 17
    tr.begin_epoch(3)
    assert tr.sampler.epoch == 3


@pytest.mark.slow
def test_default_generation(tmp_path):
    s = generate_synthetic(tmp_path / 'synthetic')
    assert [s[k]['images'] for k in SPLITS] == [3500, 500, 1000, 3200, 8000]
    assert s['test_probes']['minimal_pairs'] == 4000 and s['train']['minimal_pairs'] == 1750
    t = read_split(tmp_path, 'synthetic', 'test')
    check_images(t, tmp_path / 'synthetic' / 'images')
    assert len(set(t.captions)) > 4900


def test_the_folder_format_keeps_its_name(synthetic_data):
    "`meta.json` names the format `laps.synthetic` (the generator's module when the format was made), so folders written "
    "before the move into laps/data are read, and a folder written now reads with the code of then."
    from laps.data.datasets import folder_format_problem
    meta = json.loads((synthetic_data / 'synthetic' / 'meta.json').read_text())
    assert (meta['generator'], meta['version']) == ('laps.synthetic', 3)
    assert folder_format_problem(get_dataset('synthetic'), synthetic_data / 'synthetic') is None
