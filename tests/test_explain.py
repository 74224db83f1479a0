"""`laps.retrieval.explain` and `laps explain`: the explanation's score is the entry of `laps eval`'s matrix for every
similarity method, its JSON reads back, and the command writes both files or, on bad input, one error line and nothing."""
import json
from pathlib import Path
import pytest
import torch
from laps.cli import main
from laps.core.config import LapsConfig
from laps.core.registry import SIMILARITY_METHODS
from laps.data.datasets import image_folder
from laps.data.loaders import build_eval_loaders, load_tokenizer
from laps.eval.evaluate import score_split
from laps.model.modeling import LAPSModel
from laps.retrieval.explain import Explanation, explain
from test_cli import _laps, synthetic_run  # noqa: F401 (the shared tiny run folder, a fixture)

PAIRS = [(0, 0), (0, 7), (3, 2), (11, 59)]  # (image, caption) rows of the synthetic test split: matching and not


def _tiny_cfg(synthetic_data, method: str, **kw) -> LapsConfig:
    return LapsConfig(dataset='synthetic', data_path=str(synthetic_data), img_res=32, num_patches=16, embed_size=16,
                      bert_path='minilm', vision_pretrained=False, text_pretrained=False, workers=0, max_word=32,
                      similarity_calc_method=method, score_threshold=0.1, **kw)


@pytest.mark.parametrize('method, kw', [(m, {}) for m in SIMILARITY_METHODS.names()]
                         + [('max', dict(use_token_selection=1, token_selection_ratio=0.5)),
                            ('attn', dict(use_token_selection=1, token_selection_strategy='score', use_cls_as_glob_embd=1))])
def test_similarity_is_the_eval_matrix_entry(synthetic_data, method, kw):
    cfg = _tiny_cfg(synthetic_data, method, **kw)
    torch.manual_seed(0)
    model = LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert').eval()
    tok = load_tokenizer(cfg.bert_path)
    split, images, captions = build_eval_loaders(cfg, 'test', tok, batch_size=16)
    sims = score_split(model, images, captions, progress=False)          # what `laps eval` scores
    assert sims.shape == (12, 60)
    for i, j in PAIRS:
        e = explain(model, split.image_file(split.image_ids[i], image_folder(cfg)), split.captions[j], tokenizer=tok, cfg=cfg)
        assert abs(e.similarity - float(sims[i, j])) < 1e-5, (method, i, j, e.similarity, float(sims[i, j]))
        assert e.method == method
        if e.word_contributions is not None: assert abs(sum(e.word_contributions) - e.similarity) < 1e-5
        if model.cross_net.slims_patches: assert len(e.kept_patches) == 8 and len(e.patch_score) == 16
        else: assert e.kept_patches is None and e.spa_weights is None


def test_json_round_trip(synthetic_data):
    cfg = _tiny_cfg(synthetic_data, 'thres', use_token_selection=1, token_selection_ratio=0.6)
    model = LAPSModel(cfg, 'laps/tiny-vit', 'laps/tiny-bert').eval()
    from PIL import Image
    e = explain(model, Image.new('RGB', (48, 40), 'red'), 'a red square left of a blue circle', tokenizer=load_tokenizer('minilm'))
    d = json.loads(json.dumps(e.to_dict()))
    assert d == e.to_dict() and Explanation.from_dict(d).to_dict() == d
    assert set(d['alignment']) == {'scores', 'passes'} and d['grid'] == [4, 4]
    assert d['aligned_words'][-1] == 0 and len(d['kept_words']) < len(d['words'])   # selection kept some words, then [CLS]


def _image(synthetic_data) -> Path:
    return next(iter(sorted((synthetic_data / 'synthetic' / 'images').iterdir())))


def test_cli_writes_both_files(synthetic_run, synthetic_data, tmp_path):
    out = _laps('explain', synthetic_run, '--image', _image(synthetic_data), '--caption', 'a small red circle',
                '--out', tmp_path / 'why')
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'why').iterdir()) == ['explanation.json', 'explanation.png']
    d = json.loads((tmp_path / 'why' / 'explanation.json').read_text())
    assert d['caption'] == 'a small red circle' and d['method'] == 'max' and f"{d['similarity']:.4f}" in out.stdout
    assert (tmp_path / 'why' / 'explanation.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cli_bad_input_is_one_line_and_writes_nothing(synthetic_run, synthetic_data, tmp_path, capsys):
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    (tmp_path / 'full').mkdir(); (tmp_path / 'full' / 'keep.txt').write_text('mine')
    (tmp_path / 'a_file').write_text('mine')
    image, new = _image(synthetic_data), tmp_path / 'new'
    cases = [(dict(image=tmp_path / 'missing.png'), 'missing.png'), (dict(image=tmp_path / 'broken.png'), 'broken.png'),
             (dict(caption='   '), '--caption is empty'), (dict(out=tmp_path / 'full'), 'folder is not empty'),
             (dict(out=tmp_path / 'a_file'), 'exists and is not a folder')]
    for change, expected in cases:
        a = {**dict(image=image, caption='a red circle', out=new), **change}
        status = main(['explain', str(synthetic_run), '--image', str(a['image']), '--caption', a['caption'], '--out', str(a['out'])])
        err = capsys.readouterr().err
        assert status == 2 and len(err.splitlines()) == 1 and err.startswith('laps: error: ') and expected in err, (change, err)
        assert not new.exists()
    assert [p.name for p in (tmp_path / 'full').iterdir()] == ['keep.txt'] and (tmp_path / 'a_file').read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file', 'broken.png', 'full']
