"""A torchvision backbone with a new head, and what stays frozen: mpox.model."""

import pytest
import torch

import mpox.model


@pytest.mark.parametrize('arch', ['resnet101', 'resnet50', 'resnet18', 'mobilenet_v2'])
def test_architectures_get_a_new_head_with_one_output_per_class(arch):
    model = mpox.model.build_model(arch, 3)
    head, _ = mpox.model.freeze(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f'{mpox.model.head_name(model)}.weight',
                                                                           f'{mpox.model.head_name(model)}.bias']
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


def test_backbone_is_bit_identical_after_training_batchnorm_statistics_included(trained):
    _, checkpoint = trained
    saved = torch.load(checkpoint, weights_only=True)['model']
    fresh = mpox.model.build_model('resnet18', 2, seed=0).state_dict()  # --weights none: same seed, same init
    backbone = [k for k in fresh if not k.startswith('fc.')]
    assert any('running_mean' in k for k in backbone)
    for k in backbone:
        assert torch.equal(saved[k], fresh[k]), k
    assert not torch.equal(saved['fc.weight'], fresh['fc.weight'])
