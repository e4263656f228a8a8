"""One training run: the best epoch kept as a copy, fine-tuning's folded graph: mpox.training."""

import torch

import monkeypox as mp
import mpox.model
import mpox.training
from conftest import relative, with_batchnorm_statistics


def test_run_keeps_a_copy_of_the_best_epoch_not_a_reference_to_live_weights(tmp_path):
    model = mpox.model.build_model('resnet18', 2)
    mpox.model.freeze(model)
    cfg = mp.parse_args(['train', '--out', str(tmp_path)])
    meta = {'fingerprint': 'x', 'classes': ['a', 'b'], 'config': {}}
    run = mpox.training.Run(cfg, model, None, None, ['a', 'b'], 0, meta=meta, checkpoint=cfg.checkpoint)
    opt = torch.optim.Adam(model.fc.parameters())
    weights = []
    for epoch, score in enumerate([0.6, 0.9, 0.7], 1):
        with torch.no_grad():
            model.fc.weight.add_(1.0)  # training changes the live tensors in place
        weights.append(model.fc.weight.clone())
        m = {'balanced_accuracy': score, 'loss': 1 - score, 'accuracy': score}
        run.end_epoch('finetune', epoch, 3, {'loss': 0.0, 'accuracy': 0.0}, {'metrics': m, 'threshold': 0.5,
                                                                             'operating': m}, opt, 0.0)
    run.finish()
    saved = torch.load(tmp_path / 'monkeypox_model.pkl', weights_only=True)
    assert saved['epoch'] == 2
    assert torch.equal(saved['model']['fc.weight'], weights[1])


def test_fine_tuning_folds_only_the_frozen_batchnorms_and_keeps_outputs_and_gradients():
    model = with_batchnorm_statistics(mpox.model.build_model('resnet18', 2))
    mpox.model.freeze(model, 1)  # layer4 and fc train
    folded = mpox.training.frozen_folded(model)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1, 0])
    grads = []
    for net in (model, folded):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert relative(folded(x), model(x)) < 1e-5
    assert grads[0].keys() == grads[1].keys() and any(k.startswith('layer4.') for k in grads[0])
    for k in grads[0]:
        assert relative(grads[1][k], grads[0][k]) < 1e-4, k
    folded_names = [n for n, m in folded.named_children() if n.endswith('_folded')]
    assert folded_names and not any(n.startswith('layer4') for n in folded_names)  # trainable BatchNorms stay
    assert all(isinstance(model.get_submodule(n), torch.nn.BatchNorm2d) for n in ('bn1', 'layer1.0.bn1'))
