"""The data layer: the caption-file reader on the real Flickr30K files, bad input, transforms, tokenization,
size augmentation, datasets, collate and loaders; the dataset registry (image folders, loss overrides, and a
user's own dataset registered with one call, trained and evaluated)."""
import json, logging
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from laps.core.config import LapsConfig, get_config
from laps.data.datasets import DatasetSpec, TrainAugmentation, register_dataset, get_dataset, image_folder
from laps.core.registry import DATASETS
from laps.data.loaders import (read_split, check_images, load_image, random_resized_crop_box, train_transform,
                       eval_transform, apply_train_params, to_normalized_tensor, load_tokenizer, caption_words,
                       encode_caption, word_actions, augment_words, KEEP, MASK, RANDOM, DELETE, TrainDataset,
                       ImageDataset, CaptionDataset, collate, build_loader, build_train_loader, build_eval_loaders,
                       flip_token_map, item_generator)

SHARED = Path(__file__).resolve().parent / 'fixtures'  # the real Flickr30K dev/test caption files, in the released layout
needs_f30k = pytest.mark.skipif(not (SHARED / 'f30k' / 'test_caps.txt').is_file(), reason='real Flickr30K caption files not found')


@pytest.fixture(scope='module')
def tok():
    return load_tokenizer('bert-base-uncased')


def write_split(root, caps, ids, mapping, split='test', dataset='toy'):
    d = Path(root) / dataset
    d.mkdir(parents=True, exist_ok=True)
    (d / f'{split}_caps.txt').write_text(''.join(c + '\n' for c in caps))
    (d / f'{split}_ids.txt').write_text(''.join(f'{i}\n' for i in ids))
    (d / 'id_mapping.json').write_text(json.dumps({str(k): v for k, v in mapping.items()}))
    return d


def toy_images(tmp_path, n_img=3, size=(24, 20)):
    "n_img images (id 100+k, colour k) with 5 captions each naming the colour; noise so that crops differ."
    colours = ['red', 'green', 'blue']
    caps = [f'a {colours[k]} picture' + ' with text' * j for k in range(n_img) for j in range(5)]
    d = write_split(tmp_path, caps, [100 + k for k in range(n_img) for _ in range(5)],
                    {100 + k: f'im{k}.png' for k in range(n_img)})
    (d / 'images').mkdir()
    rng = np.random.default_rng(0)
    for k in range(n_img):
        a = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
        a[..., k] = 255
        Image.fromarray(a).save(d / 'images' / f'im{k}.png')
    return read_split(tmp_path, 'toy', 'test', 5), d / 'images'


# ---------------------------------------------------------------- reader on the real files
@needs_f30k
def test_real_f30k_test_split():
    s = read_split(SHARED, 'f30k', 'test')
    assert (s.n_images, s.n_captions) == (1000, 5000)
    assert len(set(s.image_ids)) == 1000
    assert all(s.caption_img_ids[j] == s.image_ids[j // 5] for j in range(5000))
    assert s.caption_img_ids[:5] == [25] * 5 and s.captions[0].startswith('The man with pierced ears')
    assert all(name.endswith('.jpg') for name in s.id_mapping.values())
    assert s.caps_path.name == 'test_caps.txt'


@needs_f30k
def test_real_f30k_dev_split():
    s = read_split(SHARED, 'f30k', 'dev')
    assert (s.n_images, s.n_captions) == (1014, 5070)


@needs_f30k
def test_missing_images_reported_once(tmp_path):
    s = read_split(SHARED, 'f30k', 'test')
    first = s.id_mapping[s.image_ids[0]]
    with pytest.raises(FileNotFoundError, match=rf'1000 of 1000 images of f30k/test are missing under .* \(first: {first}, '):
        check_images(s, tmp_path)
    with pytest.raises(FileNotFoundError, match='image folder .*nope not found'):
        check_images(s, tmp_path / 'nope')


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('case,match', [
    ('count', r'test_caps.txt has 10 caption lines but .*test_ids.txt has 9 id lines'),
    ('notint', r'test_ids.txt line 3: \'x\' is not an integer image id'),
    ('unmapped', r'test_ids.txt line 6: image id 8 is not in .*id_mapping.json'),
    ('four', r'test_ids.txt: image id 7 has 4 caption line\(s\) at lines 1-4 \(expected exactly 5'),
    ('split', r'test_ids.txt line 11: image id 7 appears again after other ids'),
    ('json', r'id_mapping.json is not valid JSON'),
    ('empty', r'test_caps.txt is empty'),
])
def test_bad_caption_files(tmp_path, case, match):
    caps, ids, mapping = [f'c{j}' for j in range(10)], [7] * 5 + [8] * 5, {7: 'a.jpg', 8: 'b.jpg'}
    if case == 'count': ids = ids[:9]
    if case == 'notint': ids = ids[:2] + ['x'] + ids[3:]
    if case == 'unmapped': mapping = {7: 'a.jpg'}
    if case == 'four': ids = [7] * 4 + [8] * 6
    if case == 'split': caps, ids = [f'c{j}' for j in range(15)], [7] * 5 + [8] * 5 + [7] * 5
    if case == 'empty': caps, ids = [], []
    d = write_split(tmp_path, caps, ids, mapping)
    if case == 'json': (d / 'id_mapping.json').write_text('{"7": "a.jpg",')
    with pytest.raises(ValueError, match=match):
        read_split(tmp_path, 'toy', 'test', 5)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'dataset folder .*f30k not found \(expected test_caps.txt'):
        read_split(tmp_path, 'f30k', 'test')
    d = write_split(tmp_path, [f'c{j}' for j in range(5)], [1] * 5, {1: 'a.jpg'})
    for name in ('test_ids.txt', 'id_mapping.json'):
        (d / name).rename(d / (name + '.bak'))
        with pytest.raises(FileNotFoundError, match=rf'{name} not found \(split \'test\' of toy needs'):
            read_split(tmp_path, 'toy', 'test', 5)
        (d / (name + '.bak')).rename(d / name)
    assert read_split(tmp_path, 'toy', 'test', 5).n_images == 1


def test_corrupt_image_names_file(tmp_path, tok):
    s, folder = toy_images(tmp_path)
    data = (folder / 'im1.png').read_bytes()
    (folder / 'im1.png').write_bytes(data[:len(data) // 2])              # truncated PNG
    check_images(s, folder)                                              # present: the check passes
    with pytest.raises(OSError, match=r'cannot decode image .*im1.png'):
        ImageDataset(s, folder, 8)[1]
    (folder / 'im2.png').write_text('hello')
    with pytest.raises(OSError, match=r'im2.png'):
        load_image(folder / 'im2.png')


def test_image_folder_choice():
    cfg = LapsConfig(data_path='data/', dataset='f30k')
    assert image_folder(cfg) == Path('data/f30k/images')
    assert image_folder(cfg.replace(f30k_img_path='/x/flickr')) == Path('/x/flickr')
    assert image_folder(cfg.replace(dataset='coco', f30k_img_path='/x/flickr', coco_img_path='/y/coco')) == Path('/y/coco')
    assert image_folder(cfg.replace(dataset='synthetic', f30k_img_path='/x/flickr', coco_img_path='/y/coco')) == \
        Path('data/synthetic/images')
    assert image_folder(cfg.replace(f30k_img_path='/x/flickr', img_path='/z/any')) == Path('/z/any')   # the generic flag wins
    assert image_folder(cfg.replace(dataset='synthetic', img_path='/z/any')) == Path('/z/any')


def test_unknown_dataset_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match=r"dataset must be one of 'f30k', 'coco', 'synthetic'; got 'flickr'"):
        LapsConfig(dataset='flickr')
    write_split(tmp_path, [f'c{j}' for j in range(5)], [1] * 5, {1: 'a.jpg'})
    with pytest.raises(KeyError, match=r"unknown dataset 'toy'; registered: f30k, coco, synthetic"):
        read_split(tmp_path, 'toy', 'test')                             # no spec, no count: no silent default of 5
    assert read_split(tmp_path, 'toy', 'test', captions_per_image=5).captions_per_image == 5


# ---------------------------------------------------------------- transforms
def eval_transforms_shapes_values_determinism():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    a = train_transform(img, 32, torch.Generator().manual_seed(5))
    b = train_transform(img, 32, torch.Generator().manual_seed(5))
    c = train_transform(img, 32, torch.Generator().manual_seed(6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = eval_transform(img, 16)
    assert t.shape == (3, 16, 16) and torch.equal(t, eval_transform(img, 16))
    ref = np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), (ref - mean) / std, rtol=1e-5, atol=1e-5)
    full = apply_train_params(img, (0, 0, 70, 50), True, 16)
    assert torch.equal(full, eval_transform(img, 16).flip(-1))


def test_random_resized_crop_distribution():
    g = torch.Generator().manual_seed(0)
    boxes = np.array([random_resized_crop_box(300, 200, g) for _ in range(2000)])
    l, t, w, h = boxes.T
    assert (l >= 0).all() and (t >= 0).all() and (l + w <= 300).all() and (t + h <= 200).all()
    area = w * h / 60000
    assert area.min() > 0.59 and 0.85 < area.max() <= (267 * 200) / 60000   # ratio <= 4/3 caps w at round(266.7)
    assert 0.65 < area.mean() < 0.8                                      # tries with larger areas are rejected more
    ratio = w / h
    assert ratio.min() > 0.74 and ratio.max() < 1.34
    assert random_resized_crop_box(10, 100, g, scale=(1.0, 1.0)) == (0, 43, 10, 13)   # fallback: central crop, h = round(10 / (3/4))


def test_flip_probability():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    from laps.data.loaders import sample_train_params
    flips = [sample_train_params(8, 8, g)[1] for _ in range(4000)]
    assert 0.46 < np.mean(flips) < 0.54
    assert not any(sample_train_params(8, 8, g, hflip=False)[1] for _ in range(50))


# ---------------------------------------------------------------- tokenizer and captions
@needs_f30k
def test_bert_base_uncased_offline_equals_minilm_vocab(tok):
    minilm = load_tokenizer('minilm')
    caps = read_split(SHARED, 'f30k', 'test').captions[:300]
    assert tok(caps)['input_ids'] == minilm(caps)['input_ids']
    assert len(tok) == 30522 and tok.mask_token_id == 103


def test_load_tokenizer_bad_folder(tmp_path):
    with pytest.raises(OSError, match='no tokenizer files in folder'):
        load_tokenizer(str(tmp_path))


def test_encode_caption_special_tokens_and_truncation(tok):
    ids = encode_caption(tok, 'A dog runs on the beach.')
    assert ids == [101, 1037, 3899, 3216, 2006, 1996, 3509, 1012, 102]
    short = encode_caption(tok, 'A dog runs on the beach.', max_word=5)
    assert short == [101, 1037, 3899, 3216, 102] and len(short) == 5
    words = caption_words(tok, ['A snowboarder, mid-air.'])[0]
    assert [tok.convert_ids_to_tokens(w) for w in words] == [['a'], ['snow', '##board', '##er'], [','], ['mid'], ['-'], ['air'], ['.']]


def test_augment_words_follows_actions(tok):
    words = [[2000 + k] * (1 + k % 3) for k in range(3000)]             # distinct words of 1-3 sub-tokens
    acts = word_actions(len(words), torch.Generator().manual_seed(7))
    out = augment_words(words, torch.Generator().manual_seed(7), tok.mask_token_id, len(tok), tok.all_special_ids)
    kept = [w for w, a in zip(words, acts.tolist()) if a != DELETE]
    assert len(out) == len(kept) == (acts != DELETE).sum()
    for w_in, w_out, a in zip(kept, out, [a for a in acts.tolist() if a != DELETE]):
        assert len(w_in) == len(w_out)                                 # every sub-token replaced together
        if a == KEEP: assert w_out == w_in
        if a == MASK: assert w_out == [tok.mask_token_id] * len(w_in)
        if a == RANDOM: assert w_out != w_in and not set(w_out) & set(tok.all_special_ids)
    props = torch.bincount(word_actions(100_000, torch.Generator().manual_seed(1)), minlength=4).float() / 100_000
    assert torch.allclose(props, torch.tensor([0.8, 0.1, 0.02, 0.08]), atol=5e-3), props   # size augmentation, nbs/41_data.loaders.ipynb


@needs_f30k
def test_size_augmentation_on_real_captions(tok):
    caps = read_split(SHARED, 'f30k', 'test').captions
    g = torch.Generator().manual_seed(0)
    plain = [encode_caption(tok, c) for c in caps]
    aug = [encode_caption(tok, c, augment=True, generator=g) for c in caps]
    n_plain, n_aug = sum(len(p) - 2 for p in plain), sum(len(a) - 2 for a in aug)
    masked = sum(a.count(tok.mask_token_id) for a in aug)
    assert all(a[0] == 101 and a[-1] == 102 and 0 not in a for a in aug)
    assert 0.90 < n_aug / n_plain < 0.94                                # ~8% of words (and their sub-tokens) deleted
    assert 0.09 < masked / n_plain < 0.11
    assert sum(a == p for a, p in zip(aug, plain)) / len(caps) > 0.05  # short captions often untouched
    g2 = torch.Generator().manual_seed(0)
    assert [encode_caption(tok, c, augment=True, generator=g2) for c in caps[:50]] == aug[:50]


# ---------------------------------------------------------------- datasets, collate, loaders
def test_collate_pads_and_keeps_order():
    items = [dict(image=torch.full((3, 4, 4), float(k)), input_ids=torch.tensor([101] + [5] * k + [102]),
                  caption_index=10 + k, img_id=7 - k) for k in (3, 0, 1)]
    b = collate(items)
    assert b['images'].shape == (3, 3, 4, 4) and b['images'][:, 0, 0, 0].tolist() == [3.0, 0.0, 1.0]
    assert b['input_ids'].tolist() == [[101, 5, 5, 5, 102], [101, 102, 0, 0, 0], [101, 5, 102, 0, 0]]
    assert b['lengths'].tolist() == [5, 2, 3] and b['caption_index'].tolist() == [13, 10, 11]
    assert b['img_ids'].tolist() == [4, 7, 6] and set(b) == {'images', 'input_ids', 'lengths', 'img_ids', 'caption_index'}


def test_train_loader_pairs_rows_and_is_reproducible(tmp_path, tok):
    s, folder = toy_images(tmp_path)
    ds = TrainDataset(s, folder, tok, img_res=8, size_augment=False)
    colour_ids = tok.convert_tokens_to_ids(['red', 'green', 'blue'])
    batches = list(build_loader(ds, 4, shuffle=True, seed=3))
    assert sorted(torch.cat([b['caption_index'] for b in batches]).tolist()) == list(range(15))
    for b in batches:
        for k in range(len(b['img_ids'])):
            c = int(b['img_ids'][k]) - 100                              # image k shows colour c ...
            assert colour_ids[c] in b['input_ids'][k].tolist()          # ... and row k's caption names it
            assert b['images'][k, :, 2:6, 2:6].mean((1, 2)).argmax() == c
            assert s.caption_img_ids[int(b['caption_index'][k])] == int(b['img_ids'][k])
    again = list(build_loader(ds, 4, shuffle=True, seed=3, workers=2))  # same batches with worker processes
    for b1, b2 in zip(batches, again):
        assert torch.equal(b1['images'], b2['images']) and torch.equal(b1['input_ids'], b2['input_ids'])
    other = [b['caption_index'].tolist() for b in build_loader(ds, 4, shuffle=True, seed=4)]
    assert other != [b['caption_index'].tolist() for b in batches]


def test_set_epoch_changes_augmentation(tmp_path, tok):
    s, folder = toy_images(tmp_path)
    ds = TrainDataset(s, folder, tok, img_res=8, seed=0)
    e0 = [ds[i]['image'] for i in range(15)]
    ds.set_epoch(1)
    e1 = [ds[i]['image'] for i in range(15)]
    assert sum(not torch.equal(a, b) for a, b in zip(e0, e1)) > 10
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]['image']) for i, a in enumerate(e0))
    assert item_generator(0, 1, 2).initial_seed() != item_generator(0, 2, 1).initial_seed()


def test_flip_swaps_left_right(tmp_path, tok):
    caps = ['a red dot to the left of a blue dot'] * 5
    d = write_split(tmp_path, caps, [1] * 5, {1: 'x.png'})
    (d / 'images').mkdir()
    a = np.zeros((16, 16, 3), np.uint8); a[:, :8, 0] = 255; a[:, 8:, 2] = 255
    Image.fromarray(a).save(d / 'images' / 'x.png')
    s = read_split(tmp_path, 'toy', 'test', 5)
    ds = TrainDataset(s, d / 'images', tok, img_res=16, size_augment=False, crop_scale=(1.0, 1.0),
                      flip_tokens=flip_token_map(tok))
    left, right = tok.convert_tokens_to_ids(['left', 'right'])
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in range(5):
            it = ds[i]
            red_on_left = it['image'][0, :, :4].mean() > it['image'][0, :, -4:].mean()
            ids = it['input_ids'].tolist()
            assert (left in ids) == bool(red_on_left) and (right in ids) == (not red_on_left)
            seen.add(bool(red_on_left))
    assert seen == {True, False}
    with pytest.raises(ValueError, match='one token'):
        flip_token_map(tok, (('leftmost', 'rightmost'),))


def test_eval_datasets_encode_each_image_once(tmp_path, tok):
    s, folder = toy_images(tmp_path)
    imgs = list(build_loader(ImageDataset(s, folder, 8), 2))
    assert [b['img_ids'].tolist() for b in imgs] == [[100, 101], [102]]
    assert torch.equal(imgs[0]['images'][1], eval_transform(load_image(folder / 'im1.png'), 8))
    caps = list(build_loader(CaptionDataset(s, tok, max_word=6), 8))
    assert caps[0]['input_ids'].shape == (8, 6) and caps[1]['caption_index'].tolist() == list(range(8, 15))
    assert caps[0]['input_ids'][:, -1].tolist() == [0, 102, 102, 102, 102, 0, 102, 102]   # truncated, [SEP] last


def test_factories_from_config(tmp_path, tok):
    s, folder = toy_images(tmp_path)
    (tmp_path / 'toy').rename(tmp_path / 'f30k')
    cfg = get_config('cpu', dataset='f30k', data_path=str(tmp_path), f30k_img_path=str(tmp_path / 'f30k' / 'images'),
                     batch_size=4, img_res=16, pair_batches=0)   # f30k has no training pairs
    b = next(iter(build_train_loader(cfg, tok, split='test')))
    assert b['images'].shape == (4, 3, 16, 16) and b['input_ids'].shape[0] == 4
    split, il, cl = build_eval_loaders(cfg, 'test', tok, batch_size=10)
    assert (len(il.dataset), len(cl.dataset), split.n_images) == (3, 15, 3)
    with pytest.raises(FileNotFoundError, match='image folder'):
        build_train_loader(cfg.replace(f30k_img_path=str(tmp_path / 'missing')), tok, split='test')


# ---------------------------------------------------------------- the dataset registry
def test_bert_base_uncased_fallback_is_logged(caplog):
    from huggingface_hub import try_to_load_from_cache
    from laps.model.encoders import minilm_path
    if isinstance(try_to_load_from_cache('bert-base-uncased', 'vocab.txt'), str):
        pytest.skip('bert-base-uncased is in the Hugging Face cache here: nothing falls back')
    with caplog.at_level(logging.WARNING, logger='laps.data.loaders'):
        tok = load_tokenizer('bert-base-uncased')
    records = [r for r in caplog.records if r.name == 'laps.data.loaders']
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    msg = records[0].getMessage()
    assert "'bert-base-uncased' is not in the Hugging Face cache" in msg and str(minilm_path() / 'vocab.txt') in msg
    assert len(tok) == 30522
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='laps.data.loaders'):
        load_tokenizer('minilm')                                        # asked for by name: nothing to warn about
    assert not [r for r in caplog.records if r.name == 'laps.data.loaders']


def test_loss_overrides_reach_the_criterion():
    from laps.model.losses import DistanceWeightedTripletLoss
    from laps.training.step import make_alignment_loss
    sims, ids = torch.rand(8, 8) * 2 - 1, torch.arange(8)
    def value(criterion):
        torch.manual_seed(0)                                            # the triplet loss samples negatives
        return criterion(sims, ids) if isinstance(criterion, torch.nn.Module) else criterion(sims, ids, 0)
    cfg = LapsConfig(loss='trip', embed_size=16)
    coco, f30k = value(make_alignment_loss(cfg.replace(dataset='coco'))), value(make_alignment_loss(cfg))
    assert coco == value(DistanceWeightedTripletLoss(margin=0.2, embed_dim=16, nonzero_loss_cutoff=1.9))
    assert f30k == value(DistanceWeightedTripletLoss(margin=0.2, embed_dim=16, nonzero_loss_cutoff=1.7))
    assert coco != f30k and get_dataset('coco').loss_overrides == {'trip': {'nonzero_loss_cutoff': 1.9}}
    register_dataset(DatasetSpec('badloss', loss_overrides={'vse': {'temperature': 0.1}}))
    try:
        with pytest.raises(ValueError, match=r"dataset 'badloss': loss_overrides\['vse'\] = \{'temperature': 0.1\} does not fit"):
            make_alignment_loss(LapsConfig(dataset='badloss'))
    finally: DATASETS.unregister('badloss')


def mine_folder(root, n_train=8, n_dev=4, n_test=4, size=32):
    "A dataset 'mine' in the released layout with 3 captions per image: colour k of 4, captions naming it."
    colours = ['red', 'green', 'blue', 'yellow']
    rgb = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30)]
    d = Path(root) / 'mine'
    (d / 'images').mkdir(parents=True)
    rng, mapping, next_id = np.random.default_rng(0), {}, 0
    for split, n in (('train', n_train), ('dev', n_dev), ('test', n_test)):
        ids = list(range(next_id, next_id + n)); next_id += n
        caps = [f'{w} {colours[i % 4]} {what}' for i in ids for w, what in (('a', 'square'), ('one', 'picture'), ('the', 'patch'))]
        (d / f'{split}_caps.txt').write_text(''.join(c + '\n' for c in caps))
        (d / f'{split}_ids.txt').write_text(''.join(f'{i}\n' for i in ids for _ in range(3)))
        for i in ids:
            a = np.clip(np.array(rgb[i % 4]) + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / 'images' / f'{i:03d}.png'); mapping[str(i)] = f'{i:03d}.png'
    (d / 'id_mapping.json').write_text(json.dumps(mapping))
    return d


@pytest.fixture
def mine(tmp_path):
    "The one documented registration call (nbs/40_data.datasets), undone after the test."
    mine_folder(tmp_path)
    spec = register_dataset(DatasetSpec('mine', captions_per_image=3))
    yield tmp_path, spec
    DATASETS.unregister('mine')


def test_user_dataset_reads_and_loads(mine, tok):
    root, spec = mine
    cfg = get_config('cpu', dataset='mine', data_path=str(root), batch_size=6, img_res=16, pair_batches=0)
    assert image_folder(cfg) == root / 'mine' / 'images' and spec.augmentation == TrainAugmentation()
    s = read_split(root, 'mine', 'train')
    assert (s.captions_per_image, s.n_images, s.n_captions, s.caption_img_ids[:4]) == (3, 8, 24, [0, 0, 0, 1])
    b = next(iter(build_train_loader(cfg, tok)))
    assert b['images'].shape == (6, 3, 16, 16) and b['input_ids'].shape[0] == 6
    split, il, cl = build_eval_loaders(cfg, 'test', tok)
    assert (len(il.dataset), len(cl.dataset), split.captions_per_image) == (4, 12, 3)
    with pytest.raises(ValueError, match='expected exactly 5 consecutive lines per image'):
        read_split(root, 'mine', 'test', captions_per_image=5)          # the files really hold 3 per image
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec('mine'))


def test_user_dataset_trains_and_evaluates(mine):
    "One epoch through the runner with a tiny model, then the best checkpoint evaluated on test (about 2 s)."
    from laps.checkpoint.run import load_checkpoint
    from laps.eval.evaluate import evaluate_split
    from laps.eval.metrics import evaluate_sims, retrieval_metrics
    from laps.training.runner import train
    root, _ = mine
    cfg = get_config(None, dataset='mine', data_path=str(root), logger_name=str(root / 'run'), img_res=32, num_patches=16,
                     embed_size=16, batch_size=6, num_epochs=1, workers=0, max_word=12, device='cpu', log_step=1,
                     bert_path='minilm', vision_pretrained=False, text_pretrained=False, val_step=10**9, shard_size=64)
    result = train(cfg, progress=False, vision_backbone='laps/tiny-vit', text_backbone='laps/tiny-bert')
    assert result['steps'] == 4 and result['best_metrics']['epoch'] == 0          # 24 captions / batch 6
    run = Path(result['run_dir'])
    assert json.loads((run / 'config.json').read_text())['dataset'] == 'mine'
    assert np.load(run / 'sims_dev.npy').shape == (4, 12)                         # dev: 4 images x 3 captions
    model, saved, _ = load_checkpoint(run / 'checkpoint_best')
    assert saved.dataset == 'mine'
    metrics, sims = evaluate_split(model, saved, 'test', progress=False)
    assert sims.shape == (4, 12)
    assert {k: v for k, v in metrics.items() if not k.endswith('_ci95')} == evaluate_sims(sims, 'mine') \
        == retrieval_metrics(sims, captions_per_image=3)
    assert 0 < metrics['rsum'] <= 600 and not any(k.startswith('minimal_pair') for k in metrics)
