"""ONNX export: one self-described file that onnxruntime scores as the checkpoint does, and that predict and
evaluate take in place of the checkpoint; bad files are one-line errors."""
import hashlib
import json
import os
import re

import numpy as np
import pytest
import torch

import mpox.onnxfile
from conftest import call_main, make_dataset, one_line_error

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')


@pytest.fixture(scope='module')
def exported(trained, tmp_path_factory):
    """The shared trained resnet18, exported once: (photos, checkpoint, .onnx file). The same check on the
    228 MSLD photos with a trained MobileNetV2 is in the README (largest difference 1.5e-6)."""
    data, checkpoint = trained
    out = tmp_path_factory.mktemp('onnx') / 'model.onnx'
    r = call_main('export', '--checkpoint', checkpoint, '--out', out)
    assert r.returncode == 0, r.stderr
    assert 'onnx.checker passed' in r.stdout and ' photos' in r.stdout  # compared on its validation photos
    if torch.load(checkpoint, weights_only=True)['precision'] != 'fp32':  # int8 by default on x86 CPUs
        assert re.search(r"note: .* trained on (int8|bf16) features; .*differ from predict's \(by up to ", r.stdout)
    return data, checkpoint, out


def predictions(cli, paths, checkpoint):
    r = cli('predict', *paths, '--checkpoint', checkpoint, '--json', '--no-plot', '--precision', 'fp32')
    assert r.returncode == 0, r.stderr
    return {row['path']: row for row in map(json.loads, r.stdout.splitlines())}


@pytest.mark.slow
def test_predict_from_the_onnx_file_gives_the_checkpoints_probabilities(exported, cli):
    data, checkpoint, onnx_file = exported
    a, b = predictions(cli, [data], checkpoint), predictions(cli, [data], onnx_file)
    assert a.keys() == b.keys() and len(a) == 32
    assert max(abs(a[k]['probabilities'][c] - b[k]['probabilities'][c]) for k in a for c in a[k]['probabilities']) <= 1e-4
    assert all(a[k]['label'] == b[k]['label'] for k in a)


@pytest.mark.slow
def test_the_onnx_file_is_one_file_that_describes_itself(exported):
    _, checkpoint, onnx_file = exported
    assert sorted(os.listdir(onnx_file.parent)) == ['model.onnx']  # no external-data file beside it
    model = onnx.load(onnx_file)
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    ckpt = torch.load(checkpoint, weights_only=True)
    assert json.loads(meta['classes']) == ckpt['classes'] and meta['positive_class'] == 'Monkey Pox'
    assert float(meta['threshold']) == ckpt['threshold'] and meta['arch'] == 'resnet18'
    pre = json.loads(meta['preprocess'])
    assert {k: pre[k] for k in ('image_size', 'resize', 'mean', 'std')} == ckpt['preprocess']
    assert 'draft' in pre['decode'] and 'bilinear' in pre['resize_how']
    assert meta['checkpoint_sha256'] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert meta['torch'] == str(torch.__version__) and meta['head_trained_on'] == f'{ckpt["precision"]} features'
    session = ort.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    for batch in (1, 5):  # the batch size is free
        size = pre['image_size']
        p = session.run(None, {'image': np.zeros((batch, 3, size, size), np.float32)})[0]
        assert p.shape == (batch, 2) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.slow
def test_evaluate_from_the_onnx_file_gives_the_checkpoints_metrics(exported, cli):
    data, checkpoint, onnx_file = exported
    m = [json.loads(cli('evaluate', '--data', data, '--checkpoint', f, '--all', '--json', '--no-plot',
                        '--precision', 'fp32').stdout) for f in (checkpoint, onnx_file)]
    for key in ('n', 'accuracy', 'balanced_accuracy', 'sensitivity', 'specificity', 'confusion_matrix'):
        assert m[0][key] == m[1][key], key
    assert m[1]['auc'] == pytest.approx(m[0]['auc'], abs=1e-3) and m[1]['brier'] == pytest.approx(m[0]['brier'],
                                                                                                  abs=1e-4)


@pytest.mark.slow
def test_what_onnx_cannot_do_is_refused_in_one_line(exported, cli):
    data, _, onnx_file = exported
    photo = next((data / 'Others').glob('*.jpg'))
    one_line_error(cli('predict', photo, '--checkpoint', onnx_file, '--explain'), 'Grad-CAM', 'PyTorch checkpoint')
    one_line_error(cli('predict', photo, '--checkpoint', onnx_file, '--precision', 'bf16'), 'fp32 on the CPU',
                   'drop --precision bf16')


@pytest.mark.slow
def test_an_export_that_cannot_be_written_is_an_error_and_leaves_nothing(trained, tmp_path, cli):
    _, checkpoint = trained
    (tmp_path / 'a-file').write_text('not a folder')
    one_line_error(cli('export', '--checkpoint', checkpoint, '--out', tmp_path / 'a-file' / 'model.onnx'),
                   'cannot write', 'model.onnx')
    assert sorted(os.listdir(tmp_path)) == ['a-file']


def tiny_onnx(path, metadata=None):
    """A valid ONNX model (Identity), with or without this tool's metadata."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['image'], ['probabilities'])], 'tiny',
                              [helper.make_tensor_value_info('image', TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info('probabilities', TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.save(model, path)
    return path


def test_files_that_are_not_this_tools_onnx_are_one_line_errors(tmp_path, cli):
    photos = make_dataset(tmp_path / 'd', per_class=2)
    photo = photos / 'Others' / 'P0_1.jpg'
    (tmp_path / 'noise.onnx').write_bytes(os.urandom(3000))
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'noise.onnx'), 'noise.onnx', 'not a readable ONNX')
    plain = tiny_onnx(tmp_path / 'plain.onnx')
    one_line_error(cli('predict', photo, '--checkpoint', plain), 'plain.onnx', 'without this tool', 'export')
    described = tiny_onnx(tmp_path / 'described.onnx', {'monkeypox.format': mpox.onnxfile.ONNX_FORMAT})
    (tmp_path / 'cut.onnx').write_bytes(described.read_bytes()[:len(described.read_bytes()) // 2])
    one_line_error(cli('evaluate', '--data', photos, '--checkpoint', tmp_path / 'cut.onnx'), 'cut.onnx',
                   'truncated or not ONNX')
    one_line_error(cli('predict', photo, '--checkpoint', tmp_path / 'missing.onnx'), 'missing.onnx', 'does not exist')


@pytest.mark.slow
def test_the_onnx_file_carries_the_out_of_distribution_check(exported, cli, tmp_path):
    data, checkpoint, onnx_file = exported
    model = onnx.load(onnx_file)
    assert [o.name for o in model.graph.output] == ['probabilities', 'ood_score']
    meta = {p.key: p.value for p in model.metadata_props}
    assert float(meta['ood_threshold']) == torch.load(checkpoint, weights_only=True)['ood']['threshold']
    a, b = predictions(cli, [data], checkpoint), predictions(cli, [data], onnx_file)
    # a distance sqrt(2 - 2 cos) magnifies rounding near 0 (a training photo's own): 1e-7 in cos is 4e-4
    assert max(abs(a[k]['ood_score'] - b[k]['ood_score']) for k in a) <= 3e-3
    assert all(a[k]['unlike_training'] == b[k]['unlike_training'] for k in a)
