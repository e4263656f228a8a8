"""Checkpoints that describe themselves and load without running code: mpox.checkpoint."""

import pickle

import torch

import monkeypox as mp
import mpox.checkpoint
import mpox.head


def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained):
    _, checkpoint = trained
    ckpt = torch.load(checkpoint, weights_only=True, map_location='cpu')
    for key in ('model', 'arch', 'classes', 'preprocess', 'positive_class', 'weights', 'config', 'epoch',
                'metrics', 'split', 'versions', 'threshold'):
        assert key in ckpt, key
    assert ckpt['classes'] == ['Monkey Pox', 'Others'] and ckpt['positive_class'] == 'Monkey Pox'
    assert ckpt['preprocess'] == {'image_size': 160, 'resize': 176, 'mean': list(mp.MEAN), 'std': list(mp.STD)}
    assert ckpt['model']['fc.weight'].shape == (2, 512)
    assert set(ckpt['split']['train']).isdisjoint(ckpt['split']['val'])
    assert ckpt['versions']['torch'] == str(torch.__version__)
    assert ckpt['metrics']['balanced_accuracy'] == ckpt['history'][0]['val_balanced_accuracy']
    assert ckpt['stage'] == 'head' and ckpt['head']['auto'] and ckpt['head']['weight_decay'] in mpox.head.HEAD_GRID
    assert ckpt['head']['search']['choice'] == ckpt['head']['weight_decay'] and ckpt['head']['temperature'] > 0


def test_class_map_is_written_and_read_back_as_plain_data(trained):
    _, checkpoint = trained
    path = checkpoint.parent / 'class_dict.pk'
    assert mpox.checkpoint.read_class_map(path) == {0: 'Monkey Pox', 1: 'Others'}
    with open(path, 'rb') as f:
        assert pickle.load(f) == {0: 'Monkey Pox', 1: 'Others'}
