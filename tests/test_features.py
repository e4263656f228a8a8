"""The feature cache: reused, invalidated by exactly what determines the features, never trusted when
damaged; bf16 features agree with fp32 ones; cached and fresh features train the same head."""
import json
import os

import pytest
import torch
import torchvision
from PIL import Image

import monkeypox as mp
import mpox.checkpoint
import mpox.data
import mpox.devices
import mpox.features
import mpox.files
import mpox.model
import mpox.precision
import mpox.system
from conftest import PRE, TINY, make_dataset


def config(tmp_path, *flags):
    """train's settings for a resnet18 with random weights, its feature cache in tmp_path/cache."""
    return mp.parse_args(['train', '--arch', 'resnet18', '--weights', 'none', '--device', 'cpu', '--workers', '0',
                          '--extract-batch-size', '8', '--cache', str(tmp_path / 'cache'), *flags])


def extract(cfg, photos, views=('eval', 'train0'), calibration=None):
    ex = mpox.features.Extractor(cfg, ['Monkey Pox', 'Others'], mpox.model.resolve_weights(cfg),
                      calibration=photos if calibration is None else calibration)
    features, failures = ex.features(photos, list(views))
    assert not failures
    return ex, features.x


@pytest.fixture
def photos(tmp_path):
    data = make_dataset(tmp_path / 'd', per_class=4)
    return mpox.data.read_photos(str(data))[1]


def test_a_second_run_reads_the_cache_and_never_calls_the_backbone(tmp_path, photos):
    first, x1 = extract(config(tmp_path), photos)
    assert first.backbone_calls > 0 and first.crops == 2 * len(photos)
    second, x2 = extract(config(tmp_path), photos)
    assert second.backbone_calls == 0 and second.built_model() is None  # not even built
    assert torch.equal(x1, x2)


@pytest.mark.parametrize('change', ['weights', pytest.param('arch', marks=pytest.mark.slow),
                                    pytest.param('precision', marks=pytest.mark.slow)])
def test_changing_what_determines_the_features_recomputes_them(tmp_path, photos, change):
    extract(config(tmp_path), photos)
    if change == 'weights':
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / 'other.pth')
        cfg = config(tmp_path, '--weights', str(tmp_path / 'other.pth'))
    elif change == 'arch':
        cfg = config(tmp_path, '--arch', 'resnet34')
    else:
        auto = mpox.precision.resolve_precision('auto', torch.device('cpu'), 'resnet18')
        cfg = config(tmp_path, '--precision', 'fp32' if auto != 'fp32' else 'bf16')
    again, _ = extract(cfg, photos)
    assert again.crops == 2 * len(photos)


def test_changing_the_transform_recomputes(tmp_path, photos):
    extract(config(tmp_path), photos)
    again, _ = extract(config(tmp_path, '--set', 'RESIZE=288'), photos)
    assert again.crops == 2 * len(photos)


def test_changing_one_photos_bytes_recomputes_only_that_photo(tmp_path, photos):
    # in fp32: in int8, a photo that calibrated the features changes them all (the next test)
    extract(config(tmp_path, '--precision', 'fp32'), photos)
    img = Image.open(photos[0].path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img.save(photos[0].path)
    _, fresh = mpox.data.read_photos(str(tmp_path / 'd'))
    again, _ = extract(config(tmp_path, '--precision', 'fp32'), fresh)
    assert again.crops == 2  # its two views, nothing else


@pytest.mark.slow
def test_a_truncated_or_tampered_pack_is_detected_and_rebuilt_not_trusted(tmp_path, photos, capfd):
    _, x1 = extract(config(tmp_path), photos)
    packs = sorted((tmp_path / 'cache').rglob('pack-*.pt'))
    assert packs
    packs[0].write_bytes(packs[0].read_bytes()[:packs[0].stat().st_size // 2])
    again, x2 = extract(config(tmp_path), photos)
    assert 'damaged' in capfd.readouterr().err
    assert again.crops == 2 * len(photos) and torch.equal(x1, x2)
    # a pack that loads but whose numbers changed fails its digest
    pack = sorted((tmp_path / 'cache').rglob('pack-*.pt'))[0]
    data = torch.load(pack, weights_only=True)
    data['features'][0, 0] += 1
    torch.save(data, pack)
    third, x3 = extract(config(tmp_path), photos)
    assert third.crops > 0 and torch.equal(x3, x1)


def test_an_interrupted_write_leaves_no_pack(tmp_path):
    cache = mpox.features.FeatureCache(str(tmp_path), 'key', {})

    class Boom(Exception):
        pass

    def write(f):
        f.write(b'half a pack')
        raise Boom
    with pytest.raises(Boom):
        mpox.files.atomic_write(tmp_path / 'key' / 'pack-x.pt', write)
    assert list((tmp_path / 'key').iterdir()) == []
    assert mpox.features.FeatureCache(str(tmp_path), 'key', {}).rows == {} and cache.rows == {}


def test_many_packs_are_merged_into_one_that_holds_every_row(tmp_path):
    cache = mpox.features.FeatureCache(str(tmp_path), 'key', {})
    for k in range(10):  # e.g. ten runs that each added a few photos
        cache.put([f'photo{k}:eval'], torch.full((1, 4), float(k)))
    assert len(list((tmp_path / 'key').glob('pack-*.pt'))) == 10
    cache.compact(most=8)
    assert len(list((tmp_path / 'key').glob('pack-*.pt'))) == 1
    reread = mpox.features.FeatureCache(str(tmp_path), 'key', {})
    assert sorted(reread.rows) == sorted(f'photo{k}:eval' for k in range(10))
    assert all(torch.equal(reread.rows[f'photo{k}:eval'], torch.full((4,), float(k))) for k in range(10))


@pytest.mark.slow
def test_bf16_features_agree_with_fp32_on_real_photos(msld, torch_home, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    photos = mpox.data.read_photos(str(msld))[1][::32]
    real = ('--arch', 'mobilenet_v2', '--weights', 'IMAGENET1K_V1')
    _, fp32 = extract(config(tmp_path, '--precision', 'fp32', *real), photos, ['eval'])
    _, bf16 = extract(config(tmp_path, '--precision', 'bf16', *real), photos, ['eval'])
    cos = torch.nn.functional.cosine_similarity(fp32[:, 0].float(), bf16[:, 0].float(), dim=1)
    # bf16 keeps 8 bits of mantissa through 50 layers: close, not equal (docs/precision.md gives the figures)
    assert cos.mean() > 0.99 and cos.min() > 0.95, cos


@pytest.mark.slow
def test_cached_and_fresh_features_train_the_same_head(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=10)
    args = ('train', '--data', data, *TINY)
    heads, outputs = [], []
    for out, extra in (('cached', ()), ('cached', ()), ('nocache', ('--no-cache',))):
        r = cli(*args, '--out', tmp_path / out, *extra)
        assert r.returncode == 0, r.stderr
        outputs.append(r.stdout)
        heads.append(torch.load(tmp_path / out / 'monkeypox_model.pkl', weights_only=True)['model']['fc.weight'])
    assert 'crops computed' in outputs[0] and 'all from cache' in outputs[1] and 'crops computed' in outputs[2]
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], heads[2])


@pytest.mark.slow
@pytest.mark.skipif(not mpox.devices.int8_engine(), reason='int8 kernels are for x86 CPUs')
def test_int8_features_are_keyed_by_their_calibration_photos_which_the_cache_keeps(tmp_path, photos):
    cfg = config(tmp_path, '--precision', 'int8', '--set', 'CALIBRATION_PHOTOS=3')
    first, x1 = extract(cfg, photos, calibration=photos[:4])
    assert first.crops == 2 * len(photos) and first.qparams and (first.cache.dir / 'int8.json').exists()
    again, x2 = extract(cfg, photos, calibration=photos[3::-1])  # the same photos in another order: the same 3
    assert again.crops == 0 and torch.equal(x1, x2)
    assert again.int8_calibration()['qparams'] == first.qparams and again.built_model() is None  # read back, not rebuilt
    other, _ = extract(cfg, photos, calibration=photos[4:])
    assert other.crops == 2 * len(photos) and other.qparams != first.qparams


def test_an_int8_checkpoint_is_scored_in_int8_where_it_can_be_else_in_fp32_with_a_note(monkeypatch, capsys):
    cpu, ranges = torch.device('cpu'), {'int8': {'qparams': {'conv1.scale': 0.1}}}

    def loaded(precision):
        return mpox.checkpoint.Loaded(None, {'precision': precision, **(ranges if precision == 'int8' else {})}, ['a', 'b'], 0, {},
                         0.5)
    auto = mp.parse_args(['predict', 'photo.jpg'])
    assert mpox.precision.scoring_precision(auto, loaded('fp32'), cpu) == 'fp32'
    assert loaded('int8').qparams == {'conv1.scale': 0.1} and loaded('fp32').qparams is None
    if mpox.devices.int8_engine():
        assert mpox.precision.scoring_precision(auto, loaded('int8'), cpu) == 'int8'
        with pytest.raises(mpox.system.UserError, match='needs a checkpoint trained in int8'):
            mpox.precision.scoring_precision(mp.parse_args(['predict', 'photo.jpg', '--precision', 'int8']), loaded('fp32'), cpu)
    monkeypatch.setattr(mpox.precision, 'int8_engine', lambda: None)  # a CPU without x86 int8 kernels (ARM)
    one = loaded('int8')
    assert mpox.precision.scoring_precision(auto, one, cpu) == 'fp32' and mpox.precision.scoring_precision(auto, one, cpu) == 'fp32'
    assert capsys.readouterr().out.count('scoring in fp32') == 1  # decided once: scores and Grad-CAM ask alike


@pytest.mark.slow
def test_fp32_bf16_and_int8_runs_predict_what_they_validated(tmp_path, cli):
    data = make_dataset(tmp_path / 'd', per_class=8)
    for precision in ('fp32', 'bf16') + (('int8',) if mpox.devices.int8_engine() else ()):
        out = tmp_path / precision
        r = cli('train', '--data', data, '--batch-size', '8', '--precision', precision, '--out', out,
                *TINY)
        assert r.returncode == 0, r.stderr
        ckpt = torch.load(out / 'monkeypox_model.pkl', weights_only=True)
        assert ckpt['precision'] == precision
        if precision == 'int8':  # the checkpoint carries its calibration, made on training photos only
            assert ckpt['int8']['qparams'] and ckpt['int8']['engine'] == 'x86'
            calibrated = {os.path.relpath(p, ckpt['split']['root']) for p in ckpt['int8']['photos']}
            assert len(calibrated) == min(mp.CALIBRATION_PHOTOS, len(ckpt['split']['train']))
            assert calibrated <= set(ckpt['split']['train'])
        m = json.loads(cli('evaluate', '--data', data, '--checkpoint', out / 'monkeypox_model.pkl',
                                         '--json', '--no-plot').stdout)  # auto: the checkpoint's precision
        assert m['balanced_accuracy'] == pytest.approx(ckpt['metrics']['balanced_accuracy'])


def test_no_cache_reads_no_hash_memo_from_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / 'hashes.json').write_text('{"/some/photo.jpg": [1, 2, "not its hash"]}')
    monkeypatch.chdir(tmp_path)
    assert mpox.files.load_memo('') == {}  # --no-cache: nothing read from wherever the user stands
    assert mpox.files.load_memo(str(tmp_path)) == {'/some/photo.jpg': [1, 2, 'not its hash']}


@pytest.mark.slow
def test_compiling_follows_the_measured_threshold(tmp_path, monkeypatch):
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    cold, warm = mpox.features.COMPILE_MIN_CROPS['cold'], mpox.features.COMPILE_MIN_CROPS['warm']
    assert warm < cold  # a warm compile cache makes compiling cheap: it pays sooner
    assert not mpox.features.compile_pays(cold - 1, False, cpu, 'fp32') and mpox.features.compile_pays(cold, False, cpu, 'bf16')
    assert not mpox.features.compile_pays(warm - 1, True, cpu, 'fp32') and mpox.features.compile_pays(warm, True, cpu, 'fp32')
    assert not mpox.features.compile_pays(10 ** 6, True, cuda, 'bf16')  # extraction on a GPU waits on decoding
    assert not mpox.features.compile_pays(10 ** 6, True, cpu, 'int8')  # quantized kernels are the fast path already
    backbone, _ = mpox.precision.inference_model(mpox.model.build_model('resnet18', 2), cpu, 'fp32', PRE)
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'compile'))  # compiled() points torch there
    for flag, crops, compiles in (('auto', 100, False), ('never', 10 ** 6, False), ('auto', cold, True),
                                  ('always', 1, True)):
        cfg = mp.parse_args(['train', '--compile', flag, '--device', 'cpu', '--cache', str(tmp_path), '--precision',
                             'fp32'])
        extractor = mpox.features.Extractor(cfg, ['a', 'b'], mpox.model.resolve_weights(cfg))
        fn = mpox.features.compiled(backbone, crops, 16, extractor)
        assert (fn is not backbone) == compiles, (flag, crops)  # the eager backbone, untouched, or a wrapper
    # compiling happens at the first batch, not here: nothing was compiled, so no marker claims a warm cache
    assert not list((tmp_path / 'compile').glob('compiled-*'))
