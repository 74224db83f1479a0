"""The synthetic fine-grained benchmark: determinism, layout, the minimal-pair property, captions, metric, CLI."""
import hashlib, json
from collections import Counter
from pathlib import Path
import numpy as np
import pytest
import torch
from laps.config import get_config
from laps.data import read_split, check_images, load_tokenizer, build_train_loader, build_eval_loaders
from laps.minimal_pairs import minimal_pair_accuracy, load_minimal_pairs
from laps.synthetic import generate_synthetic, plan_splits, scene_key, synthetic_cli, SYNONYMS, SHAPES, COLOURS, PAIR_KINDS

SMALL = dict(n_train=40, n_dev=10, n_test=10)


def tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp('syn')
    generate_synthetic(root / 'synthetic', seed=0, **SMALL)
    return root


def differs_by(a: dict, b: dict, kind: str) -> bool:
    "Does scene b differ from scene a exactly by one minimal change of `kind`?"
    oa, ob = a['objects'], b['objects']
    if a['layout'] != b['layout'] or len(oa) != len(ob): return False
    attrs = lambda o: (o['shape'], o['colour'], o['size'])
    diff = [k for k in range(len(oa)) if attrs(oa[k]) != attrs(ob[k])]
    if kind == 'colour_swap':
        if len(diff) != 2: return False
        i, j = diff
        return all(oa[k]['shape'] == ob[k]['shape'] and oa[k]['size'] == ob[k]['size'] for k in diff) and \
            (oa[i]['colour'], oa[j]['colour']) == (ob[j]['colour'], ob[i]['colour'])
    if kind == 'relation_swap':
        return len(diff) == 2 and diff[1] == diff[0] + 1 and attrs(oa[diff[0]]) == attrs(ob[diff[1]]) and \
            attrs(oa[diff[1]]) == attrs(ob[diff[0]])
    if kind == 'shape_change':
        return len(diff) == 1 and oa[diff[0]]['shape'] != ob[diff[0]]['shape'] and \
            (oa[diff[0]]['colour'], oa[diff[0]]['size']) == (ob[diff[0]]['colour'], ob[diff[0]]['size'])
    raise ValueError(kind)


def test_same_seed_same_files_other_seed_differs(tmp_path, small):
    generate_synthetic(tmp_path / 'again', seed=0, **SMALL)
    generate_synthetic(tmp_path / 'other', seed=1, **SMALL)
    h0, h1, h2 = tree_hash(small / 'synthetic'), tree_hash(tmp_path / 'again'), tree_hash(tmp_path / 'other')
    assert h0 == h1 and len(h0) == 60 + 13                                # 60 PNGs + 13 text/json files
    assert h0.keys() == h2.keys() and sum(h0[k] != h2[k] for k in h0) > 60


def test_reads_back_through_the_reader(small):
    sizes = {}
    for split in ('train', 'dev', 'test'):
        s = read_split(small, 'synthetic', split)
        paths = check_images(s, small / 'synthetic' / 'images')
        sizes[split] = (s.n_images, s.n_captions)
        assert all(p.suffix == '.png' for p in paths)
        assert all(len(set(s.captions[5 * k:5 * k + 5])) == 5 for k in range(s.n_images))   # 5 different captions
    assert sizes == dict(train=(40, 200), dev=(10, 50), test=(10, 50))
    assert read_split(small, 'synthetic', 'test').image_ids == list(range(50, 60))


@pytest.mark.parametrize('split', ['dev', 'test'])
def test_every_image_has_a_minimal_partner(small, split):
    scenes = {r['id']: r for r in json.loads((small / 'synthetic' / f'{split}_scenes.json').read_text())}
    pairs = load_minimal_pairs(small, 'synthetic', split)
    assert {p['image_a'] for p in pairs} | {p['image_b'] for p in pairs} == set(scenes)
    for p in pairs:
        a, b = scenes[p['image_a']], scenes[p['image_b']]
        assert differs_by(a, b, p['kind']), p
        assert not any(differs_by(a, a, k) for k in PAIR_KINDS)             # the checker is not vacuous
        if p['kind'] == 'shape_change': assert not differs_by(a, b, 'colour_swap') and not differs_by(a, b, 'relation_swap')


def test_minimal_pair_property_at_full_size():
    plan = plan_splits(seed=0)                                              # the default sizes, no rendering
    train_keys = {scene_key(s) for s in plan['train'][0]}
    kinds = {'dev': Counter({'colour_swap': 84, 'relation_swap': 83, 'shape_change': 83}),
             'test': Counter({'colour_swap': 167, 'relation_swap': 167, 'shape_change': 166})}
    for split, n in (('dev', 500), ('test', 1000)):                        # test: Flickr30K's size
        scenes, pairs = plan[split]
        assert len(scenes) == n and len(pairs) == n // 2
        assert sorted(i for a, b, _ in pairs for i in (a, b)) == list(range(n))
        assert all(differs_by(scenes[a], scenes[b], k) for a, b, k in pairs)
        assert Counter(k for _, _, k in pairs) == kinds[split]
        keys = [scene_key(s) for s in scenes]
        assert len(set(keys)) == n and not set(keys) & train_keys          # distinct, and unseen in training
    n_obj = Counter(len(s['objects']) for s in plan['train'][0])
    assert len(plan['train'][0]) == 3500 and 0.4 < n_obj[2] / 3500 < 0.6


def test_captions_determine_the_scene(small):
    """Every caption names every object's size, colour and shape; colour and relation swaps share their bag of words."""
    s = read_split(small, 'synthetic', 'test')
    scenes = {r['id']: r for r in json.loads((small / 'synthetic' / 'test_scenes.json').read_text())}
    for j, cap in enumerate(s.captions):
        sc = scenes[s.caption_img_ids[j]]
        low = cap.lower()
        for o in sc['objects']:
            assert any(f"{sz} {o['colour']} {sh}" in low for sz in SYNONYMS[o['size']] for sh in SYNONYMS[o['shape']]), (cap, o)
        horizontal = ('left' in low) or ('right' in low)
        vertical = any(w in low for w in ('top', 'bottom', 'above', 'below', 'under'))
        assert horizontal != vertical and horizontal == (sc['layout'] == 'horizontal')
    attr_words = lambda r: Counter(w for o in r['objects'] for w in (o['colour'], o['shape'], o['size']))
    for p in load_minimal_pairs(small, 'synthetic', 'test'):
        same = attr_words(scenes[p['image_a']]) == attr_words(scenes[p['image_b']])
        assert same == (p['kind'] != 'shape_change')


def test_rendered_objects_where_the_metadata_says(small):
    from PIL import Image
    recs = json.loads((small / 'synthetic' / 'test_scenes.json').read_text())
    for r in recs:
        a = np.asarray(Image.open(small / 'synthetic' / 'images' / r['file'])).astype(int)
        assert a.shape == (64, 64, 3)
        for o in r['objects']:
            if o['shape'] == 'cross' or o['shape'] == 'triangle': continue   # centre pixel may be thin/edge
            px = a[int(round(o['y'])), int(round(o['x']))]
            assert np.abs(px - np.array(COLOURS[o['colour']])).max() < 40, (r['id'], o, px)
        key = [o['x'] if r['layout'] == 'horizontal' else o['y'] for o in r['objects']]
        assert key == sorted(key)                                          # reading order = left->right / top->bottom


def test_minimal_pair_accuracy_hand_made(small):
    s = read_split(small, 'synthetic', 'test')
    pairs = load_minimal_pairs(small, 'synthetic', 'test')
    own = torch.tensor([[1.0 if j // 5 == i else 0.0 for j in range(50)] for i in range(10)])
    assert minimal_pair_accuracy(own, s, pairs)['t2i'] == 100.0 and minimal_pair_accuracy(own, s, pairs)['i2t'] == 100.0
    r = minimal_pair_accuracy(-own, s, pairs)
    assert (r['t2i'], r['i2t'], r['n_pairs']) == (0.0, 0.0, 5)
    r = minimal_pair_accuracy(np.ones((10, 50)), s, pairs)
    assert (r['t2i'], r['i2t']) == (50.0, 50.0) and set(r) >= {f't2i_{k}' for k in PAIR_KINDS}
    # pair 0 wrong for exactly 2 of the 10 captions, image a still right on average: t2i 80 on it, i2t 100
    sims = own.clone().numpy()
    a, b = s.image_ids.index(pairs[0]['image_a']), s.image_ids.index(pairs[0]['image_b'])
    sims[b, 5 * a], sims[b, 5 * a + 1] = 2.0, 2.0
    r = minimal_pair_accuracy(sims, s, pairs)
    assert r['t2i'] == pytest.approx(100 - 20 / 5) and r['i2t'] == 100.0
    with pytest.raises(ValueError, match=r'expected \(n_images, n_captions\) = \(10, 50\)'):
        minimal_pair_accuracy(own[:, :45], s, pairs)
    with pytest.raises(ValueError, match='image id 999 is not in synthetic/test'):
        minimal_pair_accuracy(own, s, [dict(image_a=999, image_b=pairs[0]['image_b'], kind='colour_swap')])


def test_cli_atomic_skip_and_refusals(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    assert synthetic_cli(['--out', str(out), '--n_train', '6', '--n_dev', '2', '--n_test', '4']) == 0
    assert 'train 6 images / 30 captions' in capsys.readouterr().out
    before = tree_hash(out)
    assert synthetic_cli(['--out', str(out), '--n_train', '6', '--n_dev', '2', '--n_test', '4']) == 0
    assert 'nothing to do' in capsys.readouterr().out and tree_hash(out) == before
    assert synthetic_cli(['--out', str(out), '--n_train', '6', '--n_dev', '2', '--n_test', '4', '--seed', '3']) == 0
    assert tree_hash(out) != before and json.loads((out / 'meta.json').read_text())['seed'] == 3
    assert synthetic_cli(['--out', str(out), '--n_test', '5']) == 2
    assert 'even number of images' in capsys.readouterr().err
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'notes.txt').write_text('keep')
    assert synthetic_cli(['--out', str(tmp_path / 'mine'), '--n_train', '2', '--n_dev', '2', '--n_test', '2']) == 2
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['mine', 'synthetic']   # no temporary folders left


def test_loaders_on_synthetic_with_cpu_preset(small):
    tok = load_tokenizer('minilm')
    cfg = get_config('cpu', data_path=str(small), batch_size=8)
    b = next(iter(build_train_loader(cfg, tok)))
    assert b['images'].shape == (8, 3, 64, 64) and b['input_ids'].shape[0] == 8
    split, il, cl = build_eval_loaders(cfg, 'test', tok)
    assert [x['images'].shape[0] for x in il] == [8, 2] and sum(x['input_ids'].shape[0] for x in cl) == 50


@pytest.mark.slow
def test_default_generation(tmp_path):
    s = generate_synthetic(tmp_path / 'synthetic')
    assert (s['train'], s['dev'], s['test']) == (dict(images=3500, captions=17500, minimal_pairs=0),
                                                 dict(images=500, captions=2500, minimal_pairs=250),
                                                 dict(images=1000, captions=5000, minimal_pairs=500))
    t = read_split(tmp_path, 'synthetic', 'test')
    check_images(t, tmp_path / 'synthetic' / 'images')
    assert len(set(t.captions)) > 4900
